"""Shared training machinery for the `sft` and `dpo` stages.

- typed configs: defaults < YAML < command line, the resolved config written into the run folder;
- tokenization of chats with the prompt offset (loss only on the answer), padded batches as
  `tokens (B, W+1)` and `lengths (B, 2) = [prompt_offset, length]` (mlx-lm's layout) plus the flat
  positions of the answer tokens, so the vocabulary projection runs on those alone;
- a seeded batch order where batch k depends only on (seed, k): the data position is one integer;
- LoRA layers through mlx-lm's `linear_to_lora_layers`, adapters in mlx-lm's format with the base
  model's shape recorded (so an adapter for another base is refused with one line);
- checkpoints (adapter + optimizer state + data position; the RNG is reseeded from (seed, batch index));
- one compiled training loop that takes the loss and the batches as functions;
- data parallelism (mlx_cai.distributed): every process takes its strided share of the rows of each global
  batch, and the step combines the gradients weighted by what each share's loss is a mean over, so N
  processes take the same steps as one (the batch index stays the data position). Only rank 0 writes.

Writes into OUT: adapters.safetensors + adapter_config.json, checkpoints/step-NNNNNNN/ (the same two files,
optimizer.safetensors, state.json) and checkpoints/latest, metrics.jsonl, config.yaml.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_cai import distributed as D
from mlx_cai import fastmath
from mlx_cai import kernels
from mlx_cai import records
from mlx_cai.losses import sequence_logps

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # trainable leaves of LoRA / DoRA layers (mlx-lm)
PAD_TO = 32  # batch widths round up to this: few distinct shapes for the compiled step


class TrainingError(ValueError):
    """A training run that cannot start or continue as asked; one line."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf; nothing was saved after the last good checkpoint."""


def opt(default: Any, help: str, **kw) -> Any:
    """A config field with its help text (shown by `--help` and in the YAML files)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# ------------------------------------------------------------------------------------------ configs


@dataclass
class TrainConfig:
    """What `sft` and `dpo` share: the model, LoRA, optimizer, schedule, checkpoints."""

    model: str = opt("smollm2-135m", "base model: smollm2-135m (embedded), a .gguf, an MLX folder or a Hub id")
    output: str = opt("", "run folder: adapters, checkpoints, metrics.jsonl, config.yaml")
    seed: int = opt(0, "drives LoRA init, batch order and dropout")
    iters: int = opt(200, "optimizer steps (each sees batch_size * grad_accumulation examples)")
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
    steps_per_eval: int = opt(50, "steps between validation passes (and one at the end)")
    val_batches: int = opt(25, "validation batches per pass; -1 = all")
    steps_per_save: int = opt(50, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = opt(2, "newest checkpoints kept on disk")

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


def field_help(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def build_config(cls, yaml_path: str | Path | Sequence[str | Path] | None = None, **overrides):
    """`cls` from its defaults, then the YAML file(s) in order, then `overrides` (None values are ignored).
    Unknown keys in a YAML file raise TrainingError naming the file and key."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(cls)}
    paths = [yaml_path] if isinstance(yaml_path, (str, Path)) else list(yaml_path or [])
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise TrainingError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise TrainingError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise TrainingError(f"{path}: expected a mapping of settings")
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    for k, v in values.items():  # YAML reads 1e-5 as a string and 5 where a float is meant
        if hints.get(k) is float and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                values[k] = float(v)
            except ValueError:
                raise TrainingError(f"{k} must be a number, got {v!r}") from None
    return cls(**values)


def write_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), encoding="utf-8")


# Settings that may change between a run and its --resume (they do not change the trained weights).
RESUMABLE = {"iters", "steps_per_eval", "val_batches", "steps_per_save", "keep_checkpoints"}


def check_resume_config(cfg, out: Path) -> None:
    path = out / "config.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    new = asdict(cfg)
    changed = [k for k in new if k not in RESUMABLE and k in old and old[k] != new[k]]
    if changed:
        k = changed[0]
        raise TrainingError(f"--resume with changed setting {k} ({old[k]!r} -> {new[k]!r}); "
                            f"only {', '.join(sorted(RESUMABLE))} may change")


def numbered_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", record) for each record of a JSONL file (blank lines skipped, as records.read_jsonl does)."""
    path = Path(path)
    rows = records.read_jsonl(path, required)
    with path.open(encoding="utf-8") as f:
        numbers = [i for i, line in enumerate(f, 1) if line.strip()]
    for lineno, row in zip(numbers, rows):
        yield f"{path}:{lineno}", row


