// The connected-components kernel (torch-free): one thread block per map, the whole
// batch in one launch. Included only by the components_*.cu files, each of which
// instantiates it for some element types (split so that nvcc's work is spread over
// several translation units).
//
// Per map, in one block:
//   1. thresholding (absolute / relative-to-max / Otsu, decisions bit-identical to
//      csrc/core/components.h), written as a bitmask of 32-pixel words per row;
//   2. union-find over pixel indices: every pixel starts pointing at the first pixel of
//      its horizontal run (found with bit tricks on the mask), runs are joined to the
//      row above with lock-free atomicMin linking, so a root is always the smallest
//      index of its set, i.e. the component's first pixel in raster order;
//   3. flattening, areas (warp-aggregated atomics), min_area filter, raster-order ranks
//      by a block scan over the roots, then labels / counts / top-K stats.
// The per-pixel arrays (parent, bitmask) live in shared memory when they fit, else in a
// global scratch buffer (same code through generic pointers). No host synchronization;
// results are deterministic (they do not depend on thread scheduling): the final roots
// are the sets' smallest indices whatever order the unions ran in.
#pragma once

#include "launchers.cuh"
#include "device_utils.cuh"
#include "logic.h"

#include <climits>
#include <type_traits>

namespace xlard {
namespace cuda {
namespace components_detail {

constexpr int kBins = 256;

struct BlockScratch {
  long long ll[32];
  unsigned long long ull[32];
  double dbl[32];
  int ints[32];
  int hist[kBins];
  long long scan_w[8];
  long long scan_s[8];
};

__host__ __device__ constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Shared-memory layout: [BlockScratch][sum_x K][sum_y K][sel_root K][sel_area K][bits][parent]
__host__ __device__ inline size_t fixed_bytes(int max_components) {
  return align_up(align_up(sizeof(BlockScratch), 16) + static_cast<size_t>(max_components) * 24, 16);
}

__device__ __forceinline__ bool test_bit(const uint32_t* row, int col) { return (row[col >> 5] >> (col & 31)) & 1u; }

// First column of the horizontal foreground run that contains `col` (which is foreground).
__device__ __forceinline__ int run_start(const uint32_t* row, int col) {
  int w = col >> 5;
  uint32_t zeros = ~row[w] & ((1u << (col & 31)) - 1u);
  while (zeros == 0u && w > 0) {
    --w;
    zeros = ~row[w];
  }
  if (zeros == 0u) return 0;
  return (w << 5) + (31 - __clz(zeros)) + 1;
}

// While unions run, every access to `parent` is an atomic operation (a relaxed RMW for
// loads): race-free under the CUDA memory model and clean under compute-sanitizer's
// racecheck, at the price of shared-memory atomics in the (short) union phase.
__device__ __forceinline__ int load_parent(int* parent, int x) { return atomicOr(&parent[x], 0); }

// Root of x, with path splitting. Lowering parent[x] to its grandparent with atomicMin
// is safe while other threads link roots: the grandparent is in x's tree and smaller
// than x, values only decrease, and only roots are linked.
__device__ __forceinline__ int find_root(int* parent, int x) {
  int px = load_parent(parent, x);
  while (px != x) {
    const int gx = load_parent(parent, px);
    if (gx != px) atomicMin(&parent[x], gx);
    x = px;
    px = gx;
  }
  return x;
}

// Joins the sets of a and b: the larger root is linked under the smaller index with
// atomicMin; if it stopped being a root meanwhile, retry from what it points to.
__device__ __forceinline__ void unite(int* parent, int a, int b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  while (a != b) {
    if (a < b) {
      const int t = a;
      a = b;
      b = t;
    }
    const int old = atomicMin(&parent[a], b);
    if (old == a) return;
    a = find_root(parent, old);
    b = find_root(parent, b);
  }
}

// Otsu split of sc.hist over 256 threads (blockDim.x >= 256): inclusive scans of the
// counts and the bin-weighted counts, the csrc/core/components.h score per split, and
// the first split with the largest score. -1 when no split has two non-empty classes.
__device__ inline int otsu_split_block(BlockScratch& sc) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const long long h = t < kBins ? sc.hist[t] : 0;
  long long w0 = h, s0 = h * t;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long a = __shfl_up_sync(kFullMask, w0, o);
    const long long b = __shfl_up_sync(kFullMask, s0, o);
    if (lane >= o) {
      w0 += a;
      s0 += b;
    }
  }
  if (t < kBins && lane == 31) {
    sc.scan_w[warp] = w0;
    sc.scan_s[warp] = s0;
  }
  __syncthreads();
  long long total_n = 0, total_s = 0, pre_w = 0, pre_s = 0;
#pragma unroll
  for (int j = 0; j < kBins / 32; ++j) {
    total_n += sc.scan_w[j];
    total_s += sc.scan_s[j];
    if (j < warp) {
      pre_w += sc.scan_w[j];
      pre_s += sc.scan_s[j];
    }
  }
  w0 += pre_w;
  s0 += pre_s;
  double score = -1.0;
  if (t < kBins - 1) {
    const long long w1 = total_n - w0;
    if (w0 != 0 && w1 != 0) {
      const long long s1 = total_s - s0;
      const long long d = s0 * w1 - s1 * w0;
      score = __ddiv_rn(__dmul_rn(static_cast<double>(d), static_cast<double>(d)), static_cast<double>(w0 * w1));
    }
  }
  int best_t = t;
  // Larger score wins; equal scores go to the smaller split (the CPU keeps the first).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double os = __shfl_xor_sync(kFullMask, score, o);
    const int ot = __shfl_xor_sync(kFullMask, best_t, o);
    if (os > score || (os == score && ot < best_t)) {
      score = os;
      best_t = ot;
    }
  }
  __syncthreads();  // sc.dbl / sc.ints may still be read by an earlier reduction
  if (lane == 0) {
    sc.dbl[warp] = score;
    sc.ints[warp] = best_t;
  }
  __syncthreads();
  score = -1.0;
  best_t = INT_MAX;
  const int warps = blockDim.x >> 5;
  for (int j = 0; j < warps; ++j) {
    const double os = sc.dbl[j];
    const int ot = sc.ints[j];
    if (os > score || (os == score && ot < best_t)) {
      score = os;
      best_t = ot;
    }
  }
  return score < 0.0 ? -1 : best_t;
}

