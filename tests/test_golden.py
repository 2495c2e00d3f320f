"""Golden test: the embedded model against an independent reference (Hugging Face transformers + torch).

`tests/golden/smollm2_greedy.json` was written by `bench/make_golden.py` (see its `how` field): transformers
loaded the same GGUF, dequantized to float32 like our converter does, and greedy-decoded 48 tokens for each
fixed conversation, alone, without padding. Here, with no torch, we check that

- our tokenizer.json (built from the GGUF metadata) encodes a varied text sample to the same ids,
- our chat template gives the same prompt ids,
- `mlx_cai.generate.generate` greedy-decodes the same completion tokens and finish reasons, both with all
  golden prompts in ONE batch (prompt lengths differ, so this checks left padding and dropping finished
  rows mid-batch) and with batch_size=1.

The comparison is exact over the whole completion, no shorter prefix: the reference's smallest top-1 minus
top-2 logit margin over all steps is ~0.03, while our logits differ from transformers' by at most ~1.2e-4
(measured once, teacher-forced over these prompts and completions), so no near tie excuses a divergence. On failure the message gives the first diverging step and the reference margin there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "smollm2_greedy.json"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def smollm2():
    from mlx_cai import models

    try:
        models.embedded_gguf()
    except models.ModelError as e:
        pytest.skip(str(e))
    return models.load(models.EMBEDDED)


def _describe(ref: dict, got: list[int], tokenizer) -> str:
    want = ref["completion_ids"]
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    margins = ref["top2_logit_margin"]
    margin = margins[first] if first < len(margins) else None
    return (
        f"first divergence at completion step {first} (reference top-2 logit margin there: {margin}); "
        f"reference {len(want)} tokens: {ref['completion_text']!r}; ours {len(got)} tokens: {tokenizer.decode(got)!r}"
    )


def test_tokenizer_matches_transformers(golden, smollm2):
    _, tokenizer = smollm2
    for sample in golden["tokenizer_samples"]:
        ids = tokenizer.encode(sample["text"], add_special_tokens=False)
        assert ids == sample["ids"], f"tokenization differs for {sample['text']!r}"
        assert tokenizer.decode(ids) == sample["text"]


def test_chat_template_prompt_ids(golden, smollm2):
    from mlx_cai.generate import encode

    _, tokenizer = smollm2
    for ref in golden["conversations"]:
        assert encode(tokenizer, ref["messages"]) == ref["prompt_ids"], f"prompt ids differ for {ref['messages']}"


def test_golden_prompts_have_different_lengths(golden):
    # Otherwise the one-batch run below would not exercise left padding.
    assert len({len(r["prompt_ids"]) for r in golden["conversations"]}) > 1


@pytest.mark.parametrize("batch_size", ["all", 1])
def test_greedy_matches_transformers(golden, smollm2, batch_size):
    from mlx_cai.sampling import SamplingConfig
    from mlx_cai.generate import generate

    model, tokenizer = smollm2
    refs = golden["conversations"]
    bs = len(refs) if batch_size == "all" else batch_size
    steps: list[int] = []
    out = generate(model, tokenizer, [r["messages"] for r in refs],
                   SamplingConfig(max_tokens=golden["max_new_tokens"], temperature=0.0),
                   batch_size=bs, on_tokens=steps.append)
    assert steps, "on_tokens was never called"
    for ref, g in zip(refs, out):
        assert g.prompt_tokens == len(ref["prompt_ids"])
        assert g.tokens == ref["completion_ids"], _describe(ref, g.tokens, tokenizer)
        assert g.finish_reason == ref["finish"]
        assert g.completion_tokens == len(ref["completion_ids"]) + (ref["finish"] == "stop")
        assert g.text == ref["completion_text"]
