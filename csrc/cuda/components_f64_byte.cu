// Instantiations of the connected-components kernel for: double uint8_t.
// One file per few types keeps each nvcc invocation short (compile time matters on 2 cores).
#include "components_kernel.cuh"

namespace xlard {
namespace cuda {
namespace components_detail {
template cudaError_t launch_components_typed<double>(const ComponentsParams&, size_t, cudaStream_t);
template cudaError_t launch_components_typed<uint8_t>(const ComponentsParams&, size_t, cudaStream_t);
}  // namespace components_detail
}  // namespace cuda
}  // namespace xlard
