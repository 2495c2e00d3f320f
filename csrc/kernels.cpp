// Fused CPU kernels for mlx-cai as MLX primitives.
//
// Why: MLX's CPU backend runs each op as its own single-threaded pass over memory and its exp costs
// ~12 ns per element here, so a log-softmax over a (K, 49152) vocabulary and its gradient take hundreds
// of ms per training step. These kernels do the same math in one or two cache-friendly passes per row,
// with a vectorizable exp, split over `threads` threads. CPU only: eval_gpu throws, and mlx_cai.kernels
// only routes CPU work here.

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_cai {

using namespace mlx::core;

namespace {

// exp for x <= ~88 in float: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], Cephes' degree-6 polynomial
// (rel. error ~2e-7). Branch-free so the compiler vectorizes the loops that call it.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

float row_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_poly(x[i] - shift);
  return s;
}

// Run f(first_row, end_row) over [0, rows) on up to `threads` threads (the calling thread takes the first
// part), giving each at least `grain` rows: a thread start (~20-50 us) must pay for itself.
template <typename F>
void parallel_rows(int64_t rows, int threads, F f, int64_t grain = 1) {
  int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / std::max<int64_t>(grain, 1))));
  if (t == 1) {
    f(int64_t{0}, rows);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int i = 1; i < t; ++i) pool.emplace_back(f, rows * i / t, rows * (i + 1) / t);
  f(int64_t{0}, rows / t);
  for (auto& th : pool) th.join();
}

template <typename I>
void logprobs_impl(const float* x, const I* targets, float* logp, float* lse, int64_t K, int64_t V, int threads) {
  parallel_rows(K, threads, [=](int64_t a, int64_t b) {
    for (int64_t k = a; k < b; ++k) {
      const float* row = x + k * V;
      float m = row_max(row, V);
      float l = std::isfinite(m) ? m + std::log(row_sum_exp(row, V, m)) : m;
      int64_t t = static_cast<int64_t>(targets[k]);
      lse[k] = l;
      logp[k] = (t >= 0 && t < V) ? row[t] - l : std::numeric_limits<float>::quiet_NaN();
    }
  });
}

// d/dlogits of (a . logp + c . lse): a[k] * onehot(t_k) + (c[k] - a[k]) * softmax(row k).
template <typename I>
void logprobs_vjp_impl(const float* x, const I* targets, const float* lse, const float* a, const float* c,
                       float* out, int64_t K, int64_t V, int threads) {
  parallel_rows(K, threads, [=](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const float* row = x + k * V;
      float* o = out + k * V;
      float l = lse[k], w = c[k] - a[k];
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) o[i] = w * exp_poly(row[i] - l);
      int64_t t = static_cast<int64_t>(targets[k]);
      if (t >= 0 && t < V) o[t] += a[k];
    }
  });
}

void check_cpu_layout(const array& a, const char* what) {
  if (!a.flags().row_contiguous) throw std::invalid_argument(std::string("mlx_cai kernels: ") + what + " must be row-contiguous");
}

template <typename F>
void with_index_type(const array& targets, F f) {
  switch (targets.dtype()) {
    case int32: return f(targets.data<int32_t>());
    case uint32: return f(targets.data<uint32_t>());
    case int64: return f(targets.data<int64_t>());
    default: throw std::invalid_argument("mlx_cai kernels: targets must be int32, uint32 or int64");
  }
}

