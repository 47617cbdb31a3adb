"""Layer by layer: the points of a graph, where a broken layer shows, and a run without it
untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import numpy_helper

from resnet_deploy.artifact.layers import for_model
from resnet_deploy.artifact.model_file import ModelFile
from resnet_deploy.checks.parity import make_inputs
from resnet_deploy.cli import main
from resnet_deploy.core.metrics import ToleranceOverrides
from resnet_deploy.runtime.layerwise import compare_layers, graph_points
from resnet_deploy.runtime.providers import SessionConfig
from resnet_deploy.runtime.runners import OrtRunner

from .conftest import CALIBRATION


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def scaled(source: Path, folder: Path, layer: str, factor: float = 1.3) -> Path:
    """A copy of ``source`` with the weights of one layer (found by its PyTorch name, as
    the exporter may rename a weight it folded BatchNorm into) scaled: one broken layer."""
    model = onnx.load(str(source))
    names = for_model(model, ModelFile.read(source).meta)
    node = next(n for n in model.graph.node if names.get(n.name) == layer)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor),
                                          init.name))
    path = folder / f"bad-{layer}.onnx"
    onnx.save(model, str(path))
    return path


def layerwise(tmp_path: Path, *args: object) -> tuple[Result, list[dict[str, Any]]]:
    """``parity ... --layerwise --json``: the result and each compared pair's report."""
    report = tmp_path / "lw.json"
    result = run("parity", *args, "--layerwise", "--json", report)
    assert "Traceback" not in result.output, result.output
    rows = json.loads(report.read_text())["results"] if report.exists() else []
    return result, [row["layerwise"] for row in rows]


