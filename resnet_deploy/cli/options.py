"""Option bundles and output helpers shared by every command (parse and render only)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from ..core.choices import IMAGENET_MEAN, IMAGENET_STD
from ..core.errors import CheckFailed, UserError
from ..weights.arch import ARCHITECTURES
from .phrase import phrase

DEFAULT_MODEL = Path("artifacts/resnet18.onnx")
ARCH_NAMES = tuple(ARCHITECTURES)
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


def preprocess_options(*, source: bool = False) -> Decorator:
    """--input-size/--resize-size/--mean/--std; None unless given. ``source``: for export
    and pipeline, where they override the checkpoint's model.json (else ImageNet's); the
    other commands override the model's metadata."""
    overrides = ("Overrides the checkpoint's model.json" if source
                 else "Overrides the model's metadata")

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
                            help=f"Square crop fed to the model. {overrides}"
                            + (" [default: 224, ImageNet's]." if source else "."))(fn)

    return decorate


def build_spec(input_size: int | None, resize_size: int | None,
               mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Any:
    """A PreprocessSpec overriding a model's metadata, or None (use the metadata)."""
    from ..data.spec import PreprocessSpec

    if input_size is None:
        if resize_size or mean or std:
            raise UserError("--resize-size/--mean/--std need --input-size as well")
        return None
    return PreprocessSpec.create(input_size, resize_size, mean=tuple(mean or IMAGENET_MEAN),
                                 std=tuple(std or IMAGENET_STD))


# ``--json -``: the JSON goes to stdout, and everything the command would print there goes
# to stderr, so that stdout is one JSON document a pipe can parse.
JSON_TO_STDOUT = "json_to_stdout"


def _json_target(ctx: click.Context, param: click.Parameter, value: Any) -> Path | None:
    if value == "-":
        ctx.meta[JSON_TO_STDOUT] = True
        return None
    return None if value is None else FilePath().convert(value, param, ctx)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "json_path", callback=_json_target, metavar="PATH",
                        default=None,
                        help="Also write the results as JSON here ('-': to stdout, with the "
                             "tables on stderr).")(fn)


def _json_to_stdout() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(JSON_TO_STDOUT))


def weights_option(default: str | None) -> Decorator:
    return click.option("--weights", default=default, metavar="imagenet|random|PATH",
                        help="torchvision ImageNet weights, a seeded random init, or a "
                             ".pth/.pt/.safetensors checkpoint.")


# Each tolerance rule a check can fail, and the option that overrides it (the same name in
# parity, quantize and pipeline); a "would pass with" hint names only options its command has.
TOLERANCE_FLAGS = {"atol": "--atol", "min_cosine": "--min-cosine", "min_top1": "--min-top1"}
INT8_GATE_FLAGS = {k: v for k, v in TOLERANCE_FLAGS.items() if k != "atol"}


def int8_gate_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--min-cosine and --min-top1 for the INT8 gate, as parity spells and means them."""
    fn = click.option("--min-top1", type=Finite(0, 1), default=None,
                      help="INT8 gate: top-1 agreement floor (0-1) [default: 0.97].")(fn)
    return click.option("--min-cosine", type=Finite(0, 1), default=None,
                        help="INT8 gate: 1st-percentile cosine floor [default: 0.97].")(fn)


def output_name_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--output-name: which output is the logits in a model with several (-o is taken)."""
    return click.option("--output-name", default=None, metavar="NAME",
                        help="The output to read in a model with several [default: the one "
                             "its metadata records, else its only 2-D output].")(fn)


def emit(text: str) -> None:
    """A line of the command's report: stdout, or stderr when stdout carries the JSON."""
    click.echo(printable(phrase(text)), err=_json_to_stdout())


def emit_architectures(archs: Iterable[str | None]) -> None:
    """``architecture: resnet50``: the ResNets the models were exported from (as recorded in
    their metadata), so a table of figures says what it measured; nothing for foreign models."""
    named = sorted({arch for arch in archs if arch})
    if named:
        emit(f"architecture: {', '.join(named)}")


def printable(text: str) -> str:
    """``text`` safe for a strict UTF-8 stdout: a file name that is not UTF-8 (held as
    surrogate escapes) is shown with its odd bytes as ``\\xNN`` instead of crashing."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_json_if(path: Path | None, data: dict[str, Any]) -> None:
    """Write a command's result as JSON, with the machine it ran on at the top (to stdout
    after ``--json -``)."""
    if path is None and not _json_to_stdout():
        return
    import json

    from ..core.machine import machine_info
    from ..core.render import write_json

    document = {"machine": machine_info(), **data}  # bench's own machine wins
    if path is None:
        click.echo(json.dumps(document, indent=2, default=str))
    else:
        write_json(path, document)
        emit(f"wrote {path}")


def describe_machine() -> str:
    from ..core.machine import describe

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
    """Class names from --labels: a model card's ``classes``, or one name per line."""
    if path is None:
        return None
    from ..weights.card import read_labels as read

    return read(path)


CLEAR_LINE = "\r\x1b[K"  # back to the start of the line, erase it


@contextlib.contextmanager
def terminal_progress() -> Iterator[Any]:
    """The one progress display (a :class:`core.progress.Progress`), on a terminal only:
    lines on stderr, the transient ones (counts, time left) overwriting each other and the
    next kept line replacing them; the last is erased when the work ends. Elsewhere None."""
    if not sys.stderr.isatty():
        yield None
        return

    def say(message: str, *, transient: bool = False) -> None:
        click.echo(CLEAR_LINE + printable(phrase(message)), err=True, nl=not transient)

    try:
        yield say
    finally:
        click.echo(CLEAR_LINE, err=True, nl=False)


def provider_option(*, single: bool = False) -> Decorator:
    """``--provider`` (alias ``--providers``) in every command: repeatable, comma lists, names
    matched case-insensitively (cpu, cuda, tensorrt). ``single``: the command runs one."""

    def parse(ctx: click.Context, param: click.Parameter,
              value: tuple[str, ...]) -> tuple[str, ...]:
        from ..runtime.providers import provider_name, short_provider

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
