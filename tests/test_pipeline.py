"""The pipeline end to end on the tiny random llama: every stage, markers, skip on rerun, --until/--from."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from mlx_cai import pipeline
from mlx_cai.cli import app


def tiny_config(tmp_path, model: str) -> dict:
    return {
        "name": "t", "model": model, "seed": 0, "runs_dir": str(tmp_path / "runs"),
        "revise": {"prompts": "train:harmful", "limit": 4, "shots": 1, "max_tokens": 8, "batch_size": 4, "temperature": 1.0},
        "clean": {"helpful": "train:benign", "helpful_ratio": 1.0, "helpful_max_tokens": 8,
                  "rules": ["emoji"], "valid_fraction": 0.25},
        "sft": {"iters": 2, "batch_size": 2, "max_seq_length": 512, "steps_per_eval": 2, "steps_per_save": 1,
                "lora_layers": 1},
        "feedback": {"mode": "revision", "max_similarity": 1.0, "max_repetition": 1.0},
        "dpo": {"iters": 2, "batch_size": 1, "max_seq_length": 512, "max_prompt_length": 256, "steps_per_eval": 2,
                "steps_per_save": 1},
        "eval": {"suites": ["harm", "benign"], "limit": 2, "max_tokens": 6, "batch_size": 4},
    }


@pytest.fixture
def config_file(tmp_path, tiny_gguf):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tiny_gguf))))
    return path


def test_whole_pipeline_runs_then_skips_everything(config_file, tmp_path):
    cfg = pipeline.load_config(config_file)
    calls = []
    hooks = pipeline.Hooks(stage_start=lambda i, n, s: calls.append(("run", s)),
                           stage_skip=lambda s, why: calls.append(("skip", s)))
    run_dir = pipeline.run(cfg, until="clean", hooks=hooks)
    assert calls == [("run", "revise"), ("run", "clean")]
    calls.clear()
    left = run_dir / "clean" / ".train.jsonl.tmp-999999999"  # what a writer killed mid-write leaves (no such pid)
    left.write_text("half")
    pipeline.run(cfg, hooks=hooks)
    assert not left.exists()  # swept by the next run
    assert calls[:2] == [("skip", "revise"), ("skip", "clean")]
    assert [c for c in calls if c[0] == "run"] == [("run", s) for s in pipeline.STAGES[2:]]
    for s in pipeline.STAGES:
        assert pipeline.marker(cfg, s).exists()
    assert (run_dir / "final").resolve() == (run_dir / "dpo").resolve()
    assert (run_dir / "final" / "adapters.safetensors").exists()
    assert (run_dir / "report.html").exists() and (run_dir / "eval" / "dpo" / "summary.json").exists()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["sft"]["iters"] == 2
    calls.clear()
    pipeline.run(cfg, hooks=hooks)
    assert all(kind == "skip" for kind, _ in calls) and len(calls) == len(pipeline.STAGES)


def test_changed_settings_are_refused_and_from_keeps_old_outputs(config_file, tmp_path):
    cfg = pipeline.load_config(config_file)
    pipeline.run(cfg, until="revise")
    changed = pipeline.load_config(config_file, {"revise.max_tokens": 9})
    with pytest.raises(pipeline.PipelineError, match="--from revise"):
        pipeline.run(changed, until="revise")
    pipeline.run(changed, start="revise", until="revise")
    old = [p.name for p in cfg.run_dir.iterdir() if p.name.startswith("revise.jsonl.old-")]
    assert len(old) == 1
    marker = json.loads(pipeline.marker(cfg, "revise").read_text())
    assert marker["config"]["max_tokens"] == 9
    assert marker["blas_threads"] >= 1  # what the stage's wall time was measured with


def test_bad_configs_are_one_line_errors(tmp_path, config_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrevise: {limit: 2, colour: red}\n")
    with pytest.raises(pipeline.PipelineError, match=r"revise.colour is not a setting"):
        pipeline.load_config(bad)
    bad.write_text("name: x\nrevise: [1, 2\n")
    with pytest.raises(pipeline.PipelineError, match=r"bad.yaml:\d+: invalid YAML"):
        pipeline.load_config(bad)
    r = CliRunner().invoke(app, ["run", str(config_file), "--dry-run", "--set", "sft.iters=0"])
    assert r.exit_code == 1 and "iters must be >= 1" in r.output


def test_a_setting_naming_a_stage_gets_that_stages_output_and_a_path_is_still_refused(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"name": "x", "runs_dir": str(tmp_path),
                                   "feedback": {"mode": "revision", "boundary_answers": "clean"}}))
    fb = pipeline.stage_config(pipeline.load_config(run), "feedback")
    assert fb.boundary_answers == str(tmp_path / "x" / "clean" / "helpful.jsonl")
    run.write_text(yaml.safe_dump({"name": "x", "feedback": {"output": "elsewhere.jsonl"}}))
    with pytest.raises(pipeline.PipelineError, match="feedback.output is set by the pipeline"):
        pipeline.load_config(run)


def test_shipped_configs_pass_dry_run():
    from pathlib import Path

    runs = sorted(p for p in Path("configs").glob("*.yaml") if "revise" in yaml.safe_load(p.read_text()))  # run configs, not stage/constitution files
    assert {"demo.yaml", "self-critic.yaml", "llama3-8b.yaml", "overseer.yaml"} <= {p.name for p in runs}
    for path in runs:
        r = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
        assert r.exit_code == 0, r.output
        assert "config is valid" in r.output and "eval-dpo" in r.output


def test_dry_run_estimates_time_from_earlier_runs_of_the_same_model(tmp_path):
    import json

    from mlx_cai.commands.run import measured_seconds_per_unit

    stages = tmp_path / "runs" / "old" / "stages"
    stages.mkdir(parents=True)
    (stages / "revise.json").write_text(json.dumps({"stage": "revise", "seconds": 600.0,
                                                    "config": {"model": "smollm2-135m", "limit": 60}}))
    (stages / "sft.json").write_text(json.dumps({"stage": "sft", "seconds": 120.0, "config": {
        "model": "smollm2-135m", "iters": 60, "batch_size": 4}}))
    (stages / "eval-base.json").write_text(json.dumps({"stage": "eval-base", "seconds": 90.0, "config": {
        "model": "other-model", "limit": 48, "suites": ["harm"]}}))
    assert measured_seconds_per_unit(tmp_path / "runs", "smollm2-135m") == {"revise": 10.0, "sft": 0.5}
    r = CliRunner().invoke(app, ["run", "configs/demo.yaml", "--dry-run", "--set", f"runs_dir={tmp_path / 'runs'}",
                                 "--set", "revise.limit=30", "--set", "sft.iters=30"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "~5.0 min (measured)" in r.output  # revise: 30 prompts x 10 s
    assert "~1.0 min (measured)" in r.output  # sft: 30 steps x 4 examples x 0.5 s


def test_a_stage_starts_without_the_previous_stages_models(config_file):
    """revise's models are freed before clean starts: the next stage would load its own beside them."""
    import mlx.core as mx

    cfg = pipeline.load_config(config_file)
    held = {}
    hooks = pipeline.Hooks(stage_start=lambda i, n, s: held.setdefault(s, mx.get_active_memory()))
    pipeline.run(cfg, until="clean", hooks=hooks)
    before = held["revise"]
    assert held["clean"] - before < 1 << 16, f"{held['clean'] - before} bytes still held after revise (the tiny model: ~0.7 MB)"
