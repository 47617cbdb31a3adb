"""``resnet-deploy convert-fp16``: an FP16 copy, checked against FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..core.files import check_outputs
from .app import main
from .options import (DEFAULT_IMAGES, FilePath, describe_machine, emit, json_option,
                      output_name_option, show_result)


@main.command("convert-fp16")
@click.option("--model", "model_option", type=FilePath(),
              default=None, help="The FP32 ONNX model to convert.  [required]")
@click.argument("model_argument", metavar="[MODEL]", required=False,
                type=FilePath())
@click.option("-o", "--output", type=FilePath(), default=None,
              help="Where to write it (default: A.fp16.onnx beside A.onnx).")
@click.option("--check-images", type=click.Path(path_type=Path), default=DEFAULT_IMAGES,
              show_default=True, help="Images for the FP32-vs-FP16 check "
                                      "(seeded random inputs when the folder has none).")
@output_name_option
@json_option
def convert_fp16(model_option: Path | None, model_argument: Path | None, output: Path | None,
                 check_images: Path, output_name: str | None, json_path: Path | None) -> None:
    """Convert an FP32 model to FP16 weights and compute, keeping FP32 inputs and outputs.

    The resnet-deploy metadata is kept. The file is written only if its logits on ORT CPU
    match the FP32 model's within the FP16 tolerance (cosine >= 0.999, top-1 >= 99%).
    FP16 pays off on GPUs (CUDA, TensorRT); on a CPU it is no faster than FP32. A positional
    MODEL is accepted in place of --model.

    \b
    Examples:
      resnet-deploy convert-fp16 --model artifacts/resnet18.onnx
      resnet-deploy convert-fp16 --model a.onnx -o a16.onnx --json fp16.json
    """
    from ..convert.fp16 import Fp16Options, convert_fp16 as run_convert, default_output

    model = one_model(model_option, model_argument)
    output = output or default_output(model)
    check_outputs({"-o": output, "--json": json_path}, [model, check_images])
    options = Fp16Options(check_images=check_images, output_name=output_name)
    show_result(lambda: run_convert(model, output, options=options), render_fp16, json_path)


def one_model(option: Path | None, argument: Path | None) -> Path:
    """The model from --model or its positional alias; a usage error (exit 2) unless exactly
    one of them is given."""
    if option is not None and argument is not None:
        raise click.UsageError(f"the model is given twice ({argument} and --model {option}); "
                               "pass it once, with --model PATH",
                               ctx=click.get_current_context())
    model = option if option is not None else argument
    if model is None:
        raise click.UsageError("Missing option '--model'.", ctx=click.get_current_context())
    return model


def render_fp16(result: Any) -> None:
    from ..core.render import format_checks

    emit(f"machine: {describe_machine()}")
    emit(f"{result.output}: FP16 with float32 inputs/outputs, {result.nodes} nodes "
         f"({result.casts_added} Casts added), {result.size_bytes / 1e6:.1f} MB, from "
         f"{result.source_size_bytes / 1e6:.1f} MB")
    emit(format_checks(f"check, {result.check.subject}", [result.check], "FP32 - FP16"))
    emit("note: FP16 is a GPU format (CUDA, TensorRT); on CPU it is no faster than FP32")
