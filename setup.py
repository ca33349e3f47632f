"""Builds xlard._C (C++ CPU kernels, plus CUDA kernels when a toolkit and a CUDA torch are present).

XLARD_WITH_CUDA=auto|0|1 (default auto): 1 fails loudly when CUDA cannot be built.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0").
Install with `pip install --no-build-isolation -e .`.
"""
from __future__ import annotations

import glob
import os
import sys

import setuptools
from setuptools import find_namespace_packages, setup

# pyproject.toml's SPDX `license` string needs setuptools 77; with --no-build-isolation the build uses the
# environment's setuptools, and an older one fails validating pyproject.toml with a schema error.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"xlard needs setuptools>=77 to build (this environment has {setuptools.__version__}): "
             "pip install -U 'setuptools>=77'")

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # with --no-build-isolation the build uses the environment's torch
    sys.exit("xlard builds against the torch it will run with, and this build environment has none (pip's build "
             "isolation hides the installed one): install torch first (README, Install: e.g. pip install torch "
             "--index-url https://download.pytorch.org/whl/cpu), then pip install --no-build-isolation -e . (or "
             "the path of a checkout or source distribution)")

ROOT = os.path.dirname(os.path.abspath(__file__))

# nvcc flags of every .cu file (read by tests/test_cuda_build.py and the PTX check of
# .ci/cuda_compile_check.sh, so keep it a literal list).
#
# Where fast math is allowed: nowhere as a build flag. --use_fast_math turns on
# flush-to-zero, and with it nvcc compiles float->double conversions, float min/max and
# comparisons as cvt.ftz / .ftz instructions that read a subnormal as 0: a map whose
# values are subnormal then gets no Otsu foreground and attention_centroids drops
# subnormal weights, while the CPU keeps them. Labels and counts must be bitwise the
# CPU's, so the build keeps IEEE semantics (-ftz=false, -prec-div=true,
# -prec-sqrt=true, which are nvcc's defaults, spelled out so that no later flag
# silently changes them); the PTX check of .ci/cuda_compile_check.sh asserts that no
# .ftz instruction appears in the connected-components and centroid kernels. Speed
# where the result is only judged within the float tolerance table comes from explicit
# intrinsics in the source instead (exp_acc uses __expf in vector_utils.cuh), which is
# visible and reviewable per call site. -fmad stays on (nvcc's default): a fused
# multiply-add only moves float results by an ulp; every value that a label depends on
# is computed with explicitly rounded intrinsics (__dmul_rn, __ddiv_rn, exact_mul) or
# integers, which nvcc never contracts.
NVCC_FLAGS = ["-O3", "-std=c++20", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-lineinfo",
              "--expt-relaxed-constexpr"]


