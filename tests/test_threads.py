"""Eight Python threads calling conv2d at once, on different shapes and algorithms, forward and
backward, get what sequential calls get; 'auto' keeps choosing consistently (and, where the
measured mode's cache (channelconv/measured.py) holds one valid choice per signature).

The direct kernel is deterministic (each output element is summed by one task in a fixed order),
so its results must be bitwise equal. im2col and 1x1 go through MKL's GEMM, whose blocking may
depend on how many threads it gets when others compete; their results must equal the sequential
ones to float64 rounding (and the float64 oracle)."""

from __future__ import annotations

import random
import threading

import pytest
import torch
import torch.nn.functional as F

import channelconv

THREADS = 8
ROUNDS = 4

# (input shape, weight shape, stride, padding, dilation, groups, algorithm)
JOBS = [
    ((2, 6, 13, 11), (4, 6, 3, 3), 1, 1, 1, 1, "direct"),
    ((1, 8, 9, 17), (8, 1, 3, 5), (2, 1), (1, 2), 1, 8, "direct"),
    ((3, 4, 10, 10), (6, 2, 2, 2), 1, 0, (2, 3), 2, "im2col"),
    ((2, 6, 15, 7), (5, 6, 5, 3), (1, 2), (2, 0), 1, 1, "im2col"),
    ((2, 16, 8, 8), (12, 16, 1, 1), 1, 0, 1, 1, "1x1"),
    ((1, 9, 11, 6), (6, 3, 1, 1), 2, 1, 1, 3, "1x1"),
    ((2, 6, 13, 11), (4, 6, 3, 3), 1, 1, 1, 1, "auto"),
    ((2, 16, 8, 8), (12, 16, 1, 1), 1, 0, 1, 1, "auto"),
    ((0, 3, 5, 5), (2, 3, 3, 3), 1, 1, 1, 1, "im2col"),
    ((1, 3, 1, 1), (3, 1, 3, 3), 1, 1, 1, 3, "direct"),
]


def tensors(job, seed):
    x_shape, w_shape = job[:2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64, requires_grad=True)
    return x, w, b


def run(job, seed):
    """Forward and the three gradients of one job."""
    x, w, b = tensors(job, seed)
    stride, padding, dilation, groups, algorithm = job[2:]
    y = channelconv.conv2d(x, w, b, stride, padding, dilation, groups, algorithm=algorithm)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), grad_out))


def assert_same(got, want, algorithm, what):
    for name, g, r in zip(("output", "grad input", "grad weight", "grad bias"), got, want):
        if algorithm == "direct":
            assert torch.equal(g, r), f"{what}: {name} differs from the sequential call"
        else:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=f"{what}: {name}")


def hammer(work, threads=THREADS):
    """Runs work(thread_index) in `threads` threads released together; re-raises the first error."""
    barrier = threading.Barrier(threads)
    errors = []

    def body(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    pool = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in pool), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]


def test_concurrent_calls_match_sequential_calls():
    sequential = {(j, seed): run(JOBS[j], seed) for j in range(len(JOBS)) for seed in (0, 1)}
    # The sequential results are right, too (float64 oracle).
    for (j, seed), (y, *_) in sequential.items():
        x, w, b = (t.detach() for t in tensors(JOBS[j], seed))
        torch.testing.assert_close(y, F.conv2d(x, w, b, *JOBS[j][2:6]), rtol=1e-10, atol=1e-10)

    results = [[] for _ in range(THREADS)]

    def work(i):
        order = list(sequential) * ROUNDS
        random.Random(i).shuffle(order)  # every thread its own interleaving of shapes and algorithms
        for key in order:
            results[i].append((key, run(JOBS[key[0]], key[1])))

    hammer(work)
    checked = 0
    for i in range(THREADS):
        assert len(results[i]) == len(sequential) * ROUNDS
        for (j, seed), got in results[i]:
            assert_same(got, sequential[(j, seed)], JOBS[j][-1], f"thread {i}, job {JOBS[j]}")
            checked += 1
    assert checked == THREADS * ROUNDS * len(sequential)


def test_auto_choice_is_stable_under_threads():
    shapes = [job for job in JOBS if job[-1] == "auto"] + [(*job[:6], "auto") for job in JOBS[:6]]

    def choice(job):
        x_shape, w_shape, stride, padding, dilation, groups = job[:6]
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        return channelconv.choose(x_shape, w_shape, pair(stride), pair(padding), pair(dilation), groups)

    before = [choice(job) for job in shapes]
    sequential = [run(job, 3) for job in shapes]

    def work(i):
        for _ in range(ROUNDS):
            for k in random.Random(i).sample(range(len(shapes)), len(shapes)):
                assert_same(run(shapes[k], 3), sequential[k], "auto", f"thread {i}, {shapes[k]}")
                assert choice(shapes[k]) == before[k]

    hammer(work)
    assert [choice(job) for job in shapes] == before


def test_benchmark_mode_cache_under_threads():
    """Measured 'auto' filled by 8 threads at once: one cached choice per signature, applicable to
    its shape, used by every later call, and the results are those of the chosen algorithm."""
    from channelconv import measured

    shapes = [(*job[:6], "auto") for job in JOBS if job[0][0] > 0][:6]
    channelconv.set_benchmark_mode(True)
    try:
        measured.clear_benchmark_cache()
        outputs = [[] for _ in range(THREADS)]

        def work(i):
            for _ in range(2):
                for k in random.Random(i).sample(range(len(shapes)), len(shapes)):
                    outputs[i].append((k, run(shapes[k], 5)))

        hammer(work)
        cache = measured.benchmark_cache()
        assert 0 < len(cache) <= len(shapes), cache.keys()
        for entry in cache.values():
            assert entry["choice"] in channelconv.ALGORITHMS
        # Every thread's result for a shape equals the sequential result of an algorithm that
        # applies to the shape.
        for k, job in enumerate(shapes):
            candidates = [a for a in channelconv.ALGORITHMS if a != "1x1" or tuple(job[1][2:]) == (1, 1)]
            refs = {a: run((*job[:6], a), 5) for a in candidates}
            for i in range(THREADS):
                for kk, got in outputs[i]:
                    if kk == k:
                        assert any(all(torch.allclose(g, r, rtol=1e-12, atol=1e-12) for g, r in zip(got, ref))
                                   for ref in refs.values()), f"thread {i}, {job}"
        for job in shapes:  # a second pass, sequential, changes nothing
            run(job, 5)
        assert {k: v["choice"] for k, v in measured.benchmark_cache().items()} == {
            k: v["choice"] for k, v in cache.items()}
    finally:
        channelconv.set_benchmark_mode(False)
