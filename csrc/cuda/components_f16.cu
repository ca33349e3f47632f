// Instantiations of the connected-components kernel for: __half __nv_bfloat16.
// One file per few types keeps each nvcc invocation short (compile time matters on 2 cores).
#include "components_kernel.cuh"

namespace xlard {
namespace cuda {
namespace components_detail {
template cudaError_t launch_components_typed<__half>(const ComponentsParams&, size_t, cudaStream_t);
template cudaError_t launch_components_typed<__nv_bfloat16>(const ComponentsParams&, size_t, cudaStream_t);
}  // namespace components_detail
}  // namespace cuda
}  // namespace xlard
