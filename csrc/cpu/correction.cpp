// CPU kernels of residual_correction, gaussian_log_prob and sample_correction (the
// PPO-side ops), forward and backward. Semantics: docs/ops.md.
//
// Work is split into blocks of spatial positions whose size depends on the shape only
// (never on the thread count) and per-block partial sums are added in block order, so
// every result is bitwise reproducible whatever at::get_num_threads() says.
//
// Memory layout matters more than arithmetic here: these ops are a few flops per
// element over tensors far larger than the caches. A block walks each channel's
// stretch of positions in turn (long contiguous runs, like one flat pass over the
// tensor) while the block's LAM row (at most kBlockMax floats) stays in L2 across
// channels; the first channel writes the LAM instead of adding to zeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "checks.h"
#include "cpu/buffer_cache.h"
#include "cpu/simd.h"

namespace xlard {
namespace {

using checks::acc_dtype;
using checks::alpha_tensor;
using checks::check_latent;
using checks::check_log_std;
using checks::check_out;
using checks::check_sample_inputs;
using checks::check_same;
using checks::is_float_type;
using checks::lam_shape;
using checks::row_constant_values;

constexpr int64_t kBlock = 4096;      // row_sums block (reductions over a flat row)
constexpr int64_t kBlockMin = 4096;   // smallest block of spatial positions
constexpr int64_t kBlockMax = 65536;  // largest: its float32 LAM row is 256 KiB, L2-resident
constexpr int64_t kMinTasks = 8;      // split blocks (down to kBlockMin) until there are this many
// Streaming stores only for outputs of at least this many bytes each: a smaller result is
// likely still in cache when the next op reads it, and streaming would push it to memory.
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;
constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 * pi)

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Positions per block: a function of the shape only, so results never depend on the
// thread count. Whole spatial rows (up to kBlockMax) when the batch gives enough tasks.
inline int64_t block_size(int64_t batch, int64_t spatial) {
  int64_t blk = std::min(spatial, kBlockMax);
  while ((blk + 1) / 2 >= kBlockMin && batch * ((spatial + blk - 1) / blk) < kMinTasks) blk = (blk + 1) / 2;
  return std::max<int64_t>(blk, 1);
}

// Runs fn(b, blk, s_begin, s_end) over the blocks of spatial positions of every batch item.
template <typename Fn>
void for_blocks(int64_t batch, int64_t spatial, int64_t block, Fn fn) {
  const int64_t blocks = (spatial + block - 1) / block;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, blk = t % blocks;
      fn(b, blk, blk * block, std::min(spatial, (blk + 1) * block));
    }
  });
}

// One channel row of residual_correction over positions [s0, s1), scalar; the first
// channel writes the LAM, the others add to it. float32 rows go through the vector
// kernels of simd.h (correct_row_f32), which use this for their ragged ends.
template <bool First, typename T, typename A>
void correct_row(const T* __restrict__ z0, const T* __restrict__ delta, A alpha, T* __restrict__ zc,
                 A* __restrict__ lam, int64_t s0, int64_t s1) {
#pragma omp simd
  for (int64_t s = s0; s < s1; ++s) {
    const A d = static_cast<A>(delta[s]);
    zc[s] = static_cast<T>(static_cast<A>(z0[s]) + alpha * d);
    if constexpr (First) {
      lam[s] = std::abs(d);
    } else {
      lam[s] += std::abs(d);
    }
  }
}

// The vector kernels at the level in use (XLARD_CPU_ISA can cap it; a bad value is an error).
const simd::RowKernels& active_rows(const char* op) {
  std::string error;
  const simd::Isa isa = simd::active_isa(&error);
  TORCH_CHECK_VALUE(error.empty(), "xlard.", op, ": ", error);
  return simd::row_kernels(isa);
}

// Positions [s0, s1) of a row whose position 0 has flat index `row0` in the tensor, split
// for the vector kernels: a scalar head up to the next flat index that is a multiple of
// 16 (a 64-byte boundary in a 64-byte aligned buffer, where streaming stores may start),
// `n` vector positions, a scalar tail. The split depends on the shape only, never on
// where the buffers are, so sums come out bitwise the same for any out= buffer.
struct Span {
  int64_t head, n;
};

