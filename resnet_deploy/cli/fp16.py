"""``resnet-deploy convert-fp16``: an FP16 copy, checked against FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..files import check_outputs
from .app import main
from .options import (
    DEFAULT_IMAGES,
    describe_machine,
    emit,
    json_option,
    show_result,
)


@main.command("convert-fp16")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write it (default: A.fp16.onnx beside A.onnx).")
@click.option("--check-images", type=click.Path(path_type=Path), default=DEFAULT_IMAGES,
              show_default=True, help="Images for the FP32-vs-FP16 check "
                                      "(seeded random inputs when the folder has none).")
@json_option
def convert_fp16(model: Path, output: Path | None, check_images: Path,
                 json_path: Path | None) -> None:
    """Convert an FP32 model to FP16 weights and compute, keeping FP32 inputs and outputs.

    The resnet-deploy metadata is kept. The file is written only if its logits on ORT CPU
    match the FP32 model's within the FP16 tolerance (cosine >= 0.999, top-1 >= 99%).

    \b
    Examples:
      resnet-deploy convert-fp16 artifacts/resnet18.onnx
      resnet-deploy convert-fp16 a.onnx -o a16.onnx --json fp16.json
    """
    from ..fp16 import default_output

    output = output or default_output(model)
    check_outputs({"-o": output, "--json": json_path}, [model, check_images])
    from ..fp16 import Fp16Options
    from ..fp16 import convert_fp16 as run_convert

    options = Fp16Options(check_images=check_images)
    show_result(lambda: run_convert(model, output, options=options), render_fp16, json_path)


def render_fp16(result: Any) -> None:
    from ..report import Column, format_table

    check = result.check
    emit(f"machine: {describe_machine()}")
    emit(f"{result.output}: FP16 with float32 inputs/outputs, {result.nodes} nodes "
         f"({result.casts_added} Casts added), {result.size_bytes / 1e6:.1f} MB "
         f"(from {result.source_size_bytes / 1e6:.1f} MB)")
    emit(f"check, {check.subject} ({check.tolerance.describe()}):")
    emit(format_table([check.comparison.to_dict()], [
        Column("cosine_min", "worst cosine", "cosine",
               "lowest per-image cosine of the logits (1 = same direction)"),
        Column("top1_agreement", "matches on top-1", "share",
               "images where FP32 and FP16 pick the same class"),
        Column("max_abs_diff", "largest abs diff", "error",
               "largest |FP32 - FP16| over every logit")]))
    emit(f"check: {'PASS' if check else 'FAIL (' + check.reason + ')'}")
    emit("note: FP16 is a GPU format (CUDA, TensorRT); on CPU it is no faster than FP32")
