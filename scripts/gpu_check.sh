#!/usr/bin/env bash
# The GPU check (issue 3), for a bare machine with an NVIDIA GPU and no internet:
#   1. build xlard._C from source with the CUDA kernels (in place, for this GPU's arch);
#   2. run the CUDA suite (tests/test_cuda_ops.py), the GPU benchmarks (benches/gpu)
#      against their peers, the issue-14 benchmarks (benches/gpu/bench_issue14.py: one
#      shape per change of the CUDA review: top-K on a checkerboard, the global path in
#      waves with its peak memory, Otsu on near-constant maps, half/bfloat16
#      sample_correction, color_scores, the position_scores and gaussian_log_prob
#      backwards), then the compiled-Triton suite (tests/test_triton_gpu.py),
#      each in its own pytest process (the order puts what the issue's closing note
#      needs first, in case the time budget runs out);
#   3. run compute-sanitizer memcheck and racecheck over the connected-components
#      kernels (scripts/sanitizer_driver.py);
#   4. time the torch.compile peers (slow to compile, so last, one process per op);
#   5. write $OUT/gpu_report.json and $OUT/gpu_report.md (device, versions, build time,
#      tests per suite, sanitizer results, benchmark table, speed targets met/MISS).
# Every step has a timeout and the whole run a time budget (default 450 s, under the
# 8 minutes allowed on an H100); a failing step is recorded and the next one runs.
#
# Usage: scripts/gpu_check.sh [--skip-build] [--budget SECONDS] [--steps tests,bench,sanitizer,compiled]
#   --skip-build  use the xlard/_C*.so already built in place (a rerun on a warm machine)
#   --budget      seconds for the whole run (default 450); steps that no longer fit are skipped
#   --steps       which groups run after the build (default: all four)
# Needs: python with a CUDA build of torch, triton, pytest, pytest-benchmark, numpy;
#        a CUDA toolkit (nvcc; CUDA_HOME, CUDA_PATH, /usr/local/cuda or nvcc on PATH)
#        and Python headers for the build; ninja for a parallel build; CuPy for the
#        CuPy peers; compute-sanitizer (from the toolkit) for step 3.
# Environment:
#   OUT                    where results go (default ./gpu-out)
#   PYTHON                 the interpreter (default: python3, else python)
#   XLARD_WHEEL_DIR        wheels of missing packages (default <repo>/.whl): each wheel whose
#                          distribution is not installed is installed, without internet,
#                          into /tmp/xlard-site (put on PYTHONPATH and PATH); .whl/ is
#                          git-ignored, so a remote runner must be told to carry it
#   TORCH_CUDA_ARCH_LIST   default: the arch of GPU 0 (9.0 on an H100)
#   MAX_JOBS               parallel compile jobs (default 16)
#   XLARD_GPU_CHECK_ALLOW_CPU=1   plumbing test without a GPU: run every step anyway
#                          (CPU-only build, tests and benches skip); still exits non-zero
# Exit status: 0 every step passed and every speed target was met; 1 a step failed,
# timed out or had no time left; 2 steps passed but a speed target was missed (or no
# benchmark data); 3 no CUDA device; 64 a usage mistake (nothing is created or run).
set -uo pipefail

usage_error() { echo "gpu_check: $* (see --help)" >&2; exit 64; }

# The arguments first: --help and a usage mistake must not create $OUT.
SKIP_BUILD=0
BUDGET=450
ONLY="tests,bench,sanitizer,compiled"
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-build) SKIP_BUILD=1 ;;
    --budget)
      [ $# -ge 2 ] || usage_error "--budget needs a number of seconds"
      # digits only, and no leading zero: bash arithmetic reads 0100 as octal (64 s) and fails on 0900 after $OUT
      case "$2" in ''|*[!0-9]*|0?*) usage_error "--budget must be a whole number of seconds (no leading zero), got '$2'" ;; esac
      [ "$2" -ge 60 ] || usage_error "--budget must be at least 60 seconds (the build alone takes longer), got $2"
      BUDGET="$2"; shift ;;
    --steps)
      [ $# -ge 2 ] || usage_error "--steps needs a list such as tests,bench"
      named=0
      for step in ${2//,/ }; do
        case "$step" in tests|bench|sanitizer|compiled) named=1 ;; *) usage_error "--steps: unknown step '$step'" ;; esac
      done
      [ "$named" = 1 ] || usage_error "--steps names no step, got '$2' (choose from tests,bench,sanitizer,compiled)"
      ONLY="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) usage_error "unknown argument $1" ;;
  esac
  shift
