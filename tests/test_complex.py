"""Complex tensors: three real convolutions per complex one (Gauss's trick, channelconv/functional.py),
forward and every gradient with PyTorch's conjugate (Wirtinger) convention, against F.conv2d in
complex128 and by gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import channelconv

CASES = [  # input shape, weight shape, stride, padding, dilation, groups, bias
    ((2, 4, 9, 8), (6, 4, 3, 3), 1, 1, 1, 1, True),
    ((1, 6, 10, 10), (4, 3, 3, 2), 2, (1, 0), 1, 2, False),
    ((3, 5, 7, 7), (5, 5, 1, 1), 1, 0, 1, 1, True),
    ((2, 8, 12, 11), (8, 1, 3, 3), 1, 2, 2, 8, True),
    ((4, 9, 9), (3, 4, 2, 2), 1, "same", 1, 1, True),  # unbatched, an even 'same' kernel
]


def _applicable(weight_shape):
    return [a for a in (*channelconv.ALGORITHMS, "auto") if a != "1x1" or tuple(weight_shape[2:]) == (1, 1)]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("case", CASES)
def test_complex_matches_f_conv2d_with_gradients(case, dtype):
    x_shape, w_shape, stride, padding, dilation, groups, has_bias = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=torch.complex128)
    w = torch.randn(w_shape, generator=g, dtype=torch.complex128)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.complex128) if has_bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.complex128)
    ref_grads = torch.autograd.grad(ref, leaves, gy)
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    for algorithm in _applicable(w_shape):
        ours_leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
        xo, wo, bo = ours_leaves[0], ours_leaves[1], ours_leaves[2] if has_bias else None
        out = channelconv.conv2d(xo, wo, bo, stride, padding, dilation, groups, algorithm=algorithm)
        assert out.dtype == dtype and out.shape == ref.shape
        grads = torch.autograd.grad(out, ours_leaves, gy.to(dtype))
        for name, got, want in zip(("output", "input", "weight", "bias"), (out, *grads), (ref, *ref_grads)):
            err = ((got.to(torch.complex128) - want).abs().norm() / want.abs().norm()).item()
            assert err < tol, (algorithm, name, err)


@pytest.mark.parametrize("algorithm", ["direct", "im2col", "1x1"])
def test_complex_gradcheck(algorithm):
    k = (1, 1) if algorithm == "1x1" else (2, 3)
    x = torch.randn(2, 2, 5, 4, dtype=torch.complex128, requires_grad=True)
    w = torch.randn(3, 2, *k, dtype=torch.complex128, requires_grad=True)
    b = torch.randn(3, dtype=torch.complex128, requires_grad=True)
    fn = lambda x, w, b: channelconv.conv2d(x, w, b, 1, (1, 0), algorithm=algorithm)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_complex_module_and_mixed_dtypes():
    conv = channelconv.Conv2d(3, 4, 3, padding=1, dtype=torch.complex64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.complex64)
    ref = F.conv2d(x.to(torch.complex128), conv.weight.to(torch.complex128), conv.bias.to(torch.complex128), 1, 1)
    assert ((conv(x).to(torch.complex128) - ref).abs().norm() / ref.abs().norm()).item() < 1e-5
    with pytest.raises(RuntimeError, match="same dtype"):
        channelconv.conv2d(x, conv.weight.detach().to(torch.complex128))
    with pytest.raises(RuntimeError, match="bias and input"):
        channelconv.conv2d(x, conv.weight.detach(), torch.zeros(4))
    with pytest.raises(RuntimeError, match="unsupported dtype"):  # complex input, real weight: as F.conv2d, refused
        channelconv.conv2d(x, conv.weight.detach().real.contiguous())
