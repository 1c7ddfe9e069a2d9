"""Calls every channelconv op on CUDA once per shape and dtype: a small, fast workload for
compute-sanitizer (memcheck, racecheck; see scripts/gpu_check.sh) that is also a smoke test.

Every op (forward, backward_input, backward_weight of direct, im2col and conv1x1) runs on shapes
with stride, padding, dilation and groups, a depthwise layer, a channels_last input, ragged tiles,
the float32 implicit GEMM's two tiles with its reduction split,
and a workspace limit of one or two output rows so im2col works in several bands; in float32,
float64, float16 and bfloat16; with 32-bit and (CHANNELCONV_FORCE_INT64_INDEX=1) 64-bit indexing.
Results are compared with F.conv2d evaluated in float64 on the CPU (the oracle; no CUDA
convolution runs, so the sanitizer sees only channelconv's kernels and cuBLAS). Exits non-zero on
a mismatch.

    python scripts/sanitize_kernels.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

try:
    import channelconv  # noqa: F401  (loads the ops)
except ImportError:  # run from a checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import channelconv  # noqa: F401

ops = torch.ops.channelconv
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (input NCHW, weight KCRS, stride, padding, dilation, groups)
SHAPES = [
    ((2, 4, 9, 9), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),          # 3x3 same
    ((3, 6, 17, 13), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), 6),        # depthwise, stride 2 (narrow tile)
    ((1, 6, 20, 19), (70, 3, 2, 3), (1, 2), (2, 0), (2, 1), 2),       # groups, dilation, ragged wide tiles
    ((2, 5, 7, 6), (3, 5, 5, 4), (3, 1), (3, 2), (1, 2), 1),          # taps that read only padding
    ((2, 8, 6, 5), (12, 4, 1, 1), (2, 1), (1, 0), (1, 1), 2),         # 1x1 with stride / padding (bands)
    ((2, 8, 6, 5), (12, 8, 1, 1), (1, 1), (0, 0), (1, 1), 1),         # 1x1, the input is the column matrix
    ((2, 64, 5, 5), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1),       # implicit GEMM, 64 rows, split-K
    ((1, 16, 6, 6), (128, 16, 3, 3), (1, 1), (0, 1), (1, 1), 1),      # implicit GEMM, 128 rows, 2 splits
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def run(shape, dtype, channels_last: bool, failures: list[str], device: str) -> None:
    in_size, w_size, stride, padding, dilation, groups = shape
    x = torch.randn(in_size).to(dtype)
    w = torch.randn(w_size).to(dtype)
    b = torch.randn(w_size[0]).to(dtype)
    # Oracle on the CPU in float64, from the same (rounded) values.
    x64 = x.double().clone().requires_grad_()
    w64 = w.double().clone().requires_grad_()
    y64 = F.conv2d(x64, w64, b.double(), stride, padding, dilation, groups)
    dy = torch.randn(y64.shape).to(dtype)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    y64 = y64.detach()

    xc, wc, bc, dyc = (t.to(device) for t in (x, w, b, dy))
    if channels_last:
        xc = xc.contiguous(memory_format=torch.channels_last)
        dyc = dyc.contiguous(memory_format=torch.channels_last)
    args = (list(stride), list(padding), list(dilation), groups)
    # One to two output rows' worth of columns: several bands, usually a ragged last one.
    row_bytes = in_size[1] * w_size[2] * w_size[3] * y64.shape[3] * x.element_size()
    algorithms = {"direct": ()}
    for rows in (1, 2):
        algorithms[f"im2col[{rows} rows]"] = (row_bytes * rows,)
    if w_size[2:] == (1, 1):
        algorithms["conv1x1"] = (row_bytes,)

    for name, extra in algorithms.items():
        prefix = name.split("[")[0]
        forward = getattr(ops, f"{prefix}_forward")
        backward_input = getattr(ops, f"{prefix}_backward_input")
        backward_weight = getattr(ops, f"{prefix}_backward_weight")
        results = {
            "forward": (forward(xc, wc, bc, *args, *extra), y64),
            "backward_input": (backward_input(dyc, wc, list(in_size), *args, *extra), dx64),
            "backward_weight": (backward_weight(dyc, xc, list(w_size), *args, *extra), dw64),
        }
        if device == "cuda":
            torch.cuda.synchronize()
        for what, (out, ref) in results.items():
            err = rel_error(out, ref)
            if not err <= TOLERANCE[dtype]:
                failures.append(f"{name}_{what} {dtype} channels_last={channels_last} shape={shape}: "
                                f"rel_error={err:.3g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="float32 and float16 only, 32-bit indexing only")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to dry-run the script itself")
    options = parser.parse_args()
    if options.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels.py: no CUDA device", file=sys.stderr)
        return 2
    # Full-precision cuBLAS for the GEMMs of im2col / 1x1, so the tolerances above hold.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.manual_seed(0)
    failures: list[str] = []
    dtypes = DTYPES[::2] if options.quick else DTYPES
    index_modes = ["0"] if options.quick else ["0", "1"]
    calls = 0
    for force64 in index_modes:
        os.environ["CHANNELCONV_FORCE_INT64_INDEX"] = force64  # read by the C++ host code on each call
        for shape in SHAPES:
            for dtype in dtypes:
                run(shape, dtype, channels_last=False, failures=failures, device=options.device)
                calls += 1
        run(SHAPES[0], torch.float32, channels_last=True, failures=failures, device=options.device)
        calls += 1
    os.environ.pop("CHANNELCONV_FORCE_INT64_INDEX")
    for line in failures:
        print("FAIL", line)
    print(f"sanitize_kernels.py: {calls} shape/dtype runs, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
