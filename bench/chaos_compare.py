"""The chaos harness's checks (bench/chaos.py), on run folders, in plain Python and NumPy (no MLX).

  torn(root)          files under their final names that are not whole: a JSON, YAML or safetensors file that does
                      not parse or is cut short, a JSONL line that does not parse but the last, a `latest` checkpoint
                      pointer to nothing. A kill may leave a torn JSONL tail (the rerun repairs it); nothing else.
  unfinished(root)    what a finished run must not hold: torn tails, duplicate ids in a JSONL file
  differences(a, b)   what differs between two finished run folders: the same files, the same records by id (or by
                      line where records have no id), equal JSON, safetensors equal within float tolerance.

Hidden files (temporary files, locks) are not results and are skipped, as are report.html/report.md (they print
the timings) and checkpoints other than the latest (how many are kept aside differs with the kills). Fields that
measure time, when or how a run went are ignored (TIMING), and recorded file digests (DIGEST).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import yaml

# Wall-clock fields (eval records and summaries, training metrics and summaries, markers, checkpoint state) and
# ones that say how the run went rather than what it made: resumed_from_step (a resumed run started at step k).
TIMING = {"gen_seconds", "judge_seconds", "seconds", "tokens_per_second", "tok_per_s", "reference_seconds",
          "train_seconds", "pairs_per_second", "time", "written", "finished", "load_avg_15min",
          "resumed_from_step"}
# A recorded {bytes, sha256} of a file (checkpoint state, adapter config, marker) is not compared: the files are
# (adapters within float tolerance, so their digests may differ; configs name their own folder's paths).
DIGEST = {"bytes", "sha256"}
MARKER_KEYS = ("stage", "config")  # a stage marker's results; the rest is how long it took, on what machine
SKIP_NAMES = {"report.html", "report.md"}
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64,
          "U32": np.uint32, "U64": np.uint64, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}
# Float tolerance: a resumed reference pass or training step batches differently and rounds differently (DPO's
# rewards are beta x a difference of two log-probs near -100: one float32 rounding there is ~1e-6).
REL, ABS = 1e-4, 1e-5
NOISE = 1e-4  # a DPO reward margin this small is rounding


def results(root: Path) -> list[Path]:
    """The result files of a run folder (relative), as compared: not hidden, not old checkpoints, not reports."""
    latest = _latest_steps(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.name in SKIP_NAMES or p.is_dir():
            continue
        if "checkpoints" in rel.parts:
            i = rel.parts.index("checkpoints")
            if rel.parts[i + 1:i + 2] != ("latest",) and root.joinpath(*rel.parts[:i + 2]) not in latest:
                continue
        out.append(rel)
    return out


def _latest_steps(root: Path) -> set[Path]:
    found = set()
    for pointer in root.rglob("checkpoints/latest"):
        found.add(pointer.parent / pointer.read_text(encoding="utf-8").strip())
    return found


def safetensors(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file; ValueError when it is cut short or its header does not parse."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError("shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError("header runs past the end of the file")
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end != len(body):
        raise ValueError(f"data is {len(body)} bytes, the header says {end}")
    return {k: np.frombuffer(body[t["data_offsets"][0]:t["data_offsets"][1]], DTYPES[t["dtype"]]).reshape(t["shape"])
            for k, t in header.items() if k != "__metadata__"}


def jsonl_rows(path: Path) -> tuple[list[dict], bool]:
    """(records, torn tail?) of a JSONL file; ValueError for a bad line that is not the last."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # after the final newline: "" unless the last record is torn
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"line {i} does not parse") from None
    return rows, bool(tail.strip())


def torn(root: Path) -> list[str]:
    """Files of `root` under their final names that are not whole (a JSONL torn tail is allowed)."""
    problems = []
    for rel in results(root):
        p = root / rel
        try:
            if p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
            elif p.suffix == ".yaml":
                yaml.safe_load(p.read_text(encoding="utf-8"))
            elif p.suffix == ".safetensors":
                safetensors(p)
            elif p.suffix == ".jsonl":
                jsonl_rows(p)
            elif p.name == "latest" and not (p.parent / p.read_text(encoding="utf-8").strip() / "state.json").is_file():
                raise ValueError("points at no complete checkpoint")
        except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
            problems.append(f"{rel}: {e}")
    return problems


