"""Autograd beyond first-order reverse mode: forward-mode AD (torch.func.jvp, forward_ad dual
tensors, forward-over-reverse) through every op, and a gradient-penalty (WGAN-GP) training loop,
which differentiates a gradient. (gradcheck / gradgradcheck of reverse mode: test_gradcheck.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from conftest import GENERAL, assert_close, ours, reference, shape_for, tensors

import channelconv
from channelconv._ops import OPS, TAKES_WORKSPACE

# forward_ad.make_dual loads torch's jvp decompositions with torch.jit.script on first use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_func_jvp_matches_f_conv2d(device, algorithm):
    """torch.func.jvp: the tangent along every subset of (input, weight, bias) equals F.conv2d's."""
    shape = shape_for(algorithm)
    primals = tensors(shape, device)
    tangents = tensors(shape, device, seed=1)
    for which in ((0, 1, 2), (0,), (1,), (2,), (0, 1)):
        def restrict(f):  # f as a function of the arguments in `which` only
            def g(*moving):
                args = list(primals)
                for i, value in zip(which, moving):
                    args[i] = value
                return f(*args)
            return g

        args = tuple(primals[i] for i in which)
        dirs = tuple(tangents[i] for i in which)
        out, tangent = torch.func.jvp(restrict(ours(algorithm, shape)), args, dirs)
        ref_out, ref_tangent = torch.func.jvp(restrict(reference(shape)), args, dirs)
        assert_close(out, ref_out, torch.float64, f"primal {which}")
        assert_close(tangent, ref_tangent, torch.float64, f"tangent {which}")
        assert tangent.abs().sum() > 0  # not a silently dropped (zero) tangent


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_gradcheck_forward_mode_and_forward_over_reverse(device, algorithm):
    """Forward-mode Jacobians against finite differences (gradcheck check_forward_ad), and the
    tangent of the gradient (gradgradcheck check_fwd_over_rev) — what test_gradcheck.py leaves out."""
    shape = ((1, 2, 5, 4), (2, 2, 1, 1), (1, 2), (1, 0), (1, 1), 1) if algorithm == "1x1" else \
        ((1, 2, 5, 4), (4, 1, 2, 3), (2, 1), (1, 1), (1, 2), 2)
    x, w, b = (t.requires_grad_() for t in tensors(shape, device))
    f = ours(algorithm, shape)
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True, check_rev_over_rev=False,
                                        check_undefined_grad=False, fast_mode=True)


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_backward_ops_have_forward_mode(device, algorithm):
    """The backward ops themselves take dual tensors: their tangents equal F.conv2d's gradient
    formulas differentiated the same way (torch.nn.grad.conv2d_input / conv2d_weight)."""
    shape = shape_for(algorithm)
    input_shape, weight_shape, stride, padding, dilation, groups = shape
    x, w, _ = tensors(shape, device)
    dx, dw, _ = tensors(shape, device, seed=1)
    ops = OPS[algorithm]
    rest = (list(stride), list(padding), list(dilation), groups)
    rest += (channelconv.get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
    gy = torch.randn_like(F.conv2d(x, w, None, stride, padding, dilation, groups))
    dgy = torch.randn_like(gy)
    conv_args = (stride, padding, dilation, groups)
    with fwAD.dual_level():
        gx = ops.backward_input(fwAD.make_dual(gy, dgy), fwAD.make_dual(w, dw), list(input_shape), *rest)
        gw = ops.backward_weight(fwAD.make_dual(gy, dgy), fwAD.make_dual(x, dx), list(weight_shape), *rest)
        gx_tangent, gw_tangent = fwAD.unpack_dual(gx).tangent, fwAD.unpack_dual(gw).tangent
    # Bilinear: d backward_input(gy, w) = backward_input(dgy, w) + backward_input(gy, dw), by F's formulas.
    grad_input = torch.nn.grad.conv2d_input
    grad_weight = torch.nn.grad.conv2d_weight
    want_gx = grad_input(input_shape, w, dgy, *conv_args) + grad_input(input_shape, dw, gy, *conv_args)
    want_gw = grad_weight(x, weight_shape, dgy, *conv_args) + grad_weight(dx, weight_shape, gy, *conv_args)
    assert_close(gx_tangent, want_gx, torch.float64, "backward_input tangent")
    assert_close(gw_tangent, want_gw, torch.float64, "backward_weight tangent")


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_hessian_vector_product_forward_over_reverse(device, algorithm):
    """Forward-over-reverse HVP of a nonlinear loss (dual inputs, then torch.autograd.grad with
    create_graph): equal to F.conv2d's; and reverse-over-forward, the gradient of a tangent."""
    shape = shape_for(algorithm)
    x0, w0, b0 = tensors(shape, device)
    vx, vw, vb = tensors(shape, device, seed=1)

    def hvp(conv):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with fwAD.dual_level():
            y = conv(fwAD.make_dual(x, vx), fwAD.make_dual(w, vw), fwAD.make_dual(b, vb))
            loss = torch.tanh(y).pow(2).sum()
            grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
            hvps = [fwAD.unpack_dual(g).tangent for g in grads]
            # reverse-over-forward: d/dw of <tangent of y, y>
            y_tangent = fwAD.unpack_dual(y).tangent
            (rof,) = torch.autograd.grad((y_tangent * fwAD.unpack_dual(y).primal).sum(), w)
        return hvps + [rof]

    got, want = hvp(ours(algorithm, shape)), hvp(reference(shape))
    for name, g, r in zip(("input", "weight", "bias", "reverse-over-forward"), got, want):
        assert g is not None and g.abs().sum() > 0, name
        assert_close(g, r, torch.float64, name)


class Critic(nn.Module):
    """A small WGAN critic: strided 3x3 (direct), 3x3 (im2col), 1x1 (1x1), linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Softplus(),  # a curved activation: nonzero 2nd derivative
            nn.Conv2d(8, 16, 1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def wgan_gp_steps(critic, real, fake, alphas, steps):
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9))
    trace = []
    for step in range(steps):
        r, f, alpha = real[step], fake[step], alphas[step]
        mixed = (alpha * r + (1 - alpha) * f).requires_grad_()
        (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = critic(f).mean() - critic(r).mean() + 10 * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append((loss.item(), penalty.item()))
    return torch.tensor(trace)


def test_gradient_penalty_training_matches_nn_conv2d(device):
    """WGAN-GP: the penalty differentiates the critic's input gradient w.r.t. the weights (double
    backward through every algorithm). Losses, penalties and parameters follow nn.Conv2d's."""
    torch.manual_seed(0)
    plain = Critic().double().to(device)
    initial = copy.deepcopy(plain)
    critic = channelconv.convert(copy.deepcopy(plain))
    for conv, algorithm in zip([m for m in critic.modules() if isinstance(m, nn.Conv2d)], ("direct", "im2col", "1x1")):
        conv.algorithm = algorithm
    steps = 4
    real = torch.randn(steps, 3, 3, 8, 8, dtype=torch.float64, device=device)
    fake = torch.randn(steps, 3, 3, 8, 8, dtype=torch.float64, device=device)
    alphas = torch.rand(steps, 3, 1, 1, 1, dtype=torch.float64, device=device)
    want = wgan_gp_steps(plain, real, fake, alphas, steps)
    got = wgan_gp_steps(critic, real, fake, alphas, steps)
    assert (want[:, 1] > 0).all()  # the penalty is live
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got, want)
    for (name, p), q in zip(critic.named_parameters(), plain.parameters()):
        assert_close(p, q, torch.float64, name)
    assert not torch.equal(critic.body[2].weight, initial.body[2].weight)  # it trained


