"""ONNX export of converted models: each channelconv forward op becomes a standard ONNX ``Conv``.

    torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=channelconv.onnx.translation_table())

The dynamo exporter has no registry for custom ops other than this table; what conv2d does before
its op (the padding modes' F.pad, an even kernel's 'same', an unbatched input) is ordinary aten
and exports as such. Needs onnxscript (imported when the table is made)."""

from __future__ import annotations

from ._ops import OPS


def translation_table() -> dict:
    """``{channelconv forward op: its ONNX translation}`` for ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``."""
    from onnxscript import opset18 as op

    def conv(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, workspace_limit=0):
        pads = [padding[0], padding[1], padding[0], padding[1]]  # (begin_h, begin_w, end_h, end_w)
        if bias is None:
            return op.Conv(input, weight, strides=stride, pads=pads, dilations=dilation, group=groups)
        return op.Conv(input, weight, bias, strides=stride, pads=pads, dilations=dilation, group=groups)

    return {ops.forward: conv for ops in OPS.values()}
