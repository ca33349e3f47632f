"""Registers the Triton kernels (``xlard._kernels``) as the ``xlard_triton::`` ops.

Each ``xlard_triton::<op>`` has exactly the schema of ``xlard::<op>`` (read
from the compiled op at registration time, so schemas are declared only in
``csrc/registration.cpp``). The Triton launchers serve the CUDA key, and the
CPU key for ``TRITON_INTERPRET=1`` (how CI runs the kernels without a GPU).
Fake kernels and autograd for this namespace are those of ``xlard::``
(:func:`xlard._registration.register_python_side`), attached here once the
namespace exists. Where ``_C`` has no CUDA kernel for an op, the same
launchers are also registered as the ``xlard::<op>`` CUDA kernel
(:func:`register_as_xlard_cuda_kernels`), loading Triton on first call.
Importing this module imports neither Triton nor the kernels; call
:func:`ensure_registered` first.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading

import torch

from xlard import _extension, _registration

NAMESPACE = "xlard_triton"

# op -> (kernel module in xlard._kernels, launcher)
KERNELS = {
    "label_components": ("components", "label_components_fwd"),
    "count_components": ("components", "count_components_fwd"),
    "component_stats": ("components", "component_stats_fwd"),
    "attention_centroids": ("centroids", "attention_centroids_fwd"),
    "_attention_centroids_backward": ("centroids", "attention_centroids_bwd"),
    "position_scores": ("centroids", "position_scores_fwd"),
    "_position_scores_backward": ("centroids", "position_scores_bwd"),
    "color_scores": ("color", "color_scores_fwd"),
    "residual_correction": ("correction", "residual_correction_fwd"),
    "_residual_correction_backward": ("correction", "residual_correction_bwd"),
    "gaussian_log_prob": ("correction", "gaussian_log_prob_fwd"),
    "_gaussian_log_prob_backward": ("correction", "gaussian_log_prob_bwd"),
    "sample_correction": ("correction", "sample_correction_fwd"),
}

_lock = threading.Lock()
_library: torch.library.Library | None = None


def _load_dev_kernels_package() -> None:
    """Makes the repository's ``kernels/`` folder importable as ``xlard._kernels``.

    A regular install maps ``xlard._kernels`` to ``kernels/`` (``package_dir`` in
    setup.py); an editable install or a plain checkout on ``sys.path`` may not.
    The folder is registered under its installed name, never as ``kernels``.
    """
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError("xlard._kernels is not installed and no kernels/ folder sits next to the xlard "
                          "package; reinstall with `pip install --no-build-isolation -e .`")
    spec = importlib.util.spec_from_file_location("xlard._kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["xlard._kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["xlard._kernels"]
        raise
    import xlard

    xlard._kernels = module


def kernel_module(name: str):
    """The kernel module ``xlard._kernels.<name>`` (imports Triton)."""
    try:
        importlib.import_module("xlard._kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "xlard._kernels":
            raise
        _load_dev_kernels_package()
    return importlib.import_module(f"xlard._kernels.{name}")


def _first_tensor(args) -> torch.Tensor | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
    return None


def _check_one_device(op: str, args) -> None:
    """Every tensor argument on the first one's device, as the C++ ops check (a launch sees raw pointers: a
    tensor on another GPU or on the host would be read through a pointer that is not the kernel's device's)."""
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    first_i, first = tensors[0] if tensors else (0, None)
    for i, t in tensors[1:]:
        if t.device != first.device:
            names = [arg.name for arg in getattr(torch.ops.xlard, op).default._schema.arguments]
            raise RuntimeError(f"xlard.{op}: {names[i]} must be on the device of {names[first_i]} "
                               f"({first.device}), got {t.device}")


def _serve(op: str, launcher):
    """Wraps a launcher: CUDA work runs on the inputs' device; CPU tensors need the interpreter."""

    @functools.wraps(launcher)
    def run(*args):
        _check_one_device(op, args)
        tensor = _first_tensor(args)
        if tensor is not None and tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"{NAMESPACE}::{op} got CPU tensors: Triton kernels run on CPU tensors only under "
                               "TRITON_INTERPRET=1 (set before xlard's kernels are imported); use CUDA tensors "
                               "or the 'cpu' provider")
        if tensor is not None and tensor.device.type == "cuda":
            with torch.cuda.device(tensor.device):
                return launcher(*args)
        return launcher(*args)

    return run


def _schema(op: str) -> str:
    schema = str(getattr(torch.ops.xlard, op).default._schema)
    prefix = "xlard::"
    if not schema.startswith(prefix):
        raise RuntimeError(f"unexpected schema for xlard::{op}: {schema}")
    return schema[len(prefix):]


def ensure_registered() -> None:
    """Defines ``xlard_triton::<op>`` for every op in :data:`KERNELS` (idempotent, thread-safe).

    Raises:
        RuntimeError: when ``xlard._C`` (which holds the schemas) is not built.
        ImportError: when Triton or the kernel package cannot be imported.
    """
    global _library
    if _library is not None:
        return
    with _lock:
        if _library is not None:
            return
        _extension.require_ops()
        launchers = {op: getattr(kernel_module(module), name) for op, (module, name) in KERNELS.items()}
        library = torch.library.Library(NAMESPACE, "DEF")
        for op, launcher in launchers.items():
            library.define(_schema(op))
            served = _serve(op, launcher)
            library.impl(op, served, "CUDA")
            library.impl(op, served, "CPU")
        # Fake kernels and autograd come from the same function that serves xlard:: (one description of both).
        _registration.register_python_side(NAMESPACE)
        _library = library


def is_registered() -> bool:
    """Whether :func:`ensure_registered` has run in this process."""
    return _library is not None


_cuda_library: torch.library.Library | None = None


def _lazy_launcher(op: str):
    """The launcher of ``op``, imported (with Triton) on its first call."""
    module, name = KERNELS[op]
    served = None

    def run(*args):
        nonlocal served
        if served is None:
            served = _serve(op, getattr(kernel_module(module), name))
        return served(*args)

    run.__name__ = f"triton_{op}"
    return run


def _out_from_functional(op: str, names: tuple[str, ...]):
    """An ``xlard::<op>.out`` kernel that runs the functional op and copies into the buffers."""

    def run(*args, **out):
        results = getattr(torch.ops.xlard, op).default(*args)
        for name, res in zip(names, results):
            out[name].copy_(res)

    return run


def register_as_xlard_cuda_kernels() -> list[str]:
    """Registers the Triton launchers as the ``xlard::<op>`` CUDA kernels ``_C`` lacks (idempotent).

    Then every way of calling an op on CUDA tensors (``xlard.ops``, ``torch.ops.xlard``,
    a compiled graph, a CUDA graph) reaches a kernel. Triton is imported on the first
    call, not here. Returns the ops registered (none when ``_C`` has CUDA kernels).
    """
    global _cuda_library
    if _cuda_library is not None or not _extension.has_ops():
        return []
    with _lock:
        if _cuda_library is not None:
            return []
        library = torch.library.Library("xlard", "IMPL")
        done = []
        for op in KERNELS:
            if not _extension.has_kernel(op, "CUDA"):
                library.impl(op, _lazy_launcher(op), "CUDA")
                done.append(op)
        outs = {"residual_correction": ("zc", "lam"), "sample_correction": ("zc", "delta", "log_prob", "lam")}
        for op, names in outs.items():
            if not _extension.has_kernel(f"{op}.out", "CUDA"):
                library.impl(f"{op}.out", _out_from_functional(op, names), "CUDA")
                done.append(f"{op}.out")
        _cuda_library = library
        return done
