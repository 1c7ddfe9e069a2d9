"""torch.autocast: channelconv casts as F.conv2d does (conv2d is on autocast's lower-precision
list: floating-point tensors on the autocast device, float64 excepted, go to the autocast dtype)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TOLERANCE, assert_close, rel_error

import channelconv

DTYPES = {"cpu": [torch.bfloat16, torch.float16], "cuda": [torch.float16, torch.bfloat16]}
ARGS = dict(stride=(1, 2), padding=1, dilation=1, groups=2)


def operands(algorithm, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    k = 1 if algorithm == "1x1" else 3
    x = torch.randn(2, 4, 9, 8, generator=g).to(device, dtype)
    w = torch.randn(6, 2, k, k, generator=g).to(device, dtype)
    b = torch.randn(6, generator=g).to(device, dtype)
    return x, w, b


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_output_dtype_and_values_follow_f_conv2d(device, algorithm):
    x, w, b = operands(algorithm, device)
    for dtype in DTYPES[device]:
        with torch.autocast(device, dtype=dtype):
            out = channelconv.conv2d(x, w, b, **ARGS, algorithm=algorithm)
            ref = F.conv2d(x, w, b, **ARGS)
        assert ref.dtype == dtype and out.dtype == ref.dtype, (dtype, out.dtype)
        assert out.device == ref.device
        # The inputs are rounded to dtype, then convolved: against that in float64, and against F.conv2d.
        exact = F.conv2d(*(t.to(dtype).double() for t in (x, w, b)), **ARGS)
        assert_close(out, exact, dtype, f"autocast {dtype}")
        assert_close(out, ref.double(), dtype, f"autocast {dtype} vs F.conv2d")
        # The same op outside autocast on tensors already in dtype: what autocast runs.
        assert torch.equal(out, channelconv.conv2d(*(t.to(dtype) for t in (x, w, b)), **ARGS, algorithm=algorithm))


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_ineligible_and_mixed_inputs(device, algorithm):
    x, w, b = operands(algorithm, device)
    dtype = DTYPES[device][0]
    with torch.autocast(device, dtype=dtype):
        # float64 is not cast (by F.conv2d either).
        out64 = channelconv.conv2d(x.double(), w.double(), b.double(), **ARGS, algorithm=algorithm)
        assert out64.dtype == F.conv2d(x.double(), w.double(), b.double(), **ARGS).dtype == torch.float64
        # Mixed low-precision / float32 operands: all cast to the autocast dtype.
        mixed = channelconv.conv2d(x.to(dtype), w, b, **ARGS, algorithm=algorithm)
        assert mixed.dtype == F.conv2d(x.to(dtype), w, b, **ARGS).dtype == dtype
    assert_close(out64, F.conv2d(x.double(), w.double(), b.double(), **ARGS), torch.float64)
    if device == "cuda":  # CPU autocast leaves CUDA tensors alone
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert channelconv.conv2d(x, w, b, **ARGS, algorithm=algorithm).dtype == torch.float32


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
                         nn.Conv2d(8, 4, 1))


def test_module_training_step_under_autocast(device):
    """Forward under autocast, backward outside it (the documented pattern): the activations are in
    the autocast dtype, the float32 parameters get float32 gradients, all as nn.Conv2d's."""
    torch.manual_seed(0)
    plain = small_model().to(device)
    ours = channelconv.convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 10, 10, device=device)
    dtype = DTYPES[device][0]
    results = []
    for model in (plain, ours):
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            loss = out.float().pow(2).mean()
        loss.backward()
        results.append((out, [p.grad for p in model.parameters()]))
    (ref, ref_grads), (out, grads) = results
    assert out.dtype == ref.dtype == dtype
    assert_close(out, ref.double(), dtype)
    for p, g, rg in zip(ours.parameters(), grads, ref_grads):
        assert g.dtype == rg.dtype == p.dtype == torch.float32
        # Through three low-precision layers: a few roundings to dtype more than one layer's tolerance.
        assert rel_error(g, rg) <= 4 * TOLERANCE[dtype]


def test_autocast_inside_torch_compile(device):
    """The autocast registration traces: torch.compile(fullgraph=True) of a function that enters
    autocast gives the eager dtype and values."""
    x, w, b = operands("direct", device)
    dtype = DTYPES[device][0]

    def f(x, w, b):
        with torch.autocast(device, dtype=dtype):
            return channelconv.conv2d(x, w, b, **ARGS, algorithm="direct")

    eager = f(x, w, b)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
    assert compiled.dtype == eager.dtype == dtype
    assert torch.equal(compiled, eager)
