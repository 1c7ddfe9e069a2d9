"""Every algorithm against F.conv2d in float64: forward and the three gradients, over a
hypothesis sweep of the whole argument space (batch 0..3, channels, groups incl. depthwise,
non-square kernels, stride, every padding form, dilation, bias, unbatched, layouts)."""

from __future__ import annotations

import os

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, assert_close, f_conv2d, oracle, rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import channelconv


@dataclass
class Case:
    batch: int
    in_channels: int
    out_channels: int
    size: tuple
    kernel: tuple
    stride: tuple
    padding: object  # int, pair or 'same' / 'valid'
    dilation: tuple
    groups: int
    bias: bool
    unbatched: bool
    layout: str  # 'contiguous', 'channels_last' or 'strided' (a non-contiguous view)


def _explicit_padding(case: Case) -> tuple:
    if case.padding == "valid":
        return (0, 0)
    if case.padding == "same":  # enough to decide whether the kernel fits
        return tuple(d * (k - 1) // 2 for d, k in zip(case.dilation, case.kernel))
    return (case.padding, case.padding) if isinstance(case.padding, int) else tuple(case.padding)


@st.composite
def cases(draw, one_by_one: bool = False, wide: bool = False):
    """wide: many channels per group (4..40 out, crossing the 32-channel register tile of the
    blocked CPU kernels, which narrow cases never reach) and kernels up to 8 wide."""
    groups = draw(st.sampled_from([1, 1, 2] if wide else [1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1 and not wide
    in_per_group = 1 if depthwise else draw(st.integers(1, 20 if wide else 3))
    out_per_group = draw(st.integers(4, 40)) if wide else draw(st.integers(1, 3))
    max_tap = 8 if wide else 4
    kernel = (1, 1) if one_by_one else (draw(st.integers(1, max_tap)), draw(st.integers(1, max_tap)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding_forms = [st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3)), st.just("valid")]
    if stride == (1, 1):
        padding_forms.append(st.just("same"))
    padding = draw(st.one_of(*padding_forms))
    case = Case(
        batch=draw(st.integers(0, 3)), in_channels=groups * in_per_group, out_channels=groups * out_per_group,
        size=(0, 0), kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), unbatched=False,
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
    )
    pad = _explicit_padding(case)
    # The smallest input the dilated kernel fits in after padding, plus a few.
    extents = [d * (k - 1) + 1 - 2 * p for d, k, p in zip(dilation, kernel, pad)]
    case.size = tuple(max(1, e) + draw(st.integers(0, 6)) for e in extents)
    case.unbatched = case.batch == 1 and draw(st.booleans())
    return case


def make_tensors(case: Case, dtype, device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(hash((case.batch, case.size, case.kernel)) % 2**31)
    shape = (case.batch, case.in_channels, *case.size)
    if case.layout == "strided":  # every other column of a twice-as-wide tensor
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(case.out_channels, case.in_channels // case.groups, *case.kernel, generator=g, dtype=torch.float64)
    b = torch.randn(case.out_channels, generator=g, dtype=torch.float64) if case.bias else None
    x, w = x.to(device, dtype), w.to(device, dtype)
    if case.layout == "channels_last":
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    elif case.layout == "strided":
        x = x[..., :]  # keep the non-contiguous view
    if case.unbatched:
        x = x[0]
    b = None if b is None else b.to(device, dtype)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def check_case(case: Case, algorithm: str, dtype, device="cpu"):
    x, w, b = make_tensors(case, dtype, device)
    args = (case.stride, case.padding, case.dilation, case.groups)
    out = channelconv.conv2d(x, w, b, *args, algorithm=algorithm)
    ref = oracle(x.detach(), w.detach(), None if b is None else b.detach(), *args)
    assert out.dtype == dtype and out.device == x.device
    assert_close(out, ref, dtype, "forward")

    # The output's memory format follows F.conv2d's for the same arguments (an empty tensor has none).
    same_dtype_ref = f_conv2d(x.detach(), w.detach(), None if b is None else b.detach(), *args)
    if out.dim() == 4 and out.numel() > 0:
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert out.is_contiguous(memory_format=fmt) == same_dtype_ref.is_contiguous(memory_format=fmt), fmt

    # Gradients of <out, grad_out> against the float64 oracle's.
    # grad_out is rounded to dtype first so that the oracle sees exactly what the op sees.
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    if out.dim() == 4:  # laid out as the output, as autograd hands it to the backward (channels_last in, out)
        grad_out = torch.empty_like(out).copy_(grad_out)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref_out = oracle(leaves[0], leaves[1], leaves[2] if b is not None else None, *args)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    # The oracle on the terms' magnitudes, the scale of their rounding (conftest, CANCELLATION): needed
    # only once a gradient misses the tolerance relative to itself.
    mag_grads = None
    for i, (name, got, want) in enumerate(zip(("input", "weight", "bias"), grads, ref_grads)):
        assert got.shape == want.shape
        if mag_grads is None and rel_error(got, want) > TOLERANCE[dtype]:
            magnitudes = [t.detach().abs().requires_grad_() for t in leaves]
            mag_out = oracle(magnitudes[0], magnitudes[1], magnitudes[2] if b is not None else None, *args)
            mag_grads = torch.autograd.grad(mag_out, magnitudes, grad_out.double().abs())
        assert_close(got, want, dtype, f"grad {name}", None if mag_grads is None else mag_grads[i])


SWEEP = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("algorithm", ["direct", "im2col", "auto"])
@SWEEP
@given(case=cases())
def test_sweep_any_kernel(device, algorithm, dtype, case):
    check_case(case, algorithm, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
@SWEEP
@given(case=cases(one_by_one=True))
def test_sweep_1x1_kernel(device, algorithm, dtype, case):
    check_case(case, algorithm, dtype, device)


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sweep_wide_channels(device, algorithm, data):
    check_case(data.draw(cases(one_by_one=algorithm == "1x1", wide=True)), algorithm, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sweep_half_precision(device, algorithm, dtype, data):
    check_case(data.draw(cases(one_by_one=algorithm == "1x1")), algorithm, dtype, device)


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_realistic_layer(device, algorithm):
    """One mid-sized layer with many channels, so the GEMMs and parallel loops do real work."""
    k = 1 if algorithm == "1x1" else 3
    case = Case(batch=3, in_channels=48, out_channels=40, size=(17, 15), kernel=(k, k), stride=(1, 1),
                padding=k // 2, dilation=(1, 1), groups=1, bias=True, unbatched=False, layout="contiguous")
    check_case(case, algorithm, torch.float32, device)
    case.stride, case.groups = (2, 2), 4
    check_case(case, algorithm, torch.float32, device)


@pytest.mark.parametrize("out_w", [1, 2, 3, 4, 5, 7, 8, 13, 14, 15, 29])
@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), 1, (1, 1)), ((2, 1), (1, 1), 0, (1, 1)), ((1, 1), (1, 1), 0, (1, 1)),
    ((3, 3), (2, 2), 1, (1, 1)), ((3, 3), (3, 3), 1, (1, 1)), ((3, 3), (1, 1), 2, (2, 2))])
def test_direct_tile_plans(device, out_w, kernel, stride, padding, dilation):
    """Every way the blocked direct kernel tiles a task (csrc/cpu/blocked_forward.cpp, plan_tiles):
    rows cut into equal pieces of up to 14 pixels, or rows of at most 7 pixels grouped 2 to 4 to a
    tile (same kernel-row range, or the union when a group is left short), at stride 1, 2
    (constant-stride tiles)
    and 3 (any stride), with border rows that read different kernel rows; 33 output channels (a
    full and a partial block), forward and both gradients (the input gradient runs the same kernel)."""
    in_w = (out_w - 1) * stride[1] + dilation[1] * (kernel[1] - 1) + 1 - 2 * padding
    case = Case(batch=3, in_channels=5, out_channels=33, size=(7, max(1, in_w)), kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, groups=1, bias=True, unbatched=False, layout="contiguous")
    check_case(case, "direct", torch.float32, device)


@pytest.mark.parametrize("size", [3, 5, 8, 17])
@pytest.mark.parametrize("stride", [1, 2])
def test_direct_tiles_write_channels_last_outputs_from_registers(device, size, stride):
    """A float32 channels_last output takes each full 32-channel block straight from the tile's
    registers (blocked_forward.cpp, run_block): the forward pass's 64 channels, and the input
    gradient's 32, which at stride 2 writes every second pixel of each phase; on maps whose rows
    share tiles (3, 5) and maps cut into pieces (17), with the strips' segments crossing images."""
    case = Case(batch=3, in_channels=32, out_channels=64, size=(size, size), kernel=(3, 3), stride=(stride, stride),
                padding=1, dilation=(1, 1), groups=1, bias=True, unbatched=False, layout="channels_last")
    check_case(case, "direct", torch.float32, device)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("size", [3, 4])
def test_direct_splits_channel_blocks_when_tasks_are_few(device, threads, size):
    """A small map at batch 1 fills one or two tiles' rows: fewer tasks than twice the threads,
    which the blocked kernel makes up by splitting each task's channel blocks (70 output channels:
    three blocks, a partial one; the parts differ by thread count), forward and both gradients
    (the input gradient's 70 channels too)."""
    case = Case(batch=1, in_channels=70, out_channels=70, size=(size, size), kernel=(3, 3), stride=(1, 1), padding=1,
                dilation=(1, 1), groups=1, bias=True, unbatched=False, layout="contiguous")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        forward = channelconv.cost((1, 70, size, size), (70, 70, 3, 3), 1, 1).plans["direct"].passes["forward"]
        if forward["blocked"]:
            assert forward["tasks"] <= 2
        check_case(case, "direct", torch.float32, device)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("out_w", [1, 7, 13, 14, 15, 27, 28, 29, 56])
@pytest.mark.parametrize("out_channels, groups", [(6, 1), (16, 1), (12, 2)])
def test_direct_narrow_tile_plans(device, out_w, out_channels, groups):
    """Narrow tiles (at most 16 output channels per group: 16 channels x up to 28 pixels): rows cut
    into pieces of up to 28 pixels or paired up to 14, at stride 1 and 2; a partial block; groups;
    forward and both gradients (the input gradient of 5 input channels per group runs them too)."""
    for stride in (1, 2):
        in_w = (out_w - 1) * stride + 3 - 2
        case = Case(batch=2, in_channels=5 * groups, out_channels=out_channels, size=(6, in_w), kernel=(3, 3),
                    stride=(stride, stride), padding=1, dilation=(1, 1), groups=groups, bias=True, unbatched=False,
                    layout="contiguous")
        check_case(case, "direct", torch.float32, device)
        c = channelconv.cost((2, 5 * groups, 6, in_w), (out_channels, 5, 3, 3), stride, 1, 1, groups)
        forward = c.plans["direct"].passes["forward"]
        if forward["blocked"]:  # the tiles pad each group's channels to 16, not 32
            assert forward["mac"] * (out_channels // groups) == c.macs * 16


@pytest.mark.parametrize("out_w", [1, 15, 16, 17, 33])
@pytest.mark.parametrize("in_channels, out_channels, groups", [(1, 1, 1), (1, 6, 1), (2, 15, 1), (6, 12, 3)])
@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((5, 5), (1, 1), 2, (1, 1)), ((1, 1), (1, 1), 0, (1, 1)), ((7, 7), (1, 1), 3, (1, 1)), ((3, 2), (2, 1), 1, (2, 3)),
    ((3, 3), (2, 2), 1, (1, 1)), ((5, 4), (1, 3), 2, (1, 2))])
def test_row_weight_grad_plans(device, out_w, in_channels, out_channels, groups, kernel, stride, padding, dilation):
    """The weight gradient along output rows (fewer than 16 output channels per group, rows that
    fill their vectors better than the channels would fill a narrow tile): rows shorter and longer
    than a vector (a masked last one), padding columns and rows, dilation, strides 2 and 3 along
    the row (input rows in phases), row stride 2, blocks of output channels (15 in two), groups;
    forward and both gradients against F.conv2d."""
    in_w = (out_w - 1) * stride[1] + dilation[1] * (kernel[1] - 1) + 1 - 2 * padding
    if in_w < 1:
        pytest.skip("no input that wide")
    case = Case(batch=3, in_channels=in_channels, out_channels=out_channels, size=(7, in_w), kernel=kernel,
                stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False, unbatched=False,
                layout="contiguous")
    check_case(case, "direct", torch.float32, device)
    c = channelconv.cost((3, in_channels, 7, in_w), (out_channels, in_channels // groups, *kernel), stride, padding,
                         dilation, groups)
    weight_grad = c.plans["direct"].passes["weight_grad"]
    rows_fill_vectors = out_w in (15, 16) or out_channels // groups == 1  # beyond what a narrow tile fills
    if weight_grad["blocked"] and device == "cpu" and rows_fill_vectors:  # AVX-512: the row engine
        assert weight_grad["chunks"] == 0 and weight_grad["tasks"] % in_channels == 0
        assert weight_grad["output"] == out_channels * (in_channels // groups) * kernel[0] * kernel[1]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, padding", [
    (1, 6, (5, 5), (1, 1), 2), (3, 8, (3, 3), (2, 2), 1), (6, 15, (3, 3), (1, 1), 1)])
def test_row_weight_grad_layouts_and_dtypes(device, layout, dtype, in_channels, out_channels, kernel, stride,
                                            padding):
    """The row engine reads each unit's input plane and dy block in either layout and dtype into
    float32 rows (no whole copy): a stride-1 and a stride-2 row, one and 15 output channels'
    blocks; forward and both gradients against F.conv2d, and the plan runs the row engine."""
    case = Case(batch=3, in_channels=in_channels, out_channels=out_channels, size=(9, 16), kernel=kernel,
                stride=stride, padding=padding, dilation=(1, 1), groups=1, bias=False, unbatched=False,
                layout=layout)
    check_case(case, "direct", dtype, device)
    weight_grad = channelconv.cost((3, in_channels, 9, 16), (out_channels, in_channels, *kernel), stride, padding,
                                   dtype=dtype).plans["direct"].passes["weight_grad"]
    if device == "cpu" and weight_grad["blocked"]:  # AVX-512: the row engine (no chunks)
        assert weight_grad["chunks"] == 0 and weight_grad["tasks"] % in_channels == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, padding", [
    (1, 24, (11, 11), (4, 4), 1),   # AlexNet's first layer, narrowed: 24 channels in 2-channel blocks
    (16, 17, (11, 9), (2, 2), 4),  # many input channels at a stride, a last block of one channel
    (2, 40, (15, 8), (1, 3), 3),   # the widest row the engine takes; stride 3 along the row
])
def test_row_weight_grad_takes_rows_wider_than_the_blocked_tile(device, dtype, in_channels, out_channels, kernel,
                                                                 stride, padding):
    """Kernel rows wider than the blocked weight-gradient tile's 7 taps ran the plain loops; the row
    engine takes them at any channel count, holding the dy vectors where they are fewer than the
    taps, each unit running several blocks on one copy of its input plane."""
    case = Case(batch=3, in_channels=in_channels, out_channels=out_channels, size=(30, 37), kernel=kernel,
                stride=stride, padding=padding, dilation=(1, 1), groups=1, bias=False, unbatched=False,
                layout="contiguous")
    check_case(case, "direct", dtype, device)
    weight_grad = channelconv.cost((3, in_channels, 30, 37), (out_channels, in_channels, *kernel), stride, padding,
                                   dtype=dtype).plans["direct"].passes["weight_grad"]
    if device == "cpu" and weight_grad["blocked"]:  # AVX-512: the row engine (no chunks)
        assert weight_grad["chunks"] == 0 and weight_grad["mac"] > 0


# Whether this CPU runs AMX tiles (bfloat16 layers of one group, csrc/cpu/amx.cpp).
AMX = all(f in open("/proc/cpuinfo").read() for f in ("amx_tile", "amx_bf16", "avx512_bf16")) \
    if os.path.exists("/proc/cpuinfo") else False


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch, in_channels, out_channels, size, kernel, stride, padding, dilation", [
    (2, 64, 64, (14, 14), (3, 3), 1, 1, (1, 1)),     # whole 32-channel steps and blocks
    (3, 12, 9, (9, 11), (3, 3), 1, 1, (1, 1)),       # channels padded to 32, outputs to 32
    (1, 40, 50, (7, 7), (5, 5), 1, 2, (1, 1)),       # a second, partial step and block; a 7x7 map
    (2, 33, 17, (8, 13), (3, 3), 1, 2, (2, 2)),      # dilation; rows of 13 in the padded width's grid
    (2, 3, 64, (20, 20), (7, 7), 1, 3, (1, 1)),      # an RGB stem
    (2, 16, 8, (6, 6), (1, 1), 1, 0, (1, 1)),        # 1x1, no padding
    (1, 8, 40, (1, 37), (1, 3), 1, (0, 1), (1, 1)),  # one row: blocks of 32 pixels cross the row's end
    (1, 32, 40, (3, 70), (3, 3), 1, 1, (1, 1)),      # rows of 48 or more: NCHW stored from a transpose
    (1, 16, 40, (32, 32), (3, 3), 1, 1, (1, 1)),     # 2 KB planes: blocks of over 16 outputs transposed too
    # Strided, split into the input's phases:
    (2, 64, 64, (14, 14), (3, 3), 2, 1, (1, 1)),     # 2 x 2 phases of whole blocks: phantom taps skipped
    (2, 32, 40, (15, 13), (3, 3), 2, 1, (1, 1)),     # odd sizes: phases of unequal extent
    (2, 3, 40, (21, 20), (7, 7), 2, 3, (1, 1)),      # the stem: four phases in one block of 32 channels
    (1, 32, 16, (23, 23), (11, 11), 4, 2, (1, 1)),   # 16 phases (AlexNet's first layer)
    (2, 16, 32, (9, 12), (3, 2), (2, 1), (1, 0), (1, 1)),  # strided one way only
    (1, 32, 32, (9, 9), (4, 4), 2, 0, (1, 1)),       # the last input row and column reach no output
])
def test_amx_forward(device, layout, batch, in_channels, out_channels, size, kernel, stride, padding, dilation):
    """The bfloat16 forward on AMX tiles (where the CPU has them; elsewhere these run the blocked
    engine), the input gradient as the same correlation with the weight flipped and transposed, and
    the weight gradient as a GEMM over pixel pairs: padded channels and outputs, the wide grid's
    dropped pixels, dilation, strided layers over their input's phases, both layouts, a bias;
    forward and both gradients against F.conv2d in float64, and the plan runs AMX for all three
    (the weight gradient, or for the smallest layers (csrc/plan.h, runs_amx_weight_grad) one of the
    blocked engines; a strided input gradient where no block of 32 channels mixes phases)."""
    stride = (stride, stride) if isinstance(stride, int) else stride
    case = Case(batch=batch, in_channels=in_channels, out_channels=out_channels, size=size, kernel=kernel,
                stride=stride, padding=padding, dilation=dilation, groups=1, bias=True, unbatched=False,
                layout=layout)
    check_case(case, "direct", torch.bfloat16, device)
    passes = channelconv.cost((batch, in_channels, *size), (out_channels, in_channels, *kernel), stride, padding,
                              dilation, dtype=torch.bfloat16).plans["direct"].passes
    forward, input_grad, weight_grad = (passes[name] for name in ("forward", "input_grad", "weight_grad"))
    mixed_phases = stride != (1, 1) and in_channels % 32 != 0
    if AMX:  # (the weight gradient: AMX, or a blocked engine, never the plain loops)
        assert forward["mac_amx"] > 0 and (weight_grad["mac_amx"] > 0 or weight_grad["blocked"])
        assert (input_grad["mac_amx"] > 0) == (not mixed_phases)
    else:
        assert forward["mac_amx"] == input_grad["mac_amx"] == weight_grad["mac_amx"] == 0


