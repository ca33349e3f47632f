// CUDA provider of label_components, count_components and component_stats: argument
// checks, output allocation and the choice between the shared-memory path (a map's
// per-pixel arrays fit on chip) and the global-memory path (scratch buffers from the
// caching allocator, so both paths are CUDA-graph capturable). One kernel launch for
// the whole batch, no host synchronization. Semantics: docs/ops.md.
//
// XLARD_CUDA_COMPONENTS_PATH=global forces the global-memory path (a test hook: it lets
// the tests run the big-map code on small adversarial maps).
//
// The global-memory path needs ~4.1 bytes of scratch per pixel of each map; the batch
// is processed in waves of maps (one launch per wave, the scratch allocated once and
// reused in stream order), so the scratch stays under XLARD_CUDA_COMPONENTS_SCRATCH_MB
// (default 256; at least one map's worth). Maps that fit in shared memory need none.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "host_common.h"
#include "logic.h"

namespace xlard {
namespace {

using cuda_host::check_cuda;

// Largest map the kernel accepts: pixel indices, areas and slot encodings stay in int32.
constexpr int64_t kMaxPixels = cuda_logic::kComponentsMaxPixels;

struct Checked {
  at::Tensor maps;  // contiguous
  cuda::ComponentsParams params;
  cuda::Kind kind;
  std::vector<int64_t> batch_shape;
};

Checked check_inputs(const char* op, const at::Tensor& maps_in, double threshold, c10::string_view mode,
                     int64_t min_area, int64_t connectivity) {
  check_cuda(op, "maps", maps_in);
  TORCH_CHECK(maps_in.dim() >= 2, "xlard.", op, ": maps must have shape [..., H, W], got ", maps_in.sizes());
  const auto st = maps_in.scalar_type();
  const bool is_mask = st == at::kBool || st == at::kByte;
  TORCH_CHECK(is_mask || cuda_host::is_float_type(st), "xlard.", op,
              ": maps must be float16, bfloat16, float32, float64, bool or uint8, got ", st);
  cuda::ThresholdMode m = cuda::ThresholdMode::kAbsolute;
  if (!is_mask) {  // masks ignore the mode, as on the CPU
    if (mode == "absolute") {
      m = cuda::ThresholdMode::kAbsolute;
    } else if (mode == "relative") {
      m = cuda::ThresholdMode::kRelative;
    } else if (mode == "otsu") {
      m = cuda::ThresholdMode::kOtsu;
    } else {
      TORCH_CHECK(false, "xlard.", op, ": mode must be 'absolute', 'relative' or 'otsu', got '", std::string(mode),
                  "'");
    }
  }
  TORCH_CHECK(std::isfinite(threshold), "xlard.", op, ": threshold must be finite, got ", threshold);
  TORCH_CHECK(min_area >= 1, "xlard.", op, ": min_area must be >= 1, got ", min_area);
  TORCH_CHECK(connectivity == 4 || connectivity == 8, "xlard.", op, ": connectivity must be 4 or 8, got ",
              connectivity);
  const int64_t h = maps_in.size(-2), w = maps_in.size(-1);
  TORCH_CHECK(h * w <= kMaxPixels, "xlard.", op, ": the CUDA kernel takes maps of at most 2^30 pixels, got H * W = ",
              h * w, " (the CPU provider takes up to 2^31 - 1)");
  // Otsu's exact int64 class sums stay below 2^63 up to 2^27 pixels per map (255 * n^2), as on the CPU.
  TORCH_CHECK(m != cuda::ThresholdMode::kOtsu || h * w <= (int64_t(1) << 27), "xlard.", op,
              ": mode 'otsu' takes maps of at most 2^27 pixels (its int64 class sums would overflow), got H * W = ",
              h * w);
  Checked c;
  // The kernel reads each map as one contiguous block; a strided or expanded view is copied once here.
  c.maps = maps_in.contiguous();
  c.kind = cuda_host::kind_of(st);
  c.batch_shape.assign(maps_in.sizes().begin(), maps_in.sizes().end() - 2);
  auto& p = c.params;
  p.num_maps = h * w == 0 ? 0 : maps_in.numel() / (h * w);
  TORCH_CHECK(p.num_maps <= std::numeric_limits<int32_t>::max(), "xlard.", op,
              ": at most 2^31 - 1 maps per call on CUDA, got ", p.num_maps);
  p.maps = c.maps.const_data_ptr();
  p.height = static_cast<int>(h);
  p.width = static_cast<int>(w);
  p.mode = m;
  p.threshold_f = static_cast<float>(threshold);  // acc(threshold), rounded like the CPU's static_cast
  p.threshold_d = threshold;
  // A component never exceeds H * W pixels: a larger min_area drops everything.
  p.min_area = static_cast<int>(std::min<int64_t>(min_area, h * w + 1));
  p.connectivity = static_cast<int>(connectivity);
  return c;
}

bool force_global_path() {
  const char* v = std::getenv("XLARD_CUDA_COMPONENTS_PATH");
  return v != nullptr && std::strcmp(v, "global") == 0;
}

// Scratch budget of the global-memory path, in bytes.
int64_t scratch_budget_bytes(const char* op) {
  const char* v = std::getenv("XLARD_CUDA_COMPONENTS_SCRATCH_MB");
  if (v == nullptr || *v == '\0') return cuda_logic::kComponentsScratchBudgetBytes;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0 && mb <= (int64_t(1) << 40), "xlard.", op,
              ": XLARD_CUDA_COMPONENTS_SCRATCH_MB must be a whole number of MiB >= 0, got '", v, "'");
  return static_cast<int64_t>(mb) << 20;
}

// Picks the path, allocates the global scratch if needed, launches (one launch, or one
// per wave on the global path), checks each launch.
void run(const char* op, Checked& c) {
  auto& p = c.params;
  const int64_t limit = cuda_host::shared_memory_per_block_optin();
  size_t bytes = cuda::components_shared_bytes(p.height, p.width, p.max_components, false);
  const cudaStream_t stream = cuda_host::current_stream();
  if (!force_global_path() && static_cast<int64_t>(bytes) <= limit) {
    C10_CUDA_CHECK(cuda::launch_components(c.kind, p, bytes, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  bytes = cuda::components_shared_bytes(p.height, p.width, p.max_components, true);
  // 24 bytes a slot above a fixed part: the most slots that fit, for the message
  const int64_t most = (limit - static_cast<int64_t>(cuda::components_shared_bytes(p.height, p.width, 0, true))) / 24;
  TORCH_CHECK(static_cast<int64_t>(bytes) <= limit, "xlard.", op, ": max_components = ", p.max_components, " needs ",
              bytes, " bytes of shared memory per block, more than this GPU's ", limit, "; ask for at most ", most,
              " components, or use the CPU or Triton provider, which take any K (with xlard.ops.provider(\"triton\"))");
  const auto opts = c.maps.options().dtype(at::kInt);
  const int64_t pixels = static_cast<int64_t>(p.height) * p.width;
  const int64_t words = static_cast<int64_t>(p.height) * cuda::components_words_per_row(p.width);
  const int64_t wave =
      cuda_logic::components_wave_maps(p.num_maps, (pixels + words) * int64_t(sizeof(int32_t)), scratch_budget_bytes(op));
  at::Tensor scratch_parent = at::empty({wave, pixels}, opts);
  at::Tensor scratch_bits = at::empty({wave, words}, opts);
  const int64_t elem = c.maps.element_size(), K = p.max_components;
  for (int64_t first = 0; first < p.num_maps; first += wave) {
    cuda::ComponentsParams q = p;  // the same call, restricted to maps [first, first + q.num_maps)
    q.num_maps = std::min(wave, p.num_maps - first);
    q.maps = static_cast<const char*>(p.maps) + first * pixels * elem;
    q.labels = p.labels != nullptr ? p.labels + first * pixels : nullptr;
    q.counts = p.counts + first;
    q.areas = p.areas != nullptr ? p.areas + first * K : nullptr;
    q.centroids = p.centroids != nullptr ? p.centroids + first * K * 2 : nullptr;
    q.scratch_parent = scratch_parent.data_ptr<int32_t>();
    q.scratch_bits = reinterpret_cast<uint32_t*>(scratch_bits.data_ptr<int32_t>());
    C10_CUDA_CHECK(cuda::launch_components(c.kind, q, bytes, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> label_components_cuda(const at::Tensor& maps_in, double threshold,
                                                         c10::string_view mode, int64_t min_area,
                                                         int64_t connectivity) {
  const c10::cuda::CUDAGuard guard(maps_in.device());
  Checked c = check_inputs("label_components", maps_in, threshold, mode, min_area, connectivity);
  at::Tensor labels = at::empty(c.maps.sizes(), c.maps.options().dtype(at::kInt));
  if (labels.numel() == 0) return {labels, at::zeros(c.batch_shape, c.maps.options().dtype(at::kInt))};
  // The kernel writes every label and every count: no fill launch before it.
  at::Tensor counts = at::empty(c.batch_shape, c.maps.options().dtype(at::kInt));
  c.params.labels = labels.data_ptr<int32_t>();
  c.params.counts = counts.data_ptr<int32_t>();
  run("label_components", c);
  return {labels, counts};
}

at::Tensor count_components_cuda(const at::Tensor& maps_in, double threshold, c10::string_view mode,
                                 int64_t min_area, int64_t connectivity) {
  const c10::cuda::CUDAGuard guard(maps_in.device());
  Checked c = check_inputs("count_components", maps_in, threshold, mode, min_area, connectivity);
  if (c.params.num_maps == 0) return at::zeros(c.batch_shape, c.maps.options().dtype(at::kInt));
  at::Tensor counts = at::empty(c.batch_shape, c.maps.options().dtype(at::kInt));  // all written by the kernel
  c.params.counts = counts.data_ptr<int32_t>();
  run("count_components", c);
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_stats_cuda(const at::Tensor& maps_in, double threshold,
                                                                    c10::string_view mode, int64_t min_area,
                                                                    int64_t connectivity, int64_t max_components) {
  const c10::cuda::CUDAGuard guard(maps_in.device());
  Checked c = check_inputs("component_stats", maps_in, threshold, mode, min_area, connectivity);
  TORCH_CHECK(max_components >= 1, "xlard.component_stats: max_components must be >= 1, got ", max_components);
  TORCH_CHECK(max_components <= (int64_t(1) << 20),
              "xlard.component_stats: the CUDA kernel takes max_components <= 2^20, got ", max_components);
  std::vector<int64_t> shape = c.batch_shape;
  std::vector<int64_t> area_shape = shape;
  area_shape.push_back(max_components);
  std::vector<int64_t> centroid_shape = area_shape;
  centroid_shape.push_back(2);
  const auto int_opts = c.maps.options().dtype(at::kInt);
  const auto float_opts = c.maps.options().dtype(at::kFloat);
  if (c.params.num_maps == 0) {  // no map, or empty maps: no component anywhere
    return {at::zeros(shape, int_opts), at::zeros(area_shape, int_opts),
            at::full(centroid_shape, std::numeric_limits<float>::quiet_NaN(), float_opts)};
  }
  // A map of H x W pixels holds at most ceil(H * W / 2) components (a checkerboard, 4-connected): the kernel's
  // per-slot shared memory (24 bytes a slot) is sized for no more than that, so a large max_components on small
  // maps runs as the CPU and Triton providers run it; the slots past it are 0 / NaN, as unused slots are.
  const int64_t pixels = static_cast<int64_t>(c.params.height) * c.params.width;
  const int64_t k_run = std::min<int64_t>(max_components, (pixels + 1) / 2);
  std::vector<int64_t> run_area_shape = shape;
  run_area_shape.push_back(k_run);
  std::vector<int64_t> run_centroid_shape = run_area_shape;
  run_centroid_shape.push_back(2);
  // The kernel writes every count, area and centroid slot it is given (unused ones as 0 / NaN).
  at::Tensor counts = at::empty(shape, int_opts);
  at::Tensor areas = at::empty(run_area_shape, int_opts);
  at::Tensor centroids = at::empty(run_centroid_shape, float_opts);
  c.params.counts = counts.data_ptr<int32_t>();
  c.params.max_components = static_cast<int>(k_run);
  c.params.areas = areas.data_ptr<int32_t>();
  c.params.centroids = centroids.data_ptr<float>();
  run("component_stats", c);
  if (k_run == max_components) return {counts, areas, centroids};
  at::Tensor all_areas = at::zeros(area_shape, int_opts);
  at::Tensor all_centroids = at::full(centroid_shape, std::numeric_limits<float>::quiet_NaN(), float_opts);
  all_areas.narrow(-1, 0, k_run).copy_(areas);
  all_centroids.narrow(-2, 0, k_run).copy_(centroids);
  return {counts, all_areas, all_centroids};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlard, CUDA, m) {
  m.impl("label_components", &label_components_cuda);
  m.impl("count_components", &count_components_cuda);
  m.impl("component_stats", &component_stats_cuda);
}

}  // namespace xlard
