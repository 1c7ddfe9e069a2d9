"""Proof that the algorithms do their own work: a profiler trace of forward + backward shows
channelconv's ops and no PyTorch convolution, unfold/fold, im2col, col2im or mkldnn op."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import channelconv

FORBIDDEN = ("conv", "unfold", "fold", "im2col", "col2im", "mkldnn")


def traced_op_names(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("padding", [1, "same"])
@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_no_pytorch_convolution_on_the_path(algorithm, padding):
    k = 1 if algorithm == "1x1" else 2  # an even kernel: 'same' takes the asymmetric-padding route
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    w = torch.randn(6, 2, k, k, requires_grad=True)
    b = torch.randn(6, requires_grad=True)

    def step():
        y = channelconv.conv2d(x, w, b, padding=padding, groups=2, algorithm=algorithm)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        (gx.sum() + gw.sum()).backward()  # double backward too

    names = traced_op_names(step)
    prefix = {"direct": "direct", "im2col": "im2col", "1x1": "conv1x1"}[algorithm]
    for op in ("forward", "backward_input", "backward_weight"):
        assert f"channelconv::{prefix}_{op}" in names, names
    offending = [n for n in names if "channelconv" not in n and any(f in n.lower() for f in FORBIDDEN)]
    assert not offending, offending


def test_the_detector_detects():
    """The same check flags F.conv2d, so an empty list above means something."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    names = traced_op_names(lambda: torch.nn.functional.conv2d(x, w))
    assert any(any(f in n.lower() for f in FORBIDDEN) for n in names)
