"""Measuring one layer: every applicable channelconv algorithm (and 'auto') beside F.conv2d,
interleaved in the same process, for one pass (forward, the two gradients, or a training step).

Timing: each side (F.conv2d, each algorithm) is a ``torch.utils.benchmark.Timer`` (which sets the
thread count and, on an accelerator, synchronises around each block). A side is warmed up once,
then sized: a block of ``number`` calls lasts about ``block_s``. The measurement runs ``rounds``
rounds; in each round every side runs one block, the order rotating from round to round, so
that a noisy neighbour on the machine slows all sides alike. A side's time is the median of its
blocks' per-call means; its ratio is F.conv2d's median over that median: its speed relative to F.conv2d (> 1: faster).
Sides slower than ``slow_s`` per call take part in the first ``min_rounds`` rounds only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import statistics
import warnings
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils import common as benchmark_common

import channelconv
from channelconv._ops import OPS, TAKES_WORKSPACE
from channelconv._shapes import is_1x1, result_format
from channelconv.cost import cost

from .shapes import Layer

REFERENCE = "F.conv2d"
# PyTorch's own im2col + GEMM path: F.conv2d with oneDNN off (the bar issue 4 sets for 'im2col').
TORCH_IM2COL = "F.conv2d:im2col"
TORCH_SIDES = (REFERENCE, TORCH_IM2COL)
PASSES = ("forward", "input_grad", "weight_grad", "training")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Settings:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch: int = 8
    threads: int = 0  # 0: torch's default
    rounds: int = 5
    min_rounds: int = 3
    block_s: float = 0.05
    slow_s: float = 0.25
    check_errors: bool = True
    measured_auto: bool = False  # also time 'auto' in benchmark mode
    torch_im2col: bool = False  # also time PyTorch's own im2col + GEMM path (TORCH_IM2COL)
    cpu_clock: bool = False  # time with the calling thread's CPU clock instead of the wall clock
    memory_format: str = "contiguous"  # a key of MEMORY_FORMATS: inputs, conv weights and grad_outputs
    autocast: torch.dtype | None = None  # the model suite only: forward and loss under torch.autocast
    tf32: bool = False  # CUDA: float32 convolutions and GEMMs may use TF32 (on both sides)


def in_memory_format(t, settings: Settings):
    """A 4-d tensor, or a module's 4-d parameters (its conv weights), in the suite's memory format:
    what ``model.to(memory_format=torch.channels_last)`` does, the one rule both suites follow."""
    return t.to(memory_format=MEMORY_FORMATS[settings.memory_format])


def _name(dtype) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def tensor_label(settings: Settings) -> str:
    """'float32, channels_last[, autocast bfloat16][, TF32]': for the header line and the table titles."""
    autocast = f", autocast {_name(settings.autocast)}" if settings.autocast else ""
    return f"{_name(settings.dtype)}, {settings.memory_format}{autocast}{', TF32' if settings.tf32 else ''}"


def algorithms_for(layer: Layer, wanted) -> list[str]:
    return [a for a in wanted if a != "1x1" or is_1x1(layer.kernel)]


def pass_flops(c, pass_: str) -> int:
    return {"forward": c.forward_flops, "input_grad": 2 * c.backward_input_multiplications,
            "weight_grad": 2 * c.backward_weight_multiplications, "training": c.training_flops}[pass_]


# ------------------------------------------------------------------------------------------------
# Environment


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average():
    try:
        return [round(v, 2) for v in __import__("os").getloadavg()]
    except OSError:
        return None


def environment(settings: Settings) -> dict:
    info = {
        "torch": torch.__version__,
        "channelconv": channelconv.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": __import__("os").cpu_count(),
        "device": settings.device,
        "dtype": _name(settings.dtype),
        "memory_format": settings.memory_format,
        "autocast": _name(settings.autocast),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": _load_average(),  # the machine is shared: how busy it was at the start
    }
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    return info


def configure(settings: Settings) -> None:
    """Process-wide settings for a fair comparison: threads; on CUDA, full-precision float32 on both
    sides, or TF32 allowed on both (--tf32)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.threads = torch.get_num_threads()
    if settings.device == "cuda":
        torch.backends.cudnn.allow_tf32 = settings.tf32
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32


def gemm_rate(settings: Settings, size: int = 2048, min_run_time: float = 1.0) -> float:
    """GFLOP/s of one (size x size) . (size x size) matrix product in the suite's dtype: the
    machine's practical ceiling, against which each kernel's rate is read."""
    a = torch.randn(size, size, device=settings.device).to(settings.dtype)
    b = torch.randn(size, size, device=settings.device).to(settings.dtype)
    timer = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                  num_threads=settings.threads or torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return 2 * size**3 / measurement.median / 1e9


