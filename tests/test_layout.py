"""channels_last: correct values, and the memory formats F.conv2d / nn.Conv2d give, for outputs
and gradients; a converted model moved to channels_last; the lowered algorithms' NHWC driver."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close, oracle

import channelconv
from channelconv._shapes import pair

CL = torch.channels_last
# float64 where it can be: on CUDA F.conv2d computes float64 in NCHW whatever the operands' formats
# (cuDNN's channels_last path takes no doubles; tests/test_correctness.py checks that channelconv
# follows), so the channels_last tests run in float32 there.
DTYPE = {"cpu": torch.float64, "cuda": torch.float32}

# (weight shape, stride, padding, dilation, groups) per algorithm; 1x1 for '1x1'.
LAYERS = {
    "direct": ((6, 2, 3, 3), (2, 1), (1, 1), (1, 1), 2),
    "im2col": ((6, 4, 3, 2), (1, 1), (2, 0), (2, 1), 1),
    "1x1": ((6, 4, 1, 1), (1, 2), (0, 0), (1, 1), 1),
}


def formats(t):
    return t.is_contiguous(), t.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("where", ["both", "input", "weight"])
@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_channels_last_operands(device, algorithm, where):
    """Output and gradients: F.conv2d's values (in DTYPE) and memory formats, with the input, the
    weight or both in channels_last; the incoming gradient in the output's format."""
    weight_shape, stride, padding, dilation, groups = LAYERS[algorithm]
    g = torch.Generator().manual_seed(0)
    dtype = DTYPE[device]
    x = torch.randn(2, 4, 7, 9, generator=g, dtype=dtype).to(device)
    w = torch.randn(weight_shape, generator=g, dtype=dtype).to(device)
    b = torch.randn(weight_shape[0], generator=g, dtype=dtype).to(device)
    if where in ("both", "input"):
        x = x.contiguous(memory_format=CL)
    if where in ("both", "weight"):
        w = w.contiguous(memory_format=CL)
    args = (stride, padding, dilation, groups)

    results = []
    for conv in (lambda *t: channelconv.conv2d(*t, *args, algorithm=algorithm), lambda *t: F.conv2d(*t, *args)):
        leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, b)]
        out = conv(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grad_out = torch.empty_like(out).copy_(grad_out)  # in the output's strides
        grads = torch.autograd.grad(out, leaves[:2], grad_out)
        results.append((out, *grads))
    for name, got, want in zip(("output", "grad input", "grad weight"), *results):
        assert_close(got, want, dtype, name)
        assert formats(got) == formats(want), (name, got.stride(), want.stride())
    if where != "weight" or algorithm != "1x1":  # (a 1x1 weight alone is both formats at once)
        assert results[0][0].is_contiguous(memory_format=CL)  # channels_last in, channels_last out


class Net(nn.Module):
    """Stem, depthwise-separable pair, bottleneck with batch norm and a residual, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.block = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pw(F.relu(self.dw(self.stem(x))))
        x = F.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def test_channels_last_model(device):
    """convert() then .to(memory_format=channels_last): every convolution computes in channels_last,
    outputs and parameter gradients equal the plain channels_last model's."""
    torch.manual_seed(0)
    dtype = DTYPE[device]
    plain = Net().to(dtype).to(device).to(memory_format=CL)
    ours = channelconv.convert(copy.deepcopy(plain).to(memory_format=torch.contiguous_format))
    ours = ours.to(memory_format=CL)
    x = torch.randn(4, 3, 16, 16, dtype=dtype, device=device).contiguous(memory_format=CL)

    seen = []
    for m in ours.modules():
        if isinstance(m, channelconv.Conv2d):
            assert m.weight.is_contiguous(memory_format=CL)
            m.register_forward_hook(lambda mod, args, out: seen.append(out.is_contiguous(memory_format=CL)))

    outs = [model(x) for model in (plain, ours)]
    assert len(seen) == 6 and all(seen), seen
    assert_close(outs[1], outs[0], dtype)
    for model, out in zip((plain, ours), outs):
        out.pow(2).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert_close(p.grad, q.grad, dtype, name)
        assert formats(p.grad) == formats(q.grad), name


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_grad_input_format_with_a_contiguous_incoming_gradient(algorithm):
    k = 1 if algorithm == "1x1" else 3
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(5, 4, k, k, dtype=torch.float64)  # contiguous (a 1x1 weight: both formats)
    formats_seen = []
    for conv in (lambda x: channelconv.conv2d(x, w, algorithm=algorithm), lambda x: F.conv2d(x, w)):
        out = conv(x)
        (gx,) = torch.autograd.grad(out, x, torch.ones(out.shape, dtype=out.dtype))  # contiguous
        formats_seen.append(formats(gx))
    assert formats_seen[0] == formats_seen[1]


# (c_in, c_out, (H, W), kernel, stride, padding, dilation, groups, algorithm) for the NHWC driver.
NHWC_LAYERS = [
    (12, 10, (5, 7), 1, 1, 0, 1, 1, "1x1"),  # the input's pixel rows are the columns
    (12, 10, (5, 7), 1, 1, 0, 1, 2, "1x1"),  # grouped: each group's block of the rows, in place
    (12, 10, (7, 9), 1, 2, 0, 1, 1, "1x1"),  # strided: a gather of whole pixel rows
    (12, 12, (7, 8), 1, (2, 1), 1, 1, 3, "im2col"),  # strided, padded, grouped 1x1
    (6, 8, (7, 9), 3, 1, 1, 1, 1, "im2col"),
    (6, 8, (9, 8), (3, 2), (2, 1), (2, 0), (2, 1), 2, "im2col"),
    (5, 4, (6, 6), 5, 2, 2, 1, 1, "im2col"),
    (8, 8, (6, 7), 3, 1, 1, 1, 8, "im2col"),  # depthwise: the NCHW driver (GEMMs of one column)
]


@pytest.mark.parametrize("bands", ["whole images", "two rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", NHWC_LAYERS, ids=lambda layer: f"{layer[8]}-{layer[3]}-s{layer[4]}-g{layer[7]}")
def test_lowered_algorithms_run_nhwc_on_channels_last_data(layer, dtype, bands, limit):
    """im2col and 1x1 on channels_last data run the NHWC driver (the plan says so): columns of
    contiguous channel runs, GEMMs into the NHWC output, col2im into an NHWC gradient; groups of
    fewer than 4 output channels the NCHW driver. Forward and both gradients match F.conv2d in
    float64, in F.conv2d's memory formats, with bands of whole images (several per GEMM) or of two
    output rows."""
    c_in, c_out, size, k, stride, padding, dilation, groups, algorithm = layer
    k, stride, padding, dilation = (pair(v, "size") for v in (k, stride, padding, dilation))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, c_in, *size, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=CL)
    w = torch.randn(c_out, c_in // groups, *k, generator=g, dtype=torch.float64).to(dtype)
    w = w.contiguous(memory_format=CL)
    b = torch.randn(c_out, generator=g, dtype=torch.float64).to(dtype)
    args = (stride, padding, dilation, groups)
    c = channelconv.cost(x.shape, w.shape, *args, dtype=dtype, memory_format=CL)
    plan = c.plans[algorithm]
    assert plan.nhwc == (c_out // groups >= 4) and not plan.side_by_side
    if bands == "two rows":
        if plan.column_elements == 0:
            pytest.skip("the input is the columns: no bands")
        limit(2 * c_in * k[0] * k[1] * c.output_shape[3] * dtype.itemsize)
        plan = channelconv.cost(x.shape, w.shape, *args, dtype=dtype, memory_format=CL).plans[algorithm]
        assert (plan.band_rows, plan.band_images) == (2, 1)
    elif plan.column_elements and plan.nhwc:  # (the NCHW driver batches images of one group only)
        assert plan.band_images == 3
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = channelconv.conv2d(*leaves, *args, algorithm=algorithm)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=CL)
    grads = torch.autograd.grad(out, leaves, gy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = oracle(*ref_leaves, *args)
    ref_grads = torch.autograd.grad(ref, ref_leaves, gy.double())
    assert_close(out, ref, dtype)
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close(got, want, dtype, f"grad {name}")
    for t in (out, *grads[:2]):  # (a 1x1 weight gradient is both formats at once)
        assert t.is_contiguous(memory_format=CL) and (t is grads[1] or not t.is_contiguous())
