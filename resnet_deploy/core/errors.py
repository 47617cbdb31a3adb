"""Exception types shared by every module.

The CLI maps :class:`UserError` to exit code 2 (bad input or usage, with a one-line
message that names the cause and the fix) and :class:`CheckFailed` to exit code 1
(the input was fine but a verification, such as parity, did not pass).

Messages name the caller's parameters in backticks, by their Python names
(```input_size` 4 is too small``): a Python caller reads the argument it passed, and the
CLI, which knows its flags, says ``--input-size`` instead. The facts a caller may act on
travel as attributes too: ``path`` (the file), ``param`` (the parameter), ``value`` and
``allowed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input: a missing or corrupt file, wrong keys, an unavailable provider."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 param: str | None = None, value: Any = None,
                 allowed: Sequence[Any] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.param = param
        self.value = value
        self.allowed = tuple(allowed) if allowed is not None else None


class ProviderUnavailable(UserError):
    """An execution provider was requested that ONNX Runtime cannot give us."""


class CheckFailed(Exception):
    """A measured check (parity, accuracy) did not meet its threshold."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report  # the full result (with to_dict()), so the CLI can show it
