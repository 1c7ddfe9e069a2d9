"""The model suite (benchmarks/models.py, model_suite.py): every network builds at its input size,
its converted copy computes the same function (float64), one model measured in both modes, and
`python -m benchmarks --suite models` end to end. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import channelconv
from benchmarks import model_suite
from benchmarks.models import MODELS, ModelSpec, spec_for
from benchmarks.runner import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_converts_to_the_same_function(name):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build()
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv2d]
    assert convs, name
    x = torch.randn(2, spec.channels, spec.size, spec.size)
    ours = channelconv.convert(__import__("copy").deepcopy(model))
    assert all(isinstance(m, channelconv.Conv2d) for m in ours.modules() if isinstance(m, torch.nn.Conv2d))
    assert model_suite.output_error(model, ours, x) < 1e-12
    with torch.no_grad():
        assert model.eval()(x).shape == (2, spec.classes)


def test_run_model_measures_every_mode_and_side():
    settings = Settings(rounds=2, min_rounds=1, block_s=0.001)
    rows = model_suite.run_model(MODELS["lenet"], settings, batch=4, modes=model_suite.MODES)
    assert {(r["mode"], r["side"]) for r in rows} == {(m, s) for m in model_suite.MODES
                                                      for s in (model_suite.REFERENCE_SIDE, model_suite.OUR_SIDE)}
    for row in rows:
        assert row["median_s"] > 0 and row["ratio"] > 0 and row["batch"] == 4 and row["convs"] == 2
        assert row["rel_error"] < 1e-12
    assert "inference" in model_suite.table(rows) and "geometric mean" in model_suite.summary_text(rows)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        spec_for("nope")


def test_models_command_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    files = {k: tmp_path / f"models.{k}" for k in ("json", "csv", "png", "md")}
    cmd = [sys.executable, "-m", "benchmarks", "--suite", "models", "--models", "lenet,resnet20-cifar", "--quick",
           "--batch", "4", "--no-progress", "--json", str(files["json"]), "--csv", str(files["csv"]),
           "--plot", str(files["png"]), "--markdown", str(files["md"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 4" in proc.stdout and "speed relative to nn.Conv2d" in proc.stdout
    data = json.loads(files["json"].read_text())
    assert {r["model"] for r in data["models"]} == {"lenet", "resnet20-cifar"} and len(data["models"]) == 8
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lenet | training |" in files["md"].read_text()
    assert len(files["csv"].read_text().strip().splitlines()) == 9
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "models,resnet50"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "on its own" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "models", "--modes", "training,nope"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown mode 'nope'" in bad.stderr


class _Probe(torch.nn.Module):
    """One conv between an input check and a head, noting for each call the layout and dtype of
    what the conv gets and gives: what run_model hands to the models."""

    def __init__(self, seen):
        super().__init__()
        self.note = seen.append  # a builtin: deepcopy (convert's copy, the float64 check) keeps the one list
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))

    def forward(self, x):
        out = self.conv(x)
        cl = torch.channels_last
        self.note({"conv": type(self.conv).__module__.split(".")[0], "x_dtype": x.dtype,
                          "x_cl": x.is_contiguous(memory_format=cl) and not x.is_contiguous(),
                          "w_cl": self.conv.weight.is_contiguous(memory_format=cl)
                          and not self.conv.weight.is_contiguous(),
                          "w_dtype": self.conv.weight.dtype, "out_dtype": out.dtype})
        return self.head(out)


def _probe_calls(**settings):
    seen = []
    spec = ModelSpec("probe", lambda: _Probe(seen), channels=3, size=8, batch=2)
    rows = model_suite.run_model(spec, Settings(rounds=1, min_rounds=1, block_s=0.001, **settings))
    assert {(r["mode"], r["side"]) for r in rows} == {(m, s) for m in model_suite.DEFAULT_MODES
                                                      for s in (model_suite.REFERENCE_SIDE, model_suite.OUR_SIDE)}
    assert all(r["rel_error"] < 1e-12 for r in rows)
    check = [c for c in seen if c["x_dtype"] == torch.float64]  # output_error, before timing
    timed = [c for c in seen if c["x_dtype"] != torch.float64]
    assert sorted(c["conv"] for c in check) == ["channelconv", "torch"]  # each model once
    assert {c["conv"] for c in timed} == {"channelconv", "torch"}
    return check, timed


def test_run_model_channels_last_and_autocast_reach_both_sides():
    check, timed = _probe_calls(memory_format="channels_last", autocast=torch.bfloat16)
    assert all(c["x_cl"] and c["w_cl"] for c in check + timed)
    assert all(c["out_dtype"] == torch.float64 for c in check)  # the float64 check runs without autocast
    assert all(c["w_dtype"] == c["x_dtype"] == torch.float32 and c["out_dtype"] == torch.bfloat16 for c in timed)
    check, timed = _probe_calls()  # the default: NCHW, no autocast
    assert not any(c["x_cl"] or c["w_cl"] for c in check + timed)
    assert all(c["out_dtype"] == torch.float32 for c in timed)


def test_run_model_in_bfloat16():
    settings = Settings(rounds=1, min_rounds=1, block_s=0.001, dtype=torch.bfloat16)
    rows = model_suite.run_model(MODELS["lenet"], settings, batch=2)
    assert len(rows) == 4 and all(r["median_s"] > 0 and r["rel_error"] < 1e-12 for r in rows)


def test_models_channels_last_autocast_recorded(tmp_path, capsys):
    from benchmarks.__main__ import main

    out, md = tmp_path / "models.json", tmp_path / "models.md"
    assert main(["--suite", "models", "--models", "lenet", "--quick", "--batch", "2", "--rounds", "2",
                 "--no-progress", "--memory-format", "channels_last", "--autocast", "bfloat16",
                 "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "| float32, channels_last, autocast bfloat16 | batch 2\n" in printed
    assert "== models | inference, training | float32, channels_last, autocast bfloat16 |" in printed
    assert "float32, channels_last, autocast bfloat16" in md.read_text().splitlines()[0]
    data = json.loads(out.read_text())
    assert (data["meta"]["memory_format"], data["meta"]["autocast"], data["meta"]["dtype"]) == (
        "channels_last", "bfloat16", "float32")
    assert {(r["model"], r["mode"]) for r in data["models"]} == {("lenet", "inference"), ("lenet", "training")}
