"""DistributedDataParallel: a small CNN of channelconv.Conv2d trained on 2 CPU processes (gloo)
ends with the parameters of single-process training on the whole batch."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import channelconv

WORLD = 2
STEPS = 4
TIMEOUT_S = 120


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        channelconv.Conv2d(3, 8, 3, padding=1, algorithm="direct"), nn.ReLU(),
        channelconv.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, algorithm="im2col"), nn.ReLU(),
        channelconv.Conv2d(8, 4, 1, algorithm="1x1"), nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).double()


def make_data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, 2 * WORLD, 3, 10, 10, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (STEPS, 2 * WORLD), generator=g))


def train(model, data, labels, rank=0, world=1):
    """SGD with momentum on each step's batch (this rank's contiguous share of it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = data.shape[1] // world
    for x, y in zip(data, labels):
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = nn.functional.cross_entropy(model(x), y)  # a mean: DDP's gradient average is the whole batch's
        opt.zero_grad()
        loss.backward()
        opt.step()


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        train(model, *make_data(), rank=rank, world=WORLD)
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears its group down: one CI run saw rank 0 abort
        # ("terminate called without an active exception") as its peer's connections closed.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    context = mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:  # only the workers this test started
            if process.is_alive():
                process.terminate()
                process.join(5)

    single = make_model()
    start = {k: v.clone() for k, v in single.state_dict().items()}
    train(single, *make_data())
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name, want in single.state_dict().items():
        assert not torch.equal(want, start[name]), f"{name} did not train"
        for rank, state in enumerate(states):
            # All-reduce sums the two halves' gradients in another order than one batch does.
            torch.testing.assert_close(state[name], want, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # the replicas agree exactly
