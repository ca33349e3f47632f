// Launch configuration and element-type dispatch of the connected-components kernel
// (torch-free). The kernel itself: components_kernel.cuh, instantiated in
// components_<types>.cu.
#include "components_kernel.cuh"

namespace xlard {
namespace cuda {
namespace components_detail {
template <typename T>
cudaError_t launch_components_typed(const ComponentsParams& p, size_t shared_bytes, cudaStream_t stream);
extern template cudaError_t launch_components_typed<__half>(const ComponentsParams&, size_t, cudaStream_t);
extern template cudaError_t launch_components_typed<__nv_bfloat16>(const ComponentsParams&, size_t, cudaStream_t);
extern template cudaError_t launch_components_typed<float>(const ComponentsParams&, size_t, cudaStream_t);
extern template cudaError_t launch_components_typed<double>(const ComponentsParams&, size_t, cudaStream_t);
extern template cudaError_t launch_components_typed<uint8_t>(const ComponentsParams&, size_t, cudaStream_t);
}  // namespace components_detail

int components_block_threads(int64_t pixels) {
  if (pixels <= 2048) return 256;
  if (pixels <= 8192) return 512;
  return 1024;
}

size_t components_shared_bytes(int height, int width, int max_components, bool global_path) {
  size_t bytes = components_detail::fixed_bytes(max_components);
  if (!global_path) {
    const size_t words = static_cast<size_t>(height) * components_words_per_row(width);
    bytes += words * sizeof(uint32_t) + static_cast<size_t>(height) * width * sizeof(int32_t);
  }
  return bytes;
}

cudaError_t launch_components(Kind kind, const ComponentsParams& params, size_t shared_bytes, cudaStream_t stream) {
  using namespace components_detail;
  switch (kind) {
    case Kind::kHalf: return launch_components_typed<__half>(params, shared_bytes, stream);
    case Kind::kBFloat16: return launch_components_typed<__nv_bfloat16>(params, shared_bytes, stream);
    case Kind::kFloat: return launch_components_typed<float>(params, shared_bytes, stream);
    case Kind::kDouble: return launch_components_typed<double>(params, shared_bytes, stream);
    case Kind::kByte: return launch_components_typed<uint8_t>(params, shared_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace xlard
