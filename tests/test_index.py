"""The index helpers of csrc/conv_index.h (Axis::input_at / first_valid / last_valid /
output_reading, Geometry::im2col_source, floor_div), as the CPU kernels instantiate them
(int64_t), evaluated through the self-test op channelconv_testing::_index_probe
(csrc/testing/index_selftest.cpp, built for the tests only)
and compared with a plain-Python model of the same math, exact in Python integers, at sizes and
offsets past 2^31 where a 32-bit intermediate would wrap. The model itself is checked against
brute force on every small axis first."""

from __future__ import annotations

import itertools
from dataclasses import astuple, dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import load_selftest_ops

SELFTEST = load_selftest_ops()

INPUT_AT, FIRST_VALID, LAST_VALID, OUTPUT_READING, IM2COL_SOURCE, FLOOR_DIV = range(6)
INT64_LIMIT = 2**62  # keep every intermediate well inside int64: this tests 32-bit wrap-around, not 64


def probe(what: int, axes: tuple, queries) -> list[int]:
    args = [what, *axes]
    for a, b in queries:
        args += [a, b]
    return list(SELFTEST._index_probe(args))


@dataclass(frozen=True)
class Axis:
    """Python model of channelconv::Axis<int64_t>."""

    size: int  # `in`
    out: int
    taps: int
    stride: int
    pad: int
    dilation: int

    def input_at(self, o, t):
        return o * self.stride - self.pad + t * self.dilation

    def valid_range(self, t):
        """[first, last): the output positions whose tap t reads a real input element, clamped
        to [0, out]; first == last when there are none."""
        ceil_div = -((t * self.dilation - self.pad) // self.stride)  # ceil((pad - t*d) / stride)
        first = min(max(ceil_div, 0), self.out)
        last = (self.size - 1 + self.pad - t * self.dilation) // self.stride + 1
        return first, min(max(last, first), self.out)

    def output_reading(self, i, t):
        num = i + self.pad - t * self.dilation
        if num < 0 or num % self.stride:
            return -1
        return num // self.stride if num // self.stride < self.out else -1


def output_extent(size, taps, stride, pad, dilation):
    return (size + 2 * pad - dilation * (taps - 1) - 1) // stride + 1


def im2col_source(h: Axis, w: Axis, row, col):
    """Offset of the input element column matrix entry (row, col) reads, -1 in the padding."""
    c, r, s = row // (h.taps * w.taps), (row // w.taps) % h.taps, row % w.taps
    hi, wi = h.input_at(col // w.out, r), w.input_at(col % w.out, s)
    if not (0 <= hi < h.size and 0 <= wi < w.size):
        return -1
    return (c * h.size + hi) * w.size + wi


def check_axis(axis: Axis, outputs, inputs):
    """The C++ helpers against the model on one axis, for the given output positions and input
    coordinates (and every tap, or a spread of taps when there are many)."""
    taps = sorted({0, 1, axis.taps // 2, axis.taps - 2, axis.taps - 1} & set(range(axis.taps)))
    fields = astuple(axis)
    queries = [(o, t) for o in outputs for t in taps]
    assert probe(INPUT_AT, fields, queries) == [axis.input_at(o, t) for o, t in queries]
    ranges = [axis.valid_range(t) for t in taps]
    assert probe(FIRST_VALID, fields, [(t, 0) for t in taps]) == [f for f, _ in ranges]
    assert probe(LAST_VALID, fields, [(t, 0) for t in taps]) == [last for _, last in ranges]
    queries = [(i, t) for i in inputs for t in taps]
    assert probe(OUTPUT_READING, fields, queries) == [axis.output_reading(i, t) for i, t in queries]
    # What the ranges promise, in exact arithmetic: inside, every tap reads the input; just
    # outside, it reads the padding (or the range is clamped to the output).
    for t, (first, last) in zip(taps, ranges):
        if first < last:
            assert 0 <= axis.input_at(first, t) and axis.input_at(last - 1, t) < axis.size
            assert first == 0 or axis.input_at(first - 1, t) < 0
            assert last == axis.out or axis.input_at(last, t) >= axis.size
            o = (first + last) // 2
            assert axis.output_reading(axis.input_at(o, t), t) == o


# ---------------------------------------------------------------------------------------------
# Small axes: the model against brute force, and the C++ against the model, exhaustively


SMALL = [Axis(size, output_extent(size, taps, stride, pad, dil), taps, stride, pad, dil)
         for size, taps, stride, pad, dil in itertools.product(range(1, 7), range(1, 4), range(1, 4), range(3), range(1, 4))
         if output_extent(size, taps, stride, pad, dil) >= 1]


def test_model_matches_brute_force_on_small_axes():
    for axis in SMALL:
        for t in range(axis.taps):
            valid = [o for o in range(axis.out) if 0 <= axis.input_at(o, t) < axis.size]
            first, last = axis.valid_range(t)
            if valid:
                assert (first, last) == (valid[0], valid[-1] + 1) and valid == list(range(first, last)), axis
            else:
                assert first == last, axis
            for i in range(-2, axis.size + 2):
                readers = [o for o in range(axis.out) if axis.input_at(o, t) == i]
                assert axis.output_reading(i, t) == (readers[0] if readers else -1), (axis, i, t)


def test_helpers_match_the_model_on_small_axes():
    for axis in SMALL:
        check_axis(axis, outputs=range(axis.out), inputs=range(axis.size))


def test_im2col_source_on_small_geometries():
    for h, w in itertools.islice(itertools.product(SMALL[::7], SMALL[::11]), 400):
        channels = 2
        rows, cols = channels * h.taps * w.taps, h.out * w.out
        queries = list(itertools.product(range(rows), range(cols)))[:600]
        got = probe(IM2COL_SOURCE, astuple(h) + astuple(w), queries)
        assert got == [im2col_source(h, w, r, c) for r, c in queries], (h, w)
        # Every source is inside one image of `channels` channels, or the padding.
        assert all(-1 <= s < channels * h.size * w.size for s in got)


# ---------------------------------------------------------------------------------------------
# Past 2^31


BIG_AXES = [
    # A 3-tap 'same' axis of 6.4e9 pixels: positions past 2^31 and 2^32.
    Axis(3 * 2**31 + 5, 3 * 2**31 + 5, 3, 1, 1, 1),
    # Stride and dilation whose products pass 2^31 long before the positions do.
    Axis(2**33 + 1, output_extent(2**33 + 1, 5, 3, 2**31 - 1, 2**20), 5, 3, 2**31 - 1, 2**20),
    Axis(2**40, output_extent(2**40, 3, 2**31 - 1, 7, 2**30), 3, 2**31 - 1, 7, 2**30),
    # Large padding (the op bounds it to 2^31 - 1) around a small input: all but one row reads padding.
    Axis(3, output_extent(3, 2, 1, 2**31 - 1, 1), 2, 1, 2**31 - 1, 1),
    # 2^31 - 1 exactly: int32's largest value, where `in - 1 + pad` already wraps in 32 bits.
    Axis(2**31 - 1, output_extent(2**31 - 1, 4, 2, 2**31 - 1, 3), 4, 2, 2**31 - 1, 3),
]


def interesting(n, around=()):
    """Positions in [0, n): the ends, 2^31 and 2^32 neighbourhoods, and `around`."""
    points = {0, 1, n // 2, n - 2, n - 1, *around}
    for p in (2**31, 2**32):
        points |= {p - 2, p - 1, p, p + 1}
    return sorted(v for v in points if 0 <= v < n)


@pytest.mark.parametrize("axis", BIG_AXES, ids=lambda a: f"in={a.size},stride={a.stride},pad={a.pad},dil={a.dilation}")
def test_helpers_past_2_31(axis):
    assert max(axis.size, axis.out, axis.pad + axis.taps * axis.dilation) >= 2**31 - 1
    edges = [f for t in range(axis.taps) for f in axis.valid_range(t)]
    check_axis(axis, outputs=interesting(axis.out, edges), inputs=interesting(axis.size, [axis.pad]))


@st.composite
def big_axes(draw):
    size = draw(st.integers(1, 2**40))
    taps = draw(st.integers(1, 2**10))
    stride = draw(st.integers(1, 2**31 - 1))
    pad = draw(st.integers(0, 2**31 - 1))
    dilation = draw(st.integers(1, 2**31 - 1))
    out = output_extent(size, taps, stride, pad, dilation)
    if out < 1 or draw(st.booleans()):  # the helpers clamp to any `out`, consistent or not
        out = draw(st.integers(1, min(2**40, INT64_LIMIT // stride)))  # out * stride stays in int64
    return Axis(size, out, taps, stride, pad, dilation)


@settings(max_examples=150, deadline=None)
@given(axis=big_axes(), data=st.data())
def test_helpers_match_the_model_at_random_large_sizes(axis, data):
    outputs = data.draw(st.lists(st.integers(0, axis.out - 1), max_size=4))
    inputs = data.draw(st.lists(st.integers(0, axis.size - 1), max_size=4))
    edges = [f for t in (0, axis.taps - 1) for f in axis.valid_range(t)]
    check_axis(axis, outputs=interesting(axis.out, outputs + edges), inputs=interesting(axis.size, inputs))


def test_im2col_source_past_2_31():
    """One image of 3 channels x 40000 x 40000 (4.8e9 elements): sources past 2^31 and 2^32,
    rows of the last channel, columns of the last output row."""
    h = Axis(40000, 40000, 3, 1, 1, 1)
    w = Axis(40000, output_extent(40000, 5, 2, 4, 2), 5, 2, 4, 2)
    rows = [0, 1, 7, 14, 15, 29, 30, 44]  # (c, r, s) across all 3 channels, the last one last
    cols = [0, 1, w.out - 1, w.out, h.out * w.out // 2, h.out * w.out - w.out, h.out * w.out - 1]
    queries = list(itertools.product(rows, cols))
    expected = [im2col_source(h, w, r, c) for r, c in queries]
    assert max(expected) > 2**32
    assert probe(IM2COL_SOURCE, astuple(h) + astuple(w), queries) == expected


def test_floor_div_past_2_31():
    pairs = [(a, b) for a in (-(2**40) - 1, -(2**32), -(2**31) - 1, -7, -1, 0, 1, 2**31 + 1, 2**33 + 5, 2**62)
             for b in (1, 2, 3, 2**31 - 1, 2**31, 2**33 + 1)]
    assert probe(FLOOR_DIV, (), pairs) == [a // b for a, b in pairs]


def test_probe_rejects_malformed_arguments():
    with pytest.raises(ValueError, match="unknown function"):
        SELFTEST._index_probe([9])
    with pytest.raises(ValueError, match="axis fields"):
        SELFTEST._index_probe([INPUT_AT, 1, 2, 3])
    with pytest.raises(ValueError, match="stride must be positive"):
        probe(FIRST_VALID, (4, 4, 1, 0, 0, 1), [(0, 0)])
