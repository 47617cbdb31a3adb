"""``resnet-deploy package``: a Triton model repository derived from the ONNX graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..core.choices import DEVICES, TRT_PRECISIONS, Device, TrtPrecision
from ..core.errors import UserError
from .app import main
from .options import FilePath, batch_sizes, emit, json_option, write_json_if

DEFAULT_REPOSITORY = Path("artifacts/model_repository")
# The widths of Triton's ModelConfig fields (max_batch_size is int32, the queue delay uint64):
# a larger number cannot be written into config.pbtxt at all.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def triton_options(fn: Any) -> Any:
    """The serving options ``package`` and ``pipeline --triton`` share."""
    for option in reversed([
        click.option("--max-batch-size", type=click.IntRange(1, INT32_MAX), default=32,
                     show_default=True, help="Triton's max_batch_size for dynamic-batch "
                     "models (a static-batch export always gets 0 and its full shape)."),
        click.option("--preferred-batch-size", "preferred", default=None, metavar="N,N",
                     help="Dynamic batching's preferred sizes [default: 8,16,32 up to the "
                          "max batch size]."),
        click.option("--queue-delay-us", type=click.IntRange(0, INT64_MAX), default=100,
                     show_default=True, help="Dynamic batching's max queue delay."),
        click.option("--instances", type=click.IntRange(1, 1024), default=1, show_default=True,
                     help="Model instances per device (instance_group count)."),
    ]):
        fn = option(fn)
    return fn


@main.command()
@click.option("--format", "fmt", type=click.Choice(["triton"]), default="triton",
              show_default=True, help="The serving layout to write.")
@click.option("--model", "models", multiple=True, required=True,
              type=FilePath(),
              help="An ONNX model (repeatable); A.int8.onnx is served as A_int8.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_REPOSITORY, show_default=True,
              help="The repository folder (replaced when it was written by this command).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Instance group kind.")
@click.option("--tensorrt", type=click.Choice(TRT_PRECISIONS), default=None,
              help="GPU only: the TensorRT accelerator. fp16 runs FP32/FP16 models in FP16; "
                   "int8 also runs INT8 (QDQ) models in INT8, which they need on GPU.")
@click.option("--trt-workspace-mb", type=click.IntRange(16, 1 << 20), default=1024,
              show_default=True, help="TensorRT workspace size.")
@click.option("--trt-cache", default="/tmp/triton_trt_cache", show_default=True,
              help="TensorRT engine cache folder on the server.")
@triton_options
@click.option("--intra-op-threads", type=click.IntRange(1, 1024), default=None,
              help="onnxruntime threads per instance (parameter intra_op_thread_count) "
                   "[default: onnxruntime's, every core]; with --instances N on C cores, C/N.")
@click.option("--no-warmup", is_flag=True, help="Leave out model_warmup (zero data).")
@json_option
def package(fmt: str, models: tuple[Path, ...], output: Path, device: Device,
            tensorrt: TrtPrecision | None, trt_workspace_mb: int, trt_cache: str,
            max_batch_size: int, preferred: str | None, queue_delay_us: int, instances: int,
            intra_op_threads: int | None, no_warmup: bool, json_path: Path | None) -> None:
    """Write a Triton Inference Server model repository for ONNX models.

    Each model gets <name>/config.pbtxt, derived from its graph (names, dtypes, dims,
    static or dynamic batch), and <name>/1/model.onnx, plus labels.txt when the model
    carries class names; and <name>_image, which takes encoded photos (TYPE_STRING) and
    applies the preprocessing recorded in the model. Every config is parsed with
    tritonclient's model_config_pb2 and checked against its graph with Triton's load-time
    rules; what Triton would refuse is refused here (exit 2) and nothing is written.
    Needs: pip install 'resnet-deploy[triton]'.

    \b
    Examples:
      resnet-deploy package --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx -o model_repository/
      resnet-deploy package --model m.int8.onnx --instances 2 --intra-op-threads 1
      resnet-deploy package --model m.fp16.onnx --device gpu --tensorrt fp16 --instances 2
    """
    from ..core.files import check_outputs
    from ..serving.repository import package_triton
    from ..serving.triton import TritonOptions

    check_outputs({"--json": json_path}, models, folders={"-o": output})
    inside = [m for m in models if m.resolve().is_relative_to(output.resolve())]
    if inside:
        raise UserError(f"--model {inside[0]}: is inside -o {output}, which package replaces; "
                        "copy the model out first or choose another -o")
    options = TritonOptions(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=(None if preferred is None
                               else batch_sizes(preferred, "--preferred-batch-size")),
        max_queue_delay_us=queue_delay_us, device=device, instance_count=instances,
        intra_op_threads=intra_op_threads, tensorrt=tensorrt,
        trt_workspace_bytes=trt_workspace_mb << 20, trt_cache_path=trt_cache, warmup=not no_warmup)
    result = package_triton(list(models), output, options=options)
    render_package(result)
    write_json_if(json_path, result.to_dict())


def render_package(result: Any) -> None:
    from ..core.render import format_table

    emit(f"{result.output}: Triton model repository, {len(result.models)} model(s); configs "
         "parsed with model_config_pb2 and checked against their graphs")
    emit(format_table([{**m.to_dict(), "batch": m.max_batch_size or "static (0)",
                        "accelerator": m.accelerator or "-",
                        "photos": m.image_endpoint or "-"} for m in result.models], [
        ("name", "model"), ("photos", "photos endpoint"), ("precision", "prec"),
        ("device", "device"), ("accelerator", "accelerator"), ("batch", "max batch"),
        ("labels", "labels")]))
    for model in result.models:
        if model.image_note:
            click.echo(f"warning: {model.name}: no photos endpoint: {model.image_note}",
                       err=True)
    emit(f"serve it: resnet-deploy serve {Path(result.output).resolve()} (see its README.md)")
