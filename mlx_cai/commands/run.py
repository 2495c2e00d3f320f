"""`mlx-cai run CONFIG.yaml`: the whole pipeline (see mlx_cai.pipeline)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from mlx_cai.cli import app
from mlx_cai.commands import user_errors

ASSUMED_TOK_S = {"cpu": 100.0, "gpu": 400.0}  # used by --dry-run when no run has measured this model yet


def _parse_set(values: list[str]) -> dict:
    import yaml

    out = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value (e.g. sft.iters=50), got '{v}'")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _hooks(cfg):
    from mlx_cai import pipeline, ui
    from mlx_cai.commands.evaluate import _Bars as EvalBars
    from mlx_cai.commands.train import _Bars as TrainBars

    @contextmanager
    def progress(stage: str):
        if stage in ("sft", "dpo"):
            bars = TrainBars(getattr(pipeline.stage_config(cfg, stage), "iters"))
            try:
                yield bars
            finally:
                bars.close()
        elif stage.startswith("eval-"):
            bars = EvalBars()
            try:
                yield bars
            finally:
                bars.close()
        elif stage in ("revise", "feedback"):
            total = getattr(pipeline.stage_config(cfg, stage), "limit", None)
            with ui.progress(stage, total=total) as (bar, _, _):
                yield bar.tick
        else:
            yield None

    return pipeline.Hooks(
        stage_start=lambda i, n, s: ui.note(f"[bold cyan]stage {i}/{n}: {s}[/]"),
        stage_skip=lambda s, why: ui.note(f"[dim]stage {s}: {why}, skipped[/]"),
        stage_done=lambda s, secs: ui.note(f"[green]stage {s} done in {secs / 60:.1f} min[/]"),
        progress=progress,
    )


def work_units(stage: str, config: dict) -> float | None:
    """How much work a stage config asks for: prompts (revise, eval: prompts x suites), examples (sft, dpo)."""
    if stage == "revise":
        return config.get("limit")
    if stage in ("sft", "dpo"):
        return config.get("iters", 0) * config.get("batch_size", 0) * config.get("grad_accumulation", 1) or None
    if stage.startswith("eval-") and config.get("limit"):
        return config["limit"] * len(config.get("suites") or ())
    return None


def measured_seconds_per_unit(runs_dir: str | Path, model: str) -> dict[str, float]:
    """Seconds per unit of work (see work_units) of each stage kind ("eval" for eval-*), from the newest
    finished stage marker of an earlier run of the same model."""
    out: dict[str, float] = {}
    markers = sorted(Path(runs_dir).glob("*/stages/*.json"), key=lambda m: m.stat().st_mtime)
    for m in markers:
        try:
            d = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        config, stage = d.get("config") or {}, d.get("stage", "")
        units = work_units(stage, config) if isinstance(config, dict) else None
        if config.get("model") == model and units and d.get("seconds"):
            out["eval" if stage.startswith("eval-") else stage] = d["seconds"] / units
    return out


def plan_rows(cfg) -> list[list]:
    """Stages, models, data sizes and estimated tokens/time for --dry-run: time from earlier runs' measured
    seconds per prompt/example of the same stage and model where there are any, else from tokens at a rate."""
    from mlx_cai import backend, pipeline

    rate = _measured_rate(cfg) or ASSUMED_TOK_S[backend.default_device()]
    per_unit = measured_seconds_per_unit(cfg.runs_dir, cfg.model)
    rows = []
    for stage in cfg.enabled():
        sc = pipeline.stage_config(cfg, stage)
        model = getattr(sc, "model", cfg.model)
        adapter = getattr(sc, "adapter", None)
        size, tokens = "", 0
        if stage == "revise":
            n = sc.limit or 0
            tokens = n * sc.max_tokens * (1 + 2 * sc.rounds)
            size = f"{n or '?'} prompts x {1 + 2 * sc.rounds} turns ({cfg.revise.get('prompts', 'train:harmful')})"
        elif stage == "feedback":
            n = sc.limit or 0
            tokens = 0 if sc.mode == "revision" else n * sc.max_tokens * 2
            size = f"{n or '?'} prompts, mode {sc.mode}, judge {sc.judge or model}"
        elif stage in ("sft", "dpo"):
            size = f"{sc.iters} steps x batch {sc.batch_size}"
        elif stage.startswith("eval-"):
            n = (sc.limit or 150) * len(sc.suites)
            tokens = n * sc.max_tokens
            size = f"suites {','.join(sc.suites)}, split {sc.split}, limit {sc.limit or 'all'}"
        est = f"{tokens:,} tok, ~{tokens / rate / 60:.0f} min" if tokens else ""
        units = work_units(stage, asdict(sc)) if not isinstance(sc, dict) else None
        kind = "eval" if stage.startswith("eval-") else stage
        if units and kind in per_unit:
            est = f"~{units * per_unit[kind] / 60:.1f} min (measured)"
        rows.append([stage, f"{model}{' + ' + Path(adapter).name if adapter else ''}", size, est])
    return rows


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
) -> None:
    """Run revise -> clean -> sft -> feedback -> dpo -> eval (base, sft, dpo) -> report into runs/NAME.
    Rerun the same command after a kill: finished stages are skipped and a partial one continues."""
    from mlx_cai import pipeline, ui

    with user_errors():
        overrides = _parse_set(set_)
        if name:
            overrides["name"] = name
        cfg = pipeline.load_config(config, overrides)
        for s in (from_stage, until):
            if s and s not in pipeline.STAGES:
                raise pipeline.PipelineError(f"unknown stage '{s}' (stages: {', '.join(pipeline.STAGES)})")
        ui.out.print(ui.table(f"plan: runs/{cfg.name}", ["stage", "model", "data", "estimate"], plan_rows(cfg)))
        if dry_run:
            ui.note("config is valid (dry run: nothing was run)")
            return
        run_dir = pipeline.run(cfg, start=from_stage, until=until, hooks=_hooks(cfg))
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
