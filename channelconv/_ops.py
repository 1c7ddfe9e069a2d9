"""Python registrations of the C++ ops: fake kernels (shapes for torch.compile / export) and
autograd. The three ops of an algorithm are closed under differentiation (DESIGN.md):

    forward(X, W)              -> d/dX: backward_input(gY, W)     d/dW: backward_weight(gY, X)
    backward_input(gY, W)      -> d/dgY: forward(G, W)            d/dW: backward_weight(gY, G)
    backward_weight(gY, X)     -> d/dgY: forward(X, H)            d/dX: backward_input(gY, H)

so registering autograd on all three gives double (and higher) backward.

Two more registrations per op, for what torch.library's register_* functions do not cover:
forward-mode AD (jvp) on all three ops, and autocast on the forward ops (see below).
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

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


def needs_grad(*args) -> bool:
    """Whether a backward pass can follow a call on ``args``: grad mode is on and a tensor requires grad."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


def backward_passes(input, weight) -> tuple[str, ...]:
    """The gradient passes a backward through a call will run: the input's when it requires grad
    (not a network's first layer), the weight's when it does (not a frozen layer)."""
    if not torch.is_grad_enabled():
        return ()
    return ("input_grad",) * input.requires_grad + ("weight_grad",) * weight.requires_grad


def records_autograd(*args) -> bool:
    """Whether an op call on ``args`` has anything for autograd to record: a forward-AD dual level
    is open (a tensor may carry a tangent), or a backward pass can follow."""
    return forward_ad._current_level >= 0 or needs_grad(*args)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_plain(t) -> bool:
    """A plain Tensor or Parameter, whose sizes are ints: not a subclass (such as the fake tensors
    of a torch.compile or export trace, whose sizes may be symbolic). By type alone: cheap."""
    return type(t) in _PLAIN_TENSOR_TYPES


def call_op(op, *args):
    """``op(*args)``; when there is nothing to record, below the autograd key. That skips the
    Python autograd kernels registered below (microseconds a call, benchmarks/NOTES.md v7) and runs
    just what they would run. A trace (torch.compile) sees the plain call."""
    if torch.compiler.is_compiling() or records_autograd(*args):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# The kernels registered here from Python besides register_fake / register_autograd.
_LIB = torch.library.Library("channelconv", "FRAGMENT")


def _empty(shape, like: torch.Tensor, memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=memory_format)


def bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """The bias gradient: a channel's sum over the batch and pixels. Each (image, channel) plane is
    summed in float32 or wider (ATen's pairwise sum: its error is relative to the plane's terms),
    the planes in float64, so that planes that nearly cancel across the batch keep their digits.
    (Summing every element in float64 was 50-80x slower, and cost more than the convolution's
    kernels on wide layers: benchmarks/NOTES.md v9.)"""
    plane_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return grad.sum((2, 3), dtype=plane_dtype).sum(0, dtype=torch.float64).to(grad.dtype)


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

    def setup_forward(ctx, inputs, output):
        input, weight, bias, *rest = inputs
        ctx.save_for_backward(input, weight)
        ctx.rest, ctx.has_bias = rest, bias is not None

    def backward_forward(ctx, grad):
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if need_input:  # laid out like the input, as F.conv2d's (the op itself never sees the input)
            grad_input = call_op(ops.backward_input, grad, weight, input.shape, *ctx.rest)
            grad_input = grad_input.contiguous(memory_format=result_format(input, weight))
        grad_weight = call_op(ops.backward_weight, grad, input, weight.shape, *ctx.rest) if need_weight else None
        grad_bias = bias_grad(grad) if ctx.has_bias and need_bias else None
        return (grad_input, grad_weight, grad_bias, *[None] * len(ctx.rest))

    def setup_backward(ctx, inputs, output):
        grad_output, operand, size, *rest = inputs  # operand: weight (backward_input) or input
        ctx.save_for_backward(grad_output, operand)
        ctx.rest = rest

    def backward_backward_input(ctx, grad):  # grad has the input's shape
        grad_output, weight = ctx.saved_tensors
        need_grad_output, need_weight = ctx.needs_input_grad[:2]
        gg = call_op(ops.forward, grad, weight, None, *ctx.rest) if need_grad_output else None
        gw = call_op(ops.backward_weight, grad_output, grad, weight.shape, *ctx.rest) if need_weight else None
        return (gg, gw, None, *[None] * len(ctx.rest))

    def backward_backward_weight(ctx, grad):  # grad has the weight's shape
        grad_output, input = ctx.saved_tensors
        need_grad_output, need_input = ctx.needs_input_grad[:2]
        gg = call_op(ops.forward, input, grad, None, *ctx.rest) if need_grad_output else None
        gi = call_op(ops.backward_input, grad_output, grad, input.shape, *ctx.rest) if need_input else None
        return (gg, gi, None, *[None] * len(ctx.rest))

    torch.library.register_autograd(ops.forward, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(ops.backward_input, backward_backward_input, setup_context=setup_backward)
    torch.library.register_autograd(ops.backward_weight, backward_backward_weight, setup_context=setup_backward)

    # Tangents: every op is linear in each tensor argument (bilinear in its first two), so its
    # tangent is a sum of calls of the op itself with one argument replaced by that argument's tangent.
    def tangent_forward(primals, tangents, output):
        input, weight, bias, *rest = primals
        d_input, d_weight, d_bias = tangents[:3]
        terms = []
        if d_input is not None:
            terms.append(ops.forward(d_input, weight, None, *rest))
        if d_weight is not None:
            terms.append(ops.forward(input, d_weight, None, *rest))
        if d_bias is not None:
            terms.append(d_bias.reshape(1, -1, 1, 1).expand(output.shape))
        return _sum(terms)

    def tangent_bilinear(op):  # backward_input(grad_output, weight, ...), backward_weight(grad_output, input, ...)
        def tangent(primals, tangents, output):
            a, b, *rest = primals
            d_a, d_b = tangents[:2]
            return _sum(([op(d_a, b, *rest)] if d_a is not None else [])
                        + ([op(a, d_b, *rest)] if d_b is not None else []))
        return tangent

    _register_forward_ad(ops.forward, tangent_forward)
    _register_forward_ad(ops.backward_input, tangent_bilinear(ops.backward_input))
    _register_forward_ad(ops.backward_weight, tangent_bilinear(ops.backward_weight))
    _register_autocast(ops.forward)


def _sum(terms):
    total = terms[0]
    for term in terms[1:]:  # the bias term, if any, comes last and broadcasts
        total = total + term
    return total


# Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad). torch.library has no registration for
# a custom op's jvp, and the kernel register_autograd installs does not see tangents (it would drop
# them silently: a zero jvp). So each op gets an Autograd kernel of its own, per backend key: dual
# arguments take the tangent rule, everything else goes to register_autograd's kernel, fetched with
# torch.library.get_kernel (torch >= 2.9; older torch goes without forward mode). The rule calls the
# ops themselves, which are differentiable in both modes: forward-over-reverse (Hessian-vector
# products) and higher orders compose.
_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA")


def _register_forward_ad(op, tangent):
    if not hasattr(torch.library, "get_kernel"):
        return
    for key in _AUTOGRAD_KEYS:
        reverse = torch.library.get_kernel(op, key)

        def kernel(keyset, *args, reverse=reverse, op=op):
            if not records_autograd(*args):
                # Straight to the backend's kernel, as register_autograd's kernel would go, without
                # its Python layers (benchmarks/NOTES.md, v6). (call_op skips this kernel too.)
                with torch._C._AutoDispatchBelowAutograd():
                    return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
            if forward_ad._current_level < 0:  # outside every dual level no tensor has a tangent
                return reverse.call_boxed(keyset, *args)
            duals = [forward_ad.unpack_dual(a) if isinstance(a, torch.Tensor) else None for a in args]
            if all(d is None or d.tangent is None for d in duals):
                return reverse.call_boxed(keyset, *args)
            # The value: the op on the dual arguments themselves, with forward AD off, so that
            # what reverse mode saves for backward keeps its tangent (forward-over-reverse).
            with forward_ad._set_fwd_grad_enabled(False):
                output = reverse.call_boxed(keyset, *args)
            primals = [a if d is None else d.primal for a, d in zip(args, duals)]
            tangents = [None if d is None else d.tangent for d in duals]
            return forward_ad.make_dual(output, tangent(primals, tangents, output))

        _LIB.impl(op, kernel, key, with_keyset=True)


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

        _LIB.impl(op, kernel, key)


for _ops in OPS.values():
    _register(_ops)
