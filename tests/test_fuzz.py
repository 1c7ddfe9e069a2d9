"""Fuzzing (slow): hypothesis over edge shapes and bad inputs. Every case either equals F.conv2d
(every applicable algorithm and 'auto'; forward always, the three gradients for every
GRAD_EVERY-th case; im2col often under a workspace limit of a few output rows, so bands are
ragged) or raises the same kind of error F.conv2d raises. Kinds: TypeError; "bad value"
(ValueError or RuntimeError: PyTorch's C++ checks raise RuntimeError where channelconv raises
the more precise ValueError, and DESIGN.md promises "a ValueError / RuntimeError"); anything
else is a kind of its own (an IndexError, say), and a crash ends the run.

Documented deviations, where channelconv raises a "bad value" error and F.conv2d computes:
  * zero input channels: F.conv2d returns a tensor with 0 output channels (not C_out), even with
    an empty kernel; channelconv rejects the input ("at least one channel");
  * integer dtypes: F.conv2d computes them; channelconv supports floating and complex dtypes only;
  * stride / padding / dilation above 2^31 - 1 (padding='same' included, as computed from the
    dilated kernel): rejected ("too large") so size arithmetic cannot overflow;
  * an empty batch with a zero dilation: F.conv2d returns an empty tensor without checking the
    dilation; channelconv checks its arguments whatever the batch;
  * a weight or bias whose dtype differs from the input's: F.conv2d accepts it on some paths (an
    empty batch; a 1x1 image with a 1x1 kernel) and refuses it on others; channelconv always does.
And one where F.conv2d's own error is odd: an empty kernel with an empty batch makes F.conv2d
raise IndexError (select(): index 0 out of range); it counts as a "bad value" error there.

The oracle runs F.conv2d with oneDNN (mkldnn) disabled: in torch 2.13.0 its oneDNN path crashes
the process (SIGSEGV) on some of these shapes, e.g. float32 channels_last input (3, 2, 3, 1) and
weight (3, 2, 3, 1) with a bias, stride (13, 2), padding (3, 1), dilation (2, 5), within a few
hundred calls, with channelconv not even imported. PyTorch's reference path computes the same
function (and raises the same errors), so the comparison is unchanged.

The cases run on one intra-op thread: they are tiny, and on a loaded machine each OpenMP region
of two threads can cost milliseconds (test_correctness and test_threads cover the threaded paths).

CHANNELCONV_FUZZ_CASES (default 10500) sets the number of cases; 2/3 edge shapes, 1/3 bad inputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, f_conv2d
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import channelconv

pytestmark = pytest.mark.slow

TOTAL_CASES = int(os.environ.get("CHANNELCONV_FUZZ_CASES", "10500"))
EDGE_CASES = TOTAL_CASES * 2 // 3
BAD_CASES = TOTAL_CASES - EDGE_CASES
GRAD_EVERY = 8
MAX_ARGUMENT = 2**31 - 1  # csrc/conv_params.cpp, check_pair
# CHANNELCONV_FUZZ_TRACE=path: append every call to that file before making it.
TRACE = open(os.environ["CHANNELCONV_FUZZ_TRACE"], "a") if os.environ.get("CHANNELCONV_FUZZ_TRACE") else None
FLOAT_DTYPES = (torch.float64, torch.float32)


@dataclass
class Args:
    """Everything one conv2d call gets; shapes rather than tensors so a case can be mutated."""

    input_shape: tuple
    weight_shape: tuple
    bias_shape: tuple | None
    stride: object
    padding: object
    dilation: object
    groups: object
    dtype: torch.dtype = torch.float64
    weight_dtype: torch.dtype | None = None  # None: same as dtype
    bias_dtype: torch.dtype | None = None
    layout: str = "contiguous"  # 'contiguous', 'channels_last' or 'strided'
    band_rows: int = 0  # > 0: run im2col under a workspace limit of this many output rows
    seed: int = 0
    mutations: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Strategies


# Hypothesis spends about 0.1 ms per draw; a case is a handful of draws from precomputed
# configurations (ordered simplest first, so failures shrink toward them), not dozens.


def _axis_configs():
    """(input extent, kernel, stride, padding, dilation) of one valid axis, by edge: a 1-pixel
    image, a kernel exactly as large as the padded input, a stride larger than the padded input,
    and ordinary sizes; every kernel 1..4 with dilations up to 9."""
    configs = {"one pixel": [], "kernel == padded input": [], "stride > input": [], "ordinary": []}
    for kernel in range(1, 5):
        for dilation in (1, 2, 3, 5, 9):
            extent = dilation * (kernel - 1) + 1
            one = [(1, p) for p in (extent // 2, extent // 2 + 1)]
            exact = [(extent - 2 * p, p) for p in range((extent - 1) // 2 + 1)]
            ordinary = [(max(1, extent - 2 * p) + extra, p) for p in range(4) for extra in range(6)]
            for mode, sizes in (("one pixel", one), ("kernel == padded input", exact), ("ordinary", ordinary)):
                for size, pad in sizes:
                    configs[mode] += [(size, kernel, stride, pad, dilation) for stride in (1, 2, 3)]
            for size, pad in one + exact + ordinary[::5]:
                configs["stride > input"] += [(size, kernel, size + 2 * pad + extra, pad, dilation)
                                              for extra in (1, 2, 4)]
    return {mode: sorted(c, key=lambda t: (t[1] * t[4], t[2], t[3], t[0])) for mode, c in configs.items()}


AXES = _axis_configs()
AXIS_MODES = sorted(AXES)
# (groups, input channels per group, output channels per group): one channel, grouped, depthwise
# (one input channel per group) with a channel multiplier of 1..3.
CHANNELS = sorted({(g, c, m) for g in (1, 2, 3, 4) for c in (1, 2, 3) for m in (1, 2, 3)},
                  key=lambda t: (t[0] * t[1] * t[2], t))


def _choice(flags: int, options):
    """Options[flags % len], and the remaining flags."""
    return options[flags % len(options)], flags // len(options)


def _form(pair, style):
    """An int when both entries agree and style says so, else a tuple or list (F.conv2d takes all)."""
    if pair[0] == pair[1] and style == 0:
        return pair[0]
    return (tuple, list, tuple)[style](pair)


@st.composite
def edge_args(draw) -> Args:
    groups, in_per_group, multiplier = draw(st.sampled_from(CHANNELS))
    (h, kh, sh, ph, dh), (w, kw, sw, pw, dw) = (
        draw(st.sampled_from(AXES[draw(st.sampled_from(AXIS_MODES))])) for _ in range(2))
    flags = draw(st.integers(0, 2**20 - 1))  # everything else: batch, forms, bias, dtype, layout, bands
    batch, flags = _choice(flags, (1, 2, 0, 3))
    unbatched, flags = _choice(flags, (False, True))
    stride_form, flags = _choice(flags, (0, 1, 2))
    dilation_form, flags = _choice(flags, (0, 1, 2))
    padding_form, flags = _choice(flags, (0, 1, 2, "same", "valid"))
    bias, flags = _choice(flags, (False, True))
    dtype, flags = _choice(flags, (torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16))
    layout, flags = _choice(flags, ("contiguous", "channels_last", "strided"))
    band_rows, flags = _choice(flags, (0, 1, 2, 3))
    if padding_form == "same" and (sh, sw) != (1, 1) or padding_form == "valid" and (ph, pw) != (0, 0):
        padding_form = 1  # 'same' only at stride 1; 'valid' only where no padding was drawn
    padding = padding_form if isinstance(padding_form, str) else _form((ph, pw), padding_form)
    input_shape = (batch, groups * in_per_group, h, w)
    if batch == 1 and unbatched:
        input_shape = input_shape[1:]
    out_channels = groups * multiplier
    return Args(
        input_shape=input_shape, weight_shape=(out_channels, in_per_group, kh, kw),
        bias_shape=(out_channels,) if bias else None,
        stride=_form((sh, sw), stride_form), padding=padding, dilation=_form((dh, dw), dilation_form), groups=groups,
        dtype=dtype, layout=layout, band_rows=band_rows, seed=flags,
    )


def _set_axis(value, index, new):
    """stride/padding/dilation with entry `index` replaced (an int becomes a pair)."""
    if isinstance(value, str):
        value = 0
    pair = [value, value] if isinstance(value, int) else list(value) * (3 - len(value))  # (v,) -> [v, v]
    pair[index] = new
    return tuple(pair)


def _resize(shape, dim, new):
    shape = list(shape)
    shape[dim] = new
    return tuple(shape)


# Each mutation turns a valid call into a (usually) bad one; draw(...) supplies its details.
MUTATIONS = {
    "input 2-D": lambda a, d: replace(a, input_shape=a.input_shape[-2:]),
    "input 5-D": lambda a, d: replace(a, input_shape=(1, *a.input_shape[-4:])),
    "weight 3-D": lambda a, d: replace(a, weight_shape=a.weight_shape[:3]),
    "weight 5-D": lambda a, d: replace(a, weight_shape=(*a.weight_shape, 1)),
    "input channels": lambda a, d: replace(
        a, input_shape=_resize(a.input_shape, -3, max(1, a.input_shape[-3] + d(st.sampled_from([-1, 1, 2]))))),
    "zero input channels": lambda a, d: replace(
        a, input_shape=_resize(a.input_shape, -3, 0), weight_shape=_resize(a.weight_shape, 1, 0)),
    "output channels": lambda a, d: replace(a, weight_shape=_resize(a.weight_shape, 0, d(st.integers(0, 5)))),
    "empty kernel": lambda a, d: replace(a, weight_shape=_resize(a.weight_shape, d(st.sampled_from([2, 3])), 0)),
    "zero height or width": lambda a, d: replace(a, input_shape=_resize(a.input_shape, d(st.sampled_from([-1, -2])), 0)),
    "empty batch": lambda a, d: replace(a, input_shape=_resize(a.input_shape, 0, 0)) if len(a.input_shape) == 4 else a,
    "groups": lambda a, d: replace(a, groups=d(st.sampled_from([0, -1, 2, 3, 4, 5, 7]))),
    "stride": lambda a, d: replace(a, stride=_set_axis(a.stride, d(st.integers(0, 1)), d(st.sampled_from([0, -1, -3])))),
    "large stride": lambda a, d: replace(a, stride=_set_axis(
        a.stride, d(st.integers(0, 1)), d(st.sampled_from([2**16, 2**31 - 1, 2**31, 2**40])))),
    "padding": lambda a, d: replace(a, padding=_set_axis(a.padding, d(st.integers(0, 1)), d(st.sampled_from([-1, -2])))),
    "huge padding": lambda a, d: replace(a, padding=_set_axis(a.padding, d(st.integers(0, 1)), d(st.sampled_from([2**31, 2**40])))),
    "dilation": lambda a, d: replace(a, dilation=_set_axis(a.dilation, d(st.integers(0, 1)), d(st.sampled_from([0, -1])))),
    "large dilation": lambda a, d: replace(a, dilation=_set_axis(
        a.dilation, d(st.integers(0, 1)), d(st.sampled_from([2**20, 2**31 - 1, 2**31, 2**40])))),
    "padding string": lambda a, d: replace(a, padding=d(st.sampled_from(["same", "valid", "full", "SAME", ""]))),
    "same with stride": lambda a, d: replace(a, padding="same", stride=d(st.sampled_from([2, (1, 2), (3, 1)]))),
    "shrink input": lambda a, d: replace(a, input_shape=_resize(a.input_shape, d(st.sampled_from([-1, -2])), 1),
                                         padding=0),
    "bias length": lambda a, d: replace(a, bias_shape=(max(0, a.weight_shape[0] + d(st.sampled_from([-1, 1]))),)),
    "bias 2-D": lambda a, d: replace(a, bias_shape=(a.weight_shape[0], 1)),
    "bias dtype": lambda a, d: replace(a, bias_shape=(a.weight_shape[0],),
                                       bias_dtype=d(st.sampled_from([torch.float32, torch.float64, torch.float16]))),
    "weight dtype": lambda a, d: replace(a, weight_dtype=d(st.sampled_from([torch.float32, torch.float64,
                                                                             torch.bfloat16, torch.int64]))),
    "integer dtype": lambda a, d: replace(a, dtype=d(st.sampled_from([torch.int64, torch.int32]))),
    "complex dtype": lambda a, d: replace(a, dtype=torch.complex128),
    "one-element pair": lambda a, d: replace(a, stride=(d(st.integers(1, 3)),), dilation=[d(st.integers(1, 2))]),
}


@st.composite
def bad_args(draw) -> Args:
    args = draw(edge_args())
    for name in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=2)):
        try:
            args = MUTATIONS[name](args, draw)
        except IndexError:  # not applicable after an earlier mutation (a channel count of a 2-D input)
            continue
        args.mutations = [*args.mutations, name]
    return args


# ---------------------------------------------------------------------------------------------
# One case against F.conv2d


class Count:
    cases = matched = raised = deviations = runs = gradient_checks = 0
    by_deviation: dict = {}

    @classmethod
    def reset(cls):
        cls.cases = cls.matched = cls.raised = cls.deviations = cls.runs = cls.gradient_checks = 0
        cls.by_deviation = {}


def _tensor(shape, dtype, generator):
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return torch.randint(-3, 4, shape, generator=generator, dtype=dtype)


def make_tensors(args: Args):
    g = torch.Generator().manual_seed(args.seed)
    shape = args.input_shape
    if args.layout == "strided" and len(shape) >= 1:  # every other column of a twice-as-wide tensor
        x = _tensor((*shape[:-1], 2 * shape[-1]), args.dtype, g)[..., ::2]
    else:
        x = _tensor(shape, args.dtype, g)
    w = _tensor(args.weight_shape, args.weight_dtype or args.dtype, g)
    b = None if args.bias_shape is None else _tensor(args.bias_shape, args.bias_dtype or args.dtype, g)
    if args.layout == "channels_last" and x.dim() == 4 and w.dim() == 4:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return x, w, b


def kind(error: BaseException, oracle: bool = False) -> str:
    if isinstance(error, TypeError):
        return "TypeError"
    if isinstance(error, (ValueError, RuntimeError)) or (oracle and isinstance(error, IndexError)):
        return "bad value"
    return type(error).__name__


def _values(v):
    return [v] if isinstance(v, int) else list(v) if isinstance(v, (tuple, list)) else []


def deviation(args: Args, x, w) -> str | None:
    """Which documented deviation applies (channelconv refuses what F.conv2d computes), if any."""
    padding = _values(args.padding)
    if args.padding == "same" and w.dim() == 4:  # what 'same' becomes: dilation * (k - 1) // 2 per axis
        dilation = _values(args.dilation) * (2 // max(1, len(_values(args.dilation))))
        padding = [d * (k - 1) // 2 for d, k in zip(dilation, w.shape[2:])]
    if any(abs(v) > MAX_ARGUMENT for v in (*_values(args.stride), *padding, *_values(args.dilation))):
        return "too large"
    if any(not (t.dtype.is_floating_point or t.dtype.is_complex) for t in (x, w)):
        return "unsupported dtype"
    if x.dim() in (3, 4) and w.dim() == 4 and x.shape[-3] == 0:
        return "zero input channels"
    if x.dim() == 4 and x.shape[0] == 0 and 0 in _values(args.dilation):
        return "empty batch, zero dilation"
    if (args.weight_dtype or args.dtype) != args.dtype or (
            args.bias_shape is not None and (args.bias_dtype or args.dtype) != args.dtype):
        return "mixed dtypes"
    return None


def call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001  (any exception is an outcome to compare)
        return None, error


def algorithms_for(w) -> list[str]:
    one_by_one = w.dim() == 4 and tuple(w.shape[2:]) == (1, 1)
    return [a for a in (*channelconv.ALGORITHMS, "auto") if a != "1x1" or one_by_one]


def row_bytes(x, w, out) -> int:
    """Bytes of one output row of im2col's column buffer."""
    return x.shape[-3] * w.shape[2] * w.shape[3] * out.shape[-1] * x.element_size()


