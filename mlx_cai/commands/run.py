"""`mlx-cai run CONFIG.yaml`: the whole pipeline (see mlx_cai.pipeline)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import BUDGET_HELP, user_errors

ASSUMED_TOK_S = {"cpu": 100.0, "gpu": 400.0}  # used by --dry-run when no run has measured this model yet


def _stages_in(cfg, start: str | None, until: str | None) -> list[str]:
    """The enabled stages from `start` (or the first) to `until` (or the last): those this command may run."""
    stages = cfg.enabled()
    lo = stages.index(start) if start in stages else 0
    hi = stages.index(until) + 1 if until in stages else len(stages)
    return stages[lo:hi]


def _to_run(cfg, start: str | None, until: str | None) -> list[str]:
    """Of those, the stages this command will run: without --from, a finished stage is skipped (and needs no
    memory). A marker the run would refuse counts as to run: the run itself says why."""
    from mlx_cai import pipeline

    def finished(stage: str) -> bool:
        try:
            return start is None and pipeline.is_done(cfg, stage)
        except pipeline.PipelineError:
            return False

    return [s for s in _stages_in(cfg, start, until) if not finished(s)]


def _parse_set(values: list[str]) -> dict:
    import yaml

    out = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value (e.g. sft.iters=50), got '{v}'")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _hooks():
    from mlx_cai import pipeline, ui

    @contextmanager
    def progress(stage: str):
        with ui.StageProgress() as bars:
            yield bars

    return pipeline.Hooks(
        stage_start=lambda i, n, s: ui.note(f"[bold cyan]stage {i}/{n}: {s}[/]"),
        stage_skip=lambda s, why: ui.note(f"[dim]stage {s}: {why}, skipped[/]"),
        stage_done=lambda s, secs: ui.note(f"[green]stage {s} done in {secs / 60:.1f} min[/]"),
        warning=lambda text: ui.note(f"[yellow]warning: {text}[/]"),
        progress=progress,
    )


def _work_units(stage: str, settings: dict) -> float | None:
    """How much work a stage's settings ask for (its config class says: prompts, examples, ...)."""
    from mlx_cai.stages import REGISTRY

    units = getattr(REGISTRY[stage].config_cls, "work_units", None)
    return units(settings) if units else None


def measured_seconds_per_unit(runs_dir: str | Path, model: str) -> dict[str, float]:
    """Seconds per unit of work (see _work_units) of each stage module ("evaluate" for eval-*), from the
    newest finished stage marker of an earlier run of the same model."""
    from mlx_cai.stages import REGISTRY

    out: dict[str, float] = {}
    markers = sorted(Path(runs_dir).glob("*/stages/*.json"), key=lambda m: m.stat().st_mtime)
    for m in markers:
        try:
            d = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        config, stage = d.get("config") or {}, d.get("stage", "")
        if stage not in REGISTRY or not isinstance(config, dict):
            continue
        units = _work_units(stage, config)
        if config.get("model") == model and units and d.get("seconds"):
            out[REGISTRY[stage].module] = d["seconds"] / units
    return out


def plan_rows(cfg) -> list[list]:
    """Stages, models, data sizes and estimated tokens/time for --dry-run: time from earlier runs' measured
    seconds per prompt/example of the same stage and model where there are any, else from tokens at a rate."""
    from mlx_cai import backend, config, pipeline
    from mlx_cai.stages import REGISTRY

    rate = _measured_rate(cfg) or ASSUMED_TOK_S[backend.default_device()]
    per_unit = measured_seconds_per_unit(cfg.runs_dir, cfg.model)
    rows = []
    for stage in cfg.enabled():
        sc = pipeline.stage_config(cfg, stage)
        model = getattr(sc, "model", cfg.model)
        adapter = getattr(sc, "adapter", None)
        size, tokens = sc.plan() if hasattr(sc, "plan") else ("", 0)
        est = f"{tokens:,} tok, ~{tokens / rate / 60:.0f} min" if tokens else ""
        units = _work_units(stage, config.as_dict(sc))
        kind = REGISTRY[stage].module
        if units and kind in per_unit:
            est = f"~{units * per_unit[kind] / 60:.1f} min (measured)"
        rows.append([stage, f"{model}{' + ' + Path(adapter).name if adapter else ''}{_roles(sc)}", size, est])
    return rows


