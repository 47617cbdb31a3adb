"""``resnet-deploy quantize``: INT8 for a target, gated by its check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.choices import METHODS, QUANT_TYPES, TARGETS, Method, QuantType, Target
from ..core.files import check_outputs
from .app import main
from .options import (INT8_GATE_FLAGS, SEED, FilePath, Finite, build_spec, describe_machine, emit,
                      int8_gate_options, json_option, output_name_option, preprocess_options,
                      show_result, terminal_progress)

if TYPE_CHECKING:
    from ..convert.quantize.publish import QuantizeResult


@main.command()
@click.option("--model", "model", type=FilePath(),
              required=True, help="The FP32 ONNX model.")
@click.option("--calibration", type=click.Path(path_type=Path), required=True,
              help="Folder of photos (searched recursively).")
@click.option("-o", "--output", type=FilePath(), default=None,
              help="INT8 model path [default: beside the input, suffix .int8.onnx].")
@click.option("--method", type=click.Choice(METHODS),
              default="minmax", show_default=True, help="Calibration method.")
@click.option("--num-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration images; a seeded random subset when the folder has more.")
@click.option("--per-channel/--per-tensor", default=None,
              help="Weight scales per output channel [default: per channel].")
@click.option("--activation-type", type=click.Choice(QUANT_TYPES), default=None,
              help="[default: uint8 for --target cpu, int8 for tensorrt]")
@click.option("--weight-type", type=click.Choice(QUANT_TYPES), default=None,
              help="[default: int8]")
@click.option("--reduce-range", is_flag=True,
              help="7-bit weights on any target (--target cpu always has them).")
@click.option("--target", type=click.Choice(TARGETS), default="cpu", show_default=True,
              help="Where the model will run. cpu: any x86 CPU (7-bit weights, which cannot "
                   "saturate without VNNI); cpu-vnni: 8-bit weights for CPUs with VNNI or "
                   "AMX; tensorrt: symmetric int8 for TensorRT.")
@click.option("--exclude", multiple=True, metavar="NODE",
              help="Keep this node in FP32 (repeatable).")
@click.option("--eval-images", type=click.Path(path_type=Path), default=None,
              help="Images for the INT8-vs-FP32 check [default: calibration images not "
                   "used]; an ImageFolder also gives top-1.")
@click.option("--max-top1-drop", type=Finite(0, 100), default=None, metavar="PT",
              help="Accuracy-aware mode: keep the nodes where most INT8 error enters in FP32 "
                   "until the top-1 drop on --eval-images (an ImageFolder) is at most PT "
                   "points.")
@click.option("--max-fallback", type=click.IntRange(min=0), default=5, show_default=True,
              metavar="K", help="At most K nodes kept in FP32 by --max-top1-drop.")
@int8_gate_options
@click.option("--no-check", "skip_check", is_flag=True,
              help="Write the model without comparing it with FP32 (the output says so).")
@click.option("--strict", is_flag=True, help="An unreadable image is an error, not a skip.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@preprocess_options()
@output_name_option
@json_option
def quantize(model: Path, calibration: Path, output: Path | None, method: Method,
             num_samples: int, per_channel: bool | None, activation_type: QuantType | None,
             weight_type: QuantType | None, reduce_range: bool, target: Target,
             exclude: tuple[str, ...], eval_images: Path | None, max_top1_drop: float | None,
             max_fallback: int, min_cosine: float | None, min_top1: float | None,
             skip_check: bool, strict: bool, seed: int, input_size: int | None,
             resize_size: int | None, mean: Any, std: Any, output_name: str | None,
             json_path: Path | None) -> None:
    """Quantize an FP32 model to INT8 (QDQ) and check it against FP32.

    Preprocessing comes from the model's metadata. After quantizing, FP32 and INT8 run on
    held-out images (--eval-images, else calibration photos calibration did not use: a
    seeded 20% of the folder when it would use them all). The model is written only when
    the check meets the INT8 tolerances (top-1 agreement >= 97%, 1st-percentile cosine >=
    0.97; --min-top1 and --min-cosine override them); otherwise exit 1, with the settings
    that would have passed. With --max-top1-drop, the convs and the fc where most INT8
    error enters (the SQNR each adds, FP32 vs INT8 layer by layer, as parity --layerwise
    shows) stay FP32 one at a time until the target is met, or the command fails (exit 1)
    and writes no model.

    \b
    Examples:
      resnet-deploy quantize --model artifacts/resnet18.onnx --calibration calibration/
      resnet-deploy quantize --model m.onnx --calibration calib/ --method entropy --json q.json
      resnet-deploy quantize --model m.onnx --calibration calib/ --eval-images dev/ \\
          --max-top1-drop 0.3 --max-fallback 3
    """
    from ..convert.quantize.publish import default_output

    output = output or default_output(model)
    check_outputs({"-o": output, "--json": json_path}, [model, calibration, eval_images])
    from ..convert.quantize.publish import quantize as run_quantize
    from ..convert.quantize.recipe import QuantizeOptions
    from ..core.metrics import ToleranceOverrides

    options = QuantizeOptions(
        method=method, num_samples=num_samples, per_channel=per_channel,
        activation_type=activation_type, weight_type=weight_type, reduce_range=reduce_range,
        target=target, exclude=tuple(exclude), eval_images=eval_images,
        max_top1_drop=max_top1_drop, max_fallback=max_fallback, strict=strict, seed=seed,
        check=not skip_check,
        tolerances=ToleranceOverrides(min_cosine=min_cosine, min_top1=min_top1),
        spec=build_spec(input_size, resize_size, mean, std), output_name=output_name)
    with terminal_progress() as progress:
        show_result(lambda: run_quantize(model, calibration, output, options=options,
                                         progress=progress), render_quantize, json_path)


def render_quantize(result: QuantizeResult) -> None:
    from ..artifact.layers import display
    from ..core.render import Column, format_checks, format_table, share

    s = result.settings
    emit(f"machine: {describe_machine()}")
    emit(f"{result.output}: INT8 QDQ for target {s.target}; activations {s.activation_type}, "
         f"weights {s.weight_type}{' 7-bit' if s.reduce_range else ''} "
         f"{'per channel' if s.per_channel else 'per tensor'}")
    emit(f"images: calibration {result.num_calibration}"
         f"{f' ({result.skipped} unreadable skipped)' if result.skipped else ''} "
         f"({s.method}), check {result.held_out}")
    emit("times: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    emit(f"size: {result.int8_bytes / 1e6:.1f} MB, {result.size_ratio:.1%} of FP32 "
         f"({result.fp32_bytes / 1e6:.1f} MB)")
    if result.check is None:
        emit(f"check: {result.check_note}")
    else:
        emit(format_checks(f"check, {result.check.subject}", [result.check], "FP32 - INT8",
                           flags=INT8_GATE_FLAGS))
    if result.excluded:
        emit("kept in FP32 (--exclude): "
             + ", ".join(display(n, result.layers) for n in result.excluded))
    for note in result.notes:
        emit(f"note: {note}")
    if result.accuracy is not None:
        a = result.accuracy
        emit(f"top-1 on {a['n']} labelled images: FP32 {share(a['fp32_top1'])}, INT8 "
             f"{share(a['int8_top1'])} (drop {a['top1_drop_pt']:.2f} points)")
    if result.error_budget:
        emit("where INT8 error enters (FP32 vs INT8 layer by layer, most SQNR added first):")
        emit(format_table([{**row, "layer": display(row["node"], result.layers)}
                           for row in result.error_budget[:10]], [
            Column("rank", "rank", "int"), Column("layer", "layer (ONNX node)"),
            Column("op_type", "op"),
            Column("added_db", "added dB", "number",
                   "how much this layer lowers the SQNR (signal to INT8 error, in dB) of "
                   "what it reads; the fallback keeps the largest in FP32 first"),
            Column("sqnr_db", "SQNR dB", "number"),
            Column("cosine_p1", "cosine p1", "cosine")]))
    if len(result.steps) > 1:
        emit("accuracy-aware fallback:")
        emit(format_table([{"step": i, "kept": len(st.fp32_nodes),
                            "node": (display(st.fp32_nodes[-1], result.layers)
                                     if st.fp32_nodes else "-"),
                            "top1": st.top1, "drop_pt": st.drop_pt}
                           for i, st in enumerate(result.steps)], [
            Column("step", "step", "int"), Column("node", "also kept in FP32"),
            Column("kept", "layers in FP32", "int"), Column("top1", "INT8 top-1", "share"),
            Column("drop_pt", "drop", "points", "FP32 top-1 minus INT8 top-1, in points")]))
    if result.target_met is not None and result.accuracy is not None:
        emit(f"target: top-1 drop <= {result.accuracy['max_top1_drop_pt']:g} points "
             f"{'MET' if result.target_met else 'MISSED'}"
             + (f"; kept in FP32: "
                f"{', '.join(display(n, result.layers) for n in result.fallback_nodes)}"
                if result.fallback_nodes else ""))
