"""The textbook's cost quantities of one convolution, from shapes alone.

``cost(input_shape, weight_shape, stride, padding, dilation, groups, dtype)`` answers the section's
exercises for a concrete layer: how many multiplications and additions the forward and the
backward pass take, how much memory each needs, how many bytes must move at least once, and how
large im2col's column buffer gets. It also describes how each of channelconv's algorithms would
run the layer (``Cost.plans``: the GEMM shapes, the column elements written, the workspace), which
is what 'auto' (select.py) feeds its time model.

Conventions
-----------
* Multiply-add (MAC) convention for additions: every product is added into an accumulator that
  starts from zero (or from the bias), so a pass does as many additions as multiplications. The
  forward pass of a layer is ``N * C_o * H_o * W_o * (C_i / g) * k_h * k_w`` multiplications and as
  many additions; their sum is the FLOP count ``torch.utils.flop_counter.FlopCounterMode`` reports
  for ``F.conv2d`` (2 per MAC), and it is the count behind the textbook's "over 53 billion
  operations" for the 256x256, 5x5, 128 -> 128 layer (2 x 26.8e9). (Counting only the additions
  between products would give ``C_i/g * k_h * k_w - 1`` per output instead of ``C_i/g * k_h * k_w``:
  ``forward_additions - N * C_o * H_o * W_o``.) Taps that fall in the zero padding are counted,
  as every implementation that pads performs them.
* Backward = input gradient + weight gradient, each exactly as many MACs as the forward pass; with
  a bias, its gradient adds ``N * C_o * H_o * W_o`` additions (a sum over the output gradient).
* Memory footprint: the bytes of the tensors a pass reads or writes (forward: input, weight, bias,
  output; backward: input, weight, output gradient, input gradient, weight gradient, bias
  gradient), not counting an algorithm's workspace, which is reported separately.
* Bytes moved: each tensor read or written once, the least traffic any algorithm can have. For a
  single convolution this equals the footprint; an algorithm that unrolls moves its column
  elements in addition (``AlgorithmPlan.column_bytes``: written once, read once by the GEMM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ._shapes import pair
from .workspace import get_workspace_limit

# The column buffer im2col prefers (csrc/conv_params.cpp, plan_bands): within a core's L2 for GEMMs
# with fewer than WIDE_GEMM_CHANNELS output channels per group, larger for wider ones.
NARROW_COLUMN_BYTES = 2 << 20
WIDE_COLUMN_BYTES = 8 << 20
WIDE_GEMM_CHANNELS = 128
# Side-by-side bands (CPU; csrc/conv_params.h, BandPlan): a small map's whole images in one column
# matrix and one GEMM per band, when over 10 % of PIXEL_VECTOR-wide rows would idle per image and at
# least SIDE_BY_SIDE_IMAGES images fit with their scratch of outputs (or output gradients).
PIXEL_VECTOR = 16
SIDE_BY_SIDE_IMAGES = 4


def side_by_side_pays(pixels: int) -> bool:
    lanes = -(-pixels // PIXEL_VECTOR) * PIXEL_VECTOR
    return pixels > 0 and (lanes - pixels) * 10 > pixels


@dataclass(frozen=True)
class AlgorithmPlan:
    """How one algorithm runs a layer: what the time model of 'auto' reads."""

    algorithm: str
    applicable: bool
    why_not: str = ""  # when not applicable
    workspace_bytes: int = 0
    side_by_side: bool = False  # the band's images side by side, one GEMM per band (see above)
    # Lowered algorithms: one batched GEMM (over the groups) per image and band of output rows,
    # each (gemm_m x gemm_k) . (gemm_k x gemm_n) per group; the last band may be shorter.
    gemm_m: int = 0
    gemm_n: int = 0  # pixels of a full band
    gemm_k: int = 0
    gemm_calls: int = 0  # batched GEMM calls: (images / band_images) x bands
    band_rows: int = 0
    band_images: int = 1  # images per batched GEMM call (whole images only)
    column_elements: int = 0  # elements the unrolling writes in one forward pass (0: reads the input as is)
    column_bytes: int = 0
    # Direct: the innermost loop runs along an output row, once per (image, out channel, in channel, tap, row).
    inner_loops: int = 0
    planes: int = 0  # (image, output channel) planes


@dataclass(frozen=True)
class Cost:
    input_shape: tuple
    weight_shape: tuple
    output_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    dtype: torch.dtype
    bias: bool
    element_size: int
    forward_multiplications: int
    forward_additions: int
    backward_input_multiplications: int
    backward_weight_multiplications: int
    backward_multiplications: int
    backward_additions: int
    forward_memory_bytes: int
    backward_memory_bytes: int
    forward_bytes_moved: int
    backward_bytes_moved: int
    im2col_workspace_bytes: int | None  # None: im2col refuses (one output row exceeds the workspace limit)
    workspace_limit: int
    plans: dict = field(repr=False, default_factory=dict)

    @property
    def macs(self) -> int:
        """Multiply-adds of the forward pass."""
        return self.forward_multiplications

    @property
    def forward_operations(self) -> int:
        return self.forward_multiplications + self.forward_additions

    @property
    def backward_operations(self) -> int:
        return self.backward_multiplications + self.backward_additions

    @property
    def training_operations(self) -> int:
        return self.forward_operations + self.backward_operations

    @property
    def forward_flops(self) -> int:
        """FLOPs of the forward pass as FlopCounterMode counts them (2 per multiply-add, bias ignored)."""
        return 2 * self.forward_multiplications

    @property
    def backward_flops(self) -> int:
        """FLOPs of the input and weight gradients (2 per multiply-add, bias gradient ignored)."""
        return 2 * self.backward_multiplications

    @property
    def training_flops(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def arithmetic_intensity(self) -> float:
        """Forward FLOPs per compulsory byte moved."""
        return self.forward_flops / self.forward_bytes_moved if self.forward_bytes_moved else 0.0

    def workspace(self, algorithm: str) -> int | None:
        plan = self.plans[algorithm]
        return plan.workspace_bytes if plan.applicable else None

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("plans", "dtype")}
        out["dtype"] = str(self.dtype).replace("torch.", "")
        for name in ("forward_operations", "backward_operations", "training_operations", "forward_flops",
                     "backward_flops", "training_flops", "arithmetic_intensity"):
            out[name] = getattr(self, name)
        out["workspace_bytes"] = {a: self.workspace(a) for a in self.plans}
        return out


def explicit_padding(padding, input_hw, weight_hw, stride, dilation) -> tuple[tuple, tuple]:
    """(padding pair, effective input (H, W)) the way channelconv.conv2d resolves 'same' and
    'valid': 'same' with an even (dilated) kernel adds the extra row/column at the bottom/right."""
    if not isinstance(padding, str):
        return pair(padding, "padding"), tuple(input_hw)
    if padding == "valid":
        return (0, 0), tuple(input_hw)
    if padding != "same":
        raise ValueError(f"invalid padding string {padding!r}; expected one of ('valid', 'same')")
    if stride != (1, 1):
        raise ValueError(f"padding='same' is not supported for strided convolutions, but got stride={stride}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight_hw)]
    before = tuple(t // 2 for t in totals)
    return before, tuple(i + t - 2 * b for i, t, b in zip(input_hw, totals, before))


def _out(in_size, kernel, stride, padding, dilation) -> int:
    return (in_size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _lowered_plan(algorithm, n, c_in, c_out, h_o, w_o, kh, kw, groups, elem, limit, reads_input,
                  device) -> AlgorithmPlan:
    m, k = c_out // groups, (c_in // groups) * kh * kw
    if reads_input:  # 1x1, stride 1, no padding: the image is the column matrix; one group: one GEMM call
        return AlgorithmPlan(algorithm, True, gemm_m=m, gemm_n=h_o * w_o, gemm_k=k, gemm_calls=1 if groups == 1 else n,
                             band_rows=h_o, band_images=max(n, 1) if groups == 1 else 1)
    bytes_per_row = c_in * kh * kw * w_o * elem
    if bytes_per_row > limit:
        return AlgorithmPlan(algorithm, False, why_not=(
            f"one output row's columns ({bytes_per_row} bytes) exceed the workspace limit ({limit} bytes)"))
    # The band plan of csrc/conv_params.cpp (plan_bands): rows of one image, or whole images.
    budget = min(limit, NARROW_COLUMN_BYTES if m < WIDE_GEMM_CHANNELS else WIDE_COLUMN_BYTES)
    rows = max(1, min(h_o, budget // bytes_per_row)) if bytes_per_row else max(h_o, 1)
    whole_images = rows == h_o and groups == 1 and bytes_per_row
    images = max(1, min(n, budget // (bytes_per_row * h_o))) if whole_images else 1
    scratch_per_image = c_out * h_o * w_o * elem
    side_by_side = False
    if whole_images and device == "cpu" and side_by_side_pays(h_o * w_o):
        wide_images = min(n, budget // (bytes_per_row * h_o + scratch_per_image))
        if wide_images >= SIDE_BY_SIDE_IMAGES:
            images, side_by_side = wide_images, True
    bands = math.ceil(h_o / rows)
    band_bytes = images * (c_in * kh * kw * rows * w_o * elem + (scratch_per_image if side_by_side else 0))
    workspace = band_bytes if n > 0 else 0
    columns = n * c_in * kh * kw * h_o * w_o
    return AlgorithmPlan(algorithm, True, workspace_bytes=workspace, side_by_side=side_by_side, gemm_m=m,
                         gemm_n=rows * w_o * (images if side_by_side else 1), gemm_k=k,
                         gemm_calls=math.ceil(n / images) * bands, band_rows=rows, band_images=images,
                         column_elements=columns, column_bytes=columns * elem)


def cost(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, dtype=torch.float32, *,
         bias: bool = False, workspace_limit: int | None = None, device: str = "cpu") -> Cost:
    """The textbook's cost quantities of ``F.conv2d(input, weight, bias, stride, padding, dilation,
    groups)`` for an input of ``input_shape`` (N, C_i, H, W) or (C_i, H, W) and a weight of
    ``weight_shape`` (C_o, C_i / groups, k_h, k_w); see the module docstring for the conventions.
    ``workspace_limit`` defaults to ``channelconv.get_workspace_limit()``; ``device`` ('cpu' or
    'cuda') is where the algorithms would run: their plans differ there (side-by-side bands)."""
    input_shape, weight_shape = tuple(int(v) for v in input_shape), tuple(int(v) for v in weight_shape)
    if len(input_shape) == 3:
        input_shape = (1, *input_shape)
    if len(input_shape) != 4 or len(weight_shape) != 4:
        raise ValueError(f"expected a 4-D (or unbatched 3-D) input shape and a 4-D weight shape, but got "
                         f"input_shape={input_shape} and weight_shape={weight_shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"expected groups to be a positive int, but got groups={groups!r}")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    n, c_in, h, w = input_shape
    c_out, c_per_group, kh, kw = weight_shape
    if c_in != c_per_group * groups or c_out % groups:
        raise ValueError(f"Given groups={groups}, weight of size {list(weight_shape)} does not fit an input of "
                         f"size {list(input_shape)}: expected {c_per_group * groups} input channels and C_out "
                         f"divisible by {groups}")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"expected positive stride and dilation, but got stride={stride}, dilation={dilation}")
    padding, (h, w) = explicit_padding(padding, (h, w), (kh, kw), stride, dilation)
    if min(padding) < 0:
        raise ValueError(f"expected non-negative padding, but got padding={padding}")
    h_o, w_o = (_out(h, kh, stride[0], padding[0], dilation[0]), _out(w, kw, stride[1], padding[1], dilation[1]))
    if h_o < 1 or w_o < 1:
        raise ValueError(f"the (dilated) kernel {kh}x{kw} does not fit the padded input {h}x{w}")
    elem = dtype.itemsize
    limit = get_workspace_limit() if workspace_limit is None else int(workspace_limit)

    macs = n * c_out * h_o * w_o * c_per_group * kh * kw
    outputs = n * c_out * h_o * w_o
    x_el, w_el, y_el, b_el = n * c_in * h * w, weight_shape[0] * c_per_group * kh * kw, outputs, c_out * bias
    forward_memory = (x_el + w_el + b_el + y_el) * elem
    backward_memory = (2 * x_el + 2 * w_el + y_el + 2 * b_el) * elem  # x, w, dy, dx, dw (+ b, db)

    reads_input = (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0)
    plans = {
        "direct": AlgorithmPlan("direct", True, inner_loops=n * c_out * c_per_group * kh * kw * h_o,
                                planes=n * c_out),
        # A 1x1, stride-1, unpadded kernel's unrolling is the identity: both lowerings read the input as it is.
        "im2col": _lowered_plan("im2col", n, c_in, c_out, h_o, w_o, kh, kw, groups, elem, limit, reads_input,
                                device),
    }
    if (kh, kw) == (1, 1):
        plans["1x1"] = _lowered_plan("1x1", n, c_in, c_out, h_o, w_o, 1, 1, groups, elem, limit, reads_input, device)
    else:
        plans["1x1"] = AlgorithmPlan("1x1", False, why_not=f"'1x1' accepts only 1x1 kernels, not {kh}x{kw}")
    im2col = plans["im2col"]
    return Cost(
        input_shape=input_shape, weight_shape=weight_shape, output_shape=(n, c_out, h_o, w_o), stride=stride,
        padding=padding, dilation=dilation, groups=groups, dtype=dtype, bias=bool(bias), element_size=elem,
        forward_multiplications=macs, forward_additions=macs,
        backward_input_multiplications=macs, backward_weight_multiplications=macs,
        backward_multiplications=2 * macs, backward_additions=2 * macs + (outputs if bias else 0),
        forward_memory_bytes=forward_memory, backward_memory_bytes=backward_memory,
        forward_bytes_moved=forward_memory, backward_bytes_moved=backward_memory,
        im2col_workspace_bytes=im2col.workspace_bytes if im2col.applicable else None,
        workspace_limit=limit, plans=plans,
    )
