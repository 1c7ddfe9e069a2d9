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
from benchmarks.models import MODELS, spec_for
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
