#!/usr/bin/env bash
# The GPU check, one command, for a machine with an NVIDIA GPU, the CUDA toolkit and a CUDA
# build of torch (plus pytest, hypothesis, expecttest) in the Python on PATH (or $PYTHON):
#
#   scripts/gpu_check.sh OUTDIR
#
#   1. builds the extension in place with the CUDA kernels (for this GPU's architecture unless
#      TORCH_CUDA_ARCH_LIST is set) and checks that the CUDA kernels are registered
#   2. runs the whole test-suite (CUDA cases enabled; extra pytest options in $PYTEST_ADDOPTS,
#      e.g. PYTEST_ADDOPTS='-m "not slow"' for a shorter run)
#   3. compute-sanitizer --tool memcheck, then --tool racecheck, over scripts/sanitize_kernels.py
#      (every op, several shapes, dtypes, several workspace bands, 32- and 64-bit indexing)
#   4. refits 'auto''s CUDA time model on this GPU (`python -m benchmarks --calibrate --device cuda`)
#      into OUTDIR/calibration.json, which the suite then uses (copy it over
#      channelconv/calibration.json to ship it); CALIBRATE=0 skips it
#   5. the benchmark suite on CUDA, `python -m benchmarks --device cuda --json ...` (more options
#      in $BENCH_ARGS, e.g. BENCH_ARGS='--pass both')
#   6. scripts/profile_passes.py (per pass: kernels, launches, device time against cuDNN's), TF32 off
#      and on, and the suite again with --tf32 (TF32 allowed on both sides, PyTorch's cuDNN default)
#
# Each step has a time limit, so one that hangs still leaves the others their turn (seconds:
# TEST_TIMEOUT, default 3600; SANITIZE_TIMEOUT per tool, default 1800; CALIBRATE_TIMEOUT, default 300;
# BENCH_TIMEOUT, default 300).
#
# Logs and results go to OUTDIR (build.log, pytest.log, memcheck.log, racecheck.log,
# bench-cuda.json, summary.txt). Every step runs even when an earlier one fails; the exit
# status is non-zero when any failed. About 5-10 minutes on an H100.
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # a path: make it absolute
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

# step NAME LOG COMMAND...: runs the command, its output to the terminal and LOG, and records
# the outcome and the time it took in summary.txt.
step() {
  local name=$1 log=$2
  shift 2
  echo "== $name"
  local start=$SECONDS
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local line
  line=$(printf '%-10s %-5s %4ds  (log: %s)' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "FAIL($rc)")" \
         $((SECONDS - start)) "$(basename "$log")")
  echo "$line" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

# The toolkit: $CUDA_HOME, or the usual places (nvcc on PATH may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then CUDA_HOME=$d; break; fi
  done
fi
export CUDA_HOME
echo "CUDA_HOME=${CUDA_HOME:-<not found>}" | tee -a "$SUMMARY"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY (torch.cuda.is_available() is False)" | tee -a "$SUMMARY"
  exit 1
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$SUMMARY"

# 1. Build in place (replaces a CPU-only channelconv/_C*.so in this tree).
#
# One GPU image's default compiler (/opt/gcc/bin/g++ on the lent H100, 2026-11-26) links libstdc++
# statically into shared objects: the extension then carries a second, uninitialised copy of the
# C++ streams beside the one torch uses, and its first error message (every TORCH_CHECK formats one)
# segfaults. So the build checks that an error raises, and if it does not, rebuilds with the
# system compiler.
raises_cleanly() {
  "$PY" - <<'EOF'
import torch, channelconv
try:
    channelconv.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1), stride=0, algorithm="direct")
except ValueError:
    print("an error from the extension raises cleanly")
else:
    raise SystemExit("stride=0 raised no error")
