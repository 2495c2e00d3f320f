"""GGUF -> MLX conversion on tiny GGUF files written here with llama.cpp's own `gguf` Python package.

The reference for every tensor is gguf-py's dequantizer (an independent implementation of the block
formats); our converted, dequantized MLX weights must equal it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import mlx.core as mx  # noqa: E402

from mlx_cai import gguf as conv  # noqa: E402
from mlx_cai import models  # noqa: E402

from tinymodels import KV_HEADS, Q, _flatten, write_tiny_gguf  # noqa: E402


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_CAI_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32])
def test_quant_types_convert_to_reference_weights(home, qtype):
    path = home / "tiny.gguf"
    ref = write_tiny_gguf(path, {"ffn_": qtype, "attn_q": qtype, "token_embd": qtype})
    model, tok = models.load(str(path), dequantize_weights=True)
    params = dict(_flatten(model.parameters()))
    for gname, expected in ref.items():
        got = np.array(params[conv.map_name(gname)].astype(mx.float32))
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 if qtype == Q.F16 else 1e-5, err_msg=gname)
    assert model.mlx_cai_info.dequantized == (qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0))
    out = model(mx.array([[5, 6, 7]]))
    assert out.shape == (1, 3, len(tok.vocab)) and bool(mx.isfinite(out).all())


def test_quantized_weights_stay_quantized_when_asked(home):
    path = home / "tiny.gguf"
    write_tiny_gguf(path, {"ffn_": Q.Q4_0, "token_embd": Q.Q8_0})
    model, _ = models.load(str(path), dequantize_weights=False)
    import mlx.nn as nn

    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert model.model.layers[0].mlp.gate_proj.bits == 4
    assert model.model.embed_tokens.bits == 8  # bits derived per tensor from the shapes
    assert not model.mlx_cai_info.dequantized


def test_config_and_tokenizer_from_metadata(home):
    path = home / "tiny.gguf"
    write_tiny_gguf(path, {})
    folder = models.resolve(str(path))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_key_value_heads"] == KV_HEADS and cfg["rope_traditional"] is True
    assert cfg["tie_word_embeddings"] is True  # no output.weight in the file
    _, tok = models.load(str(path))
    ids = tok.encode("hello", add_special_tokens=False)
    # byte-level BPE with merges "h e" and "l l": h e l l o -> he, ll, o
    assert [tok.decode([i]) for i in ids] == ["he", "ll", "o"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[0] == 1 and 2 in chat  # <|im_start|> ... <|im_end|> are single special tokens
    assert tok.eos_token_ids == {2}


def test_conversion_is_idempotent_and_ignores_partial_folders(home):
    path = home / "tiny.gguf"
    write_tiny_gguf(path, {})
    target = models.models_dir() / models._gguf_cache_name(path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a crash left a half folder: no completion marker
    folder = models.resolve(str(path))
    assert folder == target and (folder / conv.COMPLETE_MARKER).exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve(str(path)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_unsupported_quant_type_is_a_clear_error(home):
    path = home / "q5.gguf"
    write_tiny_gguf(path, {"ffn_": Q.Q5_0})
    with pytest.raises(models.ModelError.__mro__[1]) as e:  # GGUFError and ModelError are ValueErrors
        models.load(str(path))
    assert "q5.gguf" in str(e.value) and "Q4_0" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture_is_a_clear_error(home):
    path = home / "other.gguf"
    write_tiny_gguf(path, {}, arch="gpt2")
    with pytest.raises(conv.GGUFError, match="unsupported GGUF architecture 'gpt2'"):
        models.load(str(path))
