// Float32 row kernels of the correction ops, compiled once per x86 vector level and
// chosen at run time (the extension itself is built for the baseline ISA, so one wheel
// runs everywhere and still uses AVX2 / AVX-512 where the CPU has them).
//
// Torch-free: raw pointers and sizes. The kernels themselves live in simd_rows.inc,
// included by simd_baseline.cpp, simd_avx2.cpp and simd_avx512.cpp.
#pragma once

#include <cstdint>
#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define XLARD_SIMD_X86 1  // the AVX2 / AVX-512 variants are compiled
#else
#define XLARD_SIMD_X86 0
#endif

namespace xlard::simd {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// One vector level's kernels. Both process positions [0, n) of one channel row, with n
// a multiple of `width` (the caller does any remainder with scalar code). `first`: the
// row is its block's first channel, so it writes the LAM instead of adding to it.
// `stream`: write zc (and delta) with non-temporal stores; then zc and delta must be
// aligned to 64 bytes.
struct RowKernels {
  // zc = z0 + alpha * delta, lam (+)= |delta|.
  void (*correct)(const float* z0, const float* delta, float alpha, float* zc, float* lam, int64_t n, bool first,
                  bool stream);
  // delta = mean + std * noise, zc = z0 + alpha * delta, lam (+)= |delta|; returns the
  // row's sum of -0.5 * noise^2. std: stdv[0] for the whole row if const_std, else
  // stdv[s] per position.
  float (*sample)(const float* z0, const float* mean, const float* noise, const float* stdv, bool const_std,
                  float alpha, float* zc, float* delta, float* lam, int64_t n, bool first, bool stream);
  int64_t width;  // floats per vector
  Isa isa;
};

// The best level this CPU (and its OS) supports.
Isa detected_isa();

// The level in use: detected_isa(), capped by XLARD_CPU_ISA (baseline | avx2 | avx512). The
// kernels never read the environment themselves (a getenv racing a setenv on another thread
// crashed the process): the variable is read once when the library loads, and set_isa_cap()
// changes the cap at run time (xlard.ops hands it os.environ's value, under the GIL, whenever
// that changed). An unknown value sets *error and returns the detected level.
Isa active_isa(std::string* error);

// The cap from XLARD_CPU_ISA's text (nullptr or "" = no cap). An unknown value is kept and
// reported by active_isa() until a valid one (or none) is set. Thread-safe.
void set_isa_cap(const char* text);

const char* isa_name(Isa isa);
const RowKernels& row_kernels(Isa isa);

}  // namespace xlard::simd
