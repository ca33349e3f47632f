// CUDA kernels (torch-free) of attention_centroids (+ backward) and position_scores
// (+ backward). attention_centroids: one block per map, 16-byte vector loads when the
// row width allows, fixed-order block reductions (deterministic). position_scores'
// backward gathers per (batch, token) instead of scattering with atomics, so it is
// deterministic too. Semantics: docs/ops.md.
//
// Overflow and subnormals (issues 14, 15): the weights max(v, 0) are divided by the
// map's largest weight before they are summed, so a map of 3e38 gives a finite centroid
// and the sums never overflow; it is a division, never a multiplication by the
// reciprocal (1 / a subnormal max is inf). The build keeps subnormals (no fast math,
// see setup.py), so a map whose positive values are all subnormal still has weight.
#include "vector_utils.cuh"

namespace xlard {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename A>
__device__ __forceinline__ A positive_weight(A v) {
  return (is_finite_bits(v) && v > A(0)) ? v : A(0);
}

// The largest weight max(v, 0) of one map (0 when no value is positive); every thread gets it.
template <typename T, int VEC>
__device__ acc_t<T> max_weight(const T* __restrict__ src, int64_t n, acc_t<T>* buf) {
  using A = acc_t<T>;
  A mx = A(0);
  for (int64_t ch = threadIdx.x; ch < n / VEC; ch += blockDim.x) {
    const Pack<T, VEC> pk = load_pack<T, VEC>(src + ch * VEC);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A w = positive_weight(to_acc(pk.v[v]));
      mx = w > mx ? w : mx;
    }
  }
  return block_max(mx, A(0), buf);
}

// Per-block sums of w / mx, (w / mx) * (j + 0.5) and (w / mx) * (i + 0.5) over one map
// (mx > 0: the map's largest weight).
template <typename T, int VEC>
__device__ void centroid_sums(const T* __restrict__ src, int64_t height, int64_t width, acc_t<T> mx, acc_t<T>* buf,
                              acc_t<T>& sw, acc_t<T>& sx, acc_t<T>& sy) {
  using A = acc_t<T>;
  const int64_t chunks = height * width / VEC;
  sw = A(0);
  sx = A(0);
  sy = A(0);
  for (int64_t ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
    const int64_t i0 = ch * VEC, r = i0 / width, c0 = i0 - r * width;  // VEC divides width
    const Pack<T, VEC> pk = load_pack<T, VEC>(src + i0);
    A row = A(0), col = A(0);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A w = positive_weight(to_acc(pk.v[v])) / mx;
      row += w;
      col += w * (static_cast<A>(c0 + v) + A(0.5));
    }
    sw += row;
    sx += col;
    sy += row * (static_cast<A>(r) + A(0.5));
  }
  sw = block_sum(sw, buf);
  sx = block_sum(sx, buf);
  sy = block_sum(sy, buf);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    attention_centroids_kernel(const T* __restrict__ maps, int64_t height, int64_t width, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A buf[32];
  const int64_t map = blockIdx.x;
  const T* src = maps + map * height * width;
  const A mx = max_weight<T, VEC>(src, height * width, buf);
  A sw = A(0), sx = A(0), sy = A(0);
  if (mx > A(0)) centroid_sums<T, VEC>(src, height, width, mx, buf, sw, sx, sy);  // block-uniform branch
  if (threadIdx.x == 0) {
    const bool empty = !(sw > A(0));
    out[map * 2] = empty ? A(0.5) : sx / sw / static_cast<A>(width);
    out[map * 2 + 1] = empty ? A(0.5) : sy / sw / static_cast<A>(height);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    attention_centroids_backward_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ maps,
                                        const acc_t<T>* __restrict__ centroids, int64_t height, int64_t width,
                                        T* __restrict__ grad_maps) {
  using A = acc_t<T>;
  __shared__ A buf[32];
  const int64_t map = blockIdx.x, n = height * width;
  const T* src = maps + map * n;
  T* dst = grad_maps + map * n;
  // d x / d v = ((j + 0.5) / W - x) / sum w, with sum w = mx * sum (w / mx) (as in the
  // forward: no overflow, subnormal weights kept); see the division below.
  const A mx = max_weight<T, VEC>(src, n, buf);
  A sw = A(0);
  if (mx > A(0)) {  // block-uniform branch
    for (int64_t ch = threadIdx.x; ch < n / VEC; ch += blockDim.x) {
      const Pack<T, VEC> pk = load_pack<T, VEC>(src + ch * VEC);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sw += positive_weight(to_acc(pk.v[v])) / mx;
    }
    sw = block_sum(sw, buf);
  }
  const bool empty = !(sw > A(0));
  const A gx = grad[map * 2], gy = grad[map * 2 + 1];
  const A x = centroids[map * 2], y = centroids[map * 2 + 1];
  const A inv_w = A(1) / static_cast<A>(width), inv_h = A(1) / static_cast<A>(height);
  for (int64_t ch = threadIdx.x; ch < n / VEC; ch += blockDim.x) {
    const int64_t i0 = ch * VEC, r = i0 / width, c0 = i0 - r * width;
    const Pack<T, VEC> pk = load_pack<T, VEC>(src + i0);
    const A dy = gy * ((static_cast<A>(r) + A(0.5)) * inv_h - y);
    Pack<T, VEC> out;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A val = to_acc(pk.v[v]);
      const bool live = !empty && is_finite_bits(val) && val > A(0);
      const A dx = gx * ((static_cast<A>(c0 + v) + A(0.5)) * inv_w - x);
      // (dx + dy) / (sw * mx), sw >= 1: by the product where mx < 1 (no overflow, and a tiny gradient is not lost
      // to the subnormals as (dx + dy) / sw alone would), in two steps where mx >= 1 (the product could overflow)
      out.v[v] = from_acc<T>(live ? (mx < A(1) ? (dx + dy) / (sw * mx) : (dx + dy) / mx / sw) : A(0));
    }
    store_pack<T, VEC>(dst + i0, out);
  }
}

