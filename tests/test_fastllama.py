"""The compiled CPU generation path: shared-prefix prefill, length groups, parallel CPU streams, fast exp."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_cai import backend, fastmath
from mlx_cai.fastllama import _split, length_groups, shared_prefix
from mlx_cai.sampling import SamplingConfig
from mlx_cai.generate import generate

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly and plainly, please."}
TEXTS = ["hi", "hello there, how are you today?", "a much longer prompt " * 6, "ok", "tell me about rivers",
         "why", "what is the capital of France and why", "count to ten"]


def convs(texts, system=True):
    return [([SYSTEM] if system else []) + [{"role": "user", "content": t}] for t in texts]


def test_shared_prefix_leaves_every_row_a_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert shared_prefix([[7, 8], [1, 2]]) == 0
    assert shared_prefix([[1, 2, 3]]) == 0  # one row: nothing to share


def test_length_groups_are_contiguous_and_bound_padding():
    lengths = [100, 98, 96, 60, 59, 20, 19, 18, 3]
    groups = length_groups(lengths)
    assert [a for a, _ in groups] == [0, 3, 5, 8] and groups[-1][1] == len(lengths)
    for a, b in groups:  # within a group, padding to the longest wastes at most max(4, 12.5%)
        assert max(lengths[a:b]) - min(lengths[a:b]) <= max(4, 0.125 * max(lengths[a:b]))
    assert length_groups([5]) == [(0, 1)]


def test_split_covers_rows_evenly():
    assert _split(7, 2) == [(0, 4), (4, 7)] or _split(7, 2) == [(0, 3), (3, 7)]
    assert _split(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_fast_exp_matches_numpy_over_the_float32_range():
    x = np.concatenate([np.linspace(-87, 88, 100_001), np.random.default_rng(0).normal(0, 3, 10_000)]).astype(np.float32)
    got = np.array(fastmath.exp(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-6
    assert float(fastmath.exp(mx.array(-1000.0))) < 1e-37  # clipped, not NaN or negative


def test_silu_mul_and_masked_softmax_match_mlx():
    g, u = mx.random.normal((3, 50), key=mx.random.key(0)) * 4, mx.random.normal((3, 50), key=mx.random.key(1))
    assert np.allclose(np.array(fastmath.silu_mul(g, u)), np.array(nn.silu(g) * u), rtol=1e-5, atol=1e-6)
    s = mx.random.normal((2, 4, 9), key=mx.random.key(2)) * 5
    mask = mx.random.uniform(shape=(2, 1, 9), key=mx.random.key(3)) > 0.4
    mask[..., 0] = True  # every row keeps one slot
    mask = mx.broadcast_to(mask, s.shape)
    p = np.array(fastmath.masked_softmax(s, mask))
    ref = np.array(mx.softmax(mx.where(mask, s, -mx.inf), axis=-1))
    assert np.allclose(p, ref, atol=1e-6)
    assert np.all(p[~np.array(mask)] == 0)


@pytest.fixture(params=["kernels", "mlx-ops"])
def two_streams(monkeypatch, request):
    """Make generation use two CPU streams whatever the machine's load: with the C++ kernels, prefill in two
    runs of rows (decode then runs in one stream with 2-thread kernels); with MLX ops (MLX_CAI_KERNELS=0), also
    decode steps split over two streams."""
    monkeypatch.setenv("MLX_CAI_STREAM_ROWS", "1")
    monkeypatch.setattr(backend, "blas_threads", lambda: 2)
    if request.param == "mlx-ops":
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")


def test_shared_prefix_and_streams_give_the_generic_paths_tokens(tiny, two_streams):
    model, tok = tiny
    cfg = SamplingConfig(max_tokens=14)
    fast = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    generic = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert [g.tokens for g in fast] == [g.tokens for g in generic]
    alone = [generate(model, tok, convs([t]), cfg, batch_size=1)[0] for t in TEXTS]
    assert [g.tokens for g in fast] == [g.tokens for g in alone]


def test_rows_finishing_early_compact_across_streams(tiny, two_streams):
    model, tok = tiny
    cfg = SamplingConfig(max_tokens=16, temperature=1.0)  # per-row seeds: diverse rows, same in both paths
    free = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    # End tokens taken from six rows at different steps: rows stop one after another and the batch is
    # compacted (and rebalanced over the streams) while the rest keep going.
    tok.eos_token_ids = {2} | {free[i].tokens[2 + 2 * i] for i in range(6)}
    fast = generate(model, tok, convs(TEXTS), cfg, batch_size=8)
    generic = generate(model, tok, convs(TEXTS), cfg, batch_size=8, use_fast=False)
    assert sum(g.finish_reason == "stop" for g in generic) >= 5
    assert len({len(g.tokens) for g in generic}) >= 4
    assert [(g.tokens, g.finish_reason) for g in fast] == [(g.tokens, g.finish_reason) for g in generic]


def _close(a, b, tol=1e-4):
    return np.allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_fast_ops_have_the_exact_gradients():
    k = iter(mx.random.split(mx.random.key(7), 8))
    x = mx.random.normal((5, 300), key=next(k)) * 6
    assert _close(mx.grad(lambda a: (fastmath.exp(a) * mx.arange(5)[:, None]).sum())(x / 4),
                  mx.grad(lambda a: (mx.exp(a) * mx.arange(5)[:, None]).sum())(x / 4))
    g, u = mx.random.normal((4, 64), key=next(k)) * 3, mx.random.normal((4, 64), key=next(k))
    w = mx.random.normal((4, 64), key=next(k))
    ours = mx.grad(lambda g, u: (fastmath.silu_mul(g, u) * w).sum(), argnums=(0, 1))(g, u)
    ref = mx.grad(lambda g, u: (nn.silu(g) * u * w).sum(), argnums=(0, 1))(g, u)
    assert all(_close(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
def test_cpu_attention_matches_mlx_sdpa_with_gradients(mask):
    k = iter(mx.random.split(mx.random.key(3), 8))
    q = mx.random.normal((2, 6, 5, 16), key=next(k))
    kv = [mx.random.normal((2, 2, 7, 16), key=next(k)) for _ in range(2)]  # GQA: 3 query heads per K/V head
    if mask == "bool":
        mask = mx.random.uniform(shape=(2, 1, 5, 7), key=next(k)) > 0.3
        mask[..., 6] = True
    elif mask == "additive":
        mask = mx.random.normal((2, 6, 5, 7), key=next(k))

    def f(fn, q, key, v):
        return (fn(q, key, v) * mx.arange(16)).sum()

    ours = lambda q, key, v: fastmath.attention(q, key, v, 0.25, mask)  # noqa: E731
    ref = lambda q, key, v: mx.fast.scaled_dot_product_attention(q, key, v, scale=0.25, mask=mask)  # noqa: E731
    assert _close(ours(q, *kv), ref(q, *kv))
    g1 = mx.grad(lambda *a: f(ours, *a), argnums=(0, 1, 2))(q, *kv)
    g2 = mx.grad(lambda *a: f(ref, *a), argnums=(0, 1, 2))(q, *kv)
    assert all(_close(a, b) for a, b in zip(g1, g2))


def test_mlx_lm_cpu_ops_give_the_same_loss_and_gradients(tiny):
    model, tok = tiny
    tokens = mx.array([tok.encode("the quick brown fox jumps over the lazy dog")])

    def loss(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()

    plain = nn.value_and_grad(model, loss)(model)
    with fastmath.mlx_lm_cpu_ops():
        fast = nn.value_and_grad(model, loss)(model)
    import mlx_lm.models.llama as llama

    assert llama.swiglu is not fastmath.silu_mul  # restored on exit
    from mlx.utils import tree_flatten

    assert _close(plain[0], fast[0])
    assert all(_close(a, b) for (_, a), (_, b) in zip(tree_flatten(plain[1]), tree_flatten(fast[1])))


def test_prefill_in_two_runs_and_a_decode_step_match_the_model_logits(tiny, two_streams):
    """Row by row against mlx-lm's own forward pass: catches rows of one run written into another's cache
    (the tiny model's greedy tokens are too repetitive to show that)."""
    from mlx_cai import fastllama
    from mlx_cai.fastllama import FastLlama, FastRunner
    from mlx_cai.generate import encode

    model, tok = tiny
    prompts = sorted([encode(tok, c) for c in convs(TEXTS)], key=len, reverse=True)
    assert len(fastllama._token_halves([len(p) for p in prompts])) == 2 and fastllama.shared_prefix(prompts) > 0
    runner = FastRunner(FastLlama.build(model), prompts, 4)
    first = runner.prefill()
    y = mx.array([(37 * i + 5) % 250 for i in range(len(prompts))])
    second = runner.step(y)
    for i, p in enumerate(prompts):
        assert _close(first[i], model(mx.array([p]))[0, -1]), i
        assert _close(second[i], model(mx.array([p + [int(y[i])]]))[0, -1]), i
