"""The benchmark suite: its layer lists, one measured layer, the reports, the calibration fit,
and `python -m benchmarks --quick` end to end (the CI smoke run). No timing is asserted."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import channelconv
from benchmarks import report
from benchmarks.calibrate import nnls, probe_layers, relative_fit
from benchmarks.runner import REFERENCE, TORCH_IM2COL, LayerCase, Settings, run_layer
from benchmarks.shapes import SUITES, Layer, parse_shape

ROOT = Path(__file__).resolve().parents[1]


def test_resnet50_has_every_distinct_convolution():
    layers = SUITES["resnet50"]()
    assert len(layers) == 23 and sum(layer.count for layer in layers) == 53  # 1 + 16 blocks x 3 + 4 downsamples
    assert len({layer.signature() for layer in layers}) == 23
    stem = layers[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel, stem.stride, stem.size) == (3, 64, (7, 7), (2, 2),
                                                                                          (224, 224))
    assert sum(layer.kernel == (3, 3) for layer in layers) == 7  # one or two per stage
    assert {layer.output_size() for layer in layers if layer.kernel == (3, 3)} == {(56, 56), (28, 28), (14, 14),
                                                                                   (7, 7)}


def test_vgg16_mobilenet_groups_textbook():
    vgg = SUITES["vgg16"]()
    assert sum(layer.count for layer in vgg) == 13 and all(layer.kernel == (3, 3) and layer.bias for layer in vgg)
    mobile = SUITES["mobilenet"]()
    depthwise = [layer for layer in mobile if layer.groups > 1]
    assert depthwise and all(layer.groups == layer.in_channels == layer.out_channels for layer in depthwise)
    assert all(layer.kernel == (1, 1) for layer in mobile if layer.groups == 1)
    groups = SUITES["groups"]()
    assert [layer.groups for layer in groups] == [1, 2, 4, 8, 16, 32]
    flops = [channelconv.cost(layer.input_shape(8), layer.weight_shape(), *layer.conv_args()).forward_flops
             for layer in groups]
    assert all(a == 2 * b for a, b in zip(flops, flops[1:]))  # g blocks: g times fewer multiply-adds
    big = [layer for layer in SUITES["textbook"]() if layer.kernel == (5, 5)][0]
    assert channelconv.cost(big.input_shape(8), big.weight_shape(), *big.conv_args()).forward_operations > 53e9


@pytest.mark.parametrize("suite", list(SUITES))
def test_every_layer_is_a_valid_convolution(suite):
    for layer in SUITES[suite]():
        x = torch.empty(layer.input_shape(2), device="meta")
        w = torch.empty(layer.weight_shape(), device="meta")
        out = F.conv2d(x, w, None, *layer.conv_args())
        assert tuple(out.shape[2:]) == layer.output_size(), layer


def test_parse_shape():
    layer = parse_shape("4,32,20,18,64,3,3")
    assert layer.input_shape(8) == (4, 32, 20, 18) and layer.weight_shape() == (64, 32, 3, 3)
    assert layer.conv_args() == ((1, 1), (0, 0), (1, 1), 1)
    layer = parse_shape("1,32,20,20,64,3,3,2,1,1,4")
    assert layer.conv_args() == ((2, 2), (1, 1), (1, 1), 4) and layer.weight_shape() == (64, 8, 3, 3)
    for bad in ("1,2,3", "a,b,c,d,e,f,g", "1,32,20,20,64,3,3,1,0,1,5", "1,32,20,20,64,0,3"):
        with pytest.raises(ValueError):
            parse_shape(bad)


def quick_settings(**kw):
    return Settings(batch=2, rounds=2, min_rounds=1, block_s=0.001, slow_s=0.01, **kw)


@pytest.mark.parametrize("pass_", ["forward", "training", "input_grad", "weight_grad"])
def test_run_layer_reports_every_side(pass_):
    layer = Layer("t", 6, 8, (9, 9), (3, 3), (1, 1), (1, 1), bias=True, names=("t",))
    rows = run_layer(layer, channelconv.ALGORITHMS, pass_, quick_settings(), gemm_gflops=100.0, suite="test")
    sides = [row["algorithm"] for row in rows]
    assert sides == [REFERENCE, "direct", "im2col", "auto"]  # '1x1' only for 1x1 kernels
    c = channelconv.cost((2, 6, 9, 9), (8, 6, 3, 3), 1, 1)
    for row in rows:
        assert row["median_s"] > 0 and len(row["samples_s"]) >= 1
        assert row["rel_error"] < 1e-5, row
        assert row["gflop"] * 1e9 == pytest.approx({"forward": 1, "training": 3}.get(pass_, 1) * c.forward_flops)
        assert row["gflops"] == pytest.approx(row["gflop"] / row["median_s"])
        if row["algorithm"] != REFERENCE:
            assert row["workspace_bytes"] == row["predicted_workspace_bytes"]
    assert rows[0]["ratio"] == 1.0
    assert rows[-1]["chosen"] in ("direct", "im2col")


def test_run_layer_measured_auto_and_1x1():
    layer = Layer("t", 8, 8, (6, 6), (1, 1), (2, 2), names=("t",))
    rows = run_layer(layer, ["im2col", "1x1"], "forward", quick_settings(measured_auto=True), gemm_gflops=None)
    assert [row["algorithm"] for row in rows] == [REFERENCE, "im2col", "1x1", "auto", "auto:measured"]
    assert rows[-1]["chosen"] in channelconv.ALGORITHMS and rows[1]["gemm_fraction"] is None
    assert not channelconv.get_benchmark_mode()  # restored
    channelconv.measured.clear_benchmark_cache()


@pytest.mark.parametrize("pass_", ["forward", "weight_grad"])
def test_pytorch_im2col_side_runs_with_onednn_off(pass_):
    layer = Layer("t", 6, 8, (9, 9), (3, 3), (1, 1), (1, 1), names=("t",))
    rows = run_layer(layer, ["im2col"], pass_, quick_settings(torch_im2col=True), gemm_gflops=None)
    assert [row["algorithm"] for row in rows] == [REFERENCE, TORCH_IM2COL, "im2col", "auto"]
    assert rows[1]["rel_error"] < 1e-5 and rows[1]["workspace_bytes"] is None
    with torch.profiler.profile() as prof:  # what the side calls: PyTorch's im2col path, not oneDNN
        LayerCase(layer, quick_settings()).function(TORCH_IM2COL, pass_)()
    seen = {e.name for e in prof.events()}
    assert any("slow_conv2d" in name for name in seen) and not any("mkldnn" in name for name in seen), seen
    assert torch.backends.mkldnn.enabled  # restored after the call


def test_geometric_means_and_im2col_against_pytorch_im2col():
    times = [{"direct": 2.0, "im2col": 1.0}, {"direct": 0.5, "im2col": 4.0}]
    rows = fake_rows(times, ["im2col", "direct"])
    for i, t in enumerate((0.5, 2.0)):  # PyTorch's im2col path: 2x and 0.5x F.conv2d's speed
        rows.append({**rows[0], "layer": f"l{i}", "shape": f"l{i}", "algorithm": TORCH_IM2COL, "chosen": TORCH_IM2COL,
                     "median_s": t, "ratio": 1.0 / t})
    s = report.summary(rows)
    assert s["geomean"]["direct"] == pytest.approx(1.0) and s["geomean"]["im2col"] == pytest.approx(0.5)
    # im2col / PyTorch's im2col per layer: (1/1)/(1/0.5) = 0.5 and (1/4)/(1/2) = 0.5
    assert s["geomean"]["im2col/" + TORCH_IM2COL] == pytest.approx(0.5)
    assert "geometric mean 0.50" in report.summary_text(rows)


def fake_rows(times_by_layer, chosen):
    rows = []
    for i, (times, choice) in enumerate(zip(times_by_layer, chosen)):
        for side, t in {REFERENCE: 1.0, **times, "auto": times[choice]}.items():
            rows.append({"suite": "s", "layer": f"l{i}", "shape": f"l{i}", "count": 2, "pass": "forward",
                         "algorithm": side, "chosen": choice if side == "auto" else side, "median_s": t,
                         "gflops": 1.0, "ratio": 1.0 / t, "gemm_fraction": 0.5, "workspace_bytes": 0, "rel_error": 0.0})
    return rows


def test_summary_counts_auto_within_ten_percent():
    times = [{"direct": 2.0, "im2col": 1.0}, {"direct": 1.05, "im2col": 1.0}, {"direct": 1.0, "im2col": 3.0}]
    rows = fake_rows(times, ["im2col", "direct", "im2col"])
    s = report.summary(rows)
    assert s["auto"]["auto"]["choice_within_10pct"] == 2 and s["auto"]["auto"]["layers"] == 3
    assert [m["layer"] for m in s["auto"]["auto"]["misses"]] == ["l2"]
    assert s["network"][REFERENCE]["seconds"] == 6.0 and s["network"]["direct"]["seconds"] == 2 * 4.05
    text = report.ratio_table(rows) + report.detail_table(rows) + report.markdown_table(rows)
    assert "0.33 (im2col)" in text and "2/3" in report.summary_text(rows)


def test_nnls_and_relative_fit():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1, size=(40, 4))
    truth = np.array([2.0, 0.0, 0.5, 3.0])
    x = nnls(a, a @ truth)
    np.testing.assert_allclose(x, truth, atol=1e-8)
    x = nnls(a, a @ np.array([1.0, -2.0, 1.0, 1.0]))  # the unconstrained solution is negative
    assert (x >= 0).all()
    rows = rng.uniform(1, 1e6, size=(30, 3)) * np.array([1e3, 1, 1e-3])
    coef = np.array([1e-9, 0.0, 2e-5])
    np.testing.assert_allclose(relative_fit(rows, rows @ coef), coef, rtol=1e-6, atol=1e-15)


def test_probes_are_not_the_suites_layers():
    suite_signatures = {(l.in_channels, l.out_channels, l.size, l.kernel, l.stride, l.groups)
                        for s in ("resnet50", "vgg16") for l in SUITES[s]()}
    probes = probe_layers()
    assert len(probes) >= 25
    assert not any((p.in_channels, p.out_channels, p.size, p.kernel, p.stride, p.groups) in suite_signatures
                   for p in probes)


def test_quick_command_end_to_end(tmp_path):
    """The CI smoke run: `python -m benchmarks --quick` with every output file."""
    pytest.importorskip("matplotlib")  # the chart's one dependency (installed by make and CI)
    files = {k: tmp_path / f"out.{k}" for k in ("json", "csv", "png", "md")}
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--pass", "both",
           "--json", str(files["json"]), "--csv", str(files["csv"]), "--plot", str(files["png"]),
           "--markdown", str(files["md"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speed relative to F.conv2d" in proc.stdout and "GEMM rate" in proc.stdout
    data = json.loads(files["json"].read_text())
    meta = data["meta"]
    assert meta["torch"] == torch.__version__ and meta["threads"] >= 1 and meta["cpu"] and meta["gemm_gflops"] > 0
    layers = SUITES["quick"]()
    assert len(data["results"]) >= len(layers) * 2 * 4
    for row in data["results"]:
        for key in ("median_s", "gflops", "ratio", "gemm_fraction", "workspace_bytes", "rel_error", "chosen"):
            assert key in row
        assert row["rel_error"] < 1e-4
    assert set(data["summary"]) == {"forward", "training"}
    with open(files["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(data["results"])
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `auto` |" in files["md"].read_text() or "`auto`" in files["md"].read_text()


def test_cli_rejects_bad_arguments():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--suite", "nope"], ["--pass", "sideways"], ["--algorithms", "fft"], ["--shape", "1,2"]):
        proc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "error" in proc.stderr, args


def test_header_prints_the_batch_that_ran():
    """A --shape brings its own N: the header and the table title say that batch, not the default."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--shape", "3,8,10,10,8,3,3", "--quick",
                           "--no-progress", "--no-errors"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| batch 3\n" in proc.stdout and "| forward | batch 3 |" in proc.stdout and "batch 2" not in proc.stdout


