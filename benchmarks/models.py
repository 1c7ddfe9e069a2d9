"""Whole networks for the model suite (``python -m benchmarks --suite models``): each converted with
``channelconv.convert`` against the same network with nn.Conv2d, inference and a training step.

The textbook's networks at the sizes it trains them on (Fashion-MNIST: one channel, 28 px, or
resized to 96 / 224 px), a CIFAR ResNet-20 at 32 px, and ResNet-18, ResNet-50 and MobileNetV2 shaped
as torchvision builds them (defined here: torchvision is not needed). With torchvision or timm
installed, ``torchvision:NAME`` / ``timm:NAME`` runs any model of theirs by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    channels: int  # input channels
    size: int  # default input height = width
    batch: int  # default batch
    classes: int = 10


# ------------------------------------------------------------------------------------------------
# The textbook's networks


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2, 2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, 10))


def alexnet_small() -> nn.Module:
    """The textbook's AlexNet with a quarter of its channels, on 224 px Fashion-MNIST."""
    return nn.Sequential(
        nn.Conv2d(1, 24, 11, stride=4, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(24, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
        nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(64 * 5 * 5, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(1024, 10))


def vgg_blocks() -> nn.Module:
    """The textbook's VGG-11 with a quarter of its channels (its 'small' variant), 224 px."""
    layers, in_ch = [], 1
    for convs, out_ch in ((1, 16), (1, 32), (2, 64), (2, 128), (2, 128)):
        for _ in range(convs):
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
            in_ch = out_ch
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 7 * 7, 1024), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 10))


def _nin_block(in_ch, out_ch, kernel, stride, padding):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, padding), nn.ReLU(),
                         nn.Conv2d(out_ch, out_ch, 1), nn.ReLU(), nn.Conv2d(out_ch, out_ch, 1), nn.ReLU())


def nin() -> nn.Module:
    """The textbook's network in network with half its channels, 224 px."""
    return nn.Sequential(
        _nin_block(1, 48, 11, 4, 0), nn.MaxPool2d(3, 2), _nin_block(48, 128, 5, 1, 2), nn.MaxPool2d(3, 2),
        _nin_block(128, 192, 3, 1, 1), nn.MaxPool2d(3, 2), nn.Dropout(0.5), _nin_block(192, 10, 3, 1, 1),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())


class _Inception(nn.Module):
    def __init__(self, in_ch, c1, c2, c3, c4):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(in_ch, c1, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(in_ch, c2[0], 1), nn.ReLU(), nn.Conv2d(c2[0], c2[1], 3, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(in_ch, c3[0], 1), nn.ReLU(), nn.Conv2d(c3[0], c3[1], 5, padding=2), nn.ReLU())
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), nn.Conv2d(in_ch, c4, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat((self.b1(x), self.b2(x), self.b3(x), self.b4(x)), dim=1)


def googlenet_small() -> nn.Module:
    """The textbook's GoogLeNet with half its channels, on 96 px Fashion-MNIST."""
    def inc(in_ch, c1, c2, c3, c4):
        return _Inception(in_ch, c1 // 2, (c2[0] // 2, c2[1] // 2), (c3[0] // 2, c3[1] // 2), c4 // 2)

    return nn.Sequential(
        nn.Conv2d(1, 32, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Conv2d(32, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        inc(96, 64, (96, 128), (16, 32), 32), inc(128, 128, (128, 192), (32, 96), 64),
        nn.MaxPool2d(3, 2, padding=1),
        inc(240, 192, (96, 208), (16, 48), 64), inc(256, 160, (112, 224), (24, 64), 64),
        inc(256, 128, (128, 256), (24, 64), 64), inc(256, 112, (144, 288), (32, 64), 64),
        inc(264, 256, (160, 320), (32, 128), 128), nn.MaxPool2d(3, 2, padding=1),
        inc(416, 256, (160, 320), (32, 128), 128), inc(416, 384, (192, 384), (48, 128), 128),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10))


class _Residual(nn.Module):
    """The textbook's residual block: two 3x3 convolutions, a 1x1 projection when the shape changes."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


def _stages(in_ch, widths, blocks, first_stride=2):
    layers = []
    for i, (width, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(_Residual(in_ch, width, first_stride if i > 0 and j == 0 else 1))
            in_ch = width
    return layers


def textbook_resnet18() -> nn.Module:
    """The textbook's ResNet-18 for Fashion-MNIST (one input channel, 96 px)."""
    return nn.Sequential(nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *_stages(64, (64, 128, 256, 512), (2, 2, 2, 2)), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(512, 10))


def cifar_resnet20() -> nn.Module:
    """He et al.'s CIFAR ResNet-20: a 3x3 stem and three stages of three blocks at 16, 32, 64 channels."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         *_stages(16, (16, 32, 64), (3, 3, 3)), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(64, 10))


# ------------------------------------------------------------------------------------------------
# Shaped as torchvision's


def resnet18() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *_stages(64, (64, 128, 256, 512), (2, 2, 2, 2)), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(512, 1000))


class _Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3)."""

    def __init__(self, in_ch, width, stride=1):
        super().__init__()
        out_ch = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.shortcut is None else self.shortcut(x)))


def resnet50() -> nn.Module:
    layers, in_ch = [], 64
    for i, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for j in range(n):
            layers.append(_Bottleneck(in_ch, width, 2 if i > 0 and j == 0 else 1))
            in_ch = width * 4
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *layers, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(2048, 1000))


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch, out_ch, stride, expansion):
        super().__init__()
        hidden = in_ch * expansion
        layers = [] if expansion == 1 else [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                            nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2() -> nn.Module:
    layers, in_ch = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()], 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)):
        for i in range(n):
            layers.append(_InvertedResidual(in_ch, c, s if i == 0 else 1, t))
            in_ch = c
    layers += [nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(), nn.AdaptiveAvgPool2d((1, 1)),
               nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000)]
    return nn.Sequential(*layers)


MODELS = {spec.name: spec for spec in (
    ModelSpec("lenet", lenet, 1, 28, 256),
    ModelSpec("alexnet-small", alexnet_small, 1, 224, 16),
    ModelSpec("vgg-blocks", vgg_blocks, 1, 224, 8),
    ModelSpec("nin", nin, 1, 224, 8),
    ModelSpec("googlenet-small", googlenet_small, 1, 96, 16),
    ModelSpec("resnet18-fmnist", textbook_resnet18, 1, 96, 32),
    ModelSpec("resnet20-cifar", cifar_resnet20, 3, 32, 64),
    ModelSpec("resnet18", resnet18, 3, 224, 8, 1000),
    ModelSpec("resnet50", resnet50, 3, 160, 8, 1000),
    ModelSpec("mobilenet-v2", mobilenet_v2, 3, 224, 8, 1000),
)}


def spec_for(name: str) -> ModelSpec:
    """One of MODELS, or 'torchvision:NAME' / 'timm:NAME' (3 channels, 224 px, batch 8)."""
    if name in MODELS:
        return MODELS[name]
    source, _, model = name.partition(":")
    if source == "torchvision" and model:
        import torchvision

        return ModelSpec(name, lambda: torchvision.models.get_model(model, weights=None), 3, 224, 8, 1000)
    if source == "timm" and model:
        import timm

        return ModelSpec(name, lambda: timm.create_model(model, pretrained=False), 3, 224, 8, 1000)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}, or torchvision:NAME / timm:NAME")
