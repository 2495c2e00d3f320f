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
// the whole weight on every call, as much memory traffic as the product itself at 32 rows. No gradient.
array linear_rows(const array& x, const array& packed, int n_out, int threads);

}  // namespace mlx_cai
