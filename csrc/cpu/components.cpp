// CPU kernels of label_components, count_components and component_stats: maps are
// processed in parallel (at::parallel_for), each by the torch-free core in
// csrc/core/components.h with per-thread scratch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "core/components.h"

namespace xlard {
namespace {

using core::Mode;

struct Params {
  Mode mode;
  double threshold;
  int64_t min_area;
  int64_t connectivity;
  int64_t num_maps, height, width;
};

Params check_inputs(const char* op, const at::Tensor& maps, double threshold, const std::string& mode,
                    int64_t min_area, int64_t connectivity) {
  TORCH_CHECK(maps.dim() >= 2, "xlard.", op, ": maps must have shape [..., H, W], got ", maps.sizes());
  const auto st = maps.scalar_type();
  const bool is_mask = st == at::kBool || st == at::kByte;
  TORCH_CHECK(is_mask || st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "xlard.", op, ": maps must be float16, bfloat16, float32, float64, bool or uint8, got ", st);
  Mode m;
  if (is_mask) {
    m = Mode::kMask;
  } else if (mode == "absolute") {
    m = Mode::kAbsolute;
  } else if (mode == "relative") {
    m = Mode::kRelative;
  } else if (mode == "otsu") {
    m = Mode::kOtsu;
  } else {
    TORCH_CHECK(false, "xlard.", op, ": mode must be 'absolute', 'relative' or 'otsu', got '", mode, "'");
  }
  TORCH_CHECK(std::isfinite(threshold), "xlard.", op, ": threshold must be finite, got ", threshold);
  TORCH_CHECK(min_area >= 1, "xlard.", op, ": min_area must be >= 1, got ", min_area);
  TORCH_CHECK(connectivity == 4 || connectivity == 8, "xlard.", op, ": connectivity must be 4 or 8, got ",
              connectivity);
  const int64_t h = maps.size(-2), w = maps.size(-1);
  TORCH_CHECK(h * w <= std::numeric_limits<int32_t>::max(), "xlard.", op,
              ": one map may hold at most 2^31 - 1 pixels (labels are int32), got H * W = ", h * w);
  // Otsu's exact int64 class sums stay below 2^63 up to 2^27 pixels per map (255 * n^2).
  TORCH_CHECK(m != Mode::kOtsu || h * w <= (int64_t(1) << 27), "xlard.", op,
              ": mode 'otsu' takes maps of at most 2^27 pixels (its int64 class sums would overflow), got H * W = ",
              h * w);
  return Params{m, threshold, min_area, connectivity, h * w == 0 ? 0 : maps.numel() / (h * w), h, w};
}

template <typename scalar_t, typename Fn>
void for_each_map_typed(const at::Tensor& maps, const Params& p, Fn& fn) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t pixels = p.height * p.width;
  const int64_t grain = std::max<int64_t>(1, 16384 / pixels);
  const scalar_t* base = maps.const_data_ptr<scalar_t>();
  at::parallel_for(0, p.num_maps, grain, [&](int64_t begin, int64_t end) {
    core::Labeler labeler;  // per-thread scratch, reused across this chunk's maps
    labeler.reset(p.height, p.width);
    for (int64_t m = begin; m < end; ++m) {
      core::threshold_map<scalar_t, acc_t>(base + m * pixels, pixels, p.mode, p.threshold, labeler.fg.data(),
                                           labeler.bins);
      labeler.label(static_cast<int>(p.connectivity), p.min_area);
      fn(labeler, m);
    }
  });
}

// Runs fn(labeler, map_index) for every map after thresholding and labelling it, in parallel.
template <typename Fn>
void for_each_labelled_map(const at::Tensor& maps, const Params& p, Fn fn) {
  if (p.num_maps == 0 || p.height * p.width == 0) return;
  switch (maps.scalar_type()) {
    case at::kFloat: return for_each_map_typed<float>(maps, p, fn);
    case at::kDouble: return for_each_map_typed<double>(maps, p, fn);
    case at::kHalf: return for_each_map_typed<c10::Half>(maps, p, fn);
    case at::kBFloat16: return for_each_map_typed<c10::BFloat16>(maps, p, fn);
    case at::kBool: return for_each_map_typed<bool>(maps, p, fn);
    case at::kByte: return for_each_map_typed<uint8_t>(maps, p, fn);
    default: TORCH_CHECK(false, "xlard: unsupported maps dtype ", maps.scalar_type());
  }
}

std::vector<int64_t> batch_shape(const at::Tensor& maps) {
  return std::vector<int64_t>(maps.sizes().begin(), maps.sizes().end() - 2);
}

std::tuple<at::Tensor, at::Tensor> label_components_cpu(const at::Tensor& maps_in, double threshold,
                                                        c10::string_view mode, int64_t min_area,
                                                        int64_t connectivity) {
  const Params p = check_inputs("label_components", maps_in, threshold, std::string(mode), min_area, connectivity);
  // The core reads rows contiguously; a strided or expanded view is copied once here.
  const at::Tensor maps = maps_in.contiguous();
  at::Tensor labels = at::empty(maps.sizes(), maps.options().dtype(at::kInt));
  at::Tensor counts = at::zeros(batch_shape(maps), maps.options().dtype(at::kInt));
  if (labels.numel() == 0) return {labels, counts};
  int32_t* lab = labels.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  const int64_t pixels = p.height * p.width;
  for_each_labelled_map(maps, p, [&](core::Labeler& l, int64_t m) {
    l.write_labels(lab + m * pixels);
    cnt[m] = static_cast<int32_t>(l.count());
  });
  return {labels, counts};
}

at::Tensor count_components_cpu(const at::Tensor& maps_in, double threshold, c10::string_view mode,
                                int64_t min_area, int64_t connectivity) {
  const Params p = check_inputs("count_components", maps_in, threshold, std::string(mode), min_area, connectivity);
  const at::Tensor maps = maps_in.contiguous();
  at::Tensor counts = at::zeros(batch_shape(maps), maps.options().dtype(at::kInt));
  if (counts.numel() == 0) return counts;
  int32_t* cnt = counts.data_ptr<int32_t>();
  for_each_labelled_map(maps, p, [&](core::Labeler& l, int64_t m) { cnt[m] = static_cast<int32_t>(l.count()); });
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_stats_cpu(const at::Tensor& maps_in, double threshold,
                                                                   c10::string_view mode, int64_t min_area,
                                                                   int64_t connectivity, int64_t max_components) {
  const Params p = check_inputs("component_stats", maps_in, threshold, std::string(mode), min_area, connectivity);
  TORCH_CHECK(max_components >= 1, "xlard.component_stats: max_components must be >= 1, got ", max_components);
  const at::Tensor maps = maps_in.contiguous();
  std::vector<int64_t> shape = batch_shape(maps);
  at::Tensor counts = at::zeros(shape, maps.options().dtype(at::kInt));
  shape.push_back(max_components);
  at::Tensor areas = at::zeros(shape, maps.options().dtype(at::kInt));
  shape.push_back(2);
  at::Tensor centroids = at::full(shape, std::numeric_limits<float>::quiet_NaN(), maps.options().dtype(at::kFloat));
  if (counts.numel() == 0) return {counts, areas, centroids};
  int32_t* cnt = counts.data_ptr<int32_t>();
  int32_t* area = areas.data_ptr<int32_t>();
  float* cen = centroids.data_ptr<float>();
  for_each_labelled_map(maps, p, [&](core::Labeler& l, int64_t m) {
    cnt[m] = static_cast<int32_t>(l.count());
    l.write_stats(max_components, area + m * max_components, cen + m * max_components * 2);
  });
  return {counts, areas, centroids};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlard, CPU, m) {
  m.impl("label_components", &label_components_cpu);
  m.impl("count_components", &count_components_cpu);
  m.impl("component_stats", &component_stats_cpu);
}

}  // namespace xlard
