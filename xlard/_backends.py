"""Which provider serves each op on each device, and why the others cannot.

Providers: ``cpu`` (C++ kernels in ``_C``), ``cuda`` (CUDA C++ kernels in
``_C``) and ``triton`` (``xlard._kernels``, registered as the ``xlard_triton::``
ops by ``xlard._triton_ops``). On CUDA tensors the default is ``cuda`` when it
was compiled in, else ``triton``; ``XLARD_CUDA_PROVIDER=cuda|triton`` or the
context manager :func:`provider` choose explicitly. On CPU tensors ``triton``
runs only under ``TRITON_INTERPRET=1`` (how CI tests the Triton kernels).
Nothing here imports Triton or touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator

import torch

from xlard import _extension

OPS = (
    "label_components",
    "count_components",
    "component_stats",
    "attention_centroids",
    "position_scores",
    "color_scores",
    "residual_correction",
    "gaussian_log_prob",
    "sample_correction",
)
PROVIDERS = ("cpu", "cuda", "triton")
_ENV = "XLARD_CUDA_PROVIDER"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("xlard_provider", default=None)


@contextlib.contextmanager
def provider(name: str) -> Iterator[None]:
    """Run the ops in this block with one provider.

    Args:
        name: ``"cuda"``, ``"triton"`` or ``"cpu"``. ``"triton"`` also applies
            to CPU tensors when ``TRITON_INTERPRET=1`` is set.

    Raises:
        ValueError: for an unknown provider name.

    Example:
        >>> with xlard.ops.provider("triton"):
        ...     counts = xlard.ops.count_components(maps)
    """
    if name not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_status() -> str | None:
    """None when Triton is importable, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    return None


def _triton_ops_namespace():
    from xlard import _triton_ops  # registers xlard_triton:: on first use

    _triton_ops.ensure_registered()
    return torch.ops.xlard_triton


def requested_provider(device_type: str) -> str:
    """The provider asked for on ``device_type``, before availability is checked."""
    forced = _forced.get()
    if forced is not None:
        return forced
    if device_type == "cuda":
        env = os.environ.get(_ENV)
        if env:
            if env not in ("cuda", "triton"):
                raise ValueError(f"{_ENV}: expected 'cuda' or 'triton', got {env!r}")
            return env
        return "cuda" if _extension.has_kernel("count_components", "CUDA") else "triton"
    return "cpu"


def why_not(name: str, device_type: str, op: str = "count_components") -> str | None:
    """None when provider ``name`` can serve ``op`` on ``device_type``, else the reason and the fix."""
    if name == "triton":
        if device_type == "cpu" and not triton_interpreted():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, got device type {device_type!r}"
        return triton_status()
    if not _extension.has_ops():
        return f"xlard._C is not built ({_extension.load_error()!r}); run `pip install --no-build-isolation -e .`"
    key = {"cpu": "CPU", "cuda": "CUDA"}[name]
    if device_type != name:
        return f"provider {name!r} serves {name} tensors, got {device_type} tensors"
    if not _extension.has_kernel(op, key):
        if name == "cuda":
            return ("xlard._C was built without CUDA kernels; reinstall with a CUDA toolkit and a CUDA "
                    "build of torch (XLARD_WITH_CUDA=1 pip install --no-build-isolation -e .), "
                    "or use provider('triton')")
        return f"xlard._C has no {key} kernel for {op}"
    return None


def resolve(op: str, device: torch.device):
    """The ``torch.ops`` overload packet that runs ``op`` on ``device``, or a RuntimeError saying why none can."""
    name = requested_provider(device.type)
    reason = why_not(name, device.type, op)
    if reason is not None:
        raise RuntimeError(f"xlard.ops.{op}: provider {name!r} cannot run on {device.type}: {reason}")
    if name == "triton":
        return getattr(_triton_ops_namespace(), op)
    return getattr(torch.ops.xlard, op)


def table() -> list[dict]:
    """One row per (op, device type): the default provider and why each other one is unavailable."""
    rows = []
    for op in OPS:
        for device_type in ("cpu", "cuda"):
            status = {p: why_not(p, device_type, op) for p in PROVIDERS if p == "triton" or p == device_type}
            rows.append({"op": op, "device": device_type, "default": requested_provider(device_type), "status": status})
    return rows
