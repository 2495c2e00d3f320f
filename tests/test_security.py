"""Security checks (#18): the API key never lands in a run folder or the output; configs are read with a safe YAML
loader; no pickle and no remote code anywhere; config and data paths stay inside the run folder; model output is
escaped in the HTML report."""

from __future__ import annotations

import json
import re
import uuid
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import mlx_cai
from faultserver import FaultServer
from mlx_cai import config, constitution, models, pipeline
from mlx_cai.cli import app

ROOT = Path(mlx_cai.__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.joinpath("mlx_cai").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py"),
                  *ROOT.joinpath("scripts").rglob("*.py")])


def grep(pattern: str) -> list[str]:
    """FILE:LINE: text of every source line of the package, bench/ and scripts/ matching `pattern`."""
    rx = re.compile(pattern)
    return [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if rx.search(line)]


# ------------------------------------------------------------------------------------------ the API key


@pytest.fixture
def fast_env(monkeypatch):
    monkeypatch.setenv("MLX_CAI_API_TIMEOUT", "2")
    monkeypatch.setenv("MLX_CAI_API_RETRIES", "0")
    monkeypatch.setenv("MLX_CAI_API_BACKOFF", "0.01")


def test_api_key_is_never_written_nor_printed(tiny_gguf, tmp_path, monkeypatch, fast_env):
    key = f"sk-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with FaultServer() as server:
        spec = f"openai:m@{server.url}"
        cfg = {"name": "t", "model": str(tiny_gguf), "runs_dir": str(tmp_path / "runs"),
               "skip": ["clean", "sft", "feedback", "dpo", "eval-sft", "eval-dpo"],
               "revise": {"prompts": "train:harmful", "limit": 2, "shots": 0, "max_tokens": 4, "batch_size": 2,
                          "critic": spec},
               "eval": {"suites": ["harm"], "limit": 1, "max_tokens": 4, "judge": spec, "judge_retries": 0}}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = CliRunner().invoke(app, ["run", str(path)])
        assert run.exit_code == 0, run.output
        server.default = "401"  # a server that echoes the Authorization header in its error message
        failed = CliRunner().invoke(app, ["eval", "-m", str(tiny_gguf), "-o", str(tmp_path / "runs" / "e401"),
                                          "-s", "harm", "--limit", "1", "--max-tokens", "2", "--judge", spec])
        sent = [auth for _, _, _, auth in server.log]
    assert failed.exit_code == 1 and "401" in failed.output
    assert sent and all(auth == f"Bearer {key}" for auth in sent)  # the key was used, for every request
    assert server.faults_seen()[-1] == "401"
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert len(written) > 10 and (tmp_path / "runs" / "t" / "revise.jsonl").is_file()
    assert [p for p in written if key.encode() in p.read_bytes()] == []
    assert key not in run.output and key not in failed.output
    assert key[-12:] not in failed.output  # not even a part of it


# ------------------------------------------------------------------------------------------ YAML, pickle, code


def test_yaml_is_read_with_the_safe_loader_only():
    unsafe = grep(r"yaml\.(unsafe_load|full_load|load_all)\(|yaml\.load\((?!.*SafeLoader)|"
                  r"Loader\s*=\s*yaml\.(Loader|FullLoader|UnsafeLoader)")
    assert unsafe == []
    assert grep(r"yaml\.safe_load\(")  # the pattern sees the calls that are there


def test_a_python_object_tag_in_a_config_is_refused(tmp_path):
    planted = tmp_path / "planted"
    tag = f"!!python/object/apply:os.system ['touch {planted}']"
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(f"name: x\nrevise:\n  limit: {tag}\n")
    r = CliRunner().invoke(app, ["run", str(run_cfg), "--dry-run"])
    assert r.exit_code == 1 and "invalid YAML" in r.output and "run.yaml:3" in r.output
    stage_cfg = tmp_path / "sft.yaml"
    stage_cfg.write_text(f"iters: {tag}\n")
    with pytest.raises(config.ConfigError, match="invalid YAML"):
        config.read_yaml(stage_cfg)
    con = tmp_path / "constitution.yaml"
    con.write_text(f"name: x\nprinciples: {tag}\n")
    with pytest.raises(constitution.ConstitutionError):
        constitution.load(con)
    assert not planted.exists()


