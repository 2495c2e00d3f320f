"""One training run of a stage, from the output folder to summary.json: what `sft.run` and `dpo.run` share.

The stage supplies its tokenized data (`Examples`), its adapter setup, its loss and batch builder, and
optionally work before the first step (DPO: the reference pass) and end fields of the summary. Reads the
model (mlx_cai.models.load unless one is given) and, on --resume, the newest checkpoint of OUT. Writes into
OUT (rank 0): config.yaml, checkpoints/, metrics.jsonl, adapters.safetensors + adapter_config.json and
summary.json (the start row's fields, steps, batches, the stage's end fields, `last`: the newest metrics).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx

from mlx_cai import adapters, distributed, records
from mlx_cai.progress import Event, Progress, emitter
from mlx_cai.train import checkpoint, data, loop, schedule
from mlx_cai.train.checkpoint import Position
from mlx_cai.train.config import TrainConfig


@dataclass
class Examples:
    """A stage's tokenized training and validation examples (of the stage's own type)."""

    train: Sequence
    valid: Sequence
    length: Callable[[Any], int]  # an example's tokens: batches are cut from length-sorted examples
    summary: dict  # the stage's counts: the first fields of the start row and of summary.json
    unit: str = "examples"  # what the epoch warning calls them
    group: Callable[[Any], str] | None = None  # an example's group: batches then mix the groups (BatchOrder)


@dataclass
class Trained:
    """What the training steps of one fit did, for the stage's end fields of summary.json."""

    out: Path
    first_step: int  # steps done before this run (a resumed one)
    pos: Position
    seconds: float  # spent in the training loop


def fit(cfg: TrainConfig, stage: str, *, adapter: Callable[[Any], dict], examples: Callable[[Any], Examples],
        loss_fn: loop.LossFn, batch: Callable[[Sequence, list[int]], tuple], mean_over: str,
        before_training: Callable[[Any, Path], dict] | None = None,
        end_summary: Callable[[Trained], dict] | None = None, progress: Progress | None = None,
        model=None, tokenizer=None) -> Path:
    """Train `cfg.output`'s adapter for `stage`; returns the output folder.

    adapter(model) adds fresh LoRA layers or loads an adapter to continue, trainable, and returns the adapter
    config to save; examples(tokenizer) tokenizes the stage's data; batch(examples, indices) builds the arrays
    `loss_fn(model, *arrays)` takes (its loss a mean over the metric `mean_over`, see loop.train).
    before_training(model, out) runs after the start row and before the checkpoint is restored (DPO's reference
    pass sees the adapter as loaded) and returns summary fields; end_summary(Trained) returns those after
    steps and batches. `progress` gets the start counts as a message, then an Event per metrics row (task
    "train", the row in `metrics`). With cfg.resume, training continues from the newest whole checkpoint (a damaged
    one is a "warning: ..." message).
    """
    report = train_events(progress, cfg.iters)

    def warn(text: str) -> None:
        emitter(progress)(Event("train", message=f"warning: {text}"))

    out, ckpt = checkpoint.prepare_output(cfg, cfg.resume, warn)
    if model is None:
        from mlx_cai import models

        model, tokenizer = models.load(cfg.model)
    mx.random.seed(cfg.seed)  # fresh LoRA weights depend on the seed alone
    adapter_cfg = adapter(model)
    trainable = adapters.trainable_count(model)
    sets = examples(tokenizer)
    pos = checkpoint.read_position(ckpt) if ckpt is not None else Position()
    summary = {"stage": stage, **sets.summary, "trainable_parameters": trainable, "resumed_from_step": pos.step,
               "epochs": round(loop.epochs(cfg, len(sets.train)), 2),
               "warnings": loop.epoch_warnings(cfg, len(sets.train), sets.unit)}
    report({"event": "start", **summary})
    if before_training:
        summary.update(before_training(model, out))

    optimizer = schedule.make_optimizer(cfg)
    if ckpt is not None:
        pos = checkpoint.restore_checkpoint(ckpt, model, optimizer)
        checkpoint.trim_metrics(out / "metrics.jsonl", pos.step)
    order = data.BatchOrder([sets.length(e) for e in sets.train], cfg.batch_size, cfg.seed,
                            [sets.group(e) for e in sets.train] if sets.group else None)
    val_idx = data.eval_batches([sets.length(e) for e in sets.valid], cfg.batch_size, cfg.val_batches)
    val_batch = partial(batch, sets.valid)
    evaluate = (lambda: loop.evaluate_batches(model, loss_fn, data.local_batches(val_idx, val_batch))) \
        if val_idx else None
    build, streams = partial(batch, sets.train), data.train_streams()
    first_step, t0 = pos.step, time.perf_counter()
    pos = loop.train(model, optimizer, loss_fn, lambda k: data.local_batch(order(k), build, streams), cfg, out,
                     adapter_cfg, pos, evaluate=evaluate, on_report=report, mean_over=mean_over)
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        summary.update(steps=pos.step, batches=pos.batches)
        if end_summary:
            summary.update(end_summary(Trained(out, first_step, pos, seconds)))
        summary["last"] = last_rows(out / "metrics.jsonl")
        records.write_json_atomic(out / "summary.json", summary)
    return out


def train_events(progress: Progress | None, iters: int) -> Callable[[dict], None]:
    """The progress events of a run's rows: the start row as message lines, each metrics row as an Event
    advancing the "train" task by the steps since the last row (a validation row advances 0)."""
    emit, last = emitter(progress), [None]

    def report(row: dict) -> None:
        if row.get("event") == "start":
            counts = {k: v for k, v in row.items() if k not in ("event", "stage", "warnings")}
            emit(Event("train", message=" ".join(f"{k}={json.dumps(v)}" for k, v in counts.items())))
            for warning in row.get("warnings", []):
                emit(Event("train", message=f"warning: {warning}"))
            return
        first = last[0] is None
        if first:
            last[0] = max(row["step"] - 1, 0)
        emit(Event("train", advance=row["step"] - last[0], total=iters if first else None,
                   done=last[0] if first else None, metrics=row))
        last[0] = row["step"]

    return report


def last_rows(path: Path) -> dict:
    """The newest value of each metric in metrics.jsonl."""
    last: dict = {}
    for row in records.read_jsonl(path):
        last.update(row)
    return last
