"""Batched generation for lists of chat conversations on a local MLX model.

`generate_iter` yields `(index, Generation)` as each batch finishes, so callers can append results to
JSONL as they go; `generate` collects them in input order. Prompts are sorted by length into batches
(less padding), left-padded, prefilled in chunks, then decoded step by step with the next step queued
before the host reads the current tokens (no idle gap per step).

Sampling is per row: each conversation has its own seed, so its sample does not depend on which other
prompts share its batch (a resumed run samples the same as an uninterrupted one).

Context policy: a prompt longer than `context_length - max_tokens` is left-truncated (the oldest tokens
are dropped) and `Generation.truncated` counts the dropped tokens; `context_policy="error"` raises instead.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx

from mlx_cai import encoding, sampling
from mlx_cai.sampling import Conversation, Generation, SamplingConfig
from mlx_cai.fastllama import FastLlama, FastRunner
from mlx_cai.settings import settings

class ContextError(ValueError):
    """A prompt does not fit the context window under context_policy='error'."""


def context_length(model, tokenizer) -> int:
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**7 else 4096


def encode(tokenizer, conversation: Conversation) -> list[int]:
    """Token ids of a conversation with the chat template and the assistant generation prompt."""
    return encoding.encode_prompt(tokenizer, conversation)


def fit_context(ids: list[int], limit: int, policy: str) -> tuple[list[int], int]:
    """Left-truncate `ids` to `limit` tokens (policy 'truncate') or raise (policy 'error')."""
    if len(ids) <= limit:
        return ids, 0
    if policy == "error":
        raise ContextError(f"prompt has {len(ids)} tokens, more than the {limit} that fit with max_tokens")
    return ids[len(ids) - limit :], len(ids) - limit


class GenericRunner:
    """The decode-loop interface over any mlx-lm model, with its left-padded BatchKVCache."""

    def __init__(self, model, tokens: mx.array, pad: list[int], prefill_chunk: int = 256):
        from mlx_lm.models.cache import BatchKVCache

        self.model, self.tokens, self.chunk = model, tokens, prefill_chunk
        self.cache = [BatchKVCache(pad) for _ in model.layers]

    @classmethod
    def left_padded(cls, model, prompts: list[list[int]], prefill_chunk: int = 256) -> "GenericRunner":
        """A runner over `prompts` of different lengths, left-padded to the longest."""
        L = max(len(p) for p in prompts)
        pad = [L - len(p) for p in prompts]
        return cls(model, mx.array([[0] * k + p for k, p in zip(pad, prompts)]), pad, prefill_chunk)

    def prefill(self) -> mx.array:
        # All prompt tokens but the last only fill the cache (their logits are never computed: lazy graph).
        n = self.tokens.shape[1] - 1
        for start in range(0, n, self.chunk):
            self.model(self.tokens[:, start : min(start + self.chunk, n)], cache=self.cache)
            mx.eval([c.state[:2] for c in self.cache])
        return self.step(self.tokens[:, -1])

    def step(self, y: mx.array) -> mx.array:
        return self.model(y[:, None], cache=self.cache)[:, -1, :]

    def retire(self, rows: list[int], tokens: list[list[int]]) -> None:
        """Nothing: mlx-lm's cache is not kept for later prompts (FastRunner.retire is)."""

    def keep(self, idx: mx.array) -> None:
        for c in self.cache:
            c.filter(idx)


