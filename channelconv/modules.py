"""channelconv.Conv2d, a drop-in nn.Conv2d, and convert(), which swaps it into a model."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ._shapes import check_algorithm
from .functional import conv2d


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` in every respect (parameters, initialisation, state_dict, padding modes),
    computed by channelconv's ``algorithm``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, algorithm="auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.algorithm = check_algorithm(algorithm, self.kernel_size)

    def _conv_forward(self, input, weight, bias):
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad by the mode first, then no padding
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                      algorithm=self.algorithm)

    def extra_repr(self):
        text = super().extra_repr()
        return text if self.algorithm == "auto" else f"{text}, algorithm={self.algorithm!r}"


def _as_class(conv: nn.Conv2d, cls, **attributes) -> nn.Conv2d:
    """A ``cls`` with the same state as ``conv``: the same Parameter objects, buffers, hooks and
    training flag (a shallow copy of its attributes, each container copied), plus ``attributes``."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in conv.__dict__.items()
                         if k != "algorithm"})
    new.__dict__.update(attributes)
    return new


def convert(module: nn.Module, algorithm: str = "auto") -> nn.Module:
    """Replaces every ``nn.Conv2d`` in ``module`` (recursively, and ``module`` itself if it is one)
    by a ``channelconv.Conv2d`` sharing its parameters; returns the module. Outputs do not change.

    Only exact ``nn.Conv2d`` instances are swapped (a subclass may override forward); existing
    ``channelconv.Conv2d`` modules get ``algorithm``. A module used in several places stays shared.
    """
    check_algorithm(algorithm)

    def swap(m):
        if isinstance(m, Conv2d):
            m.algorithm = check_algorithm(algorithm, m.kernel_size)
            return m
        if type(m) is nn.Conv2d:
            return _as_class(m, Conv2d, algorithm=check_algorithm(algorithm, m.kernel_size))
        return None
    return _swap(module, swap, {})


def revert(module: nn.Module) -> nn.Module:
    """The inverse of ``convert``: every ``channelconv.Conv2d`` in ``module`` (recursively, and
    ``module`` itself) back to an exact ``nn.Conv2d`` with the same Parameter objects, padding
    mode, hooks and state, so that a trained model ships without channelconv. Returns the module;
    idempotent."""
    return _swap(module, lambda m: _as_class(m, nn.Conv2d) if isinstance(m, Conv2d) else None, {})


def _swap(module, swap, done):
    """``module`` with ``swap`` applied to it and, where swap declines (None), to its children."""
    if id(module) in done:
        return done[id(module)]
    result = swap(module)
    if result is None:
        # _modules, not named_children(): the latter skips a child that appears twice.
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, _swap(child, swap, done))
        result = module
    done[id(module)] = result
    return result
