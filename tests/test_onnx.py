"""ONNX: a converted model exports (torch.onnx.export, dynamo) to standard Conv nodes through
channelconv.onnx.translation_table(), and onnxruntime computes what eager computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import channelconv
import channelconv.onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.c = nn.Conv2d(8, 6, 1)
        self.d = nn.Conv2d(6, 4, (2, 3), padding="same", dilation=2)

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("algorithm", ["auto", "direct", "im2col"])
def test_converted_model_exports_standard_conv_nodes(algorithm):
    torch.manual_seed(0)
    model = channelconv.convert(Net(), algorithm=algorithm).eval()
    x = torch.randn(2, 3, 11, 10)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                custom_translation_table=channelconv.onnx.translation_table())
    proto = program.model_proto
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("Conv") == 4 and not any(node.domain.startswith("channelconv") for node in proto.graph.node)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString())
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-5
