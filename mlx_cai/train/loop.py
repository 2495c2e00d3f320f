"""The compiled training loop and validation; the loss and the batches are functions (mlx-lm style).

Data parallelism (mlx_cai.distributed): every process takes its strided share of the rows of each global
batch (`data.local_batch`), and the step combines the gradients weighted by what each share's loss is a mean
over, so N processes take the same steps as one (the batch index stays the data position). Only rank 0
writes: OUT/metrics.jsonl (a row per step and per validation pass), the checkpoints and the final adapter.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_cai import distributed, fastmath, records
from mlx_cai.adapters import checkpoint_blocks, save_adapter
from mlx_cai.train.checkpoint import Position, latest_checkpoint, save_checkpoint
from mlx_cai.train.config import NonFiniteLoss, TrainConfig, TrainingError
from mlx_cai.train.data import Padding

LossFn = Callable[..., tuple[mx.array, dict[str, mx.array]]]  # (model, *batch) -> (loss, metrics)

MANY_EPOCHS = 10  # more passes than this over a small set: the model memorizes it (the demo's collapse)

SUMMED = ("tokens", "sequences", "examples")  # per-batch counts: summed over a step's batches, not averaged
COUNTS = SUMMED + ("loss_tokens",)  # metrics that are counts: summed over processes


def epochs(cfg: TrainConfig, n: int) -> float:
    """Passes over `n` training examples that cfg.iters optimizer steps make."""
    return cfg.iters * cfg.batch_size * cfg.grad_accumulation / max(n, 1)


def epoch_warnings(cfg: TrainConfig, n: int, what: str = "examples") -> list[str]:
    """A warning when training would pass over the data more than MANY_EPOCHS times."""
    e = epochs(cfg, n)
    if e <= MANY_EPOCHS:
        return []
    return [f"{cfg.iters} steps x batch {cfg.batch_size * cfg.grad_accumulation} = {e:.0f} epochs over {n} {what}: "
            "expect a memorized, collapsed model (repeated phrases); get more data or lower iters"]


def batch_seed(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k) % (2**63)


def combine_parts(results: Sequence[tuple], mean_over: str) -> tuple:
    """(loss, metrics, grad) of a batch from those of its slices. The loss and gradient are means over the
    metric `mean_over`, so each slice weighs by its count; counts are summed, other metrics weighted means."""
    weights = [m[mean_over].astype(mx.float32) for _, m, _ in results]
    total = sum(weights)
    loss = sum(r[0] * w for r, w in zip(results, weights)) / total
    metrics = {}
    for k in results[0][1]:
        vals = [m[k] for _, m, _ in results]
        metrics[k] = sum(vals) if k in COUNTS else sum(v * w for v, w in zip(vals, weights)) / total
    grad = tree_map(lambda *gs: sum(g * w for g, w in zip(gs, weights)) / total, *[g for _, _, g in results])
    return loss, metrics, grad


def train(model, optimizer: optim.Optimizer, loss_fn: LossFn, get_batch: Callable[[int], tuple], cfg: TrainConfig,
          out: Path, adapter_cfg: dict, pos: Position, *, evaluate: Callable[[], dict] | None = None,
          on_report: Callable[[dict], None] | None = None, mean_over: str = "sequences") -> Position:
    """Run optimizer steps pos.step+1 .. cfg.iters, checkpointing and reporting as configured.

    `get_batch(k)` returns the arrays of this process's share of training batch k (`data.local_batch`; all of
    it in one process), or a list of them for slices of it, which run on parallel CPU streams and are combined
    by `combine_parts` (the same step up to float rounding). `loss_fn(model, *batch)` returns a scalar loss and
    a dict of scalar metrics (`tokens`: non-padding tokens, `sequences` and `examples` are summed, the rest
    averaged per step). The loss is a mean over the metric `mean_over` (SFT: `loss_tokens`, DPO: `examples`):
    with several processes each share's gradient is weighted by it, so the step is the one-process step on
    the whole batch. Each step is appended to OUT/metrics.jsonl (rank 0) and passed to `on_report` with the
    values of the whole batch. A NaN/inf loss raises NonFiniteLoss before anything is saved, so the last checkpoint
    stays good.
    """
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    accum = cfg.grad_accumulation
    state = [model.state, optimizer.state, mx.random.state]
    spread = distributed.size() > 1
    _check_same_position(pos)

    def apply(loss, metrics, grad, keep, prev_grad, do_update):
        if spread:  # this share's part of the gradient of the whole batch's mean loss
            weight = keep * metrics[mean_over]
            share = weight / distributed.all_sum(weight)
            grad = tree_map(lambda g: g * share, grad)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            if spread:
                grad = distributed.all_sum_tree(grad)
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            if cfg.max_grad_norm > 0:
                grad, norm = optim.clip_grad_norm(grad, cfg.max_grad_norm)
            else:
                norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grad)))
            optimizer.update(model, grad)
            metrics = {**metrics, "grad_norm": norm}
            grad = None
        return loss, metrics, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, keep, prev_grad, do_update):
        (loss, metrics), grad = loss_and_grad(model, *batch)
        return apply(loss, metrics, grad, keep, prev_grad, do_update)

    # A batch in slices (local_batch with parts > 1): each slice's loss and gradient on its own CPU stream
    # (a compiled graph keeps the stream it was traced on: one compiled function per stream), then combined.
    part_steps: list = []

    def part_step(i: int):
        while len(part_steps) <= i:
            def grads(batch):
                (loss, metrics), grad = loss_and_grad(model, *batch)
                # MLX 0.32: a compiled value_and_grad on a non-default stream fails (IndexError _Map_base::at)
                # when an aux output does not depend on the loss's graph (e.g. a token count); tie it to it.
                tie = mx.stop_gradient(loss) * 0
                return loss, {k: v + tie.astype(v.dtype) for k, v in metrics.items()}, grad

            part_steps.append(mx.compile(grads, inputs=state, outputs=state))
        return backend.cpu_stream(i), part_steps[i]

    @partial(mx.compile, inputs=state, outputs=state)
    def combine_step(results, keep, prev_grad, do_update):
        return apply(*combine_parts(results, mean_over), keep, prev_grad, do_update)

    def run_step(batch, keep, prev_grad, do_update):
        if not isinstance(batch, list):
            return step(tuple(batch), keep, prev_grad, do_update)
        results = []
        for i, part in enumerate(batch):
            stream, fn = part_step(i)
            with mx.stream(stream):
                results.append(fn(tuple(part)))
        return combine_step(results, keep, prev_grad, do_update)

    writer = records.writer(out / "metrics.jsonl", distributed.is_main(), sync=False)
    last_saved = latest_checkpoint(out)
    model.train()
    # cheaper CPU exp and attention (fastmath), frozen matmuls over pre-packed weights
    with fastmath.mlx_lm_cpu_ops(), fastmath.packed_frozen_linears(model):
        try:
            while pos.step < cfg.iters:
                t0 = time.perf_counter()
                grad, rows = None, []
                for micro in range(accum):
                    mx.random.seed(batch_seed(cfg.seed, pos.batches))
                    batch = get_batch(pos.batches)
                    keep = 0.0 if isinstance(batch, Padding) else 1.0
                    # slices on parallel streams share the BLAS threads (two 2-thread calls oversubscribe 2 cores)
                    with backend.blas_threads_per(len(batch) if isinstance(batch, list) else 1):
                        loss, metrics, grad = run_step(batch, mx.array(keep), grad, micro == accum - 1)
                        mx.eval(state, loss, metrics, grad)
                    row = {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
                    if spread:
                        row = _whole_batch_metrics(row, keep, mean_over)
                    value, norm = row["loss"], row.get("grad_norm", 0.0)
                    if not (math.isfinite(value) and math.isfinite(norm)):  # an inf gradient would poison the weights
                        what = f"loss {value}" if not math.isfinite(value) else f"gradient norm {norm}"
                        where = f"{last_saved} (step {int(last_saved.name[5:])})" if last_saved else "none yet"
                        raise NonFiniteLoss(f"{what} at step {pos.step + 1} (batch {pos.batches}); stopped without "
                                            f"saving. Last good checkpoint: {where}. Lower the learning rate or check "
                                            "the data, then rerun with --resume")
                    rows.append(row)
                    pos.batches += 1
                pos.step += 1
                seconds = time.perf_counter() - t0
                record = {"step": pos.step, "learning_rate": optimizer.learning_rate.item()}
                for k in dict.fromkeys(k for r in rows for k in r):
                    vals = [r[k] for r in rows if k in r]
                    record[k] = sum(vals) if k in SUMMED else sum(vals) / len(vals)
                record["seconds"] = round(seconds, 4)
                record["tokens_per_second"] = round(record.get("tokens", 0) / seconds, 2)
                writer.write(record)
                if on_report:
                    on_report(record)
                if evaluate and (pos.step % cfg.steps_per_eval == 0 or pos.step == cfg.iters):
                    val = {"step": pos.step, **evaluate()}
                    model.train()
                    writer.write(val)
                    if on_report:
                        on_report(val)
                if distributed.is_main() and (pos.step % cfg.steps_per_save == 0 or pos.step == cfg.iters):
                    last_saved = save_checkpoint(out, pos, model, optimizer, adapter_cfg, cfg.keep_checkpoints)
        finally:
            writer.close()
    if distributed.is_main():
        save_adapter(model, out, adapter_cfg)
    return pos


def _check_same_position(pos: Position) -> None:
    """Every process must resume from the same checkpoint, i.e. see the same output folder."""
    seen = {tuple(p) for p in distributed.gather([pos.step, pos.batches])}
    if len(seen) > 1:
        raise TrainingError(f"the processes would resume from different steps ({sorted(s for s, _ in seen)}): to "
                            "resume a run on several hosts, the output folder must be shared by all of them")


def _whole_batch_metrics(row: dict[str, float], keep: float, mean_over: str) -> dict[str, float]:
    """One process's metrics of its share -> those of the whole batch: counts summed, means weighted by
    `mean_over` (what they are means over); grad_norm is already that of the combined gradient."""
    keys = sorted(row)
    weight = keep * row[mean_over]
    local = [keep * row[k] if k in COUNTS else 0.0 if k == "grad_norm" else weight * row[k] for k in keys]
    total = np.array(distributed.all_sum(mx.array(local + [weight], dtype=mx.float32))).tolist()
    out = {}
    for k, t in zip(keys, total):
        if k == "grad_norm":
            out[k] = row[k]
        elif k in COUNTS:
            out[k] = round(t) if isinstance(row[k], int) else t
        else:
            out[k] = t / total[-1]
    return out


def evaluate_batches(model, loss_fn: LossFn, batches: Iterator[tuple], prefix: str = "val_") -> dict:
    """Mean loss and metrics over `batches` (weighted by sequences), without gradients or dropout. With several
    processes, each evaluates its share of the batches (`data.local_batches`) and the sums are combined."""
    model.eval()
    sums: dict[str, float] = {}
    weight = 0.0
    for batch in batches:
        loss, metrics = loss_fn(model, *batch)
        mx.eval(loss, metrics)
        w = 0.0 if isinstance(batch, Padding) else float(metrics.get("sequences", mx.array(1)).item())
        for k, v in {"loss": loss, **metrics}.items():
            if k not in SUMMED:
                sums[k] = sums.get(k, 0.0) + v.item() * w
        weight += w
    if distributed.size() > 1:
        keys = sorted(sums)
        total = np.array(distributed.all_sum(mx.array([sums[k] for k in keys] + [weight], dtype=mx.float32))).tolist()
        sums, weight = dict(zip(keys, total)), total[-1]
    return {f"{prefix}{k}": v / weight for k, v in sums.items()} if weight else {}
