"""Where a refusal is decided: the model's next-token distribution at the start of its answer.

  python bench/first_token.py [--adapter DIR] [--suites benign,borderline,harm] [--limit 48]

For each prompt of a shipped eval suite (the chat template, no system turn, as `mlx-cai eval` sends it): the
probability of the tokens that open a refusal ("I", "Sorry", "As", "Unfortunately", ...) and whether the greedy
first token is one of them. A model trained on refusals that all open with "I" beside helpful answers that open in
many ways can make "I" the most likely first token where a refusal has less than half the mass: greedy decoding
then refuses. The last column counts those prompts. Reads only the model; writes nothing.
"""

from __future__ import annotations

import argparse

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx

from mlx_cai import evalsets, models
from mlx_cai.generate import encode

OPENERS = ("I", " I", "Sorry", "As", "Unfortunately")


def opener_ids(tokenizer) -> set[int]:
    return {ids[0] for w in OPENERS if (ids := tokenizer.encode(w, add_special_tokens=False))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--suites", default="benign,borderline,harm")
    ap.add_argument("--limit", type=int, default=48)
    args = ap.parse_args()
    model, tok = models.load(args.model, args.adapter)
    ids = sorted(opener_ids(tok))
    print(f"{args.model} + {args.adapter or 'no adapter'}; opener tokens: {[tok.decode([i]) for i in ids]}")
    print("| suite | prompts | mean P(opener) | P(opener) > 0.5 | greedy first token an opener | ... with P(opener) < 0.5 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.suites.split(","):
        items = evalsets.load_suite(name).items[: args.limit]
        mass, top, weak = [], 0, 0
        for it in items:
            logits = model(mx.array([encode(tok, [{"role": "user", "content": it.turns[0]}])]))[0, -1]
            p = mx.softmax(logits.astype(mx.float32))
            m = mx.sum(p[mx.array(ids)]).item()
            is_top = int(mx.argmax(p).item()) in ids
            mass.append(m)
            top += is_top
            weak += is_top and m < 0.5
        print(f"| {name} | {len(items)} | {sum(mass) / len(mass):.2f} | {sum(m > 0.5 for m in mass)} | {top} | {weak} |")


if __name__ == "__main__":
    main()