def test_amx_strided_is_exact_beside_non_finite_values():
    """A strided layer on AMX multiplies its split input by phantom taps' zero weights; where a block
    of 32 channels mixes phases (3 channels, four phases) those products cannot be skipped, and an
    Inf would make NaNs F.conv2d does not. Such inputs take the other engines: the same non-finite
    outputs as float64 F.conv2d, and the same values elsewhere. With whole blocks of one phase the
    phantom taps are skipped, on AMX, in the forward and in the input gradient (an Inf in dy)."""
    g = torch.Generator().manual_seed(0)
    for in_channels in (3, 32):
        x = torch.randn(2, in_channels, 21, 20, generator=g).to(torch.bfloat16)
        w = torch.randn(8, in_channels, 7, 7, generator=g).to(torch.bfloat16)
        x[1, 2, 10, 9] = float("inf")
        got = channelconv.conv2d(x, w, stride=2, padding=3, algorithm="direct")
        want = torch.nn.functional.conv2d(x.double(), w.double(), stride=2, padding=3)
        assert torch.equal(got.isfinite(), want.isfinite()) and not want.isfinite().all()
        finite = want.isfinite()
        assert_close(got[finite], want[finite], torch.bfloat16, "output")
        passes = channelconv.cost(x.shape, w.shape, 2, 3, dtype=torch.bfloat16).plans["direct"].passes
        assert (passes["forward"]["mac_amx"] > 0) == AMX
    # The input gradient (blocks of one phase only): an Inf in dy meets no phantom tap.
    assert (passes["input_grad"]["mac_amx"] > 0) == AMX
    dy = torch.randn(2, 8, 11, 10, generator=g).to(torch.bfloat16)
    dy[1, 3, 5, 4] = float("inf")
    got = torch.ops.channelconv.direct_backward_input(dy, w, list(x.shape), [2, 2], [3, 3], [1, 1], 1)
    x64 = torch.zeros(x.shape, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(torch.nn.functional.conv2d(x64, w.double(), stride=2, padding=3), x64, dy.double())[0]
    assert torch.equal(got.isfinite(), want.isfinite()) and not want.isfinite().all()
    finite = want.isfinite()
    assert_close(got[finite], want[finite], torch.bfloat16, "input")


def test_amx_declines_tiles_mostly_padding():
    """Channels pad to 32 both ways on AMX tiles: where under 1/16 of the products are real the
    blocked engine runs. Layers of at most 16 input channels fold taps into a tile row (csrc/plan.h,
    AmxGeometry): 3 -> 16 and 6 -> 16 5x5 take one step a kernel row (23 % and 47 % real) and run on
    AMX; 1 -> 6 (3 %) does not, nor any layer of one input channel (1 -> 16: 8 %, its input copied
    32-fold); the same 3 -> 16 with dilation cannot fold (5 %)."""
    def amx(in_channels, out_channels, dilation=1):
        return channelconv.cost((2, in_channels, 10, 10), (out_channels, in_channels, 5, 5), 1, 2, dilation,
                                dtype=torch.bfloat16).plans["direct"].passes["forward"]["mac_amx"] > 0
    assert not amx(1, 6) and not amx(1, 16) and not amx(3, 16, dilation=2)
    assert amx(3, 16) == AMX and amx(6, 16) == AMX


def test_amx_folded_forward_is_exact_beside_non_finite_values():
    """A folded step (16 channels: taps 2 and 3 of a 3x3 kernel row, the fourth a zero weight) meets
    pixels no real product reads; beside an Inf those would make NaNs float64 F.conv2d does not.
    Such inputs run unfolded: the same non-finite outputs, the same values elsewhere, in the forward
    and in the input gradient (16 outputs: its correlation folds too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 11, generator=g).to(torch.bfloat16)
    w = torch.randn(16, 16, 3, 3, generator=g).to(torch.bfloat16)
    x[1, 5, 4, 6] = float("inf")
    got = channelconv.conv2d(x, w, padding=1, algorithm="direct")
    want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert torch.equal(got.isfinite(), want.isfinite()) and not want.isfinite().all()
    assert_close(got[want.isfinite()], want[want.isfinite()], torch.bfloat16, "output")
    dy = torch.randn(2, 16, 9, 11, generator=g).to(torch.bfloat16)
    dy[0, 3, 2, 2] = float("-inf")
    got = torch.ops.channelconv.direct_backward_input(dy, w, list(x.shape), [1, 1], [1, 1], [1, 1], 1)
    x64 = torch.zeros(x.shape, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(torch.nn.functional.conv2d(x64, w.double(), padding=1), x64, dy.double())[0]
    assert torch.equal(got.isfinite(), want.isfinite()) and not want.isfinite().all()
    assert_close(got[want.isfinite()], want[want.isfinite()], torch.bfloat16, "input")
    passes = channelconv.cost(x.shape, w.shape, 1, 1, dtype=torch.bfloat16).plans["direct"].passes
    assert (passes["forward"]["mac_amx"] > 0) == AMX and (passes["input_grad"]["mac_amx"] > 0) == AMX


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("in_channels, out_channels", [(40, 64), (16, 32), (32, 16)])
def test_amx_weight_grad_is_exact_beside_non_finite_inputs_and_thread_independent(layout, in_channels,
                                                                                   out_channels):
    """The AMX weight gradient sums the wide grid's dropped pixels as dy = 0 times the x they meet,
    an x no real product of that tap reads: an Inf there would make a NaN F.conv2d does not. Its
    copy of x checks, and such inputs take the other engine: every dW element finite where float64
    F.conv2d's is, and the same elsewhere. Its units split taps by thread count; each sum runs in
    the same order whatever the split (1, 2 and 3 threads give the same bits). 40 -> 64 runs
    32 x 32 blocks; 16 -> 32 and 32 -> 16 the narrow 16 x 16 tiles with up to four taps in the
    accumulators (both halves of a 32-channel block on each side)."""
    g = torch.Generator().manual_seed(0)
    memory_format = getattr(torch, layout + "_format", torch.channels_last)
    x = torch.randn(2, in_channels, 12, 13, generator=g).to(torch.bfloat16).contiguous(memory_format=memory_format)
    dy = torch.randn(2, out_channels, 12, 13, generator=g).to(torch.bfloat16).contiguous(memory_format=memory_format)
    args = ([out_channels, in_channels, 3, 3], [1, 1], [1, 1], [1, 1], 1)
    plan = channelconv.cost((2, in_channels, 12, 13), args[0], 1, 1, dtype=torch.bfloat16).plans["direct"]
    assert (plan.passes["weight_grad"]["mac_amx"] > 0) == AMX

    def reference(x):
        w = torch.zeros(args[0], dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.conv2d(x.double(), w, None, 1, 1)
        return torch.autograd.grad(y, w, dy.double())[0]

    before = torch.get_num_threads()
    try:
        grads = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads.append(torch.ops.channelconv.direct_backward_weight(dy, x, *args))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert_close(grads[0], reference(x), torch.bfloat16, "weight")

    x[1, 5, 3, 12] = float("inf")  # the last column: tap column 0 never reads it, a dropped pixel does
    got, want = torch.ops.channelconv.direct_backward_weight(dy, x, *args), reference(x)
    assert torch.equal(got.isfinite(), want.isfinite()) and not want.isfinite().all()
    finite = want.isfinite()
    assert_close(got[finite], want[finite], torch.bfloat16, "weight")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_channels, out_channels, groups, kernel, stride, padding, dilation", [
    (20, 40, 1, (3, 3), (1, 1), 1, (1, 1)),     # 32-channel tiles, a partial second block
    (7, 12, 1, (5, 5), (2, 2), 2, (1, 1)),      # narrow tiles, an odd channel count, stride-2 gradient phases
    (10, 10, 2, (3, 2), (1, 2), (1, 0), (2, 1)),  # groups of 5 channels (pairs cross no group), dilation
    (33, 36, 1, (1, 1), (1, 1), 0, (1, 1)),     # 1x1 steps
])
def test_blocked_engines_layouts_and_dtypes(device, layout, dtype, in_channels, out_channels, groups, kernel, stride,
                                            padding, dilation):
    """The blocked correlation and weight gradient read NCHW and channels_last operands in float32,
    bfloat16 and float16 where they lie and convert on the rows they copy (csrc/cpu/activations.h);
    bfloat16 runs in channel pairs (the weight gradient in pixel pairs) where the CPU's dot product
    pays (csrc/plan.h, bf16_pairs_pay), the same way in all three passes; other dtypes never do
    (tests/test_portable.py forces each way). Forward and both gradients
    against F.conv2d in float64 within the dtype's tolerance, in F.conv2d's memory formats."""
    case = Case(batch=3, in_channels=in_channels, out_channels=out_channels, size=(9, 11), kernel=kernel,
                stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True, unbatched=False,
                layout=layout)
    check_case(case, "direct", dtype, device)
    passes = channelconv.cost((3, in_channels, 9, 11), (out_channels, in_channels // groups, *kernel), stride,
                              padding, dilation, groups, dtype=dtype).plans["direct"].passes
    if device == "cpu" and passes["forward"]["blocked"]:  # an AVX-512 CPU
        names = ("forward", "input_grad", "weight_grad")  # (odd and even rows: 11 and 6 output columns)
        assert all(passes[name]["blocked"] for name in names)
        pairs = {passes[name]["pairs"] for name in names}
        assert len(pairs) == 1 and (dtype == torch.bfloat16 or pairs == {0}), pairs


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [16, 17, 40])
@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), 1, 1, 1), ((5, 5), 2, 2, 1), ((7, 7), 1, 3, 1), ((3, 3), 2, 1, 1), ((3, 3), 1, 2, 2), ((1, 1), 1, 0, 1),
    ((2, 3), 2, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_depthwise_engine(device, dtype, layout, channels, kernel, stride, padding, dilation):
    """The depthwise engine (16 channels of an image at a time): full and partial channel blocks,
    kernels of 1 to 49 taps, stride-2 gradients by phase (taps 2x2, 2x1, 1x2, 1x1), dilation, small
    maps; forward and both gradients, in each dtype. channels_last runs the forward and the stride-1
    input gradient from tensor to tensor through rings of converted rows, in groups of 8 pixels and
    single ones (7 columns: none of 8; 9 rows of a 3x3 kernel: every row of the ring reused), and a
    3x3 or 5x5 weight gradient where the vectors lie (depthwise.cpp)."""
    case = Case(batch=3, in_channels=channels, out_channels=channels, size=(9, 7), kernel=kernel,
                stride=(stride, stride), padding=padding, dilation=(dilation, dilation), groups=channels, bias=True,
                unbatched=False, layout=layout)
    check_case(case, "direct", dtype, device)
    plan = channelconv.cost((3, channels, 9, 7), (channels, 1, *kernel), stride, padding, dilation, channels).plans
    if plan["direct"].passes["forward"]["blocked"]:  # AVX-512: the engine runs both correlations
        assert plan["direct"].passes["forward"]["depthwise"] and plan["direct"].passes["input_grad"]["depthwise"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_depthwise_channels_last_is_thread_independent(dtype):
    """The channels_last depthwise engine splits rows into bands and channel blocks into groups by
    the thread count, and sums the weight gradient in slices of images fixed by the shape: the same
    bits at 1, 2 and 3 threads, in all three passes, on rows of 8 pixels and more (@20 x 19; the
    weight gradient in 3 slices of 80 rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 40, 20, 19, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 1, 3, 3, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(12, 40, 20, 19, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    ops, args = torch.ops.channelconv, ([1, 1], [1, 1], [1, 1], 40)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((ops.direct_forward(x, w, None, *args), ops.direct_backward_input(dy, w, list(x.shape), *args),
                            ops.direct_backward_weight(dy, x, list(w.shape), *args)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("batch", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_direct_weight_grad_with_a_stride_past_the_row(batch, dtype):
    """A fuzz draw: stride 2^31 - 1 along a 1-pixel row, 3 groups of one output channel. The row
    weight-gradient engine copies each padded row rounded up to whole strides, and asked for an
    8 GB row (std::bad_alloc); it takes such layers no more (csrc/plan.cpp, runs_row_weight_grad)."""
    x = torch.randn(batch, 9, 4, 1, dtype=torch.float64)
    w = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    args = ((1, 2**31 - 1), (3, 1), 1, 3)
    dy = torch.randn(f_conv2d(x, w, None, *args).shape, dtype=torch.float64)
    w_ref = w.clone().requires_grad_()
    f_conv2d(x, w_ref, None, *args).backward(dy)
    got = torch.ops.channelconv.direct_backward_weight(dy.to(dtype), x.to(dtype), list(w.shape), list(args[0]),
                                                       list(args[1]), [1, 1], 3)
    assert_close(got, w_ref.grad, dtype, "grad_weight")


@pytest.mark.parametrize("algorithm", ["1x1", "im2col"])
def test_half_precision_weight_grad_sums_images_in_float(device, algorithm):
    """A hypothesis draw whose two images' weight gradients nearly cancel: rounding each image's
    product to bfloat16 before the sum over images left a 9 % error (csrc/lowered.cpp sums in float)."""
    case = Case(batch=2, in_channels=1, out_channels=1, size=(3, 6), kernel=(1, 1), stride=(1, 1), padding="valid",
                dilation=(1, 1), groups=1, bias=False, unbatched=False, layout="strided")
    check_case(case, algorithm, torch.bfloat16, device)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("algorithm, size, kernel, stride, padding", [
    ("im2col", 7, 3, 1, 1), ("im2col", 14, 1, 2, 0), ("1x1", 14, 1, 2, 0), ("1x1", 5, 1, 1, 1)])
def test_side_by_side_bands(algorithm, size, kernel, stride, padding, dtype, layout, limit):
    """Small maps on the CPU: whole images side by side in one column matrix, one GEMM per band and
    pass with a scratch of outputs or output gradients (csrc/conv_params.h, BandPlan). Nine images
    of 7x7 outputs with a limit that holds four: bands of 4, 4 and a ragged 1; with a bias.
    channels_last data runs the NHWC driver instead, whose bands stack whole images with no scratch."""
    case = Case(batch=9, in_channels=12, out_channels=20, size=(size, size), kernel=(kernel, kernel),
                stride=(stride, stride), padding=padding, dilation=(1, 1), groups=1, bias=True, unbatched=False,
                layout=layout)
    shapes = ((9, 12, size, size), (20, 12, kernel, kernel), stride, padding)
    image_bytes = (12 * kernel * kernel + 20) * 49 * dtype.itemsize  # columns and scratch, 7x7 pixels
    limit(4 * image_bytes + 1)
    plan = channelconv.cost(*shapes, dtype=dtype).plans[algorithm]
    assert plan.side_by_side and plan.band_images == 4 and plan.workspace_bytes == 4 * image_bytes
    assert not channelconv.cost(*shapes, dtype=dtype, device="cuda").plans[algorithm].side_by_side
    if layout == "channels_last":
        plan = channelconv.cost(*shapes, dtype=dtype, memory_format=torch.channels_last).plans[algorithm]
        columns_bytes = 12 * kernel * kernel * 49 * dtype.itemsize  # an image's columns, no scratch
        assert plan.nhwc and not plan.side_by_side and plan.band_images == min(9, (4 * image_bytes + 1) // columns_bytes)
        assert plan.workspace_bytes == plan.band_images * columns_bytes
    torch.ops.channelconv.reset_workspace_peak()
    check_case(case, algorithm, dtype)
    if layout == "channels_last":  # the forward's workspace alone (the gradients' runs may take other drivers)
        x, w, b = make_tensors(case, dtype, "cpu")
        torch.ops.channelconv.reset_workspace_peak()
        channelconv.conv2d(x, w, b, case.stride, case.padding, algorithm=algorithm)
    assert torch.ops.channelconv.workspace_peak() == plan.workspace_bytes


@pytest.mark.parametrize("shape", [((8, 64, 56, 56), (64, 64, 3, 3), 1, 1), ((8, 128, 28, 28), (128, 128, 3, 3), 1, 1),
                                   ((8, 256, 14, 14), (256, 256, 3, 3), 1, 1)])
def test_gpu_bands_take_whole_batches(shape):
    """On the GPU, whose memory streams columns at terabytes a second and which pays per launch,
    im2col's bands take all the workspace limit allows: ResNet-50's layers at batch 8 run each pass
    as one batched GEMM (the CPU's bands stay near its L2 and run one per image or band of rows).
    The CUDA band kernels' code runs on this plan in csrc/testing/emulate_kernels.py."""
    gpu = channelconv.cost(*shape, dtype=torch.float32, device="cuda").plans["im2col"]
    cpu = channelconv.cost(*shape, dtype=torch.float32).plans["im2col"]
    assert gpu.band_images == 8 and gpu.gemm_calls == 1 and cpu.gemm_calls > 1
    assert 0 < gpu.workspace_bytes <= channelconv.get_workspace_limit()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("band_rows", [1, 2, 4])
def test_col2im_writes_all_of_dx_without_a_zero_fill(layout, dtype, band_rows, limit):
    """im2col's input gradient allocates dx uninitialised: an image's first band of rows writes all
    of it, inputs no tap reads included (stride 3 > kernel 2 here), and later bands add to it; with
    one band per image (4 rows) dx is written once, in its own dtype. Under
    use_deterministic_algorithms torch fills uninitialised memory with NaN, so an element left
    unwritten shows."""
    x = torch.randn(3, 6, 11, 10, dtype=torch.float64)
    w = torch.randn(5, 6, 2, 2, dtype=torch.float64)
    dy = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x_, w_, dy_ = (t.to(dtype).contiguous(memory_format=memory_format) for t in (x, w, dy))
    column_row = 6 * 2 * 2 * 4 * dtype.itemsize  # an output row's columns, one image
    limit(band_rows * column_row)
    plan = channelconv.cost(x.shape, w.shape, 3, 1, dtype=dtype, memory_format=memory_format).plans["im2col"]
    assert plan.band_rows == band_rows
    x_ref = x.clone().requires_grad_()
    f_conv2d(x_ref, w, None, 3, 1).backward(dy)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = torch.ops.channelconv.im2col_backward_input(dy_, w_, list(x.shape), [3, 3], [1, 1], [1, 1], 1,
                                                          channelconv.get_workspace_limit())
    finally:
        torch.use_deterministic_algorithms(before)
    assert got.dtype == dtype
    assert_close(got, x_ref.grad, dtype, "grad_input")