# Calls with nothing for autograd to record pass straight through the Autograd kernel; the modes
# that reach that path must still get F.conv2d's answer.


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_no_grad_and_inference_mode_match_f_conv2d(device, algorithm):
    shape = shape_for(algorithm)
    x, w, b = (t.requires_grad_() for t in tensors(shape, device))
    with torch.no_grad():
        out = ours(algorithm, shape)(x, w, b)
    assert not out.requires_grad and out.grad_fn is None
    assert_close(out, reference(shape)(x, w, b).detach(), torch.float64, "no_grad")
    with torch.inference_mode():
        out = ours(algorithm, shape)(x, w, b)
        assert out.is_inference()
        assert_close(out, reference(shape)(x, w, b), torch.float64, "inference_mode")


@pytest.mark.parametrize("algorithm", channelconv.ALGORITHMS)
def test_vmap_matches_f_conv2d(device, algorithm):
    """torch.vmap over a leading dimension of both input and weight (functorch's per-sample loop
    for ops without a batching rule, reached below the autograd key)."""
    shape = shape_for(algorithm)
    xs, ws, bs = (torch.stack([t, 2 * t + 1]) for t in tensors(shape, device))
    got = torch.vmap(ours(algorithm, shape))(xs, ws, bs)
    assert_close(got, torch.vmap(reference(shape))(xs, ws, bs), torch.float64, "vmap")


def _ops_run(fn) -> list[str]:
    """The channelconv ops a call of ``fn`` runs, in order (the profiler's record of the dispatcher)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name.removeprefix("channelconv::") for e in prof.events() if e.name.startswith("channelconv::")]


@pytest.mark.parametrize("x_grad, w_grad, b_grad", [(True, True, True), (False, True, True), (True, False, False),
                                                    (False, False, True)])
def test_backward_runs_only_the_gradients_asked_for(x_grad, w_grad, b_grad):
    """The Autograd kernel (csrc/autograd.cpp) records one node per call; its backward runs the
    backward_input op only when the input requires grad (not a network's first layer) and
    backward_weight only when the weight does (not a frozen layer), as ATen's convolution does."""
    x, w, b = tensors(GENERAL, "cpu")
    x.requires_grad_(x_grad), w.requires_grad_(w_grad), b.requires_grad_(b_grad)
    out = ours("direct", GENERAL)(x, w, b)
    assert out.grad_fn.name() == "channelconv_direct_forwardBackward"
    grad = torch.randn_like(out)
    ran = _ops_run(lambda: out.backward(grad))
    assert ran == ["direct_backward_input"] * x_grad + ["direct_backward_weight"] * w_grad
    copies = [t.detach().requires_grad_(t.requires_grad) for t in (x, w, b)]
    reference(GENERAL)(*copies).backward(grad)
    for name, t, want in zip(("input", "weight", "bias"), (x, w, b), copies):
        assert (t.grad is None) == (not t.requires_grad), name
        if t.grad is not None:
            assert_close(t.grad, want.grad, torch.float64, name)


def test_calls_with_nothing_to_record_leave_no_graph():
    """A call where nothing requires grad records no node and runs only its forward op (the
    Autograd kernel passes straight through), under no_grad too with tensors that do."""
    x, w, b = tensors(GENERAL, "cpu")
    out = ours("direct", GENERAL)(x, w, b)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        assert _ops_run(lambda: ours("direct", GENERAL)(x, w.requires_grad_(), b)) == ["direct_forward"]
