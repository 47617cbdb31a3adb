"""The preprocessing spec: resize the shorter side, centre-crop, normalise.

One frozen record, written into every exported model's metadata and read
back by every later step, so that no step can drift from the export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.choices import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from ..core.errors import UserError

if TYPE_CHECKING:
    pass


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
            raise UserError(f"`input_size` {self.input_size} is too small; use at least 8")
        if self.resize_size < self.input_size:
            raise UserError(f"`resize_size` {self.resize_size} is smaller than `input_size` "
                            f"{self.input_size}; the centre crop needs resize >= input")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("`mean` and `std` take three numbers each, std > 0")

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
