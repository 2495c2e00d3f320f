"""Microbenchmark of the quantized decode kernel: kernels.linear_rows_q vs float32 kernels.linear_rows and
mx.quantized_matmul on the same shapes, at a few token rows.

Shapes: SmolLM2-135M's (hidden 576, ffn 1536, vocab 49152) and a Llama-8B layer's (4096 x 4096 attention,
14336 x 4096 gate/up); weights random normal, quantized by mx.quantize as 4-bit groups of 32 (GGUF Q4_1) and
64, and 8-bit groups of 32 (Q8_0). Each timing is the median over `--rounds` rounds of the mean over a batch
of calls (each call evaluated on its own, as a decode step would); the configurations alternate within a round
so background load hits all alike. GB/s = bytes of weights read per call (the pack: codes and float32
scales/biases; float32 for linear_rows; mx.quantize's arrays for quantized_matmul) / time.

    PYTHONPATH=. .venv/bin/python bench/quant_rows.py                 # markdown table on stdout
    PYTHONPATH=. .venv/bin/python bench/quant_rows.py --json out.json # also the raw numbers
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mlx_cai import backend  # OpenBLAS before mlx.core

import mlx.core as mx

from mlx_cai import kernels

SHAPES = [  # (name, N outputs, K inputs)
    ("smollm2 q/o 576x576", 576, 576),
    ("smollm2 gate/up 1536x576", 1536, 576),
    ("smollm2 down 576x1536", 576, 1536),
    ("smollm2 head 49152x576", 49152, 576),
    ("llama-8b q/o 4096x4096", 4096, 4096),
    ("llama-8b gate/up 14336x4096", 14336, 4096),
]
QUANTS = [(4, 32), (4, 64), (8, 32)]  # (bits, group size)


def per_call(f, budget_s: float) -> float:
    """Mean seconds of one evaluated call, over enough calls to fill ~budget_s (at least 2)."""
    mx.eval(f())
    t0 = time.perf_counter()
    mx.eval(f())
    one = time.perf_counter() - t0
    n = max(2, min(200, int(budget_s / max(one, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per timing (per configuration and round)")
    ap.add_argument("--no-qmm", action="store_true", help="skip mx.quantized_matmul (slow at 32 rows)")
    ap.add_argument("--only", help="shapes whose name contains this")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not kernels.enabled():
        raise SystemExit(f"kernels not in use: {kernels.status()}")
    results = []
    for name, N, K in SHAPES:
        if args.only and args.only not in name:
            continue
        w = mx.random.normal((N, K), key=mx.random.key(N + K)) * 0.02
        dense = kernels.pack_weight(w)
        quants = {}
        for bits, gs in QUANTS:
            q, s, b = mx.quantize(w, gs, bits)
            quants[bits, gs] = (q, s, b, kernels.pack_quantized(q, s, b, gs, bits))
        mx.eval(dense, quants)
        del w
        for M in args.rows:
            x = mx.random.normal((M, K), key=mx.random.key(M))
            mx.eval(x)
            configs = {("float32", "linear_rows"): (lambda: kernels.linear_rows(x, dense, N), dense.nbytes)}
            for (bits, gs), (q, s, b, p) in quants.items():
                label = f"{bits}-bit g{gs}"
                configs[label, "linear_rows_q"] = (lambda p=p: kernels.linear_rows_q(x, p, N), p.nbytes)
                if not args.no_qmm:
                    configs[label, "quantized_matmul"] = (
                        lambda q=q, s=s, b=b, bits=bits, gs=gs: mx.quantized_matmul(
                            x, q, s, b, transpose=True, group_size=gs, bits=bits),
                        q.nbytes + s.nbytes + b.nbytes)
            times = {k: [] for k in configs}
            for _ in range(args.rounds):
                for k, (f, _) in configs.items():
                    times[k].append(per_call(f, args.budget))
            for (weights, kernel), (_, nbytes) in configs.items():
                t = statistics.median(times[weights, kernel])
                results.append(dict(shape=name, N=N, K=K, rows=M, weights=weights, kernel=kernel, ms=t * 1e3,
                                    gb_s=nbytes / t / 1e9, bytes=nbytes))
                print(f"{name:30s} rows {M:2d} {weights:12s} {kernel:17s} {t * 1e3:9.3f} ms "
                      f"{nbytes / t / 1e9:6.1f} GB/s", flush=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=backend.cpu_threads(), results=results), f, indent=1)


def table(results: list[dict]) -> str:
    """Markdown: per shape and rows, ms (GB/s) of each configuration, and linear_rows_q's speedup over float32."""
    cols = ["float32 linear_rows"] + [f"{b}-bit g{g} {k}" for b, g in QUANTS for k in ("linear_rows_q", "quantized_matmul")]
    cols = [c for c in cols if any(f"{r['weights']} {r['kernel']}" == c for r in results)]
    head = "| shape | rows | " + " | ".join(cols) + " | 4-bit g32 / float32 speedup |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    keys = list(dict.fromkeys((r["shape"], r["rows"]) for r in results))
    for shape, M in keys:
        got = {f"{r['weights']} {r['kernel']}": r for r in results if r["shape"] == shape and r["rows"] == M}
        cells = [f"{got[c]['ms']:.3f} ms ({got[c]['gb_s']:.1f} GB/s)" if c in got else "" for c in cols]
        f32, q4 = got.get("float32 linear_rows"), got.get("4-bit g32 linear_rows_q")
        speed = f"{f32['ms'] / q4['ms']:.1f}x" if f32 and q4 else ""
        lines.append(f"| {shape} | {M} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
