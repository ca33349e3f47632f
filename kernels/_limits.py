"""Launch limits the Triton launchers share (imports nothing of Triton)."""
from __future__ import annotations

#: CUDA's limit on a grid's second axis (the launchers put a size-dependent count there).
GRID_AXIS1_MAX = 65535


def check_grid_axis1(op: str, programs: int, what: str) -> None:
    """Refuse, naming ``op``, a launch whose second grid axis would exceed CUDA's limit (a bare "invalid argument")."""
    if programs > GRID_AXIS1_MAX:
        raise RuntimeError(f"xlard.{op}: {what} needs {programs} programs on the Triton grid's second axis, more than "
                           f"its limit of {GRID_AXIS1_MAX}; use the CUDA provider (with xlard.ops.provider('cuda'): ...)")
