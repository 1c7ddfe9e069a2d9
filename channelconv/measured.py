"""'auto' in benchmark mode (``set_benchmark_mode(True)``, like ``torch.backends.cudnn.benchmark``):
the first call for a shape signature (sizes, arguments, dtype, device, layout, which gradients
will be needed, threads, workspace limit) times every applicable candidate on the call's own
tensors — forward, plus those gradients — and caches the fastest; later
calls with that signature use it. The cache is shared by all threads and filled under a lock.
Candidates the time model predicts to be over ``PRUNE_FACTOR`` times slower than the best are not
timed. Inside a torch.compile trace nothing is timed (select.py does not call here then)."""

from __future__ import annotations

import threading

import torch

from ._ops import OPS, TAKES_WORKSPACE, is_plain
from .workspace import get_workspace_limit

PRUNE_FACTOR = 10.0

_enabled = False
_cache: dict = {}
_lock = threading.Lock()


def set_benchmark_mode(enabled: bool = True) -> None:
    """Measured 'auto': time every candidate on the first call of each shape signature and cache
    the fastest (like ``torch.backends.cudnn.benchmark``). Off by default."""
    global _enabled
    _enabled = bool(enabled)


def get_benchmark_mode() -> bool:
    return _enabled



def can_time(t) -> bool:
    """A plain tensor with data: not a subclass (the fake tensors of a trace) nor on the meta device."""
    return is_plain(t) and not t.is_meta


def clear_benchmark_cache() -> None:
    with _lock:
        _cache.clear()


def benchmark_cache() -> dict:
    """A copy of the measured choices: signature -> {'choice': ..., 'seconds': {algorithm: median}}."""
    with _lock:
        return {k: {"choice": v["choice"], "seconds": dict(v["seconds"])} for k, v in _cache.items()}


def signature(input, weight, bias, stride, padding, dilation, groups, gradients) -> tuple:
    fmt = ("channels_last" if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
           else "contiguous" if input.is_contiguous() else "strided")
    return (tuple(input.shape), tuple(weight.shape), bias is not None, tuple(stride), tuple(padding), tuple(dilation),
            groups, input.dtype, str(input.device), fmt, gradients, torch.get_num_threads(), get_workspace_limit())


def lookup(key) -> dict | None:
    """The measured entry of a signature, if benchmark mode has timed it."""
    return _cache.get(key)


def measure(key, tensors, args, gradients, ranked) -> dict:
    """The entry of signature ``key``, timing the candidates first if no thread has yet.
    ``ranked()``: the time model's (predicted seconds, algorithm) list, best first."""
    hit = _cache.get(key)
    if hit is None:
        with _lock:
            hit = _cache.get(key)
            if hit is None:
                hit = _cache[key] = _time_candidates(*tensors, *args, gradients, ranked())
    return hit


def _time_candidates(input, weight, bias, stride, padding, dilation, groups, gradients, ranked,
                     rounds: int = 5) -> dict:
    from torch.utils.benchmark.utils.timer import timer as clock  # synchronises an accelerator

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
            if "input_grad" in gradients:
                ops.backward_input(y, w, x.shape, *args, *extra)
            if "weight_grad" in gradients:
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
            except RuntimeError:  # e.g. a workspace that cannot be allocated
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