def _decode_batch(runner, prompts: list[list[int]], seeds: list[int], cfg: SamplingConfig, eos: set[int],
                  on_step: Callable[[int], None] | None):
    """Generate for one batch. Returns (tokens per row, finish reason per row).

    The next step is queued (async_eval) before the host reads the current tokens. Finished rows keep
    decoding (their tokens are ignored) until at most half the batch is live, then the batch is compacted:
    few distinct shapes for the compiled path, little wasted work for the generic one. Rows leaving the batch
    (compacted away, or at its end) are handed to `runner.retire` with the tokens their cache holds.
    """
    B = len(prompts)
    sampler = sampling.Sampler(cfg, seeds, prompts)
    rows = list(range(B))  # original row of each batch position
    live = [True] * B
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    ends: dict[int, int] = {}  # row -> its end token (generated and fed back like the others)
    fed = 0  # decode steps run: generated tokens whose K/V every row's cache holds

    def held(row: int) -> list[int]:
        return (prompts[row] + out[row] + ([ends[row]] if row in ends else []))[: len(prompts[row]) + fed]

    y = sampler(runner.prefill())
    mx.async_eval(y)
    for n in range(cfg.max_tokens):
        next_y = None
        if n + 1 < cfg.max_tokens:
            sampler.push(y)
            next_y = sampler(runner.step(y))
            fed += 1
            mx.async_eval(next_y)
        new = 0
        for pos, tok in enumerate(y.tolist()):
            if not live[pos]:
                continue
            if tok in eos:
                reasons[rows[pos]] = "stop"
                ends[rows[pos]] = tok
                live[pos] = False
            else:
                out[rows[pos]].append(tok)
                new += 1
        if on_step:
            on_step(new)
        n_live = sum(live)
        if next_y is None or n_live == 0:
            break
        if n_live <= len(rows) // 2:
            keep = [p for p in range(len(rows)) if live[p]]
            gone = [p for p in range(len(rows)) if not live[p]]
            runner.retire(gone, [held(rows[p]) for p in gone])
            idx = mx.array(keep)
            runner.keep(idx)
            sampler.filter(keep)
            next_y = next_y[idx]
            rows = [rows[p] for p in keep]
            live = [True] * len(keep)
        y = next_y
    runner.retire(list(range(len(rows))), [held(r) for r in rows])
    return out, reasons


def generate_iter(model, tokenizer, conversations: Sequence[Conversation], config: SamplingConfig | None = None, *,
                  batch_size: int = 32, seeds: Sequence[int] | None = None, prefill_chunk: int = 256,
                  on_tokens: Callable[[int], None] | None = None,
                  use_fast: bool = True) -> Iterator[tuple[int, Generation]]:
    """Yield (index into `conversations`, Generation) batch by batch, longest prompts first.

    Llama-family and qwen2 models, dense or quantized, take the compiled path (mlx_cai.fastllama); others, or
    `use_fast=False`, the generic mlx-lm path. Both give the same greedy tokens (tested).
    """
    cfg = config or SamplingConfig()
    if seeds is None:
        seeds = [cfg.seed + i for i in range(len(conversations))]
    limit = context_length(model, tokenizer) - cfg.max_tokens
    if limit < 1:
        raise ContextError(f"max_tokens {cfg.max_tokens} leaves no room in the {limit + cfg.max_tokens}-token context")
    encoded = [fit_context(encode(tokenizer, c), limit, cfg.context_policy) for c in conversations]
    eos = set(getattr(tokenizer, "eos_token_ids", None) or {tokenizer.eos_token_id})
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    fast = FastLlama.for_model(model) if use_fast else None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts = [encoded[i][0] for i in idx]
        # Parallel streams for decode steps run MLX's single-threaded ops side by side; with packed weights
        # the C++ kernels use every thread in one stream instead (batch 32: ~100 vs ~114 ms per step). Below
        # stream_rows rows a part is bound by memory traffic (batch 8 in two streams of 4 rows: 0.7x one stream).
        split = fast and fast.cpu and not fast.packed_decode
        streams = min(len(prompts) // settings().stream_rows, backend.blas_threads()) if split else 1
        with backend.blas_threads_per(streams):
            if fast:
                runner = FastRunner(fast, prompts, cfg.max_tokens, streams=streams)
            else:
                runner = GenericRunner.left_padded(model, prompts, prefill_chunk)
            toks, reasons = _decode_batch(runner, prompts, [seeds[i] for i in idx], cfg, eos, on_tokens)
            mx.synchronize()  # no BLAS call in flight when the thread count changes back
        for j, i in enumerate(idx):
            ids, dropped = encoded[i]
            yield i, Generation(text=tokenizer.decode(toks[j]), finish_reason=reasons[j], prompt_tokens=len(ids),
                                completion_tokens=len(toks[j]) + (reasons[j] == "stop"), truncated=dropped,
                                tokens=toks[j])


def generate(model, tokenizer, conversations: Sequence[Conversation], config: SamplingConfig | None = None,
             **kwargs) -> list[Generation]:
    """Generations for `conversations`, in input order."""
    results: list[Generation | None] = [None] * len(conversations)
    for i, g in generate_iter(model, tokenizer, conversations, config, **kwargs):
        results[i] = g
    return results  # type: ignore[return-value]
