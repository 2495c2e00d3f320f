"""Learning-rate schedules (linear warmup, then a decay shape) and the AdamW optimizer. Pure."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx
import mlx.optimizers as optim

if TYPE_CHECKING:
    from mlx_cai.train.config import TrainConfig


def _cosine(progress: mx.array, floor: float) -> mx.array:
    return floor + (1 - floor) * 0.5 * (1 + mx.cos(math.pi * progress))


def _linear(progress: mx.array, floor: float) -> mx.array:
    return 1 - (1 - floor) * progress


def _constant(progress: mx.array, floor: float) -> mx.array:
    return mx.ones_like(progress)


# lr_schedule -> decay factor f(progress in [0, 1], floor) applied after warmup
SCHEDULES: dict[str, Callable[[mx.array, float], mx.array]] = {"cosine": _cosine, "linear": _linear,
                                                                "constant": _constant}


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """lr at optimizer step `step` (0 = the first update): linear warmup that starts above zero (no wasted
    first step), then the decay shape down to min_lr_ratio * lr at the last step."""
    peak, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.iters
    decay = SCHEDULES[cfg.lr_schedule]

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        ramp = mx.minimum((step + 1) / (warm + 1), 1.0)
        progress = mx.clip((step - warm) / max(total - warm - 1, 1), 0.0, 1.0)
        return peak * ramp * decay(progress, cfg.min_lr_ratio)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay)
