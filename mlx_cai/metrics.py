"""Collapse / degeneration metrics for generated responses (pure Python, no MLX).

All word-level metrics share one tokenizer, `words`: lowercase, curly apostrophes
folded to ``'``, then the regex ``\\w+|[^\\w\\s]`` -- a token is either a run of word
characters or a single non-space, non-word character (punctuation, each emoji
codepoint). So ``"I'm fine!"`` -> ``["i", "'", "m", "fine", "!"]``.

Conventions: every metric returns a float; degenerate inputs (empty text, fewer
tokens than n, no texts) return 0.0, i.e. "no evidence of collapse", except where
a docstring says otherwise.
"""

from __future__ import annotations

import gzip
import math
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SENTENCE_SPLIT_RE = re.compile(r"[.!?\n]+")
_WS_RE = re.compile(r"\s+")
# Curly/modifier apostrophes fold to ASCII so "I’m" and "I'm" tokenize alike.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})

# Emoji codepoint blocks (inclusive). 1F000-1F2FF: mahjong/domino/cards, enclosed
# alphanumerics incl. regional-indicator flags; 1F300-1FAFF: pictographs, emoticons,
# transport, supplemental symbols; 2600-27BF: misc symbols and dingbats.
EMOJI_RANGES: tuple[tuple[int, int], ...] = (
    (0x1F000, 0x1F2FF),
    (0x1F300, 0x1FAFF),
    (0x2600, 0x27BF),
)
# Invisible glue inside emoji sequences: not emojis themselves, but they must not
# break a run (FE0E/FE0F variation selectors, U+200D zero-width joiner).
_EMOJI_GLUE = frozenset("\ufe0e\ufe0f\u200d")


