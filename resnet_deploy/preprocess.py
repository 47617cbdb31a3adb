"""The preprocessing spec, the one image loader, and the model metadata that carries both.

Export writes a :class:`ModelMetadata` record into the ONNX file's ``metadata_props``;
every later step reads it back (through :class:`runtime.ModelFile`, which also validates
it), so that no step can drift from the preprocessing used at export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .choices import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, QUANT_TYPES, TARGETS
from .errors import UserError

if TYPE_CHECKING:
    import onnx
    from PIL import Image

log = logging.getLogger(__name__)

METADATA_KEY = "resnet_deploy"
OUTPUT_KINDS = ("logits", "features")
# Images with more pixels are refused as unreadable before they are decoded: 80 MP (e.g.
# 10000x8000) is above any camera's default output and decodes to 240 MB of RGB, while a PNG
# header claiming 60000x60000 (3.6 gigapixels) is a decompression bomb, not a photo. Below
# Pillow's own warning threshold (89.5 MP), so this limit is the one that decides.
MAX_IMAGE_PIXELS = 80_000_000


def default_resize(input_size: int) -> int:
    """torchvision's eval convention: resize to size/0.875 (256 for 224), then centre-crop."""
    return int(round(input_size / 0.875))


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side, centre-crop, scale to [0,1], normalise; RGB, NCHW float32."""

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise UserError(f"--input-size {self.input_size} is too small; use at least 8")
        if self.resize_size < self.input_size:
            raise UserError(f"--resize-size {self.resize_size} is smaller than --input-size "
                            f"{self.input_size}; the centre crop needs resize >= input")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("--mean and --std take three numbers each, std > 0")

    @classmethod
    def create(cls, input_size: int = 224, resize_size: int | None = None,
               **kwargs: Any) -> PreprocessSpec:
        return cls(input_size=input_size,
                   resize_size=resize_size or default_resize(input_size), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in data.items() if k in known}
        return cls(**values)


def load_image(path: str | Path) -> Image.Image:
    """Open any image Pillow reads, apply EXIF orientation, and return it as 8-bit RGB.

    Alpha is dropped (as torchvision's ImageFolder loader does), palette images are expanded,
    CMYK is converted, and 16/32-bit greyscale is scaled to 8 bits rather than clipped.
    Anything Pillow raises while opening or decoding, a decompression bomb included, makes
    the file unreadable (a UserError the callers skip and count), never a traceback.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{path}: {opened.width}x{opened.height} pixels is over "
                                    f"the {MAX_IMAGE_PIXELS // 1_000_000} MP limit for a photo")
                img: Image.Image = ImageOps.exif_transpose(opened)
                img.load()
    except UserError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types, bombs included
        reason = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}"
                        f"{': ' + reason if reason else ''})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def to_tensor(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One image through the spec: returns CHW float32, the layout the model takes."""
    from PIL import Image

    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}[spec.interpolation]
    w, h = img.size
    # Same arithmetic as torchvision's Resize(int): the shorter side becomes resize_size.
    if w <= h:
        size = (spec.resize_size, int(spec.resize_size * h / w))
    else:
        size = (int(spec.resize_size * w / h), spec.resize_size)
    img = img.resize(size, resample)
    w, h = img.size
    s = spec.input_size
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    scaled = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    normalised = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def preprocess_file(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    return to_tensor(load_image(path), spec)


@functools.lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """Every file suffix Pillow registers a format for (.jpg, .png, .gif, .tiff, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(suffix.lower() for suffix in Image.registered_extensions())


def is_image(path: Path) -> bool:
    """A file Pillow would open: by its suffix, else by what its first bytes say (a photo
    saved without an extension counts; LABELS.md does not)."""
    if path.suffix.lower() in image_suffixes():
        return path.is_file() or path.is_symlink()
    if not path.is_file():
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def list_images(folder: str | Path) -> list[Path]:
    """Every image below ``folder`` (recursive; any format Pillow reads), sorted.

    A broken or looping symlink named like an image is listed too, so that the loader counts
    it as unreadable (and --strict refuses it) instead of it vanishing without a word.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: no such image folder; pass a folder of photos")
    return sorted(p for p in root.rglob("*") if is_image(p))


def seeded_subset(items: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """A reproducible random subset of at most ``limit`` items, in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def load_batch(paths: Iterable[Path], spec: PreprocessSpec, *,
               strict: bool = False) -> tuple[np.ndarray, list[Path], list[Path]]:
    """Preprocess images into an NCHW batch; returns (batch, used paths, skipped paths)."""
    arrays, used, skipped = [], [], []
    for path in paths:
        try:
            arrays.append(preprocess_file(path, spec))
            used.append(path)
        except UserError:
            if strict:
                raise
            skipped.append(path)
    shape = (0, 3, spec.input_size, spec.input_size)
    batch = np.stack(arrays) if arrays else np.zeros(shape, np.float32)
    return batch, used, skipped


def image_inputs(folder: str | Path, spec: PreprocessSpec, limit: int | None = None,
                 seed: int = 0, *, listed: Sequence[Path] | None = None,
                 ) -> tuple[np.ndarray, list[Path]]:
    """Real photos through ``spec``: a seeded subset of at most ``limit`` readable images
    (``listed``: the folder's images when the caller has already listed them)."""
    paths = seeded_subset(list(listed) if listed is not None else list_images(folder), limit,
                          seed)
    batch, used, skipped = load_batch(paths, spec)
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s", len(skipped), folder)
    if not used:
        raise UserError(f"{folder}: holds no readable image; "
                        "point to a folder of photos")
    return batch, used


def random_inputs(spec: PreprocessSpec, count: int, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal inputs, i.e. roughly what normalised photos look like."""
    shape = (count, 3, spec.input_size, spec.input_size)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@dataclass(frozen=True)
class ModelMetadata:
    """What travels inside each exported model: enough to preprocess and to trace its origin."""

    preprocess: PreprocessSpec
    labels: list[str] | None
    weights: dict[str, Any]
    exporter: str
    opset: int
    versions: dict[str, str]
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The graph output that is read: {"name": ..., "kind": "logits" | "features"}.
    output: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse and validate the record; any flaw is a ValueError saying which field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
        _check_schema(data)
        data["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


# field -> (required, check, what it must be); checked before any value is used.
_FIELDS: dict[str, tuple[bool, Any, str]] = {
    "preprocess": (True, lambda v: isinstance(v, dict), "an object"),
    "labels": (True, lambda v: v is None or (isinstance(v, list) and
                                               all(isinstance(x, str) for x in v)),
               "a list of strings or null"),
    "weights": (True, lambda v: isinstance(v, dict), "an object"),
    "exporter": (True, lambda v: isinstance(v, str), "a string"),
    "opset": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and 7 <= v <= 99,
              "an integer opset"),
    "versions": (True, lambda v: isinstance(v, dict), "an object"),
    "quantization": (False, lambda v: v is None or isinstance(v, dict), "an object or null"),
    "extra": (False, lambda v: isinstance(v, dict), "an object"),
    "output": (False, lambda v: v is None or (isinstance(v, dict)
                                               and isinstance(v.get("name"), str)
                                               and v.get("kind") in OUTPUT_KINDS),
               'an object with a "name" and a "kind" (logits or features)'),
}
_SPEC_FIELDS: dict[str, tuple[Any, str]] = {
    "input_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "resize_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
             "three numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
            "three numbers"),
    "channel_order": (lambda v: v == "RGB", '"RGB"'),
    "layout": (lambda v: v == "NCHW", '"NCHW"'),
    "dtype": (lambda v: v == "float32", '"float32"'),
}


def _check_schema(data: Any) -> None:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for name, (required, ok, what) in _FIELDS.items():
        if name not in data:
            if required:
                raise ValueError(f"the {name!r} field is missing")
        elif not ok(data[name]):
            raise ValueError(f"{name!r} must be {what}")
    for name, (ok, what) in _SPEC_FIELDS.items():
        if name not in data["preprocess"]:
            raise ValueError(f"'preprocess.{name}' is missing")
        if not ok(data["preprocess"][name]):
            raise ValueError(f"'preprocess.{name}' must be {what}")
    layers = data.get("extra", {}).get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in layers.items()):
        raise ValueError("'extra.layers' must be an object of node name -> module name")
    quantization = data.get("quantization") or {}
    for name, choices in (("target", TARGETS), ("activation_type", QUANT_TYPES),
                          ("weight_type", QUANT_TYPES)):
        if name in quantization and quantization[name] not in choices:
            raise ValueError(f"'quantization.{name}' must be one of {', '.join(choices)}")
    if not isinstance(quantization.get("reduce_range", False), bool):
        raise ValueError("'quantization.reduce_range' must be true or false")


def write_metadata(model: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Store ``meta`` under one ``metadata_props`` key, replacing any earlier record."""
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == METADATA_KEY:
            del model.metadata_props[i]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()


def metadata_from_proto(model: onnx.ModelProto,
                        source: str | Path = "the model") -> ModelMetadata | None:
    """The record written at export, or None; a corrupt record is a UserError naming
    ``source``, never a traceback."""
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            try:
                return ModelMetadata.from_json(entry.value)
            except (ValueError, UserError) as exc:
                raise UserError(f"{source}: its {METADATA_KEY} metadata is corrupt ({exc}); "
                                "export the model again with 'resnet-deploy export'") from None
    return None


def load_onnx(path: str | Path, *, external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, turning every way it can be bad into a one-line UserError.

    ``external_data`` False leaves tensors stored in side files (``model.onnx.data``)
    unread, so a caller can see which files the model references."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file; run 'resnet-deploy export' first")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the model file is empty; export it again")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except FileNotFoundError as exc:
        raise UserError(f"{path}: its weights are stored in a side file that is not beside it "
                        f"({Path(exc.filename or '?').name}); copy that file next to the "
                        "model") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); "
                        "export it again with 'resnet-deploy export'") from None


def external_files(model: onnx.ModelProto) -> list[str]:
    """The side files a model loaded without its external data keeps tensors in."""
    from onnx.external_data_helper import uses_external_data

    tensors = [*model.graph.initializer,
               *(a.t for node in model.graph.node for a in node.attribute if a.HasField("t"))]
    found: list[str] = []
    for tensor in tensors:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in found:
                found.append(location)
    return found


def read_metadata(path: str | Path) -> ModelMetadata | None:
    """The record written at export, or None for a model this tool did not export."""
    return metadata_from_proto(load_onnx(path), path)


def resolve_spec(meta: ModelMetadata | None, override: PreprocessSpec | None,
                 model_path: str | Path) -> PreprocessSpec:
    """Explicit CLI preprocessing wins; else the model's own; else a clear error."""
    if override is not None:
        return override
    if meta is None:
        raise UserError(f"{model_path}: has no resnet-deploy preprocessing metadata; export "
                        "it with 'resnet-deploy export', or pass --input-size (and "
                        "--resize-size/--mean/--std) to say how to preprocess")
    return meta.preprocess
