"""'auto''s time model: each algorithm's time on a layer, predicted from what its kernels do.

    time ~= sum_f coefficient[f] * feature[f]

The features are counts of the kernels' work and overheads, read from the C++ plans the kernels
run (Cost.plans, csrc/plan.h): for the GEMM-lowered algorithms (im2col, 1x1) the GEMM FLOPs
inflated by how far the GEMM's M, N, K fall short of saturating the machine
(``2*MACs * (1 + m0/M + n0/N + k0/K)``), the column elements the unrolling writes, the number of
(small) GEMMs, and a per-call constant; for direct, per pass, the multiply-adds of its
register-blocked tiles (channels padded to the tile) or of its plain loops (lanes wasted on short
rows), the inner loops, the packed weights streamed, the input copied into strips and the outputs.
The coefficients are seconds per unit (1/rate, 1/bandwidth, overhead), measured on a machine by
``python -m benchmarks --calibrate`` and saved in channelconv/calibration.json (or the file named
by CHANNELCONV_CALIBRATION); built-in defaults apply when it is missing. The file holds entries per
machine (``machines``, by ``machine_id``: the rates differ between CPUs more than the kernels'
ranking rules do, e.g. MKL's float32 GEMM at 150 GFLOP/s on one AVX-512 CPU and 340 on another, and
bfloat16 GEMMs 3x faster than float32 where the CPU has AMX) and shared ones (``models``) for
machines without their own.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
from pathlib import Path

import torch

from ._shapes import ALGORITHMS
from .cost import BACKWARD, Cost

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
_CALIBRATION_ENV = "CHANNELCONV_CALIBRATION"

LOWERED_FEATURES = ("gemm", "column", "column_strided", "gemm_call", "call")
DIRECT_FEATURES = ("mac", "mac_1x1", "mac_plain", "mac_amx", "inner_loop", "weight_read", "weight_pack", "strip",
                   "output", "output_far", "call")
# Work that the kernels spread over threads; the rest (dispatch, per-GEMM setup) is serial.
PARALLEL_FEATURES = frozenset({"gemm", "column", "column_strided", "mac", "mac_1x1", "mac_plain", "mac_amx",
                               "inner_loop", "weight_read", "weight_pack", "strip", "output", "output_far"})
# A pass's result larger than this is written to memory rather than to a core's cache (2 MiB of L2).
CACHED_OUTPUT_BYTES = 2 << 20
FEATURE_NAMES = {
    "gemm": "GEMM FLOPs (inflated for small M, N, K)",
    "column": "column elements unrolled",
    "column_strided": "column elements gathered one by one (stride > 1; stride 1 copies whole runs)",
    "gemm_call": "small GEMMs (images x bands x groups)",
    "call": "per-call overhead",
    "mac": "multiply-adds in register-blocked tiles (channels padded to the tile)",
    "mac_1x1": "of those, the ones of 1x1 kernels (no input reuse across taps: the tile streams its input)",
    "mac_plain": "multiply-adds in the plain loops (lanes wasted on short rows)",
    "mac_amx": "multiply-adds on AMX tiles (bfloat16; channels padded to 32, the wide grid's dropped pixels)",
    "inner_loop": "inner loops started",
    "weight_read": "packed weights streamed (once per task of output rows)",
    "weight_pack": "weights packed for the tiles (read across the weight's rows and written, once per pass)",
    "strip": "input elements copied into the blocked kernel's zero-padded strips",
    "output": "output elements (accumulator fill and copy)",
    "output_far": "of those, the ones of results too large for the cache (written to memory)",
}

# Built-in model, for when no calibration file is found: an earlier calibration's forward
# coefficients, rounded (CPU float32, one thread by its CPU clock on an AVX-512 machine; features
# it lacks count zero). The shipped channelconv/calibration.json overrides it.
_LOWERED_DEFAULT = {"gemm": 6.1e-12, "column": 2.8e-10, "gemm_call": 4.9e-7, "call": 2.7e-5}
DEFAULT_MODEL = {
    "gemm": {"m0": 8.1, "n0": 20.1, "k0": 0.7},
    "direct_vector_bytes": 16,
    "threads": 1,  # the thread count the coefficients describe
    "forward": {
        "direct": {"mac": 1.6e-11, "mac_plain": 1.1e-10, "mac_amx": 2e-12, "inner_loop": 2e-8, "output": 3.2e-10,
                   "call": 2.1e-5},
        "im2col": dict(_LOWERED_DEFAULT),
        "1x1": dict(_LOWERED_DEFAULT),
    },
}


def features(algorithm: str, c: Cost, gemm: dict, vector_bytes: int = 16, gradients: tuple = ()) -> dict:
    """The quantities the time model multiplies by its coefficients, for one algorithm on the layer
    ``c``: the forward pass and the ``gradients`` (of BACKWARD) that follow it. ``vector_bytes``:
    the plain loops' vector width (a short row wastes lanes). Direct sums its passes, each by the
    kernel it runs. The GEMM algorithms run the same GEMMs in each pass, and their training
    coefficients are fitted on one pass's features against three passes' times: with fewer
    gradients, their features count that share."""
    plan = c.plans[algorithm]
    if algorithm == "direct":
        passes = [_direct_pass(plan.passes[which], c.element_size, vector_bytes) for which in ("forward", *gradients)]
        return {f: sum(p[f] for p in passes) for f in DIRECT_FEATURES}
    m, n, k = max(plan.gemm_m, 1), max(plan.gemm_n, 1), max(plan.gemm_k, 1)
    inflation = 1.0 + gemm["m0"] / m + gemm["n0"] / n + gemm["k0"] / k
    share = (1 + len(gradients)) / (1 + len(BACKWARD)) if gradients else 1.0
    # A channels_last layer whose lowered driver runs NCHW (a one-channel input reads as NCHW, its
    # output does not) converts its output, or dy, whole in each pass: a strided gather.
    converted = math.prod(c.output_shape) if c.channels_last and not plan.nhwc else 0
    values = {"gemm": 2.0 * c.macs * inflation, "column": float(plan.column_elements),
              "column_strided": (float(plan.column_elements) if c.stride[1] > 1 else 0.0) + converted,
              "gemm_call": float(plan.gemm_calls * c.groups), "call": 1.0}
    return {f: share * v for f, v in values.items()}


def _direct_pass(counts: dict, element_size: int, vector_bytes: int) -> dict:
    """One direct pass's features from its plan's counts (csrc/plan_op.cpp). The plain loops run
    vectorised along a row of counts['row'] elements: a short row wastes lanes, and a strided row
    gathers (counted twice)."""
    values = dict.fromkeys(DIRECT_FEATURES, 0.0)
    values.update(inner_loop=float(counts["inner_loop"]), output=float(counts["output"]), call=1.0)
    if counts["output"] * element_size > CACHED_OUTPUT_BYTES:
        values["output_far"] = float(counts["output"])
    if counts["mac_amx"]:
        values.update(mac_amx=float(counts["mac_amx"]), strip=float(counts["strip"]))
        return values
    if counts["blocked"]:
        values.update(mac=float(counts["mac"]), mac_1x1=float(counts["mac_1x1"]),
                      weight_read=float(counts["weight_read"]), weight_pack=float(counts["weight_pack"]),
                      strip=float(counts["strip"]))
        return values
    lanes, row = max(1, vector_bytes // element_size), counts["row"]
    waste = math.ceil(row / lanes) * lanes / row if row else 1.0
    values["mac_plain"] = counts["mac"] * waste * (2 if counts["strided"] else 1)
    return values


_calibration_cache: dict = {}
_model_cache: dict = {}


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


def forget_calibration() -> None:
    _calibration_cache.clear()
    _model_cache.clear()


def calibration_key(device_type: str, dtype: torch.dtype, channels_last: bool = False) -> str:
    """A calibration entry's name: 'cpu/float32', 'cpu/bfloat16/channels_last', ..."""
    return f"{device_type}/{str(dtype).replace('torch.', '')}" + ("/channels_last" if channels_last else "")


