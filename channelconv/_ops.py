"""Python registrations of the C++ ops: fake kernels (shapes for torch.compile / export) and
autograd. The three ops of an algorithm are closed under differentiation (DESIGN.md):

    forward(X, W)              -> d/dX: backward_input(gY, W)     d/dW: backward_weight(gY, X)
    backward_input(gY, W)      -> d/dgY: forward(G, W)            d/dW: backward_weight(gY, G)
    backward_weight(gY, X)     -> d/dgY: forward(X, H)            d/dX: backward_input(gY, H)

so registering autograd on all three gives double (and higher) backward.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the schemas and the kernels)
from ._shapes import output_shape, result_format

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


def _empty(shape, like: torch.Tensor, memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=memory_format)


def _register(ops: AlgorithmOps) -> None:
    # `rest` is (stride, padding, dilation, groups[, workspace_limit]); it is passed through unchanged.
    @torch.library.register_fake(ops.forward)
    def _(input, weight, bias, stride, padding, dilation, *rest):
        return _empty(output_shape(input.shape, weight.shape, stride, padding, dilation), input,
                      result_format(input, weight))

    @torch.library.register_fake(ops.backward_input)
    def _(grad_output, weight, input_size, *rest):
        return _empty(input_size, grad_output, result_format(grad_output, weight))

    @torch.library.register_fake(ops.backward_weight)
    def _(grad_output, input, weight_size, *rest):
        return _empty(weight_size, input, result_format(input, grad_output))

    def setup_forward(ctx, inputs, output):
        input, weight, bias, *rest = inputs
        ctx.save_for_backward(input, weight)
        ctx.rest, ctx.has_bias = rest, bias is not None

    def backward_forward(ctx, grad):
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = ops.backward_input(grad, weight, input.shape, *ctx.rest) if need_input else None
        grad_weight = ops.backward_weight(grad, input, weight.shape, *ctx.rest) if need_weight else None
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and need_bias else None
        return (grad_input, grad_weight, grad_bias, *[None] * len(ctx.rest))

    def setup_backward(ctx, inputs, output):
        grad_output, operand, size, *rest = inputs  # operand: weight (backward_input) or input
        ctx.save_for_backward(grad_output, operand)
        ctx.rest = rest

    def backward_backward_input(ctx, grad):  # grad has the input's shape
        grad_output, weight = ctx.saved_tensors
        need_grad_output, need_weight = ctx.needs_input_grad[:2]
        gg = ops.forward(grad, weight, None, *ctx.rest) if need_grad_output else None
        gw = ops.backward_weight(grad_output, grad, weight.shape, *ctx.rest) if need_weight else None
        return (gg, gw, None, *[None] * len(ctx.rest))

    def backward_backward_weight(ctx, grad):  # grad has the weight's shape
        grad_output, input = ctx.saved_tensors
        need_grad_output, need_input = ctx.needs_input_grad[:2]
        gg = ops.forward(input, grad, None, *ctx.rest) if need_grad_output else None
        gi = ops.backward_input(grad_output, grad, input.shape, *ctx.rest) if need_input else None
        return (gg, gi, None, *[None] * len(ctx.rest))

    torch.library.register_autograd(ops.forward, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(ops.backward_input, backward_backward_input, setup_context=setup_backward)
    torch.library.register_autograd(ops.backward_weight, backward_backward_weight, setup_context=setup_backward)


for _ops in OPS.values():
    _register(_ops)
