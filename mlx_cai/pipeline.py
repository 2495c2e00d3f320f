"""`mlx-cai run CONFIG.yaml`: the whole Constitutional AI recipe, one stage after another, resumable.

  revise -> clean -> sft -> feedback -> dpo -> eval-base -> eval-sft -> eval-dpo -> report

Reads one YAML (see configs/demo.yaml): top-level `name`, `model`, `seed`, and a section per stage whose
keys are that stage's config fields (plus `prompts` for revise/feedback). Writes runs/<name>/:

  config.yaml          the resolved config (defaults < YAML < command line)
  revise.jsonl         clean/  sft/  pairs.jsonl  dpo/  eval/{base,sft,dpo}/  report.html
  stages/<stage>.json  completion marker: the stage's resolved settings, wall time, outputs
  final -> dpo/        the final adapter (sft/ when dpo is disabled), loadable with --adapter

A stage whose marker exists (with the same settings) is skipped; a stage without one is run, and each
stage itself continues a partial output (every stage appends per record or checkpoints). So killing the
process at any moment and rerunning loses nothing and duplicates nothing.

Under `mlx.launch` every process runs the pipeline: revise, feedback, sft, dpo and eval share their work
(mlx_cai.distributed); clean and report run on rank 0 alone. Rank 0 writes everything and decides what is
done; later stages read earlier outputs, so on several hosts the run folder must be a shared folder.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from mlx_cai import backend  # BLAS before mlx.core

STAGES = ("revise", "clean", "sft", "feedback", "dpo", "eval-base", "eval-sft", "eval-dpo", "report")
SHARED = ("revise", "sft", "feedback", "dpo", "eval-base", "eval-sft", "eval-dpo")  # run by every process
SECTIONS = ("revise", "clean", "sft", "feedback", "dpo", "eval", "report")


class PipelineError(ValueError):
    """A bad run config or an inconsistent run folder; one line."""


@dataclass
class RunConfig:
    """The resolved run: shared settings plus one dict of settings per stage section."""

    name: str
    model: str = "smollm2-135m"
    seed: int = 0
    runs_dir: str = "runs"
    skip: list[str] = field(default_factory=list)  # stages to leave out (ablations), e.g. [dpo, eval-dpo]
    revise: dict = field(default_factory=dict)
    clean: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    feedback: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def enabled(self) -> list[str]:
        return [s for s in STAGES if s not in self.skip]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run YAML; `overrides` are dotted keys (`sft.iters`) from the command line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of settings at the top level")
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PipelineError(f"{path}: unknown setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
    if "name" not in raw:
        raw["name"] = path.stem
    for s in SECTIONS:
        if not isinstance(raw.get(s, {}), dict):
            raise PipelineError(f"{path}: section '{s}' must be a mapping of settings")
    bad = [s for s in raw.get("skip", []) if s not in STAGES]
    if bad:
        raise PipelineError(f"{path}: skip names unknown stage '{bad[0]}' (stages: {', '.join(STAGES)})")
    cfg = RunConfig(**raw)
    for stage in cfg.enabled():  # build every stage config now: a typo fails before hours of work
        stage_config(cfg, stage, where=str(path))
    return cfg


# --- per-stage configs ------------------------------------------------------------------------------

def _build(cls, values: dict, where: str, section: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PipelineError(f"{where}: {section}.{unknown[0]} is not a setting of this stage "
                            f"(known: {', '.join(sorted(names))})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{where}: {section}: {e}") from None


def _section(cfg: RunConfig, name: str, drop: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in getattr(cfg, name).items() if k not in drop}


def stage_config(cfg: RunConfig, stage: str, where: str = "config"):
    """The typed config of one stage, with paths inside the run folder."""
    d = cfg.run_dir
    base = {"seed": cfg.seed}
    if stage == "revise":
        from mlx_cai.stages.revise import ReviseConfig

        return _build(ReviseConfig, {"model": cfg.model, **base, **_section(cfg, "revise", ("prompts",))},
                      where, "revise")
    if stage == "clean":
        from mlx_cai.stages.clean import CleanConfig

        return _build(CleanConfig, {**base, **_section(cfg, "clean")}, where, "clean")
    if stage == "sft":
        from mlx_cai.stages.sft import SFTConfig

        return _build(SFTConfig, {"model": cfg.model, **base, **_section(cfg, "sft"), "data": str(d / "clean"),
                                  "output": str(d / "sft")}, where, "sft")
    if stage == "feedback":
        from mlx_cai.stages.feedback import FeedbackConfig

        values = {"model": cfg.model, **base, **_section(cfg, "feedback", ("prompts",))}
        if "sft" not in cfg.skip:
            values["adapter"] = str(d / "sft")
        return _build(FeedbackConfig, values, where, "feedback")
    if stage == "dpo":
        from mlx_cai.stages.dpo import DPOConfig

        values = {"model": cfg.model, **base, **_section(cfg, "dpo"), "pairs": str(d / "pairs.jsonl"),
                  "output": str(d / "dpo")}
        if "sft" not in cfg.skip:
            values["adapter"] = str(d / "sft")
        return _build(DPOConfig, values, where, "dpo")
    if stage.startswith("eval-"):
        from mlx_cai.stages.evaluate import EvalConfig

        which = stage.split("-", 1)[1]
        values = {"model": cfg.model, **base, **_section(cfg, "eval"), "output": str(d / "eval" / which)}
        values["adapter"] = None if which == "base" else str(d / which)
        if "suites" in values:
            values["suites"] = tuple(values["suites"])
        return _build(EvalConfig, values, where, "eval")
    if stage == "report":
        return {"dirs": [str(d / "eval" / s.split("-", 1)[1]) for s in cfg.enabled() if s.startswith("eval-")],
                "output": str(d / "report.html"), **_section(cfg, "report")}
    raise PipelineError(f"unknown stage '{stage}'")


def _jsonable(obj) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


# --- running ----------------------------------------------------------------------------------------

@dataclass
class Hooks:
    """How the pipeline reports (the CLI passes rich-backed ones; tests pass none)."""

    stage_start: Callable[[int, int, str], None] = lambda i, n, s: None
    stage_skip: Callable[[str, str], None] = lambda s, why: None
    stage_done: Callable[[str, float], None] = lambda s, secs: None
    progress: Callable[[str], Any] = lambda stage: None  # a context manager factory giving a stage's callback


def marker(cfg: RunConfig, stage: str) -> Path:
    return cfg.run_dir / "stages" / f"{stage}.json"


def is_done(cfg: RunConfig, stage: str) -> bool:
    m = marker(cfg, stage)
    if not m.exists():
        return False
    saved = json.loads(m.read_text())
    now = _jsonable(stage_config(cfg, stage))
    if saved.get("config") != now:
        raise PipelineError(f"stage {stage} in {cfg.run_dir} was run with other settings; rerun it with "
                            f"`--from {stage}` (keeps the old outputs aside) or use a new --name")
    return True


def reset_from(cfg: RunConfig, stage: str) -> list[Path]:
    """`--from STAGE`: move that stage's and later stages' markers and outputs aside (nothing is deleted)."""
    later = list(STAGES[STAGES.index(stage):])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for s in later:
        for p in [marker(cfg, s), *outputs(cfg, s)]:
            if p.exists() or p.is_symlink():
                target = p.with_name(f"{p.name}.old-{stamp}")
                os.replace(p, target)
                moved.append(target)
    return moved


def outputs(cfg: RunConfig, stage: str) -> list[Path]:
    d = cfg.run_dir
    return {
        "revise": [d / "revise.jsonl"], "clean": [d / "clean"], "sft": [d / "sft"],
        "feedback": [d / "pairs.jsonl", d / "pairs.dropped.jsonl", d / "pairs.summary.json"],
        "dpo": [d / "dpo"], "eval-base": [d / "eval" / "base"], "eval-sft": [d / "eval" / "sft"],
        "eval-dpo": [d / "eval" / "dpo"], "report": [d / "report.html", d / "report.md"],
    }[stage]


def _run_stage(cfg: RunConfig, stage: str, callback) -> None:
    d = cfg.run_dir
    sc = stage_config(cfg, stage)
    if stage == "revise":
        from mlx_cai.stages import revise

        revise.run(sc, cfg.revise.get("prompts", "train:harmful"), d / "revise.jsonl", progress=callback)
    elif stage == "clean":
        from mlx_cai.stages import clean

        clean.run(sc, d / "revise.jsonl", d / "clean")
    elif stage == "sft":
        from mlx_cai.stages import sft

        sft.run(sc, progress=callback, resume=(d / "sft").exists())
    elif stage == "feedback":
        from mlx_cai.stages import feedback

        # Revision mode pairs the *cleaned* revisions (chosen) with their initial answers (rejected).
        source = d / "clean" / "kept.jsonl" if sc.mode == "revision" else cfg.feedback.get("prompts", "train:harmful")
        feedback.run(sc, source, d / "pairs.jsonl", progress=callback)
    elif stage == "dpo":
        from mlx_cai.stages import dpo

        dpo.run(sc, progress=callback, resume=(d / "dpo").exists())
    elif stage.startswith("eval-"):
        from mlx_cai.stages import evaluate

        evaluate.run(sc, progress=callback)
    elif stage == "report":
        from mlx_cai.stages import report

        kwargs = {k: v for k, v in sc.items() if k not in ("dirs", "output")}
        report.run(sc["dirs"], sc["output"], **kwargs)


def final_adapter(cfg: RunConfig) -> Path | None:
    for s in ("dpo", "sft"):
        if s not in cfg.skip and (cfg.run_dir / s / "adapters.safetensors").exists():
            return cfg.run_dir / s
    return None


def link_final(cfg: RunConfig) -> Path | None:
    target = final_adapter(cfg)
    if target is None:
        return None
    link = cfg.run_dir / "final"
    tmp = cfg.run_dir / ".final.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link)
    return link


def run(cfg: RunConfig, *, start: str | None = None, until: str | None = None, hooks: Hooks | None = None) -> Path:
    """Run the enabled stages in order (from `start`, through `until`); returns the run folder."""
    from mlx_cai import distributed as D

    hooks = hooks or Hooks()
    d = cfg.run_dir
    main = D.is_main()
    if main:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(_jsonable(cfg), sort_keys=False))
    stages = cfg.enabled()
    if start:
        if main:
            reset_from(cfg, start)
        stages = stages[stages.index(start):] if start in stages else []
    if until:
        stages = stages[: stages.index(until) + 1] if until in stages else stages
    for i, stage in enumerate(stages, 1):
        if D.on_main(lambda: is_done(cfg, stage)):  # also waits for rank 0's previous stage
            hooks.stage_skip(stage, "done")
            continue
        hooks.stage_start(i, len(stages), stage)
        t0 = time.perf_counter()
        with (hooks.progress(stage) or _null()) as callback:
            if main or stage in SHARED:
                _run_stage(cfg, stage, callback)
        secs = time.perf_counter() - t0
        if main:
            m = marker(cfg, stage)
            m.parent.mkdir(parents=True, exist_ok=True)
            m.write_text(json.dumps({"stage": stage, "config": _jsonable(stage_config(cfg, stage)), "seconds": secs,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "load_avg_15min": round(os.getloadavg()[2], 2), "processes": D.size(),
                                     "blas_threads": backend.blas_threads()},  # chosen at import, by load
                                    indent=2))
        hooks.stage_done(stage, secs)
        if main and stage in ("sft", "dpo"):
            link_final(cfg)
    D.barrier()
    if main:
        link_final(cfg)
    return d


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def stage_times(cfg: RunConfig) -> dict[str, float]:
    """Wall seconds per finished stage, from the markers."""
    out = {}
    for s in STAGES:
        m = marker(cfg, s)
        if m.exists():
            out[s] = json.loads(m.read_text()).get("seconds", 0.0)
    return out
