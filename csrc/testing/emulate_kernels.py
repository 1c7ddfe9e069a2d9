"""Checks the CUDA kernels' logic on a machine without a GPU.

Builds csrc/testing/emulate_kernels.cpp (the HOST_DEVICE bodies of kernel_bodies.h and
implicit_gemm.h run thread by thread and stage by stage, see that file) as a throwaway CPU module
and compares every emulated op with F.conv2d evaluated in float64, over random shapes (stride,
padding, dilation, groups, ragged tiles, several workspace bands), both tile configurations, both
index types and all dtypes; the float32 implicit GEMMs (forward, input gradient by stride phase,
weight gradient) in both configurations, with the float32 and the TF32 (mma.sync stand-in)
multiply, and 1 to 5 splits of the reduction, their cp.async
pipeline modelled (a copy lands only at its wait). Then each planted bug (a wait one group short,
the wrong buffer, a split left out, no zero-fill; a TF32 fragment out of the PTX table's layout)
must make each implicit GEMM pass fail, the TF32 multiply must round as TF32 does,
FastDivmod must agree with / and %, and the host's choice of kernel and splits must follow the
wave model.

    python csrc/testing/emulate_kernels.py [--cases 200] [--seed 0] [--asan]

--asan builds the module with AddressSanitizer (run python with libasan preloaded, e.g.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
ASAN_OPTIONS=detect_leaks=0; without libstdc++ preloaded too, ASan's interceptor fails on the first
C++ exception), so any out-of-bounds
access to a tensor or an emulated shared-memory tile aborts the run. Exits non-zero on a mismatch.
F.conv2d is the oracle here only; the emulated ops never call it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
ROOT = os.path.dirname(CSRC)

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# The implicit GEMM's TF32 multiply rounds its operands to float16's 10 mantissa bits (float32's
# exponent), so float32 results on it are held to float16's scale.
TF32_TOLERANCE = TOLERANCE[torch.float16]
IGEMM_CONFIGS = ("large", "medium", "large/tf32", "medium/tf32")


def build(asan: bool):
    flags = ["-O1", "-g"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else [])
    build_dir = os.path.join(ROOT, "build", "emulate-asan" if asan else "emulate")
    os.makedirs(build_dir, exist_ok=True)
    return load(
        name="channelconv_emulate_asan" if asan else "channelconv_emulate",
        sources=[os.path.join(HERE, "emulate_kernels.cpp"), os.path.join(CSRC, "lowered.cpp"),
                 os.path.join(CSRC, "conv_params.cpp"), os.path.join(CSRC, "plan.cpp")],
        extra_include_paths=[CSRC],
        extra_cflags=flags,
        extra_ldflags=["-fsanitize=address"] if asan else [],
        build_directory=build_dir,
        verbose=False,
    )


def guarded(t: torch.Tensor) -> torch.Tensor:
    """t's values, stored inside a NaN-filled buffer: a read past either end poisons the result."""
    margin = 37
    buffer = torch.full((t.numel() + 2 * margin,), float("nan"), dtype=t.dtype)
    view = buffer[margin:margin + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def random_case(rng: random.Random) -> dict:
    while True:
        groups = rng.choice([1, 1, 2, 3])
        cg = rng.randint(1, 5)
        kg = rng.choice([1, 2, 3, 5, 31, 32, 33, 64, 70])  # around the tile widths 4 and 64
        kh, kw = rng.randint(1, 4), rng.randint(1, 4)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, 3), rng.randint(0, 3)
        dh, dw = rng.randint(1, 3), rng.randint(1, 3)
        h, w = rng.randint(0, 19), rng.randint(0, 19)
        n = rng.choice([0, 1, 1, 2, 3])
        if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
            continue
        if h == 0 or w == 0:  # F.conv2d refuses empty spatial input; keep those to the edge cases
            continue
        return dict(input=(n, cg * groups, h, w), weight=(kg * groups, cg, kh, kw), stride=[sh, sw],
                    padding=[ph, pw], dilation=[dh, dw], groups=groups, bias=rng.random() < 0.5)


