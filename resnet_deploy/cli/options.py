"""Option bundles and output helpers shared by every command (parse and render only)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import CheckFailed, UserError

DEFAULT_MODEL = Path("artifacts/resnet18.onnx")
DEFAULT_IMAGES = Path("calibration")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def preprocess_options(required: bool = False) -> Decorator:
    """--input-size/--resize-size/--mean/--std; None unless given, so model metadata wins."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--std", nargs=3, type=float, default=None, metavar="R G B",
                          help="Normalisation std (default ImageNet's).")(fn)
        fn = click.option("--mean", nargs=3, type=float, default=None, metavar="R G B",
                          help="Normalisation mean (default ImageNet's).")(fn)
        fn = click.option("--resize-size", type=click.IntRange(min=8), default=None,
                          help="Shorter side before the centre crop (default input/0.875).")(fn)
        return click.option("--input-size", type=click.IntRange(min=8), default=None,
                            required=required,
                            help="Square crop fed to the model." +
                            ("" if required else " Overrides the model's metadata."))(fn)

    return decorate


def build_spec(input_size: int | None, resize_size: int | None,
               mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
               default_size: int | None = None) -> Any:
    """A PreprocessSpec from CLI values, or None when none were given (use the model's)."""
    from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

    size = input_size or default_size
    if size is None:
        if resize_size or mean or std:
            raise UserError("--resize-size/--mean/--std need --input-size as well")
        return None
    return PreprocessSpec.create(size, resize_size, mean=tuple(mean or IMAGENET_MEAN),
                                 std=tuple(std or IMAGENET_STD))


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help="Also write the results as JSON here.")(fn)


def weights_option(default: str | None) -> Decorator:
    return click.option("--weights", default=default, metavar="imagenet|random|PATH",
                        help="torchvision ImageNet weights, a seeded random init, or a "
                             ".pth/.pt/.safetensors checkpoint.")


def emit(text: str) -> None:
    click.echo(text)


def write_json_if(path: Path | None, data: dict[str, Any]) -> None:
    """Write a command's result as JSON, with the machine it ran on at the top."""
    if path is not None:
        from ..machine import machine_info
        from ..report import write_json

        write_json(path, {"machine": {**machine_info(), **data.get("machine", {})}, **data})
        emit(f"wrote {path}")


def describe_machine() -> str:
    from ..machine import describe

    return describe()


def show_result(produce: Callable[[], Any], render: Callable[[Any], None],
                json_path: Path | None) -> None:
    """Render and save a result; when its check fails, still show what was measured."""
    try:
        result = produce()
    except CheckFailed as exc:
        if exc.report is not None:
            render(exc.report)
            write_json_if(json_path, exc.report.to_dict())
        raise
    render(result)
    write_json_if(json_path, result.to_dict())


def random_banner(weights: Any) -> None:
    if getattr(weights, "is_random", False):
        click.secho("!" * 72 + "\n! RANDOM WEIGHTS: this model is untrained; its figures check the "
                    "plumbing only.\n" + "!" * 72, fg="yellow", err=True)


def read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        labels = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise UserError(f"{path}: cannot read the labels file ({exc.strerror})") from None
    if not labels:
        raise UserError(f"{path}: the labels file is empty; give one class name per line")
    return labels


def progress_enabled() -> bool:
    return sys.stderr.isatty()
