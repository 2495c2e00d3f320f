"""The fused C++ CPU kernels (mlx_cai.kernels) against the MLX ops they replace."""

from __future__ import annotations

import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_cai import backend, kernels

built = pytest.mark.skipif(kernels._ext is None, reason=f"kernels not built: {kernels._ERROR}")


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU kernels are built on Linux only")
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler: MLX ops are used")
def test_kernels_are_built_and_used_on_linux():
    # make setup builds them; if this fails, scripts/build-kernels.sh printed why (build/kernels.log).
    assert kernels._ext is not None, kernels._ERROR
    assert kernels.enabled()


def reference(logits, targets):
    logits = logits.astype(mx.float32)
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)


def awkward_logits(K=37, V=1003, seed=0):
    """Rows of very different scales, a vocabulary that is no multiple of a vector width, masked entries."""
    x = mx.random.normal((K, V), key=mx.random.key(seed)) * mx.linspace(0.1, 60.0, K)[:, None]
    x = mx.where(mx.arange(V)[None, :] % 97 == 5, -mx.inf, x)  # e.g. banned tokens
    t = mx.random.randint(0, V, (K,), key=mx.random.key(seed + 1)).astype(mx.int32)
    return x, mx.where(t % 97 == 5, t + 1, t)  # targets never on a masked entry


@built
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_token_logprobs_forward_matches_logsumexp(threads):
    x, t = awkward_logits()
    got = kernels._ext.token_logprobs(x, t, threads)
    want = reference(x, t)
    assert got.shape == (37,) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-6, atol=2e-5)


@built
def test_token_logprobs_takes_other_dtypes_and_layouts():
    x, t = awkward_logits()
    xt = x.T.astype(mx.float16).T  # a transposed (non-contiguous) half-precision view
    got = kernels._ext.token_logprobs(xt, t.astype(mx.int64), 2)
    np.testing.assert_allclose(np.array(got), np.array(reference(xt, t)), rtol=1e-5, atol=1e-4)


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_token_logprobs_gradient_matches_mlx(threads):
    x, t = awkward_logits()
    w = mx.random.normal((x.shape[0],), key=mx.random.key(7))

    def loss(fn):
        return lambda x: (w * fn(x)).sum()

    # rtol: rows here reach |logit| ~200, where float32 rounding of x - logsumexp is ~1e-5 relative in
    # exp(x - logsumexp) for both implementations.
    want = mx.grad(loss(lambda x: reference(x, t)))(x)
    got = mx.grad(loss(lambda x: kernels._ext.token_logprobs(x, t, threads)))(x)
    compiled = mx.compile(mx.grad(loss(lambda x: kernels._ext.token_logprobs(x, t, threads))))(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=3e-5, atol=2e-6)
    np.testing.assert_array_equal(np.array(compiled), np.array(got))
    assert np.isfinite(np.array(got)).all()  # masked (-inf) logits get a zero gradient, not NaN


@built
def test_token_logprobs_runs_on_another_cpu_stream_inside_compile():
    """Training traces it on extra CPU streams (train.loop.train's slices)."""
    x, t = awkward_logits()
    with mx.stream(backend.cpu_stream(1)):
        got = mx.compile(lambda x: mx.grad(lambda y: kernels._ext.token_logprobs(y, t, 1).sum())(x))(x)
        mx.eval(got)
    want = mx.grad(lambda y: reference(y, t).sum())(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=3e-5, atol=2e-6)


def test_switch_off_uses_the_mlx_ops(monkeypatch):
    x, t = awkward_logits(K=5, V=64)
    monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    assert not kernels.enabled()
    assert "off" in kernels.status() or kernels._ext is None
    np.testing.assert_allclose(np.array(kernels.token_logprobs(x, t)), np.array(reference(x, t)), rtol=1e-6)


def test_bad_shapes_are_one_clear_error():
    if kernels._ext is None:
        pytest.skip("kernels not built")
    with pytest.raises(ValueError, match="logits \\(K, V\\) and targets \\(K,\\)"):
        kernels._ext.token_logprobs(mx.zeros((2, 3, 4)), mx.zeros((2,), mx.int32), 1)


def softmax_reference(x, scale, causal):
    x = x.astype(mx.float32) * scale
    if causal:
        T, S = x.shape[-2:]
        x = mx.where(mx.arange(S)[None, :] <= (mx.arange(T) + (S - T))[:, None], x, -mx.inf)
    return mx.softmax(x, axis=-1, precise=True)


