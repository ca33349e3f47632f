"""Builds xlard._C (C++ CPU kernels, plus CUDA kernels when a toolkit and a CUDA torch are present).

XLARD_WITH_CUDA=auto|0|1 (default auto): 1 fails loudly when CUDA cannot be built.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0").
Install with `pip install --no-build-isolation -e .`.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("XLARD_WITH_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"XLARD_WITH_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    if problems:
        if mode == "1":
            sys.exit("XLARD_WITH_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems))
        print("xlard: building CPU kernels only: " + "; ".join(problems))
        return False
    return True


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-ffp-contract=off"]  # never fuse a*b+c: results equal on every ISA
    if sys.platform != "win32":
        cxx.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "xlard._C", sources, include_dirs=include_dirs, 
            extra_compile_args={"cxx": cxx + ["-DXLARD_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "xlard._C", sources, include_dirs=include_dirs, 
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    _write_build_config(with_cuda)
    return ext


def _write_build_config(with_cuda: bool) -> None:
    config = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
    }
    with open(os.path.join(ROOT, "xlard", "_build_config.py"), "w") as fh:
        fh.write('"""Written by setup.py: how xlard._C was built."""\n')
        fh.write(f"BUILD = {config!r}\n")


setup(
    packages=find_packages(include=["xlard", "xlard.*"]) + ["xlard._kernels"],
    package_dir={"xlard._kernels": "kernels"},
    # The embedded shapes-world backbone (a diffusers pipeline folder) ships as package data.
    # So does the shapes world's understanding model (the default reward source there).
    package_data={"xlard": ["data/shapes_backbone/*.json", "data/shapes_backbone/*.md", "data/shapes_backbone/*/*",
                            "data/shapes_understanding/*.json", "data/shapes_understanding/*.safetensors",
                            "data/shapes_understanding/*.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
