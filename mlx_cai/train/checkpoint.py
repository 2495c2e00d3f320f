"""The run folder and its checkpoints (rank 0 writes).

Writes into OUT: config.yaml, checkpoints/step-NNNNNNN/ (adapters.safetensors + adapter_config.json,
optimizer.safetensors, state.json with the data position and the size and sha256 of the other files) and
checkpoints/latest; trims metrics.jsonl back to a checkpoint on resume. The RNG is not saved: the loop reseeds it
from (seed, batch index). A checkpoint whose files do not match its state.json (torn, cut, changed) is skipped with
a warning, and the one before is used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_cai import config, distributed, records
from mlx_cai.adapters import ADAPTER_CONFIG, ADAPTER_FILE, save_adapter
from mlx_cai.train.config import TrainConfig, TrainingError


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    batches: int = 0  # training batches consumed (the data position)


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


OPTIMIZER_FILE = "optimizer.safetensors"
CHECKED = (ADAPTER_FILE, ADAPTER_CONFIG, OPTIMIZER_FILE)  # their sizes and sha256 go into state.json


def save_checkpoint(out: Path, pos: Position, model, optimizer, adapter_cfg: dict, keep: int) -> Path:
    """Write checkpoints/step-NNNNNNN/ via a temporary folder and a rename, then point `latest` at it."""
    root = checkpoint_dir(out)
    final = root / f"step-{pos.step:07d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, adapter_cfg)
    records.save_safetensors_atomic(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
    records.write_json_atomic(tmp / "state.json", {**asdict(pos), "time": time.time(),
                                                   "rng": "reseeded per batch from (seed, batch index)",
                                                   "files": {f: records.digest(tmp / f) for f in CHECKED}})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    records.write_text_atomic(root / "latest", final.name)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to continue from: the one `latest` names, else the newest; one that is damaged (see damage)
    is skipped, said through `warn`, and the next older one tried."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    named = [root / pointer.read_text(encoding="utf-8").strip()] if pointer.is_file() else []
    for path in dict.fromkeys(named + sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)):
        if not path.is_dir():
            continue
        problem = damage(path)
        if problem is None:
            return path
        if warn:
            warn(f"checkpoint {path} is damaged ({problem}); skipped, an older one is used if there is one")
    return None


def damage(path: Path) -> str | None:
    """None for a whole checkpoint, else what is wrong: no or a malformed state.json, or a file that does not match
    the size and sha256 state.json recorded (checkpoints written before digests were recorded are not checked)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        Position(step=int(state["step"]), batches=int(state["batches"]))
    except FileNotFoundError:
        return "no state.json"
    except (ValueError, KeyError, TypeError):
        return "state.json does not parse"
    recorded = state.get("files")
    if not isinstance(recorded, dict):  # an older checkpoint: its files must at least be there
        missing = [f for f in (ADAPTER_FILE, OPTIMIZER_FILE) if not (path / f).is_file()]
        return f"{missing[0]} is missing" if missing else None
    return next((d for f, r in recorded.items() if (d := records.damage(path / f, r))), None)


def read_position(path: Path) -> Position:
    """The data position a checkpoint was saved at (its state.json)."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return Position(step=int(state["step"]), batches=int(state["batches"]))


def restore_checkpoint(path: Path, model, optimizer) -> Position:
    """Load the adapter weights and optimizer state of a checkpoint; returns its position."""
    model.load_weights(list(mx.load(str(path / ADAPTER_FILE)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
    return read_position(path)


def check_resume_config(cfg: TrainConfig, out: Path) -> None:
    """A resumed run must have the settings of the run it continues, but for the resumable ones."""
    path = out / "config.yaml"
    if not path.exists():
        return
    resumable = sorted(f.name for f in fields(cfg) if f.metadata.get("resumable") and f.name != "resume")
    config.check_unchanged(config.read_yaml(path), config.identity(cfg), str(out),
                           hint=f"only {', '.join(resumable)} may change on --resume")


def prepare_output(cfg: TrainConfig, resume: bool,
                   warn: Callable[[str], None] | None = None) -> tuple[Path, Path | None]:
    """Create the run folder (rank 0); with `resume`, return the checkpoint to continue from (a damaged one is
    skipped and said through `warn`)."""
    if not cfg.output:
        raise TrainingError("an output folder is required (-o OUT)")
    out = Path(cfg.output)
    ckpt = latest_checkpoint(out, warn if resume else None) if out.exists() else None
    if resume:
        check_resume_config(cfg, out)
    elif ckpt is not None or (out / ADAPTER_FILE).exists():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose a new folder")
    distributed.barrier()  # every process has read the folder before rank 0 changes it
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        config.write_config(cfg, out / "config.yaml")
        if not resume or ckpt is None:  # metrics of a run that never reached a checkpoint
            (out / "metrics.jsonl").unlink(missing_ok=True)
    return out, ckpt if resume else None


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric rows past `step` (written by a run that was killed before its next checkpoint), and a torn last
    row (killed mid-write); rank 0."""
    if not distributed.is_main() or not path.exists():
        return
    records.repair_tail(path)
    keep = [r for r in records.read_jsonl(path) if r.get("step", 0) <= step] if path.stat().st_size else []
    records.write_jsonl_atomic(path, keep)
