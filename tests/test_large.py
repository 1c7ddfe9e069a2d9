"""64-bit indexing (marked `large`): correct results when the input, the output or im2col's column
buffer holds more than 2^31 elements. bfloat16 keeps each big tensor near 4-5 GB; the values are
small integers, so every sum the kernels make is exact in bfloat16 (and float32 accumulation) and
outputs are compared for equality with a float64 computation of the sampled outputs alone
(gathered from the input by index in Python, never a full F.conv2d).

Each test needs several GB and a few seconds to tens of seconds; it is skipped when the machine's
available memory cannot hold it with room to spare (so CI runs it where it fits)."""

from __future__ import annotations

import pytest
import torch

import channelconv
from channelconv._ops import OPS, TAKES_WORKSPACE

pytestmark = pytest.mark.large

GiB = 1 << 30
BIG = 2**31


def available_bytes() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


def needs(nbytes: int):
    """Skip unless `nbytes` plus 4 GiB of room (for the rest of the machine) is available now."""
    have = available_bytes()
    if have < nbytes + 4 * GiB:
        pytest.skip(f"needs {(nbytes + 4 * GiB) / GiB:.1f} GiB available, the machine has {have / GiB:.1f} GiB")


def small_ints(shape, low, high, seed):
    """A bfloat16 tensor of integers in [low, high) (exact in bfloat16). Big ones tile a random
    block of a prime length (1,000,003), which no offset error of a power of two lines up with;
    filling 2^31 elements by the block copies in a fraction of the time random_ would take."""
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    period = 1_000_003
    if numel <= period:
        return torch.randint(low, high, shape, generator=g).to(torch.bfloat16)
    block = torch.randint(low, high, (period,), generator=g).to(torch.bfloat16)
    t = torch.empty(numel, dtype=torch.bfloat16)
    whole = numel // period
    t[: whole * period].view(whole, period).copy_(block)
    t[whole * period:] = block[: numel - whole * period]
    return t.view(shape)


def gather_taps(x, kernel, stride, padding, dilation, n, ho, wo):
    """The input values each tap of outputs (n, ho, wo) reads, as float64 (samples, C, k_h, k_w),
    0 in the padding, gathered by index (64-bit index arithmetic in ATen's indexing); and the
    largest input offset any of them reads."""
    _, channels, height, width = x.shape
    shape = (n.numel(), channels, *kernel)
    c = torch.arange(channels).view(1, -1, 1, 1).expand(shape)
    hi = (ho * stride[0] - padding[0]).view(-1, 1, 1, 1) + torch.arange(kernel[0]).view(1, 1, -1, 1) * dilation[0]
    wi = (wo * stride[1] - padding[1]).view(-1, 1, 1, 1) + torch.arange(kernel[1]).view(1, 1, 1, -1) * dilation[1]
    inside = ((hi >= 0) & (hi < height) & (wi >= 0) & (wi < width)).expand(shape)
    hi, wi = hi.clamp(0, height - 1).expand(shape), wi.clamp(0, width - 1).expand(shape)
    values = x[n.view(-1, 1, 1, 1).expand(shape), c, hi, wi].double() * inside
    offsets = ((n.view(-1, 1, 1, 1) * channels + c) * height + hi) * width + wi
    return values, int(offsets[inside].max())


