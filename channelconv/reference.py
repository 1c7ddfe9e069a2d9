"""The textbook definitions, as plain PyTorch loops: an oracle for tests and a teaching aid.

These are deliberately the slow, obvious forms: a single-channel cross-correlation, summed over
input channels, stacked over output channels, and the 1x1 case as a matrix product.
"""

from __future__ import annotations

import torch


def corr2d(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Single-channel 2-D cross-correlation: Y[i, j] = sum_{a,b} X[i+a, j+b] * K[a, b]."""
    h, w = K.shape
    Y = X.new_zeros((X.shape[0] - h + 1, X.shape[1] - w + 1))
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            Y[i, j] = (X[i : i + h, j : j + w] * K).sum()
    return Y


def corr2d_multi_in(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Several input channels: cross-correlate each with its own kernel slice and add them up."""
    return sum(corr2d(x, k) for x, k in zip(X, K))


def corr2d_multi_in_out(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Several output channels: one multi-input correlation per kernel, stacked along dim 0."""
    return torch.stack([corr2d_multi_in(X, k) for k in K], 0)


def corr2d_multi_in_out_1x1(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """A 1x1 kernel is a fully connected layer applied at every pixel: Y = K . X over (c_i, h*w)."""
    c_i, h, w = X.shape
    c_o = K.shape[0]
    return torch.matmul(K.reshape(c_o, c_i), X.reshape(c_i, h * w)).reshape(c_o, h, w)
