"""Every MLX_CAI_* environment variable in one place: its name, default, meaning and parsing.

Reads the process environment when `settings()` is called, never at import; writes nothing. Each call
returns the parsed values (a frozen `Settings`), re-parsed whenever one of the variables changed since the
last call, so a variable set at run time (a test's monkeypatch.setenv) takes effect at its next use.
An empty value counts as unset. A value that does not parse raises SettingsError, one line naming the
variable. `TABLE` lists (variable, default, meaning) for README's "Environment settings" section.

Flags take 1/0, true/false, yes/no or on/off (any case).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """An MLX_CAI_* variable whose value does not parse; one line naming the variable."""


def _flag(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def _whole(name: str, raw: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1:
        raise SettingsError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def _count(name: str, raw: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw):
        raise SettingsError(f"{name} must be a whole number >= 0, got {raw!r}")
    return int(raw)


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise SettingsError(f"{name} must be a number of seconds >= 0, got {raw!r}")
    return value


def _timeout(name: str, raw: str) -> float:
    value = _seconds(name, raw)
    if value == 0:
        raise SettingsError(f"{name} must be a number of seconds > 0, got {raw!r}")
    return value


def _path(name: str, raw: str) -> Path:
    return Path(raw)


def _var(name: str, shown: str, meaning: str, parse: Callable[[str, str], Any]) -> dict:
    """Field metadata: the variable, its default as README shows it, its meaning and its parser."""
    return {"env": name, "shown": shown, "meaning": meaning, "parse": parse}


@dataclass(frozen=True)
class Settings:
    """The parsed MLX_CAI_* variables; a field keeps its default where its variable is unset or empty."""

    home: Path = field(default_factory=lambda: Path.home() / ".cache" / "mlx-cai", metadata=_var(
        "MLX_CAI_HOME", "~/.cache/mlx-cai", "where converted models and other caches live", _path))
    no_openblas: bool = field(default=False, metadata=_var(
        "MLX_CAI_NO_OPENBLAS", "0", "1: skip loading OpenBLAS on Linux (read at import, to measure without it)",
        _flag))
    blas_threads: int | None = field(default=None, metadata=_var(
        "MLX_CAI_BLAS_THREADS", "auto", "OpenBLAS threads (read at import; auto: 1 if other work keeps every core "
        "busy, else all cores; OPENBLAS_NUM_THREADS wins)", _whole))
    kernels: bool = field(default=True, metadata=_var(
        "MLX_CAI_KERNELS", "1", "0: MLX ops instead of the C++ CPU kernels", _flag))
    fast_ops: bool = field(default=True, metadata=_var(
        "MLX_CAI_FAST_OPS", "1", "0: training and scoring keep mlx-lm's own SwiGLU and attention ops", _flag))
    packed_train: bool = field(default=True, metadata=_var(
        "MLX_CAI_PACKED_TRAIN", "1", "0: training multiplies frozen layers with BLAS, not packed weights", _flag))
    dequantize: bool | None = field(default=None, metadata=_var(
        "MLX_CAI_DEQUANTIZE", "auto", "1/0: dequantize models on load or keep them quantized (auto: on the CPU "
        "only; the CLI flags win)", _flag))
    stream_rows: int = field(default=16, metadata=_var(
        "MLX_CAI_STREAM_ROWS", "16", "fewest rows per CPU stream when generation splits decode steps over streams "
        "(MLX ops only)", _whole))
    kv_reuse_mb: int = field(default=2048, metadata=_var(
        "MLX_CAI_KV_REUSE_MB", "2048", "MiB of finished rows' K/V the compiled generation path keeps per model, so a "
        "later prompt that extends one (a revision after its critique) prefills only what is new; 0: off", _count))
    train_streams: int | None = field(default=None, metadata=_var(
        "MLX_CAI_TRAIN_STREAMS", "auto", "CPU streams a training step splits its batch over (auto: one per BLAS "
        "thread on the CPU, 1 on a GPU)", _whole))
    progress_every: float = field(default=30.0, metadata=_var(
        "MLX_CAI_PROGRESS_EVERY", "30", "seconds between plain progress lines when the output is not a terminal",
        _seconds))
    api_timeout: float = field(default=120.0, metadata=_var(
        "MLX_CAI_API_TIMEOUT", "120", "seconds an OpenAI-compatible server may take per request before it counts as "
        "failed (and is retried)", _timeout))
    api_retries: int = field(default=5, metadata=_var(
        "MLX_CAI_API_RETRIES", "5", "retries of a request that failed transiently (connection, timeout, 408/409/"
        "429/5xx), by the openai client: Retry-After honoured, else exponential backoff", _count))
    api_backoff: float = field(default=1.0, metadata=_var(
        "MLX_CAI_API_BACKOFF", "1", "first retry delay in seconds when the server gives no Retry-After; doubles "
        "per retry, with jitter", _seconds))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Parse the variables of `environ` (default: the process environment)."""
        environ = os.environ if environ is None else environ
        given = {}
        for f in fields(cls):
            raw = (environ.get(f.metadata["env"]) or "").strip()
            if raw:
                given[f.name] = f.metadata["parse"](f.metadata["env"], raw)
        return cls(**given)


VARIABLES: tuple[str, ...] = tuple(f.metadata["env"] for f in fields(Settings))
TABLE: tuple[tuple[str, str, str], ...] = tuple(
    (f.metadata["env"], f.metadata["shown"], f.metadata["meaning"]) for f in fields(Settings))

_cached: tuple[tuple, Settings] | None = None  # (the raw values it was parsed from, the settings)


def settings() -> Settings:
    """The current settings: parsed again only when a variable (or HOME, for the default home) changed."""
    global _cached
    key = tuple(os.environ.get(name) for name in VARIABLES) + (os.environ.get("HOME"),)
    if _cached is None or _cached[0] != key:
        _cached = (key, Settings.from_env())
    return _cached[1]


def markdown_table() -> str:
    """TABLE as the Markdown table README shows."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {shown} | {meaning} |" for name, shown, meaning in TABLE]
    return "\n".join(rows)
