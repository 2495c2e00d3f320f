// Fused CPU kernels for mlx-cai as MLX primitives.
//
// Why: MLX's CPU backend runs each op as its own single-threaded pass over memory and its exp costs
// ~12 ns per element here, so a log-softmax over a (K, 49152) vocabulary and its gradient take hundreds
// of ms per training step. These kernels do the same math in one or two cache-friendly passes per row,
// with a vectorizable exp, split over `threads` threads. CPU only: eval_gpu throws, and mlx_cai.kernels
// only routes CPU work here.

#include "kernels.h"

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
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

// Worker threads kept for parallel_rows: a decode step makes ~150 kernel calls of a few hundred us each, and
// starting a thread per call (~20-50 us, with its stack mapping) cost ~10% of a step. Workers spin briefly
// after a job (calls come back to back), then sleep on a condition variable. One caller at a time: a second,
// concurrent caller (another MLX stream) starts its own threads instead.
class Pool {
 public:
  // Run job(i) for i in [1, parts) on workers and job(0) here; returns when all are done. False if busy.
  bool run(int parts, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> user(user_, std::try_to_lock);
    if (!user.owns_lock()) return false;
    while (static_cast<int>(workers_) < parts - 1) {
      // the worker starts from the current generation: the job published below is new to it
      std::thread(&Pool::work, this, static_cast<int>(workers_) + 1, gen_.load()).detach();
      ++workers_;
    }
    job_ = &job;
    parts_ = parts;
    remaining_.store(parts - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job(0);
    for (int64_t spins = 0; remaining_.load(std::memory_order_acquire) > 0; ++spins) {
      if (spins > 4096) std::this_thread::yield();
    }
    return true;
  }

 private:
  void work(int index, uint64_t seen) {
    for (;;) {
      for (int i = 0; i < 20000 && gen_.load(std::memory_order_acquire) == seen; ++i) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
      }
      seen = gen_.load(std::memory_order_acquire);
      if (index < parts_) {
        (*job_)(index);
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex user_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0;
  size_t workers_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its detached workers outlive static destruction
  return *p;
}

// Run f(first_row, end_row) over [0, rows) on up to `threads` threads (the calling thread takes the first
// part), giving each at least `grain` rows.
template <typename F>
void parallel_rows(int64_t rows, int threads, F f, int64_t grain = 1) {
  int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / std::max<int64_t>(grain, 1))));
  if (t == 1) {
    f(int64_t{0}, rows);
    return;
  }
  std::function<void(int)> part = [&](int i) { f(rows * i / t, rows * (i + 1) / t); };
  if (pool().run(t, part)) return;
  std::vector<std::thread> extra;
  extra.reserve(t - 1);
  for (int i = 1; i < t; ++i) extra.emplace_back(part, i);
  part(0);
  for (auto& th : extra) th.join();
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

// A float32 array (any strides, any rank) into a row-contiguous buffer.
void copy_rows_f32(const array& a, float* out) {
  const float* src = a.data<float>();
  const auto& sh = a.shape();
  const auto& st = a.strides();
  int nd = a.ndim();
  std::vector<int64_t> idx(nd, 0);
  for (int64_t i = 0, n = a.size(); i < n; ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * st[d];
    out[i] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < sh[d]) break;
      idx[d] = 0;
    }
  }
}

// A float32 input of a decode kernel (x of linear_rows_q, silu_mul's gate): its data, or a row-contiguous copy
// made in the dispatched task when the graph gave it other strides. The graph then needs no Contiguous node
// per call (~1 us each, ~9 per layer of a decode step).
struct RowsInput {
  array a;
  std::shared_ptr<std::vector<float>> copy;
  explicit RowsInput(const array& in) : a(array::unsafe_weak_copy(in)) {
    if (!in.flags().row_contiguous) copy = std::make_shared<std::vector<float>>(in.size());
  }
  const float* data() {  // in the task only (the input's data is computed by then)
    if (!copy) return a.data<float>();
    copy_rows_f32(a, copy->data());
    return copy->data();
  }
};

