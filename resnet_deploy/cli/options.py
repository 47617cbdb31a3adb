"""Option bundles and output helpers shared by every command (parse and render only)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import CheckFailed, UserError
from ..model import PublishedWeights

DEFAULT_MODEL = Path("artifacts/resnet18.onnx")
# numpy's and torch's generators take seeds below 2**32 on every platform.
SEED = click.IntRange(0, 2**32 - 1)
DEFAULT_IMAGES = Path("calibration")
MAX_INPUT_SIZE = 4096

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class FilePath(click.Path):
    """A file path. pathlib drops a trailing slash, so ``-o out/`` would quietly become a
    file named ``out``: a path that ends in one names a folder and is refused."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value!r} ends in '/', which names a folder; give a file path",
                      param, ctx)
        return super().convert(value, param, ctx)


class Finite(click.FloatRange):
    """A float in a range that is a real number: click's FloatRange lets nan through (every
    comparison with nan is false) and inf past an open-ended bound, and either would turn a
    tolerance or a normalisation into nonsense. Rejected as a usage error (exit 2)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        """click's text for an unbounded range is ``x<=None``; say "finite" instead."""
        return "finite" if self.min is None and self.max is None else super()._describe_range()


def preprocess_options(required: bool = False) -> Decorator:
    """--input-size/--resize-size/--mean/--std; None unless given, so model metadata wins."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option("--std", nargs=3, type=Finite(min=0, min_open=True), default=None,
                          metavar="R G B",
                          help="Normalisation std (default ImageNet's).")(fn)
        fn = click.option("--mean", nargs=3, type=Finite(), default=None, metavar="R G B",
                          help="Normalisation mean (default ImageNet's).")(fn)
        # Upper bounds keep a typo from allocating a tensor of hundreds of GB: one 4096 px
        # image is 200 MB as float32, far beyond what a ResNet-18 is ever fed.
        fn = click.option("--resize-size", type=click.IntRange(8, 2 * MAX_INPUT_SIZE),
                          default=None,
                          help="Shorter side before the centre crop (default input/0.875).")(fn)
        return click.option("--input-size", type=click.IntRange(8, MAX_INPUT_SIZE),
                            default=None,
                            required=required,
                            help="Square crop fed to the model." +
                            ("" if required else " Overrides the model's metadata."))(fn)

    return decorate


def build_spec(input_size: int | None, resize_size: int | None,
               mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
               default: PublishedWeights | None = None) -> Any:
    """A PreprocessSpec from CLI values; without --input-size, the ``default`` weights' own
    input and resize sizes, or None (use the model's metadata)."""
    from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

    size = input_size or (default.input_size if default else None)
    if input_size is None and default is not None:
        resize_size = resize_size or default.resize_size
    if size is None:
        if resize_size or mean or std:
            raise UserError("--resize-size/--mean/--std need --input-size as well")
        return None
    return PreprocessSpec.create(size, resize_size, mean=tuple(mean or IMAGENET_MEAN),
                                 std=tuple(std or IMAGENET_STD))


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "json_path", type=FilePath(),
                        default=None, help="Also write the results as JSON here.")(fn)


def weights_option(default: str | None) -> Decorator:
    return click.option("--weights", default=default, metavar="imagenet|random|PATH",
                        help="torchvision ImageNet weights, a seeded random init, or a "
                             ".pth/.pt/.safetensors checkpoint.")


def emit(text: str) -> None:
    click.echo(printable(text))


def printable(text: str) -> str:
    """``text`` safe for a strict UTF-8 stdout: a file name that is not UTF-8 (held as
    surrogate escapes) is shown with its odd bytes as ``\\xNN`` instead of crashing."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_json_if(path: Path | None, data: dict[str, Any]) -> None:
    """Write a command's result as JSON, with the machine it ran on at the top."""
    if path is not None:
        from ..machine import machine_info
        from ..report import write_json

        write_json(path, {"machine": machine_info(), **data})  # bench's own machine wins
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


