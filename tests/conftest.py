"""Shared fixtures: small exported models, image folders, and the optional ../shared data."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from resnet_deploy.serving.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration"
SHARED = ROOT.parent / "shared" / "data"
CIFAR_CKPT = SHARED / "cifar10-resnet18" / "resnet18_cifar10_64.pth"
CIFAR_DEV = SHARED / "cifar10-dev"
CIFAR_CALIB = SHARED / "cifar10-calib"
IMAGENET_SAMPLES = SHARED / "imagenet-samples"


def cli_command() -> list[str]:
    """How a user runs the command: the installed script, else ``python -m resnet_deploy``."""
    script = Path(sys.executable).with_name("resnet-deploy")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "resnet_deploy"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip with a reason unless onnxruntime offers the CUDA provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    skip = pytest.mark.skip(reason="no CUDAExecutionProvider in this onnxruntime build")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _export(path: Path, weights: str, *, num_classes: int | None, input_size: int,
            resize_size: int | None = None) -> Path:
    from resnet_deploy.convert.export import ExportOptions, export
    from resnet_deploy.data.spec import PreprocessSpec
    from resnet_deploy.weights.checkpoints import load_model

    model, loaded = load_model(weights, num_classes=num_classes, seed=0)
    spec = PreprocessSpec.create(input_size, resize_size)
    labels = loaded.labels or [f"class{i}" for i in range(loaded.num_classes)]
    export(model, loaded, spec, path, labels=labels,
           options=ExportOptions(exporter="torchscript", parity_images=CALIBRATION))
    return path


@pytest.fixture(scope="session")
def random_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class random-init ResNet-18 at 64x64, exported with metadata (fast to run)."""
    path = tmp_path_factory.mktemp("random") / "random10.onnx"
    return _export(path, "random", num_classes=10, input_size=64)


@pytest.fixture(scope="module")
def fp32(random_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's private copy of ``random_onnx``, so outputs written beside it (the
    default A.int8.onnx) stay in that module's folder."""
    folder = tmp_path_factory.mktemp("fp32")
    return Path(shutil.copy(random_onnx, folder / "resnet18.onnx"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not CIFAR_CKPT.is_file():
        pytest.skip("../shared/data is absent (a fresh clone has no shared data)")
    return SHARED


@pytest.fixture(scope="session")
def cifar_onnx(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained CIFAR-10 checkpoint from ../shared, exported at 64x64 (resize 73)."""
    path = tmp_path_factory.mktemp("cifar") / "cifar.onnx"
    return _export(path, str(CIFAR_CKPT), num_classes=None, input_size=64, resize_size=73)


@pytest.fixture
def bare_onnx(random_onnx: Path, tmp_path: Path) -> Path:
    """``random_onnx`` without its resnet-deploy metadata, like a model exported elsewhere."""
    import onnx

    from resnet_deploy.artifact.metadata import METADATA_KEY

    model = onnx.load(str(random_onnx))
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    path = tmp_path / "bare.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageFolder (two classes) built from the shipped calibration photos."""
    root = tmp_path / "imagefolder"
    photos = sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")
    for i, photo in enumerate(photos):
        cls = root / ("class0" if i % 2 == 0 else "class1")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, cls / photo.name)
    return root


def assert_names_machine(data: dict, output: str) -> None:
    """Every command's JSON carries the machine, and its printed tables name the CPU."""
    from resnet_deploy.core.machine import cpu_info

    cpu = cpu_info()
    machine = data["machine"]
    assert machine["cpu"] == cpu["cpu"] and machine["int8_path"] == cpu["int8_path"]
    assert set(machine["flags"]) <= {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                     "amx_tile", "amx_int8", "f16c", "fma"}
    assert "onnxruntime" in machine["versions"]
    assert f"int8 path {cpu['int8_path']}" in output and cpu["cpu"] in output


@pytest.fixture(scope="session")
def static_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class random ResNet-18 at 64x64 exported with a fixed batch of 1."""
    from resnet_deploy.convert.export import ExportOptions, export
    from resnet_deploy.data.spec import PreprocessSpec
    from resnet_deploy.weights.checkpoints import load_model

    path = tmp_path_factory.mktemp("static") / "static.onnx"
    model, loaded = load_model("random", num_classes=10, seed=0)
    export(model, loaded, PreprocessSpec.create(64), path,
           options=ExportOptions(exporter="torchscript", dynamic_batch=False,
                                 parity_images=None, parity_samples=2))
    return path


@contextlib.contextmanager
def running_triton(repository: Path) -> Iterator[TritonServer]:
    """A real Triton (the nvidia-pytriton wheel's, with the stub env ``make test`` built) on
    ``repository``: loopback only, free ports, no metrics; stopped by its PID at the end,
    and nothing of it (process, /dev/shm segment, python_env folder) may be left.

    The stub env is never built here: a test run does not reach for the network."""
    from resnet_deploy.serving.server import ServerOptions, TritonServer
    from resnet_deploy.serving.stub_env import stub_env

    server = TritonServer(repository, ServerOptions(ready_timeout_s=120),
                          env=stub_env(build=False))
    with server:
        pids = server.pids()
        prefix = server.shm_prefix
        yield server
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                and "zombie" not in _proc_state(pid)], "a Triton process outlived its stop"
    assert not list(Path("/dev/shm").glob(f"{prefix}*")), "a shm segment was left"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
