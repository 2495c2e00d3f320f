"""`mlx-cai run CONFIG.yaml`: the whole Constitutional AI recipe, one stage after another, resumable.

  revise -> clean -> sft -> feedback -> dpo -> select -> eval-base -> eval-sft -> eval-dpo -> report

The stages and where their inputs and outputs live come from the registry (mlx_cai.stages.PIPELINE).
Reads one YAML (see configs/demo.yaml): top-level `name`, `model`, `seed`, `runs_dir`, `skip`, and a section
per stage whose keys are that stage's config fields. Writes runs/<name>/:

  config.yaml          the resolved config (defaults < YAML < command line)
  revise.jsonl         clean/  sft/  pairs.jsonl  dpo/  eval/{base,sft,dpo}/  report.html
  stages/<stage>.json  completion marker: the stage's resolved settings, wall time, outputs
  final -> dpo/        the final adapter (select/ when it chose a DPO checkpoint, sft/ when dpo is disabled),
                       loadable with --adapter

A stage whose marker exists (with the same settings) is skipped; a stage without one is run, and each
stage itself continues a partial output (every stage appends per record or checkpoints). So killing the
process at any moment and rerunning loses nothing and duplicates nothing. A marker also records the size and
sha256 of the stage's output files (not its checkpoints): an output changed after its stage finished stops the run
with one line (redo it with --from), and a marker that does not parse is named and its stage run again.

Under `mlx.launch` every process runs the pipeline: the `shared` stages share their work
(mlx_cai.distributed); the others run on rank 0 alone. Rank 0 writes everything and decides what is
done; later stages read earlier outputs, so on several hosts the run folder must be a shared folder.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from mlx_cai import backend  # BLAS before mlx.core
from mlx_cai import config as settings_io
from mlx_cai import records
from mlx_cai.stages import NAMES, REGISTRY, SECTIONS, Layout, Stage

STAGES = NAMES
RUN_FIELDS = ("name", "model", "seed", "runs_dir", "skip")
SHARED_FIELDS = ("model", "seed")  # run-level settings handed to every stage config that has such a field
FINAL_FROM = ("select", "dpo", "sft")  # the final adapter: the first of these that wrote one


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
    sections: dict[str, dict] = field(default_factory=dict)  # section name -> its settings

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def enabled(self) -> list[str]:
        return [s for s in STAGES if s not in self.skip]

    def section(self, name: str) -> dict:
        return self.sections.get(name, {})

    def as_yaml(self) -> dict:
        """The YAML layout: run fields, then one mapping per section."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        return {**out, **{s: self.section(s) for s in SECTIONS}}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run YAML; `overrides` are dotted keys (`sft.iters`) from the command line."""
    path = Path(path)
    try:
        raw = copy.deepcopy(settings_io.read_yaml(path))
    except settings_io.ConfigError as e:
        raise PipelineError(str(e)) from None
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    known = (*RUN_FIELDS, *SECTIONS)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PipelineError(f"{path}: unknown setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
    raw.setdefault("name", path.stem)
    name = str(raw["name"])
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise PipelineError(f"{path}: name {name!r} must be a plain folder name (no '/', no '..'): the run is "
                            f"written to runs_dir/NAME")
    for s in SECTIONS:
        if not isinstance(raw.get(s, {}), dict):
            raise PipelineError(f"{path}: section '{s}' must be a mapping of settings")
    bad = [s for s in raw.get("skip", []) if s not in STAGES]
    if bad:
        raise PipelineError(f"{path}: skip names unknown stage '{bad[0]}' (stages: {', '.join(STAGES)})")
    cfg = RunConfig(**{k: raw[k] for k in RUN_FIELDS if k in raw},
                    sections={s: raw.get(s) or {} for s in SECTIONS})
    for stage in cfg.enabled():  # build every stage config now: a typo fails before hours of work
        stage_config(cfg, stage, where=str(path))
    return cfg


def layout(cfg: RunConfig) -> Layout:
    return Layout(cfg.run_dir, tuple(cfg.enabled()), cfg.sections)


def stage_config(cfg: RunConfig, stage: str, where: str = "config"):
    """The typed config of one stage: run-level settings < its YAML section < its paths in the run folder."""
    st = REGISTRY[stage]
    cls = st.config_cls
    names = {f.name for f in fields(cls)}
    section = cfg.section(st.section)
    unknown = sorted(set(section) - names)
    if unknown:
        raise PipelineError(f"{where}: {st.section}.{unknown[0]} is not a setting of this stage "
                            f"(known: {', '.join(sorted(names))})")
    shared = {k: getattr(cfg, k) for k in SHARED_FIELDS if k in names}
    fixed = st.paths(layout(cfg), section)
    # a setting may name an earlier stage (feedback's `boundary_answers: clean`): the layout fills in its output
    clash = sorted(k for k in set(section) & set(fixed) if section[k] not in STAGES)
    if clash:  # the run folder's layout decides where a stage reads and writes
        raise PipelineError(f"{where}: {st.section}.{clash[0]} is set by the pipeline (to {fixed[clash[0]]}); "
                            "remove it from the config")
    try:
        return settings_io.build_config(cls, [{**shared, **section, **fixed}])
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{where}: {st.section}: {e}") from None


# --- running ----------------------------------------------------------------------------------------

@dataclass
class Hooks:
    """How the pipeline reports (the CLI passes rich-backed ones; tests pass none)."""

    stage_start: Callable[[int, int, str], None] = lambda i, n, s: None
    stage_skip: Callable[[str, str], None] = lambda s, why: None
    stage_done: Callable[[str, float], None] = lambda s, secs: None
    warning: Callable[[str], None] = lambda text: None  # a damaged marker (its stage is run again)
    progress: Callable[[str], Any] = lambda stage: nullcontext()  # a context manager giving a stage's callback


def marker(cfg: RunConfig, stage: str) -> Path:
    return cfg.run_dir / "stages" / f"{stage}.json"


def outputs(cfg: RunConfig, stage: str) -> list[Path]:
    return [cfg.run_dir / p for p in REGISTRY[stage].outputs]


def output_files(cfg: RunConfig, stage: str) -> list[Path]:
    """The files a stage wrote (in its output files and folders), but hidden ones and checkpoints."""
    found = []
    for p in outputs(cfg, stage):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") or part == "checkpoints" for part in f.relative_to(p).parts))
    return found


def is_done(cfg: RunConfig, stage: str, warn: Callable[[str], None] = lambda text: None) -> bool:
    """Whether a stage is finished: its marker is there, made with today's settings, and its outputs are as the
    marker recorded them (PipelineError when not). A marker that does not parse is said through `warn`: not done."""
    m = marker(cfg, stage)
    if not m.exists():
        return False
    try:
        saved = records.read_json(m)
    except (records.RecordError, UnicodeDecodeError):
        saved = {}
    if saved.get("stage") != stage or not isinstance(saved.get("config"), dict):
        warn(f"{m} is damaged (not a complete stage marker): stage {stage} runs again, continuing from its outputs")
        return False
    now = settings_io.as_dict(stage_config(cfg, stage))
    try:
        settings_io.check_unchanged(saved["config"], now, f"stage {stage} in {cfg.run_dir}",
                                    hint=f"rerun it with `--from {stage}` (keeps the old outputs aside) or use a new --name")
    except settings_io.ConfigError as e:
        raise PipelineError(str(e)) from None
    for rel, recorded in (saved.get("outputs") or {}).items():
        problem = records.damage(cfg.run_dir / rel, recorded)
        if problem:
            raise PipelineError(f"{cfg.run_dir / rel} changed after stage {stage} finished ({problem}); rerun with "
                                f"`--from {stage}` to redo it and the stages after it (the old outputs are kept aside)")
    return True


def reset_from(cfg: RunConfig, stage: str) -> list[Path]:
    """`--from STAGE`: move that stage's and later stages' markers and outputs aside (nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for s in STAGES[STAGES.index(stage):]:
        for p in [marker(cfg, s), *outputs(cfg, s)]:
            if p.exists() or p.is_symlink():
                target = p.with_name(f"{p.name}.old-{stamp}")
                os.replace(p, target)
                moved.append(target)
    return moved


def final_adapter(cfg: RunConfig) -> Path | None:
    for s in FINAL_FROM:
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


def _write_marker(cfg: RunConfig, stage: str, secs: float) -> None:
    from mlx_cai import distributed

    records.write_json_atomic(marker(cfg, stage), {
        "stage": stage, "config": settings_io.as_dict(stage_config(cfg, stage)), "seconds": secs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg_15min": round(os.getloadavg()[2], 2),
        "processes": distributed.size(), "blas_threads": backend.blas_threads(),  # chosen at import, by load
        "outputs": {p.relative_to(cfg.run_dir).as_posix(): records.digest(p) for p in output_files(cfg, stage)}})


def run(cfg: RunConfig, *, start: str | None = None, until: str | None = None, hooks: Hooks | None = None) -> Path:
    """Run the enabled stages in order (from `start`, through `until`); returns the run folder.

    Holds the run folder's lock (mlx_cai.runlock) throughout: a second run on the folder, or a stage command
    writing inside it, stops with runlock.LockError naming the holder; a lock left by a killed run is taken over."""
    from mlx_cai import runlock

    with runlock.hold(cfg.run_dir, "run", run=True):
        return _run(cfg, start=start, until=until, hooks=hooks)


def _run(cfg: RunConfig, *, start: str | None, until: str | None, hooks: Hooks | None) -> Path:
    from mlx_cai import distributed

    hooks = hooks or Hooks()
    d = cfg.run_dir
    main = distributed.is_main()
    if main:
        if d.exists():
            records.sweep_stale(d)  # temporaries of a killed run (we hold the lock: none is live)
        records.write_text_atomic(d / "config.yaml", yaml.safe_dump(cfg.as_yaml(), sort_keys=False))
    stages = cfg.enabled()
    if start:
        if main:
            reset_from(cfg, start)
        stages = stages[stages.index(start):] if start in stages else []
    if until:
        stages = stages[: stages.index(until) + 1] if until in stages else stages
    for i, name in enumerate(stages, 1):
        if distributed.on_main(lambda: is_done(cfg, name, hooks.warning)):  # also waits for rank 0's previous stage
            hooks.stage_skip(name, "done")
            continue
        stage: Stage = REGISTRY[name]
        hooks.stage_start(i, len(stages), name)
        t0 = time.perf_counter()
        with hooks.progress(name) as callback:
            if main or stage.shared:
                stage.run(stage_config(cfg, name), callback)
        secs = time.perf_counter() - t0
        release_memory()
        if main:
            _write_marker(cfg, name, secs)
        hooks.stage_done(name, secs)
        if main and name in FINAL_FROM:
            link_final(cfg)
    distributed.barrier()
    if main:
        link_final(cfg)
    return d


def release_memory() -> None:
    """Free what a finished stage held before the next loads its models. A stage's models sit in reference
    cycles (backend <-> model, the model's kept FastLlama), which Python's collector may not visit for a long
    time while MLX computes: configs/overseer.yaml's clean stage loaded the overseer a second time beside the
    revise stage's copy and the run was killed for memory (24 GB resident on a 23 GB machine). MLX's cache
    of freed buffers is emptied too, so the next stage's memory starts where the estimate (memplan) says."""
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def stage_times(cfg: RunConfig) -> dict[str, float]:
    """Wall seconds per finished stage, from the markers."""
    return {s: records.read_json(marker(cfg, s)).get("seconds", 0.0) for s in STAGES if marker(cfg, s).exists()}
