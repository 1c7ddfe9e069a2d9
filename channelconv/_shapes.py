"""Argument forms and shape rules on the Python side: turning user arguments into the explicit
pairs the ops take, and the output size the fake kernels report (the C++ twin of
``output_size`` is ``output_extent`` in csrc/conv_params.h; tests check they agree)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch._prims_common import suggest_memory_format

ALGORITHMS = ("direct", "im2col", "1x1")


def check_algorithm(algorithm: str, allow_auto: bool = True) -> str:
    valid = (*ALGORITHMS, "auto") if allow_auto else ALGORITHMS
    if algorithm not in valid:
        raise ValueError(f"unknown algorithm={algorithm!r}; expected one of {valid}")
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


def result_format(a: torch.Tensor, b: torch.Tensor) -> torch.memory_format:
    """channels_last when either operand is, as F.conv2d does (C++: result_format); on CUDA
    float64 is always NCHW, as cuDNN's channels_last path takes no doubles."""
    if a.device.type == "cuda" and torch.float64 in (a.dtype, b.dtype):
        return torch.contiguous_format
    if torch.channels_last in (suggest_memory_format(a), suggest_memory_format(b)):
        return torch.channels_last
    return torch.contiguous_format
