"""How critique and revision requests are put to the critic: the conversations of one SL-CAI round.

Two framings (revise's `framing`):

- `conversation` (the paper, Anthropic): the critique request is a further user turn after the model's own answer,
  the revision request one more after its critique; few-shot demos are earlier turns of the same chat.
- `single`: each request is one self-contained user turn that quotes the user's request and the draft reply (and,
  for the revision, the critique), so the critic judges a text instead of its "own last response". A 1.5B critic
  follows this far better: measured on the 64 demo prompts, the conversation framing gave 8/64 refusing revisions,
  a single-turn framing by hand 60/64. Demos become earlier (request, answer) turns in the same format.

- `joint`: the single framing's critique and revision asked for in one request, answered as `Critique: ...` then
  `Reply: ...` and split by `split_joint`: the critique still comes first and conditions the revision, but each
  row's request and draft are prefilled once instead of twice (prefill is what a 1.5B critic spends its time on
  on a CPU). A reply without the `Reply:` part gives an empty revision, which cleaning rejects.

- `principled`: no critique call: the critic answers the user's request itself, with the sampled principle and
  what a good reply is (PRINCIPLED_GUIDE) as its system turn: context distillation, as Anthropic distilled a
  principle-prompted model. With the 1.5B overseer this is the framing that declines: on 24 train prompts outside
  the demo's, 17 of its replies refused in varied words (the joint framing: 11/48 revisions, the single framing
  25/48; shown a draft, the overseer mostly softened or carried the draft on), at a third of the prefill.

Pure functions, no model calls: mlx_cai.stages.revise sends what they build.
"""

from __future__ import annotations

import re
from typing import Sequence

from mlx_cai.constitution import Demonstration, Principle

FRAMINGS = ("conversation", "single", "joint", "principled")

# "your last response" and its variants, as the shipped and Anthropic constitutions word their requests
_SELF = re.compile(r"\b(your|the assistant's|the ai's|the ai model's|the) (last |previous |preceding |most recent )?"
                   r"(response|answer|reply)\b", re.I)


def as_draft(request: str) -> str:
    """A request written for the conversation framing, pointed at the quoted draft instead."""
    return _SELF.sub("the draft reply", request)


def _quote(label: str, text: str) -> str:
    return f"{label}:\n<<<\n{text.strip()}\n>>>"


def single_critique(prompt: str, draft: str, principle: Principle) -> str:
    return "\n\n".join([
        "Below is a request a user sent to an AI assistant, and the assistant's draft reply.",
        _quote("Request", prompt), _quote("Draft reply", draft),
        as_draft(principle.critique) + " If the request itself is harmless and the draft answers it well, "
        "say so. Write the critique only, in two to four sentences.",
    ])


# What the revision must be: safe without being evasive, and in the critic's own words every time (a model
# trained on one stock refusal learns to refuse everything with it).
GOOD_REPLY = (
    "If the request asks for something harmful, say plainly which part you will not help with and why, in your own "
    "words, then offer something related that is safe and genuinely useful. If the request is harmless, simply "
    "answer it well.")
REVISION_GUIDE = ("Then write the reply the assistant should send instead, speaking to the user directly. "
                  + GOOD_REPLY + " Write only the reply itself.")


def single_revision(prompt: str, draft: str, critique: str, principle: Principle) -> str:
    return "\n\n".join([
        "Below is a request a user sent to an AI assistant, the assistant's draft reply, and a critique of the draft.",
        _quote("Request", prompt), _quote("Draft reply", draft), _quote("Critique", critique),
        as_draft(principle.revision), REVISION_GUIDE,
    ])


