// Argument checks and shape helpers shared by every torch-facing host function (the
// CPU kernels in csrc/cpu and the CUDA glue in csrc/cuda), so both providers accept
// exactly the same inputs and word their errors the same way. Device-agnostic: the
// CUDA glue adds its own "must be a CUDA tensor" check on top.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace xlard {
namespace checks {

inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// float64 inputs accumulate in float64, every other float dtype in float32.
inline at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "xlard.", op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// ---- maps [..., H, W] of scores (attention_centroids) ----------------------------------

inline void check_float_maps(const char* op, const at::Tensor& maps) {
  TORCH_CHECK(maps.dim() >= 2, "xlard.", op, ": maps must have shape [..., H, W], got ", maps.sizes());
  TORCH_CHECK(is_float_type(maps.scalar_type()), "xlard.", op,
              ": maps must be float16, bfloat16, float32 or float64, got ", maps.scalar_type());
}

inline std::vector<int64_t> centroid_shape(const at::Tensor& maps) {
  std::vector<int64_t> shape(maps.sizes().begin(), maps.sizes().end() - 2);
  shape.push_back(2);
  return shape;
}

// ---- position_scores ------------------------------------------------------------------

struct RelationLayout {
  int64_t batch, tokens, relations, rel_batch_stride;  // stride 0: one [R, 3] table for the batch
};

inline RelationLayout check_relations(const char* op, const at::Tensor& centroids, const at::Tensor& relations) {
  TORCH_CHECK(centroids.dim() == 3 && centroids.size(2) == 2, "xlard.", op,
              ": centroids must have shape [B, T, 2], got ", centroids.sizes());
  TORCH_CHECK(is_float_type(centroids.scalar_type()), "xlard.", op, ": centroids must be a floating dtype, got ",
              centroids.scalar_type());
  TORCH_CHECK(relations.scalar_type() == at::kLong, "xlard.", op, ": relations must be int64, got ",
              relations.scalar_type());
  TORCH_CHECK((relations.dim() == 2 || relations.dim() == 3) && relations.size(-1) == 3, "xlard.", op,
              ": relations must have shape [R, 3] or [B, R, 3], got ", relations.sizes());
  const int64_t b = centroids.size(0);
  if (relations.dim() == 3) {
    TORCH_CHECK(relations.size(0) == b, "xlard.", op, ": relations batch size ", relations.size(0),
                " does not match centroids batch size ", b);
  }
  check_same_device(op, "relations", relations, "centroids", centroids);
  const int64_t r = relations.size(-2);
  return RelationLayout{b, centroids.size(1), r, relations.dim() == 3 ? r * 3 : 0};
}

// ---- color_scores ----------------------------------------------------------------------

struct ColorLayout {
  int64_t batch, patches, dim, colors;
  bool has_mask;
  at::ScalarType acc;  // float64 if either input is float64, else float32
};

inline ColorLayout check_color_inputs(const at::Tensor& features, const at::Tensor& colors,
                                      const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(features.dim() == 3, "xlard.color_scores: patch_features must have shape [B, N, D], got ",
              features.sizes());
  TORCH_CHECK(colors.dim() == 2 || colors.dim() == 3,
              "xlard.color_scores: color_embeddings must have shape [C, D] or [B, C, D], got ", colors.sizes());
  TORCH_CHECK(is_float_type(features.scalar_type()) && is_float_type(colors.scalar_type()),
              "xlard.color_scores: patch_features and color_embeddings must be floating, got ",
              features.scalar_type(), " and ", colors.scalar_type());
  check_same_device("color_scores", "color_embeddings", colors, "patch_features", features);
  const int64_t b = features.size(0), n = features.size(1), d = features.size(2);
  TORCH_CHECK(colors.size(-1) == d, "xlard.color_scores: color_embeddings feature size ", colors.size(-1),
              " does not match patch_features feature size ", d);
  if (colors.dim() == 3) {
    TORCH_CHECK(colors.size(0) == b, "xlard.color_scores: color_embeddings batch size ", colors.size(0),
                " does not match patch_features batch size ", b);
  }
  const int64_t c = colors.size(-2);
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "xlard.color_scores: patch_mask must be bool, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == b && mask->size(1) == c && mask->size(2) == n,
                "xlard.color_scores: patch_mask must have shape [B, C, N] = [", b, ", ", c, ", ", n, "], got ",
                mask->sizes());
    check_same_device("color_scores", "patch_mask", *mask, "patch_features", features);
  }
  const bool dbl = features.scalar_type() == at::kDouble || colors.scalar_type() == at::kDouble;
  return ColorLayout{b, n, d, c, has_mask, dbl ? at::kDouble : at::kFloat};
}