def _want_cuda() -> bool:
    mode = os.environ.get("XLARD_WITH_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"XLARD_WITH_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        # (torch's CUDA_HOME is always None on a CPU build, so the toolkit is not looked for: it would be named
        # missing when it is there)
        problems.append(f"the installed torch {torch.__version__} is a CPU build (install a CUDA build of torch)")
    elif cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    if problems:
        if mode == "1":
            sys.exit("XLARD_WITH_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(problems))
        print("xlard: building CPU kernels only: " + "; ".join(problems))
        return False
    return True


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST checked before the build (default "8.0;9.0", also when set but empty), by torch's own
    reading of it: torch failed on a bad entry after the build had started, with a 48-line traceback naming neither
    the variable nor the form ("Unknown CUDA arch (garbage)"), and on an empty one with an IndexError (it detects
    the GPUs then, and a build machine may have none)."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not value:
        value = "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = value  # what torch reads: " 8.0;9.0 " was refused as "Unknown CUDA arch ()"
    expected = ("expected compute capabilities separated by ';' (e.g. \"8.0;9.0\", \"9.0a\", \"8.6+PTX\"), "
                "architecture names (Ampere, Hopper, ...) or native")
    if value == "native":  # torch detects the GPUs of this machine
        if torch.cuda.device_count() == 0:
            sys.exit(f"TORCH_CUDA_ARCH_LIST: native builds for this machine's GPUs, and it has none; name the "
                     f"architectures instead ({expected})")
        return value
    try:
        cpp_extension._get_cuda_arch_flags()  # torch's own check of the list (what the build will call)
    except ValueError as exc:
        sys.exit(f"TORCH_CUDA_ARCH_LIST: {expected}, got {value!r}, which torch {torch.__version__} refuses ({exc})")
    except Exception:  # noqa: BLE001 - a torch whose private helper differs: the build checks it its own way
        pass
    return value


def _loaded_cxx_runtime() -> str | None:
    """The libstdc++ this process runs with (torch loaded it), on Linux; else None.

    The extension is linked against this file, ahead of the compiler's own -lstdc++, so
    that every C++ runtime symbol resolves to the shared library torch uses. A compiler
    whose search path holds only libstdc++.a (the GPU machine's /opt/gcc wrapper on the
    first GPU run) otherwise links a second, static runtime into _C, and the first error
    message that formats a number crashes the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libstdc++.so"):
                    return fields[5].strip()
    except OSError:
        pass
    return None


def _link_args() -> list[str]:
    args = ["-fopenmp"]
    runtime = _loaded_cxx_runtime()
    if runtime is not None:
        args.append(runtime)
    return args


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-ffp-contract=off"]  # never fuse a*b+c: results equal on every ISA
    if sys.platform != "win32":
        cxx.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = NVCC_FLAGS
        ext = cpp_extension.CUDAExtension(
            "xlard._C", sources, include_dirs=include_dirs, 
            extra_compile_args={"cxx": cxx + ["-DXLARD_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=_link_args(),
        )
    else:
        ext = cpp_extension.CppExtension(
            "xlard._C", sources, include_dirs=include_dirs, 
            extra_compile_args={"cxx": cxx}, extra_link_args=_link_args(),
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


class _BuildExt(cpp_extension.BuildExtension):
    """torch's build_ext, after checking that there is a C++ compiler (without one the build printed some 240
    lines of torch and ninja output, "not found" buried in the middle)."""

    def build_extensions(self):
        import shlex
        import shutil

        compiler = os.environ.get("CXX") or "c++"
        program = shlex.split(compiler)[0] if compiler.strip() else "c++"
        if shutil.which(program) is None:
            sys.exit(f"xlard needs a C++ compiler to build its kernels, and {program!r} "
                     f"({'from CXX' if os.environ.get('CXX') else 'the default'}) was not found: install one "
                     "(e.g. apt install g++, or Xcode's command line tools) or set CXX to it")
        super().build_extensions()


setup(
    # Namespace discovery: the package-data folders (xlard.data.shapes_backbone.unet, ...) are packages too,
    # which setuptools otherwise warns about ("Package would be ignored") once per folder on every build.
    packages=find_namespace_packages(include=["xlard", "xlard.*"], exclude=["*.__pycache__"]) + ["xlard._kernels"],
    package_dir={"xlard._kernels": "kernels"},
    # The embedded shapes-world backbone (a diffusers pipeline folder) ships as package data.
    # So does the shapes world's understanding model (the default reward source there).
    package_data={"xlard": ["py.typed",  # PEP 561: users' type checkers read xlard's annotations
                            "data/shapes_backbone/*.json", "data/shapes_backbone/*.md", "data/shapes_backbone/*/*",
                            "data/shapes_understanding/*.json", "data/shapes_understanding/*.safetensors",
                            "data/shapes_understanding/*.md",
                            # The latent eyes distilled from it (scripts/train_shapes_latent_eyes.py).
                            "data/shapes_latent_eyes/*.json", "data/shapes_latent_eyes/*.safetensors",
                            # The corrector shipped for the shapes backbone (scripts/train_shapes_corrector.py).
                            "data/shapes_corrector/*.json", "data/shapes_corrector/*.safetensors",
                            "data/shapes_corrector/*.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
)
