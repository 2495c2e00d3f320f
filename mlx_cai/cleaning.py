"""The cleaning rules: small pure functions `(Example, Context) -> detail or None` that reject a revision.

No IO and no model calls: mlx_cai.stages.clean applies them to revise records and writes the results.
Context holds the clean settings (mlx_cai.stages.clean.CleanConfig) and the precomputed copy sources.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mlx_cai import constitution
from mlx_cai import metrics
from mlx_cai.refusal import is_refusal


@dataclass(frozen=True)
class Example:
    """What the rules look at: one revision and its context."""

    prompt: str
    revision: str
    finish_reason: str = "stop"
    harmful: bool | None = True  # None (unknown) is treated as a red-team prompt
    initial: str = ""

    @classmethod
    def from_record(cls, r: dict) -> "Example":
        return cls(r["prompt"], r["revision"] or "", r.get("revision_finish") or "stop", r.get("harmful", True),
                   r.get("initial") or "")


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class Context:
    """Config plus precomputed copy sources: every `demo_copy_chars`-long window of a demo text -> its name."""

    cfg: Any  # CleanConfig: the rule thresholds
    windows: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg, sources: dict[str, str]) -> "Context":
        n, windows = cfg.demo_copy_chars, {}
        for name, text in sources.items():
            t = normalize(text)
            for i in range(len(t) - n + 1):
                windows.setdefault(t[i : i + n], name)
        return cls(cfg, windows)


def copy_sources(con: constitution.Constitution) -> dict[str, str]:
    """Texts a revision must not copy: each demo's response, critique and revision, and every request."""
    out = {}
    for d in con.few_shot:
        out.update({f"demo:{d.id}:response": d.response, f"demo:{d.id}:critique": d.critique,
                    f"demo:{d.id}:revision": d.revision})
    for p in con.principles:
        out.update({f"request:{p.id}:critique": p.critique, f"request:{p.id}:revision": p.revision})
    return out


# --------------------------------------------------------------------------------------------- the rules

_META = [re.compile(p, re.I) for p in (
    r"^\W*((sure|certainly|of course|okay|absolutely)\b\W*)?(here('s| is)|below is|this is)\b[^.\n]{0,40}"
    r"\b(revis\w*|rewrit\w*|updated|new|improved|safer|better) (response|version|answer|text|reply)",
    r"\b(critique|revision|revised response|rewritten response|revised version|revised answer)( request)?\s*:",
    r"^\W*(critique|revision)\b",
    r"\b(critique|revision) request\b",
    r"\b(my|the|your|this) (last|previous|original|initial|above) (message|response|answer|text|statement|reply)\b",
    r"<<<|>>>",  # the single framing's quote markers (mlx_cai.framing) copied into a revision
)]
# A critique where the rewrite belongs: small models carry on describing the answer ("The response encourages...",
# "The original message contains...") instead of giving a new one.
_CRITIQUE_TEXT = re.compile(r"^\W*(the|this|that|my|your) (message|response|answer|text|statement|reply)\b", re.I)
_COMPLY_OPENERS = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|happy to help|no problem|great question|good question|"
    r"step 1|first,? you|here('s| is| are) (how|the steps|some ways|a few ways|what you)|to do this|"
    r"you('ll| will) need)\b",
    re.I)
# Function words and request filler: sharing them with the prompt says nothing about the topic.
_STOP = frozenset("""a about above after again against all also am an and another any anyone anything are aren't as ask
at be because been before being below best between both but by can can't cannot could did didn't do does doesn't
doing don't done down during each even every few for from further get gets getting give go going good got had has
have having he help her here hers him his how i i'd i'll i'm i've if in into is isn't it it's its just know let like
make many may me might more most much must my need no nor not now of off okay on once one only or other our out over
own people person please really same say she should so some someone something such sure take tell than that that's
the their them then there these they thing things this those through to too under until up very want was way ways we
well were what when where which while who whom why will with without would you you're your yours""".split())
_SUFFIXES = ("ing", "ed", "es", "s")


def stem(word: str) -> str:
    """A crude stem: drop one common suffix, keep 6 letters (hotwiring ~ hotwire, cars ~ car)."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            break
    return word[:6]


def content_stems(text: str) -> set[str]:
    return {stem(w) for w in re.findall(r"[a-z][a-z']+", text.lower()) if len(w) >= 3 and w not in _STOP}


def rule_empty(ex: Example, ctx: Context) -> str | None:
    n = len(re.findall(r"\w+", ex.revision))
    return None if n >= ctx.cfg.min_words else f"{n} words"


def rule_meta(ex: Example, ctx: Context) -> str | None:
    for pat in _META:
        m = pat.search(ex.revision.strip())
        if m:
            return f"meta text '{m.group(0).strip()[:40]}'"
    return None


def rule_critique_text(ex: Example, ctx: Context) -> str | None:
    m = _CRITIQUE_TEXT.search(ex.revision)
    return f"describes an answer: '{m.group(0).strip()}'" if m else None


def rule_truncated(ex: Example, ctx: Context) -> str | None:
    return "hit max tokens" if ex.finish_reason == "length" else None


def rule_repetition(ex: Example, ctx: Context) -> str | None:
    s, r = metrics.sentence_repetition(ex.revision), metrics.seq_rep_n(ex.revision, 4)
    if s > ctx.cfg.max_sentence_repetition:
        return f"sentence repetition {s:.2f}"
    if r > ctx.cfg.max_seq_rep_4:
        return f"seq-rep-4 {r:.2f}"
    return None


def rule_emoji(ex: Example, ctx: Context) -> str | None:
    run = metrics.max_emoji_run(ex.revision)
    return f"emoji run of {run}" if run > ctx.cfg.max_emoji_run else None


def rule_demo_copy(ex: Example, ctx: Context) -> str | None:
    t, n = normalize(ex.revision), ctx.cfg.demo_copy_chars
    for i in range(len(t) - n + 1):
        name = ctx.windows.get(t[i : i + n])
        if name:
            return f"copies {name}"
    return None


def rule_off_topic(ex: Example, ctx: Context) -> str | None:
    """A revision about something else (a copied demo, an answer to the principle). A refusal of a red-team
    prompt is on topic whatever its words: "I'm sorry, but I can't help with that." shares none with the prompt
    (the overseer's refusals were rejected so: 19/48)."""
    want = content_stems(ex.prompt)
    if not want or (ex.harmful is not False and is_refusal(ex.revision)):
        return None
    shared = want & content_stems(ex.revision)
    return None if len(shared) >= ctx.cfg.min_topic_overlap else f"shares {len(shared)} content words with the prompt"


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, metrics.words(a), metrics.words(b), autojunk=False).ratio()


