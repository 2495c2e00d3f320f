"""kernels.linear_rows_q (x @ w.T over mx.quantize's affine 4/8-bit weights, dequantized in registers) against
x @ mx.dequantize(...).T, and its MLX fallback against the kernel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_cai import kernels

built = pytest.mark.skipif(kernels._ext is None, reason=f"kernels not built: {kernels._ERROR}")


def quantized(N, K, group_size, bits, seed=0, dtype=mx.float32):
    """mx.quantize of a random (N, K) weight whose rows differ in scale and offset (groups get distinct scales
    and biases), in `dtype` (the scales and biases come out in it)."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    w = mx.random.normal((N, K), key=k1) * mx.random.uniform(0.01, 1.0, (N, 1), key=k2)
    w = w + mx.random.normal((N, 1), key=k3) * 0.1
    return mx.quantize(w.astype(dtype), group_size, bits)


def reference(x, q, s, b, group_size, bits):
    # half-precision scales dequantize in float32, as the pack stores them (mx.dequantize would round the weights
    # to the scales' dtype)
    w = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size, bits)
    return x.astype(mx.float32) @ w.T


def check(got, want, K):
    # float32 sums of K products in another order: relative to the size of the terms, not of the result
    scale = float(mx.abs(want).max()) + 1.0
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=4e-7 * np.sqrt(K) * scale)


@built
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 32, 64])
def test_linear_rows_q_matches_dequantize_matmul(bits, group_size, M):
    """Outputs no multiple of the 16-row panels (the last panel padded), every row-tile mix (64 = 8 * 8, 3 = 2 + 1)."""
    N, K = 200 + 7, 384
    q, s, b = quantized(N, K, group_size, bits, seed=bits + group_size)
    packed = kernels.pack_quantized(q, s, b, group_size, bits)
    assert packed.dtype == mx.uint32 and packed.shape == (13, K // group_size, 16 * (2 + group_size * bits // 32))
    x = mx.random.normal((M, K), key=mx.random.key(M))
    for threads in (1, 2):
        got = kernels._ext.linear_rows_q(x, packed, N, threads)
        assert got.shape == (M, N) and got.dtype == mx.float32
        check(got, reference(x, q, s, b, group_size, bits), K)


@built
@pytest.mark.parametrize("bits,group_size,K", [(4, 32, 96), (8, 32, 416), (4, 128, 384), (8, 64, 192)])
@pytest.mark.parametrize("M", [1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40])
def test_linear_rows_q_row_tiles_and_the_buffered_panel(bits, group_size, K, M):
    """Both kernels: under 16 rows the 8/4/2/1-row tiles, from 16 the panel dequantized once and x in 8-row
    blocks (pairs of blocks, then a last odd block, its rows past M zero), every edge of those; an odd number
    of groups (K 96 = 3 x 32, 416 = 13 x 32) and 23 outputs (a half-empty last panel). Each row is compared,
    so a row block written to the wrong rows, or a padded row leaking into y, fails."""
    N = 23
    q, s, b = quantized(N, K, group_size, bits, seed=M + K)
    packed = kernels.pack_quantized(q, s, b, group_size, bits)
    x = mx.random.normal((M, K), key=mx.random.key(100 + M))
    want = reference(x, q, s, b, group_size, bits)
    for threads in (1, 2):
        got = kernels._ext.linear_rows_q(x, packed, N, threads)
        assert got.shape == (M, N)
        check(got, want, K)
        # a row alone gives the same values as in the batch (no row's result depends on the others)
        check(kernels._ext.linear_rows_q(x[M - 1 :], packed, N, threads), want[M - 1 :], K)


@built
@pytest.mark.parametrize("M", [1, 5, 32])
def test_strided_x_needs_no_contiguous_node(M):
    """x as a transposed view, a column slice, or a broadcast row (no Contiguous node in the graph any more: the
    kernel copies such an x itself) gives the same result as its contiguous copy, for linear_rows_q and
    linear_rows; inside mx.compile too."""
    N, K = 40, 64
    q, s, b = quantized(N, K, 32, 4, seed=5)
    packed = kernels.pack_quantized(q, s, b, 32, 4)
    w = mx.random.normal((N, K), key=mx.random.key(6))
    wp = kernels.pack_weight(w)
    mx.eval(packed, wp)
    base = mx.random.normal((K, 2 * M), key=mx.random.key(M))
    views = [base.T[::2], base[:, :M].T, mx.broadcast_to(base[:, 0], (M, K))]
    for x in views:
        dense = mx.array(np.array(x))
        want_q = reference(dense, q, s, b, 32, 4)
        for f in (lambda x: kernels._ext.linear_rows_q(x, packed, N, 2),
                  mx.compile(lambda x: kernels._ext.linear_rows_q(x, packed, N, 2))):
            check(f(x), want_q, K)
        got = kernels._ext.linear_rows(x, wp, N, 2, None)
        np.testing.assert_allclose(np.array(got), np.array(dense @ w.T), rtol=1e-5, atol=1e-4)


@built
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32), (4, 64)])
def test_linear_rows_q_vocab_sized_and_leading_axes(bits, group_size):
    """A 49152-token head (many panels over 2 threads, each prefetching the next) and x with leading axes."""
    N, K = 49152, 64
    q, s, b = quantized(N, K, group_size, bits, seed=3)
    x = mx.random.normal((2, 3, K), key=mx.random.key(4))
    got = kernels._ext.linear_rows_q(x, kernels.pack_quantized(q, s, b, group_size, bits), N, 2)
    assert got.shape == (2, 3, N)
    check(got, reference(x, q, s, b, group_size, bits), K)


