"""Memory before the run: the budget of this device, model shapes read without loading weights, the pre-flight
check of `mlx-cai run` and of every training and generation command, the rows of `run --dry-run`, and on Metal
MLX's wired and cache limits. The arithmetic is mlx_cai.memplan; this module does the reading.

Reads a model's config.json (an MLX folder, a converted embedded model, a Hub repo's cached or fetched
config.json: a few KB) or a GGUF's metadata and tensor table (mlx_cai.ggufread: no tensor data). Writes nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx

from mlx_cai import memplan
from mlx_cai.memplan import GB, Estimate

# What an MLX quantized GGUF tensor becomes (mlx_cai.gguf): bits of its affine triple, group 32. Others (Q6_K,
# F16, F32) are dense.
GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_K": 5, "Q8_0": 8}
CACHE_FLOOR = 256 * 2**20  # the allocator keeps at least this much of its free-buffer cache (Metal)


class MemoryBudgetError(ValueError):
    """A stage that cannot fit the memory budget; one line naming the setting to lower."""


def device_budget() -> float:
    """Bytes a run may use here: Metal's recommended working set (what the GPU can keep resident), a CUDA
    device's memory where MLX reports it, else the machine's RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return float(info[key])
    return float(backend.ram_bytes())


def budget(gb: float | None) -> float:
    """--memory-budget GB in bytes, or the device's budget when not given."""
    if gb is not None and gb <= 0:
        raise MemoryBudgetError(f"--memory-budget must be > 0 GB, got {gb}")
    return gb * GB if gb is not None else device_budget()


def _local_spec(spec: str) -> str | None:
    """The model of a backend spec (local:MODEL::ADAPTER or MODEL), or None for an API backend."""
    if spec.startswith("openai:"):
        return None
    return spec.removeprefix("local:").partition("::")[0]


def model_config(spec: str) -> dict | None:
    """The config.json of a model spec (see mlx_cai.models), without loading weights or converting anything;
    None when it cannot be read so cheaply (an embedded model not installed, a Hub repo offline)."""
    from mlx_cai import embedded, models

    name = _local_spec(spec)
    if name is None:
        return None
    try:
        if name in embedded.MODELS:
            converted = models.models_dir() / name / "config.json"
            if converted.is_file():
                return _read_json(converted)
            gguf = embedded.gguf_path(name, assemble=False)
            return gguf_config(gguf) if gguf.is_file() else None
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            return gguf_config(path)
        if path.is_dir():
            return _read_json(path / "config.json")
        if name.count("/") == 1 and not name.startswith((".", "/", "~")):
            return _hub_config(name)
    except (OSError, ValueError, KeyError):
        return None
    return None


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def _hub_config(repo: str) -> dict | None:
    """A Hub repo's config.json: from the local cache, else fetched alone (a few KB)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return _read_json(Path(cached))
    try:
        return _read_json(Path(hf_hub_download(repo, "config.json")))
    except Exception:  # offline, gated, missing: the estimate is then unknown, not an error
        return None


def gguf_config(path: Path) -> dict:
    """The mlx-lm config a GGUF converts to (mlx_cai.gguf.model_config), from its metadata and tensor table."""
    from mlx_cai import ggufread
    from mlx_cai.gguf import map_name, model_config as config_of

    table = ggufread.GGUFFile(path)
    shapes = {map_name(n): SimpleNamespace(shape=t.shape) for n, t in table.tensors.items()}
    quant = {map_name(n)[: -len(".weight")]: {"group_size": 32, "bits": GGUF_BITS[t.type]}
             for n, t in table.tensors.items() if t.type in GGUF_BITS and n.endswith(".weight")}
    return config_of(table.metadata, shapes, quant)


def shape_of(spec: str, dequantize: bool | None = None) -> memplan.ModelShape | None:
    """The memory-relevant shape of a model spec as it will be loaded here (quantized weights dequantized on
    the CPU, see mlx_cai.models.should_dequantize), or None (module docstring)."""
    from mlx_cai import models

    config = model_config(spec)
    if config is None or "hidden_size" not in config:
        return None
    quantized = bool(config.get("quantization") or config.get("quantization_config"))
    try:
        return memplan.ModelShape.from_config(config, dequantize=quantized and models.should_dequantize(dequantize))
    except (KeyError, TypeError, ValueError):
        return None


def context(stage: str, name: Callable[[str], str], model: str | None = None) -> memplan.Context:
    """A memplan.Context for this device: the CPU kernels' weight copies where they run (their RAM shares)."""
    from mlx_cai import fastllama, fastmath, kernels
    from mlx_cai.settings import settings

    ram = backend.ram_bytes()
    on_kernels = kernels.enabled()
    train_limit = fastmath.PACKED_TRAIN_SHARE * ram if on_kernels and settings().packed_train else 0.0
    return memplan.Context(stage, functools.lru_cache(maxsize=None)(shape_of), name, model,
                           train_copy_limit=train_limit,
                           decode_copy_limit=fastllama.PACK_MEMORY_SHARE * ram if on_kernels else 0.0,
                           fused_attention=backend.default_device() == "gpu")


