"""The weights torchvision publishes, and the class names that come with ImageNet's.

Each member's IMAGENET1K_V1 record (URL, sha256 prefix, accuracy, evaluation sizes) is part
of its :class:`.arch.Architecture`; this module holds what they share.
"""

from __future__ import annotations

from importlib import resources

RANDOM = "random"
IMAGENET = "imagenet"
DEFAULT_ARCH = "resnet18"  # what --weights imagenet/random build unless --arch says
IMAGENET_CLASSES = 1000
LABELS_RESOURCE = "imagenet_classes.txt"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in torchvision's index order."""
    return resources.files(__package__).joinpath(LABELS_RESOURCE).read_text("utf-8").splitlines()
