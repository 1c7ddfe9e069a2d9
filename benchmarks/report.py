"""Reporting the suite's results: terminal tables, the summary (network totals, how good 'auto'
is), JSON, CSV, a Markdown table and a PNG chart."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

from channelconv import ALGORITHMS

from .runner import REFERENCE, TORCH_IM2COL

AUTO_SIDES = ("auto", "auto:measured")
NEAR = 1.10  # 'within 10 % of the fastest'


def _by_pass(results):
    passes = defaultdict(list)
    for row in results:
        passes[row["pass"]].append(row)
    return passes


def _by_layer(rows):
    layers = {}
    for row in rows:
        layers.setdefault((row["suite"], row["layer"]), {})[row["algorithm"]] = row
    return layers


def _ms(seconds):
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def _bytes(n):
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _side_label(row):
    side = row["algorithm"]
    return f"{side}->{row['chosen']}" if side in AUTO_SIDES else side


def _render(header, rows, align=None):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    align = align or ["<"] + [">"] * (len(header) - 1)
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*[str(c) for c in row]) for row in rows]
    return "\n".join(lines)


def detail_table(rows) -> str:
    """Every side of every layer: median time, GFLOP/s, ratio to F.conv2d, fraction of the GEMM
    rate, measured workspace, relative error against F.conv2d in float64."""
    header = ["layer", "x", "side", "ms", "GFLOP/s", "time/F.conv2d", "of GEMM", "workspace", "rel.err"]
    body = []
    for (_, _), sides in _by_layer(rows).items():
        first = True
        for row in sides.values():
            body.append([
                row["shape"] if first else "", row["count"] if first else "", _side_label(row), _ms(row["median_s"]),
                f"{row['gflops']:.1f}", f"{row['ratio']:.2f}",
                f"{100 * row['gemm_fraction']:.0f}%" if row["gemm_fraction"] else "-",
                _bytes(row["workspace_bytes"]) if row["algorithm"] != REFERENCE else "-",
                f"{row['rel_error']:.1e}" if row["rel_error"] is not None else "-",
            ])
            first = False
    return _render(header, body, ["<", ">", "<", ">", ">", ">", ">", ">", ">"])


def ratio_columns(rows):
    present = {row["algorithm"] for row in rows}
    return [a for a in (TORCH_IM2COL, *ALGORITHMS, *AUTO_SIDES) if a in present]


def ratio_rows(rows):
    """Per layer: F.conv2d's time and rate, then each side's speed relative to F.conv2d (auto with its choice)."""
    columns = ratio_columns(rows)
    out = []
    for (_, _), sides in _by_layer(rows).items():
        ref = sides[REFERENCE]
        algs = {a: sides[a]["median_s"] for a in ALGORITHMS if a in sides}
        fastest = min(algs, key=algs.get)
        cells = [ref["shape"], ref["count"], _ms(ref["median_s"]), f"{ref['gflops']:.0f}"]
        for a in columns:
            if a not in sides:
                cells.append("-")
            elif a in AUTO_SIDES:
                cells.append(f"{sides[a]['ratio']:.2f} ({sides[a]['chosen']})")
            else:
                cells.append(f"{sides[a]['ratio']:.2f}")
        cells.append(fastest)
        out.append(cells)
    header = ["layer", "x", "F.conv2d ms", "GFLOP/s", *columns, "fastest"]
    return header, out


def ratio_table(rows) -> str:
    header, body = ratio_rows(rows)
    return _render(header, body, ["<", ">", ">", ">", *[">"] * (len(header) - 5), "<"])


def markdown_table(rows) -> str:
    header, body = ratio_rows(rows)
    header = [h if h not in (*ALGORITHMS, *AUTO_SIDES, TORCH_IM2COL) else f"`{h}`" for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def summary(rows) -> dict:
    """Network totals (each layer weighted by how often it occurs) and the quality of 'auto':
    whether its choice is within 10 % of the fastest algorithm by the algorithms' own medians,
    and whether its own measured time is."""
    layers = _by_layer(rows)
    totals = defaultdict(float)
    complete = defaultdict(int)
    auto = {side: {"choice_within_10pct": 0, "time_within_10pct": 0, "layers": 0, "misses": []} for side in AUTO_SIDES}
    for (_, name), sides in layers.items():
        count = sides[REFERENCE]["count"]
        for side, row in sides.items():
            totals[side] += count * row["median_s"]
            complete[side] += 1
        algs = {a: sides[a]["median_s"] for a in ALGORITHMS if a in sides}
        fastest = min(algs.values())
        for side in AUTO_SIDES:
            if side not in sides:
                continue
            stats = auto[side]
            stats["layers"] += 1
            choice = sides[side]["chosen"]
            choice_ok = algs.get(choice, float("inf")) <= NEAR * fastest
            time_ok = sides[side]["median_s"] <= NEAR * fastest
            stats["choice_within_10pct"] += choice_ok
            stats["time_within_10pct"] += time_ok
            if not (choice_ok and time_ok):
                best = min(algs, key=algs.get)
                stats["misses"].append({"layer": sides[REFERENCE]["shape"], "chose": choice, "fastest": best,
                                        "choice_over_fastest": algs.get(choice, float("nan")) / fastest,
                                        "auto_over_fastest": sides[side]["median_s"] / fastest})
    n_layers = len(layers)
    ref_total = totals[REFERENCE]
    network = {side: {"seconds": t, "ratio": ref_total / t} for side, t in totals.items()
               if complete[side] == n_layers and ref_total > 0}
    # Geometric means over the layers (each once) of the speed relative to F.conv2d, and of im2col's
    # speed relative to PyTorch's own im2col path when that was timed: the targets.
    ratios = defaultdict(list)
    for sides in layers.values():
        for side, row in sides.items():
            ratios[side].append(row["ratio"])
        if TORCH_IM2COL in sides and "im2col" in sides:
            ratios["im2col/" + TORCH_IM2COL].append(sides["im2col"]["ratio"] / sides[TORCH_IM2COL]["ratio"])
    geomean = {side: math.exp(sum(map(math.log, r)) / len(r)) for side, r in ratios.items() if side != REFERENCE}
    return {"layers": n_layers, "network": network, "geomean": geomean,
            "auto": {k: v for k, v in auto.items() if v["layers"]}}


def summary_text(rows, title="") -> str:
    s = summary(rows)
    lines = []
    parts = [f"{side} {v['ratio']:.2f}" for side, v in s["network"].items() if side != REFERENCE]
    ref = s["network"].get(REFERENCE)
    if ref:
        lines.append(f"{title}network total (each layer x its count): F.conv2d {ref['seconds'] * 1e3:.1f} ms; "
                     f"speed relative to F.conv2d (its time / theirs): " + ", ".join(parts))
    if s["geomean"]:
        lines.append(f"{title}geometric mean over the layers of the speed relative to F.conv2d: "
                     + ", ".join(f"{side} {g:.2f}" for side, g in s["geomean"].items() if "/" not in side))
    pair = "im2col/" + TORCH_IM2COL
    if pair in s["geomean"]:
        lines.append(f"{title}im2col relative to PyTorch's own im2col path ({TORCH_IM2COL}, F.conv2d with oneDNN "
                     f"off): geometric mean {s['geomean'][pair]:.2f}")
    for side, stats in s["auto"].items():
        lines.append(f"{title}'{side}': choice within 10% of the fastest algorithm on {stats['choice_within_10pct']}"
                     f"/{stats['layers']} layers; its own time within 10% on {stats['time_within_10pct']}"
                     f"/{stats['layers']}")
        for miss in stats["misses"]:
            over = miss["choice_over_fastest"]
            timed = f"{over:.2f}x the fastest" if over == over else "not timed alone"  # NaN: not in --algorithms
            lines.append(f"    {miss['layer']}: chose {miss['chose']} ({timed}, {miss['fastest']}); auto measured "
                         f"{miss['auto_over_fastest']:.2f}x")
    return "\n".join(lines)


def write_json(path, meta, results):
    passes = _by_pass(results)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results, "summary": {p: summary(rows) for p, rows in passes.items()}},
                  f, indent=1, default=str)


CSV_FIELDS = ["suite", "layer", "shape", "count", "input_shape", "weight_shape", "stride", "padding", "dilation",
              "groups", "bias", "pass", "algorithm", "chosen", "median_s", "min_s", "gflop", "gflops", "ratio",
              "gemm_fraction", "workspace_bytes", "predicted_workspace_bytes", "rel_error"]


def write_csv(path, results):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()})


def plot(path, results, title=""):
    """A PNG: per pass, speed relative to F.conv2d per layer (log scale), one bar per algorithm and 'auto'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = _by_pass(results)
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(8, 0.55 * max(len(_by_layer(r)) for r in passes.values())),
                                                       4.2 * len(passes)), squeeze=False)
    colors = {"direct": "#d62728", "im2col": "#1f77b4", "1x1": "#2ca02c", "auto": "#222222", "auto:measured": "#888888",
              TORCH_IM2COL: "#bcbd22"}
    for ax, (pass_, rows) in zip(axes[:, 0], passes.items()):
        layers = _by_layer(rows)
        columns = ratio_columns(rows)
        width = 0.8 / len(columns)
        for i, side in enumerate(columns):
            xs, ys = [], []
            for j, sides in enumerate(layers.values()):
                if side in sides:
                    xs.append(j + (i - (len(columns) - 1) / 2) * width)
                    ys.append(sides[side]["ratio"])
            ax.bar(xs, ys, width, label=side, color=colors.get(side))
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_ylabel("speed relative to F.conv2d (higher is faster)")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([s[REFERENCE]["shape"] for s in layers.values()], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{title} {pass_}".strip())
        ax.legend(fontsize=8, ncol=len(columns))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
