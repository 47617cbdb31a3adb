"""The ``resnet-deploy`` command line: parse options, call the library, render the result.

One module per command; ``app`` holds the group and its error handling, ``options`` the
option bundles and renderers' helpers they share.
"""

from __future__ import annotations

from . import (bench, evaluate, export, fp16, package, parity, pipeline, quantize,  # noqa: F401
               serve)
from .app import main

__all__ = ["main"]
