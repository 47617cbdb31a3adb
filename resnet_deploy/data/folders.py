"""Folders of photos for checks: labelled ImageFolders, lists read with one
warning for what could not be read, and the hash that names a file list.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.progress import Counter, Progress
from .images import is_image, list_images, load_batch, seeded_subset
from .spec import PreprocessSpec

log = logging.getLogger(__name__)


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
        log.warning("skipped %d of %d %s that could not be read (first: %s); pass `strict` "
                    "to make this an error", len(skipped), total, what, skipped[0])


def read_images(paths: Sequence[Path], spec: PreprocessSpec, *, strict: bool = False,
                progress: Progress | None = None, batch_size: int = 64, what: str = "images",
                ) -> tuple[np.ndarray, list[Path]]:
    """Preprocess ``paths`` into one NCHW array (counted on ``progress``); returns (array,
    used). Unreadable files are skipped with one warning (an error when ``strict``); a list
    in which nothing is readable is a UserError.
    """
    arrays, used, skipped = [], [], []
    counter = Counter(progress, f"loading {what}", len(paths), "images")
    for start in range(0, len(paths), batch_size):
        batch, ok, bad = load_batch(paths[start:start + batch_size], spec, strict=strict)
        arrays.append(batch)
        used += ok
        skipped += bad
        counter.update(len(ok) + len(bad))
    warn_skipped(skipped, len(paths), what)
    if not used:
        raise UserError(f"none of the {len(paths)} {what} could be read as an image")
    return np.concatenate(arrays), used


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
                            "the folders after the model's labels (export it with `labels`)")
        return list(range(len(self.classes))), "sorted"

    def targets(self, paths: Sequence[Path], labels: Sequence[str] | None = None,
                classes: int | None = None) -> tuple[np.ndarray, str]:
        """The model's class index for each of ``paths`` (a subset of :attr:`paths`)."""
        indices, mapping = self.class_indices(labels, classes)
        class_of = dict(zip(self.paths, self.class_ids, strict=True))
        return np.asarray([indices[class_of[p]] for p in paths], dtype=np.int64), mapping

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "classes": list(self.classes), "n": len(self.paths)}


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
