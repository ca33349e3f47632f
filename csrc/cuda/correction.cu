// CUDA kernels (torch-free) of the PPO-side ops: residual_correction (+ backward),
// gaussian_log_prob (+ backward) and sample_correction. One pass over memory each;
// 16-byte vector loads where the spatial size and the pointers allow; float32
// accumulation (float64 for double). Every reduction has a fixed order (per-block
// partials combined in block order), so results are reproducible run to run.
// Semantics: docs/ops.md.
#include "vector_utils.cuh"

#include <initializer_list>
#include <type_traits>

namespace xlard {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSampleTile = 1024;  // spatial positions per block in sample_correction
constexpr int64_t kGaussianBackwardThreads = 1 << 16;

// ---- residual_correction -------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    residual_correction_kernel(const T* __restrict__ z0, const T* __restrict__ delta,
                               const acc_t<T>* __restrict__ alpha, acc_t<T> alpha_scalar, int64_t batch,
                               int64_t channels, int64_t spatial, T* __restrict__ zc, acc_t<T>* __restrict__ lam) {
  using A = acc_t<T>;
  const int64_t vecs = spatial / VEC, total = batch * vecs;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / vecs, s = (idx - b * vecs) * VEC;
    const A a = alpha != nullptr ? alpha[b] : alpha_scalar;
    A l[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) l[v] = A(0);
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t off = (b * channels + c) * spatial + s;
      const Pack<T, VEC> zp = load_pack<T, VEC>(z0 + off);
      const Pack<T, VEC> dp = load_pack<T, VEC>(delta + off);
      Pack<T, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const A d = to_acc(dp.v[v]);
        out.v[v] = from_acc<T>(add_mul_rn(to_acc(zp.v[v]), a, d));
        l[v] += abs_acc(d);
      }
      store_pack<T, VEC>(zc + off, out);
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) lam[b * spatial + s + v] = l[v];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    residual_correction_backward_kernel(const T* __restrict__ grad_zc, const acc_t<T>* __restrict__ grad_lam,
                                        const T* __restrict__ delta, const acc_t<T>* __restrict__ alpha,
                                        acc_t<T> alpha_scalar, int64_t batch, int64_t channels, int64_t spatial,
                                        T* __restrict__ grad_delta) {
  using A = acc_t<T>;
  const int64_t vecs = spatial / VEC, total = batch * vecs;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / vecs, s = (idx - b * vecs) * VEC;
    const A a = alpha != nullptr ? alpha[b] : alpha_scalar;
    A gl[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) gl[v] = grad_lam[b * spatial + s + v];
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t off = (b * channels + c) * spatial + s;
      const Pack<T, VEC> gp = load_pack<T, VEC>(grad_zc + off);
      const Pack<T, VEC> dp = load_pack<T, VEC>(delta + off);
      Pack<T, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const A d = to_acc(dp.v[v]);
        const A sign = d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
        out.v[v] = from_acc<T>(add_mul_rn(a * to_acc(gp.v[v]), gl[v], sign));
      }
      store_pack<T, VEC>(grad_delta + off, out);
    }
  }
}

template <typename T, typename Launch>
void with_vector_width(int64_t spatial, std::initializer_list<const void*> ptrs, Launch&& launch) {
  constexpr int V = vec_width<T>();
  bool ok = spatial % V == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (ok) {
    launch(std::integral_constant<int, V>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// ---- gaussian_log_prob ---------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gaussian_log_prob_partials_kernel(const T* __restrict__ x, const T* __restrict__ mean,
                                      const acc_t<T>* __restrict__ log_std, bool shared, int64_t m,
                                      acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ A buf[32];
  const int64_t b = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t begin = chunk * kRowChunk, end = begin + kRowChunk < m ? begin + kRowChunk : m;
  const T* xb = x + b * m;
  const T* mb = mean + b * m;
  const A* lb = log_std + (shared ? 0 : b * m);
  A acc = A(0);
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const A l = lb[k];
    const A z = (to_acc(xb[k]) - to_acc(mb[k])) * exp_acc(-l);
    acc += A(-0.5) * z * z - l;
  }
  acc = block_sum(acc, buf);
  if (threadIdx.x == 0) partials[b * chunks + chunk] = acc;
}

template <typename A>
__global__ void finish_row_sums_kernel(const A* __restrict__ partials, int64_t batch, int64_t chunks, A offset,
                                       A* __restrict__ out) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  A total = A(0);
  for (int64_t c = 0; c < chunks; ++c) total += partials[b * chunks + c];
  out[b] = total + offset;
}

