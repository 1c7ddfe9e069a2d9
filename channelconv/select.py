"""'auto': which of channelconv's own algorithms runs a given shape (never F.conv2d).

One decision function, ``decide()``, serves both ``explain()`` (why) and ``choose()`` (on every
'auto' call; it makes decide()'s checks itself, once, and calls the same ``_decide``), so they
cannot disagree. It decides, like cuDNN, in one of two ways:

* The heuristic (default): the time model (timemodel.py) predicts each applicable algorithm's
  time from its C++ plan; the fastest wins, except that in a near tie the candidate that needs no
  workspace goes first (order()). With symbolic sizes (torch.compile dynamic shapes) the model
  cannot run, and a structural rule decides ('1x1' for 1x1 kernels, otherwise 'im2col').
* Measured (``set_benchmark_mode(True)``, measured.py): the candidates are timed once per shape
  signature on the call's own tensors and the fastest is cached. Inside a torch.compile trace
  nothing is timed; the heuristic decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import measured, timemodel
from ._ops import backward_passes, is_plain
from ._shapes import ALGORITHMS, is_1x1, memory_format_of, pair
from .cost import BACKWARD, Cost, cost
from .timemodel import FEATURE_NAMES, predict
from .workspace import get_workspace_limit

# Predictions closer than this are a tie to the model: its median error on the probes is 4-6 %
# (calibration.json, "fit"). In a tie the candidate that allocates no workspace goes first:
# memory is a cost the user pays too, and where the two really differ it is the one that moves
# fewer bytes (benchmarks/NOTES.md).
NEAR_TIE = 0.06


@dataclass(frozen=True)
class Decision:
    choice: str
    source: str  # 'heuristic', 'measured' or 'rule'
    measured: dict | None = None  # benchmark mode's entry: {'choice': ..., 'seconds': {algorithm: median}}


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


def ranked(c: Cost, device_type: str, gradients: tuple) -> list[tuple[float, str]]:
    """The applicable candidates for the layer ``c`` (its forward pass and ``gradients``), best first (order())."""
    applicable = [a for a in ALGORITHMS if c.plans[a].applicable]
    return order({a: predict(a, c, device_type, gradients)[0] for a in applicable},
                 {a: c.plans[a].workspace_bytes for a in applicable})


def _rule(weight_shape) -> Decision:
    return Decision("1x1" if is_1x1(weight_shape[2:]) else "im2col", "rule")


def _concrete(input_shape, weight_shape, tensors) -> bool:
    """Whether the sizes are plain ints: always those of plain tensors (checked first: this runs on
    every call); a trace's (fake tensors) may be symbolic."""
    if tensors is not None and is_plain(tensors[0]) and is_plain(tensors[1]):
        return True
    return all(type(d) is int for d in (*input_shape, *weight_shape))


_choice_cache: dict = {}  # the heuristic's decisions (a pure function of the key and the model)


def decide(input_shape, weight_shape, stride, padding, dilation, groups, device_type="cpu", dtype=torch.float32,
           gradients=(), tensors=None, measure=True, memory_format=torch.contiguous_format) -> Decision:
    """The decision for explicit arguments (padding a pair of ints), for a forward pass and the
    ``gradients`` (of cost.BACKWARD) that follow it, on an input in ``memory_format``.
    ``tensors=(input, weight, bias)``: in benchmark mode, the tensors to time the candidates on
    (``measure=False``: only look the signature up)."""
    if torch.compiler.is_compiling() or not _concrete(input_shape, weight_shape, tensors):
        return _rule(weight_shape)  # traced sizes may be symbolic, and a trace must not time anything
    return _decide(input_shape, weight_shape, stride, padding, dilation, groups, device_type, dtype, gradients,
                   tensors, measure, memory_format)


def _decide(input_shape, weight_shape, stride, padding, dilation, groups, device_type, dtype, gradients, tensors,
            measure, memory_format=torch.contiguous_format) -> Decision:
    timed = tensors is not None and measured.get_benchmark_mode()
    if timed and all(t is None or measured.can_time(t) for t in tensors):
        key = measured.signature(*tensors, stride, padding, dilation, groups, gradients)
        entry = measured.lookup(key)
        if entry is None and measure:
            entry = measured.measure(key, tensors, (stride, padding, dilation, groups), gradients, lambda: ranked(
                cost(input_shape, weight_shape, stride, padding, dilation, groups, dtype, device=device_type,
                     memory_format=memory_format), device_type, gradients))
        if entry is not None:
            return Decision(entry["choice"], "measured", entry)
    key = (tuple(input_shape), tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), groups,
           device_type, dtype, gradients, get_workspace_limit(), torch.get_num_threads(), memory_format)
    decision = _choice_cache.get(key)
    if decision is None:
        try:
            c = cost(input_shape, weight_shape, stride, padding, dilation, groups, dtype, device=device_type,
                     memory_format=memory_format)
        except ValueError:  # arguments the op will reject, with its own message: no cost to model
            return _rule(weight_shape)
        best = ranked(c, device_type, gradients)
        if len(_choice_cache) >= 4096:
            _choice_cache.clear()
        decision = _choice_cache[key] = Decision(best[0][1] if best else "direct", "heuristic")
    return decision


def choose(input_shape, weight_shape, stride, padding, dilation, groups, *, tensors=None) -> str:
    """The algorithm 'auto' runs for these explicit arguments (padding a pair of ints): decide()'s
    choice. ``tensors=(input, weight, bias)``, when given, supplies the dtype and device, which
    gradients the call will need, and in benchmark mode the tensors to time the candidates on."""
    if torch.compiler.is_compiling() or not _concrete(input_shape, weight_shape, tensors):
        return _rule(weight_shape).choice
    if tensors is None:
        return _decide(input_shape, weight_shape, stride, padding, dilation, groups, "cpu", torch.float32, (), None,
                       True).choice
    input = tensors[0]
    return _decide(input_shape, weight_shape, stride, padding, dilation, groups,
                   "cpu" if input.is_cpu else input.device.type,  # (is_cpu: the cheaper attribute)
                   input.dtype, backward_passes(input, tensors[1]), tensors, True,
                   memory_format_of(input, tensors[1])).choice


