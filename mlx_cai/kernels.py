"""mlx-cai's fused CPU kernels, with pure-MLX fallbacks that compute the same thing.

The kernels are MLX primitives written in C++ (`csrc/`), built on Linux by `make setup`
(scripts/build-kernels.sh) into `mlx_cai/_kernels*.so` for the machine that runs them. They are used when
that module imports, the default device is the CPU and MLX_CAI_KERNELS is not 0 (mlx_cai.settings); otherwise
(a Mac's GPU, CUDA, a failed build) the MLX-op fallbacks run. Both paths are tested against each other.

- `token_logprobs(logits (K, V), targets (K,))`: log p(target) per row, i.e. logits[k, t_k] - logsumexp(row).
  One kernel forward and one backward instead of MLX's logsumexp, its exp-heavy gradient and the gather:
  over (352, 49152) float32 on one thread 52 ms vs 206 ms forward, 131 vs 285 ms forward + backward.
- `attention_softmax(scores (..., T, S), scale, causal)`: the attention probabilities in one pass per row (mask,
  scale, max, exp, normalize) and their gradient in one more, instead of ~25 elementwise MLX passes each way.
  Training attention (fastmath.attention) uses it: an SFT step of the training benchmark spent 0.52 s of
  2.03 s in attention before.
- `linear_rows(x, packed, n[, packed_t])`: x @ w.T with w packed once by `pack_weight` into 32-column panels,
  each streamed from memory once per call while the next is prefetched (OpenBLAS packs the whole weight on
  every call: at 32 rows that copy was a fifth of the generation benchmark's samples). Decode steps use it,
  and training for frozen layers (`packed_t`: the input gradient over w.T packed).
- `linear_rows_q(x, packed, n)`: the same for weights in MLX's affine quantization (`mx.quantize`, 4 or 8 bits,
  groups of 32/64/128; GGUF Q4_1 and Q8_0 map onto 4- and 8-bit groups of 32), packed by `pack_quantized` into
  16-row panels that carry group size and bits in their shape; under 16 rows weights are dequantized in
  registers, never materialized; from 16 rows each panel is dequantized once per call into a small float32
  buffer that every row reuses (forward only: decoding). At one row a 4-bit weight reads ~1/6 of float32's
  bytes. Optional `norm`, `gate` and `residual` put a decode step's rms_norm, SwiGLU and residual add into
  the same call (each is otherwise a few graph nodes, and node overhead was a third of a batch-1 step).
- `decode_attention`, `rope_cache`, `silu_mul`: the rest of a decode step (attention over the KV cache read
  in place, rotary embedding with the cache write in place, the SwiGLU gate), each one pass split over the
  threads; `silu_mul` is differentiable and serves training too.

Threads come from a worker pool kept by the module (a thread start per call cost more than a decode step's
small calls); the count is the BLAS threads in effect when the work is traced (`backend.cpu_threads`).
"""

from __future__ import annotations

from mlx_cai import backend
from mlx_cai.settings import settings

import mlx.core as mx

try:
    from mlx_cai import _kernels as _ext

    # Arrays cross only if the module was built with mlx.core's nanobind ABI (building a graph suffices).
    _ext.token_logprobs(mx.zeros((1, 2)), mx.zeros((1,), mx.int32), 1)
    _ERROR: str | None = None
except (ImportError, TypeError) as e:  # not built (macOS, no compiler), or built against another MLX
    _ext, _ERROR = None, f"{type(e).__name__}: {e}".splitlines()[0]


def enabled() -> bool:
    """Whether the C++ kernels run for work traced now."""
    return _ext is not None and settings().kernels and mx.default_device() == mx.cpu


def status() -> str:
    """One line for `mlx-cai info`."""
    if _ext is None:
        return f"not built ({_ERROR}); MLX ops instead (make setup builds them on Linux)"
    if not settings().kernels:
        return "built, off (MLX_CAI_KERNELS=0)"
    return "built" + ("" if mx.default_device() == mx.cpu else ", unused on this device (CPU only)")


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """(K,) float32 log-softmax of `logits` (K, V) at `targets` (K,) ints, differentiable in `logits`."""
    if enabled():
        return _ext.token_logprobs(logits, targets, backend.cpu_threads())
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - mx.logsumexp(logits, axis=-1)


