"""'auto': which of channelconv's own algorithms runs a given shape.

For now a fixed rule: a 1x1 kernel is a GEMM over the input as it lies ('1x1'); everything else
goes through 'im2col' (one large GEMM per band of output rows), which is the faster of the two
general algorithms until the direct kernel is blocked for speed. A measured choice (cost model,
calibration, benchmark mode) replaces this rule with the benchmark-suite issue.
"""

from __future__ import annotations


def choose(input_shape, weight_shape, stride, padding, dilation, groups) -> str:
    if tuple(weight_shape[2:]) == (1, 1):
        return "1x1"
    return "im2col"
