// Torch-free, CUDA-free logic of the CUDA provider that can be tested without a GPU:
// the kernels (device code), the launchers and the host glue include it, and
// tests/cpp/test_cuda_logic.cpp runs it on the host (in the CUDA compile check, and from
// tests/test_cuda_build.py). Keep it plain C++ (no CUDA headers, no torch).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

#if defined(__CUDACC__)
#define XLARD_LOGIC_HD __host__ __device__
#else
#define XLARD_LOGIC_HD
#endif

namespace xlard {
namespace cuda_logic {

// ---------------------------------------------------------------------------------
// Connected components: limits.
// ---------------------------------------------------------------------------------

// Largest map the CUDA kernel takes: pixel indices, areas and slot encodings are int32.
constexpr int64_t kComponentsMaxPixels = int64_t(1) << 30;

// component_stats sums column and row indices of up to 32 pixels per warp step in
// 32-bit lanes (__reduce_add_sync). An index is < 2^30, so the sum is split into its
// low 16 and high bits, each of which fits in 32 bits for 32 addends; the two partial
// sums are recombined in 64 bits. These asserts keep that true if the limit moves.
constexpr unsigned kIndexSplitBits = 16;
static_assert(32ull * ((1ull << kIndexSplitBits) - 1) <= 0xffffffffull, "low halves of 32 indices overflow");
static_assert(32ull * (static_cast<unsigned long long>(kComponentsMaxPixels - 1) >> kIndexSplitBits) <= 0xffffffffull,
              "high halves of 32 indices overflow");

// Sum of 32 indices the way the kernel computes it, from the two 32-bit partial sums.
XLARD_LOGIC_HD inline unsigned long long recombine_index_sum(unsigned low_sum, unsigned high_sum) {
  return (static_cast<unsigned long long>(high_sum) << kIndexSplitBits) + low_sum;
}

// ---------------------------------------------------------------------------------
// Connected components: global-memory path in waves.
// ---------------------------------------------------------------------------------

// Maps per launch on the global-memory path: the scratch (4 bytes per pixel plus the
// bitmask) is allocated for one wave and reused by the next (stream order), so it is
// bounded by max(budget, one map) instead of growing with the batch.
inline int64_t components_wave_maps(int64_t num_maps, int64_t bytes_per_map, int64_t budget_bytes) {
  if (num_maps <= 0) return 0;
  if (bytes_per_map <= 0) return num_maps;
  int64_t wave = budget_bytes / bytes_per_map;
  if (wave < 1) wave = 1;
  return wave < num_maps ? wave : num_maps;
}

// Default scratch budget of one call on the global-memory path (256 MiB: at least
// ~60 maps of 1024x1024 per wave, enough blocks to fill a large GPU).
constexpr int64_t kComponentsScratchBudgetBytes = int64_t(256) << 20;

// ---------------------------------------------------------------------------------
// component_stats: top-K selection by radix select over unique 64-bit keys.
// ---------------------------------------------------------------------------------

// Bits needed to write v (0 for 0).
XLARD_LOGIC_HD inline int bit_length(unsigned long long v) {
  int b = 0;
  while (v != 0) {
    ++b;
    v >>= 1;
  }
  return b;
}

// Key of a kept component: larger area first, then the smaller first pixel index.
// index_bits = bit_length(n - 1) for a map of n pixels, so keys are unique, >= 1, and
// decode back to (area, index).
XLARD_LOGIC_HD inline unsigned long long topk_key(int area, int index, int n, int index_bits) {
  return (static_cast<unsigned long long>(area) << index_bits) | static_cast<unsigned long long>(n - 1 - index);
}
XLARD_LOGIC_HD inline int topk_key_area(unsigned long long key, int index_bits) {
  return static_cast<int>(key >> index_bits);
}
XLARD_LOGIC_HD inline int topk_key_index(unsigned long long key, int n, int index_bits) {
  const unsigned long long mask = index_bits == 0 ? 0ull : ((1ull << index_bits) - 1ull);
  return n - 1 - static_cast<int>(key & mask);
}

constexpr int kRadixBins = 256;

// The K largest of a set of unique keys, found 8 bits at a time from the top: each pass
// histograms the digit of the keys that still match `prefix`, and step() picks the
// digit holding the K-th largest. The state is a few integers that every thread of a
// block updates identically from the same histogram (block-uniform by construction).
// When done, exactly K keys are >= threshold (or every key, when there are <= K).
struct RadixSelect {
  unsigned long long prefix = 0;     // the digits fixed so far
  unsigned long long threshold = 0;  // valid when done: the selection is key >= threshold
  int shift = 0;                     // bit position of the digit this pass histograms
  int remaining = 0;                 // keys still to take among those matching prefix
  bool done = false;

  // count: how many keys there are; key_bits: bit_length of the largest possible key.
  XLARD_LOGIC_HD void init(int k, int count, int key_bits) {
    prefix = 0;
    threshold = 0;
    remaining = k;
    done = count <= k;  // everything is selected: threshold 0 (every key is >= 1)
    shift = key_bits <= 8 ? 0 : ((key_bits + 7) / 8 - 1) * 8;
  }
  // Whether `key` takes part in this pass, and its digit.
  XLARD_LOGIC_HD bool matches(unsigned long long key) const {
    const int above = shift + 8;
    return above >= 64 || (key >> above) == prefix;
  }
  XLARD_LOGIC_HD int digit(unsigned long long key) const { return static_cast<int>((key >> shift) & 255ull); }
  // hist[d]: how many matching keys have digit d. Precondition: they number >= remaining.
  XLARD_LOGIC_HD void step(const int* hist) {
    int above = 0, d = kRadixBins - 1;
    for (; d > 0; --d) {
      if (above + hist[d] >= remaining) break;
      above += hist[d];
    }
    remaining -= above;
    prefix = (prefix << 8) | static_cast<unsigned long long>(d);
    if (hist[d] == remaining || shift == 0) {  // unique keys: a full key matches one key
      threshold = prefix << shift;
      done = true;
    } else {
      shift -= 8;
    }
  }
};

// Slot of a selected key in the output: how many selected keys are larger (keys are
// unique, so the slots are a permutation of 0..selected-1, largest key first).
XLARD_LOGIC_HD inline int topk_slot(const unsigned long long* keys, int selected, unsigned long long key) {
  int slot = 0;
  for (int m = 0; m < selected; ++m) slot += keys[m] > key ? 1 : 0;
  return slot;
}

// ---------------------------------------------------------------------------------
// A setting applied once per device (cudaFuncSetAttribute of the dynamic shared memory
// limit): std::call_once per device index, so two host threads can never interleave
// set(large) / set(small) / launch(large). The result (an error code, 0 = success) is
// remembered and returned to every later caller.
// ---------------------------------------------------------------------------------
template <int kMaxDevices = 256>
class PerDeviceOnce {
 public:
  // fn() -> int runs at most once per device in [0, kMaxDevices); its result is returned
  // to every caller. A device index outside the range gives `out_of_range` without fn.
  template <typename Fn>
  int run(int device, int out_of_range, Fn&& fn) {
    if (device < 0 || device >= kMaxDevices) return out_of_range;
    std::call_once(flags_[device], [&] { results_[device].store(fn(), std::memory_order_release); });
    return results_[device].load(std::memory_order_acquire);
  }

 private:
  std::once_flag flags_[kMaxDevices];
  std::atomic<int> results_[kMaxDevices] = {};
};

}  // namespace cuda_logic
}  // namespace xlard
