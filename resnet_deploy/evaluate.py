"""Top-1/top-5 accuracy of one or more ONNX models on a labelled ImageFolder.

Models are run side by side over the same photos: each batch is decoded once per distinct
preprocessing and fed to every model that uses it, so comparing FP32 with INT8 costs one
pass over the folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import hits, labelled_images, warn_skipped
from .errors import UserError
from .preprocess import PreprocessSpec, load_batch
from .runtime import ModelFile, OrtBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateOptions:
    provider: str = "cpu"
    batch_size: int = 64
    limit: int | None = None
    seed: int = 0
    strict: bool = False
    progress: bool = False
    spec: PreprocessSpec | None = None


@dataclass(frozen=True)
class ModelAccuracy:
    model: str
    provider: str
    precision: str
    n: int
    top1: float
    top5: float
    label_mapping: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, "n": self.n,
                "top1": round(self.top1, 6), "top5": round(self.top5, 6),
                "precision": self.precision, "label_mapping": self.label_mapping}


@dataclass(frozen=True)
class EvaluateResult:
    """Every model's accuracy on one folder, measured over the same photos."""

    images: str
    classes: int
    models: tuple[ModelAccuracy, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "classes": self.classes,
                "models": [m.to_dict() for m in self.models]}


@dataclass
class _Entry:
    """One model being evaluated, with its running counts."""

    path: Path
    spec: PreprocessSpec
    precision: str
    targets: dict[Path, int]
    mapping: str
    backend: Any = None
    top1: int = 0
    top5: int = 0
    n: int = 0


def evaluate(models: Sequence[str | Path], images: str | Path, *,
             options: EvaluateOptions = EvaluateOptions()) -> EvaluateResult:
    """Top-1/top-5 of each model on the ImageFolder ``images`` (a seeded subset with limit)."""
    from tqdm import tqdm

    if not models:
        raise UserError("no model given; pass --model PATH (repeat it to compare models)")
    folder = labelled_images(images).subset(options.limit, options.seed)
    entries = []
    for model in models:
        file = ModelFile.read(model)
        file.warn_if_wrong_cpu(options.provider)
        if file.meta is not None and file.meta.weights.get("source") == "random":
            log.warning("%s: exported from random weights, so its accuracy means nothing",
                        file.path)
        spec = file.spec(options.spec)
        labels = file.meta.labels if file.meta else None
        indices, mapping = folder.class_indices(labels, file.io.classes)
        targets = {p: indices[c] for p, c in zip(folder.paths, folder.class_ids, strict=True)}
        entries.append(_Entry(file.path, spec, file.precision, targets, mapping))
    for entry in entries:
        entry.backend = OrtBackend(entry.path, options.provider)
    specs = list(dict.fromkeys(e.spec for e in entries))
    skipped: set[Path] = set()
    paths = list(folder.paths)
    with tqdm(total=len(paths), desc="evaluating", unit="img", disable=not options.progress,
              leave=False) as bar:
        for start in range(0, len(paths), options.batch_size):
            chunk = paths[start:start + options.batch_size]
            for spec in specs:
                batch, used, bad = load_batch(chunk, spec, strict=options.strict)
                skipped.update(bad)
                if not used:
                    continue
                for entry in (e for e in entries if e.spec == spec):
                    _score(entry, entry.backend.infer(batch), used)
            bar.update(len(chunk))
    warn_skipped(sorted(skipped), len(paths), "images")
    if all(e.n == 0 for e in entries):
        raise UserError(f"{folder.root}: none of the {len(paths)} images could be read")
    return EvaluateResult(
        images=str(folder.root), classes=len(folder.classes),
        models=tuple(ModelAccuracy(str(e.path), e.backend.provider, e.precision, e.n,
                                   e.top1 / max(e.n, 1), e.top5 / max(e.n, 1), e.mapping)
                     for e in entries))


def _score(entry: _Entry, logits: np.ndarray, used: Sequence[Path]) -> None:
    targets = np.asarray([entry.targets[p] for p in used], dtype=np.int64)
    if targets.max() >= logits.shape[1]:
        raise UserError(f"{entry.path}: has {logits.shape[1]} outputs but the folder's classes "
                        f"need index {targets.max()}; its class subfolders do not match this "
                        "model's classes")
    entry.top1 += hits(logits, targets, 1)
    entry.top5 += hits(logits, targets, 5)
    entry.n += len(used)
