"""Shared test helpers: the float64 F.conv2d oracle, the error measure, the devices."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import channelconv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative error ||out - ref|| / ||ref|| allowed against the float64 oracle (DESIGN.md).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3,
             torch.complex128: 1e-12, torch.complex64: 1e-5}

# Rounding error in a sum is bounded relative to the sum of its terms' magnitudes, not to the sum:
# when the terms cancel, no computation in the dtype meets the tolerance relative to the result
# (a hypothesis draw: a float32 weight gradient of six terms summing to 1/2000 of their magnitudes,
# relative error 3e-5). Up to CANCELLATION times the result's norm the scale stays the result's.
CANCELLATION = 100

if torch.cuda.is_available():  # the oracle must compute in full precision
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a loaded two-core machine every two-thread OpenMP
    region can cost milliseconds, which adds up over thousands of small calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def limit():
    """channelconv.set_workspace_limit for the test; the limit before it is restored after."""
    before = channelconv.get_workspace_limit()
    yield channelconv.set_workspace_limit
    channelconv.set_workspace_limit(before)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
                 magnitude: torch.Tensor | None = None):
    """``magnitude``: the oracle computed on the terms' absolute values (see CANCELLATION)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    if magnitude is not None and err > 0:
        scale = max(ref.double().norm().item(), magnitude.double().norm().item() / CANCELLATION)
        err = (out.double() - ref.double()).norm().item() / scale if scale > 0 else err
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def f_conv2d(*args):
    """F.conv2d without oneDNN: torch's oneDNN path can crash the process (SIGSEGV) on some small
    float32 channels_last shapes (tests/test_fuzz.py's docstring has one); its reference path
    computes the same function, raises the same errors and picks the same memory format."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.conv2d(*args)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def oracle(x, w, b, stride, padding, dilation, groups):
    """F.conv2d in float64 on contiguous copies of the arguments. (Contiguous: in torch 2.13 the
    float64 CPU F.conv2d computes a wrong weight gradient for some strided channels_last slices.)"""
    x, w = x.double().contiguous(), w.double().contiguous()
    return F.conv2d(x, w, None if b is None else b.double(), stride, padding, dilation, groups)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_selftest_ops():
    """Builds and loads the self-test ops of csrc/testing/ (namespace channelconv_testing), which
    the product never builds; with CHANNELCONV_SANITIZE set (.ci/sanitize.sh) under the same
    sanitizers as the extension."""
    from torch.utils.cpp_extension import load

    sanitize = os.environ.get("CHANNELCONV_SANITIZE")
    flags = ["-O1", "-g"] + ([f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-wrapv"] if sanitize else [])
    build = os.path.join(ROOT, "build", "selftest-sanitize" if sanitize else "selftest")
    os.makedirs(build, exist_ok=True)
    load(name="channelconv_selftest_sanitize" if sanitize else "channelconv_selftest",
         sources=[os.path.join(ROOT, "csrc", "testing", "index_selftest.cpp")], extra_cflags=flags,
         extra_ldflags=[f"-fsanitize={sanitize}"] if sanitize else [], build_directory=build, is_python_module=False,
         verbose=False)
    return torch.ops.channelconv_testing


def algorithms_for(kernel_size):
    return [a for a in channelconv.ALGORITHMS if a != "1x1" or tuple(kernel_size) == (1, 1)]


# One layer's calls for the autograd and torch.func tests. (input shape, weight shape, stride,
# padding, dilation, groups): grouped + strided + dilated with an odd kernel, and a 1x1 case every
# algorithm runs.
GENERAL = ((2, 4, 7, 6), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2)
ONE_BY_ONE = ((2, 4, 5, 6), (6, 2, 1, 1), (1, 2), (0, 1), (1, 1), 2)


def shape_for(algorithm):
    return ONE_BY_ONE if algorithm == "1x1" else GENERAL


def tensors(shape, device, dtype=torch.float64, seed=0):
    input_shape, weight_shape, *_ = shape
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g, dtype=dtype).to(device)
                 for s in (input_shape, weight_shape, (weight_shape[0],)))


def ours(algorithm, shape):
    _, _, stride, padding, dilation, groups = shape
    return lambda x, w, b: channelconv.conv2d(x, w, b, stride, padding, dilation, groups, algorithm=algorithm)


def reference(shape):
    _, _, stride, padding, dilation, groups = shape
    return lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups)
