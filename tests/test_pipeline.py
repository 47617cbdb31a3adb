"""pipeline and verify: every step once, nothing twice, exactly the downstream steps after a
change, and a manifest whose hashes prove it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from resnet_deploy.cli import main
from resnet_deploy.core.files import file_sha256
from resnet_deploy.core.metrics import ToleranceOverrides
from resnet_deploy.data.spec import PreprocessSpec
from resnet_deploy.pipeline import steps as pipeline_module
from resnet_deploy.pipeline.engine import Outcome
from resnet_deploy.pipeline.manifest import FORMAT
from resnet_deploy.pipeline.steps import PipelineOptions, run_pipeline
from resnet_deploy.pipeline.verify import verify
from resnet_deploy.serving.triton import TritonOptions
from resnet_deploy.weights.card import resolve_preprocess

from .conftest import CALIBRATION

ALL = ["export", "quantize", "parity", "evaluate", "bench", "triton", "serve", "report"]


def _invoke(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of the shipped photos to calibrate with, a two-class ImageFolder of them, and
    class names that map the folders by name."""
    root = tmp_path_factory.mktemp("pipeline-inputs")
    calibration = Path(shutil.copytree(CALIBRATION, root / "calibration"))
    labelled = root / "labelled"
    for i, photo in enumerate(sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")):
        folder = labelled / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    labels = root / "labels.txt"
    labels.write_text("".join(f"class{i}\n" for i in range(10)))
    return {"calibration": calibration, "eval": labelled, "labels": labels}


def _args(inputs: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return ["pipeline", "--weights", "random", "--num-classes", "10", "--input-size", "64",
            "--exporter", "torchscript", "--labels", inputs["labels"],
            "--calibration", inputs["calibration"], "--eval-images", inputs["eval"],
            "--num-samples", "8", "--bench-iterations", "5",
            "--triton", "-o", out, *extra]


def _statuses(out: Path) -> dict[str, str]:
    data = json.loads((out / "manifest.json").read_text())
    return {name: step["status"] for name, step in data["steps"].items()}


@pytest.fixture(scope="module")
def first(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "out"
    result = _invoke(*_args(inputs, out, "--json", out.parent / "run.json"))
    assert result.exit_code == 0, result.output
    for step in ALL:
        assert f"{step}: built" in result.output
    assert "manifest:" in result.output and "int8 path" in result.output
    return out


def _copy(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "out"))


def test_the_manifest_lists_every_file_with_its_hash(first: Path) -> None:
    data = json.loads((first / "manifest.json").read_text())
    assert list(data["steps"]) == ALL and set(_statuses(first).values()) == {"built"}
    listed = {a["path"]: a for a in data["artifacts"]}
    on_disk = {p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"manifest.json"}
    for path, entry in listed.items():
        assert entry["sha256"] == file_sha256(first / path)
        assert entry["bytes"] == (first / path).stat().st_size
    assert {"resnet18.onnx", "resnet18.int8.onnx", "report.md", "bench.png",
            "model_repository/resnet18_int8/config.pbtxt"} <= set(listed)
    quantize = data["steps"]["quantize"]
    assert quantize["inputs"]["fp32_model"]["sha256"] == listed["resnet18.onnx"]["sha256"]
    photos = quantize["inputs"]["calibration"]["files"]
    assert len(photos) == 17 and photos["astronaut.jpg"] == file_sha256(
        CALIBRATION / "astronaut.jpg")
    assert quantize["options"]["options"]["num_samples"] == 8  # QuantizeOptions, as passed
    assert quantize["results"]["check_passed"]
    assert data["steps"]["export"]["inputs"]["weights"] == {"kind": "value", "value": "random"}
    assert data["steps"]["parity"]["results"]["passed"] is True
    assert len(data["steps"]["evaluate"]["results"]["models"]) == 2
    assert data["machine"]["int8_path"] and "onnxruntime" in data["versions"]
    report = (first / "report.md").read_text()
    assert "## Parity" in report and "## Latency" in report and "bench.png" in report


def test_a_second_run_rebuilds_nothing(first: Path, inputs: dict[str, Path]) -> None:
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*.onnx")}
    result = _invoke(*_args(inputs, first))
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date") >= len(ALL)
    assert set(_statuses(first).values()) == {"up to date"}
    assert before == {p: p.stat().st_mtime_ns for p in first.rglob("*.onnx")}


def test_verify_names_modified_and_missing_artifacts(first: Path, tmp_path: Path) -> None:
    out = _copy(first, tmp_path)
    result = _invoke("verify", out / "manifest.json")
    assert result.exit_code == 0, result.output
    assert "all hold" in result.output
    with open(out / "resnet18.int8.onnx", "ab") as fh:
        fh.write(b"\0")
    (out / "model_repository" / "resnet18" / "labels.txt").unlink()
    result = _invoke("verify", out / "manifest.json")
    assert result.exit_code == 1
    assert "modified: resnet18.int8.onnx (quantize)" in result.output
    assert "missing: model_repository/resnet18/labels.txt (triton)" in result.output


MALFORMED_STEPS = [{"export": {"step": "export"}}, {"export": []},
                   {"export": {"step": "export", "status": "built", "key": "k", "inputs": {},
                               "options": {}, "outputs": [{"path": 1}]}}]


@pytest.mark.parametrize("content", [None, "{not json", '{"format": "other"}',
                                     *(json.dumps({"format": FORMAT, "steps": steps})
                                       for steps in MALFORMED_STEPS)])
def test_verify_without_a_readable_manifest_is_exit_2(tmp_path: Path,
                                                      content: str | None) -> None:
    manifest = tmp_path / "manifest.json"
    if content is not None:
        manifest.write_text(content)
    result = _invoke("verify", manifest)
    assert result.exit_code == 2
    assert str(manifest) in result.output and len(result.output.strip().splitlines()) == 1


def test_a_new_calibration_photo_rebuilds_int8_and_what_follows(
        first: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(first, tmp_path)
    calibration = Path(shutil.copytree(inputs["calibration"], tmp_path / "calibration"))
    preprocessing = resolve_preprocess({"input_size": 64})  # as the CLI's --input-size 64
    options = PipelineOptions(
        weights="random", num_classes=10, spec=preprocessing.spec,
        spec_sources=preprocessing.sources, labels_source=f"{inputs['labels']} (--labels)",
        labels=tuple(f"class{i}" for i in range(10)), exporter="torchscript",
        calibration=calibration, eval_images=inputs["eval"], num_samples=8,
        bench_iterations=5, triton=TritonOptions())
    run_pipeline(out, options)  # the same photos elsewhere: contents count, not paths
    assert set(_statuses(out).values()) == {"up to date"}
    shutil.copy(calibration / "coffee.jpg", calibration / "coffee2.jpg")
    stale = verify(out / "manifest.json").problems
    assert stale[0] == "stale: resnet18.int8.onnx (quantize: calibration changed since it " \
                       "was built)"
    assert [p.split(" (")[1].split(":")[0] for p in stale[1:]] == ALL[2:]
    lines: list[str] = []
    run_pipeline(out, options, progress=lines.append)
    assert _statuses(out) == {"export": "up to date", **{s: "built" for s in ALL[1:]}}
    assert lines[0].endswith("export: up to date") and len(lines) == len(ALL)
    assert verify(out / "manifest.json")


def test_a_failed_step_stops_with_its_exit_code_and_keeps_earlier_steps(
        first: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = _copy(first, tmp_path)
    few = tmp_path / "few"
    few.mkdir()
    for photo in sorted(inputs["calibration"].glob("*.jpg"))[:3]:
        shutil.copy(photo, few / photo.name)
    args = _args(inputs, out)
    args[args.index(inputs["calibration"])] = few
    at = args.index("--eval-images")  # without it, quantize holds photos back to check on
    result = _invoke(*args[:at], *args[at + 2:])
    assert result.exit_code == 2, result.output
    assert "export: up to date" in result.output and "quantize: FAILED" in result.output
    assert "parity:" not in result.output
    data = json.loads((out / "manifest.json").read_text())
    assert data["steps"]["export"]["status"] == "up to date"
    assert data["steps"]["quantize"]["status"] == "failed"
    assert "too few" in data["steps"]["quantize"]["error"]
    result = _invoke("verify", out / "manifest.json")
    assert result.exit_code == 1 and "step quantize failed" in result.output


def test_an_interrupted_run_keeps_its_finished_steps(
        first: Path, inputs: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy(first, tmp_path)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "_report", interrupted)
    result = _invoke(*_args(inputs, out, "--bench-iterations", "6"))
    assert result.exit_code == 130
    statuses = _statuses(out)
    assert statuses["bench"] == "built" and statuses["parity"] == "up to date"
    assert not [p for p in out.rglob(".*")]  # no temp file left behind
    problems = verify(out / "manifest.json").problems
    assert [p.split(" (")[0] for p in problems] == ["stale: report.md, bench.png"]


@pytest.mark.parametrize(("change", "message"), [
    (("--provider", "nosuch"), "nosuch"),
    (("--calibration", "{missing}"), "no such image folder"),
    (("--weights", "{missing}"), "no such file"),
])
def test_bad_inputs_are_exit_2_before_any_step(inputs: dict[str, Path], tmp_path: Path,
                                               change: tuple[str, str], message: str) -> None:
    args = _args(inputs, tmp_path / "out")
    option, value = change
    value = value.replace("{missing}", str(tmp_path / "missing"))
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output.splitlines()[-1] and "export:" not in result.output
    assert not (tmp_path / "out").exists()


def test_outputs_that_would_change_the_inputs_are_exit_2(inputs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """A folder inside the calibration set would add bench.png to it as a "photo"; --json
    on the manifest would replace the record verify reads."""
    before = sorted(p.name for p in inputs["calibration"].rglob("*"))
    inside = inputs["calibration"] / "out"
    result = _invoke(*_args(inputs, inside))
    assert result.exit_code == 2 and "inside the input folder" in result.output
    assert sorted(p.name for p in inputs["calibration"].rglob("*")) == before
    out = tmp_path / "out"
    out.mkdir()
    result = _invoke(*_args(inputs, out), "--json", out / "manifest.json")
    assert result.exit_code == 2 and "is inside the output folder" in result.output
    assert list(out.iterdir()) == []


# --- each option rebuilds exactly its step and what depends on it ------------------------------

# Which steps a PipelineOptions field reaches directly (through the plan each step passes to
# the library). Fields that are inputs (hashed by content) or change which steps exist are
# tested elsewhere: weights, calibration, eval_images, providers.
DIRECT = {
    "num_classes": {"export"}, "spec": {"export"}, "spec_sources": {"export"},
    # random weights are named after their architecture: a new one renames every model
    "arch": {"export", "quantize", "fp16", "triton"},
    "labels": {"export"}, "labels_source": {"export"}, "exporter": {"export"},
    "dynamic_batch": {"export"}, "name": {"export", "quantize", "fp16", "triton"},
    "method": {"quantize"}, "num_samples": {"quantize"}, "target": {"quantize"},
    "gate": {"quantize", "parity", "serve"}, "parity_limit": {"parity"},
    "bench_batch_sizes": {"bench"}, "bench_iterations": {"bench"}, "bench_warmup": {"bench"},
    "triton": {"triton"}, "seed": {"export", "quantize", "fp16", "parity", "evaluate", "bench"},
}
NOT_PLANNED = {"weights", "calibration", "eval_images", "providers", "force", "features"}
SERVED = {"triton", "serve", "report"}
DOWNSTREAM = {"export": {"quantize", "fp16", "parity", "evaluate", "bench", *SERVED},
              "quantize": {"parity", "evaluate", "bench", *SERVED},
              "fp16": {"parity", "evaluate", "bench", *SERVED},
              "parity": {"serve", "report"}, "evaluate": {"report"}, "bench": {"report"},
              "triton": {"serve", "report"}, "serve": {"report"}, "report": set()}
CHANGED = {
    "num_classes": 12, "spec": PreprocessSpec.create(40), "arch": "resnet34",
    "spec_sources": {"input_size": "given"}, "labels": tuple(f"k{i}" for i in range(10)),
    "labels_source": "other.txt", "exporter": "dynamo", "dynamic_batch": False,
    "name": "renamed", "method": "percentile", "num_samples": 9, "target": "cpu-vnni",
    "gate": ToleranceOverrides(min_top1=0.5, precisions=("int8",)), "parity_limit": 7,
    "bench_batch_sizes": (1, 2), "bench_iterations": 4, "bench_warmup": 1,
    "triton": TritonOptions(max_batch_size=8), "seed": 5,
}


def _fake_steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every step's run replaced by one that writes its files, new content each time it
    runs (a rebuilt artifact differs), and records which steps ran."""
    from resnet_deploy.pipeline import facts
    from resnet_deploy.runtime import providers

    ran: list[str] = []
    runs = itertools.count()

    def fake(step: str, files: Any) -> Any:
        def run(r: Any, plan: Any) -> Outcome:
            ran.append(step)
            paths = [r.out / f for f in files(r, plan)]
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{step} run {next(runs)}")
            return Outcome(tuple(paths), facts.FACTS[step]())
        return run

    outputs = {"export": lambda r, p: [p.output], "quantize": lambda r, p: [p.output],
               "fp16": lambda r, p: [p.output],
               "parity": lambda r, p: ["parity.json", p.saved_outputs],
               "evaluate": lambda r, p: ["evaluate.json"], "bench": lambda r, p: ["bench.json"],
               "report": lambda r, p: ["report.md"],
               "triton": lambda r, p: ["model_repository/README.md"], "serve": lambda r, p: []}
    for step, files in outputs.items():
        monkeypatch.setattr(pipeline_module, f"_{step}", fake(step, files))
    monkeypatch.setattr(providers, "require_provider", lambda name: name)
    return ran


def test_each_option_rebuilds_exactly_its_step_and_what_depends_on_it(
        inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(DIRECT) | NOT_PLANNED == {f.name for f in dataclasses.fields(PipelineOptions)}
    ran = _fake_steps(monkeypatch)
    base = PipelineOptions(
        weights="random", num_classes=10, spec=PreprocessSpec.create(32),
        exporter="torchscript", calibration=inputs["calibration"], eval_images=inputs["eval"],
        providers=("cpu", "cuda"), num_samples=8, triton=TritonOptions())
    out = tmp_path / "out"
    run_pipeline(out, base)
    every = set(ran)
    assert every == set(DOWNSTREAM)
    for name, value in CHANGED.items():
        ran.clear()
        run_pipeline(out, base)  # back to the base: whatever the last change rebuilt
        ran.clear()
        run_pipeline(out, dataclasses.replace(base, **{name: value}))
        expected = set().union(*({s} | DOWNSTREAM[s] for s in DIRECT[name]))
        assert set(ran) == expected, f"changing {name} rebuilt {sorted(ran)}"
