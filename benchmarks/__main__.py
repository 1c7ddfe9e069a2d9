"""python -m benchmarks: channelconv's algorithms (and 'auto') against F.conv2d on real network
shapes, measured interleaved in one process. See benchmarks/NOTES.md and --help."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import channelconv

from . import model_suite, report, runner
from .runner import (AUTOCAST_DTYPES, DTYPES, MEMORY_FORMATS, PASSES, REFERENCE, TORCH_IM2COL, Settings, configure,
                     environment, gemm_rate, run_layer, tensor_label)
from .models import MODELS, spec_for
from .shapes import SUITES, parse_shape

PASS_GROUPS = {"both": ("forward", "training"), "all": PASSES}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time channelconv's algorithms and 'auto' beside F.conv2d, interleaved in one process; "
                    "report median time, GFLOP/s, speed relative to F.conv2d, fraction of the machine's GEMM rate, "
                    "workspace and relative error against F.conv2d in float64.")
    p.add_argument("--suite", default=None,
                   help=f"comma-separated layer suites: {', '.join(SUITES)} (default resnet50; 'quick' with --quick); "
                        "or 'models': whole networks converted against nn.Conv2d (see --models)")
    p.add_argument("--models", default=None,
                   help=f"with --suite models: comma-separated, of {', '.join(MODELS)}, or torchvision:NAME / "
                        "timm:NAME (default all)")
    p.add_argument("--modes", default=",".join(model_suite.DEFAULT_MODES),
                   help=f"with --suite models: comma-separated, of {', '.join(model_suite.MODES)} "
                        "(default %(default)s)")
    p.add_argument("--size", type=int, default=None,
                   help="with --suite models: input height = width (default per model)")
    p.add_argument("--shape", action="append", default=[], metavar="N,C_in,H,W,C_out,KH,KW[,s,p,d,g]",
                   help="a custom layer (repeatable); runs instead of the suites unless --suite is given too")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--memory-format", default="contiguous", choices=list(MEMORY_FORMATS),
                   help="layout of inputs, conv weights and grad_outputs on both sides; with --suite models, "
                        "model.to(memory_format=...) on both models (default %(default)s)")
    p.add_argument("--autocast", default=None, choices=list(AUTOCAST_DTYPES),
                   help="with --suite models (inference, training): forward and loss under torch.autocast on both "
                        "sides, the weights float32")
    p.add_argument("--tf32", action="store_true",
                   help="--device cuda: float32 convolutions may use TF32 on both sides, as PyTorch's default lets "
                        "cuDNN (torch.backends.cudnn.allow_tf32; also cuda.matmul.allow_tf32, which the im2col and 1x1 "
                        "GEMMs follow); without it both compute in full float32")
    p.add_argument("--batch", type=int, default=None, help="images per layer (default 8; 2 with --quick)")
    p.add_argument("--algorithms", default=",".join(channelconv.ALGORITHMS),
                   help="comma-separated subset of channelconv.ALGORITHMS ('1x1' runs on 1x1 kernels only)")
    p.add_argument("--pass", dest="passes", default=None,
                   help="forward | training | both (forward, training) | all (also input_grad, weight_grad) | "
                        "a comma-separated list of forward, input_grad, weight_grad, training (default forward; "
                        "with --calibrate: both, or the one given, refitted with the saved GEMM constants)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per layer (default 5; 3 quick)")
    p.add_argument("--block", type=float, default=None, help="seconds per timed block (default 0.05)")
    p.add_argument("--torch-im2col", action="store_true",
                   help=f"also time PyTorch's own im2col + GEMM path (F.conv2d with oneDNN off) as '{TORCH_IM2COL}'")
    p.add_argument("--measured", action="store_true",
                   help="also time 'auto' in benchmark mode (channelconv.set_benchmark_mode) as 'auto:measured'")
    p.add_argument("--no-errors", action="store_true", help="skip the float64 F.conv2d error check")
    p.add_argument("--json", help="write every measurement, the environment and the summary to this file")
    p.add_argument("--csv", help="write one row per layer, pass and side to this file")
    p.add_argument("--plot", help="write a PNG chart of speed relative to F.conv2d per layer and algorithm")
    p.add_argument("--markdown", help="write the ratio table(s) as Markdown to this file")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (tiny layers, few repeats)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure the constants of 'auto''s time model on probe layers and save them "
                        "(channelconv/calibration.json unless --calibration-file)")
    p.add_argument("--calibration-file", default=None)
    p.add_argument("--cpu-clock", action="store_true",
                   help="with --calibrate: time one thread by its CPU clock (robust on a busy, shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    passes = []
    for item in (args.passes or ("both" if args.calibrate else "forward")).split(","):
        item = item.strip()
        group = PASS_GROUPS.get(item, (item,))
        for name in group:
            if name not in PASSES:
                p.error(f"--pass: unknown pass {item!r}; expected forward, training, both, all, input_grad, "
                        f"weight_grad")
            if name not in passes:
                passes.append(name)
    args.passes = passes
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for a in args.algorithms:
        if a not in channelconv.ALGORITHMS:
            p.error(f"--algorithms: unknown algorithm {a!r}; expected some of {channelconv.ALGORITHMS}")
    try:
        args.custom = [parse_shape(s) for s in args.shape]
    except ValueError as e:
        p.error(str(e))
    if args.suite is None:
        args.suites = [] if args.custom else ["quick" if args.quick else "resnet50"]
    else:
        args.suites = [s.strip() for s in args.suite.split(",")]
        for s in args.suites:
            if s not in SUITES and s != "models":
                p.error(f"--suite: unknown suite {s!r}; expected some of {', '.join(SUITES)}, or models")
        if "models" in args.suites and (len(args.suites) > 1 or args.custom):
            p.error("--suite models runs on its own (whole networks, not layers)")
    try:
        args.model_specs = [spec_for(m.strip()) for m in (args.models or ",".join(MODELS)).split(",") if m.strip()]
    except (ValueError, ImportError) as e:
        p.error(f"--models: {e}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in model_suite.MODES:
            p.error(f"--modes: unknown mode {mode!r}; expected some of {', '.join(model_suite.MODES)}")
    if args.tf32 and args.device != "cuda":
        p.error("--tf32: with --device cuda only (TF32 is a GPU tensor-core format)")
    if args.autocast and args.suites != ["models"]:
        p.error("--autocast: with --suite models only (a layer suite times one dtype, see --dtype)")
    if args.autocast and "per-sample" in args.modes:
        p.error("--autocast: inference and training only; torch.func's per-sample gradients fail under autocast "
                "on batch-norm networks")
    if args.autocast and args.dtype != "float32":
        p.error("--autocast: the models keep float32 weights under autocast; leave --dtype at float32")
    if args.calibrate and args.autocast:
        p.error("--calibrate fits 'auto' for one dtype and layout (--dtype, --memory-format); drop --autocast")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def settings_from(args) -> Settings:
    s = Settings(device=args.device, dtype=DTYPES[args.dtype], batch=args.batch or (2 if args.quick else 8),
                 threads=args.threads, measured_auto=args.measured, torch_im2col=args.torch_im2col,
                 check_errors=not args.no_errors, memory_format=args.memory_format,
                 autocast=AUTOCAST_DTYPES.get(args.autocast), tf32=args.tf32)
    if args.quick:
        s.rounds, s.min_rounds, s.block_s, s.slow_s = 3, 2, 0.004, 0.05
    if args.rounds:
        s.rounds, s.min_rounds = args.rounds, min(s.min_rounds, args.rounds)
    if args.block:
        s.block_s = args.block
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    configure(settings)
    if args.calibrate:
        from .calibrate import calibrate
        calibrate(settings, path=args.calibration_file, quick=args.quick, progress=not args.no_progress,
                  passes=tuple(p for p in args.passes if p in ("forward", "training")), cpu_clock=args.cpu_clock)
        return 0

    start = time.perf_counter()
    gemm = gemm_rate(settings, *((256, 0.05) if args.quick else (2048, 1.0)))
    meta = environment(settings)
    meta.update({"command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
                 "suites": args.suites, "batch": settings.batch, "passes": args.passes,
                 "algorithms": args.algorithms, "rounds": settings.rounds, "block_s": settings.block_s,
                 "gemm_gflops": gemm, "calibration": channelconv.timemodel.model_for(settings.device,
                                                                                   settings.dtype)["source"]})
    where = meta.get("gpu") or meta["cpu"]
    print(f"channelconv {meta['channelconv']} | torch {meta['torch']} | {settings.device} ({where}) | "
          f"{meta['threads']} threads | {tensor_label(settings)} | batch {_batch_label(args, settings)}")
    print(f"GEMM rate ({'256' if args.quick else '2048'}^3 torch.mm): {gemm:.0f} GFLOP/s; "
          f"'auto' model: {meta['calibration']}")
    if args.suites == ["models"]:
        return _main_models(args, settings, meta, start)

    work = [(suite, layer) for suite in args.suites for layer in SUITES[suite]()]
    work += [("custom", layer) for layer in args.custom]
    items = [(suite, layer, pass_) for pass_ in args.passes for suite, layer in work]
    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=len(items), unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            progress = None
    results = []
    for suite, layer, pass_ in items:
        if progress is not None:
            progress.set_description(f"{pass_} {layer.describe()}")
        results.extend(run_layer(layer, args.algorithms, pass_, settings, gemm, suite=suite))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - start
    meta["elapsed_s"] = elapsed
    meta["load_average_end"] = runner._load_average()

    by_pass = {}
    for row in results:
        by_pass.setdefault((row["suite"], row["pass"]), []).append(row)
    markdown = []
    for (suite, pass_), rows in by_pass.items():
        batches = ",".join(str(b) for b in dict.fromkeys(row["input_shape"][0] for row in rows))
        title = f"{suite} | {pass_} | batch {batches} | {tensor_label(settings)} | {settings.device}"
        print(f"\n== {title}")
        print(report.detail_table(rows))
        print(f"\n-- speed relative to {REFERENCE} ({REFERENCE} time / time: > 1 is faster; 'auto' with its choice)")
        print(report.ratio_table(rows))
        print(report.summary_text(rows))
        markdown.append(f"**{title}**\n\n{report.markdown_table(rows)}\n\n```\n" + report.summary_text(rows) + "\n```\n")
    load = meta["load_average"], meta["load_average_end"]
    print(f"\ndone in {elapsed:.0f} s" + (f" (load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end "
                                          f"on {meta['cpu_count']} CPUs)" if all(load) else ""))
    if args.json:
        report.write_json(args.json, meta, results)
    if args.csv:
        report.write_csv(args.csv, results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            loads = ""
            if all(load):
                loads = f", load average {load[0][0]:.1f} -> {load[1][0]:.1f} on {meta['cpu_count']} CPUs (shared)"
            f.write(f"`{meta['command']}` — {meta['cpu'] if settings.device == 'cpu' else where}, "
                    f"{meta['threads']} threads, torch {meta['torch']}, GEMM {gemm:.0f} GFLOP/s, "
                    f"{elapsed:.0f} s{loads}\n\n" + "\n".join(markdown))
    if args.plot:
        report.plot(args.plot, results,
                    title=f"{','.join(args.suites) or 'custom'} batch {settings.batch}, {tensor_label(settings)}")
    return 0


def _batch_label(args, settings) -> str:
    """The batch that runs: --batch (or the default) for the suites, each --shape's own N, each model's."""
    if args.suites == ["models"]:
        return str(args.batch) if args.batch else "per model"
    batches = ([settings.batch] if args.suites else []) + [layer.batch for layer in args.custom]
    return ",".join(str(b) for b in dict.fromkeys(batches))


def _main_models(args, settings, meta, start) -> int:
    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=len(args.model_specs), unit="model", file=sys.stderr, leave=False,
                            dynamic_ncols=True)
        except ImportError:
            progress = None
    rows = []
    for spec in args.model_specs:
        if progress is not None:
            progress.set_description(spec.name)
        rows += model_suite.run_model(spec, settings, args.batch, args.size, args.modes)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    meta["elapsed_s"] = time.perf_counter() - start
    meta["load_average_end"] = runner._load_average()
    summary = model_suite.summary_text(rows)
    print(f"\n== models | {', '.join(args.modes)} | {tensor_label(settings)} | speed relative to nn.Conv2d "
          f"(its time / channelconv's)")
    print(model_suite.table(rows))
    print(summary)
    print(f"\ndone in {meta['elapsed_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "models": rows, "summary": summary}, f, indent=1, default=str)
    if args.csv:
        model_suite.write_csv(args.csv, rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"`{meta['command']}` — {tensor_label(settings)}, {meta['cpu']}, {meta['threads']} threads, "
                    f"torch {meta['torch']}, "
                    f"{meta['elapsed_s']:.0f} s\n\n{model_suite.markdown(rows)}\n\n```\n{summary}\n```\n")
    if args.plot:
        model_suite.plot(args.plot, rows, title=f"models, {tensor_label(settings)}, speed relative to nn.Conv2d")
    return 0


if __name__ == "__main__":
    sys.exit(main())