inline Span vector_span(const simd::RowKernels& k, int64_t row0, int64_t s0, int64_t s1) {
  const int64_t head = std::min(s1, s0 + (16 - (row0 + s0) % 16) % 16);
  return {head, (s1 - head) / k.width * k.width};
}

// Streaming stores need 64-byte aligned vectors: only when every streamed buffer starts on
// a 64-byte boundary (torch's own allocations always do; a sliced out= buffer may not).
inline bool aligned64(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 63u) == 0; }

template <bool First>
void correct_row_f32(const simd::RowKernels& k, const float* z0, const float* delta, float alpha, float* zc,
                     float* lam, int64_t row0, int64_t s0, int64_t s1, bool stream) {
  const Span sp = vector_span(k, row0, s0, s1);
  correct_row<First, float, float>(z0, delta, alpha, zc, lam, s0, sp.head);
  if (sp.n > 0) {
    k.correct(z0 + sp.head, delta + sp.head, alpha, zc + sp.head, lam + sp.head, sp.n, First, stream);
  }
  correct_row<First, float, float>(z0, delta, alpha, zc, lam, sp.head + sp.n, s1);
}

// All channels of one block of residual_correction.
template <typename T, typename A>
void correct_block(const simd::RowKernels& k, const T* z0, const T* delta, A alpha, T* zc, A* lam, int64_t row0,
                   int64_t channels, int64_t spatial, int64_t s0, int64_t s1, bool stream) {
  // row0: flat index of the block's first channel row.
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t off = c * spatial;
    if constexpr (std::is_same_v<T, float>) {
      (c == 0 ? correct_row_f32<true> : correct_row_f32<false>)(k, z0 + off, delta + off, alpha, zc + off, lam,
                                                                row0 + off, s0, s1, stream);
    } else {
      (c == 0 ? correct_row<true, T, A> : correct_row<false, T, A>)(z0 + off, delta + off, alpha, zc + off, lam, s0, s1);
    }
  }
}

