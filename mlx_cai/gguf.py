"""Convert a llama-architecture GGUF file into an MLX model folder that `mlx_lm.load` reads.

Reads: a `.gguf` file through `mx.load` (Q4_0, Q4_1 and Q8_0 tensors arrive as MLX quantized triples,
F16/F32 as plain arrays). Writes: `model.safetensors`, `config.json`, `tokenizer.json`,
`tokenizer_config.json` into a folder, atomically (built in a temporary sibling, then renamed), so a
crash mid-write never leaves a half model that later loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx

GROUP_SIZE = 32  # every GGUF block quant MLX reads (Q4_0, Q4_1, Q8_0) uses 32-element blocks
COMPLETE_MARKER = "mlx-cai-converted.json"

# llama.cpp names -> mlx-lm llama names (per block and global)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp's names). GPT-2's is the ByteLevel default.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX}


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into an MLX model (message is one line)."""


def _scalar(meta: dict, key: str, default=None):
    if key not in meta:
        if default is None:
            raise GGUFError(f"metadata key '{key}' is missing")
        return default
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def map_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], ".".join(parts[3:])
        if base not in _BLOCK_NAMES:
            raise GGUFError(f"unknown tensor '{name}' for the llama architecture")
        return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{suffix}"
    base, suffix = parts[0], ".".join(parts[1:])
    if base not in _GLOBAL_NAMES:
        raise GGUFError(f"unknown tensor '{name}' for the llama architecture")
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def model_config(meta: dict, weights: dict) -> dict:
    """An mlx-lm llama config.json from GGUF metadata; per-module quantization from tensor shapes."""
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"unsupported GGUF architecture '{arch}': only 'llama' is supported")
    p = f"{arch}."
    heads = int(_scalar(meta, p + "attention.head_count"))
    hidden = int(_scalar(meta, p + "embedding_length"))
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, p + "block_count")),
        "intermediate_size": int(_scalar(meta, p + "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, p + "attention.head_count_kv", heads)),
        "head_dim": int(_scalar(meta, p + "rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_scalar(meta, p + "attention.layer_norm_rms_epsilon")),
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "rope_theta": float(_scalar(meta, p + "rope.freq_base", 10000.0)),
        # llama.cpp stores q/k permuted for the interleaved rotary layout: the weights work unchanged with it.
        "rope_traditional": True,
        "max_position_embeddings": int(_scalar(meta, p + "context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id", 2)),
    }
    quant = {}
    for name, w in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            packed = weights[module + ".weight"]
            bits = packed.shape[-1] * 32 // (w.shape[-1] * GROUP_SIZE)
            quant[module] = {"group_size": GROUP_SIZE, "bits": int(bits)}
    if quant:
        first = next(iter(quant.values()))
        config["quantization"] = {**first, **quant}
    return config


def tokenizer_files(meta: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) contents built from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, Regex

    kind = _scalar(meta, "tokenizer.ggml.model", "?")
    if kind != "gpt2":
        raise GGUFError(
            f"unsupported GGUF tokenizer model '{kind}': only byte-level BPE ('gpt2') tokenizers are supported"
        )
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"unsupported GGUF pre-tokenizer '{pre}' (known: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()] if "tokenizer.ggml.token_type" in meta else []
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    regex = _PRE_TOKENIZERS[pre]
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, t in enumerate(types) if t == 3]  # token_type 3 = control
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    bos = tokens[int(_scalar(meta, "tokenizer.ggml.bos_token_id", 1))]
    eos = tokens[int(_scalar(meta, "tokenizer.ggml.eos_token_id", 2))]
    pad_id = _scalar(meta, "tokenizer.ggml.padding_token_id", -1)
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[int(pad_id)] if pad_id >= 0 else eos,
        "unk_token": None,
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = str(meta["tokenizer.chat_template"])
    return json.loads(tok.to_str()), tok_config


def load_gguf(path: Path) -> tuple[dict, dict]:
    """(weights with mlx-lm names, metadata); raises GGUFError for unsupported files."""
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFError(f"{path}: cannot read GGUF ({msg}); supported tensor types: Q4_0, Q4_1, Q8_0, F16, F32") from None
    try:
        weights = {map_name(k): v for k, v in raw.items()}
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    return weights, meta


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """Convert `gguf_path` into `out_dir` (idempotent; atomic). Returns `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / COMPLETE_MARKER).exists():
        return out_dir
    weights, meta = load_gguf(Path(gguf_path))
    try:
        config = model_config(meta, weights)
        tokenizer_json, tokenizer_config = tokenizer_files(meta)
    except GGUFError as e:
        raise GGUFError(f"{gguf_path}: {e}") from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is ordinary data
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / COMPLETE_MARKER).exists():  # a stale partial folder: replace it
                shutil.rmtree(out_dir, ignore_errors=True)
                os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
