#!/usr/bin/env bash
# Compile-only check of the CUDA build of xlard._C: no GPU needed, so CUDA code that
# does not compile never lands. Builds the WHOLE extension (CPU kernels + csrc/cuda)
# with XLARD_WITH_CUDA=1 for architectures 8.0 and 9.0 into a temporary directory, so
# a developer's editable install is left alone. Then, still without a GPU:
#   - the PTX check (.ci/ptx_check.py): every csrc/cuda/*.cu compiled to PTX with the
#     nvcc flags the build really used (read from its build.ninja) holds no .ftz
#     (flush-to-zero) instruction, so subnormal map values and weights are kept (issue 14);
#   - the host tests of the GPU-free CUDA logic (tests/cpp/test_cuda_logic.cpp: the
#     once-per-device shared-memory setting, waves, index sums, top-K radix select),
#     built with the host C++ compiler under ASan/UBSan when available.
#
# Usage: .ci/cuda_compile_check.sh [VENV]   (default VENV: <repo>/.venv-cuda)
# Environment: XLARD_CUDA_TORCH  torch requirement to install (default torch==2.14.1,
#                                a CUDA 13.0 build)
#              CUDA_HOME         toolkit root (default: /usr/local/cuda, else from nvcc)
#              MAX_JOBS          parallel compile jobs (default 2)
#              CXX               host C++ compiler for the logic tests (default c++)
# Exits non-zero on any error; prints the time of each step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-cuda}"
TORCH_SPEC="${XLARD_CUDA_TORCH:-torch==2.14.1}"
T0=$(date +%s)
step() { echo "[cuda-compile-check +$(( $(date +%s) - T0 ))s] $*"; }

# 1. The environment: a CUDA build of torch plus the build tools.
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
step "installing $TORCH_SPEC ninja numpy setuptools wheel into $VENV"
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" ninja numpy setuptools wheel
"$PY" - <<'PYEOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"cuda_compile_check: torch {torch.__version__} in this venv is a CPU build; "
             "set XLARD_CUDA_TORCH to a CUDA build")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PYEOF

# 2. The toolkit: the root that holds include/cuda_runtime_api.h and bin/nvcc.
has_toolkit() { [ -n "$1" ] && [ -f "$1/include/cuda_runtime_api.h" ] && [ -x "$1/bin/nvcc" ]; }
CUDA_ROOT=""
for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if has_toolkit "$cand"; then CUDA_ROOT="$cand"; break; fi
done
if [ -z "$CUDA_ROOT" ] && command -v nvcc >/dev/null 2>&1; then
  cand="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  if has_toolkit "$cand"; then CUDA_ROOT="$cand"; fi
fi
if [ -z "$CUDA_ROOT" ]; then
  echo "cuda_compile_check: no CUDA toolkit found (looked at \$CUDA_HOME, \$CUDA_PATH, /usr/local/cuda and nvcc on PATH)" >&2
  exit 1
fi
export CUDA_HOME="$CUDA_ROOT"
export PATH="$CUDA_HOME/bin:$PATH"
step "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1))"

# 3. Build into a temporary directory. setup.py rewrites xlard/_build_config.py; put the
# previous one back afterwards so the developer's install info stays true.
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/xlard-cuda-check.XXXXXX")"
CONFIG="$ROOT/xlard/_build_config.py"
SAVED=""
if [ -f "$CONFIG" ]; then SAVED="$BUILD/_build_config.py.saved"; cp "$CONFIG" "$SAVED"; fi
cleanup() {
  if [ -n "$SAVED" ]; then cp "$SAVED" "$CONFIG"; else rm -f "$CONFIG"; fi
  rm -rf "$BUILD"
}
trap cleanup EXIT

step "compiling xlard._C with CUDA (TORCH_CUDA_ARCH_LIST=8.0;9.0, MAX_JOBS=${MAX_JOBS:-2}) in $BUILD"
B0=$(date +%s)
(
  cd "$ROOT"
  XLARD_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" setup.py --quiet build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"
)
B1=$(date +%s)

SO="$(find "$BUILD/lib" -name '_C*.so' | head -n 1)"
if [ -z "$SO" ]; then
  echo "cuda_compile_check: the build finished but produced no xlard/_C*.so" >&2
  exit 1
fi
if command -v cuobjdump >/dev/null 2>&1; then
  ELF="$(cuobjdump --list-elf "$SO" 2>/dev/null || true)"
  for arch in sm_80 sm_90; do
    if ! grep -q "$arch" <<<"$ELF"; then
      echo "cuda_compile_check: $SO holds no $arch device code" >&2
      exit 1
    fi
  done
  step "device code present for sm_80 and sm_90"
fi
step "built $(basename "$SO") in $(( B1 - B0 ))s"
# The C++ runtime must be the shared libstdc++ torch runs with (the first GPU run's compiler
# linked a static one into _C, and every error message with a number crashed there).
if command -v readelf >/dev/null 2>&1; then
  NEEDED="$(readelf -d "$SO" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  case " $NEEDED" in
    *" libstdc++.so."*) step "C++ runtime: shared (NEEDED: $NEEDED)" ;;
    *) echo "cuda_compile_check: $SO does not need libstdc++.so (NEEDED: ${NEEDED:-none}): a static C++ runtime" >&2; exit 1 ;;
  esac
else
  step "readelf not found: the C++ runtime check is skipped"
fi

# 4. PTX check with the build's own nvcc flags.
NINJA="$BUILD/temp/build.ninja"
if [ ! -f "$NINJA" ]; then
  echo "cuda_compile_check: no $NINJA (the PTX check reads the build's nvcc flags from it)" >&2
  exit 1
fi
P0=$(date +%s)
# One virtual architecture: flush-to-zero comes from the flags, which are the same for
# every architecture of the build.
"$PY" "$ROOT/.ci/ptx_check.py" --ninja "$NINJA" --arch 90
step "PTX check passed in $(( $(date +%s) - P0 ))s"

# 5. Host tests of csrc/cuda/logic.h.
CXX_BIN="${CXX:-c++}"
L0=$(date +%s)
SAN_FLAGS=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
if ! echo 'int main(){}' | "$CXX_BIN" -x c++ - "${SAN_FLAGS[@]}" -o "$BUILD/san-probe" >/dev/null 2>&1; then SAN_FLAGS=(); fi
"$CXX_BIN" -std=c++20 -O1 -g -Wall -Wextra -Werror -pthread "${SAN_FLAGS[@]}" -I"$ROOT/csrc" -I"$ROOT/tests/cpp" \
  "$ROOT/tests/cpp/test_cuda_logic.cpp" -o "$BUILD/test_cuda_logic"
"$BUILD/test_cuda_logic"
step "CUDA logic host tests passed in $(( $(date +%s) - L0 ))s${SAN_FLAGS[*]:+ (ASan/UBSan)}"
step "OK (total $(( $(date +%s) - T0 ))s)"
