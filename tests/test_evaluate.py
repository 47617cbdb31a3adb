"""Top-1/top-5 on an ImageFolder, models side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from resnet_deploy.artifact.metadata import read_metadata
from resnet_deploy.checks.evaluate import EvaluateOptions, evaluate
from resnet_deploy.cli import main
from resnet_deploy.core.errors import UserError
from resnet_deploy.data.images import list_images, load_batch
from resnet_deploy.runtime.runners import run_model

from .conftest import CALIBRATION, CIFAR_DEV, assert_names_machine


def _invoke(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _predictions(model: Path, paths: list[Path]) -> np.ndarray:
    batch, used, _ = load_batch(paths, read_metadata(model).preprocess)
    assert used == paths
    return run_model(model, batch, len(batch))


def test_cli_side_by_side_json_matches_a_manual_count(random_onnx: Path, image_folder: Path,
                                                      tmp_path: Path) -> None:
    copy = Path(shutil.copy(random_onnx, tmp_path / "copy.onnx"))
    report = tmp_path / "acc.json"
    result = _invoke("evaluate", "--model", random_onnx, "--model", copy, "--images",
                     image_folder, "--batch-size", 5, "--json", report)
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "copy.onnx" in result.output
    # How the class folders were matched to the outputs, said in words.
    assert result.output.count("folder names matched to the model's labels") == 2
    data = json.loads(report.read_text())
    assert_names_machine(data, result.output)
    rows = data["models"]
    assert [r["model"] for r in rows] == [str(random_onnx), str(copy)]
    assert all(r.keys() >= {"model", "provider", "n", "top1", "top5"} for r in rows)
    # The fixture's folders are class0/class1, which are labels of the random model.
    paths = list_images(image_folder)
    logits = _predictions(random_onnx, paths)
    targets = np.array([0 if p.parent.name == "class0" else 1 for p in paths])
    top1 = float((logits.argmax(1) == targets).mean())
    top5 = float(np.mean([t in np.argsort(-row)[:5]
                          for row, t in zip(logits, targets, strict=True)]))
    for row in rows:
        assert row["provider"] == "cpu" and row["n"] == len(paths)
        assert row["top1"] == pytest.approx(top1) and row["top5"] == pytest.approx(top5)
        assert row["label_mapping"] == "labels"


def test_folder_names_map_through_model_labels(random_onnx: Path, tmp_path: Path) -> None:
    """Each photo filed under the label the model predicts: 100% only if mapped by name."""
    labels = read_metadata(random_onnx).labels
    paths = list_images(CALIBRATION)
    predicted = _predictions(random_onnx, paths).argmax(1)
    root = tmp_path / "by_label"
    for path, index in zip(paths, predicted, strict=True):
        (root / labels[index]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / labels[index] / path.name)
    result = evaluate([random_onnx], root)
    assert result.models[0].label_mapping == "labels"
    assert result.models[0].top1 == 1.0 and result.models[0].n == len(paths)
    # Three renamed folders (not labels) for ten classes: sorted order would score them
    # against the wrong classes, so it is an error rather than a silently wrong top-1.
    renamed = tmp_path / "renamed"
    for i, photo in enumerate(paths[:3]):
        (renamed / f"x_{i}").mkdir(parents=True)
        shutil.copy(photo, renamed / f"x_{i}" / photo.name)
    with pytest.raises(UserError, match="3 class folders for a model with 10 classes"):
        evaluate([random_onnx], renamed)


def test_limit_evaluates_a_seeded_subset(random_onnx: Path, image_folder: Path) -> None:
    a = evaluate([random_onnx], image_folder, options=EvaluateOptions(limit=5, seed=0))
    b = evaluate([random_onnx], image_folder, options=EvaluateOptions(limit=5, seed=0))
    assert a.models[0].n == 5 and a.to_dict() == b.to_dict()


def test_non_imagefolder_layouts_are_exit_2(random_onnx: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(CALIBRATION, flat)
    result = _invoke("evaluate", "--model", random_onnx, "--images", flat)
    assert result.exit_code == 2
    assert "not an ImageFolder layout" in result.stderr and "images directly" in result.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    result = _invoke("evaluate", "--model", random_onnx, "--images", bare, "--json",
                     tmp_path / "r.json")
    assert result.exit_code == 2 and "no class subfolders" in result.stderr
    assert not (tmp_path / "r.json").exists()
    result = _invoke("evaluate", "--model", random_onnx, "--images", tmp_path / "missing")
    assert result.exit_code == 2 and "no such folder" in result.stderr


def test_corrupt_model_and_missing_metadata_are_exit_2(bare_onnx: Path, image_folder: Path,
                                                       tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage" * 50)
    result = _invoke("evaluate", "--model", bad, "--images", image_folder)
    assert result.exit_code == 2 and "not a readable ONNX model" in result.stderr
    bare = bare_onnx
    result = _invoke("evaluate", "--model", bare, "--images", image_folder)
    assert result.exit_code == 2 and "--input-size" in result.stderr
    # Without labels, folders map in sorted order, which needs one folder per class (10).
    result = _invoke("evaluate", "--model", bare, "--images", image_folder,
                     "--input-size", 64, "--limit", 4)
    assert result.exit_code == 2 and "no labels to map them by" in result.stderr
    ten = tmp_path / "ten"
    for i, photo in enumerate(list_images(image_folder)[:10]):
        (ten / f"c{i}").mkdir(parents=True)
        shutil.copy(photo, ten / f"c{i}")
    result = _invoke("evaluate", "--model", bare, "--images", ten, "--input-size", 64)
    assert result.exit_code == 0, result.output
    assert "classes matched by" in result.output and "folders in sorted order" in result.output


def test_missing_provider_is_exit_2(random_onnx: Path, image_folder: Path) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here")
    result = _invoke("evaluate", "--model", random_onnx, "--images", image_folder,
                     "--provider", "tensorrt")
    assert result.exit_code == 2 and "not available" in result.stderr


def test_trained_cifar_model_accuracy(cifar_onnx: Path) -> None:
    result = evaluate([cifar_onnx], CIFAR_DEV, options=EvaluateOptions(limit=400))
    row = result.models[0]
    assert row.n == 400 and result.classes == 10
    # 81.5% on all 5000 dev photos; a 400-photo subset stays well above chance.
    assert 0.7 < row.top1 <= row.top5 and row.top5 > 0.95
