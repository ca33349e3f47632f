// Device helpers shared by xlard's .cu files (torch-free): element loads and stores in
// the accumulation type, exact IEEE comparisons that survive --use_fast_math, and
// warp/block reductions with a fixed order (so results do not depend on scheduling).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

namespace xlard {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: double for double, float for every other floating type.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// The build uses --use_fast_math (flush-to-zero, approximate division). Thresholding
// decisions must match the CPU bit for bit, so they go through these helpers:
// PTX without .ftz keeps subnormals, and finiteness is read from the bits.
__device__ __forceinline__ bool exact_gt(float a, float b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool exact_gt(double a, double b) { return a > b; }
__device__ __forceinline__ float exact_mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double exact_mul(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ bool is_finite_bits(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_finite_bits(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// Order-preserving integer keys of finite values (-0 folded onto +0), so min/max are
// exact integer reductions whatever the float mode.
__device__ __forceinline__ long long order_key(float v) {
  int32_t i = __float_as_int(v);
  if (i == INT32_MIN) i = 0;
  return i >= 0 ? i : (i ^ 0x7fffffff);
}
__device__ __forceinline__ float from_order_key(long long k, float) {
  int32_t i = static_cast<int32_t>(k);
  return __int_as_float(i >= 0 ? i : (i ^ 0x7fffffff));
}
__device__ __forceinline__ long long order_key(double v) {
  long long i = __double_as_longlong(v);
  if (i == INT64_MIN) i = 0;
  return i >= 0 ? i : (i ^ 0x7fffffffffffffffll);
}
__device__ __forceinline__ double from_order_key(long long k, double) {
  return __longlong_as_double(k >= 0 ? k : (k ^ 0x7fffffffffffffffll));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    T u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    T u = __shfl_xor_sync(kFullMask, v, o);
    v = u < v ? u : v;
  }
  return v;
}

// Block-wide sum with a fixed combination order; every thread gets the result.
// `buf` holds at least 32 values; blockDim.x is a multiple of 32. All threads call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T total = lane < warps ? buf[lane] : T(0);
  return warp_sum(total);
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T identity, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T total = lane < warps ? buf[lane] : identity;
  return warp_max(total);
}

template <typename T>
__device__ __forceinline__ T block_min(T v, T identity, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_min(v);
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T total = lane < warps ? buf[lane] : identity;
  return warp_min(total);
}

// A device-side check that stays on in release builds (like torch's CUDA_KERNEL_ASSERT).
#define XLARD_KERNEL_ASSERT(cond, msg)                          \
  do {                                                          \
    if (!(cond)) __assert_fail(msg, __FILE__, __LINE__, __func__); \
  } while (0)

inline unsigned grid_size(int64_t work, int threads, int64_t cap = 65535ll * 32) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace cuda
}  // namespace xlard
