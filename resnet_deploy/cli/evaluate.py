"""``resnet-deploy evaluate``: top-1/top-5 on a labelled folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.files import check_outputs
from .app import main
from .options import (SEED, FilePath, build_spec, describe_machine, emit, emit_architectures,
                      json_option, output_name_option, preprocess_options, provider_option,
                      terminal_progress, write_json_if)

if TYPE_CHECKING:
    from ..checks.evaluate import EvaluateResult


@main.command()
@click.option("--model", "models", multiple=True, required=True,
              type=FilePath(),
              help="An ONNX model (repeat to compare models side by side).")
@click.option("--images", type=click.Path(path_type=Path), required=True,
              help="An ImageFolder: one subfolder of images per class.")
@provider_option(single=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate a seeded random subset of this many images.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--strict", is_flag=True, help="An unreadable image is an error, not a skip.")
@preprocess_options()
@output_name_option
@json_option
def evaluate(models: tuple[Path, ...], images: Path, providers: tuple[str, ...], batch_size: int,
             limit: int | None, seed: int, strict: bool, input_size: int | None,
             resize_size: int | None,
             mean: Any, std: Any, output_name: str | None, json_path: Path | None) -> None:
    """Top-1/top-5 accuracy of one or more models on a labelled ImageFolder.

    Class index = sorted folder name, unless every folder name is one of the model's
    labels, in which case folders map by name.

    \b
    Examples:
      resnet-deploy evaluate --model artifacts/resnet18.onnx --images val/
      resnet-deploy evaluate --model m.onnx --model m.int8.onnx --images dev/ --json acc.json
    """
    check_outputs({"--json": json_path}, [*models, images])
    from ..checks.evaluate import EvaluateOptions, evaluate as run_evaluate

    options = EvaluateOptions(provider=providers[0], batch_size=batch_size, limit=limit, seed=seed,
                              strict=strict, spec=build_spec(input_size, resize_size, mean, std),
                              output_name=output_name)
    with terminal_progress() as progress:
        result = run_evaluate(models, images, options=options, progress=progress)
    render_evaluate(result)
    write_json_if(json_path, result.to_dict())


# How each model's outputs were matched to the class folders, in words.
MAPPINGS = {
    "labels": "folder names matched to the model's labels",
    "sorted": "folders in sorted order = output index (the model has no labels naming them)",
}


def render_evaluate(result: EvaluateResult) -> None:
    from ..core.render import Column, format_table

    emit(f"machine: {describe_machine()}")
    emit(f"{result.images}: {result.models[0].n} images, {result.classes} classes")
    emit_architectures(m.arch for m in result.models)
    rows = [{**m.to_dict(), "mapping": MAPPINGS.get(m.label_mapping, m.label_mapping)}
            for m in result.models]
    first = Path(result.models[0].model).name
    compared = [Column("top1_agreement", "agrees with first", "share",
                       f"photos where it picks the same class as {first}"),
                Column("top1_drop_pt", "top-1 drop", "points",
                       f"{first}'s top-1 minus this one's, in points")] \
        if len(result.models) > 1 else []
    emit(format_table(rows, [
        Column("model", "model"), Column("precision", "precision"),
        Column("provider", "provider"), Column("n", "images", "int"),
        Column("top1", "top-1", "share", "images whose best class is the folder's class"),
        Column("top5", "top-5", "share", "images whose folder's class is among the five best"),
        *compared, Column("mapping", "classes matched by")]))