// A kernel input as it is when it is float32 already evaluated row-contiguous (a pack made at build); else
// astype + contiguous nodes.
array constant_input(const array& a, Dtype t, const Stream& s) {
  if (a.dtype() == t && a.is_available() && a.flags().row_contiguous) return a;
  return contiguous(astype(a, t, s), false, s);
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
// accumulator in registers. nb < 32 for the last panel of an N that is no multiple of 32. `next` (or null):
// the panel to fetch into cache meanwhile (its k-th 128 bytes with step k), so that reading the weights from
// memory overlaps the arithmetic instead of preceding it.
template <int MB>
inline void linear_tile(const float* __restrict x, int64_t K, const float* __restrict panel, float* y, int64_t N,
                        int64_t nb, const float* next) {
  float acc[MB][LIN_NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < LIN_NB; ++j) acc[m][j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * LIN_NB;
    if (next) {
      __builtin_prefetch(next + k * LIN_NB, 0, 2);
      __builtin_prefetch(next + k * LIN_NB + 16, 0, 2);
    }
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
// Panels are split over threads; each panel is read once and reused by every row block from cache, and the
// first row block of a panel prefetches the thread's next panel.
void linear_rows_impl(const float* x, int64_t M, int64_t K, const float* packed, int64_t P, int64_t N, float* y,
                      int threads) {
  constexpr int MB = 8;
  parallel_rows(P, threads, [=](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p) {
      const float* panel = packed + p * K * LIN_NB;
      const float* next = p + 1 < b ? panel + K * LIN_NB : nullptr;
      int64_t n = p * LIN_NB, nb = std::min<int64_t>(LIN_NB, N - n);
      int64_t m = 0;
      for (; m + MB <= M; m += MB, next = nullptr) linear_tile<MB>(x + m * K, K, panel, y + m * N + n, N, nb, next);
      // leftover rows in the largest tiles that fit (a 1-row tile does one FMA per load)
      if (m + 4 <= M) linear_tile<4>(x + m * K, K, panel, y + m * N + n, N, nb, next), m += 4, next = nullptr;
      if (m + 2 <= M) linear_tile<2>(x + m * K, K, panel, y + m * N + n, N, nb, next), m += 2, next = nullptr;
      if (m < M) linear_tile<1>(x + m * K, K, panel, y + m * N + n, N, nb, next);
    }
  }, 4);
}

class LinearRows : public UnaryPrimitive {
 public:
  LinearRows(Stream s, int threads) : UnaryPrimitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    check_cpu_layout(in[1], "linear_rows: wt");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_output_array(out);
    enc.dispatch([x = RowsInput(in[0]), wt = array::unsafe_weak_copy(in[1]), out = array::unsafe_weak_copy(out),
                  n = threads_]() mutable {
      int64_t P = wt.shape(0), K = wt.shape(1), N = out.shape(-1), M = x.a.size() / K;
      linear_rows_impl(x.data(), M, K, wt.data<float>(), P, N, out.data<float>(), n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  const char* name() const override { return "LinearRows"; }
  bool is_equivalent(const Primitive& other) const override {
    return threads_ == static_cast<const LinearRows&>(other).threads_;
  }
  // With a third input, w packed transposed ((ceil(K / 32), N, 32)): d x = d y @ w, the same kernel. The packed
  // weights are constants (a frozen base layer): no gradient for them.
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>& outputs) override {
    if (primals.size() < 3) throw std::invalid_argument("linear_rows: no gradient without the transposed packing");
    std::vector<array> grads;
    auto s = stream();
    for (int arg : argnums) {
      if (arg != 0) throw std::invalid_argument("linear_rows: the packed weights take no gradient (frozen)");
      array c = contiguous(astype(cotangents[0], float32, s), false, s);
      Shape shape = primals[0].shape();
      grads.push_back(array(shape, float32, std::make_shared<LinearRows>(s, threads_), {c, primals[2]}));
    }
    return grads;
  }

 private:
  int threads_;
};

// Sum of a[i] * b[i] (or of a[i] when b is null) for i < n, in 16 vector lanes added up as a tree: an in-order
// reduction (what the compiler makes of a plain loop without -ffast-math) is a chain of n dependent adds.
inline float lane_sum(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) acc[j] += b ? a[i + j] * b[i + j] : a[i + j];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += b ? a[i] * b[i] : a[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

template <int64_t DT>  // DT > 0: the head size as a compile-time constant (unrolled, in registers); 0: any D
void decode_attention_task(const float* __restrict qt, const float* __restrict Kt, const float* __restrict Vt,
                           float* __restrict ot, float* __restrict sc, int64_t rep, int64_t n, int64_t D_,
                           int64_t lo, int64_t hi, float scale) {
  constexpr float NEG = -std::numeric_limits<float>::infinity();
  const int64_t D = DT > 0 ? DT : D_;
  for (int64_t s = 0; s < n; ++s) {
    const float* ks = Kt + s * D;
    bool skip = s >= lo && s < hi;
    for (int64_t r = 0; r < rep; ++r) sc[r * n + s] = skip ? NEG : lane_sum(qt + r * D, ks, D) * scale;
  }
  for (int64_t r = 0; r < rep; ++r) {
    float* pr = sc + r * n;
    float m = row_max(pr, n);
#pragma omp simd
    for (int64_t s = 0; s < n; ++s) pr[s] = pr[s] == NEG ? 0.0f : exp_poly(pr[s] - m);
    float inv = 1.0f / lane_sum(pr, nullptr, n);
    float acc[DT > 0 ? DT : 256];  // D <= 256: checked by decode_attention()
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      float w = pr[s];
      const float* vs = Vt + s * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += w * vs[d];
    }
    float* o = ot + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
  }
}

#if defined(__AVX512F__)
// exp_poly on 16 lanes; lanes equal to -inf give exactly 0 (masked slots).
inline __m512 exp_poly16(__m512 x) {
  __mmask16 masked = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~masked), _mm512_scalef_ps(p, n));
}

// decode_attention_task for D = 64 and rep <= 4 in AVX-512 registers: q heads and the output accumulators stay
// in registers, each K and V row is loaded once for all `rep` heads, dot products reduce as trees.
void decode_attention_task_d64(const float* __restrict qt, const float* __restrict Kt, const float* __restrict Vt,
                               float* __restrict ot, float* __restrict sc, int64_t rep, int64_t n, int64_t lo,
                               int64_t hi, float scale) {
  constexpr float NEG = -std::numeric_limits<float>::infinity();
  __m512 q[4][4];
  for (int64_t r = 0; r < rep; ++r)
    for (int j = 0; j < 4; ++j) q[r][j] = _mm512_mul_ps(_mm512_loadu_ps(qt + r * 64 + 16 * j), _mm512_set1_ps(scale));
  for (int64_t s = 0; s < n; ++s) {
    const float* ks = Kt + s * 64;
    __m512 k0 = _mm512_loadu_ps(ks), k1 = _mm512_loadu_ps(ks + 16), k2 = _mm512_loadu_ps(ks + 32),
           k3 = _mm512_loadu_ps(ks + 48);
    for (int64_t r = 0; r < rep; ++r) {
      __m512 a = _mm512_mul_ps(q[r][0], k0);
      __m512 b = _mm512_mul_ps(q[r][1], k1);
      a = _mm512_fmadd_ps(q[r][2], k2, a);
      b = _mm512_fmadd_ps(q[r][3], k3, b);
      sc[r * n + s] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
  }
  for (int64_t r = 0; r < rep; ++r)
    for (int64_t s = std::max<int64_t>(lo, 0); s < std::min(hi, n); ++s) sc[r * n + s] = NEG;
  float inv[4];
  for (int64_t r = 0; r < rep; ++r) {
    float* pr = sc + r * n;
    float m = row_max(pr, n);
    __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
      __m512 e = exp_poly16(_mm512_sub_ps(_mm512_loadu_ps(pr + s), mv));
      _mm512_storeu_ps(pr + s, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (s < n) {
      __mmask16 tail = static_cast<__mmask16>((1u << (n - s)) - 1);
      __m512 e = exp_poly16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(NEG), tail, pr + s), mv));
      _mm512_mask_storeu_ps(pr + s, tail, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[4][4];
  for (int64_t r = 0; r < rep; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    const float* vs = Vt + s * 64;
    __m512 v0 = _mm512_loadu_ps(vs), v1 = _mm512_loadu_ps(vs + 16), v2 = _mm512_loadu_ps(vs + 32),
           v3 = _mm512_loadu_ps(vs + 48);
    for (int64_t r = 0; r < rep; ++r) {
      __m512 w = _mm512_set1_ps(sc[r * n + s]);
      acc[r][0] = _mm512_fmadd_ps(w, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w, v1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(w, v2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(w, v3, acc[r][3]);
    }
  }
  for (int64_t r = 0; r < rep; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(ot + r * 64 + 16 * j, _mm512_mul_ps(acc[r][j], _mm512_set1_ps(inv[r])));
}
#endif

// One decode step of grouped-query attention over a static KV cache, for every (batch row, KV head):
// the `rep` query heads that share the KV head are scored against slots [0, n) (n = min(end, slot + 1))
// in one pass over K, soft-maxed, and summed over V in one pass: K and V are read once, from where they lie.
// Batch row b skips slots [holes[b, 0], holes[b, 1]) (its left padding) but the current slot.
// q (B, H, D), K/V (B, KVH, S, D) contiguous, out (B, H, D); H = KVH * rep.
void decode_attention_impl(const float* q, const float* K, const float* V, const int32_t* holes, int64_t slot,
                           float* out, int64_t B, int64_t KVH, int64_t rep, int64_t S, int64_t D, int64_t end,
                           float scale, int threads) {
  int64_t n = std::min<int64_t>(end, slot + 1);
  parallel_rows(B * KVH, threads, [=](int64_t a, int64_t b) {
    std::vector<float> sc(rep * std::max<int64_t>(n, 1));
    for (int64_t task = a; task < b; ++task) {
      int64_t bb = task / KVH;
      int64_t lo = holes[2 * bb], hi = std::min<int64_t>(holes[2 * bb + 1], slot);
      const float *qt = q + task * rep * D, *Kt = K + task * S * D, *Vt = V + task * S * D;
      float* ot = out + task * rep * D;
#if defined(__AVX512F__)
      if (D == 64 && rep <= 4)
        decode_attention_task_d64(qt, Kt, Vt, ot, sc.data(), rep, n, lo, hi, scale);
      else
#endif
      if (D == 64)
        decode_attention_task<64>(qt, Kt, Vt, ot, sc.data(), rep, n, D, lo, hi, scale);
      else if (D == 128)
        decode_attention_task<128>(qt, Kt, Vt, ot, sc.data(), rep, n, D, lo, hi, scale);
      else
        decode_attention_task<0>(qt, Kt, Vt, ot, sc.data(), rep, n, D, lo, hi, scale);
    }
  }, 2);
}

class DecodeAttention : public UnaryPrimitive {
 public:
  DecodeAttention(Stream s, float scale, int end, int threads)
      : UnaryPrimitive(s), scale_(scale), end_(end), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    const char* what[] = {"decode_attention: q", "decode_attention: K", "decode_attention: V",
                          "decode_attention: holes", "decode_attention: slot"};
    for (size_t i = 3; i < in.size(); ++i) check_cpu_layout(in[i], what[i]);  // q, K, V: copied if strided
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([q = RowsInput(in[0]), k = RowsInput(in[1]), v = RowsInput(in[2]), h = array::unsafe_weak_copy(in[3]),
                  sl = array::unsafe_weak_copy(in[4]), out = array::unsafe_weak_copy(out), scale = scale_,
                  end = end_, n = threads_]() mutable {
      int64_t B = k.a.shape(0), KVH = k.a.shape(1), S = k.a.shape(2), D = k.a.shape(3), H = q.a.shape(1);
      int64_t slot = sl.data<int32_t>()[0];
      decode_attention_impl(q.data(), k.data(), v.data(), h.data<int32_t>(), slot,
                            out.data<float>(), B, KVH, H / KVH, S, D, std::min<int64_t>(end, S), scale, n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  const char* name() const override { return "DecodeAttention"; }
  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && end_ == o.end_ && threads_ == o.threads_;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override { return {in[0].shape()}; }

 private:
  float scale_;
  int end_;
  int threads_;
};

// A decode step's q/k/v projection output -> rotated q, and rotated k and v written into the caches at `slot`.
// qkv (B, (H + 2 KVH) D) -> q (B, H, D); K/V (B, KVH, S, D) updated in place when MLX can donate their
// buffers (the step's only use of the old caches), else copied first. Row b rotates pair i by the angle whose
// cos and sin are cossin[b, i] and cossin[b, D/2 + i]; `traditional` pairs (2i, 2i+1), else (i, i + D/2).
void rope_rows(const float* __restrict x, float* __restrict y, int64_t heads, int64_t D, const float* cs,
               const float* sn, bool traditional) {
  int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* a = x + h * D;
    float* o = y + h * D;
    if (traditional) {
      for (int64_t i = 0; i < half; ++i) {
        float x1 = a[2 * i], x2 = a[2 * i + 1];
        o[2 * i] = x1 * cs[i] - x2 * sn[i];
        o[2 * i + 1] = x1 * sn[i] + x2 * cs[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        float x1 = a[i], x2 = a[i + half];
        o[i] = x1 * cs[i] - x2 * sn[i];
        o[i + half] = x1 * sn[i] + x2 * cs[i];
      }
    }
  }
}

// A float32 4-d array (any strides) into a row-contiguous buffer.
void copy_4d(const array& a, float* out) {
  if (a.flags().row_contiguous) {
    std::memcpy(out, a.data<float>(), a.nbytes());
    return;
  }
  const float* x = a.data<float>();
  auto& st = a.strides();
  int64_t n0 = a.shape(0), n1 = a.shape(1), n2 = a.shape(2), n3 = a.shape(3);
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j)
      for (int64_t k = 0; k < n2; ++k, out += n3) {
        const float* row = x + i * st[0] + j * st[1] + k * st[2];
        for (int64_t l = 0; l < n3; ++l) out[l] = row[l * st[3]];
      }
}

// One output of rope_cache (single-output primitives: MLX donates an input only to a node that is its sole
// user, and the outputs of a multi-output node each hold the inputs). part 0: q (B, H, D) = rotated q heads;
// part 1: the K cache with rotated k at `slot`; part 2: the V cache with v at `slot`. Caches are updated in
// place when their buffer can be donated, else copied first.
class RopeCache : public UnaryPrimitive {
 public:
  RopeCache(Stream s, int part, int heads, int kv_heads, bool traditional, int threads)
      : UnaryPrimitive(s), part_(part), heads_(heads), kv_heads_(kv_heads), traditional_(traditional),
        threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    // in: qkv, cossin, slot[, cache]
    check_cpu_layout(in[2], "rope_cache: slot");  // qkv and cossin: copied if strided
    bool copy = false;
    if (part_ == 0) {
      out.set_data(allocator::malloc(out.nbytes()));
    } else if (in[3].is_donatable() && in[3].flags().row_contiguous) {
      out.copy_shared_buffer(in[3]);
    } else {
      out.set_data(allocator::malloc(out.nbytes()));
      copy = true;
    }
    auto& enc = cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([x = RowsInput(in[0]), off = RowsInput(in[1]), sl = array::unsafe_weak_copy(in[2]), c0 = array::unsafe_weak_copy(in[part_ == 0 ? 0 : 3]),
                  y = array::unsafe_weak_copy(out), part = part_, H = heads_, KVH = kv_heads_, trad = traditional_, n = threads_, copy]() mutable {
      if (copy) copy_4d(c0, y.data<float>());
      int64_t B = x.a.shape(0), D = part == 0 ? y.shape(2) : y.shape(3), W = (H + 2 * KVH) * D;
      int64_t S = part == 0 ? 1 : y.shape(2), slot = sl.data<int32_t>()[0];
      if (part > 0 && (slot < 0 || slot >= S)) return;  // nothing to write (checked in Python)
      const float* xs = x.data();
      const float* cossin = off.data();
      float* yo = y.data<float>();
      parallel_rows(B, n, [=](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) {
          const float* xr = xs + r * W;
          if (part == 2) {  // v: no rotation
            for (int64_t g = 0; g < KVH; ++g)
              std::memcpy(yo + ((r * KVH + g) * S + slot) * D, xr + (H + KVH + g) * D, D * sizeof(float));
            continue;
          }
          const float *cs = cossin + r * D, *sn = cs + D / 2;
          if (part == 0) {
            rope_rows(xr, yo + r * H * D, H, D, cs, sn, trad);
          } else {
            for (int64_t g = 0; g < KVH; ++g) rope_rows(xr + (H + g) * D, yo + ((r * KVH + g) * S + slot) * D, 1, D, cs, sn, trad);
          }
        }
      }, 8);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  const char* name() const override { return "RopeCache"; }
  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const RopeCache&>(other);
    return part_ == o.part_ && heads_ == o.heads_ && kv_heads_ == o.kv_heads_ && traditional_ == o.traditional_ &&
           threads_ == o.threads_;
  }

 private:
  int part_, heads_, kv_heads_;
  bool traditional_;
  int threads_;
};

// SwiGLU: silu(g) * u = g * u / (1 + exp(-g)), and its gradient, over n elements.
void silu_mul_span(const float* __restrict g, const float* __restrict u, float* __restrict out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 gv = _mm512_loadu_ps(g + i);
    __m512 e = exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_mul_ps(gv, _mm512_loadu_ps(u + i)), _mm512_add_ps(one, e)));
  }
#endif
  for (; i < n; ++i) out[i] = g[i] * u[i] / (1.0f + exp_poly(-g[i]));
}

void silu_mul_vjp_span(const float* __restrict g, const float* __restrict u, const float* __restrict c,
                       float* __restrict dg, float* __restrict du, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __m512 gv = _mm512_loadu_ps(g + i), uv = _mm512_loadu_ps(u + i), cv = _mm512_loadu_ps(c + i);
    __m512 sv = _mm512_div_ps(one, _mm512_add_ps(one, exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    __m512 cs = _mm512_mul_ps(cv, sv);
    // dg = c * u * s * (1 + g * (1 - s)), du = c * g * s
    _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(cs, uv), _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sv), one)));
    _mm512_storeu_ps(du + i, _mm512_mul_ps(cs, gv));
  }
#endif
  for (; i < n; ++i) {
    float sv = 1.0f / (1.0f + exp_poly(-g[i]));
    dg[i] = c[i] * u[i] * sv * (1.0f + g[i] * (1.0f - sv));
    du[i] = c[i] * g[i] * sv;
  }
}

// Rows of g and u: either two (rows, F) arrays, or one (rows, 2F) array holding [g | u] (a fused gate/up
// projection's output). F columns per row.
struct GateRows {
  const float *g, *u;
  int64_t stride;  // floats from one row of g (and u) to the next
  int64_t rows, F;
  GateRows(const std::vector<array>& in) {
    if (in.size() == 1) {
      F = in[0].shape(-1) / 2;
      rows = in[0].size() / (2 * F);
      g = in[0].data<float>();
      u = g + F;
      stride = 2 * F;
    } else {
      F = in[0].shape(-1);
      rows = in[0].size() / F;
      g = in[0].data<float>();
      u = in[1].data<float>();
      stride = F;
    }
  }
};

class SiluMulVJP : public Primitive {
 public:
  SiluMulVJP(Stream s, int threads) : Primitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, std::vector<array>& outs) override {
    for (auto& a : in) check_cpu_layout(a, "silu_mul vjp inputs");
    for (auto& o : outs) o.set_data(allocator::malloc(o.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    for (auto& o : outs) enc.set_output_array(o);
    enc.dispatch([g = array::unsafe_weak_copy(in[0]), u = array::unsafe_weak_copy(in[1]),
                  c = array::unsafe_weak_copy(in[2]), dg = array::unsafe_weak_copy(outs[0]),
                  du = array::unsafe_weak_copy(outs[1]), n = threads_]() mutable {
      int64_t total = g.size();
      const float *gp = g.data<float>(), *up = u.data<float>(), *cp = c.data<float>();
      float *dgp = dg.data<float>(), *dup = du.data<float>();
      parallel_rows(total, n, [=](int64_t a, int64_t b) {
        silu_mul_vjp_span(gp + a, up + a, cp + a, dgp + a, dup + a, b - a);
      }, 1 << 14);
    });
  }
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override { return {in[0].shape(), in[1].shape()}; }
  const char* name() const override { return "SiluMulVJP"; }

 private:
  int threads_;
};

class SiluMul : public UnaryPrimitive {
 public:
  SiluMul(Stream s, int threads) : UnaryPrimitive(s), threads_(threads) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    for (auto& a : in) check_cpu_layout(a, "silu_mul inputs");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    std::vector<array> ins;
    for (auto& a : in) ins.push_back(array::unsafe_weak_copy(a));
    enc.dispatch([ins = std::move(ins), out = array::unsafe_weak_copy(out), n = threads_]() mutable {
      GateRows gr(ins);
      float* o = out.data<float>();
      if (gr.stride == gr.F) {  // two contiguous arrays: one flat span
        parallel_rows(gr.rows * gr.F, n, [=](int64_t a, int64_t b) {
          silu_mul_span(gr.g + a, gr.u + a, o + a, b - a);
        }, 1 << 14);
      } else {
        parallel_rows(gr.rows, n, [=](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) silu_mul_span(gr.g + r * gr.stride, gr.u + r * gr.stride, o + r * gr.F, gr.F);
        }, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(gr.F, 1)));
      }
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>& outputs) override {
    if (primals.size() != 2) throw std::invalid_argument("silu_mul: no gradient through the fused [g | u] form");
    auto s = stream();
    array c = contiguous(astype(cotangents[0], float32, s), false, s);
    auto grads = array::make_arrays({primals[0].shape(), primals[1].shape()}, {float32, float32},
                                    std::make_shared<SiluMulVJP>(s, threads_), {primals[0], primals[1], c});
    std::vector<array> out;
    for (int arg : argnums) out.push_back(grads[arg]);
    return out;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override {
    Shape shape = in[0].shape();
    if (in.size() == 1) shape.back() /= 2;
    return {shape};
  }
  const char* name() const override { return "SiluMul"; }
  bool is_equivalent(const Primitive& other) const override {
    return threads_ == static_cast<const SiluMul&>(other).threads_;
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

array linear_rows(const array& x, const array& packed, int n_out, int threads, const std::optional<array>& packed_t) {
  if (x.ndim() < 1 || packed.ndim() != 3 || packed.shape(2) != LIN_NB || x.shape(-1) != packed.shape(1) ||
      n_out <= 0 || n_out > packed.shape(0) * LIN_NB) {
    throw std::invalid_argument("linear_rows: expected x (..., K) and a weight packed as (ceil(N / 32), K, 32)");
  }
  int64_t K = x.shape(-1);
  if (packed_t && (packed_t->ndim() != 3 || packed_t->shape(2) != LIN_NB || packed_t->shape(1) != n_out ||
                   packed_t->shape(0) * LIN_NB < K)) {
    throw std::invalid_argument("linear_rows: packed_t must be the weight transposed, packed as (ceil(K / 32), N, 32)");
  }
  auto s = to_stream(StreamOrDevice{});
  std::vector<array> inputs = {astype(x, float32, s), constant_input(packed, float32, s)};
  if (packed_t) inputs.push_back(constant_input(*packed_t, float32, s));
  Shape shape = x.shape();
  shape.back() = n_out;
  return array(shape, float32, std::make_shared<LinearRows>(s, std::max(1, threads)), inputs);
}

}  // namespace mlx_cai

namespace mlx_cai {
array decode_attention(const array& q, const array& k, const array& v, const array& holes, const array& slot,
                       float scale, int end, int threads) {
  if (q.ndim() != 3 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != k.shape(0) ||
      q.shape(2) != k.shape(3) || q.shape(1) % k.shape(1) != 0 || holes.ndim() != 2 || holes.shape(0) != q.shape(0) ||
      holes.shape(1) != 2 || slot.size() != 1 || end <= 0 || q.shape(2) > 256) {
    throw std::invalid_argument(
        "decode_attention: expected q (B, H, D <= 256), K and V (B, KVH, S, D) with KVH dividing H, holes (B, 2), a "
        "slot, end > 0");
  }
  auto s = to_stream(StreamOrDevice{});
  auto f32 = [&](const array& a) { return contiguous(astype(a, float32, s), false, s); };
  auto i32 = [&](const array& a) { return contiguous(astype(a, int32, s), false, s); };
  return array(q.shape(), float32, std::make_shared<DecodeAttention>(s, scale, end, std::max(1, threads)),
               {astype(q, float32, s), astype(k, float32, s), astype(v, float32, s), i32(holes),
                i32(reshape(slot, {1}, s))});
}
}  // namespace mlx_cai

namespace mlx_cai {
std::vector<array> rope_cache(const array& qkv, const array& k, const array& v, const array& cossin,
                              const array& slot, int heads, bool traditional, int threads) {
  if (qkv.ndim() != 2 || k.ndim() != 4 || v.shape() != k.shape() || qkv.shape(0) != k.shape(0) ||
      heads % k.shape(1) != 0 || qkv.shape(1) != (heads + 2 * k.shape(1)) * k.shape(3) || k.shape(3) % 2 != 0 ||
      cossin.ndim() != 2 || cossin.shape(0) != qkv.shape(0) || cossin.shape(1) != k.shape(3) || slot.size() != 1) {
    throw std::invalid_argument(
        "rope_cache: expected qkv (B, (H + 2 KVH) D), K and V (B, KVH, S, D), cossin (B, D) and one slot");
  }
  auto s = to_stream(StreamOrDevice{});
  auto f32 = [&](const array& a) { return contiguous(astype(a, float32, s), false, s); };
  auto i32 = [&](const array& a) { return contiguous(astype(a, int32, s), false, s); };
  int B = qkv.shape(0), D = k.shape(3), KVH = k.shape(1);
  std::vector<array> common = {astype(qkv, float32, s), astype(cossin, float32, s), i32(reshape(slot, {1}, s))};
  auto make = [&](int part, const Shape& shape, std::optional<array> cache) {
    auto inputs = common;
    // the cache as it is: a new node in between (astype, contiguous) would keep it from being donated
    if (cache) inputs.push_back(cache->dtype() == float32 ? *cache : astype(*cache, float32, s));
    return array(shape, float32,
                 std::make_shared<RopeCache>(s, part, heads, KVH, traditional, std::max(1, threads)), inputs);
  };
  return {make(0, Shape{B, heads, D}, std::nullopt), make(1, k.shape(), k), make(2, v.shape(), v)};
}
}  // namespace mlx_cai

namespace mlx_cai {
array silu_mul(const array& g, const std::optional<array>& u, int threads) {
  auto s = to_stream(StreamOrDevice{});
  auto f32 = [&](const array& a) { return contiguous(astype(a, float32, s), false, s); };
  auto prim = std::make_shared<SiluMul>(s, std::max(1, threads));
  if (!u) {
    if (g.ndim() < 1 || g.shape(-1) % 2 != 0) throw std::invalid_argument("silu_mul: expected gu (..., 2F)");
    Shape shape = g.shape();
    shape.back() /= 2;
    return array(shape, float32, prim, {f32(g)});
  }
  if (g.shape() != u->shape()) throw std::invalid_argument("silu_mul: g and u must have the same shape");
  return array(g.shape(), float32, prim, {f32(g), f32(*u)});
}
}  // namespace mlx_cai

// ---- linear_rows_q: x @ w.T for w in MLX's affine quantization (4 or 8 bits), dequantized in registers ----
//
// Pack (mlx_cai.kernels.pack_quantized): uint32 (P, G, W), P = ceil(N / 16) panels of 16 output rows of w,
// G = K / group_size groups; the block of panel p, group g is W = 16 * (2 + group_size * bits / 32) words:
// the 16 rows' scales, their 16 biases (float32 bits), then each row's group_size * bits / 32 words. 8 bits:
// as mx.quantize packs them (element i of a word in bits [8i, 8i + 8)); 4 bits: per 16 elements two words,
// the even elements' nibbles in the first, the odd ones' in the second (see below). A panel is one contiguous
// stream (prefetched as a whole), and group size and bits follow from the shapes: group_size = K / G and
// bits = 32 * (W / 16 - 2) / group_size, so the primitive needs no other metadata.
//
// Each 16 consecutive k of one output row dequantize into one vector: with 4 bits, the 64 bits of 16 nibbles
// are broadcast to the 8 lane pairs and pair j shifted right by 4j, which leaves element 2j's nibble in the low
// bits of lane 2j and element 2j + 1's in lane 2j + 1 (hence the pack's order); those low bits index the group's
// table scale * [0..15] + bias (vpermps reads only them): one shift and one shuffle, no conversion. (vpmultishiftqb
// on mx.quantize's own order needs no reordering but was ~12% slower at one row on Zen 4.) With 8 bits, 16
// bytes widen to integers and convert (scale * q + bias, one FMA). That vector then takes one FMA per token row
// against x[m, k:k+16], with lanes along k: each (row, output) accumulator is summed across lanes at the end.

namespace mlx_cai {
namespace {

constexpr int Q_NC = 16;  // output rows of w per panel of a quantized pack

#if defined(__AVX512F__)
// Rows [0, MB) of y[:, c0:c0+CB] (y at the panel's first output) over the whole K; `nvalid` outputs of the
// panel exist (the last panel of an N that is no multiple of 16 has zero padding). `next` (or null): bytes
// [pf_lo, pf_hi) of every group block of the next panel are fetched into cache meanwhile.
template <int BITS, int GS, int MB, int CB>
inline void qlinear_tile(const float* __restrict x, int64_t K, const uint32_t* __restrict panel, int64_t G, int c0,
                         float* __restrict y, int64_t N, int64_t nvalid, const char* next, int64_t pf_lo,
                         int64_t pf_hi) {
  constexpr int64_t gs = GS, wpg = GS * BITS / 32, W = Q_NC * (2 + wpg);
  const __m512i shifts = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 acc[MB][CB];
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < CB; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t* blk = panel + g * W;
    if (next)
      for (int64_t off = pf_lo; off < pf_hi; off += 64) __builtin_prefetch(next + g * W * 4 + off, 0, 2);
    const float* sc = reinterpret_cast<const float*>(blk) + c0;
    const float* bi = sc + Q_NC;
    const uint32_t* q = blk + 2 * Q_NC + c0 * wpg;
    const float* xg = x + g * gs;
    __m512 tab[CB], s[CB], b[CB];  // 4 bits: the dequantized values of q = 0..15; 8 bits: scale, bias
    for (int c = 0; c < CB; ++c) {
      s[c] = _mm512_set1_ps(sc[c]);
      b[c] = _mm512_set1_ps(bi[c]);
      if constexpr (BITS == 4) tab[c] = _mm512_fmadd_ps(iota, s[c], b[c]);
    }
    for (int64_t ch = 0; ch < gs / 16; ++ch) {
      __m512 xv[MB];
      for (int m = 0; m < MB; ++m) {
        xv[m] = _mm512_loadu_ps(xg + m * K + ch * 16);
        // x stays in a register for the CB outputs: GCC would fold the load into each FMA instead (CB loads per
        // vector of x), which was ~25% slower at 8 and 32 rows
        asm("" : "+v"(xv[m]));
      }
      for (int c = 0; c < CB; ++c) {
        __m512 w;
        if constexpr (BITS == 4) {
          uint64_t nib;
          std::memcpy(&nib, q + c * wpg + ch * 2, sizeof(nib));
          w = _mm512_permutexvar_ps(_mm512_srlv_epi64(_mm512_set1_epi64(nib), shifts), tab[c]);
        } else {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * wpg + ch * 4));
          w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), s[c], b[c]);
        }
        for (int m = 0; m < MB; ++m) acc[m][c] = _mm512_fmadd_ps(w, xv[m], acc[m][c]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < CB && c0 + c < nvalid; ++c) y[m * N + c0 + c] = _mm512_reduce_add_ps(acc[m][c]);
}

// Rows [0, MB) of one panel: its 16 outputs in tiles of CB (MB * CB accumulators and MB vectors of x fill the 32
// registers; more rows per tile dequantize each weight vector for more FMAs), the prefetch of the next panel
// spread evenly over the tiles.
template <int BITS, int GS, int MB>
void qlinear_panel(const float* x, int64_t K, const uint32_t* panel, int64_t G, float* y, int64_t N,
                   int64_t nvalid, const char* next) {
  constexpr int CB = MB >= 8 ? 2 : MB >= 4 ? 4 : 8;
  constexpr int T = Q_NC / CB;
  constexpr int64_t bytes = Q_NC * (2 + GS * BITS / 32) * 4;
  for (int t = 0; t < T; ++t)
    qlinear_tile<BITS, GS, MB, CB>(x, K, panel, G, t * CB, y, N, nvalid, next, bytes * t / T / 64 * 64,
                               t + 1 == T ? bytes : bytes * (t + 1) / T / 64 * 64);
}

template <int BITS, int GS>
void qlinear_rows_gs(const float* x, int64_t M, int64_t K, const uint32_t* panel, int64_t G, float* y, int64_t N,
                     int64_t nvalid, const char* next) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8, next = nullptr) qlinear_panel<BITS, GS, 8>(x + m * K, K, panel, G, y + m * N, N, nvalid, next);
  if (m + 4 <= M) qlinear_panel<BITS, GS, 4>(x + m * K, K, panel, G, y + m * N, N, nvalid, next), m += 4, next = nullptr;
  if (m + 2 <= M) qlinear_panel<BITS, GS, 2>(x + m * K, K, panel, G, y + m * N, N, nvalid, next), m += 2, next = nullptr;
  if (m < M) qlinear_panel<BITS, GS, 1>(x + m * K, K, panel, G, y + m * N, N, nvalid, next);
}

template <int BITS>
void qlinear_rows(const float* x, int64_t M, int64_t K, const uint32_t* panel, int64_t G, int64_t gs, float* y,
                  int64_t N, int64_t nvalid, const char* next) {
  // the group size as a constant: a group's few 16-element steps unroll, its table setup is straight-line code
  if (gs == 32) qlinear_rows_gs<BITS, 32>(x, M, K, panel, G, y, N, nvalid, next);
  else if (gs == 64) qlinear_rows_gs<BITS, 64>(x, M, K, panel, G, y, N, nvalid, next);
  else qlinear_rows_gs<BITS, 128>(x, M, K, panel, G, y, N, nvalid, next);
}

// ---- 16 and more rows: the panel dequantized once into a buffer, then a float32 tile with rows in lanes ----
//
// The tiles above dequantize every weight vector once per 8 rows (shift + shuffle per 16 weights against 8
// FMAs), which held 8-32 rows at ~0.65-0.75 of the FMA peak. Here each panel's 16 outputs x K weights are
// dequantized once per call into a per-thread buffer (float32; in 16-k chunks, each the 16 outputs' 16 weights:
// wb[(k / 16) * 256 + c * 16 + k % 16], so the 16 weights read at one k share a 1 KB block), and
// the product runs as float32 linear_rows does, but transposed: x arrives as blocks of 8 rows (xt[rb][k][8],
// zero rows past M), each accumulator is one output's 8 rows in a 256-bit vector, and each weight is one
// broadcast serving RB row blocks. Zen 4 retires two 256-bit FMAs a cycle, the same rate as one 512-bit FMA,
// so 8-row vectors lose nothing and leave no padding waste at M = 8 * n.
constexpr int Q_RB = 8;  // rows per vector of the transposed x

// wb (16 x K in 16-k chunks, see above) = the panel dequantized to float32.
template <int BITS, int GS>
void qdequant_panel(const uint32_t* __restrict panel, int64_t G, float* __restrict wb, int64_t K) {
  constexpr int64_t wpg = GS * BITS / 32, W = Q_NC * (2 + wpg);
  const __m512i shifts = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    const uint32_t* blk = panel + g * W;
    const float* sc = reinterpret_cast<const float*>(blk);
    const uint32_t* q = blk + 2 * Q_NC;
    for (int c = 0; c < Q_NC; ++c) {
      __m512 s = _mm512_set1_ps(sc[c]), b = _mm512_set1_ps(sc[Q_NC + c]);
      __m512 tab = _mm512_fmadd_ps(iota, s, b);
      float* dst = wb + (g * GS / 16 * Q_NC + c) * 16;
      for (int64_t ch = 0; ch < GS / 16; ++ch) {
        __m512 w;
        if constexpr (BITS == 4) {
          uint64_t nib;
          std::memcpy(&nib, q + c * wpg + ch * 2, sizeof(nib));
          w = _mm512_permutexvar_ps(_mm512_srlv_epi64(_mm512_set1_epi64(nib), shifts), tab);
        } else {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * wpg + ch * 4));
          w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), s, b);
        }
        _mm512_storeu_ps(dst + ch * Q_NC * 16, w);
      }
    }
  }
}

