"""One config style for every stage: a dataclass whose fields carry their help text (`opt`), validated in
`__post_init__`, built as defaults < YAML file(s) < command line (`build_config`), written beside the
outputs (`write_config`), and one resume check (`check_unchanged`). Reads YAML; writes config.yaml.

Field metadata:
  help       the text `--help` and the YAML docs show
  resumable  True: may change when a run is continued (e.g. iters); not part of the run's identity
  cli        False: not a command-line option
  flags      the option's names when not --FIELD-NAME
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from mlx_cai import records


class ConfigError(ValueError):
    """A bad setting or config file; one line naming the file (and line) or the setting."""


def opt(default: Any, help: str, *, resumable: bool = False, cli: bool = True, flags: tuple[str, ...] = (),
        **kw) -> Any:
    """A config field with its help text (shown by `--help`); `flags` names its command-line option when it is
    not --FIELD-NAME (e.g. ("--suite", "-s"))."""
    meta = {"help": help, "resumable": resumable, "cli": cli, "flags": flags}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def field_help(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def field_default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping; a missing file or bad YAML is a ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def coerce(cls, values: dict) -> dict:
    """YAML reads 1e-5 as a string and 5 where a float is meant; lists may come as comma-separated text."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for k, v in values.items():
        hint = hints.get(k)
        if hint is float and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                out[k] = float(v)
            except ValueError:
                raise ConfigError(f"{k} must be a number, got {v!r}") from None
    return out


def build_config(cls, layers: Sequence[str | Path | dict] | str | Path | None = None, **overrides):
    """`cls` from its defaults, then each layer in order (a YAML file or a dict), then `overrides` (None
    values are ignored: "not given on the command line"). Unknown keys raise ConfigError naming the source."""
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    if isinstance(layers, (str, Path, dict)):
        layers = [layers]
    for layer in layers or []:
        data, where = (layer, "settings") if isinstance(layer, dict) else (read_yaml(layer), str(layer))
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**coerce(cls, values))


def as_dict(cfg) -> dict:
    """The config as plain YAML/JSON-able values."""
    return _plain(asdict(cfg))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def identity(cfg) -> dict:
    """The settings that define what a run produces: every field but the resumable ones."""
    skip = {f.name for f in fields(cfg) if f.metadata.get("resumable")}
    return {k: v for k, v in as_dict(cfg).items() if k not in skip}


def write_config(cfg, path: str | Path) -> Path:
    path = Path(path)
    records.write_text_atomic(path, yaml.safe_dump(as_dict(cfg), sort_keys=False))
    return path


def changed(saved: dict, now: dict, allowed: Sequence[str] = ()) -> list[str]:
    """Settings whose values differ between a saved run and now (keys only in one of them are ignored)."""
    return [k for k in now if k not in allowed and k in saved and saved[k] != now[k]]


def check_unchanged(saved: dict, now: dict, where: str, *, allowed: Sequence[str] = (),
                    hint: str = "use --from to redo it, or a new output") -> None:
    """The one resume check: continuing a run whose settings changed is refused with one line."""
    diff = changed(saved, now, allowed)
    if diff:
        what = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise ConfigError(f"{where} was made with other settings ({what}); {hint}")
