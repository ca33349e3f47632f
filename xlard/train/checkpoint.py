"""Atomic checkpoints: one file per saved step, written whole or not at all.

A checkpoint is a ``torch.save`` dict written through :mod:`xlard._io` (a
temporary file in the run folder, fsync'ed, renamed over ``ckpt-<step>.pt``,
the folder fsync'ed). A crash at any moment leaves either
the previous checkpoints or the new one, never a torn file. The trainer decides
what goes in (everything a run depends on, RNG states included).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xlard import _io

__all__ = ["save_atomic", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "rng_state",
           "set_rng_state"]

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`xlard._io.atomic_path`: temp file, fsync, rename)."""
    with _io.atomic_path(path, owner="xlard train checkpoint", make_parents=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint written by :func:`save_atomic` (``mmap``: its tensors mapped from the file, not read,
    for a look at its small entries).

    Raises:
        ValueError: the file is not a trainer checkpoint, or it cannot be read (a damaged or cut copy: the
            trainer's own writes are atomic, a copy between machines need not be); the message names the
            checkpoint before it, from which a run resumes once the damaged one is deleted.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in any way (TypeError, ImportError, ...)
        if isinstance(exc, OSError) and not Path(path).is_file():  # a missing file stays a missing file
            raise
        reason = " ".join(str(exc).split()).split(". ")[0][:160] or type(exc).__name__
        earlier = [p for _, p in list_checkpoints(Path(path).parent) if p.name < Path(path).name]
        fix = (f"delete it to resume from the one before, {earlier[-1]}" if earlier else
               "no earlier checkpoint is left: delete it to start the run again, or train into another --out")
        raise ValueError(f"{path}: a damaged checkpoint, it cannot be read ({reason}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != "xlard.train/1":
        raise ValueError(f"{path} is not an xlard trainer checkpoint")
    return state


def rng_state() -> dict:
    """Every global RNG the process uses: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
