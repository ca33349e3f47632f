// CPU kernels of attention_centroids and position_scores (forward and backward).
// Semantics: docs/ops.md. One pass per map; accumulation in float32 (float64 for
// float64 inputs); results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace xlard {
namespace {

using checks::centroid_shape;
using checks::check_relations;
using checks::RelationLayout;

inline void check_maps(const char* op, const at::Tensor& maps) { checks::check_float_maps(op, maps); }

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The largest weight max(v, 0) of one map (NaN and +-inf weigh 0), or 1 when there is none:
// the scale every weight is divided by before summing, so a map of values near the
// float range sums to a finite total (the centroid does not depend on the scale).
template <typename T, typename A>
inline A map_scale(const T* map, int64_t n) {
  const A inf = std::numeric_limits<A>::infinity();
  A top = A(0);
  for (int64_t k = 0; k < n; ++k) {
    const A v = static_cast<A>(map[k]);
    if (v > top && v < inf) top = v;
  }
  return top > A(0) ? top : A(1);
}

// Weighted sums of one map, weights divided by `scale` (divided, not multiplied by the
// reciprocal: a subnormal scale has no finite reciprocal): S = sum w, X = sum w * (j + 0.5),
// Y = sum w * (i + 0.5).
template <typename T, typename A>
inline void map_moments(const T* map, int64_t h, int64_t w, A scale, A& s, A& x, A& y) {
  s = A(0);
  x = A(0);
  y = A(0);
  const A inf = std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < h; ++i) {
    const T* row = map + i * w;
    A rs = A(0), rx = A(0);
#pragma omp simd reduction(+ : rs, rx)
    for (int64_t j = 0; j < w; ++j) {
      A v = static_cast<A>(row[j]);
      // max(v, 0) with NaN and +-inf mapped to 0.
      A wt = (v > A(0) && v < inf) ? v / scale : A(0);
      rs += wt;
      rx += wt * (static_cast<A>(j) + A(0.5));
    }
    s += rs;
    x += rx;
    y += rs * (static_cast<A>(i) + A(0.5));
  }
}

at::Tensor attention_centroids_cpu(const at::Tensor& maps_in) {
  check_maps("attention_centroids", maps_in);
  const at::Tensor maps = maps_in.contiguous();
  const auto out_dtype = maps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(centroid_shape(maps), maps.options().dtype(out_dtype));
  const int64_t h = maps.size(-2), w = maps.size(-1);
  const int64_t n = out.numel() / 2;
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "xlard_attention_centroids", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* base = maps.const_data_ptr<scalar_t>();
    A* o = out.data_ptr<A>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * w));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        A s, x, y;
        const scalar_t* map = base + m * h * w;
        map_moments(map, h, w, map_scale<scalar_t, A>(map, h * w), s, x, y);
        if (s > A(0)) {
          o[2 * m] = x / s / static_cast<A>(w);
          o[2 * m + 1] = y / s / static_cast<A>(h);
        } else {
          o[2 * m] = A(0.5);
          o[2 * m + 1] = A(0.5);
        }
      }
    });
  });
  return out;
}

at::Tensor attention_centroids_backward_cpu(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                            const at::Tensor& centroids_in) {
  check_maps("_attention_centroids_backward", maps_in);
  const at::Tensor maps = maps_in.contiguous();
  const auto acc_dtype = maps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_in.sizes() == centroids_in.sizes() && grad_in.sizes().vec() == centroid_shape(maps),
              "xlard._attention_centroids_backward: grad and centroids must have shape [..., 2] matching maps, got ",
              grad_in.sizes(), " and ", centroids_in.sizes());
  const at::Tensor grad = grad_in.to(acc_dtype).contiguous();
  const at::Tensor cen = centroids_in.to(acc_dtype).contiguous();
  at::Tensor out = at::empty(maps.sizes(), maps.options());
  const int64_t h = maps.size(-2), w = maps.size(-1);
  const int64_t n = cen.numel() / 2;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "xlard_attention_centroids_bwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* base = maps.const_data_ptr<scalar_t>();
    const A* g = grad.const_data_ptr<A>();
    const A* c = cen.const_data_ptr<A>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const A inf = std::numeric_limits<A>::infinity();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * w));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* map = base + m * h * w;
        scalar_t* om = o + m * h * w;
        A s, x, y;
        const A scale = map_scale<scalar_t, A>(map, h * w);
        map_moments(map, h, w, scale, s, x, y);
        const A gx = g[2 * m], gy = g[2 * m + 1], cx = c[2 * m], cy = c[2 * m + 1];
        for (int64_t i = 0; i < h; ++i) {
          const A row_term = gy * ((static_cast<A>(i) + A(0.5)) / static_cast<A>(h) - cy);
          for (int64_t j = 0; j < w; ++j) {
            A v = static_cast<A>(map[i * w + j]);
            A d = gx * ((static_cast<A>(j) + A(0.5)) / static_cast<A>(w) - cx) + row_term;
            // d / (scale * s) (s >= 1): one division by the product where scale < 1 (the product cannot overflow;
            // d / scale alone overflowed for a subnormal scale, d / s alone lost a tiny d to the subnormals), two
            // where scale >= 1 (the product could overflow; both steps shrink). As every provider.
            const A q = scale < A(1) ? d / (s * scale) : d / scale / s;
            om[i * w + j] = static_cast<scalar_t>((v > A(0) && v < inf && s > A(0)) ? q : A(0));
          }
        }
      }
    });
  });
  return out;
}

