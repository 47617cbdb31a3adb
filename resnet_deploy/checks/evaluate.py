"""Top-1/top-5 accuracy of one or more ONNX models on a labelled ImageFolder.

Models are run side by side over the same photos: each batch is decoded once per distinct
preprocessing and fed to every model that uses it, so comparing FP32 with INT8 costs one
pass over the folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.model_file import ModelFile
from ..core.errors import UserError
from ..core.metrics import hits
from ..core.progress import Counter, Progress
from ..data.folders import labelled_images, warn_skipped
from ..data.images import load_batch
from ..data.spec import PreprocessSpec
from ..runtime.runners import OrtRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateOptions:
    provider: str = "cpu"
    batch_size: int = 64
    limit: int | None = None
    seed: int = 0
    strict: bool = False
    spec: PreprocessSpec | None = None
    output_name: str | None = None  # the output to read in models with several


@dataclass(frozen=True)
class ModelAccuracy:
    """One model's accuracy; ``top1_agreement`` and ``top1_drop_pt`` compare it with the
    first model on the photos both scored (None for the first model itself)."""

    model: str
    provider: str
    precision: str
    n: int
    top1: float
    top5: float
    label_mapping: str
    classes: int = 0  # the model's outputs: chance is 1/classes
    top1_agreement: float | None = None
    top1_drop_pt: float | None = None
    arch: str | None = None  # the ResNet recorded at export (None for a foreign model)

    @property
    def near_chance(self) -> bool:
        """Top-1 within :data:`CHANCE_MARGIN` of guessing: wrong preprocessing or labels."""
        return self.classes > 1 and self.top1 - 1 / self.classes <= CHANCE_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, "n": self.n,
                "top1": round(self.top1, 6), "top5": round(self.top5, 6),
                "precision": self.precision, "arch": self.arch,
                "label_mapping": self.label_mapping,
                "classes": self.classes, "near_chance": self.near_chance,
                "top1_agreement": (None if self.top1_agreement is None
                                   else round(self.top1_agreement, 6)),
                "top1_drop_pt": (None if self.top1_drop_pt is None
                                 else round(self.top1_drop_pt, 4))}


# Two points of top-1 above chance (1/classes): a trained model scoring this low is being fed
# another preprocessing than it was trained with, or its classes are mapped wrongly.
CHANCE_MARGIN = 0.02


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
    untrained: bool = False
    file: Any = None  # the opened ModelFile
    classes: int = 0
    runner: Any = None  # its OrtRunner, active while the photos are scored
    top1: int = 0
    top5: int = 0
    n: int = 0
    predicted: dict[Path, int] = field(default_factory=dict)  # top-1 class per photo


def evaluate(models: Sequence[str | Path], images: str | Path, *,
             options: EvaluateOptions = EvaluateOptions(),
             progress: Progress | None = None) -> EvaluateResult:
    """Top-1/top-5 of each model on the ImageFolder ``images`` (a seeded subset with limit)."""
    if not models:
        raise UserError("no model given; pass `models` PATH (repeat it to compare models)")
    files = [ModelFile.read(model, options.output_name) for model in models]
    for file in files:
        if file.kind == "features":
            raise UserError(f"{file.path}: gives an embedding ({file.io.classes}-d features), "
                            "not class scores, so it has no accuracy to measure; evaluate the "
                            "classifier it was exported from", path=file.path)
    folder = labelled_images(images).subset(options.limit, options.seed)
    entries = []
    for file in files:
        file.warn_if_wrong_cpu(options.provider)
        untrained = file.meta is not None and file.meta.weights.get("source") == "random"
        if untrained:
            log.warning("%s: exported from random weights, so its accuracy means nothing",
                        file.path)
        spec = file.spec(options.spec)
        labels = file.meta.labels if file.meta else None
        indices, mapping = folder.class_indices(labels, file.io.classes)
        targets = {p: indices[c] for p, c in zip(folder.paths, folder.class_ids, strict=True)}
        entries.append(_Entry(file.path, spec, file.precision, targets, mapping,
                              untrained=untrained, file=file))
    paths = list(folder.paths)
    with contextlib.ExitStack() as stack:
        for entry in entries:
            entry.runner = stack.enter_context(OrtRunner(entry.file, options.provider))
        skipped = _score_all(entries, paths, options, progress)
    warn_skipped(sorted(skipped), len(paths), "images")
    if all(e.n == 0 for e in entries):
        raise UserError(f"{folder.root}: none of the {len(paths)} images could be read")
    accuracies = _accuracies(entries)
    for acc, entry in zip(accuracies, entries, strict=True):
        if acc.near_chance and not entry.untrained:
            log.warning("%s: top-1 %.2f%% is within %d points of chance (%.2f%% for %d "
                        "classes); check the preprocessing it was exported with (input size "
                        "%d) and that the folders match its classes", entry.path,
                        100 * acc.top1, round(100 * CHANCE_MARGIN), 100 / acc.classes,
                        acc.classes, entry.spec.input_size)
    return EvaluateResult(images=str(folder.root), classes=len(folder.classes),
                          models=tuple(accuracies))


def _score_all(entries: Sequence[_Entry], paths: Sequence[Path], options: EvaluateOptions,
               progress: Progress | None) -> set[Path]:
    """Every photo decoded once per distinct preprocessing and fed to each model that uses
    it; returns the photos that could not be read."""
    specs = list(dict.fromkeys(e.spec for e in entries))
    skipped: set[Path] = set()
    counter = Counter(progress, "evaluating", len(paths), "images")
    for start in range(0, len(paths), options.batch_size):
        chunk = paths[start:start + options.batch_size]
        for spec in specs:
            batch, used, bad = load_batch(chunk, spec, strict=options.strict)
            skipped.update(bad)
            if not used:
                continue
            for entry in (e for e in entries if e.spec == spec):
                _score(entry, entry.runner.infer(batch), used)
        counter.update(len(chunk))
    return skipped


def _accuracies(entries: Sequence[_Entry]) -> list[ModelAccuracy]:
    """Each model's figures; from the second on, its agreement with the first model (the
    share of photos both scored where they pick the same class) and its top-1 drop."""
    first = entries[0]
    out = []
    for entry in entries:
        top1 = entry.top1 / max(entry.n, 1)
        agreement = drop = None
        if entry is not first:
            both = [p for p in entry.predicted if p in first.predicted]
            agreement = (sum(entry.predicted[p] == first.predicted[p] for p in both)
                         / len(both)) if both else None
            drop = 100 * (first.top1 / max(first.n, 1) - top1)
        out.append(ModelAccuracy(str(entry.path), entry.runner.provider, entry.precision,
                                 entry.n, top1, entry.top5 / max(entry.n, 1), entry.mapping,
                                 entry.classes, agreement, drop, entry.file.arch))
    return out


def _score(entry: _Entry, logits: np.ndarray, used: Sequence[Path]) -> None:
    targets = np.asarray([entry.targets[p] for p in used], dtype=np.int64)
    if targets.max() >= logits.shape[1]:
        raise UserError(f"{entry.path}: has {logits.shape[1]} outputs but the folder's classes "
                        f"need index {targets.max()}; its class subfolders do not match this "
                        "model's classes")
    entry.top1 += hits(logits, targets, 1)
    entry.top5 += hits(logits, targets, 5)
    entry.n += len(used)
    entry.classes = logits.shape[1]
    entry.predicted.update(zip(used, logits.argmax(axis=1).tolist(), strict=True))
