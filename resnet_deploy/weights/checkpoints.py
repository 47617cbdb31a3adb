"""Where a network's weights come from: a checkpoint read safely, the published
file, or a seeded init; and the PyTorch model behind an exported one.

The network itself is in :mod:`.resnet`; it is imported only when a model
is built, so that commands that only read ONNX files stay free of torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import UserError
from ..core.files import file_sha256
from .arch import (ARCHITECTURES, Architecture, architecture, infer_architecture, num_classes,
                   without_head)
from .published import DEFAULT_ARCH, IMAGENET, IMAGENET_CLASSES, RANDOM, imagenet_labels

if TYPE_CHECKING:
    import torch
    from torch import nn


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedWeights:
    """Where a model's weights came from, recorded in every artifact and report.

    ``num_classes`` is None for a features model (the pooled embedding, no fc)."""

    source: str  # "imagenet", "random" or a file path
    sha256: str | None
    num_classes: int | None
    labels: list[str] | None = field(default=None, compare=False)
    seed: int | None = None
    labels_source: str | None = field(default=None, compare=False)  # in words, for reports
    arch: str = DEFAULT_ARCH
    features: bool = False

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM

    def describe(self) -> str:
        if self.is_random:
            return f"{self.arch} random init (seed {self.seed}) - NOT a trained model"
        if self.source == IMAGENET:
            spec = architecture(self.arch)
            return (f"torchvision {self.arch} IMAGENET1K_V1 (published ImageNet top-1 "
                    f"{spec.top1:.2%}, sha256 {(self.sha256 or '?')[:12]})")
        return f"{self.source} ({self.arch}, sha256 {self.sha256[:12] if self.sha256 else '?'})"


def load_model(weights: str = IMAGENET, *, arch: str | None = None,
               num_classes: int | None = None, seed: int = 0, find_labels: bool = True,
               features: bool = False) -> tuple[nn.Module, LoadedWeights]:
    """Build a torchvision ResNet in eval mode from ``imagenet``, ``random`` or a checkpoint.

    The architecture is read from the checkpoint (``arch`` names it instead, and must fit);
    for ``imagenet`` and ``random`` it is ``arch``, resnet18 by default. ``features`` builds
    the network without its fc: its output is the pooled embedding, and a checkpoint with
    no fc, or one from another head, loads. A checkpoint's class names come from beside it
    (:func:`card.labels_beside`) unless ``find_labels`` is false (the caller has its own).
    """
    import torch

    from .card import NO_LABELS, Labels, labels_beside
    from .resnet import build

    if weights == RANDOM:
        spec = _architecture(arch)
        n = None if features else (num_classes or IMAGENET_CLASSES)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(spec, num_classes=n)
        return model.eval(), LoadedWeights(RANDOM, None, n, None, seed, arch=spec.name,
                                           features=features)
    path = imagenet_checkpoint(_architecture(arch)) if weights == IMAGENET else Path(weights)
    state = read_state_dict(path)
    spec, classes = identify(state, path, arch=arch, features=features)
    if weights == IMAGENET and classes not in (None, IMAGENET_CLASSES):
        raise UserError(f"{path}: has {classes} classes, not ImageNet's {IMAGENET_CLASSES}; "
                        "delete it so the published file is downloaded again")
    if num_classes is not None and classes is not None and num_classes != classes:
        raise UserError(f"{path}: fc.weight has {classes} classes but `num_classes` is "
                        f"{num_classes}; drop `num_classes` or pass the matching checkpoint",
                        path=path, param="num_classes", value=num_classes)
    model = build(spec, num_classes=classes)
    model.load_state_dict(without_head(state) if features else state, strict=True)
    if features:
        labels = NO_LABELS
    elif weights == IMAGENET:
        labels = Labels(tuple(imagenet_labels()), "the ImageNet weights (torchvision's class list)")
    elif find_labels:
        assert classes is not None
        labels = labels_beside(path, classes)
    else:
        labels = NO_LABELS
    source = IMAGENET if weights == IMAGENET else str(path.resolve())
    return model.eval(), LoadedWeights(source, file_sha256(path), classes,
                                       list(labels.names) if labels.names else None,
                                       labels_source=labels.source if labels.names else None,
                                       arch=spec.name, features=features)


def _architecture(name: str | None) -> Architecture:
    try:
        return architecture(name or DEFAULT_ARCH)
    except ValueError as exc:
        raise UserError(f"`arch` {name}: {exc}", param="arch", value=name,
                        allowed=tuple(ARCHITECTURES)) from None


def identify(state: dict[str, Any], path: Path, *, arch: str | None = None,
             features: bool = False) -> tuple[Architecture, int | None]:
    """Which member a state_dict is (``arch`` if given, which must fit) and its classes:
    None for features, whose fc (if any) is not read. One line naming the nearest member
    and what differs when it fits none."""
    trunk = without_head(state) if features else state
    try:
        spec = infer_architecture(trunk, arch=arch)
    except ValueError as exc:  # UnknownArchitecture, or an unknown --arch name
        raise UserError(f"{path}: {exc}", path=path, param="arch" if arch else None) from None
    if features:
        return spec, None
    classes = num_classes(state)
    if classes is None:
        raise UserError(f"{path}: has no fc (a backbone saved alone); export its "
                        f"{spec.feature_dim}-d embedding with `features`, or pass the "
                        "classifier's checkpoint", path=path)
    return spec, classes


def imagenet_checkpoint(spec: Architecture) -> Path:
    """torchvision's IMAGENET1K_V1 file of ``spec``: from the torch hub cache, else
    downloaded with its hash checked."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_filename
    if path.is_file():
        if not file_sha256(path).startswith(spec.sha256_prefix):
            raise UserError(f"{path}: sha256 does not start with {spec.sha256_prefix}; "
                            "delete the file so that it is downloaded again", path=path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", spec.weights_url, path)
    try:
        torch.hub.download_url_to_file(spec.weights_url, str(path),
                                       hash_prefix=spec.sha256_prefix, progress=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "not available"
        raise UserError(f"cannot get the ImageNet weights of {spec.name} "
                        f"({type(exc).__name__}: {exc}); place {spec.weights_filename} in "
                        f"{path.parent}, or pass `weights` PATH or `weights` random",
                        path=path) from None
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) and unwrap the common containers
    (``state_dict``, ``model``, DataParallel's ``module.`` prefix)."""
    import torch

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
    elif path.suffix.lower() == ".onnx":
        raise _already_onnx(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            if _is_onnx(path):
                raise _already_onnx(path) from None
            raise UserError(f"{path}: not a loadable PyTorch checkpoint ({_first_line(exc)}); "
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


def _already_onnx(path: Path) -> UserError:
    return UserError(f"{path}: is already an ONNX model, not a PyTorch checkpoint; give it to "
                     "the commands that read models (quantize, parity, evaluate, bench, "
                     "package `models` PATH), or export from the .pth/.pt it came from")


def _is_onnx(path: Path) -> bool:
    """An ONNX file under another suffix: a protobuf whose graph has nodes. A zip (torch's
    format) or pickle fails to parse as one at once."""
    if path.stat().st_size > 1 << 31:
        return False
    try:
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:
        return False


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text, cut at a word boundary (never mid-word)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."


def checkpoint_classes(path: Path) -> int | None:
    """How many classes a checkpoint's fc has (reads the file); None without an fc."""
    return num_classes(read_state_dict(path))


def weights_for(recorded: dict[str, Any] | None,
                requested: str | None = None) -> tuple[str, str | None]:
    """Which weights rebuild the PyTorch model behind an exported one, and a note when they
    are not its own.

    ``recorded`` is the ``weights`` record of the ONNX model's metadata; ``requested`` is what
    the user asked for. None means "the model's own source": ``imagenet`` or a checkpoint
    still on disk, else a random init with the same number of classes, which the note says
    out loud (fine for timing, not for parity).
    """
    if requested:
        return requested, None
    source = str((recorded or {}).get("source") or "")
    if source == IMAGENET or (source and source != RANDOM and Path(source).is_file()):
        return source, None
    why = (f"recorded as random (seed {(recorded or {}).get('seed', 0)})" if source == RANDOM
           else f"its weights file {source} is not here" if source else "it records no weights")
    return RANDOM, f"PyTorch model: random weights, because the ONNX model's {why}"


def load_for(recorded: dict[str, Any] | None, requested: str | None = None,
             ) -> tuple[nn.Module, LoadedWeights, str | None]:
    """The PyTorch model behind an exported one, for parity's reference and bench's
    baseline (see :func:`weights_for`); ``random`` rebuilds the exact init the model was
    exported from (same classes and seed)."""
    weights, note = weights_for(recorded, requested)
    record = recorded or {}
    arch, features = record.get("arch"), bool(record.get("features"))
    if weights == RANDOM:  # the recorded init, or one of the same shape
        seed = int(record.get("seed") or 0) if record.get("source") == RANDOM else 0
        model, loaded = load_model(RANDOM, arch=arch, num_classes=record.get("num_classes"),
                                   seed=seed, features=features)
    else:
        model, loaded = load_model(weights, arch=arch if weights == IMAGENET else None,
                                   features=features)
    return model, loaded, note
