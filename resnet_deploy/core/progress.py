"""One convention for progress: a callback that takes a line.

Every long-running library function takes ``progress: Progress | None``. It says
milestones as kept lines (``loading model.onnx``) and counts as ``transient`` ones
(``calibrating: 96/256 images, about 4 s left``), which a terminal may overwrite. The
library never prints; without a callback, lines go to the debug log.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    def __call__(self, message: str, *, transient: bool = False) -> None: ...


def to_log(message: str, *, transient: bool = False) -> None:
    """Where progress goes when nobody asked for it."""
    log.log(logging.DEBUG if transient else logging.INFO, "%s", message)


def eta(elapsed_s: float, fraction: float) -> str:
    """``about 12 s left``: the time left at the rate so far."""
    if fraction <= 0:
        return "time left unknown"
    left = elapsed_s * (1 - fraction) / fraction
    return f"about {left:.0f} s left" if left >= 1 else "under 1 s left"


class Counter:
    """Counts done items of ``total`` and says so, as transient lines at most every
    ``every_s`` seconds (and at the end), with the time left."""

    def __init__(self, progress: Progress | None, what: str, total: int, unit: str, *,
                 every_s: float = 0.25) -> None:
        self.say = progress or to_log
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            fraction = self.done / self.total if self.total else 1.0
            self.say(f"{self.what}: {self.done}/{self.total} {self.unit}, "
                     f"{eta(now - self.started, fraction)}", transient=True)