def run_algorithm(algorithm, x, w, b, stride, padding, dilation):
    extra = (channelconv.get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
    return OPS[algorithm].forward(x, w, b, stride, padding, dilation, 1, *extra)


def test_input_past_2_31_elements():
    """Input (1, 2, 34000, 34000): 2.31e9 elements; channel 1's last 4000 rows lie past offset
    2^31. A strided, dilated, padded 2x3 kernel (and a strided 1x1 one) samples it down to a
    small output whose last row and column read the input's last row and column; every
    algorithm's output and weight gradient must match the gathered float64 values."""
    shape = (1, 2, 34000, 34000)
    assert torch.Size(shape).numel() > BIG
    needs(torch.Size(shape).numel() * 2 + GiB)
    x = small_ints(shape, -4, 4, seed=1)
    w = small_ints((3, 2, 2, 3), -2, 3, seed=2)
    b = small_ints((3,), -2, 3, seed=3)
    # (34000 + 2*1 - 4) = 89 * 382 and (34000 + 2*2 - 11) = 27 * 1259; 33999 = 21 * 1619 = 7 * 4857.
    cases = [((382, 1259), (1, 2), (3, 5), w), ((1619, 4857), (0, 0), (1, 1), w[:, :, :1, :1].contiguous())]
    for stride, padding, dilation, weight in cases:
        one_by_one = tuple(weight.shape[2:]) == (1, 1)
        for algorithm in [a for a in channelconv.ALGORITHMS if a != "1x1" or one_by_one]:
            y = run_algorithm(algorithm, x, weight, b, stride, padding, dilation)
            n, k, ho, wo = (i.flatten() for i in torch.meshgrid(*(torch.arange(d) for d in y.shape), indexing="ij"))
            taps, last_offset = gather_taps(x, weight.shape[2:], stride, padding, dilation, n, ho, wo)
            assert last_offset > torch.Size(shape).numel() - 34000 * 4  # the outputs read the input's last rows
            ref = (taps * weight[k].double()).sum((1, 2, 3)) + b[k].double()
            assert torch.equal(y.flatten().double(), ref), f"{algorithm}, stride={stride}: forward differs"

            # Weight gradient: dW[k, c, r, s] = sum over outputs of dy * x[...] (x read past 2^31 again).
            dy = small_ints(y.shape, -1, 2, seed=4)
            extra = (channelconv.get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
            dw = OPS[algorithm].backward_weight(dy, x, list(weight.shape), stride, padding, dilation, 1, *extra)
            ref_dw = torch.zeros(weight.shape, dtype=torch.float64).index_add_(
                0, k, taps * dy.flatten().double().view(-1, 1, 1, 1))
            # dW's sums reach a few hundred: bfloat16 rounds them (to 8 significant bits).
            torch.testing.assert_close(dw.double(), ref_dw, rtol=2**-7, atol=0.0, msg=f"{algorithm}: grad weight")


def test_output_past_2_31_elements(one_thread):
    """Output (16385, 32, 64, 64): 2^31 + 2^17 elements (4 GiB of bfloat16) from a 256 MiB input
    through a 1x1 kernel (2 -> 32 channels). Per-image GEMMs keep ATen's bfloat16 GEMM temporaries
    small (one image's output; a single GEMM over a 4 GiB output would allocate 8 GiB of float32
    beside it on CPUs without native bfloat16). Checks 8192 sampled elements and the whole last
    image, which lies past offset 2^31. One intra-op thread: 16385 tiny GEMMs per algorithm, each
    a two-thread OpenMP region that can cost milliseconds on a loaded machine."""
    n_images, height = 16385, 64
    out_numel = n_images * 32 * height * height
    assert out_numel > BIG
    needs(out_numel * 2 + GiB)
    x = small_ints((n_images, 2, height, height), -4, 4, seed=5)
    w = small_ints((32, 2, 1, 1), -3, 4, seed=6)
    b = small_ints((32,), -4, 4, seed=7)
    g = torch.Generator().manual_seed(8)
    last = torch.arange(32 * height * height)
    n = torch.cat([torch.randint(0, n_images, (8192,), generator=g), torch.full_like(last, n_images - 1)])
    k = torch.cat([torch.randint(0, 32, (8192,), generator=g), last // (height * height)])
    h = torch.cat([torch.randint(0, height, (8192,), generator=g), last // height % height])
    wo = torch.cat([torch.randint(0, height, (8192,), generator=g), last % height])
    expected = b[k].double() + (w[k, :, 0, 0].double() * x[n, :, h, wo].double()).sum(1)
    for algorithm in channelconv.ALGORITHMS:
        y = run_algorithm(algorithm, x, w, b, (1, 1), (0, 0), (1, 1))
        assert y.shape == (n_images, 32, height, height)
        assert torch.equal(y[n, k, h, wo].double(), expected), algorithm
        del y


def test_column_buffer_past_2_31_elements(limit):
    """One output row of im2col columns past 2^31 elements: input (1, 1, 1, 96000), kernel
    (1, 1, 1, 48000): 48000 x 48001 = 2.30e9 columns (4.3 GiB of bfloat16) under a 5 GiB
    workspace limit, forward and weight gradient. The weight (and the output gradient) is non-zero
    at a few taps, among them taps whose column rows start past 2^31, so every output and
    gradient is a short exact sum: all 48001 outputs and all 48000 weight-gradient taps are
    compared exactly."""
    width, taps = 96000, 48000
    out = width - taps + 1
    columns = taps * out
    assert columns > BIG
    needs(columns * 2 + GiB)
    limit(5 * GiB)
    x = small_ints((1, 1, 1, width), -8, 8, seed=9)
    nonzero = torch.tensor([0, 1, 20000, 44739, 44740, 47998, 47999])  # rows 44739+ start past 2^31
    assert 44739 * out > BIG > 44738 * out
    w = torch.zeros((1, 1, 1, taps), dtype=torch.bfloat16)
    w[0, 0, 0, nonzero] = torch.tensor([1.0, -2.0, 3.0, 1.0, -1.0, 2.0, -3.0], dtype=torch.bfloat16)
    args = ((1, 1), (0, 0), (1, 1), 1, channelconv.get_workspace_limit())

    torch.ops.channelconv.reset_workspace_peak()
    y = OPS["im2col"].forward(x, w, None, *args)
    assert torch.ops.channelconv.workspace_peak() == columns * 2  # the buffer really held them all
    o = torch.arange(out)
    ref = sum(w[0, 0, 0, t].double() * x[0, 0, 0, o + t].double() for t in nonzero.tolist())
    assert torch.equal(y[0, 0, 0].double(), ref), "forward"
    del y

    # Weight gradient at every tap: dW[t] = sum_o dy[o] x[o + t] (only the hot o contribute).
    dy = torch.zeros((1, 1, 1, out), dtype=torch.bfloat16)
    hot = torch.tensor([0, 1, 2, 17, out // 2, out - 2, out - 1])
    dy[0, 0, 0, hot] = torch.tensor([1.0, 2.0, -1.0, 3.0, -2.0, 1.0, 2.0], dtype=torch.bfloat16)
    dw = OPS["im2col"].backward_weight(dy, x, [1, 1, 1, taps], *args)
    t = torch.arange(taps)
    ref_dw = sum(dy[0, 0, 0, j].double() * x[0, 0, 0, t + j].double() for j in hot.tolist())
    assert torch.equal(dw[0, 0, 0].double(), ref_dw), "grad weight"


def test_col2im_past_2_31_elements(limit):
    """The input gradient through a column buffer of 46341 x 46342 = 2^31 + 50974 float32 elements
    (8 GiB): the GEMM fills the columns, col2im gathers them back, the last tap's row lying past
    offset 2^31. (float32: in bfloat16 ATen's GEMM would add an 8.6 GiB float32 copy of its
    output, the column buffer.) All 92682 input-gradient elements are compared exactly."""
    taps = 46341
    width = 2 * taps
    out = width - taps + 1
    columns = taps * out
    assert columns > BIG and (taps - 1) * out > BIG
    needs(columns * 4 + GiB)
    limit(9 * GiB)
    w = torch.zeros((1, 1, 1, taps))
    nonzero = torch.tensor([0, 7, 23170, taps - 2, taps - 1])
    w[0, 0, 0, nonzero] = torch.tensor([1.0, -2.0, 3.0, -1.0, 2.0])
    dy = torch.zeros((1, 1, 1, out))
    hot = torch.tensor([0, 1, 5, out // 2, out - 2, out - 1])
    dy[0, 0, 0, hot] = torch.tensor([1.0, 2.0, -1.0, 3.0, -2.0, 1.0])
    torch.ops.channelconv.reset_workspace_peak()
    dx = OPS["im2col"].backward_input(dy, w, [1, 1, 1, width], (1, 1), (0, 0), (1, 1), 1,
                                      channelconv.get_workspace_limit())
    assert torch.ops.channelconv.workspace_peak() == columns * 4
    ref_dx = torch.zeros(width, dtype=torch.float64)
    for t in nonzero.tolist():
        ref_dx[t:t + out] += w[0, 0, 0, t].double() * dy[0, 0, 0].double()
    assert torch.equal(dx[0, 0, 0].double(), ref_dx), "grad input"
