"""The C++ ops as Python sees them: their handles, fake kernels (shapes for torch.compile / export)
and autocast. Autograd (reverse and forward mode) is the ops' C++ Autograd kernel
(csrc/autograd.cpp), the batching rules for vmap are in _vmap.py.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the schemas and the kernels)
from ._shapes import check_grad_output, check_shapes, output_shape, result_format

# Op-name prefix of each algorithm, and whether its ops take the workspace limit.
OP_PREFIX = {"direct": "direct", "im2col": "im2col", "1x1": "conv1x1"}
TAKES_WORKSPACE = {"direct": False, "im2col": True, "1x1": True}


class AlgorithmOps:
    """The three ops of one algorithm."""

    def __init__(self, prefix: str):
        ns = torch.ops.channelconv
        self.forward = getattr(ns, f"{prefix}_forward").default
        self.backward_input = getattr(ns, f"{prefix}_backward_input").default
        self.backward_weight = getattr(ns, f"{prefix}_backward_weight").default


OPS = {algorithm: AlgorithmOps(prefix) for algorithm, prefix in OP_PREFIX.items()}


def backward_passes(input, weight) -> tuple[str, ...]:
    """The gradient passes a backward through a call will run: the input's when it requires grad
    (not a network's first layer), the weight's when it does (not a frozen layer)."""
    if not torch.is_grad_enabled():
        return ()
    return ("input_grad",) * input.requires_grad + ("weight_grad",) * weight.requires_grad


def in_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_plain(t) -> bool:
    """A plain Tensor or Parameter, whose sizes are ints: not a subclass (such as the fake tensors
    of a torch.compile or export trace, whose sizes may be symbolic). By type alone: cheap."""
    return type(t) in _PLAIN_TENSOR_TYPES


# The kernels registered from Python besides register_fake: autocast.
LIB = torch.library.Library("channelconv", "FRAGMENT")


def _empty(shape, like: torch.Tensor, memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=memory_format)


def _register(ops: AlgorithmOps) -> None:
    # `rest` is (stride, padding, dilation, groups[, workspace_limit]); it is passed through unchanged.
    @torch.library.register_fake(ops.forward)
    def _(input, weight, bias, stride, padding, dilation, groups, *rest):
        check_shapes(input.shape, weight.shape, padding, dilation, groups, bias)
        return _empty(output_shape(input.shape, weight.shape, stride, padding, dilation), input,
                      result_format(input, weight))

    @torch.library.register_fake(ops.backward_input)
    def _(grad_output, weight, input_size, stride, padding, dilation, groups, *rest):
        check_shapes(input_size, weight.shape, padding, dilation, groups)
        check_grad_output(grad_output, output_shape(input_size, weight.shape, stride, padding, dilation))
        return _empty(input_size, grad_output, result_format(grad_output, weight))

    @torch.library.register_fake(ops.backward_weight)
    def _(grad_output, input, weight_size, stride, padding, dilation, groups, *rest):
        check_shapes(input.shape, weight_size, padding, dilation, groups)
        check_grad_output(grad_output, output_shape(input.shape, weight_size, stride, padding, dilation))
        return _empty(weight_size, input, result_format(input, grad_output))

    _register_autocast(ops.forward)


# Autocast: conv2d is on autocast's lower-precision list, so under torch.autocast(device_type) its
# floating-point tensors on that device, float64 excepted, are cast to the autocast dtype of the
# moment, and the op runs with autocast off (at::autocast's cached_cast rules). Not
# torch.library.register_autocast: that casts to one dtype fixed at registration, where F.conv2d
# follows the dtype the autocast region names (bfloat16 or float16, on the CPU as on CUDA).
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _autocast_eligible(value, device_type: str) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type
            and value.dtype != torch.float64)


def _register_autocast(op):
    for device_type, key in _AUTOCAST_KEYS.items():

        def kernel(*args, device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            args = [a.to(dtype) if _autocast_eligible(a, device_type) else a for a in args]
            with torch.autocast(device_type, enabled=False):
                return op(*args)

        LIB.impl(op, kernel, key)


for _ops in OPS.values():
    _register(_ops)
