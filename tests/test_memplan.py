"""The memory estimator (mlx_cai.memplan) on real shapes, and the pre-flight check through the CLI.

The Llama-3-8B numbers below are worked out by hand from the shapes, not copied from the code's output.
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from mlx_cai import memplan
from mlx_cai.cli import app
from mlx_cai.stages.dpo import DPOConfig
from mlx_cai.stages.sft import SFTConfig

GB = 1e9

# meta-llama/Meta-Llama-3-8B as mlx-community/Meta-Llama-3-8B-Instruct-4bit's config.json has it
LLAMA3_8B_4BIT = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                  "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                  "quantization": {"group_size": 64, "bits": 4}}


def llama_ctx() -> memplan.Context:
    shape = memplan.ModelShape.from_config(LLAMA3_8B_4BIT, dequantize=False)  # kept 4-bit, as on Metal
    return memplan.Context("sft", lambda spec: shape, lambda f: f"sft.{f}", fused_attention=True)


def qlora(**kw) -> SFTConfig:
    settings = dict(model="llama", data="d", batch_size=8, max_seq_length=1024, lora_layers=16, lora_rank=16)
    return SFTConfig(**{**settings, **kw})


def test_llama3_8b_weights_and_lora_from_first_principles():
    shape = memplan.ModelShape.from_config(LLAMA3_8B_4BIT, dequantize=False)
    # A block: q, o 4096x4096 = 16.78M each; k, v 4096x1024 = 4.19M each; gate, up, down 4096x14336 = 58.72M
    # each: 218.10M. 32 blocks = 6979.3M, plus the embedding and the untied head (128256 x 4096 = 525.3M each):
    # 8030.0M (mlx-lm prints 8030.261M with the norms).
    assert shape.params() == pytest.approx(8030.0e6, rel=1e-4)
    # 4 bits + a 16-bit scale and a 16-bit bias per group of 64 = 4.5 bits: 8.03e9 x 4.5 / 8 = 4.517 GB.
    items = memplan.train_items(shape, batch=8, seq=1024, lora_layers=16, lora_rank=16, grad_checkpoint=False)
    assert items["weights"] == pytest.approx(4.517e9, rel=1e-3)
    # LoRA rank 16 on the 7 matrices: 16 x (8192 + 5120 + 5120 + 8192 + 3 x 18432) = 1.31M per block, x16 blocks
    # = 20.97M float32 values, each with a gradient and two AdamW moments: 20.97M x 16 B = 0.336 GB.
    assert items["lora + grads + adam"] == pytest.approx(0.3355e9, rel=1e-3)
    # Logits at all 8 x 1024 positions: 8192 x 128256 = 1.05e9 values in bf16 (2 B), a float32 copy for the
    # log-softmax (4 B) and its float32 gradient (4 B): 10.5 GB, the largest item at this vocabulary.
    assert items["logits"] == pytest.approx(8192 * 128256 * 10, rel=1e-6)


def test_llama3_8b_qlora_seq_1024_batch_8_on_16_and_32_gb():
    ctx = llama_ctx()
    # Without grad_checkpoint each of the 16 adapted blocks keeps, per token, 5 x 4096 + 2 x 1024 + 4 x 14336 =
    # 79,872 bf16 values (160 KB): x 8192 tokens x 16 blocks = 20.9 GB, plus one block's backward buffers
    # (1.3 GB), the attention scores of a block (8 x 32 x 1024^2 float32, twice: 2.1 GB), 4.5 GB of weights and
    # 10.5 GB of logits: ~39.7 GB. Refused on a 32 GB machine too.
    plain = qlora().memory(ctx)
    assert 38e9 < plain.total < 41e9
    assert memplan.refusal(plain, 32 * GB) is not None
    # With grad_checkpoint a block keeps only its input (4096 bf16 per token: 16 blocks x 8192 x 8 KB = 1.07 GB)
    # and recomputes one block at a time (2 x 1.3 GB): 4.5 + 0.34 + 3.7 + 2.1 + 10.5 = ~21.2 GB. It fits 32 GB,
    # not 16 GB.
    ckpt = qlora(grad_checkpoint=True).memory(ctx)
    assert 20e9 < ckpt.total < 22.5e9
    assert memplan.refusal(ckpt, 32 * GB) is None
    line = memplan.refusal(ckpt, 16 * GB)
    assert line.startswith("sft needs ~21.") and "of a 16.0 GB budget" in line
    assert "lower sft.batch_size (8) or sft.max_seq_length (1024)" in line and "\n" not in line
    assert "grad_checkpoint" in memplan.refusal(plain, 16 * GB)  # off: turning it on is the first thing to try


def test_the_16_gb_recipe_fits_and_dpo_counts_both_responses():
    ctx = llama_ctx()
    # batch 2 with checkpointing: 4.5 weights + 0.34 LoRA + 2048 tokens x (16 x 8 KB + 2 x 160 KB) = 0.92 GB
    # + 0.54 GB scores + 2048 x 128256 x 10 B = 2.6 GB logits: ~8.9 GB, inside a 16 GB Mac's ~10.7 GB working set.
    small = qlora(batch_size=2, grad_accumulation=4, grad_checkpoint=True).memory(ctx)
    assert 8e9 < small.total < 10e9
    dpo = DPOConfig(model="llama", pairs="p", batch_size=1, max_seq_length=1024, lora_layers=16, lora_rank=16,
                    grad_checkpoint=True).memory(ctx)
    sft_two = qlora(batch_size=2, grad_checkpoint=True).memory(ctx)
    assert dpo.total == pytest.approx(sft_two.total)  # 1 pair = chosen + rejected = 2 sequences


def test_a_published_peak_is_within_30_percent():
    # unslothai/unsloth PR #1289 (M1 Max 32 GB, mlx-lm trainer): llama-3-8b 4-bit, batch 2, the first step's
    # 192 trained tokens (2 x ~96), "Peak mem 5.404 GB". Rank 8 on 16 blocks assumed (mlx-lm's defaults).
    shape = memplan.ModelShape.from_config(LLAMA3_8B_4BIT, dequantize=False)
    items = memplan.train_items(shape, batch=2, seq=96, lora_layers=16, lora_rank=8, grad_checkpoint=False)
    assert sum(items.values()) == pytest.approx(5.404e9, rel=0.3)


def test_generation_counts_the_kv_cache_and_a_second_model():
    shape = memplan.ModelShape.from_config(LLAMA3_8B_4BIT, dequantize=False)
    ctx = memplan.Context("eval", lambda spec: None if spec.startswith("openai:") else shape, lambda f: f"eval.{f}",
                          fused_attention=True)
    # KV cache: 16 rows x (256 + 512) positions x 32 layers x 2 (K, V) x 1024 x 2 B = 1.61 GB.
    est = memplan.generation(ctx, "llama", {"judge": "openai:gpt-4o"}, batch=16, prompt=256, new_tokens=512,
                             knobs={"batch_size": 16, "max_tokens": 512})
    assert est.items["kv cache"] == pytest.approx(16 * 768 * 32 * 2 * 1024 * 2)
    assert "judge weights" not in est.items  # an API judge costs no memory here
    with_local = memplan.generation(ctx, "llama", {"judge": "other-local"}, batch=16, prompt=256, new_tokens=512,
                                    knobs={})
    assert with_local.items["judge weights"] == pytest.approx(4.517e9, rel=1e-3)


def test_the_peak_is_the_largest_model_generating_beside_the_others():
    small = memplan.ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                               vocab=49152, tied=True, weight_bits=32, act_bytes=4)  # SmolLM2-135M
    big = memplan.ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960,
                             vocab=151936, tied=True, weight_bits=32, act_bytes=4)  # Qwen2.5-1.5B
    ctx = memplan.Context("revise", {"smol": small, "qwen": big}.get, lambda f: f"revise.{f}")
    est = memplan.generation(ctx, "smol", {"critic": "qwen"}, batch=48, prompt=256, new_tokens=160, knobs={})
    # the critic generating: its KV cache is 48 x 416 positions x 28 layers x 2 x 256 x 4 B = 1.14 GB, beside
    # the responder's weights (the critic's are ~1.54e9 params x 4 B = 6.2 GB, the responder's 0.54 GB)
    assert est.items["critic kv cache"] == pytest.approx(48 * 416 * 28 * 2 * 256 * 4)
    assert est.items["critic weights"] == pytest.approx(6.17e9, rel=0.02)
    assert est.items["model weights"] == pytest.approx(0.54e9, rel=0.05) and "kv cache" not in est.items


def test_weights_over_the_budget_say_so():
    line = memplan.refusal(qlora(batch_size=1).memory(llama_ctx()), 4 * GB)
    assert "the weights alone are 4.5 GB" in line


# the embedded SmolLM2-135M Q4_1 GGUF as converted here: 4-bit groups of 32, the tied embedding at 8 bits
SMOLLM2_Q4_1 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                "tie_word_embeddings": True,
                "quantization": {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}}


def test_a_model_kept_quantized_counts_its_linear_rows_q_packs_on_the_cpu():
    shape = memplan.ModelShape.from_config(SMOLLM2_Q4_1, dequantize=False)
    # Per block: q, o 576 x 576; k, v 576 x 192; gate, up, down 576 x 1536 = 3,538,944 weights. A pack holds the
    # codes and a float32 scale and bias per group of 32: 4-bit 0.5 + 8/32 = 0.75 B per weight, the 8-bit tied
    # head (49152 x 576) 1 + 8/32 = 1.25 B.
    packs = 30 * 3_538_944 * 0.75 + 49152 * 576 * 1.25
    assert packs == pytest.approx(115.0e6, rel=1e-3)

    def estimate(limit: float, others: dict | None = None, fused: bool = False):
        ctx = memplan.Context("generate", lambda spec: shape, lambda f: f"generate.{f}", decode_copy_limit=limit,
                              fused_attention=fused)
        return memplan.generation(ctx, "smol", others or {}, batch=32, prompt=64, new_tokens=64, knobs={}).items

    assert estimate(4 * GB)["cpu kernel copies"] == pytest.approx(packs)  # the CPU with the kernels
    assert estimate(4 * GB, {"critic": "other"})["critic cpu kernel copies"] == pytest.approx(packs)  # held beside
    assert "cpu kernel copies" not in estimate(0.0, fused=True)  # a GPU (or no kernels): no packs
    assert "cpu kernel copies" not in estimate(packs / 2)  # over fastllama's RAM share: not made
    # bits or groups linear_rows_q lacks (here 3-bit) are not packed; dequantized (float32) keeps the dense count
    odd = memplan.ModelShape.from_config({**SMOLLM2_Q4_1, "quantization": {"group_size": 32, "bits": 3}},
                                         dequantize=False)
    assert memplan.quantized_pack_bytes(odd) == 0
    dense = memplan.ModelShape.from_config(SMOLLM2_Q4_1, dequantize=True)
    assert memplan.quantized_pack_bytes(dense) == 0
    assert memplan.generate_items(dense, batch=1, prompt=1, new_tokens=1, copy_limit=4 * GB)["cpu kernel copies"] \
        > 4 * 30 * 3_538_944  # packed + fused float32 copies


# ------------------------------------------------------------------------------------------- the CLI


def sft_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    (data / "train.jsonl").write_text(json.dumps(chat) + "\n")
    return data


def test_sft_refuses_a_tiny_budget_in_one_line_and_writes_nothing(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sft", "--data", str(sft_data(tmp_path)), "-o", str(out), "--model", str(tiny_gguf),
                                 "--batch-size", "4", "--memory-budget", "0.01"])
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "sft needs ~" in lines[0] and "--batch-size (4)" in lines[0]
    assert not out.exists()


def test_run_refuses_before_any_work_and_dry_run_prints_the_table(tiny_gguf, tmp_path):
    from tests.test_pipeline import tiny_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tiny_gguf))))
    r = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--memory-budget", "100"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "budget 100.0 GB" in r.output and "lora + grads + adam" not in r.output  # the 3 largest items only
    assert "| sft " in r.output.replace("│", "|") and "yes" in r.output
    r = CliRunner().invoke(app, ["run", str(path), "--memory-budget", "0.01"], env={"COLUMNS": "200"})
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("error: revise needs ~")
    assert "revise.batch_size (4)" in r.output
    assert not (tmp_path / "runs").exists()  # nothing written: not even the run folder


def test_a_finished_stage_needs_no_memory_on_a_rerun(tiny_gguf, tmp_path):
    from tests.test_pipeline import tiny_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tiny_gguf))))
    r = CliRunner().invoke(app, ["run", str(path), "--until", "revise"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["run", str(path), "--until", "revise", "--memory-budget", "0.01"])
    assert r.exit_code == 0, r.output  # revise is done: the rerun skips it, whatever the budget
    r = CliRunner().invoke(app, ["run", str(path), "--until", "clean", "--memory-budget", "0.01"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("error: clean needs ~")
    r = CliRunner().invoke(app, ["run", str(path), "--from", "revise", "--until", "revise", "--memory-budget", "0.01"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "error: revise needs ~" in r.output  # --from redoes it: checked again
