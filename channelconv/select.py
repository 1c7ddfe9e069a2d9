"""'auto': which of channelconv's own algorithms runs a given shape (never F.conv2d).

Two ways to decide, like cuDNN's:

* The heuristic (default). Each algorithm's time is predicted from the layer's cost figures
  (channelconv/cost.py) by a small linear model,

      time ~= sum_f coefficient[f] * feature[f]

  whose features are the work an algorithm does and its overheads: for the GEMM-lowered
  algorithms (im2col, 1x1) the GEMM FLOPs inflated by how far the GEMM's M, N, K fall short of
  saturating the machine (``2*MACs * (1 + m0/M + n0/N + k0/K)``), the column elements the
  unrolling writes, the number of (small) GEMMs, and a per-call constant; for direct the
  multiply-adds of its register-blocked tiles (channels padded to the 32-wide tile) or, where
  those do not apply (depthwise, no AVX-512, other dtypes), of its plain loops, the tile or
  inner-loop count and the output elements. The
  coefficients are seconds per unit (1/rate, 1/bandwidth, overhead), measured on this machine by
  ``python -m benchmarks --calibrate`` and saved in channelconv/calibration.json (or the file
  named by CHANNELCONV_CALIBRATION); built-in defaults apply when it is missing. The candidate
  with the smallest predicted time wins. With symbolic sizes (torch.compile dynamic shapes) the
  model cannot run; a structural rule decides ('1x1' for 1x1 kernels, otherwise 'im2col').

* Measured (``set_benchmark_mode(True)``, like ``torch.backends.cudnn.benchmark``): the first call
  for a shape signature (sizes, arguments, dtype, device, layout, whether gradients are needed,
  threads, workspace limit) times every applicable candidate on the call's own tensors — forward,
  plus both gradients when the call records autograd — and caches the fastest; later calls with
  that signature use it. The cache is shared by all threads and filled under a lock. Candidates
  the heuristic predicts to be over ``PRUNE_FACTOR`` times slower than the best are not timed.
  Inside a torch.compile trace nothing is timed; the heuristic decides.

``explain(...)`` shows the choice, the reason in words and every candidate's cost figures.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._shapes import ALGORITHMS, pair
from .cost import Cost, cost
from .workspace import get_workspace_limit

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
_CALIBRATION_ENV = "CHANNELCONV_CALIBRATION"
PRUNE_FACTOR = 10.0
# Predictions closer than this are a tie to the model: its median error on the probes is 4-6 %
# (calibration.json, "fit"). In a tie the candidate that allocates no workspace goes first:
# memory is a cost the user pays too, and where the two really differ it is the one that moves
# fewer bytes (measured: VGG-16's 3-channel first layer, ResNet-50's 256-channel 3x3 layers at
# batch 1; benchmarks/NOTES.md).
NEAR_TIE = 0.06

# Features of each algorithm's time model (see features()).
LOWERED_FEATURES = ("gemm", "column", "column_strided", "gemm_call", "call")
DIRECT_FEATURES = ("mac", "mac_1x1", "mac_plain", "inner_loop", "weight_read", "strip", "output", "call")
# Work that the kernels spread over threads; the rest (dispatch, per-GEMM setup) is serial.
PARALLEL_FEATURES = frozenset({"gemm", "column", "column_strided", "mac", "mac_1x1", "mac_plain", "inner_loop",
                               "weight_read", "strip", "output"})
FEATURE_NAMES = {
    "gemm": "GEMM FLOPs (inflated for small M, N, K)",
    "column": "column elements unrolled",
    "column_strided": "column elements gathered one by one (stride > 1; stride 1 copies whole runs)",
    "gemm_call": "small GEMMs (images x bands x groups)",
    "call": "per-call overhead",
    "mac": "multiply-adds in register-blocked tiles (channels padded to 32)",
    "mac_1x1": "of those, the ones of 1x1 kernels (no input reuse across taps: the tile streams its input from L2)",
    "mac_plain": "multiply-adds in the plain loops (lanes wasted on short rows)",
    "inner_loop": "inner loops started",
    "weight_read": "packed weights streamed (once per task of output rows)",
    "strip": "input elements copied into the blocked kernel's zero-padded strips",
    "output": "output elements (accumulator fill and copy)",
}

# Built-in model, for when no calibration file is found: an earlier calibration's forward
# coefficients, rounded (CPU float32, one thread by its CPU clock on this project's 2-core AVX-512
# machine; features it lacks count zero). The shipped channelconv/calibration.json overrides it.
_LOWERED_DEFAULT = {"gemm": 6.1e-12, "column": 2.8e-10, "gemm_call": 4.9e-7, "call": 2.7e-5}
DEFAULT_MODEL = {
    "gemm": {"m0": 8.1, "n0": 20.1, "k0": 0.7},
    "direct_vector_bytes": 16,
    "threads": 1,  # the thread count the coefficients describe
    "forward": {
        "direct": {"mac": 1.6e-11, "mac_plain": 1.1e-10, "inner_loop": 2e-8, "output": 3.2e-10, "call": 2.1e-5},
        "im2col": dict(_LOWERED_DEFAULT),
        "1x1": dict(_LOWERED_DEFAULT),
    },
}


def features(algorithm: str, c: Cost, gemm: dict, vector_bytes: int = 16, threads: int | None = None,
             training: bool = False) -> dict:
    """The quantities the time model multiplies by its coefficients, for one algorithm.
    ``vector_bytes``: the direct kernel's vector width (a short output row wastes lanes);
    ``threads`` (default torch's): the CPU threads, which set the direct kernel's task size;
    ``training``: direct sums its three ops, each by the kernel it runs (the GEMM algorithms run
    the same GEMMs in each op, so their forward features describe a training step too)."""
    plan = c.plans[algorithm]
    if algorithm == "direct":
        n, k, h_o, w_o = c.output_shape
        c_in, h, w = c.input_shape[1:]
        kh, kw = c.weight_shape[2:]
        out_pg, in_pg = max(1, k // c.groups), max(1, c_in // c.groups)
        ops = [_direct_op(c, out_pg, in_pg, h_o, w_o, n * k * h_o * w_o, _direct_tasks(c, threads), vector_bytes,
                          _blocked_direct(c.element_size, out_pg), c.stride[1])]
        if training:
            # Input gradient: dy correlated with the flipped, transposed weight (C_in/g "output"
            # channels over the input plane); blocked at stride 1, or strided without dilation.
            in_blocked = _blocked_direct(c.element_size, in_pg) and (c.stride == (1, 1) or c.dilation == (1, 1))
            ops.append(_direct_op(c, in_pg, out_pg, h, w, n * c_in * h * w, n, vector_bytes, in_blocked, 1))
            # Weight gradient: blocked for k_w <= 7 and at least 16 output channels per group.
            if _blocked_direct(c.element_size, out_pg) and kw <= 7 and out_pg >= BLOCK_CHANNELS // 2:
                ops.append(_direct_weight_grad_op(c, out_pg, in_pg, threads))
            else:
                ops.append(_direct_op(c, out_pg, in_pg, h_o, w_o, c.weight_shape[0] * in_pg * kh * kw, h_o,
                                      vector_bytes, False, c.stride[1]))
        return {f: sum(op[f] for op in ops) for f in ops[0]}
    m, n_, k_ = max(plan.gemm_m, 1), max(plan.gemm_n, 1), max(plan.gemm_k, 1)
    inflation = 1.0 + gemm["m0"] / m + gemm["n0"] / n_ + gemm["k0"] / k_
    return {"gemm": 2.0 * c.macs * inflation, "column": float(plan.column_elements),
            "column_strided": float(plan.column_elements) if c.stride[1] > 1 else 0.0,
            "gemm_call": float(plan.gemm_calls * c.groups), "call": 1.0}


BLOCK_CHANNELS, BLOCK_PIXELS = 32, 14
STRIP_BYTES = 1 << 20


def _input_span(outputs, taps, stride, dilation) -> int:
    """Input positions a run of ``outputs`` consecutive outputs reads through ``taps`` taps (the
    direct kernel's strip width, a weight-gradient chunk's input rows: input_span in
    csrc/cpu/direct_blocked.cpp)."""
    return (outputs - 1) * stride + (taps - 1) * dilation + 1


def _direct_op(c: Cost, out_pg, in_pg, h_o, w_o, outputs, group_tasks, vector_bytes, blocked, stride_w) -> dict:
    """Features of one direct op computing out_pg channels per group over an h_o x w_o plane from
    in_pg channels: register-blocked (csrc/cpu/direct_blocked.cpp: tiles of 32 channels, padded,
    x up to 14 pixels of a task's rows; each task streams the group's packed weights once)
    or the plain loops (vectorised along the row: a short row wastes lanes; strided rows gather)."""
    n = c.output_shape[0]
    kh, kw = c.weight_shape[2:]
    if blocked:
        blocks = math.ceil(out_pg / BLOCK_CHANNELS)
        tasks = c.groups * group_tasks
        # Tiles (plan_tiles): rows of at most 7 pixels two to a tile (tasks hold whole pairs), wider
        # rows cut into pieces.
        if 2 * w_o <= BLOCK_PIXELS:
            group_tiles = math.ceil(n * h_o / 2)
        else:
            group_tiles = n * h_o * math.ceil(w_o / BLOCK_PIXELS)
        tiles = c.groups * blocks * group_tiles
        weights = blocks * BLOCK_CHANNELS * in_pg * kh * kw
        # Each output row copies k_h input rows per input channel into its strips (a 1x1 layer with
        # few output channels per input channel spends a fifth of its time there).
        strip_width = _input_span(w_o, kw, stride_w, c.dilation[1])
        # Inner loops: each tile runs one loop over a kernel row's k_w taps per (input channel,
        # kernel row), or a single loop over the input channels for a 1x1 kernel.
        macs = c.macs * blocks * BLOCK_CHANNELS / out_pg
        return {"mac": macs, "mac_1x1": macs if kh * kw == 1 else 0.0, "mac_plain": 0.0,
                "inner_loop": float(tiles * (1 if kh * kw == 1 else in_pg * kh)),
                "weight_read": float(tasks * weights), "strip": float(c.groups * n * h_o * in_pg * kh * strip_width),
                "output": float(outputs), "call": 1.0}
    lanes = max(1, vector_bytes // c.element_size)
    waste = math.ceil(w_o / lanes) * lanes / w_o if w_o else 1.0
    return {"mac": 0.0, "mac_1x1": 0.0, "mac_plain": c.macs * waste * (1 if stride_w == 1 else 2),
            "inner_loop": float(n * c.groups * out_pg * in_pg * kh * kw * h_o), "weight_read": 0.0, "strip": 0.0,
            "output": float(outputs), "call": 1.0}


GRAD_TILE_VALUES = 12
GRAD_CHUNK_BYTES = 1 << 20


def _direct_weight_grad_op(c: Cost, out_pg, in_pg, threads: int | None) -> dict:
    """Features of the blocked direct weight gradient (csrc/cpu/direct_blocked.cpp,
    blocked_weight_grad), in the direct model's terms: its multiply-adds (output channels padded to
    32); its tiles (32 channels x G input channels x k_w taps) as inner loops; the dW tiles it loads
    and stores once per chunk as weights streamed; and the x and dy elements it transposes while
    packing as output elements. The chunking mirrors the kernel's."""
    n, _, h_o, w_o = c.output_shape
    kh, kw = c.weight_shape[2:]
    threads = threads or torch.get_num_threads()
    blocks = math.ceil(out_pg / BLOCK_CHANNELS)
    cols = _input_span(w_o, kw, c.stride[1], c.dilation[1])

    def input_rows(out_rows):  # input rows a band of output rows reads
        return _input_span(out_rows, kh, c.stride[0], c.dilation[0])

    def chunk_bytes(out_rows):
        return input_rows(out_rows) * cols * in_pg * 4

    rows = h_o
    while rows > 1 and chunk_bytes(rows) > GRAD_CHUNK_BYTES:
        rows -= 1
    bands = math.ceil(h_o / rows)
    images = 1 if bands > 1 else max(1, min(n, GRAD_CHUNK_BYTES // chunk_bytes(h_o)))
    chunks = bands * math.ceil(n / images)
    tile_channels = max(1, GRAD_TILE_VALUES // kw)
    # Threads split the output-channel blocks (each packs all of x) unless the input channels are
    # more numerous (then each packs its share of x and all of dy).
    split_inputs = in_pg > out_pg and c.groups < threads
    x_copies = 1 if split_inputs or c.groups >= threads else min(threads, blocks)
    dy_copies = min(threads, in_pg // tile_channels or 1) if split_inputs else 1
    x_packed = c.groups * in_pg * n * bands * input_rows(rows) * cols
    dy_packed = n * c.groups * blocks * BLOCK_CHANNELS * h_o * w_o
    return {"mac": c.macs * blocks * BLOCK_CHANNELS / out_pg, "mac_1x1": 0.0, "mac_plain": 0.0,
            "inner_loop": float(chunks * c.groups * blocks * kh * math.ceil(in_pg / tile_channels)),
            "weight_read": float(chunks * c.groups * blocks * BLOCK_CHANNELS * in_pg * kh * kw), "strip": 0.0,
            "output": float(x_packed * x_copies + dy_packed * dy_copies), "call": 1.0}


def _direct_tasks(c: Cost, threads: int | None) -> int:
    """Tasks per group of the blocked direct kernel (csrc/cpu/direct_blocked.cpp, blocked_task_rows):
    as many as keep each task's float32 input strips within STRIP_BYTES, a multiple of the thread
    count and at least two per thread, at most one per unit of rows (the group's rows, which run on
    from one image into the next, are shared evenly in units of two rows on maps of at most 7
    columns)."""
    n, _, h_o, w_o = c.output_shape
    kh, kw = c.weight_shape[2:]
    strip_width = _input_span(w_o, kw, c.stride[1], c.dilation[1])
    strip_bytes = 4 * (c.input_shape[1] // c.groups) * kh * strip_width
    threads = threads or torch.get_num_threads()
    rows_per_group = n * h_o
    units = math.ceil(rows_per_group / (2 if 2 * w_o <= BLOCK_PIXELS else 1))
    rows_by_cache = max(1, STRIP_BYTES // max(1, strip_bytes))
    tasks = max(2 * threads, math.ceil(c.groups * rows_per_group / rows_by_cache))
    tasks = math.ceil(tasks / threads) * threads
    return min(max(1, tasks // c.groups), max(1, units))


def _blocked_direct(element_size: int, out_per_group: int) -> bool:
    """Whether the direct kernel runs register-blocked: float32, at least 4 output channels per
    group, on a CPU with AVX-512 (the rule in csrc/cpu/direct.cpp, use_blocked)."""
    return element_size == 4 and out_per_group >= 4 and _BLOCKED_KERNEL


_BLOCKED_KERNEL = bool(torch.ops.channelconv.blocked_kernel_available())


# ---------------------------------------------------------------------------------------------
# Calibration constants


_calibration_cache: dict = {}


def load_calibration(path=None) -> dict:
    """The calibration file's content ({} when missing or unreadable); cached per path."""
    path = Path(path or os.environ.get(_CALIBRATION_ENV) or CALIBRATION_FILE)
    key = str(path)
    if key not in _calibration_cache:
        try:
            _calibration_cache[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            _calibration_cache[key] = {}
    return _calibration_cache[key]


def reload_calibration() -> None:
    """Forget the loaded calibration (after ``python -m benchmarks --calibrate`` rewrote it)."""
    _calibration_cache.clear()
    _model_cache.clear()
    _choice_cache.clear()


_model_cache: dict = {}


def model_for(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The time model for a device type and dtype: the calibration's entry for it, else its
    device's float32 entry, else the built-in defaults; each missing piece from the defaults."""
    key = (device_type, dtype)
    if key not in _model_cache:
        models = load_calibration().get("models", {})
        name = str(dtype).replace("torch.", "")
        found = models.get(f"{device_type}/{name}") or models.get(f"{device_type}/float32") or {}
        model = {"gemm": {**DEFAULT_MODEL["gemm"], **found.get("gemm", {})}, "source": found.get("source", "defaults"),
                 "direct_vector_bytes": found.get("direct_vector_bytes", DEFAULT_MODEL["direct_vector_bytes"]),
                 "threads": found.get("threads", DEFAULT_MODEL["threads"])}
        for pass_ in ("forward", "training"):
            fitted = found.get(pass_, {})
            base = DEFAULT_MODEL["forward"]
            model[pass_] = {a: {**base[a], **fitted.get(a, {})} if (pass_ == "forward" or a in fitted) else None
                            for a in ALGORITHMS}
        _model_cache[key] = model
    return _model_cache[key]


def predict(algorithm: str, c: Cost, device_type: str = "cpu", training: bool = False,
            threads: int | None = None) -> tuple[float, dict]:
    """(predicted seconds, seconds per feature) of ``algorithm`` on the layer ``c``; training
    predicts forward + both gradients (from the training model when calibrated, else three
    times the forward model). The parallel terms scale from the calibration's thread count to
    ``threads`` (default: torch's current count; CPU only)."""
    model = model_for(device_type, c.dtype)
    coefficients = model["training"][algorithm] if training else model["forward"][algorithm]
    scale = 1.0
    if coefficients is None:
        coefficients, scale = model["forward"][algorithm], 3.0
    parallel = 1.0
    if device_type == "cpu":
        parallel = model["threads"] / max(1, threads or torch.get_num_threads())
    values = features(algorithm, c, model["gemm"], model["direct_vector_bytes"], threads,
                      training and model["training"][algorithm] is not None)
    terms = {f: scale * coefficients.get(f, 0.0) * v * (parallel if f in PARALLEL_FEATURES else 1.0)
             for f, v in values.items()}
    return sum(terms.values()), terms


# ---------------------------------------------------------------------------------------------
# The choice


def _structural(weight_shape) -> str:
    return "1x1" if tuple(weight_shape[2:]) == (1, 1) else "im2col"


def order(predicted: dict[str, float], workspace: dict[str, int]) -> list[tuple[float, str]]:
    """(predicted seconds, algorithm), best first: fastest first, except that a candidate needing
    no workspace moves ahead of the fastest when that needs one and the two predictions are within
    NEAR_TIE. Otherwise equal predictions keep the order '1x1', 'im2col', 'direct' (no copy before
    copy before loops). Also the calibration's ranking check (benchmarks/calibrate.py)."""
    preference = ("1x1", "im2col", "direct")
    ranked = [(predicted[a], a) for a in sorted(predicted, key=lambda a: (predicted[a], preference.index(a)))]
    if ranked and workspace[ranked[0][1]] > 0:
        for i, (t, a) in enumerate(ranked[1:], 1):
            if t > (1 + NEAR_TIE) * ranked[0][0]:
                break
            if workspace[a] == 0:
                ranked.insert(0, ranked.pop(i))
                break
    return ranked


def _ranked(c: Cost, device_type: str, training: bool) -> list[tuple[float, str]]:
    """The applicable candidates for the layer ``c``, best first (order())."""
    applicable = [a for a in ALGORITHMS if c.plans[a].applicable]
    return order({a: predict(a, c, device_type, training)[0] for a in applicable},
                 {a: c.plans[a].workspace_bytes for a in applicable})


def _signature(input, weight, bias, stride, padding, dilation, groups, training):
    fmt = ("channels_last" if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
           else "contiguous" if input.is_contiguous() else "strided")
    return (tuple(input.shape), tuple(weight.shape), bias is not None, tuple(stride), tuple(padding), tuple(dilation),
            groups, input.dtype, str(input.device), fmt, training, torch.get_num_threads(), get_workspace_limit())


def _needs_grad(input, weight, bias) -> bool:
    return torch.is_grad_enabled() and torch._C._any_requires_grad(input, weight, bias)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _concrete(input_shape, weight_shape, tensors) -> bool:
    """Whether the sizes are plain ints: always those of plain tensors and parameters (checked
    first: this runs on every call); a trace's (fake tensors) may be symbolic."""
    if tensors is not None and type(tensors[0]) in _PLAIN_TENSOR_TYPES and type(tensors[1]) in _PLAIN_TENSOR_TYPES:
        return True
    return all(type(d) is int for d in (*input_shape, *weight_shape))


def choose(input_shape, weight_shape, stride, padding, dilation, groups, *, tensors=None) -> str:
    """The algorithm 'auto' runs for these explicit arguments (padding a pair of ints).
    ``tensors=(input, weight, bias)``, when given, supplies the dtype and device, whether the
    call needs gradients, and in benchmark mode the tensors to time the candidates on."""
    if torch.compiler.is_compiling() or not _concrete(input_shape, weight_shape, tensors):
        # Traced sizes may be symbolic (and a trace must not time anything): decide on the kernel alone.
        return _structural(weight_shape)
    device_type, dtype, training = "cpu", torch.float32, False
    if tensors is not None:
        input, weight, bias = tensors
        device_type = "cpu" if input.is_cpu else input.device.type  # (is_cpu: the cheaper attribute)
        dtype, training = input.dtype, _needs_grad(input, weight, bias)
        if _benchmark_mode:
            measured = _measured_choice(input, weight, bias, stride, padding, dilation, groups, training)
            if measured is not None:
                return measured
    key = (tuple(input_shape), tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), groups,
           device_type, dtype, training, get_workspace_limit(), torch.get_num_threads())
    choice = _choice_cache.get(key)
    if choice is None:
        if len(_choice_cache) >= 4096:
            _choice_cache.clear()
        try:
            choice = _choice_cache[key] = _heuristic_choice(*key[:9])
        except ValueError:  # arguments the op will reject, with its own message: no cost to model
            return _structural(weight_shape)
    return choice


_choice_cache: dict = {}  # the heuristic's answers (a pure function of the key and the model)


def _heuristic_choice(input_shape, weight_shape, stride, padding, dilation, groups, device_type, dtype, training):
    c = cost(input_shape, weight_shape, stride, padding, dilation, groups, dtype, device=device_type)
    ranked = _ranked(c, device_type, training)
    return ranked[0][1] if ranked else "direct"


# ---------------------------------------------------------------------------------------------
# Measured mode


_benchmark_mode = False
_benchmark_cache: dict = {}
_benchmark_lock = threading.Lock()


def set_benchmark_mode(enabled: bool = True) -> None:
    """Measured 'auto': time every candidate on the first call of each shape signature and cache
    the fastest (like ``torch.backends.cudnn.benchmark``). Off by default."""
    global _benchmark_mode
    _benchmark_mode = bool(enabled)


def get_benchmark_mode() -> bool:
    return _benchmark_mode


def clear_benchmark_cache() -> None:
    with _benchmark_lock:
        _benchmark_cache.clear()


def benchmark_cache() -> dict:
    """A copy of the measured choices: signature -> {'choice': ..., 'seconds': {algorithm: median}}."""
    with _benchmark_lock:
        return {k: {"choice": v["choice"], "seconds": dict(v["seconds"])} for k, v in _benchmark_cache.items()}


def _is_real(t) -> bool:
    """Plain tensors with data: not meta, fake (torch.compile / export) or other subclasses."""
    if t is None:
        return True
    return (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and t.device.type != "meta"


def _measured_choice(input, weight, bias, stride, padding, dilation, groups, training):
    if not all(_is_real(t) for t in (input, weight, bias)):
        return None
    key = _signature(input, weight, bias, stride, padding, dilation, groups, training)
    hit = _benchmark_cache.get(key)
    if hit is not None:
        return hit["choice"]
    with _benchmark_lock:
        hit = _benchmark_cache.get(key)
        if hit is None:
            hit = _time_candidates(input, weight, bias, stride, padding, dilation, groups, training)
            _benchmark_cache[key] = hit
    return hit["choice"]


def _time_candidates(input, weight, bias, stride, padding, dilation, groups, training, rounds: int = 5) -> dict:
    from torch.utils.benchmark.utils.timer import timer as clock  # synchronises an accelerator

    from ._ops import OPS, TAKES_WORKSPACE

    c = cost(input.shape, weight.shape, stride, padding, dilation, groups, input.dtype, device=input.device.type)
    ranked = _ranked(c, input.device.type, training)
    if len(ranked) == 1:
        return {"choice": ranked[0][1], "seconds": {}}
    best_predicted = min(t for t, _ in ranked)
    candidates = [a for t, a in ranked if t <= PRUNE_FACTOR * best_predicted]
    args = (tuple(stride), tuple(padding), tuple(dilation), groups)

    def runner(algorithm):
        ops = OPS[algorithm]
        extra = (get_workspace_limit(),) if TAKES_WORKSPACE[algorithm] else ()
        x, w, b = input.detach(), weight.detach(), None if bias is None else bias.detach()

        def run():
            y = ops.forward(x, w, b, *args, *extra)
            if training:
                ops.backward_input(y, w, x.shape, *args, *extra)
                ops.backward_weight(y, x, w.shape, *args, *extra)
        return run

    seconds: dict = {}
    runs = {}
    with torch.no_grad():
        for algorithm in candidates:  # warm-up, and a first time
            run = runner(algorithm)
            try:
                start = clock()
                run()
                elapsed = clock() - start
            except RuntimeError:  # e.g. a workspace the limit does not allow
                continue
            runs[algorithm], seconds[algorithm] = run, [elapsed]
        if not runs:
            return {"choice": ranked[0][1], "seconds": {}}
        fastest_first = min(s[0] for s in seconds.values())
        # A candidate many times slower than the best on its first run is not timed again.
        runs = {a: r for a, r in runs.items() if seconds[a][0] <= 4 * fastest_first}
        for _ in range(rounds):
            for algorithm, run in runs.items():
                start = clock()
                run()
                seconds[algorithm].append(clock() - start)
    medians = {a: sorted(s[1:] or s)[len(s[1:] or s) // 2] for a, s in seconds.items()}
    return {"choice": min(medians, key=medians.get), "seconds": medians}


# ---------------------------------------------------------------------------------------------
# explain


@dataclass
class Candidate:
    algorithm: str
    applicable: bool
    why_not: str
    predicted_seconds: float | None
    terms: dict  # seconds per feature of the time model
    flops: int
    workspace_bytes: int | None
    column_bytes: int
    bytes_moved: int  # compulsory bytes + columns written and read back
    measured_seconds: float | None = None

    @property
    def predicted_gflops(self) -> float | None:
        return self.flops / self.predicted_seconds / 1e9 if self.predicted_seconds else None


@dataclass
class Explanation:
    choice: str
    reason: str
    source: str  # 'heuristic', 'measured' or 'rule'
    training: bool
    candidates: dict = field(default_factory=dict)
    cost: Cost | None = None

    def __str__(self) -> str:
        lines = [f"auto -> {self.choice!r} ({self.source}): {self.reason}"]
        for cand in self.candidates.values():
            if not cand.applicable:
                lines.append(f"  {cand.algorithm:7s} not applicable: {cand.why_not}")
                continue
            measured = f", measured {_fmt_s(cand.measured_seconds)}" if cand.measured_seconds else ""
            lines.append(f"  {cand.algorithm:7s} predicted {_fmt_s(cand.predicted_seconds)} "
                         f"({cand.predicted_gflops:.1f} GFLOP/s){measured}, workspace {cand.workspace_bytes} B, "
                         f"moves {cand.bytes_moved / 1e6:.1f} MB")
        return "\n".join(lines)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def _shape_of(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def explain(input, weight, stride=1, padding=0, dilation=1, groups=1, *, bias=None, training=None) -> Explanation:
    """Why 'auto' picks what it picks for ``conv2d(input, weight, bias, stride, padding, dilation,
    groups)``: the choice, the reason in words, and each candidate's cost figures (predicted time
    and its terms, FLOPs, workspace, bytes moved; the measured time when benchmark mode has
    timed this signature). ``input`` and ``weight`` may be tensors or shapes; ``training``
    defaults to whether a call with these tensors would record gradients."""
    in_shape, w_shape = _shape_of(input), _shape_of(weight)
    if len(in_shape) == 3:
        in_shape = (1, *in_shape)
    tensors = isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)
    dtype = input.dtype if tensors else torch.float32
    device_type = input.device.type if tensors else "cpu"
    if training is None:
        training = tensors and _needs_grad(input, weight, bias if isinstance(bias, torch.Tensor) else None)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    c = cost(in_shape, w_shape, stride, padding, dilation, groups, dtype, bias=bias is not None and bias is not False,
             device=device_type)
    ranked = _ranked(c, device_type, training)

    measured = None
    if tensors and _benchmark_mode:
        bias_t = bias if isinstance(bias, torch.Tensor) else None
        x = input if input.dim() == 4 else input.unsqueeze(0)
        if c.input_shape == tuple(x.shape):  # not an even-kernel 'same' (its padded input is made later)
            hit = _benchmark_cache.get(_signature(x, weight, bias_t, stride, c.padding, dilation, groups, training))
            measured = hit if hit and hit["seconds"] else None

    candidates = {}
    for algorithm in ALGORITHMS:
        plan = c.plans[algorithm]
        flops = c.training_flops if training else c.forward_flops
        moved = (c.backward_bytes_moved + c.forward_bytes_moved if training else c.forward_bytes_moved)
        moved += 2 * plan.column_bytes * (3 if training else 1)
        if plan.applicable:
            seconds, terms = predict(algorithm, c, device_type, training)
        else:
            seconds, terms = None, {}
        candidates[algorithm] = Candidate(
            algorithm, plan.applicable, plan.why_not, seconds, terms, flops,
            plan.workspace_bytes if plan.applicable else None, plan.column_bytes, moved,
            measured["seconds"].get(algorithm) if measured else None)

    if not all(type(d) is int for d in (*in_shape, *w_shape)):
        choice, source, reason = _structural(w_shape), "rule", "symbolic sizes: the structural rule decides"
    elif measured:
        choice, source = measured["choice"], "measured"
        timed = sorted(measured["seconds"].items(), key=lambda kv: kv[1])
        reason = f"benchmark mode timed {', '.join(f'{a} {_fmt_s(s)}' for a, s in timed)}; the fastest is cached"
    else:
        choice, source = (ranked[0][1] if ranked else "direct"), "heuristic"
        reason = _reason(ranked, candidates)
    return Explanation(choice, reason, source, training, candidates, c)


def _reason(ranked, candidates) -> str:
    if not ranked:
        return "no lowered algorithm applies; 'direct' always does"
    best_t, best = ranked[0]
    second_t, second = ranked[1] if len(ranked) > 1 else (None, None)
    if second and second_t <= best_t and candidates[best].workspace_bytes == 0 < candidates[second].workspace_bytes:
        # a near tie, settled by the workspace (_ranked)
        text = (f"'{best}' ({_fmt_s(best_t)}) is predicted within {100 * NEAR_TIE:.0f}% of '{second}' "
                f"({_fmt_s(second_t)}), a tie to the model, and needs no workspace ('{second}' needs "
                f"{candidates[second].workspace_bytes} bytes).")
    else:
        parts = [f"'{best}' is predicted fastest ({_fmt_s(best_t)})"]
        if second:
            parts.append(f"{second_t / best_t:.2f}x ahead of '{second}' ({_fmt_s(second_t)})")
        text = ", ".join(parts) + "."
    for t, algorithm in ranked:
        terms = candidates[algorithm].terms
        top = max(terms, key=terms.get)
        text += f" {algorithm}: mostly {FEATURE_NAMES[top]} ({100 * terms[top] / t:.0f}% of its time)."
    for cand in candidates.values():
        if not cand.applicable:
            text += f" {cand.algorithm}: not applicable ({cand.why_not})."
    return text
