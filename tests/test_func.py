"""torch.func through channelconv: per-sample gradients (vmap over grad, as differential-privacy
trainers compute them), jacrev, jacfwd over jacrev (hessian), vmap over per-sample weights, and
Opacus's GradSampleModule, each against the same computation through nn.Conv2d / F.conv2d in
float64. Forward mode (torch.func.jvp) alone is in test_autograd_modes.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import algorithms_for, assert_close, reference, shape_for, tensors
from conftest import ours as conv
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import channelconv
from channelconv._ops import OP_PREFIX

# forward_ad (jacfwd) loads torch's jvp decompositions with torch.jit.script on first use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# Layers for the per-sample gradients: (in, out, kernel, stride, padding, dilation, groups,
# padding_mode), with the 1x1 cases every algorithm runs.
LAYERS = {
    "plain": (3, 4, 3, 1, 1, 1, 1, "zeros"),
    "grouped-strided": (4, 6, 3, 2, 1, 1, 2, "zeros"),
    "dilated-reflect": (2, 4, (3, 2), 1, 2, 2, 1, "reflect"),
    "same-circular": (2, 3, 3, 1, "same", 1, 1, "circular"),
    "1x1-strided": (4, 6, 1, 2, 0, 1, 2, "zeros"),
    "1x1": (3, 5, 1, 1, 0, 1, 1, "zeros"),
}


def net(layer, device):
    c_in, c_out, kernel, stride, padding, dilation, groups, mode = layer
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, padding_mode=mode),
        nn.Tanh(),  # not linear: the per-sample weight gradient depends on the sample twice
        nn.Conv2d(c_out, 2, 1),
    ).to(device, torch.float64)


def cases():
    for name, layer in LAYERS.items():
        for algorithm in algorithms_for((layer[2],) * 2 if isinstance(layer[2], int) else layer[2]):
            yield pytest.param(layer, algorithm, id=f"{name}-{algorithm}")


def per_sample_loop(model, x, y):
    """The per-sample gradients by a loop of torch.autograd.grad, one sample at a time."""
    grads = [torch.autograd.grad(F.mse_loss(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
             for i in range(len(x))]
    return [torch.stack(g) for g in zip(*grads)]


def per_sample_vmap(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params, sample, target):
        out = functional_call(model, params, (sample.unsqueeze(0),))
        return F.mse_loss(out, target.unsqueeze(0))

    return list(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y).values())


@pytest.mark.parametrize("layer, algorithm", list(cases()))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_per_sample_gradients_equal_a_loop_through_nn_conv2d(device, layer, algorithm, channels_last):
    model = net(layer, device)
    ours = channelconv.convert(copy.deepcopy(model), algorithm)
    x = torch.randn(5, layer[0], 9, 8, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = model(x).detach().normal_()
    want = per_sample_loop(model, x, y)
    got = per_sample_vmap(ours, x, y)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert_close(g, w, torch.float64, f"per-sample grad of {name}")


@pytest.fixture
def no_vmap_fallback():
    """vmap with functorch's per-sample loop for ops without a batching rule switched off: such
    an op then raises instead."""
    functorch = torch._C._functorch
    before = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    yield
    functorch._set_vmap_fallback_enabled(before)


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_per_sample_gradients_run_on_batching_rules(algorithm, no_vmap_fallback):
    """Every op reached under vmap has a batching rule that folds the samples into one call, and
    the weight gradient of a layer is one grouped backward_weight call for the whole batch."""
    layer = LAYERS["1x1" if algorithm == "1x1" else "plain"]
    ours = channelconv.convert(net(layer, "cpu"), algorithm)
    x = torch.randn(6, layer[0], 7, 7, dtype=torch.float64)
    y = ours(x).detach()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        per_sample_vmap(ours, x, y)
    backward_weight = f"channelconv::{OP_PREFIX[algorithm]}_backward_weight"
    calls = [e.input_shapes for e in prof.events() if e.name == backward_weight]
    # the first layer's weight gradient: the 6 samples' output gradients side by side, 6 groups
    assert [[1, 6 * layer[1], 7, 7], [1, 6 * layer[0], 7, 7]] in [shapes[:2] for shapes in calls], calls


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_jacrev_and_hessian_match_f_conv2d(device, algorithm):
    shape = shape_for(algorithm)
    x, w, b = tensors(shape, device)
    ours, ref = conv(algorithm, shape), reference(shape)
    for argnums in (0, 1, 2, (0, 1)):
        got, want = jacrev(ours, argnums)(x, w, b), jacrev(ref, argnums)(x, w, b)
        for g, r in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
            assert_close(g, r, torch.float64, f"jacrev argnums={argnums}")

    def loss(conv):  # not quadratic: the Hessian depends on the point
        return lambda x, w: conv(x, w, b).sin().sum()

    for argnums in (0, 1):
        got, want = hessian(loss(ours), argnums)(x, w), hessian(loss(ref), argnums)(x, w)
        assert_close(got, want, torch.float64, f"hessian argnums={argnums}")
    # the mixed second derivative, by forward over reverse and by reverse over reverse
    want = jacfwd(jacrev(loss(ref), 0), 1)(x, w)
    assert_close(jacfwd(jacrev(loss(ours), 0), 1)(x, w), want, torch.float64, "mixed hessian, forward over reverse")
    assert_close(jacrev(jacrev(loss(ours), 0), 1)(x, w), want, torch.float64, "mixed hessian, reverse over reverse")


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_vmap_over_per_sample_weights_and_their_gradients(device, algorithm):
    """A vmapped weight (an ensemble, or a hypernetwork's output) is a grouped convolution: the
    outputs and the gradients of every argument, vmapped over each subset of them."""
    shape = shape_for(algorithm)
    ours, ref = conv(algorithm, shape), reference(shape)
    batch = [torch.stack([t, 2 * t - 1, -t]) for t in tensors(shape, device)]
    single = tensors(shape, device, seed=1)
    for vmapped in ((0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)):
        args = [batch[i] if i in vmapped else single[i] for i in range(3)]
        in_dims = tuple(0 if i in vmapped else None for i in range(3))
        for argnums in (0, 1, 2):
            def g(conv):
                return vmap(grad(lambda *a: conv(*a).pow(2).sum(), argnums), in_dims)(*args)
            assert_close(g(ours), g(ref), torch.float64, f"vmapped {vmapped}: grad of argument {argnums}")
        got = vmap(ours, in_dims)(*args)
        assert_close(got, vmap(ref, in_dims)(*args), torch.float64, f"vmapped {vmapped}: output")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # the input needs no grad
def test_opacus_grad_sample_module_gives_nn_conv2d_grad_samples():
    opacus = pytest.importorskip("opacus")
    model = net(LAYERS["grouped-strided"], "cpu")
    ours = channelconv.convert(copy.deepcopy(model), "auto")
    x = torch.randn(4, 4, 9, 8, dtype=torch.float64)
    y = model(x).detach().normal_()
    grad_samples = []
    for m in (model, ours):
        wrapped = opacus.GradSampleModule(m)  # nn.Conv2d: Opacus's own rule; ours: its torch.func path
        F.mse_loss(wrapped(x), y).backward()
        # Opacus's rules go by exact type: a channelconv.Conv2d takes its torch.func path
        assert hasattr(m[0], "ft_compute_sample_grad") == (m is ours)
        grad_samples.append([p.grad_sample for p in m.parameters()])
    for (name, _), got, want in zip(model.named_parameters(), grad_samples[1], grad_samples[0]):
        assert_close(got, want, torch.float64, f"grad_sample of {name}")


def test_auto_and_cost_under_transforms_decide_as_outside_them():
    """cost() (the C++ plans) and 'auto' inside vmap(grad(...)) give what they give outside."""
    args = ((256, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1)
    want_cost, want_choice = channelconv.cost(*args), channelconv.choose(*_explicit(args))
    seen = []

    def f(x):
        seen.append((channelconv.cost(*args), channelconv.choose(*_explicit(args))))
        return x.sum()

    vmap(grad(f))(torch.randn(3, 2))
    assert seen == [(want_cost, want_choice)]


def _explicit(args):
    input_shape, weight_shape, stride, padding, dilation, groups = args
    return input_shape, weight_shape, (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups
