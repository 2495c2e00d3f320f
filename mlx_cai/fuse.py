"""Fuse a LoRA/DoRA adapter into its base model: a standalone MLX model folder.

Reads the base model (any mlx_cai.models spec) and an adapter folder (sft or dpo output). Writes OUT with
model.safetensors, config.json and the tokenizer files, as `mlx_lm.fuse` does, so `mlx_lm.load(OUT)` and
`mlx_lm.server --model OUT` use it directly, plus mlx-cai-fused.json (what was fused). OUT appears whole or not
at all (written beside it, then renamed).

A quantized base stays quantized (each fused layer is re-quantized with its own bits and group size)
unless `dequantize` is set: then every layer is written in float32 (the form the CPU runs fast; on
Metal/CUDA quantized is smaller and fast).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_cai import backend  # noqa: F401

from mlx.utils import tree_unflatten

from mlx_cai import adapters, records
from mlx_cai.train.config import TrainingError

STAGE = "fuse/1"


@dataclass
class FuseConfig:
    model: str = "smollm2-135m"  # base model spec
    adapter: str = ""  # adapter folder (adapters.safetensors + adapter_config.json)
    output: str = ""  # folder for the fused model
    dequantize: bool = False  # write float32 weights even if the base is quantized

    def __post_init__(self):
        if not self.adapter or not self.output:
            raise TrainingError("fuse needs an adapter folder and an output folder")


def run(config: FuseConfig) -> Path:
    """Write the fused model into config.output; returns it."""
    from mlx_lm.utils import load_model, load_tokenizer, save

    from mlx_cai import models

    cfg = config
    adapters.read_adapter_config(cfg.adapter)  # a clear error before the model loads
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} is not empty; choose a new folder for the fused model")
    src = models.resolve(cfg.model)
    model, model_config = load_model(src)
    if cfg.dequantize and "quantization" in model_config:
        models.dequantize(model)
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)
        # Every weight is float32 now: a config still naming the base's dtype (a 4-bit model's bfloat16) would
        # have the memory estimate (mlx_cai.memplan) and mlx_lm.convert take the fused model for 16-bit.
        for key in ("torch_dtype", "dtype"):
            if key in model_config:
                model_config[key] = "float32"
    adapters.load_adapter(model, cfg.adapter)
    fused = [(name, m.fuse(dequantize=cfg.dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise TrainingError(f"{cfg.adapter} added no fusable layers to {cfg.model}")
    model.update_modules(tree_unflatten(fused))
    tokenizer = load_tokenizer(src, eos_token_ids=model_config.get("eos_token_id"))
    # Written whole or not at all: into a hidden sibling folder, renamed onto OUT once complete (a killed fuse
    # leaves no half model that mlx_lm.load would take for a whole one).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp, src, model, tokenizer, model_config, donate_model=False)
        records.write_json_atomic(tmp / "mlx-cai-fused.json", {"stage": STAGE, **asdict(cfg), "base_path": str(src),
                                                              "fused_layers": len(fused)})
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
