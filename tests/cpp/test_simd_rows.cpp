// Unit tests of the torch-free float32 row kernels (csrc/cpu/simd.h), run by ctest (in CI
// under AddressSanitizer and UBSan, so a vector or chunk loop that reads or writes past a
// row shows). Every level this CPU runs is checked against a plain scalar loop with the
// same arithmetic (multiply, then add): zc, delta and the LAM must match bitwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/simd.h"

using xlard::simd::Isa;
using xlard::simd::RowKernels;

// An exactly sized, 64-byte aligned float buffer (so the sanitizer sees any overrun).
struct Buffer {
  explicit Buffer(int64_t n) : n(n), p(static_cast<float*>(std::aligned_alloc(64, round_up(n)))) {}
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  static size_t round_up(int64_t n) { return (static_cast<size_t>(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64; }
  int64_t n;
  float* p;
};

static void fill(Buffer& b, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t i = 0; i < b.n; ++i) b.p[i] = dist(rng);
}

static bool same_bits(const float* a, const float* b, int64_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

static void check_level(const RowKernels& k, int64_t n, bool stream, std::mt19937& rng) {
  Buffer z0(n), delta(n), zc(n), zc_want(n), lam(n), lam_want(n), mean(n), noise(n), stdv(n), d_out(n), d_want(n);
  for (Buffer* b : {&z0, &delta, &mean, &noise, &stdv}) fill(*b, rng);
  for (int64_t i = 0; i < n; ++i) stdv.p[i] = std::exp(0.3f * stdv.p[i]);
  const float alpha = 0.37f;
  const char* name = xlard::simd::isa_name(k.isa);
  for (const bool first : {true, false}) {
    for (int64_t i = 0; i < n; ++i) lam.p[i] = lam_want.p[i] = 0.5f;  // what a previous channel left
    k.correct(z0.p, delta.p, alpha, zc.p, lam.p, n, first, stream);
    for (int64_t i = 0; i < n; ++i) {
      zc_want.p[i] = z0.p[i] + alpha * delta.p[i];
      lam_want.p[i] = first ? std::fabs(delta.p[i]) : lam_want.p[i] + std::fabs(delta.p[i]);
    }
    CHECK(same_bits(zc.p, zc_want.p, n), "%s correct zc, n=%lld stream=%d first=%d", name, (long long)n, stream, first);
    CHECK(same_bits(lam.p, lam_want.p, n), "%s correct lam, n=%lld stream=%d first=%d", name, (long long)n, stream,
          first);
    for (const bool const_std : {true, false}) {
      for (int64_t i = 0; i < n; ++i) lam.p[i] = lam_want.p[i] = 0.5f;
      const float got = k.sample(z0.p, mean.p, noise.p, stdv.p, const_std, alpha, zc.p, d_out.p, lam.p, n, first, stream);
      double want = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const float sd = const_std ? stdv.p[0] : stdv.p[i];
        d_want.p[i] = mean.p[i] + sd * noise.p[i];
        zc_want.p[i] = z0.p[i] + alpha * d_want.p[i];
        lam_want.p[i] = first ? std::fabs(d_want.p[i]) : lam_want.p[i] + std::fabs(d_want.p[i]);
        want += -0.5 * static_cast<double>(noise.p[i]) * noise.p[i];
      }
      CHECK(same_bits(d_out.p, d_want.p, n), "%s sample delta, n=%lld stream=%d", name, (long long)n, stream);
      CHECK(same_bits(zc.p, zc_want.p, n), "%s sample zc, n=%lld stream=%d", name, (long long)n, stream);
      CHECK(same_bits(lam.p, lam_want.p, n), "%s sample lam, n=%lld stream=%d first=%d", name, (long long)n, stream,
            first);
      CHECK(std::fabs(got - want) <= 1e-4 * (1.0 + std::fabs(want)), "%s sample log-density %g vs %g, n=%lld", name,
            got, want, (long long)n);
    }
  }
}

int main() {
  std::mt19937 rng(7);
  const Isa best = xlard::simd::detected_isa();
  std::printf("detected level: %s\n", xlard::simd::isa_name(best));
  int levels = 0;
  for (const Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) continue;
    const RowKernels& k = xlard::simd::row_kernels(isa);
    CHECK(k.isa == isa, "row_kernels(%s) gave %s", xlard::simd::isa_name(isa), xlard::simd::isa_name(k.isa));
    ++levels;
    // Lengths (multiples of the width, as the callers pass): none, one vector, around the
    // 128-position chunks of the streamed sample rows, and long rows.
    for (const int64_t vectors : {0, 1, 2, 15, 16, 17, 31, 33, 257, 4099}) {
      const int64_t n = vectors * k.width;
      for (const bool stream : {false, true}) check_level(k, n, stream, rng);
    }
  }
  // An unknown cap is reported, never silently used; the kernels never read the environment
  // themselves (set_isa_cap() takes the variable's text).
  xlard::simd::set_isa_cap("sse9");
  std::string error;
  CHECK(xlard::simd::active_isa(&error) == best && !error.empty(), "unknown XLARD_CPU_ISA not reported");
  xlard::simd::set_isa_cap("baseline");
  error.clear();
  CHECK(xlard::simd::active_isa(&error) == Isa::kBaseline && error.empty(), "XLARD_CPU_ISA=baseline not honoured");
  setenv("XLARD_CPU_ISA", "sse9", 1);  // read once at load: a later setenv changes nothing by itself
  CHECK(xlard::simd::active_isa(&error) == Isa::kBaseline && error.empty(), "the environment read on a call");
  unsetenv("XLARD_CPU_ISA");
  xlard::simd::set_isa_cap(nullptr);
  CHECK(xlard::simd::active_isa(&error) == best && error.empty(), "no cap after set_isa_cap(nullptr)");
  std::printf("%d level(s) checked, %d failure(s)\n", levels, failures);
  return failures == 0 ? 0 : 1;
}
