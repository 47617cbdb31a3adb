"""``resnet-deploy export``: PyTorch -> verified ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.choices import DEFAULT_OPSET, EXPORTERS, OPSETS, SIMPLIFIERS, Exporter, Simplifier
from ..core.files import check_outputs
from .app import main
from .options import (DEFAULT_IMAGES, DEFAULT_MODEL, SEED, FilePath, describe_machine, emit,
                      json_option, random_banner, read_labels, show_result)
from .source import describe_preprocessing, source_options, source_preprocessing, warn_if_guessed

if TYPE_CHECKING:
    from ..convert.export import ExportResult


@main.command()
@source_options
@click.option("--exporter", type=click.Choice(EXPORTERS), default="dynamo",
              show_default=True)
@click.option("--opset", type=click.IntRange(min(lo for lo, _ in OPSETS.values()),
                                             max(hi for _, hi in OPSETS.values())),
              default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset: " + ", ".join(f"{e} {lo}-{hi}" for e, (lo, hi) in OPSETS.items())
              + ".")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--simplify", type=click.Choice(SIMPLIFIERS),
              default="onnxsim", show_default=True)
@click.option("--parity-images", type=click.Path(path_type=Path), default=DEFAULT_IMAGES,
              show_default=True, help="Images for the automatic parity check "
                                      "(seeded random inputs when the folder has none).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("-o", "--output", type=FilePath(),
              default=DEFAULT_MODEL, show_default=True)
@json_option
def export(weights: str, arch: str | None, features: bool, num_classes: int | None,
           input_size: int | None, resize_size: int | None, mean: Any, std: Any,
           labels: Path | None, exporter: Exporter, opset: int, dynamic_batch: bool,
           simplify: Simplifier, parity_images: Path, seed: int, output: Path,
           json_path: Path | None) -> None:
    """Export a torchvision ResNet to a single verified ONNX file.

    Any of the ten (resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d,
    resnext101_64x4d, wide_resnet50_2/101_2): the architecture is read from the
    checkpoint's keys and shapes (--arch names it instead). --features exports the pooled
    embedding before fc instead of the class scores.

    The preprocessing, labels and weight hash are stored in the model; the file is written
    only if ONNX Runtime's logits match PyTorch's (exit 1 otherwise).

    \b
    Examples:
      resnet-deploy export --weights imagenet -o artifacts/resnet18.onnx
      resnet-deploy export --weights ft.pth --input-size 64 --resize-size 73 --json e.json
    """
    low, high = OPSETS[exporter]
    if not low <= opset <= high:
        raise click.BadParameter(f"the {exporter} exporter writes opsets {low}-{high}; pass "
                                 f"one of those or another --exporter", param_hint="'--opset'")
    check_outputs({"-o": output, "--json": json_path},
                  [labels, parity_images, Path(weights) if Path(weights).is_file() else None])
    label_names = read_labels(labels)
    from ..convert.export import ExportOptions, export as run_export
    from ..weights.checkpoints import load_model

    model, loaded = load_model(weights, arch=arch, num_classes=num_classes, seed=seed,
                               find_labels=labels is None, features=features)
    random_banner(loaded.is_random)
    preprocessing = source_preprocessing(weights, input_size, resize_size, mean, std)
    warn_if_guessed(preprocessing, weights, loaded.num_classes)
    options = ExportOptions(exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                            simplify=simplify, parity_images=parity_images, seed=seed)
    show_result(lambda: run_export(model, loaded, preprocessing.spec, output,
                                   labels=label_names,
                                   labels_source=f"{labels} (--labels)" if labels else None,
                                   preprocess_sources=preprocessing.sources,
                                   options=options), render_export, json_path)


def simplifier_line(result: Any) -> str:
    """What the simplifier did, in words: a count that did not change says why."""
    if result.simplifier == "none":
        return f"not simplified (--simplify none), {result.nodes_after} nodes"
    if result.nodes_before == result.nodes_after:
        why = (": the exporter had already folded BatchNorm"
               if result.batchnorm_nodes == 0 else "")
        change = f"unchanged ({result.nodes_after} nodes){why}"
    else:
        change = f"{result.nodes_before} -> {result.nodes_after} nodes"
    if result.constants_folded:
        change += f", {result.constants_folded} nodes folded into constants"
    return f"{result.simplifier}: {change}"


def render_export(result: ExportResult) -> None:
    from ..core.render import Column, format_checks

    emit(f"machine: {describe_machine()}")
    emit(f"{result.output}: {result.exporter} exporter, opset {result.opset}, "
         f"{result.size_bytes / 1e6:.1f} MB; weights: {result.weights}")
    emit(f"simplifier: {simplifier_line(result)}")
    emit(f"preprocessing: {describe_preprocessing(result.preprocess, result.preprocess_sources)}")
    emit(f"labels: {result.labels_source}")
    emit(f"layer names: {result.layers} of {result.nodes_after} nodes named after their "
         "PyTorch module (recorded in the model)")
    emit("times: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    emit(format_checks(f"parity, PyTorch vs ORT CPU on {result.parity_inputs}",
                       list(result.checks.values()), "PyTorch - ORT",
                       lead=[(Column("batch", "batch", "int"), list(result.checks))],
                       verdict="parity"))