done

OUT="${OUT:-gpu-out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

T0=$(date +%s)
DEADLINE=$(( T0 + BUDGET ))
RESERVE=20      # seconds kept for the report
MIN_STEP=15     # a step with less time than this left is skipped
LOGS="$OUT/logs"
mkdir -p "$LOGS" "$OUT/bench"
rm -f "$LOGS"/*.log "$OUT"/steps.jsonl "$OUT"/junit-*.xml "$OUT"/bench/*.json "$OUT"/gpu_report.* "$OUT"/env.json "$OUT"/build.json
STEPS="$OUT/steps.jsonl"
FAILED=0
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*"; }
wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# record NAME STATUS RC SECONDS COUNTS_AS_FAILURE NOTE
record() {
  local note="${6//\"/\'}"
  note="${note//\\//}"
  printf '{"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "counts_as_failure": %s, "log": "logs/%s.log", "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$1" "$note" >> "$STEPS"
  if [ "$5" = true ]; then FAILED=1; fi
}

# run_step NAME CAP_SECONDS COMMAND... : runs COMMAND with a timeout (its cap, or what is
# left of the budget), output in $LOGS/NAME.log; returns the command's status.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) - RESERVE ))
  local limit=$(( cap < left ? cap : left ))
  local logf="$LOGS/$name.log"
  if [ "$limit" -lt "$MIN_STEP" ]; then
    log "step $name: SKIPPED, ${left}s of the ${BUDGET}s budget left"
    record "$name" skipped -1 0 true "no time left in the ${BUDGET}s budget"
    return 125
  fi
  log "step $name (timeout ${limit}s): $*"
  local start rc=0 status seconds
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$logf" 2>&1 || rc=$?
  seconds=$(( $(date +%s) - start ))
  case $rc in
    0) status=passed ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  if [ $rc -eq 0 ]; then
    record "$name" "$status" "$rc" "$seconds" false "${STEP_NOTE:-}"
    log "  -> passed in ${seconds}s"
  else
    record "$name" "$status" "$rc" "$seconds" true "${STEP_NOTE:-exit status $rc}"
    log "  -> $status (exit $rc) after ${seconds}s; last lines of logs/$name.log:"
    tail -n 30 "$logf" | sed 's/^/     /'
  fi
  STEP_NOTE=""
  return $rc
}
STEP_NOTE=""

# ---------------------------------------------------------------- 0. interpreter, wheels, facts
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_check: no python3 or python on PATH" >&2; exit 1; fi
log "python: $(command -v "$PY") ($("$PY" --version 2>&1)); results in $OUT"

WHEELS="${XLARD_WHEEL_DIR:-$ROOT/.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=/tmp/xlard-site
  export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$PATH:$SITE/bin"
  todo=()
  for whl in "$WHEELS"/*.whl; do
    dist="$(basename "$whl" | cut -d- -f1)"
    if ! "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" >/dev/null 2>&1; then
      todo+=("$whl")
    fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    run_step wheels 120 "$PY" -m pip install --no-index --no-deps --disable-pip-version-check --target "$SITE" "${todo[@]}"
  fi
fi

ALLOW_CPU=()
if [ "${XLARD_GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then ALLOW_CPU=(--allow-cpu); fi
run_step env 90 "$PY" -m benches.gpu.check env --out "$OUT/env.json" "${ALLOW_CPU[@]}"
env_rc=$?
if [ $env_rc -ne 0 ]; then
  if [ $env_rc -eq 3 ]; then
    log "no CUDA device: torch.cuda.is_available() is False. This check needs a GPU machine;"
    log "set XLARD_GPU_CHECK_ALLOW_CPU=1 to exercise the script's plumbing without one."
    "$PY" -m benches.gpu.check report --out "$OUT" >"$LOGS/report.log" 2>&1
    exit 3
  fi
  log "could not collect the environment facts (see logs/env.log); stopping"
  "$PY" -m benches.gpu.check report --out "$OUT" >"$LOGS/report.log" 2>&1
  exit 1
fi
has_cuda=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1])).get('cuda_available', False)))" "$OUT/env.json")
if [ "$has_cuda" != 1 ]; then
  record no-gpu failed 3 0 true "no CUDA device (XLARD_GPU_CHECK_ALLOW_CPU=1 plumbing run)"
fi
log "device: $("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('device', {}).get('name', 'none'))" "$OUT/env.json")"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$LOGS/nvidia-smi.log" 2>&1

# ---------------------------------------------------------------- 1. toolkit and build
has_toolkit() { [ -n "$1" ] && [ -f "$1/include/cuda_runtime_api.h" ] && [ -x "$1/bin/nvcc" ]; }
CUDA_ROOT=""
for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if has_toolkit "$cand"; then CUDA_ROOT="$cand"; break; fi
done
if [ -z "$CUDA_ROOT" ] && command -v nvcc >/dev/null 2>&1; then
  cand="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  if has_toolkit "$cand"; then CUDA_ROOT="$cand"; fi
fi
if [ -n "$CUDA_ROOT" ]; then
  export CUDA_HOME="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
  log "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
else
  log "no CUDA toolkit found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on PATH): CUDA kernels cannot be built"
fi

ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('device', {}).get('arch_list', ''))" "$OUT/env.json")}"
ARCH="${ARCH:-9.0}"
command -v ninja >/dev/null 2>&1 || log "warning: ninja not found: torch builds the extension serially (slow); carry a ninja wheel in .whl/"

if [ $SKIP_BUILD = 0 ]; then
  WITH_CUDA=1
  if [ "$has_cuda" != 1 ] || [ -z "$CUDA_ROOT" ]; then WITH_CUDA=auto; fi
  STEP_NOTE="XLARD_WITH_CUDA=$WITH_CUDA TORCH_CUDA_ARCH_LIST=$ARCH"
  if ! run_step build 270 env XLARD_WITH_CUDA=$WITH_CUDA TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" setup.py build_ext --inplace --build-temp build/gpu-check; then
    # Without _C nothing runs (it holds the op schemas, Triton's included): try a CPU-only build.
    STEP_NOTE="fallback after a failed CUDA build, so the Triton suite can still run"
    run_step build-cpu-fallback 120 env XLARD_WITH_CUDA=0 MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" setup.py build_ext --inplace --build-temp build/gpu-check-cpu
  fi
fi
run_step build-info 60 "$PY" -m benches.gpu.check build-info --out "$OUT/build.json"
"$PY" -m xlard.info >"$LOGS/xlard-info.log" 2>&1

# ---------------------------------------------------------------- 2. tests and benchmarks
# One pytest process per suite: test_triton_ops.py (interpreter) must never share a
# process with compiled Triton, and a module importing hypothesis/scipy/cv2 at top level
# would fail collection here, so only these files run.
run_suite() {  # run_suite NAME CAP FILE
  local name=$1 cap=$2 file=$3
  if ! "$PY" -m benches.gpu.check imports "$file" >"$LOGS/imports-$name.log" 2>&1; then
    log "suite $name: $(cat "$LOGS/imports-$name.log")"
    record "tests-$name" failed 1 0 true "$(tr '\n' ' ' < "$LOGS/imports-$name.log")"
    return 1
  fi
  # With pytest-xdist, the suite runs in one worker process that is restarted after a crash
  # (a segfault in one test then fails that test, and the summary and junit still come back).
  local xdist=()
  if "$PY" -c "import xdist" >/dev/null 2>&1; then xdist=(-n 1 --max-worker-restart 8); fi
  run_step "tests-$name" "$cap" "$PY" -m pytest "$file" -m cuda -q -p no:cacheprovider -rfEs \
    --durations=8 --junitxml="$OUT/junit-$name.xml" "${xdist[@]}"
}
BENCH_ARGS=(-q -p no:cacheprovider -rfEs --benchmark-columns=median,rounds --benchmark-sort=name)

if wanted tests; then run_suite cuda 110 tests/test_cuda_ops.py; fi
if wanted bench; then
  # The issue-14 shapes first: no GPU has measured those changes yet.
  STEP_NOTE="issue 14: one shape per CUDA change (benches/gpu/bench_issue14.py)"
  run_step bench-issue14 120 "$PY" -m pytest benches/gpu/bench_issue14.py "${BENCH_ARGS[@]}" \
    --benchmark-json="$OUT/bench/issue14.json"
  STEP_NOTE="providers cuda/triton, eager reference, CuPy, copy"
  run_step bench-main 130 "$PY" -m pytest benches/gpu "${BENCH_ARGS[@]}" \
    -k "not compiled_reference and not graph and not issue14" --benchmark-json="$OUT/bench/main.json"
  # Graph capture in its own process: a capture that fails can leave the context unusable.
  STEP_NOTE="count_components under CUDA-graph replay"
  run_step bench-graph 50 "$PY" -m pytest benches/gpu "${BENCH_ARGS[@]}" -k "graph" \
    --benchmark-json="$OUT/bench/graph.json"
fi
if wanted tests; then run_suite triton-gpu 90 tests/test_triton_gpu.py; fi

# ---------------------------------------------------------------- 3. compute-sanitizer
SAN=""
for cand in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer"; do
  if [ -x "$cand" ]; then SAN="$cand"; break; fi
done
if [ -z "$SAN" ] && command -v compute-sanitizer >/dev/null 2>&1; then SAN="$(command -v compute-sanitizer)"; fi
if ! wanted sanitizer; then
  :
elif [ -z "$SAN" ]; then
  log "compute-sanitizer not found (under \$CUDA_HOME/bin or on PATH): sanitizer steps skipped"
  record sanitizer-memcheck skipped -1 0 false "compute-sanitizer not found"
  record sanitizer-racecheck skipped -1 0 false "compute-sanitizer not found"
elif [ "$has_cuda" != 1 ]; then
  record sanitizer-memcheck skipped -1 0 true "no CUDA device"
  record sanitizer-racecheck skipped -1 0 true "no CUDA device"
else
  # The help text is read whole first: under pipefail, `--help | grep -q` fails when grep
  # stops reading early (SIGPIPE), which picked the wrong option on the first GPU run.
  san_help="$("$SAN" --help 2>&1 || true)"
  case "$san_help" in
    *--kernel-name*) FILTER=(--kernel-name kns=components) ;;
    *) FILTER=(--filter kns=components) ;;
  esac
  # Separate allocations (no caching allocator) so an out-of-bounds access cannot land in a cached block;
  # API errors are not reported because torch probes the driver with calls that may fail by design
  # (a failing launch of ours still fails the driver through C10_CUDA_KERNEL_LAUNCH_CHECK).
  STEP_NOTE="kernels matching 'components', providers cuda and triton"
  run_step sanitizer-memcheck 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck "${FILTER[@]}" \
    --error-exitcode 99 --print-limit 20 --report-api-errors no "$PY" scripts/sanitizer_driver.py --providers cuda,triton
  STEP_NOTE="kernels matching 'components', provider cuda, quick case list"
  run_step sanitizer-racecheck 50 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool racecheck "${FILTER[@]}" \
    --error-exitcode 99 --print-limit 20 --report-api-errors no "$PY" scripts/sanitizer_driver.py --providers cuda --quick
fi

# ---------------------------------------------------------------- 4. torch.compile peers
for op in count_components residual_correction sample_correction attention_centroids; do
  wanted compiled || break
  STEP_NOTE="torch.compile of xlard.reference.$op"
  run_step "bench-compiled-$op" 45 "$PY" -m pytest benches/gpu "${BENCH_ARGS[@]}" \
    -k "compiled_reference and test_${op} and not graph and not issue14" --benchmark-json="$OUT/bench/compiled-$op.json"
done

# ---------------------------------------------------------------- 5. report
log "writing $OUT/gpu_report.json and $OUT/gpu_report.md"
timeout -k 5 60 "$PY" -m benches.gpu.check report --out "$OUT" >"$LOGS/report.log" 2>&1
report_rc=$?
cat "$OUT/gpu_report.md" 2>/dev/null || { echo "gpu_check: the report failed:"; tail -n 30 "$LOGS/report.log"; }
log "done in $(( $(date +%s) - T0 ))s"
if [ $FAILED -ne 0 ] || [ $report_rc -eq 1 ] || [ ! -s "$OUT/gpu_report.json" ]; then exit 1; fi
exit $report_rc