def check(args: Args, gradients: bool):
    Count.cases += 1
    x, w, b = make_tensors(args)
    conv = (args.stride, args.padding, args.dilation, args.groups)
    dev = deviation(args, x, w)
    # F.conv2d on the same tensors decides the expected outcome; with a padding past 2^31 it is
    # not even tried (it would try to allocate the output), channelconv must refuse it.
    if any(abs(v) > MAX_ARGUMENT for v in _values(args.padding)):
        expected, f_error = None, None
    else:
        if TRACE:
            TRACE.write(f"F.conv2d, {args}\n")
            TRACE.flush()
        expected, f_error = call(f_conv2d, x, w, b, *conv)
    reference = scale = None
    for algorithm in algorithms_for(w):
        Count.runs += 1
        limit = channelconv.get_workspace_limit()
        band = args.band_rows and expected is not None and expected.numel() > 0 and algorithm in ("im2col", "auto")
        if band:
            channelconv.set_workspace_limit(args.band_rows * row_bytes(x, w, expected))
        where = f"algorithm={algorithm}, {args}"
        if TRACE:  # a crash kills the process: the trace's last line is the case that did it
            TRACE.write(where + "\n")
            TRACE.flush()
        try:
            out, error = call(channelconv.conv2d, x, w, b, *conv, algorithm=algorithm)
        finally:
            channelconv.set_workspace_limit(limit)
        if f_error is not None:
            assert error is not None, f"F.conv2d raised {f_error!r} but channelconv returned a result: {where}"
            assert kind(error) == kind(f_error, oracle=True), (
                f"F.conv2d raised {f_error!r}, channelconv {error!r}: {where}")
            Count.raised += 1
        elif dev is not None:
            assert error is not None and kind(error) == "bad value", (
                f"expected channelconv to refuse this ({dev}), got {error!r} / a result: {where}")
            Count.deviations += 1
            Count.by_deviation[dev] = Count.by_deviation.get(dev, 0) + 1
        else:
            assert error is None, f"F.conv2d computed this but channelconv raised {error!r}: {where}"
            assert out.dtype == expected.dtype, where
            if reference is None:
                (reference,), (scale,) = oracle(x, w, b, conv)
            assert_matches(out, reference, scale, x.dtype, f"forward, {where}")
            if out.dim() == 4 and out.numel() > 0:
                assert out.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
                    memory_format=torch.channels_last), f"memory format, {where}"
            Count.matched += 1
            if gradients:
                check_gradients(x, w, b, conv, algorithm, where)


