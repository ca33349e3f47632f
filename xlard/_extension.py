"""Loads the compiled extension ``xlard._C`` and reports what it contains.

Importing this module never fails: a missing or broken ``_C`` is recorded and
reported by :func:`require_ops`, the one place that turns it into an error.
"""
from __future__ import annotations

import importlib

import torch

_BUILD_HINT = "pip install --no-build-isolation -e ."

_load_error: BaseException | None = None
try:
    importlib.import_module("xlard._C")
except (ImportError, OSError) as exc:  # no compiled extension, or an ABI mismatch
    _load_error = exc


def _compiled_kernels() -> dict[str, frozenset[str]]:
    """The ``xlard::`` kernels ``_C`` registered per dispatch key, read once at load time.

    Read before any Python registration: where ``_C`` has no CUDA kernel, the Triton
    launchers are registered as the ``xlard::<op>`` CUDA kernels later on, and those
    must not count as compiled ones.
    """
    found = {}
    for key in ("CPU", "CUDA"):
        names = torch._C._dispatch_get_registrations_for_dispatch_key(key) if _load_error is None else []
        found[key] = frozenset(n[len("xlard::"):] for n in names if n.startswith("xlard::"))
    return found


_COMPILED = _compiled_kernels()


def has_ops() -> bool:
    """Whether ``xlard._C`` loaded and registered the ``xlard::`` ops."""
    return _load_error is None and hasattr(torch.ops.xlard, "count_components")


def load_error() -> BaseException | None:
    """The exception raised while loading ``xlard._C``, if any."""
    return _load_error


def require_ops() -> None:
    """Raise a RuntimeError naming the fix when the compiled ops are missing."""
    if not has_ops():
        raise RuntimeError(
            "xlard's compiled extension xlard._C is not available "
            f"({_load_error!r}); build it with `{_BUILD_HINT}` from the project root"
        )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``xlard._C`` compiled a kernel of ``xlard::<op>`` for ``dispatch_key`` ("CPU", "CUDA").

    Kernels registered from Python (the Triton launchers serving ``xlard::`` on CUDA
    when ``_C`` has none) do not count. A plain set lookup, so ``torch.compile`` traces it.
    """
    return has_ops() and op in _COMPILED.get(dispatch_key, ())


def build_info() -> dict:
    """What was compiled into ``_C``: torch version, CUDA support, compile flags."""
    info = {"loaded": has_ops(), "error": None if _load_error is None else repr(_load_error)}
    if has_ops():
        info["cuda_kernels"] = has_kernel("count_components", "CUDA")
        try:  # the vector level of the CPU correction kernels (XLARD_CPU_ISA caps it)
            info["cpu_isa"] = torch.ops.xlard._cpu_isa()
        except (AttributeError, RuntimeError, ValueError) as err:
            info["cpu_isa"] = f"unavailable: {err}"
    try:
        from xlard import _build_config  # written by setup.py at build time

        info.update(_build_config.BUILD)
    except ImportError:
        pass
    return info
