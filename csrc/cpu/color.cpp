// CPU kernel of color_scores: each vector divided by its own max-abs, one batched GEMM
// of dot products, then a fused pass that divides by the norms, applies the patch mask
// and finds the max; the patches near it are scored again in one fixed order (identical
// patches score identically) and the first reaching the max wins. Semantics: docs/ops.md.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"

namespace xlard {
namespace {

// Running sums of the fixed-order dot product that re-scores near-best patches (see color_scores_cpu).
constexpr int64_t kDotLanes = 8;

// A contiguous `acc`-typed copy of t [..., D] with every row divided by its own max-abs
// (rows of zeros kept; NaN is skipped by the max, and an inf max turns the row into
// NaN and 0, which score as before). The cosine does not depend on a vector's scale,
// and scaled entries lie in [-1, 1], so the squares and dot products stay finite for
// any finite input (features of 1e30 in float32 would overflow). One read for the max,
// one read and write for the quotient. Divides, never multiplies by a reciprocal: the
// reciprocal of a subnormal max overflows.
template <typename T, typename A>
void scale_rows_into(const T* in, A* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * d;
      A* o = out + r * d;
      A top = A(0);
      for (int64_t j = 0; j < d; ++j) {
        const A v = std::abs(static_cast<A>(x[j]));
        if (v > top) top = v;
      }
      const A scale = top > A(0) ? top : A(1);
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<A>(x[j]) / scale;
    }
  });
}

at::Tensor scaled_rows(const at::Tensor& t_in, at::ScalarType acc) {
  const at::Tensor t = t_in.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(acc));
  const int64_t d = t.size(-1);
  const int64_t rows = d == 0 ? 0 : t.numel() / d;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "xlard_color_scale", [&] {
    if (acc == at::kDouble) {
      scale_rows_into<scalar_t, double>(t.const_data_ptr<scalar_t>(), out.data_ptr<double>(), rows, d);
    } else {
      scale_rows_into<scalar_t, float>(t.const_data_ptr<scalar_t>(), out.data_ptr<float>(), rows, d);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> color_scores_cpu(const at::Tensor& features_in, const at::Tensor& colors_in,
                                                    const std::optional<at::Tensor>& mask_in) {
  const checks::ColorLayout L = checks::check_color_inputs(features_in, colors_in, mask_in);
  // Under torch.autocast the Autocast keys stay in the thread's dispatch set inside this kernel: the bmm below
  // would come back in bfloat16/float16 and the scores would be read as the wrong type. This kernel computes in
  // its accumulation type whatever the caller's autocast says (as the CUDA and Triton kernels do).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t b = L.batch, n = L.patches, d = L.dim, c = L.colors;
  const bool has_mask = L.has_mask;
  const auto acc = L.acc;
  at::Tensor scores = at::zeros({b, c}, features_in.options().dtype(acc));
  at::Tensor index = at::full({b, c}, -1, features_in.options().dtype(at::kLong));
  if (b == 0 || c == 0 || n == 0) return {scores, index};
  const at::Tensor f = scaled_rows(features_in, acc);
  at::Tensor e = scaled_rows(colors_in, acc);
  if (e.dim() == 2) e = e.unsqueeze(0).expand({b, c, d});
  e = e.contiguous();
  // dots[b, c, n] = <e_bc, f_bn>; norms separately so the big feature tensor is read once.
  const at::Tensor dots = at::bmm(e, f.transpose(1, 2)).contiguous();
  const at::Tensor fnorm = at::linalg_vector_norm(f, 2, {-1}).contiguous();
  const at::Tensor enorm = at::linalg_vector_norm(e, 2, {-1}).contiguous();
  const at::Tensor mask = has_mask ? mask_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "xlard_color_scores", [&] {
    const scalar_t* dp = dots.const_data_ptr<scalar_t>();
    const scalar_t* fn = fnorm.const_data_ptr<scalar_t>();
    const scalar_t* en = enorm.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    const bool* mp = has_mask ? mask.const_data_ptr<bool>() : nullptr;
    scalar_t* sp = scores.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    // The GEMM's rounding depends on where a row sits in its tiles, so two identical patches can come out a
    // last bit apart and the later one win. Every patch within `tol` of the GEMM's best (a bound on the two
    // computations' rounding: entries in [-1, 1], cosines in [-1, 1]) is scored again by one fixed-order dot
    // product, the same for every patch, and the first patch reaching the max of those wins.
    const scalar_t tol = scalar_t(8) * static_cast<scalar_t>(d + 2) * std::numeric_limits<scalar_t>::epsilon();
    at::parallel_for(0, b * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t bi = k / c;
        const scalar_t* row = dp + k * n;
        const scalar_t* fnb = fn + bi * n;
        const bool* allowed = mp ? mp + k * n : nullptr;
        const scalar_t ek = en[k];
        const scalar_t* ev = ep + k * d;
        // the GEMM's cosine of patch j (0 for a zero-norm vector): both passes below read it the same way
        const auto gemm_score = [&](int64_t j, scalar_t denom) {
          return denom > scalar_t(0) ? row[j] / denom : scalar_t(0);
        };
        scalar_t top = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          if (allowed && !allowed[j]) continue;
          const scalar_t s = gemm_score(j, ek * fnb[j]);
          if (s > top) top = s;  // NaN never is
        }
        scalar_t best = -std::numeric_limits<scalar_t>::infinity();
        int64_t arg = -1;
        if (top > -std::numeric_limits<scalar_t>::infinity()) {
          for (int64_t j = 0; j < n; ++j) {
            if (allowed && !allowed[j]) continue;
            const scalar_t denom = ek * fnb[j];
            if (!(gemm_score(j, denom) >= top - tol)) continue;
            scalar_t exact = scalar_t(0);
            if (denom > scalar_t(0)) {
              // Eight running sums (feature q into sum q % 8, in feature order), then the eight in order: the
              // order xlard.reference uses too (no FMA: the build has -ffp-contract=off).
              const scalar_t* fv = fp + (bi * n + j) * d;
              scalar_t lanes[kDotLanes] = {};
              const int64_t full = d - d % kDotLanes;
              for (int64_t q = 0; q < full; q += kDotLanes) {
                for (int64_t l = 0; l < kDotLanes; ++l) lanes[l] += ev[q + l] * fv[q + l];
              }
              for (int64_t q = full; q < d; ++q) lanes[q - full] += ev[q] * fv[q];
              scalar_t dot = lanes[0];
              for (int64_t l = 1; l < kDotLanes; ++l) dot += lanes[l];
              exact = dot / denom;
            }
            if (exact > best) {  // strict: the first patch reaching the max wins
              best = exact;
              arg = j;
            }
          }
        }
        sp[k] = arg >= 0 ? best : scalar_t(0);
        ip[k] = arg;
      }
    });
  });
  return {scores, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlard, CPU, m) { m.impl("color_scores", &color_scores_cpu); }

}  // namespace xlard
