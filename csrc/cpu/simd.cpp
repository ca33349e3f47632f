// Which vector level the correction kernels run at: the CPU's best, capped by
// XLARD_CPU_ISA. See simd.h.
#include "cpu/simd.h"

#include <cstdlib>
#include <cstring>

namespace xlard::simd {

namespace baseline {
extern const RowKernels kRows;
}
#if XLARD_SIMD_X86
namespace avx2 {
extern const RowKernels kRows;
}
namespace avx512 {
extern const RowKernels kRows;
}
#endif

Isa detected_isa() {
#if XLARD_SIMD_X86
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers.
  static const Isa isa = __builtin_cpu_supports("avx512f")                                   ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2")                                    ? Isa::kAvx2
                                                                                             : Isa::kBaseline;
  return isa;
#else
  return Isa::kBaseline;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      break;
  }
  return "baseline";
}

Isa active_isa(std::string* error) {
  const Isa best = detected_isa();
  const char* cap = std::getenv("XLARD_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(cap, isa_name(isa)) == 0) return static_cast<int>(isa) < static_cast<int>(best) ? isa : best;
  }
  if (error != nullptr) {
    *error = std::string("XLARD_CPU_ISA must be one of baseline, avx2, avx512 (or unset), got '") + cap + "'";
  }
  return best;
}

const RowKernels& row_kernels(Isa isa) {
#if XLARD_SIMD_X86
  if (isa == Isa::kAvx512) return avx512::kRows;
  if (isa == Isa::kAvx2) return avx2::kRows;
#endif
  (void)isa;
  return baseline::kRows;
}

}  // namespace xlard::simd
