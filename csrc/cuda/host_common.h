// Helpers shared by the torch-facing CUDA glue (csrc/cuda/*_host.cpp): element kinds,
// device checks, the current stream. Host-only; compiled by the C++ compiler.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE/cuSOLVER
// headers, which minimal toolkits (and the CI image) do not have.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

#include "checks.h"
#include "launchers.cuh"

namespace xlard {
namespace cuda_host {

using checks::acc_dtype;
using checks::check_same_device;
using checks::is_float_type;

inline cuda::Kind kind_of(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return cuda::Kind::kHalf;
    case at::kBFloat16: return cuda::Kind::kBFloat16;
    case at::kFloat: return cuda::Kind::kFloat;
    case at::kDouble: return cuda::Kind::kDouble;
    case at::kByte:
    case at::kBool: return cuda::Kind::kByte;
    default: TORCH_CHECK(false, "xlard: no CUDA kernel for dtype ", st);
  }
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "xlard.", op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
}

// The current stream of the current device (what at::cuda::getCurrentCUDAStream() returns).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Opt-in shared memory per block of the current device, in bytes (queried once per
// device; a host attribute query, no synchronization).
inline int64_t shared_memory_per_block_optin() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cached[kMaxDevices] = {};
  const c10::DeviceIndex device = c10::cuda::current_device();
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int64_t known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (cacheable) cached[device].store(bytes, std::memory_order_relaxed);
  return bytes;
}

}  // namespace cuda_host
}  // namespace xlard
