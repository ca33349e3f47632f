// CUDA kernels (torch-free) of color_scores. Semantics: docs/ops.md.
//
// 1. scale_rows_kernel, once per row (every patch feature, every color embedding): its
//    max-abs m and the norm of x / m (issue 15: dividing by the row's own max-abs before
//    any square keeps features of magnitude 1e30 in float32 finite, and the cosine is
//    scale-free). Color rows are also written out divided by m (they are re-read for
//    every patch); patch rows are divided on the fly. Each patch norm is thus computed
//    once, not once per color (issue 14).
// 2. color_partials_kernel, one block per (batch, group of kGroup colors, patch split):
//    each warp takes patches in turn and reads each feature element once for the whole
//    group of colors (not once per color); keeps per color a running max with its first
//    argmax; warps are combined with ties going to the smaller patch index.
// 3. color_finish_kernel: per (batch, color), the splits in patch order (strictly
//    greater replaces), so the result is the first patch reaching the max, as on the
//    CPU, and deterministic.
// s = dot / (|f'| |e'|) when that denominator is > 0, else 0 (zero or NaN norms, as the
// reference); a NaN similarity is never selected.
#include "vector_utils.cuh"

namespace xlard {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 4;            // colors per block
constexpr int64_t kTargetBlocks = 512;  // enough blocks to fill a large GPU
constexpr int64_t kMinPatchesPerSplit = 64;

template <typename A>
__device__ __forceinline__ A abs_max(A m, A v) {
  const A a = abs_acc(v);
  return a > m ? a : m;  // NaN never wins
}

// One warp per row: stats[row] = (max-abs m, |x / m|) with |.| = inf when m is inf and 0
// when m is 0; scaled[row] = x / m when scaled is not null.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(const A* __restrict__ x, int64_t rows, int64_t dim, A* __restrict__ scaled,
                      A* __restrict__ stats) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += warps_total) {
    const A* xr = x + row * dim;
    A m = A(0);
    for (int64_t d = lane; d < dim; d += 32) m = abs_max(m, xr[d]);
    m = warp_max(m);
    A ss = A(0);
    if (m > A(0) && is_finite_bits(m)) {  // warp-uniform
      for (int64_t d = lane; d < dim; d += 32) {
        const A v = xr[d] / m;  // a division: 1 / m is inf for a subnormal m
        ss += v * v;
        if (scaled != nullptr) scaled[row * dim + d] = v;
      }
    } else if (scaled != nullptr) {
      for (int64_t d = lane; d < dim; d += 32) scaled[row * dim + d] = xr[d] / m;  // NaN rows: never selected
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      stats[row * 2] = m;
      // A row holding inf or NaN has a NaN norm (m - m), as in the reference (its scaled row holds NaN): the
      // denominator test then scores it 0. An inf norm made inf / inf a NaN score, never selected.
      stats[row * 2 + 1] = is_finite_bits(m) ? (m > A(0) ? sqrt(ss) : A(0)) : m - m;
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    color_partials_kernel(const A* __restrict__ features, const A* __restrict__ feature_stats,
                          const A* __restrict__ colors_scaled, const A* __restrict__ color_stats,
                          int64_t colors_batch_stride, const bool* __restrict__ mask, int64_t patches,
                          int64_t num_colors, int64_t dim, int64_t split_len, A* __restrict__ part_score,
                          int64_t* __restrict__ part_index) {
  __shared__ A best_score[kGroup][32];
  __shared__ int64_t best_index[kGroup][32];
  const int64_t groups = (num_colors + kGroup - 1) / kGroup;
  const int64_t b = blockIdx.x / groups, c0 = (blockIdx.x - b * groups) * kGroup;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t n_begin = split * split_len, n_end = n_begin + split_len < patches ? n_begin + split_len : patches;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t color_row0 = b * (colors_batch_stride / (dim > 0 ? dim : 1));  // row of (b, color 0)

  const A* e[kGroup];
  A enorm[kGroup];
  bool valid[kGroup];
  const bool* allowed[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const int64_t c = c0 + g;
    valid[g] = c < num_colors;
    const int64_t row = color_row0 + (valid[g] ? c : 0);
    e[g] = colors_scaled + row * dim;
    enorm[g] = color_stats[row * 2 + 1];
    allowed[g] = mask != nullptr && valid[g] ? mask + (b * num_colors + c) * patches : nullptr;
  }

  A best[kGroup];
  int64_t arg[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    best[g] = A(0);
    arg[g] = -1;
  }
  for (int64_t n = n_begin + warp; n < n_end; n += warps) {
    bool take[kGroup], any = false;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      take[g] = valid[g] && (allowed[g] == nullptr || allowed[g][n]);
      any = any || take[g];
    }
    if (!any) continue;  // warp-uniform
    const A* f = features + (b * patches + n) * dim;
    const A mf = feature_stats[(b * patches + n) * 2], fnorm = feature_stats[(b * patches + n) * 2 + 1];
    A dot[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) dot[g] = A(0);
    for (int64_t d = lane; d < dim; d += 32) {
      const A fv = f[d] / mf;
#pragma unroll
      for (int g = 0; g < kGroup; ++g) dot[g] += fv * e[g][d];
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      dot[g] = warp_sum(dot[g]);
      if (!take[g]) continue;
      const A denom = enorm[g] * fnorm;
      const A s = denom > A(0) ? dot[g] / denom : A(0);
      if ((arg[g] < 0 || s > best[g]) && s == s) {  // strict: the first patch reaching the max wins; never NaN
        best[g] = s;
        arg[g] = n;
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      best_score[g][warp] = best[g];
      best_index[g][warp] = arg[g];
    }
  }
  __syncthreads();
  if (threadIdx.x < kGroup && valid[threadIdx.x]) {
    const int g = threadIdx.x;
    A s = A(0);
    int64_t k = -1;
    for (int w = 0; w < warps; ++w) {
      const int64_t kw = best_index[g][w];
      if (kw < 0) continue;
      const A sw = best_score[g][w];
      if (k < 0 || sw > s || (sw == s && kw < k)) {
        s = sw;
        k = kw;
      }
    }
    const int64_t bc = b * num_colors + c0 + g;
    part_score[bc * splits + split] = s;
    part_index[bc * splits + split] = k;
  }
}

template <typename A>
__global__ void color_finish_kernel(const A* __restrict__ part_score, const int64_t* __restrict__ part_index,
                                    int64_t rows, int64_t splits, A* __restrict__ scores, int64_t* __restrict__ index) {
  const int64_t bc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (bc >= rows) return;
  A s = A(0);
  int64_t k = -1;
  for (int64_t j = 0; j < splits; ++j) {  // splits hold increasing patch ranges
    const int64_t kj = part_index[bc * splits + j];
    if (kj < 0) continue;
    const A sj = part_score[bc * splits + j];
    if (k < 0 || sj > s) {
      s = sj;
      k = kj;
    }
  }
  scores[bc] = k >= 0 ? s : A(0);
  index[bc] = k;
}

template <typename A>
void launch_color_scores_typed(const A* features, const A* colors, int64_t colors_batch_stride, const bool* mask,
                               int64_t batch, int64_t patches, int64_t num_colors, int64_t dim, A* scores,
                               int64_t* index, const ColorScoresWorkspace& ws, cudaStream_t stream) {
  const int64_t color_rows = (colors_batch_stride != 0 ? batch : 1) * num_colors;
  A* color_scaled = static_cast<A*>(ws.color_scaled);
  A* color_stats = static_cast<A*>(ws.color_stats);
  A* feature_stats = static_cast<A*>(ws.feature_stats);
  constexpr int kWarps = kThreads / 32;
  scale_rows_kernel<A><<<grid_size(color_rows, kWarps), kThreads, 0, stream>>>(colors, color_rows, dim, color_scaled,
                                                                                 color_stats);
  scale_rows_kernel<A><<<grid_size(batch * patches, kWarps), kThreads, 0, stream>>>(
      features, batch * patches, dim, nullptr, feature_stats);
  const int64_t groups = (num_colors + kGroup - 1) / kGroup;
  const int64_t splits = ws.splits;
  const int64_t split_len = (patches + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(batch * groups), static_cast<unsigned>(splits));
  color_partials_kernel<A><<<grid, kThreads, 0, stream>>>(features, feature_stats, color_scaled, color_stats,
                                                          colors_batch_stride, mask, patches, num_colors, dim,
                                                          split_len, static_cast<A*>(ws.part_score), ws.part_index);
  const int64_t rows = batch * num_colors;
  color_finish_kernel<A><<<grid_size(rows, kThreads, 1ll << 30), kThreads, 0, stream>>>(
      static_cast<const A*>(ws.part_score), ws.part_index, rows, splits, scores, index);
}

}  // namespace

int64_t color_scores_splits(int64_t batch, int64_t patches, int64_t colors_count) {
  const int64_t blocks = batch * ((colors_count + kGroup - 1) / kGroup);
  int64_t splits = blocks > 0 ? (kTargetBlocks + blocks - 1) / blocks : 1;
  const int64_t most = (patches + kMinPatchesPerSplit - 1) / kMinPatchesPerSplit;
  if (splits > most) splits = most;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

void launch_color_scores(bool is_double, const void* features, const void* colors, int64_t colors_batch_stride,
                         const bool* mask, int64_t batch, int64_t patches, int64_t colors_count, int64_t dim,
                         void* scores, int64_t* index, const ColorScoresWorkspace& workspace, cudaStream_t stream) {
  if (is_double) {
    launch_color_scores_typed<double>(static_cast<const double*>(features), static_cast<const double*>(colors),
                                      colors_batch_stride, mask, batch, patches, colors_count, dim,
                                      static_cast<double*>(scores), index, workspace, stream);
  } else {
    launch_color_scores_typed<float>(static_cast<const float*>(features), static_cast<const float*>(colors),
                                     colors_batch_stride, mask, batch, patches, colors_count, dim,
                                     static_cast<float*>(scores), index, workspace, stream);
  }
}

}  // namespace cuda
}  // namespace xlard
