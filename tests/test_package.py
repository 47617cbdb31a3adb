"""package: Triton configs derived from the graph, parsed with Triton's schema, refused when
Triton would refuse them, and published all or nothing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from resnet_deploy.artifact.metadata import load_onnx
from resnet_deploy.cli import main
from resnet_deploy.core.errors import UserError
from resnet_deploy.serving.repository import package_triton
from resnet_deploy.serving.triton import (TritonOptions, check_repository, config_problems,
                                          repository_name)

from .conftest import CALIBRATION


@pytest.fixture(scope="module")
def models(random_onnx: Path, static_onnx: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FP32 dynamic and static batch, FP16, INT8 for CPU and INT8 for TensorRT."""
    from resnet_deploy.convert.fp16 import Fp16Options, convert_fp16
    from resnet_deploy.convert.quantize.publish import quantize
    from resnet_deploy.convert.quantize.recipe import QuantizeOptions

    folder = tmp_path_factory.mktemp("package-models")
    fp32 = Path(shutil.copy(random_onnx, folder / "resnet18.onnx"))
    found = {"fp32": fp32, "static": Path(shutil.copy(static_onnx, folder / "static.onnx"))}
    found["fp16"] = Path(convert_fp16(fp32, folder / "resnet18.fp16.onnx",
                                      options=Fp16Options(check_images=None)).output)
    for target, name in (("cpu", "resnet18.int8.onnx"), ("tensorrt", "trt.int8.onnx")):
        quantize(fp32, CALIBRATION, folder / name,
                 options=QuantizeOptions(target=target, num_samples=8, check=False))
        found[f"int8-{target}"] = folder / name
    return found


def _config(repo: Path, name: str) -> pb.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), pb.ModelConfig())


def _invoke(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_names_follow_the_file_name() -> None:
    assert repository_name("a/resnet18.int8.onnx") == "resnet18_int8"
    assert repository_name("m.onnx") == "m"


def test_dynamic_fp32_on_cpu(models: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = _invoke("package", "--format", "triton", "--model", models["fp32"], "-o", repo)
    assert result.exit_code == 0, result.output
    config = _config(repo, "resnet18")
    assert config.name == "resnet18" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == \
        [("input", "TYPE_FP32", [3, 64, 64])]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == \
        [("logits", [10], "labels.txt")]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    group = config.instance_group[0]
    assert group.kind == pb.ModelInstanceGroup.KIND_CPU and group.count == 1
    warmup = config.model_warmup[0]
    assert warmup.batch_size == 1 and warmup.inputs["input"].zero_data
    assert list(warmup.inputs["input"].dims) == [3, 64, 64]
    assert config.parameters["preprocess_input_size"].string_value == "64"
    assert config.parameters["preprocess_resize_size"].string_value == "73"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    labels = (repo / "resnet18" / "labels.txt").read_text().split()
    assert labels == [f"class{i}" for i in range(10)]
    assert (repo / "resnet18" / "1" / "model.onnx").read_bytes() == models["fp32"].read_bytes()
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "InferInput(\"input\"" in readme
    assert "73" in readme and "0.229" in readme  # the model's own preprocessing


def test_static_batch_keeps_the_full_shape(models: dict[str, Path], tmp_path: Path) -> None:
    package_triton([models["static"]], tmp_path / "repo")
    config = _config(tmp_path / "repo", "static")
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 3, 64, 64]
    assert list(config.output[0].dims) == [1, 10]
    assert not config.HasField("dynamic_batching")
    assert list(config.model_warmup[0].inputs["input"].dims) == [1, 3, 64, 64]


@pytest.mark.parametrize(("model", "device", "tensorrt", "mode"), [
    ("int8-cpu", "cpu", None, None),
    ("fp16", "gpu", None, None),
    ("fp16", "gpu", "fp16", "FP16"),
    ("fp32", "gpu", "int8", "FP16"),
    ("int8-tensorrt", "gpu", "int8", "INT8"),
])
def test_precisions_and_instance_groups(models: dict[str, Path], tmp_path: Path, model: str,
                                        device: str, tensorrt: str | None,
                                        mode: str | None) -> None:
    result = package_triton([models[model]], tmp_path / "repo",
                            options=TritonOptions(device=device, tensorrt=tensorrt,
                                                  instance_count=2))
    config = _config(tmp_path / "repo", result.models[0].name)
    kind = pb.ModelInstanceGroup.KIND_GPU if device == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    assert config.instance_group[0].kind == kind and config.instance_group[0].count == 2
    dtype = {"fp16": "fp16"}.get(model, "int8" if "int8" in model else "fp32")
    assert config.parameters["precision"].string_value == dtype
    assert pb.DataType.Name(config.input[0].data_type) == "TYPE_FP32"  # FP32 I/O kept
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if mode is None:
        assert not accelerators
    else:
        assert accelerators[0].name == "tensorrt"
        assert accelerators[0].parameters["precision_mode"] == mode
        assert accelerators[0].parameters["trt_engine_cache_enable"] == "true"
        assert int(accelerators[0].parameters["max_workspace_size_bytes"]) == 1 << 30


@pytest.mark.parametrize(("model", "args", "message"), [
    ("int8-cpu", ["--device", "gpu"], "needs the TensorRT accelerator in INT8"),
    ("int8-tensorrt", ["--device", "gpu", "--tensorrt", "fp16"], "--tensorrt int8"),
    ("int8-cpu", ["--device", "gpu", "--tensorrt", "int8"], "only symmetric int8"),
    ("fp32", ["--tensorrt", "fp16"], "--tensorrt is a GPU accelerator"),
    ("fp32", ["--preferred-batch-size", "64"], "between 1 and --max-batch-size 32"),
])
def test_refuses_what_triton_would_refuse(models: dict[str, Path], tmp_path: Path, model: str,
                                          args: list[str], message: str) -> None:
    repo = tmp_path / "repo"
    result = _invoke("package", "--model", models[model], "-o", repo, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not repo.exists() and not list(tmp_path.iterdir())  # nothing, not even temp files


def test_two_models_one_name_and_foreign_folders_are_refused(models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    other = tmp_path / "x" / models["fp32"].name
    other.parent.mkdir()
    shutil.copy(models["fp32"], other)
    with pytest.raises(UserError, match="map to the Triton name 'resnet18'"):
        package_triton([models["fp32"], other], tmp_path / "repo")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by 'resnet-deploy package'"):
        package_triton([models["fp32"]], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_repository_is_replaced_whole(models: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    package_triton([models["fp32"], models["int8-cpu"]], repo)
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "resnet18", "resnet18_image",
                                                      "resnet18_int8", "resnet18_int8_image"]
    package_triton([models["fp16"]], repo)
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "resnet18_fp16",
                                                      "resnet18_fp16_image"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize(("edit", "message"), [
    (("dims: 64\n  dims: 64", "dims: 64\n  dims: 32"), "do not match the graph"),
    (("data_type: TYPE_FP32", "data_type: TYPE_FP16"), "the graph has TYPE_FP32"),
    (('name: "input"', 'name: "image"'), "differ from the graph's"),
    (("max_batch_size: 32", "max_batch_size: 4"), "preferred batch sizes"),
    (("kind: KIND_CPU", "kind: KIND_CPU\n  gpus: 0"), "KIND_CPU instances cannot name GPUs"),
    (('platform: "onnxruntime_onnx"', 'platfrom: "onnxruntime_onnx"'), "not a valid Triton"),
])
def test_check_repository_catches_hand_edits(models: dict[str, Path], tmp_path: Path,
                                             edit: tuple[str, str], message: str) -> None:
    repo = tmp_path / "repo"
    package_triton([models["fp32"]], repo)
    config = repo / "resnet18" / "config.pbtxt"
    text = config.read_text()
    assert edit[0] in text
    config.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(UserError, match=message):
        check_repository(repo)


def test_label_count_and_static_batch_rules(models: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    package_triton([models["fp32"], models["static"]], repo)
    (repo / "resnet18" / "labels.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="has 2 labels for 10 classes"):
        check_repository(repo)
    # A batching config on a graph whose batch dimension is fixed: Triton refuses it.
    config = _config(repo, "static")
    config.max_batch_size = 8
    del config.input[0].dims[0]
    problems = config_problems(config, load_onnx(models["static"]), repo / "static")
    assert any("batch dimension is fixed" in p for p in problems)


def test_missing_tritonclient_is_exit_2_with_the_install_hint(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    result = _invoke("package", "--model", models["fp32"], "-o", tmp_path / "repo")
    assert result.exit_code == 2
    assert "pip install 'resnet-deploy[triton]'" in result.output
    assert not (tmp_path / "repo").exists()
