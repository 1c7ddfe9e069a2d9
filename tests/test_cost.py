"""channelconv.cost: the textbook's quantities, checked against FlopCounterMode running F.conv2d,
against the tensors' real sizes, against the workspace im2col really allocates, and against the
rules the section asks about (doubling channels, groups, padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import channelconv
from channelconv._ops import OPS, TAKES_WORKSPACE

MiB = 1 << 20
# The column buffers im2col prefers (csrc/plan.cpp): about a core's L2 for GEMMs with fewer than
# 128 output channels per group, larger for wider ones. The spec these tests hold the plan to.
NARROW_COLUMN_BYTES, WIDE_COLUMN_BYTES = 2 * MiB, 8 * MiB


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


@st.composite
def layers(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 4))
    c_out = groups * draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 5))
                 for k, d, p in zip(kernel, dilation, padding))
    batch = draw(st.integers(1, 3))
    return (batch, c_in, *size), (c_out, c_in // groups, *kernel), stride, padding, dilation, groups


@settings(max_examples=60, deadline=None)
@given(layer=layers())
def test_forward_flops_match_flop_counter(layer):
    x_shape, w_shape, stride, padding, dilation, groups = layer
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    c = channelconv.cost(x_shape, w_shape, stride, padding, dilation, groups)
    assert c.forward_flops == counted_flops(lambda: F.conv2d(x, w, None, stride, padding, dilation, groups))
    assert c.forward_operations == c.forward_flops  # multiply-add convention: one addition per product
    assert c.output_shape == tuple(F.conv2d(x, w, None, stride, padding, dilation, groups).shape)


@settings(max_examples=40, deadline=None)
@given(layer=layers())
def test_backward_flops_match_flop_counter(layer):
    """Input gradient: FlopCounterMode on convolution_backward directly. Weight gradient: its
    formula counts all C_i input channels for every output channel (an overcount by `groups`),
    so the grouped case is checked as the sum over the groups' separate convolutions."""
    x_shape, w_shape, stride, padding, dilation, groups = layer
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    c = channelconv.cost(x_shape, w_shape, stride, padding, dilation, groups)
    gy = torch.randn(c.output_shape)

    def backward(x, w, mask, g):
        return torch.ops.aten.convolution_backward(gy if g == groups else gy_group, x, w, None, stride, padding,
                                                   dilation, False, (0, 0), g, mask)

    gy_group = None
    assert 2 * c.backward_input_multiplications == counted_flops(lambda: backward(x, w, [True, False, False], groups))
    per_group = 0
    c_in, c_out = x_shape[1] // groups, w_shape[0] // groups
    for g in range(groups):
        x_g = x[:, g * c_in:(g + 1) * c_in]
        w_g = w[g * c_out:(g + 1) * c_out]
        gy_group = gy[:, g * c_out:(g + 1) * c_out]
        per_group += counted_flops(lambda: torch.ops.aten.convolution_backward(
            gy_group, x_g, w_g, None, stride, padding, dilation, False, (0, 0), 1, [False, True, False]))
    assert 2 * c.backward_weight_multiplications == per_group
    assert c.backward_flops == 2 * c.backward_input_multiplications + 2 * c.backward_weight_multiplications
    if groups == 1:  # the whole training step, as FlopCounterMode sees autograd run it
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        total = counted_flops(lambda: F.conv2d(xg, wg, None, stride, padding, dilation, 1).backward(gy))
        assert c.training_flops == total


def test_textbook_layer_is_over_53_billion_operations():
    """The section's 256x256-pixel, 5x5-kernel, 128 -> 128-channel layer (padding keeps 256x256)."""
    c = channelconv.cost((1, 128, 256, 256), (128, 128, 5, 5), padding=2)
    assert c.output_shape == (1, 128, 256, 256)
    assert c.forward_multiplications == 256 * 256 * 5 * 5 * 128 * 128
    assert c.forward_operations == 53_687_091_200 > 53e9


