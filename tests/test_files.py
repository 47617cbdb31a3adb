"""Output files: a full disk is one error line naming the file, and nothing is left."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from resnet_deploy.core.errors import UserError
from resnet_deploy.core.files import atomic_output, beside


def test_a_full_disk_is_bad_input_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="m.onnx: no space left on device while writing it"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_are_not_disguised(tmp_path: Path) -> None:
    with pytest.raises(PermissionError):
        with atomic_output(tmp_path / "m.onnx"):
            raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_derived_models_sit_beside_their_source() -> None:
    assert beside("a/resnet18.onnx", "int8") == Path("a/resnet18.int8.onnx")
    assert beside("a/resnet18.onnx", "fp16") == Path("a/resnet18.fp16.onnx")


def test_a_folder_where_the_output_file_belongs_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "parity.json").mkdir()
    with pytest.raises(UserError, match="is a folder where a file belongs"):
        with atomic_output(tmp_path / "parity.json"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["parity.json"]
