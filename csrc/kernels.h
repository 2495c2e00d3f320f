// Fused CPU kernels for mlx-cai, as MLX primitives (see kernels.cpp).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_cai {

using mlx::core::array;

// log p(target) per row: logits[k, targets[k]] - logsumexp(logits[k, :]).
// logits (K, V) float32, targets (K,) integer -> (K,) float32. Differentiable in logits.
array token_logprobs(const array& logits, const array& targets, int threads);

}  // namespace mlx_cai
