"""channelconv.conv2d: F.conv2d's semantics and argument forms, computed by one of channelconv's
own algorithms. Python normalises the arguments and picks the algorithm; the C++ op checks the
shapes (csrc/conv_params.cpp, with F.conv2d's message phrases) and computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._ops import OPS, TAKES_WORKSPACE, in_transform
from ._shapes import check_algorithm, pair, resolve_padding
from ._vmap import samples_per_call
from .select import choose
from .workspace import get_workspace_limit


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``, by ``algorithm``:
    'direct', 'im2col', '1x1' (1x1 kernels only) or 'auto' (chosen per shape). Complex tensors
    run as three real convolutions."""
    check_algorithm(algorithm)
    for name, value in (("input", input), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected {name} to be a Tensor, but got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"expected bias to be a Tensor or None, but got {type(bias).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"expected groups to be an int, but got groups={groups!r}")
    if input.is_complex() and weight.is_complex():
        return _complex_conv2d(input, weight, bias, stride, padding, dilation, groups, algorithm)
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
        shape = input.shape
        if in_transform() and not torch.compiler.is_compiling():  # under vmap: one call on every sample
            shape = (shape[0] * samples_per_call(), *shape[1:])
        algorithm = choose(shape, weight.shape, stride, padding, dilation, groups, tensors=(input, weight, bias))
    extra = (get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
    output = OPS[algorithm].forward(input, weight, bias, stride, padding, dilation, groups, *extra)
    return output.squeeze(0) if unbatched else output


def _complex_conv2d(input, weight, bias, stride, padding, dilation, groups, algorithm):
    """conv2d of complex tensors by three real convolutions (Gauss's trick): with input a + ib and
    weight c + id, (a + ib) * (c + id) = (k1 - k3) + i(k1 + k2) for k1 = (a + b) * c, k2 = a * (d - c)
    and k3 = b * (c + d), the bias's real part carried by k3 (negated) and its imaginary part by k2.
    Autograd differentiates through .real / .imag, which gives PyTorch's conjugate (Wirtinger)
    gradients; every real convolution is one of channelconv's ops, and checks its arguments."""
    if weight.dtype != input.dtype:
        raise RuntimeError(f"channelconv: expected weight and input to have the same dtype, but got weight "
                           f"{weight.dtype} and input {input.dtype}")
    if bias is not None and bias.dtype != input.dtype:
        raise RuntimeError(f"channelconv: expected bias and input to have the same dtype, but got bias {bias.dtype} "
                           f"and input {input.dtype}")
    a, b, c, d = input.real, input.imag, weight.real, weight.imag
    args = (stride, padding, dilation, groups)
    k1 = conv2d(a + b, c, None, *args, algorithm=algorithm)
    k2 = conv2d(a, d - c, None if bias is None else bias.imag, *args, algorithm=algorithm)
    k3 = conv2d(b, c + d, None if bias is None else -bias.real, *args, algorithm=algorithm)
    return torch.complex(k1 - k3, k1 + k2)
