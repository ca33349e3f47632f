// simd_rows.inc for the ISA the extension is built for: SSE2 on x86-64 (always there),
// plain scalar code elsewhere.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

#if defined(__SSE2__)
#include <immintrin.h>
#define XLARD_SIMD_LEVEL 1
#define XLARD_SIMD_ISA ::xlard::simd::Isa::kBaseline
#else
#define XLARD_SIMD_LEVEL 0
#define XLARD_SIMD_ISA ::xlard::simd::Isa::kBaseline
#endif
#define XLARD_SIMD_NS baseline
#include "cpu/simd_rows.inc"
