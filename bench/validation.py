"""Validation on train prompts a run never used: its models (and DPO's checkpoints) on prompts it did not see.

The eval split stays the final check; this is the set to choose between variants or checkpoints without
looking at it. A run's used prompts are every user prompt in revise.jsonl, clean/{train,valid}.jsonl and
pairs.jsonl; of the rest of the shipped train split, `--limit` harmful and `--limit` benign + borderline (safe)
prompts (round-robin over categories, apart from the select stage's held-out ones: mlx_cai.heldout) are written
to RUN/validation/{harm,safe}.jsonl and each model is evaluated on them with the keyword judge, greedy, like the
run's own eval stages.

  python bench/validation.py runs/overseer [--limit 48] [--checkpoints] [--adapter NAME=PATH ...] [--skip NAME ...]

Prints one markdown row per model: ASR on the unused harmful prompts, over-refusal on the unused safe ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mlx_cai import heldout

ROOT = Path(__file__).resolve().parents[1]


def unused(run: Path, limit: int) -> dict[str, Path]:
    """Write the validation prompts, `limit` unused train prompts of each kind (mlx_cai.heldout.split):
    {'harm': path, 'safe': path}. They are apart from the select stage's held-out prompts (checked)."""
    used = heldout.used_prompts([run / "revise.jsonl", run / "clean", run / "pairs.jsonl"])
    out = run / "validation"
    out.mkdir(exist_ok=True)
    paths = {}
    for kind in heldout.KINDS:
        left = heldout.unused(kind, used)
        items = heldout.split(left, 0, limit)[0]
        chosen = heldout.user_prompts(run / "select" / "held_out" / f"{kind}.jsonl")
        if chosen & {it.prompt for it in items}:
            raise SystemExit(f"{run}/select/held_out/{kind}.jsonl shares prompts with this validation set: "
                             f"use --limit {heldout.VALIDATION} (the size select keeps apart)")
        paths[kind] = heldout.write(items, out / f"{kind}.jsonl")
        print(f"{kind}: {len(items)} of {len(left)} unused train prompts", file=sys.stderr)
    return paths


def models(run: Path, checkpoints: bool, extra: list[str]) -> dict[str, str | None]:
    """name -> adapter folder (None: the base model)."""
    out: dict[str, str | None] = {"base": None, "sft": str(run / "sft")}
    if checkpoints:
        for ck in sorted((run / "dpo" / "checkpoints").glob("step-*")):
            out[f"dpo-{int(ck.name.split('-')[1])}"] = str(ck)
    out["final"] = str(run / "final")
    for spec in extra:
        name, _, path = spec.partition("=")
        out[name] = path
    return out


def evaluate(run: Path, name: str, adapter: str | None, paths: dict[str, Path], model: str) -> dict:
    out = run / "validation" / name
    cmd = [sys.executable, "-m", "mlx_cai", "eval", "-o", str(out), "--model", model,
           "--suite", f"{paths['harm']}:harmful,{paths['safe']}:safe",
           "--max-tokens", "96", "--batch-size", "48"]
    if adapter:
        cmd += ["--adapter", adapter]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def pct(est: dict | None) -> str:
    return "-" if est is None else f"{est['value'] * 100:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--limit", type=int, default=48, help="prompts per kind (round-robin over categories)")
    ap.add_argument("--checkpoints", action="store_true", help="also every DPO checkpoint")
    ap.add_argument("--adapter", action="append", default=[], help="NAME=PATH: another adapter to evaluate")
    ap.add_argument("--skip", action="append", default=[], help="NAME: leave this model out (e.g. base and sft of a "
                                                                "variant that shares them with a run measured before)")
    args = ap.parse_args()
    model = _run_model(args.run)
    paths = unused(args.run, args.limit)
    rows = ["| model | ASR (unused harmful) | over-refusal (unused safe) |", "|---|---:|---:|"]
    for name, adapter in models(args.run, args.checkpoints, args.adapter).items():
        if name in args.skip:
            continue
        s = evaluate(args.run, name, adapter, paths, model)["suites"]
        rows.append(f"| {name} | {pct(s['harm']['metrics'].get('asr_keyword'))} | "
                    f"{pct(s['safe']['metrics'].get('over_refusal'))} |")
        print(rows[-1], file=sys.stderr, flush=True)  # as it comes, beside eval's progress
    print("\n".join(rows))  # the table, once every model is evaluated


def _run_model(run: Path) -> str:
    """The run's responder (config.yaml's `model`)."""
    for line in (run / "config.yaml").read_text().splitlines():
        if line.startswith("model:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{run}/config.yaml: no 'model:' line")


if __name__ == "__main__":
    main()
