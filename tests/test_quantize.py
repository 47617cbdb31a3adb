"""INT8 quantization: honest calibrators, metadata, targets, the check and the fallback."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from resnet_deploy.artifact.metadata import read_metadata
from resnet_deploy.artifact.model_file import model_precision
from resnet_deploy.cli import main
from resnet_deploy.convert.quantize.calibrate import ImageFolderReader, calibrate
from resnet_deploy.convert.quantize.prepare import preprocess_for_quantization
from resnet_deploy.convert.quantize.publish import default_output, quantize
from resnet_deploy.convert.quantize.recipe import QuantizeOptions
from resnet_deploy.core.files import file_sha256
from resnet_deploy.data.images import list_images

from .conftest import CALIBRATION

PHOTOS = len(list_images(CALIBRATION))  # the shipped photos (17)


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def quantized(fp32: Path) -> tuple[Path, dict]:
    """One default CLI run: 8 of the shipped photos calibrate, the rest are held out."""
    report = fp32.parent / "q.json"
    result = _invoke("quantize", "--model", fp32, "--calibration", CALIBRATION,
                     "--num-samples", 8, "--json", report)
    assert result.exit_code == 0, result.output
    return fp32.parent / "resnet18.int8.onnx", json.loads(report.read_text())


@pytest.fixture(scope="module")
def prepared(fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pre = tmp_path_factory.mktemp("pre") / "pre.onnx"
    preprocess_for_quantization(fp32, pre)
    return pre


def _ranges(prepared: Path, fp32: Path, tmp_path: Path, **options: object) -> dict:
    settings = QuantizeOptions(**options).settings()
    reader = ImageFolderReader.for_model(fp32, CALIBRATION, num_samples=8)
    data = calibrate(prepared, reader, settings, tmp_path)
    return {name: (float(np.ravel(td.range_value[0])[0]), float(np.ravel(td.range_value[1])[0]))
            for name, td in data.data.items()}


def test_default_output_name_and_int8_graph(quantized: tuple[Path, dict], fp32: Path) -> None:
    output, report = quantized
    assert default_output(Path("a/resnet18.onnx")) == Path("a/resnet18.int8.onnx")
    assert output.is_file() and report["output"] == str(output)
    model = onnx.load(str(output))
    assert model_precision(model) == "int8"
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert 0.2 < report["size_ratio"] < 0.3
    assert report["size_ratio"] == pytest.approx(output.stat().st_size / fp32.stat().st_size,
                                                 abs=1e-3)
    assert not list(fp32.parent.glob(".resnet18*"))  # no temp files left behind


def test_output_metadata_records_quantization(quantized: tuple[Path, dict], fp32: Path) -> None:
    output, report = quantized
    meta, source = read_metadata(output), read_metadata(fp32)
    assert meta is not None and source is not None
    assert meta.preprocess == source.preprocess and meta.labels == source.labels
    assert meta.weights == source.weights
    assert meta.extra["layers"] == source.extra["layers"]  # layer names survive quantization
    q = meta.quantization
    assert q["fp32_sha256"] == file_sha256(fp32)
    assert q["method"] == "minmax" and q["format"] == "QDQ" and q["target"] == "cpu"
    assert (q["activation_type"], q["weight_type"], q["per_channel"]) == ("uint8", "int8", True)
    assert q["num_samples"] == 8 and q["excluded"] == [] and q["fallback"] == []
    assert len(q["calibration_sha256"]) == 64
    assert q["calibration_sha256"] == report["calibration_sha256"]
    # uint8 activations: the activation QuantizeLinear zero points are uint8.
    zero_points = _activation_zero_points(onnx.load(str(output)))
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)


def test_post_quantize_check_reports_numbers(quantized: tuple[Path, dict]) -> None:
    _, report = quantized
    check = report["check"]
    assert check["n"] == PHOTOS - 8 == report["held_out"]  # the photos calibration did not use
    for key in ("cosine_min", "cosine_p1", "cosine_mean", "max_abs_diff", "top1_agreement",
                "top5_agreement"):
        assert isinstance(check[key], float), key
    # The verdict is the INT8 tolerance applied to these figures, and it passed.
    assert check["passed"] is True and check["failures"] == []
    assert check["tolerance"] == "cosine p1 >= 0.97, top-1 >= 97%"
    assert check["cosine_p1"] >= 0.97 and check["top1_agreement"] >= 0.97
    assert check["cosine_min"] <= check["cosine_p1"] <= check["cosine_mean"] <= 1.0 + 1e-9
    assert check["would_pass"]["min_top1"] == check["top1_agreement"]
    assert report["num_calibration"] == 8 and report["accuracy"] is None


def test_cli_prints_the_check(fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    result = _invoke("quantize", "--model", fp32, "--calibration", CALIBRATION,
                     "--num-samples", 4, "--method", "percentile", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"images: calibration 4 (percentile), check {PHOTOS - 4}" in result.output
    assert f"check, FP32 vs INT8 on {PHOTOS - 4} images" in result.output
    assert "matches on top-1" in result.output and "of FP32" in result.output
    assert "columns: matches on top-1 = images where both pick the same class" in result.output
    assert read_metadata(out).quantization["calibrator"]["percentile"] == 99.999


def test_entropy_ranges_differ_from_minmax(prepared: Path, fp32: Path, tmp_path: Path) -> None:
    minmax = _ranges(prepared, fp32, tmp_path, method="minmax",
                     calibrator_options={"moving_average": False})
    # 512 bins instead of 2048 keeps the KL search quick; 128 bins would leave no search.
    entropy = _ranges(prepared, fp32, tmp_path, method="entropy",
                      calibrator_options={"num_bins": 512})
    assert minmax.keys() == entropy.keys()
    narrower = [n for n in minmax if entropy[n][1] < minmax[n][1] - 1e-6]
    # Honest entropy clips outliers on many tensors; quantize_static's 128 -> 128 bins
    # leave the full range as the only candidate, i.e. none would be narrower.
    assert len(narrower) > len(minmax) // 4
    assert all(entropy[n][1] <= minmax[n][1] + 1e-6 for n in minmax)


def test_percentile_is_honoured(prepared: Path, fp32: Path, tmp_path: Path) -> None:
    loose = _ranges(prepared, fp32, tmp_path, method="percentile",
                    calibrator_options={"percentile": 99.999})
    tight = _ranges(prepared, fp32, tmp_path, method="percentile",
                    calibrator_options={"percentile": 99.0})
    assert loose.keys() == tight.keys()
    assert all(tight[n][1] <= loose[n][1] + 1e-6 for n in loose)
    assert sum(tight[n][1] < loose[n][1] * 0.95 for n in loose) > len(loose) // 2


def test_target_tensorrt_is_symmetric_int8(fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "trt.onnx"
    result = quantize(fp32, CALIBRATION, out,
                      options=QuantizeOptions(target="tensorrt", num_samples=256))
    q = read_metadata(out).quantization
    assert (q["activation_type"], q["weight_type"], q["target"]) == ("int8", "int8", "tensorrt")
    assert q["activation_symmetric"] is True and q["weight_symmetric"] is True
    zero_points = _activation_zero_points(onnx.load(str(out)))
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # Calibration would use every photo, so 8 are held back for the check, which simulates
    # TensorRT's arithmetic on the CPU and says that it is not TensorRT.
    assert result.num_calibration == PHOTOS - 8 and result.held_out == 8
    assert result.check is not None and result.check.comparison.n == 8
    assert any("not TensorRT" in note for note in result.notes)
    # Explicit flags override the target's defaults.
    assert QuantizeOptions(target="tensorrt", activation_type="uint8").settings() \
        .activation_type == "uint8"
    assert QuantizeOptions(per_channel=False).settings().per_channel is False


def test_accuracy_aware_fallback_is_reported_and_capped(fp32: Path, image_folder: Path,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from resnet_deploy.cli.quantize import render_quantize
    from resnet_deploy.core.errors import CheckFailed

    out = tmp_path / "aa.onnx"
    # A negative drop is impossible to meet (the CLI takes 0-100, so the library is called):
    # every step runs, up to max_fallback.
    with pytest.raises(CheckFailed) as failed:
        quantize(fp32, CALIBRATION, out, options=QuantizeOptions(
            num_samples=8, eval_images=image_folder, max_top1_drop=-50, max_fallback=2))
    assert "INT8 top-1 drops" in str(failed.value) and "was not written" in str(failed.value)
    assert not out.exists()
    render_quantize(failed.value.report)
    result = SimpleNamespace(output=capsys.readouterr().out)
    data = json.loads(json.dumps(failed.value.report.to_dict()))
    assert data["target_met"] is False
    steps = data["steps"]
    assert len(steps) == 3 and steps[0]["fp32_nodes"] == []
    assert [len(s["fp32_nodes"]) for s in steps] == [0, 1, 2]
    table = data["error_budget"]  # every conv and the fc, where most error enters first
    assert len(table) == 21 and {r["op_type"] for r in table} == {"Conv", "Gemm"}
    assert [r["rank"] for r in table] == list(range(1, 22))
    added = [r["added_db"] for r in table]
    assert None not in added and added == sorted(added, reverse=True) and added[0] > 0
    assert steps[2]["fp32_nodes"] == [table[0]["node"], table[1]["node"]]
    assert data["fallback_nodes"] == steps[2]["fp32_nodes"]
    assert data["accuracy"]["n"] == PHOTOS
    assert "where INT8 error enters" in result.output
    assert "accuracy-aware fallback" in result.output
    # Every node shown is named after its PyTorch module, as recorded at export.
    layers = read_metadata(fp32).extra["layers"]
    assert all(row["module"] == layers[row["node"]] for row in table)
    first = f"{table[0]['module']} ({table[0]['node']})"
    assert result.output.count(first) >= 3  # error budget, fallback step, target line
    assert "MISSED" in result.output


def test_accuracy_target_already_met_keeps_everything_int8(fp32: Path, image_folder: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "met.onnx"
    result = quantize(fp32, CALIBRATION, out, options=QuantizeOptions(
        num_samples=8, eval_images=image_folder, max_top1_drop=100.0))
    assert result.target_met is True and result.fallback_nodes == ()
    assert len(result.steps) == 1 and result.error_budget == ()
    assert out.is_file() and result.accuracy["n"] == PHOTOS


def test_exclude_takes_a_module_or_a_node_name(fp32: Path, tmp_path: Path) -> None:
    layers = read_metadata(fp32).extra["layers"]
    node = next(n for n, module in layers.items() if module == "layer2.0.conv1")
    for i, name in enumerate(("layer2.0.conv1", node)):
        out = tmp_path / f"excluded{i}.onnx"
        quantize(fp32, CALIBRATION, out, options=QuantizeOptions(
            num_samples=4, exclude=(name,), check=False))
        assert read_metadata(out).quantization["excluded"] == [node]
        graph = onnx.load(str(out)).graph
        kept = next(n for n in graph.node if n.name == node)
        assert kept.input[1] in {i.name for i in graph.initializer}  # FP32 weight, no DQ


def test_corrupt_model_is_exit_2_without_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf" * 10)
    result = _invoke("quantize", "--model", bad, "--calibration", CALIBRATION)
    assert result.exit_code == 2
    assert "not a readable ONNX model" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_model_without_metadata_needs_input_size(bare_onnx: Path, tmp_path: Path) -> None:
    bare = bare_onnx
    result = _invoke("quantize", "--model", bare, "--calibration", CALIBRATION)
    assert result.exit_code == 2
    assert "no resnet-deploy preprocessing metadata" in result.stderr
    assert "--input-size" in result.stderr
    assert not (tmp_path / "bare.int8.onnx").exists()
    result = _invoke("quantize", "--model", bare, "--calibration", CALIBRATION,
                     "--num-samples", 4, "--input-size", 64)
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "bare.int8.onnx")
    assert meta.preprocess.input_size == 64 and meta.quantization["fp32_sha256"] == \
        file_sha256(bare)
    assert meta.extra["layers"]["/conv1/Conv"] == "conv1"  # derived from the graph itself


@pytest.mark.parametrize("args, message", [
    (["--calibration", "{empty}"], "no images"),
    (["--calibration", "{missing}"], "no such image folder"),
    (["--calibration", CALIBRATION, "--exclude", "no_such_node"], "--exclude no_such_node"),
    (["--calibration", CALIBRATION, "--max-top1-drop", "1"], "--max-top1-drop needs"),
    (["--calibration", CALIBRATION, "--eval-images", "{empty}", "--max-top1-drop", "1"],
     "no class subfolders"),
])
def test_bad_input_is_exit_2_without_output(fp32: Path, tmp_path: Path, args: list,
                                            message: str) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out.onnx"
    args = [str(a).format(empty=tmp_path / "empty", missing=tmp_path / "missing") for a in args]
    result = _invoke("quantize", "--model", fp32, "-o", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()


def _activation_zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    """Zero points of QuantizeLinear nodes (activations; weights are stored pre-quantized)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