def flag(field: str) -> str:
    """How a stage command names a setting: --batch-size."""
    return "--" + field.replace("_", "-")


def stage_estimate(cfg, ctx: memplan.Context) -> Estimate | None:
    """The peak of a stage config (its `memory` method), or None for a stage that loads no local model."""
    memory = getattr(cfg, "memory", None)
    return memory(ctx) if memory else None


def run_estimates(run_cfg, stages: list[str]) -> list[tuple[str, Estimate | None]]:
    """Each stage's peak in a `mlx-cai run`, settings named as in its YAML (sft.batch_size)."""
    from mlx_cai import pipeline
    from mlx_cai.stages import REGISTRY

    out = []
    for stage in stages:
        section = REGISTRY[stage].section
        ctx = context(stage, lambda f, s=section: f"{s}.{f}", run_cfg.model)
        out.append((stage, stage_estimate(pipeline.stage_config(run_cfg, stage), ctx)))
    return out


def check(estimates: list[tuple[str, Estimate | None]], limit: float) -> None:
    """Raise MemoryBudgetError with the first stage that cannot fit `limit` bytes; else set the Metal limits."""
    for _, est in estimates:
        line = memplan.refusal(est, limit) if est else None
        if line:
            raise MemoryBudgetError(line)
    peaks = [est.total for _, est in estimates if est]
    if peaks:
        set_metal_limits(limit, max(peaks))


def rows(estimates: list[tuple[str, Estimate | None]], limit: float) -> list[list]:
    """The --dry-run table: stage, estimated peak, share of the budget, its largest items (GB), fits."""
    out = []
    for stage, est in estimates:
        if est is None:
            out.append([stage, "-", "-", "no local model, or its config is not readable yet", ""])
            continue
        out.append([stage, f"{est.total / GB:.2f} GB", f"{est.total / limit:.0%}", memplan.biggest(est),
                    "yes" if est.total <= limit else "NO"])
    return out


def set_metal_limits(limit: float, peak: float) -> None:
    """On Metal, as mlx-lm does for large models: wire the recommended working set, so the weights stay resident
    between steps (mlx_lm.utils.maybe_set_recommended_wired_limit, called by mlx_lm.tuner.trainer.train and
    mlx_lm.generate.wired_limit: mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])). And
    keep the allocator's cache of freed buffers within what the budget leaves above the estimated peak (mlx-lm
    clears that cache between prefill chunks and steps instead: mx.clear_cache, clear_cache_threshold)."""
    if not mx.metal.is_available():
        return
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended:
        mx.set_wired_limit(int(min(recommended, limit)))
    mx.set_cache_limit(int(max(limit - peak, CACHE_FLOOR)))
