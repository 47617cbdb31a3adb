"""Image folders for INT8 work: the calibration reader, and labelled ImageFolder sets.

Both quantize (calibration, its held-out check, the accuracy-aware fallback) and evaluate
read folders of photos through the model's own preprocessing; keeping the folder logic here
means they skip unreadable files, subset and map class names the same way.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .metrics import top_k
from .preprocess import PreprocessSpec, is_image, list_images, load_batch, seeded_subset
from .runtime import ModelFile, fill_batch

log = logging.getLogger(__name__)

DEFAULT_NUM_SAMPLES = 256
# Calibration feeds batches: one ORT run per 32 images instead of per image. The batch size
# is part of the calibration recipe, since moving-average MinMax averages per-batch extremes.
DEFAULT_BATCH = 32
# When calibration would use every photo in the folder, a seeded share is held back so the
# INT8 model can be checked on photos calibration never saw: 20%, at least this many.
HELD_OUT_SHARE = 0.2
MIN_HELD_OUT = 8


def list_hash(paths: Sequence[Path], root: Path) -> str:
    """sha256 of the sorted file list (relative to ``root``): names which photos calibrated."""
    names = sorted(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
                   for p in paths)
    # File names are bytes: fsencode gives back the undecodable ones (surrogate escapes)
    # where encode("utf-8") would fail, and the same bytes as UTF-8 for all others.
    return hashlib.sha256(b"\n".join(map(os.fsencode, names))).hexdigest()


def warn_skipped(skipped: Sequence[Path], total: int, what: str) -> None:
    """One warning line for all unreadable files, not one per file."""
    if skipped:
        log.warning("skipped %d of %d %s that could not be read (first: %s); pass --strict "
                    "to make this an error", len(skipped), total, what, skipped[0])


def read_images(paths: Sequence[Path], spec: PreprocessSpec, *, strict: bool = False,
                progress: bool = False, batch_size: int = 64, what: str = "images",
                ) -> tuple[np.ndarray, list[Path]]:
    """Preprocess ``paths`` into one NCHW array (with a progress bar); returns (array, used).

    Unreadable files are skipped with one warning (an error when ``strict``); a list in
    which nothing is readable is a UserError.
    """
    from tqdm import tqdm

    arrays, used, skipped = [], [], []
    with tqdm(total=len(paths), desc=f"loading {what}", unit="img", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            batch, ok, bad = load_batch(paths[start:start + batch_size], spec, strict=strict)
            arrays.append(batch)
            used += ok
            skipped += bad
            bar.update(len(ok) + len(bad))
    warn_skipped(skipped, len(paths), what)
    if not used:
        raise UserError(f"none of the {len(paths)} {what} could be read as an image")
    return np.concatenate(arrays), used


class ImageFolderReader:
    """onnxruntime's CalibrationDataReader protocol over a folder of photos.

    ``get_next()`` returns one feed dict (a batch of preprocessed images) per call, then
    None. Duck-typed rather than subclassed so importing this module does not load
    onnxruntime; the calibrators only call ``get_next``. Build one with :meth:`for_model`.
    """

    def __init__(self, paths: Sequence[Path], spec: PreprocessSpec, input_name: str, *,
                 root: Path, batch_size: int = DEFAULT_BATCH, fixed_batch: bool = False,
                 strict: bool = False, progress: bool = False,
                 held_out: Sequence[Path] = ()) -> None:
        if not paths:
            raise UserError(f"{root}: no images to calibrate with")
        self.paths = list(paths)
        self.spec = spec
        self.input_name = input_name
        self.root = root
        self.batch_size = batch_size
        self.fixed_batch = fixed_batch
        self.strict = strict
        self.progress = progress
        self.held_out = list(held_out)
        self.used: list[Path] = []
        self.skipped: list[Path] = []
        self._next = 0
        self._bar: Any = None
        self._warned = False

    @classmethod
    def for_model(cls, model: str | Path, folder: str | Path, *,
                  num_samples: int | None = DEFAULT_NUM_SAMPLES, seed: int = 0,
                  batch_size: int = DEFAULT_BATCH, strict: bool = False,
                  progress: bool = False, spec: PreprocessSpec | None = None,
                  file: ModelFile | None = None,
                  hold_out: bool = False) -> ImageFolderReader:
        """A reader preprocessing the way ``model``'s metadata says (``spec`` overrides).

        A folder with more than ``num_samples`` images gives a seeded random subset; the
        rest are in :attr:`held_out` for checking the quantized model. With ``hold_out``,
        a folder that calibration would use whole keeps back :data:`HELD_OUT_SHARE` of it
        (at least :data:`MIN_HELD_OUT` images) instead. ``file`` is the already-opened
        model, when the caller has it, so the file is not parsed twice.
        """
        file = file if file is not None else ModelFile.read(model)
        spec = file.spec(spec)
        input_name, fixed = file.io.input_name, file.io.batch
        root = Path(folder)
        everything = list_images(root)
        if not everything:
            raise UserError(f"{root}: no images (of any format Pillow reads) in this "
                            "folder or below it; point --calibration at a folder of photos")
        chosen = seeded_subset(everything, num_samples, seed)
        if hold_out and len(chosen) == len(everything):
            held = max(MIN_HELD_OUT, math.ceil(HELD_OUT_SHARE * len(everything)))
            if held >= len(everything):
                raise UserError(
                    f"{root}: {len(everything)} images are too few both to calibrate and to "
                    f"check the INT8 model on {MIN_HELD_OUT} held-out ones; add photos (at "
                    f"least {MIN_HELD_OUT + 1}), pass --eval-images DIR, or skip the check "
                    "with --no-check")
            chosen = seeded_subset(everything, len(everything) - held, seed)
        chosen_set = set(chosen)
        return cls(chosen, spec, input_name, root=root, batch_size=fixed or batch_size,
                   fixed_batch=fixed is not None, strict=strict, progress=progress,
                   held_out=[p for p in everything if p not in chosen_set])

    def get_next(self) -> dict[str, np.ndarray] | None:
        from tqdm import tqdm

        if self._bar is None and self._next == 0:
            self._bar = tqdm(total=len(self.paths), desc="calibrating", unit="img",
                             disable=not self.progress, leave=False)
        while self._next < len(self.paths):
            chunk = self.paths[self._next:self._next + self.batch_size]
            self._next += len(chunk)
            batch, ok, bad = load_batch(chunk, self.spec, strict=self.strict)
            self.used += ok
            self.skipped += bad
            self._bar.update(len(chunk))
            if not ok:
                continue
            if self.fixed_batch:
                batch = fill_batch(batch, self.batch_size)
            return {self.input_name: batch}
        self._finish()
        return None

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.used:
            raise UserError(f"{self.root}: none of the {len(self.paths)} images could be read; "
                            "point --calibration at a folder of valid photos")
        if not self._warned:
            self._warned = True
            warn_skipped(self.skipped, len(self.paths), "calibration images")

    def __iter__(self) -> ImageFolderReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def file_list_sha256(self) -> str:
        """Identifies the photos that calibrated (after skipping unreadable ones)."""
        return list_hash(self.used, self.root)


@dataclass(frozen=True)
class LabelledImages:
    """An ImageFolder: one subfolder per class, ``class_ids`` index into sorted ``classes``.

    Which model output a class is depends on the model: see :meth:`targets`.
    """

    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    class_ids: tuple[int, ...]

    def subset(self, limit: int | None, seed: int = 0) -> LabelledImages:
        """A seeded subset of at most ``limit`` photos (all of them for None)."""
        chosen = seeded_subset(list(range(len(self.paths))), limit, seed)
        return LabelledImages(self.root, self.classes, tuple(self.paths[i] for i in chosen),
                              tuple(self.class_ids[i] for i in chosen))

    def class_indices(self, labels: Sequence[str] | None,
                      classes: int | None = None) -> tuple[list[int], str]:
        """Each folder's model output index, and how it was found.

        ``labels`` when every folder name is one of the model's labels (so a folder subset
        or another order still maps right), else ``sorted``: torchvision's rule, index =
        position of the folder name in sorted order, which is only right when there is one
        folder per class (``classes``: the model's outputs). Anything else would score
        photos against the wrong classes, so it is a UserError naming the folder.
        """
        position = {name: i for i, name in enumerate(labels or ())}
        strangers = [name for name in self.classes if name not in position]
        if not strangers:
            return [position[name] for name in self.classes], "labels"
        if len(strangers) < len(self.classes):
            known = next(name for name in self.classes if name in position)
            raise UserError(f"{self.root / strangers[0]}: this class folder is not one of the "
                            f"model's labels, while others (e.g. {known!r}) are; rename it "
                            "to the label of the class it holds")
        count = classes if classes is not None else len(labels) if labels else None
        if count is not None and len(self.classes) != count:
            why = ("their names are not its labels" if labels else
                   "it has no labels to map them by")
            raise UserError(f"{self.root}: {len(self.classes)} class folders for a model with "
                            f"{count} classes, and {why}; give one folder per class, or name "
                            "the folders after the model's labels (export it with --labels)")
        return list(range(len(self.classes))), "sorted"

    def targets(self, paths: Sequence[Path], labels: Sequence[str] | None = None,
                classes: int | None = None) -> tuple[np.ndarray, str]:
        """The model's class index for each of ``paths`` (a subset of :attr:`paths`)."""
        indices, mapping = self.class_indices(labels, classes)
        class_of = dict(zip(self.paths, self.class_ids, strict=True))
        return np.asarray([indices[class_of[p]] for p in paths], dtype=np.int64), mapping

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "classes": list(self.classes), "n": len(self.paths)}


def hits(logits: np.ndarray, targets: np.ndarray, k: int) -> int:
    """How many rows have their target among the ``k`` largest logits."""
    return int((top_k(logits, k) == targets[:, None]).any(axis=1).sum())


def labelled_images(folder: str | Path) -> LabelledImages:
    """Read an ImageFolder layout, or fail with a one-line UserError saying what is wrong."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; pass an ImageFolder (one subfolder of "
                        "images per class)")
    loose = [p for p in root.iterdir() if p.is_file() and is_image(p)]
    if loose:
        raise UserError(f"{root}: not an ImageFolder layout ({len(loose)} images directly in "
                        "the folder); put the images in one subfolder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: not an ImageFolder layout (no class subfolders); put the "
                        "images in one subfolder per class")
    paths: list[Path] = []
    class_ids: list[int] = []
    for i, name in enumerate(classes):
        found = list_images(root / name)
        paths += found
        class_ids += [i] * len(found)
    if not paths:
        raise UserError(f"{root}: the class subfolders hold no images")
    return LabelledImages(root, tuple(classes), tuple(paths), tuple(class_ids))
