"""The compiled decode path (mlx_cai.fastllama) on mlx-lm's qwen2: the llama layout plus q/k/v biases.

A tiny random qwen2 (`mlx_lm.models.qwen2`, tied and untied embeddings) with large random q/k/v biases and the
tiny llama's byte-level tokenizer (conftest's `tiny`): the fast path's greedy tokens equal the generic mlx-lm
path's, batched and alone, with and without a LoRA adapter over the biased projections, with the C++ kernels
(packed decode weights) and with MLX ops; and dropping the biases changes them (the tests see the biases).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_cai import backend, kernels
from mlx_cai.fastllama import FastLlama, FastRunner
from mlx_cai.generate import _decode_batch, encode, generate
from mlx_cai.sampling import SamplingConfig
from tinymodels import add_lora, assert_matches_forward, randomize

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly and plainly, please."}
TEXTS = ["hi", "hello there, how are you today?", "a much longer prompt " * 6, "ok", "tell me about rivers",
         "why", "what is the capital of France and why", "count to ten"]
built = pytest.mark.skipif(kernels._ext is None, reason=f"kernels not built: {kernels._ERROR}")


def convs(texts, system=True):
    return [([SYSTEM] if system else []) + [{"role": "user", "content": t}] for t in texts]


def tiny_qwen2(vocab: int, tied: bool = True, seed: int = 0):
    """A random 2-layer qwen2 (hidden 64, 4 heads, 2 K/V heads), float32, q/k/v biases nonzero and large."""
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=vocab, num_key_value_heads=2,
                           max_position_embeddings=1024, tie_word_embeddings=tied)
    model = qwen2.Model(args)
    randomize(model, seed)
    assert "bias" in model.model.layers[0].self_attn.q_proj and "bias" not in model.model.layers[0].self_attn.o_proj
    return model


@pytest.fixture(params=["tied", "untied"])
def qwen(tiny, request):
    """(tiny random qwen2, the tiny llama's tokenizer). Fresh per test: tests may change eos ids."""
    llama, tok = tiny
    return tiny_qwen2(llama.args.vocab_size, tied=request.param == "tied"), tok


@pytest.fixture(params=["kernels", "mlx-ops"])
def paths(monkeypatch, request):
    """With the C++ kernels (packed decode weights, rope_cache, decode_attention) and with MLX ops
    (MLX_CAI_KERNELS=0, decode steps split over two streams); prefill in two runs of rows either way."""
    monkeypatch.setenv("MLX_CAI_STREAM_ROWS", "1")
    monkeypatch.setattr(backend, "blas_threads", lambda: 2)
    if request.param == "mlx-ops":
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    elif kernels._ext is None:
        pytest.skip(f"kernels not built: {kernels._ERROR}")
    return request.param


def _close(a, b, tol=1e-4):
    return np.allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_qwen2_takes_the_fast_path_with_its_biases(qwen):
    model, _ = qwen
    fast = FastLlama.build(model)
    assert fast is not None
    for lyr, block in zip(fast.layers, model.model.layers):
        a = block.self_attn
        want = mx.concatenate([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        assert lyr.b_qkv is not None and np.array_equal(np.array(lyr.b_qkv), np.array(want))
    assert fast.traditional is False and fast.theta == model.args.rope_theta


def test_qwen2_greedy_tokens_match_the_generic_path_batched_and_alone(qwen, paths):
    model, tok = qwen
    cfg = SamplingConfig(max_tokens=14)
    fast = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    generic = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert FastLlama.for_model(model) is not None  # generate took the fast path
    assert len({tuple(g.tokens) for g in generic}) == len(TEXTS)  # rows differ: a real check
    assert all(len(set(g.tokens)) > 3 for g in generic)  # ...and do not just repeat a token
    assert [g.tokens for g in fast] == [g.tokens for g in generic]
    alone = [generate(model, tok, convs([t]), cfg, batch_size=1)[0] for t in TEXTS]
    assert [g.tokens for g in fast] == [g.tokens for g in alone]


def test_qwen2_prefill_and_decode_steps_match_the_model_logits(qwen, paths):
    """Row by row against mlx-lm's own forward pass, prefill (two runs of rows, a shared prefix) and two decode
    steps; with the kernels, the decode steps run on the packed weights."""
    from mlx_cai import fastllama

    model, tok = qwen
    prompts = sorted([encode(tok, c) for c in convs(TEXTS)], key=len, reverse=True)
    assert len(fastllama._token_halves([len(p) for p in prompts])) == 2 and fastllama.shared_prefix(prompts) > 0
    fast = FastLlama.build(model)
    packed = paths == "kernels"
    assert (fast.head_packed is not None) == packed and all((lyr.packed is not None) == packed for lyr in fast.layers)
    assert_matches_forward(fast, model, prompts)


@built
def test_large_model_packs_without_fused_copies_and_matches_the_model(qwen, monkeypatch):
    """Where fused q/k/v and gate/up copies would not fit beside the packed ones (a 1.5B model in float32),
    prefill multiplies by the model's own blocks (no copy) and decode steps by the packed panels: same logits."""
    from mlx_cai import fastllama

    model, tok = qwen
    monkeypatch.setattr(fastllama, "_fuse_copies_fit", lambda layers, head: False)
    fast = FastLlama.build(model)
    a0, m0 = model.model.layers[0].self_attn, model.model.layers[0].mlp
    lyr = fast.layers[0]
    assert lyr.packed is not None and isinstance(lyr.w_qkv, tuple) and isinstance(lyr.w_gu, tuple)
    assert lyr.w_qkv[0] is a0.q_proj.weight and lyr.w_gu[1] is m0.up_proj.weight  # the model's arrays, not copies
    prompts = sorted([encode(tok, c) for c in convs(TEXTS)], key=len, reverse=True)
    runner = FastRunner(fast, prompts, 2)
    logits = [runner.prefill()]
    y = mx.array([(31 * i + 7) % 250 for i in range(len(prompts))])
    logits.append(runner.step(y))
    for i, p in enumerate(prompts):
        assert _close(logits[0][i], model(mx.array([p]))[0, -1]), i
        assert _close(logits[1][i], model(mx.array([p + [int(y[i])]]))[0, -1]), i


def test_qwen2_fast_path_folds_lora_over_biased_projections(qwen, paths):
    model, tok = qwen
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]
    add_lora(model, keys)
    assert "bias" in model.model.layers[0].self_attn.q_proj.linear
    assert FastLlama.build(model) is not None
    cfg = SamplingConfig(max_tokens=12)
    fast = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    generic = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert [g.tokens for g in fast] == [g.tokens for g in generic]
    alone = [generate(model, tok, convs([t]), cfg, batch_size=1)[0] for t in TEXTS[:3]]
    assert [g.tokens for g in fast[:3]] == [g.tokens for g in alone]


def test_dropping_the_biases_changes_the_tokens(qwen, paths):
    """The checks above see the biases: the fast path without them gives other logits and tokens."""
    model, tok = qwen
    cfg = SamplingConfig(max_tokens=14)
    chats = sorted(convs(TEXTS), key=lambda c: -len(encode(tok, c)))  # the order generate runs them in
    prompts = [encode(tok, c) for c in chats]
    generic = generate(model, tok, chats, cfg, batch_size=8, use_fast=False)
    eos = set(tok.eos_token_ids)

    def fast_tokens(fast):
        toks, _ = _decode_batch(FastRunner(fast, prompts, cfg.max_tokens), prompts,
                                [cfg.seed + i for i in range(len(prompts))], cfg, eos, None)
        return toks

    fast = FastLlama.build(model)
    assert fast_tokens(fast) == [g.tokens for g in generic]
    for lyr in fast.layers:
        lyr.b_qkv = None
    fast._steps.clear()
    assert fast_tokens(fast) != [g.tokens for g in generic]
    assert not _close(FastRunner(fast, prompts[:1], 1).prefill()[0], model(mx.array(prompts[:1]))[0, -1])


def test_other_biases_and_dora_still_take_the_generic_path(tiny):
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    vocab = tiny[0].args.vocab_size
    model = tiny_qwen2(vocab)
    o = model.model.layers[0].self_attn.o_proj
    model.model.layers[0].self_attn.o_proj = nn.Linear(o.weight.shape[1], o.weight.shape[0], bias=True)
    assert FastLlama.build(model) is None  # o-projection bias: not served
    model = tiny_qwen2(vocab)
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
                          use_dora=True)
    assert FastLlama.build(model) is None
    model = tiny_qwen2(vocab)
    model.args.rope_scaling = {"type": "yarn", "factor": 4.0}
    assert FastLlama.build(model) is None
