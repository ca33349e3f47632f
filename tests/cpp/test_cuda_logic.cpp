// Host tests of csrc/cuda/logic.h, the GPU-free logic of the CUDA provider (issue 14):
// the once-per-device shared-memory setting under concurrent callers, the wave plan of
// the global-memory path, the widened index sums of component_stats, and the top-K radix
// select run exactly as the kernel runs it (same RadixSelect, histograms counted here)
// against std::sort. Built and run by .ci/cuda_compile_check.sh and
// tests/test_cuda_build.py; needs only a C++20 compiler.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "check.h"
#include "cuda/logic.h"

namespace lg = xlard::cuda_logic;

// The dynamic shared-memory limit of a kernel, modelled per device: the setter runs once
// per device (even with many threads racing), always to the opt-in maximum, so no launch
// of an allowed size can ever see a smaller limit.
static void test_per_device_once() {
  constexpr int kDevices = 4, kThreads = 16, kCalls = 2000;
  lg::PerDeviceOnce<8> once;
  std::atomic<int> setter_runs[kDevices] = {};
  std::atomic<int> limit[kDevices] = {};
  const int optin[kDevices] = {232448, 101376, 232448, 166912};
  std::atomic<int> launch_failures{0}, wrong_results{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < kCalls; ++i) {
        const int dev = static_cast<int>(rng() % kDevices);
        const int need = static_cast<int>(rng() % optin[dev]) + 1;  // any size the host allows
        const int r = once.run(dev, -1, [&] {
          setter_runs[dev].fetch_add(1);
          limit[dev].store(optin[dev]);
          return 0;
        });
        if (r != 0) wrong_results.fetch_add(1);
        if (limit[dev].load() < need) launch_failures.fetch_add(1);  // "invalid argument" on a GPU
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int d = 0; d < kDevices; ++d) {
    CHECK(setter_runs[d].load() == 1, "device %d: setter ran %d times", d, setter_runs[d].load());
    CHECK(limit[d].load() == optin[d], "device %d: limit %d, want the opt-in maximum %d", d, limit[d].load(), optin[d]);
  }
  CHECK(launch_failures.load() == 0, "%d launches saw a smaller limit than they needed", launch_failures.load());
  CHECK(wrong_results.load() == 0, "%d callers got a result other than the setter's", wrong_results.load());

  // A failing setter's error is remembered; out-of-range devices never run the setter.
  int runs = 0;
  CHECK(once.run(5, -1, [&] { ++runs; return 98; }) == 98, "first result");
  CHECK(once.run(5, -1, [&] { ++runs; return 0; }) == 98, "the remembered result");
  CHECK(runs == 1, "setter ran %d times", runs);
  CHECK(once.run(8, -7, [&] { ++runs; return 0; }) == -7 && runs == 1, "device 8 is out of range");
  CHECK(once.run(-1, -7, [&] { ++runs; return 0; }) == -7 && runs == 1, "device -1 is out of range");
}

static void test_waves() {
  const int64_t mib = int64_t(1) << 20;
  const int64_t per_map = (1024 * 1024 + 1024 * 32) * 4;  // a 1024x1024 map's scratch
  struct Case {
    int64_t maps, per_map, budget;
  } cases[] = {{1, per_map, 256 * mib}, {500, per_map, 256 * mib}, {7, per_map, 0}, {3, 8 * per_map, per_map},
               {100, 4, 400},         {100, 4, 399},              {0, per_map, 1}, {5, 0, 0},
               {1 << 20, 100, 1 << 30}};
  for (const Case& c : cases) {
    const int64_t wave = lg::components_wave_maps(c.maps, c.per_map, c.budget);
    if (c.maps == 0) {
      CHECK(wave == 0, "no maps: wave %lld", static_cast<long long>(wave));
      continue;
    }
    CHECK(wave >= 1 && wave <= c.maps, "wave %lld of %lld maps", static_cast<long long>(wave),
          static_cast<long long>(c.maps));
    // Scratch bounded by the budget, or by one map when one map alone exceeds it.
    CHECK(wave * c.per_map <= std::max(c.budget, c.per_map), "scratch %lld over budget %lld",
          static_cast<long long>(wave * c.per_map), static_cast<long long>(c.budget));
    // As many maps per wave as the budget allows (no needless extra launches).
    CHECK(wave == c.maps || c.per_map == 0 || (wave + 1) * c.per_map > c.budget, "wave %lld could be larger",
          static_cast<long long>(wave));
    int64_t covered = 0, launches = 0;
    for (int64_t first = 0; first < c.maps; first += wave) {
      covered += std::min(wave, c.maps - first);
      ++launches;
    }
    CHECK(covered == c.maps, "waves cover %lld of %lld maps", static_cast<long long>(covered),
          static_cast<long long>(c.maps));
  }
  CHECK(lg::components_wave_maps(500, per_map, lg::kComponentsScratchBudgetBytes) * per_map <=
            lg::kComponentsScratchBudgetBytes,
        "default budget");
}