// Row blocks [0, RB) (of 8 rows each, xt at the first) times outputs [c0, c0 + CO) of the dequantized panel wb,
// over the whole K: RB * CO accumulators, RB vectors of x and CO broadcast weights in registers (<= 32).
template <int RB, int CO>
inline void qk_tile(const float* __restrict xt, int64_t K, const float* __restrict wb, int c0, int64_t M,
                    float* __restrict y, int64_t N, int64_t nvalid) {
  __m256 acc[RB * CO];
#pragma GCC unroll 32
  for (int i = 0; i < RB * CO; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w0 = wb + (k / 16 * Q_NC + c0) * 16 + k % 16;
    __m256 xv[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) xv[r] = _mm256_loadu_ps(xt + (r * K + k) * Q_RB);
#pragma GCC unroll 16
    for (int c = 0; c < CO; ++c) {
      __m256 w = _mm256_broadcast_ss(w0 + c * 16);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[r * CO + c] = _mm256_fmadd_ps(xv[r], w, acc[r * CO + c]);
    }
  }
  // each accumulator goes straight from its register to y's column (a masked scatter over its rows)
  const __m256i rows8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(N));
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    int64_t rows = std::min<int64_t>(Q_RB, M - r * Q_RB);
    __mmask8 mask = static_cast<__mmask8>((1u << rows) - 1);
