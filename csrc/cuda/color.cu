// CUDA kernel (torch-free) of color_scores: one block per (batch, color); each warp
// takes patches in turn, computes the dot product and the patch norm with lanes over
// the feature dimension, and keeps a running max with its first argmax; warps are then
// combined with ties going to the smaller patch index, so the result is the first
// patch reaching the max, as on the CPU. Semantics: docs/ops.md.
#include "vector_utils.cuh"

namespace xlard {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename A>
__global__ void __launch_bounds__(kThreads)
    color_scores_kernel(const A* __restrict__ features, const A* __restrict__ colors, int64_t colors_batch_stride,
                        const bool* __restrict__ mask, int64_t patches, int64_t num_colors, int64_t dim,
                        A* __restrict__ scores, int64_t* __restrict__ index) {
  __shared__ A best_score[32];
  __shared__ int64_t best_index[32];
  const int64_t bc = blockIdx.x, b = bc / num_colors, c = bc - b * num_colors;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const A* e = colors + b * colors_batch_stride + c * dim;
  const bool* allowed = mask != nullptr ? mask + bc * patches : nullptr;

  A ee = A(0);
  for (int64_t d = lane; d < dim; d += 32) ee += e[d] * e[d];
  const A enorm = sqrt(warp_sum(ee));

  A best = A(0);
  int64_t arg = -1;
  for (int64_t n = warp; n < patches; n += warps) {
    if (allowed != nullptr && !allowed[n]) continue;  // warp-uniform
    const A* f = features + (b * patches + n) * dim;
    A dot = A(0), ff = A(0);
    for (int64_t d = lane; d < dim; d += 32) {
      const A fv = f[d];
      dot += fv * e[d];
      ff += fv * fv;
    }
    dot = warp_sum(dot);
    ff = warp_sum(ff);
    const A denom = enorm * sqrt(ff);
    const A s = denom > A(0) ? dot / denom : A(0);
    if (arg < 0 || s > best) {  // strict: the first patch reaching the max wins
      if (s == s) {             // a NaN similarity is never selected (as on the CPU)
        best = s;
        arg = n;
      }
    }
  }
  if (lane == 0) {
    best_score[warp] = best;
    best_index[warp] = arg;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = A(0);
    int64_t k = -1;
    for (int w = 0; w < warps; ++w) {
      const int64_t kw = best_index[w];
      if (kw < 0) continue;
      const A sw = best_score[w];
      if (k < 0 || sw > s || (sw == s && kw < k)) {
        s = sw;
        k = kw;
      }
    }
    scores[bc] = k >= 0 ? s : A(0);
    index[bc] = k;
  }
}

}  // namespace

void launch_color_scores(bool is_double, const void* features, const void* colors, int64_t colors_batch_stride,
                         const bool* mask, int64_t batch, int64_t patches, int64_t colors_count, int64_t dim,
                         void* scores, int64_t* index, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(batch * colors_count);
  if (is_double) {
    color_scores_kernel<double><<<grid, kThreads, 0, stream>>>(
        static_cast<const double*>(features), static_cast<const double*>(colors), colors_batch_stride, mask, patches,
        colors_count, dim, static_cast<double*>(scores), index);
  } else {
    color_scores_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(features), static_cast<const float*>(colors), colors_batch_stride, mask, patches,
        colors_count, dim, static_cast<float*>(scores), index);
  }
}

}  // namespace cuda
}  // namespace xlard
