"""Which provider serves each op on each device, and why the others cannot.

Providers: ``cpu`` (C++ kernels in ``_C``), ``cuda`` (CUDA C++ kernels in
``_C``) and ``triton`` (``xlard._kernels``, registered as the ``xlard_triton::``
ops by ``xlard._triton_ops``). On CUDA tensors the default is ``cuda`` when it
was compiled in, else ``triton``; ``XLARD_CUDA_PROVIDER=cuda|triton`` or the
context manager :func:`provider` choose explicitly. On CPU tensors ``triton``
runs only under ``TRITON_INTERPRET=1`` (how CI tests the Triton kernels).
Where ``_C`` has no CUDA kernels, the Triton launchers are also registered as
the ``xlard::<op>`` CUDA kernels (:mod:`xlard._triton_ops`), so a direct
``torch.ops.xlard`` call, a compiled graph and a CUDA graph reach the same kernel.

Under ``torch.compile`` the choice is made at trace time by the same rules
(:func:`compiled_op`); the provider set by :func:`provider` is read from a
thread-local that dynamo guards on, so a graph traced under one provider is
retraced under another, never silently reused. A provider that cannot run is
the same error as in eager mode. ``XLARD_CUDA_PROVIDER`` is read when a graph
is traced. Nothing here imports Triton or touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
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



class _Forced(threading.local):
    # A thread-local rather than a ContextVar: dynamo can read (and guard on) it. Set per instance (per thread):
    # a class-level default was read through the class, and a graph traced before any provider() block was not
    # guarded on the instance, so it kept the default provider inside a later block.
    def __init__(self) -> None:
        self.name: str | None = None


_forced = _Forced()


@contextlib.contextmanager
def provider(name: str) -> Iterator[None]:
    """Run the ops in this block with one provider (per thread; compiled graphs
    are guarded on it, so leaving the block retraces them).

    Args:
        name: ``"cuda"``, ``"triton"`` or ``"cpu"``. ``"triton"`` also applies
            to CPU tensors when ``TRITON_INTERPRET=1`` is set.

    Raises:
        ValueError: for an unknown provider name.

    Example:
        >>> import torch, xlard.ops
        >>> maps = torch.rand(2, 77, 32, 32)
        >>> with xlard.ops.provider("cpu"):
        ...     counts = xlard.ops.count_components(maps)
        >>> counts.shape
        torch.Size([2, 77])
        >>> with xlard.ops.provider("triton"):   # the Triton kernels, on a CUDA GPU  # doctest: +SKIP
        ...     counts = xlard.ops.count_components(maps.cuda())
    """
    if name not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    previous = _forced.name
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


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
    return _requested(device_type, _forced.name, os.environ.get(_ENV) if device_type == "cuda" else None)


def _requested(device_type: str, forced: str | None, env: str | None) -> str:
    if forced is not None:
        return forced
    if device_type == "cuda":
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
        if device_type == "cuda" and not torch.backends.cuda.is_built():
            return f"this torch ({torch.__version__}) is a CPU build: it has no CUDA tensors"
        return triton_status()
    if not _extension.has_ops():
        return f"xlard._C is not available ({_extension.load_error()!r}); {_extension._fix_hint()}"
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


def _choose(op: str, device_type: str, forced: str | None, env: str | None) -> tuple[str, str | None]:
    """(namespace, None) of the ops that serve ``op`` on ``device_type``, or ("", why none can)."""
    name = _requested(device_type, forced, env)
    reason = why_not(name, device_type, op)
    if reason is not None:
        return "", f"xlard.ops.{op}: provider {name!r} cannot run on {device_type}: {reason}"
    if name == "triton":
        _triton_ops_namespace()
        return "xlard_triton", None
    return "xlard", None


def resolve(op: str, device: torch.device):
    """The ``torch.ops`` overload packet that runs ``op`` on ``device``, or a RuntimeError saying why none can."""
    namespace, error = _choose(op, device.type, _forced.name, os.environ.get(_ENV) if device.type == "cuda" else None)
    if error is not None:
        raise RuntimeError(error)
    return getattr(getattr(torch.ops, namespace), op)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` when it is not loaded yet (that
    import was most of ``import xlard.ops``'s time, about a second): the decorator only sets the mark dynamo reads
    at trace time, set here directly (tests/test_components.py checks that torch's decorator still sets just
    that mark, and the ``torch.compile(fullgraph=True)`` tests that tracing honours it)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _choose_at_trace_time(op: str, device_type: str, forced: str | None, env: str | None) -> str:
    # Evaluated once per trace (dynamo does not trace into it); the caller passes the
    # thread-local provider so the graph is guarded on it. "!" + message on failure.
    namespace, error = _choose(op, device_type, forced, env)
    return namespace if error is None else "!" + error


def compiled_op(op: str, device: torch.device):
    """:func:`resolve` for code that ``torch.compile`` traces: same choice, same errors."""
    env = os.environ.get(_ENV) if device.type == "cuda" else None
    namespace = _choose_at_trace_time(op, device.type, _forced.name, env)
    if namespace.startswith("!"):
        raise RuntimeError(namespace[1:])
    return getattr(getattr(torch.ops, namespace), op)


def table() -> list[dict]:
    """One row per (op, device type): the default provider and why each other one is unavailable."""
    rows = []
    for op in OPS:
        for device_type in ("cpu", "cuda"):
            status = {p: why_not(p, device_type, op) for p in PROVIDERS if p == "triton" or p == device_type}
            row = {"op": op, "device": device_type, "status": status}
            try:
                row["default"] = requested_provider(device_type)
            except ValueError as exc:  # a bad XLARD_CUDA_PROVIDER: named in the table, which still prints
                row["default"], row["problem"] = "invalid", str(exc)
            rows.append(row)
    return rows
