// Which vector level the correction kernels run at: the CPU's best, capped by
// XLARD_CPU_ISA. See simd.h.
#include "cpu/simd.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

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

namespace {

std::atomic<int> g_cap{-1};          // the capping level, -1 for none
std::atomic<bool> g_cap_bad{false};  // the last text given was no level (g_bad_text)
std::mutex g_bad_mu;
std::string g_bad_text;

// XLARD_CPU_ISA as the process started (read once, while the library loads).
const bool g_cap_loaded = (set_isa_cap(std::getenv("XLARD_CPU_ISA")), true);

}  // namespace

void set_isa_cap(const char* text) {
  if (text == nullptr || *text == '\0') {
    g_cap.store(-1);
    g_cap_bad.store(false, std::memory_order_release);
    return;
  }
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(text, isa_name(isa)) == 0) {
      g_cap.store(static_cast<int>(isa));
      g_cap_bad.store(false, std::memory_order_release);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lock(g_bad_mu);
    g_bad_text = text;
  }
  g_cap_bad.store(true, std::memory_order_release);
}

Isa active_isa(std::string* error) {
  (void)g_cap_loaded;
  const Isa best = detected_isa();
  if (g_cap_bad.load(std::memory_order_acquire)) {
    if (error != nullptr) {
      std::lock_guard<std::mutex> lock(g_bad_mu);
      *error = "XLARD_CPU_ISA must be one of baseline, avx2, avx512 (or unset), got '" + g_bad_text + "'";
    }
    return best;
  }
  const int cap = g_cap.load();
  if (cap < 0) return best;
  return cap < static_cast<int>(best) ? static_cast<Isa>(cap) : best;
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