EOF
}
build() {
  FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace || return 1
  if ! raises_cleanly; then
    [ -x /usr/bin/g++ ] && [ "${CXX:-}" != /usr/bin/g++ ] || return 1
    echo "an error from the extension crashed the process (compiler: ${CXX:-c++}): rebuilding with /usr/bin/g++"
    CC=/usr/bin/gcc CXX=/usr/bin/g++ FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace \
      || return 1
    raises_cleanly || return 1
  fi
  "$PY" - <<'EOF'
import torch, channelconv
missing = [f"channelconv::{a}_{k}" for a in ("direct", "im2col", "conv1x1")
           for k in ("forward", "backward_input", "backward_weight")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"channelconv::{a}_{k}", "CUDA")]
if missing:
    raise SystemExit(f"no CUDA kernel registered for {missing}")
print("CUDA kernels registered for all 9 ops; extension:", channelconv._C.__file__)
EOF
}
if ! step build "$OUT/build.log" build; then
  echo "the build failed: nothing else to run" | tee -a "$SUMMARY"
  exit 1
fi

# 2. The whole test-suite.
if [ -d tests ]; then
  step tests "$OUT/pytest.log" timeout "${TEST_TIMEOUT:-3600}" "$PY" -m pytest -q -ra
else
  echo "tests      skip  (no tests/ directory)" | tee -a "$SUMMARY"
fi

# 3. compute-sanitizer. No caching allocator, so every tensor is its own allocation and an access
# just past a tensor's end is out of bounds; only channelconv's kernels are instrumented when this
# compute-sanitizer can filter by kernel name (cuBLAS's are then left alone).
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                 "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER=$candidate; fi
done
if [ -n "$SANITIZER" ]; then
  FILTER=()
  if "$SANITIZER" --help 2>&1 | grep -q -- '--kernel-name'; then FILTER=(--kernel-name kns=channelconv); fi
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step memcheck "$OUT/memcheck.log" timeout "${SANITIZE_TIMEOUT:-1800}" "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 ${FILTER[@]+"${FILTER[@]}"} \
    "$PY" scripts/sanitize_kernels.py
  step racecheck "$OUT/racecheck.log" timeout "${SANITIZE_TIMEOUT:-1800}" "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
    ${FILTER[@]+"${FILTER[@]}"} "$PY" scripts/sanitize_kernels.py --quick
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  echo "sanitizer FAIL  (compute-sanitizer not found; set CUDA_HOME)" | tee -a "$SUMMARY"
  failed=1
fi

# 4. The CUDA time model, refitted here: its features are counted from the CUDA kernels' own plans
# (csrc/plan_op.cpp), so a kernel change or another GPU needs new coefficients.
if [ "${CALIBRATE:-1}" != 0 ]; then
  cp channelconv/calibration.json "$OUT/calibration.json"
  step calibrate "$OUT/calibrate.log" timeout "${CALIBRATE_TIMEOUT:-300}" "$PY" -m benchmarks --calibrate \
    --device cuda --no-progress --calibration-file "$OUT/calibration.json"
  export CHANNELCONV_CALIBRATION="$OUT/calibration.json"
fi

# 5. The benchmark suite on CUDA.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step bench "$OUT/bench.log" timeout "${BENCH_TIMEOUT:-300}" "$PY" -m benchmarks --device cuda \
  --json "$OUT/bench-cuda.json" ${BENCH_ARGS:-}

# 6. Where each pass's GPU time goes (kernels, launches, device time against cuDNN's), float32
# with TF32 off and on; then the suite with TF32 allowed on both sides (PyTorch's default for cuDNN).
step profile "$OUT/profile.log" timeout "${BENCH_TIMEOUT:-300}" "$PY" scripts/profile_passes.py \
  --json "$OUT/profile-passes.json"
step profile-tf32 "$OUT/profile-tf32.log" timeout "${BENCH_TIMEOUT:-300}" "$PY" scripts/profile_passes.py --tf32 \
  --json "$OUT/profile-passes-tf32.json"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step bench-tf32 "$OUT/bench-tf32.log" timeout "${BENCH_TIMEOUT:-300}" "$PY" -m benchmarks --device cuda --tf32 \
  --json "$OUT/bench-cuda-tf32.json" ${BENCH_ARGS:-}

echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
exit "$failed"
