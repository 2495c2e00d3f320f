"""Convert a llama or qwen2 GGUF file into an MLX model folder that `mlx_lm.load` reads.

Reads: a `.gguf` file. Files of Q4_0, Q4_1, Q8_0, F16 and F32 tensors go through `mx.load` (the block quants
arrive as MLX quantized triples). Files with K-quant tensors (Q4_K, Q5_K, Q6_K: most GGUFs on the Hub) are read
tensor by tensor (mlx_cai.ggufread, mlx_cai.kquants): Q4_K and Q5_K become MLX 4- and 5-bit triples with group
32, exactly; Q6_K (groups of 16, which MLX's quantized matmul lacks) becomes float32, exactly. Writes: `model.safetensors`, `config.json`, `tokenizer.json`,
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
import numpy as np

from mlx_cai import ggufread, kquants, records

GROUP_SIZE = 32  # every GGUF block quant MLX reads (Q4_0, Q4_1, Q8_0) uses 32-element blocks
COMPLETE_MARKER = "mlx-cai-converted.json"
ARCHITECTURES = ("llama", "qwen2")  # qwen2 = llama + q/k/v biases, rotary halves not interleaved
MX_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # what mx.load reads exactly
K_PATH_TYPES = {"F32", "F16", *kquants.QTYPES}  # what the tensor-by-tensor reader decodes

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
# Qwen2's: like Llama 3's but every digit is its own piece (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2).
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX,
                   "qwen2": _QWEN2_REGEX}
# Normalized to NFC first, as Hugging Face's Qwen2 tokenizer does (transformers applies it to any qwen2 folder
# anyway). llama.cpp does not: the two differ only on text with decomposed accents.
_NFC_PRE = {"qwen2"}


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
            raise GGUFError(f"unknown tensor '{name}' for the llama/qwen2 architectures")
        return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{suffix}"
    base, suffix = parts[0], ".".join(parts[1:])
    if base not in _GLOBAL_NAMES:
        raise GGUFError(f"unknown tensor '{name}' for the llama/qwen2 architectures")
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def model_config(meta: dict, weights: dict, quant: dict | None = None) -> dict:
    """An mlx-lm llama/qwen2 config.json from GGUF metadata. Per-module quantization: `quant` (module ->
    {group_size, bits}) when the reader knows it, else derived from the shapes of 32-element block triples."""
    arch = _scalar(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture '{arch}': supported are {', '.join(ARCHITECTURES)}")
    p = f"{arch}."
    heads = int(_scalar(meta, p + "attention.head_count"))
    hidden = int(_scalar(meta, p + "embedding_length"))
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, p + "block_count")),
        "intermediate_size": int(_scalar(meta, p + "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, p + "attention.head_count_kv", heads)),
        "head_dim": int(_scalar(meta, p + "rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_scalar(meta, p + "attention.layer_norm_rms_epsilon")),
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "rope_theta": float(_scalar(meta, p + "rope.freq_base", 10000.0)),
        # llama.cpp stores llama's q/k permuted for the interleaved rotary layout: the weights work unchanged
        # with it. qwen2 is stored as trained (rotary over halves, llama.cpp's NEOX type).
        "rope_traditional": arch == "llama",
        "max_position_embeddings": int(_scalar(meta, p + "context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id", 2)),
    }
    if quant is not None:
        if quant:
            config["quantization"] = {**next(iter(quant.values())), **quant}
        return config
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
    if pre in _NFC_PRE:
        from tokenizers import normalizers

        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, t in enumerate(types) if t == 3]  # token_type 3 = control
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [tokens[i] for i, t in enumerate(types) if t == 4]  # 4 = user-defined (Qwen's <tool_call>): whole, not special
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

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
        "model_max_length": int(_scalar(meta, f"{_scalar(meta, 'general.architecture', 'llama')}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = str(meta["tokenizer.chat_template"])
    return json.loads(tok.to_str()), tok_config


def load_gguf(path: Path) -> tuple[dict, dict, dict | None]:
    """(weights with mlx-lm names, metadata, per-module quantization or None to derive it); raises GGUFError."""
    try:
        table = ggufread.GGUFFile(path)
    except (ggufread.GGUFReadError, OSError) as e:
        raise GGUFError(f"{path}: cannot read GGUF ({str(e).splitlines()[0]})") from None
    types = table.types()
    if types <= MX_TYPES:
        weights, meta = _load_mx(path)
        return weights, meta, None
    if not types <= K_PATH_TYPES:
        odd = ", ".join(sorted(types - K_PATH_TYPES))
        raise GGUFError(f"{path}: tensor type(s) {odd} are not supported; supported: "
                        f"{', '.join(sorted(MX_TYPES))} files, or files of {', '.join(sorted(K_PATH_TYPES))}")
    try:
        weights, quant = _load_k(table)
    except (GGUFError, kquants.KQuantError) as e:
        raise GGUFError(f"{path}: {e}") from None
    return weights, table.metadata, quant


def _load_mx(path: Path) -> tuple[dict, dict]:
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


def _load_k(table: ggufread.GGUFFile) -> tuple[dict, dict]:
    """Tensor by tensor: K-quants as exact MLX triples where MLX has their group size, else float32."""
    weights, quant = {}, {}
    for name, info in table.tensors.items():
        target = map_name(name)
        raw = table.raw(name)
        if info.type in ("F32", "F16"):
            dtype = np.float32 if info.type == "F32" else np.float16
            weights[target] = mx.array(raw.view(dtype).reshape(info.shape))
            continue
        triple = kquants.to_affine(raw, info.type, info.shape) if target.endswith(".weight") else None
        if triple is None:
            weights[target] = mx.array(kquants.dequantize(raw, info.type, info.shape))
            continue
        wq, scales, biases, bits, group_size = triple
        module = target[: -len(".weight")]
        weights[target], weights[module + ".scales"], weights[module + ".biases"] = (
            mx.array(wq), mx.array(scales), mx.array(biases))
        quant[module] = {"group_size": group_size, "bits": bits}
        mx.eval(weights[target], weights[module + ".scales"], weights[module + ".biases"])
    return weights, quant


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """Convert `gguf_path` into `out_dir` (idempotent; atomic). Returns `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / COMPLETE_MARKER).exists():
        return out_dir
    weights, meta, quant = load_gguf(Path(gguf_path))
    try:
        config = model_config(meta, weights, quant)
        tokenizer_json, tokenizer_config = tokenizer_files(meta)
    except GGUFError as e:
        raise GGUFError(f"{gguf_path}: {e}") from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is ordinary data
    try:
        records.save_safetensors(tmp / "model.safetensors", weights, metadata={"format": "mlx"})  # a full disk: OSError
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
