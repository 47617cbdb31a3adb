"""convert-fp16: FP16 weights, FP32 inputs/outputs, metadata kept, logits close to FP32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from resnet_deploy.artifact.metadata import load_onnx, read_metadata
from resnet_deploy.artifact.model_file import model_precision
from resnet_deploy.cli import main
from resnet_deploy.convert.fp16 import convert_fp16, default_output
from resnet_deploy.core.errors import CheckFailed, UserError
from resnet_deploy.core.metrics import compare
from resnet_deploy.data.images import image_inputs
from resnet_deploy.runtime.runners import run_model

from .conftest import CALIBRATION, assert_names_machine


@pytest.fixture(scope="module")
def fp16_pair(random_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("fp16") / "random10.fp16.onnx"
    convert_fp16(random_onnx, out)
    return random_onnx, out


def test_default_output_name() -> None:
    assert default_output(Path("a/b.onnx")) == Path("a/b.fp16.onnx")
    assert default_output("model") == Path("model.fp16.onnx")


def test_detected_as_fp16_with_fp32_io_and_metadata(fp16_pair: tuple[Path, Path]) -> None:
    import onnx

    fp32, fp16 = fp16_pair
    proto = load_onnx(fp16)
    assert model_precision(proto) == "fp16"
    assert model_precision(load_onnx(fp32)) == "fp32"
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    onnx.checker.check_model(proto)  # also proves the graph is topologically sorted
    meta, original = read_metadata(fp16), read_metadata(fp32)
    assert meta is not None and original is not None
    assert meta.preprocess == original.preprocess and meta.labels == original.labels
    assert meta.weights == original.weights
    assert meta.extra["fp16"]["keep_io_types"] is True
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size


def test_fp16_logits_close_to_fp32_on_calibration_images(fp16_pair: tuple[Path, Path]) -> None:
    fp32, fp16 = fp16_pair
    meta = read_metadata(fp32)
    assert meta is not None
    images, used = image_inputs(CALIBRATION, meta.preprocess)
    assert len(used) >= 10
    reference = run_model(fp32, images, len(images))
    half = run_model(fp16, images, len(images))
    assert half.dtype == np.float32
    cmp = compare(reference, half)
    assert cmp.cosine_min > 0.999, cmp
    assert cmp.top1_agreement >= 0.99, cmp


def test_refuses_already_converted_model(fp16_pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is already FP16"):
        convert_fp16(fp16_pair[1], tmp_path / "again.onnx")


def test_refuses_to_overwrite_its_input(random_onnx: Path) -> None:
    with pytest.raises(UserError, match="overwrite the input"):
        convert_fp16(random_onnx, random_onnx)


def test_failed_check_leaves_no_file(random_onnx: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_deploy.core import metrics
    from resnet_deploy.core.metrics import Tolerance

    monkeypatch.setitem(metrics.TOLERANCES, "fp16", Tolerance(min_cosine=1.5))
    out = tmp_path / "bad.fp16.onnx"
    with pytest.raises(CheckFailed, match="was not written"):
        convert_fp16(random_onnx, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_writes_default_output_and_json(random_onnx: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(random_onnx, model)
    report = tmp_path / "fp16.json"
    result = CliRunner().invoke(main, ["convert-fp16", "--model", str(model),
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.fp16.onnx").is_file()
    assert "PASS" in result.output and "float32 inputs/outputs" in result.output
    data = json.loads(report.read_text())
    assert_names_machine(data, result.output)
    assert data["check"]["passed"] and data["check"]["cosine_min"] > 0.999
    assert data["output"] == str(tmp_path / "m.fp16.onnx")


@pytest.mark.parametrize("how", ["--model", "positional"])
def test_cli_missing_model_exits_2(tmp_path: Path, how: str) -> None:
    missing = str(tmp_path / "nope.onnx")
    args = ["--model", missing] if how == "--model" else [missing]
    result = CliRunner().invoke(main, ["convert-fp16", *args])
    assert result.exit_code == 2
    assert "no such model file" in result.output


def test_cli_positional_model_is_an_alias(random_onnx: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(random_onnx, model)
    result = CliRunner().invoke(main, ["convert-fp16", str(model), "-o",
                                       str(tmp_path / "half.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "half.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "Missing option '--model'"),
    (["a.onnx", "--model", "b.onnx"], "the model is given twice"),
])
def test_cli_model_needed_exactly_once(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["convert-fp16", *args, "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2
    assert "Usage: " in result.output and message in result.output
    assert not list(tmp_path.iterdir())
