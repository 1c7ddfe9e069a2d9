"""The textbook's worked examples, through channelconv.reference and through every algorithm."""

from __future__ import annotations

import pytest
import torch

import channelconv
from channelconv import reference

X = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]],
                  [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])
K = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]])
TWO_IN = torch.tensor([[56.0, 72.0], [104.0, 120.0]])
THREE_OUT = torch.tensor([[[56.0, 72.0], [104.0, 120.0]],
                          [[76.0, 100.0], [148.0, 172.0]],
                          [[96.0, 128.0], [192.0, 224.0]]])


def test_corr2d_single_channel():
    x = torch.arange(9.0).reshape(3, 3)
    k = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert torch.equal(reference.corr2d(x, k), torch.tensor([[19.0, 25.0], [37.0, 43.0]]))


def test_reference_multi_in():
    assert torch.equal(reference.corr2d_multi_in(X, K), TWO_IN)


def test_reference_multi_in_out():
    stacked = torch.stack((K, K + 1, K + 2), 0)
    assert stacked.shape == (3, 2, 2, 2)
    assert torch.equal(reference.corr2d_multi_in_out(X, stacked), THREE_OUT)


def test_reference_1x1_equals_general():
    g = torch.Generator().manual_seed(0)
    x = torch.normal(0, 1, (3, 3, 3), generator=g)
    k = torch.normal(0, 1, (2, 3, 1, 1), generator=g)
    assert torch.allclose(reference.corr2d_multi_in_out_1x1(x, k), reference.corr2d_multi_in_out(x, k), atol=1e-6)


@pytest.mark.parametrize("algorithm", ["direct", "im2col", "auto"])
def test_algorithms_reproduce_examples_exactly(device, algorithm):
    x = X.to(device)
    two_in = channelconv.conv2d(x, K.unsqueeze(0).to(device), algorithm=algorithm)  # unbatched input
    assert torch.equal(two_in.cpu(), TWO_IN.unsqueeze(0))
    three_out = channelconv.conv2d(x, torch.stack((K, K + 1, K + 2), 0).to(device), algorithm=algorithm)
    assert torch.equal(three_out.cpu(), THREE_OUT)


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_1x1_path_equals_general_path(device, algorithm):
    g = torch.Generator().manual_seed(1)
    x = torch.normal(0, 1, (3, 3, 3), generator=g, dtype=torch.float64)
    k = torch.normal(0, 1, (2, 3, 1, 1), generator=g, dtype=torch.float64)
    out = channelconv.conv2d(x.to(device), k.to(device), algorithm=algorithm).cpu()
    assert torch.allclose(out, reference.corr2d_multi_in_out_1x1(x, k), rtol=0, atol=1e-12)
    assert torch.allclose(out, reference.corr2d_multi_in_out(x, k), rtol=0, atol=1e-12)