// One thread per (batch chunk, k): the rows b of its chunk in order. grad_x / grad_mean
// (and a per-row grad_log_std) are elementwise; a shared log_std's gradient is summed
// over the chunk's rows in batch order into partials[k, chunk] (or straight into
// grad_log_std when there is one chunk), then launch_finish_row_sums adds the chunks in
// order: deterministic. Chunking the batch keeps the GPU busy when the inner size m is
// small and the batch large (one thread per k looping over the whole batch did not).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gaussian_log_prob_backward_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ x,
                                      const T* __restrict__ mean, const acc_t<T>* __restrict__ log_std, bool shared,
                                      int64_t batch, int64_t m, int64_t chunk_rows, int64_t chunks,
                                      T* __restrict__ grad_x, T* __restrict__ grad_mean,
                                      acc_t<T>* __restrict__ grad_log_std, acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t total = chunks * m;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t chunk = idx / m, k = idx - chunk * m;  // consecutive threads: consecutive k (coalesced)
    const int64_t b_begin = chunk * chunk_rows;
    const int64_t b_end = b_begin + chunk_rows < batch ? b_begin + chunk_rows : batch;
    A shared_sum = A(0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t off = b * m + k;
      const A g = grad[b];
      const A l = log_std[shared ? k : off];
      const A inv_var = exp_acc(A(-2) * l);
      const A diff = to_acc(x[off]) - to_acc(mean[off]);
      const A gx = -g * diff * inv_var;
      grad_x[off] = from_acc<T>(gx);
      grad_mean[off] = from_acc<T>(-gx);
      const A gl = g * (diff * diff * inv_var - A(1));
      if (shared) {
        shared_sum += gl;  // batch order within the chunk: deterministic
      } else {
        grad_log_std[off] = gl;
      }
    }
    if (shared) {
      if (chunks == 1) {
        grad_log_std[k] = shared_sum;
      } else {
        partials[k * chunks + chunk] = shared_sum;
      }
    }
  }
}

// ---- sample_correction ---------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    sample_correction_kernel(const T* __restrict__ z0, const T* __restrict__ mean,
                             const acc_t<T>* __restrict__ log_std, const T* __restrict__ noise,
                             int64_t ls_batch_stride, int64_t ls_channel_stride, int64_t ls_spatial_stride,
                             const acc_t<T>* __restrict__ alpha, acc_t<T> alpha_scalar, int64_t channels,
                             int64_t spatial, T* __restrict__ zc, T* __restrict__ delta, acc_t<T>* __restrict__ lam,
                             acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ A buf[32];
  const int64_t b = blockIdx.x, tile = blockIdx.y, tiles = gridDim.y;
  const int64_t s_begin = tile * kSampleTile;
  const int64_t s_end = s_begin + kSampleTile < spatial ? s_begin + kSampleTile : spatial;
  const A a = alpha != nullptr ? alpha[b] : alpha_scalar;
  const A* lsb = log_std + b * ls_batch_stride;
  A lp = A(0);
  for (int64_t s = s_begin + int64_t(threadIdx.x) * VEC; s < s_end; s += int64_t(blockDim.x) * VEC) {
    A l1[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) l1[v] = A(0);
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t off = (b * channels + c) * spatial + s;
      const A* lsc = lsb + c * ls_channel_stride + s * ls_spatial_stride;
      const Pack<T, VEC> zp = load_pack<T, VEC>(z0 + off);
      const Pack<T, VEC> mp = load_pack<T, VEC>(mean + off);
      const Pack<T, VEC> np = load_pack<T, VEC>(noise + off);
      Pack<T, VEC> dout, zout;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const A e = to_acc(np.v[v]);
        const A l = lsc[v * ls_spatial_stride];
        const T d = from_acc<T>(add_mul_rn(to_acc(mp.v[v]), exp_acc(l), e));
        const A da = to_acc(d);
        dout.v[v] = d;
        zout.v[v] = from_acc<T>(add_mul_rn(to_acc(zp.v[v]), a, da));
        l1[v] += abs_acc(da);
        lp += A(-0.5) * e * e - l;
      }
      store_pack<T, VEC>(delta + off, dout);
      store_pack<T, VEC>(zc + off, zout);
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) lam[b * spatial + s + v] = l1[v];
  }
  lp = block_sum(lp, buf);
  if (threadIdx.x == 0) partials[b * tiles + tile] = lp;
}

}  // namespace

void launch_residual_correction(Kind kind, const void* z0, const void* delta, const void* alpha,
                                double alpha_scalar, int64_t batch, int64_t channels, int64_t spatial, void* zc,
                                void* lam, cudaStream_t stream) {
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    with_vector_width<T>(spatial, {z0, delta, zc, lam}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const unsigned grid = grid_size(batch * (spatial / V), kThreads);
      residual_correction_kernel<T, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(z0), static_cast<const T*>(delta), static_cast<const A*>(alpha),
          static_cast<A>(alpha_scalar), batch, channels, spatial, static_cast<T*>(zc), static_cast<A*>(lam));
    });
  });
}

