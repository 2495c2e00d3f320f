"""Training throughput and memory: mlx-cai `sft` / `dpo` vs TRL `SFTTrainer` / `DPOTrainer` + PEFT LoRA (torch CPU).

Same model (the embedded SmolLM2-135M-Instruct GGUF, float32 in both engines), same data, same LoRA (rank 8,
q_proj and v_proj, last 16 of 30 blocks), same batch, same number of optimizer steps:

- data: the first N train-split prompts of data/benign.jsonl as single-turn chats; each answer is the text of the
  next three prompts (about 100 tokens; content does not matter for speed, lengths do). SFT trains on the
  (prompt, answer) chats with the loss on the answer only. DPO pairs: chosen = that answer, rejected = the
  answer made of prompts i+4..i+6.
- mlx-cai: `mlx_cai.stages.sft.run` / `dpo.run` on a model loaded once per run (load not timed). DPO starts
  from fresh LoRA layers, so its reference is the base model, as in TRL with `peft_config` and no ref model.
  Time = the whole `run` call: tokenization, LoRA setup, compiled steps, checkpoint and adapter writes;
  for DPO also the reference pass over all pairs (reported separately too).
- TRL: the GGUF loaded by transformers (`gguf_file=`), saved as a plain float32 folder (transformers refuses to
  train a model it marks quantized, see REFERENCE.md section 3), `SFTTrainer` on prompt-completion chats
  (completion-only loss) and `DPOTrainer` (reference = the base with adapters disabled, computed each step),
  torch with `--threads` threads, in a worker process without mlx-cai's OpenBLAS. Time = `trainer.train()`.
- tokens = non-padding tokens of the batches trained (prompt + answer), counted from each engine's own batches.
- threads: MLX's OpenBLAS uses what mlx_cai.backend picks at import (one thread when the load average is already
  >= the core count, all cores otherwise; MLX_CAI_BLAS_THREADS overrides); torch gets the same number by default
  (`--threads match`), because torch's OpenMP threads collapse under oversubscription just as OpenBLAS's do
  (BENCHMARKS.md, "OpenBLAS threads under load"). The header prints both.
- memory: `mx.get_peak_memory()` after `mx.reset_peak_memory()` (model already loaded) for SFT with batch B,
  DPO with B pairs (2B sequences in its forward pass) and DPO with B/2 pairs (B sequences, same forward size as SFT).

Run with the bench venv (TRL and torch live there), e.g.:

    .venv-bench/bin/python bench/training.py --steps 20           # print the table
    .venv-bench/bin/python bench/training.py --steps 20 --write   # and write its section in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

# TRL runs in a worker process of its own (`--trl-worker`): mlx_cai.backend loads OpenBLAS with RTLD_GLOBAL, and
# torch's sgemm calls in the same process then resolve to it, so OpenBLAS's and torch's threads oversubscribe the
# cores (measured in bench/generation.py: 2 torch threads 3.5x slower than 1 in the shared process).
_WORKER = __name__ == "__main__" and "--trl-worker" in sys.argv
if not _WORKER:
    from mlx_cai import backend  # OpenBLAS before mlx.core

    import mlx.core as mx

    from mlx_cai.backend import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training throughput and memory: mlx-cai vs TRL (bench/training.py)"
KEYS = ["self_attn.q_proj", "self_attn.v_proj"]


def make_data(n: int) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (ROOT / "data" / "benign.jsonl").read_text().splitlines() if x.strip()]
    prompts = [r["prompt"] for r in rows if r.get("split") == "train"]
    if len(prompts) < n + 7:
        sys.exit(f"need {n + 7} train prompts, data/benign.jsonl has {len(prompts)}")

    def answer(i: int, start: int) -> str:
        return " ".join(prompts[(i + k) % len(prompts)] for k in range(start, start + 3))

    chats = [{"messages": [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": answer(i, 1)}]}
             for i in range(n)]
    pairs = [{"id": f"pair-{i}", "prompt": prompts[i], "chosen": answer(i, 1), "rejected": answer(i, 4)}
             for i in range(n)]
    return chats, pairs


# ----------------------------------------------------------------------------------------------- mlx


def mlx_sft(chats, args, work: Path) -> dict:
    from mlx_cai import models
    from mlx_cai.stages import sft

    data = work / "sft-data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    model, tok = models.load(models.EMBEDDED)
    cfg = sft.SFTConfig(data=str(data), output=str(work / "mlx-sft"), iters=args.steps, batch_size=args.batch,
                        lora_rank=args.rank, lora_layers=args.layers, lora_keys=KEYS, learning_rate=1e-5,
                        warmup_steps=0, steps_per_eval=10**6, steps_per_save=10**6, max_seq_length=1024)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = sft.run(cfg, model=model, tokenizer=tok)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens = sum(r["tokens"] for r in rows if "loss" in r)
    step_seconds = sum(r["seconds"] for r in rows if "loss" in r)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "step_tok_s": tokens / step_seconds,
            "peak": mx.get_peak_memory()}


def mlx_dpo(pairs, args, work: Path, batch: int, steps: int, name: str, ckpt: bool = False) -> dict:
    from mlx_cai import models
    from mlx_cai.stages import dpo

    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    model, tok = models.load(models.EMBEDDED)
    cfg = dpo.DPOConfig(pairs=str(path), output=str(work / name), iters=steps, batch_size=batch,
                        lora_rank=args.rank, lora_layers=args.layers, lora_keys=KEYS, learning_rate=5e-6,
                        warmup_steps=0, steps_per_eval=10**6, steps_per_save=10**6, max_seq_length=1024,
                        grad_checkpoint=ckpt)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = dpo.run(cfg, model=model, tokenizer=tok)
    seconds = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trained = sum(r["examples"] for r in rows if "loss" in r)
    return {"seconds": seconds, "pairs": trained, "pairs_s": trained / seconds,
            "train_pairs_s": trained / s["train_seconds"], "reference_seconds": s["reference_seconds"],
            "reference_pairs": len(pairs), "peak": mx.get_peak_memory()}


# ----------------------------------------------------------------------------------------------- TRL


def trl_model_dir(work: Path, gguf: Path) -> Path:
    """The GGUF as a plain float32 transformers folder (no quantization_config, no tied lm_head copy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "hf-float32"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    return out


class CountingCollator:
    """Wraps a collator and counts non-padding tokens of every batch it builds."""

    def __init__(self, inner, mask_keys):
        self.inner, self.keys, self.tokens = inner, mask_keys, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens += sum(int(batch[k].sum()) for k in self.keys if k in batch)
        return batch


def _lora(args):
    from peft import LoraConfig

    n_layers = 30
    return LoraConfig(r=args.rank, lora_alpha=args.rank * 20, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      layers_to_transform=list(range(n_layers - args.layers, n_layers)), task_type="CAUSAL_LM")


def _common(args, work: Path, name: str) -> dict:
    return dict(output_dir=str(work / name), per_device_train_batch_size=args.batch, max_steps=args.steps,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
                max_length=1024, warmup_steps=0, lr_scheduler_type="cosine",
                gradient_checkpointing=False, bf16=False)  # TRL's defaults (True, None=bf16) differ from mlx-cai's


def trl_sft(chats, args, work: Path, model_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": c["messages"][:1], "completion": c["messages"][1:]} for c in chats])
    cfg = SFTConfig(**_common(args, work, "trl-sft"), learning_rate=1e-5, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=_lora(args))
    counter = CountingCollator(trainer.data_collator, ["attention_mask"])
    trainer.data_collator = counter
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": counter.tokens, "tok_s": counter.tokens / seconds}


def trl_dpo(pairs, args, work: Path, model_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    cfg = DPOConfig(**_common(args, work, "trl-dpo"), learning_rate=5e-6, beta=0.1)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=_lora(args))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trained = args.steps * args.batch
    return {"seconds": seconds, "pairs": trained, "pairs_s": trained / seconds}


def trl_worker(spec_path: str) -> None:
    """Worker process: TRL SFT then DPO as `spec` says; prints one JSON line of results."""
    from types import SimpleNamespace

    spec = json.loads(Path(spec_path).read_text())
    args, work = SimpleNamespace(**spec["args"]), Path(spec["work"])
    model_dir = trl_model_dir(work, Path(spec["gguf"]))
    out = {}
    for name, fn, data in (("trl_sft", trl_sft, spec["chats"]), ("trl_dpo", trl_dpo, spec["pairs"])):
        if name[4:] not in spec["parts"]:
            continue
        load = os.getloadavg()[0]
        out[name] = {**fn(data, args, work, model_dir), "load": load}
    print("RESULT " + json.dumps(out), flush=True)


def run_trl_worker(chats, pairs, args, work: Path) -> dict:
    import subprocess

    from mlx_cai import models

    spec = work / "trl-spec.json"
    keys = ("threads", "batch", "steps", "rank", "layers")
    spec.write_text(json.dumps({"args": {k: getattr(args, k) for k in keys}, "work": str(work), "chats": chats,
                                "pairs": pairs, "gguf": str(models.embedded_gguf()), "parts": sorted(args.parts)}))
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(spec)], stdout=subprocess.PIPE, text=True,
                          env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"the TRL worker failed (exit {proc.returncode}); see its errors above")
    return json.loads(lines[-1][len("RESULT "):])


