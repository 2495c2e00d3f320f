"""The memory estimator (mlx_cai.memplan) against measured peaks: a few SFT steps on the embedded SmolLM2-135M.

Each case trains `--steps` steps of `mlx_cai.stages.sft.run` on a fresh model (loaded before
`mx.reset_peak_memory()`, so its weights count as they do in the estimate) over synthetic chats of one length,
so every batch has the width and the answer tokens the estimate is given. Measured = `mx.get_peak_memory()`.
Cases: float32 (the CPU default: dequantized on load) at two batch x length sizes, with and without
grad_checkpoint; and the model kept 4-bit (MLX_CAI_DEQUANTIZE=0; MLX's CPU quantized kernels are slow, so one
small case).

    .venv/bin/python bench/memory.py            # print the table
    .venv/bin/python bench/memory.py --write    # and replace its section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import tempfile
from pathlib import Path

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx

from mlx_cai import memcheck, memplan, models
from mlx_cai.stages import sft

SECTION = "## Memory estimate vs measured peak (bench/memory.py)"
CASES = [  # (name, batch, tokens per chat, grad_checkpoint, keep quantized)
    ("float32, batch 4 x 256", 4, 256, False, False),
    ("float32, batch 4 x 256, grad_checkpoint", 4, 256, True, False),
    ("float32, batch 4 x 512", 4, 512, False, False),
    ("float32, batch 4 x 512, grad_checkpoint", 4, 512, True, False),
    ("float32, batch 8 x 128", 8, 128, False, False),
    ("4-bit kept, batch 2 x 128", 2, 128, False, True),
]


def write_chats(folder: Path, tokenizer, n: int, length: int) -> int:
    """n chats whose encoding is `length` tokens (a short prompt, an answer of repeated words); returns the
    answer tokens per chat (the positions whose logits SFT computes)."""
    from mlx_cai import encoding

    words = "the model writes a careful answer about memory ".split()
    answer_words, tokens, offset = 8, 0, 0
    while True:
        msgs = [{"role": "user", "content": "Say something."},
                {"role": "assistant", "content": " ".join(words[i % len(words)] for i in range(answer_words))}]
        tokens, offset = encoding.encode_chat(tokenizer, msgs)
        if len(tokens) >= length:
            break
        answer_words += max(1, (length - len(tokens)) // 2)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"messages": msgs}) + "\n")
    return min(len(tokens), length) - offset


def measure(batch: int, length: int, checkpoint: bool, keep_quantized: bool, steps: int) -> tuple[float, float, dict]:
    """(measured peak, estimated peak, estimate items) in bytes for one case."""
    model, tok = models.load("smollm2-135m", dequantize_weights=not keep_quantized)
    with tempfile.TemporaryDirectory() as tmp:
        answer = write_chats(Path(tmp) / "data", tok, 4 * batch, length)
        cfg = sft.SFTConfig(data=str(Path(tmp) / "data"), output=str(Path(tmp) / "out"), iters=steps,
                            batch_size=batch, max_seq_length=length, lora_layers=16, lora_rank=8,
                            grad_checkpoint=checkpoint, steps_per_eval=steps, steps_per_save=steps,
                            warmup_steps=0)
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        sft.run(cfg, model=model, tokenizer=tok)
        measured = mx.get_peak_memory()
    ctx = memcheck.context("sft", memcheck.flag)
    shape = memcheck.shape_of("smollm2-135m", dequantize=not keep_quantized)
    width = -(-(length - 1) // 32) * 32  # pad_batch rounds the width up to a multiple of 32
    items = memplan.train_items(shape, batch=batch, seq=width, lora_layers=16, lora_rank=8,
                                grad_checkpoint=checkpoint, answer_tokens=batch * answer,
                                copy_limit=ctx.train_copy_limit)
    return measured, sum(items.values()), items


def table(rows: list[tuple[str, float, float, dict]]) -> str:
    out = ["| case | measured peak | estimate | estimate / measured | largest estimated items (GB) |",
           "|---|---:|---:|---:|---|"]
    for name, measured, est, items in rows:
        top = ", ".join(f"{k} {v / memplan.GB:.2f}" for k, v in sorted(items.items(), key=lambda kv: -kv[1])[:3])
        out.append(f"| {name} | {measured / memplan.GB:.2f} GB | {est / memplan.GB:.2f} GB | {est / measured:.2f} | {top} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", type=int, nargs="*", help="case numbers to run (0-based); default all")
    ap.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    for i, (name, batch, length, ckpt, quant) in enumerate(CASES):
        if args.only is not None and i not in args.only:
            continue
        measured, est, items = measure(batch, length, ckpt, quant, args.steps)
        rows.append((name, measured, est, items))
        print(f"{name}: measured {measured / memplan.GB:.3f} GB, estimate {est / memplan.GB:.3f} GB", flush=True)
    body = table(rows)
    print(body)
    if args.write:
        head = (f"{SECTION}\n\nDate: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {backend.cpu_model()}, "
                f"2 cores, Linux x86_64, mlx {mx.__version__}. SmolLM2-135M-Instruct, LoRA rank 8 on every linear "
                f"layer of the last 16 blocks, {args.steps} SFT steps per case, synthetic chats of one length. "
                "Command: `.venv/bin/python bench/memory.py --write`.\n\n")
        path = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
        text = path.read_text()
        block = head + body + "\n"
        pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
        text = pattern.sub(lambda _: block, text) if SECTION in text else text.rstrip("\n") + "\n\n" + block
        path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