ROLES = (("critic", "critic"), ("helpful_model", "helpful answers"), ("judge", "judge"),
         ("boundary_model", "boundary pairs"))


def _roles(sc) -> str:
    """The stage's other models (critic, helpful answers, judge), as '; critic X' for the plan's model column."""
    parts = [f"{label} {getattr(sc, attr)}" for attr, label in ROLES
             if getattr(sc, attr, None) not in (None, "", "keyword")]
    return "".join(f"; {p}" for p in parts)


def _measured_rate(cfg) -> float | None:
    """Generation tok/s measured by earlier evaluations of the same model (their summary.json)."""
    rates = []
    for path in Path(cfg.runs_dir).glob("*/eval/*/summary.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if summary.get("provenance", {}).get("model") == cfg.model:
            rate = summary.get("overall", {}).get("timing", {}).get("tok_per_s")
            if rate:
                rates.append(rate)
    return max(rates) if rates else None


@app.command()
def run(
    config: Path = typer.Argument(..., help="run config YAML, e.g. configs/demo.yaml"),
    name: Optional[str] = typer.Option(None, help="run name: outputs go to runs/NAME (default: from the config)"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="redo from this stage (older outputs are kept aside)"),
    until: Optional[str] = typer.Option(None, help="stop after this stage"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the config and print the plan; run nothing"),
    set_: List[str] = typer.Option([], "--set", help="override a setting, e.g. --set sft.iters=50"),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
) -> None:
    """Run revise -> clean -> sft -> feedback -> dpo -> select -> eval (base, sft, dpo) -> report into runs/NAME.
    Rerun the same command after a kill: finished stages are skipped and a partial one continues."""
    from mlx_cai import memcheck, memplan, pipeline, ui

    with user_errors():
        overrides = _parse_set(set_)
        if name:
            overrides["name"] = name
        cfg = pipeline.load_config(config, overrides)
        for s in (from_stage, until):
            if s and s not in pipeline.STAGES:
                raise pipeline.PipelineError(f"unknown stage '{s}' (stages: {', '.join(pipeline.STAGES)})")
        ui.out.print(ui.table(f"plan: runs/{cfg.name}", ["stage", "model", "data", "estimate"], plan_rows(cfg)))
        limit = memcheck.budget(memory_budget)
        estimates = memcheck.run_estimates(cfg, _stages_in(cfg, from_stage, until))
        ui.out.print(ui.table(f"memory: estimated peak per stage, budget {limit / memplan.GB:.1f} GB",
                              ["stage", "peak", "of budget", "largest items (GB)", "fits"],
                              memcheck.rows(estimates, limit)))
        todo = set(_to_run(cfg, from_stage, until))
        memcheck.check([e for e in estimates if e[0] in todo], limit)  # before any work: nothing is written
        if dry_run:
            ui.note("config is valid (dry run: nothing was run)")
            return
        run_dir = pipeline.run(cfg, start=from_stage, until=until, hooks=_hooks())
        times = pipeline.stage_times(cfg)
        ui.out.print(ui.table("stage wall time", ["stage", "minutes"],
                              [[s, f"{t / 60:.1f}"] for s, t in times.items()]))
        report = run_dir / "report.md"
        if report.exists():
            ui.out.print(report.read_text())
            ui.note(f"report: {run_dir / 'report.html'}")
        final = pipeline.final_adapter(cfg)
        if final:
            ui.note(f"final adapter: {run_dir / 'final'} (use --adapter {run_dir / 'final'})")
