// The compiled part of the torch-free labelling core: explicit instantiations of the
// thresholding templates for the plain C++ types, so the CMake library (xlard_core)
// and its ctest suite build without torch. The extension instantiates the same
// templates for c10::Half and c10::BFloat16 in csrc/cpu/components.cpp.
#include "core/components.h"

namespace xlard {
namespace core {

template void threshold_map<float, float>(const float*, int64_t, Mode, double, uint8_t*, std::vector<uint8_t>&);
template void threshold_map<double, double>(const double*, int64_t, Mode, double, uint8_t*, std::vector<uint8_t>&);
template void threshold_map<uint8_t, float>(const uint8_t*, int64_t, Mode, double, uint8_t*, std::vector<uint8_t>&);
template void threshold_map<bool, float>(const bool*, int64_t, Mode, double, uint8_t*, std::vector<uint8_t>&);

}  // namespace core
}  // namespace xlard