FIXED_CASES = [
    # 3x3 same, one group, a wide tile with two pixel tiles
    dict(input=(2, 4, 9, 9), weight=(8, 4, 3, 3), stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, bias=True),
    # depthwise, stride 2 (narrow tile)
    dict(input=(2, 6, 17, 13), weight=(6, 1, 3, 3), stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=6,
         bias=False),
    # a pixel count past one narrow tile (256) and past four wide tiles
    dict(input=(1, 3, 20, 20), weight=(65, 3, 2, 2), stride=[1, 1], padding=[1, 0], dilation=[2, 1], groups=1,
         bias=True),
    # 1x1 with stride and padding (the 1x1 lowering then uses the band kernels)
    dict(input=(2, 6, 7, 5), weight=(4, 3, 1, 1), stride=[2, 1], padding=[1, 2], dilation=[1, 1], groups=2,
         bias=True),
    # 1x1, stride 1, no padding (the input is the column matrix)
    dict(input=(2, 6, 7, 5), weight=(9, 6, 1, 1), stride=[1, 1], padding=[0, 0], dilation=[3, 3], groups=1,
         bias=False),
    # kernel as large as the padded input: a single output pixel
    dict(input=(1, 2, 3, 4), weight=(5, 2, 5, 6), stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
         bias=True),
    # taps that only ever read padding on one axis
    dict(input=(2, 2, 1, 6), weight=(3, 2, 3, 2), stride=[1, 2], padding=[3, 0], dilation=[3, 1], groups=1,
         bias=True),
]


