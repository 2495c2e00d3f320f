// Fused CPU kernels for mlx-cai, as MLX primitives (see kernels.cpp).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include <optional>

namespace mlx_cai {

using mlx::core::array;

// log p(target) per row: logits[k, targets[k]] - logsumexp(logits[k, :]).
// logits (K, V) float32, targets (K,) integer -> (K,) float32. Differentiable in logits.
array token_logprobs(const array& logits, const array& targets, int threads);

// Softmax over the last axis of scale * scores, with an optional causal mask: in a (..., T, S) array the
// query row t attends to slots s <= t + S - T (the queries are the last T positions). -> float32, same shape.
// holes (B, 2) int32: batch row b also skips slots [lo, hi) but its own (left padding; inference only).
// Differentiable in scores without holes.
array attention_softmax(const array& scores, float scale, bool causal, const std::optional<array>& holes,
                        int threads);

// y (..., N) = x (..., K) @ w.T for a few rows (decoding), float32, with w (N, K) packed once into (ceil(N / 32),
// K, 32) column panels (zero past N): each panel is streamed from memory once per call. BLAS instead packs
// the whole weight on every call, as much memory traffic as the product itself at 32 rows.
// With packed_t (w.T packed the same way, (ceil(K / 32), N, 32)) it is differentiable in x: d x = d y @ w.
array linear_rows(const array& x, const array& packed, int n_out, int threads, const std::optional<array>& packed_t);

// y (..., N) = x (..., K) @ w.T for w in MLX's affine quantization (mx.quantize: 4 or 8 bits, group size 32, 64
// or 128), float32, from the pack of mlx_cai.kernels.pack_quantized: uint32 (ceil(N / 16), K / group_size,
// 16 * (2 + group_size * bits / 32)), which carries group size and bits in its shape. Dequantized in registers,
// each panel of 16 outputs streamed once per call. Forward only (decoding).
// With `norm` (K,): x is first replaced by rms_norm(x) * norm (eps `eps`, as mx.fast.rms_norm), and with
// `residual` (..., N) the result is residual + x @ w.T: the decode step's norm and residual add ride on the
// product instead of being nodes of their own. With `gate`, x is [g | u] (..., 2K) and silu(g) * u takes its
// place (the SwiGLU of a fused gate/up projection, before the down projection).
array linear_rows_q(const array& x, const array& packed, int n_out, int threads,
                    const std::optional<array>& norm = std::nullopt, float eps = 0.0f,
                    const std::optional<array>& residual = std::nullopt, bool gate = false);

// One decode step of grouped-query attention: q (B, H, D) against K/V caches (B, KVH, S, D) at slots
// [0, min(end, slot + 1)), batch row b skipping slots [holes[b, 0], holes[b, 1]) but `slot` itself
// (left padding). -> (B, H, D) float32. Inference only.
array decode_attention(const array& q, const array& k, const array& v, const array& holes, const array& slot,
                       float scale, int end, int threads);

// A decode step's fused projection qkv (B, (H + 2 KVH) D) -> [q (B, H, D) rotated, K, V] with the rotated k and
// the v of every row written at `slot` of the caches (B, KVH, S, D), in place when MLX can donate them. Row b
// rotates pair i by the angle with cos cossin[b, i] and sin cossin[b, D/2 + i] (`traditional`: pairs
// (2i, 2i+1), else (i, i + D/2)). Inference only.
std::vector<array> rope_cache(const array& qkv, const array& k, const array& v, const array& cossin,
                              const array& slot, int heads, bool traditional, int threads);

// SwiGLU silu(g) * u, float32: g and u of one shape (differentiable), or u absent and g = [g | u] (..., 2F), the
// output of a fused gate/up projection (inference).
array silu_mul(const array& g, const std::optional<array>& u, int threads);

}  // namespace mlx_cai
