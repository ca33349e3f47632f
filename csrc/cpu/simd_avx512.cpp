// simd_rows.inc compiled for AVX-512F (used only where detected_isa() says the CPU and
// the OS support it).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

#if XLARD_SIMD_X86
#include <immintrin.h>
// Everything above (system and project headers) keeps the baseline ISA; only the
// kernels below are compiled for AVX-512F.
#pragma GCC target("avx512f,avx2")
#define XLARD_SIMD_LEVEL 3
#define XLARD_SIMD_ISA ::xlard::simd::Isa::kAvx512
#define XLARD_SIMD_NS avx512
#include "cpu/simd_rows.inc"
#endif