def test_doubling_channels_quadruples_cost_and_groups_divide_it():
    base = channelconv.cost((2, 32, 20, 20), (48, 32, 3, 3), padding=1)
    doubled = channelconv.cost((2, 64, 20, 20), (96, 64, 3, 3), padding=1)
    for name in ("forward_operations", "backward_operations", "forward_flops", "training_flops"):
        assert getattr(doubled, name) == 4 * getattr(base, name), name
    for g in (2, 4, 8, 16):
        grouped = channelconv.cost((2, 32, 20, 20), (48, 32 // g, 3, 3), padding=1, groups=g)
        assert grouped.forward_operations * g == base.forward_operations
        assert grouped.backward_operations * g == base.backward_operations


def test_doubling_padding_grows_the_output():
    one = channelconv.cost((1, 8, 16, 16), (8, 8, 3, 3), padding=1)
    two = channelconv.cost((1, 8, 16, 16), (8, 8, 3, 3), padding=2)
    assert one.output_shape[2:] == (16, 16) and two.output_shape[2:] == (18, 18)
    assert two.forward_operations * 16 * 16 == one.forward_operations * 18 * 18


def test_one_by_one_is_a_matrix_product():
    c = channelconv.cost((3, 64, 7, 9), (32, 64, 1, 1))
    assert c.forward_multiplications == 3 * 7 * 9 * 32 * 64  # (32 x 64) . (64 x 63) per image
    assert c.plans["1x1"].applicable and c.workspace("1x1") == 0
    assert not channelconv.cost((3, 64, 7, 9), (32, 64, 3, 3)).plans["1x1"].applicable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_memory_footprint_is_the_tensors_bytes(dtype, bias):
    x = torch.randn(2, 6, 11, 13, dtype=dtype)
    w = torch.randn(10, 3, 3, 2, dtype=dtype)
    b = torch.randn(10, dtype=dtype) if bias else None
    y = F.conv2d(x, w, b, 2, 1, 1, 2)
    c = channelconv.cost(x.shape, w.shape, 2, 1, 1, 2, dtype, bias=bias)
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    assert c.element_size == x.element_size()
    assert c.forward_memory_bytes == size(x, w, b, y) == c.forward_bytes_moved
    # backward: input and weight (saved), output gradient, input and weight (and bias) gradients
    assert c.backward_memory_bytes == size(x, w, b, y, x, w, b)
    outputs = y.numel()
    assert c.backward_additions == c.backward_multiplications + (outputs if bias else 0)


@pytest.mark.parametrize("shape", [
    ((2, 16, 20, 20), (32, 16, 3, 3), 1, 1, 1, 1),
    ((1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1),  # bands: the columns exceed the 8 MiB preference
    ((3, 12, 17, 15), (12, 3, 5, 3), 2, 2, 1, 4),
    ((2, 8, 10, 10), (8, 8, 1, 1), 2, 0, 1, 1),  # 1x1 with stride: a gather
    ((2, 8, 10, 10), (8, 8, 3, 3), 1, 2, 2, 1),
    ((1, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, 1),
    ((8, 32, 7, 7), (24, 32, 3, 3), 1, 1, 1, 1),  # side by side: columns and a scratch of outputs
    ((6, 16, 14, 14), (24, 16, 1, 1), 2, 0, 1, 1),  # 1x1 with stride, side by side
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_workspace_matches_what_the_ops_allocate(shape, dtype):
    # Forward and both gradients hold the same column buffer (rows of one image, or whole images).
    x_shape, w_shape, stride, padding, dilation, groups = shape
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    args = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    c = channelconv.cost(x_shape, w_shape, stride, padding, dilation, groups, dtype)
    for algorithm in channelconv.ALGORITHMS:
        if not c.plans[algorithm].applicable:
            continue
        ops, extra = OPS[algorithm], (channelconv.get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
        y = ops.forward(x, w, None, *args, *extra)
        for pass_, run in (("forward", lambda: ops.forward(x, w, None, *args, *extra)),
                           ("input_grad", lambda: ops.backward_input(y, w, x.shape, *args, *extra)),
                           ("weight_grad", lambda: ops.backward_weight(y, x, w.shape, *args, *extra))):
            torch.ops.channelconv.reset_workspace_peak()
            run()
            assert torch.ops.channelconv.workspace_peak() == c.workspace(algorithm), (algorithm, pass_)
    assert c.im2col_workspace_bytes == c.workspace("im2col") <= WIDE_COLUMN_BYTES


@st.composite
def planned_layers(draw):
    """Layers across the band plans: row bands, whole images, side by side (small maps, several
    images), the identity unrolling, groups, and limits that cut bands to a few rows."""
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 24)), groups * draw(st.integers(1, 24))
    k = draw(st.sampled_from([1, 1, 3, 5]))
    stride, padding = draw(st.integers(1, 2)), draw(st.integers(0, k // 2))
    size = draw(st.integers(k, 20))
    batch = draw(st.integers(0, 9))
    row_bytes = c_in * k * k * ((size + 2 * padding - k) // stride + 1) * 4
    limit = draw(st.sampled_from([256 << 20, 3 * row_bytes + 1, 12 * row_bytes]))
    return (batch, c_in, size, size), (c_out, c_in // groups, k, k), stride, padding, groups, limit


@settings(max_examples=40, deadline=None)
@given(layer=planned_layers())
def test_workspace_of_a_sweep_is_the_plans(layer):
    """For each pass, the workspace the op allocates is the one its C++ plan states (cost())."""
    x_shape, w_shape, stride, padding, groups, workspace = layer
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    args = ((stride, stride), (padding, padding), (1, 1), groups)
    c = channelconv.cost(x_shape, w_shape, stride, padding, 1, groups, workspace_limit=workspace)
    for algorithm in ("im2col", "1x1"):
        if not c.plans[algorithm].applicable:
            continue
        ops = OPS[algorithm]
        y = ops.forward(x, w, None, *args, workspace)
        for run in (lambda: ops.forward(x, w, None, *args, workspace),
                    lambda: ops.backward_input(y, w, x.shape, *args, workspace),
                    lambda: ops.backward_weight(y, x, w.shape, *args, workspace)):
            torch.ops.channelconv.reset_workspace_peak()
            run()
            assert torch.ops.channelconv.workspace_peak() == c.workspace(algorithm), (algorithm, c.plans[algorithm])


def test_plan_rejects_what_the_op_rejects():
    """The plan op runs the op's own checks: the same error, word for word."""
    bad = [((1, 6, 8, 8), (4, 4, 3, 3), 1), ((1, 6, 2, 2), (4, 6, 3, 3), 1), ((1, 6, 8, 8), (4, 3, 3, 3), 4)]
    for x_shape, w_shape, groups in bad:
        with pytest.raises((RuntimeError, ValueError)) as op_error:
            OPS["direct"].forward(torch.randn(x_shape), torch.randn(w_shape), None, (1, 1), (0, 0), (1, 1), groups)
        with pytest.raises(ValueError) as cost_error:
            channelconv.cost(x_shape, w_shape, groups=groups)
        assert str(cost_error.value) == str(op_error.value)
    x, w = torch.randn(1, 6, 8, 8), torch.randn(4, 6, 3, 3)
    with pytest.raises(ValueError) as op_error:
        OPS["1x1"].forward(x, w, None, (1, 1), (0, 0), (1, 1), 1, 1 << 20)
    assert channelconv.cost(x.shape, w.shape).plans["1x1"].why_not == str(op_error.value)


def test_plans_of_shapes_too_large_to_allocate():
    """A 2^32 x 2^32 output (padding 2^31 - 1): the plans' sizes and counts pass int64 and saturate
    (no wrap-around: the sanitizer build checks), im2col needs more than any limit, and the op
    fails on its output's allocation, as F.conv2d's would."""
    c = channelconv.cost((1, 1, 1, 1), (1, 1, 1, 1), padding=2**31 - 1)
    assert c.output_shape == (1, 1, 2**32 - 1, 2**32 - 1)
    assert c.plans["direct"].passes["forward"]["mac"] == 2**63 - 1
    assert not c.plans["im2col"].applicable and "workspace limit" in c.plans["im2col"].why_not


def test_bands_stay_cache_sized_for_narrow_gemms():
    # 64 -> 64 3x3 at 56x56 (7.2 MB of columns per image, 64 output channels: a narrow GEMM) is cut
    # into bands of rows within 2 MiB; 128 -> 128 at 28x28 (3.6 MB per image) puts two whole images
    # in one band, and at 7x7 eight 512-channel images share one band, and so one GEMM.
    narrow = channelconv.cost((8, 64, 56, 56), (64, 64, 3, 3), padding=1).plans["im2col"]
    assert (narrow.band_images, narrow.band_rows) == (1, NARROW_COLUMN_BYTES // (64 * 9 * 56 * 4))
    wide = channelconv.cost((8, 128, 28, 28), (128, 128, 3, 3), padding=1).plans["im2col"]
    assert (wide.band_images, wide.band_rows, wide.gemm_calls) == (2, 28, 4)
    small = channelconv.cost((8, 512, 7, 7), (512, 512, 3, 3), padding=1).plans["im2col"]
    assert (small.band_images, small.band_rows, small.gemm_calls) == (8, 7, 1)


def test_workspace_follows_the_limit():
    x, w = torch.randn(2, 32, 24, 24), torch.randn(16, 32, 3, 3)
    row_bytes = 32 * 9 * 24 * 4
    try:
        channelconv.set_workspace_limit(5 * row_bytes + 7)
        c = channelconv.cost(x.shape, w.shape, padding=1)
        assert c.workspace_limit == 5 * row_bytes + 7
        assert c.im2col_workspace_bytes == 5 * row_bytes and c.plans["im2col"].band_images == 1
        torch.ops.channelconv.reset_workspace_peak()
        channelconv.conv2d(x, w, None, 1, 1, algorithm="im2col")
        assert torch.ops.channelconv.workspace_peak() == 5 * row_bytes
        channelconv.set_workspace_limit(row_bytes - 1)  # not even one output row fits: im2col refuses
        c = channelconv.cost(x.shape, w.shape, padding=1)
        assert c.im2col_workspace_bytes is None and not c.plans["im2col"].applicable
        assert "workspace limit" in c.plans["im2col"].why_not
        with pytest.raises(RuntimeError, match="workspace limit"):
            channelconv.conv2d(x, w, None, 1, 1, algorithm="im2col")
    finally:
        channelconv.set_workspace_limit(256 << 20)
    assert channelconv.cost(x.shape, w.shape, padding=1, workspace_limit=3 * row_bytes).im2col_workspace_bytes \
        == 3 * row_bytes


@pytest.mark.parametrize("groups, images", [(1, 3), (2, 1)])
def test_small_maps_batch_whole_images(groups, images, limit):
    # Whole images that fit the buffer share one batched GEMM (one group only: the weight is then
    # shared as a view); with 5 images, 3 to a band, the last band holds 2.
    x = torch.randn(5, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    image_bytes = 8 * 9 * 36 * 8
    limit(3 * image_bytes + 5)
    c = channelconv.cost(x.shape, w.shape, padding=1, groups=groups, dtype=torch.float64)
    assert (c.plans["im2col"].band_images, c.workspace("im2col")) == (images, images * image_bytes)
    torch.ops.channelconv.reset_workspace_peak()
    y = channelconv.conv2d(x, w, None, 1, 1, 1, groups, algorithm="im2col")
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert torch.ops.channelconv.workspace_peak() == images * image_bytes
    ref = F.conv2d(x, w, None, 1, 1, 1, groups)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    for got, want in ((y, ref), (gx, ref_gx), (gw, ref_gw)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padding_strings_and_unbatched_input():
    x = torch.randn(5, 9, 10)
    for w_shape, padding in (((4, 5, 3, 3), "same"), ((4, 5, 4, 2), "same"), ((4, 5, 3, 3), "valid")):
        w = torch.randn(w_shape)
        c = channelconv.cost(x.shape, w_shape, 1, padding, 1)
        assert c.output_shape[1:] == tuple(F.conv2d(x, w, None, 1, padding).shape)
        assert c.forward_flops == counted_flops(lambda: F.conv2d(x.unsqueeze(0), w, None, 1, padding))


@pytest.mark.parametrize("bad", [
    dict(input_shape=(1, 6, 8, 8), weight_shape=(4, 4, 3, 3), groups=1),  # channel mismatch
    dict(input_shape=(1, 6, 8, 8), weight_shape=(4, 3, 3, 3), groups=4),  # groups do not divide
    dict(input_shape=(1, 6, 2, 2), weight_shape=(4, 6, 3, 3), groups=1),  # kernel larger than input
    dict(input_shape=(6, 8), weight_shape=(4, 6, 3, 3), groups=1),
    dict(input_shape=(1, 6, 8, 8), weight_shape=(4, 6, 3, 3), groups=0),
])
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError):
        channelconv.cost(bad["input_shape"], bad["weight_shape"], groups=bad["groups"])


def test_as_dict_is_serialisable():
    import json

    d = channelconv.cost((2, 8, 10, 10), (8, 8, 3, 3), padding=1, bias=True).as_dict()
    text = json.dumps(d)
    assert '"forward_flops"' in text and d["workspace_bytes"]["1x1"] is None and d["dtype"] == "float32"
