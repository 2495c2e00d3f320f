"""Tiny llama GGUF files written with llama.cpp's own `gguf` Python package, for tests.

`write_tiny_gguf` returns, per tensor, the float32 reference from gguf-py's dequantizer (an independent
implementation of the block formats).
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer_kv(w: "gguf.GGUFWriter") -> int:
    """A byte-level BPE vocab: 3 control tokens, 256 bytes, 2 merges. Returns the vocab size."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = [_bytes_to_unicode()[b] for b in range(256)]
    merges = ["h e", "l l"]
    tokens = control + byte_tokens + ["he", "ll"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(control) + [1] * (len(tokens) - len(control)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return len(tokens)


def add_shape_kv(w, hidden, layers, ffn, heads, kv_heads, rope_base, rms_eps, context=256) -> None:
    """The architecture keys every tiny GGUF writes (the writer's arch prefixes them)."""
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(rms_eps)


def write_tiny_gguf(path, qtypes: dict[str, "gguf.GGMLQuantizationType"], arch: str = "llama", seed: int = 0):
    """A random llama GGUF; `qtypes` maps a tensor-name substring to its type (default F32).
    Returns {gguf tensor name: float32 reference after the format's own quantize+dequantize}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    vocab = _tokenizer_kv(w)
    add_shape_kv(w, HIDDEN, LAYERS, FFN, HEADS, KV_HEADS, rope_base=10000.0, rms_eps=1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    kv_dim = HIDDEN // HEADS * KV_HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({b + "attn_q.weight": (HIDDEN, HIDDEN), b + "attn_k.weight": (kv_dim, HIDDEN),
                       b + "attn_v.weight": (kv_dim, HIDDEN), b + "attn_output.weight": (HIDDEN, HIDDEN),
                       b + "ffn_gate.weight": (FFN, HIDDEN), b + "ffn_up.weight": (FFN, HIDDEN),
                       b + "ffn_down.weight": (HIDDEN, FFN), b + "attn_norm.weight": (HIDDEN,),
                       b + "ffn_norm.weight": (HIDDEN,)})
    reference = {}
    for name, shape in shapes.items():
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            data = 1 + data
        qtype = next((t for key, t in qtypes.items() if key in name and len(shape) == 2), Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
            reference[name] = data
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
            reference[name] = data.astype(np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            reference[name] = gguf.quants.dequantize(packed, qtype).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def write_tiny_mlx_quantized(gguf_path, folder, *, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16"):
    """The tiny llama of `gguf_path` as mlx-community ships quantized models: made by mlx-lm's own converter
    (`mlx_lm.convert`, as for mlx-community/Meta-Llama-3-8B-Instruct-4bit: 4-bit, group 64, bfloat16 scales and
    norms), so config.json has its "quantization" and "torch_dtype" entries and the tokenizer files lie beside
    model.safetensors. Returns `folder`."""
    import json
    import shutil
    from pathlib import Path

    from mlx_lm.convert import convert

    from mlx_cai import models

    folder = Path(folder)
    # The float source in Hugging Face layout, naming its dtype as Meta's config.json does (convert casts to it).
    source = folder.with_name(folder.name + "-float")
    shutil.copytree(models.resolve(str(gguf_path)), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
    convert(str(source), str(folder), quantize=True, q_group_size=group_size, q_bits=bits)
    return folder


def record_loads(monkeypatch=None) -> list:
    """Wrap mlx_cai.models.load (through `monkeypatch` if given, else for good: a job process) so that every model
    it returns is also appended to the returned list: what the stages loaded, to look at after they ran."""
    from mlx_cai import models

    real, loaded = models.load, []

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    (monkeypatch.setattr if monkeypatch else setattr)(models, "load", load)
    return loaded


def layer_census(model) -> dict[str, int]:
    """How many modules of each layer type `model` holds (Linear, QuantizedLinear, LoRALinear, ...)."""
    from collections import Counter

    return dict(Counter(type(m).__name__ for _, m in model.named_modules()))


def close(a, b, tol=1e-4) -> bool:
    """Logits equal to float32 rounding (rtol and atol `tol`)."""
    return np.allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def assert_matches_forward(fast, model, prompts: list[list[int]], steps: int = 2) -> None:
    """A FastRunner's prefill and `steps` decode steps (fixed token ids fed back) give, row by row, the logits of
    the mlx-lm model's own forward pass over the same tokens."""
    import mlx.core as mx

    from mlx_cai.fastllama import FastRunner

    runner = FastRunner(fast, prompts, steps + 2)
    logits = [runner.prefill()]
    ys = [mx.array([(37 * i + 5 + 11 * s) % 250 for i in range(len(prompts))]) for s in range(steps)]
    for y in ys:
        logits.append(runner.step(y))
    for i, p in enumerate(prompts):
        for s, got in enumerate(logits):
            want = model(mx.array([p + [int(y[i]) for y in ys[:s]]]))[0, -1]
            assert close(got[i], want), (i, s)


def randomize(model, seed: int = 0) -> None:
    """Random weights for a tiny mlx-lm model, float32: norms near 1, biases large (qwen2's are in practice; mlx's
    init is ~1/sqrt(in)), the layers large next to the embeddings (else a tied model just repeats its last token)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    keys = iter(mx.random.split(mx.random.key(seed), 64))
    new = []
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            new.append((name, 1 + 0.1 * mx.random.normal(w.shape, key=next(keys))))
        elif name.endswith(".bias"):
            new.append((name, 0.5 * mx.random.normal(w.shape, key=next(keys))))
        else:
            new.append((name, (0.05 if "embed" in name else 0.3) * mx.random.normal(w.shape, key=next(keys))))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def reuse_runs(model, tok, first, second_turns, cfg, monkeypatch) -> tuple[dict, dict]:
    """Conversations carried on (`second_turns(first, answers)`): the second turn's tokens with the PrefixStore on
    (batched and alone) and off equal the generic path's, rows differ, and the store was used only when on.
    Returns the (on, off) counts of the batched runs (prompt tokens prefilled / reused)."""
    from mlx_cai.fastllama import FastLlama
    from mlx_cai.generate import generate

    fast = FastLlama.for_model(model)

    def second(batch_size: int, reuse_mb: str):
        monkeypatch.setenv("MLX_CAI_KV_REUSE_MB", reuse_mb)
        fast.store.entries.clear()
        gens = generate(model, tok, first, cfg, batch_size=8)
        fast.counts.update(prefilled=0, reused=0)
        out = generate(model, tok, second_turns(first, gens), cfg, batch_size=batch_size)
        return [g.tokens for g in out], dict(fast.counts)

    batched, on = second(8, "64")
    alone, on_alone = second(1, "64")
    plain, off = second(8, "0")
    generic = generate(model, tok, second_turns(first, generate(model, tok, first, cfg, batch_size=8,
                                                                use_fast=False)), cfg, batch_size=8, use_fast=False)
    assert len({tuple(t) for t in plain}) > 1  # rows differ (the tiny GGUF llama repeats one token a row)
    assert batched == alone == plain == [g.tokens for g in generic]
    assert off["reused"] == 0 and on["reused"] > 0 and on_alone["reused"] > 0
    return on, off


def add_lora(model, keys: list[str], rank: int = 4, scale: float = 10.0) -> list:
    """LoRA (rank `rank`, nonzero B) on `keys` of both layers of a tiny model; the LoRALinear modules, in order."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    linear_to_lora_layers(model, 2, {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys})
    out = []
    for layer in model.model.layers:  # LoRA B starts at zero: make the adapter do something
        for key in keys:
            lin = layer
            for part in key.split("."):
                lin = getattr(lin, part)
            lin.lora_b = mx.random.normal(lin.lora_b.shape, key=mx.random.key(1 + len(out))) * 0.05
            out.append(lin)
    model.eval()
    mx.eval(model.parameters())
    return out

