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
from .published import IMAGENET, IMAGENET1K_V1, RANDOM, imagenet_labels

if TYPE_CHECKING:
    import torch
    from torch import nn


log = logging.getLogger(__name__)


def resnet18(*, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised ResNet-18 (imports torch: see :mod:`resnet_deploy.resnet`)."""
    from .resnet import resnet18 as build

    return build(num_classes=num_classes)


@dataclass(frozen=True)
class LoadedWeights:
    """Where a model's weights came from, recorded in every artifact and report."""

    source: str  # "imagenet", "random" or a file path
    sha256: str | None
    num_classes: int
    labels: list[str] | None = field(default=None, compare=False)
    seed: int | None = None
    labels_source: str | None = field(default=None, compare=False)  # in words, for reports

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM

    def describe(self) -> str:
        if self.is_random:
            return f"random init (seed {self.seed}) - NOT a trained model"
        if self.source == IMAGENET:
            return (f"torchvision {IMAGENET1K_V1.name} (published ImageNet top-1 "
                    f"{IMAGENET1K_V1.top1:.2%}, sha256 {(self.sha256 or '?')[:12]})")
        return f"{self.source} (sha256 {self.sha256[:12] if self.sha256 else '?'})"


def load_model(weights: str = IMAGENET, *, num_classes: int | None = None,
               seed: int = 0, find_labels: bool = True) -> tuple[nn.Module, LoadedWeights]:
    """Build ResNet-18 in eval mode from ``imagenet``, ``random`` or a checkpoint path.

    A checkpoint's class names come from beside it (:func:`card.labels_beside`) unless
    ``find_labels`` is false (the caller has its own).
    """
    import torch

    from .card import NO_LABELS, Labels, labels_beside

    if weights == RANDOM:
        n = num_classes or IMAGENET1K_V1.num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet18(num_classes=n)
        return model.eval(), LoadedWeights(RANDOM, None, n, None, seed)
    path = imagenet_checkpoint() if weights == IMAGENET else Path(weights)
    state = read_state_dict(path)
    inferred = infer_num_classes(state, path)
    if weights == IMAGENET and inferred != IMAGENET1K_V1.num_classes:
        raise UserError(f"{path}: has {inferred} classes, not ImageNet's "
                        f"{IMAGENET1K_V1.num_classes}; delete it so the published file is "
                        "downloaded again")
    if num_classes is not None and num_classes != inferred:
        raise UserError(f"{path}: fc.weight has {inferred} classes but `num_classes` is "
                        f"{num_classes}; drop `num_classes` or pass the matching checkpoint")
    model = resnet18(num_classes=inferred)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    if weights == IMAGENET:
        source = IMAGENET
        labels = Labels(tuple(imagenet_labels()), "the ImageNet weights (torchvision's class list)")
    else:
        source = str(path.resolve())
        labels = labels_beside(path, inferred) if find_labels else NO_LABELS
    return model.eval(), LoadedWeights(source, file_sha256(path), inferred,
                                       list(labels.names) if labels.names else None,
                                       labels_source=labels.source if labels.names else None)


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
                        f"place {rec.filename} in {path.parent}, or pass `weights` PATH "
                        "or `weights` random") from None
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) and unwrap the common containers."""
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


def infer_num_classes(state: dict[str, Any], path: Path) -> int:
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise UserError(f"{path}: has no 2-D 'fc.weight', so it is not a ResNet-18 "
                        f"state_dict (first keys: {', '.join(list(state)[:4])})")
    return int(fc.shape[0])


def checkpoint_classes(path: Path) -> int:
    """How many classes a checkpoint's fc has (reads the file)."""
    return infer_num_classes(read_state_dict(path), path)


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
    if weights == RANDOM:  # the recorded init, or one of the same shape
        seed = int(record.get("seed") or 0) if record.get("source") == RANDOM else 0
        model, loaded = load_model(RANDOM, num_classes=record.get("num_classes"), seed=seed)
    else:
        model, loaded = load_model(weights)
    return model, loaded, note