// halved: hi - lo overflowed, so lo and span hold lo / 2 and hi / 2 - lo / 2 and v is halved too (docs/ops.md).
// The clamp happens in double, before the cast (a NaN or huge double cast to int is undefined).
template <typename A>
__device__ __forceinline__ int otsu_bin(A v, double lo, double span, bool halved) {
  const double x = halved ? __dmul_rn(static_cast<double>(v), 0.5) : static_cast<double>(v);
  const double scaled = floor(__dmul_rn(__ddiv_rn(__dsub_rn(x, lo), span), 256.0));
  if (!(scaled > 0.0)) return 0;
  return scaled > static_cast<double>(kBins - 1) ? kBins - 1 : static_cast<int>(scaled);
}

// How one block decides foreground for its map; every field is block-uniform.
template <typename A>
struct Threshold {
  ThresholdMode mode;
  bool none;   // no foreground at all
  A cut;       // absolute / relative
  double lo;   // Otsu
  double span; // hi - lo (or hi / 2 - lo / 2 when halved)
  bool halved; // hi - lo overflowed: lo, span and every value are taken at half
  int split;   // Otsu t*
};

template <typename T>
__device__ Threshold<acc_t<T>> make_threshold(const T* src, int n, const ComponentsParams& p, BlockScratch& sc) {
  using A = acc_t<T>;
  Threshold<A> th;
  th.mode = p.mode;
  th.none = false;
  th.cut = std::is_same<A, double>::value ? static_cast<A>(p.threshold_d) : static_cast<A>(p.threshold_f);
  th.lo = 0.0;
  th.span = 1.0;
  th.halved = false;
  th.split = -1;
  if (p.mode == ThresholdMode::kAbsolute) return th;
  long long kmax = LLONG_MIN, kmin = LLONG_MAX;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const A v = to_acc(src[i]);
    if (is_finite_bits(v)) {
      const long long k = order_key(v);
      kmax = k > kmax ? k : kmax;
      kmin = k < kmin ? k : kmin;
    }
  }
  kmax = block_max(kmax, LLONG_MIN, sc.ll);
  if (kmax == LLONG_MIN) {  // no finite value
    th.none = true;
    return th;
  }
  const A mx = from_order_key(kmax, A(0));
  if (p.mode == ThresholdMode::kRelative) {
    if (!exact_gt(mx, A(0))) {
      th.none = true;
    } else {
      th.cut = exact_mul(th.cut, mx);
    }
    return th;
  }
  kmin = block_min(kmin, LLONG_MAX, sc.ll);
  const double lo = static_cast<double>(from_order_key(kmin, A(0)));
  const double hi = static_cast<double>(mx);
  if (!(hi > lo)) {
    th.none = true;
    return th;
  }
  th.lo = lo;
  th.span = __dsub_rn(hi, lo);
  if (isinf(th.span)) {
    th.halved = true;
    th.lo = __dmul_rn(lo, 0.5);
    th.span = __dsub_rn(__dmul_rn(hi, 0.5), th.lo);
  }
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) sc.hist[i] = 0;
  __syncthreads();
  // Warp-aggregated: lanes with the same bin add once (a near-constant map would
  // otherwise funnel every thread's atomic into one shared-memory bin).
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + static_cast<int>(threadIdx.x);
    int bin = -1;
    if (i < n) {
      const A v = to_acc(src[i]);
      if (is_finite_bits(v)) bin = otsu_bin(v, th.lo, th.span, th.halved);
    }
    const unsigned peers = __match_any_sync(kFullMask, bin);
    if (bin >= 0 && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&sc.hist[bin], __popc(peers));
  }
  __syncthreads();
  th.split = otsu_split_block(sc);
  th.none = th.split < 0;
  return th;
}

