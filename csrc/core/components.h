// Torch-free connected-component labelling of one 2D map: thresholding (absolute,
// relative to the max, Otsu, or a mask), run-based union-find, raster-order labels,
// min-area filtering, and per-component statistics. The CPU kernels
// (csrc/cpu/components.cpp) and the C++ unit tests (tests/cpp) both use it, so the
// semantics written in docs/ops.md live in exactly one C++ place.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace xlard {
namespace core {

enum class Mode : int { kAbsolute = 0, kRelative = 1, kOtsu = 2, kMask = 3 };

constexpr int kOtsuBins = 256;

// Bin index of a finite value for Otsu; shared with docs/ops.md word for word:
// ((double(v) - lo) / (hi - lo)) * 256, floored, clamped to [0, 255]. When hi - lo overflows
// (a float64 map spanning more than the largest double), the halves are used instead:
// ((v / 2 - lo / 2) / (hi / 2 - lo / 2)) * 256. The clamp happens in double, before the cast.
inline int otsu_bin(double v, double lo, double hi) {
  const double span = hi - lo;
  double scaled = std::isinf(span) ? ((v * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)) * 256.0
                                   : ((v - lo) / span) * 256.0;
  scaled = std::floor(scaled);
  if (!(scaled > 0.0)) return 0;  // NaN too
  return scaled > double(kOtsuBins - 1) ? kOtsuBins - 1 : static_cast<int>(scaled);
}

// The Otsu split over a 256-bin histogram: the first t in 0..254 with the largest
// between-class score d^2 / (w0 * w1), d = s0 * w1 - s1 * w0; -1 when no split has
// two non-empty classes. Integer sums keep the choice identical on every provider.
inline int otsu_split(const int64_t* hist) {
  int64_t n = 0, total = 0;
  for (int i = 0; i < kOtsuBins; ++i) {
    n += hist[i];
    total += hist[i] * i;
  }
  int best_t = -1;
  double best = -1.0;
  int64_t w0 = 0, s0 = 0;
  for (int t = 0; t < kOtsuBins - 1; ++t) {
    w0 += hist[t];
    s0 += hist[t] * t;
    int64_t w1 = n - w0;
    if (w0 == 0 || w1 == 0) continue;
    int64_t s1 = total - s0;
    int64_t d = s0 * w1 - s1 * w0;
    double score = static_cast<double>(d) * static_cast<double>(d) / static_cast<double>(w0 * w1);
    if (score > best) {
      best = score;
      best_t = t;
    }
  }
  return best_t;
}

template <typename Acc>
inline bool is_finite_value(Acc v) {
  // NaN fails both comparisons; +-inf fails one.
  return v < std::numeric_limits<Acc>::infinity() && v > -std::numeric_limits<Acc>::infinity();
}

// Writes fg[k] = 1 for foreground pixels of one map of n values.
// Convert maps T -> Acc with static_cast (works for c10::Half / c10::BFloat16 too).
template <typename T, typename Acc>
void threshold_map(const T* map, int64_t n, Mode mode, double threshold, uint8_t* fg,
                   std::vector<uint8_t>& bins) {
  const Acc inf = std::numeric_limits<Acc>::infinity();
  if (mode == Mode::kMask) {
    for (int64_t k = 0; k < n; ++k) fg[k] = static_cast<Acc>(map[k]) != Acc(0);
    return;
  }
  if (mode == Mode::kAbsolute) {
    const Acc cut = static_cast<Acc>(threshold);
    for (int64_t k = 0; k < n; ++k) {
      Acc v = static_cast<Acc>(map[k]);
      fg[k] = (v > cut) & (v < inf);
    }
    return;
  }
  if (mode == Mode::kRelative) {
    Acc mx = -inf;
    for (int64_t k = 0; k < n; ++k) {
      Acc v = static_cast<Acc>(map[k]);
      mx = (v > mx && v < inf) ? v : mx;
    }
    if (!(mx > Acc(0))) {  // no finite value, or max <= 0
      std::memset(fg, 0, static_cast<size_t>(n));
      return;
    }
    const Acc cut = static_cast<Acc>(threshold) * mx;
    for (int64_t k = 0; k < n; ++k) {
      Acc v = static_cast<Acc>(map[k]);
      fg[k] = (v > cut) & (v < inf);
    }
    return;
  }
  // Otsu.
  Acc lo = inf, hi = -inf;
  for (int64_t k = 0; k < n; ++k) {
    Acc v = static_cast<Acc>(map[k]);
    if (is_finite_value(v)) {
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
  }
  if (!(hi > lo)) {
    std::memset(fg, 0, static_cast<size_t>(n));
    return;
  }
  int64_t hist[kOtsuBins] = {0};
  bins.resize(static_cast<size_t>(n));
  const double dlo = static_cast<double>(lo), dhi = static_cast<double>(hi);
  for (int64_t k = 0; k < n; ++k) {
    Acc v = static_cast<Acc>(map[k]);
    if (is_finite_value(v)) {
      int b = otsu_bin(static_cast<double>(v), dlo, dhi);
      bins[k] = static_cast<uint8_t>(b);
      ++hist[b];
      fg[k] = 1;  // marks "finite" until the split is known
    } else {
      fg[k] = 0;
    }
  }
  const int t = otsu_split(hist);
  for (int64_t k = 0; k < n; ++k) fg[k] = fg[k] & static_cast<uint8_t>(t >= 0 && bins[k] > t);
}

struct Run {
  int32_t row, start, end;  // [start, end) columns of one horizontal run of foreground
};

// Scratch state for labelling one map at a time; reuse it across maps (one per thread).
class Labeler {
 public:
  std::vector<uint8_t> fg;    // foreground of the current map, H * W
  std::vector<uint8_t> bins;  // Otsu scratch

  void reset(int64_t height, int64_t width) {
    h_ = height;
    w_ = width;
    fg.resize(static_cast<size_t>(h_ * w_));
  }

  // Labels fg (set by the caller or threshold_map). Returns the number of kept components.
  int64_t label(int connectivity, int64_t min_area) {
    extract_runs();
    union_runs(connectivity == 8 ? 1 : 0);
    const size_t nr = runs_.size();
    area_.assign(nr, 0);
    for (size_t i = 0; i < nr; ++i) {
      // parent[i] <= i always (roots are linked under the smaller index), so one forward
      // pass flattens every run onto its component's first run in raster order.
      parent_[i] = parent_[parent_[i]];
      area_[parent_[i]] += runs_[i].end - runs_[i].start;
    }
    label_.assign(nr, 0);
    int64_t count = 0;
    for (size_t i = 0; i < nr; ++i) {
      int32_t r = parent_[i];
      if (static_cast<size_t>(r) == i) {
        label_[i] = area_[i] >= min_area ? static_cast<int32_t>(++count) : 0;
      } else {
        label_[i] = label_[r];
      }
    }
    count_ = count;
    return count;
  }

  // Number of kept components found by the last label() call.
  int64_t count() const { return count_; }

  // Writes int32 labels (H * W) of the last label() call.
  void write_labels(int32_t* out) const {
    std::memset(out, 0, sizeof(int32_t) * static_cast<size_t>(h_ * w_));
    for (size_t i = 0; i < runs_.size(); ++i) {
      const int32_t l = label_[i];
      if (l == 0) continue;
      int32_t* row = out + static_cast<int64_t>(runs_[i].row) * w_;
      for (int32_t j = runs_[i].start; j < runs_[i].end; ++j) row[j] = l;
    }
  }

  // The K largest kept components (ties: smaller label first): areas and (x, y) centroids
  // normalised to [0, 1]. Unused slots: area 0, centroid NaN.
  void write_stats(int64_t k, int32_t* areas, float* centroids) {
    sumx_.assign(static_cast<size_t>(count_), 0.0);
    sumy_.assign(static_cast<size_t>(count_), 0.0);
    comp_area_.assign(static_cast<size_t>(count_), 0);
    for (size_t i = 0; i < runs_.size(); ++i) {
      const int32_t l = label_[i];
      if (l == 0) continue;
      const Run& r = runs_[i];
      const double len = r.end - r.start;
      // Sum of (j + 0.5) over [start, end) is len * (start + end) / 2: exact in double.
      sumx_[l - 1] += len * (static_cast<double>(r.start) + r.end) * 0.5;
      sumy_[l - 1] += len * (r.row + 0.5);
      comp_area_[l - 1] += r.end - r.start;
    }
    order_.resize(static_cast<size_t>(count_));
    for (int64_t c = 0; c < count_; ++c) order_[c] = static_cast<int32_t>(c);
    const int64_t kept = std::min<int64_t>(k, count_);
    auto larger = [this](int32_t a, int32_t b) {
      return comp_area_[a] != comp_area_[b] ? comp_area_[a] > comp_area_[b] : a < b;
    };
    std::partial_sort(order_.begin(), order_.begin() + kept, order_.end(), larger);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t s = 0; s < k; ++s) {
      if (s < kept) {
        const int32_t c = order_[s];
        const double a = static_cast<double>(comp_area_[c]);
        areas[s] = static_cast<int32_t>(comp_area_[c]);
        centroids[2 * s] = static_cast<float>(sumx_[c] / a / static_cast<double>(w_));
        centroids[2 * s + 1] = static_cast<float>(sumy_[c] / a / static_cast<double>(h_));
      } else {
        areas[s] = 0;
        centroids[2 * s] = nan;
        centroids[2 * s + 1] = nan;
      }
    }
  }

 private:
  int64_t h_ = 0, w_ = 0, count_ = 0;
  std::vector<Run> runs_;
  std::vector<int32_t> row_first_;  // index of each row's first run; row_first_[h] = #runs
  std::vector<int32_t> parent_;
  std::vector<int64_t> area_;
  std::vector<int32_t> label_;
  std::vector<double> sumx_, sumy_;
  std::vector<int64_t> comp_area_;
  std::vector<int32_t> order_;

  void extract_runs() {
    runs_.clear();
    row_first_.resize(static_cast<size_t>(h_ + 1));
    const int32_t w = static_cast<int32_t>(w_);
    for (int64_t i = 0; i < h_; ++i) {
      row_first_[i] = static_cast<int32_t>(runs_.size());
      const uint8_t* row = fg.data() + i * w_;
      int32_t j = 0;
      while (j < w) {
        // Skip background eight bytes at a time: attention maps are mostly background.
        while (j + 8 <= w) {
          uint64_t word;
          std::memcpy(&word, row + j, 8);
          if (word != 0) break;
          j += 8;
        }
        while (j < w && !row[j]) ++j;
        if (j >= w) break;
        const int32_t start = j;
        while (j + 8 <= w) {
          uint64_t word;
          std::memcpy(&word, row + j, 8);
          if (word != 0x0101010101010101ULL) break;
          j += 8;
        }
        while (j < w && row[j]) ++j;
        runs_.push_back(Run{static_cast<int32_t>(i), start, j});
      }
    }
    row_first_[h_] = static_cast<int32_t>(runs_.size());
  }

  int32_t find(int32_t x) {
    while (parent_[x] != x) {
      parent_[x] = parent_[parent_[x]];
      x = parent_[x];
    }
    return x;
  }

  void unite(int32_t a, int32_t b) {
    a = find(a);
    b = find(b);
    if (a == b) return;
    if (a < b) {
      parent_[b] = a;
    } else {
      parent_[a] = b;
    }
  }

  // diagonal = 1 for 8-connectivity (runs touching at a corner join), 0 for 4.
  void union_runs(int32_t diagonal) {
    const size_t nr = runs_.size();
    parent_.resize(nr);
    for (size_t i = 0; i < nr; ++i) parent_[i] = static_cast<int32_t>(i);
    for (int64_t i = 1; i < h_; ++i) {
      int32_t p = row_first_[i - 1];
      const int32_t p_end = row_first_[i];
      for (int32_t c = row_first_[i]; c < row_first_[i + 1]; ++c) {
        const Run& cur = runs_[c];
        // Previous-row runs entirely left of cur (not even touching diagonally) never
        // touch later runs of this row either.
        while (p < p_end && runs_[p].end + diagonal <= cur.start) ++p;
        for (int32_t q = p; q < p_end && runs_[q].start < cur.end + diagonal; ++q) unite(q, c);
      }
    }
  }
};

}  // namespace core
}  // namespace xlard