# ------------------------------------------------------------------------------------------------
# Timing


def _block(timer: Timer, number: int, threads: int) -> float:
    """Mean seconds per call over one block of ``number`` calls (no per-block warm-up)."""
    with benchmark_common.set_torch_threads(threads):
        return timer._timeit(number) / number


def interleaved(functions: dict, settings: Settings) -> dict:
    """name -> list of per-call seconds, one per round the side took part in."""
    threads = settings.threads or torch.get_num_threads()
    clock = {"timer": time.thread_time} if settings.cpu_clock else {}
    timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=threads, **clock) for name, fn in functions.items()}
    first = {}
    for name, timer in timers.items():  # warm-up, then one call to size the blocks
        _block(timer, 1, threads)
        first[name] = _block(timer, 1, threads)
    number = {name: max(1, int(settings.block_s / max(t, 1e-9))) for name, t in first.items()}
    samples = {name: [] for name in timers}
    names = list(timers)
    for r in range(settings.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if r >= settings.min_rounds and first[name] > settings.slow_s:
                continue
            samples[name].append(_block(timers[name], number[name], threads))
    return samples


# ------------------------------------------------------------------------------------------------
# One layer


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def benchmark_mode(enabled: bool):
    before = channelconv.get_benchmark_mode()
    channelconv.set_benchmark_mode(enabled)
    try:
        yield
    finally:
        channelconv.set_benchmark_mode(before)


class LayerCase:
    """The tensors of one layer and the callables each side runs for a pass.

    Sides: 'F.conv2d', an algorithm name, 'auto' (the heuristic) or 'auto:measured' ('auto' in
    benchmark mode: its first call times the candidates, later calls use the cached choice)."""

    def __init__(self, layer: Layer, settings: Settings, seed: int = 0):
        self.layer, self.settings = layer, settings
        g = torch.Generator().manual_seed(seed)
        n, c_in, h, w = layer.input_shape(settings.batch)
        dt, dev = settings.dtype, settings.device
        fan_in = (c_in // layer.groups) * layer.kernel[0] * layer.kernel[1]
        self.x = in_memory_format(torch.randn(n, c_in, h, w, generator=g).to(dev, dt), settings)
        self.w = in_memory_format((torch.randn(layer.weight_shape(), generator=g) / math.sqrt(fan_in)).to(dev, dt),
                                  settings)
        self.b = torch.randn(layer.out_channels, generator=g).to(dev, dt) if layer.bias else None
        self.args = layer.conv_args()
        out_shape = (n, layer.out_channels, *layer.output_size())
        # grad_output laid out as F.conv2d lays out its output, as autograd would hand it to the backward.
        self.gy = torch.randn(out_shape, generator=g).to(dev, dt).contiguous(
            memory_format=result_format(self.x, self.w))
        self.cost = cost(self.x.shape, self.w.shape, *self.args, dtype=dt, bias=layer.bias, device=dev,
                         memory_format=MEMORY_FORMATS[settings.memory_format])
        # Leaves that record autograd, for training steps.
        self.leaves = [t.detach().requires_grad_() for t in (self.x, self.w, self.b) if t is not None]

    def _tensors(self, pass_: str):
        if pass_ == "training":
            return self.leaves[0], self.leaves[1], self.leaves[2] if self.b is not None else None
        return self.x, self.w, self.b

    def resolved(self, side: str, pass_: str) -> str:
        """The algorithm a side runs for a pass ('auto' resolved as conv2d would resolve it)."""
        if not side.startswith("auto"):
            return side
        x, w, b = self._tensors(pass_)
        with benchmark_mode(side == "auto:measured"), torch.enable_grad():
            return channelconv.select.choose(x.shape, w.shape, *self.args, tensors=(x, w, b))

    def function(self, side: str, pass_: str):
        """A zero-argument callable running ``pass_`` by ``side``."""
        if side == TORCH_IM2COL:
            return _without_onednn(self.function(REFERENCE, pass_))
        x, w, b = self._tensors(pass_)
        gy, args = self.gy, self.args
        stride, padding, dilation, groups = args
        if pass_ in ("forward", "training"):
            if side == REFERENCE:
                conv = F.conv2d
            else:
                algorithm = "auto" if side.startswith("auto") else side
                conv = functools.partial(channelconv.conv2d, algorithm=algorithm)
            if pass_ == "forward":
                fn = functools.partial(conv, x, w, b, *args)
            else:
                inputs = [t for t in (x, w, b) if t is not None]

                def fn():
                    return torch.autograd.grad(conv(x, w, b, *args), inputs, gy)
            if side == "auto:measured":
                return _in_benchmark_mode(fn)
            return fn
        # One gradient alone: the op autograd would call, for the algorithm 'auto' resolves to.
        if side == REFERENCE:
            mask = [pass_ == "input_grad", pass_ == "weight_grad", False]
            return functools.partial(torch.ops.aten.convolution_backward, gy, x, w, None, stride, padding, dilation,
                                     False, (0, 0), groups, mask)
        algorithm = self.resolved(side, pass_)
        ops = OPS[algorithm]
        extra = (channelconv.get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
        if pass_ == "input_grad":
            return functools.partial(ops.backward_input, gy, w, x.shape, stride, padding, dilation, groups, *extra)
        return functools.partial(ops.backward_weight, gy, x, w.shape, stride, padding, dilation, groups, *extra)

    def error(self, side: str, pass_: str, oracle: dict) -> float:
        """Relative error against F.conv2d in float64: of the output (forward), of the gradient
        (input_grad / weight_grad), or the largest of output and gradients (training)."""
        result = self.function(side, pass_)()
        if pass_ == "forward":
            return rel_error(result, oracle["out"])
        if pass_ == "input_grad":
            return rel_error(result[0] if side in TORCH_SIDES else result, oracle["grads"][0])
        if pass_ == "weight_grad":
            return rel_error(result[1] if side in TORCH_SIDES else result, oracle["grads"][1])
        return max(rel_error(got, want) for got, want in zip(result, oracle["grads"]))

    def oracle(self, pass_: str) -> dict:
        """F.conv2d in float64 on the same (rounded) values: the output, and for the other
        passes the gradients of <output, gy> with respect to input, weight (and bias)."""
        backward = pass_ != "forward"
        leaves = [t.detach().double().requires_grad_(backward) for t in (self.x, self.w, self.b) if t is not None]
        b = leaves[2] if self.b is not None else None
        with torch.set_grad_enabled(backward):
            out = F.conv2d(leaves[0], leaves[1], b, *self.args)
            grads = torch.autograd.grad(out, leaves, self.gy.double()) if backward else None
        return {"out": out.detach(), "grads": grads}


def _without_onednn(fn):
    def run():
        with warnings.catch_warnings():  # flags() also sets oneDNN's TF32 switch, which warns on CPU builds
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            with torch.backends.mkldnn.flags(enabled=False):
                return fn()
    return run


def _in_benchmark_mode(fn):
    def run():
        with benchmark_mode(True):
            return fn()
    return run


def run_layer(layer: Layer, algorithms, pass_: str, settings: Settings, gemm_gflops: float | None,
              suite: str = "") -> list:
    """One result dict per side (F.conv2d first) for ``pass_``."""
    case = LayerCase(layer, settings)
    sides = [REFERENCE, *([TORCH_IM2COL] if settings.torch_im2col else []), *algorithms_for(layer, algorithms), "auto"]
    if settings.measured_auto:
        sides.append("auto:measured")
    chosen = {side: case.resolved(side, pass_) for side in sides}  # measured: times the candidates once
    samples = interleaved({side: case.function(side, pass_) for side in sides}, settings)

    flops = pass_flops(case.cost, pass_)
    oracle = case.oracle(pass_) if settings.check_errors else None
    ref_median = statistics.median(samples[REFERENCE])
    results = []
    for side in sides:
        median = statistics.median(samples[side])
        algorithm = chosen[side]
        # One more run, untimed: its result against the oracle, and the column buffer it allocated.
        torch.ops.channelconv.reset_workspace_peak()
        error = None
        if oracle is not None:
            error = case.error(side, pass_, oracle)
        else:
            case.function(side, pass_)()
        workspace = None if side in TORCH_SIDES else int(torch.ops.channelconv.workspace_peak())
        results.append({
            "suite": suite, "layer": layer.name, "shape": layer.describe(), "count": layer.count,
            "names": list(layer.names), "input_shape": list(case.x.shape), "weight_shape": list(case.w.shape),
            "stride": list(layer.stride), "padding": list(layer.padding), "dilation": list(layer.dilation),
            "groups": layer.groups, "bias": layer.bias, "pass": pass_, "algorithm": side, "chosen": algorithm,
            "median_s": median, "min_s": min(samples[side]), "samples_s": samples[side],
            "gflop": flops / 1e9, "gflops": flops / median / 1e9, "ratio": ref_median / median,
            "gemm_fraction": flops / median / 1e9 / gemm_gflops if gemm_gflops else None,
            "workspace_bytes": workspace,
            "predicted_workspace_bytes": None if side in TORCH_SIDES else case.cost.workspace(algorithm),
            "rel_error": error,
        })
    return results
