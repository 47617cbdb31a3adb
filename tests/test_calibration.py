"""The calibration reader and the labelled ImageFolder reader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_deploy.convert.quantize.calibrate import ImageFolderReader
from resnet_deploy.core.errors import UserError
from resnet_deploy.data.folders import labelled_images, list_hash


def _photo(path: Path, seed: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _folder(root: Path, n: int) -> list[Path]:
    return [_photo(root / f"img{i:02d}.png", i) for i in range(n)]


def _drain(reader: ImageFolderReader) -> list[dict[str, np.ndarray]]:
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    return feeds


def test_reader_recurses_and_matches_suffixes_case_insensitively(random_onnx: Path,
                                                                 tmp_path: Path) -> None:
    root = tmp_path / "calib"
    wanted = [_photo(root / "a.JPG", 1, "JPEG"), _photo(root / "sub" / "b.Png", 2, "PNG"),
              _photo(root / "sub" / "deeper" / "c.tiff", 3, "TIFF"),
              _photo(root / "d.BMP", 4, "BMP"), _photo(root / "e.jpeg", 5, "JPEG")]
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "model.onnx").write_bytes(b"xx")
    reader = ImageFolderReader.for_model(random_onnx, root, num_samples=256, batch_size=2)
    feeds = _drain(reader)
    assert [len(f["input"]) for f in feeds] == [2, 2, 1]
    assert feeds[0]["input"].shape[1:] == (3, 64, 64) and feeds[0]["input"].dtype == np.float32
    assert sorted(reader.used) == sorted(wanted)
    assert reader.held_out == [] and reader.skipped == []
    assert reader.get_next() is None  # stays exhausted, as ORT's calibrators expect


def test_reader_takes_a_seeded_subset_and_holds_out_the_rest(random_onnx: Path,
                                                             tmp_path: Path) -> None:
    paths = _folder(tmp_path / "calib", 10)
    a = ImageFolderReader.for_model(random_onnx, tmp_path / "calib", num_samples=4, seed=0)
    b = ImageFolderReader.for_model(random_onnx, tmp_path / "calib", num_samples=4, seed=0)
    c = ImageFolderReader.for_model(random_onnx, tmp_path / "calib", num_samples=4, seed=1)
    assert len(a.paths) == 4 and a.paths == b.paths and a.paths != c.paths
    assert sorted(a.paths + a.held_out) == paths
    assert not set(a.paths) & set(a.held_out)
    feeds = _drain(a)
    assert sum(len(f["input"]) for f in feeds) == 4
    assert a.file_list_sha256() == list_hash(a.paths, tmp_path / "calib")
    assert a.file_list_sha256() != list_hash(c.paths, tmp_path / "calib")


def test_unreadable_files_are_skipped_with_one_warning(random_onnx: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "calib"
    good = _folder(root, 3)
    for i in range(3):
        (root / f"broken{i}.jpg").write_bytes(b"this is not a jpeg")
    reader = ImageFolderReader.for_model(random_onnx, root, num_samples=None, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="resnet_deploy"):
        feeds = _drain(reader)
    assert sum(len(f["input"]) for f in feeds) == 3
    assert sorted(reader.used) == good and len(reader.skipped) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 of 6 calibration images" in warnings[0].getMessage()
    assert "`strict`" in warnings[0].getMessage()


def test_strict_makes_an_unreadable_file_fatal(random_onnx: Path, tmp_path: Path) -> None:
    root = tmp_path / "calib"
    _folder(root, 2)
    (root / "broken.png").write_bytes(b"\x89PNG garbage")
    reader = ImageFolderReader.for_model(random_onnx, root, strict=True)
    with pytest.raises(UserError, match="broken.png: not a readable image"):
        _drain(reader)


def test_no_valid_image_is_a_user_error(random_onnx: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no photos here")
    with pytest.raises(UserError, match="no images"):
        ImageFolderReader.for_model(random_onnx, empty)
    with pytest.raises(UserError, match="no such image folder"):
        ImageFolderReader.for_model(random_onnx, tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(2):
        (broken / f"{i}.jpg").write_bytes(b"junk")
    reader = ImageFolderReader.for_model(random_onnx, broken)
    with pytest.raises(UserError, match="none of the 2 images could be read"):
        _drain(reader)


def test_labelled_images_maps_by_label_name_or_sorted_folder(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    _photo(root / "cat" / "1.png", 1)
    _photo(root / "cat" / "nested" / "2.png", 2)
    _photo(root / "ant" / "3.png", 3)
    folder = labelled_images(root)
    assert folder.classes == ("ant", "cat") and len(folder.paths) == 3
    targets, mapping = folder.targets(folder.paths, None)
    assert mapping == "sorted" and list(targets) == [0, 1, 1]
    # Folder names that are all model labels map by name, whatever their sorted order.
    targets, mapping = folder.targets(folder.paths, ["dog", "cat", "bee", "ant"])
    assert mapping == "labels" and list(targets) == [3, 1, 1]
    # No folder name is a label: sorted order, which needs one folder per class.
    targets, mapping = folder.targets(folder.paths, ["dog", "bee"])
    assert mapping == "sorted" and list(targets) == [0, 1, 1]
    with pytest.raises(UserError, match="2 class folders for a model with 3 classes"):
        folder.targets(folder.paths, ["dog", "bee", "eel"])
    with pytest.raises(UserError, match="no labels to map them by"):
        folder.targets(folder.paths, None, classes=10)
    # Some folder names are labels and one is not: a typo, never a silent sorted guess.
    with pytest.raises(UserError, match="ant: this class folder is not one of the model's"):
        folder.targets(folder.paths, ["dog", "cat"])
    assert len(folder.subset(2, seed=0).paths) == 2


def test_labelled_images_rejects_other_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _photo(flat / "a.png", 1)
    _photo(flat / "cls" / "b.png", 2)
    with pytest.raises(UserError, match="not an ImageFolder layout .1 images directly"):
        labelled_images(flat)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        labelled_images(bare)
    hollow = tmp_path / "hollow"
    (hollow / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="hold no images"):
        labelled_images(hollow)