def test_layer_tensors_follow_the_memory_format():
    """channels_last: x, the weight and grad_output (as F.conv2d lays out its output) on every side;
    the bias is 1-d and stays as it is. The default stays NCHW."""
    layer = Layer("t", 6, 8, (9, 9), (3, 3), (1, 1), (1, 1), bias=True, names=("t",))
    case = LayerCase(layer, quick_settings(memory_format="channels_last"))
    for t in (case.x, case.w, case.gy, *case.leaves[:2]):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    out = F.conv2d(case.x, case.w, case.b, *case.args)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    plain = LayerCase(layer, quick_settings())
    assert all(t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
               for t in (plain.x, plain.w, plain.gy))
    torch.testing.assert_close(case.x, plain.x, rtol=0, atol=0)  # the same values, laid out otherwise


@pytest.mark.parametrize("pass_", ["forward", "training", "input_grad", "weight_grad"])
def test_run_layer_channels_last_is_correct(pass_):
    layer = Layer("t", 6, 8, (9, 9), (3, 3), (2, 2), (1, 1), bias=True, names=("t",))
    rows = run_layer(layer, channelconv.ALGORITHMS, pass_, quick_settings(memory_format="channels_last"),
                     gemm_gflops=None)
    assert [row["algorithm"] for row in rows] == [REFERENCE, "direct", "im2col", "auto"]
    assert all(row["rel_error"] < 1e-5 for row in rows), rows


