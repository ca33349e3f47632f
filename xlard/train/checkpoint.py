"""Atomic checkpoints: one file per saved step, written whole or not at all.

A checkpoint is a ``torch.save`` dict written through :mod:`xlard._io` (a
temporary file in the run folder, fsync'ed, renamed over ``ckpt-<step>.pt``,
the folder fsync'ed). A crash at any moment leaves either
the previous checkpoints or the new one, never a torn file. The trainer decides
what goes in (everything a run depends on, RNG states included).
"""
from __future__ import annotations

import os
import pickle
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
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"list_checkpoints: folder must be a run folder (str or path), got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():  # a folder of that name is no checkpoint (torch.load raised IsADirectoryError)
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
        TypeError: ``path`` or ``map_location`` of the wrong kind (checked before the file is read).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_checkpoint: path must be a checkpoint file (str or path), got {type(path).__name__}")
    _check_map_location(map_location)
    if not isinstance(mmap, bool):
        raise TypeError(f"load_checkpoint: mmap must be a bool, got {mmap!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in any way (TypeError, ImportError, ...)
        if isinstance(exc, OSError) and not Path(path).is_file():  # a missing file stays a missing file
            raise
        raise ValueError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != "xlard.train/1":
        raise ValueError(f"{path} is not an xlard trainer checkpoint")
    _check_entries(path, state)
    return state


def _check_map_location(map_location: Any) -> None:
    """A device string torch cannot parse ('gpu') failed inside the unpickling, read as a damaged file."""
    if map_location is None or callable(map_location) or isinstance(map_location, (torch.device, dict)):
        return
    if not isinstance(map_location, str):
        raise TypeError(f"load_checkpoint: map_location must be a device (str or torch.device), a dict or a "
                        f"function, got {type(map_location).__name__}")
    try:
        torch.device(map_location)
    except RuntimeError:
        raise ValueError(f"load_checkpoint: map_location must name a device torch knows ('cpu', 'cuda', "
                         f"'cuda:1', ...), got {map_location!r}") from None


def _unreadable(path, exc: Exception) -> str:
    """The message for a checkpoint file torch could not read.

    Only a file that is surely damaged (cut short, empty, not an archive) is called so, with the advice to
    delete it; any other failure (a module this process cannot import, another torch) may come from this
    process, not from the file, and is reported without that advice: deleting a good checkpoint loses work.
    """
    text = " ".join(str(exc).split())
    size = Path(path).stat().st_size if Path(path).is_file() else None
    if size == 0:
        damage = "the file is empty"
    elif isinstance(exc, (pickle.UnpicklingError, EOFError)) or "PytorchStreamReader" in text:
        damage = text.split(". ")[0][:160] or type(exc).__name__
    elif "mmap can only be used" in text:  # torch's mmap reader names a file that is no zip archive so
        damage = "not an archive written by torch.save (cut or overwritten)"
    else:
        damage = None
    earlier = [p for _, p in list_checkpoints(Path(path).parent) if p.name < Path(path).name]
    fix = (f"delete it to resume from the one before, {earlier[-1]}" if earlier else
           "no earlier checkpoint is left: delete it to start the run again, or train into another --out")
    if damage is not None:
        return f"{path}: a damaged checkpoint, it cannot be read ({damage}); {fix}"
    reason = text[:200] or type(exc).__name__
    return (f"{path}: this process cannot read the checkpoint ({type(exc).__name__}: {reason}); if it comes from "
            f"another xlard or torch version, read it with that one; only if the file itself is damaged (a cut "
            f"copy), {fix}")


#: The entries :meth:`xlard.train.trainer.Trainer.save` writes and a resume reads, with their kinds.
_ENTRIES = {"step": int, "warm": bool, "world_size": int, "config": dict, "corrector": dict, "projector": dict,
            "policy_opt": dict, "projector_opt": dict, "scheduler": dict, "reward_stats": dict, "rank_state": list}


def _check_entries(path, state: dict) -> None:
    """A hand-edited or foreign file with the format tag failed later inside the resume ("'<=' not supported
    between 'int' and 'str'", "written by None process(es)")."""
    missing = [k for k in _ENTRIES if k not in state]
    if missing:
        raise ValueError(f"{path} is not a complete xlard trainer checkpoint: it has no {', '.join(missing)}")
    for key, kind in _ENTRIES.items():
        value = state[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{path}: checkpoint entry {key!r} must be {kind.__name__}, got "
                             f"{type(value).__name__} {value!r:.60}")
    if state["step"] < 0 or state["world_size"] < 1 or len(state["rank_state"]) != state["world_size"]:
        raise ValueError(f"{path}: checkpoint entries out of range (step {state['step']}, must be >= 0; world_size "
                         f"{state['world_size']}, must be >= 1 and the number of rank_state entries, "
                         f"{len(state['rank_state'])})")


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
