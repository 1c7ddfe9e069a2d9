"""'auto': the heuristic (a time model with calibrated constants), explain(), and benchmark mode
(measure once per shape signature, cache, thread-safe)."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import channelconv
from channelconv import measured, select, timemodel
from channelconv.cost import BACKWARD

SHAPES = [  # input, weight, stride, padding, dilation, groups
    ((2, 16, 12, 12), (32, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 16, 12, 12), (32, 16, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((2, 16, 12, 12), (32, 16, 1, 1), (2, 2), (0, 0), (1, 1), 1),
    ((2, 16, 12, 12), (16, 1, 3, 3), (1, 1), (1, 1), (1, 1), 16),
    ((1, 3, 32, 32), (8, 3, 7, 7), (2, 2), (3, 3), (1, 1), 1),
    ((8, 256, 14, 14), (256, 256, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((8, 1024, 14, 14), (256, 1024, 1, 1), (1, 1), (0, 0), (1, 1), 1),
]


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts with heuristic 'auto', an empty measured cache and the default limit."""
    measured.set_benchmark_mode(False)
    measured.clear_benchmark_cache()
    select.reload_calibration()
    yield
    measured.set_benchmark_mode(False)
    measured.clear_benchmark_cache()
    channelconv.set_workspace_limit(256 << 20)
    select.reload_calibration()


