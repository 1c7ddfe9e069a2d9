"""Bad input: a ValueError / RuntimeError whose message names the argument and shows the values,
never a crash or a silently wrong result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import channelconv
from channelconv._ops import OPS

x = torch.randn(2, 6, 8, 8)
w = torch.randn(4, 6, 3, 3)
ERRORS = (ValueError, RuntimeError)

BAD_CALLS = [
    # (description, input, weight, kwargs, message pattern)
    ("2-D input", torch.randn(8, 8), w, {}, r"3D \(unbatched\) or 4D \(batched\).*\[8, 8\]"),
    ("5-D input", torch.randn(1, 2, 6, 8, 8), w, {}, r"3D \(unbatched\) or 4D.*\[1, 2, 6, 8, 8\]"),
    ("3-D weight", x, torch.randn(4, 6, 3), {}, r"4-D weight.*\[4, 6, 3\]"),
    ("channel mismatch", torch.randn(2, 5, 8, 8), w, {}, r"groups=1.*expected input\[2, 5, 8, 8\] to have 6 channels"),
    ("groups vs out channels", x, torch.randn(5, 2, 3, 3), {"groups": 3}, r"groups=3.*divisible by 3.*\[5, 2, 3, 3\]"),
    ("groups vs in channels", x, torch.randn(4, 4, 3, 3), {"groups": 2}, r"groups=2.*to have 8 channels, but got 6"),
    ("zero groups", x, w, {"groups": 0}, r"non-positive groups.*groups=0"),
    ("negative groups", x, w, {"groups": -2}, r"non-positive groups.*groups=-2"),
    ("zero stride", x, w, {"stride": (0, 1)}, r"non-positive stride.*stride=\[0, 1\]"),
    ("negative padding", x, w, {"padding": -1}, r"negative padding.*padding=\[-1, -1\]"),
    ("zero dilation", x, w, {"dilation": 0}, r"dilation should be greater than zero.*dilation=\[0, 0\]"),
    ("kernel larger than input", torch.randn(1, 6, 2, 2), w, {}, r"padded input size.*\(2 x 2\).*Kernel size: \(3 x 3\)"),
    ("dilated kernel larger", torch.randn(1, 6, 4, 4), w, {"dilation": 2}, r"Kernel size: \(5 x 5\)"),
    ("same with stride", x, w, {"padding": "same", "stride": 2}, r"padding='same'.*strided.*stride=\(2, 2\)"),
    ("unknown padding string", x, w, {"padding": "full"}, r"padding string 'full'"),
    ("padding triple", x, w, {"padding": (1, 1, 1)}, r"padding.*\(1, 1, 1\)"),
    ("float stride", x, w, {"stride": 1.5}, r"stride.*1\.5"),
    ("bias size", x, w, {"bias": torch.randn(5)}, r"bias to be 1-dimensional with 4 elements.*\[5\]"),
    ("bias dtype", x, w, {"bias": torch.randn(4, dtype=torch.float64)}, r"bias and input.*same dtype.*Double.*Float"),
    ("weight dtype", x, w.double(), {}, r"weight and input.*same dtype"),
    ("integer input", x.long(), w.long(), {}, r"input has unsupported dtype Long"),
    ("huge padding", x, w, {"padding": 2**40}, r"padding=.*too large"),
    ("unknown algorithm", x, w, {"algorithm": "winograd"}, r"algorithm='winograd'.*'direct', 'im2col', '1x1'"),
    ("1x1 with a 3x3 kernel", x, w, {"algorithm": "1x1"}, r"'1x1' accepts only 1x1 kernels.*\[4, 6, 3, 3\]"),
]


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
@pytest.mark.parametrize("what,input,weight,kwargs,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(algorithm, what, input, weight, kwargs, pattern):
    kwargs = {"algorithm": algorithm, **kwargs}
    with pytest.raises(ERRORS, match=pattern):
        channelconv.conv2d(input, weight, **kwargs)


@pytest.mark.parametrize("what,input,weight,kwargs,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_f_conv2d_rejects_the_same_inputs(what, input, weight, kwargs, pattern):
    """Every call above is one F.conv2d rejects too (except channelconv's own arguments)."""
    if "algorithm" in kwargs or what in ("huge padding", "integer input"):
        pytest.skip("channelconv-only argument or limit (F.conv2d computes integer convolutions on the CPU)")
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        F.conv2d(input, weight, bias, **kwargs)


def test_1x1_refusal_is_a_value_error():
    with pytest.raises(ValueError, match="1x1"):
        channelconv.conv2d(x, w, algorithm="1x1")


def test_ops_called_directly_check_their_arguments():
    rest = ([1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"grad_output of size \[2, 4, 6, 6\].*\[2, 4, 5, 5\]"):
        OPS["direct"].backward_input(torch.randn(2, 4, 5, 5), w, [2, 6, 8, 8], *rest)
    with pytest.raises(RuntimeError, match=r"grad_output of size"):
        OPS["im2col"].backward_weight(torch.randn(2, 4, 5, 5), x, [4, 6, 3, 3], *rest, 1 << 20)
    with pytest.raises(ValueError, match=r"stride to have 2 elements.*\[1, 1, 1\]"):
        OPS["direct"].forward(x, w, None, [1, 1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match=r"workspace_limit=0"):
        OPS["im2col"].forward(x, w, None, *rest, 0)


def test_workspace_limit_arguments():
    with pytest.raises(ValueError, match="nbytes=0"):
        channelconv.set_workspace_limit(0)
    with pytest.raises(ValueError, match="nbytes='big'"):
        channelconv.set_workspace_limit("big")


def test_workspace_too_small_for_one_row_is_a_clear_error():
    before = channelconv.get_workspace_limit()
    try:
        channelconv.set_workspace_limit(64)  # one output row of columns needs 6*9*6*4 bytes
        with pytest.raises(RuntimeError, match=r"workspace limit \(64 bytes\).*1296 bytes"):
            channelconv.conv2d(x, w, algorithm="im2col")
    finally:
        channelconv.set_workspace_limit(before)


def test_non_tensor_arguments():
    with pytest.raises(TypeError, match="input"):
        channelconv.conv2d([[1.0]], w)
    with pytest.raises(TypeError, match="bias"):
        channelconv.conv2d(x, w, bias=[1.0] * 4)
