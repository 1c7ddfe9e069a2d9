"""The textbook's cost quantities of one convolution, from shapes alone.

``cost(input_shape, weight_shape, stride, padding, dilation, groups, dtype)`` answers the section's
exercises for a concrete layer: how many multiplications and additions the forward and the
backward pass take, how much memory each needs, how many bytes must move at least once, and how
large im2col's column buffer gets. It also says how each of channelconv's algorithms runs the
layer (``Cost.plans``: bands, GEMM shapes, column elements, workspace, the direct kernel's tiles and
tasks per pass). Those plans are the kernels' own, read from C++ (csrc/plan.h, through the
channelconv::_plan op); 'auto''s time model (timemodel.py) counts its features from them.

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

import functools
from dataclasses import dataclass, field

import torch

from ._shapes import ALGORITHMS, output_size, pair, resolve_padding
from .workspace import get_workspace_limit

# The direct algorithm plans each pass apart (the lowered ones run one band plan in all three).
PASSES = ("forward", "input_grad", "weight_grad")
BACKWARD = PASSES[1:]


@dataclass(frozen=True)
class AlgorithmPlan:
    """How one algorithm runs a layer, as its C++ plan says (csrc/plan.h)."""

    algorithm: str
    applicable: bool
    why_not: str = ""  # when not applicable: the op's own error message
    workspace_bytes: int = 0
    side_by_side: bool = False  # the band's images side by side, one GEMM per band
    nhwc: bool = False  # the CPU's channels_last driver: a row of columns per output pixel (csrc/plan.h)
    # Lowered algorithms: gemm_calls batched GEMMs in the forward pass, each (gemm_m x gemm_k) .
    # (gemm_k x gemm_n) per group, over band_images images and band_rows output rows (the last band
    # may be shorter).
    gemm_m: int = 0
    gemm_n: int = 0
    gemm_k: int = 0
    gemm_calls: int = 0
    band_rows: int = 0
    band_images: int = 1
    column_elements: int = 0  # elements the unrolling writes in one pass (0: reads the input as is)
    column_bytes: int = 0
    # Direct: the plan's counts per pass (PASSES), keys as documented in csrc/plan_op.cpp.
    passes: dict = field(default_factory=dict)


def _plan_op(algorithm, which, shape_args, dtype, device, limit, threads, channels_last) -> dict:
    input_shape, weight_shape, stride, padding, dilation, groups = shape_args
    with torch._C._DisableFuncTorch():  # ints in, ints out: nothing for a torch.func transform (and no Dict rule)
        return dict(torch.ops.channelconv._plan(algorithm, which, list(input_shape), list(weight_shape), list(stride),
                                                list(padding), list(dilation), groups, dtype, device, limit,
                                                threads, channels_last))


def _plans(shape_args, dtype, device, limit, threads, channels_last) -> dict:
    """Every algorithm's plan; the op rejects bad arguments with its own (F.conv2d's) message."""
    plan_op = functools.partial(_plan_op, shape_args=shape_args, dtype=dtype, device=device, limit=limit,
                                threads=threads, channels_last=channels_last)
    try:
        direct = {which: plan_op("direct", which) for which in PASSES}
    except RuntimeError as e:  # a shape the op rejects: cost() reports bad arguments as ValueError
        raise ValueError(str(e)) from None
    plans = {"direct": AlgorithmPlan("direct", True, passes=direct)}
    for algorithm in ALGORITHMS[1:]:
        try:
            p = plan_op(algorithm, "forward")
        except (RuntimeError, ValueError) as e:  # what this algorithm refuses ('1x1' on a 3x3 kernel, a limit)
            plans[algorithm] = AlgorithmPlan(algorithm, False, why_not=str(e).split("\n")[0])
            continue
        plans[algorithm] = AlgorithmPlan(
            algorithm, True, workspace_bytes=p["workspace_bytes"], side_by_side=bool(p["side_by_side"]), nhwc=bool(p["nhwc"]),
            gemm_m=p["gemm_m"], gemm_n=p["gemm_n"], gemm_k=p["gemm_k"], gemm_calls=p["gemm_calls"],
            band_rows=p["rows"], band_images=p["images"], column_elements=p["column_elements"],
            column_bytes=p["column_elements"] * dtype.itemsize)
    return plans


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
    channels_last: bool = False  # priced as NHWC: the kernels see its input or output so (csrc/plan.h, layer_sees_nhwc)
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


def cost(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, dtype=torch.float32, *,
         bias: bool = False, workspace_limit: int | None = None, device: str = "cpu",
         threads: int | None = None, memory_format: torch.memory_format = torch.contiguous_format) -> Cost:
    """The textbook's cost quantities of ``F.conv2d(input, weight, bias, stride, padding, dilation,
    groups)`` for an input of ``input_shape`` (N, C_i, H, W) or (C_i, H, W) and a weight of
    ``weight_shape`` (C_o, C_i / groups, k_h, k_w); see the module docstring for the conventions.
    ``workspace_limit`` defaults to ``channelconv.get_workspace_limit()``; ``device`` ('cpu' or
    'cuda') and ``threads`` (default torch's) are where the algorithms would run: their plans
    depend on both (side-by-side bands on the CPU, tasks per thread). ``memory_format``: the
    input's, ``torch.contiguous_format`` or ``torch.channels_last`` (the CPU's im2col and 1x1 then
    run their NHWC driver, and 'auto' reads that layout's calibration)."""
    input_shape, weight_shape = tuple(int(v) for v in input_shape), tuple(int(v) for v in weight_shape)
    if len(input_shape) == 3:
        input_shape = (1, *input_shape)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise ValueError(f"expected groups to be an int, but got groups={groups!r}")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    padding, extra = resolve_padding(padding, weight_shape, stride, dilation)
    if len(input_shape) == 4:  # (the op names a shape of another rank)
        input_shape = (*input_shape[:2], input_shape[2] + extra[0], input_shape[3] + extra[1])
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"expected memory_format to be torch.contiguous_format or torch.channels_last, but got "
                         f"memory_format={memory_format}")
    limit = get_workspace_limit() if workspace_limit is None else int(workspace_limit)
    plans = _plans((input_shape, weight_shape, stride, padding, dilation, groups), dtype, torch.device(device), limit,
                   threads or torch.get_num_threads(), memory_format == torch.channels_last)

    n, c_in, h, w = input_shape
    c_out, c_per_group, kh, kw = weight_shape
    h_o, w_o = (output_size(h, kh, stride[0], padding[0], dilation[0]),
                output_size(w, kw, stride[1], padding[1], dilation[1]))
    elem = dtype.itemsize
    macs = n * c_out * h_o * w_o * c_per_group * kh * kw
    outputs = n * c_out * h_o * w_o
    x_el, w_el, y_el, b_el = n * c_in * h * w, c_out * c_per_group * kh * kw, outputs, c_out * bias
    forward_memory = (x_el + w_el + b_el + y_el) * elem
    backward_memory = (2 * x_el + 2 * w_el + y_el + 2 * b_el) * elem  # x, w, dy, dx, dw (+ b, db)
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
        workspace_limit=limit, channels_last=bool(plans["direct"].passes["forward"]["channels_last"]), plans=plans,
    )
