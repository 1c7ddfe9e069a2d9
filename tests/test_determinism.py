"""Determinism: repeated forward/backward passes give bitwise identical results — on the CPU
always, on CUDA under torch.use_deterministic_algorithms(True). (Same thread count: a GEMM library
may block its sums differently for another.)"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import channelconv

SHAPES = {  # (input, weight, stride, padding, dilation, groups): large enough to split across threads
    "direct": ((3, 8, 17, 19), (12, 4, 3, 3), (1, 1), (1, 1), (1, 1), 2),
    "im2col": ((3, 8, 17, 19), (12, 8, 3, 2), (2, 1), (1, 0), (1, 2), 1),
    "1x1": ((3, 16, 17, 19), (12, 16, 1, 1), (1, 1), (0, 0), (1, 1), 1),
}


@contextlib.contextmanager
def deterministic(device):
    """torch.use_deterministic_algorithms(True) on CUDA (restored after); nothing to switch on the CPU."""
    if device != "cuda":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def one_pass(algorithm, device, dtype):
    input_shape, weight_shape, stride, padding, dilation, groups = SHAPES[algorithm]
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_() for s in (input_shape, weight_shape))
    b = torch.randn(weight_shape[0], generator=g, dtype=dtype).to(device).requires_grad_()
    out = channelconv.conv2d(x, w, b, stride, padding, dilation, groups, algorithm=algorithm)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype).to(device)
    # create_graph: the double-backward ops run too.
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad_out, create_graph=True)
    ggx, ggw = torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w))
    return [t.detach() for t in (out, gx, gw, gb, ggx, ggw)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_repeated_passes_are_bitwise_identical(device, algorithm, dtype):
    with deterministic(device):
        first = one_pass(algorithm, device, dtype)
        runs = [one_pass(algorithm, device, dtype) for _ in range(2)]
    assert all(t.abs().sum() > 0 for t in first)
    for run in runs:
        for name, a, b in zip(("output", "grad input", "grad weight", "grad bias", "gg input", "gg weight"),
                              first, run):
            assert torch.equal(a, b), name


def test_training_runs_are_bitwise_identical(device):
    """Two runs of a few SGD steps of a converted CNN from the same seed: identical parameters."""
    def train():
        torch.manual_seed(0)
        model = channelconv.convert(nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=4), nn.ReLU(),
            nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))).to(device)
        data = torch.randn(4, 6, 3, 12, 12, device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x in data:
            loss = model(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return copy.deepcopy(model.state_dict())

    with deterministic(device):
        a, b = train(), train()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, layout", [
    (64, 24, 3, 2, "contiguous"), (64, 72, 3, 2, "contiguous"), (1, 24, 11, 4, "contiguous"),
    (1, 32, 3, 1, "contiguous"), (1, 32, 3, 1, "channels_last")])
def test_direct_weight_grad_does_not_depend_on_the_thread_count(in_channels, out_channels, kernel, stride, layout):
    """The direct weight gradient sums each element over its chunks of output rows in order,
    whatever the thread count, so one and two threads give the same bits. On an AVX-512 CPU this
    shape takes the blocked kernel: 100 rows of 64 channels make two chunks per image, and 24 or
    72 output channels (one or three 32-channel blocks) make it split input channels across threads.
    The 11x11 layer takes the row engine, whose units run as many blocks of output channels on one
    copy of an input plane as the thread count allows (12 at one thread, 6 at two). The 1 -> 32
    layer is a single unit, whose two chunks (100 rows of 32 dy channels each) are cut into slices
    summed apart, then in order; in channels_last its float32 dy is read in place."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, 100, 70, generator=g)
    y_h = (100 + 2 - kernel) // stride + 1
    dy = torch.randn(2, out_channels, y_h, (70 + 2 - kernel) + 1, generator=g)
    if layout == "channels_last":
        x, dy = (t.to(memory_format=torch.channels_last) for t in (x, dy))
    args = ([out_channels, in_channels, kernel, kernel], [stride, 1], [1, 1], [1, 1], 1)
    before = torch.get_num_threads()
    try:
        grads = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads.append(torch.ops.channelconv.direct_backward_weight(dy, x, *args))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])
    w = torch.zeros(args[0], dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x.double(), w, None, (stride, 1), 1)
    want, = torch.autograd.grad(y, w, dy.double())
    torch.testing.assert_close(grads[0].double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
