"""Layer by layer: the points of a graph, and a pair that agrees shows no divergence."""

from __future__ import annotations

from pathlib import Path

from resnet_deploy.artifact.model_file import ModelFile
from resnet_deploy.checks.layerwise import compare_layers, graph_points
from resnet_deploy.checks.parity import make_inputs
from resnet_deploy.core.metrics import ToleranceOverrides
from resnet_deploy.runtime.runners import OrtRunner

from .conftest import CALIBRATION


def test_points_cover_every_conv_and_fc(random_onnx: Path) -> None:
    import onnx

    from resnet_deploy.artifact.layers import for_model

    model = onnx.load(str(random_onnx))
    names = for_model(model, ModelFile.read(random_onnx).meta)
    points = graph_points(model, names).points
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [p.node for p in points if p.op == "Conv"] == convs
    assert points[-1].op == "Gemm" and points[-1].module == "fc"


def test_same_model_on_two_cpu_sessions_has_no_divergence(random_onnx: Path) -> None:
    file = ModelFile.read(random_onnx)
    inputs = make_inputs(file.spec(), images=CALIBRATION, random_count=None, limit=4)
    [report] = compare_layers(OrtRunner(file), [(OrtRunner(file), "fp32")], inputs, 4,
                              ToleranceOverrides())
    assert not isinstance(report, str)
    assert report.images == 4 and report.layers and report.first_divergence is None
    assert all(row.passes for row in report.layers)