def conv_modules(model_path: Path) -> list[str]:
    """The PyTorch name of every conv, and the fc, in forward order, from the module the
    model was exported from (its convs are declared in the order they run)."""
    from torch import nn

    from resnet_deploy.weights.checkpoints import load_model

    module, _ = load_model("random", num_classes=ModelFile.read(model_path).io.classes, seed=0)
    return [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_points_cover_every_conv_and_fc(random_onnx: Path) -> None:
    model = onnx.load(str(random_onnx))
    names = for_model(model, ModelFile.read(random_onnx).meta)
    points = graph_points(model, names).points
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [p.node for p in points if p.op == "Conv"] == convs
    assert points[-1].op == "Gemm" and points[-1].module == "fc"


def test_same_model_on_two_cpu_sessions_has_no_divergence(random_onnx: Path) -> None:
    """A provider pair at library level: the CPU with its graph optimisations (fusions,
    constant folding) against the CPU with none; every layer stays within FP32's rule."""
    file = ModelFile.read(random_onnx)
    inputs = make_inputs(file.spec(), images=CALIBRATION, random_count=None, limit=4)
    plain = OrtRunner(file, config=SessionConfig(optimize=False))
    [report] = compare_layers(plain, [(OrtRunner(file), "fp32")], inputs, 4,
                              ToleranceOverrides())
    assert not isinstance(report, str)
    assert report.images == 4 and report.first_divergence is None
    assert [row.layer for row in report.layers if row.op in ("Conv", "Gemm")] == \
        conv_modules(random_onnx)
    assert all(row.passes and row.max_abs_rel < 1e-4 for row in report.layers)


@pytest.mark.parametrize("layer", ["layer3.0.conv2", "fc"])
def test_a_scaled_layer_is_the_first_divergence(random_onnx: Path, tmp_path: Path,
                                                layer: str) -> None:
    bad = scaled(random_onnx, tmp_path, layer)
    result, [report] = layerwise(tmp_path, "--weights", "random", "--model", bad)
    assert result.exit_code == 1, result.output
    first = report["first_divergence"]
    assert first is not None and first["layer"] == layer and first["passes"] is False
    names = [row["layer"] for row in report["layers"]]
    at = names.index(layer)
    assert at > 0 and all(row["passes"] for row in report["layers"][:at])
    assert report["layers"][at]["max_abs_rel"] > 0.1
    assert f"first divergence: {layer} [" in result.output


def test_a_healthy_export_shows_no_divergence(random_onnx: Path, tmp_path: Path) -> None:
    result, [report] = layerwise(tmp_path, "--weights", "random", "--model", random_onnx,
                                 "--layerwise-images", "5")
    assert result.exit_code == 0, result.output
    assert report["first_divergence"] is None and report["images"] == 5
    assert [row["layer"] for row in report["layers"] if row["op"] in ("Conv", "Gemm")] == \
        conv_modules(random_onnx)
    assert all(row["passes"] for row in report["layers"])
    assert "first divergence: none, every layer passes" in result.output
    assert "on 5 inputs" in result.output


@pytest.fixture(scope="module")
def int8(random_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "random10.int8.onnx"
    result = run("quantize", "--model", random_onnx, "--calibration", CALIBRATION, "-o", path)
    assert result.exit_code == 0, result.output
    return path


def test_fp32_vs_int8_lists_every_conv_and_fc_with_the_error_each_adds(
        random_onnx: Path, int8: Path, tmp_path: Path) -> None:
    without = run("parity", "--weights", "random", "--model", int8, "--random", "8")
    result, [report] = layerwise(tmp_path, "--weights", "random", "--model", int8,
                                 "--random", "8")
    assert result.exit_code == without.exit_code, result.output  # information only
    layers = {row["layer"]: row for row in report["layers"]}
    for name in conv_modules(random_onnx):
        row = layers[name]
        assert row["max_abs_rel"] > 0 and 0 < row["worst_cosine"] < 1
        assert row["sqnr_db"] is not None and "added_db" in row
    assert report["tolerance"].startswith("cosine p1 >= 0.97")
    assert "where INT8 error enters" in result.output
    assert "run unfused" in result.output  # the note on fused kernels, once
    assert result.output.count("run unfused") == 1


def test_two_models_compared_by_their_common_points(random_onnx: Path, int8: Path,
                                                    tmp_path: Path) -> None:
    """FP32 model as the reference, INT8 the candidate: the points match by node name."""
    result, [report] = layerwise(tmp_path, "--model", random_onnx, "--model", int8,
                                 "--random", "4")
    assert result.exit_code in (0, 1)
    assert {row["layer"] for row in report["layers"]} >= set(conv_modules(random_onnx))
    assert report["skipped_points"] == 0


def test_a_static_batch_model_runs_layer_by_layer(static_onnx: Path, tmp_path: Path) -> None:
    result, [report] = layerwise(tmp_path, "--weights", "random", "--model", static_onnx,
                                 "--batch-size", "4", "--layerwise-images", "6")
    assert result.exit_code == 0, result.output
    assert report["images"] == 6 and report["first_divergence"] is None


def test_layers_that_fail_never_fail_a_pair_that_passes(random_onnx: Path,
                                                         tmp_path: Path) -> None:
    """Layerwise adds information only: with --atol just above the logits' error the pair
    passes, and stays a pass while the broken layer (larger error than the logits) fails."""
    bad = scaled(random_onnx, tmp_path, "layer3.0.conv2")
    report = tmp_path / "plain.json"
    assert run("parity", "--weights", "random", "--model", bad, "--json", report
               ).exit_code == 1
    atol = 1.01 * json.loads(report.read_text())["results"][0]["max_abs_diff"]
    result, [layers] = layerwise(tmp_path, "--weights", "random", "--model", bad,
                                 "--atol", f"{atol:.6g}", "--min-top1", "0")
    assert result.exit_code == 0, result.output
    assert layers["first_divergence"]["layer"] == "layer3.0.conv2"
    assert "parity: PASS" in result.output


def test_without_the_flag_no_hook_and_no_extra_output(
        random_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from resnet_deploy.runtime import runners

    sessions: list[object] = []
    real: Callable[..., Any] = runners.create_session

    def recording(model: Any, *args: Any, **kwargs: Any) -> Any:
        sessions.append(model)
        return real(model, *args, **kwargs)

    def no_hooks(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a forward hook was registered without --layerwise")

    monkeypatch.setattr(runners, "create_session", recording)
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", no_hooks)
    report = tmp_path / "p.json"
    result = run("parity", "--weights", "random", "--model", random_onnx, "--json", report)
    assert result.exit_code == 0, result.output
    assert sessions and not any(isinstance(model, bytes) for model in sessions)
    assert "layerwise" not in result.output
    assert "layerwise" not in json.loads(report.read_text())["results"][0]


@pytest.mark.parametrize("args, message", [
    (("--layerwise-images", "4"), "add --layerwise"),
    (("--layerwise", "--load-outputs", "GOLDEN"), "drop --load-outputs"),
    (("--layerwise", "--layerwise-images", "0"), "--layerwise-images"),
])
def test_layerwise_usage_errors_exit_2(random_onnx: Path, tmp_path: Path,
                                       args: tuple[str, ...], message: str) -> None:
    golden = tmp_path / "golden.npz"
    assert run("parity", "--model", random_onnx, "--random", "2", "--save-outputs", golden
               ).exit_code == 0
    argv = [str(golden) if a == "GOLDEN" else a for a in args]
    result = run("parity", "--model", random_onnx, "--random", "2", *argv)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_graph_with_unnamed_nodes(random_onnx: Path, tmp_path: Path) -> None:
    """Nodes left unnamed, as some tools make them, so no layer name applies: PyTorch has
    nothing to match (said, and parity's verdict stands); the named copy of the same graph
    matches every point by tensor and lends its layer names."""
    model = onnx.load(str(random_onnx))
    for node in model.graph.node:
        node.name = ""
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(model, str(unnamed))
    size = ("--random", "4")
    result, [reason] = layerwise(tmp_path, "--weights", "random", "--model", unnamed, *size)
    assert result.exit_code == 0, result.output
    assert "no layer names" in reason["unavailable"] and "--reference" in result.output
    result, [report] = layerwise(tmp_path, "--reference", f"{random_onnx}@cpu", "--model",
                                 unnamed, *size)
    assert result.exit_code == 0, result.output
    assert report["skipped_points"] == 0 and report["first_divergence"] is None
    assert [row["layer"] for row in report["layers"] if row["op"] in ("Conv", "Gemm")] == \
        conv_modules(random_onnx)