// ---- latents [B, C, *spatial] (residual_correction, gaussian_log_prob, sample_correction)

inline void check_latent(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2, "xlard.", op, ": ", name, " must have shape [B, C, *spatial], got ", t.sizes());
  TORCH_CHECK(is_float_type(t.scalar_type()), "xlard.", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "xlard.", op, ": ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "xlard.", op, ": ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  check_same_device(op, name, t, ref_name, ref);
}

// sample_correction's latent inputs: z0 [B, C, *spatial], mean and noise like it.
inline void check_sample_inputs(const char* op, const at::Tensor& z0, const at::Tensor& mean,
                                const at::Tensor& noise) {
  check_latent(op, "z0", z0);
  check_same(op, "mean", mean, "z0", z0);
  check_same(op, "noise", noise, "z0", z0);
}

// The Latent Activation Map's shape [B, *spatial] for latents [B, C, *spatial].
inline std::vector<int64_t> lam_shape(const at::Tensor& z) {
  std::vector<int64_t> shape{z.size(0)};
  for (int64_t d = 2; d < z.dim(); ++d) shape.push_back(z.size(d));
  return shape;
}

// An out= tensor of an op: the expected shape, dtype and device, contiguous, and sharing
// no memory with any input (the kernels read inputs after writing outputs).
inline void check_out(const char* op, const char* name, const at::Tensor& out, at::IntArrayRef shape,
                      at::ScalarType dtype, const at::Tensor& ref,
                      std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK(out.sizes() == shape, "xlard.", op, ": out tensor ", name, " must have shape ", shape, ", got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, "xlard.", op, ": out tensor ", name, " must have dtype ", dtype, ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == ref.device(), "xlard.", op, ": out tensor ", name, " must be on ", ref.device(),
              ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "xlard.", op, ": out tensor ", name, " must be contiguous, got strides ",
              out.strides());
  for (const auto& [other_name, other] : others) {
    // TooHard (a strided or expanded input such as a broadcast log_std) is decided by the
    // storage ranges the Python wrapper checks; here only certain overlaps are refused.
    const auto status = at::get_overlap_status(out, *other);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "xlard.", op,
                ": out tensor ", name, " shares memory with ", other_name, "; pass separate buffers");
  }
}

// The per-batch alpha as an accumulation-typed contiguous tensor, or an undefined tensor.
inline at::Tensor alpha_tensor(const char* op, const std::optional<at::Tensor>& alpha, const at::Tensor& ref,
                               at::ScalarType acc) {
  if (!alpha.has_value() || !alpha->defined()) return at::Tensor();
  TORCH_CHECK(is_float_type(alpha->scalar_type()), "xlard.", op, ": alpha must be floating, got ",
              alpha->scalar_type());
  TORCH_CHECK(alpha->dim() == 1 && alpha->size(0) == ref.size(0), "xlard.", op, ": alpha must have shape [B] = [",
              ref.size(0), "], got ", alpha->sizes());
  check_same_device(op, "alpha", *alpha, "the latents", ref);
  return alpha->to(acc).contiguous();
}

// log_std at op level: shape x.shape[1:] (shared over the batch: returns true) or x.shape.
inline bool check_log_std(const char* op, const at::Tensor& log_std, const at::Tensor& x) {
  TORCH_CHECK(is_float_type(log_std.scalar_type()), "xlard.", op, ": log_std must be floating, got ",
              log_std.scalar_type());
  check_same_device(op, "log_std", log_std, "x", x);
  if (log_std.sizes() == x.sizes()) return false;
  TORCH_CHECK(log_std.sizes() == x.sizes().slice(1), "xlard.", op, ": log_std must have shape x.shape[1:] = ",
              x.sizes().slice(1), " or x.shape = ", x.sizes(), " (xlard.ops broadcasts it), got ", log_std.sizes());
  return true;
}

// The per-row values of a log_std view that is constant over its dims from `lead` on
// (size 1 or stride 0 there: an expanded [C, 1, ...] or [B, C, 1, ...]), as a [C] or
// [B, C] view; undefined otherwise. Every provider reads per-channel policies this way.
inline at::Tensor row_constant_values(const at::Tensor& log_std, int64_t lead) {
  for (int64_t d = lead; d < log_std.dim(); ++d) {
    if (log_std.size(d) != 1 && log_std.stride(d) != 0) return at::Tensor();
  }
  at::Tensor rows = log_std;
  for (int64_t d = log_std.dim() - 1; d >= lead; --d) rows = rows.select(d, 0);
  return rows;
}

}  // namespace checks
}  // namespace xlard
