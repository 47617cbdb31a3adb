"""Exception types shared by every module.

The CLI maps :class:`UserError` to exit code 2 (bad input or usage, with a one-line
message that names the cause and the fix) and :class:`CheckFailed` to exit code 1
(the input was fine but a verification, such as parity, did not pass).
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input: a missing or corrupt file, wrong keys, an unavailable provider."""


class ProviderUnavailable(UserError):
    """An execution provider was requested that ONNX Runtime cannot give us."""


class CheckFailed(Exception):
    """A measured check (parity, accuracy) did not meet its threshold."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report  # the full result (with to_dict()), so the CLI can show it
