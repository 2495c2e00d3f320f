"""Vectorizable replacements for the transcendental ops that dominate small-batch CPU inference.

MLX's CPU `exp` (and so `sigmoid`, `silu`, `softmax`) evaluates a scalar libm call per element: ~13 ns
each on the 2-core x86 test machine, where a fused multiply-add runs at ~1 ns. A SmolLM2 decode step at
batch 64 spent ~60 of its ~290 ms there. `exp` below is the classic Cody-Waite range reduction plus a
degree-6 polynomial (Cephes `expf` coefficients), written in elementwise MLX ops that `mx.compile` fuses
into one vectorized loop: ~4x faster, relative error < 2e-6 over the float32 range (tested against numpy).
Only the CPU benefits; Metal and CUDA have fast native `exp`.
"""

from __future__ import annotations

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**9
_LN2_LO = -2.12194440e-4
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp(x: mx.array) -> mx.array:
    x = mx.clip(x, -87.0, 88.0)  # exp(-87) is the smallest normal float32 scale; below it, ~0 anyway
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO  # |r| <= ln2 / 2
    p = _POLY[0]
    for c in _POLY[1:]:
        p = p * r + c
    p = p * r * r + r + 1.0
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # 2**n from its exponent bits
    return p * two_n


def _silu_mul(g: mx.array, u: mx.array) -> mx.array:
    """silu(g) * u, the SwiGLU gate."""
    return g * u / (1.0 + _exp(-g))


exp = mx.compile(_exp)  # not shapeless: `view` needs concrete shapes
silu_mul = mx.compile(_silu_mul)


def masked_softmax(scores: mx.array, mask: mx.array) -> mx.array:
    """Softmax over the last axis of `scores` where `mask` is True (0 elsewhere); every row needs a True."""
    scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    e = mx.where(mask, exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
    return e / e.sum(axis=-1, keepdims=True)
