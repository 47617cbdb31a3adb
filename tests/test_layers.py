"""Layer names: ONNX nodes named after the PyTorch module they came from, from the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from resnet_deploy.artifact.layers import derive, display, for_model, resolve
from resnet_deploy.artifact.metadata import ModelMetadata
from resnet_deploy.data.spec import PreprocessSpec


def _graph(nodes: list[onnx.NodeProto], initializers: list[str]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), name)
             for name in initializers]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 1, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 1, 1])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def test_weight_initializers_name_their_module() -> None:
    model = _graph([
        helper.make_node("Conv", ["x", "encoder.stem.weight"], ["a"], name="node_Conv_7"),
        helper.make_node("Relu", ["a"], ["b"], name="node_relu"),
        helper.make_node("Gemm", ["b", "head.fc.weight", "head.fc.bias"], ["y"],
                         name="node_linear"),
    ], ["encoder.stem.weight", "head.fc.weight", "head.fc.bias"])
    assert derive(model) == {"node_Conv_7": "encoder.stem", "node_linear": "head.fc"}


def test_dynamo_scopes_and_torchscript_names() -> None:
    relu = helper.make_node("Relu", ["x"], ["a"], name="node_relu_3")
    entry = relu.metadata_props.add()
    entry.key = "pkg.torch.onnx.name_scopes"
    entry.value = "['', 'blocks', 'blocks.1', 'blocks.1.act', 'relu_3']"
    conv = helper.make_node("Conv", ["a", "onnx::Conv_193"], ["b"],
                            name="/layer2/layer2.0/downsample/downsample.0/Conv")
    add = helper.make_node("Add", ["b", "a"], ["y"], name="/layer2/layer2.0/Add")
    model = _graph([relu, conv, add], ["onnx::Conv_193"])
    assert derive(model) == {"node_relu_3": "blocks.1.act",
                             "/layer2/layer2.0/downsample/downsample.0/Conv":
                                 "layer2.0.downsample.0",
                             "/layer2/layer2.0/Add": "layer2.0"}


def test_recorded_names_win_and_stale_ones_are_dropped() -> None:
    model = _graph([helper.make_node("Conv", ["x", "w"], ["y"], name="n1")], ["w"])
    meta = ModelMetadata(PreprocessSpec.create(32), None, {}, "dynamo", 18, {},
                         extra={"layers": {"n1": "conv1", "gone": "layer9"}})
    assert for_model(model, meta) == {"n1": "conv1"}
    assert for_model(model, None) == {}


def test_display_and_resolve() -> None:
    names = {"node_Conv_292": "conv1", "r1": "layer1.0.relu", "r2": "layer1.0.relu"}
    nodes = ["node_Conv_292", "r1", "r2", "node_mean"]
    assert display("node_Conv_292", names) == "conv1 (node_Conv_292)"
    assert display("node_mean", names) == "node_mean"
    assert resolve(["conv1", "node_mean"], nodes, names) == (["node_Conv_292", "node_mean"], [])
    assert resolve(["layer1.0.relu"], nodes, names) == (["r1", "r2"], [])
    assert resolve(["node_Conv_292", "conv1", "layer9"], nodes, names) == \
        (["node_Conv_292"], ["layer9"])
