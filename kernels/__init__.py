"""Triton kernels behind the ``xlard_triton::`` ops, installed as ``xlard._kernels``.

One module per op family: ``components`` (label/count/stats), ``centroids``
(attention_centroids, position_scores), ``color`` (color_scores) and
``correction`` (residual_correction, gaussian_log_prob, sample_correction).
Each kernel ``_<op>_fwd_kernel`` has a launcher ``<op>_fwd`` that validates,
allocates and computes the grid. Importing a kernel module imports Triton;
this package file does not. Set ``TRITON_INTERPRET=1`` before importing a
kernel module to run the kernels on CPU tensors.
"""
