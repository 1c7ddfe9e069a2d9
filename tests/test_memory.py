"""Memory: no leaks over 1,000 forward/backward calls (resident set size stays flat), the peak
memory of each algorithm (what its ops allocate beyond their results: direct and 1x1 at stride 1
nothing, im2col its column buffer within the workspace limit), and allocation failure: a workspace
that cannot be allocated is a clear error naming the workspace and the bytes, never a crash."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import channelconv
from channelconv._ops import OPS

MiB = 1 << 20


def rss() -> int:
    """Resident set size of this process in bytes (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# (algorithm, input shape, weight shape, stride, padding)
LAYERS = [
    ("direct", (4, 16, 24, 24), (16, 16, 3, 3), 1, 1),
    ("im2col", (4, 16, 24, 24), (16, 16, 3, 3), 1, 1),
    ("1x1", (4, 16, 24, 24), (32, 16, 1, 1), 1, 0),
    ("1x1", (4, 16, 24, 24), (32, 16, 1, 1), 2, 1),  # strided: gathers through a column buffer
    ("auto", (4, 16, 24, 24), (16, 16, 3, 3), 2, 1),
]


def fwd_bwd(algorithm, x, w, b, stride, padding):
    y = channelconv.conv2d(x, w, b, stride, padding, algorithm=algorithm)
    return torch.autograd.grad(y, (x, w, b), torch.ones_like(y))


@pytest.mark.parametrize("algorithm,x_shape,w_shape,stride,padding", LAYERS,
                         ids=[f"{a}-stride{s}" for a, _, _, s, _ in LAYERS])
def test_thousand_calls_leave_rss_flat(algorithm, x_shape, w_shape, stride, padding, one_thread, capsys):
    x = torch.randn(x_shape, requires_grad=True)
    w = torch.randn(w_shape, requires_grad=True)
    b = torch.randn(w_shape[0], requires_grad=True)
    for _ in range(100):  # warm-up: allocator pools, OpenMP threads, MKL buffers
        fwd_bwd(algorithm, x, w, b, stride, padding)
    # Three windows of 500 calls. A leak grows RSS in every window; the C allocator's own noise (a
    # heap top trimmed or not, seen up to +6.6 MiB once in 1000 calls) in some, so the least growth
    # is the measure.
    growths = []
    for _ in range(3):
        gc.collect()
        before = rss()
        for _ in range(500):
            grads = fwd_bwd(algorithm, x, w, b, stride, padding)
        del grads
        gc.collect()
        growths.append(rss() - before)
    growth = min(growths)
    # Each call allocates its output and three gradients (plus any column buffer): leaking a tenth
    # of that per call would add ~500/10 calls' worth per window; allow 4 MiB of noise, far less.
    per_call = 4 * x.numel() * 2 + 4 * w.numel() + 4 * x_shape[0] * w_shape[0] * (x_shape[2] // stride) ** 2
    assert 500 * per_call / 10 > 8 * MiB  # the test could see such a leak
    with capsys.disabled():
        print(f"\n[memory] {algorithm} stride {stride}: RSS {before / MiB:.1f} MiB, growth per 500 forward/backward "
              f"calls {', '.join(f'{g / MiB:+.2f}' for g in growths)} MiB "
              f"({per_call / 1024:.0f} KiB allocated per call)")
    assert growth < 4 * MiB, f"{algorithm}: RSS grew by {growth / MiB:.1f} MiB or more in each of 3 x 500 calls"


def allocation_peak(fn) -> tuple[int, int]:
    """(peak live bytes above the start, bytes still live at the end) of the tensors `fn`
    allocates through PyTorch's CPU allocator, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()  # noqa: F841  (held until the profile ends: its bytes count as live)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


PEAK_LAYERS = [  # (algorithm, stride, padding, kernel)
    ("direct", 1, 1, 3),
    ("im2col", 1, 1, 3),
    ("1x1", 1, 0, 1),
    ("1x1", 2, 1, 1),
]


def test_peak_memory_per_algorithm(limit, capsys):
    """Forward: an algorithm's ops allocate its output plus its workspace, nothing else: direct and
    1x1 at stride 1 no workspace at all, im2col (and strided 1x1) one column buffer no larger than
    the limit. Backward: the two gradients plus the same workspace, plus float32 accumulators."""
    limit(1 * MiB)
    rows = []
    for algorithm, stride, padding, k in PEAK_LAYERS:
        x = torch.randn(4, 32, 40, 40)
        w = torch.randn(32, 32, k, k)
        b = torch.randn(32)
        extra = (channelconv.get_workspace_limit(),) if algorithm != "direct" else ()
        ops, conv = OPS[algorithm], ([stride] * 2, [padding] * 2, [1, 1], 1, *extra)
        out_bytes = channelconv.conv2d(x, w, b, stride, padding, algorithm=algorithm).nbytes
        dy = torch.randn(channelconv.conv2d(x, w, b, stride, padding, algorithm=algorithm).shape)

        torch.ops.channelconv.reset_workspace_peak()
        peak, live = allocation_peak(lambda: ops.forward(x, w, b, *conv))
        workspace = torch.ops.channelconv.workspace_peak()
        assert live == out_bytes  # nothing but the output survives the call
        assert peak == out_bytes + workspace, f"{algorithm}: forward peak {peak} != output + workspace"
        if algorithm == "direct" or stride == 1 and algorithm == "1x1":
            assert workspace == 0
        else:
            assert 0 < workspace <= channelconv.get_workspace_limit()

        torch.ops.channelconv.reset_workspace_peak()
        grads = x.nbytes + w.nbytes
        peak_dx, _ = allocation_peak(lambda: ops.backward_input(dy, w, list(x.shape), *conv))
        peak_dw, _ = allocation_peak(lambda: ops.backward_weight(dy, x, list(w.shape), *conv))
        backward_workspace = torch.ops.channelconv.workspace_peak()
        assert backward_workspace <= channelconv.get_workspace_limit()
        # Input gradient: the gradient itself, a float accumulator of the same size at most (col2im
        # accumulates there; for float32 it is the gradient), and the workspace.
        assert x.nbytes <= peak_dx <= x.nbytes + backward_workspace, f"{algorithm}: grad input peak {peak_dx}"
        assert w.nbytes <= peak_dw <= 2 * w.nbytes + backward_workspace, f"{algorithm}: grad weight peak {peak_dw}"
        rows.append((f"{algorithm} k={k} stride={stride}", out_bytes, workspace, peak, backward_workspace,
                     peak_dx, peak_dw, grads))
    with capsys.disabled():
        print("\n[memory] input (4, 32, 40, 40) float32 = 800 KiB, weight 32x32xkxk, workspace limit 1 MiB; bytes "
              "allocated by the op beyond its start (profiler, PyTorch's CPU allocator)")
        print(f"{'layer':24s} {'output':>9s} {'fwd ws':>9s} {'fwd peak':>9s} {'bwd ws':>9s} "
              f"{'dX peak':>9s} {'dW peak':>9s}")
        for name, out_bytes, ws, peak, bws, pdx, pdw, _ in rows:
            print(f"{name:24s} {out_bytes:9d} {ws:9d} {peak:9d} {bws:9d} {pdx:9d} {pdw:9d}")


def test_rss_peak_per_algorithm(capsys):
    """The same in resident memory, everything included (fresh processes; the kernel's peak-RSS
    counter VmHWM reset just before the call): a forward pass of each algorithm on a 64 MiB input
    costs about its output plus its workspace, nothing hidden (direct's per-thread accumulator
    plane is 64 KiB)."""
    code = textwrap.dedent("""
        import sys, torch, channelconv
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
        algorithm, k, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        channelconv.set_workspace_limit(16 << 20)
        torch.manual_seed(0)
        small = torch.randn(1, 64, 8, 8), torch.randn(64, 64, k, k)
        channelconv.conv2d(*small, padding=k // 2, stride=stride, algorithm=algorithm)  # warm-up, small
        x, w = torch.randn(16, 64, 128, 128), torch.randn(64, 64, k, k)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = status("VmRSS")
        y = channelconv.conv2d(x, w, padding=k // 2, stride=stride, algorithm=algorithm)
        print(status("VmHWM") - before, y.nbytes, torch.ops.channelconv.workspace_peak())
    """)
    rows = []
    for algorithm, k, stride in (("direct", 3, 1), ("im2col", 3, 1), ("1x1", 1, 1), ("1x1", 1, 2)):
        done = subprocess.run([sys.executable, "-c", code, algorithm, str(k), str(stride)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        grown, out_bytes, workspace = map(int, done.stdout.split())
        # Output + workspace, give or take allocator slack (freed memory the allocator reuses,
        # thread arenas, MKL's packing buffers): 8 MiB either way.
        assert out_bytes + workspace - 8 * MiB <= grown <= out_bytes + workspace + 8 * MiB, (
            f"{algorithm}: peak RSS grew {grown / MiB:.1f} MiB for {out_bytes / MiB:.1f} MiB of output "
            f"and {workspace / MiB:.1f} MiB of workspace")
        rows.append((f"{algorithm} k={k} stride={stride}", grown, out_bytes, workspace))
    with capsys.disabled():
        print("\n[memory] forward on input (16, 64, 128, 128) float32 = 64 MiB, workspace limit 16 MiB: "
              "growth of the peak RSS (MiB)")
        for name, grown, out_bytes, workspace in rows:
            print(f"{name:24s} peak RSS +{grown / MiB:6.1f}  output {out_bytes / MiB:6.1f}  "
                  f"workspace {workspace / MiB:5.1f}")


# ---------------------------------------------------------------------------------------------
# Allocation failure


def absurd_columns():
    """A 1x2^23 kernel over a 1-pixel image padded to 2^23 + 2 output columns: tiny tensors, but
    one output row of im2col columns is 2^23 x (2^23 + 2) floats = 256 TiB (past the 47-bit address
    space, so no allocator can hand it out, whatever the overcommit policy)."""
    x = torch.ones(1, 1, 1, 1)
    w = torch.ones(1, 1, 1, 2**23)
    padding = (0, 2**23)
    return x, w, padding, 2**23 * (2**23 + 2) * 4


def test_workspace_that_cannot_be_allocated_is_a_clear_error(limit):
    x, w, padding, nbytes = absurd_columns()
    limit(2**62)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        channelconv.conv2d(x, w, padding=padding, algorithm="im2col")
    message = str(caught.value)
    assert "im2col workspace" in message and str(nbytes) in message and "algorithm='direct'" in message, message
    assert isinstance(caught.value, RuntimeError)
    # Nothing was left half-done: the process carries on, and the peak statistic saw no buffer.
    y = channelconv.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 2, 2), algorithm="im2col")
    assert torch.equal(y, torch.full((1, 1, 2, 2), 4.0))


def test_output_that_cannot_be_allocated_is_an_error_not_a_crash():
    """An output of 2^32 x 2^32 elements (a padding of 2^31 - 1 on both sides of each axis)."""
    x, w = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    for algorithm in channelconv.ALGORITHMS:
        with pytest.raises(RuntimeError, match=r"allocate|overflow|memory"):
            channelconv.conv2d(x, w, padding=2**31 - 1, algorithm=algorithm)


def test_allocation_failure_under_an_address_space_limit():
    """A realistic failure: a 2 GiB column buffer in a process whose address space (RLIMIT_AS) has
    only 1 GiB to spare. The error names the workspace; the process then still computes."""
    code = textwrap.dedent("""
        import resource, torch, channelconv
        channelconv.conv2d(torch.ones(1, 2, 9, 9), torch.ones(2, 2, 3, 3), algorithm="im2col")  # threads up
        channelconv.set_workspace_limit(4 << 30)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        x, w = torch.ones(1, 1, 1, 3 << 14), torch.ones(1, 1, 1, 1 << 15)  # columns 2^15 x (2^14 + 1)
        try:
            channelconv.conv2d(x, w, algorithm="im2col")
            print("allocated")
        except torch.OutOfMemoryError as e:
            print("error:", str(e).splitlines()[0])
        y = channelconv.conv2d(x, w, algorithm="direct")
        print("direct:", y.shape[-1], float(y[0, 0, 0, 0]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("error: channelconv: cannot allocate the im2col workspace"), done.stdout
    assert str((1 << 15) * ((1 << 14) + 1) * 4) in lines[0]
    assert lines[1] == f"direct: {(1 << 14) + 1} {float(1 << 15)}"
