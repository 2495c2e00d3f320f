"""JSONL, the interchange format of every stage: read with line-numbered errors, append-and-flush, resume.

A stage writes one record per line with a stable `id` and flushes after each, so a killed run can be
continued: `done_ids(path)` says what is already there, and a torn last line (the kill came mid-write)
is dropped by `repair_tail` before appending resumes.

Whole files (summaries, markers, configs, safetensors) are written atomically: a temporary sibling, fsynced, then
renamed over the target, so a reader sees the old file or the new one. A failed write (a full disk) is an OSError
naming the target; the target keeps its old content and no temporary file stays behind. `digest` records a file's
size and sha256 when it is written, `damage` says later whether it still matches.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator


class RecordError(ValueError):
    """Bad input file; the message names the file and line."""


def stable_id(*parts: Any, prefix: str = "") -> str:
    """A short id that depends only on the inputs (so reruns produce the same ids)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return prefix + hashlib.sha256(blob).hexdigest()[:16]


def read_json(path: str | Path) -> dict:
    """A JSON object file (summary, marker, config); a malformed one is a RecordError naming it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: malformed JSON ({e.msg}); delete it to start over") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{path}: expected a JSON object")
    return obj


def row_seed(*parts: Any) -> int:
    """A sampling seed for one row from (run seed, row id, tag...) alone: a resumed or sharded run draws
    what an uninterrupted one-process run would."""
    return int(stable_id(*parts)[:8], 16)


def is_messages(value: Any) -> bool:
    """A non-empty list of {role, content} string messages (the chat format of every stage)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def check_messages(value: Any, where: str, name: str = "messages") -> list[dict]:
    """`value` if it is a chat (is_messages), else a RecordError naming `where`."""
    if not is_messages(value):
        raise RecordError(f"{where}: `{name}` must be a non-empty list of {{role, content}} strings")
    return value


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[dict]:
    """Yield the JSON objects of `path`, skipping blank lines; a bad line raises RecordError naming it."""
    path = Path(path)
    required = tuple(required)
    if not path.exists():
        raise RecordError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        yield from _parse(path, f, required)


def _parse(path: Path, lines: Iterable[str], required: tuple[str, ...] = ()) -> Iterator[dict]:
    """The JSON objects of `lines` (of the file `path`, numbered from 1), blank lines skipped."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise RecordError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        yield obj


def numbered_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", record) for each record of a JSONL file (blank lines skipped, as read_jsonl does)."""
    path = Path(path)
    rows = read_jsonl(path, required)
    with path.open(encoding="utf-8") as f:
        numbers = [i for i, line in enumerate(f, 1) if line.strip()]
    for lineno, row in zip(numbers, rows):
        yield f"{path}:{lineno}", row


def repair_tail(path: str | Path) -> int:
    """Drop a torn final line (no newline, not valid JSON) left by a kill mid-write. Returns bytes removed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            f.write(b"\n")  # a complete record that only lacks its newline: keep it
            return 0
        except ValueError:
            f.truncate(cut)
            return len(data) - cut


def load_done(path: str | Path, key: str = "id") -> dict[str, dict]:
    """Records already in an output file, by id (after repairing a torn tail)."""
    path = Path(path)
    if not path.exists():
        return {}
    repair_tail(path)
    return {r[key]: r for r in read_jsonl(path) if key in r}


def read_complete(path: str | Path, key: str = "id") -> dict[str, dict]:
    """Like load_done, for a reader: a torn final line (a writer killed mid-record, or one still writing) is
    skipped, never cut from the file."""
    path = Path(path)
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    out = {r[key]: r for r in _parse(path, lines) if key in r}
    try:
        obj = json.loads(tail) if tail.strip() else None
    except json.JSONDecodeError:
        obj = None  # torn
    if isinstance(obj, dict) and key in obj:
        out[obj[key]] = obj
    return out


def done_ids(path: str | Path, key: str = "id") -> set[str]:
    return set(load_done(path, key))


class JsonlWriter:
    """Append records to a JSONL file, flushed and fsynced per record so a kill loses at most one."""

    def __init__(self, path: str | Path, sync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = self.path.open("a", encoding="utf-8")
        self._sync = sync

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()
            if self._sync:
                os.fsync(self._f.fileno())
        except OSError as e:
            raise _naming(e, self.path) from None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullWriter:
    """A JsonlWriter that writes nothing: what a process other than rank 0 appends with."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullWriter":
        return self

    def __exit__(self, *exc) -> None:
        pass


def writer(path: str | Path, enabled: bool = True, sync: bool = True) -> JsonlWriter | NullWriter:
    """JsonlWriter(path, sync), or a NullWriter when not `enabled` (e.g. `enabled=distributed.is_main()`)."""
    return JsonlWriter(path, sync=sync) if enabled else NullWriter()


def _naming(e: OSError, path: Path) -> OSError:
    """`e` with the file it happened to (a failed write() names none)."""
    return e if e.filename else type(e)(e.errno, e.strerror or str(e), str(path))


def _atomic(path: str | Path, write, suffix: str = "") -> Path:
    """Write `path` whole: `write(tmp)` fills a temporary sibling (its name ends with `suffix`), which is fsynced
    and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:\..*)?$")  # what _atomic (and fuse) name a temporary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(folder: str | Path) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-PID...`, files or folders) that writers killed mid-write left under
    `folder`: those whose process is gone. Call it holding the folder's lock (mlx_cai.runlock), so no live
    writer of ours can own one. Returns what was removed."""
    removed = []
    for p in sorted(Path(folder).rglob(".*.tmp-*")):
        m = _TMP_NAME.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> Path:
    """Write a whole JSONL file at once (for outputs that are not appended)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    return _atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a whole text file: a kill or a full disk leaves the old file or the new one."""
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """A summary, marker or config written whole (write_text_atomic), indented."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(path: str | Path, arrays: dict, metadata: dict | None = None) -> None:
    """mx.save_safetensors, whose failed write (MLX raises RuntimeError) becomes an OSError naming the file:
    ENOSPC when the disk has less room than the arrays need."""
    import mlx.core as mx

    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as e:
        need = sum(a.nbytes for a in arrays.values())
        full = shutil.disk_usage(Path(path).parent).free < need
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else str(e),
                      str(path)) from None


def save_safetensors_atomic(path: str | Path, arrays: dict, metadata: dict | None = None) -> dict:
    """save_safetensors written whole (like write_text_atomic); returns the file's digest."""
    return digest(_atomic(path, lambda tmp: save_safetensors(tmp, arrays, metadata), suffix=".safetensors"))


def digest(path: str | Path) -> dict:
    """{"bytes", "sha256"} of a file, to record beside it when it is written."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def damage(path: str | Path, recorded: dict) -> str | None:
    """None when `path` still has the recorded size and sha256, else what differs (one phrase)."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != recorded.get("bytes", size):
        return f"{path.name} has {size} bytes, {recorded['bytes']} recorded"
    if digest(path)["sha256"] != recorded.get("sha256"):
        return f"{path.name} does not match its recorded sha256"
    return None
