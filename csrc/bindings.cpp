// Python bindings of mlx-cai's CPU kernels (module mlx_cai._kernels). Arrays cross as mlx.core.array:
// built with nanobind's "mlx" domain and the same nanobind ABI as mlx.core.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_kernels, m) {
  m.doc() = "mlx-cai's fused CPU kernels (MLX primitives)";
  m.def("token_logprobs", &mlx_cai::token_logprobs, "logits"_a, "targets"_a, "threads"_a = 1,
        "logits[k, targets[k]] - logsumexp(logits[k]) for logits (K, V) and targets (K,); CPU only.");
  m.def("linear_rows", &mlx_cai::linear_rows, "x"_a, "packed"_a, "n_out"_a, "threads"_a = 1,
        "packed_t"_a = nb::none(),
        "x (..., K) @ w.T for w (n_out, K) packed as (ceil(n_out / 32), K, 32); differentiable in x given packed_t "
        "(w.T packed the same way); CPU only.");
  m.def("linear_rows_q", &mlx_cai::linear_rows_q, "x"_a, "packed"_a, "n_out"_a, "threads"_a = 1,
        "norm"_a = nb::none(), "eps"_a = 0.0f, "residual"_a = nb::none(), "gate"_a = false,
        "x (..., K) @ w.T for w (n_out, K) quantized by mx.quantize (4/8 bits, groups of 32/64/128) and packed by "
        "mlx_cai.kernels.pack_quantized; with norm, rms_norm(x, norm, eps) in place of x; with gate, x is [g | u] "
        "and silu(g) * u takes its place; with residual, residual + the product. Forward only, CPU only.");
  m.def("attention_softmax", &mlx_cai::attention_softmax, "scores"_a, "scale"_a, "causal"_a,
        "holes"_a = nb::none(), "threads"_a = 1,
        "softmax(scale * scores) over the last axis; causal: row t of (..., T, S) sees slots <= t + S - T. CPU only.");
  m.def("decode_attention", &mlx_cai::decode_attention, "q"_a, "k"_a, "v"_a, "holes"_a, "slot"_a, "scale"_a, "end"_a,
        "threads"_a = 1,
        "Decode-step attention: q (B, H, D) over K/V (B, KVH, S, D) slots < min(end, slot + 1), row b skipping "
        "[holes[b, 0], holes[b, 1]) but the slot; CPU only, no gradient.");
  m.def("silu_mul", &mlx_cai::silu_mul, "g"_a, "u"_a = nb::none(), "threads"_a = 1,
        "silu(g) * u (differentiable), or of gu = [g | u] (..., 2F) without u (inference); CPU only.");
  m.def("rope_cache", &mlx_cai::rope_cache, "qkv"_a, "k"_a, "v"_a, "cossin"_a, "slot"_a, "heads"_a,
        "traditional"_a, "threads"_a = 1,
        "Decode step: qkv (B, (H + 2 KVH) D) -> [rotated q (B, H, D), K, V with rotated k and v written at slot]; "
        "CPU only, no gradient.");
}
