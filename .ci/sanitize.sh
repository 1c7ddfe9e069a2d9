#!/usr/bin/env bash
# CI step: build the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch
# copy of the tree (the normal in-place build is left alone) and run a representative subset of the
# test-suite against it, with gcc's ASan runtime preloaded into Python. Fails on any sanitizer report.
#
#   .ci/sanitize.sh [extra pytest arguments]      (PY=python with torch; default .venv/bin/python)
#
# The scratch copy is a fresh temporary directory, removed at the end; CHANNELCONV_SANITIZE_DIR=dir
# keeps it in `dir` instead, so a second run rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PY:-$root/.venv/bin/python}
start=$SECONDS

asan=$(gcc -print-file-name=libasan.so)
# libstdc++ is preloaded too: python does not link it, and without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts at the first C++ exception (every TORCH_CHECK).
cxx=$(gcc -print-file-name=libstdc++.so)
if [[ ! -e $asan || ! -e $cxx ]]; then
  echo "sanitize: gcc has no ASan runtime ($asan) or libstdc++ ($cxx)" >&2
  exit 1
fi

if [[ -n ${CHANNELCONV_SANITIZE_DIR:-} ]]; then
  work=$CHANNELCONV_SANITIZE_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/channelconv-sanitize.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
# Sources only: no virtual environment, no build outputs, no git metadata.
tar --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude=./.git --exclude=./.worktrees \
    --exclude=./.hypothesis --exclude=./.pytest_cache --exclude='__pycache__' -cf - . | tar -xf - -C "$work"

echo "== sanitize: building with -fsanitize=address,undefined in $work"
# CFLAGS=-fno-wrapv: Python's own compiler flags carry -fwrapv, which defines signed overflow as
# wrapping and so switches off UBSan's signed-integer-overflow check (the one that matters for
# index arithmetic); distutils appends CFLAGS after them, so this turns the check back on.
(cd "$work" && FORCE_CUDA=0 CHANNELCONV_SANITIZE=address,undefined MAX_JOBS=${MAX_JOBS:-2} CFLAGS="-fno-wrapv" \
  "$PY" setup.py --quiet build_ext --inplace >"$work/build.log" 2>&1) || { cat "$work/build.log"; exit 1; }
libs=$(ldd "$work"/channelconv/_C*.so)  # (not piped into grep -q: with pipefail, SIGPIPE would fail it)
if [[ $libs != *libasan* ]]; then
  echo "sanitize: the extension is not linked against ASan" >&2
  exit 1
fi
echo "   built in $((SECONDS - start)) s"

# detect_leaks=0: CPython does not free everything at exit by design. allocator_may_return_null=1:
# an impossible allocation fails as it does without ASan (tests/test_memory.py checks the error).
# Reports make the process fail (ASan aborts; halt_on_error makes UBSan exit). ASan writes them to
# files under $work (log_path), one per process, subprocesses included; UBSan (which ignores
# log_path in gcc's combined runtime) writes to stderr, which pytest leaves alone with
# --capture=sys (its default fd capture would swallow a report when the process dies). The whole
# subset takes about two minutes: a test still running after 10 minutes gets every thread's stack
# printed into the log, and after 20 the run stops (status 124) rather than hang CI.
reports="$work/sanitizer-report"
rm -f "$reports".*
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1:allocator_may_return_null=1:log_path=$reports
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$reports
export CHANNELCONV_FUZZ_CASES=${CHANNELCONV_FUZZ_CASES:-3000}  # tests/test_fuzz.py, scaled down
log="$work/pytest.log"
tests=(tests/test_errors.py tests/test_gradcheck.py tests/test_workspace.py tests/test_textbook.py
       tests/test_index.py tests/test_fuzz.py tests/test_threads.py
       "tests/test_memory.py::test_workspace_that_cannot_be_allocated_is_a_clear_error"
       "tests/test_memory.py::test_output_that_cannot_be_allocated_is_an_error_not_a_crash"
       "tests/test_correctness.py::test_realistic_layer" "tests/test_correctness.py::test_sweep_half_precision"
       "tests/test_determinism.py::test_direct_weight_grad_does_not_depend_on_the_thread_count"
       "tests/test_correctness.py::test_direct_tile_plans" "tests/test_correctness.py::test_side_by_side_bands"
       "tests/test_cost.py::test_workspace_of_a_sweep_is_the_plans" "tests/test_cost.py::test_plans_of_shapes_too_large_to_allocate"
       "tests/test_select.py::test_direct_plan_counts_what_its_tasks_and_chunks_do" "tests/test_correctness.py::test_depthwise_engine"
       "tests/test_correctness.py::test_direct_narrow_tile_plans"
       "tests/test_correctness.py::test_row_weight_grad_plans" "tests/test_correctness.py::test_row_weight_grad_layouts_and_dtypes"
       "tests/test_correctness.py::test_blocked_engines_layouts_and_dtypes" tests/test_layout.py
       "tests/test_func.py::test_vmap_over_per_sample_weights_and_their_gradients"
       "tests/test_correctness.py::test_amx_forward" "tests/test_correctness.py::test_amx_declines_tiles_mostly_padding"
       "tests/test_correctness.py::test_amx_weight_grad_is_exact_beside_non_finite_inputs_and_thread_independent"
       "tests/test_correctness.py::test_amx_strided_is_exact_beside_non_finite_values"
       "tests/test_correctness.py::test_amx_folded_forward_is_exact_beside_non_finite_values"
       "tests/test_correctness.py::test_depthwise_channels_last_is_thread_independent")
present=()
for t in "${tests[@]}"; do [[ -e $work/${t%%::*} ]] && present+=("$t"); done
echo "== sanitize: pytest ${present[*]}"
status=0
# CHANNELCONV_SANITIZE: the tests' self-test ops (csrc/testing/) are built with the same sanitizers.
(cd "$work" && timeout 1200 env LD_PRELOAD="$asan $cxx" CHANNELCONV_SANITIZE=address,undefined "$PY" -m pytest -q -p no:cacheprovider --capture=sys -o faulthandler_timeout=600 -m "not large" "${present[@]}" "$@") \
  >"$log" 2>&1 || status=$?
tail -n 25 "$log"
# (Report files may also hold warnings, e.g. "failed to allocate" for the impossible allocation
# tests/test_memory.py makes on purpose; only errors count.)
pattern="ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer"
found=()
for f in "$reports".*; do [[ -e $f ]] && grep -qE "$pattern" "$f" && found+=("$f"); done
if (( ${#found[@]} )) || grep -qE "$pattern" "$log"; then
  echo "sanitize: FAILED, sanitizer report(s):" >&2
  (( ${#found[@]} )) && head -n 80 "${found[@]}" >&2
  grep -nE -A40 "$pattern" "$log" | head -n 80 >&2 || true
  exit 1
fi
if [[ $status -ne 0 ]]; then
  echo "sanitize: FAILED, pytest exited with status $status" >&2
  exit "$status"
fi
echo "== sanitize: no reports, done in $((SECONDS - start)) s"
