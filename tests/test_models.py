"""Real model definitions, written here at small widths: a ResNet-18-like and a MobileNetV2-like
network. convert() keeps outputs and gradients, is idempotent; state_dicts move between the plain
and the converted model; a converted model survives a whole-module torch.save / torch.load."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, rel_error

import channelconv


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Like(nn.Module):
    """ResNet-18's structure (7x7/2 stem, max pool, four stages of two basic blocks, 1x1/2
    downsampling shortcuts, global pool, linear head) at widths (8, 16, 16, 32)."""

    def __init__(self, widths=(8, 16, 16, 32), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            blocks += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
            channels = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expand):
        super().__init__()
        hidden = in_channels * expand
        layers = []
        if expand != 1:  # pointwise expansion
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]  # linear projection
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Like(nn.Module):
    """MobileNetV2's structure (3x3/2 stem, inverted residual blocks: 1x1 expand, 3x3 depthwise,
    1x1 linear projection, residual where shapes allow; 1x1 to the last width) at small widths."""

    # (expansion t, output channels c, repeats n, first stride s), as in the paper's table
    SETTINGS = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1))

    def __init__(self, classes=10, last=48):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()]
        channels = 8
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers += [nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


MODELS = {"resnet18": (ResNet18Like, 20), "mobilenetv2": (MobileNetV2Like, 19)}  # class, number of convolutions


MODEL_TOLERANCE = 1e-9  # relative, float64; one op is held to 1e-12 elsewhere


def build(name):
    torch.manual_seed(0)
    model = MODELS[name][0]().double()
    model.train()
    with torch.no_grad():  # non-trivial running statistics for the eval-mode comparisons
        model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    return model


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def inputs(device):
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)


def run(model, mode, x):
    """Output, input and parameter gradients, and buffers after one step in `mode` on a copy of model."""
    model = copy.deepcopy(model)
    getattr(model, mode)()
    torch.manual_seed(2)  # the same dropout mask
    x = x.clone().requires_grad_()
    out = model(x)
    out.logsumexp(1).sum().backward()
    return out, [x.grad] + [p.grad for p in model.parameters()], list(model.buffers())


@pytest.mark.parametrize("name", MODELS)
def test_convert_keeps_outputs_and_gradients(device, name):
    plain = build(name).to(device)
    x = inputs(device)
    references = {mode: run(plain, mode, x) for mode in ("train", "eval")}  # nn.Conv2d: once
    for algorithm in ("auto", "direct"):  # auto: im2col and 1x1
        ours = channelconv.convert(copy.deepcopy(plain), algorithm=algorithm)
        assert len(convs(ours)) == MODELS[name][1]
        assert all(type(m) is channelconv.Conv2d for m in convs(ours))
        assert not any(type(m) is nn.Conv2d for m in ours.modules())
        names = ["input"] + [n for n, _ in ours.named_parameters()]
        for mode, (ref, ref_grads, ref_buffers) in references.items():
            what = f"{algorithm}, {mode}"
            out, grads, buffers = run(ours, mode, x)
            assert_close(out, ref, torch.float64, f"{what}: output")
            for n, g, r in zip(names, grads, ref_grads, strict=True):
                if r.norm() < 1e-12:  # a bias right before a train-mode batch norm: zero up to rounding
                    assert g.norm() < 1e-12, f"{what}: grad {n}"
                else:  # float64 through ~20 layers, batch norm cancelling most of some gradients
                    assert rel_error(g, r) < MODEL_TOLERANCE, f"{what}: grad {n}: {rel_error(g, r):.2e}"
            for a, b in zip(buffers, ref_buffers, strict=True):  # batch-norm statistics moved alike
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), what


@pytest.mark.parametrize("name", MODELS)
def test_convert_is_idempotent(name):
    model = channelconv.convert(build(name).eval())
    x = inputs("cpu")
    before = model(x)
    modules = list(model.modules())
    params = list(model.parameters())
    algorithms = [m.algorithm for m in convs(model)]
    again = channelconv.convert(model)
    assert again is model
    assert list(model.modules()) == modules and all(a is b for a, b in zip(model.modules(), modules))
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert [m.algorithm for m in convs(model)] == algorithms
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_moves_between_plain_and_converted(name):
    plain = build(name).eval()
    ours = channelconv.convert(copy.deepcopy(plain)).eval()
    assert list(ours.state_dict()) == list(plain.state_dict())
    x = inputs("cpu")

    # converted -> a fresh plain model (another seed) and back into a fresh converted one
    torch.manual_seed(123)
    fresh_plain = MODELS[name][0]().double().eval()
    assert not torch.equal(fresh_plain(x), plain(x))
    fresh_plain.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(321)
    fresh_ours = channelconv.convert(MODELS[name][0]().double()).eval()
    fresh_ours.load_state_dict(fresh_plain.state_dict(), strict=True)
    for a, b in zip(fresh_ours.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    assert_close(fresh_plain(x), plain(x), torch.float64)
    assert_close(fresh_ours(x), plain(x), torch.float64)


@pytest.mark.parametrize("name", MODELS)
def test_whole_module_save_and_load(name):
    ours = channelconv.convert(build(name), algorithm="auto").eval()
    convs(ours)[0].algorithm = "direct"  # a per-layer choice survives too
    x = inputs("cpu")
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(ours)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in ours.modules()]
    assert [m.algorithm for m in convs(loaded)] == [m.algorithm for m in convs(ours)]
    assert convs(loaded)[0].algorithm == "direct"
    assert torch.equal(loaded(x), ours(x))
    loaded.train()
    loaded(x).sum().backward()  # still trainable
    assert all(p.grad is not None for p in loaded.parameters())
