"""GGUF conversion of the qwen2 architecture with K-quant tensors, on a tiny random file written by gguf-py.

Checked: every tensor of the converted folder equals gguf-py's dequantization of the file (Q4_K/Q5_K kept as
exact MLX triples, Q6_K as float32), q/k/v biases arrive, the config is qwen2 (rotary halves), the model loads
and generates; and bad files (other block types, other architectures, a cut file) fail with one line and leave
no folder behind.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from mlx_cai import gguf as converter
from mlx_cai import models
from test_kquants import random_blocks
from tinymodels import _tokenizer_kv, add_shape_kv

import mlx.core as mx

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV, LAYERS = 256, 512, 4, 2, 2


def write_qwen2(path, qtypes: dict[str, str], arch: str = "qwen2", seed: int = 0) -> dict:
    """A random qwen2 GGUF; `qtypes` maps a tensor-name substring to a K-quant type (default F32).
    Returns {gguf name: float32 values per gguf-py's dequantizer}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    vocab = _tokenizer_kv(w)
    add_shape_kv(w, HIDDEN, LAYERS, FFN, HEADS, KV, rope_base=1e6, rms_eps=1e-6)
    kv_dim = HIDDEN // HEADS * KV
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({b + "attn_q.weight": (HIDDEN, HIDDEN), b + "attn_k.weight": (kv_dim, HIDDEN),
                       b + "attn_v.weight": (kv_dim, HIDDEN), b + "attn_q.bias": (HIDDEN,),
                       b + "attn_k.bias": (kv_dim,), b + "attn_v.bias": (kv_dim,),
                       b + "attn_output.weight": (HIDDEN, HIDDEN), b + "ffn_gate.weight": (FFN, HIDDEN),
                       b + "ffn_up.weight": (FFN, HIDDEN), b + "ffn_down.weight": (HIDDEN, FFN),
                       b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,)})
    reference = {}
    for k, (name, shape) in enumerate(shapes.items()):
        qtype = next((t for key, t in qtypes.items() if key in name and len(shape) == 2), "F32")
        if qtype == "F32":
            data = (rng.standard_normal(shape) * 0.05).astype(np.float32) + (len(shape) == 1 and "norm" in name)
            w.add_tensor(name, data)
            reference[name] = data
            continue
        raw = random_blocks(qtype, shape, seed=seed + k)
        rows = raw.reshape(shape[0], -1)
        w.add_tensor(name, rows, raw_shape=rows.shape, raw_dtype=Q[qtype])
        reference[name] = gguf.quants.dequantize(rows, Q[qtype]).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


QTYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "ffn": "Q4_K", "output.weight": "Q6_K",
          "token_embd": "Q4_K"}


def test_qwen2_k_quants_convert_exactly(tmp_path):
    ref = write_qwen2(tmp_path / "q.gguf", QTYPES)
    out = converter.convert(tmp_path / "q.gguf", tmp_path / "mlx")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["rope_traditional"] is False
    assert config["tie_word_embeddings"] is False
    quant = config["quantization"]
    assert quant["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    assert quant["model.layers.0.self_attn.k_proj"] == {"group_size": 32, "bits": 5}
    assert "model.layers.0.self_attn.v_proj" not in quant  # Q6_K: float32, MLX's matmul has no group of 16
    saved = mx.load(str(out / "model.safetensors"))
    for name, want in ref.items():
        target = converter.map_name(name)
        module = target[: -len(".weight")]
        if module + ".scales" in saved:
            q = quant[module]
            got = mx.dequantize(saved[target], saved[module + ".scales"], saved[module + ".biases"], q["group_size"], q["bits"])
        else:
            got = saved[target]
        assert got.dtype == mx.float32 and np.array_equal(np.array(got), want), name


def test_qwen2_model_loads_and_generates(tmp_path):
    write_qwen2(tmp_path / "q.gguf", QTYPES)
    model, tok = models.load(str(tmp_path / "q.gguf"))
    assert type(model).__module__.endswith("qwen2") and "bias" in model.model.layers[0].self_attn.q_proj
    from mlx_cai.generate import generate
    from mlx_cai.sampling import SamplingConfig

    out = generate(model, tok, [[{"role": "user", "content": "hi"}]], SamplingConfig(max_tokens=4))
    assert out[0].completion_tokens >= 1


@pytest.mark.parametrize("case,match", [
    ("q2k", "tensor type\\(s\\) Q2_K are not supported"),
    ("arch", "unsupported GGUF architecture 'gpt2'"),
    ("cut", "truncated"),
])
def test_bad_files_fail_in_one_line_and_leave_nothing(tmp_path, case, match):
    path = tmp_path / "bad.gguf"
    if case == "arch":
        write_qwen2(path, QTYPES, arch="gpt2")
    else:
        write_qwen2(path, QTYPES)
    if case == "q2k":  # retag one tensor as Q2_K: same header layout, a type the converter refuses
        table = converter.ggufread.GGUFFile(path)
        blob = bytearray(path.read_bytes())
        name = b"blk.0.attn_q.weight"
        at = blob.index(name) + len(name)
        n_dims = int.from_bytes(blob[at:at + 4], "little")
        tpos = at + 4 + 8 * n_dims
        assert int.from_bytes(blob[tpos:tpos + 4], "little") == 12 and table.tensors
        blob[tpos:tpos + 4] = (10).to_bytes(4, "little")
        path.write_bytes(bytes(blob))
    if case == "cut":
        path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(converter.GGUFError, match=match) as e:
        converter.convert(path, tmp_path / "mlx")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]
