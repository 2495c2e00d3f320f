"""mlx-cai against mlx-lm on the same model kept quantized: generation and a QLoRA training step.

On whatever device MLX finds (Metal, CUDA or the CPU; printed first), the model loaded once per engine and round
with its weights kept quantized (`models.load(..., dequantize_weights=False)`; the embedded SmolLM2-135M Q4_1
GGUF becomes MLX 4-bit groups of 32 with an 8-bit embedding and tied head).

(a) Generation: the first prompts of data/benign.jsonl as single-turn chats, the same token ids for both engines
    (`encoding.encode_prompt`), greedy, `--new` new tokens per row, batch by batch:
    - mlx-cai: `mlx_cai.generate.generate` (the compiled fast path, FastLlama, as every stage uses it; on the
      CPU its decode steps multiply with `kernels.linear_rows_q`). K/V reuse across calls is off
      (MLX_CAI_KV_REUSE_MB=0) so a later round prefills what the first did.
    - mlx-lm: `mlx_lm.generate.batch_generate` (its BatchGenerator; greedy is its default sampler).
    tok/s = generated tokens (end-of-turn tokens excluded) / wall seconds of the call, prefill included; a warm-up
    call per engine and batch size first. Agreement: rows whose greedy tokens are identical, and the mean length
    of the common prefix (float rounding differs between the engines' kernels, so a row can fork late).
(b) QLoRA training: same chats with an answer made of the next prompts' text, every chat cut to exactly
    `--seq` tokens (so both engines' batches hold B x seq real tokens), LoRA rank `--rank` on q_proj and v_proj of
    the last `--layers` blocks (scale 20, no dropout), batch `--train-batch`, Adam, a fresh model per engine and
    round:
    - mlx-cai: `mlx_cai.stages.sft.run` (the `sft` stage; its compiled step, CPU slices over streams); per-step
      seconds and tokens from its metrics.jsonl.
    - mlx-lm: `mlx_lm.tuner.trainer.train` after `mlx_lm.tuner.utils.linear_to_lora_layers`, its default loss
      (logits over every position); per-step seconds from its report each step, tokens = the non-padding
      tokens of the batches it drew.
    train tok/s = tokens / seconds of the steps after the first (the first traces the compiled step).

Engines alternate within each round; medians over `--rounds`. MLX's CPU quantized matmul (what mlx-lm runs
on the CPU, and what training runs in both engines) is single-threaded and slow, so on the CPU the defaults are
small (~5 min on 2 busy cores) and mlx-lm generates only at batch 1 unless `--peer-max-batch` is raised (its
batch-16 prefill alone took ~5 min here). On a Mac:

    python bench/mlxlm_peer.py --model mlx-community/Meta-Llama-3-8B-Instruct-4bit --batches 1,32 --rounds 3 \\
        --train-batch 4 --seq 256

    PYTHONPATH=. .venv/bin/python bench/mlxlm_peer.py [--batches 1,16] [--new 64] [--peer-max-batch 16] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["MLX_CAI_KV_REUSE_MB"] = "0"  # no K/V kept from an earlier round (read when used)

from mlx_cai import backend  # OpenBLAS before mlx.core

import mlx.core as mx

from mlx_cai import embedded, encoding, kernels, models
from mlx_cai.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["self_attn.q_proj", "self_attn.v_proj"]


def benign() -> list[str]:
    return [json.loads(x)["prompt"] for x in (ROOT / "data" / "benign.jsonl").read_text().splitlines() if x.strip()]


def load(spec: str):
    model, tok = models.load(spec, dequantize_weights=False)
    if "quantization" not in json.loads((models.resolve(spec) / "config.json").read_text()):
        sys.exit(f"{spec} is not a quantized model")
    return model, tok


# ---------------------------------------------------------------------------------------- generation


def gen_mlx_cai(model, tok, chats: list[list[dict]], new: int) -> tuple[float, list[list[int]]]:
    from mlx_cai.generate import generate

    t0 = time.perf_counter()
    out = generate(model, tok, chats, SamplingConfig(max_tokens=new, temperature=0.0), batch_size=len(chats))
    return time.perf_counter() - t0, [g.tokens for g in out]


def gen_mlx_lm(model, tok, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    from mlx_lm.generate import batch_generate

    t0 = time.perf_counter()
    r = batch_generate(model, tok, prompts, max_tokens=new, return_token_ids=True)
    seconds = time.perf_counter() - t0
    eos = set(tok.eos_token_ids)
    return seconds, [[t for t in row if t not in eos] for row in r.token_ids]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, list[int]]:
    """(rows whose tokens are identical, the first differing token of each other row)."""
    same, forks = 0, []
    for x, y in zip(a, b):
        if x == y:
            same += 1
            continue
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        forks.append(n)
    return same, forks


# ---------------------------------------------------------------------------------------- training


def train_chats(n: int) -> list[list[dict]]:
    ps = benign()
    return [[{"role": "user", "content": ps[i]},
             {"role": "assistant", "content": " ".join(ps[(i + k) % len(ps)] for k in range(1, 6))}] for i in range(n)]


def cut_examples(tok, chats, seq: int) -> tuple[list[list[dict]], list[tuple[list[int], int]]]:
    """The chats whose encoding reaches `seq` tokens with at least 8 answer tokens in them, and their token ids
    cut to `seq` with the answer offset (mlx-lm's (tokens, offset) items; mlx-cai's sft cuts them the same way
    at max_seq_length)."""
    kept, out = [], []
    for msgs in chats:
        ids, offset = encoding.encode_chat(tok, msgs)
        if len(ids) >= seq and offset <= seq - 8:
            kept.append(msgs)
            out.append((ids[:seq], offset))
    return kept, out


def train_mlx_cai(spec: str, examples, args, work: Path) -> tuple[float, int]:
    """(seconds, tokens) of the steps after the first."""
    from mlx_cai.stages import sft

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    model, tok = load(spec)
    with open(data / "train.jsonl", "w") as f:
        for msgs in args.chats:
            f.write(json.dumps({"messages": msgs}) + "\n")
    out = work / f"mlx-cai-{time.monotonic_ns()}"
    cfg = sft.SFTConfig(data=str(data), output=str(out), iters=args.steps + 1, batch_size=args.train_batch,
                        lora_rank=args.rank, lora_layers=args.layers, lora_keys=KEYS, learning_rate=1e-5,
                        warmup_steps=0, steps_per_eval=10**6, steps_per_save=10**6, max_seq_length=args.seq)
    sft.run(cfg, model=model, tokenizer=tok)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r and "seconds" in r][1:]
    return sum(r["seconds"] for r in rows), sum(int(r["tokens"]) for r in rows)


def train_mlx_lm(spec: str, examples, args, work: Path) -> tuple[float, int]:
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(spec)
    model.freeze()
    linear_to_lora_layers(model, args.layers, {"rank": args.rank, "scale": 20.0, "dropout": 0.0, "keys": KEYS})
    tokens: list[int] = []

    def batches(*a, **k):
        for batch, lengths in trainer.iterate_batches(*a, **k):
            tokens.append(int(lengths[:, 1].sum()))  # (offset, length) per row
            yield batch, lengths

    steps: list[float] = []

    class Report(trainer.TrainingCallback):
        def on_train_loss_report(self, info):
            steps.append(1.0 / info["iterations_per_second"])  # steps_per_report = 1: this step's seconds

    targs = trainer.TrainingArgs(batch_size=args.train_batch, iters=args.steps + 1, steps_per_report=1,
                                 steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=args.seq,
                                 adapter_file=str(work / "mlx-lm-adapters.safetensors"))
    trainer.train(model, optim.Adam(learning_rate=1e-5), examples, None, args=targs, iterate_batches=batches,
                  training_callback=Report())
    n = len(steps)
    return sum(steps[1:]), sum(tokens[1:n])


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    cpu = mx.default_device() == mx.cpu
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=embedded.DEFAULT, help="a model kept quantized (embedded name, .gguf, MLX "
                                                               "folder or Hub id)")
    ap.add_argument("--batches", default="1,16" if cpu else "1,32")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--rounds", type=int, default=2 if cpu else 3)
    ap.add_argument("--peer-max-batch", type=int, default=1 if cpu else 10**6,
                    help="largest batch mlx-lm generates (CPU default 1: MLX's quantized CPU matmul is slow)")
    ap.add_argument("--train-batch", type=int, default=1 if cpu else 4)
    ap.add_argument("--seq", type=int, default=96 if cpu else 256,
                    help="tokens per training chat (SmolLM2's chat template and a prompt are ~40-75)")
    ap.add_argument("--steps", type=int, default=2 if cpu else 10, help="timed training steps (after one warm-up)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-gen", action="store_true")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()
    dev = mx.default_device()
    print(f"device: {dev} ({'Metal' if mx.metal.is_available() else 'CUDA' if dev != mx.cpu else 'CPU'}), "
          f"{platform.processor() or platform.machine()}, mlx {mx.__version__}, kernels: {kernels.status()}, "
          f"BLAS threads {backend.blas_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    model, tok = load(args.model)
    texts = benign()
    chats = {b: [[{"role": "user", "content": t}] for t in texts[:b]] for b in batches}
    prompts = {b: [encoding.encode_prompt(tok, c) for c in chats[b]] for b in batches}
    gen: dict[tuple[str, int], list[float]] = {}
    agree: dict[int, tuple[int, float]] = {}
    if not args.no_gen:
        for b in batches:  # warm-up: mlx-cai traces its compiled steps per batch shape; mlx-lm compiles nothing
            gen_mlx_cai(model, tok, chats[b], args.new)
        gen_mlx_lm(model, tok, prompts[min(batches)][:1], 4)  # one row: a 16-row prefill took minutes on the CPU
        for r in range(args.rounds):
            for b in batches:
                s, ours = gen_mlx_cai(model, tok, chats[b], args.new)
                gen.setdefault(("mlx-cai", b), []).append(sum(map(len, ours)) / s)
                if b <= args.peer_max_batch:
                    s, theirs = gen_mlx_lm(model, tok, prompts[b], args.new)
                    gen.setdefault(("mlx-lm", b), []).append(sum(map(len, theirs)) / s)
                    agree[b] = agreement(ours, theirs)
                print(f"round {r + 1} batch {b}: " + ", ".join(f"{k[0]} {v[-1]:.1f} tok/s" for k, v in gen.items()
                                                                if k[1] == b) + f", load {os.getloadavg()[0]:.1f}",
                      flush=True)
    train: dict[str, list[float]] = {}
    if not args.no_train:
        args.chats, examples = cut_examples(tok, train_chats(max(64, 8 * args.train_batch)), args.seq)
        if len(examples) < args.train_batch:
            sys.exit(f"only {len(examples)} chats reach {args.seq} tokens")
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for name, fn in (("mlx-cai", train_mlx_cai), ("mlx-lm", train_mlx_lm)):
                    s, n = fn(args.model, examples, args, Path(tmp))
                    train.setdefault(name, []).append(n / s)
                    print(f"round {r + 1} training {name}: {n} tokens in {s:.2f} s = {n / s:.1f} tok/s, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; median of {args.rounds} alternating rounds\n")
    if gen:
        print(f"| batch | mlx-cai tok/s | mlx-lm batch_generate tok/s | mlx-cai / mlx-lm | same greedy tokens "
              f"({args.new} new) |\n|---:|---:|---:|---:|---|")
        for b in batches:
            ours = statistics.median(gen[("mlx-cai", b)])
            if ("mlx-lm", b) in gen:
                theirs = statistics.median(gen[("mlx-lm", b)])
                same, forks = agree[b]
                fork = f" (the others fork at token {', '.join(map(str, sorted(forks)))})" if forks else ""
                print(f"| {b} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.1f}x | {same}/{b} rows{fork} |")
            else:
                print(f"| {b} | {ours:.1f} | not run (--peer-max-batch {args.peer_max_batch}) | | |")
    if train:
        ours, theirs = (statistics.median(train[k]) for k in ("mlx-cai", "mlx-lm"))
        print(f"\n| QLoRA SFT, rank {args.rank}, q/v, last {args.layers} blocks, batch {args.train_batch} x "
              f"{args.seq} tokens, {args.steps} timed steps | train tok/s |\n|---|---:|\n"
              f"| mlx-cai `sft` | {ours:.1f} |\n| mlx-lm `tuner.trainer.train` | {theirs:.1f} |\n"
              f"| mlx-cai / mlx-lm | {ours / theirs:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"device": str(dev), "args": {k: v for k, v in vars(args).items()
                                                                      if k != "chats" and k != "json"},
                                         "generation": {f"{k[0]}@{k[1]}": v for k, v in gen.items()},
                                         "agreement": agree, "training": train}, indent=1, default=str))


if __name__ == "__main__":
    main()