// ---- position_scores -----------------------------------------------------------

template <typename A>
__device__ __forceinline__ void relation_row(const int64_t* rel, int64_t tokens, int64_t& a, int64_t& b, int& code) {
  a = rel[0];
  b = rel[1];
  const int64_t c = rel[2];
  XLARD_KERNEL_ASSERT(a >= 0 && a < tokens && b >= 0 && b < tokens,
                      "xlard.position_scores: relation token index out of range [0, T)");
  XLARD_KERNEL_ASSERT(c >= 0 && c < 4, "xlard.position_scores: relation code must be 0..3");
  code = static_cast<int>(c);
}

// Direction v of a code (LEFT_OF, RIGHT_OF, ABOVE, BELOW; y grows downward).
template <typename A>
__device__ __forceinline__ void direction(int code, A& vx, A& vy) {
  vx = code == 0 ? A(-1) : (code == 1 ? A(1) : A(0));
  vy = code == 2 ? A(-1) : (code == 3 ? A(1) : A(0));
}

template <typename A>
__device__ __forceinline__ A sigmoid(A z) {
  return A(1) / (A(1) + exp_acc(-z));
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    position_scores_kernel(const A* __restrict__ centroids, const int64_t* __restrict__ relations,
                           int64_t relations_batch_stride, int64_t batch, int64_t tokens, int64_t rows, A tau,
                           A* __restrict__ out) {
  const int64_t total = batch * rows;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / rows, r = idx - b * rows;
    int64_t ta, tb;
    int code;
    relation_row<A>(relations + b * relations_batch_stride + r * 3, tokens, ta, tb, code);
    A vx, vy;
    direction(code, vx, vy);
    const A* pa = centroids + (b * tokens + ta) * 2;
    const A* pb = centroids + (b * tokens + tb) * 2;
    out[idx] = sigmoid(tau * ((pa[0] - pb[0]) * vx + (pa[1] - pb[1]) * vy));
  }
}

// LANES threads (1, or a whole warp) per (b, token): lane l sums the contributions of
// the relation rows l, l + LANES, ... naming the token, in row order, and the lanes are
// then combined by a fixed butterfly (deterministic). A warp per token keeps the GPU
// busy when B * T is small and R large; one thread per token when R is small.
template <typename A, int LANES>
__global__ void __launch_bounds__(kThreads)
    position_scores_backward_kernel(const A* __restrict__ grad, const A* __restrict__ centroids,
                                    const int64_t* __restrict__ relations, int64_t relations_batch_stride,
                                    int64_t batch, int64_t tokens, int64_t rows, A tau, A* __restrict__ out) {
  static_assert(LANES == 1 || LANES == 32, "a thread or a warp per token");
  const int64_t total = batch * tokens;
  const int sub = static_cast<int>(threadIdx.x) % LANES;
  const int64_t first = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / LANES;
  const int64_t step = int64_t(gridDim.x) * blockDim.x / LANES;
  // The loop bound is the same for the LANES threads of a group: whole warps stay together.
  for (int64_t idx = first; idx < total; idx += step) {
    const int64_t b = idx / tokens, t = idx - b * tokens;
    A gx = A(0), gy = A(0);
    for (int64_t r = sub; r < rows; r += LANES) {
      int64_t ta, tb;
      int code;
      relation_row<A>(relations + b * relations_batch_stride + r * 3, tokens, ta, tb, code);
      if (ta != t && tb != t) continue;
      A vx, vy;
      direction(code, vx, vy);
      const A* pa = centroids + (b * tokens + ta) * 2;
      const A* pb = centroids + (b * tokens + tb) * 2;
      const A s = sigmoid(tau * ((pa[0] - pb[0]) * vx + (pa[1] - pb[1]) * vy));
      const A k = grad[b * rows + r] * s * (A(1) - s) * tau;
      const A sign = (ta == t ? A(1) : A(0)) - (tb == t ? A(1) : A(0));
      gx += sign * k * vx;
      gy += sign * k * vy;
    }
    if constexpr (LANES == 32) {
      gx = warp_sum(gx);
      gy = warp_sum(gy);
    }
    if (sub == 0) {
      out[idx * 2] = gx;
      out[idx * 2 + 1] = gy;
    }
  }
}

}  // namespace

