// Vectorized loads/stores and element-type dispatch for the elementwise .cu files
// (torch-free).
#pragma once

#include "device_utils.cuh"
#include "launchers.cuh"

#include <cstdint>

namespace xlard {
namespace cuda {

// N elements loaded or stored as one aligned 16-byte (or smaller) transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the floating element type of `kind`.
template <typename Fn>
void dispatch_floating(Kind kind, Fn&& fn) {
  switch (kind) {
    case Kind::kHalf: fn(TypeTag<__half>{}); break;
    case Kind::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
    case Kind::kFloat: fn(TypeTag<float>{}); break;
    case Kind::kDouble: fn(TypeTag<double>{}); break;
    case Kind::kByte: break;  // the host glue never passes kByte to a floating op
  }
}

// a + b * c with two roundings (no FMA contraction), as the CPU kernels compute it.
__device__ __forceinline__ float add_mul_rn(float a, float b, float c) { return __fadd_rn(a, __fmul_rn(b, c)); }
__device__ __forceinline__ double add_mul_rn(double a, double b, double c) { return __dadd_rn(a, __dmul_rn(b, c)); }

__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float abs_acc(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_acc(double v) { return fabs(v); }

}  // namespace cuda
}  // namespace xlard
