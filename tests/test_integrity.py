"""Disk and files (#18): a full disk during an append or a checkpoint is one line and the rerun continues; a torn,
cut or changed checkpoint, adapter or stage marker is found by the size and sha256 recorded when it was written and
named in one line (a checkpoint falls back to the one before); summaries, markers and configs are written atomically.

The full disk is injected in-process (writes under one folder fail with ENOSPC after part of the data, as a real
full disk does; MLX's safetensors writer raises its own error), and, where Linux lets an unprivileged user mount one
(user namespaces), is a real 160 kB tmpfs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from typer.testing import CliRunner

from mlx_cai import adapters, pipeline, records
from mlx_cai.cli import app
from mlx_cai.progress import Event
from mlx_cai.stages import sft
from mlx_cai.train import checkpoint

import test_sft
from test_pipeline import tiny_config

ROOT = Path(__file__).resolve().parent.parent


class FullDisk:
    """Writes to files whose path contains `where` fail with ENOSPC once `lines` newlines went to that file (the
    failing write puts half its data first); mx.save_safetensors there writes half the file and raises what MLX
    raises when the disk is full."""

    def __init__(self, monkeypatch, where: str, lines: int = 0):
        self.where, self.lines, self.on = where, lines, True
        real_open, real_save = io.open, mx.save_safetensors
        disk = self

        class File:
            def __init__(self, f):
                self._f, self._newlines = f, 0

            def write(self, data):
                if disk.on and self._newlines >= disk.lines:
                    self._f.write(data[: len(data) // 2])
                    self._f.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                self._newlines += data.count("\n" if isinstance(data, str) else b"\n")
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def fake_open(file, mode="r", *a, **kw):
            f = real_open(file, mode, *a, **kw)
            hit = disk.on and any(c in mode for c in "wax") and disk.where in str(file)
            return File(f) if hit else f

        def save(path, arrays, *a, **kw):
            if not (disk.on and disk.where in str(path)):
                return real_save(path, arrays, *a, **kw)
            real_save(path, arrays, *a, **kw)
            size = os.path.getsize(path)
            os.truncate(path, size // 2)
            raise RuntimeError(f"[write] Unable to write {size - size // 2} bytes to file.")

        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(mx, "save_safetensors", save)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))


def one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def eval_args(tiny_gguf, out) -> list[str]:
    return ["eval", "-m", str(tiny_gguf), "-o", str(out), "-s", "harm", "--limit", "3", "--batch-size", "1",
            "--max-tokens", "3"]


def test_full_disk_during_an_append_is_one_line_and_the_rerun_continues(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    disk = FullDisk(monkeypatch, where="harm.jsonl", lines=1)
    r = CliRunner().invoke(app, eval_args(tiny_gguf, out))
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert "no space left on device" in line and "harm.jsonl" in line and "rerun the same command" in line
    text = (out / "harm.jsonl").read_text()
    assert text.count("\n") == 1 and not text.endswith("\n")  # one record, then the torn start of the next
    disk.on = False
    assert CliRunner().invoke(app, eval_args(tiny_gguf, out)).exit_code == 0
    again = CliRunner().invoke(app, eval_args(tiny_gguf, tmp_path / "straight"))
    assert again.exit_code == 0
    got = [json.loads(x) for x in (out / "harm.jsonl").read_text().splitlines()]
    want = {x["id"]: x["response"] for x in records.read_jsonl(tmp_path / "straight" / "harm.jsonl")}
    assert len(got) == len({x["id"] for x in got}) == 3
    assert {x["id"]: x["response"] for x in got} == want


def sft_args(tiny_gguf, tmp_path, iters: int, *extra) -> list[str]:
    data = test_sft.write_data(tmp_path / "data")
    return ["sft", "-m", str(tiny_gguf), "--data", str(data), "-o", str(tmp_path / "out"), "--iters", str(iters),
            "--batch-size", "2", "--lora-layers", "1", "--steps-per-save", "2", "--steps-per-eval", "4",
            "--learning-rate", "1e-3", *extra]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    disk = FullDisk(monkeypatch, where=".step-0000004.tmp")
    r = CliRunner().invoke(app, sft_args(tiny_gguf, tmp_path, 4))
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert "no space left on device" in line and "step-0000004" in line and "rerun" in line
    latest = checkpoint.latest_checkpoint(out)
    assert latest.name == "step-0000002" and (checkpoint.checkpoint_dir(out) / "latest").read_text() == latest.name
    model, _ = test_sft.models.load(str(tiny_gguf))
    cfg = sft.SFTConfig(model=str(tiny_gguf), data=str(tmp_path / "data"), output=str(out), lora_layers=1)
    adapters.add_lora(model, cfg)
    assert checkpoint.restore_checkpoint(latest, model, test_sft.schedule.make_optimizer(cfg)).step == 2
    disk.on = False
    r = CliRunner().invoke(app, sft_args(tiny_gguf, tmp_path, 4, "--resume"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    straight = tmp_path / "straight"
    assert CliRunner().invoke(app, sft_args(tiny_gguf, straight, 4)).exit_code == 0
    a, b = test_sft.adapter_weights(out), test_sft.adapter_weights(straight / "out")
    assert a.keys() == b.keys() and all(mx.allclose(a[k], b[k], atol=1e-6).item() for k in a)


def test_a_torn_metrics_line_does_not_stop_a_resume(tiny_gguf, tmp_path):
    """Bug found by bench/chaos.py: a kill (or a full disk) mid metrics row after a checkpoint made every rerun
    fail with 'malformed JSON' (the rows past the checkpoint were read before the torn tail was cut)."""
    cfg = test_sft.config(tiny_gguf, tmp_path, iters=4, steps_per_save=2, steps_per_eval=4)
    out = sft.run(replace(cfg, iters=2))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2, "tok')
    sft.run(replace(cfg, resume=True))
    rows = list(records.read_jsonl(out / "metrics.jsonl"))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ damaged files


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip adapter", "cut optimizer", "bad state"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_gguf, tmp_path, damage):
    cfg = test_sft.config(tiny_gguf, tmp_path, iters=6, steps_per_save=2, steps_per_eval=6)
    straight = sft.run(replace(cfg, output=str(tmp_path / "straight")))

    def kill_at_step_5(event):
        if (event.metrics or {}).get("step") == 5:
            raise KeyboardInterrupt  # after the step-4 checkpoint

    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, progress=kill_at_step_5)
    out = Path(cfg.output)
    step4 = checkpoint.checkpoint_dir(out) / "step-0000004"
    if damage == "flip adapter":
        flip_byte(step4 / adapters.ADAPTER_FILE)
    elif damage == "cut optimizer":
        os.truncate(step4 / "optimizer.safetensors", 100)
    else:
        (step4 / "state.json").write_text('{"step": 4, "batc')
    events: list[Event] = []
    sft.run(replace(cfg, resume=True), progress=events.append)
    warnings = [e.message for e in events if (e.message or "").startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step-0000004 is damaged" in warnings[0], warnings
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    a, b = test_sft.adapter_weights(straight), test_sft.adapter_weights(out)
    assert all(mx.allclose(a[k], b[k], atol=1e-6).item() for k in a)


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_damaged_adapter_is_refused_in_one_line(tiny_gguf, tmp_path, damage):
    out = sft.run(test_sft.config(tiny_gguf, tmp_path, iters=2, steps_per_save=2))
    weights = out / adapters.ADAPTER_FILE
    flip_byte(weights) if damage == "flip" else os.truncate(weights, weights.stat().st_size - 10)
    r = CliRunner().invoke(app, ["eval", "-m", str(tiny_gguf), "--adapter", str(out), "-o", str(tmp_path / "e"),
                                 "-s", "harm", "--limit", "1", "--max-tokens", "2"])
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert "adapters.safetensors" in line and "recorded" in line


def test_a_damaged_marker_reruns_its_stage_and_a_changed_output_is_refused(tiny_gguf, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, str(tiny_gguf))))
    cfg = pipeline.load_config(path)
    pipeline.run(cfg, until="clean")
    before = (cfg.run_dir / "revise.jsonl").read_bytes()
    pipeline.marker(cfg, "revise").write_text('{"stage": "revise", "conf')
    seen, warned = [], []
    hooks = pipeline.Hooks(stage_start=lambda i, n, s: seen.append(s), warning=warned.append)
    pipeline.run(cfg, until="clean", hooks=hooks)
    assert seen == ["revise"] and len(warned) == 1 and "stages/revise.json" in warned[0]
    assert records.read_json(pipeline.marker(cfg, "revise"))["config"]["limit"] == 4
    assert (cfg.run_dir / "revise.jsonl").read_bytes() == before  # the rerun found every record done
    (cfg.run_dir / "revise.jsonl").write_bytes(before[: before.rindex(b"\n", 0, -1) + 1])  # one record less
    with pytest.raises(pipeline.PipelineError, match=r"revise.jsonl changed after stage revise finished.*--from revise"):
        pipeline.run(cfg, until="clean")


# ------------------------------------------------------------------------------------------ atomic writes


WRITERS = re.compile(r"\.write_text\(|\.write_bytes\(|\bjson\.dump\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|os\.open\(|"
                     r"save_safetensors\(")
OTHER_WRITERS = {"mlx_cai/records.py": "the atomic writers and the JSONL appender themselves",
                 "mlx_cai/gguf.py": "writes inside a temporary folder that is renamed into place whole",
                 "mlx_cai/embedded.py": "writes a temporary file that is renamed into place",
                 "mlx_cai/runlock.py": "lock files, created with O_EXCL"}


def test_summaries_markers_and_configs_are_written_atomically():
    """Whole files are written through records.*_atomic (a temporary sibling, fsync, rename); the only other
    writers are the ones listed, each with why it is safe."""
    hits = []
    for p in sorted((ROOT / "mlx_cai").rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if rel not in OTHER_WRITERS and WRITERS.search(code) and "_atomic(" not in code:
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert hits == []
    assert all(WRITERS.search((ROOT / f).read_text()) for f in OTHER_WRITERS)  # the pattern sees real writes


def test_an_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    records.write_json_atomic(target, {"old": True})
    FullDisk(monkeypatch, where=str(tmp_path))
    with pytest.raises(OSError) as e:
        records.write_json_atomic(target, {"new": True, "pad": "x" * 1000})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------ a real full disk


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces (Linux)")
def test_a_real_full_disk_mid_run_then_more_space_and_the_rerun_finishes(tiny_gguf, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = tiny_config(disk, str(tiny_gguf))
    cfg["sft"]["iters"] = 4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = f"{sys.executable} -c 'from mlx_cai.cli import main; main()' run {tmp_path / 'run.yaml'} --until sft"
    script = (f"mount -t tmpfs -o size=160k tmpfs {disk} && ({run} > {tmp_path}/first.txt 2>&1; "
              f"echo $? > {tmp_path}/first.rc; mount -o remount,size=8m tmpfs {disk}; {run} > {tmp_path}/second.txt "
              f"2>&1; echo $? > {tmp_path}/second.rc; cp -r {disk}/runs {tmp_path}/kept)")
    env = {**os.environ, "MLX_CAI_BLAS_THREADS": "1", "COLUMNS": "200"}
    subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], env=env, check=True, timeout=300)
    first = (tmp_path / "first.txt").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first
    assert "no space left on device" in one_error_line(first)
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.txt").read_text()
    kept = tmp_path / "kept" / "t"
    assert (kept / "sft" / adapters.ADAPTER_FILE).is_file() and (kept / "stages" / "sft.json").is_file()
    recs = list(records.read_jsonl(kept / "revise.jsonl"))
    assert len(recs) == len({r["id"] for r in recs}) == 4
