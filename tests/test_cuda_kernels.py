"""The CUDA direct implicit GEMMs (forward, input gradient, weight gradient) on a GPU (skipped without one;
the emulator checks the same per-thread code on the CPU in CI): the shapes that pick each of their
tiles and split counts, against F.conv2d in float64, and split-K results that do not change from
run to run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, oracle, rel_error

import channelconv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (batch, in, out, size, kernel, stride, padding, dilation, groups): 128- and 64-row tiles
# (out per group 32, 64, 96, 128, 192), images folded into one tile's pixels (7x7 and 5x5 maps),
# small maps whose reduction the wave model splits, strided 1x1, groups, dilation, and channel
# counts that leave a channel block of the reduction ragged (C/G = 3, 20); for the input gradient,
# stride phases of 1 to 4 taps, phases no tap reaches (strided 1x1), and stride with dilation.
SHAPES = [
    (8, 512, 512, 7, 3, 1, 1, 1, 1),
    (2, 256, 128, 5, 3, 1, 1, 1, 1),
    (4, 64, 64, 28, 3, 1, 1, 1, 1),
    (3, 20, 96, 13, 3, 2, 1, 1, 1),
    (2, 3, 64, 33, 7, 2, 3, 1, 1),
    (2, 128, 192, 9, 1, 2, 0, 1, 1),
    (2, 64, 64, 11, 3, 1, 2, 2, 2),
    (1, 32, 32, 6, 5, 1, 2, 1, 1),
    (2, 64, 48, 15, 3, 2, 2, 2, 1),
    (3, 96, 64, 10, 4, 3, 1, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
def test_implicit_gemm_forward(shape, bias):
    n, c, k, size, kernel, stride, padding, dilation, groups = shape
    x = torch.randn(n, c, size, size, device="cuda")
    w = torch.randn(k, c // groups, kernel, kernel, device="cuda")
    b = torch.randn(k, device="cuda") if bias else None
    y = channelconv.conv2d(x, w, b, stride, padding, dilation, groups, algorithm="direct")
    y_ref = oracle(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_error(y, y_ref) <= TOLERANCE[torch.float32]


PASSES = ("forward", "input_grad", "weight_grad")


def passes_and_references(shape):
    """The layer's three direct passes on the GPU as callables, and F.conv2d's in float64."""
    n, c, k, size, kernel, stride, padding, dilation, groups = shape
    x = torch.randn(n, c, size, size, device="cuda")
    w = torch.randn(k, c // groups, kernel, kernel, device="cuda")
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64, None, stride, padding, dilation, groups)
    dy = torch.randn(y64.shape, device="cuda")
    dx_ref, dw_ref = torch.autograd.grad(y64, (x64, w64), dy.double())
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    ops = torch.ops.channelconv
    calls = {"forward": lambda: ops.direct_forward(x, w, None, *args),
             "input_grad": lambda: ops.direct_backward_input(dy, w, list(x.shape), *args),
             "weight_grad": lambda: ops.direct_backward_weight(dy, x, list(w.shape), *args)}
    return calls, {"forward": y64.detach(), "input_grad": dx_ref, "weight_grad": dw_ref}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pass_", ["input_grad", "weight_grad"])
def test_implicit_gemm_gradients(shape, pass_):
    calls, refs = passes_and_references(shape)
    assert rel_error(calls[pass_](), refs[pass_]) <= TOLERANCE[torch.float32]


def test_split_k_is_deterministic():
    """512 -> 512 3x3 at 7x7 splits its forward and input-gradient reductions, 64 -> 64 3x3 at
    56x56 its weight gradient's; the partials are added in split order."""
    x = torch.randn(8, 512, 7, 7, device="cuda")
    w = torch.randn(512, 512, 3, 3, device="cuda")
    first = channelconv.conv2d(x, w, None, 1, 1, algorithm="direct")
    for _ in range(3):
        assert torch.equal(channelconv.conv2d(x, w, None, 1, 1, algorithm="direct"), first)
    dy = torch.randn(8, 512, 7, 7, device="cuda")
    args = ([8, 512, 7, 7], [1, 1], [1, 1], [1, 1], 1)
    first = torch.ops.channelconv.direct_backward_input(dy, w, *args)
    for _ in range(3):
        assert torch.equal(torch.ops.channelconv.direct_backward_input(dy, w, *args), first)
    x = torch.randn(8, 64, 56, 56, device="cuda")
    dy = torch.randn(8, 64, 56, 56, device="cuda")
    args = ([64, 64, 3, 3], [1, 1], [1, 1], [1, 1], 1)
    first = torch.ops.channelconv.direct_backward_weight(dy, x, *args)
    for _ in range(3):
        assert torch.equal(torch.ops.channelconv.direct_backward_weight(dy, x, *args), first)


@pytest.fixture
def cudnn_tf32():
    """Sets torch.backends.cudnn.allow_tf32 for one test (conftest turns it off for the oracle)."""
    saved = torch.backends.cudnn.allow_tf32

    def set_tf32(allowed: bool):
        torch.backends.cudnn.allow_tf32 = allowed

    yield set_tf32
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                    reason="TF32 tensor cores need sm_80+")
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[8]], ids=lambda s: "x".join(map(str, s)))
def test_implicit_gemm_follows_cudnn_allow_tf32(shape, cudnn_tf32):
    """With torch.backends.cudnn.allow_tf32 the float32 implicit GEMMs multiply in TF32, as cuDNN
    then does: errors on float16's scale (TF32 keeps 10 mantissa bits), above float32's; without
    it, float32's. All three passes."""
    calls, refs = passes_and_references(shape)
    for allowed in (True, False):
        cudnn_tf32(allowed)
        for pass_ in PASSES:
            err = rel_error(calls[pass_](), refs[pass_])
            if allowed:
                assert TOLERANCE[torch.float32] < err <= TOLERANCE[torch.float16]
            else:
                assert err <= TOLERANCE[torch.float32]