def random_banner(untrained: bool) -> None:
    """One warning line (stderr) whenever the figures come from an untrained model."""
    if untrained:
        click.secho("warning: RANDOM WEIGHTS: the PyTorch model is untrained; its figures check "
                    "the plumbing only", fg="yellow", err=True)


def read_labels(path: Path | None) -> list[str] | None:
    """Class names, one per line (a BOM and CRLF line ends are fine). A blank line between
    names or a repeated name is refused: either would shift or merge classes silently."""
    if path is None:
        return None
    try:
        lines = [line.strip() for line in path.read_text("utf-8-sig").splitlines()]
    except OSError as exc:
        raise UserError(f"{path}: cannot read the labels file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: the labels file is not UTF-8 text (byte {exc.start}); save "
                        "it as UTF-8, one class name per line") from None
    while lines and not lines[-1]:
        lines.pop()  # trailing blank lines are only the file's end
    if not lines:
        raise UserError(f"{path}: the labels file is empty; give one class name per line")
    if "" in lines:
        raise UserError(f"{path}: line {lines.index('') + 1} is blank; give one class name per "
                        "line, with none left empty")
    repeated = next((name for i, name in enumerate(lines) if name in lines[:i]), None)
    if repeated is not None:
        raise UserError(f"{path}: {repeated!r} is listed twice; each class needs its own name")
    return lines


def progress_enabled() -> bool:
    return sys.stderr.isatty()


def provider_option(*, single: bool = False) -> Decorator:
    """``--provider`` (alias ``--providers``) in every command: repeatable, comma lists, names
    matched case-insensitively (cpu, cuda, tensorrt). ``single``: the command runs one."""

    def parse(ctx: click.Context, param: click.Parameter,
              value: tuple[str, ...]) -> tuple[str, ...]:
        from ..runtime import provider_name, short_provider

        names = tuple(dict.fromkeys(short_provider(provider_name(p))
                                    for v in value for p in v.split(",") if p.strip()))
        if not names:
            raise click.BadParameter("give a provider, e.g. --provider cpu")
        if single and len(names) > 1:
            raise click.BadParameter(f"this command runs one provider at a time, not "
                                     f"{', '.join(names)}; run it once per provider")
        return names

    return click.option("--provider", "--providers", "providers", multiple=True,
                        default=("cpu",), show_default=True, callback=parse,
                        metavar="cpu|cuda|tensorrt",
                        help="ONNX Runtime provider" + ("" if single else
                             "s (repeatable or a comma list)") +
                        "; a missing one is an error, never a silent CPU run.")


def source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What a PyTorch model is exported from: --weights, --num-classes, the preprocessing
    and --labels (export and pipeline)."""
    fn = click.option("--labels", type=FilePath(),
                      default=None, help="Class names, one per line (default: a model.json "
                      "or labels.txt beside the checkpoint, or ImageNet's).")(fn)
    fn = preprocess_options()(fn)
    # An fc of 100,000 classes is already 200 MB; a typo of 10**12 would be 2 PB.
    fn = click.option("--num-classes", type=click.IntRange(1, 100_000), default=None,
                      help="Classes of a random model (inferred from fc.weight for "
                           "checkpoints).")(fn)
    return weights_option("imagenet")(fn)


# A batch is allocated up front: 1024 images at 224 px are 0.6 GB, a typo of 100000 is 60 GB.
MAX_BATCH = 1024


def batch_sizes(value: str, option: str) -> tuple[int, ...]:
    """``1,8,32`` -> (1, 8, 32): integers from 1 to MAX_BATCH, duplicates dropped; a bad list
    is one error line naming ``option``."""
    try:
        sizes = tuple(int(v) for v in value.split(","))  # "1,,2" is a typo, not 1,2
    except ValueError:
        raise UserError(f"{option} {value!r}: give comma-separated integers, e.g. 1,8,32"
                        ) from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
        raise UserError(f"{option} {value!r}: give integers from 1 to {MAX_BATCH}, "
                        "e.g. 1,8,32")
    return tuple(dict.fromkeys(sizes))
