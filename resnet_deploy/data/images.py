"""The one image loader, folders of photos, and batches of preprocessed images.

Every command reads photos through :func:`load_image` (EXIF orientation,
every colour mode, a decompression-bomb limit) and :func:`to_tensor`.
"""

from __future__ import annotations

import functools
import logging
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import UserError
from .spec import PreprocessSpec

if TYPE_CHECKING:
    from PIL import Image


log = logging.getLogger(__name__)

# Images with more pixels are refused as unreadable before they are decoded: 80 MP (e.g.
# 10000x8000) is above any camera's default output and decodes to 240 MB of RGB, while a PNG
# header claiming 60000x60000 (3.6 gigapixels) is a decompression bomb, not a photo. Below
# Pillow's own warning threshold (89.5 MP), so this limit is the one that decides.
MAX_IMAGE_PIXELS = 80_000_000


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
        # Pillow names the file in some reasons ("cannot identify image file 'x.jpg'"):
        # the message names it once, in front.
        reason = str(exc).splitlines()[0] if str(exc) else ""
        reason = reason.replace(repr(str(path)), "").replace(str(path), "").strip()[:120]
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