def oracle(case, x, w, b, dy):
    x64 = x.detach().double().clone().requires_grad_()  # clone: .double() of a float64 tensor is itself
    w64 = w.detach().double().clone().requires_grad_()
    b64 = b.double() if b is not None else None
    y = F.conv2d(x64, w64, b64, case["stride"], case["padding"], case["dilation"], case["groups"])
    if dy is None:
        return y.detach(), None, None
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("inf")
    denom = ref.norm().item()
    diff = (out.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


class Checker:
    def __init__(self):
        self.failures = 0
        self.checks = 0

    def __call__(self, what: str, out: torch.Tensor, ref: torch.Tensor, dtype, case, tolerance=None):
        self.checks += 1
        if out.shape != ref.shape:
            err = float("inf")
        else:
            err = rel_error(out, ref)
        if not err <= (tolerance or TOLERANCE[dtype]):
            self.failures += 1
            print(f"FAIL {what} {dtype} rel_error={err:.3g} case={case}", flush=True)


def run_case(mod, case, rng: random.Random, check: Checker, dtypes):
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    for dtype in dtypes:
        x = torch.randn(case["input"]).to(dtype)
        w = torch.randn(case["weight"]).to(dtype)
        b = torch.randn(case["weight"][0]).to(dtype) if case["bias"] else None
        y_ref, _, _ = oracle(case, x, w, b, None)
        dy = torch.randn(y_ref.shape).to(dtype)
        y_ref, dx_ref, dw_ref = oracle(case, x, w, b, dy)
        gx, gw, gdy = guarded(x), guarded(w), guarded(dy)
        gb = guarded(b) if b is not None else None
        index_choices = [32, 64] if dtype == torch.float64 else [0]
        for bits in index_choices:
            mod.set_index_bits(bits)
            tag = f"int{bits or 'auto'}"
            for tile in ("wide", "narrow"):
                check(f"direct_forward/{tile}/{tag}", mod.direct_forward(gx, gw, gb, *args, tile), y_ref, dtype, case)
            check(f"direct_backward_input/{tag}", mod.direct_backward_input(gdy, gw, list(x.shape), *args), dx_ref,
                  dtype, case)
            check(f"direct_backward_weight/{tag}", mod.direct_backward_weight(gdy, gx, list(w.shape), *args), dw_ref,
                  dtype, case)
            algorithms = ["im2col"] + (["1x1"] if case["weight"][2:] == (1, 1) else [])
            for algorithm in algorithms:
                # A limit of 1-3 output rows' columns: several bands, a ragged last one; or the default
                # 256 MiB, where the GPU's plan takes whole batches in one band.
                row_bytes = x.shape[1] * w.shape[2] * w.shape[3] * y_ref.shape[3] * x.element_size()
                limit = max(1, row_bytes * rng.randint(1, 3)) if rng.random() < 0.7 else 256 << 20
                largs = (*args, limit)
                check(f"{algorithm}_forward/{tag}", mod.lowered_forward(algorithm, gx, gw, gb, *largs), y_ref, dtype,
                      case)
                check(f"{algorithm}_backward_input/{tag}",
                      mod.lowered_backward_input(algorithm, gdy, gw, list(x.shape), *largs), dx_ref, dtype, case)
                check(f"{algorithm}_backward_weight/{tag}",
                      mod.lowered_backward_weight(algorithm, gdy, gx, list(w.shape), *largs), dw_ref, dtype, case)
        mod.set_index_bits(0)
    igemm_case(mod, case, rng, check)


def igemm_passes(mod, case, x, w, b, dy, config, splits):
    """The three passes of the float32 implicit GEMM: (name, result)."""
    args = (case["stride"], case["padding"], case["dilation"], case["groups"], config, splits, 132)
    return [("forward", mod.igemm_forward(x, w, b, *args)),
            ("input_grad", mod.igemm_input_grad(dy, w, list(x.shape), *args)),
            ("weight_grad", mod.igemm_weight_grad(dy, x, list(w.shape), *args))]


def igemm_case(mod, case, rng: random.Random, check: Checker):
    """The float32 implicit GEMMs (forward, input gradient phase by phase, weight gradient), both
    configurations with the float32 and the TF32 multiply, one split and a random 2-5."""
    x = guarded(torch.randn(case["input"]))
    w = guarded(torch.randn(case["weight"]))
    b = guarded(torch.randn(case["weight"][0])) if case["bias"] else None
    y_ref, _, _ = oracle(case, x, w, b, None)
    dy = guarded(torch.randn(y_ref.shape))
    refs = dict(zip(("forward", "input_grad", "weight_grad"), oracle(case, x, w, b, dy)))
    for config in IGEMM_CONFIGS:
        tolerance = TF32_TOLERANCE if config.endswith("tf32") else None
        for splits in (1, rng.randint(2, 5)):
            for name, out in igemm_passes(mod, case, x, w, b, dy, config, splits):
                check(f"igemm_{name}/{config}/splits={splits}", out, refs[name], torch.float32, case, tolerance)


# Cases each planted bug must break (several k-tiles per split, so the pipeline turns over).
PLANT_CASES = [
    dict(input=(2, 20, 9, 7), weight=(40, 20, 3, 3), stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
         bias=True),
    dict(input=(1, 12, 6, 6), weight=(70, 6, 3, 3), stride=[2, 1], padding=[2, 0], dilation=[1, 2], groups=2,
         bias=False),
]
PLANTS = {1: "wait one group short", 2: "multiply the buffer being loaded", 3: "split left out of the reduction",
          4: "no zero-fill", 5: "TF32 fragment a1/a2 swapped"}


def planted_bugs(mod) -> int:
    """Each planted bug must fail some case of each implicit GEMM pass; returns how many went unnoticed."""
    missed = 0
    for plant, what in PLANTS.items():
        caught = {"forward": 0, "input_grad": 0, "weight_grad": 0}
        mod.set_plant(plant)
        try:
            for case in PLANT_CASES:
                x, w = torch.randn(case["input"]), torch.randn(case["weight"])
                b = torch.randn(case["weight"][0]) if case["bias"] else None
                y_ref, _, _ = oracle(case, x, w, b, None)
                dy = torch.randn(y_ref.shape)
                refs = dict(zip(caught, oracle(case, x, w, b, dy)))
                # The pipeline's bugs on both multiplies, the fragment bug on the TF32 one.
                for config in IGEMM_CONFIGS if plant != 5 else IGEMM_CONFIGS[2:]:
                    tolerance = TF32_TOLERANCE if config.endswith("tf32") else TOLERANCE[torch.float32]
                    for name, out in igemm_passes(mod, case, x, w, b, dy, config, 3):
                        caught[name] += not rel_error(out, refs[name]) <= tolerance
        finally:
            mod.set_plant(0)
        runs = (4 if plant != 5 else 2) * len(PLANT_CASES)
        print(f"planted bug {plant} ({what}): caught in " + ", ".join(f"{c} of {runs} {name} runs"
                                                                      for name, c in caught.items()))
        missed += sum(c == 0 for c in caught.values())
    return missed


def tf32_engaged(mod) -> int:
    """The TF32 multiply rounds (its error is above float32's, within TF32's) and the float32 one
    does not; returns the number of passes where that fails."""
    wrong = 0
    case = PLANT_CASES[0]
    x, w = torch.randn(case["input"]), torch.randn(case["weight"])
    b = torch.randn(case["weight"][0])
    y_ref, _, _ = oracle(case, x, w, b, None)
    dy = torch.randn(y_ref.shape)
    refs = dict(zip(("forward", "input_grad", "weight_grad"), oracle(case, x, w, b, dy)))
    for (name, exact), (_, rounded) in zip(igemm_passes(mod, case, x, w, b, dy, "large", 1),
                                           igemm_passes(mod, case, x, w, b, dy, "large/tf32", 1)):
        e32, etf = rel_error(exact, refs[name]), rel_error(rounded, refs[name])
        good = e32 <= 1e-6 and 1e-5 < etf <= TF32_TOLERANCE
        print(f"TF32 {name}: float32 error {e32:.2e}, TF32 error {etf:.2e}{'' if good else '  WRONG'}")
        wrong += not good
    return wrong


def host_choices(mod) -> int:
    """FastDivmod and the host's kernel / split choice; returns the number of wrong answers."""
    wrong = 0
    divisors = list(range(1, 300)) + [641, 1000, 4095, 4096, 4097, 50176, 2**20 + 1, 2**30, 2**31 - 1]
    numerators = list(range(0, 2000)) + [2**31 - 1, 2**31 - 2, 2**30, 2**30 - 1, 123456789, 2**24 + 1]
    bad = mod.check_fast_divmod(divisors, numerators)
    print(f"FastDivmod: {bad} wrong of {len(divisors) * len(numerators)}")
    wrong += bad
    rng = random.Random(1)
    bad = mod.check_fast_divmod([rng.randint(1, 2**31 - 1) for _ in range(200)],
                                [rng.randint(0, 2**31 - 1) for _ in range(500)])
    wrong += bad
    # (input, weight, stride, padding, pass, expected on 132 SMs: the tile, and the splits of each
    # launch). A 7x7 map of 512 channels at batch 8 makes 4 x 4 forward tiles: the wave model
    # splits its 4608-long reduction 16 ways; 56x56 maps make 196 tiles, more than the SMs, and
    # stay whole; conv1 at batch 1 (98 tiles) splits. The weight gradient of 64 -> 64 3x3 has 5
    # tiles and 25088 pixels to reduce: 16 splits; 512 -> 512 3x3 has 144 tiles: none. The input
    # gradient of a stride-2 3x3 layer runs four phases of 1, 2, 2 and 4 taps (16 k-tiles a tap,
    # 49 tiles each): 2, 4, 4 and 6 splits; a stride-2 1x1 layer's runs one phase.
    expectations = [
        ((8, 512, 7, 7), (512, 512, 3, 3), [1, 1], [1, 1], "forward", "large/", lambda n: n == [16]),
        ((8, 64, 56, 56), (64, 64, 3, 3), [1, 1], [1, 1], "forward", "medium/", lambda n: n == [1]),
        ((8, 256, 56, 56), (128, 256, 1, 1), [1, 1], [0, 0], "forward", "large/", lambda n: n == [1]),
        ((1, 3, 224, 224), (64, 3, 7, 7), [2, 2], [3, 3], "forward", "medium/", lambda n: 1 < n[0] <= 49 // 8),
        ((8, 64, 56, 56), (64, 64, 3, 3), [1, 1], [1, 1], "weight_grad", "medium/", lambda n: n == [16]),
        ((8, 512, 7, 7), (512, 512, 3, 3), [1, 1], [1, 1], "weight_grad", "large/", lambda n: n == [1]),
        ((8, 512, 7, 7), (512, 512, 3, 3), [1, 1], [1, 1], "input_grad", "large/", lambda n: n == [16]),
        ((8, 128, 56, 56), (128, 128, 3, 3), [2, 2], [1, 1], "input_grad", "large/", lambda n: n == [2, 4, 4, 6]),
        ((8, 256, 56, 56), (512, 256, 1, 1), [2, 2], [0, 0], "input_grad", "large/", lambda n: len(n) == 1),
    ]
    for x, w, stride, pad, pass_, prefix, ok in expectations:
        choice = mod.igemm_choice(list(x), list(w), stride, pad, [1, 1], 1, "float32", pass_, 132)
        good = choice.startswith(prefix) and ok([int(n) for n in choice.split("/")[1].split(",")])
        print(f"host choice {pass_} {x} {w}: {choice}{'' if good else '  WRONG'}")
        wrong += not good
    for dtype in ("float64", "bfloat16"):  # the implicit GEMMs are float32
        for pass_ in ("forward", "input_grad", "weight_grad"):
            wrong += mod.igemm_choice([8, 64, 56, 56], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], 1, dtype, pass_,
                                      132) != "tiled"
    # depthwise (one channel per group); a weight gradient of 8 positions per channel
    for pass_ in ("forward", "input_grad"):
        wrong += mod.igemm_choice([8, 32, 56, 56], [32, 1, 3, 3], [1, 1], [1, 1], [1, 1], 32, "float32", pass_,
                                  132) != "tiled"
    wrong += mod.igemm_choice([8, 8, 56, 56], [64, 8, 1, 1], [1, 1], [0, 0], [1, 1], 1, "float32", "weight_grad",
                              132) != "tiled"
    return wrong


def edge_cases(mod, check: Checker):
    """Shapes the op checks refuse, as F.conv2d does (an image with no pixels in a non-empty batch,
    fewer output channels than groups): the kernels are never reached with them."""
    x = torch.empty(2, 3, 0, 4, dtype=torch.float64)
    w = torch.randn(4, 3, 1, 3, dtype=torch.float64)
    args = ([1, 1], [1, 1], [1, 1], 1)
    for name, call in (("direct_forward (H=0)", lambda: mod.direct_forward(x, w, None, *args, "auto")),
                       ("im2col_forward (H=0)", lambda: mod.lowered_forward("im2col", x, w, None, *args, 1 << 20)),
                       ("direct_backward_input (K=0)", lambda: mod.direct_backward_input(
                           torch.empty(2, 0, 3, 3, dtype=torch.float64), torch.empty(0, 3, 3, 3, dtype=torch.float64),
                           [2, 3, 5, 5], [1, 1], [0, 0], [1, 1], 1))):
        try:
            call()
        except RuntimeError:
            continue
        raise AssertionError(f"edge {name}: expected the op's checks to refuse it")
    # The int32 decision.
    assert mod.fits_int32([1, 1, 8, 8], [1, 1, 3, 3], [1, 1], [1, 1], [1, 1], 1, [64])
    assert not mod.fits_int32([1, 1, 8, 8], [1, 1, 3, 3], [1, 1], [1, 1], [1, 1], 1, [2**31 - 1])
    assert not mod.fits_int32([1, 1, 8, 8], [1, 1, 3, 3], [1, 1], [2**31 - 100, 1], [1, 1], 1, [64])
    assert not mod.fits_int32([1, 1, 8, 8], [1, 1, 3, 3], [2**31 - 1, 1], [1, 1], [1, 1], 1, [64])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=150, help="random cases after the fixed ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--asan", action="store_true", help="build with AddressSanitizer (see the docstring)")
    options = parser.parse_args()
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    mod = build(options.asan)
    check = Checker()
    edge_cases(mod, check)
    all_dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    for case in FIXED_CASES:
        run_case(mod, case, rng, check, all_dtypes)
    for i in range(options.cases):
        # float64 always (both index types); one other dtype per case keeps the run short.
        run_case(mod, random_case(rng), rng, check, [torch.float64, all_dtypes[1 + i % 3]])
    missed = planted_bugs(mod)
    wrong = host_choices(mod) + tf32_engaged(mod)
    print(f"{check.checks} checks, {check.failures} failures; {missed} planted bugs missed; "
          f"{wrong} wrong host answers")
    return 1 if check.failures or missed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