#pragma GCC unroll 16
    for (int c = 0; c < CO; ++c)
      if (c0 + c < nvalid) _mm256_mask_i32scatter_ps(y + r * Q_RB * N + c0 + c, mask, rows8, acc[r * CO + c], 4);
  }
}

// All M rows of one panel from its dequantized buffer: row blocks in pairs (16 x 8 tiles), a last odd block
// as 8 x 16 (4 x 4 tiles of 32 rows were ~25% slower at 32 rows).
inline void qk_panel(const float* xt, int64_t M, int64_t K, const float* wb, float* y, int64_t N, int64_t nvalid) {
  int64_t nrb = (M + Q_RB - 1) / Q_RB, rb = 0;
  for (; rb + 2 <= nrb; rb += 2)
    for (int c0 = 0; c0 < Q_NC; c0 += 8)
      qk_tile<2, 8>(xt + rb * K * Q_RB, K, wb, c0, M - rb * Q_RB, y + rb * Q_RB * N, N, nvalid);
  if (rb < nrb) qk_tile<1, 16>(xt + rb * K * Q_RB, K, wb, 0, M - rb * Q_RB, y + rb * Q_RB * N, N, nvalid);
}

template <int BITS>
void qk_rows(const float* xt, int64_t M, int64_t K, const uint32_t* panel, int64_t G, int64_t gs, float* y,
             int64_t N, int64_t nvalid, float* wb) {
  if (gs == 32) qdequant_panel<BITS, 32>(panel, G, wb, K);
  else if (gs == 64) qdequant_panel<BITS, 64>(panel, G, wb, K);
  else qdequant_panel<BITS, 128>(panel, G, wb, K);
  qk_panel(xt, M, K, wb, y, N, nvalid);
}
#endif
#if defined(__AVX512F__)
#else
// Portable form (no AVX-512): per group, scale * (x . q) + bias * sum(x), the same value to rounding.
template <int BITS>
void qlinear_rows(const float* x, int64_t M, int64_t K, const uint32_t* panel, int64_t G, int64_t gs, float* y,
                  int64_t N, int64_t nvalid, const char*) {
  const int64_t wpg = gs * BITS / 32, W = Q_NC * (2 + wpg);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < nvalid; ++c) {
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t* blk = panel + g * W;
        const uint32_t* q = blk + 2 * Q_NC + c * wpg;
        const float* xg = x + m * K + g * gs;
        float dot = 0.0f, sum = 0.0f;
#pragma omp simd reduction(+ : dot, sum)
        for (int64_t k = 0; k < gs; ++k) {
          uint32_t v = BITS == 4 ? (q[(k >> 4) * 2 + (k & 1)] >> (4 * ((k & 15) >> 1))) & 15u  // the pack's order
                                 : (q[k >> 2] >> (8 * (k & 3))) & 255u;
          dot += xg[k] * static_cast<float>(v);
          sum += xg[k];
        }
        float s, b;
        std::memcpy(&s, blk + c, sizeof(s));
        std::memcpy(&b, blk + Q_NC + c, sizeof(b));
        acc += s * dot + b * sum;
      }
      y[m * N + c] = acc;
    }
  }
}
#endif

