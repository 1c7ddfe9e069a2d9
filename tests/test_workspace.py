"""The im2col workspace limit: bands of output rows keep the column buffer under it, the answer
stays right, and a limit comes from set_workspace_limit or the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close, oracle

import channelconv

ROW_BYTES = 8 * 3 * 3 * 20 * 4  # one output row's columns: C * k_h * k_w * W_o * sizeof(float)


def peak():
    return torch.ops.channelconv.workspace_peak()


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_bands_respect_the_limit_and_stay_correct(limit, rows):
    # A prime batch and 20 output rows: bands of 3 and 7 rows leave a ragged last band.
    x = torch.randn(3, 8, 20, 20, dtype=torch.float32, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    budget = rows * ROW_BYTES + ROW_BYTES // 2  # room for `rows` rows, not rows + 1
    whole_batch = 3 * 20 * ROW_BYTES
    assert budget < whole_batch
    limit(budget)
    torch.ops.channelconv.reset_workspace_peak()
    y = channelconv.conv2d(x, w, b, padding=1, algorithm="im2col")
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    assert 0 < peak() <= budget
    assert peak() == rows * ROW_BYTES  # the band the limit allows, no larger
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = oracle(*ref_leaves, 1, 1, 1, 1)
    ref_gx, ref_gw = torch.autograd.grad(ref, ref_leaves[:2], gy.double())
    assert_close(y, ref, torch.float32)
    assert_close(gx, ref_gx, torch.float32, "grad input")
    assert_close(gw, ref_gw, torch.float32, "grad weight")


def test_1x1_stride_one_needs_no_workspace(limit):
    torch.ops.channelconv.reset_workspace_peak()
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    w = torch.randn(8, 16, 1, 1, requires_grad=True)
    y = channelconv.conv2d(x, w, algorithm="1x1")
    torch.autograd.grad(y.sum(), (x, w))
    assert peak() == 0


def test_default_and_environment():
    assert channelconv.get_workspace_limit() == 256 << 20 or "CHANNELCONV_WORKSPACE_LIMIT" in os.environ
    code = "import channelconv; print(channelconv.get_workspace_limit())"
    env = {**os.environ, "CHANNELCONV_WORKSPACE_LIMIT": "123456"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "123456"
    env["CHANNELCONV_WORKSPACE_LIMIT"] = "lots"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "CHANNELCONV_WORKSPACE_LIMIT='lots'" in bad.stderr
