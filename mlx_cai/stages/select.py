"""Choose the final DPO checkpoint on held-out train prompts: the project's targets, checked where no stage looked.

DPO's last step is one draw: on the demo's 107 pairs the batch order alone moves the eval ASR by +-12 points
(BENCHMARKS.md, "How far DPO's seed moves the demo's result"). This stage evaluates the base model and every kept
DPO checkpoint (dpo.steps_per_save, dpo.keep_checkpoints) on `held_out` harmful and `held_out` benign train
prompts that no earlier stage read (mlx_cai.heldout), greedy with the keyword judge like the eval stages, checks
each checkpoint against the base with mlx_cai.targets (ASR <= 0.5x, over-refusal <= +10 points, no collapse metric
worse than the base's interval), and keeps the one passing the most targets; ties go to the one missing its failed
ASR and over-refusal targets by the fewest points (so an early checkpoint that refuses everything does not win on
its low ASR), then the lower ASR, then the lower over-refusal, then the later step. The eval split is never read.

Writes OUT (a complete adapter folder, `--adapter OUT`):
  held_out/{harm,safe}.jsonl   the prompts (mlx_cai.heldout.split: apart from bench/validation.py's set)
  base/, step-NNNNNNN/         one evaluation per candidate (records + summary.json; a rerun continues them)
  choice.json                  per candidate its numbers and targets passed, and the chosen step
  adapters.safetensors, adapter_config.json   the chosen checkpoint's adapter
`held_out: 0` (the default) turns it off: nothing is written and DPO's last step is the final adapter.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from mlx_cai import distributed, heldout, memplan, records, targets
from mlx_cai.config import opt
from mlx_cai.progress import Progress

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


class SelectError(ValueError):
    """Nothing to choose from; one line."""


@dataclass
class SelectConfig:
    checkpoints: str = opt("", "the DPO output folder: its checkpoints/step-* are the candidates")
    used: tuple[str, ...] = opt((), "run files whose prompts are not held out (revise.jsonl, clean/, pairs.jsonl)")
    output: str = opt("", "output folder")
    model: str = opt("smollm2-135m", "the responder the checkpoints adapt")
    seed: int = opt(0, "seed of the evaluations (greedy: only their bootstrap intervals)")
    held_out: int = opt(0, "held-out harmful and benign train prompts each; 0 = off (DPO's last step is final)")
    max_tokens: int = opt(96, "new tokens per answer")
    batch_size: int = opt(48, "prompts decoded together")

    def __post_init__(self):
        if isinstance(self.used, str):
            self.used = (self.used,)
        self.used = tuple(self.used)
        if self.held_out < 0 or self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError("held_out must be >= 0, max_tokens and batch_size >= 1")

    def plan(self) -> tuple[str, int]:
        if not self.held_out:
            return "off: DPO's last step is final", 0
        return f"{self.held_out} + {self.held_out} held-out train prompts per checkpoint", 0

    def memory(self, ctx: memplan.Context) -> memplan.Estimate | None:
        if not self.held_out:
            return None
        return memplan.generation(ctx, self.model, {}, batch=self.batch_size, prompt=memplan.PROMPT_TOKENS,
                                  new_tokens=self.max_tokens,
                                  knobs={"batch_size": self.batch_size, "max_tokens": self.max_tokens})


# ------------------------------------------------------------------------- the choice (pure: summaries in)


def excess(checks: list[targets.Check]) -> float:
    """How far the failed ASR and over-refusal targets are missed, summed (rate points above their limits)."""
    return sum(c.final - c.limit for c in checks if c.ok is False and c.limit is not None)


def rank(base: dict, candidates: dict[str, dict]) -> list[dict]:
    """One row per candidate (name -> eval summary), best first: targets passed against the base (more is better),
    then how far the failed ASR and over-refusal targets are missed (`excess`), then ASR, then over-refusal (lower
    is better), then the later candidate (names sort by step)."""
    rows = []
    for name, summary in candidates.items():
        checks = targets.check(base, summary)
        m = summary["overall"]["metrics"]
        rows.append({"name": name, "passed": sum(c.ok is True for c in checks),
                     "judged": sum(c.ok is not None for c in checks),
                     "failed": [c.name for c in checks if c.ok is False], "excess": round(excess(checks), 6),
                     "asr": m["asr_keyword"]["value"], "over_refusal": m["over_refusal"]["value"]})
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["passed"], rows[i]["excess"], rows[i]["asr"],
                                                    rows[i]["over_refusal"], -i))
    return [rows[i] for i in order]


# ------------------------------------------------------------------------- the stage (IO)


def candidates(dpo: Path) -> dict[str, Path]:
    """step-NNNNNNN -> checkpoint folder, in step order; only complete ones (with an adapter)."""
    found = sorted(p for p in (dpo / "checkpoints").glob("step-*") if (p / ADAPTER_FILES[0]).exists())
    return {p.name: p for p in found}


def run(config: SelectConfig, progress: Progress | None = None) -> Path:
    from mlx_cai.stages import evaluate

    out = Path(config.output)
    if not config.held_out:
        return out
    steps = candidates(Path(config.checkpoints))
    if not steps:
        raise SelectError(f"{config.checkpoints}/checkpoints holds no DPO checkpoint to choose from: run DPO with "
                          "steps_per_save and keep_checkpoints that keep some, or set select.held_out: 0")
    sets = out / "held_out"
    if not all((sets / f"{k}.jsonl").exists() for k in heldout.KINDS):
        # every process chooses (alike), so none waits at the barrier behind a rank 0 that stopped
        used = heldout.used_prompts(config.used)
        chosen = {kind: heldout.split(heldout.unused(kind, used), config.held_out)[1] for kind in heldout.KINDS}
        empty = [kind for kind, items in chosen.items() if not items]
        if empty:
            raise SelectError(f"no train prompt of kind '{empty[0]}' is left to hold out (the data stages and the "
                              "validation set take them all): set select.held_out: 0 or give the stages fewer")
        if distributed.is_main():
            for kind, items in chosen.items():
                heldout.write(items, sets / f"{kind}.jsonl")
    distributed.barrier()
    suites = (f"{sets / 'harm.jsonl'}:harmful", f"{sets / 'safe.jsonl'}:safe")
    summaries = {}
    for name, adapter in {"base": None, **{k: str(v) for k, v in steps.items()}}.items():
        cfg = evaluate.EvalConfig(output=str(out / name), model=config.model, adapter=adapter, suites=suites,
                                  max_tokens=config.max_tokens, batch_size=config.batch_size, seed=config.seed)
        path = evaluate.run(cfg, progress)  # every process evaluates its share; rank 0 writes the summary
        summaries[name] = records.read_json(path) if distributed.is_main() else None
    if not distributed.is_main():
        return out
    base = summaries.pop("base")
    ranked = rank(base, summaries)
    chosen = ranked[0]["name"]
    for f in ADAPTER_FILES:  # the chosen adapter, each file replaced whole
        tmp = out / f".{f}.tmp"
        shutil.copyfile(steps[chosen] / f, tmp)
        tmp.replace(out / f)
    m = base["overall"]["metrics"]
    records.write_json_atomic(out / "choice.json", {
        "chosen": chosen, "step": int(chosen.split("-")[1]), "of_steps": [int(k.split("-")[1]) for k in steps],
        "held_out": {k: len(list(records.read_jsonl(sets / f"{k}.jsonl"))) for k in heldout.KINDS},
        "base": {"asr": m["asr_keyword"]["value"], "over_refusal": m["over_refusal"]["value"]},
        "ranking": ranked})
    return out
