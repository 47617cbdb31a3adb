"""The ``resnet-deploy`` group: turns the library's exceptions into exit codes.

Library modules are imported inside each command so that ``resnet-deploy --help`` does not
pay for torch or onnxruntime. Errors: UserError -> exit 2, CheckFailed -> exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO

import click

from .. import __version__
from ..core.errors import CheckFailed, UserError
from .options import printable
from .phrase import phrase


class Terminated(BaseException):
    """SIGTERM as an exception in the main thread, so every ``with`` block (temp folders,
    atomic outputs) cleans up on the way out, as it does for Ctrl-C."""


@contextlib.contextmanager
def _signals_and_warnings(received: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM unwind the command (KeyboardInterrupt, Terminated), and the signal
    is remembered in ``received``: a library that catches the exception and raises one of
    its own (an exporter wrapping it in a RuntimeError) still ends in 130 / 143. A library
    warning becomes one log line, shown once."""
    shown: set[str] = set()

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
        text = f"{category.__name__}: {str(message).strip().splitlines()[0]}"
        if text not in shown:
            shown.add(text)
            logging.getLogger("resnet_deploy.warnings").warning(text)

    def unwind(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, unwind) for s in (signal.SIGINT, signal.SIGTERM)} \
        if in_main else {}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _UserFormatter(logging.Formatter):
    """Warnings read ``warning: ...`` like the CLI's own; -v detail keeps its source."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()  # as logging.Formatter does, for other readers
        if record.levelno >= logging.WARNING:
            return printable(f"warning: {phrase(record.message)}")
        return printable(f"{record.levelname.lower()} {record.name}: {record.message}")


class _Once(logging.Filter):
    """A warning is said once per command, however many times the library finds it (a
    model card read by two steps, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class Group(click.Group):
    """Turns the library's exceptions into one line on stderr and the documented exit code:
    UserError 2, CheckFailed 1, Ctrl-C 130, SIGTERM 143."""

    def invoke(self, ctx: click.Context) -> Any:
        received: list[int] = []
        try:
            _working_folder()
            with _signals_and_warnings(received):
                return super().invoke(ctx)
        except BaseException as exc:
            if signal.SIGTERM in received:
                click.echo("Error: terminated (SIGTERM); no half-written file was left", err=True)
                ctx.exit(143)
            if received or isinstance(exc, KeyboardInterrupt):
                click.echo("Error: interrupted (Ctrl-C); no half-written file was left", err=True)
                ctx.exit(130)
            if isinstance(exc, UserError):
                click.echo(printable(f"Error: {phrase(str(exc))}"), err=True)
                ctx.exit(2)
            if isinstance(exc, CheckFailed):
                click.echo(printable(f"FAILED: {phrase(str(exc))}"), err=True)
                ctx.exit(1)
            raise


def _working_folder() -> None:
    """A shell left in a folder that was deleted: one line, before any relative path fails."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise UserError("the working folder no longer exists (it was deleted or moved); cd to "
                        "an existing folder and run the command again") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resnet-deploy")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Take a ResNet-18 from PyTorch to ONNX and INT8, and prove every backend agrees.

    \b
    Typical flow:
      resnet-deploy export --weights imagenet
      resnet-deploy quantize --model artifacts/resnet18.onnx --calibration calibration/
      resnet-deploy parity --model artifacts/resnet18.onnx --weights imagenet
      resnet-deploy bench --model artifacts/resnet18.onnx --provider cpu
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_UserFormatter())
        for old in [f for f in handler.filters if isinstance(f, _Once)]:
            handler.removeFilter(old)
        handler.addFilter(_Once())
