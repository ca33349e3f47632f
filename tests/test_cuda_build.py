"""What can be checked about the CUDA provider without a GPU (issue 14).

- The nvcc flags of setup.py keep IEEE subnormals (no --use_fast_math, no -ftz=true),
  and the PTX of every csrc/cuda/*.cu file compiled with them holds no flush-to-zero
  instruction (.ci/ptx_check.py; needs nvcc, skipped without it). The detector itself
  is checked on PTX lines and on a kernel compiled with --use_fast_math.
- The GPU-free logic of csrc/cuda/logic.h (once-per-device shared-memory setting, waves
  of the global path, widened index sums, top-K radix select against std::sort) passes
  its host tests (tests/cpp/test_cuda_logic.cpp; needs a C++20 compiler).

The same checks run in CI in .ci/cuda_compile_check.sh, there with the flags the real
build used.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptx_check():
    spec = importlib.util.spec_from_file_location("ptx_check", os.path.join(ROOT, ".ci", "ptx_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_nvcc_flags_keep_subnormals():
    flags = _ptx_check().setup_nvcc_flags()
    assert "--use_fast_math" not in flags and "-use_fast_math" not in flags
    assert "-ftz=false" in flags and "-prec-div=true" in flags and "-prec-sqrt=true" in flags
    assert not any(f.startswith(("-ftz=t", "--ftz=t")) for f in flags)


def test_ftz_detector_on_ptx_lines():
    ftz = _ptx_check().ftz_instructions
    flushing = """
        cvt.ftz.f64.f32 \t%fd1, %f1;
        @%p3 setp.leu.ftz.f32 %p4, %f2, %f3;
        max.ftz.f32 %f5, %f4, %f3;
    """
    assert ftz(flushing) == ["cvt.ftz.f64.f32", "setp.leu.ftz.f32", "max.ftz.f32"]
    keeping = """
        cvt.f64.f32 \t%fd1, %f1;
        setp.leu.f32 %p4, %f2, %f3;
        // a comment naming .ftz is not an instruction
        .file 1 "ftz.cu"
    """
    assert ftz(keeping) == []


def test_ninja_flags_parser(tmp_path):
    ninja = tmp_path / "build.ninja"
    ninja.write_text(
        "ninja_required_version = 1.3\n"
        "cuda_cflags = -I/x/include -D__CUDA_NO_HALF_OPERATORS__ --expt-relaxed-constexpr\n"
        "cuda_post_cflags = --compiler-options ''\"'\"'-fPIC'\"'\"'' -O3 -std=c++20 -ftz=false "
        "-gencode=arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -DTORCH_EXTENSION_NAME=_C\n")
    flags = _ptx_check().ninja_nvcc_flags(str(ninja))
    assert flags == ["-I/x/include", "-D__CUDA_NO_HALF_OPERATORS__", "--expt-relaxed-constexpr", "--compiler-options",
                     "'-fPIC'", "-O3", "-std=c++20", "-ftz=false", "-DTORCH_EXTENSION_NAME=_C"]


def _nvcc():
    nvcc = _ptx_check().find_nvcc(None)
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    return nvcc


@pytest.mark.slow
def test_ptx_has_no_flush_to_zero():
    """Every kernel file, compiled to PTX with setup.py's flags: no .ftz (the self-test sees it under fast math)."""
    module = _ptx_check()
    nvcc = _nvcc()
    sources = sorted(os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                     if f.endswith(".cu"))
    assert any(s.endswith("centroids.cu") for s in sources) and any(s.endswith("components_f32.cu") for s in sources)
    assert module.check(module.setup_nvcc_flags(), nvcc, "90", sources) == []


@pytest.mark.slow
def test_ptx_check_catches_fast_math():
    module = _ptx_check()
    # Without the explicit -ftz=false (which wins over the fast-math default).
    flags = [f for f in module.setup_nvcc_flags() if not f.startswith("-ftz=")] + ["--use_fast_math"]
    problems = module.check(flags, _nvcc(), "90", [os.path.join(ROOT, "csrc", "cuda", "centroids.cu")])
    assert any("--use_fast_math" in p for p in problems)
    assert any("centroids.cu" in p and "flush-to-zero instructions" in p for p in problems)


@pytest.mark.slow
def test_cuda_logic_host_tests(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "test_cuda_logic"
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror",
                            f"-I{ROOT}/csrc", f"-I{ROOT}/tests/cpp", f"{ROOT}/tests/cpp/test_cuda_logic.cpp",
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all passed" in run.stdout
