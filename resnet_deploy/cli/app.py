"""The ``resnet-deploy`` group: turns the library's exceptions into exit codes.

Library modules are imported inside each command so that ``resnet-deploy --help`` does not
pay for torch or onnxruntime. Errors: UserError -> exit 2, CheckFailed -> exit 1.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from .. import __version__
from ..errors import CheckFailed, UserError


class Group(click.Group):
    """Turns the library's exceptions into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)
        except CheckFailed as exc:
            click.echo(f"FAILED: {exc}", err=True)
            ctx.exit(1)


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
