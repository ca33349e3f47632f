"""GPU benchmark fixtures: skip everything here without a CUDA device; record the GPU in the JSON.

Nothing touches CUDA at import or collection time, so the CPU smoke run
(``pytest benches --benchmark-disable``) collects these files and skips them.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs a CUDA device (torch.cuda.is_available() is False)")


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in (module, f"{module}-cuda13x", f"{module}-cuda12x"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["triton"] = _version("triton")
    machine_info["cupy"] = _version("cupy")
    machine_info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
