"""gradcheck / gradgradcheck through the public API, and torch.library.opcheck on every op."""

from __future__ import annotations

import pytest
import torch

import channelconv
from channelconv._ops import OPS, TAKES_WORKSPACE

# (input shape, weight shape, stride, padding, dilation, groups): a plain, a strided/dilated
# grouped, and a depthwise case; 1x1 kernels where the algorithm needs them.
SHAPES = {
    "general": [
        ((2, 4, 6, 5), (6, 2, 3, 2), (1, 1), (1, 0), (1, 1), 2),
        ((1, 3, 7, 8), (2, 3, 2, 3), (2, 1), (1, 2), (2, 1), 1),
        ((2, 3, 5, 5), (3, 1, 3, 3), (2, 2), (1, 1), (1, 1), 3),
    ],
    "1x1": [
        ((2, 4, 5, 6), (6, 2, 1, 1), (1, 1), (0, 0), (1, 1), 2),
        ((2, 3, 5, 4), (2, 3, 1, 1), (2, 3), (1, 0), (1, 1), 1),
    ],
}


def cases(algorithm):
    return SHAPES["1x1" if algorithm == "1x1" else "general"] + (SHAPES["1x1"] if algorithm != "1x1" else [])


def tensors(input_shape, weight_shape, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(weight_shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(weight_shape[0], generator=g, dtype=torch.float64).to(device).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_gradcheck_and_gradgradcheck(device, algorithm):
    for input_shape, weight_shape, stride, padding, dilation, groups in cases(algorithm):
        x, w, b = tensors(input_shape, weight_shape, device)

        def f(x, w, b):
            return channelconv.conv2d(x, w, b, stride, padding, dilation, groups, algorithm=algorithm)

        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_opcheck_every_op(device, algorithm):
    ops = OPS[algorithm]
    for input_shape, weight_shape, stride, padding, dilation, groups in cases(algorithm):
        for dtype in (torch.float64, torch.float32):
            x, w, b = (t.detach().to(dtype).requires_grad_() for t in tensors(input_shape, weight_shape, device))
            rest = (list(stride), list(padding), list(dilation), groups)
            if TAKES_WORKSPACE[algorithm]:
                rest += (channelconv.get_workspace_limit(),)
            y = ops.forward(x, w, b, *rest)
            gy = torch.randn_like(y).requires_grad_()
            torch.library.opcheck(ops.forward, (x, w, b, *rest))
            torch.library.opcheck(ops.forward, (x, w, None, *rest))
            torch.library.opcheck(ops.backward_input, (gy, w, list(x.shape), *rest))
            torch.library.opcheck(ops.backward_weight, (gy, x, list(w.shape), *rest))
