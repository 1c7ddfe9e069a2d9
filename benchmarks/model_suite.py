"""The model suite: whole networks (benchmarks/models.py), converted with ``channelconv.convert``,
against the same networks with nn.Conv2d, interleaved in one process (runner.interleaved).

Modes per model: inference (eval mode, no grad) and a training step (train mode: forward,
cross-entropy against fixed labels, backward, an SGD step with momentum), and on request
per-sample gradients (eval mode: torch.func.vmap over grad of one sample's loss, as
differential-privacy trainers compute them). Both copies start from the same weights; each has its
own optimizer. Before timing, the converted model's inference output
is compared with the original's (relative error, float64 references of both, without autocast).

With ``Settings.memory_format`` channels_last both models and the input are channels_last; with
``Settings.autocast`` both sides run inference, and a training step's forward and loss, under
torch.autocast, the weights float32."""

from __future__ import annotations

import contextlib
import copy
import csv
import math

import torch
import torch.nn.functional as F

import channelconv

from .models import ModelSpec
from .runner import Settings, in_memory_format, interleaved

MODES = ("inference", "training", "per-sample")
DEFAULT_MODES = MODES[:2]
REFERENCE_SIDE, OUR_SIDE = "nn.Conv2d", "channelconv"


def _inputs(spec: ModelSpec, batch: int, size: int, settings: Settings):
    generator = torch.Generator().manual_seed(0)
    x = in_memory_format(torch.randn(batch, spec.channels, size, size, generator=generator)
                         .to(settings.device, settings.dtype), settings)
    target = torch.randint(0, spec.classes, (batch,), generator=generator).to(settings.device)
    return x, target


def _autocast(settings: Settings):
    """Forward and loss under torch.autocast with --autocast (backward outside it, as autocast's
    recipe has it); otherwise nothing, so that a default run times what it always did."""
    if settings.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device, dtype=settings.autocast)


def _step(model, x, target, settings):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():  # no GradScaler for float16: the step is timed, not trained to convergence
        optimizer.zero_grad(set_to_none=True)
        with _autocast(settings):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
    return step


def _infer(model, x, target, settings):
    def infer():
        with torch.no_grad(), _autocast(settings):
            model(x)
    return infer


def _per_sample(model, x, target, settings):
    # No autocast here (the CLI refuses it): vmap(grad) under autocast fails in torch itself on
    # batch-norm networks, nn.Conv2d's side too ('expected scalar type BFloat16 but found Float').
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(params, sample, label):
        output = torch.func.functional_call(model, (params, buffers), (sample.unsqueeze(0),))
        return F.cross_entropy(output, label.unsqueeze(0))

    gradients = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    return lambda: gradients(params, x, target)


RUN = {"inference": _infer, "training": _step, "per-sample": _per_sample}


def output_error(reference, ours, x) -> float:
    """‖ours(x) − reference(x)‖ / ‖reference(x)‖ in eval mode, both in float64: what conversion changed."""
    ref64, ours64 = copy.deepcopy(reference).double().eval(), copy.deepcopy(ours).double().eval()
    with torch.no_grad():
        want, got = ref64(x.double()), ours64(x.double())
    return ((got - want).norm() / want.norm()).item()


def run_model(spec: ModelSpec, settings: Settings, batch: int | None = None, size: int | None = None,
              modes=DEFAULT_MODES) -> list[dict]:
    batch, size = batch or spec.batch, size or spec.size
    torch.manual_seed(0)
    reference = in_memory_format(spec.build().to(settings.device, settings.dtype), settings)
    ours = in_memory_format(channelconv.convert(copy.deepcopy(reference)), settings)
    x, target = _inputs(spec, batch, size, settings)
    error = output_error(reference, ours, x)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in reference.modules())
    rows = []
    for mode in modes:
        for model in (reference, ours):
            model.train(mode == "training")
        functions = {side: RUN[mode](model, x, target, settings)
                     for side, model in ((REFERENCE_SIDE, reference), (OUR_SIDE, ours))}
        samples = interleaved(functions, settings)
        medians = {side: sorted(s)[len(s) // 2] for side, s in samples.items()}
        for side, seconds in medians.items():
            rows.append({"suite": "models", "model": spec.name, "mode": mode, "batch": batch, "size": size,
                         "channels": spec.channels, "convs": convs, "side": side, "median_s": seconds,
                         "samples_s": samples[side], "ratio": medians[REFERENCE_SIDE] / seconds,
                         "rel_error": error if side == OUR_SIDE else 0.0})
    return rows


def table(rows) -> str:
    """One line per model and mode: the two medians and the ratio (nn.Conv2d's time / channelconv's)."""
    out = [f"{'model':18s} {'mode':9s} {'input':>13s} {'convs':>5s} {'nn.Conv2d ms':>12s} {'channelconv ms':>14s} "
           f"{'ratio':>6s} {'rel.err':>8s}"]
    for (model, mode), pair in _pairs(rows).items():
        ref, ours = pair[REFERENCE_SIDE], pair[OUR_SIDE]
        shape = f"{ours['batch']}x{ours['channels']}x{ours['size']}x{ours['size']}"
        out.append(f"{model:18s} {mode:9s} {shape:>13s} {ours['convs']:5d} {ref['median_s'] * 1e3:12.2f} "
                   f"{ours['median_s'] * 1e3:14.2f} {ours['ratio']:6.2f} {ours['rel_error']:8.1e}")
    return "\n".join(out)


def markdown(rows) -> str:
    lines = ["| model | mode | input | nn.Conv2d ms | channelconv ms | speed vs nn.Conv2d |",
             "|---|---|---|---:|---:|---:|"]
    for (model, mode), pair in _pairs(rows).items():
        ref, ours = pair[REFERENCE_SIDE], pair[OUR_SIDE]
        lines.append(f"| {model} | {mode} | {ours['batch']}x{ours['channels']}x{ours['size']}x{ours['size']} | "
                     f"{ref['median_s'] * 1e3:.2f} | {ours['median_s'] * 1e3:.2f} | {ours['ratio']:.2f} |")
    return "\n".join(lines)


def summary_text(rows) -> str:
    ratios = {mode: [p[OUR_SIDE]["ratio"] for (_, m), p in _pairs(rows).items() if m == mode] for mode in MODES}
    parts = [f"{mode} {_geomean(r):.2f} ({len(r)} models, lowest {min(r):.2f})" for mode, r in ratios.items() if r]
    every = [r for rs in ratios.values() for r in rs]
    return ("geometric mean of the speed relative to nn.Conv2d: " + "; ".join(parts)
            + (f"; all {_geomean(every):.2f}" if every else ""))


def write_csv(path, rows):
    fields = ["model", "mode", "batch", "channels", "size", "convs", "side", "median_s", "ratio", "rel_error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path, rows, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(rows)
    models = list(dict.fromkeys(model for model, _ in pairs))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(models)), 4))
    modes = [mode for mode in MODES if any(m == mode for _, m in pairs)]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [pairs[(m, mode)][OUR_SIDE]["ratio"] if (m, mode) in pairs else 0 for m in models]
        ax.bar([j + (i - (len(modes) - 1) / 2) * width for j in range(len(models))], values, width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel("speed relative to nn.Conv2d")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pairs(rows) -> dict:
    pairs = {}
    for row in rows:
        pairs.setdefault((row["model"], row["mode"]), {})[row["side"]] = row
    return pairs


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