template <typename T>
__device__ __forceinline__ bool is_foreground(T raw, const Threshold<acc_t<T>>& th) {
  const acc_t<T> v = to_acc(raw);
  if (!is_finite_bits(v)) return false;
  if (th.mode == ThresholdMode::kOtsu) return otsu_bin(v, th.lo, th.span, th.halved) > th.split;
  return exact_gt(v, th.cut);
}

constexpr int kWordsPerPass = 4;

// bits[w] for every 32-pixel word of the map: bit k of word w (row r, word j of the
// row) is foreground(pixel (r, 32 j + k)); columns past the width are 0.
template <typename T, typename Fg>
__device__ __forceinline__ void write_foreground_bits(const T* src, int H, int W, int wpr, uint32_t* bits, Fg fg) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int words = H * wpr;
  for (int first = warp * kWordsPerPass; first < words; first += warps * kWordsPerPass) {
    bool f[kWordsPerPass];
#pragma unroll
    for (int u = 0; u < kWordsPerPass; ++u) {
      const int w = first + u;
      const int row = w / wpr, col = (w - row * wpr) * 32 + lane;
      f[u] = w < words && col < W && fg(src[row * W + col]);
    }
#pragma unroll
    for (int u = 0; u < kWordsPerPass; ++u) {
      const unsigned b = __ballot_sync(kFullMask, f[u]);
      if (lane == 0 && first + u < words) bits[first + u] = b;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(1024) components_kernel(ComponentsParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  BlockScratch& sc = *reinterpret_cast<BlockScratch*>(smem);
  const int K = p.max_components;
  unsigned long long* sum_x = reinterpret_cast<unsigned long long*>(smem + align_up(sizeof(BlockScratch), 16));
  unsigned long long* sum_y = sum_x + K;
  int* sel_root = reinterpret_cast<int*>(sum_y + K);
  int* sel_area = sel_root + K;

  const int H = p.height, W = p.width, n = H * W, wpr = components_words_per_row(W);
  const int words = H * wpr;
  const int64_t map = blockIdx.x;
  const int tid = threadIdx.x, bs = blockDim.x, lane = tid & 31, warp = tid >> 5, warps = bs >> 5;
  uint32_t* bits;
  int* parent;
  if (p.scratch_parent != nullptr) {
    bits = p.scratch_bits + map * words;
    parent = p.scratch_parent + map * n;
  } else {
    bits = reinterpret_cast<uint32_t*>(smem + fixed_bytes(K));
    parent = reinterpret_cast<int*>(bits + words);
  }
  const T* src = static_cast<const T*>(p.maps) + map * n;

  // 1. Foreground bitmask, one warp per 32-pixel word (ballot); each warp takes
  // kWordsPerPass consecutive words per pass so that several loads are in flight.
  if constexpr (std::is_same<T, uint8_t>::value) {
    write_foreground_bits(src, H, W, wpr, bits, [](uint8_t v) { return v != 0; });
  } else {
    const Threshold<acc_t<T>> th = make_threshold(src, n, p, sc);
    if (th.none) {
      for (int w = tid; w < words; w += bs) bits[w] = 0u;
    } else {
      write_foreground_bits(src, H, W, wpr, bits, [&](T v) { return is_foreground(v, th); });
    }
  }
  __syncthreads();

  // 2. Every foreground pixel points at the first pixel of its horizontal run.
  for (int i = tid; i < n; i += bs) {
    const int r = i / W, c = i - r * W;
    const uint32_t* row = bits + r * wpr;
    parent[i] = test_bit(row, c) ? r * W + run_start(row, c) : -1;
  }
  __syncthreads();

  // 3. Join runs to the row above. Each adjacency is either united here or implied by
  // the pixel to the left (same run) and a run of the row above; see the rules below.
  for (int i = tid; i < n; i += bs) {
    const int r = i / W, c = i - r * W;
    if (r == 0) continue;
    const uint32_t* cur = bits + r * wpr;
    if (!test_bit(cur, c)) continue;
    const uint32_t* up = cur - wpr;
    const bool left = c > 0 && test_bit(cur, c - 1);
    const bool up_left = c > 0 && test_bit(up, c - 1);
    const bool above = test_bit(up, c);
    if (p.connectivity == 4) {
      // If both left neighbours are foreground, (r, c-1) already joined (r-1, c-1).
      if (above && !(left && up_left)) unite(parent, i, i - W);
    } else {
      const bool up_right = c + 1 < W && test_bit(up, c + 1);
      if (up_left && !left) unite(parent, i, i - W - 1);
      if (above && !left && !up_left) unite(parent, i, i - W);
      if (up_right && !above) unite(parent, i, i - W + 1);
    }
  }
  __syncthreads();

  // 4. Flatten: every foreground pixel points straight at its root (its first pixel).
  // A plain count needs only the roots (parent[i] == i already), so it skips this.
  const bool need_area = p.min_area > 1 || K > 0;
  if (need_area || p.labels != nullptr) {
    for (int i = tid; i < n; i += bs) {
      if (load_parent(parent, i) >= 0) atomicMin(&parent[i], find_root(parent, i));
    }
    __syncthreads();
  }

  // 5. Areas, kept in the root's slot as -1 - area (background stays -1).
  if (need_area) {
    for (int i = tid; i < n; i += bs) {
      if (parent[i] == i) parent[i] = -2;
    }
    __syncthreads();
    for (int base = 0; base < n; base += bs) {
      const int i = base + tid;
      // >= 0 only for non-root foreground pixels; a root's own slot is being decremented
      // by other threads right now, hence the atomic load.
      const int r = i < n ? load_parent(parent, i) : -1;
      const unsigned peers = __match_any_sync(kFullMask, r);
      if (r >= 0 && lane == __ffs(peers) - 1) atomicSub(&parent[r], __popc(peers));
    }
    __syncthreads();
  }

  auto is_kept_root = [&](int i, bool& root) {
    const int s = parent[i];
    if (need_area) {
      root = s <= -2;
      return root && (-1 - s) >= p.min_area;
    }
    root = s == i;
    return root;
  };

  if (p.labels != nullptr) {
    // 6a. Ranks in raster order (block scan, one tile of bs pixels at a time); a kept
    // root's slot becomes -2 - rank, a dropped root's INT_MIN.
    int running = 0;
    for (int base = 0; base < n; base += bs) {
      const int i = base + tid;
      bool root = false, kept = false;
      if (i < n) kept = is_kept_root(i, root);
      const unsigned ballot = __ballot_sync(kFullMask, kept);
      if (lane == 0) sc.ints[warp] = __popc(ballot);
      __syncthreads();
      int before = 0, tile = 0;
      for (int w = 0; w < warps; ++w) {
        const int cnt = sc.ints[w];
        tile += cnt;
        before += w < warp ? cnt : 0;
      }
      if (root) parent[i] = kept ? -2 - (running + before + __popc(ballot & ((1u << lane) - 1u))) : INT_MIN;
      running += tile;
      __syncthreads();
    }
    int32_t* out = p.labels + map * n;
    for (int i = tid; i < n; i += bs) {
      const int v = parent[i];
      int label = 0;
      if (v != -1) {
        const int s = v >= 0 ? parent[v] : v;
        label = s == INT_MIN ? 0 : -1 - s;
      }
      out[i] = label;
    }
    if (tid == 0) p.counts[map] = running;
    return;
  }

  int local = 0, local_max_area = 0;
  for (int i = tid; i < n; i += bs) {
    bool root;
    if (is_kept_root(i, root)) {
      ++local;
      if (need_area && -1 - parent[i] > local_max_area) local_max_area = -1 - parent[i];
    }
  }
  const int count = block_sum(local, sc.ints);
  if (tid == 0) p.counts[map] = count;
  if (K == 0) return;

  // 6b. Top-K by (area desc, first pixel asc). Keys (area, index) -> unique integers
  // (cuda_logic::topk_key); a radix select, 8 bits per pass over the kept roots, finds
  // the threshold above which exactly min(K, count) keys lie (no pass at all when
  // count <= K); those keys are gathered into K slots and each one's output slot is
  // the number of larger gathered keys. Cost: a few passes over the pixels plus
  // selected^2 / blockDim comparisons, instead of K passes.
  namespace lg = cuda_logic;
  const int max_area = block_max(local_max_area, 0, sc.ints);
  const int index_bits = lg::bit_length(static_cast<unsigned long long>(n - 1));
  const int key_bits = lg::bit_length(static_cast<unsigned long long>(max_area)) + index_bits;
  lg::RadixSelect rs;
  rs.init(K, count, key_bits);
  while (!rs.done) {  // block-uniform: every thread applies step() to the same histogram
    for (int i = tid; i < kBins; i += bs) sc.hist[i] = 0;
    __syncthreads();
    for (int base = 0; base < n; base += bs) {
      const int i = base + tid;
      int d = -1;
      if (i < n) {
        const int s = parent[i];
        if (s <= -2 && (-1 - s) >= p.min_area) {
          const unsigned long long key = lg::topk_key(-1 - s, i, n, index_bits);
          if (rs.matches(key)) d = rs.digit(key);
        }
      }
      const unsigned peers = __match_any_sync(kFullMask, d);
      if (d >= 0 && lane == __ffs(peers) - 1) atomicAdd(&sc.hist[d], __popc(peers));
    }
    __syncthreads();
    rs.step(sc.hist);
    __syncthreads();  // every thread has read sc.hist before the next pass clears it
  }
  const int selected = count < K ? count : K;
  // Gather the selected keys into sum_x (free until the sums below), in any order.
  unsigned long long* keys = sum_x;
  int* gathered = &sc.ints[0];
  __syncthreads();  // block_max above may still be reading sc.ints
  if (tid == 0) *gathered = 0;
  __syncthreads();
  for (int i = tid; i < n; i += bs) {
    const int s = parent[i];
    if (s <= -2 && (-1 - s) >= p.min_area) {
      const unsigned long long key = lg::topk_key(-1 - s, i, n, index_bits);
      if (key >= rs.threshold) {
        const int slot = atomicAdd(gathered, 1);
        if (slot < K) keys[slot] = key;  // exactly `selected` keys pass; the guard is belt and braces
      }
    }
  }
  __syncthreads();
  for (int j = tid; j < selected; j += bs) {
    const unsigned long long key = keys[j];
    const int slot = lg::topk_slot(keys, selected, key);
    sel_root[slot] = lg::topk_key_index(key, n, index_bits);
    sel_area[slot] = lg::topk_key_area(key, index_bits);
  }
  __syncthreads();
  for (int k = tid; k < selected; k += bs) {
    sum_x[k] = 0ull;
    sum_y[k] = 0ull;
  }
  __syncthreads();
  for (int k = tid; k < selected; k += bs) parent[sel_root[k]] = INT_MIN + k;
  __syncthreads();
  for (int base = 0; base < n; base += bs) {
    const int i = base + tid;
    int k = -1;
    if (i < n) {
      const int v = parent[i];
      if (v != -1) {
        const int s = v >= 0 ? parent[v] : v;
        if (s < INT_MIN + selected) k = s - INT_MIN;
      }
    }
    const unsigned peers = __match_any_sync(kFullMask, k);
    const int r = i / W;
    const unsigned c = static_cast<unsigned>(i - r * W);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (k >= 0) {
      // 32 indices below 2^30 overflow a 32-bit sum: add their low and high halves
      // separately (each fits, see cuda_logic::kIndexSplitBits) and recombine in 64 bits.
      constexpr unsigned lo_mask = (1u << cuda_logic::kIndexSplitBits) - 1u;
      const unsigned ry = static_cast<unsigned>(r);
      const unsigned sx_lo = __reduce_add_sync(peers, c & lo_mask);
      const unsigned sx_hi = __reduce_add_sync(peers, c >> cuda_logic::kIndexSplitBits);
      const unsigned sy_lo = __reduce_add_sync(peers, ry & lo_mask);
      const unsigned sy_hi = __reduce_add_sync(peers, ry >> cuda_logic::kIndexSplitBits);
      if (lane == __ffs(peers) - 1) {
        atomicAdd(&sum_x[k], cuda_logic::recombine_index_sum(sx_lo, sx_hi));
        atomicAdd(&sum_y[k], cuda_logic::recombine_index_sum(sy_lo, sy_hi));
      }
    }
#else
    (void)peers;
    if (k >= 0) {
      atomicAdd(&sum_x[k], static_cast<unsigned long long>(c));
      atomicAdd(&sum_y[k], static_cast<unsigned long long>(r));
    }
#endif
  }
  __syncthreads();
  for (int k = tid; k < K; k += bs) {
    int area = 0;
    float cx = __int_as_float(0x7fc00000), cy = cx;
    if (k < selected) {
      area = sel_area[k];
      const double a = static_cast<double>(area);
      // sum over pixels of (j + 0.5), exact in float64, then / area / W as on the CPU.
      const double sx = static_cast<double>(sum_x[k]) + 0.5 * a;
      const double sy = static_cast<double>(sum_y[k]) + 0.5 * a;
      cx = __double2float_rn(__ddiv_rn(__ddiv_rn(sx, a), static_cast<double>(W)));
      cy = __double2float_rn(__ddiv_rn(__ddiv_rn(sy, a), static_cast<double>(H)));
    }
    p.areas[map * K + k] = area;
    p.centroids[(map * K + k) * 2] = cx;
    p.centroids[(map * K + k) * 2 + 1] = cy;
  }
}

// Raises the kernel's dynamic shared-memory limit to the device's opt-in maximum, once
// per device (cuda_logic::PerDeviceOnce): setting it to each call's size before each
// launch let two host threads interleave set(large) / set(small) / launch(large) and
// fail with "invalid argument". The host never asks for more than the opt-in maximum.
// Not a stream operation: allowed during CUDA-graph capture.
template <typename T>
cudaError_t allow_optin_shared_memory() {
  static cuda_logic::PerDeviceOnce<> once;
  int device = -1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return static_cast<cudaError_t>(once.run(device, static_cast<int>(cudaErrorInvalidDevice), [device]() -> int {
    int optin = 0;
    cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return static_cast<int>(e);
    cudaFuncAttributes attr{};
    e = cudaFuncGetAttributes(&attr, components_kernel<T>);
    if (e != cudaSuccess) return static_cast<int>(e);
    return static_cast<int>(cudaFuncSetAttribute(components_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 optin - static_cast<int>(attr.sharedSizeBytes)));
  }));
}

template <typename T>
cudaError_t launch_components_typed(const ComponentsParams& p, size_t shared_bytes, cudaStream_t stream) {
  if (shared_bytes > 48 * 1024) {
    const cudaError_t err = allow_optin_shared_memory<T>();
    if (err != cudaSuccess) return err;
  }
  const int threads = components_block_threads(static_cast<int64_t>(p.height) * p.width);
  components_kernel<T><<<static_cast<unsigned>(p.num_maps), threads, shared_bytes, stream>>>(p);
  return cudaSuccess;  // the launch itself is checked by the caller (C10_CUDA_KERNEL_LAUNCH_CHECK)
}

}  // namespace components_detail
}  // namespace cuda
}  // namespace xlard
