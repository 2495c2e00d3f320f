"""Prefill and decode-step time of the compiled CPU path, with the C++ kernels and with MLX ops, alternating.

The same chats as bench/generation.py (the first N benign prompts as single-turn chats, longest first, the
embedded SmolLM2-135M-Instruct in float32) go through `fastllama.FastRunner` exactly as `generate` sets it up:

- kernels: the C++ kernels on (packed weights, decode attention, rope + cache write, gate), one decode
  stream with all threads; prefill in two runs of rows on two streams.
- mlx-ops: `MLX_CAI_KERNELS=0`, the decode steps split over one stream per BLAS thread (`generate`'s choice
  without the kernels), MLX ops throughout.

Each round times the prefill of the batch and then `--steps` greedy decode steps (synchronized per step); the
configurations take turns round by round so background load hits both alike. Reported: every round's
prefill seconds and mean step milliseconds, and the ratio of the medians. A new FastLlama is built per
configuration (packing follows the switch); compile traces are warmed before timing.

    .venv/bin/python bench/decode_paths.py                       # batch 32 and 64, 3 rounds
    .venv/bin/python bench/decode_paths.py --write               # also write its section in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

from mlx_cai import backend  # OpenBLAS before mlx.core

from mlx_cai import kernels, models
from mlx_cai.fastllama import FastLlama, FastRunner
from mlx_cai.generate import encode
from mlx_cai.settings import settings

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Decode and prefill paths: C++ kernels vs MLX ops (bench/decode_paths.py)"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_decode import timed_run  # noqa: E402
from sections import replace_section  # noqa: E402


@contextlib.contextmanager
def kernels_switch(on: bool):
    before = os.environ.get("MLX_CAI_KERNELS")
    os.environ["MLX_CAI_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLX_CAI_KERNELS"]
        else:
            os.environ["MLX_CAI_KERNELS"] = before


def run_once(fast: FastLlama, prompts: list[list[int]], on: bool, steps: int) -> tuple[float, float]:
    """(prefill seconds, mean decode-step ms) of one batch, set up as `generate` does."""
    split = fast.head_packed is None
    streams = min(len(prompts) // settings().stream_rows, backend.blas_threads()) if split else 1
    with kernels_switch(on), backend.blas_threads_per(streams):
        prefill_s, decode_s = timed_run(FastRunner(fast, prompts, steps + 1, streams=streams), steps)
    return prefill_s, decode_s / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="32,64")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per round (default 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "benign.jsonl")
    ap.add_argument("--write", action="store_true", help="write/replace the section in BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if kernels._ext is None:
        sys.exit(f"the C++ kernels are not built ({kernels._ERROR}): run make setup")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    model, tok = models.load(models.EMBEDDED)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    chats = {b: sorted((encode(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows[:b]), key=len,
                       reverse=True) for b in sizes}
    fasts = {}
    for on in (True, False):
        with kernels_switch(on):
            fasts[on] = FastLlama.build(model)
    for b in sizes:  # warm: compile traces of every span the timed rounds reach
        for on in (True, False):
            run_once(fasts[on], chats[b], on, args.steps)
    results = {(b, on): [] for b in sizes for on in (True, False)}
    for r in range(args.rounds):
        for b in sizes:
            for on in (True, False):
                results[b, on].append(run_once(fasts[on], chats[b], on, args.steps))
                p, s = results[b, on][-1]
                print(f"round {r + 1} batch {b:3d} {'kernels' if on else 'mlx-ops':8s}: prefill {p:.2f} s, "
                      f"step {s:.1f} ms (load {os.getloadavg()[0]:.1f})", flush=True)
    lines = ["| batch | path | prefill s (each round) | decode step ms (each round) | median prefill | median step |",
             "|---:|---|---|---|---:|---:|"]
    for b in sizes:
        med = {}
        for on in (True, False):
            ps, ss = zip(*results[b, on])
            med[on] = statistics.median(ps), statistics.median(ss)
            lines.append(f"| {b} | {'kernels' if on else 'mlx-ops'} | {', '.join(f'{p:.2f}' for p in ps)} | "
                         f"{', '.join(f'{s:.1f}' for s in ss)} | {med[on][0]:.2f} | {med[on][1]:.1f} |")
        lines.append(f"| {b} | ratio (mlx-ops / kernels) | | | {med[False][0] / med[True][0]:.2f}x | "
                     f"{med[False][1] / med[True][1]:.2f}x |")
    table = "\n".join(lines)
    header = (f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {backend.cpu_model()}, "
              f"{os.cpu_count()} cores, BLAS threads {backend.blas_threads()}. {args.steps} greedy decode steps "
              f"per round after the prefill, {args.rounds} rounds alternating. Command: "
              f"`.venv/bin/python bench/decode_paths.py {' '.join(sys.argv[1:])}`.")
    print(f"\n{header}\n\n{table}")
    if args.write:
        replace_section(args.out, SECTION, f"{SECTION}\n\n{header}\n\n{table}\n")
        print(f"wrote the section in {args.out}")


if __name__ == "__main__":
    main()
