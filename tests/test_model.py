"""ResNet-18 structure and every weight source/format."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from resnet_deploy.core.errors import UserError
from resnet_deploy.weights.checkpoints import load_model
from resnet_deploy.weights.resnet import resnet18

KEYS_FILE = Path(__file__).parent / "data" / "torchvision_resnet18_keys.txt"


def torchvision_keys() -> list[tuple[str, list[int]]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, _, shape = line.partition(" ")
        rows.append((key, [int(d) for d in shape.split(",") if d]))
    return rows


def test_state_dict_matches_torchvision_keys_and_shapes() -> None:
    ours = [(k, list(v.shape)) for k, v in resnet18(num_classes=1000).state_dict().items()]
    assert ours == torchvision_keys()


def test_parameter_count_matches_torchvision() -> None:
    assert sum(p.numel() for p in resnet18().parameters()) == 11_689_512


@pytest.mark.parametrize("num_classes", [1, 10, 1000])
@pytest.mark.parametrize("size", [32, 64, 97])
def test_forward_shape(num_classes: int, size: int) -> None:
    model = resnet18(num_classes=num_classes).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_random_is_seeded_and_labelled() -> None:
    a, info = load_model("random", num_classes=5, seed=3)
    b, _ = load_model("random", num_classes=5, seed=3)
    c, _ = load_model("random", num_classes=5, seed=4)
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert info.is_random and "random" in info.describe() and "seed 3" in info.describe()


@pytest.fixture
def trained_state() -> dict[str, torch.Tensor]:
    model, _ = load_model("random", num_classes=7, seed=1)
    return model.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_checkpoint_containers_load(tmp_path: Path, trained_state: dict, wrap: str) -> None:
    obj: object = trained_state
    if wrap == "state_dict":
        obj = {"state_dict": trained_state, "epoch": 3}
    elif wrap == "model":
        obj = {"model": trained_state}
    elif wrap == "dataparallel":
        obj = {f"module.{k}": v for k, v in trained_state.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model, info = load_model(str(path))
    assert info.num_classes == 7 and info.sha256 and len(info.sha256) == 64
    assert torch.equal(model.fc.weight, trained_state["fc.weight"])


def test_safetensors_loads(tmp_path: Path, trained_state: dict) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained_state.items()}, str(path))
    model, info = load_model(str(path))
    assert info.num_classes == 7
    assert torch.equal(model.conv1.weight, trained_state["conv1.weight"])


def test_num_classes_mismatch_is_an_error(tmp_path: Path, trained_state: dict) -> None:
    path = tmp_path / "w.pth"
    torch.save(trained_state, path)
    with pytest.raises(UserError, match="7 classes but `num_classes` is 3"):
        load_model(str(path), num_classes=3)


def test_wrong_keys_named(tmp_path: Path, trained_state: dict) -> None:
    state = dict(trained_state)
    state["layer9.extra"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        load_model(str(path))
    assert "layer1.0.conv1.weight" in str(err.value) and "layer9.extra" in str(err.value)


def test_wrong_shape_named(tmp_path: Path, trained_state: dict) -> None:
    state = dict(trained_state)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="layer2.0.conv1.weight"):
        load_model(str(path))


class _Evil:
    def __reduce__(self) -> tuple:
        return (Path("/tmp/resnet_deploy_pwned").write_text, ("executed",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_does_not_execute(tmp_path: Path) -> None:
    marker = Path("/tmp/resnet_deploy_pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"fc.weight": _Evil()}, fh)
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        load_model(str(path))
    assert not marker.exists()


def test_shared_cifar_checkpoint_loads(shared_data: Path) -> None:
    model, info = load_model(str(shared_data / "cifar10-resnet18" / "resnet18_cifar10_64.pth"))
    assert info.num_classes == 10 and not info.is_random


def test_imagenet_weights_come_from_the_hub_cache(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache-hit path: hash prefix checked, 1000 ImageNet labels attached."""
    import dataclasses

    from resnet_deploy.core.files import file_sha256
    from resnet_deploy.weights import arch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "stand-in.pth"
    cached.parent.mkdir(parents=True)
    reference, _ = load_model("random", num_classes=1000, seed=5)
    torch.save(reference.state_dict(), cached)
    named = cached.with_name(f"resnet18-{file_sha256(cached)[:8]}.pth")  # as torch.hub names it
    cached.rename(named)
    record = dataclasses.replace(arch.ARCHITECTURES["resnet18"],
                                 weights_url=f"https://example.invalid/{named.name}")
    monkeypatch.setitem(arch.ARCHITECTURES, "resnet18", record)
    model, info = load_model("imagenet")
    assert info.source == "imagenet" and not info.is_random
    assert info.labels is not None and len(info.labels) == 1000 and info.labels[0] == "tench"
    assert torch.equal(model.fc.weight, reference.fc.weight)


def test_the_pytorch_model_behind_an_onnx_one_keeps_its_class_count(tmp_path: Path) -> None:
    """When the recorded checkpoint is gone, the stand-in random init has the same fc."""
    from resnet_deploy.weights.checkpoints import load_for

    model, loaded, note = load_for({"source": str(tmp_path / "gone.pth"), "num_classes": 10})
    assert loaded.is_random and model.fc.out_features == 10
    assert note and "gone.pth" in note
    model, loaded, _ = load_for({"source": "random", "num_classes": 7, "seed": 3}, "random")
    assert model.fc.out_features == 7 and loaded.seed == 3