// residual_correction into contiguous outputs zc, lam (checked by the callers).
void residual_correction_into(const at::Tensor& z0_in, const at::Tensor& delta_in,
                              const std::optional<at::Tensor>& alpha_in, double alpha_scalar, at::Tensor& zc,
                              at::Tensor& lam) {
  const auto acc = acc_dtype(z0_in.scalar_type());
  const at::Tensor z0 = z0_in.contiguous(), delta = delta_in.contiguous();
  const int64_t batch = z0.size(0), channels = z0.size(1);
  const at::Tensor alpha = alpha_tensor("residual_correction", alpha_in, z0, acc);
  if (z0.numel() == 0) {  // C == 0 still gives a (zero) map per spatial position
    lam.zero_();
    return;
  }
  const int64_t spatial = z0.numel() / (batch * channels);
  const bool stream = z0.nbytes() >= kStreamMinBytes && z0.scalar_type() == at::kFloat &&
                      aligned64(zc.const_data_ptr());
  const simd::RowKernels* rows = &active_rows("residual_correction");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "xlard_residual_correction", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* zp = z0.const_data_ptr<scalar_t>();
    const scalar_t* dp = delta.const_data_ptr<scalar_t>();
    const A* ap = alpha.defined() ? alpha.const_data_ptr<A>() : nullptr;
    scalar_t* op = zc.data_ptr<scalar_t>();
    A* lp = lam.data_ptr<A>();
    for_blocks(batch, spatial, block_size(batch, spatial), [&](int64_t b, int64_t, int64_t s0, int64_t s1) {
      const A a = ap ? ap[b] : static_cast<A>(alpha_scalar);
      A* lrow = lp + b * spatial;
      const int64_t off = b * channels * spatial;
      correct_block<scalar_t, A>(*rows, zp + off, dp + off, a, op + off, lrow, off, channels, spatial, s0, s1, stream);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> residual_correction_cpu(const at::Tensor& z0, const at::Tensor& delta,
                                                           const std::optional<at::Tensor>& alpha,
                                                           double alpha_scalar) {
  check_latent("residual_correction", "z0", z0);
  check_same("residual_correction", "delta", delta, "z0", z0);
  const char* op = "residual_correction";
  at::Tensor zc = buffer_cache::empty(z0.sizes(), z0.scalar_type(), op);
  at::Tensor lam = buffer_cache::empty(lam_shape(z0), acc_dtype(z0.scalar_type()), op);
  residual_correction_into(z0, delta, alpha, alpha_scalar, zc, lam);
  return {zc, lam};
}

void residual_correction_out_cpu(const at::Tensor& z0, const at::Tensor& delta, const std::optional<at::Tensor>& alpha,
                                 double alpha_scalar, at::Tensor& zc, at::Tensor& lam) {
  const char* op = "residual_correction";
  check_latent(op, "z0", z0);
  check_same(op, "delta", delta, "z0", z0);
  check_out(op, "zc", zc, z0.sizes(), z0.scalar_type(), z0, {{"z0", &z0}, {"delta", &delta}, {"lam", &lam}});
  check_out(op, "lam", lam, lam_shape(z0), acc_dtype(z0.scalar_type()), z0, {{"z0", &z0}, {"delta", &delta}});
  residual_correction_into(z0, delta, alpha, alpha_scalar, zc, lam);
}

at::Tensor residual_correction_backward_cpu(const at::Tensor& grad_zc_in, const at::Tensor& grad_lam_in,
                                            const at::Tensor& delta_in, const std::optional<at::Tensor>& alpha_in,
                                            double alpha_scalar) {
  check_latent("_residual_correction_backward", "delta", delta_in);
  TORCH_CHECK(grad_zc_in.sizes() == delta_in.sizes(), "xlard._residual_correction_backward: grad_zc must have shape ",
              delta_in.sizes(), ", got ", grad_zc_in.sizes());
  const auto acc = acc_dtype(delta_in.scalar_type());
  TORCH_CHECK(grad_lam_in.sizes().vec() == lam_shape(delta_in),
              "xlard._residual_correction_backward: grad_lam must have shape [B, *spatial], got ", grad_lam_in.sizes());
  const at::Tensor delta = delta_in.contiguous();
  const at::Tensor gz = grad_zc_in.to(delta.scalar_type()).contiguous();
  const at::Tensor gl = grad_lam_in.to(acc).contiguous();
  const int64_t batch = delta.size(0), channels = delta.size(1);
  const at::Tensor alpha = alpha_tensor("_residual_correction_backward", alpha_in, delta, acc);
  at::Tensor out = buffer_cache::empty(delta.sizes(), delta.scalar_type(), "_residual_correction_backward");
  if (out.numel() == 0) return out;
  const int64_t spatial = delta.numel() / (batch * channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "xlard_residual_correction_bwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* dp = delta.const_data_ptr<scalar_t>();
    const scalar_t* gzp = gz.const_data_ptr<scalar_t>();
    const A* glp = gl.const_data_ptr<A>();
    const A* ap = alpha.defined() ? alpha.const_data_ptr<A>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    for_blocks(batch, spatial, block_size(batch, spatial), [&](int64_t b, int64_t, int64_t s0, int64_t s1) {
      const A a = ap ? ap[b] : static_cast<A>(alpha_scalar);
      const A* glrow = glp + b * spatial;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t off = (b * channels + c) * spatial;
        for (int64_t s = s0; s < s1; ++s) {
          const A d = static_cast<A>(dp[off + s]);
          const A sign = static_cast<A>((d > A(0)) - (d < A(0)));
          op[off + s] = static_cast<scalar_t>(a * static_cast<A>(gzp[off + s]) + glrow[s] * sign);
        }
      }
    });
  });
  return out;
}

// Deterministic per-row sums of f(b, k) over k in [0, n): fixed blocks, block order.
template <typename A, typename F>
void row_sums(int64_t batch, int64_t n, A* out, F f) {
  const int64_t blocks = std::max<int64_t>(1, (n + kBlock - 1) / kBlock);
  std::vector<A> partial(static_cast<size_t>(batch * blocks), A(0));
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, blk = t % blocks;
      const int64_t k1 = std::min(n, (blk + 1) * kBlock);
      A acc = A(0);
      for (int64_t k = blk * kBlock; k < k1; ++k) acc += f(b, k);
      partial[t] = acc;
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    A acc = A(0);
    for (int64_t blk = 0; blk < blocks; ++blk) acc += partial[b * blocks + blk];
    out[b] = acc;
  }
}

