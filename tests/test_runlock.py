"""One run per folder (mlx_cai.runlock): a second `mlx-cai run` or stage command on a folder in use stops with one
line naming the other process; a lock left by a killed process is taken over; the lock goes when its holder ends.
The other process is a real one (a Python child holding the lock), so pids, liveness and SIGKILL are real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlx_cai import pipeline, runlock
from mlx_cai.cli import app

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from mlx_cai import runlock
target, command, run = sys.argv[1], sys.argv[2], sys.argv[3] == "run"
with runlock.hold(target, command, run=run):
    print("held", flush=True)
    time.sleep(600)
"""


class Holder:
    """A child process holding a lock until it is killed."""

    def __init__(self, target: Path, command: str, run: bool):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), command, "run" if run else "out"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        assert line.strip() == "held", self.proc.stderr.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield lambda *a: started.append(Holder(*a)) or started[-1]
    for h in started:
        h.kill()


def tiny_run(tmp_path: Path, model: str) -> Path:
    later = [s for s in pipeline.STAGES if s != "revise"]
    config = {"name": "t", "model": model, "runs_dir": str(tmp_path / "runs"), "skip": later,
              "revise": {"prompts": "train:harmful", "limit": 1, "shots": 0, "max_tokens": 2, "batch_size": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) >= 1 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_second_run_on_a_folder_in_use_stops_then_a_killed_holder_is_taken_over(tmp_path, tiny_gguf, holders):
    config = tiny_run(tmp_path, str(tiny_gguf))
    run_dir = tmp_path / "runs" / "t"
    first = holders(run_dir, "run", True)
    said = error_line(CliRunner().invoke(app, ["run", str(config)]))
    assert f"is in use by pid {first.pid} on {socket.gethostname()}" in said and "`mlx-cai run`" in said
    assert not (run_dir / "revise.jsonl").exists()  # nothing was touched
    first.kill()  # SIGKILL: no clean-up ran, the lock file stays behind, stale
    assert json.loads((run_dir / runlock.RUN_LOCK).read_text())["pid"] == first.pid
    r = CliRunner().invoke(app, ["run", str(config)])
    assert r.exit_code == 0, r.output
    assert (run_dir / "stages" / "revise.json").exists()
    assert not (run_dir / runlock.RUN_LOCK).exists()  # released at the end


def test_stage_command_inside_a_running_run_folder_is_refused(tmp_path, tiny_gguf, holders):
    run_dir = tmp_path / "runs" / "t"
    holder = holders(run_dir, "run", True)
    out = run_dir / "eval" / "base"
    r = CliRunner().invoke(app, ["eval", "-o", str(out), "-m", str(tiny_gguf), "--suite", "harm", "--limit", "1"])
    said = error_line(r)
    assert f"in use by pid {holder.pid}" in said and "`mlx-cai run`" in said
    assert not out.exists()


def test_two_stage_commands_on_one_output_and_a_run_over_a_busy_output(tmp_path, tiny_gguf, holders):
    out = tmp_path / "runs" / "t" / "revise.jsonl"
    holder = holders(out, "revise", False)
    r = CliRunner().invoke(app, ["revise", "train:harmful", "-o", str(out), "-m", str(tiny_gguf), "--limit", "1"])
    said = error_line(r)
    assert f"in use by pid {holder.pid}" in said and "`mlx-cai revise`" in said
    assert not out.exists()
    # a whole run over the folder that output is in waits for the stage command too
    with pytest.raises(runlock.LockError, match=f"in use by pid {holder.pid}"):
        pipeline.run(pipeline.load_config(tiny_run(tmp_path, str(tiny_gguf))))
    assert not (tmp_path / "runs" / "t" / runlock.RUN_LOCK).exists()  # it did not keep a half-taken lock


def test_generate_on_an_output_in_use_is_refused(tmp_path, tiny_gguf, holders):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "o.jsonl"
    holder = holders(out, "generate", False)
    r = CliRunner().invoke(app, ["generate", str(prompts), "-o", str(out), "-m", str(tiny_gguf)])
    assert f"in use by pid {holder.pid}" in error_line(r)


def test_released_on_errors_and_ctrl_c(tmp_path):
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with runlock.hold(tmp_path / "run", "run", run=True) as path:
                assert json.loads(path.read_text())["pid"] == os.getpid()
                raise exc
        assert not path.exists()


def test_stale_lock_of_a_dead_pid_is_taken_over_and_a_torn_one_too(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = runlock.lock_path(tmp_path / "out.jsonl", run=False)
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then", "command": "x"}))
    with runlock.hold(tmp_path / "out.jsonl", "revise") as held:
        assert held == path and json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text('{"pid": 12')  # torn by a kill while it was written, long ago
    os.utime(path, (time.time() - 60, time.time() - 60))
    with runlock.hold(tmp_path / "out.jsonl", "revise"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_from_another_host_counts_as_held(tmp_path):
    path = runlock.lock_path(tmp_path / "run", run=True)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 1, "host": "mac2.local", "started": "2025-01-01T00:00:00", "command": "run"}))
    with pytest.raises(runlock.LockError) as e:
        with runlock.hold(tmp_path / "run", "run", run=True):
            pass
    msg = str(e.value)
    assert "\n" not in msg and "pid 1 on mac2.local" in msg and f"delete {path}" in msg
    assert json.loads(path.read_text())["host"] == "mac2.local"  # left alone


RACER = """
import os, sys, time
from mlx_cai import distributed, runlock
distributed.is_main()  # imports done before the start
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    with runlock.hold(sys.argv[1], "run", run=True):
        print("got", flush=True)
        deadline = time.time() + 60
        while not os.path.exists(sys.argv[3]) and time.time() < deadline:  # held until every other racer is done
            time.sleep(0.01)
except runlock.LockError as e:
    print("refused", e, flush=True)
"""


def test_processes_racing_for_a_stale_lock_get_it_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "run"
    path = runlock.lock_path(target, run=True)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then", "command": "run"}))
    go, release = tmp_path / "go", tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(target), str(go), str(release)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()  # all at once
    deadline = time.time() + 60
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.05)  # the holder keeps it until the other three have finished, however slow they are
    release.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    said = [o.strip().split()[0] if o.strip() else e for o, e in outs]
    assert sorted(said) == ["got", "refused", "refused", "refused"], outs
    assert not path.exists()


def test_a_late_take_over_leaves_the_lock_taken_meanwhile_in_place(tmp_path):
    """A process that found the lock stale, but whose turn comes after another process replaced it, removes
    nothing: the fresh lock stays (same file), and the stale one is removed when it is still there."""
    path = runlock.lock_path(tmp_path / "run", run=True)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "command": "run"}))
    stale, _, held = runlock._stale_or_held(path)
    assert stale is not None and not held
    path.unlink()  # another process took the stale lock over ...
    with runlock.hold(tmp_path / "run", "run", run=True):  # ... and a live one holds the folder now
        before = path.read_text(), path.stat().st_ino
        runlock._take_over(path, stale)
        assert (path.read_text(), path.stat().st_ino) == before
        assert not path.with_name(path.name + ".break").exists()
    path.write_text("")  # torn by a kill long ago, then found stale: removed on the turn
    os.utime(path, (time.time() - 60, time.time() - 60))
    stale, _, held = runlock._stale_or_held(path)
    runlock._take_over(path, stale)
    assert not path.exists()