# ------------------------------------------------------------------------------------- tokenization


def chat_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  return_dict=False))
    # A base model without a template: turns joined by blank lines (as mlx_cai.generate.encode does).
    text = "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")
    ids = list(tokenizer.encode(text))
    if not add_generation_prompt and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """Token ids of the prompt turns plus the assistant generation prompt."""
    return chat_tokens(tokenizer, prompt, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of a chat that ends with the assistant's answer, and the prompt length: the loss covers
    ids[offset:] (the answer and its end-of-turn tokens)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise TrainingError("a training chat must end with an assistant message")
    prompt = encode_prompt(tokenizer, messages[:-1])
    full = chat_tokens(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise TrainingError("the chat template does not render the prompt as a prefix of the full chat, "
                            "so prompt tokens cannot be masked")
    return full, len(prompt)


def completion_mask(lengths: mx.array, width: int) -> mx.array:
    """(B, width) float mask over *targets*: target t is token t+1, inside the answer when
    prompt_offset <= t+1 < length."""
    steps = mx.arange(1, width + 1)[None, :]
    return ((steps >= lengths[:, 0:1]) & (steps < lengths[:, 1:2])).astype(mx.float32)


def pad_batch(seqs: Sequence[Sequence[int]], offsets: Sequence[int]) -> tuple[mx.array, ...]:
    """The arrays of one batch: tokens (B, W+1) right-padded with 0, W a multiple of PAD_TO; lengths (B, 2) =
    [offset, length]; positions (K,) = flat indices into (B, W) of the targets inside the answers and rows (K,)
    = their sequence (-1 pads K up to a multiple of PAD_TO, so few distinct shapes reach the compiled step)."""
    width = PAD_TO * math.ceil(max(len(s) - 1 for s in seqs) / PAD_TO)
    arr = np.zeros((len(seqs), width + 1), np.int32)
    positions: list[int] = []
    rows: list[int] = []
    for i, (s, o) in enumerate(zip(seqs, offsets)):
        arr[i, : len(s)] = s
        start, end = max(o - 1, 0), len(s) - 1  # target t is token t+1
        positions += range(i * width + start, i * width + end)
        rows += [i] * (end - start)
    pad = PAD_TO * max(math.ceil(len(positions) / PAD_TO), 1) - len(positions)
    return (mx.array(arr), mx.array([[o, len(s)] for o, s in zip(offsets, seqs)], dtype=mx.int32),
            mx.array(positions + [0] * pad, dtype=mx.int32), mx.array(rows + [-1] * pad, dtype=mx.int32))


# Model types whose logits are head(backbone(tokens)) with mlx-lm's layout (`model.model`, `lm_head` or tied).
HEAD_SPLIT_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def split_head(model):
    """(backbone, head) where logits = head(backbone(tokens)), or None for other architectures."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) not in HEAD_SPLIT_TYPES or not hasattr(model, "model"):
        return None
    if getattr(args, "tie_word_embeddings", False):
        return model.model, model.model.embed_tokens.as_linear
    return (model.model, model.lm_head) if hasattr(model, "lm_head") else None


def answer_logps(model, tokens: mx.array, lengths: mx.array, positions: mx.array, rows: mx.array):
    """Per-sequence summed log-probs of the answer tokens and their counts, both (B,).

    The vocabulary projection runs only at the K answer positions (the prompt and padding never reach the
    (·, V) logits): for a short-prompt chat batch that is a third less head work and a (K, V) instead of
    (B, W, V) logits buffer. Other architectures take the full logits and mask them.
    """
    targets = tokens[:, 1:]
    parts = split_head(model)
    if parts is None:
        return sequence_logps(model(tokens[:, :-1]), targets, completion_mask(lengths, targets.shape[1]))
    backbone, head = parts
    hidden = backbone(tokens[:, :-1])
    logits = head(hidden.reshape(-1, hidden.shape[-1])[positions])  # (K, V)
    token_logps = kernels.token_logprobs(logits, targets.reshape(-1)[positions])  # (K,)
    onehot = (rows[None, :] == mx.arange(tokens.shape[0])[:, None]).astype(mx.float32)  # (B, K)
    return onehot @ token_logps, onehot.sum(axis=-1)


# ------------------------------------------------------------------------------------------ batches


class BatchOrder:
    """Batch k (counted over all epochs) from (seed, k) alone, so the data position is one integer.

    Examples are sorted by length and cut into batches (little padding); each epoch visits the batches in
    a seeded random order. The last batch of an epoch may be smaller.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        if not lengths:
            raise TrainingError("no training examples")
        idx = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        self.batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, k: int) -> list[int]:
        epoch, pos = divmod(k, len(self.batches))
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
        return self.batches[perm[pos]]


def eval_batches(lengths: Sequence[int], batch_size: int, limit: int) -> list[list[int]]:
    """Validation batches in a fixed order (sorted by length); `limit` -1 = all."""
    idx = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return out if limit < 0 else out[:limit]


class Padding(tuple):
    """The arrays of a batch that weighs 0: a process whose share of a global batch is empty (a batch with
    fewer rows than processes) still runs the step, so that the collectives of all processes match."""


def local_batch(rows: list[int], build: Callable[[list[int]], tuple], parts: int = 1) -> tuple | list[tuple]:
    """This process's share of the training batch of example indices `rows` (all of them in one process).
    With `parts` > 1 and more than one row: a list of up to `parts` strided slices of the share, built
    separately so that `train` runs them on parallel CPU streams. Strided like the processes' shares, so one
    process with 2 streams computes exactly the slices that 2 processes with 1 stream each would."""
    mine = D.shard(rows)
    if not mine:
        return Padding(build(rows[:1]))
    if parts <= 1 or len(mine) < 2:
        return build(mine)
    return [build(s) for s in strided(mine, parts)]


def strided(xs: list, parts: int) -> list[list]:
    """Up to `parts` strided slices of `xs` (xs[i::n]), like the shares of n processes (`D.shard`)."""
    n = max(1, min(parts, len(xs)))
    return [xs[i::n] for i in range(n)]


def train_streams() -> int:
    """How many CPU streams a training step splits its batch over: one per BLAS thread on the CPU (MLX's
    CPU ops other than BLAS are single-threaded, so one stream leaves the other cores idle during norms,
    rope, softmax and gates; measured on 2 cores, an SFT step of 4 x 128 tokens: 1.74-1.85 s in two streams,
    2.14-2.15 s in one). 1 elsewhere (Metal, CUDA). MLX_CAI_TRAIN_STREAMS=N overrides."""
    forced = os.environ.get("MLX_CAI_TRAIN_STREAMS")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise TrainingError(f"MLX_CAI_TRAIN_STREAMS must be a whole number >= 1, got {forced!r}")
        return int(forced)
    return backend.blas_threads() if mx.default_device() == mx.cpu else 1


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


def local_batches(batches: list[list[int]], build: Callable[[list[int]], tuple]) -> Iterator[tuple]:
    """This process's share of the validation batches: whole batches, strided, and at least one (Padding)."""
    mine = D.shard(batches)
    if not mine and batches:
        yield Padding(build(batches[0]))
    for b in mine:
        yield build(b)


# --------------------------------------------------------------------------------------------- LoRA


def lora_parameters(cfg: TrainConfig) -> dict:
    return {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout, "keys": cfg.lora_keys}


def base_fingerprint(model) -> dict:
    """What an adapter must match: architecture and shapes of the base model."""
    args = getattr(model, "args", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def add_lora(model, cfg: TrainConfig) -> int:
    """Freeze the model and add fresh LoRA/DoRA layers; returns the number of trainable parameters."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if cfg.lora_layers > n:
        raise TrainingError(f"lora_layers {cfg.lora_layers} > the model's {n} blocks")
    model.freeze()
    try:
        linear_to_lora_layers(model, cfg.lora_layers, lora_parameters(cfg), use_dora=cfg.dora)
    except ValueError as e:
        raise TrainingError(f"cannot add LoRA layers: {str(e).splitlines()[0]}") from None
    return _trainable_count(model, cfg.lora_keys)


_CHECKPOINTED: dict[type, type] = {}  # block class -> its checkpointing subclass


def checkpoint_blocks(model) -> None:
    """Make every transformer block of `model` recompute its activations in the backward pass (mx.checkpoint).

    Only these instances change class (to a subclass with a checkpointing __call__); parameter names, saving
    and other models in the process are untouched (mlx-lm's grad_checkpoint patches the class itself)."""
    for block in model.layers:
        cls = type(block)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            plain = cls.__call__

            def call(self, *args, _plain=plain, **kwargs):
                def inner(params, *a, **kw):
                    self.update(params)
                    return _plain(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call})
        block.__class__ = _CHECKPOINTED[cls]


def _trainable_count(model, keys) -> int:
    count = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if count == 0:
        raise TrainingError(f"no module matches lora_keys {keys}; names look like self_attn.q_proj, mlp.down_proj")
    return count


def adapter_config(cfg: TrainConfig, model, stage: str, **extra) -> dict:
    """mlx-lm's adapter_config.json fields plus the base model's fingerprint and provenance."""
    return {"fine_tune_type": "dora" if cfg.dora else "lora", "num_layers": cfg.lora_layers,
            "lora_parameters": lora_parameters(cfg), "model": cfg.model, "base_model": base_fingerprint(model),
            "stage": stage, **extra}


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file() or not (path / ADAPTER_FILE).is_file():
        raise TrainingError(f"{path} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrainingError(f"{cfg_path}: malformed JSON ({e.msg})") from None


def load_adapter(model, path: str | Path, *, trainable: bool = False) -> dict:
    """Add the adapter's LoRA layers and weights to `model` after checking it was made for this base.

    With `trainable`, everything but the adapter's LoRA leaves is frozen (to continue training it).
    Returns the adapter config.
    """
    from mlx_lm.tuner.utils import load_adapters

    config = read_adapter_config(path)
    want, have = config.get("base_model"), base_fingerprint(model)
    if want:
        diff = [k for k in want if k in have and want[k] != have[k]]
        if diff:
            k = diff[0]
            raise TrainingError(f"adapter {path} was trained on another base model ({k} {want[k]}, this model has "
                                f"{have[k]}; adapter base: {config.get('model', '?')})")
    if config.get("fine_tune_type", "lora") == "full":
        raise TrainingError(f"{path} holds full fine-tuned weights, not a LoRA adapter")
    if config.get("num_layers", 0) > len(model.layers):
        raise TrainingError(f"adapter {path} adapts {config['num_layers']} blocks, the model has {len(model.layers)}")
    try:
        load_adapters(model, str(path))
    except (ValueError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise TrainingError(f"adapter {path} does not fit this model: {detail}") from None
    if trainable:
        model.freeze()
        for _, module in model.named_modules():
            if hasattr(module, "lora_a"):
                module.unfreeze(keys=[k for k in ADAPTER_LEAVES if k in module], recurse=False)
        _trainable_count(model, config.get("lora_parameters", {}).get("keys"))
    return config


def save_adapter(model, folder: Path, config: dict) -> None:
    """adapters.safetensors (the trainable parameters) + adapter_config.json, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = folder / f".{ADAPTER_FILE}.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, folder / ADAPTER_FILE)
    _write_json(folder / ADAPTER_CONFIG, config)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- optimizer


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


# -------------------------------------------------------------------------------------- checkpoints


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    batches: int = 0  # training batches consumed (the data position)


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, pos: Position, model, optimizer, adapter_cfg: dict, keep: int) -> Path:
    """Write checkpoints/step-NNNNNNN/ via a temporary folder and a rename, then point `latest` at it."""
    root = checkpoint_dir(out)
    final = root / f"step-{pos.step:07d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, adapter_cfg)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    _write_json(tmp / "state.json", {**asdict(pos), "time": time.time(),
                                      "rng": "reseeded per batch from (seed, batch index)"})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / ".latest.tmp").write_text(final.name, encoding="utf-8")
    os.replace(root / ".latest.tmp", root / "latest")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    root = checkpoint_dir(out)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if (path / "state.json").exists():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def restore_checkpoint(path: Path, model, optimizer) -> Position:
    """Load the adapter weights and optimizer state of a checkpoint; returns its position."""
    model.load_weights(list(mx.load(str(path / ADAPTER_FILE)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return Position(step=int(state["step"]), batches=int(state["batches"]))


def prepare_output(cfg: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    """Create the run folder (rank 0); with `resume`, return the checkpoint to continue from."""
    if not cfg.output:
        raise TrainingError("an output folder is required (-o OUT)")
    out = Path(cfg.output)
    ckpt = latest_checkpoint(out) if out.exists() else None
    if resume:
        check_resume_config(cfg, out)
    elif ckpt is not None or (out / ADAPTER_FILE).exists():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose a new folder")
    D.barrier()  # every process has read the folder before rank 0 changes it
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
        if not resume or ckpt is None:  # metrics of a run that never reached a checkpoint
            (out / "metrics.jsonl").unlink(missing_ok=True)
    return out, ckpt if resume else None


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric rows past `step` (written by a run that was killed before its next checkpoint); rank 0."""
    if not D.is_main() or not path.exists():
        return
    keep = [r for r in records.read_jsonl(path) if r.get("step", 0) <= step] if path.stat().st_size else []
    records.write_jsonl_atomic(path, keep)


# ------------------------------------------------------------------------------------- the loop


LossFn = Callable[..., tuple[mx.array, dict[str, mx.array]]]  # (model, *batch) -> (loss, metrics)


MANY_EPOCHS = 10  # more passes than this over a small set: the model memorizes it (the demo's collapse)


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


SUMMED = ("tokens", "sequences", "examples")  # per-batch counts: summed over a step's batches, not averaged
COUNTS = SUMMED + ("loss_tokens",)  # metrics that are counts: summed over processes


def train(model, optimizer: optim.Optimizer, loss_fn: LossFn, get_batch: Callable[[int], tuple], cfg: TrainConfig,
          out: Path, adapter_cfg: dict, pos: Position, *, evaluate: Callable[[], dict] | None = None,
          on_report: Callable[[dict], None] | None = None, mean_over: str = "sequences") -> Position:
    """Run optimizer steps pos.step+1 .. cfg.iters, checkpointing and reporting as configured.

    `get_batch(k)` returns the arrays of this process's share of training batch k (`local_batch`; all of it in
    one process), or a list of them for slices of it, which run on parallel CPU streams and are combined by
    `combine_parts` (the same step up to float rounding). `loss_fn(model, *batch)` returns a scalar loss and
    a dict of scalar metrics (`tokens`: non-padding tokens, `sequences` and `examples` are summed, the rest
    averaged per step). The loss is a mean over the metric `mean_over` (SFT: `loss_tokens`, DPO: `examples`):
    with several processes each share's gradient is weighted by it, so the step is the one-process step on
    the whole batch. Each step is appended to OUT/metrics.jsonl (rank 0) and passed to `on_report` with the
    values of the whole batch. A NaN/inf loss raises NonFiniteLoss before anything is saved, so the last checkpoint stays good.
    """
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    accum = cfg.grad_accumulation
    state = [model.state, optimizer.state, mx.random.state]
    spread = D.size() > 1
    _check_same_position(pos)

    def apply(loss, metrics, grad, keep, prev_grad, do_update):
        if spread:  # this share's part of the gradient of the whole batch's mean loss
            weight = keep * metrics[mean_over]
            share = weight / D.all_sum(weight)
            grad = tree_map(lambda g: g * share, grad)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            if spread:
                grad = D.all_sum_tree(grad)
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

    writer = records.writer(out / "metrics.jsonl", D.is_main(), sync=False)
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
                if D.is_main() and (pos.step % cfg.steps_per_save == 0 or pos.step == cfg.iters):
                    last_saved = save_checkpoint(out, pos, model, optimizer, adapter_cfg, cfg.keep_checkpoints)
        finally:
            writer.close()
    if D.is_main():
        save_adapter(model, out, adapter_cfg)
    return pos


def _check_same_position(pos: Position) -> None:
    """Every process must resume from the same checkpoint, i.e. see the same output folder."""
    seen = {tuple(p) for p in D.gather([pos.step, pos.batches])}
    if len(seen) > 1:
        raise TrainingError(f"the processes would resume from different steps ({sorted(s for s, _ in seen)}): to "
                            "resume a run on several hosts, the output folder must be shared by all of them")


def _whole_batch_metrics(row: dict[str, float], keep: float, mean_over: str) -> dict[str, float]:
    """One process's metrics of its share -> those of the whole batch: counts summed, means weighted by
    `mean_over` (what they are means over); grad_norm is already that of the combined gradient."""
    keys = sorted(row)
    weight = keep * row[mean_over]
    local = [keep * row[k] if k in COUNTS else 0.0 if k == "grad_norm" else weight * row[k] for k in keys]
    total = np.array(D.all_sum(mx.array(local + [weight], dtype=mx.float32))).tolist()
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
    processes, each evaluates its share of the batches (`local_batches`) and the sums are combined."""
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
    if D.size() > 1:
        keys = sorted(sums)
        total = np.array(D.all_sum(mx.array([sums[k] for k in keys] + [weight], dtype=mx.float32))).tolist()
        sums, weight = dict(zip(keys, total)), total[-1]
    return {f"{prefix}{k}": v / weight for k, v in sums.items()} if weight else {}
