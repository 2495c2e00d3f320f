"""Stage commands generated from their config dataclasses: one option per field (its help from the field, its
default shown from the field), so a command and its config cannot drift.

Every option defaults to "not given", so a value comes from the command line, else `--config FILE`, else the
field's default (mlx_cai.config.build_config). A field named in `positional` is an argument instead.
"""

from __future__ import annotations

import inspect
import types
import typing
from contextlib import nullcontext
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Callable, List, Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import BUDGET_HELP, user_errors

SHORT = {"output": ("--output", "-o"), "model": ("--model", "-m")}


def _bare(hint):
    """X for Optional[X]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _is_list(hint) -> bool:
    return typing.get_origin(_bare(hint)) in (list, tuple)


def _shown_default(f) -> str | bool:
    value = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
    if value in (None, "", [], ()):
        return False
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _param(f, hint, positional: bool) -> inspect.Parameter:
    help_text = f.metadata.get("help", "")
    if positional:
        annotation = List[str] if _is_list(hint) else str
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Argument(..., help=help_text, show_default=False,
                                                        metavar=f.name.upper()))
    typ = List[str] if _is_list(hint) else _bare(hint)
    flag = "--" + f.name.replace("_", "-")
    decls = f.metadata.get("flags") or SHORT.get(f.name, (flag,))
    if typ is bool:
        decls = (f"{decls[0]}/--no-{decls[0][2:]}", *decls[1:])
    default = typer.Option(None, *decls, help=help_text, show_default=_shown_default(f))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[typ], default=default)


def config_params(cls, positional: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    cli = [f for f in fields(cls) if f.metadata.get("cli", True)]
    first = [f for name in positional for f in cli if f.name == name]
    rest = [f for f in cli if f.name not in positional]
    return [_param(f, hints[f.name], True) for f in first] + [_param(f, hints[f.name], False) for f in rest]


def _values(cls, given: dict) -> dict:
    """Command-line values as config values: repeatable list options joined and split on commas."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in given.items():
        if _is_list(hints[k]) and v is not None:
            v = [part.strip() for item in v for part in str(item).split(",") if part.strip()] or None
        out[k] = v
    return out


def build(cls, given: dict, config_file: Path | None):
    """The config from defaults < the run's own saved config.yaml (on --resume) < --config FILE < options."""
    from mlx_cai import config

    given = _values(cls, given)
    saved = Path(given["output"]) / "config.yaml" if given.get("resume") and given.get("output") else None
    layers = [p for p in (saved if saved and saved.exists() else None, config_file) if p]
    return config.build_config(cls, layers, **given)


def preflight(stage: str, cfg, memory_budget: float | None) -> None:
    """Stop with one line (MemoryBudgetError) when the stage's estimated peak exceeds the budget."""
    from mlx_cai import memcheck

    ctx = memcheck.context(stage, memcheck.flag, getattr(cfg, "model", None))
    memcheck.check([(stage, memcheck.stage_estimate(cfg, ctx))], memcheck.budget(memory_budget))


def stage_command(name: str, cls, run: Callable, *, positional: tuple[str, ...] = (),
                  render: Callable | None = None, doc: str = "") -> None:
    """Register `mlx-cai NAME`: build the config from the options, run the stage with progress bars while holding
    the lock of its output (mlx_cai.runlock: a second command on the same output, or on one inside a folder a
    `mlx-cai run` holds, stops with one line naming the other process), then `render(config, output_path)` on
    rank 0."""

    def command(**kw) -> None:
        from mlx_cai import distributed, runlock, ui

        config_file = kw.pop("config")
        memory_budget = kw.pop("memory_budget", None)
        with user_errors():
            cfg = build(cls, kw, config_file)
            if hasattr(cls, "memory"):  # before the lock and any output: a config that cannot fit writes nothing
                preflight(name, cfg, memory_budget)
            output = getattr(cfg, "output", None)
            with runlock.hold(output, name) if output else nullcontext():  # one writer per output
                with ui.StageProgress() as bars:
                    out = run(cfg, bars)
            if distributed.is_main() and render is not None:  # rank 0 wrote the outputs and prints them
                render(cfg, out)

    params = config_params(cls, positional)
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, "--config", "-c", help="YAML file of settings "
                                                         "(command-line options override it)")))
    if hasattr(cls, "memory"):
        params.append(inspect.Parameter("memory_budget", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[float],
                                        default=typer.Option(None, "--memory-budget", help=BUDGET_HELP)))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)
