"""The ResNet family against torchvision, which serves only as a test-time oracle.

torchvision is imported here and nowhere in the package. Where its wheel cannot load its
C++ ops beside this torch (a CUDA build of torchvision next to a CPU torch fails with
"operator torchvision::nms does not exist"), :func:`torchvision_resnet` imports
``torchvision/models/resnet.py`` alone, skipping the two package ``__init__`` files that
load the ops: the ResNet builders and weight enums need none of them. Without torchvision
the oracle tests skip; the architecture tests need neither torchvision nor torch weights.

Fast by construction: shape and key checks build on the ``meta`` device (no memory, no
init); the numeric checks build each member once (cached) and run 64-px inputs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import subprocess
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from resnet_deploy.weights import arch, resnet

NAMES = list(arch.ARCHITECTURES)
SIZE = 64  # px: the smallest input that still leaves layer4 a 2x2 map
REL_TOL = 1e-5  # max |ours - torchvision|, relative to max |torchvision|


@functools.cache
def _torchvision_resnet() -> types.ModuleType | None:
    try:
        return importlib.import_module("torchvision.models.resnet")
    except ModuleNotFoundError:
        return None
    except (ImportError, OSError, RuntimeError):  # its compiled ops do not fit this torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent
    for name, path in (("torchvision", root), ("torchvision.models", root / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    return importlib.import_module("torchvision.models.resnet")


@pytest.fixture(scope="session")
def tv() -> types.ModuleType:
    """``torchvision.models.resnet`` (see the module docstring), or a skip."""
    module = _torchvision_resnet()
    if module is None:
        pytest.skip("torchvision is not installed (pip install torchvision): no oracle")
    return module


def _meta(build: Any, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        model: nn.Module = build(**kwargs)
    return model


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


class Shaped(NamedTuple):
    """A stand-in for a tensor that has nothing but a shape (what arch reads)."""

    shape: tuple[int, ...]


def _state(name: str, num_classes: int | None = 1000) -> dict[str, Shaped]:
    return {k: Shaped(s) for k, s in
            arch.expected_shapes(arch.ARCHITECTURES[name], num_classes).items()}


# -- keys, shapes, parameter counts, published records ------------------------------------

@pytest.mark.parametrize("num_classes", [1000, 10])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_modules_match_torchvision(tv: types.ModuleType, name: str,
                                                  num_classes: int) -> None:
    theirs = _meta(getattr(tv, name), num_classes=num_classes)
    ours = _meta(getattr(resnet, name), num_classes=num_classes)
    assert _shapes(ours) == _shapes(theirs)  # same keys, shapes and order
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert list(arch.expected_shapes(arch.ARCHITECTURES[name], num_classes).items()) \
        == _shapes(theirs)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    if num_classes == 1000:
        published = importlib.import_module("torchvision.models._api") \
            .get_model_weights(name).IMAGENET1K_V1
        assert count == published.meta["num_params"]


def test_resnet18_has_the_known_parameter_count() -> None:
    assert sum(p.numel() for p in _meta(resnet.resnet18).parameters()) == 11_689_512


@pytest.mark.parametrize("name", NAMES)
def test_published_weights_record_is_torchvisions_v1(tv: types.ModuleType, name: str) -> None:
    published = importlib.import_module("torchvision.models._api") \
        .get_model_weights(name).IMAGENET1K_V1
    record = arch.ARCHITECTURES[name]
    assert record.weights_url == published.url
    assert record.weights_filename == published.url.rsplit("/", 1)[-1]
    assert published.url.endswith(f"-{record.sha256_prefix}.pth")
    assert record.top1 == pytest.approx(published.meta["_metrics"]["ImageNet-1K"]["acc@1"] / 100)
    preset = published.transforms()
    assert (record.input_size, record.resize_size) == (preset.crop_size[0],
                                                       preset.resize_size[0])
    fc = _meta(getattr(tv, name)).get_submodule("fc")
    assert isinstance(fc, nn.Linear) and fc.in_features == record.feature_dim


# -- numerics -------------------------------------------------------------------------------

class Outputs(NamedTuple):
    theirs_logits: torch.Tensor
    ours_logits: torch.Tensor
    theirs_features: torch.Tensor
    ours_features: torch.Tensor


def _perturb(model: nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm non-trivial statistics and affine terms, so that a swapped or skipped
    BN (an identity at its defaults) changes the output."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.weight, 0.5, 1.0), (module.bias, -0.2, 0.2),
                                      (module.running_mean, -0.2, 0.2),
                                      (module.running_var, 0.5, 1.5)):
                assert tensor is not None
                with torch.no_grad():
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high,
                                                                   generator=generator))


@functools.cache
def _outputs(name: str) -> Outputs:
    """Each member built once: torchvision's seeded weights, loaded strictly into ours (full
    and features-only), all three run on one seeded 64-px image."""
    tv = _torchvision_resnet()
    assert tv is not None
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    theirs = getattr(tv, name)(num_classes=10).eval()
    _perturb(theirs, generator)
    state = theirs.state_dict()
    ours = _meta(getattr(resnet, name), num_classes=10)
    ours.load_state_dict(state, strict=True, assign=True)
    backbone = _meta(getattr(resnet, name), num_classes=None)
    backbone.load_state_dict(arch.without_head(state), strict=True, assign=True)
    pooled: list[torch.Tensor] = []
    theirs.avgpool.register_forward_hook(lambda _m, _i, out: pooled.append(torch.flatten(out, 1)))
    x = torch.randn(1, 3, SIZE, SIZE, generator=generator)
    with torch.inference_mode():
        return Outputs(theirs(x), ours.eval()(x), pooled[0], backbone.eval()(x))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert torch.isfinite(theirs).all()
    assert (ours - theirs).abs().max() <= REL_TOL * theirs.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_torchvision(tv: types.ModuleType, name: str) -> None:
    out = _outputs(name)
    _close(out.ours_logits, out.theirs_logits)


@pytest.mark.parametrize("name", NAMES)
def test_features_mode_gives_torchvisions_pooled_features(tv: types.ModuleType,
                                                          name: str) -> None:
    out = _outputs(name)
    assert out.ours_features.shape == (1, arch.ARCHITECTURES[name].feature_dim)
    _close(out.ours_features, out.theirs_features)


@pytest.mark.parametrize("zero_init_residual", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_same_seed_gives_torchvisions_weights(tv: types.ModuleType, name: str,
                                              zero_init_residual: bool) -> None:
    """Construction order is torchvision's, so ``--weights random --seed N`` is too."""
    torch.manual_seed(0)
    theirs = getattr(tv, name)(zero_init_residual=zero_init_residual).state_dict()
    torch.manual_seed(0)
    ours = getattr(resnet, name)(zero_init_residual=zero_init_residual).state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    last = "layer1.0.bn3.weight" if "layer1.0.bn3.weight" in ours else "layer1.0.bn2.weight"
    assert bool((ours[last] == 0).all()) == zero_init_residual