def make(shape, requires_grad=False):
    x_shape, w_shape, *_ = shape
    return torch.randn(x_shape, requires_grad=requires_grad), torch.randn(w_shape, requires_grad=requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
def test_choice_is_one_of_ours_and_applicable(shape):
    x_shape, w_shape, *args = shape
    choice = select.choose(x_shape, w_shape, *args)
    assert choice in channelconv.ALGORITHMS
    if tuple(w_shape[2:]) != (1, 1):
        assert choice != "1x1"
    x, w = make(shape)
    assert select.choose(x.shape, w.shape, *args, tensors=(x, w, None)) in channelconv.ALGORITHMS


@pytest.mark.parametrize("shape", SHAPES)
def test_explain_agrees_with_choose_and_gives_every_candidate(shape):
    x_shape, w_shape, *args = shape
    e = channelconv.explain(x_shape, w_shape, *args)
    assert e.choice == select.choose(x_shape, w_shape, *args)
    assert e.source == "heuristic" and e.choice in e.reason
    assert set(e.candidates) == set(channelconv.ALGORITHMS)
    for name, cand in e.candidates.items():
        assert cand.flops == e.cost.forward_flops
        if cand.applicable:
            assert cand.predicted_seconds > 0 and abs(sum(cand.terms.values()) - cand.predicted_seconds) < 1e-12
            assert cand.workspace_bytes == e.cost.workspace(name)
            assert cand.bytes_moved >= e.cost.forward_bytes_moved
        else:
            assert cand.why_not and cand.predicted_seconds is None
    applicable = {n: c.predicted_seconds for n, c in e.candidates.items() if c.applicable}
    assert applicable[e.choice] == min(applicable.values())  # ties go to '1x1', then 'im2col'
    assert e.choice == "1x1" or applicable[e.choice] < applicable.get("1x1", float("inf"))
    assert e.choice in str(e)


def test_explain_takes_tensors_and_conv2d_arguments():
    x, w = torch.randn(3, 8, 10, 10), torch.randn(4, 8, 3, 3)
    e = channelconv.explain(x, w, stride=2, padding="valid")
    assert e.cost.output_shape == tuple(F.conv2d(x, w, None, 2).shape)
    e = channelconv.explain(x[0], w, padding="same")  # unbatched input
    assert e.cost.output_shape == (1, 4, 10, 10)
    xg = x.clone().requires_grad_()
    assert channelconv.explain(xg, w).training and not channelconv.explain(x, w).training
    # The passes that will run: the input's gradient only (w needs none), or both.
    c = channelconv.cost(x.shape, w.shape)
    assert channelconv.explain(xg, w).candidates["im2col"].flops == 2 * c.forward_flops
    wg = w.clone().requires_grad_()
    assert channelconv.explain(xg, wg).candidates["im2col"].flops == c.training_flops
    assert channelconv.explain(x, wg).training and channelconv.explain(x, w, training=True).training


def test_conv2d_auto_matches_f_conv2d():
    for x_shape, w_shape, stride, padding, dilation, groups in SHAPES[:5]:
        x, w = torch.randn(x_shape, dtype=torch.float64), torch.randn(w_shape, dtype=torch.float64)
        out = channelconv.conv2d(x, w, None, stride, padding, dilation, groups)
        torch.testing.assert_close(out, F.conv2d(x, w, None, stride, padding, dilation, groups))


def test_infeasible_im2col_is_never_chosen():
    """With a workspace limit below one output row of columns, im2col would raise: 'auto' must not pick it."""
    x, w = torch.randn(1, 64, 30, 30), torch.randn(64, 64, 3, 3)
    channelconv.set_workspace_limit(1024)
    assert select.choose(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1) == "direct"
    assert not channelconv.explain(x, w, padding=1).candidates["im2col"].applicable
    torch.testing.assert_close(channelconv.conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("direct_over_im2col, first", [(1.0, "direct"), (1.05, "direct"), (1.07, "im2col"),
                                                        (0.97, "direct")])
def test_a_near_tie_goes_to_the_candidate_without_workspace(monkeypatch, direct_over_im2col, first):
    """Within NEAR_TIE the candidate that allocates nothing goes first, in choose() and explain()
    alike, and the reason says so; outside it the faster one."""
    x, w = (8, 3, 64, 64), (16, 3, 3, 3)  # a 3x3 layer: im2col needs a workspace, direct does not
    times = {"im2col": 1e-3, "direct": direct_over_im2col * 1e-3}
    monkeypatch.setattr(select, "predict", lambda a, c, *args, **kw: (times[a], {"call": times[a]}))
    c = channelconv.cost(x, w, 1, 1)
    assert c.plans["im2col"].workspace_bytes > 0 and c.plans["direct"].workspace_bytes == 0
    assert select.NEAR_TIE == pytest.approx(0.06)
    assert select.choose(x, w, (1, 1), (1, 1), (1, 1), 1) == first
    e = channelconv.explain(x, w, padding=1)
    assert e.choice == first
    assert ("a tie to the model" in e.reason) == (first == "direct" and direct_over_im2col >= 1)


def test_a_near_tie_between_candidates_without_workspace_keeps_the_faster(monkeypatch):
    """1x1, stride 1, unpadded: 1x1 and im2col read the input as it is (no workspace), so a
    slightly slower direct does not move ahead of them."""
    x, w = (8, 64, 14, 14), (64, 64, 1, 1)
    times = {"1x1": 1.00e-3, "im2col": 1.01e-3, "direct": 1.03e-3}
    monkeypatch.setattr(select, "predict", lambda a, c, *args, **kw: (times[a], {"call": times[a]}))
    assert channelconv.cost(x, w).plans["1x1"].workspace_bytes == 0
    assert select.choose(x, w, (1, 1), (0, 0), (1, 1), 1) == "1x1"


def calibration_entry(fast: str) -> dict:
    """A calibration entry whose model makes ``fast`` 1000x cheaper per unit of work than the others."""
    forward = {}
    for a in channelconv.ALGORITHMS:
        names = timemodel.DIRECT_FEATURES if a == "direct" else timemodel.LOWERED_FEATURES
        scale = 1e-3 if a == fast else 1.0
        forward[a] = {n: scale * (1e-9 if n != "call" else 1e-5) for n in names}
    return {"source": f"test ({fast})", "gemm": {"m0": 1, "n0": 1, "k0": 1}, "forward": forward}


def write_calibration(path, fast: str, **more):
    path.write_text(json.dumps({"version": 1, "models": {"cpu/float32": calibration_entry(fast), **more}}))


@pytest.mark.parametrize("fast", ["direct", "im2col"])
def test_calibration_file_drives_the_choice(tmp_path, monkeypatch, fast):
    path = tmp_path / "calibration.json"
    write_calibration(path, fast)
    monkeypatch.setenv("CHANNELCONV_CALIBRATION", str(path))
    select.reload_calibration()
    assert timemodel.model_for("cpu", torch.float32)["source"] == f"test ({fast})"
    for x_shape, w_shape, *args in SHAPES:
        if tuple(w_shape[2:]) != (1, 1):
            assert select.choose(x_shape, w_shape, *args) == fast
    # other dtypes fall back to the device's float32 entry; training to 3x the forward model
    assert timemodel.model_for("cpu", torch.float64)["source"] == f"test ({fast})"
    x, w = make(SHAPES[0], requires_grad=True)
    e = channelconv.explain(x, w, padding=1)
    assert e.training and e.choice == fast


def test_calibration_is_per_layout(tmp_path, monkeypatch):
    """A channels_last input reads its layout's entry ('cpu/<dtype>/channels_last'), else its dtype's
    NCHW entry; cost() and explain() take the layout from memory_format or the tensor."""
    path = tmp_path / "calibration.json"
    write_calibration(path, "direct", **{"cpu/float32/channels_last": calibration_entry("im2col")})
    monkeypatch.setenv("CHANNELCONV_CALIBRATION", str(path))
    select.reload_calibration()
    assert timemodel.model_for("cpu", torch.float32, channels_last=True)["source"] == "test (im2col)"
    assert timemodel.model_for("cpu", torch.bfloat16, channels_last=True)["source"] == "test (direct)"
    x_shape, w_shape, *args = SHAPES[0]
    x, w = make(SHAPES[0])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert select.choose(x_shape, w_shape, *args, tensors=(x, w, None)) == "direct"
    assert select.choose(x_shape, w_shape, *args, tensors=(x_cl, w, None)) == "im2col"
    assert channelconv.explain(x_cl, w, padding=1).choice == "im2col"
    assert channelconv.explain(x_shape, w_shape, padding=1, memory_format=torch.channels_last).choice == "im2col"
    assert channelconv.cost(x_shape, w_shape, padding=1, memory_format=torch.channels_last).channels_last
    # One input channel: a channels_last input is the same memory as NCHW, but its output of 4
    # channels is not (the direct kernels write it NHWC), so the layer is priced channels_last; with
    # one output channel as well, NCHW.
    assert channelconv.cost((2, 1, 8, 8), (4, 1, 3, 3), memory_format=torch.channels_last).channels_last
    assert not channelconv.cost((2, 1, 8, 8), (1, 1, 3, 3), memory_format=torch.channels_last).channels_last
    # ... and the layout is the result's: F.conv2d's rule on the tensors, not the ambiguous input's.
    x1, w1 = torch.randn(2, 1, 8, 8), torch.randn(4, 1, 3, 3)
    assert channelconv.explain(x1, w1, padding=1).choice == "direct"
    cl = torch.channels_last
    # (.to gives a one-channel tensor channels_last strides; .contiguous keeps its NCHW ones)
    assert channelconv.explain(x1.to(memory_format=cl), w1.to(memory_format=cl), padding=1).choice == "im2col"
    with pytest.raises(ValueError, match="memory_format"):
        channelconv.cost(x_shape, w_shape, memory_format=torch.preserve_format)


def test_this_machines_entries_come_before_the_shared_ones(tmp_path, monkeypatch):
    """A machine's own entry (by machine_id) wins at each step of the fallback; another machine's
    never applies."""
    path = tmp_path / "calibration.json"
    here = timemodel.machine_id("cpu")
    path.write_text(json.dumps({"version": 1, "models": {"cpu/float32": calibration_entry("direct"),
                                                           "cpu/bfloat16": calibration_entry("direct")},
                                "machines": {here: {"cpu/float32": calibration_entry("im2col")},
                                             "elsewhere 0-0": {"cpu/bfloat16": calibration_entry("1x1")}}}))
    monkeypatch.setenv("CHANNELCONV_CALIBRATION", str(path))
    select.reload_calibration()
    assert timemodel.model_for("cpu", torch.float32)["source"] == "test (im2col)"
    assert timemodel.model_for("cpu", torch.float32, channels_last=True)["source"] == "test (im2col)"
    assert timemodel.model_for("cpu", torch.bfloat16)["source"] == "test (direct)"  # the dtype's shared entry first
    x_shape, w_shape, *args = SHAPES[0]
    assert select.choose(x_shape, w_shape, *args) == "im2col"


def test_machine_id_names_the_cpu():
    here = timemodel.machine_id("cpu")
    assert here and here == timemodel.machine_id()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists() and "vendor_id" in cpuinfo.read_text():
        vendor = next(line.split(":")[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("vendor_id"))
        assert here.startswith(vendor + " ")


def test_missing_or_broken_calibration_falls_back_to_defaults(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    monkeypatch.setenv("CHANNELCONV_CALIBRATION", str(path))
    select.reload_calibration()
    assert timemodel.model_for()["source"] == "defaults"
    monkeypatch.setenv("CHANNELCONV_CALIBRATION", str(tmp_path / "absent.json"))
    select.reload_calibration()
    assert timemodel.model_for()["source"] == "defaults"
    assert select.choose(*SHAPES[0]) in channelconv.ALGORITHMS


def test_shipped_calibration_is_well_formed():
    if not timemodel.CALIBRATION_FILE.exists():
        pytest.skip("no calibration file shipped")
    data = json.loads(timemodel.CALIBRATION_FILE.read_text())
    assert "cpu/float32" in data["models"]
    entries = [*data["models"].items()] + [item for own in data.get("machines", {}).values() for item in own.items()]
    for key, entry in entries:
        if key.startswith("cpu/"):
            check_calibration_entry(entry)


def check_calibration_entry(entry):
    for pass_ in ("forward", "training"):
        for a in channelconv.ALGORITHMS:
            names = set(timemodel.DIRECT_FEATURES if a == "direct" else timemodel.LOWERED_FEATURES)
            # (entries fitted before the AMX kernel, on CPUs without AMX, lack its feature, and entries
            # fitted before weight_pack lack that one: they count zero, their cost in the other terms)
            assert names - {"mac_amx", "weight_pack"} <= set(entry[pass_][a]) <= names
            assert all(v >= 0 for v in entry[pass_][a].values())
    assert all(entry["gemm"][k] >= 0 for k in ("m0", "n0", "k0"))
    assert entry["threads"] >= 1 and entry["direct_vector_bytes"] in (16, 32, 64)
    for pass_ in ("forward", "training"):  # the calibration was good on its own probes, and on ones it never saw
        for check in ("ranking", "held_out"):
            quality = entry["fit"][pass_][check]
            assert quality["probes"] >= 20 and quality["within_10pct"] >= 0.8 * quality["probes"], (pass_, check)


def test_parallel_terms_scale_with_threads():
    c = channelconv.cost((8, 64, 28, 28), (64, 64, 3, 3), padding=1)
    one, terms_one = timemodel.predict("im2col", c, threads=1)
    two, terms_two = timemodel.predict("im2col", c, threads=2)
    assert two < one
    scaled = [name for name in terms_one if terms_one[name]]  # a zero term (e.g. no strided columns) stays zero
    assert {"gemm", "column", "call"} <= set(scaled)
    for name in scaled:
        assert terms_two[name] / terms_one[name] == pytest.approx(0.5 if name in timemodel.PARALLEL_FEATURES else 1.0)


# ----------------------------------------------------------------------------------------------
# benchmark mode


def _blocked_engine() -> bool:
    return bool(channelconv.cost((1, 8, 4, 4), (8, 8, 1, 1)).plans["direct"].passes["forward"]["blocked"])


@pytest.mark.skipif(not _blocked_engine(), reason="the blocked direct kernel needs AVX-512")
def test_direct_training_features_follow_each_passs_plan():
    gemm = timemodel.DEFAULT_MODEL["gemm"]
    # The stem's input gradient has 3 "output" channels: plain loops; its forward and weight
    # gradient (64 channels) are blocked. A 64 -> 64 layer runs all three passes blocked.
    stem = channelconv.cost((8, 3, 224, 224), (64, 3, 7, 7), 2, 3)
    forward = timemodel.features("direct", stem, gemm)
    training = timemodel.features("direct", stem, gemm, gradients=BACKWARD)
    assert forward["mac_plain"] == 0 and training["mac_plain"] > 0
    assert training["mac"] == pytest.approx(2 * forward["mac"])
    mid = channelconv.cost((8, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    training = timemodel.features("direct", mid, gemm, gradients=BACKWARD)
    assert training["mac_plain"] == 0 and training["mac"] == pytest.approx(3 * mid.macs)
    assert sum(p["output"] for p in mid.plans["direct"].passes.values()) == training["output"]


def test_direct_plan_counts_what_its_tasks_and_chunks_do():
    """The plan's counts follow from its own structure (csrc/plan_op.cpp): each task streams its
    group's packed weights once, each weight-gradient chunk loads and stores the dW tiles once, and
    more threads mean at least as many tasks (never fewer than two per thread on a large layer)."""
    if not _blocked_engine():
        pytest.skip("the blocked direct kernel needs AVX-512")
    packed = 512 * 512 * 9  # a 512 -> 512 3x3 layer's packed weights (512 channels: 16 full blocks)
    for threads in (1, 2, 8, 64):
        small = channelconv.cost((8, 512, 7, 7), (512, 512, 3, 3), 1, 1, threads=threads).plans["direct"].passes
        forward = small["forward"]
        assert forward["blocked"] and forward["weight_read"] == forward["tasks"] * packed
        assert forward["tasks"] % threads == 0 or forward["tasks"] == 8 * 7 // 2  # at most one per pair of rows
        grad = small["weight_grad"]
        assert grad["blocked"] and grad["weight_read"] == grad["chunks"] * packed
    few = channelconv.cost((8, 512, 7, 7), (512, 512, 3, 3), 1, 1, threads=2).plans["direct"].passes
    many = channelconv.cost((8, 512, 7, 7), (512, 512, 3, 3), 1, 1, threads=64).plans["direct"].passes
    assert many["forward"]["tasks"] > few["forward"]["tasks"] >= 4
    # 7x7 images share weight-gradient chunks; a 56x56 image fills at least one chunk of its own.
    assert few["weight_grad"]["chunks"] < 8
    assert channelconv.cost((8, 64, 56, 56), (64, 64, 3, 3), 1, 1).plans["direct"].passes["weight_grad"]["chunks"] >= 8
    # A strided input gradient runs one correlation per stride phase.
    strided = channelconv.cost((2, 64, 14, 14), (64, 64, 3, 3), 2, 1).plans["direct"].passes["input_grad"]
    assert strided["blocked"] and strided["runs"] == 4


def test_benchmark_mode_flag():
    assert channelconv.get_benchmark_mode() is False
    channelconv.set_benchmark_mode(True)
    assert channelconv.get_benchmark_mode() is True
    channelconv.set_benchmark_mode(False)
    assert channelconv.get_benchmark_mode() is False


def test_benchmark_mode_times_once_per_signature_and_caches(monkeypatch):
    calls = []
    real = measured._time_candidates

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(measured, "_time_candidates", counting)
    channelconv.set_benchmark_mode(True)
    x, w = torch.randn(2, 8, 12, 12), torch.randn(8, 8, 3, 3)
    for _ in range(3):
        torch.testing.assert_close(channelconv.conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1),
                                   rtol=1e-4, atol=1e-5)
    assert calls == [(2, 8, 12, 12)]
    cache = measured.benchmark_cache()
    assert len(cache) == 1
    (entry,) = cache.values()
    assert entry["choice"] in ("direct", "im2col")
    assert set(entry["seconds"]) <= {"direct", "im2col"} and entry["choice"] in entry["seconds"]
    # a new signature (batch, then gradients needed) is timed again
    channelconv.conv2d(torch.randn(3, 8, 12, 12), w, None, 1, 1)
    xg = x.clone().requires_grad_()
    channelconv.conv2d(xg, w, None, 1, 1).sum().backward()
    assert len(calls) == 3 and len(measured.benchmark_cache()) == 3
    e = channelconv.explain(x, w, padding=1)
    assert e.source == "measured" and e.choice == entry["choice"]
    assert e.candidates[entry["choice"]].measured_seconds == entry["seconds"][entry["choice"]]
    # off again: the heuristic decides, nothing more is timed
    channelconv.set_benchmark_mode(False)
    assert channelconv.explain(x, w, padding=1).source == "heuristic"
    channelconv.conv2d(torch.randn(4, 8, 12, 12), w, None, 1, 1)
    assert len(calls) == 3


def test_benchmark_mode_uses_the_cached_winner(monkeypatch):
    """Whatever the timing says wins is what later calls run (here: a fake timing crowning 'direct')."""
    monkeypatch.setattr(measured, "_time_candidates", lambda *a, **k: {"choice": "direct", "seconds": {"direct": 1.0}})
    channelconv.set_benchmark_mode(True)
    x, w = torch.randn(2, 8, 12, 12), torch.randn(8, 8, 3, 3)
    assert select.choose(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1, tensors=(x, w, None)) == "direct"
    ran = []
    monkeypatch.setitem(channelconv.functional.OPS, "direct", _Recorder(channelconv.functional.OPS["direct"], ran))
    channelconv.conv2d(x, w, None, 1, 1)
    assert ran == ["forward"]


class _Recorder:
    def __init__(self, ops, log):
        self._ops, self._log = ops, log

    @property
    def forward(self):
        self._log.append("forward")
        return self._ops.forward


def test_benchmark_mode_is_thread_safe(monkeypatch):
    """Many threads hitting a new signature at once: the candidates are timed once, every thread
    gets the same choice and a correct result."""
    calls = []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)  # widen the race window
        return {"choice": "im2col", "seconds": {"im2col": 0.1, "direct": 0.2}}

    monkeypatch.setattr(measured, "_time_candidates", slow)
    channelconv.set_benchmark_mode(True)
    x, w = torch.randn(2, 8, 12, 12), torch.randn(8, 8, 3, 3)
    expected = F.conv2d(x, w, None, 1, 1)
    results, errors = [], []

    def worker():
        try:
            results.append(channelconv.conv2d(x, w, None, 1, 1))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8 and len(calls) == 1
    for out in results:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_benchmark_mode_real_timing_picks_a_timed_candidate():
    channelconv.set_benchmark_mode(True)
    x, w = torch.randn(2, 16, 16, 16), torch.randn(16, 16, 1, 1)
    out = channelconv.conv2d(x, w, None, 2)
    torch.testing.assert_close(out, F.conv2d(x, w, None, 2), rtol=1e-4, atol=1e-5)
    (entry,) = measured.benchmark_cache().values()
    assert entry["choice"] in entry["seconds"] and all(s > 0 for s in entry["seconds"].values())
    assert entry["choice"] == min(entry["seconds"], key=entry["seconds"].get)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_auto_and_benchmark_mode(dynamic):
    channelconv.set_benchmark_mode(True)  # nothing may be timed inside a trace

    def f(x, w3, w1):
        return channelconv.conv2d(x, w3, None, 1, 1) + channelconv.conv2d(x, w1)

    x, w3, w1 = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3), torch.randn(6, 4, 1, 1)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    expected = F.conv2d(x, w3, None, 1, 1) + F.conv2d(x, w1)
    torch.testing.assert_close(compiled(x, w3, w1), expected, rtol=1e-4, atol=1e-5)
    assert measured.benchmark_cache() == {}


def test_auto_prices_the_gradients_the_call_will_need(monkeypatch):
    """A first layer's input needs no gradient, a frozen layer's weight none: 'auto' predicts the
    forward pass and only the gradients that backward will run (it caches per set of them)."""
    seen = []

    def predict(algorithm, c, device_type, gradients, *args):
        seen.append(gradients)
        return 1.0, {"call": 1.0}

    monkeypatch.setattr(select, "predict", predict)
    x, w = torch.randn(2, 8, 12, 12), torch.randn(8, 8, 3, 3)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    for tensors, expected in (((x, wg), ("weight_grad",)), ((xg, w), ("input_grad",)),
                              ((xg, wg), ("input_grad", "weight_grad")), ((x, w), ())):
        seen.clear()
        select.reload_calibration()  # (and the decisions cached by arguments and gradients)
        select.choose(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1, tensors=(*tensors, None))
        assert seen and set(seen) == {expected}, (tensors[0].requires_grad, tensors[1].requires_grad)
    seen.clear()
    select.reload_calibration()
    with torch.no_grad():
        select.choose(x.shape, w.shape, (1, 1), (1, 1), (1, 1), 1, tensors=(xg, wg, None))
    assert set(seen) == {()}
