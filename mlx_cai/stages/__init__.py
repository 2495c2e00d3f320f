"""The stages of the recipe and the registry the pipeline and the CLI loop over.

Every stage module has a config dataclass (its inputs and outputs are fields) and
`run(config, progress=None) -> Path`. A `Stage` says where a stage's inputs and outputs live in a run folder,
which YAML section holds its settings, and whether every process runs it (mx.distributed) or rank 0 alone.
Adding a stage = its module + one line in PIPELINE + its section in the run YAML.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping


@dataclass(frozen=True)
class Layout:
    """A run folder and the stages enabled in it: what a stage's paths are computed from."""

    root: Path
    enabled: tuple[str, ...]
    sections: Mapping[str, Mapping] = field(default_factory=dict, compare=False, hash=False)  # the run YAML's

    @property
    def selects(self) -> bool:
        """Whether the select stage chooses the final DPO checkpoint (it and dpo run, select.held_out > 0)."""
        return {"select", "dpo"} <= set(self.enabled) and bool((self.sections.get("select") or {}).get("held_out"))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def adapter(self, stage: str) -> str | None:
        """The adapter folder a later stage continues from, if that stage runs."""
        return str(self.root / stage) if stage in self.enabled else None


Paths = Callable[[Layout, dict], dict]  # (run folder, the stage's YAML section) -> config fields


@dataclass(frozen=True)
class Stage:
    name: str  # the stage as the pipeline, markers and --from name it
    module: str  # mlx_cai.stages.<module>: its config class and run()
    config_class: str
    section: str  # the run YAML's section of its settings
    shared: bool  # run by every process (its work is shared out); else by rank 0 alone
    paths: Paths  # its input and output fields inside the run folder
    outputs: tuple[str, ...]  # what it writes, relative to the run folder (moved aside by --from)

    def load(self):
        return importlib.import_module(f"mlx_cai.stages.{self.module}")

    @property
    def config_cls(self):
        return getattr(self.load(), self.config_class)

    def run(self, config, progress=None) -> Path:
        return self.load().run(config, progress)


def _feedback_paths(run: Layout, section: dict) -> dict:
    # Revision mode pairs the *cleaned* revisions (chosen) with their initial answers (rejected).
    source = {"prompts": str(run / "clean" / "kept.jsonl")} if section.get("mode") == "revision" else {}
    # `boundary_answers: clean`: the helpful answers clean wrote (its cache) are the boundary pairs' chosen side
    reuse = {"boundary_answers": str(run / "clean" / "helpful.jsonl")} if section.get("boundary_answers") == "clean" else {}
    return {**source, **reuse, "output": str(run / "pairs.jsonl"), **_adapter(run, "sft")}


def _adapter(run: Layout, stage: str) -> dict:
    path = run.adapter(stage)
    return {"adapter": path} if path else {}


def _eval(which: str) -> Stage:
    def adapter(run: Layout) -> dict:
        if which == "base":
            return {"adapter": None}
        return {"adapter": str(run / ("select" if which == "dpo" and run.selects else which))}

    return Stage(f"eval-{which}", "evaluate", "EvalConfig", "eval", True,
                 lambda run, _: {"output": str(run / "eval" / which), **adapter(run)}, (f"eval/{which}",))


PIPELINE: tuple[Stage, ...] = (
    Stage("revise", "revise", "ReviseConfig", "revise", True,
          lambda run, _: {"output": str(run / "revise.jsonl")}, ("revise.jsonl",)),
    Stage("clean", "clean", "CleanConfig", "clean", False,
          lambda run, _: {"input": str(run / "revise.jsonl"), "output": str(run / "clean")}, ("clean",)),
    Stage("sft", "sft", "SFTConfig", "sft", True,
          lambda run, _: {"data": str(run / "clean"), "output": str(run / "sft"), "resume": True}, ("sft",)),
    Stage("feedback", "feedback", "FeedbackConfig", "feedback", True, _feedback_paths,
          ("pairs.jsonl", "pairs.dropped.jsonl", "pairs.summary.json")),
    Stage("dpo", "dpo", "DPOConfig", "dpo", True,
          lambda run, _: {"pairs": str(run / "pairs.jsonl"), "output": str(run / "dpo"), "resume": True,
                          **_adapter(run, "sft")}, ("dpo",)),
    # the final DPO checkpoint, chosen on held-out train prompts (off unless select.held_out is set)
    Stage("select", "select", "SelectConfig", "select", True,
          lambda run, _: {"checkpoints": str(run / "dpo"), "output": str(run / "select"),
                          "used": [str(run / p) for p in ("revise.jsonl", "clean", "pairs.jsonl")]}, ("select",)),
    _eval("base"),
    _eval("sft"),
    _eval("dpo"),
    Stage("report", "report", "ReportConfig", "report", False,
          lambda run, _: {"dirs": [str(run / "eval" / s.removeprefix("eval-")) for s in run.enabled
                                   if s.startswith("eval-")], "output": str(run / "report.html"),
                          "training": [a for s in ("sft", "dpo") if (a := run.adapter(s))],
                          **({"selection": str(run / "select" / "choice.json")} if run.selects else {})},
          ("report.html", "report.md")),
)
REGISTRY: dict[str, Stage] = {s.name: s for s in PIPELINE}
NAMES: tuple[str, ...] = tuple(REGISTRY)
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in PIPELINE))
