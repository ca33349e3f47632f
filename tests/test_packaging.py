"""The source distribution carries everything the extension build reads (headers, the
included kernel bodies, the Triton kernels), so building from an sdist works like
building from a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout to know which files are the project's")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if os.path.isfile(os.path.join(ROOT, line))]


def test_sdist_carries_every_source_the_build_reads(tmp_path):
    tracked = _tracked_files()
    src = tmp_path / "src"
    for rel in tracked:  # a copy: setup.py writes its build record next to the sources
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), src / rel)
    env = dict(os.environ, XLARD_WITH_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = list((tmp_path / "dist").glob("xlard-*.tar.gz"))
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [rel for rel in tracked if rel.startswith(("csrc/", "kernels/")) or rel in (
        "setup.py", "pyproject.toml", "CMakeLists.txt", "README.md")]
    missing = sorted(rel for rel in needed if rel not in names)
    assert not missing, f"the sdist lacks {missing}"
    assert not any(name.endswith(".so") for name in names), "a built extension leaked into the sdist"