at::Tensor gaussian_log_prob_cpu(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& log_std_in) {
  TORCH_CHECK(x_in.dim() >= 1, "xlard.gaussian_log_prob: x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(is_float_type(x_in.scalar_type()), "xlard.gaussian_log_prob: x must be floating, got ",
              x_in.scalar_type());
  check_same("gaussian_log_prob", "mean", mean_in, "x", x_in);
  const bool shared = check_log_std("gaussian_log_prob", log_std_in, x_in);
  const auto acc = acc_dtype(x_in.scalar_type());
  const int64_t batch = x_in.size(0);
  const int64_t n = batch == 0 ? 0 : x_in.numel() / batch;
  at::Tensor out = at::empty({batch}, x_in.options().dtype(acc));
  if (batch == 0) return out;
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor ls = log_std_in.to(acc).contiguous();
  const at::Tensor inv_std = at::exp(-ls);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xlard_gaussian_log_prob", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const A* lp = ls.const_data_ptr<A>();
    const A* ip = inv_std.const_data_ptr<A>();
    const int64_t ls_stride = shared ? 0 : n;
    row_sums<A>(batch, n, out.data_ptr<A>(), [&](int64_t b, int64_t k) {
      const A l = lp[b * ls_stride + k];
      const A z = (static_cast<A>(xp[b * n + k]) - static_cast<A>(mp[b * n + k])) * ip[b * ls_stride + k];
      return A(-0.5) * z * z - l - static_cast<A>(kHalfLog2Pi);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward_cpu(const at::Tensor& grad_in,
                                                                              const at::Tensor& x_in,
                                                                              const at::Tensor& mean_in,
                                                                              const at::Tensor& log_std_in) {
  check_same("_gaussian_log_prob_backward", "mean", mean_in, "x", x_in);
  const bool shared = check_log_std("_gaussian_log_prob_backward", log_std_in, x_in);
  const auto acc = acc_dtype(x_in.scalar_type());
  const int64_t batch = x_in.size(0);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == batch,
              "xlard._gaussian_log_prob_backward: grad must have shape [B] = [", batch, "], got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor ls = log_std_in.to(acc).contiguous();
  const at::Tensor g = grad_in.to(acc).contiguous();
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gm = at::empty(x.sizes(), x.options());
  at::Tensor gls = at::empty(ls.sizes(), ls.options());
  const int64_t n = batch == 0 ? 0 : x.numel() / batch;
  if (n == 0 || batch == 0) {
    gls.zero_();
    return {gx, gm, gls.to(log_std_in.scalar_type())};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xlard_gaussian_log_prob_bwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const A* lp = ls.const_data_ptr<A>();
    const A* gp = g.const_data_ptr<A>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gmp = gm.data_ptr<scalar_t>();
    A* glp = gls.data_ptr<A>();
    // Parallel over positions k; the batch is reduced inside in order, so shared
    // log_std gradients are deterministic.
    at::parallel_for(0, n, kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        A shared_acc = A(0);
        for (int64_t b = 0; b < batch; ++b) {
          const A l = lp[(shared ? 0 : b * n) + k];
          const A inv_var = std::exp(A(-2) * l);
          const A diff = static_cast<A>(xp[b * n + k]) - static_cast<A>(mp[b * n + k]);
          const A dx = -gp[b] * diff * inv_var;
          gxp[b * n + k] = static_cast<scalar_t>(dx);
          gmp[b * n + k] = static_cast<scalar_t>(-dx);
          const A dl = gp[b] * (diff * diff * inv_var - A(1));
          if (shared) {
            shared_acc += dl;
          } else {
            glp[b * n + k] = dl;
          }
        }
        if (shared) glp[k] = shared_acc;
      }
    });
  });
  return {gx, gm, gls.to(log_std_in.scalar_type())};
}