# -------------------------------------------------------------------------------------------- report


def ver(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "-"


def write_section(path: Path, block: str) -> None:
    """Replace this script's section of `path` (other sections are kept)."""
    from sections import replace_section

    replace_section(path, SECTION, block)


def main() -> None:
    if _WORKER:
        return trl_worker(sys.argv[sys.argv.index("--trl-worker") + 1])
    ap = argparse.ArgumentParser(description="Training throughput and memory, mlx-cai vs TRL (CPU).")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    ap.add_argument("--batch", type=int, default=4, help="SFT examples / DPO pairs per step (default 4)")
    ap.add_argument("--examples", type=int, default=56, help="chats and pairs in the data (default 56)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16, help="LoRA on the last N blocks (default 16)")
    ap.add_argument("--threads", default="match", help="torch threads: a number, or 'match' (default) = the "
                    "OpenBLAS thread count mlx_cai.backend chose")
    ap.add_argument("--engines", default="mlx,trl", help="mlx, trl or both")
    ap.add_argument("--parts", default="sft,dpo", help="sft, dpo or both (default both; --write needs both)")
    ap.add_argument("--write", action="store_true", help="write/replace the section in BENCHMARKS.md")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    engines = {e.strip() for e in args.engines.split(",")}
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if args.write and args.parts != {"sft", "dpo"}:
        sys.exit("--write replaces the whole section: run with --parts sft,dpo")
    blas_threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)
    args.threads = blas_threads if args.threads == "match" else int(args.threads)
    chats, pairs = make_data(args.examples)
    res: dict[str, dict] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="mlx-cai-bench-train-") as tmp:
        work = Path(tmp)

        def step(name, fn, *a):
            loads.append(os.getloadavg()[0])
            res[name] = fn(*a)
            print(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res[name].items()})}"
                  f" (load {loads[-1]:.1f})", flush=True)

        # Engines alternate so load from other processes falls on both alike.
        if "mlx" in engines and "sft" in args.parts:
            step("mlx_sft", mlx_sft, chats, args, work)
        if "trl" in engines:
            for name, r in run_trl_worker(chats, pairs, args, work).items():
                loads.append(r.pop("load"))
                res[name] = r
                print(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}"
                      f" (load {loads[-1]:.1f}, worker process)", flush=True)
        if "mlx" in engines and "dpo" in args.parts:
            step("mlx_dpo", mlx_dpo, pairs, args, work, args.batch, args.steps, "mlx-dpo")
            step("mlx_dpo_half", mlx_dpo, pairs, args, work, max(args.batch // 2, 1), max(args.steps // 4, 2),
                 "mlx-dpo-half")
            step("mlx_dpo_ckpt", mlx_dpo, pairs, args, work, args.batch, max(args.steps // 4, 2), "mlx-dpo-ckpt", True)

    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = []
    if {"mlx_sft", "trl_sft"} <= set(res):
        m, t = res["mlx_sft"], res["trl_sft"]
        rows.append(f"| SFT train tokens/s (batch {args.batch}) | {m['tok_s']:.1f} | {t['tok_s']:.1f} | "
                    f"{m['tok_s'] / t['tok_s']:.2f}x | {m['tokens']} vs {t['tokens']} tokens; mlx-cai steps alone "
                    f"{m['step_tok_s']:.1f} tok/s |")
    if {"mlx_dpo", "trl_dpo"} <= set(res):
        m, t = res["mlx_dpo"], res["trl_dpo"]
        rows.append(f"| DPO pairs/s, end to end incl. reference pass (batch {args.batch}) | {m['pairs_s']:.2f} | "
                    f"{t['pairs_s']:.2f} | {m['pairs_s'] / t['pairs_s']:.2f}x | reference log-probs of all "
                    f"{m['reference_pairs']} pairs: {m['reference_seconds']:.1f} s |")
        rows.append(f"| DPO pairs/s, training steps only | {m['train_pairs_s']:.2f} | {t['pairs_s']:.2f} | "
                    f"{m['train_pairs_s'] / t['pairs_s']:.2f}x | TRL's steps include its reference forward |")
    mem = []
    if {"mlx_sft", "mlx_dpo"} <= set(res):
        s, d = res["mlx_sft"]["peak"], res["mlx_dpo"]["peak"]
        mem.append(f"| DPO, {args.batch} pairs ({2 * args.batch} sequences per forward) vs SFT, batch {args.batch} "
                   f"| {gib(d)} | {gib(s)} | {d / s:.2f}x |")
    if {"mlx_sft", "mlx_dpo_half"} <= set(res):
        s, d = res["mlx_sft"]["peak"], res["mlx_dpo_half"]["peak"]
        b = max(args.batch // 2, 1)
        mem.append(f"| DPO, {b} pairs ({2 * b} sequences per forward) vs SFT, batch {args.batch} | {gib(d)} | "
                   f"{gib(s)} | {d / s:.2f}x |")
    if {"mlx_sft", "mlx_dpo_ckpt"} <= set(res):
        s, d = res["mlx_sft"]["peak"], res["mlx_dpo_ckpt"]["peak"]
        mem.append(f"| DPO, {args.batch} pairs with grad_checkpoint ({res['mlx_dpo_ckpt']['train_pairs_s']:.2f} "
                   f"pairs/s in training steps) vs SFT, batch {args.batch} | {gib(d)} | {gib(s)} | {d / s:.2f}x |")
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = "\n".join([
        f"Date: {when}. Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"other jobs may share the CPU (1-min load average at the start of each run: "
        f"{', '.join(f'{x:.1f}' for x in loads)}; 2 cores = load 2): read the ratios.",
        f"Versions: mlx {getattr(mx, '__version__', ver('mlx'))}, mlx-lm {ver('mlx-lm')}, MLX BLAS "
        f"{backend.blas_library()}; torch {ver('torch')} ({args.threads} threads), transformers {ver('transformers')}, "
        f"trl {ver('trl')}, peft {ver('peft')} (TRL in a worker process without mlx-cai's OpenBLAS).",
        f"Setup: SmolLM2-135M-Instruct (GGUF, float32 in both engines), LoRA rank {args.rank} on q_proj/v_proj of the "
        f"last {args.layers} blocks, batch {args.batch}, {args.steps} optimizer steps, {args.examples} chats / pairs "
        f"from data/benign.jsonl (see the script's docstring), max length 1024. Command: "
        f"`.venv-bench/bin/python bench/training.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`.",
    ])
    table = "\n".join(["| measure | mlx-cai | TRL + PEFT (torch CPU) | ratio | notes |", "|---|---:|---:|---:|---|",
                       *rows])
    mem_table = "\n".join(["| peak memory (mlx-cai, model loaded before the reset) | DPO | SFT | ratio |",
                           "|---|---:|---:|---:|", *mem])
    block = f"{SECTION}\n\n{header}\n\n{table}\n\n{mem_table}\n\n"
    print()
    print(block)
    if args.write:
        write_section(args.out, block)
        print(f"wrote section to {args.out}")


if __name__ == "__main__":
    main()
