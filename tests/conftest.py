"""pytest configuration: skip CUDA tests without a GPU; keep everything offline."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton fixes interpreted-vs-compiled for its own library when triton.language is first
# imported (diffusers and inductor import it early), so a session without a GPU turns the
# interpreter on before any test module loads; tests/test_triton_ops.py needs it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            # The marker, not item.keywords: keywords also hold every parent folder's name,
            # so a checkout in a folder named "cuda" skipped the whole suite.
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)
