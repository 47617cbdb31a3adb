"""Every torchvision ResNet through the commands: a seeded checkpoint of each member exports
with no --arch and matches PyTorch; the Bottleneck members quantize on every target without
saturation; --features gives the pooled embedding; resnet50 runs the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner, Result

from resnet_deploy.artifact.metadata import read_metadata
from resnet_deploy.artifact.model_file import SATURATION_FREE_MAX, ModelFile
from resnet_deploy.cli import main
from resnet_deploy.weights.arch import ARCHITECTURES
from resnet_deploy.weights.checkpoints import load_model

from .conftest import CALIBRATION


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _checkpoint(folder: Path, arch: str, *, num_classes: int | None = 10, seed: int = 0,
                drop: str | None = None) -> Path:
    model, _ = load_model("random", arch=arch, num_classes=num_classes, seed=seed,
                          features=num_classes is None)
    state = {k: v for k, v in model.state_dict().items() if not (drop and k.startswith(drop))}
    path = folder / f"{arch}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_member_exports_without_arch_and_matches_pytorch(arch: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, arch)
    out = tmp_path / f"{arch}.onnx"
    result = run("export", "--weights", ckpt, "--input-size", "32", "--exporter", "torchscript",
                 "--simplify", "none", "--parity-images", CALIBRATION, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"({arch}, sha256 " in result.output  # the weights line names the member
    meta = read_metadata(out)
    assert meta.weights["arch"] == arch and meta.output == {"name": "logits", "kind": "logits"}
    result = run("parity", "--weights", ckpt, "--model", out, "--images", CALIBRATION,
                 "--limit", "4", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    assert all(r["passed"] and r["top1_agreement"] == 1.0 for r in rows), rows
    assert f"architecture: {arch}" in result.output
    assert {r["arch"] for r in rows} == {arch}  # the torch rows too
    ckpt.unlink()  # the big members' files are hundreds of MB
    out.unlink()


def test_layer_names_of_a_bottleneck_member(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "resnet50")
    out = tmp_path / "r50.onnx"
    assert run("export", "--weights", ckpt, "--input-size", "32", "--simplify", "none",
               "-o", out).exit_code == 0
    names = set(read_metadata(out).extra["layers"].values())
    assert {"layer3.4.conv2", "layer2.0.downsample.0", "layer1.0.conv3", "fc"} <= names


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("target", ["cpu", "cpu-vnni", "tensorrt"])
def test_1x1_and_grouped_convs_quantize_on_every_target(arch: str, target: str,
                                                        tmp_path: Path) -> None:
    """The cpu target's proof is per weight (|q| <= 64), so it holds for 1x1 and grouped
    convs alike: the file says so through its weight peak."""
    model, loaded = load_model("random", arch=arch, num_classes=10, seed=1)
    from resnet_deploy.convert.export import ExportOptions, export
    from resnet_deploy.data.spec import PreprocessSpec

    fp32 = tmp_path / "m.onnx"
    export(model, loaded, PreprocessSpec.create(32), fp32,
           options=ExportOptions(exporter="torchscript", simplify="none", parity_samples=2))
    int8 = tmp_path / "m.int8.onnx"
    result = run("quantize", "--model", fp32, "--calibration", CALIBRATION, "--target", target,
                 "--min-top1", "0", "--min-cosine", "0", "-o", int8)
    assert result.exit_code == 0, result.output
    peak = ModelFile.read(int8).int8_peak
    assert peak is not None and (peak <= SATURATION_FREE_MAX) == (target == "cpu")
    convs = [n for n in onnx.load(str(int8)).graph.node if n.op_type == "Conv"]
    assert any(a.name == "group" and a.i > 1 for n in convs for a in n.attribute) == \
        (arch == "resnext50_32x4d")


def test_features_embed_match_pytorch_quantize_and_package(tmp_path: Path) -> None:
    """A backbone saved with another head (here a 7-class fc) exports its 2048-d embedding."""
    ckpt = _checkpoint(tmp_path, "resnet50", num_classes=7)
    out = tmp_path / "emb.onnx"
    result = run("export", "--weights", ckpt, "--features", "--input-size", "32",
                 "--exporter", "torchscript", "-o", out, "--parity-images", CALIBRATION)
    assert result.exit_code == 0, result.output
    file = ModelFile.read(out)
    assert file.kind == "features" and file.io.output_name == "features"
    assert file.io.classes == 2048 and file.meta is not None and file.meta.labels is None
    assert not any(n.op_type in ("Gemm", "MatMul") for n in onnx.load(str(out)).graph.node)
    result = run("parity", "--weights", ckpt, "--model", out, "--images", CALIBRATION,
                 "--limit", "4", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    assert all(r["passed"] and "top-1" not in r["tolerance"] for r in rows), rows
    int8 = tmp_path / "emb.int8.onnx"
    result = run("quantize", "--model", out, "--calibration", CALIBRATION, "-o", int8)
    assert result.exit_code == 0, result.output
    assert "top-1" not in result.output.split("check, ")[1].split("):")[0]  # cosine only
    result = run("evaluate", "--model", out, "--images", tmp_path)
    assert result.exit_code == 2 and "embedding" in result.stderr
    repo = tmp_path / "repo"
    assert run("package", "--model", out, "--model", int8, "-o", repo).exit_code == 0
    config = (repo / "emb" / "config.pbtxt").read_text()
    assert 'name: "features"' in config and "label_filename" not in config


def test_a_backbone_alone_needs_features(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "resnet18", num_classes=None)
    result = run("export", "--weights", ckpt, "--input-size", "32", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "has no fc" in result.stderr and "--features" in result.stderr
    result = run("export", "--weights", ckpt, "--input-size", "32", "--features",
                 "--exporter", "torchscript", "--simplify", "none", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert ModelFile.read(tmp_path / "m.onnx").io.classes == 512


@pytest.mark.parametrize("case, says", [
    ("missing-block", ["nearest is resnet50", "layer3"]),
    ("arch-mismatch", ["not resnet34"]),
])
def test_checkpoints_that_fit_no_member_are_one_line(case: str, says: list[str],
                                                    tmp_path: Path) -> None:
    if case == "missing-block":
        ckpt = _checkpoint(tmp_path, "resnet50", drop="layer3.5.")
        args = ["--weights", ckpt]
    else:
        ckpt = _checkpoint(tmp_path, "resnet50")
        args = ["--weights", ckpt, "--arch", "resnet34"]
    result = run("export", *args, "--input-size", "32", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(ckpt) in lines[0] and all(s in lines[0] for s in says)
    assert not (tmp_path / "m.onnx").exists()


def test_resnet50_through_the_whole_pipeline(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "resnet50")
    out = tmp_path / "out"
    result = run("pipeline", "--weights", ckpt, "--input-size", "32", "--exporter",
                 "torchscript", "--calibration", CALIBRATION, "--num-samples", "8",
                 "--bench-iterations", "2", "--min-top1", "0", "--min-cosine", "0",
                 "--triton", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_metadata(out / "resnet50.onnx").weights["arch"] == "resnet50"
    assert (out / "model_repository" / "resnet50_int8" / "config.pbtxt").is_file()
    assert run("verify", out / "manifest.json").exit_code == 0


def test_evaluate_names_the_architecture(tmp_path: Path, image_folder: Path) -> None:
    ckpt = _checkpoint(tmp_path, "resnet34", num_classes=2)
    out = tmp_path / "r34.onnx"
    assert run("export", "--weights", ckpt, "--input-size", "32", "--exporter", "torchscript",
               "--simplify", "none", "-o", out).exit_code == 0
    result = run("evaluate", "--model", out, "--images", image_folder,
                 "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "architecture: resnet34" in result.output
    models = json.loads((tmp_path / "e.json").read_text())["models"]
    assert [m["arch"] for m in models] == ["resnet34"]