void launch_residual_correction_backward(Kind kind, const void* grad_zc, const void* grad_lam, const void* delta,
                                         const void* alpha, double alpha_scalar, int64_t batch, int64_t channels,
                                         int64_t spatial, void* grad_delta, cudaStream_t stream) {
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    with_vector_width<T>(spatial, {grad_zc, delta, grad_delta}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const unsigned grid = grid_size(batch * (spatial / V), kThreads);
      residual_correction_backward_kernel<T, V><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(grad_zc), static_cast<const A*>(grad_lam), static_cast<const T*>(delta),
          static_cast<const A*>(alpha), static_cast<A>(alpha_scalar), batch, channels, spatial,
          static_cast<T*>(grad_delta));
    });
  });
}

void launch_gaussian_log_prob_partials(Kind kind, const void* x, const void* mean, const void* log_std,
                                       bool shared, int64_t batch, int64_t m, void* partials, cudaStream_t stream) {
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(row_chunks(m)));
    gaussian_log_prob_partials_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(mean), static_cast<const A*>(log_std), shared, m,
        static_cast<A*>(partials));
  });
}

void launch_finish_row_sums(bool is_double, const void* partials, int64_t batch, int64_t chunks,
                            double offset_per_element, int64_t m, void* out, cudaStream_t stream) {
  const unsigned grid = grid_size(batch, kThreads, 1ll << 30);
  if (is_double) {
    finish_row_sums_kernel<double><<<grid, kThreads, 0, stream>>>(
        static_cast<const double*>(partials), batch, chunks, offset_per_element * static_cast<double>(m),
        static_cast<double*>(out));
  } else {
    finish_row_sums_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(partials), batch, chunks,
        static_cast<float>(offset_per_element) * static_cast<float>(m), static_cast<float*>(out));
  }
}

int64_t gaussian_backward_chunks(int64_t batch, int64_t m) {
  if (batch <= 0 || m <= 0) return 1;
  // Aim for ~64K threads, but at most ~sqrt(batch) chunks: a thread walks its chunk's
  // rows and the finish walks the chunks, both serially, so balance the two.
  int64_t chunks = (kGaussianBackwardThreads + m - 1) / m;
  int64_t root = 1;
  while (root * root < batch) ++root;
  if (chunks > root) chunks = root;
  if (chunks > batch) chunks = batch;
  if (chunks < 1) chunks = 1;
  const int64_t rows = (batch + chunks - 1) / chunks;
  return (batch + rows - 1) / rows;
}

void launch_gaussian_log_prob_backward(Kind kind, const void* grad, const void* x, const void* mean,
                                       const void* log_std, bool shared, int64_t batch, int64_t m, void* grad_x,
                                       void* grad_mean, void* grad_log_std, void* partials, cudaStream_t stream) {
  const int64_t chunks = gaussian_backward_chunks(batch, m);
  const int64_t chunk_rows = (batch + chunks - 1) / chunks;
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    gaussian_log_prob_backward_kernel<T><<<grid_size(chunks * m, kThreads), kThreads, 0, stream>>>(
        static_cast<const A*>(grad), static_cast<const T*>(x), static_cast<const T*>(mean),
        static_cast<const A*>(log_std), shared, batch, m, chunk_rows, chunks, static_cast<T*>(grad_x),
        static_cast<T*>(grad_mean), static_cast<A*>(grad_log_std), static_cast<A*>(partials));
  });
  if (shared && chunks > 1) {
    launch_finish_row_sums(kind == Kind::kDouble, partials, m, chunks, 0.0, 0, grad_log_std, stream);
  }
}

int64_t sample_correction_chunks(int64_t /*channels*/, int64_t spatial) {
  return (spatial + kSampleTile - 1) / kSampleTile;
}

void launch_sample_correction(Kind kind, const void* z0, const void* mean, const void* log_std, const void* noise,
                              int64_t ls_batch_stride, int64_t ls_channel_stride, int64_t ls_spatial_stride,
                              const void* alpha, double alpha_scalar, int64_t batch, int64_t channels,
                              int64_t spatial, void* zc, void* delta, void* lam, void* partials,
                              cudaStream_t stream) {
  dispatch_floating(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(sample_correction_chunks(channels, spatial)));
    // log_std is read VEC elements at a time too, but element-wise (no vector load),
    // so only the T tensors constrain the width.
    with_vector_width<T>(spatial, {z0, mean, noise, zc, delta}, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      // A tile is kSampleTile positions: with 8-wide vectors (half, bfloat16) 128 threads
      // cover it in one pass; 256 would leave half of each block idle.
      constexpr int threads = kSampleTile / V < kThreads ? kSampleTile / V : kThreads;
      static_assert(threads % 32 == 0 && threads >= 32, "block_sum needs whole warps");
      sample_correction_kernel<T, V><<<grid, threads, 0, stream>>>(
          static_cast<const T*>(z0), static_cast<const T*>(mean), static_cast<const A*>(log_std),
          static_cast<const T*>(noise), ls_batch_stride, ls_channel_stride, ls_spatial_stride,
          static_cast<const A*>(alpha), static_cast<A>(alpha_scalar), channels,
          spatial, static_cast<T*>(zc), static_cast<T*>(delta), static_cast<A*>(lam), static_cast<A*>(partials));
    });
  });
}

}  // namespace cuda
}  // namespace xlard
