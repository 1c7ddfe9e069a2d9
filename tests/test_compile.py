"""torch.compile(fullgraph=True) of channelconv.conv2d and of a channelconv model, static and
dynamic shapes, forward and backward, against eager; torch.export of a converted model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close
from torch._dynamo.testing import CompileCounterWithBackend

import channelconv

DTYPE = torch.float64  # inductor computes float64 too: eager and compiled agree to rounding


def channelconv_ops(graph: torch.fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "channelconv" in str(n.target)}


def three_algorithms(x, w3, w1, b):
    """One function that runs every algorithm: two 3x3 layers and a 1x1 layer."""
    y = channelconv.conv2d(x, w3, b, padding=1, algorithm="direct")
    y = y + channelconv.conv2d(x, w3, None, padding=(1, 1), algorithm="im2col")
    y = y + channelconv.conv2d(x, w1, b, algorithm="1x1")
    return torch.tanh(y)


def reference(x, w3, w1, b):
    return torch.tanh(F.conv2d(x, w3, b, padding=1) + F.conv2d(x, w3, None, padding=1) + F.conv2d(x, w1, b))


def operands(device, n=2, h=7, w=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((n, 4, h, w), (6, 4, 3, 3), (6, 4, 1, 1), (6,))
    return [torch.randn(s, generator=g, dtype=DTYPE).to(device).requires_grad_() for s in shapes]


def value_and_grads(f, args):
    out = f(*args)
    grads = torch.autograd.grad(out.pow(2).sum(), args)
    return out, grads


def check_against_eager(compiled, args, eager=three_algorithms, ref=reference):
    out, grads = value_and_grads(compiled, args)
    want, want_grads = value_and_grads(eager, args)
    assert_close(out, want, DTYPE, "compiled vs eager")
    assert_close(out, ref(*args), DTYPE, "compiled vs F.conv2d")
    for i, (g, wg) in enumerate(zip(grads, want_grads)):
        assert_close(g, wg, DTYPE, f"grad {i}")


def test_compile_conv2d_fullgraph(device):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(three_algorithms, fullgraph=True, backend=counter)  # fullgraph: a break raises
    check_against_eager(compiled, operands(device))
    assert counter.frame_count == 1
    assert channelconv_ops(counter.graphs[0].graph) == {
        "channelconv.direct_forward.default", "channelconv.im2col_forward.default", "channelconv.conv1x1_forward.default"}


def test_compile_conv2d_dynamic_shapes(device):
    """dynamic=True: one compiled graph serves every batch size and image size."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(three_algorithms, fullgraph=True, dynamic=True, backend=counter)
    # (The first sizes differ from each other and from the channel counts 4 and 6: equal sizes would
    # be "duck-sized" into one symbol, and a later call with them unequal would recompile.)
    for n, h, w in ((2, 7, 9), (3, 10, 8), (5, 6, 6)):
        check_against_eager(compiled, operands(device, n, h, w, seed=n))
    assert counter.frame_count == 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),   # depthwise
            nn.Conv2d(8, 16, 1), nn.ReLU(),                                   # pointwise
            nn.Conv2d(16, 16, 3, padding="same", dilation=2, padding_mode="reflect"),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def models(device):
    torch.manual_seed(0)
    plain = Net().to(device, DTYPE)
    return plain, channelconv.convert(copy.deepcopy(plain))


def model_step(model, x):
    out = model(x)
    out.logsumexp(1).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out, grads


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_model_fullgraph(device, dynamic, backend):
    """A converted model, compiled whole: outputs and parameter gradients equal eager (and nn.Conv2d's).
    aot_eager traces forward and backward through the registrations as inductor does, without code
    generation: inductor itself runs on channelconv.conv2d above, on the model under -m slow."""
    torch._dynamo.reset()
    plain, ours = models(device)
    eager = copy.deepcopy(ours)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(ours, fullgraph=True, dynamic=dynamic, backend=counter)
    sizes = ((4, 11, 13), (2, 10, 12)) if dynamic else ((4, 11, 13), (4, 11, 13))
    compiles = []
    for n, h, w in sizes:
        x = torch.randn(n, 3, h, w, dtype=DTYPE, device=device)
        got, got_grads = model_step(compiled, x)
        compiles.append(counter.frame_count)
        for other in (eager, plain):
            want, want_grads = model_step(other, x)
            assert_close(got, want, DTYPE, "output")
            for (name, _), g, wg in zip(ours.named_parameters(), got_grads, want_grads):
                assert_close(g, wg, DTYPE, name)
    assert compiles[0] >= 1 and compiles[-1] == compiles[0], compiles  # nothing recompiled for the new shape
    ops = set().union(*(channelconv_ops(g.graph) for g in counter.graphs))
    assert ops == {"channelconv.im2col_forward.default", "channelconv.conv1x1_forward.default"}  # by "auto"
    # batch norm's running statistics were updated by the compiled model as in eager
    assert_close(ours.features[1].running_mean, eager.features[1].running_mean, DTYPE, "running mean")


def test_export_converted_model(device):
    """torch.export: the program holds channelconv ops (no aten convolution), keeps them through
    run_decompositions(), runs on another batch size, survives save/load, matches eager."""
    _, ours = models(device)
    ours.eval()
    x = torch.randn(2, 3, 12, 12, dtype=DTYPE, device=device)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(ours, (x,), dynamic_shapes={"x": {0: batch}})
    decomposed = program.run_decompositions()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for ep in (program, decomposed, loaded):
        ops = channelconv_ops(ep.graph)
        assert ops == {"channelconv.im2col_forward.default", "channelconv.conv1x1_forward.default"}, ops
        assert not any("convolution" in str(n.target) for n in ep.graph.nodes)
        for n in (2, 5):
            xn = torch.randn(n, 3, 12, 12, dtype=DTYPE, device=device)
            assert_close(ep.module()(xn), ours(xn), DTYPE, "exported vs eager")


@pytest.mark.parametrize("algorithm", ["direct", "im2col"])
def test_compiled_shape_error_names_the_argument(algorithm):
    """Under torch.compile the fake kernel checks shapes as the C++ op does: the error names the
    argument and its size, as in eager."""
    x, w = torch.randn(2, 5, 8, 8), torch.randn(4, 6, 3, 3)

    def f(x, w):
        return channelconv.conv2d(x, w, algorithm=algorithm)

    with pytest.raises(Exception, match=r"expected input\[2, 5, 8, 8\] to have 6 channels"):
        f(x, w)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from channelconv._ops import OPS, TAKES_WORKSPACE
    extra = (1 << 20,) if TAKES_WORKSPACE[algorithm] else ()
    with FakeTensorMode() as mode:  # the fake kernel alone, as a trace runs it
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        with pytest.raises(Exception, match=r"expected input\[2, 5, 8, 8\] to have 6 channels"):
            OPS[algorithm].forward(fx, fw, None, (1, 1), (0, 0), (1, 1), 1, *extra)
        with pytest.raises(Exception, match=r"expected grad_output of size \[2, 4, 6, 6\]"):
            OPS[algorithm].backward_input(mode.from_tensor(torch.randn(2, 4, 5, 5)), fw, (2, 6, 8, 8), (1, 1), (0, 0),
                                          (1, 1), 1, *extra)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"expected input\[2, 5, 8, 8\] to have 6 channels"):
        torch.compile(f, fullgraph=True, backend="eager")(x, w)