// Direction of each relation code: LEFT_OF, RIGHT_OF, ABOVE, BELOW (y grows downward).
constexpr int kDirX[4] = {-1, 1, 0, 0};
constexpr int kDirY[4] = {0, 0, -1, 1};

void check_relation_values(const char* op, const int64_t* rel, const RelationLayout& L) {
  const int64_t rows = (L.rel_batch_stride == 0 ? 1 : L.batch) * L.relations;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t a = rel[3 * k], b = rel[3 * k + 1], code = rel[3 * k + 2];
    TORCH_CHECK(a >= 0 && a < L.tokens && b >= 0 && b < L.tokens, "xlard.", op, ": relation row ", k,
                " names tokens (", a, ", ", b, ") but centroids has T = ", L.tokens, " tokens");
    TORCH_CHECK(code >= 0 && code < 4, "xlard.", op, ": relation row ", k, " has code ", code,
                "; expected LEFT_OF=0, RIGHT_OF=1, ABOVE=2 or BELOW=3");
  }
}

at::Tensor position_scores_cpu(const at::Tensor& centroids_in, const at::Tensor& relations_in, double tau) {
  const RelationLayout L = check_relations("position_scores", centroids_in, relations_in);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "xlard.position_scores: tau must be a finite number > 0, got ", tau);
  const auto acc_dtype = centroids_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cen = centroids_in.to(acc_dtype).contiguous();
  const at::Tensor rel = relations_in.contiguous();
  at::Tensor out = at::empty({L.batch, L.relations}, cen.options());
  if (out.numel() == 0) return out;
  check_relation_values("position_scores", rel.const_data_ptr<int64_t>(), L);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "xlard_position_scores", [&] {
    const scalar_t* c = cen.const_data_ptr<scalar_t>();
    const int64_t* r = rel.const_data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t t = static_cast<scalar_t>(tau);
    at::parallel_for(0, L.batch * L.relations, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t bi = k / L.relations, ri = k % L.relations;
        const int64_t* row = r + bi * L.rel_batch_stride + ri * 3;
        const scalar_t* pa = c + (bi * L.tokens + row[0]) * 2;
        const scalar_t* pb = c + (bi * L.tokens + row[1]) * 2;
        const scalar_t proj = (pa[0] - pb[0]) * kDirX[row[2]] + (pa[1] - pb[1]) * kDirY[row[2]];
        o[k] = scalar_t(1) / (scalar_t(1) + std::exp(-t * proj));
      }
    });
  });
  return out;
}

at::Tensor position_scores_backward_cpu(const at::Tensor& grad_in, const at::Tensor& centroids_in,
                                        const at::Tensor& relations_in, double tau) {
  const RelationLayout L = check_relations("_position_scores_backward", centroids_in, relations_in);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == L.batch && grad_in.size(1) == L.relations,
              "xlard._position_scores_backward: grad must have shape [B, R] = [", L.batch, ", ", L.relations,
              "], got ", grad_in.sizes());
  const auto acc_dtype = centroids_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cen = centroids_in.to(acc_dtype).contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype).contiguous();
  const at::Tensor rel = relations_in.contiguous();
  at::Tensor out = at::zeros({L.batch, L.tokens, 2}, cen.options());
  if (out.numel() == 0 || L.relations == 0) return out.to(centroids_in.scalar_type());
  check_relation_values("_position_scores_backward", rel.const_data_ptr<int64_t>(), L);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "xlard_position_scores_bwd", [&] {
    const scalar_t* c = cen.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* r = rel.const_data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t t = static_cast<scalar_t>(tau);
    // Parallel over the batch; relations of one batch item accumulate serially (fixed order).
    at::parallel_for(0, L.batch, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        for (int64_t ri = 0; ri < L.relations; ++ri) {
          const int64_t* row = r + bi * L.rel_batch_stride + ri * 3;
          const scalar_t* pa = c + (bi * L.tokens + row[0]) * 2;
          const scalar_t* pb = c + (bi * L.tokens + row[1]) * 2;
          const scalar_t dx = kDirX[row[2]], dy = kDirY[row[2]];
          const scalar_t proj = (pa[0] - pb[0]) * dx + (pa[1] - pb[1]) * dy;
          const scalar_t s = scalar_t(1) / (scalar_t(1) + std::exp(-t * proj));
          const scalar_t k = g[bi * L.relations + ri] * s * (scalar_t(1) - s) * t;
          scalar_t* ga = o + (bi * L.tokens + row[0]) * 2;
          scalar_t* gb = o + (bi * L.tokens + row[1]) * 2;
          ga[0] += k * dx;
          ga[1] += k * dy;
          gb[0] -= k * dx;
          gb[1] -= k * dy;
        }
      }
    });
  });
  return out.to(centroids_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(xlard, CPU, m) {
  m.impl("attention_centroids", &attention_centroids_cpu);
  m.impl("_attention_centroids_backward", &attention_centroids_backward_cpu);
  m.impl("position_scores", &position_scores_cpu);
  m.impl("_position_scores_backward", &position_scores_backward_cpu);
}

}  // namespace xlard
