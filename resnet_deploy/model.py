"""ResNet-18 with torchvision's exact parameter names, and the weight sources it loads from.

Attribute names (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample``, ``fc``) are
chosen so that ``state_dict()`` keys and shapes match ``torchvision.models.resnet18``:
a torchvision checkpoint loads here with no torchvision installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

RANDOM = "random"
IMAGENET = "imagenet"


@dataclass(frozen=True)
class PublishedWeights:
    """Everything known about a published checkpoint, kept in one record."""

    name: str
    url: str
    filename: str
    sha256_prefix: str
    num_classes: int
    input_size: int
    resize_size: int
    top1: float
    labels_resource: str


IMAGENET1K_V1 = PublishedWeights(
    name="IMAGENET1K_V1",
    url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    filename="resnet18-f37072fd.pth",
    sha256_prefix="f37072fd",
    num_classes=1000,
    input_size=224,
    resize_size=256,
    top1=0.69758,
    labels_resource="imagenet_classes.txt",
)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in torchvision's index order."""
    text = resources.files(__package__).joinpath(IMAGENET1K_V1.labels_resource).read_text("utf-8")
    return text.splitlines()


def _torch_modules() -> tuple[Any, Any]:
    import torch
    from torch import nn

    return torch, nn


def _build_classes() -> tuple[type, type]:
    """Define the nn.Module classes on first use, so importing this module stays torch-free."""
    torch, nn = _torch_modules()

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes: int, planes: int, stride: int = 1,
                     downsample: nn.Module | None = None) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        """7x7/2 stem, 3x3/2 max-pool, four stages of two BasicBlocks, global average pool, fc."""

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, stride=1)
            self.layer2 = self._make_layer(128, stride=2)
            self.layer3 = self._make_layer(256, stride=2)
            self.layer4 = self._make_layer(512, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
            # Only the first block of a stage changes resolution or width, so only it
            # gets the stride and a 1x1 projection shortcut (named ``downsample``).
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            first = BasicBlock(self.inplanes, planes, stride, downsample)
            self.inplanes = planes
            return nn.Sequential(first, BasicBlock(planes, planes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return BasicBlock, ResNet18


_CLASSES: tuple[type, type] | None = None


def resnet18(*, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised ResNet-18 (call under a seed for reproducibility)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_classes()
    return _CLASSES[1](num_classes=num_classes)


@dataclass(frozen=True)
class LoadedWeights:
    """Where a model's weights came from, recorded in every artifact and report."""

    source: str  # "imagenet", "random" or a file path
    sha256: str | None
    num_classes: int
    labels: list[str] | None = field(default=None, compare=False)
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM

    def describe(self) -> str:
        if self.is_random:
            return f"random init (seed {self.seed}) - NOT a trained model"
        return f"{self.source} (sha256 {self.sha256[:12] if self.sha256 else '?'})"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(weights: str = IMAGENET, *, num_classes: int | None = None,
               seed: int = 0) -> tuple[nn.Module, LoadedWeights]:
    """Build ResNet-18 in eval mode from ``imagenet``, ``random`` or a checkpoint path."""
    torch, _ = _torch_modules()
    if weights == RANDOM:
        n = num_classes or 1000
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet18(num_classes=n)
        return model.eval(), LoadedWeights(RANDOM, None, n, None, seed)
    if weights == IMAGENET:
        path = imagenet_checkpoint()
        info_source, labels = IMAGENET, imagenet_labels()
    else:
        path = Path(weights)
        info_source, labels = str(path.resolve()), None
    state = read_state_dict(path)
    inferred = infer_num_classes(state, path)
    if num_classes is not None and num_classes != inferred:
        raise UserError(f"{path}: fc.weight has {inferred} classes but --num-classes is "
                        f"{num_classes}; drop --num-classes or pass the matching checkpoint")
    model = resnet18(num_classes=inferred)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    if labels is not None and len(labels) != inferred:
        labels = None
    return model.eval(), LoadedWeights(info_source, file_sha256(path), inferred, labels)


def imagenet_checkpoint() -> Path:
    """torchvision's IMAGENET1K_V1 file: from the torch hub cache, else downloaded and hashed."""
    import torch.hub

    rec = IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / rec.filename
    if path.is_file():
        if not file_sha256(path).startswith(rec.sha256_prefix):
            raise UserError(f"{path}: sha256 does not start with {rec.sha256_prefix}; "
                            "delete the file so that it is downloaded again")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", rec.url, path)
    try:
        torch.hub.download_url_to_file(rec.url, str(path), hash_prefix=rec.sha256_prefix,
                                       progress=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "not available"
        raise UserError(f"cannot get the ImageNet weights ({type(exc).__name__}: {exc}); "
                        f"place {rec.filename} in {path.parent}, or pass --weights PATH "
                        "or --weights random") from None
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) and unwrap the common containers."""
    torch, _ = _torch_modules()
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; pass an existing .pth/.pt/"
                        ".safetensors file, 'imagenet' or 'random'")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the checkpoint file is empty; re-save or re-download it")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{path}: reading .safetensors needs the safetensors package; "
                            "pip install safetensors") from None
        try:
            obj: Any = load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not a loadable PyTorch checkpoint ({first[:160]}); "
                            "only plain tensors are accepted (weights_only=True), so "
                            "re-save it with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: holds no state_dict (found {type(obj).__name__}); save "
                        "model.state_dict(), or a dict with it under 'state_dict' or 'model'")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "this is not a model state_dict")
        state[key.removeprefix("module.")] = value
    return state


def infer_num_classes(state: dict[str, Any], path: Path) -> int:
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise UserError(f"{path}: has no 2-D 'fc.weight', so it is not a ResNet-18 "
                        f"state_dict (first keys: {', '.join(list(state)[:4])})")
    return int(fc.shape[0])


def check_state_dict(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Name the first offending keys instead of torch's wall of text."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:3])})")
    if problems:
        raise UserError(f"{path}: not a torchvision ResNet-18 state_dict: {'; '.join(problems)}")
