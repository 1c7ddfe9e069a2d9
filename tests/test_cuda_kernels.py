"""The CUDA direct forward's and weight gradient's implicit GEMMs on a GPU (skipped without one;
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
# counts that leave a channel block of the reduction ragged (C/G = 3, 20).
SHAPES = [
    (8, 512, 512, 7, 3, 1, 1, 1, 1),
    (2, 256, 128, 5, 3, 1, 1, 1, 1),
    (4, 64, 64, 28, 3, 1, 1, 1, 1),
    (3, 20, 96, 13, 3, 2, 1, 1, 1),
    (2, 3, 64, 33, 7, 2, 3, 1, 1),
    (2, 128, 192, 9, 1, 2, 0, 1, 1),
    (2, 64, 64, 11, 3, 1, 2, 2, 2),
    (1, 32, 32, 6, 5, 1, 2, 1, 1),
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_implicit_gemm_weight_grad(shape):
    n, c, k, size, kernel, stride, padding, dilation, groups = shape
    x = torch.randn(n, c, size, size, device="cuda")
    w = torch.randn(k, c // groups, kernel, kernel, device="cuda")
    y_ref = oracle(x, w, None, stride, padding, dilation, groups)
    dy = torch.randn(y_ref.shape, device="cuda")
    dw = torch.ops.channelconv.direct_backward_weight(dy, x, list(w.shape), [stride] * 2, [padding] * 2,
                                                      [dilation] * 2, groups)
    w64 = w.double().requires_grad_()
    y64 = F.conv2d(x.double(), w64, None, stride, padding, dilation, groups)
    (dw_ref,) = torch.autograd.grad(y64, w64, dy.double())
    assert rel_error(dw, dw_ref) <= TOLERANCE[torch.float32]


def test_split_k_is_deterministic():
    """512 -> 512 3x3 at 7x7 splits its forward reduction, 64 -> 64 3x3 at 56x56 its weight
    gradient's; the partials are added in split order."""
    x = torch.randn(8, 512, 7, 7, device="cuda")
    w = torch.randn(512, 512, 3, 3, device="cuda")
    first = channelconv.conv2d(x, w, None, 1, 1, algorithm="direct")
    for _ in range(3):
        assert torch.equal(channelconv.conv2d(x, w, None, 1, 1, algorithm="direct"), first)
    x = torch.randn(8, 64, 56, 56, device="cuda")
    dy = torch.randn(8, 64, 56, 56, device="cuda")
    args = ([64, 64, 3, 3], [1, 1], [1, 1], [1, 1], 1)
    first = torch.ops.channelconv.direct_backward_weight(dy, x, *args)
    for _ in range(3):
        assert torch.equal(torch.ops.channelconv.direct_backward_weight(dy, x, *args), first)