// Rows from which linear_rows_q dequantizes each panel once into a buffer (qk_rows) instead of per 8-row tile
// (one thread, 3072x576 and 4096x4096 4-bit: at 8 rows the 8-row tiles were faster, from 16 rows the buffer).
constexpr int64_t Q_KTILE_ROWS = 16;

// y (M, N) = x (M, K) @ w.T over the pack (P, G, W): panels split over the threads, each read from memory once
// (every row block after the first finds it in cache), the first row block prefetching the thread's next one.
// From Q_KTILE_ROWS rows (AVX-512): x transposed once into 8-row blocks, each panel dequantized once.
void linear_rows_q_impl(const float* x, int64_t M, int64_t K, const uint32_t* packed, int64_t P, int64_t G,
                        int64_t gs, int bits, int64_t N, float* y, int threads) {
  const int64_t panel_words = G * Q_NC * (2 + gs * bits / 32);
#if defined(__AVX512F__)
  if (M >= Q_KTILE_ROWS) {
    int64_t nrb = (M + Q_RB - 1) / Q_RB;
    std::vector<float> xt(nrb * K * Q_RB, 0.0f);  // xt[rb][k][i] = x[rb * 8 + i, k]
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xt[((m / Q_RB) * K + k) * Q_RB + m % Q_RB] = x[m * K + k];
    const float* xtp = xt.data();
    parallel_rows(P, threads, [=](int64_t a, int64_t b) {
      thread_local std::vector<float> wb;
      if (wb.size() < static_cast<size_t>(Q_NC * K)) wb.resize(Q_NC * K);
      for (int64_t p = a; p < b; ++p) {
        int64_t n = p * Q_NC, nvalid = std::min<int64_t>(Q_NC, N - n);
        if (bits == 4) qk_rows<4>(xtp, M, K, packed + p * panel_words, G, gs, y + n, N, nvalid, wb.data());
        else qk_rows<8>(xtp, M, K, packed + p * panel_words, G, gs, y + n, N, nvalid, wb.data());
      }
    }, 2);
    return;
  }
#endif
  parallel_rows(P, threads, [=](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p) {
      const uint32_t* panel = packed + p * panel_words;
      const char* next = p + 1 < b ? reinterpret_cast<const char*>(panel + panel_words) : nullptr;
      int64_t n = p * Q_NC, nvalid = std::min<int64_t>(Q_NC, N - n);
      if (bits == 4) qlinear_rows<4>(x, M, K, panel, G, gs, y + n, N, nvalid, next);
      else qlinear_rows<8>(x, M, K, panel, G, gs, y + n, N, nvalid, next);
    }
  }, 2);
}

