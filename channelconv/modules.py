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


def _converted(conv: nn.Conv2d, algorithm: str) -> Conv2d:
    """A channelconv.Conv2d with the same state as ``conv``: the same Parameter objects, buffers,
    hooks and training flag (a shallow copy of its attributes, each container copied)."""
    new = Conv2d.__new__(Conv2d)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in conv.__dict__.items()})
    new.algorithm = check_algorithm(algorithm, conv.kernel_size)
    return new


def convert(module: nn.Module, algorithm: str = "auto") -> nn.Module:
    """Replaces every ``nn.Conv2d`` in ``module`` (recursively, and ``module`` itself if it is one)
    by a ``channelconv.Conv2d`` sharing its parameters; returns the module. Outputs do not change.

    Only exact ``nn.Conv2d`` instances are swapped (a subclass may override forward); existing
    ``channelconv.Conv2d`` modules get ``algorithm``. A module used in several places stays shared.
    """
    check_algorithm(algorithm)
    return _convert(module, algorithm, {})


def _convert(module, algorithm, done):
    if id(module) in done:
        return done[id(module)]
    if isinstance(module, Conv2d):
        module.algorithm = check_algorithm(algorithm, module.kernel_size)
        result = module
    elif type(module) is nn.Conv2d:
        result = _converted(module, algorithm)
    else:
        # _modules, not named_children(): the latter skips a child that appears twice.
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, _convert(child, algorithm, done))
        result = module
    done[id(module)] = result
    return result
