"""Per-pass CUDA profile of channelconv's algorithms against cuDNN: for each layer and pass
(forward, input gradient, weight gradient), the GPU kernels that ran, how many launches, and their
device time, from torch.profiler (needs a GPU).

    python scripts/profile_passes.py [--json OUT.json] [--tf32] [--batch 8]

Layers: a few of ResNet-50's (3x3 at 56/14/7, a strided 3x3, 1x1 at 56 and 7). Each pass runs
warm once, then `--repeats` times under the profiler; times are per call (microseconds).

Then the host time per call (issue 19: at most about 15 µs): on a tiny layer, whose kernels take
less time than their launch, the seconds the CPU spends issuing a forward call, and a training
step's forward and backward, per call, against F.conv2d's.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import channelconv

LAYERS = [  # C_in, H, C_out, kernel, stride, padding
    (64, 56, 64, 3, 1, 1), (256, 14, 256, 3, 1, 1), (512, 7, 512, 3, 1, 1), (128, 56, 128, 3, 2, 1),
    (256, 56, 64, 1, 1, 0), (512, 7, 2048, 1, 1, 0),
]
PASSES = ("forward", "input_grad", "weight_grad")


def calls(algorithm: str, x, w, dy, stride, padding):
    """The three passes of one algorithm, as callables: channelconv's ops, or cuDNN's."""
    args = ([stride] * 2, [padding] * 2, [1, 1], 1)
    if algorithm == "cudnn":
        return {"forward": lambda: F.conv2d(x, w, None, stride, padding),
                "input_grad": lambda: torch.ops.aten.convolution_backward(
                    dy, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, False, False]),
                "weight_grad": lambda: torch.ops.aten.convolution_backward(
                    dy, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [False, True, False])}
    op = {"direct": "direct", "im2col": "im2col", "1x1": "conv1x1"}[algorithm]
    ops = torch.ops.channelconv
    return {"forward": lambda: getattr(ops, f"{op}_forward")(x, w, None, *args),
            "input_grad": lambda: getattr(ops, f"{op}_backward_input")(dy, w, list(x.shape), *args),
            "weight_grad": lambda: getattr(ops, f"{op}_backward_weight")(dy, x, list(w.shape), *args)}


def profile_call(fn, repeats: int) -> dict:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:80]][0] += 1
            kernels[e.name[:80]][1] += e.device_time_total
    return {"launches": sum(n for n, _ in kernels.values()) / repeats,
            "device_us": sum(t for _, t in kernels.values()) / repeats,
            "kernels": {k: {"launches": n / repeats, "us": t / repeats} for k, (n, t) in kernels.items()}}


def host_times(calls_per_run: int = 2000, device: str = "cuda") -> list[dict]:
    """Host microseconds per call on a 1x8x4x4 input, 8 output channels, 3x3: the time to issue
    `calls_per_run` calls with no synchronisation inside (the GPU drains them faster than they come).
    (device='cpu' runs the same code there, where it times the kernels too.)"""
    import time
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(1, 8, 4, 4, device=device)
    w = torch.randn(8, 8, 3, 3, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    xg = x.clone().requires_grad_()
    sides = {"F.conv2d": lambda a, **_: F.conv2d(a, w, b, 1, 1)}
    for algorithm in ("auto", "direct", "im2col"):
        sides[algorithm] = lambda a, algorithm=algorithm: channelconv.conv2d(a, w, b, 1, 1, algorithm=algorithm)
    rows = []
    for side, conv in sides.items():
        for mode, fn in (("forward", lambda: conv(x.detach())),
                         ("training step", lambda: conv(xg).sum().backward())):
            for _ in range(50):
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(calls_per_run):
                fn()
            host_us = (time.perf_counter() - start) / calls_per_run * 1e6
            sync()
            rows.append(dict(side=side, mode=mode, host_us=host_us))
            print(f"host time {side:9} {mode:14} {host_us:7.1f} us per call")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 (cuDNN's and channelconv's direct)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    options = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = options.tf32
    torch.backends.cuda.matmul.allow_tf32 = options.tf32
    rows = []
    print(f"{'layer':28} {'pass':12} {'algorithm':9} {'launches':>8} {'device us':>10} {'vs cuDNN':>8}")
    for c, h, k, r, stride, padding in LAYERS:
        x = torch.randn(options.batch, c, h, h, device="cuda")
        w = torch.randn(k, c, r, r, device="cuda")
        dy = torch.randn(F.conv2d(x, w, None, stride, padding).shape, device="cuda")
        layer = f"{c}->{k} {r}x{r}/s{stride} @{h}"
        algorithms = ["cudnn", "direct", "im2col"] + (["1x1"] if r == 1 else [])
        for pass_ in PASSES:
            base = None
            for algorithm in algorithms:
                result = profile_call(calls(algorithm, x, w, dy, stride, padding)[pass_], options.repeats)
                base = base or result["device_us"]
                ratio = base / result["device_us"] if result["device_us"] else float("nan")
                print(f"{layer:28} {pass_:12} {algorithm:9} {result['launches']:8.1f} {result['device_us']:10.1f} "
                      f"{ratio:8.2f}")
                rows.append(dict(layer=layer, pass_=pass_, algorithm=algorithm, batch=options.batch,
                                 tf32=options.tf32, ratio_to_cudnn=ratio, **result))
    host = host_times()
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "host_us_per_call": host}, f, indent=1)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    sys.exit(main())
