"""Cheaper replacements for the transcendental ops that dominate small-batch CPU inference and training.

MLX's CPU `exp` (and so `sigmoid`, `silu`, `softmax`) costs ~13 ns per element on the 2-core x86 test
machine, where a multiply or add costs ~0.5 ns. A SmolLM2 decode step at batch 64 spent ~60 of its ~290 ms
there. `exp` below is the classic Cody-Waite range reduction plus a degree-6 polynomial (Cephes `expf`
coefficients) in ~20 elementwise MLX ops: ~4x faster under `mx.compile`, relative error < 2e-6 over the
float32 range (tested against numpy). Its intermediates materialize (~5x the input's memory), so it is
for activations and attention scores, not for (tokens, vocabulary) logits. Only the CPU uses it; Metal and
CUDA have fast native `exp`. MLX_CAI_FAST_OPS=0 turns off its use in training (`mlx_lm_cpu_ops`).
"""

from __future__ import annotations

import contextlib
import importlib

from mlx_cai import backend  # first: BLAS before mlx.core

import mlx.core as mx
import mlx.nn as nn

from mlx_cai import kernels
from mlx_cai.settings import settings

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


_exp_c = mx.compile(_exp)  # not shapeless: `view` needs concrete shapes
_silu_mul_c = mx.compile(_silu_mul)


# Differentiable (training runs through these too): the gradients are the exact formulas in terms of the
# forward values, not derivatives of the polynomial.
@mx.custom_function
def exp(x: mx.array) -> mx.array:
    return _exp_c(x)


@exp.vjp
def _exp_vjp(x, cotangent, output):  # one input: MLX passes arrays, not tuples
    return cotangent * output


@mx.custom_function
def _silu_mul_ops(g: mx.array, u: mx.array) -> mx.array:
    return _silu_mul_c(g, u)


def silu_mul(g: mx.array, u: mx.array) -> mx.array:
    """silu(g) * u, the SwiGLU gate: the C++ kernel (kernels.silu_mul, float32) when it runs, else MLX ops."""
    if kernels.enabled():
        out = kernels.silu_mul(g, u)
        return out if g.dtype == mx.float32 else out.astype(g.dtype)
    return _silu_mul_ops(g, u)


@_silu_mul_ops.vjp
def _silu_mul_vjp(primals, cotangent, output):
    g, u = primals
    s = 1.0 / (1.0 + _exp_c(-g))
    return cotangent * u * s * (1.0 + g * (1.0 - s)), cotangent * g * s


def masked_softmax(scores: mx.array, mask: mx.array) -> mx.array:
    """Softmax over the last axis of `scores` where `mask` is True (0 elsewhere); every row needs a True."""
    scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    e = mx.where(mask, exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True))), 0.0)
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """scaled_dot_product_attention for the CPU, q (B, H, T, D), k/v (B, KVH, S, D); `mask` None, "causal",
    a boolean (True = attend) or an additive array broadcastable to (B, H, T, S). The query heads that share
    a K/V head are the rows of one matmul (no K/V broadcast) and the softmax uses this module's cheaper exp."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    rep = H // KVH
    if kernels.enabled() and (mask is None or (isinstance(mask, str) and mask == "causal")):  # fused C++ softmax
        return _kernel_attention(q, k, v, scale, mask is not None)
    scores = ((q * scale).reshape(B, KVH, rep * T, D) @ k.swapaxes(-1, -2)).reshape(B, KVH, rep, T, S)
    if isinstance(mask, str):  # "causal": query t sits at key position t + S - T
        keep = mx.arange(S)[None, :] <= (mx.arange(T) + (S - T))[:, None]
    elif mask is not None and mask.dtype != mx.bool_:  # additive
        scores = scores + _grouped(mask, B, KVH, rep, T, S)
        keep = mx.array(True)
    else:
        keep = mx.array(True) if mask is None else _grouped(mask, B, KVH, rep, T, S)
    p = masked_softmax(scores, keep)
    return (p.reshape(B, KVH, rep * T, S) @ v).reshape(B, H, T, D)


def attention_holes(q: mx.array, k: mx.array, v: mx.array, scale: float, holes: mx.array) -> mx.array:
    """`attention` with a causal mask (query t at key slot t + S - T) from which batch row b also drops the
    slots [holes[b, 0], holes[b, 1]) but its own: left padding in fastllama's prefill. One C++ softmax
    (kernels.attention_softmax), inference only."""
    return _kernel_attention(q, k, v, scale, True, holes)


def _kernel_attention(q, k, v, scale: float, causal: bool, holes=None) -> mx.array:
    """Grouped-head attention with kernels.attention_softmax between the two matmuls."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    rep = H // KVH
    scores = (q.reshape(B, KVH, rep * T, D) @ k.swapaxes(-1, -2)).reshape(B, KVH, rep, T, S)
    p = kernels.attention_softmax(scores, scale, causal=causal, holes=holes).astype(v.dtype)
    return (p.reshape(B, KVH, rep * T, S) @ v).reshape(B, H, T, D)


