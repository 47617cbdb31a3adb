"""The model card beside a checkpoint, and where each preprocessing value comes from.

A fine-tuned checkpoint often travels with a ``model.json`` that says how it was trained:
input and resize size, mean and std, class names. That card decides the preprocessing
unless an explicit value overrides it; ImageNet's defaults apply only where neither says
anything, and every value remembers its source, so that export, the pipeline and their
reports can say where a 64-pixel crop (or a silently wrong 224-pixel one) came from.

Pure Python (json only) so that reading a card costs nothing at start-up.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.choices import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from ..core.errors import UserError

if TYPE_CHECKING:
    from ..data.spec import PreprocessSpec

log = logging.getLogger(__name__)

MODEL_CARD, LABELS_FILE = "model.json", "labels.txt"
SPEC_FIELDS = ("input_size", "resize_size", "interpolation", "mean", "std")
# What a model is preprocessed with when neither an option nor its card says otherwise:
# torchvision's ImageNet eval transform (IMAGENET1K_V1's input and resize size).
IMAGENET_DEFAULTS: dict[str, Any] = {"input_size": 224, "resize_size": 256,
                                     "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                                     "std": IMAGENET_STD}
# Sources in words, as reports print them.
GIVEN, IMAGENET_DEFAULT, DERIVED = "given", "ImageNet default", "input size / 0.875"


@dataclass(frozen=True)
class ModelCard:
    """What a ``model.json`` says about a checkpoint; None where it says nothing.

    ``names_other`` is the card's ``file`` field when it names another file than the
    checkpoint it sits beside (a renamed checkpoint keeps its card; the card still counts).
    """

    path: Path
    input_size: int | None = None
    resize_size: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    classes: tuple[str, ...] | None = None
    names_other: str | None = None

    def spec_values(self) -> dict[str, Any]:
        """The preprocessing fields the card sets."""
        return {name: getattr(self, name) for name in SPEC_FIELDS
                if getattr(self, name) is not None}


def _number_triple(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _interpolation(value: str) -> str | None:
    """``"bilinear (Pillow), shorter side to 73"`` -> ``bilinear``: cards describe it in words."""
    words = value.strip().lower().replace("(", " ").split()
    return words[0] if words and words[0] in INTERPOLATIONS else None


@functools.lru_cache(maxsize=32)
def _parse(path: Path, stamp: tuple[int, int]) -> dict[str, Any]:
    """The card's JSON object (cached per file state, so its warnings are said once)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not readable JSON ({type(exc).__name__}); fix it, or pass "
                        "the class names and sizes explicitly") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a model card must be a JSON object; fix it")
    return data


def read_card(path: str | Path, *, checkpoint: str | None = None) -> ModelCard:
    """Parse ``path`` as a model card; a field of the wrong type is a UserError naming it.

    ``checkpoint`` is the file name the card sits beside: a ``file`` field naming another
    one is recorded (and warned about once) but does not stop the card from counting.
    """
    path = Path(path)
    stat = path.stat()
    data = _parse(path, (stat.st_mtime_ns, stat.st_size))
    values: dict[str, Any] = {}
    for name in ("input_size", "resize_size"):
        value = data.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f'{path}: "{name}" must be a positive integer, not {value!r}')
            values[name] = value
    for name in ("mean", "std"):
        value = data.get(name)
        if value is not None:
            if not _number_triple(value):
                raise UserError(f'{path}: "{name}" must be three numbers, not {value!r}')
            values[name] = tuple(float(v) for v in value)
    interpolation = data.get("interpolation")
    if isinstance(interpolation, str) and _interpolation(interpolation):
        values["interpolation"] = _interpolation(interpolation)
    elif interpolation is not None:
        log.warning(f'{path}: "interpolation" {interpolation!r} names none of '
                   f"{', '.join(INTERPOLATIONS)}; using bilinear")
    classes = data.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and classes
                and all(isinstance(c, str) and c.strip() for c in classes)):
            raise UserError(f'{path}: "classes" must be a list of class names; fix it')
        values["classes"] = tuple(classes)
    named = data.get("file")
    other = named if isinstance(named, str) and checkpoint and named != checkpoint else None
    if other is not None:
        log.warning(f'{path}: its "file" names {other}, not {checkpoint}; using it for '
                   f"{checkpoint} all the same")
    return ModelCard(path=path, names_other=other, **values)


def card_beside(checkpoint: str | Path) -> ModelCard | None:
    """The ``model.json`` next to a checkpoint file, or None."""
    checkpoint = Path(checkpoint)
    card = checkpoint.parent / MODEL_CARD
    if not checkpoint.is_file() or not card.is_file():
        return None
    return read_card(card, checkpoint=checkpoint.name)


