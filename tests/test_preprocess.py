"""The one image loader, the preprocessing spec and the metadata record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_deploy.artifact.metadata import ModelMetadata, read_metadata
from resnet_deploy.core.choices import IMAGENET_MEAN, IMAGENET_STD
from resnet_deploy.core.errors import UserError
from resnet_deploy.data.images import list_images, load_image, to_tensor
from resnet_deploy.data.spec import PreprocessSpec

from .conftest import CALIBRATION, IMAGENET_SAMPLES


def test_defaults_follow_torchvision_eval_convention() -> None:
    spec = PreprocessSpec.create(224)
    assert (spec.input_size, spec.resize_size, spec.interpolation) == (224, 256, "bilinear")
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert PreprocessSpec.create(64).resize_size == 73


def test_bad_spec_rejected() -> None:
    with pytest.raises(UserError, match="`resize_size`"):
        PreprocessSpec.create(224, 200)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.new("RGB", (40, 30), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((30, 40), 65535, np.uint16))
    else:
        img = base.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # scaled from 16 bits, not clipped to white-or-black garbage
        assert np.asarray(out).min() == 255


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_corrupt_image_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UserError, match="broken.jpg") as raised:
        load_image(path)
    assert str(raised.value).count("broken.jpg") == 1  # Pillow's reason names it too


def test_to_tensor_shape_and_normalisation() -> None:
    spec = PreprocessSpec.create(32, 40)
    img = Image.new("RGB", (120, 80), (255, 0, 128))
    arr = to_tensor(img, spec)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    expected = (np.array([1.0, 0.0, 128 / 255]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(arr[:, 16, 16], expected, atol=1e-5)


def test_centre_crop_takes_the_middle() -> None:
    # Left half black, right half white, wide image: the crop must straddle the edge.
    img = np.zeros((50, 200, 3), np.uint8)
    img[:, 100:] = 255
    spec = PreprocessSpec(input_size=10, resize_size=10, mean=(0, 0, 0), std=(1, 1, 1),
                          interpolation="nearest")
    arr = to_tensor(Image.fromarray(img), spec)  # resized to 40x10, crop columns 15..25
    assert arr[0, 5, 0] == 0.0 and arr[0, 5, 9] == 1.0


def test_list_images_is_recursive_and_case_insensitive(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.JPG", "sub/b.png", "c.WebP", "d.txt", "sub/e.TIFF"):
        (tmp_path / name).write_bytes(b"x")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.JPG", "c.WebP", "b.png", "e.TIFF"]


def test_calibration_photos_all_load() -> None:
    paths = list_images(CALIBRATION)
    assert len(paths) >= 16
    for path in paths:
        assert load_image(path).mode == "RGB"
    assert (CALIBRATION / "SOURCES.md").is_file()


def test_shared_imagenet_samples_load(shared_data: Path) -> None:
    paths = list_images(IMAGENET_SAMPLES)
    assert len(paths) == 201
    spec = PreprocessSpec.create(224)
    for path in paths[::10] + [p for p in paths if "'" in p.name]:
        assert to_tensor(load_image(path), spec).shape == (3, 224, 224)


def test_metadata_round_trip(random_onnx: Path) -> None:
    meta = read_metadata(random_onnx)
    assert isinstance(meta, ModelMetadata)
    assert meta.preprocess == PreprocessSpec.create(64)
    assert meta.labels == [f"class{i}" for i in range(10)]
    assert meta.weights["random"] is True and meta.weights["num_classes"] == 10
    assert meta.exporter == "torchscript" and meta.opset == 18
    assert {"torch", "onnx", "onnxruntime", "resnet_deploy"} <= set(meta.versions)
    assert ModelMetadata.from_json(meta.to_json()) == meta
