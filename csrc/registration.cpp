// The one place where every xlard op is declared. Backends attach elsewhere:
// C++ CPU kernels in csrc/cpu (TORCH_LIBRARY_IMPL(xlard, CPU, m)), CUDA kernels
// in csrc/cuda (TORCH_LIBRARY_IMPL(xlard, CUDA, m)), Triton kernels from Python
// (xlard/_triton_ops.py). Fake kernels and autograd live in xlard/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(xlard, m) {
  // Connected components of thresholded maps -> (labels int32 [..., H, W], counts int32 [...]).
  m.def("label_components(Tensor maps, float threshold, str mode, int min_area, int connectivity) -> (Tensor labels, Tensor counts)");
  // Number of connected components per map, int32 [...]; never materializes labels.
  m.def("count_components(Tensor maps, float threshold, str mode, int min_area, int connectivity) -> Tensor");
  // Counts, areas int32 [..., K] and centroids float32 [..., K, 2] of the K largest components.
  m.def("component_stats(Tensor maps, float threshold, str mode, int min_area, int connectivity, int max_components) -> (Tensor counts, Tensor areas, Tensor centroids)");
  // Weighted centroid (x, y) in [0, 1] of max(map, 0), [..., 2].
  m.def("attention_centroids(Tensor maps) -> Tensor");
  // Gradient of attention_centroids with respect to maps.
  m.def("_attention_centroids_backward(Tensor grad, Tensor maps, Tensor centroids) -> Tensor");
  // sigmoid(tau * (p_a - p_b) . v_code) per relation row (a, b, code), [B, R].
  m.def("position_scores(Tensor centroids, Tensor relations, float tau) -> Tensor");
  // Gradient of position_scores with respect to centroids.
  m.def("_position_scores_backward(Tensor grad, Tensor centroids, Tensor relations, float tau) -> Tensor");
  // Max over (allowed) patches of cosine(patch, color) and its argmax -> (float32 [B, C], int64 [B, C]).
  m.def("color_scores(Tensor patch_features, Tensor color_embeddings, Tensor? patch_mask) -> (Tensor scores, Tensor index)");
  // zc = z0 + alpha * delta and lam = sum_c |delta|; alpha is the [B] tensor if given, else alpha_scalar.
  m.def("residual_correction(Tensor z0, Tensor delta, Tensor? alpha, float alpha_scalar) -> (Tensor zc, Tensor lam)");
  // Gradient of residual_correction with respect to delta.
  m.def("_residual_correction_backward(Tensor grad_zc, Tensor grad_lam, Tensor delta, Tensor? alpha, float alpha_scalar) -> Tensor");
  // Diagonal Gaussian log-density summed over non-batch dims; log_std has shape x.shape[1:] or x.shape.
  m.def("gaussian_log_prob(Tensor x, Tensor mean, Tensor log_std) -> Tensor");
  // Gradients of gaussian_log_prob with respect to x, mean and log_std (log_std's own shape).
  m.def("_gaussian_log_prob_backward(Tensor grad, Tensor x, Tensor mean, Tensor log_std) -> (Tensor grad_x, Tensor grad_mean, Tensor grad_log_std)");
  // Fused PPO rollout step: delta = mean + exp(log_std) * noise, then zc, log_prob(delta), lam.
  m.def("sample_correction(Tensor z0, Tensor mean, Tensor log_std, Tensor noise, Tensor? alpha, float alpha_scalar) -> (Tensor zc, Tensor delta, Tensor log_prob, Tensor lam)");
  // out= forms of the two latent-sized ops (CPU): write into caller-owned buffers, so a
  // rollout loop does not allocate (and page-fault in) tens of MiB per call. They return
  // nothing: torch.compile functionalizes custom ops that mutate arguments only when no
  // output aliases an input.
  m.def("residual_correction.out(Tensor z0, Tensor delta, Tensor? alpha, float alpha_scalar, *, Tensor(a!) zc, Tensor(b!) lam) -> ()");
  m.def("sample_correction.out(Tensor z0, Tensor mean, Tensor log_std, Tensor noise, Tensor? alpha, float alpha_scalar, *, Tensor(a!) zc, Tensor(b!) delta, Tensor(c!) log_prob, Tensor(d!) lam) -> ()");
  // The x86 vector level the CPU correction kernels run at now: "baseline", "avx2" or "avx512".
  m.def("_cpu_isa() -> str");
  // Bytes held by the CPU cache of freed large output buffers (csrc/cpu/buffer_cache.h), after freeing them all if release.
  m.def("_cpu_buffer_cache(bool release) -> int");
  // Hands XLARD_CPU_ISA and XLARD_CPU_BUFFER_CACHE_MB (their texts, None = unset) to the CPU kernels, which never
  // call getenv themselves; xlard.ops calls it under the GIL whenever os.environ's values changed.
  m.def("_set_cpu_env(str? isa, str? cache_mb) -> ()");
}

// xlard._C is imported only for the registrations above and in the kernel files.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
