"""How to sample (`SamplingConfig`), what a completion is (`Generation`), and per-row token sampling.

The two dataclasses are the interface every chat backend shares (local or server). The rest is
repetition penalty, temperature and top-p as pure array functions plus a small stateful `Sampler`
that holds the per-row keys and recent tokens.
Per-row keys (advanced with `vmap(split)`) make a row's sample independent of its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mlx_cai import backend  # noqa: F401

import mlx.core as mx

Conversation = Sequence[dict]


@dataclass
class SamplingConfig:
    """How to sample. Defaults are greedy with a 256-token budget."""

    max_tokens: int = 256  # new tokens per response
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in the last `repetition_context` tokens
    repetition_context: int = 64
    seed: int = 0  # base seed; row i of a call uses seeds[i] if given, else seed + i
    context_policy: str = "truncate"  # "truncate" (left, recorded) or "error"

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.context_policy not in ("truncate", "error"):
            raise ValueError("context_policy must be 'truncate' or 'error'")


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (an end token) or "length" (hit max_tokens)
    prompt_tokens: int
    completion_tokens: int
    truncated: int = 0  # prompt tokens dropped from the left by the context policy
    tokens: list[int] = field(default_factory=list, repr=False)


def apply_repetition_penalty(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """CTRL-style penalty. logits (B, V); recent (B, W) token ids, -1 for empty slots.

    A seen token's logit is divided by `penalty` if positive, multiplied if negative.
    """
    B, V = logits.shape
    # Empty slots scatter into a spare column V, so they can never clear a real token's mark.
    idx = mx.where(recent >= 0, recent, V)
    seen = mx.put_along_axis(mx.zeros((B, V + 1), dtype=mx.bool_), idx, mx.array(True), axis=-1)[:, :V]
    penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalized, logits)


NUCLEUS_CANDIDATES = 1024  # top_p_mask looks for the nucleus among this many most likely tokens first


def _kept(sorted_lp: mx.array, top_p: float) -> mx.array:
    """Which of the tokens, sorted by logprob, the nucleus keeps: those whose mass before them is still below
    top_p (so the top token is always kept)."""
    return (mx.cumsum(mx.exp(sorted_lp), axis=-1) - mx.exp(sorted_lp)) < top_p


def _top_p_full(logprobs: mx.array, top_p: float) -> mx.array:
    """top_p_mask over the whole vocabulary: one argsort of every row (~35 ms a row of 49k tokens on the CPU)."""
    order = mx.argsort(-logprobs, axis=-1)
    keep_sorted = _kept(mx.take_along_axis(logprobs, order, axis=-1), top_p)
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def top_p_mask(logprobs: mx.array, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> mx.array:
    """Keep the smallest set of tokens whose probability mass reaches `top_p`. logprobs (B, V) -> same, -inf elsewhere.

    The nucleus is looked for among each row's `candidates` most likely tokens (a partition, then a sort of those
    only: ~10x faster than sorting the vocabulary, which took a sampled decode step of SmolLM2 at batch 32 from
    ~0.2 to ~1.1 s). The result is the full sort's, bit for bit: the prefix sums of the sorted masses are the same
    numbers, and where a row's nucleus does not end within its candidates, or two kept candidates tie (their order
    would be the sort's choice), the whole vocabulary is sorted instead."""
    V = logprobs.shape[-1]
    if candidates >= V:
        return _top_p_full(logprobs, top_p)
    idx = mx.argpartition(-logprobs, candidates - 1, axis=-1)[:, :candidates]
    vals = mx.take_along_axis(logprobs, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    sorted_lp = mx.take_along_axis(vals, order, axis=-1)
    keep_sorted = _kept(sorted_lp, top_p)
    ties = (sorted_lp[:, 1:] == sorted_lp[:, :-1]) & keep_sorted[:, :-1]
    if (mx.any(keep_sorted[:, -1]) | mx.any(ties)).item():
        return _top_p_full(logprobs, top_p)
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, mx.bool_), mx.take_along_axis(idx, order, axis=-1),
                             keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


_split = mx.vmap(lambda k: mx.random.split(k))


class Sampler:
    """Samples one token per row from (B, V) logits under a SamplingConfig."""

    def __init__(self, cfg, seeds, prompts: list[list[int]]):
        self.cfg = cfg
        self.keys = mx.stack([mx.random.key(int(s)) for s in seeds]) if cfg.temperature > 0 else None
        W = cfg.repetition_context
        # The window starts with the end of the prompt, as in mlx-lm and HF; -1 marks empty slots.
        self.recent = mx.array([([-1] * W + p)[-W:] for p in prompts]) if cfg.repetition_penalty != 1.0 else None

    def __call__(self, logits: mx.array) -> mx.array:
        cfg = self.cfg
        logits = logits.astype(mx.float32)
        if self.recent is not None:
            logits = apply_repetition_penalty(logits, self.recent, cfg.repetition_penalty)
        if cfg.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits / cfg.temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if cfg.top_p < 1.0:
            logprobs = top_p_mask(logprobs, cfg.top_p)
        pairs = _split(self.keys)
        self.keys, sub = pairs[:, 0], pairs[:, 1]
        noise = mx.vmap(lambda k: mx.random.gumbel(shape=logprobs.shape[-1:], key=k))(sub)
        return mx.argmax(logprobs + noise, axis=-1)

    def push(self, tokens: mx.array) -> None:
        """Slide the repetition window by the tokens just sampled (B,), lazily on device."""
        if self.recent is not None:
            self.recent = mx.concatenate([self.recent[:, 1:], tokens[:, None].astype(self.recent.dtype)], axis=1)

    def filter(self, keep: list[int]) -> None:
        idx = mx.array(keep)
        if self.keys is not None:
            self.keys = self.keys[idx]
        if self.recent is not None:
            self.recent = self.recent[idx]