def reload_calibration() -> None:
    """Forget the loaded calibration and the decisions made with it (after ``python -m benchmarks
    --calibrate`` rewrote it)."""
    timemodel.forget_calibration()
    _choice_cache.clear()


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
            timed = f", measured {_fmt_s(cand.measured_seconds)}" if cand.measured_seconds else ""
            lines.append(f"  {cand.algorithm:7s} predicted {_fmt_s(cand.predicted_seconds)} "
                         f"({cand.predicted_gflops:.1f} GFLOP/s){timed}, workspace {cand.workspace_bytes} B, "
                         f"moves {cand.bytes_moved / 1e6:.1f} MB")
        return "\n".join(lines)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def _shape_of(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def explain(input, weight, stride=1, padding=0, dilation=1, groups=1, *, bias=None, training=None,
            memory_format=None) -> Explanation:
    """Why 'auto' picks what it picks for ``conv2d(input, weight, bias, stride, padding, dilation,
    groups)``: the choice, the reason in words, and each candidate's cost figures (predicted time
    and its terms, FLOPs, workspace, bytes moved; the measured time when benchmark mode has
    timed this signature). ``input`` and ``weight`` may be tensors or shapes; ``training`` (True:
    both gradients follow) defaults to the gradients a call with these tensors would need;
    ``memory_format`` (``torch.channels_last`` or ``torch.contiguous_format``) to the input
    tensor's, or NCHW for a shape."""
    in_shape, w_shape = _shape_of(input), _shape_of(weight)
    if len(in_shape) == 3:
        in_shape = (1, *in_shape)
    tensors = isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)
    bias_t = bias if isinstance(bias, torch.Tensor) else None
    dtype = input.dtype if tensors else torch.float32
    device_type = input.device.type if tensors else "cpu"
    if training is None:
        gradients = backward_passes(input, weight) if tensors else ()
    else:
        gradients = BACKWARD if training else ()
    training = bool(gradients)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if memory_format is None:
        memory_format = (memory_format_of(input, weight if tensors else None) if isinstance(input, torch.Tensor)
                         else torch.contiguous_format)
    c = cost(in_shape, w_shape, stride, padding, dilation, groups, dtype, bias=bias is not None and bias is not False,
             device=device_type, memory_format=memory_format)
    timed_on = None
    if tensors:
        x = input if input.dim() == 4 else input.unsqueeze(0)
        if c.input_shape == tuple(x.shape):  # not an even-kernel 'same' (its padded input is made later)
            timed_on = (x, weight, bias_t)
    decision = decide(c.input_shape, c.weight_shape, stride, c.padding, dilation, groups, device_type, dtype,
                      gradients, timed_on, measure=False, memory_format=memory_format)
    best = ranked(c, device_type, gradients)
    seconds = decision.measured["seconds"] if decision.measured else {}
    candidates = {}
    for algorithm in ALGORITHMS:
        plan = c.plans[algorithm]
        moved = (c.backward_bytes_moved + c.forward_bytes_moved if training else c.forward_bytes_moved)
        moved += 2 * plan.column_bytes * (1 + len(gradients))
        predicted, terms = predict(algorithm, c, device_type, gradients) if plan.applicable else (None, {})
        candidates[algorithm] = Candidate(
            algorithm, plan.applicable, plan.why_not, predicted, terms,
            c.forward_flops * (1 + len(gradients)), plan.workspace_bytes if plan.applicable else None,
            plan.column_bytes, moved, seconds.get(algorithm))
    if decision.source == "rule":
        reason = "symbolic sizes: the structural rule decides"
    elif decision.source == "measured":
        timed = sorted(seconds.items(), key=lambda kv: kv[1])
        reason = f"benchmark mode timed {', '.join(f'{a} {_fmt_s(s)}' for a, s in timed)}; the fastest is cached"
    else:
        reason = _reason(best, candidates)
    return Explanation(decision.choice, reason, decision.source, training, candidates, c)


def _reason(best, candidates) -> str:
    if not best:
        return "no lowered algorithm applies; 'direct' always does"
    best_t, first = best[0]
    second_t, second = best[1] if len(best) > 1 else (None, None)
    if second and second_t <= best_t and candidates[first].workspace_bytes == 0 < candidates[second].workspace_bytes:
        # a near tie, settled by the workspace (order())
        text = (f"'{first}' ({_fmt_s(best_t)}) is predicted within {100 * NEAR_TIE:.0f}% of '{second}' "
                f"({_fmt_s(second_t)}), a tie to the model, and needs no workspace ('{second}' needs "
                f"{candidates[second].workspace_bytes} bytes).")
    else:
        parts = [f"'{first}' is predicted fastest ({_fmt_s(best_t)})"]
        if second:
            parts.append(f"{second_t / best_t:.2f}x ahead of '{second}' ({_fmt_s(second_t)})")
        text = ", ".join(parts) + "."
    for t, algorithm in best:
        terms = candidates[algorithm].terms
        top = max(terms, key=terms.get)
        text += f" {algorithm}: mostly {FEATURE_NAMES[top]} ({100 * terms[top] / t:.0f}% of its time)."
    for cand in candidates.values():
        if not cand.applicable:
            text += f" {cand.algorithm}: not applicable ({cand.why_not})."
    return text
