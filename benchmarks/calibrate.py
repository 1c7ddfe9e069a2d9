"""``python -m benchmarks --calibrate``: measure the constants of 'auto''s time model on this
machine and save them (channelconv/calibration.json, which channelconv/timemodel.py loads).

1. GEMM efficiency. Batched products (G x M x K) . (G x K x N) over a grid of small and large
   M, N, K are timed and fitted to  t = (2GMNK / rate) * (1 + m0/M + n0/N + k0/K) + per-GEMM +
   per-call; m0, n0, k0 say how small a dimension must get before the GEMM leaves its peak.
2. Each algorithm, forward and a training step, on probe layers that are *not* the suites' layers:
   51 chosen by hand across the regimes (channel counts, sizes, kernels, strides, groups, batches
   2-8, tiny layers for the per-call overheads) and 60 drawn at random across what users bring
   (shapes.random_layers: channels 1-2048, maps 3-224, kernels 1-7, strides 1-2, batches 1-256,
   groups). Their coefficients
   (timemodel.features: seconds per GEMM FLOP, per column element, per small GEMM, per call; for
   direct per multiply-add, per strided multiply-add, per inner loop, per plane) are a
   non-negative least-squares fit of the measured times, weighted so that relative errors count.

3. The fitted model ranks the algorithms on 30 more random layers it was not fitted on (another
   seed): how often its pick is within 10 % of the fastest, and the geometric mean of its pick's
   time over the fastest, saved as each pass's "held_out" figures. The 'offgrid' suite is a third
   random set, seen by neither.

The suite then shows how well the model ranks the algorithms on the real layers (the summary's
"'auto': choice within 10 % ..." line).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.benchmark import Timer

import channelconv
from channelconv import select, timemodel
from channelconv.cost import BACKWARD

from .runner import LayerCase, Settings, cpu_name, interleaved
from .shapes import CALIBRATION_SEED, VALIDATION_SEED, Layer, random_layers


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 500) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(iterations):
        if passive.all() or (w[~passive] <= 1e-12 * max(1.0, np.abs(w).max())).all():
            break
        j = np.argmax(np.where(passive, -np.inf, w))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
        w = a.T @ (b - a @ x)
    return x


def relative_fit(rows: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the sum of squared relative errors."""
    scale = rows.max(axis=0)
    scale[scale == 0] = 1.0
    weighted = (rows / scale) / times[:, None]
    return nnls(weighted, np.ones(len(times))) / scale


# ------------------------------------------------------------------------------------------------
# Probes


