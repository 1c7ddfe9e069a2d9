"""channelconv.Conv2d as a drop-in nn.Conv2d, and convert()."""

from __future__ import annotations

import io
import copy

import pytest
import torch
import torch.nn as nn
from conftest import assert_close

import channelconv

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def pair_of_modules(algorithm, padding_mode="zeros", **kwargs):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1, groups=2, bias=True,
                padding_mode=padding_mode, dtype=torch.float64)
    args.update(kwargs)
    torch.manual_seed(0)
    plain = nn.Conv2d(**args)
    ours = channelconv.Conv2d(**args, algorithm=algorithm)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


def test_is_an_nn_conv2d_with_same_parameters_and_init():
    torch.manual_seed(3)
    plain = nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1), groups=4)
    torch.manual_seed(3)
    ours = channelconv.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1), groups=4)
    assert isinstance(ours, nn.Conv2d)
    assert list(ours.state_dict()) == list(plain.state_dict())
    for a, b in zip(ours.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # same initialisation from the same seed
    assert repr(ours) == repr(plain).replace("Conv2d", "Conv2d", 1)
    assert "algorithm" not in repr(ours)
    assert "algorithm='direct'" in repr(channelconv.Conv2d(2, 2, 3, algorithm="direct"))


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("algorithm", ["direct", "im2col", "auto"])
def test_outputs_and_gradients_match_for_every_padding_mode(device, algorithm, padding_mode):
    plain, ours = (m.to(device) for m in pair_of_modules(algorithm, padding_mode))
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=device)
    x_plain, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_ours = plain(x_plain), ours(x_ours)
    assert_close(y_ours, y_plain, torch.float64)
    y_plain.square().sum().backward()
    y_ours.square().sum().backward()
    assert_close(x_ours.grad, x_plain.grad, torch.float64, "grad input")
    assert_close(ours.weight.grad, plain.weight.grad, torch.float64, "grad weight")
    assert_close(ours.bias.grad, plain.bias.grad, torch.float64, "grad bias")


def test_padding_same_string_and_unbatched(device):
    plain, ours = (m.to(device) for m in pair_of_modules("im2col", padding="same", kernel_size=(2, 3)))
    x = torch.randn(4, 5, 6, dtype=torch.float64, device=device)
    assert_close(ours(x), plain(x), torch.float64)


def test_state_dict_round_trip():
    plain, _ = pair_of_modules("direct")
    ours = channelconv.Conv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64, algorithm="direct")
    ours.load_state_dict(plain.state_dict())
    back = nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())
    for name, value in plain.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)


def test_1x1_module_refuses_other_kernels():
    with pytest.raises(ValueError, match="1x1"):
        channelconv.Conv2d(3, 3, 3, algorithm="1x1")
    with pytest.raises(ValueError, match="algorithm"):
        channelconv.Conv2d(3, 3, 3, algorithm="winograd")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),  # depthwise
            nn.Conv2d(8, 16, 1), nn.ReLU(),                                  # pointwise
            nn.Conv2d(16, 16, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_convert_swaps_every_conv_and_shares_parameters():
    torch.manual_seed(0)
    net = SmallCNN()
    params = {name: p for name, p in net.named_parameters()}
    x = torch.randn(2, 3, 12, 12)
    before = net(x)
    converted = channelconv.convert(net)
    assert converted is net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(isinstance(m, channelconv.Conv2d) for m in convs)
    for name, p in net.named_parameters():
        assert p is params[name]
    assert_close(net(x), before, torch.float32)
    assert channelconv.convert(net) is net  # idempotent
    assert [type(m) for m in net.modules()] == [type(m) for m in channelconv.convert(net).modules()]


def test_convert_a_bare_conv_and_shared_submodules():
    conv = nn.Conv2d(2, 2, 3)
    new = channelconv.convert(conv, algorithm="direct")
    assert isinstance(new, channelconv.Conv2d) and new.algorithm == "direct" and new.weight is conv.weight
    shared = nn.Conv2d(2, 2, 1)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    channelconv.convert(seq)
    assert seq[0] is seq[2] and isinstance(seq[0], channelconv.Conv2d)


def test_revert_gives_back_exact_nn_conv2d_with_the_same_state():
    """revert(): every channelconv.Conv2d back to an exact nn.Conv2d sharing its Parameters, with
    its padding mode, hooks, buffers and training flag; idempotent; a round trip with convert."""
    torch.manual_seed(0)
    net = SmallCNN()
    x = torch.randn(2, 3, 12, 12)
    plain_out = net(x)
    params = dict(net.named_parameters())
    channelconv.convert(net, algorithm="direct")
    first = next(m for m in net.modules() if isinstance(m, channelconv.Conv2d))
    calls = []
    first.register_forward_hook(lambda *args: calls.append(1))
    first.padding_mode = "reflect"
    first.eval()
    with torch.no_grad():
        ours_out = net(x)
    assert channelconv.revert(net) is net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(type(m) is nn.Conv2d and not hasattr(m, "algorithm") for m in convs)
    assert all(p is params[name] for name, p in net.named_parameters())
    reverted = convs[0]
    assert reverted.padding_mode == "reflect" and not reverted.training and len(reverted._forward_hooks) == 1
    with torch.no_grad():
        assert_close(net(x), ours_out, torch.float32)  # the same function, now by F.conv2d
    assert len(calls) == 2
    assert channelconv.revert(net) is net and all(type(m) is nn.Conv2d for m in convs)  # idempotent
    reverted.padding_mode, reverted.training = "zeros", True
    channelconv.convert(net)  # round trip
    assert_close(net(x), plain_out, torch.float32)
    bare = channelconv.revert(channelconv.Conv2d(2, 3, 3, algorithm="im2col"))
    assert type(bare) is nn.Conv2d and "algorithm" not in repr(bare)
    buffer = io.BytesIO()
    torch.save(bare, buffer)  # pickles torch.nn's class: loads where channelconv is not installed
    assert b"channelconv" not in buffer.getvalue()
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is nn.Conv2d


@pytest.mark.parametrize("algorithm", ["direct", "im2col", "auto"])
def test_training_matches_nn_conv2d(algorithm):
    """20 SGD steps of a small CNN on synthetic data: the same losses with channelconv."""
    torch.manual_seed(0)
    plain = SmallCNN().double()
    ours = channelconv.convert(copy.deepcopy(plain), algorithm=algorithm)
    data = torch.randn(20, 8, 3, 12, 12, dtype=torch.float64)
    labels = torch.randint(0, 4, (20, 8))
    losses = []
    for model in (plain, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        trace = []
        for x, y in zip(data, labels):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses.append(torch.tensor(trace))
    assert losses[0][-1] < losses[0][0]  # it actually trained
    assert torch.allclose(losses[1], losses[0], rtol=1e-9, atol=1e-12)
