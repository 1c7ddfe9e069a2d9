"""Autograd for the C++ ops, reverse and forward mode, under torch.func as in eager. The three ops of
an algorithm are closed under differentiation (DESIGN.md):

    forward(X, W)              -> d/dX: backward_input(gY, W)     d/dW: backward_weight(gY, X)
    backward_input(gY, W)      -> d/dgY: forward(G, W)            d/dW: backward_weight(gY, G)
    backward_weight(gY, X)     -> d/dgY: forward(X, H)            d/dX: backward_input(gY, H)

so each op's backward and tangent are calls of the ops themselves, and double backward, forward
over reverse (Hessian-vector products) and higher orders compose.

Each op has a one-level autograd Function here (_SingleLevelFunction, what functorch's own grad
rule builds), with setup_context, backward and jvp, run by the op's own Autograd kernel at whatever
level the dispatcher calls it. That is what torch.library.register_autograd builds, less what
torch.func needs: its Function has no setup_context and goes through functorch's
custom_function_call, which refuses it (no grad, jacrev or hessian), and no jvp (forward mode would
drop tangents silently). The op stays the unit that torch.compile, torch.export and opcheck see; the
Function lives inside its Autograd kernel, as register_autograd's does. Under vmap the ops' own
batching rules apply (_vmap.py).
"""

from __future__ import annotations

import torch
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.autograd.function import _SingleLevelFunction
from torch._functorch.utils import enable_single_level_autograd_function

from ._ops import OP_PREFIX, OPS, AlgorithmOps, LIB, bias_grad, call_op, records_autograd
from ._shapes import result_format


def _function(name: str, op, setup_context, backward, jvp) -> type[_SingleLevelFunction]:
    def forward(*args):
        # apply() switches both gradient modes off around forward; below a torch.func transform the
        # op's call goes on to the transforms of lower levels (a jvp under a grad: forward over
        # reverse), which need them on. With no transform below, the call reaches the backend.
        with torch.enable_grad(), _set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    methods = {"forward": forward, "setup_context": setup_context, "backward": backward, "jvp": jvp}
    return type(name, (_SingleLevelFunction,), {k: staticmethod(f) for k, f in methods.items()})


def _sum(terms):
    total = terms[0]
    for term in terms[1:]:  # the bias term, if any, comes last and broadcasts
        total = total + term
    return total


def _nones(rest) -> list[None]:  # no gradient for (stride, padding, dilation, groups[, workspace_limit])
    return [None] * len(rest)


def _forward_function(ops: AlgorithmOps, prefix: str) -> type[_SingleLevelFunction]:
    def setup_context(ctx, inputs, output):
        input, weight, bias, *rest = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.rest, ctx.has_bias, ctx.output_shape = rest, bias is not None, output.shape

    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if need_input:  # laid out like the input, as F.conv2d's (the op itself never sees the input)
            grad_input = call_op(ops.backward_input, grad, weight, input.shape, *ctx.rest)
            grad_input = grad_input.contiguous(memory_format=result_format(input, weight))
        grad_weight = call_op(ops.backward_weight, grad, input, weight.shape, *ctx.rest) if need_weight else None
        grad_bias = bias_grad(grad) if ctx.has_bias and need_bias else None
        return (grad_input, grad_weight, grad_bias, *_nones(ctx.rest))

    def jvp(ctx, d_input, d_weight, d_bias, *_):  # linear in each argument
        input, weight = ctx.saved_tensors
        terms = []
        if d_input is not None:
            terms.append(ops.forward(d_input, weight, None, *ctx.rest))
        if d_weight is not None:
            terms.append(ops.forward(input, d_weight, None, *ctx.rest))
        if d_bias is not None:
            terms.append(d_bias.reshape(1, -1, 1, 1).expand(ctx.output_shape))
        return _sum(terms)

    return _function(f"channelconv_{prefix}_forward", ops.forward, setup_context, backward, jvp)


def _backward_function(ops: AlgorithmOps, prefix: str, of: str) -> type[_SingleLevelFunction]:
    """backward_input(grad_output, weight, input_size, ...) or backward_weight(grad_output, input,
    weight_size, ...): bilinear in (grad_output, operand)."""
    op = getattr(ops, of)

    def setup_context(ctx, inputs, output):
        grad_output, operand, size, *rest = inputs
        ctx.save_for_backward(grad_output, operand)
        ctx.save_for_forward(grad_output, operand)
        ctx.size, ctx.rest = size, rest

    def backward(ctx, grad):  # grad has the result's shape: the input's (backward_input) or the weight's
        grad_output, operand = ctx.saved_tensors
        need_grad_output, need_operand = ctx.needs_input_grad[:2]
        if of == "backward_input":  # operand = weight, grad = G:  forward(G, W), backward_weight(gY, G)
            gg = call_op(ops.forward, grad, operand, None, *ctx.rest) if need_grad_output else None
            go = call_op(ops.backward_weight, grad_output, grad, operand.shape, *ctx.rest) if need_operand else None
        else:  # operand = input, grad = H:  forward(X, H), backward_input(gY, H)
            gg = call_op(ops.forward, operand, grad, None, *ctx.rest) if need_grad_output else None
            go = call_op(ops.backward_input, grad_output, grad, operand.shape, *ctx.rest) if need_operand else None
        return (gg, go, None, *_nones(ctx.rest))

    def jvp(ctx, d_grad_output, d_operand, *_):
        grad_output, operand = ctx.saved_tensors
        terms = []
        if d_grad_output is not None:
            terms.append(op(d_grad_output, operand, ctx.size, *ctx.rest))
        if d_operand is not None:
            terms.append(op(grad_output, d_operand, ctx.size, *ctx.rest))
        return _sum(terms)

    return _function(f"channelconv_{prefix}_{of}", op, setup_context, backward, jvp)


def _register(op, function) -> None:
    def kernel(keyset, *args):
        if records_autograd(*args):
            # A one-level Function, even under a torch.func transform: this kernel is then the
            # autograd kernel of the transform's level, recording on its tensors as ATen's own
            # autograd kernels do (a torch.autograd.Function would route to functorch's
            # custom_function_call, which has no kernel at an autograd key). Functorch allows a
            # one-level Function only where told: here it records at exactly the current level.
            with enable_single_level_autograd_function():
                return function.apply(*args)
        # Straight to the backend's kernel (call_op skips this kernel too).
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    LIB.impl(op, kernel, "Autograd", with_keyset=True)


for _algorithm, _algorithm_ops in OPS.items():
    _prefix = OP_PREFIX[_algorithm]
    _register(_algorithm_ops.forward, _forward_function(_algorithm_ops, _prefix))
    for _of in ("backward_input", "backward_weight"):
        _register(getattr(_algorithm_ops, _of), _backward_function(_algorithm_ops, _prefix, _of))