def read_labels(path: str | Path) -> list[str]:
    """Class names from a file: a model card's ``classes`` (``*.json``), else one per line.

    A BOM and CRLF line ends are fine; a blank line between names or a repeated name is
    refused: either would shift or merge classes silently.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        classes = read_card(path).classes
        if classes is None:
            raise UserError(f'{path}: this JSON file has no "classes" list; give a model card '
                            "with one, or a text file with one class name per line")
        lines = list(classes)
    else:
        lines = _label_lines(path)
    repeated = next((name for i, name in enumerate(lines) if name in lines[:i]), None)
    if repeated is not None:
        raise UserError(f"{path}: {repeated!r} is listed twice; each class needs its own name")
    return lines


def _label_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text("utf-8-sig").splitlines()]
    except OSError as exc:
        raise UserError(f"{path}: cannot read the labels file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: the labels file is not UTF-8 text (byte {exc.start}); save "
                        "it as UTF-8, one class name per line") from None
    while lines and not lines[-1]:
        lines.pop()  # trailing blank lines are only the file's end
    if not lines:
        raise UserError(f"{path}: the labels file is empty; give one class name per line")
    if "" in lines:
        raise UserError(f"{path}: line {lines.index('') + 1} is blank; give one class name per "
                        "line, with none left empty")
    return lines


@dataclass(frozen=True)
class Labels:
    """Class names and where they came from, in words (None: outputs are class indices)."""

    names: tuple[str, ...] | None
    source: str


NO_LABELS = Labels(None, "none: outputs are class indices")


def labels_beside(checkpoint: Path, num_classes: int) -> Labels:
    """Class names kept next to a checkpoint: a ``model.json``'s ``classes``, else
    ``labels.txt``. Names that do not fit (another class count) are ignored with a warning
    that says why, since nobody asked for them explicitly."""
    found: list[tuple[tuple[str, ...], str]] = []
    card = card_beside(checkpoint)
    if card is not None and card.classes is not None:
        found.append((card.classes, f'{card.path} ("classes")'))
    text = checkpoint.parent / LABELS_FILE
    if text.is_file():
        found.append((tuple(_label_lines(text)), str(text)))
    for names, source in found:
        if len(names) == num_classes:
            return Labels(names, source)
        log.warning(f"{source}: lists {len(names)} classes but {checkpoint} has {num_classes}; "
                   "ignoring them (pass `labels` FILE to name the classes)")
    return NO_LABELS


@dataclass(frozen=True)
class Preprocessing:
    """The spec a model is exported with, and the source of each of its values."""

    spec: PreprocessSpec
    sources: dict[str, str]

    def describe(self, given: Mapping[str, str] | None = None) -> str:
        """``64 px crop (model.json), resize 73 (given), bilinear (ImageNet default), ...``;
        ``given`` names how each explicit value was given (the CLI passes its flags)."""
        s = self.spec
        src = {k: (given or {}).get(k, v) if v == GIVEN else v for k, v in self.sources.items()}
        mean = "ImageNet" if s.mean == IMAGENET_MEAN else ",".join(f"{v:g}" for v in s.mean)
        std = "ImageNet" if s.std == IMAGENET_STD else ",".join(f"{v:g}" for v in s.std)
        return (f"{s.input_size} px crop ({src['input_size']}), resize {s.resize_size} "
                f"({src['resize_size']}), {s.interpolation} ({src['interpolation']}), mean "
                f"{mean} ({src['mean']}), std {std} ({src['std']})")

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "sources": dict(self.sources)}


def resolve_preprocess(given: Mapping[str, Any], card: ModelCard | None = None, *,
                       defaults: Mapping[str, Any] = IMAGENET_DEFAULTS) -> Preprocessing:
    """Each value from ``given`` (explicit), else the card, else ``defaults``.

    A resize size nobody gave follows torchvision's rule from the input size, wherever that
    came from; so does one the card gives for another input size than the one in use.
    ``defaults`` holds ImageNet's sizes and normalisation.
    """
    from ..data.spec import PreprocessSpec, default_resize

    card_values = card.spec_values() if card is not None else {}
    card_source = str(card.path) if card is not None else ""
    if given.get("input_size") not in (None, card_values.get("input_size")):
        card_values.pop("resize_size", None)  # a resize goes with its own input size
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in SPEC_FIELDS:
        if given.get(name) is not None:
            values[name], sources[name] = given[name], GIVEN
        elif name in card_values:
            values[name], sources[name] = card_values[name], card_source
        elif name == "resize_size":
            continue
        else:
            values[name], sources[name] = defaults[name], IMAGENET_DEFAULT
    if "resize_size" not in values:
        # The default sizes go together (224 -> 256); any other input size gets the rule.
        imagenet = sources["input_size"] == IMAGENET_DEFAULT
        values["resize_size"] = (defaults["resize_size"] if imagenet
                                 else default_resize(values["input_size"]))
        sources["resize_size"] = IMAGENET_DEFAULT if imagenet else DERIVED
    return Preprocessing(PreprocessSpec(**values), sources)
