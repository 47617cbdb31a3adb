"""The ``resnet-deploy`` command line: parse options, call the library, render the result.

One module per command; ``app`` holds the group and its error handling, ``options`` the
option bundles and renderers' helpers they share.
"""

from __future__ import annotations

from . import bench, evaluate, export, fp16, parity, quantize  # noqa: F401  (registers them)
from .app import main

__all__ = ["main"]
