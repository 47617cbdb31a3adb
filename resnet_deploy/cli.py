"""The ``resnet-deploy`` command line: parse options, call the API, render the results.

Library modules are imported inside each command so that ``resnet-deploy --help`` does not
pay for torch or onnxruntime. Errors: UserError -> exit 2, CheckFailed -> exit 1.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import CheckFailed, UserError

DEFAULT_MODEL = Path("artifacts/resnet18.onnx")
DEFAULT_IMAGES = Path("calibration")


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


# --- shared option bundles -------------------------------------------------------------

def preprocess_options(required: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

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


def weights_option(default: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--weights", default=default, metavar="imagenet|random|PATH",
                        help="torchvision ImageNet weights, a seeded random init, or a "
                             ".pth/.pt/.safetensors checkpoint.")


def emit(text: str) -> None:
    click.echo(text)


def write_json_if(path: Path | None, data: Any) -> None:
    if path is not None:
        from .report import write_json

        write_json(path, data)
        emit(f"wrote {path}")


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


# --- export ----------------------------------------------------------------------------

@main.command()
@weights_option("imagenet")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classes of a random model (inferred from fc.weight for checkpoints).")
@preprocess_options()
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Class names, one per line (ImageNet's ship with --weights imagenet).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo",
              show_default=True)
@click.option("--opset", type=click.IntRange(min=13), default=18, show_default=True)
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--simplify", type=click.Choice(["onnxsim", "onnxslim", "none"]),
              default="onnxsim", show_default=True)
@click.option("--parity-images", type=click.Path(path_type=Path), default=DEFAULT_IMAGES,
              show_default=True, help="Images for the automatic parity check "
                                      "(seeded random inputs when the folder has none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True)
@json_option
def export(weights: str, num_classes: int | None, input_size: int | None,
           resize_size: int | None, mean: Any, std: Any, labels: Path | None, exporter: str,
           opset: int, dynamic_batch: bool, simplify: str, parity_images: Path, seed: int,
           output: Path, json_path: Path | None) -> None:
    """Export ResNet-18 to a single verified ONNX file.

    The preprocessing, labels and weight hash are stored in the model; the file is written
    only if ONNX Runtime's logits match PyTorch's (exit 1 otherwise).

    \b
    Examples:
      resnet-deploy export --weights imagenet -o artifacts/resnet18.onnx
      resnet-deploy export --weights ft.pth --input-size 64 --resize-size 73 --json e.json
    """
    from .export import ExportOptions
    from .export import export as run_export
    from .model import load_model

    model, loaded = load_model(weights, num_classes=num_classes, seed=seed)
    random_banner(loaded)
    spec = build_spec(input_size, resize_size, mean, std, default_size=224)
    options = ExportOptions(exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                            simplify=simplify, parity_images=parity_images, seed=seed)
    try:
        result = run_export(model, loaded, spec, output, labels=read_labels(labels),
                            options=options)
    except CheckFailed as exc:
        if exc.report is not None:
            render_export(exc.report)
        raise
    render_export(result)
    write_json_if(json_path, result.to_dict())


def render_export(result: Any) -> None:
    from .report import format_table

    emit(f"{result.output}: {result.exporter} exporter, opset {result.opset}, "
         f"{result.simplifier} simplified {result.nodes_before} -> {result.nodes_after} nodes, "
         f"{result.size_bytes / 1e6:.1f} MB; weights: {result.weights}")
    emit(f"times: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    parity = result.parity
    emit(f"parity, PyTorch vs ORT CPU on {parity['inputs']} ({parity['tolerance']}):")
    emit(format_table(parity["rows"], [
        ("batch_size", "batch"), ("max_abs_diff", "max abs diff"), ("min_atol", "min atol"),
        ("cosine_min", "cosine min"), ("top1_agreement", "top-1 agree")]))
    emit("parity: PASS" if parity["passed"] else "parity: FAIL")


if __name__ == "__main__":  # pragma: no cover
    main()
