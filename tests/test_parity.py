"""Parity: catches real discrepancies, never passes what it did not measure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import numpy_helper

from resnet_deploy.artifact.model_file import model_precision
from resnet_deploy.cli import main
from resnet_deploy.core.machine import cpu_info
from resnet_deploy.core.metrics import TOLERANCES, compare

from .conftest import CALIBRATION, CIFAR_CALIB, CIFAR_DEV, assert_names_machine


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def perturbed(random_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the model with one weight tensor nudged: a real, small discrepancy."""
    model = onnx.load(str(random_onnx))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    path = tmp_path_factory.mktemp("perturbed") / "perturbed.onnx"
    onnx.save(model, str(path))
    return path


def test_torch_reference_passes(random_onnx: Path, tmp_path: Path) -> None:
    report = tmp_path / "p.json"
    result = run("parity", "--weights", "random", "--model", random_onnx, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert_names_machine(data, result.output)
    assert data["reference"] == "torch" and data["passed"] is True
    assert data["inputs"]["count"] == 17  # every shipped calibration photo
    (row,) = data["results"]
    assert row["precision"] == "fp32" and row["provider"] == "cpu" and row["passed"] is True
    for key in ("max_abs_diff", "mean_abs_diff", "p99_abs_diff", "max_rel_diff", "cosine_min",
                "cosine_mean", "top1_agreement", "top5_agreement", "nonfinite", "min_atol"):
        assert key in row
    assert row["max_abs_diff"] < 1e-4 and row["nonfinite"] == 0


def test_perturbed_weight_fails(random_onnx: Path, perturbed: Path, tmp_path: Path) -> None:
    report = tmp_path / "p.json"
    result = run("parity", "--model", random_onnx, "--model", perturbed, "--json", report)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "max abs diff" in result.output
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["reference"].endswith("random10.onnx@cpu")
    (row,) = data["results"]
    assert row["model"] == str(perturbed) and row["passed"] is False
    assert row["min_atol"] == pytest.approx(row["max_abs_diff"])


def test_loose_override_turns_failure_into_pass(random_onnx: Path, perturbed: Path) -> None:
    result = run("parity", "--model", random_onnx, "--model", perturbed, "--atol", "1000",
                 "--min-top1", "0")
    assert result.exit_code == 0, result.output


def test_unavailable_provider_exits_2(random_onnx: Path) -> None:
    result = run("parity", "--model", random_onnx, "--providers", "cpu,cuda")
    assert result.exit_code == 2
    assert "CUDAExecutionProvider" in result.output
    assert "pip install 'resnet-deploy[cuda]'" in result.output


def test_skip_unavailable_reports_skip_but_proves_nothing(random_onnx: Path) -> None:
    result = run("parity", "--model", random_onnx, "--providers", "cuda", "--skip-unavailable",
                 "--random", "2")
    assert result.exit_code == 1
    assert "skipped" in result.output and "nothing was verified" in result.output


def test_unknown_provider_is_usage_error(random_onnx: Path) -> None:
    result = run("parity", "--model", random_onnx, "--providers", "vulkan")
    assert result.exit_code == 2 and "unknown provider 'vulkan'" in result.output


def test_golden_outputs_round_trip(random_onnx: Path, perturbed: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden.npz"
    result = run("parity", "--weights", "random", "--model", random_onnx, "--random", "6",
                 "--save-outputs", golden)
    assert result.exit_code == 0, result.output
    with np.load(golden) as data:
        assert data["logits"].shape == (6, 10) and len(data["input_sha256"]) == 6
    result = run("parity", "--model", random_onnx, "--random", "6", "--load-outputs", golden)
    assert result.exit_code == 0, result.output
    assert "golden outputs" in result.output
    assert run("parity", "--model", perturbed, "--random", "6",
               "--load-outputs", golden).exit_code == 1
    result = run("parity", "--model", random_onnx, "--random", "7", "--load-outputs", golden)
    assert result.exit_code == 2 and "6 inputs but 7" in result.output


def test_model_without_metadata_needs_input_size(random_onnx: Path, bare_onnx: Path) -> None:
    path = bare_onnx
    result = run("parity", "--model", path, "--model", random_onnx, "--random", "2")
    assert result.exit_code == 2 and "--input-size" in result.output
    result = run("parity", "--model", path, "--model", random_onnx, "--random", "2",
                 "--input-size", "64")
    assert result.exit_code == 0, result.output


def test_corrupt_model_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07garbage" * 50)
    result = run("parity", "--model", path, "--random", "2")
    assert result.exit_code == 2 and str(path) in result.output


def test_empty_image_folder_exits_2(random_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    result = run("parity", "--weights", "random", "--model", random_onnx, "--images", tmp_path)
    assert result.exit_code == 2 and "no readable image" in result.output


def test_tolerances_by_precision() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 10)) * 5
    noisy = ref + rng.standard_normal(ref.shape) * 0.05  # INT8-like error
    cmp = compare(ref, noisy)
    assert not TOLERANCES["fp32"].failures(compare(ref, ref))
    assert TOLERANCES["int8"].failures(cmp) == []
    assert any("max abs diff" in f for f in TOLERANCES["fp32"].failures(cmp))
    nan = noisy.copy()
    nan[0, 0] = np.nan
    assert any("NaN" in f for f in TOLERANCES["int8"].failures(compare(ref, nan)))


def test_precision_read_from_model(random_onnx: Path) -> None:
    assert model_precision(onnx.load(str(random_onnx))) == "fp32"


def test_int8_passes_int8_tolerances_and_fails_fp32_ones(cifar_onnx: Path,
                                                         tmp_path: Path) -> None:
    int8 = tmp_path / "cifar.int8.onnx"
    result = run("quantize", "--model", cifar_onnx, "--calibration", CIFAR_CALIB,
                 "--num-samples", "128", "-o", int8)
    assert result.exit_code == 0, result.output
    report = tmp_path / "p.json"
    args = ("parity", "--model", cifar_onnx, "--model", int8, "--images", CIFAR_DEV,
            "--limit", "300", "--batch-size", "50")
    result = run(*args, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["machine"]["int8_path"] == cpu_info()["int8_path"]
    (row,) = data["results"]
    assert row["precision"] == "int8" and row["tolerance"] == TOLERANCES["int8"].describe()
    assert row["cosine_p1"] >= 0.97 and row["top1_agreement"] >= 0.97
    assert row["max_abs_diff"] > 1e-3
    fp32_rules = run(*args, "--rtol", "1e-4", "--min-top1", "1.0")
    assert fp32_rules.exit_code == 1 and "max abs diff" in fp32_rules.output


def test_default_image_folder_missing_is_explained(random_onnx: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("parity", "--weights", "random", "--model", random_onnx)
    assert result.exit_code == 2 and "--images DIR or --random N" in result.output


def test_an_int8_reference_judges_an_fp32_model_by_int8_tolerances(random_onnx: Path,
                                                                    tmp_path: Path) -> None:
    """A pair is judged by its looser precision, whichever side of it is the reference."""
    int8 = tmp_path / "m.int8.onnx"
    assert run("quantize", "--model", random_onnx, "--calibration", CALIBRATION, "-o", int8
               ).exit_code == 0
    result = run("parity", "--model", random_onnx, "--reference", f"{int8}@cpu",
                 "--random", "8")
    assert result.exit_code == 0, result.output
    assert "cosine p1 >= 0.97" in result.output
