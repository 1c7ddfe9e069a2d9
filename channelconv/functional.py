"""channelconv.conv2d: F.conv2d's semantics and argument forms, computed by one of channelconv's
own algorithms. Python normalises the arguments and picks the algorithm; the C++ op checks the
shapes (csrc/conv_params.cpp, with F.conv2d's message phrases) and computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._ops import OPS, TAKES_WORKSPACE, call_op
from ._shapes import check_algorithm, pair, resolve_padding
from .select import choose
from .workspace import get_workspace_limit


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``, by ``algorithm``:
    'direct', 'im2col', '1x1' (1x1 kernels only) or 'auto' (chosen per shape)."""
    check_algorithm(algorithm)
    for name, value in (("input", input), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected {name} to be a Tensor, but got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"expected bias to be a Tensor or None, but got {type(bias).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"expected groups to be an int, but got groups={groups!r}")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(input.shape)}"
        )
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    padding, extra = resolve_padding(padding, weight.shape, stride, dilation)
    if extra != (0, 0):  # an even kernel's 'same': the extra row/column at the bottom/right
        input = F.pad(input, (0, extra[1], 0, extra[0]))

    if algorithm == "auto":
        algorithm = choose(input.shape, weight.shape, stride, padding, dilation, groups, tensors=(input, weight, bias))
    extra = (get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
    output = call_op(OPS[algorithm].forward, input, weight, bias, stride, padding, dilation, groups, *extra)
    return output.squeeze(0) if unbatched else output
