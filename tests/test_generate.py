"""The batched generation engine on a tiny random llama: padding, stopping, seeds, context policy."""

from __future__ import annotations

import math
import os
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_cai import backend, sampling
from mlx_cai.sampling import SamplingConfig
from mlx_cai.generate import ContextError, fit_context, generate

PROMPTS = ["hi", "hello there, how are you today?", "a much longer prompt " * 6, "ok"]


def convs(texts):
    return [[{"role": "user", "content": t}] for t in texts]


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    cfg = SamplingConfig(max_tokens=12)
    together = generate(model, tok, convs(PROMPTS), cfg, batch_size=4)
    alone = [generate(model, tok, convs([p]), cfg, batch_size=1)[0] for p in PROMPTS]
    # Left padding, masks and per-row rotary offsets must make batching invisible.
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert all(g.finish_reason == "length" and g.completion_tokens == 12 for g in together)


def test_results_keep_input_order_across_batches(tiny):
    model, tok = tiny
    cfg = SamplingConfig(max_tokens=6)
    one = generate(model, tok, convs(PROMPTS), cfg, batch_size=1)
    two = generate(model, tok, convs(PROMPTS), cfg, batch_size=3)
    assert [g.tokens for g in one] == [g.tokens for g in two]
    assert [g.prompt_tokens for g in one] == [len(tok.apply_chat_template(c, add_generation_prompt=True))
                                              for c in convs(PROMPTS)]


def test_stops_on_end_token_and_counts_it(tiny):
    model, tok = tiny
    free = generate(model, tok, convs(["hello"]), SamplingConfig(max_tokens=10))[0]
    stop_at = free.tokens[3]
    first = free.tokens.index(stop_at)
    tok.eos_token_ids = {2, stop_at}
    g = generate(model, tok, convs(["hello", "ok"]), SamplingConfig(max_tokens=10), batch_size=2)[0]
    assert g.finish_reason == "stop"
    assert g.tokens == free.tokens[:first]
    assert g.completion_tokens == first + 1  # the end token was generated too
    assert g.text == tok.decode(free.tokens[:first])


def test_row_seeds_make_samples_independent_of_batch(tiny):
    model, tok = tiny
    cfg = SamplingConfig(max_tokens=10, temperature=1.0, top_p=0.9)
    a = generate(model, tok, convs(PROMPTS), cfg, batch_size=4, seeds=[11, 12, 13, 14])
    b = generate(model, tok, convs(PROMPTS[2:3]), cfg, batch_size=1, seeds=[13])
    assert a[2].tokens == b[0].tokens
    c = generate(model, tok, convs(PROMPTS[2:3]), cfg, batch_size=1, seeds=[99])
    assert c[0].tokens != b[0].tokens
    greedy = generate(model, tok, convs(PROMPTS[2:3]), SamplingConfig(max_tokens=10))
    assert greedy[0].tokens != b[0].tokens


def test_context_policy_truncates_left_or_errors(tiny):
    model, tok = tiny
    long = "word " * 400  # ~2000 byte tokens, over the 256-token context
    g = generate(model, tok, convs([long]), SamplingConfig(max_tokens=8))[0]
    assert g.prompt_tokens == 256 - 8 and g.truncated > 0
    with pytest.raises(ContextError, match="more than the 248"):
        generate(model, tok, convs([long]), SamplingConfig(max_tokens=8, context_policy="error"))
    assert fit_context(list(range(10)), 4, "truncate") == ([6, 7, 8, 9], 6)


def test_repetition_penalty_changes_greedy_output(tiny):
    model, tok = tiny
    plain = generate(model, tok, convs(["hello"]), SamplingConfig(max_tokens=24))[0]
    assert len(set(plain.tokens)) < len(plain.tokens)  # a random model repeats itself
    pen = generate(model, tok, convs(["hello"]), SamplingConfig(max_tokens=24, repetition_penalty=50.0,
                                                                   repetition_context=64))[0]
    assert len(set(pen.tokens)) > len(set(plain.tokens))