// h (M, K) = rms_norm of each row of x times w: x * (1 / sqrt(mean(x^2) + eps)) * w, as mx.fast.rms_norm.
void rms_norm_rows(const float* x, const float* w, float eps, int64_t M, int64_t K, float* h) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float r = 1.0f / std::sqrt(lane_sum(xr, xr, K) / static_cast<float>(K) + eps);
    float* hr = h + m * K;
    for (int64_t k = 0; k < K; ++k) hr[k] = xr[k] * r * w[k];
  }
}

class LinearRowsQ : public UnaryPrimitive {
 public:
  // inputs: x, packed[, norm][, residual]
  // gate: x is [g | u] (..., 2K) and silu(g) * u takes its place (fastllama's fused gate/up output)
  LinearRowsQ(Stream s, int n_out, int threads, bool norm = false, float eps = 0.0f, bool residual = false,
              bool gate = false)
      : UnaryPrimitive(s), n_out_(n_out), threads_(threads), norm_(norm), eps_(eps), residual_(residual),
        gate_(gate) {}
  void eval_cpu(const std::vector<array>& in, array& out) override {
    check_cpu_layout(in[1], "linear_rows_q: packed");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    size_t i = 2;
    std::optional<RowsInput> nw, res;
    if (norm_) nw.emplace(in[i++]);
    if (residual_) res.emplace(in[i++]);
    enc.dispatch([x = RowsInput(in[0]), w = array::unsafe_weak_copy(in[1]), out = array::unsafe_weak_copy(out),
                  nw, res, eps = eps_, gate = gate_, n = threads_]() mutable {
      int64_t K = gate ? x.a.shape(-1) / 2 : x.a.shape(-1);
      int64_t P = w.shape(0), G = w.shape(1), gs = K / G, M = x.a.size() / x.a.shape(-1), N = out.shape(-1);
      int bits = static_cast<int>(32 * (w.shape(2) / Q_NC - 2) / gs);
      const float* xp = x.data();
      std::vector<float> h;
      if (gate) {
        h.resize(M * K);
        for (int64_t m = 0; m < M; ++m) silu_mul_span(xp + m * 2 * K, xp + m * 2 * K + K, h.data() + m * K, K);
        xp = h.data();
      } else if (nw) {
        h.resize(M * K);
        rms_norm_rows(xp, nw->data(), eps, M, K, h.data());
        xp = h.data();
      }
      float* y = out.data<float>();
      linear_rows_q_impl(xp, M, K, w.data<uint32_t>(), P, G, gs, bits, N, y, n);
      if (res) {
        const float* r = res->data();
        for (int64_t j = 0; j < M * N; ++j) y[j] = r[j] + y[j];
      }
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("mlx_cai kernels run on the CPU only");
  }
  std::vector<array> vjp(const std::vector<array>&, const std::vector<array>&, const std::vector<int>&,
                         const std::vector<array>&) override {
    throw std::invalid_argument("linear_rows_q: forward only (decoding), no gradient");
  }
  std::vector<Shape> output_shapes(const std::vector<array>& in) override {
    Shape shape = in[0].shape();
    shape.back() = n_out_;
    return {shape};
  }
  const char* name() const override { return "LinearRowsQ"; }
  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const LinearRowsQ&>(other);
    return n_out_ == o.n_out_ && threads_ == o.threads_ && norm_ == o.norm_ && eps_ == o.eps_ &&
           residual_ == o.residual_ && gate_ == o.gate_;
  }

 private:
  int n_out_, threads_;
  bool norm_;
  float eps_;
  bool residual_, gate_;
};

}  // namespace