@built
@pytest.mark.parametrize("causal,T,S,threads", [(True, 7, 7, 1), (True, 5, 13, 2), (False, 6, 11, 3)])
def test_attention_softmax_and_gradient_match_mlx(causal, T, S, threads):
    x = mx.random.normal((2, 3, 2, T, S), key=mx.random.key(3)) * 4
    g = mx.random.normal(x.shape, key=mx.random.key(4))
    got = kernels._ext.attention_softmax(x, 0.3, causal, threads=threads)
    np.testing.assert_allclose(np.array(got), np.array(softmax_reference(x, 0.3, causal)), rtol=1e-5, atol=1e-7)
    if causal:  # the masked slots are exactly zero
        upper = np.triu(np.ones((T, S), bool), k=S - T + 1)
        assert (np.array(got)[..., upper] == 0).all()
    want = mx.grad(lambda x: (g * softmax_reference(x, 0.3, causal)).sum())(x)
    grad = mx.grad(lambda x: (g * kernels._ext.attention_softmax(x, 0.3, causal, threads=threads)).sum())(x)
    np.testing.assert_allclose(np.array(grad), np.array(want), rtol=1e-4, atol=1e-6)


@built
def test_training_attention_with_the_kernel_matches_mlx_sdpa():
    """fastmath.attention (what mlx-lm's llama runs in training, mlx_lm_cpu_ops) against MLX's own attention,
    values and gradients, with grouped K/V heads."""
    from mlx_cai import fastmath

    q = mx.random.normal((2, 6, 9, 16), key=mx.random.key(5))
    k = mx.random.normal((2, 2, 9, 16), key=mx.random.key(6))
    v = mx.random.normal((2, 2, 9, 16), key=mx.random.key(7))

    def loss(attn):
        return lambda q, k, v: (attn(q, k, v) ** 2).sum()

    ours = lambda q, k, v: fastmath.attention(q, k, v, 0.25, "causal")  # noqa: E731
    mlx = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")  # noqa: E731
    assert kernels.enabled()
    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(mlx(q, k, v)), rtol=1e-5, atol=1e-5)
    for a, b in zip(mx.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), mx.grad(loss(mlx), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)


@built
@pytest.mark.parametrize("M,K,N,threads", [(1, 64, 96, 1), (7, 50, 37, 1), (32, 96, 200, 2), (13, 33, 31, 3)])
def test_linear_rows_matches_matmul(M, K, N, threads):
    """Rows not a multiple of the kernel's 6-row tile, columns not a multiple of its 32-column panels."""
    x = mx.random.normal((2, M, K), key=mx.random.key(11))  # leading axes are rows too
    w = mx.random.normal((N, K), key=mx.random.key(12))
    packed = kernels.pack_weight(w)
    assert packed.shape == (-(-N // 32), K, 32)
    got = kernels._ext.linear_rows(x, packed, N, threads)
    assert got.shape == (2, M, N)
    np.testing.assert_allclose(np.array(got), np.array(x @ w.T), rtol=1e-5, atol=1e-5)


def test_linear_rows_fallback_unpacks_the_same_weight(monkeypatch):
    monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    x = mx.random.normal((5, 40), key=mx.random.key(13))
    w = mx.random.normal((70, 40), key=mx.random.key(14))
    np.testing.assert_allclose(np.array(kernels.linear_rows(x, kernels.pack_weight(w), 70)), np.array(x @ w.T),
                               rtol=1e-5, atol=1e-5)


@built
def test_fast_decode_uses_packed_weights(tiny):
    """The compiled decode path packs its weights when the kernels run (tokens vs the generic path: test_generate)."""
    from mlx_cai.fastllama import FastLlama

    model, _ = tiny
    fast = FastLlama.build(model)
    assert fast.head_packed is not None and all(lyr.packed is not None for lyr in fast.layers)
    np.testing.assert_array_equal(np.array(kernels.linear_rows(mx.eye(model.args.hidden_size), fast.head_packed,
                                                               fast.lm_head.shape[0])), np.array(fast.lm_head.T))


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_softmax_with_padding_holes_matches_the_mlx_fallback(threads, monkeypatch):
    """The prefill mask of fastllama: causal, minus each row's pad slots [lo, hi) except a query's own slot."""
    B, T, S = 3, 4, 9
    x = mx.random.normal((B, 2, 3, T, S), key=mx.random.key(15)) * 3
    holes = mx.array([[0, 0], [2, 5], [0, 9]], dtype=mx.int32)  # none; slots 2-4; every slot
    got = kernels._ext.attention_softmax(x, 0.5, True, holes=holes, threads=threads)
    monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    want = kernels.attention_softmax(x, 0.5, True, holes)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-7)
    g = np.array(got)
    assert (g[1][..., 2:5][..., :, :] == 0).all()  # the pad slots get no weight...
    assert np.allclose(g.sum(-1), 1)  # ...and every row, even one inside a hole, sums to 1
    assert (g[2][..., np.arange(T), np.arange(S - T, S)] == 1).all()  # all-hole rows see only themselves


def decode_attention_numpy(q, k, v, holes, slot, scale, end):
    """The decode-step attention written out with numpy loops: the reference for kernel and fallback."""
    q, k, v, holes = (np.array(a, dtype=np.float64) for a in (q, k, v, holes))
    B, H, D = q.shape
    KVH = k.shape[1]
    out = np.zeros((B, H, D))
    n = min(end, slot + 1)
    for b in range(B):
        keep = [s for s in range(n) if not (holes[b, 0] <= s < holes[b, 1]) or s == slot]
        for h in range(H):
            g = h // (H // KVH)
            sc = np.array([q[b, h] @ k[b, g, s] * scale for s in keep])
            p = np.exp(sc - sc.max())
            out[b, h] = (p / p.sum()) @ v[b, g, keep]
    return out


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("D,threads", [(64, 1), (64, 2), (10, 3)])
def test_decode_attention_matches_a_numpy_reference(kernel, D, threads, monkeypatch):
    """Grouped heads (9 query heads on 3 KV heads), pad holes (none, inside, up to the slot), slots past the
    current one ignored, a head size with and without the kernel's unrolled case."""
    if kernel and kernels._ext is None:
        pytest.skip("kernels not built")
    if not kernel:
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    B, H, KVH, S, slot, end = 3, 9, 3, 24, 13, 16
    q = mx.random.normal((B, H, D), key=mx.random.key(21))
    k = mx.random.normal((B, KVH, S, D), key=mx.random.key(22))
    v = mx.random.normal((B, KVH, S, D), key=mx.random.key(23))
    holes = mx.array([[0, 0], [4, 9], [2, 14]], dtype=mx.int32)
    with backend.blas_threads_set(threads):
        got = kernels.decode_attention(q, k, v, holes, mx.array(slot), 0.3, end)
    assert got.shape == (B, H, D)
    want = decode_attention_numpy(q, k, v, holes, slot, 0.3, end)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-5)