def test_no_pickle_anywhere():
    assert grep(r"^\s*(import|from)\s+(c?pickle|_pickle|dill|joblib|shelve|cloudpickle)\b") == []
    assert grep(r"allow_pickle\s*=\s*True|torch\.load\(|read_pickle\(|marshal\.loads?\(") == []


def test_hub_loads_fetch_and_run_no_code(monkeypatch):
    assert grep(r"trust_remote_code\s*=\s*True|[\"']trust_remote_code[\"']\s*:\s*True") == []
    asked = {}

    def snapshot_download(repo, allow_patterns=None, **kw):
        asked.update(repo=repo, patterns=allow_patterns)
        return "/nonexistent"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    models._hub_download("someone/some-model")
    assert asked["repo"] == "someone/some-model"
    for name in ("modeling_evil.py", "configuration_x.py", "pytorch_model.bin", "weights.pkl", "model.pt",
                 "handler.sh"):
        assert not any(fnmatch(name, p) for p in asked["patterns"]), name  # code and pickled weights stay out
    assert any(fnmatch("model.safetensors", p) for p in asked["patterns"])


# ------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("name", ["../evil", "..", "a/../../evil", "/tmp/evil", "x\\..\\evil"])
def test_a_run_name_cannot_leave_the_runs_folder(tmp_path, name):
    path = tmp_path / "cfg" / "run.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"name": "ok", "runs_dir": str(tmp_path / "cfg" / "runs")}))
    for args in (["--name", name], ["--set", f"name={name}"]):
        r = CliRunner().invoke(app, ["run", str(path), *args])
        assert r.exit_code == 1 and "plain folder name" in r.output, r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cfg", "run.yaml"]  # nothing written anywhere


def test_a_config_cannot_move_a_stage_output(tmp_path):
    path = tmp_path / "run.yaml"
    for section, key, value in (("sft", "output", str(tmp_path / "elsewhere")), ("eval", "output", "/tmp/x"),
                                ("revise", "output", "../r.jsonl"), ("dpo", "pairs", "/tmp/pairs.jsonl")):
        path.write_text(yaml.safe_dump({"name": "t", "runs_dir": str(tmp_path / "runs"), section: {key: value}}))
        with pytest.raises(pipeline.PipelineError, match=rf"{section}\.{key} is set by the pipeline"):
            pipeline.load_config(path)


def test_a_report_refuses_suite_names_that_point_outside_the_folder(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"id": "a"}\n{"id": "b", "tor')  # a torn tail the report's reader would cut
    folder = tmp_path / "runs" / "eval"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"suites": {"../../victim": {}}, "overall": {}}))
    r = CliRunner().invoke(app, ["report", str(folder), "-o", str(tmp_path / "runs" / "report.html")])
    assert r.exit_code == 1 and "not a plain file name" in r.output
    assert victim.read_text() == '{"id": "a"}\n{"id": "b", "tor'
    assert not (tmp_path / "runs" / "report.html").exists()


# ------------------------------------------------------------------------------------------ the HTML report


def test_model_output_in_the_html_report_is_escaped(tiny_gguf, tmp_path):
    folder = tmp_path / "eval"
    r = CliRunner().invoke(app, ["eval", "-m", str(tiny_gguf), "-o", str(folder), "-s", "harm", "--limit", "1",
                                 "--max-tokens", "2"])
    assert r.exit_code == 0, r.output
    payload = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"
    recs = [json.loads(line) for line in (folder / "harm.jsonl").read_text().splitlines()]
    for rec in recs:
        rec["response"] = payload
    (folder / "harm.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    out = tmp_path / "report.html"
    r = CliRunner().invoke(app, ["report", str(folder), "-o", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(" in page  # the answer is shown, as text
    assert "<script>alert" not in page and "<img src=x" not in page