def single_demos(shots: Sequence[Demonstration], kind: str) -> list[dict[str, str]]:
    """Few-shot demos as earlier turns in the single framing: (request, critique) or (request, revision) pairs."""
    out = []
    for d in shots:
        p = Principle(d.principle or "", d.critique_request, d.revision_request)
        if kind == "critique":
            out += [{"role": "user", "content": single_critique(d.prompt, d.response, p)},
                    {"role": "assistant", "content": d.critique}]
        else:
            out += [{"role": "user", "content": single_revision(d.prompt, d.response, d.critique, p)},
                    {"role": "assistant", "content": d.revision}]
    return out


JOINT_FORM = ("Answer in exactly this form, with nothing before or after:\nCritique: <the critique, two to four "
              "sentences>\nReply: <the reply the assistant should send instead, at most five sentences>")


def joint_request(prompt: str, draft: str, principle: Principle) -> str:
    """One request for both: critique the draft by the principle, then write the reply to send instead.

    The principle's revision request is left out: "rewrite the draft so that ..." made the 1.5B overseer edit
    harmful drafts into softened compliance instead of declining (seen in the single framing: 25/48 revisions
    refused, most of the rest carried the draft on); REVISION_GUIDE says what the reply must be."""
    return "\n\n".join([
        "Below is a request a user sent to an AI assistant, and the assistant's draft reply.",
        _quote("Request", prompt), _quote("Draft reply", draft),
        "First critique the draft. Say whether the request asks for something harmful, and whether the draft "
        "helps with it. " + as_draft(principle.critique) + " If the request itself is harmless and the draft "
        "answers it well, say so.",
        REVISION_GUIDE,
        JOINT_FORM,
    ])


_CRITIQUE_LABEL = re.compile(r"^\W*critique\W*:\W*", re.I)
_REPLY_LABEL = re.compile(r"^[ \t*#_]*(reply|revised reply|revision)[ \t*_]*:[ \t*_]*", re.I | re.M)


def split_joint(text: str) -> tuple[str, str]:
    """(critique, reply) of a joint answer: the reply is what follows the last `Reply:` label (bold or not) at
    the start of a line; without one, the whole text is the critique and the reply is empty."""
    found = list(_REPLY_LABEL.finditer(text))
    if not found:
        return _CRITIQUE_LABEL.sub("", text.strip()), ""
    last = found[-1]
    critique = _CRITIQUE_LABEL.sub("", text[: last.start()].strip())
    return critique.strip(), text[last.end():].strip()


def joint_demos(shots: Sequence[Demonstration]) -> list[dict[str, str]]:
    """Few-shot demos as earlier turns in the joint framing."""
    out = []
    for d in shots:
        p = Principle(d.principle or "", d.critique_request, d.revision_request)
        out += [{"role": "user", "content": joint_request(d.prompt, d.response, p)},
                {"role": "assistant", "content": f"Critique: {d.critique.strip()}\nReply: {d.revision.strip()}"}]
    return out


PRINCIPLED_GUIDE = GOOD_REPLY + " Keep it to at most five sentences."

# revise's `opening`: how a principled reply begins. "free" leaves it to the critic. "subject": with what the request
# is about, never "I" or an apology. A student trained on refusals that all open with "I" (beside helpful answers
# that open in many ways) gives "I" the largest first-token probability on many prompts, and greedy decoding then
# refuses them all; a refusal that opens with its subject carries its reason and splits that mass by topic.
OPENINGS = ("free", "subject")
SUBJECT_OPENING = ("Begin the reply with the subject of the request in your own words (for example \"Picking a lock "
                   "you do not own...\" or \"Sourdough starters...\"), never with \"I\" or an apology.")


def principled_system(principle: Principle, opening: str = "free") -> str:
    """The system turn of the principled framing: the principle's critique request, turned on the reply being
    written, PRINCIPLED_GUIDE and (opening "subject") SUBJECT_OPENING."""
    guide = PRINCIPLED_GUIDE + (" " + SUBJECT_OPENING if opening == "subject" else "")
    return ("You are a helpful and harmless assistant. Keep this principle in mind: "
            + _SELF.sub("your reply", principle.critique) + " " + guide)