def rope_reference(x, positions, D, base, traditional):
    """x (B, heads, D) rotated by mx.fast.rope at each row's own position."""
    return mx.concatenate([mx.fast.rope(x[b : b + 1, :, None], D, traditional=traditional, base=base, scale=1.0,
                                        offset=int(positions[b]))[:, :, 0] for b in range(x.shape[0])])


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("traditional", [False, True])
def test_rope_cache_rotates_like_mlx_rope_and_writes_the_slot(kernel, traditional, monkeypatch):
    if kernel and kernels._ext is None:
        pytest.skip("kernels not built")
    if not kernel:
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    B, H, KVH, D, S, slot, base = 4, 6, 2, 16, 10, 7, 10000.0
    qkv = mx.random.normal((B, (H + 2 * KVH) * D), key=mx.random.key(31))
    K0 = mx.random.normal((B, KVH, S, D), key=mx.random.key(32))
    V0 = mx.random.normal((B, KVH, S, D), key=mx.random.key(33))
    positions = mx.array([7, 3, 0, 250])
    mx.eval(K0, V0)
    before = np.array(K0), np.array(V0)
    q, K, V = kernels.rope_cache(qkv, K0, V0, kernels.rope_angles(positions, D, base), mx.array(slot), H,
                                 traditional)
    x = qkv.reshape(B, H + 2 * KVH, D)
    np.testing.assert_allclose(np.array(q), np.array(rope_reference(x[:, :H], positions, D, base, traditional)),
                               rtol=1e-5, atol=1e-5)
    want_k, want_v = before[0].copy(), before[1].copy()
    want_k[:, :, slot] = np.array(rope_reference(x[:, H : H + KVH], positions, D, base, traditional))
    want_v[:, :, slot] = np.array(x[:, H + KVH :])
    np.testing.assert_allclose(np.array(K), want_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(V), want_v)
    # the old caches were still referenced here, so they were not written in place
    np.testing.assert_array_equal(np.array(K0), before[0])
    np.testing.assert_array_equal(np.array(V0), before[1])


@built
def test_decode_kernels_take_strided_inputs():
    """q/K/V of decode_attention and qkv/cossin of rope_cache as strided views (no Contiguous node is added to
    the graph for them any more: the kernels copy such inputs themselves) give what their dense copies give."""
    B, H, KVH, D, S, slot = 2, 6, 2, 16, 12, 5
    q = mx.random.normal((H, B, D), key=mx.random.key(51)).transpose(1, 0, 2)
    k = mx.random.normal((B, S, KVH, D), key=mx.random.key(52)).transpose(0, 2, 1, 3)
    v = mx.random.normal((B, KVH, S, 2 * D), key=mx.random.key(53))[..., ::2]
    holes = mx.array([[0, 0], [1, 3]], dtype=mx.int32)
    dense = [mx.array(np.array(a)) for a in (q, k, v)]
    got = kernels.decode_attention(q, k, v, holes, mx.array(slot), 0.25, S)
    want = kernels.decode_attention(*dense, holes, mx.array(slot), 0.25, S)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    qkv = mx.random.normal(((H + 2 * KVH) * D, B), key=mx.random.key(54)).T
    cossin = kernels.rope_angles(mx.array([3, 9]), D, 10000.0)
    cs_view = mx.concatenate([cossin, cossin], axis=1)[:, ::2]  # another (B, D) of other strides
    K0, V0 = mx.zeros((B, KVH, S, D)), mx.zeros((B, KVH, S, D))
    for cs in (cossin, cs_view):
        got = kernels.rope_cache(qkv, K0, V0, cs, mx.array(slot), H, False)
        want = kernels.rope_cache(mx.array(np.array(qkv)), K0, V0, mx.array(np.array(cs)), mx.array(slot), H, False)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-6)


