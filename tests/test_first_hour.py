"""A newcomer's first hour, through the CLI: the checkpoint's card decides the preprocessing,
the INT8 gate's advice works when pasted back, reports carry their caveats, and the rough
edges of a first run (ONNX given as weights, ``--json -``, long name lists) are smooth."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from resnet_deploy.artifact.metadata import read_metadata
from resnet_deploy.cli import main
from resnet_deploy.weights.checkpoints import load_model

from .conftest import CALIBRATION, ROOT

CLASSES = [f"kind{i}" for i in range(10)]


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class checkpoint renamed from the file its model.json names (32 px, resize 37)."""
    folder = tmp_path_factory.mktemp("ft")
    model, _ = load_model("random", num_classes=10, seed=3)
    torch.save(model.state_dict(), folder / "ft.pth")
    (folder / "model.json").write_text(json.dumps({
        "file": "resnet18_trained.pth", "classes": CLASSES, "input_size": 32,
        "resize_size": 37, "interpolation": "bilinear (Pillow)",
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    return folder / "ft.pth"


@pytest.fixture(scope="module")
def ft_onnx(ft: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ft-onnx") / "ft.onnx"
    result = run("export", "--weights", ft, "--exporter", "torchscript", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped photos filed under the card's class names (two per class at most)."""
    root = tmp_path_factory.mktemp("labelled")
    photos = sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")
    for i, photo in enumerate(photos):
        folder = root / CLASSES[i % 10]
        folder.mkdir(exist_ok=True)
        shutil.copy(photo, folder)
    return root


# --- 1. the checkpoint's own card decides --------------------------------------------------

def test_the_card_decides_even_when_its_file_field_names_another_checkpoint(
        ft_onnx: Path, ft: Path) -> None:
    meta = read_metadata(ft_onnx)
    assert (meta.preprocess.input_size, meta.preprocess.resize_size) == (32, 37)
    assert meta.preprocess.mean == (0.5, 0.5, 0.5) and meta.labels == CLASSES
    card = str(ft.parent / "model.json")
    assert meta.extra["preprocess_sources"] == dict.fromkeys(
        ("input_size", "resize_size", "interpolation", "mean", "std"), card)


def test_export_says_where_each_value_came_from(ft: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "m.onnx"
    result = run("export", "--weights", ft, "--input-size", "40", "--exporter", "torchscript",
                 "--simplify", "none", "-o", out)
    assert result.exit_code == 0, result.output
    card = ft.parent / "model.json"
    assert (f"preprocessing: 40 px crop (--input-size), resize 46 (input size / 0.875), "
            f"bilinear ({card}), mean 0.5,0.5,0.5 ({card}), std 0.25,0.25,0.25 ({card})"
            ) in result.output
    assert f'labels: 10 class names from {card} ("classes")' in result.output
    assert 'its "file" names resnet18_trained.pth, not ft.pth' in caplog.text


def test_labels_take_a_model_card(ft: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = run("export", "--weights", "random", "--num-classes", "10", "--input-size", "32",
                 "--labels", ft.parent / "model.json", "--exporter", "torchscript",
                 "--simplify", "none", "-o", out)
    assert result.exit_code == 0, result.output
    assert read_metadata(out).labels == CLASSES


# --- 2. never silently wrong preprocessing -------------------------------------------------

def test_a_checkpoint_of_10_classes_with_no_size_warns_naming_input_size(tmp_path: Path) -> None:
    model, _ = load_model("random", num_classes=10, seed=1)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    result = run("export", "--weights", tmp_path / "bare.pth", "--exporter", "torchscript",
                 "--simplify", "none", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "--input-size" in line]
    assert len(warning) == 1 and "10 classes" in warning[0] and "224" in warning[0]
    assert "224 px crop (ImageNet default)" in result.output


def test_evaluate_warns_when_top1_is_near_chance(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A model from a checkpoint file (not flagged as random) scoring at chance."""
    model, _ = load_model("random", num_classes=2, seed=1)
    torch.save(model.state_dict(), tmp_path / "two.pth")
    out = tmp_path / "two.onnx"
    assert run("export", "--weights", tmp_path / "two.pth", "--input-size", "32",
               "--exporter", "torchscript", "--simplify", "none", "-o", out).exit_code == 0
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = images / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    result = run("evaluate", "--model", out, "--images", images, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    top1 = json.loads((tmp_path / "e.json").read_text())["models"][0]["top1"]
    near = abs(top1 - 0.5) <= 0.02
    assert ("within 2 points of chance" in caplog.text) == near


# --- 3. a gate whose advice works -----------------------------------------------------------

def _hint(output: str) -> list[str]:
    found = re.search(r"it would pass with ((?:--[a-z0-9-]+ [0-9.e-]+ ?)+)", output)
    assert found, output
    return found.group(1).split()


def test_a_failed_gate_names_options_that_pasted_back_pass(ft_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    base = ["quantize", "--model", ft_onnx, "--calibration", CALIBRATION, "-o", out]
    result = run(*base, "--min-top1", "1", "--min-cosine", "0.9999999")
    if result.exit_code == 0:
        pytest.skip("the INT8 model matched FP32 exactly on these photos")
    assert result.exit_code == 1 and not out.exists()
    hint = _hint(result.output)
    assert set(hint[::2]) <= {"--min-top1", "--min-cosine"}  # options quantize takes
    result = run(*base, *hint)
    assert result.exit_code == 0, result.output
    assert out.exists() and "check: PASS" in result.output


def test_few_held_out_photos_are_called_few(fp32: Path, tmp_path: Path) -> None:
    result = run("quantize", "--model", fp32, "--calibration", CALIBRATION,
                 "-o", tmp_path / "q.onnx", "--json", tmp_path / "q.json")
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "q.json").read_text())["notes"]
    assert any(re.match(r"the verdict rests on few photos: \d+ held out \(under 100\)", n)
               for n in notes), notes
    assert "verdict rests on few photos" in result.output


def test_overlapping_calibration_and_evaluation_photos_are_counted(fp32: Path,
                                                                  tmp_path: Path) -> None:
    result = run("quantize", "--model", fp32, "--calibration", CALIBRATION, "--eval-images",
                 CALIBRATION, "--num-samples", "10", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.output
    assert "10 of the 17 evaluation photos are also calibration photos" in result.output


# --- 4 and 5. reports with their caveats; the pipeline's names -----------------------------

@pytest.fixture(scope="module")
def piped(ft: Path, labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path,
                                                                                       Result]:
    out = tmp_path_factory.mktemp("piped") / "out"
    result = run("pipeline", "--weights", ft, "--exporter", "torchscript", "--calibration",
                 CALIBRATION, "--eval-images", labelled, "--num-samples", "8",
                 "--bench-iterations", "3", "--min-top1", "0", "--triton", "-o", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_pipeline_names_models_after_the_checkpoint_and_gates_on_eval_images(
        piped: tuple[Path, Result]) -> None:
    out, result = piped
    assert (out / "ft.onnx").is_file() and (out / "ft.int8.onnx").is_file()
    assert {p.name for p in (out / "model_repository").iterdir() if p.is_dir()} == {
        "ft", "ft_int8", "ft_image", "ft_int8_image"}
    manifest = json.loads((out / "manifest.json").read_text())
    quantize = manifest["steps"]["quantize"]
    assert quantize["results"]["held_out"] == 17 and "eval_images" in quantize["inputs"]
    assert "checkpoint: ft.pth (sha256 " in result.output
    assert "preprocessing: 32 px crop (" in result.output


def test_report_names_the_checkpoint_preprocessing_labels_date_and_verdict_figures(
        piped: tuple[Path, Result], ft: Path) -> None:
    out, _ = piped
    report = (out / "report.md").read_text()
    sha = json.loads((out / "manifest.json").read_text())["steps"]["export"]["results"][
        "sha256"][:12]
    assert f"Checkpoint: ft.pth (sha256 {sha})" in report
    assert f"Preprocessing: 32 px crop ({ft.parent / 'model.json'})" in report
    assert "Labels: 10 class names from" in report and "Date: 20" in report
    assert "Machine: " in report and "int8 path" in report
    int8_row = next(line for line in report.splitlines() if line.startswith("| ft.int8.onnx@"))
    assert "cosine p1" in int8_row and "worst cosine" not in int8_row
    fp32_row = next(line for line in report.splitlines() if line.startswith("| ft.onnx@"))
    assert "max abs diff" in fp32_row


def test_pipeline_name_option_sets_the_names(ft: Path, tmp_path: Path) -> None:
    result = run("pipeline", "--weights", ft, "--exporter", "torchscript", "--calibration",
                 CALIBRATION, "--num-samples", "8", "--bench-iterations", "2", "--name",
                 "cats", "--min-top1", "0", "--triton", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "o" / "model_repository").iterdir() if p.is_dir()} \
        == {"cats", "cats_int8", "cats_image", "cats_int8_image"}
    assert run("pipeline", "--weights", ft, "--name", "no/slash", "-o",
               tmp_path / "p").exit_code == 2


def test_the_random_banner_and_a_busy_machine_reach_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_deploy.checks import bench

    monkeypatch.setattr(bench, "busy_warning", lambda results: "machine busy: compare ratios "
                        "only (test)")
    out = tmp_path / "out"
    result = run("pipeline", "--weights", "random", "--num-classes", "10", "--input-size", "32",
                 "--exporter", "torchscript", "--calibration", CALIBRATION, "--num-samples",
                 "8", "--bench-iterations", "2", "--min-top1", "0", "--min-cosine", "0",
                 "-o", out)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in report and "machine busy: compare ratios only (test)" in report
    assert "Weights: resnet18 random init (seed 0) - NOT a trained model" in report
    assert "warning: machine busy: compare ratios only (test)" in result.stderr


# --- 5. first-run edges ---------------------------------------------------------------------

def test_export_recognises_an_onnx_file_and_a_model_option(fp32: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "weights.pth"
    shutil.copy(fp32, renamed)
    for given in (fp32, renamed):
        result = run("export", "--weights", given, "-o", tmp_path / "e.onnx")
        assert result.exit_code == 2
        assert "is already an ONNX model" in result.stderr.splitlines()[-1]
    result = run("export", "--model", fp32, "-o", tmp_path / "e.onnx")
    assert result.exit_code == 2 and "--weights PATH" in result.stderr


def test_json_dash_writes_json_to_stdout_for_every_command(fp32: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "repo"
    commands = {
        "export": ["--weights", "random", "--num-classes", "10", "--input-size", "32",
                   "--exporter", "torchscript", "--simplify", "none", "-o", "e.onnx"],
        "quantize": ["--model", fp32, "--calibration", CALIBRATION, "-o", "q.onnx"],
        "parity": ["--model", fp32, "--random", "2", "--weights", "random"],
        "evaluate": ["--model", fp32, "--images", _two_class_folder(tmp_path)],
        "bench": ["--model", fp32, "--iterations", "2", "--warmup", "0", "--no-placement"],
        "convert-fp16": ["--model", fp32, "-o", "h.onnx"],
        "package": ["--model", fp32, "-o", repo],
        "pipeline": ["--weights", "random", "--num-classes", "10", "--input-size", "32",
                     "--exporter", "torchscript", "--calibration", CALIBRATION,
                     "--num-samples", "8", "--bench-iterations", "2", "--min-top1", "0",
                     "--min-cosine", "0", "-o", "pipe"],
        "verify": ["pipe/manifest.json"],
        "serve": ["--prepare"],
    }
    takes_json = {name for name, command in main.commands.items()
                  if any("--json" in p.opts for p in command.params)}
    assert takes_json == set(commands)
    for name, args in commands.items():
        result = run(name, *args, "--json", "-")
        assert result.exit_code == 0, f"{name}: {result.output}"
        data = json.loads(result.stdout)
        assert "machine" in data, name
        assert not Path("-").exists()


def _two_class_folder(root: Path) -> Path:
    folder = root / "two"
    for i, photo in enumerate(sorted(CALIBRATION.glob("*.jpg"))[:6]):
        target = folder / f"class{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    return folder


def test_a_long_list_of_layers_starts_with_the_closest(fp32: Path, tmp_path: Path) -> None:
    result = run("quantize", "--model", fp32, "--calibration", CALIBRATION, "--exclude",
                 "layer3.1.cnv2", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2
    line = result.stderr.splitlines()[-1]
    assert "it has 21 Conv/Gemm layers; closest first: layer3.1.conv2 (" in line
    assert line.endswith("and 13 more")


def test_evaluate_compares_each_model_with_the_first(fp32: Path, tmp_path: Path) -> None:
    int8 = tmp_path / "q.onnx"
    assert run("quantize", "--model", fp32, "--calibration", CALIBRATION, "-o",
               int8).exit_code == 0
    result = run("evaluate", "--model", fp32, "--model", int8, "--images",
                 _two_class_folder(tmp_path), "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "agrees with first" in result.output and "top-1 drop" in result.output
    models = json.loads((tmp_path / "e.json").read_text())["models"]
    assert models[0]["top1_agreement"] is None and 0 <= models[1]["top1_agreement"] <= 1
    assert models[1]["top1_drop_pt"] == pytest.approx(
        100 * (models[0]["top1"] - models[1]["top1"]), abs=1e-3)


def test_the_readme_and_the_demo_say_how_to_put_the_command_on_path() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "source .venv/bin/activate" in demo.splitlines()[-1]
    assert "offline: using random weights" in demo
    assert not re.search(r"FAILED|echo .*Error", demo)  # its expected offline path is no error
