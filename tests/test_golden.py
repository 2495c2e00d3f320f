"""Golden tests: the embedded models against an independent reference (Hugging Face transformers + torch).

`tests/golden/<model>_greedy.json` (smollm2-135m: llama, Q4_1/Q8_0; qwen2.5-coder-1.5b: qwen2 with q/k/v
biases, Q4_K/Q6_K) were written by `bench/make_golden.py` (see their `how` field): transformers loaded the same
GGUF, dequantized to float32 like our converter does on the CPU, and greedy-decoded 48 tokens for each fixed
conversation, alone, without padding. Here, with no torch, we check that

- our tokenizer.json (built from the GGUF metadata) encodes a varied text sample to the same ids,
- our chat template gives the same prompt ids,
- `mlx_cai.generate.generate` greedy-decodes the same completion tokens and finish reasons, both with all
  golden prompts in ONE batch (prompt lengths differ, so this checks left padding and dropping finished
  rows mid-batch) and with batch_size=1.

The comparison is exact over the whole completion, no shorter prefix: for SmolLM2 the reference's smallest
top-1 minus top-2 logit margin over all steps is ~0.03, while our logits differ from transformers' by at most
~1.2e-4 (measured once, teacher-forced over these prompts and completions), so no near tie excuses a divergence. On failure the message gives the first diverging step and the reference margin there.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
SPECS = ("smollm2-135m", "qwen2.5-coder-1.5b")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=SPECS)
def spec(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def golden(spec) -> dict:
    return json.loads((GOLDEN / f"{spec}_greedy.json").read_text())


@pytest.fixture(scope="module")
def loaded(spec):  # the embedded model under test
    from mlx_cai import models

    try:
        models.resolve(spec)
    except models.ModelError as e:
        pytest.skip(str(e))
    return models.load(spec)


def _describe(ref: dict, got: list[int], tokenizer) -> str:
    want = ref["completion_ids"]
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    margins = ref["top2_logit_margin"]
    margin = margins[first] if first < len(margins) else None
    return (
        f"first divergence at completion step {first} (reference top-2 logit margin there: {margin}); "
        f"reference {len(want)} tokens: {ref['completion_text']!r}; ours {len(got)} tokens: {tokenizer.decode(got)!r}"
    )


def test_tokenizer_matches_transformers(golden, loaded, spec):
    _, tokenizer = loaded
    for sample in golden["tokenizer_samples"]:
        text = sample["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        if spec.startswith("qwen") and unicodedata.normalize("NFC", text) != text:
            # Hugging Face's Qwen2 tokenizer (ours, and what transformers loads for any qwen2 folder) normalizes
            # to NFC; the GGUF reference does not. So decomposed text must encode as its composed form.
            assert ids == tokenizer.encode(unicodedata.normalize("NFC", text), add_special_tokens=False)
            assert ids != sample["ids"]
            continue
        assert ids == sample["ids"], f"tokenization differs for {text!r}"
        assert tokenizer.decode(ids) == text


def test_chat_template_prompt_ids(golden, loaded):
    from mlx_cai.generate import encode

    _, tokenizer = loaded
    for ref in golden["conversations"]:
        assert encode(tokenizer, ref["messages"]) == ref["prompt_ids"], f"prompt ids differ for {ref['messages']}"


def test_golden_prompts_have_different_lengths(golden):
    # Otherwise the one-batch run below would not exercise left padding.
    assert len({len(r["prompt_ids"]) for r in golden["conversations"]}) > 1


@pytest.mark.parametrize("batch_size", ["all", 1])
def test_greedy_matches_transformers(golden, loaded, batch_size):
    from mlx_cai.sampling import SamplingConfig
    from mlx_cai.generate import generate

    model, tokenizer = loaded
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
