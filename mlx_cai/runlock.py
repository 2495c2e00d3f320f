"""One writer per run folder or output: a lock file naming the process that holds it.

  hold(folder, "run")          `mlx-cai run`: the lock is FOLDER/.mlx-cai.lock
  hold(output, "eval", ...)    a stage command: the lock is .NAME.mlx-cai.lock beside its output file or folder

A lock file holds JSON: pid, host, start time and the command. It is created with O_CREAT | O_EXCL, so of two
processes starting at once exactly one gets it; the other stops with LockError, one line naming the holder.
A lock left by a process that died (same host, pid no longer running) is stale and taken over. A lock from
another host (a shared folder) cannot be checked and counts as held. A stage command also stops when a
`mlx-cai run` holds a folder its output lies in, and a run stops when a stage command is writing inside its
folder. The lock is removed when the holder leaves `hold` (also on an exception or Ctrl-C); a SIGKILL leaves it
stale. Under mlx.launch only rank 0 takes it, and every process stops when rank 0 cannot.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RUN_LOCK = ".mlx-cai.lock"  # a run folder's lock, inside it
SUFFIX = ".mlx-cai.lock"  # every lock file's name ends so: .NAME.mlx-cai.lock beside a stage output


class LockError(ValueError):
    """The folder or output is in use by another process; one line naming it."""


def lock_path(target: str | Path, run: bool) -> Path:
    target = Path(target)
    return target / RUN_LOCK if run else target.parent / f".{target.name}{SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def _read(path: Path) -> tuple[str | None, dict | None, tuple | None]:
    """(raw text, holder, file identity) of a lock file: text None when there is none; holder None when the file is
    empty or not a lock (being written, or torn by a kill). Identity = (inode, mtime in ns), from the same open
    file as the text."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, None, None
    except OSError:
        return "", None, None
    try:
        st = os.fstat(fd)
        ident = (st.st_ino, st.st_mtime_ns)
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "", None, None
    finally:
        os.close(fd)
    try:
        info = json.loads(text)
    except ValueError:
        return text, None, ident
    return text, (info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None), ident


def _held(info: dict) -> bool:
    """Whether the holder may still be running: always, for a process on another host."""
    if info.get("host") != socket.gethostname():
        return True
    return _alive(info["pid"])


def _describe(info: dict, path: Path) -> str:
    what = f"`mlx-cai {info.get('command', '?')}`"
    return (f"pid {info['pid']} on {info.get('host', '?')} ({what}, since {info.get('started', '?')}); wait for it "
            f"to finish or stop it (if it is gone, delete {path})")


def _stale_or_held(path: Path) -> tuple[tuple[str, tuple | None] | None, dict | None, bool]:
    """(identity, holder, held?) of a lock file: identity (raw text, (inode, mtime)), None when there is none now.
    A lock still empty a moment after it appeared is being written; one empty for longer was left by a process
    killed while writing it: stale."""
    while True:
        text, info, ident = _read(path)
        if text is None:
            return None, None, False
        if info is not None:
            return (text, ident), info, _held(info)
        if ident is None or time.time() - ident[1] / 1e9 >= 2.0:
            return (text, ident), None, False
        time.sleep(0.1)


def _take_over(path: Path, stale: tuple[str, tuple | None]) -> None:
    """Remove a stale lock. Processes that find it stale at once take turns through PATH.break (O_EXCL; one left
    by a process killed in these few lines is cleared after 10 s). The turn holder removes the lock only if it is
    still the stale one (same text, inode and mtime): a fresh lock taken meanwhile by another process is left
    alone, and the lock's name is never empty while it holds a live lock (so nobody slips in beside its holder).
    While the turn is held the stale lock cannot change: only a turn holder removes a lock it did not write, and
    the stale lock's writer is gone."""
    breaker = path.with_name(path.name + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - breaker.stat().st_mtime > 10:
                breaker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    try:
        text, _, ident = _read(path)
        if (text, ident) == stale:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


def _acquire(path: Path, info: dict, where: Path) -> None:
    data = json.dumps(info).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale, holder, held = _stale_or_held(path)
            if held:
                raise LockError(f"{where} is in use by {_describe(holder, path)}") from None
            if stale is not None:
                _take_over(path, stale)
            continue
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    raise LockError(f"{where}: could not take the lock {path} (other processes keep taking it); try again")


def _release(path: Path, info: dict) -> None:
    _, holder, _ = _read(path)
    if holder and holder.get("token") == info["token"]:  # ours, not one that took over a lock we lost
        path.unlink(missing_ok=True)


def _live_run_above(target: Path) -> tuple[Path, dict] | None:
    """A run lock held in `target` or a folder above it."""
    for folder in [target, *target.parents]:
        path = folder / RUN_LOCK
        if path.is_file():
            _, holder, held = _stale_or_held(path)
            if held and holder:
                return path, holder
    return None


def _live_locks_below(folder: Path, own: Path) -> tuple[Path, dict] | None:
    """A held stage lock inside a run folder."""
    if not folder.is_dir():
        return None
    for path in folder.rglob(f"*{SUFFIX}"):
        if path == own or not path.is_file():
            continue
        _, holder, held = _stale_or_held(path)
        if held and holder:
            return path, holder
    return None


def _check(target: Path, run: bool, own: Path) -> None:
    found = _live_locks_below(target, own) if run else _live_run_above(target)
    if found:
        path, holder = found
        raise LockError(f"{target} is in use by {_describe(holder, path)}")


@contextmanager
def hold(target: str | Path, command: str, *, run: bool = False) -> Iterator[Path | None]:
    """Hold the lock of `target` (a run folder when `run`, else a stage's output file or folder) while the block
    runs. Raises LockError, one line naming the holder, when another live process has it. Yields the lock path
    (None on ranks other than 0)."""
    from mlx_cai import distributed

    target = Path(target).absolute()
    path = lock_path(target, run)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, "token": os.urandom(8).hex()}
    error = None
    if distributed.is_main():
        try:
            _acquire(path, info, target)
            try:
                _check(target, run, path)
            except LockError:
                _release(path, info)
                raise
        except LockError as e:
            error = str(e)
    error = distributed.from_main(error)  # every process stops when rank 0 could not take the lock
    if error:
        raise LockError(error if distributed.is_main() else f"rank 0: {error}")
    try:
        yield path if distributed.is_main() else None
    finally:
        if distributed.is_main():
            _release(path, info)
