"""Prefix reuse (fastllama.PrefixStore) on a conversation-framing revise workload: the revision call with the
K/V store on against off.

The embedded SmolLM2-135M-Instruct, the first N shipped harmful train prompts, the demo's revise settings
(2 few-shot demos drawn per prompt, repetition penalty 1.2) but greedy, with `--max-tokens` per turn, in the
conversation framing of `mlx_cai.stages.revise`: the initial answers, then the critiques (store on: it keeps
their K/V), then the revisions (each revision prompt is its critique prompt, the critique and one more user
turn) twice: with the store, then with MLX_CAI_KV_REUSE_MB=0. The one call that differs runs twice in one
process, so both see the same machine load. Per call: seconds, prompt tokens prefilled and taken from the
store; and how many revisions are the same both ways.

    .venv/bin/python bench/kv_reuse.py -n 16      # ~3 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import os
import time

from mlx_cai import backend as _blas  # noqa: F401  (OpenBLAS before mlx.core)

from mlx_cai import constitution
from mlx_cai.chat import LocalBackend
from mlx_cai.fastllama import FastLlama
from mlx_cai.stages import revise as R


def timed(model: LocalBackend, name: str, convs, sampling, seeds):
    """The call's generations, after printing its seconds and prefill counters."""
    fast = FastLlama.for_model(model.loaded()[0])
    before, t = dict(fast.counts), time.perf_counter()
    out = model.complete(convs, sampling, seeds)
    took = time.perf_counter() - t
    print(f"{name:14} {took:6.1f} s  prefilled {fast.counts['prefilled'] - before['prefilled']:6}  "
          f"reused {fast.counts['reused'] - before['reused']:6}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=16, help="prompts (one batch)")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per turn")
    args = ap.parse_args()
    cfg = R.ReviseConfig(prompts="train:harmful", limit=args.n, shots=2, max_tokens=args.max_tokens,
                         temperature=0.0, repetition_penalty=1.2, batch_size=args.n, output="unused.jsonl")
    con = R.load_constitution(cfg)
    plans = [R.plan(p, con, cfg) for p in R.load_prompts(cfg.prompts, cfg.limit)]
    model = LocalBackend("smollm2-135m", batch_size=args.n)
    sampling = cfg.sampling()
    os.environ.pop("MLX_CAI_KV_REUSE_MB", None)  # the default store
    seeds = [p.seeds["initial"] for p in plans]
    asks = [[{"role": "user", "content": p.prompt.prompt}] for p in plans]
    initial = timed(model, "initial", asks, sampling, seeds)
    history = [constitution.shots_to_messages(p.shots) + a + [{"role": "assistant", "content": g.text},
                                                              {"role": "user", "content": p.principles[0].critique}]
               for p, a, g in zip(plans, asks, initial)]
    critiques = timed(model, "critique", history, sampling, seeds)
    for h, g, p in zip(history, critiques, plans):
        h += [{"role": "assistant", "content": g.text}, {"role": "user", "content": p.principles[0].revision}]
    on = timed(model, "revision, on", history, sampling, seeds)
    os.environ["MLX_CAI_KV_REUSE_MB"] = "0"
    off = timed(model, "revision, off", history, sampling, seeds)
    same = sum(a.tokens == b.tokens for a, b in zip(on, off))
    print(f"same revision tokens with the store on and off: {same}/{len(plans)}")


if __name__ == "__main__":
    main()