class TokenLogprobsVJP : public UnaryPrimitive {
 public:
  TokenLogprobsVJP(Stream s, int threads) : UnaryPrimitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    const array &x = in[0], &t = in[1], &lse = in[2], &a = in[3], &c = in[4];
    for (auto* p : {&x, &t, &lse, &a, &c}) check_cpu_layout(*p, "token_logprobs vjp inputs");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_output_array(out);
    enc.dispatch([x = array::unsafe_weak_copy(x), t = array::unsafe_weak_copy(t),
                  lse = array::unsafe_weak_copy(lse), a = array::unsafe_weak_copy(a),
                  c = array::unsafe_weak_copy(c), out = array::unsafe_weak_copy(out), n = threads_]() mutable {
      int64_t K = x.shape(0), V = x.shape(1);
      with_index_type(t, [&](auto* tp) {
        logprobs_vjp_impl(x.data<float>(), tp, lse.data<float>(), a.data<float>(), c.data<float>(),
                          out.data<float>(), K, V, n);
      });
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  const char* name() const override { return "TokenLogprobsVJP"; }

 private:
  int threads_;
};

class TokenLogprobs : public Primitive {
 public:
  TokenLogprobs(Stream s, int threads) : Primitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, std::vector<array>& outs) override {
    const array &x = in[0], &t = in[1];
    check_cpu_layout(x, "logits");
    check_cpu_layout(t, "targets");
    for (auto& o : outs) o.set_data(allocator::malloc(o.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_output_array(outs[0]);
    enc.set_output_array(outs[1]);
    enc.dispatch([x = array::unsafe_weak_copy(x), t = array::unsafe_weak_copy(t),
                  lp = array::unsafe_weak_copy(outs[0]), lse = array::unsafe_weak_copy(outs[1]),
                  n = threads_]() mutable {
      int64_t K = x.shape(0), V = x.shape(1);
      with_index_type(t, [&](auto* tp) {
        logprobs_impl(x.data<float>(), tp, lp.data<float>(), lse.data<float>(), K, V, n);
      });
    });
  }
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>& outputs) override {
    std::vector<array> grads;
    for (int arg : argnums) {
      if (arg != 0) throw std::invalid_argument("token_logprobs: targets are not differentiable");
      auto s = stream();
      array a = contiguous(astype(cotangents[0], float32, s), false, s);
      array c = cotangents.size() > 1 ? contiguous(astype(cotangents[1], float32, s), false, s) : zeros_like(a, s);
      grads.push_back(array(primals[0].shape(), float32, std::make_shared<TokenLogprobsVJP>(s, threads_),
                            {primals[0], primals[1], outputs[1], a, c}));
    }
    return grads;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override {
    return {Shape{in[0].shape(0)}, Shape{in[0].shape(0)}};
  }
  const char* name() const override { return "TokenLogprobs"; }
  bool is_equivalent(const Primitive& other) const override {
    return threads_ == static_cast<const TokenLogprobs&>(other).threads_;
  }

 private:
  int threads_;
};

// Row i of a (rows, S) view of (..., T, S) scores is query t = i % T; causal: slots s <= t + S - T.
inline int64_t row_limit(int64_t i, int64_t T, int64_t S, bool causal) {
  return causal ? std::min<int64_t>(S, i % T + S - T + 1) : S;
}

// holes (B, 2) int32 or null: batch row b (score rows [b * rows / B, (b + 1) * rows / B)) also skips slots
// [lo, hi) (left padding), except a query's own slot t + S - T, so no row is left empty.
void softmax_impl(const float* x, float* p, int64_t rows, int64_t T, int64_t S, float scale, bool causal,
                  const int32_t* holes, int64_t B, int threads) {
  parallel_rows(rows, threads, [=](int64_t a, int64_t b) {
    constexpr float NEG = -std::numeric_limits<float>::infinity();
    std::vector<float> tmp;
    for (int64_t i = a; i < b; ++i) {
      const float* xr = x + i * S;
      float* pr = p + i * S;
      int64_t n = row_limit(i, T, S, causal);
      if (n <= 0) {
        std::fill(pr, pr + S, 0.0f);
        continue;
      }
      if (holes) {  // copy the row with the hole at -inf (the own slot n - 1 stays)
        int64_t bb = i / (rows / B), lo = holes[2 * bb], hi = std::min<int64_t>(holes[2 * bb + 1], n - 1);
        tmp.assign(xr, xr + n);
        for (int64_t s = std::max<int64_t>(lo, 0); s < hi; ++s) tmp[s] = NEG;
        xr = tmp.data();
      }
      float m = row_max(xr, n) * scale;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t s = 0; s < n; ++s) {
        float e = xr[s] == NEG ? 0.0f : exp_poly(xr[s] * scale - m);
        pr[s] = e;
        sum += e;
      }
      float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t s = 0; s < n; ++s) pr[s] *= inv;
      std::fill(pr + n, pr + S, 0.0f);
    }
  }, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(S, 1)));
}

