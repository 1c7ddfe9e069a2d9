"""Argument forms and shape rules on the Python side, each in one place: turning user arguments
into the explicit pairs the ops take (pair, resolve_padding), the algorithm names and the 1x1 rule,
the output size the fake kernels report and the shape checks they make under a trace (the C++
twins are in csrc/conv_params.cpp: output_extent and make_shape; tests check they agree)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch._prims_common import suggest_memory_format

ALGORITHMS = ("direct", "im2col", "1x1")
PADDING_STRINGS = ("valid", "same")


def is_1x1(kernel_size) -> bool:
    return tuple(kernel_size) == (1, 1)


def check_algorithm(algorithm: str, kernel_size=None) -> str:
    """``algorithm`` if it names one of ours or 'auto' (and, given the kernel size, accepts it)."""
    valid = (*ALGORITHMS, "auto")
    if algorithm not in valid:
        raise ValueError(f"unknown algorithm={algorithm!r}; expected one of {valid}")
    if algorithm == "1x1" and kernel_size is not None and not is_1x1(kernel_size):
        raise ValueError(f"algorithm '1x1' accepts only 1x1 kernels, but got kernel_size={tuple(kernel_size)}")
    return algorithm


def pair(value, name: str) -> tuple[int, int]:
    """An int or a sequence of one or two ints, as F.conv2d accepts, as a (height, width) pair."""
    # The common cases first (nn.Conv2d holds int pairs), without the slower generic checks below.
    if type(value) is int:
        return (value, value)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (1, 2):
        items = tuple(value) * (3 - len(value))  # (v,) -> (v, v)
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
            return (int(items[0]), int(items[1]))
    raise ValueError(f"expected {name} to be an int or a pair of ints, but got {name}={value!r}")


def resolve_padding(padding, weight_shape, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(explicit symmetric padding, extra (bottom, right) rows and columns) for conv2d's ``padding``:
    'same' with an even (dilated) kernel puts its extra row/column at the bottom/right, as PyTorch
    does. (A weight shape that is not 4-D is the op's error to name.)"""
    if not isinstance(padding, str):
        return pair(padding, "padding"), (0, 0)
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding != "same":
        raise ValueError(f"invalid padding string {padding!r}; expected one of {PADDING_STRINGS}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' is not supported for strided convolutions, but got stride={stride}")
    if len(weight_shape) != 4:
        return (0, 0), (0, 0)
    totals = [d * (k - 1) for d, k in zip(dilation, weight_shape[2:])]
    before = tuple(total // 2 for total in totals)
    return before, tuple(total - 2 * b for total, b in zip(totals, before))


def output_size(in_size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (in_size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_shape(input_shape, weight_shape, stride, padding, dilation) -> tuple:
    """(N, C_out, H_o, W_o) of a convolution; sizes may be symbolic (torch.compile)."""
    return (
        input_shape[0],
        weight_shape[0],
        output_size(input_shape[2], weight_shape[2], stride[0], padding[0], dilation[0]),
        output_size(input_shape[3], weight_shape[3], stride[1], padding[1], dilation[1]),
    )


def check_shapes(input_shape, weight_shape, padding, dilation, groups, bias=None) -> None:
    """The op's shape checks (csrc/conv_params.cpp, make_shape) for its fake kernel, so that under
    torch.compile a bad shape fails with the op's message, naming the argument. Sizes may be symbolic."""
    x, w = list(input_shape), list(weight_shape)
    torch._check(len(x) == 4, lambda: f"channelconv: expected 4-D input (N, C, H, W), but got input of size: {x}")
    torch._check(len(w) == 4, lambda: f"channelconv: expected 4-D weight (C_out, C_in / groups, k_h, k_w), but got "
                 f"weight of size: {w}")
    torch._check(groups > 0, lambda: f"non-positive groups is not supported: groups={groups}")
    torch._check(w[0] % groups == 0, lambda: f"Given groups={groups}, expected weight to be divisible by {groups} at "
                 f"dimension 0, but got weight of size {w} instead")
    torch._check(x[1] == w[1] * groups, lambda: f"Given groups={groups}, weight of size {w}, expected input{x} to have "
                 f"{w[1] * groups} channels, but got {x[1]} channels instead")
    padded = [x[2 + i] + 2 * padding[i] for i in (0, 1)]
    extent = [dilation[i] * (w[2 + i] - 1) + 1 for i in (0, 1)]
    for axis in (0, 1):
        torch._check(padded[axis] >= extent[axis], lambda: f"Calculated padded input size per channel: ({padded[0]} "
                     f"x {padded[1]}). Kernel size: ({extent[0]} x {extent[1]}). Kernel size can't be greater than "
                     f"actual input size")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == w[0], lambda: f"Given weight of size {w}, expected bias to "
                     f"be 1-dimensional with {w[0]} elements, but got bias of size {list(bias.shape)} instead")


def check_grad_output(grad_output, expected) -> None:
    torch._check(list(grad_output.shape) == list(expected), lambda: f"channelconv: expected grad_output of size "
                 f"{list(expected)} for this convolution, but got grad_output of size {list(grad_output.shape)}")


def result_format(a: torch.Tensor, b: torch.Tensor) -> torch.memory_format:
    """channels_last when either operand is, as F.conv2d does (C++: result_format); on CUDA
    float64 is always NCHW, as cuDNN's channels_last path takes no doubles."""
    if a.device.type == "cuda" and torch.float64 in (a.dtype, b.dtype):
        return torch.contiguous_format
    if _suggested_format(a) == torch.channels_last or _suggested_format(b) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _suggested_format(t: torch.Tensor) -> torch.memory_format:
    """suggest_memory_format(t), without its stride analysis (a few microseconds a call, twice on
    every channels_last 'auto' call) where the layout is plain: dense in exactly one of the two."""
    if type(t) in _PLAIN_TENSORS and t.dim() == 4 and t.layout == torch.strided:
        try:
            nchw, nhwc = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
        except RuntimeError:  # (a tensor under a transform that will not say)
            return suggest_memory_format(t)
        if nchw != nhwc:
            return torch.channels_last if nhwc else torch.contiguous_format
    return suggest_memory_format(t)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # (not FakeTensors, whose sizes may be symbolic)


def memory_format_of(input: torch.Tensor, weight: torch.Tensor | None = None) -> torch.memory_format:
    """The layout to price a layer in: channels_last when its input is channels_last-contiguous and,
    given the weight, its result is channels_last too (whether the kernels then see NHWC data is the
    plan's word: csrc/plan.h, layer_sees_nhwc; a one-channel input is both layouts, its result not)."""
    if not input.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last if weight is None else result_format(input, weight)
