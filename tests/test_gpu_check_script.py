"""scripts/gpu_check.sh's argument handling (the GPU steps themselves need a GPU: see the script's header).

A missing or non-numeric --budget was a bash "unbound variable" error, a negative one ran with a negative
budget, and --help or a usage mistake created the output folder first."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["--budget"], "--budget needs a number of seconds"),
    (["--budget", "abc"], "--budget must be a whole number of seconds (no leading zero), got 'abc'"),
    (["--budget", "-5"], "--budget must be a whole number of seconds (no leading zero), got '-5'"),
    (["--budget", "30"], "--budget must be at least 60 seconds (the build alone takes longer), got 30"),
    # bash arithmetic read 0100 as octal (a 64 s budget) and failed on 0900 after making $OUT
    (["--budget", "0100"], "--budget must be a whole number of seconds (no leading zero), got '0100'"),
    (["--budget", "0900"], "--budget must be a whole number of seconds (no leading zero), got '0900'"),
    (["--steps", "tests,foo"], "--steps: unknown step 'foo'"),
    (["--steps", ",,"], "--steps names no step, got ',,' (choose from tests,bench,sanitizer,compiled)"),
    (["--steps", ""], "--steps names no step, got '' (choose from tests,bench,sanitizer,compiled)"),
    (["--frobnicate"], "unknown argument --frobnicate"),
])
def test_a_usage_mistake_is_one_line_exit_64_and_creates_nothing(tmp_path, args, words):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 64, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"gpu_check: {words} (see --help)"]
    assert not (tmp_path / "out").exists()


def test_help_prints_the_header_and_creates_nothing(tmp_path):
    proc = _run(tmp_path, "--help")
    assert proc.returncode == 0 and "Usage: scripts/gpu_check.sh" in proc.stdout and "64 a usage mistake" in proc.stdout
    assert not (tmp_path / "out").exists()
