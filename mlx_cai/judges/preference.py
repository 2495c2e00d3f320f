"""The pairwise comparison behind preference labels (the feedback stage): pure prompt building and parsing.

A feedback model or judge is asked which of two responses is less harmful under one comparison principle:
`question` writes it with the options `(A)` and `(B)`; a local model's answer is read from the next-token
logits after ANSWER_PREFIX (`render_choice`; mlx_cai.judges.choice), an API judge's from its last `[[A]]` or
`[[B]]` (`parse_verdict`). PRINCIPLES are the built-in comparison principles. Reads and writes nothing.
"""

from __future__ import annotations

import re

from mlx_cai.judges.choice import render_answer_start

# Comparison principles for the feedback model, written for mlx-cai (the idea, one question per principle
# sampled per prompt, follows Bai et al. 2022). Each asks for the *less harmful* answer, and several also guard
# against the opposite failure (lecturing, needless refusal), so the preference does not reward preachiness.
PRINCIPLES: tuple[str, ...] = (
    "Which reply would a careful, kind and level-headed person be more comfortable sending? Pick the one that "
    "does less harm.",
    "Pick the reply that gives the user less help with anything dangerous, illegal or cruel, such as violence, "
    "fraud, harassment or hateful content.",
    "Both replies may have problems. Pick the one that is safer, but do not reward a reply only for lecturing "
    "the user or sounding alarmed.",
    "Pick the reply that stays safe while still being useful, calm and respectful, rather than cold, scolding "
    "or suspicious of the user.",
    "Which reply treats people more fairly and decently, without slurs, stereotypes, or content that could "
    "hurt someone's body, finances or reputation?",
    "Which reply would cause less damage if the user acted on it exactly as written? Pick that one.",
    "Pick the reply that declines the unsafe part of the request plainly and briefly, and offers a safe way to "
    "meet the underlying need if there is one.",
    "Which reply makes it harder for someone to commit a crime or injure a person, while helping as much as "
    "it safely can?",
)
ANSWER_PREFIX = "The answer is: "
OPTIONS = ("(A)", "(B)")
JUDGE_INSTRUCTION = ("First explain your reasoning in two or three sentences, then give your verdict on the last "
                     "line as [[A]] or [[B]].")
_VERDICT = re.compile(r"\[\[\s*([AB])\s*\]\]")


def question(prompt: str, principle: str, first: str, second: str) -> str:
    """The multiple-choice question: `first` is option (A), `second` option (B)."""
    return (f"Consider the following conversation between a human and an assistant:\n\nHuman: {prompt}\n\n"
            f"{principle}\n\nOptions:\n{OPTIONS[0]} {first}\n\n{OPTIONS[1]} {second}")


def judge_question(prompt: str, principle: str, first: str, second: str) -> str:
    """`question` with the instruction to reason briefly and end with a verdict, for an API judge."""
    return question(prompt, principle, first, second) + "\n\n" + JUDGE_INSTRUCTION


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from the judge's last `[[A]]` / `[[B]]`, or None if it gave none."""
    found = _VERDICT.findall(text)
    return found[-1] if found else None


def render_choice(tokenizer, text: str) -> str:
    """The question as a local model reads it: a user turn, then the start of its answer (ANSWER_PREFIX)."""
    return render_answer_start(tokenizer, [{"role": "user", "content": text + "\n\nAnswer with (A) or (B)."}],
                               ANSWER_PREFIX)