// One channel row of sample_correction over positions [s0, s1), scalar; returns its
// log-density part sum(-0.5 noise^2) (the log_std sum is added per row). ConstStd: one
// standard deviation for the whole row (per-channel log_std), read from stdv[0]. The
// first channel writes the LAM, the others add to it. float32 rows go through the
// vector kernels of simd.h (sample_row_f32), which use this for their ragged ends.
template <bool First, bool ConstStd, typename T, typename A>
A sample_row(const T* __restrict__ z0, const T* __restrict__ mean, const T* __restrict__ noise,
             const A* __restrict__ stdv, A alpha, T* __restrict__ zc, T* __restrict__ delta, A* __restrict__ lam,
             int64_t s0, int64_t s1) {
  A acc = A(0);
  const A sd0 = stdv[0];
#pragma omp simd reduction(+ : acc)
  for (int64_t s = s0; s < s1; ++s) {
    const A e = static_cast<A>(noise[s]);
    const A sd = ConstStd ? sd0 : stdv[s];
    const T d = static_cast<T>(static_cast<A>(mean[s]) + sd * e);
    delta[s] = d;
    zc[s] = static_cast<T>(static_cast<A>(z0[s]) + alpha * static_cast<A>(d));
    if constexpr (First) {
      lam[s] = std::abs(static_cast<A>(d));
    } else {
      lam[s] += std::abs(static_cast<A>(d));
    }
    acc += A(-0.5) * e * e;
  }
  return acc;
}

template <bool First, bool ConstStd>
float sample_row_f32(const simd::RowKernels& k, const float* z0, const float* mean, const float* noise,
                     const float* stdv, float alpha, float* zc, float* delta, float* lam, int64_t row0, int64_t s0,
                     int64_t s1, bool stream) {
  const Span sp = vector_span(k, row0, s0, s1);
  float acc = sample_row<First, ConstStd, float, float>(z0, mean, noise, stdv, alpha, zc, delta, lam, s0, sp.head);
  if (sp.n > 0) {
    const int64_t h = sp.head;
    acc += k.sample(z0 + h, mean + h, noise + h, ConstStd ? stdv : stdv + h, ConstStd, alpha, zc + h, delta + h,
                    lam + h, sp.n, First, stream);
  }
  return acc + sample_row<First, ConstStd, float, float>(z0, mean, noise, stdv, alpha, zc, delta, lam, sp.head + sp.n,
                                                         s1);
}

// All channels of one block of sample_correction; returns the block's sum(-0.5 noise^2)
// (rows summed in double: a block holds up to channels * kBlockMax terms).
template <bool ConstStd, typename T, typename A>
double sample_block(const simd::RowKernels& k, const T* z0, const T* mean, const T* noise, const A* stdv,
                    int64_t std_stride, A alpha, T* zc, T* delta, A* lam, int64_t row0, int64_t channels,
                    int64_t spatial, int64_t s0, int64_t s1, bool stream) {
  // stdv + c * std_stride: channel c's value (ConstStd, stride 1) or its row of positions (stride spatial).
  // row0: flat index of the block's first channel row.
  double acc = 0.0;
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t off = c * spatial;
    const A* sd = stdv + c * std_stride;
    if constexpr (std::is_same_v<T, float>) {
      acc += (c == 0 ? sample_row_f32<true, ConstStd> : sample_row_f32<false, ConstStd>)(
          k, z0 + off, mean + off, noise + off, sd, alpha, zc + off, delta + off, lam, row0 + off, s0, s1, stream);
    } else {
      acc += (c == 0 ? sample_row<true, ConstStd, T, A> : sample_row<false, ConstStd, T, A>)(
          z0 + off, mean + off, noise + off, sd, alpha, zc + off, delta + off, lam, s0, s1);
    }
  }
  return acc;
}

