"""Fusing adapters into standalone MLX models that mlx_lm loads, float and quantized bases."""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_map
from typer.testing import CliRunner

from mlx_cai import adapters, models
from mlx_cai.cli import app
from mlx_cai import fuse
from mlx_cai.stages.sft import SFTConfig
from mlx_cai.train.config import TrainingError


def make_adapter(base: str, folder, dora: bool = False):
    """An adapter with non-zero LoRA weights on both blocks (made without training)."""
    model, _ = models.load(base)
    cfg = SFTConfig(model=base, data="-", output="-", lora_layers=2, dora=dora)
    mx.random.seed(2)
    adapters.add_lora(model, cfg)
    model.update(tree_map(lambda p: p + mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    adapters.save_adapter(model, folder, adapters.adapter_config(cfg, model, "sft/1"))
    return folder


def logits(model, tok):
    return model(mx.array([tok.encode("say cat, then say dog")]))


@pytest.mark.parametrize("dora", [False, True])
def test_fused_model_loads_in_mlx_lm_and_matches_the_adapter_model(tiny_gguf, tmp_path, dora):
    adapter = make_adapter(str(tiny_gguf), tmp_path / "adapter", dora=dora)
    out = fuse.run(fuse.FuseConfig(model=str(tiny_gguf), adapter=str(adapter), output=str(tmp_path / "fused")))
    fused, tok = mlx_lm.load(str(out))
    with_adapter, _ = models.load(str(tiny_gguf), adapter=adapter)
    assert mx.allclose(logits(fused, tok), logits(with_adapter, tok), atol=1e-4).item()
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert not any("lora" in k for k in mx.load(str(out / "model.safetensors")))
    text = mlx_lm.generate(fused, tok, "hello", max_tokens=4)
    assert isinstance(text, str)
    again, _ = models.load(str(out))  # a fused folder is a model spec like any other
    assert mx.allclose(logits(again, tok), logits(fused, tok), atol=1e-5).item()


def test_quantized_base_stays_quantized_or_is_dequantized(tiny_gguf, tmp_path):
    from tinymodels import write_tiny_gguf

    q8 = tmp_path / "tiny-q8.gguf"
    write_tiny_gguf(q8, {"blk.": gguf.GGMLQuantizationType.Q8_0})
    adapter = make_adapter(str(tiny_gguf), tmp_path / "adapter")  # same shapes: adapters move between them
    kept = fuse.run(fuse.FuseConfig(model=str(q8), adapter=str(adapter), output=str(tmp_path / "q")))
    assert json.loads((kept / "config.json").read_text())["quantization"]["bits"] == 8
    deq = fuse.run(fuse.FuseConfig(model=str(q8), adapter=str(adapter), output=str(tmp_path / "f"), dequantize=True))
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    ref, tok = models.load(str(q8), adapter=adapter, dequantize_weights=True)
    dense, _ = mlx_lm.load(str(deq))
    quant, _ = mlx_lm.load(str(kept))
    assert mx.allclose(logits(dense, tok), logits(ref, tok), atol=1e-4).item()
    a, b = logits(quant, tok), logits(ref, tok)  # one more 8-bit rounding of the fused weights
    assert (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item() < 0.05


def test_fuse_errors_and_cli(tiny_gguf, tmp_path):
    adapter = make_adapter(str(tiny_gguf), tmp_path / "adapter")
    with pytest.raises(TrainingError, match="not an adapter folder"):
        fuse.run(fuse.FuseConfig(model=str(tiny_gguf), adapter=str(tmp_path), output=str(tmp_path / "x")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(TrainingError, match="not empty"):
        fuse.run(fuse.FuseConfig(model=str(tiny_gguf), adapter=str(adapter), output=str(tmp_path / "busy")))
    r = CliRunner().invoke(app, ["fuse", "-m", str(tiny_gguf), "--adapter", str(adapter), "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "model.safetensors").exists()
    r = CliRunner().invoke(app, ["fuse", "-m", str(tiny_gguf), "--adapter", str(tmp_path / "nope"), "-o",
                                 str(tmp_path / "d")])
    assert r.exit_code == 1 and "error:" in r.output


def test_an_interrupted_fuse_leaves_no_half_model_and_can_be_rerun(tiny_gguf, tmp_path, monkeypatch):
    import mlx_lm.utils

    adapter = make_adapter(str(tiny_gguf), tmp_path / "adapter")
    real_save = mlx_lm.utils.save

    def save_then_die(path, *a, **kw):
        real_save(path, *a, **kw)
        assert (path / "model.safetensors").exists()  # the weights were written (beside OUT) ...
        raise KeyboardInterrupt  # ... and the process is stopped before the fuse finished

    monkeypatch.setattr(mlx_lm.utils, "save", save_then_die)
    out = tmp_path / "fused"
    with pytest.raises(KeyboardInterrupt):
        fuse.run(fuse.FuseConfig(model=str(tiny_gguf), adapter=str(adapter), output=str(out)))
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "adapter"]
    monkeypatch.setattr(mlx_lm.utils, "save", real_save)
    out.mkdir()  # an empty folder is fine too
    fuse.run(fuse.FuseConfig(model=str(tiny_gguf), adapter=str(adapter), output=str(out)))
    assert json.loads((out / "mlx-cai-fused.json").read_text())["fused_layers"] > 0
    mlx_lm.load(str(out))
