"""Supervised fine-tuning (SL-CAI) with LoRA: the model learns the cleaned revisions.

Reads DATA/train.jsonl and, if present, DATA/valid.jsonl: one chat per line in mlx-lm's format
`{"messages": [{role, content}, ..., {"role": "assistant", ...}]}` (what `mlx-cai clean` writes), or
`{"prompt": str, "completion": str}`. The loss covers the last assistant message only (mask_prompt).
Writes into OUT (see mlx_cai.training): adapters.safetensors + adapter_config.json (loadable by
`mlx_lm.generate --adapter-path OUT` and `mlx_cai.models.load(M, adapter=OUT)`), checkpoints/,
metrics.jsonl, config.yaml and summary.json (rank 0 only; see mlx_cai.training for several processes).

Length policy: a chat longer than max_seq_length is cut at the end (the answer's tail is dropped) and
counted as `truncated`; one whose prompt alone leaves no answer token within the limit is skipped and
counted as `skipped_prompt_too_long`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from mlx_cai import backend  # noqa: F401

import mlx.core as mx

from mlx_cai import distributed as D
from mlx_cai import records
from mlx_cai import training as T
from mlx_cai.training import TrainConfig, TrainingError, opt

STAGE = "sft/1"


@dataclass
class SFTConfig(TrainConfig):
    """LoRA SFT settings; see TrainConfig for the shared ones."""

    data: str = opt("", "folder with train.jsonl (and optionally valid.jsonl) in mlx-lm chat format")
    mask_prompt: bool = opt(True, "loss on the assistant answer only (prompt tokens masked)")

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise TrainingError("a data folder is required (--data DIR with train.jsonl)")


@dataclass
class Example:
    tokens: list[int]
    offset: int  # loss starts at token `offset`


def read_chats(path: Path) -> list[list[dict]]:
    """Chats of an SFT file; a bad line raises RecordError naming it."""
    chats = []
    for where, row in T.numbered_jsonl(path):
        if "messages" in row:
            msgs = row["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
            if not ok:
                raise records.RecordError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        else:
            raise records.RecordError(f"{where}: needs `messages` or `prompt` + `completion`")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise records.RecordError(f"{where}: the last message must be a non-empty assistant answer")
        chats.append(msgs)
    return chats


def tokenize(tokenizer, chats: list[list[dict]], max_len: int, mask_prompt: bool) -> tuple[list[Example], dict]:
    """Examples under the length policy (module docstring) and the counts of what it did."""
    out, counts = [], {"truncated": 0, "skipped_prompt_too_long": 0}
    for msgs in chats:
        tokens, offset = T.encode_chat(tokenizer, msgs)
        if len(tokens) > max_len:
            if offset >= max_len:
                counts["skipped_prompt_too_long"] += 1
                continue
            tokens = tokens[:max_len]
            counts["truncated"] += 1
        out.append(Example(tokens, offset if mask_prompt else 0))
    return out, counts


def sft_loss(model, tokens: mx.array, lengths: mx.array, positions: mx.array, rows: mx.array) -> tuple[mx.array, dict]:
    """Mean NLL per answer token of a batch (the arrays of `training.pad_batch`)."""
    logps, n = T.answer_logps(model, tokens, lengths, positions, rows)
    n_answer = n.sum()
    return -logps.sum() / n_answer, {"tokens": lengths[:, 1].sum(), "loss_tokens": n_answer,
                                     "sequences": mx.array(tokens.shape[0])}


def batch_of(examples: list[Example], idx: list[int]) -> tuple[mx.array, ...]:
    return T.pad_batch([examples[i].tokens for i in idx], [examples[i].offset for i in idx])


def run(config: SFTConfig, progress: Callable[[dict], None] | None = None, *, resume: bool = False,
        model=None, tokenizer=None) -> Path:
    """Train a LoRA adapter on config.data into config.output; returns the output folder.

    `progress` gets each metrics row (training steps and validation passes) and first a row
    `{"event": "start", ...}` with the example counts. `model`/`tokenizer` may be passed (tests); else
    the model is loaded from config.model. `resume` continues from the newest checkpoint in the output.
    """
    cfg = config
    data = Path(cfg.data)
    if not (data / "train.jsonl").is_file():
        raise TrainingError(f"{data} has no train.jsonl (expected mlx-lm chat data, e.g. from `mlx-cai clean`)")
    train_chats = read_chats(data / "train.jsonl")
    valid_chats = read_chats(data / "valid.jsonl") if (data / "valid.jsonl").is_file() else []
    out, ckpt = T.prepare_output(cfg, resume)

    if model is None:
        from mlx_cai import models

        model, tokenizer = models.load(cfg.model)
    train_set, counts = tokenize(tokenizer, train_chats, cfg.max_seq_length, cfg.mask_prompt)
    valid_set, vcounts = tokenize(tokenizer, valid_chats, cfg.max_seq_length, cfg.mask_prompt)
    if not train_set:
        raise TrainingError(f"no training example fits max_seq_length {cfg.max_seq_length}")

    mx.random.seed(cfg.seed)
    n_params = T.add_lora(model, cfg)
    optimizer = T.make_optimizer(cfg)
    pos = T.Position()
    if ckpt is not None:
        pos = T.restore_checkpoint(ckpt, model, optimizer)
        T.trim_metrics(out / "metrics.jsonl", pos.step)
    adapter_cfg = T.adapter_config(cfg, model, STAGE, mask_prompt=cfg.mask_prompt, data=str(data))

    order = T.BatchOrder([len(e.tokens) for e in train_set], cfg.batch_size, cfg.seed)
    val_idx = T.eval_batches([len(e.tokens) for e in valid_set], cfg.batch_size, cfg.val_batches)
    val_batch = partial(batch_of, valid_set)
    evaluate = (lambda: T.evaluate_batches(model, sft_loss, T.local_batches(val_idx, val_batch))) if val_idx else None
    summary = {"stage": STAGE, "train_examples": len(train_set), "valid_examples": len(valid_set),
               "train_length_policy": counts, "valid_length_policy": vcounts, "trainable_parameters": n_params,
               "resumed_from_step": pos.step, "epochs": round(T.epochs(cfg, len(train_set)), 2),
               "warnings": T.epoch_warnings(cfg, len(train_set))}
    if progress:
        progress({"event": "start", **summary})
    t0 = time.perf_counter()
    build = partial(batch_of, train_set)
    pos = T.train(model, optimizer, sft_loss, lambda k: T.local_batch(order(k), build, T.train_streams()), cfg,
                  out, adapter_cfg, pos, evaluate=evaluate, on_report=progress, mean_over="loss_tokens")
    if D.is_main():
        summary.update(steps=pos.step, batches=pos.batches, seconds=round(time.perf_counter() - t0, 2),
                       last=_last_rows(out / "metrics.jsonl"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out


def _last_rows(path: Path) -> dict:
    """The newest value of each metric in metrics.jsonl."""
    last: dict = {}
    for row in records.read_jsonl(path):
        last.update(row)
    return last