@built
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_half_precision_scales_are_packed_as_float32(dtype, bits):
    N, K, gs = 50, 256, 64
    q, s, b = quantized(N, K, gs, bits, seed=5, dtype=dtype)
    assert s.dtype == dtype
    x = mx.random.normal((5, K), key=mx.random.key(6)).astype(dtype)  # x converts too
    got = kernels.linear_rows_q(x, kernels.pack_quantized(q, s, b, gs, bits), N)
    check(got, reference(x, q, s, b, gs, bits), K)


@built
def test_linear_rows_q_inside_compile_and_its_threads():
    """A compiled decode-like step (the pack a captured constant, as fastllama holds its weights), retraced for
    another row count, and two linears of one shape that must not be merged."""
    N, K = 96, 128
    packs, refs = [], []
    for seed in (7, 8):
        q, s, b = quantized(N, K, 32, 4, seed=seed)
        packs.append(kernels.pack_quantized(q, s, b, 32, 4))
        refs.append((q, s, b))
    step = mx.compile(lambda x: kernels.linear_rows_q(mx.tanh(x), packs[0], N) + kernels.linear_rows_q(x, packs[1], N))
    for M in (1, 9):
        x = mx.random.normal((M, K), key=mx.random.key(M))
        want = reference(mx.tanh(x), *refs[0], 32, 4) + reference(x, *refs[1], 32, 4)
        check(step(x), want, K)


@built
def test_fallback_matches_the_kernel(monkeypatch):
    """MLX_CAI_KERNELS=0: the pack unpacks to mx.quantize's arrays (exactly) for mx.quantized_matmul."""
    N, K = 70, 256
    for bits, gs in ((4, 32), (8, 128), (4, 128)):
        q, s, b = quantized(N, K, gs, bits, seed=bits * gs)
        packed = kernels.pack_quantized(q, s, b, gs, bits)
        w2, s2, b2, gs2, bits2 = kernels.unpack_quantized(packed, K, N)
        assert (gs2, bits2) == (gs, bits)
        assert mx.array_equal(w2, q) and mx.array_equal(s2, s) and mx.array_equal(b2, b)
        x = mx.random.normal((3, K), key=mx.random.key(9))
        fast = kernels.linear_rows_q(x, packed, N)
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
        assert not kernels.enabled()
        slow = kernels.linear_rows_q(x, packed, N)
        monkeypatch.delenv("MLX_CAI_KERNELS")
        check(fast, slow, K)
        check(slow, reference(x, q, s, b, gs, bits), K)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("M", [1, 3, 20])
