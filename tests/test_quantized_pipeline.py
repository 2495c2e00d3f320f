"""The Mac's main path on the CPU: the whole `mlx-cai run` on a tiny 4-bit MLX model kept quantized (QLoRA).

On a Mac mlx-community/Meta-Llama-3-8B-Instruct-4bit stays 4-bit through every stage; on the CPU models are
dequantized on load unless MLX_CAI_DEQUANTIZE=0. Here the tiny random llama, quantized by mlx-lm's own converter
the way that model was (4-bit, group 64, bfloat16), runs the pipeline with MLX_CAI_DEQUANTIZE=0: one run is
stopped in SFT after a checkpoint and continued by `mlx-cai run`, and every model the stages loaded is looked at
afterwards (quantized layers, LoRA over them, only LoRA weights trained). Then fuse (kept 4-bit and
--dequantize) and SFT on 2 processes reuse that run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from typer.testing import CliRunner

from mlx_cai import adapters, memcheck, models, pipeline
from mlx_cai.cli import app
from mlx_cai.stages import dpo
from mlx_cai.train import checkpoint
from test_distributed import _launch, needs_ring
from test_pipeline import tiny_config
from tinymodels import LAYERS, layer_census, record_loads

BITS, GROUP = 4, 64
LINEARS = 7 * LAYERS  # q, k, v, o, gate, up, down per block


def run_config(root: Path, model: str) -> dict:
    """test_pipeline's tiny run as configs/llama3-8b.yaml trains (gradient checkpointing, accumulated batches),
    with an SFT long enough to stop after its step-2 checkpoint, learning rates that move the adapters (fuse must
    show them) and RLAIF feedback: the 4-bit SFT policy samples, the 4-bit base judges by its (A)/(B) log-probs."""
    cfg = tiny_config(root, model)
    recipe = dict(grad_checkpoint=True, grad_accumulation=2, learning_rate=1e-3, warmup_steps=0)
    cfg["sft"].update(iters=4, steps_per_save=2, steps_per_eval=4, lora_layers=LAYERS, **recipe)
    cfg["dpo"].update(**recipe)
    cfg["feedback"] = {"mode": "logprob", "prompts": "train:harmful", "limit": 3, "ensemble": 1, "max_tokens": 6,
                       "batch_size": 4, "min_margin": 0.0, "max_similarity": 1.0, "max_repetition": 1.0}
    return cfg


def quantized_only(model) -> bool:
    """Every linear layer of `model` is 4-bit (some wrapped in LoRA) and none is dense: kept quantized."""
    census = layer_census(model)
    return census.get("QuantizedLinear") == LINEARS and "Linear" not in census and \
        census.get("QuantizedEmbedding") == 1 and \
        all((m.bits, m.group_size) == (BITS, GROUP) for _, m in model.named_modules()
            if isinstance(m, nn.QuantizedLinear))


def weights(folder: Path, name: str = adapters.ADAPTER_FILE) -> dict:
    return dict(mx.load(str(folder / name)))


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


def cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def keep_quantized():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_CAI_DEQUANTIZE", "0")
        # Training splits each batch over 2 CPU streams here whatever the load (by default one per BLAS thread,
        # which the load decides at import): the halves the two ranks of the two-process test compute. With one
        # stream the bfloat16 model summed in another order and its adapter moved ~1e-3 after Adam's steps.
        mp.setenv("MLX_CAI_TRAIN_STREAMS", "2")
        yield mp


@pytest.fixture(scope="module")
def run(tiny_mlx_q4, keep_quantized, tmp_path_factory):
    """The pipeline stopped at SFT step 3 (after the step-2 checkpoint), then continued by `mlx-cai run`."""
    root = tmp_path_factory.mktemp("qrun")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(root, str(tiny_mlx_q4))))
    cfg = pipeline.load_config(config)
    loads = record_loads(keep_quantized)

    def stop_at_step_3(event):
        if (event.metrics or {}).get("step") == 3 and "loss" in event.metrics:
            raise KeyboardInterrupt  # what Ctrl-C does between two checkpoints

    hooks = pipeline.Hooks(progress=lambda stage: contextlib.nullcontext(stop_at_step_3 if stage == "sft" else None))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, hooks=hooks)
    sft_dir = cfg.run_dir / "sft"
    stopped = SimpleNamespace(checkpoint=checkpoint.latest_checkpoint(sft_dir).name,
                              adapter=(sft_dir / adapters.ADAPTER_FILE).exists(), loads=len(loads))
    cli("run", str(config))
    rerun = loads[stopped.loads:]
    # The fits' models (sft, then dpo) are the loads without an adapter argument that training gave LoRA layers.
    trained = [m for m in rerun if m.mlx_cai_info.adapter is None and "LoRALinear" in layer_census(m)]
    return SimpleNamespace(cfg=cfg, dir=cfg.run_dir, stopped=stopped, loads=loads, rerun=rerun, trained=trained)


@pytest.fixture(scope="module")
def straight_sft(run, tmp_path_factory):
    """The run's SFT, uninterrupted, in one fresh process (its resolved config.yaml through `mlx-cai sft -c`), with
    the two-process run's BLAS threads and keep_quantized's 2 training streams."""
    out = tmp_path_factory.mktemp("straight") / "sft"
    p = subprocess.run([sys.executable, "-m", "mlx_cai", "sft", "-c", str(run.dir / "sft" / "config.yaml"), "-o",
                        str(out), "--no-resume"], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "MLX_CAI_BLAS_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def test_the_tiny_model_is_mlx_lm_4bit_and_loads_quantized_only_when_asked(tiny_mlx_q4):
    config = json.loads((tiny_mlx_q4 / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (BITS, GROUP)
    assert {p.name for p in tiny_mlx_q4.iterdir()} >= {"model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    model, tok = models.load(str(tiny_mlx_q4), dequantize_weights=False)
    assert quantized_only(model) and not model.mlx_cai_info.dequantized
    assert model.model.embed_tokens.scales.dtype == mx.bfloat16
    assert tok.encode("hello")  # a real tokenizer
    dense, _ = models.load(str(tiny_mlx_q4))  # this CPU's default: dequantized to float32
    assert "QuantizedLinear" not in layer_census(dense) and dense.mlx_cai_info.dequantized


def test_every_stage_loaded_the_model_quantized(run):
    assert run.stopped.loads >= 2 and len(run.rerun) >= 5  # revise (+ clean) before the stop; sft, dpo, 3 evals
    for model in run.loads:
        assert not model.mlx_cai_info.dequantized, model.mlx_cai_info
        assert quantized_only(model), (model.mlx_cai_info, layer_census(model))
    adapters_seen = {m.mlx_cai_info.adapter for m in run.rerun}
    assert {str(run.dir / "sft"), str(run.dir / "dpo")} <= adapters_seen  # eval-sft and eval-dpo
    assert len(run.trained) == 2


def test_qlora_sft_trains_only_lora_weights_over_the_4bit_layers(run, tiny_mlx_q4):
    model = run.trained[0]
    loras = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(loras) == LINEARS and all(isinstance(m.linear, nn.QuantizedLinear) for m in loras)
    trained = dict(tree_flatten(model.trainable_parameters()))
    assert trained and all(k.endswith((".lora_a", ".lora_b")) for k in trained)
    saved = weights(run.dir / "sft")
    assert saved.keys() == trained.keys()
    assert all(mx.abs(v).max().item() > 0 for k, v in saved.items() if k.endswith("lora_b"))  # moved from zero
    # The frozen 4-bit base is the file's, bit for bit, after training (packed weights, scales, biases).
    base = weights(tiny_mlx_q4, "model.safetensors")
    held = {k.replace(".linear.", "."): v for k, v in tree_flatten(model.parameters()) if ".lora_" not in k}
    assert held.keys() == base.keys()
    assert all(mx.array_equal(held[k], base[k]).item() for k in base)
    assert all(math.isfinite(r["loss"]) for r in metric_rows(run.dir / "sft"))


def test_a_stopped_qlora_sft_continues_from_its_checkpoint(run, straight_sft):
    assert (run.stopped.checkpoint, run.stopped.adapter) == ("step-0000002", False)
    summary = json.loads((run.dir / "sft" / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (2, 4)
    assert [r["step"] for r in metric_rows(run.dir / "sft")] == [1, 2, 3, 4]  # the stopped step 3 redone once
    a, b = weights(run.dir / "sft"), weights(straight_sft)
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k


def test_dpo_stores_the_quantized_sft_models_reference_logps(run, tiny_mlx_q4):
    cfg = pipeline.stage_config(run.cfg, "dpo")
    stored = {r["id"]: r for r in map(json.loads, (run.dir / "dpo" / "ref_logps.jsonl").read_text().splitlines())}
    ref, tok = models.load(str(tiny_mlx_q4), adapter=run.dir / "sft", dequantize_weights=False)
    base, _ = models.load(str(tiny_mlx_q4), dequantize_weights=False)
    pairs, _ = dpo.tokenize(tok, dpo.read_pairs(cfg.pairs)[0], cfg)
    assert len(pairs) == len(stored) >= 2
    for p in pairs:  # the full forward pass, one sequence at a time: not the stage's head-split batches
        for side, answer in (("chosen", p.chosen), ("rejected", p.rejected)):
            want, untrained = (answer_logp(m, p.prompt, answer) for m in (ref, base))
            assert stored[p.id][f"{side}_tokens"] == len(answer)
            assert stored[p.id][side] == pytest.approx(want, abs=0.05), (p.id, side)
            assert abs(untrained - want) > 0.5  # the reference is the SFT model, not the base
    rows = metric_rows(run.dir / "dpo")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts at the stored reference
    assert all(math.isfinite(r["loss"]) for r in rows)
    policy = run.trained[1]
    assert all(isinstance(m.linear, nn.QuantizedLinear) for _, m in policy.named_modules() if isinstance(m, LoRALinear))
    a, b = weights(run.dir / "dpo"), weights(run.dir / "sft")
    assert a.keys() == b.keys() and any(not mx.allclose(a[k], b[k]).item() for k in a)  # DPO moved the adapter


def answer_logp(model, prompt: list[int], answer: list[int]) -> float:
    tokens = prompt + answer
    logits = model(mx.array([tokens[:-1]]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(logp[t - 1, tokens[t]].item() for t in range(len(prompt), len(tokens)))


def test_feedback_and_eval_ran_on_the_quantized_models(run):
    pairs = [json.loads(x) for x in (run.dir / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["mode"] == "logprob" and p["chosen"] != p["rejected"] for p in pairs)
    assert all(0 < v for p in pairs for vote in p["votes"] for v in vote.values())  # the 4-bit judge's (A)/(B)
    policy, judge = (p.split("local:", 1)[1] for p in (pairs[0]["provenance"]["policy"],
                                                       pairs[0]["provenance"]["feedback"]))
    assert (policy, judge) == (f"{run.cfg.model}::{run.dir / 'sft'}", run.cfg.model)
    for name, adapter in (("base", None), ("sft", run.dir / "sft"), ("dpo", run.dir / "dpo")):
        summary = json.loads((run.dir / "eval" / name / "summary.json").read_text())
        assert {s: summary["suites"][s]["n"] for s in ("harm", "benign")} == {"harm": 2, "benign": 2}
        recs = [json.loads(x) for x in (run.dir / "eval" / name / "harm.jsonl").read_text().splitlines()]
        assert all(r["completion_tokens"] > 0 and r["adapter"] == (str(adapter) if adapter else None) for r in recs)
    assert (run.dir / "final").resolve() == (run.dir / "dpo").resolve()


def test_fuse_keeps_the_4bit_base_quantized(run, tiny_mlx_q4, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", "-m", str(tiny_mlx_q4), "--adapter", str(run.dir / "final"), "-o", str(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (BITS, GROUP)
    fused, tok = mlx_lm.load(str(out))
    assert quantized_only(fused) and "LoRALinear" not in layer_census(fused)  # re-quantized, adapter gone
    with_adapter, _ = models.load(str(tiny_mlx_q4), adapter=run.dir / "final", dequantize_weights=False)
    base, _ = models.load(str(tiny_mlx_q4), dequantize_weights=False)
    x = mx.array([tok.encode("say cat, then say dog")])
    target = with_adapter(x).astype(mx.float32)
    off = lambda m: (mx.linalg.norm(m(x).astype(mx.float32) - target) / mx.linalg.norm(target)).item()  # noqa: E731
    assert off(fused) < 0.5 * off(base)  # the adapter is in (one more 4-bit rounding of each fused layer)


def test_fuse_dequantize_writes_a_float32_model(run, tiny_mlx_q4, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", "-m", str(tiny_mlx_q4), "--adapter", str(run.dir / "final"), "-o", str(out), "--dequantize")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert {v.dtype for v in weights(out, "model.safetensors").values()} == {mx.float32}
    # The config names the dtype written, not the base's bfloat16: what the memory estimate reads (it took the
    # fused model for 16-bit, half its size).
    assert config["torch_dtype"] == "float32"
    shape = memcheck.shape_of(str(out))
    assert (shape.weight_bits, shape.act_bytes) == (32, 4)
    fused, tok = mlx_lm.load(str(out))
    census = layer_census(fused)
    assert census.get("Linear") == LINEARS and "QuantizedLinear" not in census and "LoRALinear" not in census
    ref, _ = models.load(str(tiny_mlx_q4), adapter=run.dir / "final", dequantize_weights=True)
    x = mx.array([tok.encode("say cat, then say dog")])
    assert mx.allclose(fused(x), ref(x), atol=1e-4).item()


@needs_ring
def test_qlora_sft_on_two_processes_keeps_the_model_quantized_and_gives_the_one_process_adapter(
        run, straight_sft, tmp_path):
    out = tmp_path / "two" / "sft"
    output = _launch([["sft", "-c", str(run.dir / "sft" / "config.yaml"), "-o", str(out), "--no-resume"]],
                     "--report-loads")
    loaded = [json.loads(line.split("loaded: ", 1)[1]) for line in output.splitlines() if "loaded: " in line]
    assert sorted(r["rank"] for r in loaded) == [0, 1], output
    for r in loaded:
        assert not r["dequantized"] and r["layers"].get("QuantizedLinear") == LINEARS, r
        assert r["layers"].get("LoRALinear") == LINEARS and "Linear" not in r["layers"], r
    a, b = weights(straight_sft), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k
