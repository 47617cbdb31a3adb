"""Published weights: one record per checkpoint torchvision publishes, and
the class names that come with ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


RANDOM = "random"

IMAGENET = "imagenet"


@dataclass(frozen=True)
class PublishedWeights:
    """Everything known about a published checkpoint, kept in one record."""

    name: str
    url: str
    filename: str
    sha256_prefix: str
    num_classes: int
    input_size: int
    resize_size: int
    top1: float
    labels_resource: str


IMAGENET1K_V1 = PublishedWeights(
    name="IMAGENET1K_V1",
    url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    filename="resnet18-f37072fd.pth",
    sha256_prefix="f37072fd",
    num_classes=1000,
    input_size=224,
    resize_size=256,
    top1=0.69758,
    labels_resource="imagenet_classes.txt",
)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in torchvision's index order."""
    text = resources.files(__package__).joinpath(IMAGENET1K_V1.labels_resource).read_text("utf-8")
    return text.splitlines()
