"""Decode throughput of the embedded SmolLM2-135M kept quantized (Q4_1: 4-bit groups of 32, 8-bit embedding and
tied head) vs dequantized to float32, both on the compiled fast path (mlx_cai.fastllama), at batch 1 and 32;
and, for reference, mlx-lm's generic path on the quantized model (what it took before the fast path took
quantized weights).

Per configuration: a FastRunner over chat prompts (the chat template's system prompt shared), prefill, then
`--steps` greedy decode steps, each evaluated before the next (a warm-up pass first traces every compiled step
the timed pass uses); tok/s = rows x steps / seconds of the steps. Configurations alternate within a round and
the median over `--rounds` is printed as a markdown table.

    PYTHONPATH=. .venv/bin/python bench/quant_decode.py [--steps 24] [--rounds 2] [--generic-steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_cai import backend  # OpenBLAS before mlx.core

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_cai import kernels, models
from mlx_cai.fastllama import FastLlama, FastRunner
from mlx_cai.generate import GenericRunner, encode

QUESTIONS = ["What is the capital of France?", "Explain photosynthesis briefly.", "Write a haiku about rain.",
             "How do I boil an egg?", "Name three prime numbers.", "Why is the sky blue?",
             "Give me a tip for learning Python.", "What does a compiler do?"]


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (f" (variant {i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
        out.append(encode(tok, [{"role": "user", "content": q}]))
    return sorted(out, key=len, reverse=True)


def timed_run(runner, steps: int) -> tuple[float, float]:
    """(seconds of a runner's prefill, seconds of `steps` greedy decode steps after it), each step synchronized."""
    t0 = time.perf_counter()
    logits = runner.prefill()
    mx.eval(logits)
    t1 = time.perf_counter()
    y = logits.argmax(-1)
    for _ in range(steps):
        y = runner.step(y).argmax(-1)
        mx.eval(y)
    return t1 - t0, time.perf_counter() - t1


def timed_steps(runner, steps: int) -> float:
    """Seconds of `steps` greedy decode steps of a runner (prefill, step) after its prefill."""
    return timed_run(runner, steps)[1]


def fast_decode(fast: FastLlama, ps: list[list[int]], steps: int) -> float:
    return timed_steps(FastRunner(fast, ps, steps + 1), steps)


def generic_decode(model, ps: list[list[int]], steps: int) -> float:
    return timed_steps(GenericRunner.left_padded(model, ps), steps)


def held_mb(model, fast: FastLlama) -> float:
    """MB of the model's parameters plus what the FastLlama holds beyond them (packs, fused copies)."""
    from mlx_cai.fastllama import QLinear, QWeight

    own = {id(v): v.nbytes for _, v in tree_flatten(model.parameters())}
    extra, seen = 0, set()

    def walk(x):
        nonlocal extra
        if isinstance(x, mx.array):
            if id(x) not in own and id(x) not in seen:
                seen.add(id(x))
                extra += x.nbytes
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, (QLinear, QWeight)) or hasattr(x, "__dataclass_fields__"):
            for name in x.__dataclass_fields__:
                walk(getattr(x, name))

    walk([fast.layers, fast.embed, fast.lm_head, fast.head_packed])
    return (sum(own.values()) + extra) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--generic-steps", type=int, default=3, help="steps of the generic quantized path (0: skip)")
    args = ap.parse_args()
    loaded = {}
    for name, deq in (("4-bit (Q4_1) kept", False), ("float32", True)):
        model, tok = models.load(models.EMBEDDED, dequantize_weights=deq)
        t0 = time.perf_counter()
        fast = FastLlama.build(model)
        loaded[name] = (model, fast, time.perf_counter() - t0)
    times = {(name, b): [] for name in loaded for b in args.batches}
    generic = {}
    for _ in range(args.rounds):
        for b in args.batches:
            ps = prompts(tok, b)
            for name, (model, fast, _) in loaded.items():
                fast_decode(fast, ps, args.steps)  # warm-up: traces
                times[name, b].append(fast_decode(fast, ps, args.steps))
    if args.generic_steps:
        model = loaded["4-bit (Q4_1) kept"][0]
        for b in args.batches:
            generic[b] = generic_decode(model, prompts(tok, b), args.generic_steps)
    print(f"kernels: {kernels.status()}; BLAS threads {backend.blas_threads()}; {args.steps} steps, "
          f"median of {args.rounds} rounds\n")
    print("| weights | held MB | build s | " + " | ".join(f"batch {b} tok/s" for b in args.batches) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.batches))
    for name, (model, fast, build_s) in loaded.items():
        cells = [f"{b * args.steps / statistics.median(times[name, b]):.1f}" for b in args.batches]
        print(f"| {name}, fast path | {held_mb(model, fast):.0f} | {build_s:.2f} | " + " | ".join(cells) + " |")
    if generic:
        cells = [f"{b * args.generic_steps / generic[b]:.2f}" for b in args.batches]
        print(f"| 4-bit (Q4_1) kept, generic mlx-lm path ({args.generic_steps} steps) | | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