def oracle(x, w, b, conv, grad_out=None):
    """F.conv2d in float64 (its output, or its gradients for grad_out), and the same computed on
    absolute values: the sum of |terms| behind each element, which bounds the rounding error a
    correct computation can make. A plain relative error is ill-conditioned here: an output of
    one element that is a near-cancelling sum of 48 products fails a 1e-5 float32 test although
    every product is right."""
    results = []
    for f in (lambda t: t, torch.abs):
        leaves = [f(_wide(t.detach())).requires_grad_() if t is not None else None for t in (x, w, b)]
        out = f_conv2d(*leaves, *conv)
        if grad_out is None:
            results.append((out.detach(),))
        else:
            used = [t for t in leaves if t is not None]
            results.append(torch.autograd.grad(out, used, f(_wide(grad_out)), allow_unused=True))
    return results


def _wide(t):
    """float64, or complex128 for a complex tensor."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def assert_matches(got, want, scale, dtype, what):
    """‖got − want‖ ≤ tolerance · ‖|terms|‖ with the project's float64/float32 tolerances."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    error, size = (_wide(got) - want).norm().item(), scale.norm().item()
    assert error <= TOLERANCE[dtype] * size, f"{what}: error {error:.3e} > {TOLERANCE[dtype]:.0e} x {size:.3e}"