def attention_softmax(scores: mx.array, scale: float, causal: bool, holes: mx.array | None = None) -> mx.array:
    """softmax(scale * scores) over the last axis, float32; `causal`: in (..., T, S) scores, query row t sees the
    slots s <= t + S - T (the queries are the last T positions). `holes` (B, 2) ints, for scores (B, ..., T, S):
    batch row b also skips the slots [lo, hi) (left padding) but a query's own slot t + S - T (inference only).
    `scale` > 0. Differentiable in `scores` without holes."""
    if scale <= 0:
        raise ValueError("attention_softmax: scale must be > 0")
    if enabled():
        return _ext.attention_softmax(scores, scale, causal, holes=holes, threads=backend.cpu_threads())
    x = scores.astype(mx.float32) * scale
    T, S = x.shape[-2:] if x.ndim > 1 else (1, x.shape[-1])
    own = mx.arange(T) + (S - T)
    keep = mx.arange(S)[None, :] <= own[:, None] if causal else mx.ones((T, S), mx.bool_)
    if holes is not None:
        s = mx.arange(S).reshape((1,) * (x.ndim - 1) + (S,))
        lo, hi = (holes[:, i].reshape((-1,) + (1,) * (x.ndim - 1)) for i in (0, 1))
        keep = (keep & ((s < lo) | (s >= hi))) | (mx.arange(S)[None, :] == own[:, None])
    return mx.softmax(mx.where(keep, x, -mx.inf), axis=-1)


