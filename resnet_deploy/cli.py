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


# --- parity ----------------------------------------------------------------------------

def split_providers(value: str) -> tuple[str, ...]:
    from .runtime import provider_name, short_provider

    names = tuple(short_provider(provider_name(p)) for p in value.split(",") if p.strip())
    if not names:
        raise UserError("--providers is empty; e.g. --providers cpu,cuda")
    return names


@main.command()
@click.option("--model", "models", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX model to check (repeatable).")
@weights_option(None)
@click.option("--providers", default="cpu", show_default=True,
              help="Comma-separated ORT providers: cpu, cuda, tensorrt.")
@click.option("--reference", default=None, metavar="torch|MODEL@PROVIDER",
              help="What the others are compared with (default: torch with --weights, "
                   "else the first model on cpu).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help=f"Real images to feed (default {DEFAULT_IMAGES}/).")
@click.option("--random", "random_count", type=click.IntRange(min=1), default=None,
              help="Use N seeded random inputs instead of images.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N images (a seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--atol", type=float, default=None, help="Absolute tolerance override.")
@click.option("--rtol", type=float, default=None,
              help="Tolerance as a fraction of max |reference logit| (FP32 default 1e-4).")
@click.option("--min-cosine", type=float, default=None, help="Per-input cosine floor override.")
@click.option("--min-top1", type=float, default=None, help="Top-1 agreement floor (0-1).")
@click.option("--save-outputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the reference logits and input hashes to this .npz.")
@click.option("--load-outputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Compare with golden logits from --save-outputs (no PyTorch needed).")
@click.option("--skip-unavailable", is_flag=True,
              help="Report a provider that cannot run as skipped instead of failing.")
@preprocess_options()
@json_option
def parity(models: tuple[Path, ...], weights: str | None, providers: str,
           reference: str | None, images: Path | None, random_count: int | None,
           limit: int | None, batch_size: int, atol: float | None, rtol: float | None,
           min_cosine: float | None, min_top1: float | None, save_outputs: Path | None,
           load_outputs: Path | None, skip_unavailable: bool, input_size: int | None,
           resize_size: int | None, mean: Any, std: Any, json_path: Path | None) -> None:
    """Check that every backend gives the same logits as the reference.

    Tolerances follow each model's precision: FP32 needs max abs diff <= 1e-4 x max
    |reference logit| and 100% top-1 agreement; FP16 cosine >= 0.999 and top-1 >= 99%;
    INT8 cosine >= 0.99 and top-1 >= 97%. Exit 0 when all pass, 1 when any fails, 2 for
    bad input or a provider that cannot run.

    \b
    Examples:
      resnet-deploy parity --weights imagenet --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx --providers cpu,cuda
      resnet-deploy parity --model a.onnx --random 32 --save-outputs golden.npz
      resnet-deploy parity --model a.onnx --random 32 --load-outputs golden.npz
    """
    from .model import load_model
    from .parity import (ParityOptions, ToleranceOverrides, check, load_outputs as load_golden,
                         make_inputs, model_spec, run_parity, save_outputs as save_golden)

    if images is not None and random_count is not None:
        raise UserError("give either --images or --random, not both")
    if load_outputs is not None and (weights or reference):
        raise UserError("--load-outputs is the reference; drop --weights/--reference")
    override = build_spec(input_size, resize_size, mean, std)
    if not models and override is None and weights is None:
        raise UserError("nothing to compare: give --model (and/or --weights)")
    spec = model_spec(list(models), override) if models else override
    weights_model = None
    if weights is not None:
        weights_model, loaded = load_model(weights, **random_init_of(models, weights))
        random_banner(loaded)
        if spec is None:
            spec = build_spec(None, None, None, None, default_size=224)
    inputs = make_inputs(spec, images=images or (None if random_count else DEFAULT_IMAGES),
                         random_count=random_count, limit=limit)
    golden = load_golden(load_outputs, inputs) if load_outputs is not None else None
    options = ParityOptions(
        providers=split_providers(providers), reference=reference, batch_size=batch_size,
        tolerances=ToleranceOverrides(atol, rtol, min_cosine, min_top1),
        skip_unavailable=skip_unavailable)
    report, reference_logits = run_parity(list(models), inputs=inputs,
                                          weights_model=weights_model, options=options,
                                          golden=golden)
    if save_outputs is not None:
        save_golden(save_outputs, report.reference, inputs, reference_logits)
        emit(f"wrote {save_outputs}")
    render_parity(report)
    write_json_if(json_path, report.to_dict())
    check(report)


def random_init_of(models: tuple[Path, ...], weights: str) -> dict[str, Any]:
    """For ``--weights random``, rebuild the exact init the first model was exported from."""
    from .preprocess import read_metadata

    if weights != "random" or not models:
        return {}
    meta = read_metadata(models[0])
    if meta is None or not meta.weights.get("random"):
        return {}
    return {"num_classes": meta.weights["num_classes"], "seed": meta.weights.get("seed") or 0}


def render_parity(report: Any) -> None:
    from .report import format_table

    emit(f"reference: {report.reference}; inputs: {report.inputs['description']}")
    rows = [{**r.to_dict(), "verdict": "skipped" if r.skipped else
             ("PASS" if r.passed else "FAIL")} for r in report.results]
    emit(format_table(rows, [
        ("backend", "backend"), ("precision", "prec"), ("max_abs_diff", "max abs"),
        ("p99_abs_diff", "p99 abs"), ("mean_abs_diff", "mean abs"), ("max_rel_diff", "max rel"),
        ("cosine_min", "cos min"), ("cosine_mean", "cos mean"), ("top1_agreement", "top-1"),
        ("top5_agreement", "top-5"), ("nonfinite", "NaN/Inf"), ("min_atol", "min atol"),
        ("verdict", "verdict")]))
    for r in report.results:
        if r.failures:
            emit(f"  {r.backend} FAILED [{r.tolerance}]: {'; '.join(r.failures)}")
        if r.skipped:
            emit(f"  {r.backend} skipped: {r.skipped}")
    emit("parity: PASS" if report.passed else "parity: FAIL")


if __name__ == "__main__":  # pragma: no cover
    main()