def test_norm_and_residual_ride_on_the_product(kernel, M, monkeypatch):
    """linear_rows_q(x, ..., norm=w, eps=e) = mx.fast.rms_norm(x, w, e) @ W.T, residual=r adds r, gate=True
    multiplies silu(g) * u of x = [g | u]: with the
    kernel (one call) and without it (MLX ops), for both row kernels (under and from 16 rows), with a norm
    weight in bfloat16 (a model's dtype) and x rows of very different sizes (the norm is per row)."""
    if kernel and kernels._ext is None:
        pytest.skip("kernels not built")
    if not kernel:
        monkeypatch.setenv("MLX_CAI_KERNELS", "0")
    N, K, eps = 48, 128, 1e-5
    q, s, b = quantized(N, K, 32, 4, seed=M)
    packed = kernels.pack_quantized(q, s, b, 32, 4)
    x = mx.random.normal((1, M, K), key=mx.random.key(60)) * mx.arange(1, M + 1).reshape(1, M, 1)
    w = (1.0 + 0.1 * mx.random.normal((K,), key=mx.random.key(61))).astype(mx.bfloat16)
    r = mx.random.normal((1, M, N), key=mx.random.key(62))
    h = mx.fast.rms_norm(x, w.astype(mx.float32), eps)
    check(kernels.linear_rows_q(x, packed, N, norm=w, eps=eps), reference(h, q, s, b, 32, 4), K)
    check(kernels.linear_rows_q(x, packed, N, residual=r), r + reference(x, q, s, b, 32, 4), K)
    both = kernels.linear_rows_q(x, packed, N, norm=w, eps=eps, residual=r)
    check(both, r + reference(h, q, s, b, 32, 4), K)
    assert both.shape == (1, M, N) and both.dtype == mx.float32
    gu = mx.random.normal((1, M, 2 * K), key=mx.random.key(63)) * 3.0  # [g | u] of a fused gate/up output
    g, u = gu[..., :K], gu[..., K:]
    act = g * mx.sigmoid(g) * u
    check(kernels.linear_rows_q(gu, packed, N, residual=r, gate=True), r + reference(act, q, s, b, 32, 4), K)


def test_pack_rejects_what_the_kernel_cannot_read():
    q, s, b = quantized(16, 64, 64, 4)
    with pytest.raises(ValueError, match="bits 4 or 8"):
        kernels.pack_quantized(q, s, b, 64, 2)
    with pytest.raises(ValueError, match="mx.quantize"):
        kernels.pack_quantized(q, s, b, 32, 4)  # the group size it was not quantized with


@built
def test_bad_shapes_are_one_clear_error():
    q, s, b = quantized(16, 64, 32, 4)
    packed = kernels.pack_quantized(q, s, b, 32, 4)
    for x, n in ((mx.zeros((1, 48)), 16), (mx.zeros((1, 64)), 17), (mx.zeros((1, 64 * 3)), 16)):
        with pytest.raises(ValueError, match="linear_rows_q: expected"):
            kernels._ext.linear_rows_q(x, packed, n, 1)
    with pytest.raises(ValueError, match="linear_rows_q: expected"):
        kernels._ext.linear_rows_q(mx.zeros((1, 64)), packed.view(mx.float32), 16, 1)


@built
def test_q4_1_gguf_blocks_are_4_bit_groups_of_32():
    """GGUF Q4_1 (per 32: d, m float16; d * q + m) is MLX 4-bit group 32 with scale d and bias m, so a Q4_1
    tensor's codes can be repacked into mx.quantize's words and fed to linear_rows_q unchanged."""
    N, K = 48, 128
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (N, K), dtype=np.uint32)
    d = rng.uniform(0.001, 0.1, (N, K // 32)).astype(np.float16)
    m = rng.normal(0, 0.2, (N, K // 32)).astype(np.float16)
    words = (codes.reshape(N, K // 8, 8) << (4 * np.arange(8, dtype=np.uint32))).sum(-1).astype(np.uint32)
    w_gguf = (d.astype(np.float32).repeat(32, 1) * codes + m.astype(np.float32).repeat(32, 1))
    x = mx.random.normal((2, K), key=mx.random.key(10))
    packed = kernels.pack_quantized(mx.array(words), mx.array(d), mx.array(m), 32, 4)
    check(kernels.linear_rows_q(x, packed, N), x @ mx.array(w_gguf).T, K)
