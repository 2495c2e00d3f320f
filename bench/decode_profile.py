"""Where a decode step of the fast path goes: the embedded SmolLM2-135M (kept 4-bit by default) at one batch size.

Prints (1) the graph nodes of one decode step by primitive (before mx.compile's fusion: what the trace builds),
(2) ms per step as it is, with every quantized product replaced by a broadcast zero of its shape (what is left:
norms, rope, attention, graph and dispatch overhead, Python), and with only the head replaced; configurations
alternate round by round and the median is printed. The difference of the first two is the products' share.

    PYTHONPATH=. .venv/bin/python bench/decode_profile.py [--batch 1] [--rounds 3] [--steps 40] [--float32]
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import tempfile
from pathlib import Path

from mlx_cai import backend  # OpenBLAS before mlx.core

import mlx.core as mx

from mlx_cai import fastllama, models
from mlx_cai.fastllama import FastLlama, FastRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_decode import prompts, timed_steps  # noqa: E402


def node_counts(fast: FastLlama, ps: list[list[int]]) -> collections.Counter:
    """Primitives of one decode step's graph, traced without mx.compile."""
    runner = FastRunner(fast, ps, 4)
    y = mx.argmax(runner.prefill(), axis=-1)
    mx.eval(y)
    p = runner.parts[0]
    end = p.caches[0][0].shape[2]
    logits, caches = fast._step_impl(y, p.caches, mx.array(runner.slot), p.pad, p.prefix, end=end)
    with tempfile.TemporaryDirectory() as d:
        mx.export_to_dot(f"{d}/step.dot", logits, *[a for kv in caches for a in kv])
        return collections.Counter(re.findall(r'label ="?([A-Za-z_]+)', Path(f"{d}/step.dot").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--float32", action="store_true", help="the GGUF dequantized instead of kept 4-bit")
    args = ap.parse_args()
    model, tok = models.load(models.EMBEDDED, dequantize_weights=args.float32)
    ps = prompts(tok, args.batch)
    fast = FastLlama.build(model)
    counts = node_counts(fast, ps)
    print(f"graph nodes of one step: {sum(counts.values())}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))

    real_qmm = fastllama._qmm
    head: set[int] = set()

    def zeros(x, q):
        return mx.broadcast_to(x[..., :1] * 0.0, x.shape[:-1] + (q.n_out,))

    variants = {"as is": real_qmm, "quantized products stubbed": zeros,
                "head stubbed": lambda x, q: zeros(x, q) if id(q) in head else real_qmm(x, q)}
    kernel_qmm = getattr(fastllama, "_kernel_qweight", None)  # (absent before the fused calls: then nothing to turn off)
    ms = {k: [] for k in variants}
    try:
        for _ in range(args.rounds):
            for name, f in variants.items():
                fastllama._qmm = f
                # the fused kernel calls (norm/residual/gate riding on linear_rows_q) only when products are real
                if kernel_qmm is not None:
                    fastllama._kernel_qweight = kernel_qmm if f is real_qmm else (lambda x, w: None)
                fast = FastLlama.build(model)
                if isinstance(fast.lm_head, fastllama.QLinear):
                    head.clear()
                    head.update(id(p) for p in fast.lm_head.parts)
                timed_steps(FastRunner(fast, ps, args.steps + 1), args.steps)  # traces
                ms[name].append(timed_steps(FastRunner(fast, ps, args.steps + 1), args.steps) / args.steps * 1e3)
    finally:
        fastllama._qmm = real_qmm
        if kernel_qmm is not None:
            fastllama._kernel_qweight = kernel_qmm
    print(f"batch {args.batch}, {'float32' if args.float32 else '4-bit kept'}, BLAS/kernel threads "
          f"{backend.blas_threads()}, median of {args.rounds} rounds:")
    for name, v in ms.items():
        print(f"  {name}: {statistics.median(v):.2f} ms/step ({', '.join(f'{t:.2f}' for t in v)})")


if __name__ == "__main__":
    main()