def test_features_only_model_has_no_head_and_rejects_one() -> None:
    backbone = _meta(resnet.resnet50, num_classes=None)
    assert backbone.fc is None and "fc" not in dict(backbone.named_modules())
    full = _meta(resnet.resnet50).state_dict()
    with pytest.raises(RuntimeError, match="fc.weight"):
        backbone.load_state_dict(full, strict=True, assign=True)


def test_features_only_onnx_graph_ends_at_the_pooling(tmp_path: Path) -> None:
    """The exported features graph has no fc (no Gemm/MatMul), its grouped convs keep their
    groups, and ONNX Runtime reproduces the torch features."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = resnet.resnext50_32x4d(num_classes=None).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    path = tmp_path / "features.onnx"
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18)
    assert program is not None
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"Gemm", "MatMul"}
    assert not any(init.name.startswith("fc.") for init in graph.initializer)
    groups = {a.i for node in graph.node if node.op_type == "Conv" for a in node.attribute
              if a.name == "group"}
    assert groups == {1, 32}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        want = model(x)
    _close(torch.from_numpy(got), want)


def test_constructors_are_keyword_only_and_check_their_arguments() -> None:
    with pytest.raises(TypeError):
        resnet.resnet18(10)  # type: ignore[call-arg]
    assert resnet.resnet101.__name__ == "resnet101"
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_classes must be positive"):
            resnet.resnet18(num_classes=bad)
    with pytest.raises(ValueError, match="did you mean resnet50"):
        resnet.build("resnet51")
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        resnet.BasicBlock(64, 64, groups=32)
    with pytest.raises(ValueError, match="4 positive block counts"):
        resnet.ResNet(resnet.BasicBlock, [2, 2, 2])


# -- architecture inference ---------------------------------------------------------------

@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("num_classes", [1000, 10])
@pytest.mark.parametrize("name", NAMES)
def test_infer_recovers_every_member_from_torchvision(tv: types.ModuleType, name: str,
                                                      num_classes: int, head: bool) -> None:
    state = _meta(getattr(tv, name), num_classes=num_classes).state_dict()
    if not head:
        state = arch.without_head(state)
    assert arch.infer_architecture(state) is arch.ARCHITECTURES[name]
    assert arch.infer_architecture(state, arch=name) is arch.ARCHITECTURES[name]
    assert arch.num_classes(state) == (num_classes if head else None)


def test_arch_needs_no_torch() -> None:
    """arch works on anything with a ``.shape`` and does not import torch."""
    assert arch.infer_architecture(_state("wide_resnet50_2", 7)).name == "wide_resnet50_2"
    root = Path(arch.__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import {arch.__name__}; "
            "sys.exit(any(m.split('.')[0] == 'torch' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_old_checkpoints_without_num_batches_tracked_are_accepted() -> None:
    """BatchNorm fills the counter in when it loads, so its absence is no difference."""
    state = {k: v for k, v in _state("resnet34").items() if "num_batches_tracked" not in k}
    assert arch.infer_architecture(state).name == "resnet34"


def _unknown(state: Mapping[str, Any], **kwargs: Any) -> arch.UnknownArchitecture:
    with pytest.raises(arch.UnknownArchitecture) as caught:
        arch.infer_architecture(state, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    assert isinstance(caught.value, ValueError)
    return caught.value


def test_a_missing_block_names_the_stage() -> None:
    state = {k: v for k, v in _state("resnet50").items() if not k.startswith("layer3.5.")}
    error = _unknown(state)
    assert (error.nearest, error.compared_to) == ("resnet50", "resnet50")
    assert str(error).startswith("fits none of the torchvision ResNets: nearest is resnet50: "
                                 "layer3 has 5 blocks, resnet50 has 6; 15 missing keys "
                                 "(layer3.5.conv1.weight, ")


def test_altered_groups_name_the_grouped_convs() -> None:
    state = _state("resnext50_32x4d")
    for key, value in list(state.items()):
        if key.endswith(".conv2.weight"):
            width = value.shape[0]
            state[key] = Shaped((width, width // 16, 3, 3))
    error = _unknown(state)
    assert error.nearest == "resnext50_32x4d"
    assert error.differences[0].startswith("16 conv2s with groups=16, resnext50_32x4d has "
                                           "groups=32 (layer1.0.conv2.weight, ")
    assert "16 shape mismatches (layer1.0.conv2.weight (128, 8, 3, 3) != (128, 4, 3, 3)" \
        in str(error)


def test_a_missing_downsample_is_named() -> None:
    state = {k: v for k, v in _state("resnet101").items()
             if not k.startswith("layer2.0.downsample.")}
    error = _unknown(state)
    assert error.nearest == "resnet101"
    assert error.differences == [
        "layer2.0 has no downsample, resnet101 has one",
        "5 missing keys (layer2.0.downsample.0.weight, layer2.0.downsample.1.weight, "
        "layer2.0.downsample.1.bias, ...)"]


def test_a_bottleneck_key_in_a_basicblock_checkpoint_is_named() -> None:
    state = _state("resnet18") | {"layer1.0.conv3.weight": Shaped((64, 64, 1, 1))}
    error = _unknown(state)
    assert error.nearest == "resnet18"
    assert error.differences == [
        "has Bottleneck keys (layer1.0.conv3.weight), resnet18 is built of BasicBlocks",
        "1 unexpected key (layer1.0.conv3.weight)"]


def test_an_arch_override_is_checked_against_the_state() -> None:
    error = _unknown(_state("resnet101", 10), arch="resnet50")
    assert (error.nearest, error.compared_to) == ("resnet101", "resnet50")
    assert str(error).startswith("not resnet50: layer3 has 23 blocks, resnet50 has 6; ")
    assert str(error).endswith("; it is resnet101")
    assert arch.infer_architecture(_state("resnet50", None), arch="resnet50").name == "resnet50"
    with pytest.raises(ValueError, match="unknown architecture 'resnet-50'; did you mean"):
        arch.infer_architecture(_state("resnet50"), arch="resnet-50")


def test_a_head_from_another_trunk_is_refused_but_the_backbone_loads() -> None:
    state = _state("resnet50", None) | {"fc.weight": Shaped((10, 512)), "fc.bias": Shaped((10,))}
    error = _unknown(state)
    assert error.nearest == "resnet50"
    assert error.differences[0] == ("fc.weight takes 512 features, resnet50 gives 2048 (a head "
                                    "from another network: drop fc.* to use the backbone alone)")
    assert arch.infer_architecture(arch.without_head(state)).name == "resnet50"
    assert arch.num_classes(arch.without_head(state)) is None


def test_malformed_heads_and_foreign_states_give_one_line() -> None:
    state = _state("resnet18") | {"fc.weight": Shaped((10,))}
    assert "fc.weight has shape (10,), not (classes, features)" in str(_unknown(state))
    with pytest.raises(ValueError, match=r"fc.weight has shape \(10,\)"):
        arch.num_classes(state)
    prefixed = {f"module.{k}": v for k, v in _state("resnet18").items()}
    assert "saved from DataParallel" in str(_unknown(prefixed))
    odd = _unknown({"weight\nbias": Shaped((3,)), "conv1.weight": object()})
    assert "'weight\\nbias'" in str(odd) and "conv1.weight None != (64, 3, 7, 7)" in str(odd)


def test_architecture_records() -> None:
    r50 = arch.ARCHITECTURES["resnet50"]
    assert (r50.weights_filename, r50.sha256_prefix, r50.feature_dim) == (
        "resnet50-0676ba61.pth", "0676ba61", 2048)
    assert arch.ARCHITECTURES["resnet34"].feature_dim == 512
    assert len(NAMES) == 10
