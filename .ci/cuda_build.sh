#!/usr/bin/env bash
# CI, CUDA build check on a machine with the CUDA toolkit but no GPU (run after .ci/run):
#
#   1. .venv-cuda: a CUDA build of torch (torch==2.14.1, CUDA 13) and the test tools (once)
#   2. a copy of the tree (tracked and untracked-but-not-ignored files) in build/cuda-tree, so the
#      CUDA build never touches the CPU build in this tree (channelconv/_C*.so, build/temp*)
#   3. FORCE_CUDA=1 build there, sm_80 and sm_90 + PTX (or $TORCH_CUDA_ARCH_LIST), with -Xptxas -v,
#      no warnings allowed from our sources
#   4. scripts/check_cuda_kernels.py on the built binary: no register spills, register ceilings,
#      and the implicit GEMM's main loop mostly FFMA from 128-bit shared loads and async copies
#   5. imports channelconv from that build and checks every op has a CUDA kernel registered
#   6. the CPU test-suite (-m "not slow") against that build
#   7. csrc/testing/emulate_kernels.py: the CUDA kernels' per-thread code run on the CPU, vs F.conv2d
#
# Later runs rebuild only what changed (the copy keeps file times and its own build/ directory).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$SECONDS
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
TREE=$ROOT/build/cuda-tree
PY=$VENV/bin/python

# The toolkit: $CUDA_HOME, or the usual places (nvcc on PATH may be a wrapper script, so
# torch's own guess from it can be wrong).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then CUDA_HOME=$d; break; fi
  done
fi
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "no CUDA toolkit found (set CUDA_HOME)" >&2
  exit 1
fi
export CUDA_HOME
echo "== CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

echo "== $VENV ($TORCH_SPEC)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Every run (a no-op once satisfied): the same tools as the CPU venv, so the same tests run.
"$VENV/bin/pip" install --quiet "$TORCH_SPEC" numpy setuptools wheel ninja pytest hypothesis expecttest tqdm matplotlib
"$PY" -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== copy of the tree in $TREE"
mkdir -p "$TREE"
# Replace everything but the copy's build/ (its ninja objects); tar keeps modification times, so
# unchanged sources are not recompiled.
find "$TREE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | tar -xf - -C "$TREE"

echo "== CUDA build (FORCE_CUDA=1)"
build_start=$SECONDS
mkdir -p "$TREE/build"
(
  cd "$TREE"
  FORCE_CUDA=1 CHANNELCONV_PTXAS_INFO=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py build_ext --inplace 2>&1 | tee "$TREE/build/cuda-build.log"
)
# Warnings from our own sources fail the check (torch's headers are not ours to fix).
if grep -E "csrc/.*(warning|error)" "$TREE/build/cuda-build.log"; then
  echo "the CUDA build printed warnings from csrc/ (above)" >&2
  exit 1
fi
echo "== CUDA build took $((SECONDS - build_start)) s"

echo "== the compiled kernels: spills, registers, the implicit GEMM's main loop (scripts/check_cuda_kernels.py)"
"$PY" scripts/check_cuda_kernels.py --binary "$TREE/channelconv/_C*.so"

echo "== import channelconv from the CUDA build; CUDA kernels registered"
(
  cd "$TREE"
  "$PY" - <<'EOF'
import os
import torch
import channelconv

assert os.path.realpath(channelconv._C.__file__).startswith(os.path.realpath(os.getcwd())), channelconv._C.__file__
ops = [f"channelconv::{a}_{k}" for a in ("direct", "im2col", "conv1x1") for k in ("forward", "backward_input", "backward_weight")]
for key in ("CUDA", "CPU"):
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
    assert not missing, f"no {key} kernel registered for {missing}"
print(f"{len(ops)} ops have CPU and CUDA kernels; extension {channelconv._C.__file__}")
EOF
)

echo "== CPU test-suite against the CUDA build (-m 'not slow')"
if [ -d "$TREE/tests" ]; then
  # Run from the copy: its channelconv (with the CUDA .so) is the one on sys.path.
  (cd "$TREE" && "$PY" -m pytest -q -x -m "not slow")
else
  echo "no tests/ directory yet: skipped"
fi

echo "== CUDA kernels' per-thread code on the CPU (csrc/testing/emulate_kernels.py)"
(cd "$TREE" && MAX_JOBS=${MAX_JOBS:-2} "$PY" csrc/testing/emulate_kernels.py --cases "${EMULATE_CASES:-100}")

echo "== done in $((SECONDS - start)) s"