def check_gradients(x, w, b, conv, algorithm, where):
    Count.gradient_checks += 1
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    out = channelconv.conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None, *conv, algorithm=algorithm)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                           dtype=torch.complex128 if out.is_complex() else torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    ref_grads, scales = oracle(x, w, b, conv, grad_out)
    for name, got, want, scale in zip(("input", "weight", "bias"), grads, ref_grads, scales):
        if want is None:  # an empty output: nothing flows back
            assert got is None or not got.any(), f"grad {name}, {where}"
            continue
        assert got is not None and got.dtype == x.dtype, f"grad {name}, {where}"
        assert_matches(got, want, scale, x.dtype, f"grad {name}, {where}")


def report(capsys, what, target, seconds):
    with capsys.disabled():
        print(f"\n[fuzz] {what}: {Count.cases} cases ({Count.matched} results equal to F.conv2d, "
              f"{Count.raised} same-kind errors, {Count.deviations} documented deviations; "
              f"{Count.runs} algorithm runs, {Count.gradient_checks} gradient checks) in {seconds:.1f} s"
              + (f"; deviations: {Count.by_deviation}" if Count.by_deviation else ""))
    assert Count.cases >= target, f"hypothesis ran {Count.cases} cases, fewer than the {target} wanted"


FUZZ = dict(deadline=None, derandomize=False, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def test_fuzz_edge_shapes(capsys, one_thread):
    """1x1 images, kernel == padded input, stride > input, one channel, depthwise with a channel
    multiplier, large dilation, asymmetric everything, empty batch; every argument form."""

    @settings(max_examples=EDGE_CASES, **FUZZ)
    @given(args=edge_args())
    def fuzz(args):
        check(args, gradients=Count.cases % GRAD_EVERY == 0)

    Count.reset()
    start = time.perf_counter()
    fuzz()
    report(capsys, "edge shapes", EDGE_CASES, time.perf_counter() - start)
    assert Count.matched > Count.raised  # the edge strategy draws valid calls


def test_fuzz_bad_inputs(capsys, one_thread):
    """Valid calls broken one or two ways at a time: each raises what F.conv2d raises (or, where
    F.conv2d still computes, equals it)."""

    @settings(max_examples=BAD_CASES, **FUZZ)
    @given(args=bad_args())
    def fuzz(args):
        check(args, gradients=Count.cases % GRAD_EVERY == 0)

    Count.reset()
    start = time.perf_counter()
    fuzz()
    report(capsys, "bad inputs", BAD_CASES, time.perf_counter() - start)
    assert Count.raised > Count.matched and Count.deviations > 0


@pytest.mark.xfail(strict=True, reason="channelconv raises ValueError where F.conv2d raises TypeError for a "
                   "non-int stride/padding/dilation/groups (channelconv/_shapes.py pair(), functional.py)")
@pytest.mark.parametrize("kwargs", [{"stride": 1.5}, {"padding": 0.5}, {"dilation": True}, {"groups": 1.0},
                                    {"stride": "2"}])
def test_wrong_argument_types_raise_type_error(kwargs):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    with pytest.raises(TypeError):
        F.conv2d(x, w, **kwargs)
    with pytest.raises(TypeError):
        channelconv.conv2d(x, w, **kwargs)
