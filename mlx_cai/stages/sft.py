"""Supervised fine-tuning (SL-CAI) with LoRA: the model learns the cleaned revisions.

Reads DATA/train.jsonl and, if present, DATA/valid.jsonl: one chat per line in mlx-lm's format
`{"messages": [{role, content}, ..., {"role": "assistant", ...}]}` (what `mlx-cai clean` writes), or
`{"prompt": str, "completion": str}`. The loss covers the last assistant message only (mask_prompt).
Writes into OUT (see mlx_cai.train.fit): adapters.safetensors + adapter_config.json (loadable by
`mlx_lm.generate --adapter-path OUT` and `mlx_cai.models.load(M, adapter=OUT)`), checkpoints/,
metrics.jsonl, config.yaml and summary.json (rank 0 only; see mlx_cai.train.loop for several processes).

Length policy: a chat longer than max_seq_length is cut at the end (the answer's tail is dropped) and
counted as `truncated`; one whose prompt alone leaves no answer token within the limit is skipped and
counted as `skipped_prompt_too_long`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_cai import backend  # noqa: F401

import mlx.core as mx

from mlx_cai import adapters, encoding, records
from mlx_cai.config import opt
from mlx_cai.progress import Progress
from mlx_cai.train import fit
from mlx_cai.train.config import TrainConfig, TrainingError
from mlx_cai.train.data import pad_batch
from mlx_cai.train.logps import answer_logps

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
    for where, row in records.numbered_jsonl(path):
        if "messages" in row:
            msgs = records.check_messages(row["messages"], where)
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
        tokens, offset = encoding.encode_chat(tokenizer, msgs)
        if len(tokens) > max_len:
            if offset >= max_len:
                counts["skipped_prompt_too_long"] += 1
                continue
            tokens = tokens[:max_len]
            counts["truncated"] += 1
        out.append(Example(tokens, offset if mask_prompt else 0))
    return out, counts


def sft_loss(model, tokens: mx.array, lengths: mx.array, positions: mx.array, rows: mx.array) -> tuple[mx.array, dict]:
    """Mean NLL per answer token of a batch (the arrays of `data.pad_batch`)."""
    logps, n = answer_logps(model, tokens, lengths, positions, rows)
    n_answer = n.sum()
    return -logps.sum() / n_answer, {"tokens": lengths[:, 1].sum(), "loss_tokens": n_answer,
                                     "sequences": mx.array(tokens.shape[0])}


def batch_of(examples: list[Example], idx: list[int]) -> tuple[mx.array, ...]:
    return pad_batch([examples[i].tokens for i in idx], [examples[i].offset for i in idx])


def run(config: SFTConfig, progress: Progress | None = None, *, model=None, tokenizer=None) -> Path:
    """Train a LoRA adapter on config.data into config.output; returns the output folder.

    `progress` gets the example counts, then an Event per metrics row (training steps and validation
    passes; the row in `metrics`). `model`/`tokenizer` may be passed (tests); else the model is loaded from
    config.model. config.resume continues from the newest checkpoint in the output.
    """
    cfg = config
    data = Path(cfg.data)
    if not (data / "train.jsonl").is_file():
        raise TrainingError(f"{data} has no train.jsonl (expected mlx-lm chat data, e.g. from `mlx-cai clean`)")
    train_chats = read_chats(data / "train.jsonl")
    valid_chats = read_chats(data / "valid.jsonl") if (data / "valid.jsonl").is_file() else []

    def examples(tok) -> fit.Examples:
        train_set, counts = tokenize(tok, train_chats, cfg.max_seq_length, cfg.mask_prompt)
        valid_set, vcounts = tokenize(tok, valid_chats, cfg.max_seq_length, cfg.mask_prompt)
        if not train_set:
            raise TrainingError(f"no training example fits max_seq_length {cfg.max_seq_length}")
        return fit.Examples(train_set, valid_set, lambda e: len(e.tokens), {
            "train_examples": len(train_set), "valid_examples": len(valid_set), "train_length_policy": counts,
            "valid_length_policy": vcounts})

    def add_lora(model) -> dict:
        adapters.add_lora(model, cfg)
        return adapters.adapter_config(cfg, model, STAGE, mask_prompt=cfg.mask_prompt, data=str(data))

    return fit.fit(cfg, STAGE, adapter=add_lora, examples=examples, loss_fn=sft_loss, batch=batch_of,
                   mean_over="loss_tokens", end_summary=lambda done: {"seconds": round(done.seconds, 2)},
                   progress=progress, model=model, tokenizer=tokenizer)