static void test_index_sums() {
  std::mt19937 rng(3);
  const unsigned max_index = static_cast<unsigned>(lg::kComponentsMaxPixels - 1);
  bool naive_overflowed = false;
  for (int trial = 0; trial < 2000; ++trial) {
    const int lanes = 1 + static_cast<int>(rng() % 32);
    unsigned lo = 0, hi = 0, naive = 0;
    unsigned long long want = 0;
    for (int l = 0; l < lanes; ++l) {
      const unsigned v = trial % 3 == 0 ? max_index - (rng() % 4) : static_cast<unsigned>(rng() % (max_index + 1u));
      lo += v & ((1u << lg::kIndexSplitBits) - 1u);  // 32-bit lanes, as __reduce_add_sync adds
      hi += v >> lg::kIndexSplitBits;
      naive += v;
      want += v;
    }
    CHECK(lg::recombine_index_sum(lo, hi) == want, "trial %d: %llu vs %llu", trial, lg::recombine_index_sum(lo, hi),
          want);
    naive_overflowed = naive_overflowed || naive != want;
  }
  CHECK(naive_overflowed, "the test never reaches the 32-bit overflow it guards against");
}

// One block's top-K, as the kernel computes it: key per kept component, RadixSelect
// passes over histograms of the matching keys, gather keys >= threshold, slot by rank.
static std::vector<std::pair<int, int>> kernel_topk(const std::vector<std::pair<int, int>>& comps, int n, int k,
                                                    int* passes) {
  const int count = static_cast<int>(comps.size());
  int max_area = 0;
  for (const auto& c : comps) max_area = std::max(max_area, c.first);
  const int index_bits = lg::bit_length(static_cast<unsigned long long>(n - 1));
  const int key_bits = lg::bit_length(static_cast<unsigned long long>(max_area)) + index_bits;
  lg::RadixSelect rs;
  rs.init(k, count, key_bits);
  *passes = 0;
  while (!rs.done) {
    int hist[lg::kRadixBins] = {};
    for (const auto& c : comps) {
      const unsigned long long key = lg::topk_key(c.first, c.second, n, index_bits);
      if (rs.matches(key)) ++hist[rs.digit(key)];
    }
    rs.step(hist);
    ++*passes;
  }
  std::vector<unsigned long long> keys;
  for (const auto& c : comps) {
    const unsigned long long key = lg::topk_key(c.first, c.second, n, index_bits);
    if (key >= rs.threshold) keys.push_back(key);
  }
  const int selected = std::min(count, k);
  CHECK(static_cast<int>(keys.size()) == selected, "gathered %zu keys, want %d (count %d, K %d)", keys.size(), selected,
        count, k);
  std::vector<std::pair<int, int>> out(keys.size(), {-1, -1});
  std::vector<int> used(keys.size(), 0);
  for (unsigned long long key : keys) {
    const int slot = lg::topk_slot(keys.data(), static_cast<int>(keys.size()), key);
    if (slot < 0 || slot >= static_cast<int>(keys.size()) || used[slot]++) {
      CHECK(false, "slot %d out of range or used twice", slot);
      continue;
    }
    out[slot] = {lg::topk_key_area(key, index_bits), lg::topk_key_index(key, n, index_bits)};
  }
  return out;
}

static void test_topk() {
  std::mt19937 rng(11);
  int cases = 0, max_passes = 0;
  auto run = [&](std::vector<std::pair<int, int>> comps, int n, int k) {
    std::vector<std::pair<int, int>> want = comps;
    std::sort(want.begin(), want.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    want.resize(std::min<size_t>(want.size(), static_cast<size_t>(k)));
    int passes = 0;
    const auto got = kernel_topk(comps, n, k, &passes);
    max_passes = std::max(max_passes, passes);
    CHECK(got == want, "n %d K %d count %zu: top-K differs", n, k, comps.size());
    ++cases;
  };
  // Random maps' worth of components: distinct first-pixel indices, any areas.
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + static_cast<int>(rng() % (trial % 4 == 0 ? (1u << 20) : 5000u));
    const int count = static_cast<int>(rng() % std::min(n, 400)) + (n > 0 ? 0 : 0);
    std::vector<int> idx(n);
    for (int i = 0; i < n; ++i) idx[i] = i;
    std::vector<std::pair<int, int>> comps;
    for (int c = 0; c < count; ++c) {
      std::swap(idx[c], idx[c + rng() % (n - c)]);
      const int area = trial % 3 == 0 ? 1 + static_cast<int>(rng() % 3) : 1 + static_cast<int>(rng() % n);
      comps.push_back({area, idx[c]});
    }
    for (int k : {1, 2, 3, 16, count - 1, count, count + 1, 1 + static_cast<int>(rng() % 64)}) {
      if (k >= 1) run(comps, n, k);
    }
  }
  // Edges: one pixel; a 1024x1024 checkerboard's 2^19 single-pixel components; the
  // largest map (2^30 pixels) with one component covering nearly all of it.
  run({{1, 0}}, 1, 1);
  std::vector<std::pair<int, int>> checker;
  for (int i = 0; i < (1 << 20); i += 2) checker.push_back({1, i});
  run(checker, 1 << 20, 16);
  run(checker, 1 << 20, 1000);
  const int big = static_cast<int>(lg::kComponentsMaxPixels);
  run({{big - 3, 0}, {1, big - 1}, {1, big - 3}, {2, 5}}, big, 2);
  run({{big - 3, 0}, {1, big - 1}, {1, big - 3}, {2, 5}}, big, 3);
  CHECK(max_passes <= 8, "a radix select took %d passes (64-bit keys need at most 8)", max_passes);
  std::printf("top-K: %d cases, at most %d passes\n", cases, max_passes);
}

int main() {
  test_per_device_once();
  test_waves();
  test_index_sums();
  test_topk();
  if (failures == 0) std::printf("test_cuda_logic: all passed\n");
  return failures == 0 ? 0 : 1;
}