// sample_correction into contiguous outputs (checked by the callers).
void sample_correction_into(const at::Tensor& z0_in, const at::Tensor& mean_in, const at::Tensor& log_std_in,
                            const at::Tensor& noise_in, const std::optional<at::Tensor>& alpha_in, double alpha_scalar,
                            at::Tensor& zc, at::Tensor& delta, at::Tensor& log_prob, at::Tensor& lam) {
  const bool shared = check_log_std("sample_correction", log_std_in, z0_in);
  const auto acc = acc_dtype(z0_in.scalar_type());
  const at::Tensor z0 = z0_in.contiguous(), mean = mean_in.contiguous(), noise = noise_in.contiguous();
  // Per-channel log_std (the common policy) stays a [C] (or [B, C]) vector: no
  // materialised [C, H, W] copy, one exp per channel.
  const at::Tensor row_ls = z0.numel() == 0 ? at::Tensor() : row_constant_values(log_std_in, shared ? 1 : 2);
  const bool per_row = row_ls.defined();
  const at::Tensor ls = (per_row ? row_ls : log_std_in).to(acc).contiguous();
  const at::Tensor stdv = at::exp(ls);  // once per log_std element, not per batch item
  const int64_t batch = z0.size(0), channels = z0.size(1);
  const at::Tensor alpha = alpha_tensor("sample_correction", alpha_in, z0, acc);
  if (z0.numel() == 0) {  // C == 0 still gives a (zero) map per spatial position
    log_prob.zero_();
    lam.zero_();
    return;
  }
  const int64_t spatial = z0.numel() / (batch * channels);
  const int64_t n = channels * spatial;
  const int64_t block = block_size(batch, spatial);
  const int64_t blocks = (spatial + block - 1) / block;
  const bool stream = z0.nbytes() >= kStreamMinBytes && z0.scalar_type() == at::kFloat && aligned64(zc.const_data_ptr()) &&
                      aligned64(delta.const_data_ptr());
  const simd::RowKernels* rows = &active_rows("sample_correction");
  std::vector<double> partial(static_cast<size_t>(batch * blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "xlard_sample_correction", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* zp = z0.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* np_ = noise.const_data_ptr<scalar_t>();
    const A* lp = ls.const_data_ptr<A>();
    const A* sdp = stdv.const_data_ptr<A>();
    const A* ap = alpha.defined() ? alpha.const_data_ptr<A>() : nullptr;
    scalar_t* zcp = zc.data_ptr<scalar_t>();
    scalar_t* dp = delta.data_ptr<scalar_t>();
    A* lamp = lam.data_ptr<A>();
    for_blocks(batch, spatial, block, [&](int64_t b, int64_t blk, int64_t s0, int64_t s1) {
      const A a = ap ? ap[b] : static_cast<A>(alpha_scalar);
      const int64_t off = b * n;
      A* lrow = lamp + b * spatial;
      partial[b * blocks + blk] =
          per_row ? sample_block<true, scalar_t, A>(*rows, zp + off, mp + off, np_ + off, sdp + (shared ? 0 : b * channels),
                                                    1, a, zcp + off, dp + off, lrow, off, channels, spatial, s0, s1, stream)
                  : sample_block<false, scalar_t, A>(*rows, zp + off, mp + off, np_ + off, sdp + (shared ? 0 : off),
                                                     spatial, a, zcp + off, dp + off, lrow, off, channels, spatial, s0, s1,
                                                     stream);
    });
    std::vector<A> ls_sum(static_cast<size_t>(shared ? 1 : batch));
    if (per_row) {  // each channel's log_std counts once per spatial position
      for (int64_t b = 0; b < (shared ? 1 : batch); ++b) {
        A total = A(0);
        for (int64_t c = 0; c < channels; ++c) total += lp[b * channels + c];
        ls_sum[b] = total * static_cast<A>(spatial);
      }
    } else {
      row_sums<A>(shared ? 1 : batch, n, ls_sum.data(), [&](int64_t b, int64_t k) { return lp[b * n + k]; });
    }
    A* lpp = log_prob.data_ptr<A>();
    for (int64_t b = 0; b < batch; ++b) {
      double total = 0.0;
      for (int64_t blk = 0; blk < blocks; ++blk) total += partial[b * blocks + blk];
      lpp[b] = static_cast<A>(total) - ls_sum[shared ? 0 : b] - static_cast<A>(kHalfLog2Pi) * static_cast<A>(n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_correction_cpu(
    const at::Tensor& z0, const at::Tensor& mean, const at::Tensor& log_std, const at::Tensor& noise,
    const std::optional<at::Tensor>& alpha, double alpha_scalar) {
  const char* op = "sample_correction";
  check_sample_inputs(op, z0, mean, noise);
  const auto acc = acc_dtype(z0.scalar_type());
  at::Tensor zc = buffer_cache::empty(z0.sizes(), z0.scalar_type(), op);
  at::Tensor delta = buffer_cache::empty(z0.sizes(), z0.scalar_type(), op);
  at::Tensor log_prob = at::empty({z0.size(0)}, z0.options().dtype(acc));
  at::Tensor lam = buffer_cache::empty(lam_shape(z0), acc, op);
  sample_correction_into(z0, mean, log_std, noise, alpha, alpha_scalar, zc, delta, log_prob, lam);
  return {zc, delta, log_prob, lam};
}

void sample_correction_out_cpu(
    const at::Tensor& z0, const at::Tensor& mean, const at::Tensor& log_std, const at::Tensor& noise,
    const std::optional<at::Tensor>& alpha, double alpha_scalar, at::Tensor& zc, at::Tensor& delta,
    at::Tensor& log_prob, at::Tensor& lam) {
  const char* op = "sample_correction";
  check_sample_inputs(op, z0, mean, noise);
  const auto acc = acc_dtype(z0.scalar_type());
  const std::pair<const char*, const at::Tensor*> zin{"z0", &z0}, mnin{"mean", &mean}, nin{"noise", &noise},
      lin{"log_std", &log_std};
  check_out(op, "zc", zc, z0.sizes(), z0.scalar_type(), z0,
            {zin, mnin, nin, lin, {"delta", &delta}, {"log_prob", &log_prob}, {"lam", &lam}});
  check_out(op, "delta", delta, z0.sizes(), z0.scalar_type(), z0,
            {zin, mnin, nin, lin, {"log_prob", &log_prob}, {"lam", &lam}});
  check_out(op, "log_prob", log_prob, {z0.size(0)}, acc, z0, {zin, mnin, nin, lin, {"lam", &lam}});
  check_out(op, "lam", lam, lam_shape(z0), acc, z0, {zin, mnin, nin, lin});
  sample_correction_into(z0, mean, log_std, noise, alpha, alpha_scalar, zc, delta, log_prob, lam);
}

void set_cpu_env(const std::optional<std::string>& isa, const std::optional<std::string>& cache_mb) {
  simd::set_isa_cap(isa ? isa->c_str() : nullptr);
  buffer_cache::set_limit_text(cache_mb ? cache_mb->c_str() : nullptr);
}

std::string cpu_isa() {
  std::string error;
  const simd::Isa isa = simd::active_isa(&error);
  TORCH_CHECK_VALUE(error.empty(), "xlard._cpu_isa: ", error);
  return simd::isa_name(isa);
}

}  // namespace

// No tensor arguments, so no backend key: one kernel for every device.
TORCH_LIBRARY_IMPL(xlard, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", &cpu_isa);
  m.impl("_set_cpu_env", &set_cpu_env);
}

TORCH_LIBRARY_IMPL(xlard, CPU, m) {
  m.impl("residual_correction", &residual_correction_cpu);
  m.impl("_residual_correction_backward", &residual_correction_backward_cpu);
  m.impl("gaussian_log_prob", &gaussian_log_prob_cpu);
  m.impl("_gaussian_log_prob_backward", &gaussian_log_prob_backward_cpu);
  m.impl("sample_correction", &sample_correction_cpu);
  m.impl("residual_correction.out", &residual_correction_out_cpu);
  m.impl("sample_correction.out", &sample_correction_out_cpu);
}

}  // namespace xlard
