"""Export: both exporters, batch axes, simplification, parity gate, and every bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from resnet_deploy.artifact.metadata import read_metadata
from resnet_deploy.cli import main
from resnet_deploy.runtime.runners import OrtRunner, run_model

from .conftest import CIFAR_CKPT, CIFAR_DEV, assert_names_machine


def run(*args: str) -> click.testing.Result:  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def batch_dim(path: Path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_both_exporters(tmp_path: Path, exporter: str) -> None:
    out, report = tmp_path / "m.onnx", tmp_path / "m.json"
    result = run("export", "--weights", "random", "--num-classes", "10", "--input-size", "64",
                 "--exporter", exporter, "-o", out, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert_names_machine(data, result.output)
    assert data["output"] == str(out) and data["nodes_after"] <= data["nodes_before"]
    assert data["parity"]["top1_agreement"] == 1.0 and data["parity"]["batch_sizes"] == [1, 8]
    assert data["parity"]["max_abs_diff"] < 1e-4
    assert "parity: PASS" in result.output and "random" in result.output
    assert batch_dim(out).dim_param == "batch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]  # no sidecar
    meta = read_metadata(out)
    assert meta.exporter == exporter and meta.preprocess.input_size == 64
    assert meta.labels is None and "labels: none: outputs are class indices" in result.output
    # Every Conv and Gemm is named after its PyTorch module, read from the graph.
    graph = onnx.load(str(out)).graph
    layers = meta.extra["layers"]
    named = {layers[n.name] for n in graph.node if n.op_type in ("Conv", "Gemm")}
    assert len(named) == 21 and {"conv1", "layer3.1.conv2", "layer2.0.downsample.0",
                                 "fc"} <= named
    assert data["layers"] == len(layers)
    if data["nodes_before"] == data["nodes_after"]:
        assert (f"simplifier: onnxsim: unchanged ({data['nodes_after']} nodes): the exporter "
                "had already folded BatchNorm") in result.output
    # The dynamic axis really works in ORT at a batch size never seen at export.
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64), dtype=np.float32)
    assert run_model(out, x, 5).shape == (5, 10)


def test_static_batch_and_no_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "s.onnx"
    result = run("export", "--weights", "random", "--num-classes", "3", "--input-size", "32",
                 "--static-batch", "--simplify", "onnxslim", "--exporter", "torchscript",
                 "-o", out)
    assert result.exit_code == 0, result.output
    assert batch_dim(out).dim_value == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]
    assert "onnxslim" in result.output


def test_labels_and_custom_normalisation(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    out = tmp_path / "m.onnx"
    result = run("export", "--weights", "random", "--num-classes", "2", "--input-size", "32",
                 "--resize-size", "40", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25",
                 "0.25", "--labels", labels, "--exporter", "torchscript", "-o", out)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta.labels == ["cat", "dog"]
    assert meta.preprocess.resize_size == 40 and meta.preprocess.std == (0.25, 0.25, 0.25)


def test_simplifier_line_says_what_happened() -> None:
    from types import SimpleNamespace

    from resnet_deploy.cli.export import simplifier_line

    def line(**kw: object) -> str:
        base = dict(simplifier="onnxsim", nodes_before=49, nodes_after=49, batchnorm_nodes=0,
                    constants_folded=0)
        return simplifier_line(SimpleNamespace(**{**base, **kw}))

    assert line() == "onnxsim: unchanged (49 nodes): the exporter had already folded BatchNorm"
    assert line(batchnorm_nodes=20) == "onnxsim: unchanged (49 nodes)"
    assert line(nodes_before=69, constants_folded=3) == \
        "onnxsim: 69 -> 49 nodes, 3 nodes folded into constants"


def test_constants_folded_counts_nodes_now_initializers() -> None:
    from onnx import helper, numpy_helper

    from resnet_deploy.convert.export import constants_folded

    after = helper.make_graph([], "g", [], [], [
        numpy_helper.from_array(np.zeros(2, np.float32), "shape_out")])
    assert constants_folded([["shape_out"], ["y"]], helper.make_model(after)) == 1
    assert constants_folded([["y"]], helper.make_model(after)) == 0


def _checkpoint_with(folder: Path, num_classes: int, **files: str) -> Path:
    """A random-init state_dict saved as a checkpoint, with files written beside it."""
    from resnet_deploy.weights.checkpoints import load_model

    folder.mkdir()
    model, _ = load_model("random", num_classes=num_classes)
    torch.save(model.state_dict(), folder / "ft.pth")
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text)
    return folder / "ft.pth"


def test_labels_txt_beside_checkpoint_travel(tmp_path: Path) -> None:
    ckpt = _checkpoint_with(tmp_path / "ck", 3, labels_txt="cat\ndog\nbird\n")
    out = tmp_path / "m.onnx"
    result = run("export", "--weights", ckpt, "--input-size", "32", "--exporter",
                 "torchscript", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_metadata(out).labels == ["cat", "dog", "bird"]
    assert f"labels: 3 class names from {ckpt.parent / 'labels.txt'}" in result.output


def test_labels_option_wins_and_labels_beside_that_do_not_fit_are_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    card = json.dumps({"file": "ft.pth", "classes": ["a", "b"]})
    ckpt = _checkpoint_with(tmp_path / "ck", 3, model_json=card)
    out = tmp_path / "m.onnx"
    result = run("export", "--weights", ckpt, "--input-size", "32", "--exporter",
                 "torchscript", "-o", out)
    assert result.exit_code == 0, result.output  # nobody asked for them: a warning, no labels
    assert "lists 2 classes" in caplog.text and "ignoring them" in caplog.text
    assert read_metadata(out).labels is None
    labels = tmp_path / "names.txt"
    labels.write_text("x\ny\nz\n")
    result = run("export", "--weights", ckpt, "--input-size", "32", "--labels", labels,
                 "--exporter", "torchscript", "-o", out)
    assert result.exit_code == 0, result.output  # --labels wins: the card is not read
    assert read_metadata(out).labels == ["x", "y", "z"]
    assert f"labels: 3 class names from {labels} (--labels)" in result.output
    (ckpt.parent / "model.json").write_text(json.dumps({"file": "other.pth",
                                                        "classes": ["p", "q", "r"]}))
    result = run("export", "--weights", ckpt, "--input-size", "32", "--exporter",
                 "torchscript", "-o", out)
    assert result.exit_code == 0, result.output  # a renamed checkpoint keeps its card
    assert read_metadata(out).labels == ["p", "q", "r"]
    assert 'its "file" names other.pth' in caplog.text
    (ckpt.parent / "model.json").write_text(json.dumps({"classes": []}))
    result = run("export", "--weights", ckpt, "--input-size", "32", "-o", out)
    assert result.exit_code == 2 and '"classes" must be a list' in result.output


def test_label_count_mismatch(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    result = run("export", "--weights", "random", "--num-classes", "2", "--input-size", "32",
                 "--labels", labels, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "3 labels" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_parity_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = OrtRunner._infer_impl
    monkeypatch.setattr(OrtRunner, "_infer_impl", lambda self, b: original(self, b) + 0.5)
    out = tmp_path / "m.onnx"
    result = run("export", "--weights", "random", "--num-classes", "4", "--input-size", "32",
                 "--exporter", "torchscript", "-o", out)
    assert result.exit_code == 1
    assert "does not match PyTorch" in result.output and "parity: FAIL" in result.output
    assert list(tmp_path.iterdir()) == []


def _bad_checkpoints(tmp: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp / "empty.pth"
    empty.write_bytes(b"")
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a real zip archive" * 10)
    notckpt = tmp / "list.pth"
    torch.save([1, 2, 3], notckpt)
    wrong = tmp / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 512), "conv9.weight": torch.zeros(1)}, wrong)
    evil = tmp / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": _Evil()}))
    return {
        "missing": (tmp / "nope.pth", "no such checkpoint file"),
        "empty": (empty, "empty"),
        "corrupt": (corrupt, "not a loadable PyTorch checkpoint"),
        "not a checkpoint": (notckpt, "holds no state_dict"),
        "wrong keys": (wrong, "missing keys"),
        "malicious": (evil, "not a loadable PyTorch checkpoint"),
    }


class _Evil:
    def __reduce__(self) -> tuple:
        return (Path("/tmp/resnet_deploy_export_pwned").write_text, ("x",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "not a checkpoint",
                                  "wrong keys", "malicious"])
def test_bad_checkpoints_exit_2(tmp_path: Path, case: str) -> None:
    path, message = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out.onnx"
    result = run("export", "--weights", path, "-o", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("Error: ") and str(path) in line and message in line
    assert "\n" not in line and "Traceback" not in result.output
    assert not out.exists()
    assert not Path("/tmp/resnet_deploy_export_pwned").exists()


def test_output_folder_missing_or_unwritable(tmp_path: Path) -> None:
    result = run("export", "--weights", "random", "-o", tmp_path / "no" / "such" / "m.onnx")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run("export", "--weights", "random", "-o", "/proc/m.onnx")
    assert result.exit_code == 2 and "/proc/m.onnx" in result.output


def test_imagenet_offline_error_suggests_alternatives(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = run("export", "--weights", "imagenet", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "--weights random" in result.output and "resnet18-f37072fd.pth" in result.output


def test_imagenet_cache_hash_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    result = run("export", "--weights", "imagenet", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "sha256" in result.output


def test_cifar_checkpoint_export_passes_parity_on_dev_images(shared_data: Path,
                                                             tmp_path: Path) -> None:
    out, report = tmp_path / "c.onnx", tmp_path / "c.json"
    result = run("export", "--weights", CIFAR_CKPT, "--input-size", "64", "--resize-size", "73",
                 "--parity-images", CIFAR_DEV, "-o", out, "--json", report)
    assert result.exit_code == 0, result.output
    parity = json.loads(report.read_text())["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["passed"]
    assert "16 images from" in parity["inputs"]
    meta = read_metadata(out)
    assert meta.weights["sha256"]
    # The class names in model.json beside the checkpoint travel into the model.
    card = CIFAR_CKPT.parent / "model.json"
    assert meta.labels == json.loads(card.read_text())["classes"]
    assert f'labels: 10 class names from {card} ("classes")' in result.output

