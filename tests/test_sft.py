"""LoRA SFT on the tiny random llama: masking, gradients, learning, resume, adapter formats, bad input."""

from __future__ import annotations

from dataclasses import replace

import json
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_cai import adapters, encoding, models
from mlx_cai.cli import app
from mlx_cai.config import ConfigError, build_config
from mlx_cai.train import checkpoint, data, loop, schedule
from mlx_cai.train.config import TrainingError
from mlx_cai.records import RecordError
from mlx_cai.stages import sft

WORDS = ["cat", "dog", "sun", "tree"]


def chat(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"say {word}"},
                         {"role": "assistant", "content": f"{word} {word} {word}"}]}


def write_data(folder, rows=None, valid=True):
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [chat(w) for w in WORDS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if valid:
        (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return folder


def config(tiny_gguf, tmp_path, **kw) -> sft.SFTConfig:
    base = dict(model=str(tiny_gguf), data=str(write_data(tmp_path / "data")), output=str(tmp_path / "out"),
                iters=6, batch_size=2, learning_rate=1e-3, warmup_steps=0, lora_layers=2, steps_per_eval=3,
                steps_per_save=3)
    base.update(kw)
    return sft.SFTConfig(**base)


def adapter_weights(folder) -> dict:
    return dict(mx.load(str(folder / adapters.ADAPTER_FILE)))


def test_prompt_tokens_are_masked_from_the_loss(tiny):
    model, tok = tiny
    tokens, offset = encoding.encode_chat(tok, chat("cat")["messages"])
    prompt = encoding.encode_prompt(tok, [{"role": "user", "content": "say cat"}])
    assert offset == len(prompt) and tokens[:offset] == prompt
    assert tok.decode(tokens[offset:]).startswith("cat cat cat")
    batch, lengths, positions, rows = arrays = data.pad_batch([tokens], [offset])
    mask = data.completion_mask(lengths, batch.shape[1] - 1)
    # Target t is token t+1: exactly the answer tokens count, none of the prompt or the padding.
    assert mask.sum().item() == len(tokens) - offset
    assert mask[0, : offset - 1].sum().item() == 0 and mask[0, len(tokens) - 1 :].sum().item() == 0

    logits = model(batch[:, :-1])

    class Fixed:  # a "model" that returns given logits, to perturb positions one by one
        def __init__(self, value):
            self.value = value

        def __call__(self, x):
            return self.value

    base, _ = sft.sft_loss(Fixed(logits), *arrays)  # a "model" without a known head: the masked full logits
    noise = mx.random.normal(logits.shape) * 5
    in_prompt = mx.arange(logits.shape[1])[None, :, None] < offset - 1
    moved_prompt, _ = sft.sft_loss(Fixed(mx.where(in_prompt, logits + noise, logits)), *arrays)
    moved_answer, _ = sft.sft_loss(Fixed(mx.where(in_prompt, logits, logits + noise)), *arrays)
    assert moved_prompt.item() == pytest.approx(base.item(), abs=1e-6)
    assert abs(moved_answer.item() - base.item()) > 1e-3
    # The llama path projects only the answer positions onto the vocabulary: the same numbers.
    assert sft.sft_loss(model, *arrays)[0].item() == pytest.approx(base.item(), abs=1e-5)
    assert positions.shape[0] % data.PAD_TO == 0 and (rows >= 0).sum().item() == len(tokens) - offset


def test_gradients_finite_and_lora_params_change_after_one_step(tiny, tmp_path):
    model, tok = tiny
    cfg = config("unused", tmp_path, iters=1)
    n = adapters.add_lora(model, cfg)
    assert n > 0 and all(k.split(".")[-1] in adapters.ADAPTER_LEAVES
                         for k, _ in tree_flatten(model.trainable_parameters()))
    tokens, offset = encoding.encode_chat(tok, chat("dog")["messages"])
    batch = data.pad_batch([tokens], [offset])
    (loss, _), grads = nn.value_and_grad(model, sft.sft_loss)(model, *batch)
    flat = tree_flatten(grads)
    assert flat and all(mx.isfinite(g).all().item() for _, g in flat)
    assert any(mx.abs(g).max().item() > 0 for _, g in flat)
    before = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    out = tmp_path / "run"
    out.mkdir()
    loop.train(model, schedule.make_optimizer(cfg), sft.sft_loss, lambda k: batch, cfg, out, {},
               checkpoint.Position())
    after = dict(tree_flatten(model.trainable_parameters()))
    changed = [k for k in before if not mx.array_equal(before[k], after[k])]
    assert changed and all(k.endswith("lora_b") or k.endswith("lora_a") for k in changed)


def test_loss_decreases_when_overfitting_four_examples(tiny_gguf, tmp_path):
    events = []
    out = sft.run(config(tiny_gguf, tmp_path, iters=12, steps_per_eval=12, steps_per_save=12, batch_size=4,
                         learning_rate=3e-4), progress=events.append)
    rows = [e.metrics for e in events if e.metrics]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 12 and all(math.isfinite(r["loss"]) for r in steps)
    losses = [r["loss"] for r in steps]  # one batch of all four examples: the same batch every step
    assert losses[-1] < 0.8 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals and vals[-1] < steps[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 4 and summary["steps"] == 12
    assert summary["epochs"] == 12 and "12 epochs over 4 examples" in summary["warnings"][0]  # 12 x 4 / 4
    assert events[0].message.startswith("train_examples=4")  # the start counts come first
    assert [e.message for e in events if (e.message or "").startswith("warning:")] == \
        [f"warning: {w}" for w in summary["warnings"]]
    assert sum(e.advance for e in events) == 12 and next(e for e in events if e.metrics).total == 12


def test_resume_after_kill_gives_the_same_adapter_as_an_uninterrupted_run(tiny_gguf, tmp_path):
    straight = sft.run(config(tiny_gguf, tmp_path / "a", lora_dropout=0.1))

    def kill_at_step_5(event):
        row = event.metrics or {}
        if row.get("step") == 5 and "loss" in row:
            raise KeyboardInterrupt  # after the step-3 checkpoint, before the next one

    cfg = config(tiny_gguf, tmp_path / "b", lora_dropout=0.1)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, progress=kill_at_step_5)
    assert checkpoint.latest_checkpoint(tmp_path / "b" / "out").name == "step-0000003"
    assert not (tmp_path / "b" / "out" / adapters.ADAPTER_FILE).exists()
    with pytest.raises(TrainingError, match="--resume"):
        sft.run(cfg)
    resumed = sft.run(replace(cfg, resume=True))
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 4 was dropped and redone
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 3
    ckpt = checkpoint.latest_checkpoint(resumed)
    assert {p.name for p in ckpt.iterdir()} >= {adapters.ADAPTER_FILE, adapters.ADAPTER_CONFIG, "optimizer.safetensors",
                                                "state.json"}


def test_resume_refuses_changed_settings_but_not_the_resumable_ones(tiny_gguf, tmp_path):
    sft.run(config(tiny_gguf, tmp_path, iters=3))
    with pytest.raises(ConfigError, match=r".*out was made with other settings \(lora_rank: 8 -> 4\); only iters, "
                                          r"keep_checkpoints, steps_per_eval, steps_per_save, val_batches may change "
                                          r"on --resume"):
        sft.run(config(tiny_gguf, tmp_path, iters=3, lora_rank=4, resume=True))
    out = sft.run(config(tiny_gguf, tmp_path, iters=5, steps_per_eval=5, val_batches=1, resume=True))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (3, 5)


def test_gradient_accumulation_takes_several_batches_per_step(tiny_gguf, tmp_path):
    out = sft.run(config(tiny_gguf, tmp_path, iters=2, grad_accumulation=3, steps_per_save=2))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["batches"]) == (2, 6)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sequences"] for r in rows if "loss" in r] == [6, 6]  # 3 batches of 2 per optimizer step
    assert json.loads((checkpoint.latest_checkpoint(out) / "state.json").read_text())["batches"] == 6


def test_adapter_loads_with_models_load_and_mlx_lm(tiny_gguf, tmp_path):
    import mlx_lm

    out = sft.run(config(tiny_gguf, tmp_path, iters=3, steps_per_save=3, dora=True, lora_keys=["self_attn.q_proj"]))
    cfg = json.loads((out / adapters.ADAPTER_CONFIG).read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["lora_parameters"]["keys"] == ["self_attn.q_proj"]
    ours, tok = models.load(str(tiny_gguf), adapter=out)
    theirs, _ = mlx_lm.load(str(models.resolve(str(tiny_gguf))), adapter_path=str(out))
    base, _ = models.load(str(tiny_gguf))
    x = mx.array([tok.encode("say cat")])
    a, b, c = ours(x), theirs(x), base(x)
    assert mx.allclose(a, b, atol=1e-5).item()
    assert mx.abs(a - c).max().item() > 1e-4  # the adapter changes the model


def test_length_policy_truncates_answers_and_skips_overlong_prompts(tiny):
    _, tok = tiny
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * 200}]
    long_prompt = [{"role": "user", "content": "y " * 200}, {"role": "assistant", "content": "ok"}]
    examples, counts = sft.tokenize(tok, [long_answer, long_prompt, chat("cat")["messages"]], 64, True)
    assert counts == {"truncated": 1, "skipped_prompt_too_long": 1}
    assert len(examples) == 2 and all(len(e.tokens) <= 64 for e in examples)


