"""Triton kernels behind the ``xlard_triton::`` ops, installed as ``xlard._kernels``.

One module per op family: ``components`` (label/count/stats), ``centroids``
(attention_centroids, position_scores), ``color`` (color_scores) and
``correction`` (residual_correction, gaussian_log_prob, sample_correction).
Each kernel ``_<op>_fwd_kernel`` has a launcher ``<op>_fwd`` that validates,
allocates and computes the grid. Importing a kernel module imports Triton;
this package file does not. Set ``TRITON_INTERPRET=1`` before importing a
kernel module to run the kernels on CPU tensors.
"""

if __name__ == "kernels":
    # This folder was imported as the top-level package ``kernels``: the repository root
    # is on sys.path (Python or pytest started in a checkout), so it shadows the
    # ``kernels`` distribution that transformers >= 5.25 imports. Hand that import over to
    # the installed distribution; without one, stay this (empty) package.
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _self = _sys.modules.pop(__name__)
    _saved_path = list(_sys.path)
    try:
        _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
        _real = _importlib.import_module("kernels")
    except ImportError:
        _real = _self
    finally:
        _sys.path[:] = _saved_path
    _sys.modules[__name__] = _real
