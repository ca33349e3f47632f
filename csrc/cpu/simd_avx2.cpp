// simd_rows.inc compiled for AVX2 (used only where detected_isa() says the CPU has it).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

#if XLARD_SIMD_X86
#include <immintrin.h>
// Everything above (system and project headers) keeps the baseline ISA; only the
// kernels below are compiled for AVX2.
#pragma GCC target("avx2")
#define XLARD_SIMD_LEVEL 2
#define XLARD_SIMD_ISA ::xlard::simd::Isa::kAvx2
#define XLARD_SIMD_NS avx2
#include "cpu/simd_rows.inc"
#endif
