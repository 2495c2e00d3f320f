"""LoRA/DoRA adapters, one home for them: adding fresh layers (mlx-lm's `linear_to_lora_layers`), loading an
adapter folder onto a base model after checking it was made for that base, and saving one.

An adapter folder is mlx-lm's format: adapters.safetensors (the trainable leaves) + adapter_config.json,
which here also records the base model's shape (`base_model`), so an adapter for another base is refused
with one line, and the size and sha256 of the weights (`weights`), so a torn or changed weights file is refused
with one line too. Reads and writes those two files.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_cai import records
from mlx_cai.train.config import TrainConfig, TrainingError

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # trainable leaves of LoRA / DoRA layers (mlx-lm)


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


def trainable_count(model) -> int:
    """Number of trainable parameters of `model`."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def _trainable_count(model, keys) -> int:
    count = trainable_count(model)
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
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrainingError(f"{cfg_path}: malformed JSON ({e.msg})") from None
    damage = records.damage(path / ADAPTER_FILE, config["weights"]) if isinstance(config.get("weights"), dict) else None
    if damage:
        raise TrainingError(f"adapter {path} is damaged: {damage} (written torn, cut or changed since); rerun "
                            "the training that wrote it")
    return config


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
    except RuntimeError as e:  # MLX could not read the weights (an adapter without a recorded digest)
        raise TrainingError(f"adapter {path}: {ADAPTER_FILE} does not load ({str(e).splitlines()[0]})") from None
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


def save_adapter(model, folder: Path, config: dict) -> dict:
    """adapters.safetensors (the trainable parameters) + adapter_config.json (`config` and the weights' digest),
    each written atomically. Returns the adapter config written."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    written = {**config, "weights": records.save_safetensors_atomic(Path(folder) / ADAPTER_FILE, weights)}
    records.write_json_atomic(Path(folder) / ADAPTER_CONFIG, written)
    return written