def probe_layers(quick: bool = False) -> list[Layer]:
    """Layers unlike the suites' (channel counts, sizes and batches chosen off their grid)."""
    spec = [  # c_in, c_out, size, kernel, stride, groups, batch, dilation
        (40, 80, 48, 1, 1, 1, 2, 1), (80, 320, 24, 1, 1, 1, 2, 1), (320, 80, 24, 1, 1, 1, 2, 1),
        (640, 640, 6, 1, 1, 1, 4, 1), (1280, 320, 6, 1, 1, 1, 2, 1), (160, 320, 24, 1, 2, 1, 2, 1),
        (640, 1280, 12, 1, 2, 1, 1, 1), (24, 120, 48, 1, 1, 1, 2, 1), (120, 24, 48, 1, 1, 1, 2, 1),
        (16, 64, 96, 1, 1, 1, 1, 1),
        (3, 40, 96, 3, 2, 1, 2, 1), (20, 20, 48, 3, 1, 1, 2, 1), (40, 40, 48, 3, 1, 1, 2, 1),
        (80, 160, 24, 3, 1, 1, 2, 1), (120, 120, 24, 3, 2, 1, 2, 1), (240, 240, 12, 3, 1, 1, 2, 1),
        (480, 480, 6, 3, 1, 1, 2, 1), (320, 320, 12, 3, 2, 1, 2, 1), (160, 160, 24, 3, 1, 1, 1, 1),
        (48, 48, 40, 3, 1, 4, 2, 1), (160, 160, 12, 3, 1, 8, 2, 1),
        (40, 40, 48, 3, 1, 40, 2, 1), (120, 120, 24, 3, 2, 120, 2, 1), (240, 240, 12, 3, 1, 240, 4, 1),
        (480, 480, 6, 3, 1, 480, 4, 1), (72, 72, 20, 3, 1, 1, 2, 2),
        (40, 80, 24, 5, 1, 1, 2, 1), (80, 80, 12, 5, 1, 1, 2, 1), (24, 24, 24, 5, 1, 24, 2, 1),
        (3, 40, 80, 7, 2, 1, 2, 1), (20, 40, 24, 7, 1, 1, 1, 1),
        # mid-size layers at training batches, where direct and im2col run close
        (48, 96, 80, 3, 1, 1, 2, 1), (96, 96, 40, 3, 1, 1, 4, 1), (192, 192, 20, 3, 1, 1, 4, 1),
        (384, 384, 10, 3, 1, 1, 4, 1), (96, 384, 20, 1, 1, 1, 4, 1), (288, 72, 48, 1, 1, 1, 2, 1),
        (576, 144, 20, 1, 1, 1, 4, 1),
        (3, 48, 160, 7, 2, 1, 2, 1), (160, 160, 24, 3, 1, 1, 4, 1), (320, 320, 12, 3, 1, 1, 4, 1),
        # one-channel stems (grey images), whose gradients are a single weight-gradient unit
        (1, 20, 120, 3, 1, 1, 2, 1), (1, 40, 80, 5, 2, 1, 2, 1),
        (160, 160, 40, 3, 2, 1, 4, 1), (320, 320, 20, 3, 2, 1, 4, 1), (640, 640, 8, 3, 1, 1, 4, 1),
        # large layers, whose column bands outgrow the caches
        (144, 288, 48, 3, 1, 1, 4, 1), (288, 288, 24, 3, 1, 1, 4, 1), (96, 96, 96, 3, 1, 1, 2, 1),
        # few channels at large batches (small nets trained on small images): the blocked engines'
        # narrow tiles, AMX's padded channels and skinny GEMMs
        (2, 10, 30, 5, 1, 1, 48, 1), (8, 20, 18, 5, 1, 1, 48, 1), (12, 24, 20, 3, 1, 1, 24, 1),
        (24, 48, 10, 3, 1, 1, 32, 1),
    ]
    spec = [(*layer[:6], 2 * layer[6], layer[7]) for layer in spec]  # batches of 2-16: whole images share GEMMs
    spec += [  # at the batch given:
        # tiny layers, where the per-call overheads decide
        (6, 12, 14, 3, 1, 1, 1, 1), (12, 6, 9, 1, 1, 1, 1, 1), (12, 12, 9, 3, 1, 12, 2, 1), (10, 20, 11, 1, 2, 1, 1, 1),
        # deep layers at batch 1 and 2, whose weights outweigh the work: packing them for the blocked
        # tiles costs direct more than its multiply-adds
        (448, 448, 4, 3, 1, 1, 1, 1), (320, 640, 9, 3, 2, 1, 1, 1), (768, 768, 3, 3, 1, 1, 2, 1),
        (1536, 384, 5, 1, 1, 1, 1, 1),
    ]
    layers = []
    for c_in, c_out, size, k, s, g, n, d in spec:
        layers.append(Layer(f"probe {c_in}->{c_out} {k}x{k}/{s} @{size} g{g} n{n}", c_in, c_out, (size, size),
                            (k, k), (s, s), ((k // 2) * d,) * 2, (d, d), g, False, batch=n))
    layers += random_layers(CALIBRATION_SEED, 60, PROBE_MACS)
    return layers[::4] if quick else layers


PROBE_MACS = 1.5e8  # the random probes' forward multiply-adds at most: milliseconds each


def validation_layers(quick: bool = False) -> list[Layer]:
    """Random layers the fit never sees, to check it on (VALIDATION_SEED)."""
    layers = random_layers(VALIDATION_SEED, 30, PROBE_MACS)
    return layers[::4] if quick else layers


def gemm_probes(quick: bool = False):
    """(G, M, K, N) of batched GEMMs like the lowered algorithms' (M = C_o/g, K = C_i/g*k*k, N = pixels)."""
    shapes = []
    for m in (1, 8, 64, 256):
        for k in (9, 64, 576, 2304):
            for n in (49, 400, 3136):
                g = 32 if m <= 8 else 1
                if g * m * k * n <= 4e8:
                    shapes.append((g, m, k, n))
    return shapes[::5] if quick else shapes


# ------------------------------------------------------------------------------------------------


def _time_gemm(g, m, k, n, settings: Settings, min_run_time: float) -> float:
    a = torch.randn(g, m, k, device=settings.device).to(settings.dtype)
    b = torch.randn(g, k, n, device=settings.device).to(settings.dtype)
    out = torch.empty(g, m, n, device=settings.device, dtype=settings.dtype)
    clock = {"timer": time.thread_time} if settings.cpu_clock else {}
    timer = Timer("torch.bmm(a, b, out=out)", globals={"torch": torch, "a": a, "b": b, "out": out},
                  num_threads=settings.threads or torch.get_num_threads(), **clock)
    return min(timer.blocked_autorange(min_run_time=min_run_time).times)  # the least-disturbed block


def fit_gemm(settings: Settings, quick: bool, log) -> dict:
    rows, times = [], []
    for g, m, k, n in gemm_probes(quick):
        t = _time_gemm(g, m, k, n, settings, 0.02 if quick else 0.1)
        flops = 2.0 * g * m * n * k
        rows.append([flops, flops / m, flops / n, flops / k, g, 1.0])
        times.append(t)
    coef = relative_fit(np.array(rows), np.array(times))
    rate = 1 / coef[0] if coef[0] > 0 else float("nan")
    gemm = {"m0": float(coef[1] / coef[0]), "n0": float(coef[2] / coef[0]), "k0": float(coef[3] / coef[0]),
            "rate_gflops": float(rate / 1e9)}
    pred = np.array(rows) @ coef
    err = np.abs(pred / np.array(times) - 1)
    log(f"GEMM: {len(times)} batched products; rate {gemm['rate_gflops']:.0f} GFLOP/s, m0 {gemm['m0']:.1f}, "
        f"n0 {gemm['n0']:.1f}, k0 {gemm['k0']:.1f}; fit error median {100 * np.median(err):.0f}%, "
        f"max {100 * err.max():.0f}%")
    return gemm


def measure_probes(layers, pass_: str, settings: Settings, progress=None) -> list[dict]:
    out = []
    for layer in layers:
        case = LayerCase(layer, settings)
        algorithms = [a for a in channelconv.ALGORITHMS if case.cost.plans[a].applicable]
        samples = interleaved({a: case.function(a, pass_) for a in algorithms}, settings)
        # The least-disturbed block: the model should describe the machine, not its neighbours.
        out.append({"layer": layer, "cost": case.cost, "gradients": BACKWARD if pass_ == "training" else (),
                    "seconds": {a: min(s) for a, s in samples.items()}})
        if progress is not None:
            progress.update()
    return out


LOWERED = ("im2col", "1x1")  # one GEMM driver (csrc/lowered.cpp): fitted together


def _rows(measured, algorithm, gemm, vector_bytes):
    names = timemodel.DIRECT_FEATURES if algorithm == "direct" else timemodel.LOWERED_FEATURES
    rows, times = [], []
    for probe in measured:
        if algorithm in probe["seconds"]:
            f = timemodel.features(algorithm, probe["cost"], gemm, vector_bytes, probe["gradients"])
            rows.append([f[name] for name in names])
            times.append(probe["seconds"][algorithm])
    return names, np.array(rows).reshape(len(rows), len(names)), np.array(times)


def _fit(measured, algorithms, gemm, vector_bytes):
    """One set of coefficients for ``algorithms`` (their probes pooled); the relative errors per algorithm."""
    parts = [_rows(measured, a, gemm, vector_bytes) for a in algorithms]
    names = parts[0][0]
    coef = relative_fit(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
    errors = {a: np.abs(p[1] @ coef / p[2] - 1) for a, p in zip(algorithms, parts)}
    return {name: float(c) for name, c in zip(names, coef)}, errors


def fit_algorithms(measured, gemm: dict, log, pass_: str, vector_bytes=None) -> tuple[dict, dict, int]:
    """Coefficients per algorithm: direct on its own (with its vector width, 16, 32 or 64 bytes,
    the one that fits best unless given), im2col and 1x1 together, since they share the GEMM
    driver and differ only in building columns (so a 1x1 kernel at stride 1, which needs none,
    is never predicted slower by im2col)."""
    coefficients, errors = {}, {}
    if vector_bytes is None:
        fits = {vb: _fit(measured, ["direct"], gemm, vb) for vb in (16, 32, 64)}
        vector_bytes = min(fits, key=lambda vb: float(np.mean(fits[vb][1]["direct"] ** 2)))
        coef, err = fits[vector_bytes]
    else:
        coef, err = _fit(measured, ["direct"], gemm, vector_bytes)
    coefficients["direct"] = coef
    errors.update(err)
    coef, err = _fit(measured, list(LOWERED), gemm, vector_bytes)
    coefficients.update({a: dict(coef) for a in LOWERED})
    errors.update(err)
    quality = {}
    for algorithm in channelconv.ALGORITHMS:
        err = errors[algorithm]
        quality[algorithm] = {"probes": len(err), "median_rel_error": float(np.median(err)),
                              "max_rel_error": float(err.max())}
        extra = f" (vector {vector_bytes} B)" if algorithm == "direct" else ""
        log(f"{pass_:8s} {algorithm:7s}{extra}: {len(err)} probes, prediction error median "
            f"{100 * np.median(err):.0f}%, max {100 * err.max():.0f}%; "
            + ", ".join(f"{n}={c:.3g}" for n, c in coefficients[algorithm].items()))
    return coefficients, quality, vector_bytes


def ranking_quality(measured, model_pass: dict, gemm: dict, vector_bytes: int) -> dict:
    """How often the fitted model's pick is within 10 % of the measured fastest, on the probes, and
    the geometric mean of the pick's measured time over the fastest's."""
    good, total, log_regret = 0, 0, 0.0
    for probe in measured:
        seconds = probe["seconds"]
        if len(seconds) < 2:
            continue
        predicted = {a: sum(model_pass[a].get(f, 0) * v
                            for f, v in timemodel.features(a, probe["cost"], gemm, vector_bytes,
                                                        probe["gradients"]).items())
                     for a in seconds}
        pick = select.order(predicted, {a: probe["cost"].plans[a].workspace_bytes for a in seconds})[0][1]
        good += seconds[pick] <= 1.10 * min(seconds.values())
        log_regret += float(np.log(seconds[pick] / min(seconds.values())))
        total += 1
    return {"within_10pct": good, "probes": total, "pick_over_fastest": float(np.exp(log_regret / max(total, 1)))}


def calibrate(settings: Settings, path=None, quick: bool = False, progress: bool = True,
              passes=("forward", "training"), cpu_clock: bool = False) -> dict:
    """Measure, fit, save. ``cpu_clock``: time one thread by its own CPU clock
    (``time.thread_time``) instead of the wall clock: on a shared, busy machine the CPU time of
    a single-threaded op is what it would take alone, while wall time includes whoever else ran.
    The model then scales its parallel terms from 1 thread to the thread count in use."""
    path = Path(path or timemodel.CALIBRATION_FILE)
    start = time.perf_counter()

    def log(text):
        print(text, flush=True)

    if cpu_clock:
        if settings.device != "cpu":
            raise ValueError("--cpu-clock calibrates CPU kernels only")
        torch.set_num_threads(1)
        settings.threads, settings.cpu_clock = 1, True

    # Many short blocks: the more of them, the likelier one ran undisturbed (its minimum is kept).
    settings.rounds, settings.min_rounds = (2, 2) if quick else (6, 3)
    settings.block_s, settings.slow_s = (0.005, 0.05) if quick else (0.01, 0.2)
    settings.batch = 2
    clock_name = "thread CPU time" if settings.cpu_clock else "wall time"
    machine = timemodel.machine_id(settings.device)
    where = (f"{cpu_name()} ({machine}), {settings.threads} thread(s)" if settings.device == "cpu" else machine)
    log(f"calibrating 'auto' on {where}, {settings.device} "
        f"{str(settings.dtype).replace('torch.', '')}, {settings.memory_format}, {clock_name}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    key = timemodel.calibration_key(settings.device, settings.dtype, settings.memory_format == "channels_last")
    saved = data.get("machines", {}).get(machine, {}).get(key)
    partial = saved is not None and set(passes) != {"forward", "training"}
    if partial and (saved.get("threads"), saved.get("clock")) != (settings.threads, clock_name):
        raise ValueError(f"refitting {', '.join(passes)} alone needs the saved entry's setting ({saved.get('threads')} "
                         f"thread(s), {saved.get('clock')}); got {settings.threads} thread(s), {clock_name}")
    if partial:  # refit some passes on the saved basis: GEMM constants and vector width stay
        gemm = {**saved["gemm"], "rate_gflops": saved.get("gemm_rate_gflops")}
        log(f"refitting {', '.join(passes)} with the saved GEMM constants and vector width")
    else:
        gemm = fit_gemm(settings, quick, log)
    layers, held_out = probe_layers(quick), validation_layers(quick)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=(len(layers) + len(held_out)) * len(passes), unit="probe", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    entry = {"gemm": {k: gemm[k] for k in ("m0", "n0", "k0")}, "gemm_rate_gflops": gemm["rate_gflops"], "fit": {},
             "threads": settings.threads, "clock": clock_name}
    vector_bytes = None
    if partial:
        entry = {**saved, "fit": dict(saved.get("fit", {})), "threads": settings.threads, "clock": clock_name}
        vector_bytes = saved.get("direct_vector_bytes")
    for pass_ in passes:
        measured = measure_probes(layers, pass_, settings, bar)
        coefficients, quality, vector_bytes = fit_algorithms(measured, entry["gemm"], log, pass_, vector_bytes)
        entry[pass_] = coefficients
        entry["direct_vector_bytes"] = vector_bytes
        rank = ranking_quality(measured, coefficients, entry["gemm"], vector_bytes)
        unseen = ranking_quality(measure_probes(held_out, pass_, settings, bar), coefficients, entry["gemm"],
                                 vector_bytes)
        quality["ranking"], quality["held_out"] = rank, unseen
        entry["fit"][pass_] = quality
        log(f"{pass_:8s} ranking: the model's pick within 10% of the measured fastest on "
            f"{rank['within_10pct']}/{rank['probes']} probes ({rank['pick_over_fastest']:.3f}x the fastest, geomean); "
            f"held out: {unseen['within_10pct']}/{unseen['probes']} ({unseen['pick_over_fastest']:.3f}x)")
    if bar is not None:
        bar.close()
    source = (f"calibrated {time.strftime('%Y-%m-%d')} on {where}, "
              f"{clock_name}, torch {torch.__version__}{' (quick)' if quick else ''}")
    entry["source"] = f"{saved['source']}; {', '.join(passes)} refitted {source[len('calibrated '):]}" if partial \
        else source
    data.setdefault("version", 1)
    data.setdefault("machines", {}).setdefault(machine, {})[key] = entry
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    select.reload_calibration()
    log(f"saved {key} for {machine} to {path} in {time.perf_counter() - start:.0f} s")
    return entry


__all__ = ["calibrate", "nnls", "probe_layers"]