// d scores = scale * p * (g - sum(g * p)) per row (zero where p is masked).
void softmax_vjp_impl(const float* p, const float* g, float* out, int64_t rows, int64_t T, int64_t S, float scale,
                      bool causal, int threads) {
  parallel_rows(rows, threads, [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const float *pr = p + i * S, *gr = g + i * S;
      float* o = out + i * S;
      int64_t n = std::max<int64_t>(0, row_limit(i, T, S, causal));
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t s = 0; s < n; ++s) dot += pr[s] * gr[s];
#pragma omp simd
      for (int64_t s = 0; s < n; ++s) o[s] = scale * pr[s] * (gr[s] - dot);
      std::fill(o + n, o + S, 0.0f);
    }
  }, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(S, 1)));
}

class AttentionSoftmaxVJP : public UnaryPrimitive {
 public:
  AttentionSoftmaxVJP(Stream s, float scale, bool causal, int threads)
      : UnaryPrimitive(s), scale_(scale), causal_(causal), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    check_cpu_layout(in[0], "attention_softmax vjp: p");
    check_cpu_layout(in[1], "attention_softmax vjp: cotangent");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_output_array(out);
    enc.dispatch([p = array::unsafe_weak_copy(in[0]), g = array::unsafe_weak_copy(in[1]),
                  out = array::unsafe_weak_copy(out), scale = scale_, causal = causal_, n = threads_]() mutable {
      int64_t S = p.shape(-1), T = p.ndim() > 1 ? p.shape(-2) : 1;
      softmax_vjp_impl(p.data<float>(), g.data<float>(), out.data<float>(), p.size() / S, T, S, scale, causal, n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  const char* name() const override { return "AttentionSoftmaxVJP"; }

 private:
  float scale_;
  bool causal_;
  int threads_;
};

class AttentionSoftmax : public UnaryPrimitive {
 public:
  AttentionSoftmax(Stream s, float scale, bool causal, int threads)
      : UnaryPrimitive(s), scale_(scale), causal_(causal), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    check_cpu_layout(in[0], "attention_softmax: scores");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_output_array(out);
    bool has_holes = in.size() > 1;
    if (has_holes) check_cpu_layout(in[1], "attention_softmax: holes");
    enc.dispatch([x = array::unsafe_weak_copy(in[0]), h = array::unsafe_weak_copy(in[has_holes ? 1 : 0]),
                  out = array::unsafe_weak_copy(out), scale = scale_, causal = causal_, n = threads_,
                  has_holes]() mutable {
      int64_t S = x.shape(-1), T = x.ndim() > 1 ? x.shape(-2) : 1;
      softmax_impl(x.data<float>(), out.data<float>(), x.size() / S, T, S, scale, causal,
                   has_holes ? h.data<int32_t>() : nullptr, has_holes ? h.shape(0) : 1, n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>& outputs) override {
    auto s = stream();
    if (primals.size() > 1) throw std::invalid_argument("attention_softmax: no gradient with holes (inference)");
    array g = contiguous(astype(cotangents[0], float32, s), false, s);
    return {array(primals[0].shape(), float32, std::make_shared<AttentionSoftmaxVJP>(s, scale_, causal_, threads_),
                  {outputs[0], g})};
  }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override { return {in[0].shape()}; }
  const char* name() const override { return "AttentionSoftmax"; }
  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const AttentionSoftmax&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && threads_ == o.threads_;
  }

 private:
  float scale_;
  bool causal_;
  int threads_;
};

constexpr int LIN_NB = 32;

// Rows [0, MB) of y[:, n0:n0+nb] = x @ (panel of the packed weight: K x 32, contiguous), the MB x 32
// accumulator in registers. nb < 32 for the last panel of an N that is no multiple of 32.
template <int MB>
inline void linear_tile(const float* x, int64_t K, const float* panel, float* y, int64_t N, int64_t nb) {
  float acc[MB][LIN_NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < LIN_NB; ++j) acc[m][j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * LIN_NB;
    for (int m = 0; m < MB; ++m) {
      float xv = x[m * K + k];
#pragma omp simd
      for (int j = 0; j < LIN_NB; ++j) acc[m][j] += xv * w[j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int64_t j = 0; j < nb; ++j) y[m * N + j] = acc[m][j];
}

// y (M, N) = x (M, K) @ w.T for w packed as (P, K, 32) panels (P = ceil(N / 32), zero columns past N).
// Panels are split over threads; each panel is read once and reused by every row block from cache.
void linear_rows_impl(const float* x, int64_t M, int64_t K, const float* packed, int64_t P, int64_t N, float* y,
                      int threads) {
  constexpr int MB = 8;
  parallel_rows(P, threads, [=](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p) {
      const float* panel = packed + p * K * LIN_NB;
      int64_t n = p * LIN_NB, nb = std::min<int64_t>(LIN_NB, N - n);
      int64_t m = 0;
      for (; m + MB <= M; m += MB) linear_tile<MB>(x + m * K, K, panel, y + m * N + n, N, nb);
      // leftover rows in the largest tiles that fit (a 1-row tile does one FMA per load)
      if (m + 4 <= M) linear_tile<4>(x + m * K, K, panel, y + m * N + n, N, nb), m += 4;
      if (m + 2 <= M) linear_tile<2>(x + m * K, K, panel, y + m * N + n, N, nb), m += 2;
      if (m < M) linear_tile<1>(x + m * K, K, panel, y + m * N + n, N, nb);
    }
  }, 4);
}

class LinearRows : public UnaryPrimitive {
 public:
  LinearRows(Stream s, int threads) : UnaryPrimitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    check_cpu_layout(in[0], "linear_rows: x");
    check_cpu_layout(in[1], "linear_rows: wt");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_output_array(out);
    enc.dispatch([x = array::unsafe_weak_copy(in[0]), wt = array::unsafe_weak_copy(in[1]),
                  out = array::unsafe_weak_copy(out), n = threads_]() mutable {
      int64_t P = wt.shape(0), K = wt.shape(1), N = out.shape(-1), M = x.size() / K;
      linear_rows_impl(x.data<float>(), M, K, wt.data<float>(), P, N, out.data<float>(), n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  const char* name() const override { return "LinearRows"; }
  bool is_equivalent(const Primitive& other) const override {
    return threads_ == static_cast<const LinearRows&>(other).threads_;
  }

 private:
  int threads_;
};

}  // namespace

array token_logprobs(const array& logits, const array& targets, int threads) {
  if (logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0)) {
    throw std::invalid_argument("token_logprobs: expected logits (K, V) and targets (K,)");
  }
  auto s = to_stream(StreamOrDevice{});
  array x = contiguous(astype(logits, float32, s), false, s);
  array t = contiguous(issubdtype(targets.dtype(), integer) ? targets : astype(targets, int32, s), false, s);
  auto outs = array::make_arrays({Shape{x.shape(0)}, Shape{x.shape(0)}}, {float32, float32},
                                 std::make_shared<TokenLogprobs>(s, std::max(1, threads)), {x, t});
  return outs[0];
}

array attention_softmax(const array& scores, float scale, bool causal, const std::optional<array>& holes,
                        int threads) {
  if (scores.ndim() < 1 || (causal && scores.ndim() < 2)) {
    throw std::invalid_argument("attention_softmax: expected scores (..., T, S)");
  }
  auto s = to_stream(StreamOrDevice{});
  array x = contiguous(astype(scores, float32, s), false, s);
  std::vector<array> inputs = {x};
  if (holes) {
    if (holes->ndim() != 2 || holes->shape(1) != 2 || x.ndim() < 2 || x.shape(0) != holes->shape(0)) {
      throw std::invalid_argument("attention_softmax: holes must be (B, 2) for scores (B, ..., T, S)");
    }
    inputs.push_back(contiguous(astype(*holes, int32, s), false, s));
  }
  return array(x.shape(), float32, std::make_shared<AttentionSoftmax>(s, scale, causal, std::max(1, threads)), inputs);
}

array linear_rows(const array& x, const array& packed, int n_out, int threads) {
  if (x.ndim() < 1 || packed.ndim() != 3 || packed.shape(2) != LIN_NB || x.shape(-1) != packed.shape(1) ||
      n_out <= 0 || n_out > packed.shape(0) * LIN_NB) {
    throw std::invalid_argument("linear_rows: expected x (..., K) and a weight packed as (ceil(N / 32), K, 32)");
  }
  auto s = to_stream(StreamOrDevice{});
  array xx = contiguous(astype(x, float32, s), false, s);
  array ww = contiguous(astype(packed, float32, s), false, s);
  Shape shape = x.shape();
  shape.back() = n_out;
  return array(shape, float32, std::make_shared<LinearRows>(s, std::max(1, threads)), {xx, ww});
}

}  // namespace mlx_cai