def test_config_precedence_and_resolved_config(tiny_gguf, tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lora_rank: 4\nlearning_rate: 1e-3\niters: 9\n")
    cfg = build_config(sft.SFTConfig, yaml_file, data="d", output="o", iters=2)
    assert (cfg.lora_rank, cfg.learning_rate, cfg.iters, cfg.lora_scale) == (4, 1e-3, 2, 20.0)
    (tmp_path / "bad.yaml").write_text("lora_rnak: 4\n")
    with pytest.raises(ConfigError, match="unknown setting.*lora_rnak"):
        build_config(sft.SFTConfig, tmp_path / "bad.yaml", data="d", output="o")
    r = CliRunner().invoke(app, ["sft", "-m", str(tiny_gguf), "--data", str(write_data(tmp_path / "data")),
                                 "-o", str(tmp_path / "cli"), "--config", str(yaml_file), "--iters", "2",
                                 "--batch-size", "2", "--lora-layers", "1", "--lora-keys", "self_attn.v_proj"])
    assert r.exit_code == 0, r.output
    import yaml

    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["lora_rank"] == 4 and saved["iters"] == 2 and saved["lora_keys"] == ["self_attn.v_proj"]
    adapter = json.loads((tmp_path / "cli" / adapters.ADAPTER_CONFIG).read_text())
    assert adapter["num_layers"] == 1 and adapter["base_model"]["hidden_size"] == 64


def test_bad_inputs_are_one_line_errors(tiny_gguf, tmp_path):
    with pytest.raises(TrainingError, match="no train.jsonl"):
        sft.run(config(tiny_gguf, tmp_path, data=str(tmp_path)))
    bad = write_data(tmp_path / "bad", rows=[chat("cat"), {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(RecordError, match="train.jsonl:2: the last message must be a non-empty assistant answer"):
        sft.run(config(tiny_gguf, tmp_path, data=str(bad)))
    with pytest.raises(TrainingError, match="no module matches lora_keys"):
        sft.run(config(tiny_gguf, tmp_path, output=str(tmp_path / "k"), lora_keys=["attn.nope"]))
    with pytest.raises(TrainingError, match="lora_layers 5 > the model's 2 blocks"):
        sft.run(config(tiny_gguf, tmp_path, output=str(tmp_path / "l"), lora_layers=5))
    with pytest.raises(TrainingError, match="lr_schedule"):
        config(tiny_gguf, tmp_path, lr_schedule="step")
    r = CliRunner().invoke(app, ["sft", "-m", str(tiny_gguf), "--data", str(tmp_path / "missing"), "-o",
                                 str(tmp_path / "x")])
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output


def test_epoch_warning_only_past_ten_passes():
    from mlx_cai.train.config import TrainConfig
    from mlx_cai.train.loop import epoch_warnings, epochs

    cfg = TrainConfig(iters=60, batch_size=4)
    assert epochs(cfg, 5) == 48 and "48 epochs over 5 examples" in epoch_warnings(cfg, 5)[0]
    assert epoch_warnings(cfg, 24) == []  # exactly 10 passes: no warning


def test_grad_checkpoint_trains_the_same_adapter(tiny_gguf, tmp_path):
    # (the memory it saves is measured in bench/training.py: a tiny model has too few activations to show it)
    from mlx_cai import models

    runs = {}
    for flag in (False, True):
        model, tok = models.load(str(tiny_gguf))
        out = sft.run(config(tiny_gguf, tmp_path / str(flag), iters=3, grad_checkpoint=flag), model=model,
                      tokenizer=tok)
        runs[flag] = (adapter_weights(out), model)
    (plain, m0), (ckpt, m1) = runs[False], runs[True]
    assert plain.keys() == ckpt.keys()
    for k in plain:
        assert mx.allclose(plain[k], ckpt[k], atol=1e-5).item(), k
    assert type(m1.layers[0]).__name__.startswith("Checkpointed") and type(m0.layers[0]).__name__ != \
        type(m1.layers[0]).__name__  # only the checkpointed model's blocks changed class


@pytest.mark.parametrize("accum", [1, 2])
def test_a_batch_split_over_two_cpu_streams_takes_the_one_stream_step(tiny_gguf, tmp_path, monkeypatch, accum):
    """MLX_CAI_TRAIN_STREAMS=2 runs each batch as two slices on two CPU streams and combines them
    (loop.combine_parts): the same adapter and per-step metrics as one stream, up to float rounding,
    also when a step accumulates the gradients of several batches."""
    calls = []
    combine = loop.combine_parts
    monkeypatch.setattr(loop, "combine_parts",
                        lambda results, over: calls.append(len(results)) or combine(results, over))
    runs = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MLX_CAI_TRAIN_STREAMS", n)
        runs[n] = sft.run(config(tiny_gguf, tmp_path / n, iters=4, batch_size=4, steps_per_eval=4, steps_per_save=4,
                                 grad_accumulation=accum))
    assert calls and set(calls) == {2}  # traced once per batch shape, on the two-stream run only
    a, b = adapter_weights(runs["1"]), adapter_weights(runs["2"])
    assert any(mx.abs(v).max().item() > 0 for k, v in a.items() if k.endswith("lora_b"))  # it trained
    for k in a:  # Adam turns float noise in a near-zero gradient entry into up to lr per step: 1e-4, not 1e-6
        assert mx.allclose(a[k], b[k], atol=1e-4).item(), k
    rows = [[json.loads(x) for x in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in ("1", "2")]
    assert len(rows[0]) == len(rows[1]) == 5  # 4 steps and a validation
    for ra, rb in zip(*rows):  # the loss and the norm of the combined gradient: what a wrong weighting would change
        assert {k: ra[k] for k in ("step", "tokens", "sequences", "loss_tokens") if k in ra} == \
               {k: rb[k] for k in ("step", "tokens", "sequences", "loss_tokens") if k in rb}
        for k in ("loss", "grad_norm", "val_loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), k


def test_combine_parts_weighs_slices_by_what_their_loss_is_a_mean_over():
    g1, g2 = {"w": mx.array([1.0, 2.0])}, {"w": mx.array([4.0, 8.0])}
    m1 = {"loss_tokens": mx.array(1), "tokens": mx.array(5), "acc": mx.array(1.0)}
    m2 = {"loss_tokens": mx.array(3), "tokens": mx.array(7), "acc": mx.array(0.0)}
    loss, metrics, grad = loop.combine_parts([(mx.array(2.0), m1, g1), (mx.array(6.0), m2, g2)], "loss_tokens")
    assert loss.item() == pytest.approx((2 * 1 + 6 * 3) / 4)  # the mean over all 4 loss tokens
    assert metrics["loss_tokens"].item() == 4 and metrics["tokens"].item() == 12  # counts add up
    assert metrics["acc"].item() == pytest.approx(0.25)
    assert grad["w"].tolist() == pytest.approx([(1 + 12) / 4, (2 + 24) / 4])


def test_a_bad_train_streams_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MLX_CAI_TRAIN_STREAMS", "two")
    with pytest.raises(TrainingError, match="MLX_CAI_TRAIN_STREAMS must be a whole number >= 1, got 'two'"):
        data.train_streams()
    monkeypatch.setenv("MLX_CAI_TRAIN_STREAMS", "3")
    assert data.train_streams() == 3


def test_local_batch_slices_mirror_the_process_shares():
    build = tuple
    assert data.local_batch([7, 3, 5, 1], build, parts=2) == [(7, 5), (3, 1)]  # what 2 processes would get
    assert data.local_batch([7, 3, 5], build, parts=4) == [(7,), (3,), (5,)]
    assert data.local_batch([7], build, parts=2) == (7,) and data.local_batch([7, 3], build) == (7, 3)