@functools.cache
def machine_id(device_type: str = "cpu") -> str:
    """The name this machine's calibration entries go under: for the CPU its vendor, family and
    model ('GenuineIntel 6-167'; a hypervisor often hides the marketing name, never these), for
    CUDA the device's name."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    if "vendor_id" in fields:
        return f"{fields['vendor_id']} {fields.get('cpu family', '?')}-{fields.get('model', '?')}"
    return platform.processor() or platform.machine()


def model_for(device_type: str = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = False) -> dict:
    """The time model for a device type, dtype and layout (channels_last: the kernels see NHWC data):
    the calibration's entry for it, else the dtype's NCHW entry, else its device's float32 entry,
    else the built-in defaults; each missing piece from the defaults. At each step this machine's
    own entry (``machines``) comes before the shared one (``models``)."""
    key = (device_type, dtype, channels_last)
    if key not in _model_cache:
        calibration = load_calibration()
        own, shared = calibration.get("machines", {}).get(machine_id(device_type), {}), calibration.get("models", {})
        names = [calibration_key(device_type, dtype, channels_last), calibration_key(device_type, dtype),
                 calibration_key(device_type, torch.float32)]
        found = next((entries[name] for name in names for entries in (own, shared) if name in entries), {})
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


def predict(algorithm: str, c: Cost, device_type: str = "cpu", gradients: tuple = (),
            threads: int | None = None) -> tuple[float, dict]:
    """(predicted seconds, seconds per feature) of ``algorithm`` on the layer ``c``: the forward
    pass and the ``gradients`` after it, from the training model when calibrated (else the forward
    model, once per pass). The parallel terms scale from the calibration's thread count to
    ``threads`` (default: torch's current count; CPU only)."""
    model = model_for(device_type, c.dtype, c.channels_last)
    trained = model["training"][algorithm] if gradients else None
    coefficients, scale = (trained, 1.0) if trained is not None else (model["forward"][algorithm], 1 + len(gradients))
    parallel = 1.0
    if device_type == "cpu":
        parallel = model["threads"] / max(1, threads or torch.get_num_threads())
    values = features(algorithm, c, model["gemm"], model["direct_vector_bytes"], gradients if trained else ())
    terms = {f: scale * coefficients.get(f, 0.0) * v * (parallel if f in PARALLEL_FEATURES else 1.0)
             for f, v in values.items()}
    return sum(terms.values()), terms