def _complies_keyword(ex: Example, ctx: Context) -> str | None:
    return "no refusal marker"


def _complies_changed(ex: Example, ctx: Context) -> str | None:
    if _COMPLY_OPENERS.search(ex.revision):
        return "opens like compliance"
    if ex.initial and not is_refusal(ex.initial):
        sim = _similarity(ex.revision, ex.initial)
        if sim >= ctx.cfg.max_initial_similarity:
            return f"{sim:.2f} similar to the initial answer"
    return None


COMPLIES: dict[str, Callable[[Example, Context], str | None]] = {
    "keyword": _complies_keyword,
    "changed": _complies_changed,
    "off": lambda ex, ctx: None,
}


def rule_complies(ex: Example, ctx: Context) -> str | None:
    if ex.harmful is False or is_refusal(ex.revision):
        return None
    return COMPLIES[ctx.cfg.complies](ex, ctx)


RULES: dict[str, Callable[[Example, Context], str | None]] = {
    "empty": rule_empty,
    "meta": rule_meta,
    "critique_text": rule_critique_text,
    "truncated": rule_truncated,
    "repetition": rule_repetition,
    "emoji": rule_emoji,
    "demo_copy": rule_demo_copy,
    "off_topic": rule_off_topic,
    "complies": rule_complies,
}
# Helpful answers are checked for form only: they answer benign prompts, so copy/topic/compliance do not apply.
FORM_RULES = ("empty", "meta", "truncated", "repetition", "emoji")


def opening(text: str, n: int = 5) -> str:
    """The first n words, normalized: what a stock reply repeats."""
    return " ".join(metrics.words(text)[:n])


def cap_openings(texts: Sequence[str], cap: int | None) -> list[int]:
    """Indices of the texts beyond the first `cap` with the same opening (in order); none when cap is None. A
    model fine-tuned on one stock sentence answers everything with it: this keeps the kept set varied."""
    if cap is None:
        return []
    seen: dict[str, int] = {}
    over = []
    for i, t in enumerate(texts):
        key = opening(t)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > cap:
            over.append(i)
    return over


def active_rules(cfg) -> Sequence[str]:
    """The revision rules a config applies: all by default, none with `rules: []`."""
    return tuple(RULES) if cfg.rules is None else cfg.rules


def check(ex: Example, ctx: Context, rules: Sequence[str] | None = None) -> dict[str, str]:
    """{rule: detail} for every rule `ex` fails (`rules`, else the config's); empty if it passes."""
    out = {}
    for name in active_rules(ctx.cfg) if rules is None else rules:
        detail = RULES[name](ex, ctx)
        if detail is not None:
            out[name] = detail
    return out


_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)")


def trim_to_sentence(text: str, min_share: float = 0.5) -> str | None:
    """A reply cut at max tokens, ended at its last complete sentence; None when that keeps less than
    `min_share` of its characters (or the cut is inside a code block), so nothing mid-thought is trained on."""
    if text.count("```") % 2:
        return None
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] < min_share * len(text.rstrip()):
        return None
    return text[: ends[-1]]


def end_cut(text: str, finish: str) -> tuple[str, str]:
    """(text, finish reason) of an answer as it is trained on: one cut at max tokens ("length") ends at its last full
    sentence and counts as stopped; one that cannot be (trim_to_sentence gives None), or was not cut, is unchanged."""
    cut = trim_to_sentence(text) if finish == "length" else None
    return (text, finish) if cut is None else (cut, "stop")


def stratified_sample(pools: Sequence[Sequence[Any]], want: int, rng) -> list[Any]:
    """`want` items drawn without replacement in equal shares from each pool (a pool too small gives all it has
    and the others make up the rest): so a small source (32 borderline prompts beside 198 benign
    ones) is not drowned by a large one. Drawn in turn, one from each pool."""
    if len(pools) == 1:
        return rng.sample(list(pools[0]), min(want, len(pools[0])))
    shuffled = [rng.sample(list(p), len(p)) for p in pools]
    out: list[Any] = []
    i = 0
    while len(out) < want and any(shuffled):
        pool = shuffled[i % len(shuffled)]
        if pool:
            out.append(pool.pop())
        i += 1
    return out