def test_memory_format_is_recorded_for_a_layer(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = tmp_path / "cl.json"
    md = tmp_path / "cl.md"
    assert main(["--shape", "2,8,10,10,8,3,3", "--quick", "--no-progress", "--rounds", "2", "--memory-format",
                 "channels_last", "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "| float32, channels_last | batch 2\n" in printed
    assert "== custom | forward | batch 2 | float32, channels_last | cpu" in printed
    assert "**custom | forward | batch 2 | float32, channels_last | cpu**" in md.read_text()
    meta = json.loads(out.read_text())["meta"]
    assert (meta["memory_format"], meta["autocast"], meta["dtype"]) == ("channels_last", None, "float32")


def test_cli_memory_format_and_autocast_rules(capsys):
    from benchmarks.__main__ import parse_args, settings_from

    settings = settings_from(parse_args(["--quick"]))
    assert (settings.memory_format, settings.autocast) == ("contiguous", None)
    settings = settings_from(parse_args(["--suite", "models", "--autocast", "float16", "--memory-format",
                                         "channels_last"]))
    assert (settings.memory_format, settings.autocast) == ("channels_last", torch.float16)
    for args, message in ((["--autocast", "bfloat16"], "with --suite models only"),
                          (["--shape", "1,2,5,5,2,3,3", "--autocast", "bfloat16"], "with --suite models only"),
                          (["--suite", "models", "--autocast", "bfloat16", "--dtype", "bfloat16"], "float32"),
                          (["--suite", "models", "--autocast", "bfloat16", "--modes", "per-sample"], "per-sample"),
                          (["--suite", "models", "--calibrate", "--autocast", "bfloat16"], "drop --autocast"),
                          (["--memory-format", "nhwc"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, args