array linear_rows_q(const array& x, const array& packed, int n_out, int threads, const std::optional<array>& norm,
                    float eps, const std::optional<array>& residual, bool gate) {
  int64_t K = x.ndim() >= 1 ? (gate ? x.shape(-1) / 2 : x.shape(-1)) : 0;
  bool ok = x.ndim() >= 1 && packed.ndim() == 3 && packed.dtype() == uint32 && packed.shape(1) > 0 && K > 0 &&
            (!gate || x.shape(-1) % 2 == 0) && K % packed.shape(1) == 0 && packed.shape(2) % Q_NC == 0 &&
            n_out > 0 && n_out <= packed.shape(0) * Q_NC;
  int64_t gs = ok ? K / packed.shape(1) : 0;
  int64_t wpg = ok ? packed.shape(2) / Q_NC - 2 : 0;
  if (!ok || (gs != 32 && gs != 64 && gs != 128) || (wpg * 32 != gs * 4 && wpg * 32 != gs * 8)) {
    throw std::invalid_argument(
        "linear_rows_q: expected x (..., K) and a pack_quantized weight (ceil(N / 16), K / group_size, "
        "16 * (2 + group_size * bits / 32)) uint32, group_size 32, 64 or 128, bits 4 or 8");
  }
  auto s = to_stream(StreamOrDevice{});
  Shape shape = x.shape();
  shape.back() = n_out;
  if (norm && (gate || norm->ndim() != 1 || norm->shape(0) != K)) {
    throw std::invalid_argument("linear_rows_q: norm must be (K,) for x (..., K), and not with gate");
  }
  if (residual && residual->shape() != shape) {
    throw std::invalid_argument("linear_rows_q: residual must have the output's shape (..., n_out)");
  }
  std::vector<array> inputs = {astype(x, float32, s), constant_input(packed, uint32, s)};
  if (norm) inputs.push_back(astype(*norm, float32, s));
  if (residual) inputs.push_back(astype(*residual, float32, s));
  return array(shape, float32,
               std::make_shared<LinearRowsQ>(s, n_out, std::max(1, threads), norm.has_value(), eps,
                                             residual.has_value(), gate),
               inputs);
}

}  // namespace mlx_cai
