// Unit tests of the torch-free labelling core (csrc/core/components.h), run by ctest.
// A brute-force flood fill is the independent oracle on random and adversarial masks.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "core/components.h"

using xlard::core::Labeler;
using xlard::core::Mode;

// Flood-fill labelling in raster order of first pixels, then min-area renumbering.
static std::vector<int32_t> flood_labels(const std::vector<uint8_t>& fg, int h, int w, int conn, int min_area,
                                         int* count) {
  std::vector<int32_t> lab(fg.size(), 0), comp(fg.size(), 0);
  std::vector<int> sizes{0};
  int next = 0;
  std::vector<int> stack;
  for (int p = 0; p < h * w; ++p) {
    if (!fg[p] || comp[p]) continue;
    comp[p] = ++next;
    sizes.push_back(0);
    stack.assign(1, p);
    while (!stack.empty()) {
      int q = stack.back();
      stack.pop_back();
      ++sizes[next];
      int qi = q / w, qj = q % w;
      for (int di = -1; di <= 1; ++di)
        for (int dj = -1; dj <= 1; ++dj) {
          if ((di == 0 && dj == 0) || (conn == 4 && di != 0 && dj != 0)) continue;
          int ni = qi + di, nj = qj + dj;
          if (ni < 0 || nj < 0 || ni >= h || nj >= w) continue;
          int r = ni * w + nj;
          if (fg[r] && !comp[r]) {
            comp[r] = next;
            stack.push_back(r);
          }
        }
    }
  }
  std::vector<int> renum(next + 1, 0);
  int kept = 0;
  for (int c = 1; c <= next; ++c) renum[c] = sizes[c] >= min_area ? ++kept : 0;
  for (int p = 0; p < h * w; ++p) lab[p] = comp[p] ? renum[comp[p]] : 0;
  *count = kept;
  return lab;
}

static void check_mask(const std::vector<uint8_t>& fg, int h, int w, const std::string& name) {
  Labeler l;
  l.reset(h, w);
  for (int conn : {4, 8})
    for (int min_area : {1, 3}) {
      l.fg = fg;
      int64_t n = l.label(conn, min_area);
      std::vector<int32_t> got(fg.size());
      l.write_labels(got.data());
      int want_n = 0;
      std::vector<int32_t> want = flood_labels(fg, h, w, conn, min_area, &want_n);
      CHECK(n == want_n, "%s conn=%d min_area=%d: count %lld vs %d", name.c_str(), conn, min_area, (long long)n, want_n);
      CHECK(got == want, "%s conn=%d min_area=%d: labels differ", name.c_str(), conn, min_area);
    }
}

static void test_random_masks() {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    int h = 1 + rng() % 40, w = 1 + rng() % 40;
    double density = (rng() % 100) / 100.0;
    std::vector<uint8_t> fg(h * w);
    for (auto& v : fg) v = (rng() % 1000) < density * 1000;
    check_mask(fg, h, w, "random#" + std::to_string(trial));
  }
}

static void test_adversarial() {
  const int n = 31;
  std::vector<uint8_t> checker(n * n), diag(n * n), full(n * n, 1), empty(n * n, 0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      checker[i * n + j] = (i + j) % 2 == 0;
      diag[i * n + j] = (i - j + n) % 3 == 0;
    }
  check_mask(checker, n, n, "checkerboard");
  check_mask(diag, n, n, "diagonals");
  check_mask(full, n, n, "full");
  check_mask(empty, n, n, "empty");
  std::vector<uint8_t> row(97), col(97);
  for (int k = 0; k < 97; ++k) row[k] = col[k] = k % 5 != 0;
  check_mask(row, 1, 97, "row");
  check_mask(col, 97, 1, "col");
  // Checkerboard counts are known in closed form.
  Labeler l;
  l.reset(n, n);
  l.fg = checker;
  CHECK(l.label(8, 1) == 1, "checkerboard 8-connected must be one component");
  l.fg = checker;
  CHECK(l.label(4, 1) == (n * n + 1) / 2, "checkerboard 4-connected: every pixel alone");
}

static void test_thresholds_and_stats() {
  // Relative: foreground > 0.5 * max; NaN/inf ignored.
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> m = {0.f, 0.2f, 0.9f, std::nanf(""), 1.0f, inf, 0.6f, 0.1f};
  std::vector<uint8_t> fg(m.size()), bins;
  xlard::core::threshold_map<float, float>(m.data(), m.size(), Mode::kRelative, 0.5, fg.data(), bins);
  std::vector<uint8_t> want = {0, 0, 1, 0, 1, 0, 1, 0};
  CHECK(fg == want, "relative threshold");
  xlard::core::threshold_map<float, float>(m.data(), m.size(), Mode::kAbsolute, 0.15, fg.data(), bins);
  want = {0, 1, 1, 0, 1, 0, 1, 0};
  CHECK(fg == want, "absolute threshold");
  std::vector<float> neg = {-1.f, -2.f};
  std::vector<uint8_t> fg2(2);
  xlard::core::threshold_map<float, float>(neg.data(), 2, Mode::kRelative, 0.5, fg2.data(), bins);
  CHECK(fg2[0] == 0 && fg2[1] == 0, "max <= 0 has no foreground");
  // Otsu on a two-level map separates the levels.
  std::vector<double> two(64, 1.0);
  for (int k = 0; k < 16; ++k) two[k] = 5.0;
  std::vector<uint8_t> fg3(64);
  xlard::core::threshold_map<double, double>(two.data(), 64, Mode::kOtsu, 0.0, fg3.data(), bins);
  int on = 0;
  for (auto v : fg3) on += v;
  CHECK(on == 16, "otsu two-level: %d foreground", on);
  // Stats: two squares, sorted by area, centroids of pixel centres.
  Labeler l;
  l.reset(6, 10);
  std::fill(l.fg.begin(), l.fg.end(), 0);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) l.fg[i * 10 + j] = 1;  // area 4, label 1
  for (int i = 2; i < 5; ++i)
    for (int j = 6; j < 9; ++j) l.fg[i * 10 + j] = 1;  // area 9, label 2
  CHECK(l.label(8, 1) == 2, "two squares");
  int32_t areas[3];
  float cen[6];
  l.write_stats(3, areas, cen);
  CHECK(areas[0] == 9 && areas[1] == 4 && areas[2] == 0, "areas %d %d %d", areas[0], areas[1], areas[2]);
  CHECK(std::fabs(cen[0] - 7.5f / 10) < 1e-6 && std::fabs(cen[1] - 3.5f / 6) < 1e-6, "centroid of the big one");
  CHECK(std::fabs(cen[2] - 1.0f / 10) < 1e-6 && std::fabs(cen[3] - 1.0f / 6) < 1e-6, "centroid of the small one");
  CHECK(std::isnan(cen[4]) && std::isnan(cen[5]), "unused slot is NaN");
}

int main() {
  test_random_masks();
  test_adversarial();
  test_thresholds_and_stats();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all core checks passed\n");
  return 0;
}
