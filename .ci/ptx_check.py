"""PTX-level check of the CUDA kernels: no flush-to-zero instruction anywhere.

The labels of the connected-components ops must be bitwise the CPU's, and
attention_centroids must keep subnormal weights. Under --use_fast_math (or -ftz=true)
nvcc compiles float->double conversions, min/max and comparisons as `cvt.ftz...` /
`...ftz...` PTX instructions that read a subnormal as 0 (issue 14). This compiles every
torch-free csrc/cuda/*.cu file to PTX with the build's own nvcc flags and fails when a
`.ftz` modifier appears. No GPU needed: it runs in the CUDA compile check
(.ci/cuda_compile_check.sh) and in tests/test_cuda_build.py.

The flags come from setup.py's NVCC_FLAGS list (default) or, with --ninja, from the
`cuda_cflags` / `cuda_post_cflags` lines of the build.ninja that the real build wrote
(so flags added by torch or the environment are checked too). A self-test first
compiles one kernel with --use_fast_math and requires the detector to see .ftz in it,
so the check cannot pass by finding nothing.

Usage: python .ci/ptx_check.py [--ninja BUILD_TEMP/build.ninja] [--arch 90] [--nvcc PATH]
Exit status 0: clean; 1: .ftz found or a compile failed; 2: usage/toolkit problem.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FTZ = re.compile(r"^\s*(?:@!?%p\w*\s+)?([a-z][\w.]*\.ftz\b[\w.]*)", re.MULTILINE)
# Flags that only matter for object code or would conflict with -ptx / -arch.
_DROP_WITH_VALUE = {"-o", "-c", "-MF", "-MT", "-MD"}


def setup_nvcc_flags(setup_py: str = os.path.join(ROOT, "setup.py")) -> list[str]:
    """The NVCC_FLAGS literal list of setup.py (read with ast, setup.py is not run)."""
    tree = ast.parse(open(setup_py, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("ptx_check: setup.py has no NVCC_FLAGS = [...] list")


def ninja_nvcc_flags(path: str) -> list[str]:
    """cuda_cflags + cuda_post_cflags of a torch build.ninja, without code-generation flags."""
    values = {}
    for line in open(path, encoding="utf-8"):
        for key in ("cuda_cflags", "cuda_post_cflags"):
            if line.startswith(key + " ="):
                values[key] = shlex.split(line.split("=", 1)[1])
    if "cuda_post_cflags" not in values:
        raise SystemExit(f"ptx_check: {path} has no cuda_post_cflags line (not a CUDA build?)")
    flags = values.get("cuda_cflags", []) + values["cuda_post_cflags"]
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in _DROP_WITH_VALUE or f in ("-gencode", "--generate-code"):
            skip = True
            continue
        if f.startswith(("-gencode=", "--generate-code=", "-arch", "--gpu-architecture", "-code", "--dlink")):
            continue
        out.append(f)
    return out


def ftz_instructions(ptx: str) -> list[str]:
    """Every PTX instruction carrying a .ftz modifier (one entry per occurrence)."""
    return FTZ.findall(ptx)


def compile_ptx(nvcc: str, flags: list[str], source: str, arch: str, out_dir: str) -> str:
    out = os.path.join(out_dir, os.path.basename(source) + ".ptx")
    cmd = [nvcc, *flags, f"-I{os.path.join(ROOT, 'csrc')}", f"-arch=compute_{arch}", "-ptx", source, "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{' '.join(cmd)}\n{res.stderr[-3000:]}")
    return open(out, encoding="utf-8").read()


def find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def check(flags: list[str], nvcc: str, arch: str, sources: list[str]) -> list[str]:
    """Problems found (empty: clean). Runs the self-test first."""
    forbidden = [f for f in flags if f in ("--use_fast_math", "-use_fast_math") or re.fullmatch(r"-?-ftz=true", f)]
    problems = [f"flag {f} turns on flush-to-zero" for f in forbidden]
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(ROOT, "csrc", "cuda", "components_f32.cu")
        fast = [f for f in flags if not re.fullmatch(r"-?-ftz=\w+", f)] + ["--use_fast_math"]
        if not ftz_instructions(compile_ptx(nvcc, fast, probe, arch, tmp)):
            problems.append("self-test: components_f32.cu under --use_fast_math shows no .ftz: the detector is broken")
        for src in sources:
            found = ftz_instructions(compile_ptx(nvcc, flags, src, arch, tmp))
            if found:
                kinds = sorted(set(found))
                problems.append(f"{os.path.relpath(src, ROOT)}: {len(found)} flush-to-zero instructions "
                                f"({', '.join(kinds[:6])}{' ...' if len(kinds) > 6 else ''})")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ninja", help="build.ninja of the real build: check its nvcc flags instead of setup.py's")
    ap.add_argument("--arch", default="90", help="virtual architecture for the PTX (default 90)")
    ap.add_argument("--nvcc", help="nvcc to use (default: $CUDA_HOME/bin/nvcc, /usr/local/cuda, PATH)")
    args = ap.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("ptx_check: no nvcc found (set CUDA_HOME)", file=sys.stderr)
        return 2
    flags = ninja_nvcc_flags(args.ninja) if args.ninja else setup_nvcc_flags()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    problems = check(flags, nvcc, args.arch, sources)
    if problems:
        print("ptx_check: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"ptx_check: OK, no .ftz in the PTX of {len(sources)} .cu files (compute_{args.arch}; "
          f"self-test saw .ftz under --use_fast_math)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
