"""Batches of tokenized examples: the padded arrays of one batch (mlx-lm's layout), a seeded batch order in
which batch k depends only on (seed, k), and this process's share of a batch (mlx_cai.distributed), in
slices for parallel CPU streams. Pure: reads only MLX_CAI_TRAIN_STREAMS.

A batch's arrays: tokens (B, W+1) right-padded with 0, lengths (B, 2) = [prompt_offset, length], and the
flat positions (and sequences) of the answer tokens, so the vocabulary projection runs on those alone.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx
import numpy as np

from mlx_cai import distributed
from mlx_cai.train.config import TrainingError

PAD_TO = 32  # batch widths round up to this: few distinct shapes for the compiled step


def completion_mask(lengths: mx.array, width: int) -> mx.array:
    """(B, width) float mask over *targets*: target t is token t+1, inside the answer when
    prompt_offset <= t+1 < length."""
    steps = mx.arange(1, width + 1)[None, :]
    return ((steps >= lengths[:, 0:1]) & (steps < lengths[:, 1:2])).astype(mx.float32)


def pad_batch(seqs: Sequence[Sequence[int]], offsets: Sequence[int]) -> tuple[mx.array, ...]:
    """The arrays of one batch: tokens (B, W+1) right-padded with 0, W a multiple of PAD_TO; lengths (B, 2) =
    [offset, length]; positions (K,) = flat indices into (B, W) of the targets inside the answers and rows (K,)
    = their sequence (-1 pads K up to a multiple of PAD_TO, so few distinct shapes reach the compiled step)."""
    width = PAD_TO * math.ceil(max(len(s) - 1 for s in seqs) / PAD_TO)
    arr = np.zeros((len(seqs), width + 1), np.int32)
    positions: list[int] = []
    rows: list[int] = []
    for i, (s, o) in enumerate(zip(seqs, offsets)):
        arr[i, : len(s)] = s
        start, end = max(o - 1, 0), len(s) - 1  # target t is token t+1
        positions += range(i * width + start, i * width + end)
        rows += [i] * (end - start)
    pad = PAD_TO * max(math.ceil(len(positions) / PAD_TO), 1) - len(positions)
    return (mx.array(arr), mx.array([[o, len(s)] for o, s in zip(offsets, seqs)], dtype=mx.int32),
            mx.array(positions + [0] * pad, dtype=mx.int32), mx.array(rows + [-1] * pad, dtype=mx.int32))


class BatchOrder:
    """Batch k (counted over all epochs) from (seed, k) alone, so the data position is one integer.

    Examples are sorted by length and cut into batches (little padding); each epoch visits the batches in
    a seeded random order. The last batch of an epoch may be smaller. With `groups` (a label per example), each
    group is sorted by length and the groups are interleaved in proportion before the cut, so every batch holds
    examples of each group as far as their sizes allow (DPO: harmful-prompt pairs beside boundary pairs, so no
    step pushes only one way).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, groups: Sequence[str] | None = None):
        if not lengths:
            raise TrainingError("no training examples")
        idx = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        if groups is not None and len(set(groups)) > 1:
            idx = interleave(idx, groups)
        self.batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, k: int) -> list[int]:
        epoch, pos = divmod(k, len(self.batches))
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
        return self.batches[perm[pos]]


def interleave(order: Sequence[int], groups: Sequence[str]) -> list[int]:
    """(pure) `order` with each group's members kept in their order and the groups spread in proportion: member r
    of a group of n sits at (r + 0.5) / n of the way (ties: by group name)."""
    names = sorted(set(groups[i] for i in order))
    members = {g: [i for i in order if groups[i] == g] for g in names}
    keyed = [((r + 0.5) / len(m), names.index(g), i) for g, m in members.items() for r, i in enumerate(m)]
    return [i for _, _, i in sorted(keyed)]


def eval_batches(lengths: Sequence[int], batch_size: int, limit: int) -> list[list[int]]:
    """Validation batches in a fixed order (sorted by length); `limit` -1 = all."""
    idx = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return out if limit < 0 else out[:limit]


class Padding(tuple):
    """The arrays of a batch that weighs 0: a process whose share of a global batch is empty (a batch with
    fewer rows than processes) still runs the step, so that the collectives of all processes match."""


def local_batch(rows: list[int], build: Callable[[list[int]], tuple], parts: int = 1) -> tuple | list[tuple]:
    """This process's share of the training batch of example indices `rows` (all of them in one process).
    With `parts` > 1 and more than one row: a list of up to `parts` strided slices of the share, built
    separately so that `loop.train` runs them on parallel CPU streams. Strided like the processes' shares, so
    one process with 2 streams computes exactly the slices that 2 processes with 1 stream each would."""
    mine = distributed.shard(rows)
    if not mine:
        return Padding(build(rows[:1]))
    if parts <= 1 or len(mine) < 2:
        return build(mine)
    return [build(s) for s in strided(mine, parts)]


def strided(xs: list, parts: int) -> list[list]:
    """Up to `parts` strided slices of `xs` (xs[i::n]), like the shares of n processes (`distributed.shard`)."""
    n = max(1, min(parts, len(xs)))
    return [xs[i::n] for i in range(n)]


def local_batches(batches: list[list[int]], build: Callable[[list[int]], tuple]) -> Iterator[tuple]:
    """This process's share of the validation batches: whole batches, strided, and at least one (Padding)."""
    mine = distributed.shard(batches)
    if not mine and batches:
        yield Padding(build(batches[0]))
    for b in mine:
        yield build(b)


def train_streams() -> int:
    """How many CPU streams a training step splits its batch over: one per BLAS thread on the CPU (MLX's
    CPU ops other than BLAS are single-threaded, so one stream leaves the other cores idle during norms,
    rope, softmax and gates; measured on 2 cores, an SFT step of 4 x 128 tokens: 1.74-1.85 s in two streams,
    2.14-2.15 s in one). 1 elsewhere (Metal, CUDA). MLX_CAI_TRAIN_STREAMS=N overrides."""
    from mlx_cai.settings import SettingsError, settings

    try:
        forced = settings().train_streams
    except SettingsError as e:
        raise TrainingError(str(e)) from None
    if forced:
        return forced
    return backend.blas_threads() if mx.default_device() == mx.cpu else 1