def words(text: str) -> list[str]:
    """Lowercase tokens of `text`: ``re.findall(r"\\w+|[^\\w\\s]", text.lower())``.

    Curly apostrophes are first folded to ``'``. Each punctuation mark and each emoji
    codepoint is its own token; whitespace is dropped.
    """
    return _TOKEN_RE.findall(text.lower().translate(_APOSTROPHES))


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(text: str, n: int = 4) -> float:
    """Within-response repetition: ``1 - |unique n-grams| / |n-grams|`` over `words(text)`.

    0.0 when the response has fewer than `n` tokens. (Welleck et al. 2019, seq-rep-n.)
    """
    grams = _ngrams(words(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Pooled diversity: ``|unique n-grams| / |n-grams|`` over all responses together.

    n-grams never span two responses. 0.0 when there are no n-grams at all.
    (Li et al. 2016, distinct-n, corpus level.)
    """
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def _sentences(text: str) -> list[str]:
    # Normalized so "Hello  world." and "hello world!" count as the same sentence.
    parts = (_WS_RE.sub(" ", s).strip().lower() for s in _SENTENCE_SPLIT_RE.split(text))
    return [p for p in parts if p]


def sentence_repetition(text: str) -> float:
    """``1 - |unique sentences| / |sentences|`` within one response.

    Sentences are split on runs of ``.``, ``!``, ``?`` and newlines, lowercased,
    whitespace-collapsed and stripped; empty pieces are dropped. 0.0 when there
    are no sentences.
    """
    sents = _sentences(text)
    if not sents:
        return 0.0
    return 1.0 - len(set(sents)) / len(sents)


def compression_ratio(text: str) -> float:
    """``len(utf8 bytes) / len(gzip.compress(bytes))``; higher = more repetitive.

    Uses gzip level 9 with mtime=0 so the value is deterministic. Empty text -> 0.0
    (0 bytes over a ~20-byte gzip header). Short texts score below 1.0 because of
    the fixed gzip overhead, so compare ratios between texts of similar length.
    """
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(gzip.compress(data, compresslevel=9, mtime=0))


def is_emoji(ch: str) -> bool:
    """True if the single character `ch` lies in one of `EMOJI_RANGES`."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in EMOJI_RANGES)


def emoji_count(text: str) -> int:
    """Number of emoji codepoints in `text` (variation selectors / ZWJ not counted).

    A ZWJ sequence such as a family emoji counts once per pictograph it joins.
    """
    return sum(1 for ch in text if is_emoji(ch))


def emoji_density(text: str) -> float:
    """``emoji_count(text) / len(text)`` with len in Unicode codepoints; 0.0 if empty."""
    return emoji_count(text) / len(text) if text else 0.0


def max_emoji_run(text: str) -> int:
    """Length (in emojis) of the longest run of consecutive emojis.

    Whitespace, variation selectors and zero-width joiners between emojis do not
    break a run; any other character does. ``"ok 🎉 🎉🎉!"`` -> 3.
    """
    best = run = 0
    for ch in text:
        if is_emoji(ch):
            run += 1
            best = max(best, run)
        elif not (ch.isspace() or ch in _EMOJI_GLUE):
            run = 0
    return best


def non_termination_rate(finish_reasons: Sequence[str]) -> float:
    """Share of generations whose finish reason is ``"length"`` (hit max tokens).

    0.0 for an empty sequence.
    """
    if not finish_reasons:
        return 0.0
    return sum(1 for r in finish_reasons if r == "length") / len(finish_reasons)


def _token_string(text: str) -> str:
    # Space-padded token stream, so substring search matches whole tokens only.
    return " " + " ".join(words(text)) + " "


def phrase_repeat_rate(texts: Sequence[str], phrases: Iterable[str]) -> float:
    """Share of responses that contain at least one of `phrases`.

    Matching is on the `words` token stream of both sides, so it is case-insensitive,
    whitespace- and apostrophe-normalized, and respects token boundaries ("sorry"
    does not match "sorrynot"). Phrases with no tokens are ignored. 0.0 if there
    are no texts or no phrases. Accepts the output of `frequent_phrases` directly.
    """
    pats = [p for p in (_token_string(ph) for ph in phrases) if p.strip()]
    if not texts or not pats:
        return 0.0
    hits = sum(1 for t in texts if any(p in _token_string(t) for p in pats))
    return hits / len(texts)


def frequent_phrases(
    texts: Sequence[str], n: int = 6, min_share: float = 0.1, min_count: int = 2
) -> dict[str, float]:
    """Word n-grams that appear in many texts: ``{phrase: share of texts containing it}``.

    Document frequency is counted (a text counts once however often it repeats the
    n-gram). An n-gram is kept when it occurs in at least
    ``max(min_count, ceil(min_share * len(texts)))`` texts. Phrases are the tokens
    joined by single spaces (``"i ' m sorry"``), which `phrase_repeat_rate` matches.
    Ordered by share descending, then alphabetically. Overlapping n-grams of one
    longer fixed phrase are all reported.
    """
    if not texts:
        return {}
    df: Counter[tuple[str, ...]] = Counter()
    for t in texts:
        df.update(set(_ngrams(words(t), n)))
    need = max(min_count, math.ceil(min_share * len(texts)))
    kept = sorted(((g, c) for g, c in df.items() if c >= need), key=lambda gc: (-gc[1], gc[0]))
    return {" ".join(g): c / len(texts) for g, c in kept}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# Per-response metrics averaged over responses in `collapse_summary`.
PER_TEXT_METRICS: dict[str, Callable[[str], float]] = {
    "seq_rep_4": lambda t: seq_rep_n(t, 4),
    "sentence_repetition": sentence_repetition,
    "compression_ratio": compression_ratio,
    "emoji_density": emoji_density,
    "mean_length_words": lambda t: float(len(words(t))),
}


def collapse_summary(
    texts: Sequence[str], finish_reasons: Sequence[str], phrases: Iterable[str] = ()
) -> dict[str, float]:
    """Collapse metrics of a batch of responses.

    Keys: ``seq_rep_4``, ``sentence_repetition``, ``compression_ratio``,
    ``emoji_density``, ``mean_length_words`` (means over responses; length counts
    `words` tokens), ``distinct_1``, ``distinct_2`` (pooled), ``non_termination_rate``,
    ``phrase_repeat_rate`` (against `phrases`). `finish_reasons` must be parallel to
    `texts` (ValueError otherwise). Empty `texts` -> all zeros.
    """
    if len(finish_reasons) != len(texts):
        raise ValueError(
            f"finish_reasons has {len(finish_reasons)} entries for {len(texts)} texts"
        )
    out = {k: _mean([f(t) for t in texts]) for k, f in PER_TEXT_METRICS.items()}
    out["distinct_1"] = distinct_n(texts, 1)
    out["distinct_2"] = distinct_n(texts, 2)
    out["non_termination_rate"] = non_termination_rate(finish_reasons)
    out["phrase_repeat_rate"] = phrase_repeat_rate(texts, phrases)
    return out
