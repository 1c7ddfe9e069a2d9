"""channelconv: multi-input, multi-output channel 2-D cross-correlation (what F.conv2d computes),
three ways — direct, im2col + GEMM, 1x1 as GEMM — with its own C++ (and CUDA) kernels."""

from . import onnx, reference
from . import _vmap  # noqa: F401  (registers the batching rules on the ops; autograd is C++'s)
from ._shapes import ALGORITHMS
from .functional import conv2d
from .modules import Conv2d, convert, revert
from .cost import cost
from .measured import get_benchmark_mode, set_benchmark_mode
from .select import choose, explain
from .workspace import get_workspace_limit, set_workspace_limit

__all__ = [
    "ALGORITHMS",
    "Conv2d",
    "choose",
    "conv2d",
    "cost",
    "convert",
    "explain",
    "get_benchmark_mode",
    "get_workspace_limit",
    "reference",
    "revert",
    "set_benchmark_mode",
    "set_workspace_limit",
]
__version__ = "0.1.0"
