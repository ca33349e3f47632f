// CUDA provider of attention_centroids, position_scores, color_scores,
// residual_correction, gaussian_log_prob and sample_correction (forward and backward):
// the same argument checks and output dtypes as the CPU kernels in csrc/cpu, then one
// launcher call per kernel on the current stream, each followed by
// C10_CUDA_KERNEL_LAUNCH_CHECK(). Inputs are made contiguous (a copy only for strided
// views); small side inputs (alpha, log_std, grads, color tables) are converted to the
// accumulation dtype first, as the CPU kernels do. Semantics: docs/ops.md.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "host_common.h"

namespace xlard {
namespace {

using cuda_host::acc_dtype;
using cuda_host::check_cuda;
using cuda_host::check_same_device;
using cuda_host::current_stream;
using cuda_host::is_float_type;
using cuda_host::kind_of;
using checks::centroid_shape;
using checks::check_relations;
using checks::check_same;
using checks::check_sample_inputs;
using checks::lam_shape;
using checks::RelationLayout;
using checks::row_constant_values;

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 * pi)

// ---- attention_centroids -----------------------------------------------------------

void check_maps(const char* op, const at::Tensor& maps) {
  check_cuda(op, "maps", maps);
  checks::check_float_maps(op, maps);
}

at::Tensor attention_centroids_cuda(const at::Tensor& maps_in) {
  check_maps("attention_centroids", maps_in);
  const c10::cuda::CUDAGuard guard(maps_in.device());
  const at::Tensor maps = maps_in.contiguous();
  at::Tensor out = at::empty(centroid_shape(maps), maps.options().dtype(acc_dtype(maps.scalar_type())));
  const int64_t num_maps = out.numel() / 2, h = maps.size(-2), w = maps.size(-1);
  if (num_maps == 0) return out;
  if (h * w == 0) return out.fill_(0.5);  // no weight anywhere
  TORCH_CHECK(num_maps <= std::numeric_limits<int32_t>::max(), "xlard.attention_centroids: too many maps");
  cuda::launch_attention_centroids(kind_of(maps.scalar_type()), maps.const_data_ptr(), num_maps, h, w,
                                   out.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor attention_centroids_backward_cuda(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                             const at::Tensor& centroids_in) {
  const char* op = "_attention_centroids_backward";
  check_maps(op, maps_in);
  check_same_device(op, "grad", grad_in, "maps", maps_in);
  check_same_device(op, "centroids", centroids_in, "maps", maps_in);
  const c10::cuda::CUDAGuard guard(maps_in.device());
  const auto acc = acc_dtype(maps_in.scalar_type());
  TORCH_CHECK(grad_in.sizes() == centroids_in.sizes() && grad_in.sizes().vec() == centroid_shape(maps_in),
              "xlard._attention_centroids_backward: grad and centroids must have shape maps.shape[:-2] + [2], got ",
              grad_in.sizes(), " and ", centroids_in.sizes());
  const at::Tensor maps = maps_in.contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  const at::Tensor cen = centroids_in.to(acc).contiguous();
  at::Tensor out = at::empty(maps.sizes(), maps.options());
  if (out.numel() == 0) return out;
  const int64_t h = maps.size(-2), w = maps.size(-1), num_maps = maps.numel() / (h * w);
  TORCH_CHECK(num_maps <= std::numeric_limits<int32_t>::max(), "xlard._attention_centroids_backward: too many maps");
  cuda::launch_attention_centroids_backward(kind_of(maps.scalar_type()), grad.const_data_ptr(),
                                            maps.const_data_ptr(), cen.const_data_ptr(), num_maps, h, w,
                                            out.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- position_scores ---------------------------------------------------------------

RelationLayout check_cuda_relations(const char* op, const at::Tensor& centroids, const at::Tensor& relations) {
  check_cuda(op, "centroids", centroids);
  return check_relations(op, centroids, relations);
}

// Index and code ranges are checked on the device (a device-side assertion, like
// torch's own indexing kernels): checking them here would need a host synchronization.
at::Tensor position_scores_cuda(const at::Tensor& centroids_in, const at::Tensor& relations_in, double tau) {
  const RelationLayout L = check_cuda_relations("position_scores", centroids_in, relations_in);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "xlard.position_scores: tau must be a finite number > 0, got ", tau);
  const c10::cuda::CUDAGuard guard(centroids_in.device());
  const auto acc = acc_dtype(centroids_in.scalar_type());
  const at::Tensor cen = centroids_in.to(acc).contiguous();
  const at::Tensor rel = relations_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.relations}, cen.options());
  if (out.numel() == 0) return out;
  cuda::launch_position_scores(acc == at::kDouble, cen.const_data_ptr(), rel.const_data_ptr<int64_t>(),
                               L.rel_batch_stride, L.batch, L.tokens, L.relations, tau, out.data_ptr(),
                               current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor position_scores_backward_cuda(const at::Tensor& grad_in, const at::Tensor& centroids_in,
                                         const at::Tensor& relations_in, double tau) {
  const RelationLayout L = check_cuda_relations("_position_scores_backward", centroids_in, relations_in);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == L.batch && grad_in.size(1) == L.relations,
              "xlard._position_scores_backward: grad must have shape [B, R] = [", L.batch, ", ", L.relations, "], got ",
              grad_in.sizes());
  check_same_device("_position_scores_backward", "grad", grad_in, "centroids", centroids_in);
  const c10::cuda::CUDAGuard guard(centroids_in.device());
  const auto acc = acc_dtype(centroids_in.scalar_type());
  const at::Tensor cen = centroids_in.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  const at::Tensor rel = relations_in.contiguous();
  at::Tensor out = at::zeros({L.batch, L.tokens, 2}, cen.options());
  if (out.numel() == 0 || L.relations == 0) return out.to(centroids_in.scalar_type());
  cuda::launch_position_scores_backward(acc == at::kDouble, grad.const_data_ptr(), cen.const_data_ptr(),
                                        rel.const_data_ptr<int64_t>(), L.rel_batch_stride, L.batch, L.tokens,
                                        L.relations, tau, out.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.to(centroids_in.scalar_type());
}

// ---- color_scores ------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> color_scores_cuda(const at::Tensor& features_in, const at::Tensor& colors_in,
                                                     const std::optional<at::Tensor>& mask_in) {
  const char* op = "color_scores";
  check_cuda(op, "patch_features", features_in);
  const checks::ColorLayout L = checks::check_color_inputs(features_in, colors_in, mask_in);
  const int64_t b = L.batch, n = L.patches, d = L.dim, c = L.colors;
  const bool has_mask = L.has_mask;
  const c10::cuda::CUDAGuard guard(features_in.device());
  const auto acc = L.acc;
  const bool dbl = acc == at::kDouble;
  at::Tensor scores = at::zeros({b, c}, features_in.options().dtype(acc));
  at::Tensor index = at::full({b, c}, -1, features_in.options().dtype(at::kLong));
  if (b == 0 || c == 0 || n == 0) return {scores, index};
  TORCH_CHECK(b * c <= std::numeric_limits<int32_t>::max(), "xlard.color_scores: B * C too large for one launch");
  const at::Tensor f = features_in.to(acc).contiguous();
  const at::Tensor e = colors_in.to(acc).contiguous();
  const at::Tensor mask = has_mask ? mask_in->contiguous() : at::Tensor();
  // Workspace (see launchers.cuh): the scaled colors, per-row max-abs and norms, and the
  // per-split partial maxima; small next to the features.
  const int64_t color_rows = (colors_in.dim() == 3 ? b : 1) * c;
  const auto acc_opts = f.options();
  at::Tensor color_scaled = at::empty({color_rows, d}, acc_opts);
  at::Tensor color_stats = at::empty({color_rows, 2}, acc_opts);
  at::Tensor feature_stats = at::empty({b * n, 2}, acc_opts);
  cuda::ColorScoresWorkspace ws;
  ws.splits = cuda::color_scores_splits(b, n, c);
  at::Tensor part_score = at::empty({b * c, ws.splits}, acc_opts);
  at::Tensor part_index = at::empty({b * c, ws.splits}, index.options());
  ws.color_scaled = color_scaled.data_ptr();
  ws.color_stats = color_stats.data_ptr();
  ws.feature_stats = feature_stats.data_ptr();
  ws.part_score = part_score.data_ptr();
  ws.part_index = part_index.data_ptr<int64_t>();
  cuda::launch_color_scores(dbl, f.const_data_ptr(), e.const_data_ptr(), colors_in.dim() == 3 ? c * d : 0,
                            has_mask ? mask.const_data_ptr<bool>() : nullptr, b, n, c, d, scores.data_ptr(),
                            index.data_ptr<int64_t>(), ws, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, index};
}

// ---- residual_correction -----------------------------------------------------------

void check_latent(const char* op, const char* name, const at::Tensor& t) {
  check_cuda(op, name, t);
  checks::check_latent(op, name, t);
}

using checks::alpha_tensor;

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> residual_correction_cuda(const at::Tensor& z0_in, const at::Tensor& delta_in,
                                                            const std::optional<at::Tensor>& alpha_in,
                                                            double alpha_scalar) {
  const char* op = "residual_correction";
  check_latent(op, "z0", z0_in);
  check_same(op, "delta", delta_in, "z0", z0_in);
  const c10::cuda::CUDAGuard guard(z0_in.device());
  const auto acc = acc_dtype(z0_in.scalar_type());
  const at::Tensor z0 = z0_in.contiguous(), delta = delta_in.contiguous();
  const at::Tensor alpha = alpha_tensor(op, alpha_in, z0, acc);
  at::Tensor zc = at::empty(z0.sizes(), z0.options());
  at::Tensor lam = at::empty(lam_shape(z0), z0.options().dtype(acc));
  if (z0.numel() == 0) {  // C == 0 still gives a (zero) lam per spatial position
    lam.zero_();
    return {zc, lam};
  }
  const int64_t batch = z0.size(0), channels = z0.size(1), spatial = z0.numel() / (batch * channels);
  cuda::launch_residual_correction(kind_of(z0.scalar_type()), z0.const_data_ptr(), delta.const_data_ptr(),
                                   ptr_or_null(alpha), alpha_scalar, batch, channels, spatial, zc.data_ptr(),
                                   lam.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {zc, lam};
}

at::Tensor residual_correction_backward_cuda(const at::Tensor& grad_zc_in, const at::Tensor& grad_lam_in,
                                             const at::Tensor& delta_in, const std::optional<at::Tensor>& alpha_in,
                                             double alpha_scalar) {
  const char* op = "_residual_correction_backward";
  check_latent(op, "delta", delta_in);
  TORCH_CHECK(grad_zc_in.sizes() == delta_in.sizes(), "xlard._residual_correction_backward: grad_zc must have shape ",
              delta_in.sizes(), ", got ", grad_zc_in.sizes());
  TORCH_CHECK(grad_lam_in.sizes().vec() == lam_shape(delta_in),
              "xlard._residual_correction_backward: grad_lam must have shape [B, *spatial], got ", grad_lam_in.sizes());
  check_same_device(op, "grad_zc", grad_zc_in, "delta", delta_in);
  check_same_device(op, "grad_lam", grad_lam_in, "delta", delta_in);
  const c10::cuda::CUDAGuard guard(delta_in.device());
  const auto acc = acc_dtype(delta_in.scalar_type());
  const at::Tensor delta = delta_in.contiguous();
  const at::Tensor gz = grad_zc_in.to(delta.scalar_type()).contiguous();
  const at::Tensor gl = grad_lam_in.to(acc).contiguous();
  const at::Tensor alpha = alpha_tensor(op, alpha_in, delta, acc);
  at::Tensor out = at::empty(delta.sizes(), delta.options());
  if (out.numel() == 0) return out;
  const int64_t batch = delta.size(0), channels = delta.size(1), spatial = delta.numel() / (batch * channels);
  cuda::launch_residual_correction_backward(kind_of(delta.scalar_type()), gz.const_data_ptr(), gl.const_data_ptr(),
                                            delta.const_data_ptr(), ptr_or_null(alpha), alpha_scalar, batch,
                                            channels, spatial, out.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- gaussian_log_prob -------------------------------------------------------------

using checks::check_log_std;

at::Tensor gaussian_log_prob_cuda(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& log_std_in) {
  const char* op = "gaussian_log_prob";
  check_cuda(op, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1, "xlard.gaussian_log_prob: x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(is_float_type(x_in.scalar_type()), "xlard.gaussian_log_prob: x must be floating, got ",
              x_in.scalar_type());
  check_same(op, "mean", mean_in, "x", x_in);
  const bool shared = check_log_std(op, log_std_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = acc_dtype(x_in.scalar_type());
  const int64_t batch = x_in.size(0);
  const int64_t m = batch == 0 ? 0 : x_in.numel() / batch;
  at::Tensor out = at::empty({batch}, x_in.options().dtype(acc));
  if (batch == 0) return out;
  if (m == 0) return out.zero_();
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor ls = log_std_in.to(acc).contiguous();
  const int64_t chunks = cuda::row_chunks(m);
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max() && chunks <= 65535,
              "xlard.gaussian_log_prob: too large for one CUDA launch: B = ", batch, ", x.numel() / B = ", m);
  at::Tensor partials = at::empty({batch, chunks}, out.options());
  const cudaStream_t stream = current_stream();
  cuda::launch_gaussian_log_prob_partials(kind_of(x.scalar_type()), x.const_data_ptr(), mean.const_data_ptr(),
                                          ls.const_data_ptr(), shared, batch, m, partials.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::launch_finish_row_sums(acc == at::kDouble, partials.const_data_ptr(), batch, chunks, -kHalfLog2Pi, m,
                               out.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward_cuda(const at::Tensor& grad_in,
                                                                               const at::Tensor& x_in,
                                                                               const at::Tensor& mean_in,
                                                                               const at::Tensor& log_std_in) {
  const char* op = "_gaussian_log_prob_backward";
  check_cuda(op, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1, "xlard._gaussian_log_prob_backward: x must have a batch dimension");
  TORCH_CHECK(is_float_type(x_in.scalar_type()), "xlard._gaussian_log_prob_backward: x must be floating, got ",
              x_in.scalar_type());
  check_same(op, "mean", mean_in, "x", x_in);
  const bool shared = check_log_std(op, log_std_in, x_in);
  const int64_t batch = x_in.size(0);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == batch,
              "xlard._gaussian_log_prob_backward: grad must have shape [B] = [", batch, "], got ", grad_in.sizes());
  check_same_device(op, "grad", grad_in, "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = acc_dtype(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor ls = log_std_in.to(acc).contiguous();
  const at::Tensor g = grad_in.to(acc).contiguous();
  at::Tensor gx = at::empty(x.sizes(), x.options());
  at::Tensor gm = at::empty(x.sizes(), x.options());
  at::Tensor gls = at::empty(ls.sizes(), ls.options());
  const int64_t m = batch == 0 ? 0 : x.numel() / batch;
  if (m == 0 || batch == 0) {
    gls.zero_();
    return {gx, gm, gls.to(log_std_in.scalar_type())};
  }
  const int64_t chunks = cuda::gaussian_backward_chunks(batch, m);
  TORCH_CHECK(chunks * m <= (int64_t(1) << 40), "xlard._gaussian_log_prob_backward: too large: B = ", batch,
              ", x.numel() / B = ", m);
  // Partial sums over chunks of the batch (deterministic order), only for a shared log_std.
  at::Tensor partials = shared && chunks > 1 ? at::empty({m, chunks}, gls.options()) : at::Tensor();
  cuda::launch_gaussian_log_prob_backward(kind_of(x.scalar_type()), g.const_data_ptr(), x.const_data_ptr(),
                                          mean.const_data_ptr(), ls.const_data_ptr(), shared, batch, m,
                                          gx.data_ptr(), gm.data_ptr(), gls.data_ptr(),
                                          partials.defined() ? partials.data_ptr() : nullptr, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gm, gls.to(log_std_in.scalar_type())};
}

// ---- sample_correction -------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_correction_cuda(
    const at::Tensor& z0_in, const at::Tensor& mean_in, const at::Tensor& log_std_in, const at::Tensor& noise_in,
    const std::optional<at::Tensor>& alpha_in, double alpha_scalar) {
  const char* op = "sample_correction";
  check_cuda(op, "z0", z0_in);
  check_sample_inputs(op, z0_in, mean_in, noise_in);
  const bool shared = check_log_std(op, log_std_in, z0_in);
  const c10::cuda::CUDAGuard guard(z0_in.device());
  const auto acc = acc_dtype(z0_in.scalar_type());
  const at::Tensor z0 = z0_in.contiguous(), mean = mean_in.contiguous(), noise = noise_in.contiguous();
  const at::Tensor alpha = alpha_tensor(op, alpha_in, z0, acc);
  const int64_t batch = z0.size(0), channels = z0.size(1);
  // A per-channel log_std (an expanded [C, 1, ...] or [B, C, 1, ...] view, the common
  // policy) is read as its [C] / [B, C] values, never materialised; as on the CPU.
  const int64_t spatial_dims_from = shared ? 1 : 2;
  at::Tensor rows = z0.numel() == 0 ? at::Tensor() : row_constant_values(log_std_in, spatial_dims_from);
  const bool per_row = rows.defined();
  const at::Tensor ls = (per_row ? rows : log_std_in).to(acc).contiguous();
  at::Tensor zc = at::empty(z0.sizes(), z0.options());
  at::Tensor delta = at::empty(z0.sizes(), z0.options());
  at::Tensor log_prob = at::empty({batch}, z0.options().dtype(acc));
  at::Tensor lam = at::empty(lam_shape(z0), z0.options().dtype(acc));
  if (z0.numel() == 0) {  // sums over nothing
    log_prob.zero_();
    lam.zero_();
    return {zc, delta, log_prob, lam};
  }
  const int64_t spatial = z0.numel() / (batch * channels);
  const int64_t chunks = cuda::sample_correction_chunks(channels, spatial);
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max() && chunks <= 65535,
              "xlard.sample_correction: too large for one CUDA launch: B = ", batch, ", spatial size ", spatial);
  at::Tensor partials = at::empty({batch, chunks}, log_prob.options());
  const cudaStream_t stream = current_stream();
  const int64_t ls_batch_stride = shared ? 0 : (per_row ? channels : channels * spatial);
  const int64_t ls_channel_stride = per_row ? 1 : spatial;
  const int64_t ls_spatial_stride = per_row ? 0 : 1;
  cuda::launch_sample_correction(kind_of(z0.scalar_type()), z0.const_data_ptr(), mean.const_data_ptr(),
                                 ls.const_data_ptr(), noise.const_data_ptr(), ls_batch_stride, ls_channel_stride,
                                 ls_spatial_stride, ptr_or_null(alpha), alpha_scalar, batch, channels, spatial,
                                 zc.data_ptr(), delta.data_ptr(), lam.data_ptr(), partials.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::launch_finish_row_sums(acc == at::kDouble, partials.const_data_ptr(), batch, chunks, -kHalfLog2Pi,
                               channels * spatial, log_prob.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {zc, delta, log_prob, lam};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlard, CUDA, m) {
  m.impl("attention_centroids", &attention_centroids_cuda);
  m.impl("_attention_centroids_backward", &attention_centroids_backward_cuda);
  m.impl("position_scores", &position_scores_cuda);
  m.impl("_position_scores_backward", &position_scores_backward_cuda);
  m.impl("color_scores", &color_scores_cuda);
  m.impl("residual_correction", &residual_correction_cuda);
  m.impl("_residual_correction_backward", &residual_correction_backward_cuda);
  m.impl("gaussian_log_prob", &gaussian_log_prob_cuda);
  m.impl("_gaussian_log_prob_backward", &gaussian_log_prob_backward_cuda);
  m.impl("sample_correction", &sample_correction_cuda);
}

}  // namespace xlard
