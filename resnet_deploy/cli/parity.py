"""``resnet-deploy parity``: every backend against one reference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.errors import UserError
from ..core.files import check_outputs
from .app import main
from .options import (DEFAULT_IMAGES, FilePath, Finite, build_spec, describe_machine, emit,
                      emit_architectures, json_option, output_name_option, preprocess_options,
                      provider_option, random_banner, weights_option, write_json_if)

if TYPE_CHECKING:
    from ..checks.parity import ParityReport
    from ..runtime.layerwise import LayerReport


@main.command()
@click.option("--model", "models", multiple=True,
              type=FilePath(),
              help="ONNX model to check (repeatable).")
@weights_option(None)
@provider_option()
@click.option("--reference", default=None, metavar="torch|MODEL@PROVIDER",
              help="What the others are compared with (default: torch with --weights, "
                   "else the first model on cpu).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help=f"Real images to feed (default {DEFAULT_IMAGES}/).")
@click.option("--random", "random_count", type=click.IntRange(1, 1_000_000), default=None,
              help="Use N seeded random inputs instead of images.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N images (a seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--atol", type=Finite(min=0), default=None,
              help="Absolute tolerance override (0: exact, with --rtol 0 for FP32).")
@click.option("--rtol", type=Finite(min=0), default=None,
              help="Tolerance as a fraction of max |reference logit| (FP32 default 1e-4).")
@click.option("--min-cosine", type=Finite(0, 1), default=None,
              help="Cosine floor override: per input for FP32/FP16, 1st percentile for INT8.")
@click.option("--min-top1", type=Finite(0, 1), default=None,
              help="Top-1 agreement floor (0-1).")
@click.option("--save-outputs", type=FilePath(), default=None,
              help="Write the reference logits and input hashes to this .npz.")
@click.option("--load-outputs", type=FilePath(), default=None,
              help="Compare with golden logits from --save-outputs (no PyTorch needed).")
@click.option("--strict", is_flag=True, help="An unreadable image is an error, not a skip.")
@click.option("--skip-unavailable", is_flag=True,
              help="Report a provider that cannot run as skipped instead of failing.")
@click.option("--layerwise", is_flag=True,
              help="Also compare every layer of each pair, named by its PyTorch module, and "
                   "name the first divergence (see below).")
@click.option("--layerwise-images", type=click.IntRange(min=1), default=None,
              help="How many of the inputs --layerwise uses (default 8; separate from "
                   "--limit).")
@preprocess_options()
@output_name_option
@json_option
def parity(models: tuple[Path, ...], weights: str | None, providers: tuple[str, ...],
           reference: str | None, images: Path | None, random_count: int | None,
           limit: int | None, batch_size: int, atol: float | None, rtol: float | None,
           min_cosine: float | None, min_top1: float | None, save_outputs: Path | None,
           load_outputs: Path | None, strict: bool, skip_unavailable: bool, layerwise: bool,
           layerwise_images: int | None, input_size: int | None,
           resize_size: int | None, mean: Any, std: Any, output_name: str | None,
           json_path: Path | None) -> None:
    """Check that every backend gives the same logits as the reference.

    Tolerances follow each model's precision: FP32 needs max abs diff <= 1e-4 x max
    |reference logit| and 100% top-1 agreement; FP16 cosine >= 0.999 per input and top-1
    >= 99%; INT8 1st-percentile cosine >= 0.97 and top-1 >= 97%. Exit 0 when all pass, 1
    when any fails, 2 for bad input or a provider that cannot run.

    --layerwise compares the output of every conv (BatchNorm folded in), residual add,
    pooling and fc of each pair on --layerwise-images inputs, one batch at a time, and
    names the first divergence: the first layer in graph order that fails while every
    layer before it passes. A layer passes by its pair's precision: FP32 max |diff| <=
    rtol x max |reference tensor|; FP16 and INT8 by the per-image cosine floor (worst
    image for FP16, 1st percentile for INT8); --atol/--rtol/--min-cosine apply. FP32 vs
    INT8 also ranks where quantization error enters (SQNR dB each layer adds). It only
    adds information: the exit code is parity's.

    \b
    Examples:
      resnet-deploy parity --weights imagenet --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx --providers cpu,cuda
      resnet-deploy parity --model a.onnx --random 32 --save-outputs golden.npz
      resnet-deploy parity --model a.onnx --random 32 --load-outputs golden.npz
      resnet-deploy parity --weights ckpt.pth --model a.int8.onnx --layerwise
    """
    check_outputs({"--json": json_path, "--save-outputs": save_outputs},
                  [*models, load_outputs, images,
                   Path(weights) if weights and Path(weights).is_file() else None])
    from ..checks.parity import ParityOptions, check, compare_backends
    from ..core.metrics import ToleranceOverrides

    if images is None and random_count is None:
        if not DEFAULT_IMAGES.is_dir():
            raise UserError(f"no --images given and ./{DEFAULT_IMAGES} does not exist here; "
                            "pass --images DIR or --random N")
        images = DEFAULT_IMAGES
    if layerwise_images is not None and not layerwise:
        raise UserError("--layerwise-images says how many inputs --layerwise uses; add "
                        "--layerwise")
    options = ParityOptions(
        providers=providers, reference=reference, batch_size=batch_size,
        tolerances=ToleranceOverrides(atol, rtol, min_cosine, min_top1),
        skip_unavailable=skip_unavailable, save_reference=save_outputs is not None,
        output_name=output_name, layerwise=layerwise,
        layerwise_images=layerwise_images or ParityOptions.layerwise_images)
    report = compare_backends(models, weights=weights, images=images,
                              random_count=random_count, limit=limit,
                              spec=build_spec(input_size, resize_size, mean, std),
                              load_outputs_from=load_outputs, save_outputs_to=save_outputs,
                              strict=strict,
                              options=options)
    random_banner(report.untrained)
    render_parity(report)
    write_json_if(json_path, report.to_dict())
    check(report)


def render_parity(report: ParityReport) -> None:
    from ..core.render import Column, comparison_columns, format_table

    emit(f"machine: {describe_machine()}")
    emit(f"reference: {report.reference}; inputs: {report.inputs['description']}")
    emit_architectures(r.arch for r in report.results)
    rows = [{**r.to_dict(), "verdict": "skipped" if r.skipped else
             ("PASS" if r.passed else "FAIL")} for r in report.results]
    if rows:  # a reference-only run (--save-outputs) has no table to show
        emit(format_table(rows, [
            Column("backend", "backend"), Column("precision", "precision"),
            *comparison_columns("reference - backend"),
            Column("nonfinite", "NaN/Inf", "int"), Column("verdict", "verdict")]))
    rules = {r.precision: r.tolerance for r in report.results if not r.skipped}
    if rules:
        emit("judged by: " + "; ".join(f"{p} {rule}" for p, rule in rules.items()))
    for r in report.results:
        if r.failures:
            emit(f"  {r.backend} FAILED [{r.tolerance}]: {'; '.join(r.failures)}")
        if r.skipped:
            emit(f"  {r.backend} skipped: {r.skipped}")
    for r in report.results:
        if r.layerwise is not None:
            render_layers(r.backend, report.reference, r.layerwise)
    for note in report.notes:
        emit(f"note: {note}")
    emit("parity: nothing compared" if not report.results else
         "parity: PASS" if report.passed else "parity: FAIL")


def render_layers(backend: str, reference: str, layers: LayerReport | str) -> None:
    """One pair layer by layer: the first divergence, then the layers most worth a look."""
    from ..core.render import Column, format_table
    from ..runtime.layerwise import SHOWN

    if isinstance(layers, str):
        emit(f"layerwise {backend} vs {reference}: none ({layers})")
        return
    emit(f"layerwise {backend} vs {reference}: {len(layers.layers)} layers on "
         f"{layers.images} inputs, each judged by {layers.tolerance.describe()}"
         + (f"; {layers.skipped} points with no counterpart" if layers.skipped else ""))
    first = layers.first_divergence
    emit("  first divergence: " + ("none, every layer passes" if first is None else
                                   f"{first.label} ({first.op})"))
    title = "where INT8 error enters (most SQNR added first)" if layers.budget else \
        "the worst layers"
    emit(f"  {title}, {min(SHOWN, len(layers.layers))} of {len(layers.layers)}:")
    rows = [{**row.to_dict(layers.budget), "label": row.label,
             "verdict": "PASS" if row.passes else "FAIL"} for row in layers.worst()]
    budget = [Column("sqnr_db", "SQNR dB", "number"), Column("added_db", "added dB", "number")] \
        if layers.budget else [Column("sqnr_db", "SQNR dB", "number")]
    emit(format_table(rows, [
        Column("label", "layer [node]"), Column("op", "op"),
        Column("max_abs_rel", "max|diff|/max|ref|", "error"),
        Column("worst_cosine", "worst cosine", "cosine"),
        Column("cosine_p1", "cosine p1", "cosine"), *budget,
        Column("verdict", "verdict")]))