def decode_attention(q: mx.array, k: mx.array, v: mx.array, holes: mx.array, slot: mx.array, scale: float,
                     end: int) -> mx.array:
    """One decode step of grouped-query attention: q (B, H, D) against the K/V caches (B, KVH, S, D), slots
    [0, min(end, slot + 1)), batch row b skipping its pad slots [holes[b, 0], holes[b, 1]) but `slot` itself.
    Returns (B, H, D) float32 (inference: no gradient). K and V are read once, in place, over all query heads
    that share them (MLX's ops went through memory ~5 times: scores, mask, softmax, probabilities, output)."""
    if enabled():
        return _ext.decode_attention(q, k, v, holes, slot, scale, end, backend.cpu_threads())
    B, H, D = q.shape
    KVH = k.shape[1]
    n = min(end, k.shape[2])
    s = mx.arange(n)
    own = s[None, :] == slot
    keep = ((s[None, :] < holes[:, :1]) | (s[None, :] >= holes[:, 1:])) & (s[None, :] <= slot) | own  # (B, n)
    scores = q.astype(mx.float32).reshape(B, KVH, H // KVH, D) @ k[:, :, :n].astype(mx.float32).swapaxes(-1, -2)
    p = mx.softmax(mx.where(keep[:, None, None, :], scores * scale, -mx.inf), axis=-1)
    return (p @ v[:, :, :n].astype(mx.float32)).reshape(B, H, D)


def silu_mul(g: mx.array, u: mx.array | None = None) -> mx.array:
    """SwiGLU silu(g) * u in float32; with `u` None, `g` is a fused gate/up output [g | u] (..., 2F) (inference).
    Differentiable in g and u when given separately. MLX's elementwise ops run single-threaded (~6 ns per
    element with fastmath's exp); this is one vectorized pass split over the threads."""
    if enabled():
        return _ext.silu_mul(g, u, backend.cpu_threads())
    if u is None:
        g, u = mx.split(g, 2, axis=-1)
    g, u = g.astype(mx.float32), u.astype(mx.float32)
    return g * mx.sigmoid(g) * u


def rope_angles(positions: mx.array, dims: int, base: float) -> mx.array:
    """(B, dims) float32: [cos | sin] of positions[b] * base^(-2i/dims), i < dims/2, computed in float32 the
    way transformers' llama rotary embedding does; the `cossin` input of `rope_cache`."""
    inv = 1.0 / (base ** (mx.arange(0, dims, 2).astype(mx.float32) / dims))
    t = positions.astype(mx.float32)[:, None] * inv[None, :]
    return mx.concatenate([mx.cos(t), mx.sin(t)], axis=-1)


def rope_cache(qkv: mx.array, k: mx.array, v: mx.array, cossin: mx.array, slot: mx.array, heads: int,
               traditional: bool) -> tuple[mx.array, mx.array, mx.array]:
    """A decode step's fused projection qkv (B, (H + 2 KVH) D) -> (q (B, H, D) rotated, K, V), where the new
    K/V caches (B, KVH, S, D) hold row b's rotated k and its v at `slot`; row b rotates by the angles of
    `cossin` (B, D) from `rope_angles`. In place when the old caches have no other use (a decode step's), else
    on a copy. MLX's rope with per-row offsets and the two slice updates cost ~25 ms of a ~130 ms batch-32
    decode step."""
    if enabled():
        return tuple(_ext.rope_cache(qkv, k, v, cossin, slot, heads, traditional, backend.cpu_threads()))
    B, KVH, _, D = k.shape
    x = qkv.astype(mx.float32).reshape(B, heads + 2 * KVH, D)
    c, s = cossin[:, None, : D // 2], cossin[:, None, D // 2 :]

    def rot(t):
        if traditional:
            a, b = t[..., 0::2], t[..., 1::2]
            return mx.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(t.shape)
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return mx.concatenate([a * c - b * s, a * s + b * c], axis=-1)

    slot = slot.reshape((1,)).astype(mx.int32)
    k = mx.slice_update(k, rot(x[:, heads : heads + KVH])[:, :, None].astype(k.dtype), slot, axes=(2,))
    v = mx.slice_update(v, x[:, heads + KVH :, None].astype(v.dtype), slot, axes=(2,))
    return rot(x[:, :heads]), k, v


PANEL = 32  # columns per panel of a packed weight (csrc/kernels.cpp LIN_NB)


def pack_weight(w: mx.array) -> mx.array:
    """w (N, K) as (ceil(N / 32), K, 32) float32 column panels, zero past N: the layout `linear_rows` reads."""
    N, K = w.shape
    P = -(-N // PANEL)
    w = w.astype(mx.float32)
    if P * PANEL > N:
        w = mx.concatenate([w, mx.zeros((P * PANEL - N, K), mx.float32)])
    return mx.contiguous(w.reshape(P, PANEL, K).transpose(0, 2, 1))


def linear_rows(x: mx.array, packed: mx.array, n_out: int, packed_t: mx.array | None = None) -> mx.array:
    """x (..., K) @ w.T, float32, for w (n_out, K) packed by `pack_weight`. Differentiable in x when `packed_t`
    is `pack_weight(w.T)` (a frozen layer in training: the weights take no gradient)."""
    if enabled():
        return _ext.linear_rows(x, packed, n_out, backend.cpu_threads(), packed_t)
    P, K, _ = packed.shape
    w = packed.transpose(0, 2, 1).reshape(P * PANEL, K)[:n_out]
    return x.astype(mx.float32) @ mx.stop_gradient(w).T


QPANEL = 16  # output rows per panel of a quantized pack (csrc/kernels.cpp Q_NC)


def pack_quantized(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """The layout `linear_rows_q` reads, from `mx.quantize(W, group_size, bits)`'s w (N, K * bits / 32) uint32,
    scales and biases (N, K / group_size) (any float dtype: stored as float32). uint32 (ceil(N / 16), G, W):
    panels of 16 rows of W (zero past N), G = K / group_size groups, per (panel, group) W = 16 * (2 +
    group_size * bits / 32) words: the 16 scales, the 16 biases (float32 bits), then each row's words of the
    group: 8 bits as mx.quantize packs them, 4 bits with each 16 elements' nibbles reordered (even elements in the
    first word, odd in the second: csrc/kernels.cpp says why). The shape carries group size (K / G) and bits, so
    the pack is all the kernel needs; bits 4 or 8, group sizes 32, 64, 128."""
    if bits not in (4, 8) or group_size not in (32, 64, 128):
        raise ValueError(f"pack_quantized: bits 4 or 8 and group size 32, 64 or 128, not {bits} and {group_size}")
    N, G = scales.shape
    wpg = group_size * bits // 32
    if w.dtype != mx.uint32 or w.shape != (N, G * wpg) or biases.shape != (N, G):
        raise ValueError(f"pack_quantized: w {w.shape} {w.dtype}, scales {scales.shape} and biases {biases.shape} "
                         f"are no mx.quantize(..., {group_size}, {bits}) output")
    P = -(-N // QPANEL)

    def panels(a, cols):  # (N, G * cols) -> (P, G, 16 * cols), rows padded with zeros
        if P * QPANEL > N:
            a = mx.concatenate([a, mx.zeros((P * QPANEL - N, a.shape[1]), a.dtype)])
        return a.reshape(P, QPANEL, G, cols).transpose(0, 2, 1, 3).reshape(P, G, QPANEL * cols)

    if bits == 4:
        w = _reorder_nibbles(w, to_pack=True)
    sb = [panels(a.astype(mx.float32), 1).view(mx.uint32) for a in (scales, biases)]
    return mx.contiguous(mx.concatenate(sb + [panels(w, wpg)], axis=-1))


def unpack_quantized(packed: mx.array, K: int, n_out: int) -> tuple[mx.array, mx.array, mx.array, int, int]:
    """(w, scales, biases, group_size, bits) in mx.quantize's layout (float32 scales and biases) from a pack of
    `pack_quantized` for n_out rows of K columns."""
    P, G, W = packed.shape
    group_size, wpg = K // G, W // QPANEL - 2
    bits = 32 * wpg // group_size

    def rows(a, cols):  # (P, G, 16 * cols) -> (n_out, G * cols)
        return a.reshape(P, G, QPANEL, cols).transpose(0, 2, 1, 3).reshape(P * QPANEL, G * cols)[:n_out]

    scales = rows(packed[..., :QPANEL].view(mx.float32), 1)
    biases = rows(packed[..., QPANEL : 2 * QPANEL].view(mx.float32), 1)
    w = rows(packed[..., 2 * QPANEL :], wpg)
    return _reorder_nibbles(w, to_pack=False) if bits == 4 else w, scales, biases, group_size, bits


def _reorder_nibbles(w: mx.array, to_pack: bool) -> mx.array:
    """4-bit codes (N, K / 8) uint32, per 16 elements (two words): mx.quantize's order (element i in nibble i)
    to the pack's (elements 0, 2, .., 14 in the first word, 1, 3, .., 15 in the second), or back."""
    N = w.shape[0]
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
    nib = (w.reshape(N, -1, 2, 1) >> shifts) & 15  # (N, K / 16, word, nibble)
    # mx.quantize's element 8 * word + nibble is the pack's element 2 * nibble + word: a transpose either way
    nib = nib.reshape(N, -1, 8, 2).swapaxes(-1, -2) if to_pack else nib.swapaxes(-1, -2).reshape(N, -1, 2, 8)
    return (nib << shifts).sum(axis=-1).astype(mx.uint32).reshape(N, -1)


def linear_rows_q(x: mx.array, packed: mx.array, n_out: int, norm: mx.array | None = None, eps: float = 0.0,
                  residual: mx.array | None = None, gate: bool = False) -> mx.array:
    """x (..., K) @ W.T, float32, for W (n_out, K) quantized by mx.quantize and packed by `pack_quantized`: equal
    to x @ mx.dequantize(...).T to float32 rounding. For decode rows (up to ~64): every weight is read once
    per call and dequantized in registers, so a 4-bit weight costs ~1/6 of the memory traffic of its float32
    linear_rows (mx.quantized_matmul on the CPU runs single-threaded, ~0.5 GB/s). Forward only.
    `norm` (K,): mx.fast.rms_norm(x, norm, eps) takes x's place; `gate`: x is [g | u] (..., 2K) and
    silu(g) * u takes its place; `residual` (..., n_out): added to the result. All inside the one kernel call (a
    decode step's norm, SwiGLU and residual add are then no graph nodes of their own)."""
    if enabled():
        return _ext.linear_rows_q(x, packed, n_out, backend.cpu_threads(), norm, eps, residual, gate)
    if gate:
        x = silu_mul(x)
    if norm is not None:
        x = mx.fast.rms_norm(x.astype(mx.float32), norm, eps)
    w, scales, biases, group_size, bits = unpack_quantized(packed, x.shape[-1], n_out)
    y = mx.quantized_matmul(x.astype(mx.float32), w, scales, biases, transpose=True, group_size=group_size,
                            bits=bits)
    return y if residual is None else residual + y