void launch_attention_centroids(Kind kind, const void* maps, int64_t num_maps, int64_t height, int64_t width,
                                void* out, cudaStream_t stream) {
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const T* src = static_cast<const T*>(maps);
    if (width % V == 0 && aligned16(maps)) {
      attention_centroids_kernel<T, V><<<static_cast<unsigned>(num_maps), kThreads, 0, stream>>>(
          src, height, width, static_cast<A*>(out));
    } else {
      attention_centroids_kernel<T, 1><<<static_cast<unsigned>(num_maps), kThreads, 0, stream>>>(
          src, height, width, static_cast<A*>(out));
    }
  });
}

void launch_attention_centroids_backward(Kind kind, const void* grad, const void* maps, const void* centroids,
                                         int64_t num_maps, int64_t height, int64_t width, void* grad_maps,
                                         cudaStream_t stream) {
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const A* g = static_cast<const A*>(grad);
    const A* c = static_cast<const A*>(centroids);
    const T* src = static_cast<const T*>(maps);
    T* dst = static_cast<T*>(grad_maps);
    if (width % V == 0 && aligned16(maps) && aligned16(grad_maps)) {
      attention_centroids_backward_kernel<T, V><<<static_cast<unsigned>(num_maps), kThreads, 0, stream>>>(
          g, src, c, height, width, dst);
    } else {
      attention_centroids_backward_kernel<T, 1><<<static_cast<unsigned>(num_maps), kThreads, 0, stream>>>(
          g, src, c, height, width, dst);
    }
  });
}

void launch_position_scores(bool is_double, const void* centroids, const int64_t* relations,
                            int64_t relations_batch_stride, int64_t batch, int64_t tokens, int64_t rows, double tau,
                            void* out, cudaStream_t stream) {
  const unsigned grid = grid_size(batch * rows, kThreads);
  if (is_double) {
    position_scores_kernel<double><<<grid, kThreads, 0, stream>>>(static_cast<const double*>(centroids), relations,
                                                                  relations_batch_stride, batch, tokens, rows, tau,
                                                                  static_cast<double*>(out));
  } else {
    position_scores_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(centroids), relations,
                                                                 relations_batch_stride, batch, tokens, rows,
                                                                 static_cast<float>(tau), static_cast<float*>(out));
  }
}

template <typename A, int LANES>
void launch_position_scores_backward_typed(const void* grad, const void* centroids, const int64_t* relations,
                                           int64_t relations_batch_stride, int64_t batch, int64_t tokens,
                                           int64_t rows, double tau, void* out, cudaStream_t stream) {
  const unsigned grid = grid_size(batch * tokens * LANES, kThreads);
  position_scores_backward_kernel<A, LANES><<<grid, kThreads, 0, stream>>>(
      static_cast<const A*>(grad), static_cast<const A*>(centroids), relations, relations_batch_stride, batch, tokens,
      rows, static_cast<A>(tau), static_cast<A*>(out));
}

void launch_position_scores_backward(bool is_double, const void* grad, const void* centroids,
                                     const int64_t* relations, int64_t relations_batch_stride, int64_t batch,
                                     int64_t tokens, int64_t rows, double tau, void* out, cudaStream_t stream) {
  const bool warp_per_token = rows >= 32;
  if (is_double) {
    (warp_per_token ? launch_position_scores_backward_typed<double, 32> : launch_position_scores_backward_typed<double, 1>)(
        grad, centroids, relations, relations_batch_stride, batch, tokens, rows, tau, out, stream);
  } else {
    (warp_per_token ? launch_position_scores_backward_typed<float, 32> : launch_position_scores_backward_typed<float, 1>)(
        grad, centroids, relations, relations_batch_stride, batch, tokens, rows, tau, out, stream);
  }
}

}  // namespace cuda
}  // namespace xlard
