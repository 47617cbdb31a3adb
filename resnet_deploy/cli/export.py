"""``resnet-deploy export``: PyTorch -> verified ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .app import main
from .options import (
    DEFAULT_IMAGES,
    DEFAULT_MODEL,
    build_spec,
    describe_machine,
    emit,
    json_option,
    preprocess_options,
    random_banner,
    read_labels,
    show_result,
    weights_option,
)


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
    from ..export import ExportOptions
    from ..export import export as run_export
    from ..model import load_model

    model, loaded = load_model(weights, num_classes=num_classes, seed=seed)
    random_banner(loaded)
    spec = build_spec(input_size, resize_size, mean, std, default_size=224)
    options = ExportOptions(exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                            simplify=simplify, parity_images=parity_images, seed=seed)
    show_result(lambda: run_export(model, loaded, spec, output, labels=read_labels(labels),
                                   options=options), render_export, json_path)


def render_export(result: Any) -> None:
    from ..report import format_table

    emit(f"machine: {describe_machine()}")
    emit(f"{result.output}: {result.exporter} exporter, opset {result.opset}, "
         f"{result.simplifier} simplified {result.nodes_before} -> {result.nodes_after} nodes, "
         f"{result.size_bytes / 1e6:.1f} MB; weights: {result.weights}")
    emit("times: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    parity = result.parity
    emit(f"parity, PyTorch vs ORT CPU on {parity['inputs']} ({parity['tolerance']}):")
    emit(format_table(parity["rows"], [
        ("batch_size", "batch"), ("max_abs_diff", "max abs diff"), ("min_atol", "min atol"),
        ("cosine_min", "cosine min"), ("top1_agreement", "top-1 agree")]))
    emit("parity: PASS" if parity["passed"] else "parity: FAIL")
