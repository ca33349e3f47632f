"""Atomic file writes for the explanation outputs: a reader never sees half a file (see :mod:`xlard._io`)."""
from __future__ import annotations

import os

from xlard import _io


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    _io.atomic_write_bytes(path, data, owner="xlard.explain", make_parents=True)
