// The torch-free launcher API of xlard's CUDA kernels: raw device pointers, sizes and a
// stream. The kernels live in csrc/cuda/*.cu (compiled by nvcc without torch headers);
// the torch-facing glue (checks, allocation, dispatch registration) lives in
// csrc/cuda/*_host.cpp. Every launcher enqueues its kernels (one, or a short fixed
// sequence) on `stream` and returns; the host checks the launches with
// C10_CUDA_KERNEL_LAUNCH_CHECK() right after the call.
// Semantics of every op: docs/ops.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define XLARD_HOST_DEVICE __host__ __device__
#else
#define XLARD_HOST_DEVICE
#endif

namespace xlard {
namespace cuda {

// Element types a launcher can read. Bool maps are read as kByte (one byte, 0 or 1).
enum class Kind : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3, kByte = 4 };

// ---------------------------------------------------------------------------------
// Connected components (label_components, count_components, component_stats).
// ---------------------------------------------------------------------------------

// Same numbering as xlard::core::Mode in csrc/core/components.h.
enum class ThresholdMode : int { kAbsolute = 0, kRelative = 1, kOtsu = 2 };

struct ComponentsParams {
  const void* maps = nullptr;  // [num_maps, height, width], contiguous
  int64_t num_maps = 0;
  int height = 0;
  int width = 0;
  ThresholdMode mode = ThresholdMode::kAbsolute;  // ignored for kByte maps (foreground = value != 0)
  float threshold_f = 0.f;    // acc(threshold) for half/bfloat16/float maps (rounded on the host)
  double threshold_d = 0.0;   // acc(threshold) for double maps
  int min_area = 1;
  int connectivity = 4;
  int32_t* labels = nullptr;  // [num_maps, height, width] or null (labels not wanted)
  int32_t* counts = nullptr;  // [num_maps], always written
  int max_components = 0;     // K > 0: write areas/centroids (component_stats)
  int32_t* areas = nullptr;   // [num_maps, K]
  float* centroids = nullptr;  // [num_maps, K, 2]
  // Global-memory path (a map too big for shared memory): per-map scratch, else null.
  int32_t* scratch_parent = nullptr;  // [num_maps, height * width]
  uint32_t* scratch_bits = nullptr;   // [num_maps, height * words_per_row(width)]
};

// 32-bit words holding one row of foreground bits.
XLARD_HOST_DEVICE inline int components_words_per_row(int width) { return (width + 31) / 32; }

// Threads per block for a map of `pixels` pixels (a multiple of 32, at least 256).
int components_block_threads(int64_t pixels);

// Dynamic shared memory one block needs; `global_path` keeps the per-pixel arrays in
// the scratch buffers, so only the fixed part and the top-K arrays stay on chip.
size_t components_shared_bytes(int height, int width, int max_components, bool global_path);

// One launch for the whole batch: one block per map; thresholding, union-find,
// min_area filter, raster-order numbering and (optionally) top-K stats all fused.
// `shared_bytes` must be components_shared_bytes(...) for the chosen path, and
// scratch_* must be set exactly when the global path was chosen.
cudaError_t launch_components(Kind kind, const ComponentsParams& params, size_t shared_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// attention_centroids: maps [num_maps, H, W] -> out [num_maps, 2] (float, or double for
// double maps). Backward: grad [num_maps, 2] and centroids in acc type, out like maps.
// ---------------------------------------------------------------------------------
void launch_attention_centroids(Kind kind, const void* maps, int64_t num_maps, int64_t height, int64_t width,
                                void* out, cudaStream_t stream);
void launch_attention_centroids_backward(Kind kind, const void* grad, const void* maps, const void* centroids,
                                         int64_t num_maps, int64_t height, int64_t width, void* grad_maps,
                                         cudaStream_t stream);

// ---------------------------------------------------------------------------------
// position_scores: centroids [B, T, 2] in acc type (float or double), relations int64
// [B or 1, R, 3] (relations_batch_stride 0 when shared), out [B, R] in acc type.
// Out-of-range indices or codes trap with a device-side assertion.
// ---------------------------------------------------------------------------------
void launch_position_scores(bool is_double, const void* centroids, const int64_t* relations,
                            int64_t relations_batch_stride, int64_t batch, int64_t tokens, int64_t rows, double tau,
                            void* out, cudaStream_t stream);
// grad [B, R] and out [B, T, 2] in acc type; one thread per (b, token), or one warp per
// (b, token) with lanes over the rows when R >= 32; deterministic either way.
void launch_position_scores_backward(bool is_double, const void* grad, const void* centroids,
                                     const int64_t* relations, int64_t relations_batch_stride, int64_t batch,
                                     int64_t tokens, int64_t rows, double tau, void* out, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// color_scores: features [B, N, D] and colors [B or 1, C, D] in acc type (colors_batch
// stride 0 when shared), mask bool [B, C, N] or null; scores [B, C] acc, index int64.
// Four launches: per-row scales/norms of colors and features, per-split partial maxima,
// the in-order combination of the splits.
// ---------------------------------------------------------------------------------
struct ColorScoresWorkspace {  // allocated by the host, all in acc type except part_index
  void* color_scaled = nullptr;   // [color_rows, D], color_rows = (B or 1) * C
  void* color_stats = nullptr;    // [color_rows, 2]: max-abs, norm of the scaled row
  void* feature_stats = nullptr;  // [B * N, 2]
  void* part_score = nullptr;     // [B * C, splits]
  int64_t* part_index = nullptr;  // [B * C, splits]
  int64_t splits = 1;             // color_scores_splits(B, N, C)
};
int64_t color_scores_splits(int64_t batch, int64_t patches, int64_t colors_count);
void launch_color_scores(bool is_double, const void* features, const void* colors, int64_t colors_batch_stride,
                         const bool* mask, int64_t batch, int64_t patches, int64_t colors_count, int64_t dim,
                         void* scores, int64_t* index, const ColorScoresWorkspace& workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// residual_correction: z0, delta [B, C, S] of `kind`; alpha [B] in acc type or null.
// zc like z0, lam [B, S] in acc type.
// ---------------------------------------------------------------------------------
void launch_residual_correction(Kind kind, const void* z0, const void* delta, const void* alpha,
                                double alpha_scalar, int64_t batch, int64_t channels, int64_t spatial, void* zc,
                                void* lam, cudaStream_t stream);
// grad_zc like delta, grad_lam [B, S] in acc type; grad_delta like delta.
void launch_residual_correction_backward(Kind kind, const void* grad_zc, const void* grad_lam, const void* delta,
                                         const void* alpha, double alpha_scalar, int64_t batch, int64_t channels,
                                         int64_t spatial, void* grad_delta, cudaStream_t stream);

// ---------------------------------------------------------------------------------
// Row sums over [B, M] (gaussian_log_prob, sample_correction): the row is cut into
// chunks of kRowChunk elements, each block writes a partial sum (acc type) to
// partials [B, chunks], and launch_finish_row_sums adds them in chunk order
// (deterministic) plus `offset_per_element * M`.
// ---------------------------------------------------------------------------------
constexpr int64_t kRowChunk = 8192;
inline int64_t row_chunks(int64_t m) { return (m + kRowChunk - 1) / kRowChunk; }

// x, mean [B, M] of `kind`; log_std [M] (shared) or [B, M] in acc type.
void launch_gaussian_log_prob_partials(Kind kind, const void* x, const void* mean, const void* log_std,
                                       bool shared, int64_t batch, int64_t m, void* partials, cudaStream_t stream);
void launch_finish_row_sums(bool is_double, const void* partials, int64_t batch, int64_t chunks,
                            double offset_per_element, int64_t m, void* out, cudaStream_t stream);
// grad [B] and log_std in acc type; grad_x, grad_mean [B, M] of `kind`; grad_log_std in
// acc type, [M] or [B, M]. A shared log_std's gradient is summed over the batch in
// gaussian_backward_chunks(B, M) chunks of consecutive rows (each in batch order), then
// the chunks in order: partials [M, chunks] in acc type, needed (non-null) only when
// shared and chunks > 1 (two launches then).
int64_t gaussian_backward_chunks(int64_t batch, int64_t m);
void launch_gaussian_log_prob_backward(Kind kind, const void* grad, const void* x, const void* mean,
                                       const void* log_std, bool shared, int64_t batch, int64_t m, void* grad_x,
                                       void* grad_mean, void* grad_log_std, void* partials, cudaStream_t stream);

// sample_correction: z0, mean, noise [B, C, S] of `kind`; alpha [B] in acc type or
// null. log_std in acc type, element (b, c, s) at log_std[b * ls_batch_stride +
// c * ls_channel_stride + s * ls_spatial_stride]: per element ([C, S] shared, or
// [B, C, S]) or per channel ([C] shared, or [B, C], with ls_spatial_stride 0, so an
// expanded per-channel log_std is never materialised). Writes zc, delta (kind),
// lam [B, S] (acc) and log-prob partials [B, sample_correction_chunks(C, S)] (acc):
// each block covers a fixed tile of spatial positions over all C channels, so lam
// needs no cross-block reduction; launch_finish_row_sums (m = C*S) adds the partials.
int64_t sample_correction_chunks(int64_t channels, int64_t spatial);
void launch_sample_correction(Kind kind, const void* z0, const void* mean, const void* log_std, const void* noise,
                              int64_t ls_batch_stride, int64_t ls_channel_stride, int64_t ls_spatial_stride,
                              const void* alpha, double alpha_scalar, int64_t batch, int64_t channels,
                              int64_t spatial, void* zc, void* delta, void* lam, void* partials,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace xlard
