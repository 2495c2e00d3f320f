"""The chaos harness's child (bench/chaos.py): `mlx-cai ARGS...` that dies by SIGKILL inside one of its file writes.

    python bench/chaos_child.py LOG - -- run CONFIG      count mode: log every file write, by stage, to LOG
    python bench/chaos_child.py LOG STAGE:N -- run ...   SIGKILL itself inside the N-th file write of STAGE

A file write is one of (the kill leaves what a kill at that instant would):
  jsonl        a JSONL record append: half the line is written and flushed, then the kill (a torn line)
  safetensors  mx.save_safetensors: the file is written, cut to half its size, then the kill
  replace      os.replace (the rename of an atomic write): the kill just before it (odd N) or just after (even N)
  rmtree       shutil.rmtree of an existing folder: one file inside it is removed, then the kill
The stage is the pipeline stage running (its marker write counts as its own); writes before the first stage
count as "startup". LOG gets one JSON line per counted write (count mode) or the one the kill came in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys


def main(argv: list[str]) -> None:
    log, target, sep, *args = argv
    assert sep == "--", "usage: chaos_child.py LOG STAGE:N|- -- MLX-CAI ARGS"
    stage, n = (None, 0) if target == "-" else (target.rsplit(":", 1)[0], int(target.rsplit(":", 1)[1]))
    install(log, stage, n)
    from mlx_cai.cli import main as cli

    sys.argv = ["mlx-cai", *args]
    cli()


def install(log: str, target: str | None, n: int) -> None:
    import mlx.core as mx

    from mlx_cai import records, stages

    state = {"stage": "startup", "count": 0}
    real_run, real_replace, real_rmtree = stages.Stage.run, os.replace, shutil.rmtree
    real_save, real_write = mx.save_safetensors, records.JsonlWriter.write

    def note(kind: str, path, **extra) -> None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": state["stage"], "n": state["count"], "kind": kind, "path": str(path),
                                **extra}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def hit(kind: str, path) -> bool:
        """Count one write; True when the kill comes in it (logged first)."""
        state["count"] += 1
        if target is None:
            note(kind, path)
            return False
        if state["stage"] == target and state["count"] == n:
            note(kind, path, killed=True)
            return True
        return False

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def run(self, config, progress=None):
        state.update(stage=self.name, count=0)
        return real_run(self, config, progress)

    def write(self, record):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if hit("jsonl", self.path):
            self._f.write(line[: len(line) // 2])
            self._f.flush()
            os.fsync(self._f.fileno())
            die()
        return real_write(self, record)

    def save(path, arrays, *a, **kw):
        real_save(path, arrays, *a, **kw)
        if hit("safetensors", path):
            os.truncate(path, os.path.getsize(path) // 2)
            die()

    def replace(src, dst, *a, **kw):
        if not hit("replace", dst):
            return real_replace(src, dst, *a, **kw)
        if n % 2:
            die()
        real_replace(src, dst, *a, **kw)
        die()

    def rmtree(path, *a, **kw):
        if os.path.isdir(path) and hit("rmtree", path):
            for root, _, files in os.walk(path):
                if files:
                    os.remove(os.path.join(root, sorted(files)[0]))
                    break
            die()
        return real_rmtree(path, *a, **kw)

    stages.Stage.run = run
    records.JsonlWriter.write = write
    mx.save_safetensors = save
    os.replace = replace
    shutil.rmtree = rmtree


if __name__ == "__main__":
    main(sys.argv[1:])