@built
def test_rope_cache_updates_a_cache_nobody_else_holds_in_place():
    """The decode loop's case: the old cache's only use is the update, so its buffer is reused (no copy)."""
    B, H, KVH, D, S = 2, 3, 1, 8, 64
    K = mx.zeros((B, KVH, S, D))
    V = mx.zeros((B, KVH, S, D))
    mx.eval(K, V)
    cossin = kernels.rope_angles(mx.array([5, 6]), D, 10000.0)
    step = mx.compile(lambda qkv, K, V, slot: kernels.rope_cache(qkv, K, V, cossin, slot, H, False))
    for slot in range(3):
        qkv = mx.full((B, (H + 2 * KVH) * D), float(slot + 1))
        q, K, V = step(qkv, K, V, mx.array(slot))
        mx.eval(q, K, V)
    assert [float(V[0, 0, s, 0]) for s in range(4)] == [1.0, 2.0, 3.0, 0.0]  # every step's write kept


@built
def test_kernels_called_from_two_streams_at_once_stay_correct():
    """Two MLX CPU streams each running 2-thread kernels: one takes the worker pool, the other its own threads."""
    xs = [mx.random.normal((64, 96), key=mx.random.key(40 + i)) for i in range(2)]
    w = mx.random.normal((300, 96), key=mx.random.key(42))
    packed = kernels.pack_weight(w)
    outs = []
    for i, x in enumerate(xs):
        with mx.stream(backend.cpu_stream(i)):
            outs.append([kernels._ext.linear_rows(x, packed, 300, 2) for _ in range(20)])
    mx.eval(outs)
    for x, o in zip(xs, outs):
        for y in o:
            np.testing.assert_allclose(np.array(y), np.array(x @ w.T), rtol=1e-5, atol=1e-5)


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_silu_mul_matches_mlx_in_both_forms_with_gradients(threads):
    """Sizes that are no multiple of the 16-lane vectors, large |g| (exp overflow/underflow), the fused [g | u]."""
    g = mx.random.normal((5, 37), key=mx.random.key(50)) * 30
    u = mx.random.normal((5, 37), key=mx.random.key(51))
    want = g * mx.sigmoid(g) * u
    np.testing.assert_allclose(np.array(kernels._ext.silu_mul(g, u, threads)), np.array(want), rtol=1e-5, atol=1e-6)
    fused = kernels._ext.silu_mul(mx.concatenate([g, u], axis=-1), None, threads)
    np.testing.assert_allclose(np.array(fused), np.array(want), rtol=1e-5, atol=1e-6)
    c = mx.random.normal(g.shape, key=mx.random.key(52))
    got = mx.grad(lambda g, u: (kernels._ext.silu_mul(g, u, threads) * c).sum(), argnums=(0, 1))(g, u)
    ref = mx.grad(lambda g, u: (g * mx.sigmoid(g) * u * c).sum(), argnums=(0, 1))(g, u)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


@built
def test_packed_frozen_linears_give_the_same_loss_and_gradients(tiny):
    """Frozen layers switch to the packed kernel (forward and d x) and back; trainable ones stay on BLAS."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_cai import fastmath

    model, _ = tiny
    model.freeze()
    model.model.layers[0].mlp.up_proj.unfreeze()  # its gradient flows back through packed frozen layers
    tokens = mx.array([[1, 5, 9, 30, 7, 2, 11, 4]])

    def loss(m):
        return (m(tokens).astype(mx.float32) ** 2).mean()

    want_loss, want_grad = nn.value_and_grad(model, loss)(model)
    with fastmath.packed_frozen_linears(model):
        assert type(model.model.layers[1].mlp.down_proj) is fastmath._PackedLinear
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
        got_loss, got_grad = nn.value_and_grad(model, loss)(model)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear  # restored
    assert "_mlx_cai_packed" not in vars(model.model.layers[1].mlp.down_proj)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    (name, g), = tree_flatten(got_grad)
    (_, w), = tree_flatten(want_grad)
    assert name.endswith("up_proj.weight")
    np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-6)
    assert float(mx.abs(w).max()) > 0