def test_repetition_penalty_math():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0]])
    recent = mx.array([[0, 1, -1]])  # tokens 0 and 1 seen; -1 is an empty slot
    out = np.array(sampling.apply_repetition_penalty(logits, recent, 2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])  # 2/2, -1*2, unchanged, unchanged


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    lp = mx.array(np.log(probs))
    kept = np.isfinite(np.array(sampling.top_p_mask(lp, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    kept = np.isfinite(np.array(sampling.top_p_mask(lp, 0.1)))
    assert kept.tolist() == [[True, False, False, False]]  # the top token is always kept


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="context_policy"):
        SamplingConfig(context_policy="drop")


def test_compiled_fast_path_equals_generic_mlx_lm_path(tiny):
    model, tok = tiny
    from mlx_cai.fastllama import FastLlama

    assert FastLlama.build(model) is not None  # the tiny llama takes the fast path by default
    cfg = SamplingConfig(max_tokens=16)
    fast = generate(model, tok, convs(PROMPTS), cfg, batch_size=4)
    generic = generate(model, tok, convs(PROMPTS), cfg, batch_size=4, use_fast=False)
    assert [g.tokens for g in fast] == [g.tokens for g in generic]


def test_fast_path_is_kept_per_model_until_its_weights_change(tiny):
    model, tok = tiny
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_cai.fastllama import FastLlama

    cfg = SamplingConfig(max_tokens=8)
    first = FastLlama.for_model(model)
    generate(model, tok, convs(PROMPTS), cfg, batch_size=4)
    assert FastLlama.for_model(model) is first  # generate reused it, compiled steps included
    assert first._steps
    name, w = next((k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("mlp.down_proj.weight"))
    model.update(tree_unflatten([(name, w * -3.0)]))
    try:
        assert FastLlama.for_model(model) is not first
        fast = generate(model, tok, convs(PROMPTS), cfg, batch_size=4)
        generic = generate(model, tok, convs(PROMPTS), cfg, batch_size=4, use_fast=False)
        assert [g.tokens for g in fast] == [g.tokens for g in generic]  # the new weights, not the kept ones
    finally:
        model.update(tree_unflatten([(name, w)]))


def test_fast_path_folds_lora_adapters(tiny):
    model, tok = tiny
    from mlx_lm.tuner.utils import linear_to_lora_layers

    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                     "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]})
    for layer in model.model.layers:  # LoRA B starts at zero: make the adapter do something
        for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
            lin.lora_b = mx.random.normal(lin.lora_b.shape, key=mx.random.key(1)) * 0.05
    cfg = SamplingConfig(max_tokens=12)
    fast = generate(model, tok, convs(PROMPTS), cfg, batch_size=4)
    generic = generate(model, tok, convs(PROMPTS), cfg, batch_size=4, use_fast=False)
    assert [g.tokens for g in fast] == [g.tokens for g in generic]


def test_blas_threads_set_nests_and_restores_the_previous_setting():
    """fastllama's prefill restores the process's BLAS threads inside generate's one-thread-per-stream block."""
    from mlx_cai import backend

    if backend._BLAS_LIB is None:
        pytest.skip("no OpenBLAS loaded")
    get = backend._BLAS_LIB.openblas_get_num_threads
    start = get()
    other = 2 if start == 1 else 1
    with backend.blas_threads_set(other):
        assert get() == other
        with backend.blas_threads_set(start):
            assert get() == start
        assert get() == other
        with backend.blas_threads_per(1):  # one stream: nothing changes
            assert get() == other
    assert get() == start


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_blas_thread_choice_sees_cores_kept_busy_by_others():
    """Busy-looping processes on every core are seen within the 0.1 s sample (the 1-minute load average
    would take about a minute to notice them)."""
    import subprocess

    cores = len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        assert backend._others_busy(cores, seconds=0.3)
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_generation_prompts_are_the_training_prompts(tiny):
    """One chat encoding (mlx_cai.encoding): generation's prompt ids are the ids training masks from the loss,
    with the chat template and, for a base model without one, turns joined by blank lines."""
    from mlx_cai import encoding
    from mlx_cai.generate import encode

    _, tok = tiny
    chat = [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat"},
            {"role": "user", "content": "again"}]
    for template in (tok.chat_template, None):
        tok._tokenizer.chat_template = template
        prompt = encode(tok, chat)
        expected = (tok.apply_chat_template(chat, add_generation_prompt=True) if template
                    else list(tok.encode("say cat\n\ncat\n\nagain\n\n")))
        assert prompt == expected
        full, offset = encoding.encode_chat(tok, [*chat, {"role": "assistant", "content": "cat cat"}])
        assert full[:offset] == prompt


def test_top_p_mask_over_the_candidates_is_the_full_sorts_bit_for_bit(monkeypatch):
    from mlx_cai import sampling

    mx.random.seed(3)
    full_calls = []
    real_full = sampling._top_p_full
    monkeypatch.setattr(sampling, "_top_p_full", lambda lp, p: full_calls.append(1) or real_full(lp, p))
    for scale in (12.0, 20.0):  # peaked rows: the nucleus ends within the candidates
        lp = mx.random.normal((4, 4096)) * scale
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        for p in (0.5, 0.9, 0.95):
            got = sampling.top_p_mask(lp, p, candidates=256)
            assert full_calls == [], "took the full sort although the nucleus fits the candidates"
            assert mx.array_equal(got, real_full(lp, p)).item()
    flat = mx.zeros((2, 4096)) - math.log(4096)  # every token ties and the nucleus is most of the vocabulary
    assert mx.array_equal(sampling.top_p_mask(flat, 0.9, candidates=256), real_full(flat, 0.9)).item()
    assert full_calls == [1]  # ...so that row set was sorted whole
    tied = mx.array([[0.0, -1.0, -1.0, -5.0] + [-30.0] * 60]) - 0.5  # two kept candidates tie
    assert mx.array_equal(sampling.top_p_mask(tied, 0.99, candidates=8), real_full(tied, 0.99)).item()
    assert full_calls == [1, 1]
