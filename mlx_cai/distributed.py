"""Data parallelism over processes or Macs with `mx.distributed`, as started by `mlx.launch`.

Started without a launcher, the group has one process and every helper here is the identity, so the
single-process code path is unchanged. Under `mlx.launch -n N` (or `--hosts`), every process runs the same
command; rank 0 is the only one that writes files or prints.

Sharding is strided: process r takes items r, r+N, r+2N, ... of a list. Lists here are usually sorted by
length, so strided shares have similar lengths (similar work per process, little padding).
Reads and writes nothing.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any, Callable, Iterator, Sequence, TypeVar

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

T = TypeVar("T")


@cache
def group() -> mx.distributed.Group:
    """The group of all processes (size 1 when not launched by mlx.launch)."""
    return mx.distributed.init()


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every size()-th item starting at rank() (all of them in one process)."""
    return list(items[rank()::size()])


def all_sum(x: mx.array) -> mx.array:
    """Sum of `x` over the processes (x itself in one process). Usable inside `mx.compile`."""
    return x if size() == 1 else mx.distributed.all_sum(x, group=group())


def all_sum_tree(tree):
    """All leaves of a tree of arrays summed over the processes, in one collective (gradients)."""
    if size() == 1:
        return tree
    flat = tree_flatten(tree)
    joined = all_sum(mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat]))
    cuts = np.cumsum([v.size for _, v in flat])[:-1].tolist()
    return tree_unflatten([(k, part.reshape(v.shape).astype(v.dtype))
                           for (k, v), part in zip(flat, mx.split(joined, cuts))])


def barrier() -> None:
    """Wait until every process gets here (e.g. all have read a folder before rank 0 changes it)."""
    if size() > 1:
        mx.eval(all_sum(mx.array(1.0)))


def gather(obj: Any) -> list[Any]:
    """Every process's JSON-serializable `obj`, in rank order, on every process ([obj] in one process)."""
    if size() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.zeros(size(), np.int32)
    lengths[rank()] = data.size
    lengths = np.array(all_sum(mx.array(lengths))).tolist()
    offsets = [0, *np.cumsum(lengths).tolist()]
    buf = np.zeros(offsets[-1] or 1, np.uint8)  # each byte is non-zero in one process only: the sum copies it
    buf[offsets[rank()]: offsets[rank() + 1]] = data
    buf = np.array(all_sum(mx.array(buf)))
    return [json.loads(buf[a:b].tobytes()) for a, b in zip(offsets, offsets[1:])]


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process: decisions that rank 0's files make (what is already done)."""
    return obj if size() == 1 else gather(obj if is_main() else None)[0]


def on_main(fn: Callable[[], T]) -> T:
    """fn() computed by rank 0 alone (e.g. reading rank 0's files) and handed to every process."""
    return from_main(fn() if is_main() else None)


def map_chunks(items: Sequence[T], chunk: int, work: Callable[[list[T]], list]) -> Iterator[tuple[list[T], list]]:
    """(chunk of items, their results in the same order) for consecutive chunks of `chunk * size()` items.

    Each process runs `work` on its strided share of a chunk (at most `chunk` items; skipped when empty) and the
    JSON-serializable results are gathered to every process. In one process: chunks of `chunk` items, and
    `work` sees the whole chunk, exactly as a plain loop would.
    """
    n = size()
    for start in range(0, len(items), chunk * n):
        part = list(items[start: start + chunk * n])
        mine = shard(part)
        done = work(mine) if mine else []
        if n == 1:
            yield part, done
            continue
        shares = gather(done)
        yield part, [shares[i % n][i // n] for i in range(len(part))]  # item i was rank i % n's (i // n)-th