def _grouped(mask: mx.array, B: int, KVH: int, rep: int, T: int, S: int) -> mx.array:
    """A mask broadcastable to (B, H, T, S) as one broadcastable to (B, KVH, rep, T, S)."""
    m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if m.shape[1] == 1:
        return m[:, :, None]
    return mx.broadcast_to(m, (m.shape[0], KVH * rep, T, S)).reshape(m.shape[0], KVH, rep, T, S)


_MLX_LM_MODULES = ("llama", "mistral", "qwen2", "qwen3")


@contextlib.contextmanager
def mlx_lm_cpu_ops():
    """While active, and the default device is the CPU, mlx-lm's llama-family models compute SwiGLU and
    attention with this module's ops (training and scoring: ~1.3x faster steps). Restored on exit. Elsewhere
    (Metal, CUDA) or with MLX_CAI_FAST_OPS=0 it changes nothing."""
    if mx.default_device() != mx.cpu or not settings().fast_ops:
        yield
        return
    patched = []
    for name in _MLX_LM_MODULES:
        try:
            mod = importlib.import_module(f"mlx_lm.models.{name}")
        except ImportError:
            continue
        for attr, make in (("swiglu", lambda old: silu_mul), ("scaled_dot_product_attention", _sdpa_for)):
            if hasattr(mod, attr):
                old = getattr(mod, attr)
                patched.append((mod, attr, old))
                setattr(mod, attr, make(old))
    try:
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)


def _sdpa_for(original):
    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is not None or hasattr(cache, "bits"):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        return attention(queries, keys, values, scale, mask)

    return sdpa


PACKED_TRAIN_SHARE = 0.1  # packed copies of frozen weights (2x their size) only if they take at most this share of RAM


class _PackedLinear(nn.Linear):
    """A frozen nn.Linear whose product runs in kernels.linear_rows over weights packed once (see
    `packed_frozen_linears`); the class of a layer is switched to this and back."""

    def __call__(self, x):
        packed, packed_t = self._mlx_cai_packed
        y = kernels.linear_rows(x, packed, self.weight.shape[0], packed_t)
        return y if x.dtype == mx.float32 else y.astype(x.dtype)


@contextlib.contextmanager
def packed_frozen_linears(model):
    """While active, the model's frozen bias-free float32 nn.Linear layers (LoRA's base layers and the layers
    without adapters) compute x @ w.T with kernels.linear_rows over w packed once, and d x = d y @ w over w.T
    packed once: OpenBLAS repacks both operands on every call (~11% of an SFT step's samples). CPU kernels
    only, and only when the two packed copies fit in PACKED_TRAIN_SHARE of the RAM; MLX_CAI_PACKED_TRAIN=0 turns
    it off. Restored on exit."""
    if not kernels.enabled() or not settings().packed_train:
        yield
        return
    layers = [m for _, m in model.named_modules()
              if type(m) is nn.Linear and "bias" not in m and m.weight.dtype == mx.float32
              and not m.trainable_parameters()]
    if not layers or 2 * sum(m.weight.nbytes for m in layers) > PACKED_TRAIN_SHARE * backend.ram_bytes():
        yield
        return
    for m in layers:
        w = m.weight
        object.__setattr__(m, "_mlx_cai_packed", (kernels.pack_weight(w), kernels.pack_weight(w.T)))
        mx.eval(m._mlx_cai_packed)
        m.__class__ = _PackedLinear
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = nn.Linear
            object.__delattr__(m, "_mlx_cai_packed")
