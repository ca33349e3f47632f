"""Benchmark fixtures: data generators shared with the tests, machine facts in the JSON."""
from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def pytest_benchmark_update_machine_info(config, machine_info):
    import xlard
    from xlard import _extension

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["xlard"] = xlard.__version__
    machine_info["xlard_build"] = _extension.build_info()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["processor"] = platform.processor() or platform.machine()


@pytest.fixture
def check_once():
    """Call ``check()`` once, outside the timed region (benches verify what they time)."""

    def run(check):
        check()

    return run
