"""The layers the suite measures: every distinct convolution of a few networks, the textbook
section's examples, and custom shapes from the command line.

A ``Layer`` is one convolution's arguments without the batch size (the suite's ``--batch``
supplies it), unless the layer fixes its own batch (the textbook's examples use one image).
Networks are generated from their published configurations, then deduplicated: a layer that
occurs several times is measured once and carries its ``count``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from channelconv._shapes import output_size


@dataclass(frozen=True)
class Layer:
    name: str
    in_channels: int
    out_channels: int
    size: tuple  # input (H, W)
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias: bool = False
    batch: int | None = None  # None: the suite's --batch
    count: int = 1  # occurrences in the network
    names: tuple = field(default=(), compare=False)  # every place it occurs

    def signature(self) -> tuple:
        return (self.in_channels, self.out_channels, self.size, self.kernel, self.stride, self.padding,
                self.dilation, self.groups, self.bias, self.batch)

    def input_shape(self, batch: int) -> tuple:
        n = self.batch if self.batch is not None else batch
        return (n, self.in_channels, *self.size)

    def weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    def conv_args(self) -> tuple:
        """(stride, padding, dilation, groups), as conv2d takes them."""
        return (self.stride, self.padding, self.dilation, self.groups)

    def output_size(self) -> tuple:
        return tuple(output_size(i, k, s, p, d)
                     for i, k, s, p, d in zip(self.size, self.kernel, self.stride, self.padding, self.dilation))

    def describe(self) -> str:
        """A compact shape string: 'C_in->C_out kxk/s @HxW [g=..]'."""
        text = f"{self.in_channels}->{self.out_channels} {self.kernel[0]}x{self.kernel[1]}"
        if self.stride != (1, 1):
            text += f"/s{self.stride[0]}" if self.stride[0] == self.stride[1] else f"/s{self.stride}"
        if self.dilation != (1, 1):
            text += f" d{self.dilation[0]}"
        text += f" @{self.size[0]}" if self.size[0] == self.size[1] else f" @{self.size[0]}x{self.size[1]}"
        if self.groups > 1:
            text += " dw" if self.groups == self.in_channels == self.out_channels else f" g{self.groups}"
        return text


def conv(name, c_in, c_out, size, k, stride=1, padding=None, groups=1, bias=False, dilation=1) -> Layer:
    """A square convolution; padding defaults to 'same-like' k // 2 (what these networks use)."""
    padding = (k // 2) * dilation if padding is None else padding
    return Layer(name, c_in, c_out, (size, size), (k, k), (stride, stride), (padding, padding), (dilation, dilation),
                 groups, bias)


def dedupe(layers: list[Layer]) -> list[Layer]:
    """One layer per distinct signature, in first-seen order, with its count and every name."""
    seen: dict[tuple, Layer] = {}
    for layer in layers:
        key = layer.signature()
        if key in seen:
            first = seen[key]
            seen[key] = replace(first, count=first.count + layer.count, names=first.names + (layer.name,))
        else:
            seen[key] = replace(layer, names=(layer.name,))
    return list(seen.values())


def resnet50() -> list[Layer]:
    """torchvision's ResNet-50 (v1.5: the stride sits on the 3x3 of each stage's first block) at 224x224."""
    layers = [conv("conv1", 3, 64, 224, 7, stride=2, padding=3)]
    in_ch, size = 64, 56  # after the 3x3/2 max-pool
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        out_ch = width * 4
        for block in range(blocks):
            s = stride if block == 0 else 1
            p = f"layer{stage}.{block}"
            layers.append(conv(f"{p}.conv1", in_ch, width, size, 1))
            layers.append(conv(f"{p}.conv2", width, width, size, 3, stride=s))
            out_size = (size - 1) // s + 1
            layers.append(conv(f"{p}.conv3", width, out_ch, out_size, 1))
            if block == 0:
                layers.append(conv(f"{p}.downsample", in_ch, out_ch, size, 1, stride=s))
            in_ch, size = out_ch, out_size
    return dedupe(layers)


def vgg16() -> list[Layer]:
    """VGG-16's thirteen 3x3 convolutions (padding 1, with bias) at 224x224."""
    config = [(224, [64, 64]), (112, [128, 128]), (56, [256, 256, 256]), (28, [512, 512, 512]),
              (14, [512, 512, 512])]
    layers, in_ch = [], 3
    for block, (size, widths) in enumerate(config, start=1):
        for i, width in enumerate(widths, start=1):
            layers.append(conv(f"conv{block}_{i}", in_ch, width, size, 3, bias=True))
            in_ch = width
    return dedupe(layers)


def mobilenet() -> list[Layer]:
    """MobileNetV2's inverted residual blocks at 224x224: for each, the pointwise expansion, the
    depthwise 3x3 (stride on the first block of a stage) and the pointwise projection."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # (expansion t, channels c, blocks n, stride s)
    layers, in_ch, size, index = [], 32, 112, 0  # after the 3x3/2 stem 3 -> 32
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = in_ch * t
            p = f"features.{index + 1}"
            if t != 1:
                layers.append(conv(f"{p}.expand", in_ch, hidden, size, 1))
            layers.append(conv(f"{p}.depthwise", hidden, hidden, size, 3, stride=stride, groups=hidden))
            size = (size - 1) // stride + 1
            layers.append(conv(f"{p}.project", hidden, c, size, 1))
            in_ch, index = c, index + 1
    return dedupe(layers)


def groups() -> list[Layer]:
    """One 3x3 256 -> 256 layer at 28x28 split into g blocks: a block-diagonal weight with g
    times fewer multiply-adds (the textbook's last exercise)."""
    return [conv(f"groups={g}", 256, 256, 28, 3, groups=g) for g in (1, 2, 4, 8, 16, 32)]


def textbook() -> list[Layer]:
    """The section's worked examples (one image each): the 2-channel 3x3 input with a 2x2 kernel,
    the same with three output channels, the 1x1 example, and the 256x256-pixel, 5x5-kernel,
    128 -> 128-channel layer whose forward pass costs 2 x 26.8e9 = 53.7e9 operations."""
    one = dict(batch=1)
    return [
        replace(Layer("multi-in (2x3x3, 2x2 kernel)", 2, 1, (3, 3), (2, 2)), **one),
        replace(Layer("multi-in-out (3 kernels)", 2, 3, (3, 3), (2, 2)), **one),
        replace(Layer("1x1 (3 -> 2 channels, 3x3)", 3, 2, (3, 3), (1, 1)), **one),
        replace(conv("256x256, 5x5, 128 -> 128", 128, 128, 256, 5), **one),
        replace(conv("256x256, 1x1, 128 -> 128", 128, 128, 256, 1), **one),
    ]


# Seeds of the random layer sets: the calibration fits on one, checks itself on another, and the
# 'offgrid' suite is a third that no calibration ever sees (the held-out layers of issue 17).
CALIBRATION_SEED, VALIDATION_SEED, OFFGRID_SEED = 1, 2, 3


def random_layers(seed: int, count: int, max_macs: float = 3e8) -> list[Layer]:
    """``count`` layers drawn log-uniformly across what users bring: channels 1-2048, maps 3-224,
    kernels 1/3/5/7, strides 1/2, batches 1-256, groups (grouped and depthwise among them), padding
    k // 2 or none. A draw over ``max_macs`` forward multiply-adds gets a smaller batch, then a
    smaller map, so that every layer runs in milliseconds and the set keeps its spread of shapes."""
    rng = random.Random(seed)

    def log_uniform(lo, hi):
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    layers = []
    while len(layers) < count:
        k = rng.choice((1, 1, 3, 3, 3, 5, 7))
        stride = rng.choice((1, 1, 1, 2))
        padding = k // 2 if rng.random() < 0.8 else 0
        size = max(log_uniform(3, 224), k - 2 * padding)
        c_in, c_out = log_uniform(1, 2048), log_uniform(1, 2048)
        groups = 1
        kind = rng.random()
        if kind < 0.12 and k > 1:  # depthwise
            c_out = groups = c_in
        elif kind < 0.2:
            groups = rng.choice((2, 4, 8))
            c_in, c_out = groups * max(1, c_in // groups), groups * max(1, c_out // groups)
        batch = log_uniform(1, 256)
        layer = conv(f"random {seed}:{len(layers)}", c_in, c_out, size, k, stride=stride, padding=padding,
                     groups=groups)

        def macs(layer, batch):
            h, w = layer.output_size()
            return batch * layer.out_channels * h * w * (layer.in_channels // layer.groups) * k * k

        while macs(layer, batch) > max_macs and batch > 1:
            batch = max(1, batch // 2)
        while macs(layer, batch) > max_macs and layer.size[0] > max(3, k):
            smaller = max(3, k, layer.size[0] * 3 // 4)
            layer = replace(layer, size=(smaller, smaller))
        if macs(layer, batch) > max_macs:
            continue  # channels alone too many for the budget: draw again
        layers.append(replace(layer, batch=batch))
    return layers


def offgrid() -> list[Layer]:
    """24 random layers off every tuned grid (random_layers, OFFGRID_SEED), each with its own batch:
    the held-out set no calibration is fitted or checked on."""
    return random_layers(OFFGRID_SEED, 24)


def quick() -> list[Layer]:
    """A smoke run of a few seconds: tiny layers touching every code path (1x1 with and
    without stride, 3x3, strided, grouped, depthwise, dilated, bias)."""
    return [
        conv("3x3", 8, 16, 12, 3, bias=True),
        conv("3x3/2", 8, 8, 12, 3, stride=2),
        conv("1x1", 16, 8, 10, 1),
        conv("1x1/2", 16, 8, 10, 1, stride=2),
        conv("grouped", 8, 8, 10, 3, groups=4),
        conv("depthwise", 8, 8, 10, 3, groups=8),
        conv("dilated", 4, 8, 12, 3, dilation=2),
    ]


SUITES = {
    "resnet50": resnet50,
    "vgg16": vgg16,
    "mobilenet": mobilenet,
    "groups": groups,
    "textbook": textbook,
    "offgrid": offgrid,
    "quick": quick,
}


def parse_shape(text: str) -> Layer:
    """``N,C_in,H,W,C_out,KH,KW[,stride,padding,dilation,groups]`` -> a Layer with its own batch."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--shape expects integers N,C_in,H,W,C_out,KH,KW[,stride,padding,dilation,groups], "
                         f"got {text!r}") from None
    if not 7 <= len(values) <= 11:
        raise ValueError(f"--shape expects 7 to 11 integers N,C_in,H,W,C_out,KH,KW[,stride,padding,dilation,groups], "
                         f"got {len(values)} in {text!r}")
    n, c_in, h, w, c_out, kh, kw, *rest = values
    stride, padding, dilation, groups = rest + [1, 0, 1, 1][len(rest):]
    if min(n, c_in, h, w, c_out, kh, kw, stride, dilation, groups) < 1 or padding < 0:
        raise ValueError(f"--shape: sizes, stride, dilation and groups must be positive, padding >= 0: {text!r}")
    if c_in % groups or c_out % groups:
        raise ValueError(f"--shape: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    layer = Layer(f"custom {text}", c_in, c_out, (h, w), (kh, kw), (stride, stride), (padding, padding),
                  (dilation, dilation), groups, False, batch=n, names=(f"custom {text}",))
    if min(layer.output_size()) < 1:
        raise ValueError(f"--shape: the {dilation}-dilated {kh}x{kw} kernel does not fit the {h}x{w} input padded by "
                         f"{padding}: {text!r}")
    return layer
