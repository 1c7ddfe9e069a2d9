"""Batching rules for torch.vmap: each op runs once on the whole vmapped batch, never per sample.

The vmapped dimension (size B) folds into the convolution itself:
- into the images, when only the batch-like operand is vmapped (the input of forward, the output
  gradient of backward_input): B x N images, the same weight;
- into the groups otherwise: sample b's channels sit side by side, (N, B*C, H, W), and its weight
  is group block b, (B*O, C/g, R, S) with B*g groups. A per-sample weight is a grouped convolution,
  so per-sample weight gradients, vmap(grad) over a batch, are one grouped backward_weight pass.
  An operand that is not vmapped is expanded to B copies for it.
"""

from __future__ import annotations

import torch

from ._ops import OPS

_VMAP = torch._C._functorch.TransformType.Vmap


def samples_per_call() -> int:
    """How many samples each op call of this moment runs on, by the rules above: the product of the
    batch sizes of the vmap transforms running (1 outside vmap). 'auto' chooses for that many
    images: vmap(grad) over a batch, per-sample gradients, is one call on the whole batch."""
    stack = torch._C._functorch.get_interpreter_stack()
    samples = 1
    for interpreter in stack or ():
        if interpreter.key() == _VMAP:
            samples *= torch._C._functorch.CVmapInterpreterPtr(interpreter).batchSize()
    return samples


def _with_batch(t: torch.Tensor, dim, size: int) -> torch.Tensor:
    """``t`` with the vmapped dimension first: moved there, or ``size`` copies when ``t`` has none."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _images(t, dim, size):  # (B, N, C, H, W) -> (B*N, C, H, W)
    return _with_batch(t, dim, size).flatten(0, 1)


def _channels(t, dim, size):  # (B, N, C, H, W) -> (N, B*C, H, W)
    return _with_batch(t, dim, size).movedim(0, 1).flatten(1, 2)


def _weights(t, dim, size):  # (B, O, C/g, R, S) -> (B*O, C/g, R, S)
    return _with_batch(t, dim, size).flatten(0, 1)


def _add_bias(output, bias, bias_dim, size):
    """``output`` (B, N, O, P, Q) plus a bias that is vmapped or not."""
    if bias is None:
        return output
    return output + _with_batch(bias, bias_dim, size)[:, None, :, None, None]


def _register(ops) -> None:
    @torch.library.register_vmap(ops.forward)
    def _(info, in_dims, input, weight, bias, stride, padding, dilation, groups, *rest):
        size, (input_dim, weight_dim, bias_dim) = info.batch_size, in_dims[:3]
        own_bias = weight_dim is None and bias_dim is None  # the op adds the bias itself
        if weight_dim is None:
            output = ops.forward(_images(input, input_dim, size), weight, bias if own_bias else None, stride, padding,
                                 dilation, groups, *rest).unflatten(0, (size, -1))
        else:
            output = ops.forward(_channels(input, input_dim, size), _weights(weight, weight_dim, size), None,
                                 stride, padding, dilation, groups * size, *rest)
            output = output.unflatten(1, (size, -1)).movedim(1, 0)
        return (output if own_bias else _add_bias(output, bias, bias_dim, size)), 0

    @torch.library.register_vmap(ops.backward_input)
    def _(info, in_dims, grad_output, weight, input_size, stride, padding, dilation, groups, *rest):
        size, (grad_dim, weight_dim) = info.batch_size, in_dims[:2]
        n, c, h, w = input_size
        if weight_dim is None:
            grad_input = ops.backward_input(_images(grad_output, grad_dim, size), weight, [size * n, c, h, w],
                                            stride, padding, dilation, groups, *rest)
            return grad_input.unflatten(0, (size, n)), 0
        grad_input = ops.backward_input(_channels(grad_output, grad_dim, size), _weights(weight, weight_dim, size),
                                        [n, size * c, h, w], stride, padding, dilation, groups * size, *rest)
        return grad_input.unflatten(1, (size, c)), 1

    @torch.library.register_vmap(ops.backward_weight)
    def _(info, in_dims, grad_output, input, weight_size, stride, padding, dilation, groups, *rest):
        size, (grad_dim, input_dim) = info.batch_size, in_dims[:2]
        o, *per_group = weight_size
        grad_weight = ops.backward_weight(_channels(grad_output, grad_dim, size), _channels(input, input_dim, size),
                                          [size * o, *per_group], stride, padding, dilation, groups * size, *rest)
        return grad_weight.unflatten(0, (size, o)), 0


for _algorithm_ops in OPS.values():
    _register(_algorithm_ops)
