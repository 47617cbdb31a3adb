"""What `make demo` relies on: the labelled photos, and a summary that says where things are."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

from resnet_deploy.cli.pipeline import artifact_rows
from resnet_deploy.data.images import list_images
from resnet_deploy.weights.published import imagenet_labels

from .conftest import CALIBRATION, ROOT


def test_labelled_photos_are_filed_under_imagenet_class_names(tmp_path: Path) -> None:
    dest = tmp_path / "labelled"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "labelled_photos.sh"), str(dest)],
                          check=True, capture_output=True, text=True)
    files = {p.relative_to(dest).as_posix() for p in list_images(dest)}
    assert files == {"tabby/chelsea.jpg", "espresso/coffee.jpg", "tripod/camera.jpg",
                     "military uniform/grace_hopper.jpg", "wall clock/clock_motion.bmp"}
    assert {p.name for p in dest.iterdir()} <= set(imagenet_labels())
    assert "5 labelled photos in 5 classes" in done.stdout
    # Running it again (make demo twice) leaves the same folder.
    subprocess.run(["bash", str(ROOT / "scripts" / "labelled_photos.sh"), str(dest)], check=True,
                   capture_output=True)
    assert {p.relative_to(dest).as_posix() for p in list_images(dest)} == files


def test_labels_table_lists_every_shipped_photo_once() -> None:
    rows = [line.split("|")[1].strip() for line in
            (CALIBRATION / "LABELS.md").read_text("utf-8").splitlines()
            if line.startswith("| ") and not line.startswith("| photo")]
    assert sorted(rows) == sorted(p.name for p in list_images(CALIBRATION))


def test_pipeline_summary_names_each_artifact_once() -> None:
    def record(step: str, *outputs: tuple[str, int]) -> SimpleNamespace:
        return SimpleNamespace(step=step, outputs=[{"path": p, "bytes": b} for p, b in outputs])

    result = SimpleNamespace(output="out", steps=[
        record("export", ("resnet18.onnx", 46_000_000)),
        record("report", ("report.md", 1_500), ("bench.png", 60_000)),
        record("triton", ("model_repository/resnet18/config.pbtxt", 1_000),
               ("model_repository/resnet18/1/model.onnx", 46_000_000))])
    assert artifact_rows(result) == [
        {"path": str(Path("out/resnet18.onnx")), "step": "export", "kb": 46_000.0},
        {"path": str(Path("out/report.md")), "step": "report", "kb": 1.5},
        {"path": str(Path("out/bench.png")), "step": "report", "kb": 60.0},
        {"path": str(Path("out/model_repository")) + "/", "step": "triton", "kb": 46_001.0}]