def unfinished(root: Path) -> list[str]:
    """Torn tails and duplicate ids in the JSONL files of a finished run."""
    problems = []
    for rel in results(root):
        if rel.suffix != ".jsonl":
            continue
        rows, tail = jsonl_rows(root / rel)
        if tail:
            problems.append(f"{rel}: torn last line")
        ids = [r["id"] for r in rows if "id" in r]
        if len(ids) != len(set(ids)):
            problems.append(f"{rel}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})[:3]}")
    return problems


def _plain(obj, roots: tuple[str, ...]):
    """`obj` without TIMING fields, with paths under the run folders' roots as <RUN>. A DPO row's reward accuracy
    (the share of pairs whose chosen reward is the higher) is dropped where the margin is float noise (step 1: the
    policy is the reference, both rewards are 0 up to rounding, and which is higher differs from run to run)."""
    if isinstance(obj, dict) and set(obj) == DIGEST:
        return "<digest>"
    if isinstance(obj, dict):
        noise = abs(obj.get("rewards/margins", 1.0)) < NOISE
        return {k: _plain(v, roots) for k, v in obj.items()
                if k not in TIMING and not (noise and k == "rewards/accuracies")}
    if isinstance(obj, list):
        return [_plain(v, roots) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(r, "<RUN>")
    return obj


def same(a, b, where: str = "") -> str | None:
    """None when equal (floats within REL/ABS), else the first difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a.keys() ^ b.keys())[:4]} in one only"
        return next((d for k in a if (d := same(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := same(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(a, b, rel_tol=REL, abs_tol=ABS)
        return None if ok else f"{where}: {a!r} vs {b!r}"
    return None if a == b else f"{where}: {str(a)[:60]!r} vs {str(b)[:60]!r}"


def _load(p: Path, roots: tuple[str, ...]):
    if p.suffix == ".jsonl":
        rows, _ = jsonl_rows(p)
        rows = [_plain(r, roots) for r in rows]
        if rows and all("id" in r for r in rows):
            return {r["id"]: r for r in rows}
        return rows
    if p.suffix == ".json":
        obj = _plain(json.loads(p.read_text(encoding="utf-8")), roots)
        return {k: obj.get(k) for k in MARKER_KEYS} if p.parent.name == "stages" else obj
    if p.suffix == ".yaml":
        return _plain(yaml.safe_load(p.read_text(encoding="utf-8")), roots)
    return _plain(p.read_text(encoding="utf-8"), roots)


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the finished run folders `a` and `b` (empty: the same results). Paths inside the
    folders' parents' parents (runs_dir/NAME) count as the same."""
    roots = (str(a.parent.parent), str(b.parent.parent))
    fa, fb = results(a), results(b)
    diffs = [f"{rel}: only in {which}" for rel, which in
             [*((r, a.name) for r in sorted(set(fa) - set(fb))), *((r, b.name) for r in sorted(set(fb) - set(fa)))]]
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = a / rel, b / rel
        if rel.suffix == ".safetensors":
            x, y = safetensors(pa), safetensors(pb)
            if x.keys() != y.keys():
                diffs.append(f"{rel}: tensors {sorted(x.keys() ^ y.keys())[:3]} in one only")
            bad = [k for k in x if k in y and (x[k].shape != y[k].shape or not np.allclose(
                x[k].astype(np.float64), y[k].astype(np.float64), rtol=REL, atol=ABS))]
            if bad:
                diffs.append(f"{rel}: tensor {bad[0]} differs (max |diff| "
                             f"{np.abs(x[bad[0]].astype(np.float64) - y[bad[0]].astype(np.float64)).max():.3g})")
            continue
        d = same(_load(pa, roots), _load(pb, roots), str(rel))
        if d:
            diffs.append(d)
    return diffs
