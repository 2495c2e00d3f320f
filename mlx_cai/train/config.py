"""What `sft` and `dpo` share: the model, LoRA, optimizer, schedule and checkpoint settings, and the
errors a training run raises. Reads and writes nothing (mlx_cai.config builds and writes configs)."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_cai import memplan
from mlx_cai.config import ConfigError, opt
from mlx_cai.train.schedule import SCHEDULES


class TrainingError(ConfigError):
    """A training run that cannot start or continue as asked; one line."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf; nothing was saved after the last good checkpoint."""


@dataclass
class TrainConfig:
    """What `sft` and `dpo` share: the model, LoRA, optimizer, schedule, checkpoints. The resumable settings
    may change on --resume (they do not change the trained weights)."""

    sequences_per_example = 1  # sequences a batch row puts through the model (DPO: chosen and rejected)

    model: str = opt("smollm2-135m", "base model: smollm2-135m (embedded), a .gguf, an MLX folder or a Hub id")
    output: str = opt("", "run folder: adapters, checkpoints, metrics.jsonl, config.yaml")
    seed: int = opt(0, "drives LoRA init, batch order and dropout")
    iters: int = opt(200, "optimizer steps (each sees batch_size * grad_accumulation examples)", resumable=True)
    batch_size: int = opt(4, "examples per forward pass (DPO: pairs, i.e. 2x sequences)")
    grad_accumulation: int = opt(1, "batches whose gradients are summed before one optimizer step")
    learning_rate: float = opt(2e-5, "peak learning rate (mlx-lm LoRA convention: scale 20, small lr)")
    lr_schedule: str = opt("cosine", "decay after warmup: cosine, linear or constant")
    warmup_steps: int = opt(10, "linear warmup steps")
    min_lr_ratio: float = opt(0.1, "final lr as a share of the peak (cosine/linear)")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA parameters")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = off")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_scale: float = opt(20.0, "LoRA output scale (mlx-lm's `scale`, PEFT's alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_layers: int = opt(16, "adapt the last N transformer blocks; -1 = all")
    lora_keys: list[str] | None = opt(None, "module names inside a block to adapt, e.g. self_attn.q_proj; "
                                            "none = every linear layer of the block")
    dora: bool = opt(False, "DoRA (weight-decomposed LoRA) instead of LoRA")
    grad_checkpoint: bool = opt(False, "recompute each block's activations in the backward pass: much less "
                                       "memory for long or many sequences, about a third more compute")
    max_seq_length: int = opt(1024, "longest sequence in tokens; longer ones are truncated (see the stage)")
    steps_per_eval: int = opt(50, "steps between validation passes (and one at the end)", resumable=True)
    val_batches: int = opt(25, "validation batches per pass; -1 = all", resumable=True)
    steps_per_save: int = opt(50, "steps between checkpoints (and one at the end)", resumable=True)
    keep_checkpoints: int = opt(2, "newest checkpoints kept on disk", resumable=True)
    resume: bool = opt(False, "continue from the newest checkpoint in the output folder (settings must match "
                              "but for the resumable ones)", resumable=True, flags=("--resume",))

    def plan(self) -> tuple[str, int]:
        """(what it does, tokens it generates) for `mlx-cai run --dry-run`."""
        return f"{self.iters} steps x batch {self.batch_size}", 0

    def memory(self, ctx: memplan.Context) -> memplan.Estimate | None:
        """Peak memory of a training step on the longest batch (mlx_cai.memplan)."""
        return memplan.training(ctx, self, self.sequences_per_example)

    @staticmethod
    def work_units(settings: dict) -> float | None:
        """Examples trained on: what a measured stage time is divided by."""
        return settings.get("iters", 0) * settings.get("batch_size", 0) * settings.get("grad_accumulation", 1) or None

    def __post_init__(self):
        positive = ("iters", "batch_size", "grad_accumulation", "lora_rank", "max_seq_length", "steps_per_eval",
                    "steps_per_save", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise TrainingError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in SCHEDULES:
            raise TrainingError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got '{self.lr_schedule}'")
        if not 0 <= self.lora_dropout < 1:
            raise TrainingError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_layers == 0 or self.lora_layers < -1:
            raise TrainingError(f"lora_layers must be >= 1 or -1 (all), got {self.lora_layers}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise TrainingError("warmup_steps, max_grad_norm and weight_decay must be >= 0")
        if isinstance(self.lora_keys, str):
            self.lora_keys = [k.strip() for k in self.lora_keys.split(",") if k.strip()]
