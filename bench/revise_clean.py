"""Benchmark the SL-CAI data stages on the embedded model: revise, then clean, on shipped train harmful prompts.

Settings (issue 4): 1 round, 3 shots, repetition penalty 1.2, greedy, max_tokens 128, batch 32, 64 prompts.
Prints the share of revisions kept, counts per rejection reason, the keyword refusal rate and distinct-2 of the
kept revisions (all revisions and initial answers alongside, for comparison), revisions per minute, a few
examples, and the machine load (this box is shared; rates scale with what else runs).

  python bench/revise_clean.py [--n 64] [--out /tmp/bench-revise] [--examples 4] [--clean-only]

The revise output is resumable; a rerun on the same folder only re-times what was missing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mlx_cai import metrics, records
from mlx_cai.refusal import is_refusal
from mlx_cai.stages import clean
from mlx_cai.stages import revise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="shipped train harmful prompts")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-revise"))
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clean-only", action="store_true", help="skip revise; clean the existing revise.jsonl")
    args = ap.parse_args()

    out = args.out / "revise.jsonl"
    cfg = revise.ReviseConfig(prompts="train:harmful", output=str(out), model=args.model, rounds=1, shots=3,
                              repetition_penalty=1.2, max_tokens=128, batch_size=32, limit=args.n)
    before = len(records.done_ids(out)) if out.exists() else 0
    tokens = 0

    def tick(event) -> None:
        nonlocal tokens
        tokens += event.tokens

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    if not args.clean_only:
        revise.run(cfg, progress=tick)
    dt = time.perf_counter() - t0
    made = len(records.done_ids(out)) - before

    t1 = time.perf_counter()
    folder = clean.run(clean.CleanConfig(input=str(out), output=str(args.out / "clean"), helpful_ratio=0.0))
    dt_clean = time.perf_counter() - t1
    s = json.loads((folder / "summary.json").read_text())
    recs = list(records.read_jsonl(out))
    kept = list(records.read_jsonl(folder / "kept.jsonl"))
    rejected = list(records.read_jsonl(folder / "rejected.jsonl"))

    def rates(texts: list[str]) -> str:
        if not texts:
            return "n/a"
        refusal = sum(map(is_refusal, texts)) / len(texts)
        return f"refusal {refusal:.1%}, distinct-2 {metrics.distinct_n(texts, 2):.3f}, " \
               f"mean words {sum(len(metrics.words(t)) for t in texts) / len(texts):.0f}"

    print(f"# revise + clean, {args.model}, {len(recs)} prompts (train:harmful), 1 round, 3 shots, rep 1.2, "
          f"max_tokens 128, batch 32")
    print(f"load average at start {load0:.1f} on {os.cpu_count()} cores")
    if made:
        print(f"revise: {made} revisions in {dt:.0f} s = {made / dt * 60:.1f} revisions/min, "
              f"{tokens / dt:.1f} generated tok/s (initial + critique + revision)")
    else:
        print("revise: nothing new to time (output already complete)")
    print(f"clean: {dt_clean:.2f} s")
    print(f"kept {s['kept']}/{s['records']} = {s['kept_share']:.1%}")
    for reason, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<14} {n:>3}  ({n / s['records']:.0%})")
    print(f"kept revisions:  {rates([r['revision'] for r in kept])}")
    print(f"all revisions:   {rates([r['revision'] for r in recs])}")
    print(f"initial answers: {rates([r['initial'] for r in recs])}")
    print(f"finish=length: initial {sum(r['initial_finish'] == 'length' for r in recs)}, "
          f"revision {sum(r['revision_finish'] == 'length' for r in recs)}")
    phrases = metrics.frequent_phrases([r["revision"] for r in recs], n=6, min_share=0.1)
    print("frequent 6-grams in revisions:", json.dumps(dict(list(phrases.items())[:5])))
    for title, rows in (("kept", kept), ("rejected", rejected)):
        for r in rows[: args.examples]:
            print(f"\n[{title}] {r['prompt']}\n  initial:  {r['initial'][:160]!r}\n"
                  f"  critique: {r['rounds'][0]['critique'][:160]!r}\n  revision: {r['revision'][:240]!r}"
                  + (f"\n  reasons:  {r['reasons']}" if "reasons" in r else ""))


if __name__ == "__main__":
    main()
