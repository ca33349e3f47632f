// CPU kernel of color_scores: one batched GEMM of raw dot products, then a fused
// pass that divides by the norms, applies the patch mask and keeps the running max
// and its first argmax. Semantics: docs/ops.md.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <torch/library.h>

#include <limits>

namespace xlard {
namespace {

bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor> color_scores_cpu(const at::Tensor& features_in, const at::Tensor& colors_in,
                                                    const std::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(features_in.dim() == 3, "xlard.color_scores: patch_features must have shape [B, N, D], got ",
              features_in.sizes());
  TORCH_CHECK(colors_in.dim() == 2 || colors_in.dim() == 3,
              "xlard.color_scores: color_embeddings must have shape [C, D] or [B, C, D], got ", colors_in.sizes());
  TORCH_CHECK(is_float_type(features_in.scalar_type()) && is_float_type(colors_in.scalar_type()),
              "xlard.color_scores: patch_features and color_embeddings must be floating, got ",
              features_in.scalar_type(), " and ", colors_in.scalar_type());
  const int64_t b = features_in.size(0), n = features_in.size(1), d = features_in.size(2);
  TORCH_CHECK(colors_in.size(-1) == d, "xlard.color_scores: color_embeddings feature size ", colors_in.size(-1),
              " does not match patch_features feature size ", d);
  if (colors_in.dim() == 3) {
    TORCH_CHECK(colors_in.size(0) == b, "xlard.color_scores: color_embeddings batch size ", colors_in.size(0),
                " does not match patch_features batch size ", b);
  }
  const int64_t c = colors_in.size(-2);
  const bool has_mask = mask_in.has_value() && mask_in->defined();
  if (has_mask) {
    TORCH_CHECK(mask_in->scalar_type() == at::kBool, "xlard.color_scores: patch_mask must be bool, got ",
                mask_in->scalar_type());
    TORCH_CHECK(mask_in->dim() == 3 && mask_in->size(0) == b && mask_in->size(1) == c && mask_in->size(2) == n,
                "xlard.color_scores: patch_mask must have shape [B, C, N] = [", b, ", ", c, ", ", n, "], got ",
                mask_in->sizes());
  }
  const bool dbl = features_in.scalar_type() == at::kDouble || colors_in.scalar_type() == at::kDouble;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  at::Tensor scores = at::zeros({b, c}, features_in.options().dtype(acc));
  at::Tensor index = at::full({b, c}, -1, features_in.options().dtype(at::kLong));
  if (b == 0 || c == 0 || n == 0) return {scores, index};
  const at::Tensor f = features_in.to(acc).contiguous();
  at::Tensor e = colors_in.to(acc);
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
    const bool* mp = has_mask ? mask.const_data_ptr<bool>() : nullptr;
    scalar_t* sp = scores.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    at::parallel_for(0, b * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t bi = k / c;
        const scalar_t* row = dp + k * n;
        const scalar_t* fnb = fn + bi * n;
        const bool* allowed = mp ? mp + k * n : nullptr;
        const scalar_t ek = en[k];
        scalar_t best = -std::numeric_limits<scalar_t>::infinity();
        int64_t arg = -1;
        for (int64_t j = 0; j < n; ++j) {
          if (allowed && !allowed[j]) continue;
          const scalar_t denom = ek * fnb[j];
          const scalar_t s = denom > scalar_t(0) ? row[j] / denom : scalar_t(0);
          if (s > best) {  // strict: the first patch reaching the max wins
            best = s;
            arg = j;
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
