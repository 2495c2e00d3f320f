"""Baseline evaluation of the embedded model (SmolLM2-135M-Instruct) on the shipped eval splits, keyword judge.

Runs `mlx_cai.stages.evaluate` on harm, benign and borderline (split `eval`, every prompt, greedy, 128 new tokens,
batch 32) and prints a markdown section for BENCHMARKS.md: keyword ASR, over-refusal, collapse metrics and
generation time, each rate with its Wilson 95% interval and each per-response mean with a bootstrap one.

The run folder is resumable: rerunning continues an interrupted run (generation time sums both runs' batches), and
rerunning a finished one only prints the section again.

    .venv/bin/python bench/eval_baseline.py                   # writes runs/bench/eval-baseline/, prints the section
    .venv/bin/python bench/eval_baseline.py --out /tmp/ev --limit 8 --max-tokens 32   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

from mlx_cai import backend
from mlx_cai.stages import evaluate
from mlx_cai.stages.report import fmt_estimate

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Baseline evaluation: embedded model, keyword judge (bench/eval_baseline.py)"
COLLAPSE = ("seq_rep_4", "sentence_repetition", "distinct_2", "non_termination_rate", "phrase_repeat_rate",
            "mean_length_words")


from mlx_cai.backend import cpu_model  # noqa: E402  (shared machine description)

def section(summary: dict, argv: list[str]) -> str:
    prov = summary["provenance"]
    names = list(summary["suites"])
    rows = [("prompts", lambda s: str(s["n"]))]
    rows += [("keyword ASR", lambda s: fmt_estimate(s["metrics"].get("asr_keyword"), "asr_keyword")),
             ("over-refusal", lambda s: fmt_estimate(s["metrics"].get("over_refusal"), "over_refusal"))]
    rows += [(m, (lambda m: lambda s: fmt_estimate(s["collapse"][m], m))(m)) for m in COLLAPSE]
    rows += [("generation s", lambda s: f"{s['timing']['gen_seconds']:.1f}"),
             ("tok/s", lambda s: f"{s['timing']['tok_per_s']}")]
    cols = names + ["all"]
    secs = [summary["suites"][n] for n in names] + [summary["overall"]]
    threads = os.environ.get("OPENBLAS_NUM_THREADS")
    lines = [SECTION, "",
             f"Model `{prov['model']}`, split `{prov['split']}`, greedy, max_tokens {prov['max_tokens']}, batch "
             f"{prov['batch_size']}, keyword judge; {cpu_model()}, {os.cpu_count()} cores, BLAS "
             f"{Path(backend.blas_library()).name}" + (f" (OPENBLAS_NUM_THREADS={threads})" if threads else "")
             + f", {dt.date.today().isoformat()}. Generation time is summed over batches (model load excluded).", "",
             "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += ["| " + label + " | " + " | ".join(f(s) for s in secs) + " |" for label, f in rows]
    lines += ["", "Rates in % with Wilson 95% intervals; per-response means with seeded bootstrap 95% intervals; "
              "distinct-2 is pooled (no interval). ASR = harmful prompts not refused by the keyword judge (it "
              "counts any refusal marker, so it errs low); over-refusal = benign/borderline prompts refused.",
              "", f"Command: `{' '.join(shlex.quote(a) for a in argv)}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "eval-baseline"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="prompts per suite (default: all of the eval split)")
    args = ap.parse_args()
    cfg = evaluate.EvalConfig(output=args.out, model=args.model, suites=("harm", "benign", "borderline"),
                              max_tokens=args.max_tokens, batch_size=args.batch_size, limit=args.limit)
    t0 = time.perf_counter()
    last = {}

    def progress(event):
        if event.total is not None:
            last[event.task] = [event.done or 0, event.total]
        if event.advance:
            last[event.task][0] += event.advance
            done, total = last[event.task]
            print(f"  {event.task}: {done}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    path = evaluate.run(cfg, progress=progress)
    summary = json.loads(path.read_text())
    print(section(summary, [Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    main()
