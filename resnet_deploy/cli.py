"""The ``resnet-deploy`` command line: parse options, call the API, render the results.

Library modules are imported inside each command so that ``resnet-deploy --help`` does not
pay for torch or onnxruntime. Errors: UserError -> exit 2, CheckFailed -> exit 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .choices import METHODS, QUANT_TYPES, TARGETS
from .errors import CheckFailed, UserError

if TYPE_CHECKING:
    from .runtime import ModelFile

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

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def preprocess_options(required: bool = False) -> Decorator:
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


def weights_option(default: str | None) -> Decorator:
    return click.option("--weights", default=default, metavar="imagenet|random|PATH",
                        help="torchvision ImageNet weights, a seeded random init, or a "
                             ".pth/.pt/.safetensors checkpoint.")


def emit(text: str) -> None:
    click.echo(text)


def write_json_if(path: Path | None, data: dict[str, Any]) -> None:
    """Write a command's result as JSON, with the machine it ran on at the top."""
    if path is not None:
        from .machine import machine_info
        from .report import write_json

        write_json(path, {"machine": {**machine_info(), **data.get("machine", {})}, **data})
        emit(f"wrote {path}")


def describe_machine() -> str:
    from .machine import describe

    return describe()


def show_result(produce: Callable[[], Any], render: Callable[[Any], None],
                json_path: Path | None) -> None:
    """Render and save a result; when its check fails, still show what was measured."""
    try:
        result = produce()
    except CheckFailed as exc:
        if exc.report is not None:
            render(exc.report)
            write_json_if(json_path, exc.report.to_dict())
        raise
    render(result)
    write_json_if(json_path, result.to_dict())


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
    show_result(lambda: run_export(model, loaded, spec, output, labels=read_labels(labels),
                                   options=options), render_export, json_path)


def render_export(result: Any) -> None:
    from .report import format_table

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
@click.option("--min-cosine", type=float, default=None,
              help="Cosine floor override: per input for FP32/FP16, 1st percentile for INT8.")
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
    |reference logit| and 100% top-1 agreement; FP16 cosine >= 0.999 per input and top-1
    >= 99%; INT8 1st-percentile cosine >= 0.97 and top-1 >= 97%. Exit 0 when all pass, 1
    when any fails, 2 for bad input or a provider that cannot run.

    \b
    Examples:
      resnet-deploy parity --weights imagenet --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx --providers cpu,cuda
      resnet-deploy parity --model a.onnx --random 32 --save-outputs golden.npz
      resnet-deploy parity --model a.onnx --random 32 --load-outputs golden.npz
    """
    from .model import load_model
    from .parity import (
        ParityOptions,
        ToleranceOverrides,
        check,
        make_inputs,
        model_spec,
        run_parity,
    )
    from .parity import load_outputs as load_golden
    from .parity import save_outputs as save_golden
    from .runtime import ModelFile

    if images is not None and random_count is not None:
        raise UserError("give either --images or --random, not both")
    if load_outputs is not None and (weights or reference):
        raise UserError("--load-outputs is the reference; drop --weights/--reference")
    override = build_spec(input_size, resize_size, mean, std)
    if not models and override is None and weights is None:
        raise UserError("nothing to compare: give --model (and/or --weights)")
    files = [ModelFile.read(path) for path in models]
    spec = model_spec(files, override) if files else override
    weights_model = None
    if weights is not None:
        weights_model, loaded = load_model(weights, **random_init_of(files, weights))
        random_banner(loaded)
        if spec is None:
            spec = build_spec(None, None, None, None, default_size=224)
    if images is None and random_count is None:
        if not DEFAULT_IMAGES.is_dir():
            raise UserError(f"no --images given and ./{DEFAULT_IMAGES} does not exist here; "
                            "pass --images DIR or --random N")
        images = DEFAULT_IMAGES
    inputs = make_inputs(spec, images=images, random_count=random_count, limit=limit)
    golden = load_golden(load_outputs, inputs) if load_outputs is not None else None
    options = ParityOptions(
        providers=split_providers(providers), reference=reference, batch_size=batch_size,
        tolerances=ToleranceOverrides(atol, rtol, min_cosine, min_top1),
        skip_unavailable=skip_unavailable)
    report, reference_logits = run_parity(files, inputs=inputs,
                                          weights_model=weights_model, options=options,
                                          golden=golden)
    if save_outputs is not None:
        save_golden(save_outputs, report.reference, inputs, reference_logits)
        emit(f"wrote {save_outputs}")
    render_parity(report)
    write_json_if(json_path, report.to_dict())
    check(report)


def random_init_of(models: list[ModelFile], weights: str) -> dict[str, Any]:
    """For ``--weights random``, rebuild the exact init the first model was exported from."""
    if weights != "random" or not models:
        return {}
    meta = models[0].meta
    if meta is None or not meta.weights.get("random"):
        return {}
    return {"num_classes": meta.weights["num_classes"], "seed": meta.weights.get("seed") or 0}


def render_parity(report: Any) -> None:
    from .report import format_table

    emit(f"machine: {describe_machine()}")
    emit(f"reference: {report.reference}; inputs: {report.inputs['description']}")
    rows = [{**r.to_dict(), "verdict": "skipped" if r.skipped else
             ("PASS" if r.passed else "FAIL")} for r in report.results]
    emit(format_table(rows, [
        ("backend", "backend"), ("precision", "prec"), ("max_abs_diff", "max abs"),
        ("p99_abs_diff", "p99 abs"), ("mean_abs_diff", "mean abs"), ("max_rel_diff", "max rel"),
        ("cosine_min", "cos min"), ("cosine_p1", "cos p1"), ("cosine_mean", "cos mean"),
        ("top1_agreement", "top-1"),
        ("top5_agreement", "top-5"), ("nonfinite", "NaN/Inf"), ("min_atol", "min atol"),
        ("verdict", "verdict")]))
    for r in report.results:
        if r.failures:
            emit(f"  {r.backend} FAILED [{r.tolerance}]: {'; '.join(r.failures)}")
        if r.skipped:
            emit(f"  {r.backend} skipped: {r.skipped}")
    emit("parity: PASS" if report.passed else "parity: FAIL")


# --- quantize --------------------------------------------------------------------------

@main.command()
@click.option("--model", "model", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="The FP32 ONNX model.")
@click.option("--calibration", type=click.Path(path_type=Path), required=True,
              help="Folder of photos (searched recursively).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
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
@click.option("--max-top1-drop", type=float, default=None, metavar="PT",
              help="Accuracy-aware mode: keep the most sensitive nodes in FP32 until the "
                   "top-1 drop on --eval-images (an ImageFolder) is at most PT points.")
@click.option("--max-fallback", type=click.IntRange(min=0), default=5, show_default=True,
              metavar="K", help="At most K nodes kept in FP32 by --max-top1-drop.")
@click.option("--no-check", "skip_check", is_flag=True,
              help="Write the model without comparing it with FP32 (the output says so).")
@click.option("--strict", is_flag=True, help="An unreadable image is an error, not a skip.")
@click.option("--seed", type=int, default=0, show_default=True)
@preprocess_options()
@json_option
def quantize(model: Path, calibration: Path, output: Path | None, method: str,
             num_samples: int, per_channel: bool | None, activation_type: str | None,
             weight_type: str | None, reduce_range: bool, target: str, exclude: tuple[str, ...],
             eval_images: Path | None, max_top1_drop: float | None, max_fallback: int,
             skip_check: bool, strict: bool, seed: int, input_size: int | None, resize_size: int | None,
             mean: Any, std: Any, json_path: Path | None) -> None:
    """Quantize an FP32 model to INT8 (QDQ) and check it against FP32.

    Preprocessing comes from the model's metadata. After quantizing, FP32 and INT8 run on
    held-out images (--eval-images, else calibration photos calibration did not use: a
    seeded 20% of the folder when it would use them all). The model is written only when
    the check meets the INT8 tolerances (top-1 agreement >= 97%, 1st-percentile cosine >=
    0.97); otherwise exit 1. With --max-top1-drop, nodes ranked by sensitivity stay FP32
    until the target is met, or the command fails (exit 1) and writes no model.

    \b
    Examples:
      resnet-deploy quantize --model artifacts/resnet18.onnx --calibration calibration/
      resnet-deploy quantize --model m.onnx --calibration calib/ --method entropy --json q.json
      resnet-deploy quantize --model m.onnx --calibration calib/ --eval-images dev/ \\
          --max-top1-drop 0.3 --max-fallback 3
    """
    from .quantize import QuantizeOptions
    from .quantize import quantize as run_quantize

    options = QuantizeOptions(
        method=method, num_samples=num_samples, per_channel=per_channel,
        activation_type=activation_type, weight_type=weight_type, reduce_range=reduce_range,
        target=target, exclude=tuple(exclude), eval_images=eval_images,
        max_top1_drop=max_top1_drop, max_fallback=max_fallback, strict=strict, seed=seed,
        check=not skip_check, progress=progress_enabled(), spec=build_spec(input_size, resize_size, mean, std))
    show_result(lambda: run_quantize(model, calibration, output, options=options),
                render_quantize, json_path)


def render_quantize(result: Any) -> None:
    from .report import format_table

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
        c = result.check
        emit(f"check, {c.subject} ({c.tolerance.describe()}):")
        emit(format_table([c.comparison.to_dict()], [
            ("top1_agreement", "top-1 agree"), ("cosine_p1", "cosine p1"),
            ("cosine_min", "cosine min"), ("cosine_mean", "cosine mean"),
            ("max_abs_diff", "max abs diff"), ("top5_agreement", "top-5 agree")]))
        emit(f"check: {'PASS' if c else 'FAIL (' + c.reason + ')'}")
    for note in result.notes:
        emit(f"note: {note}")
    if result.accuracy is not None:
        a = result.accuracy
        emit(f"top-1 on {a['n']} labelled images: FP32 {a['fp32_top1']:.2%}, INT8 "
             f"{a['int8_top1']:.2%} (drop {a['top1_drop_pt']:.2f} pt)")
    if result.sensitivity:
        emit("most sensitive nodes (output error when only that node is quantized):")
        emit(format_table(list(result.sensitivity[:10]), [
            ("rank", "rank"), ("node", "node"), ("op_type", "op"), ("error", "1-cos mean"),
            ("max_abs_diff", "max abs diff"), ("top1_agreement", "top-1 agree")]))
    if len(result.steps) > 1:
        emit("accuracy-aware fallback:")
        emit(format_table([{"step": i, "kept": len(st.fp32_nodes),
                            "node": st.fp32_nodes[-1] if st.fp32_nodes else "-",
                            "top1": st.top1, "drop_pt": st.drop_pt}
                           for i, st in enumerate(result.steps)],
                          [("step", "step"), ("node", "kept in FP32"), ("kept", "FP32 nodes"),
                           ("top1", "INT8 top-1"), ("drop_pt", "drop (pt)")]))
    if result.target_met is not None:
        emit(f"target: top-1 drop <= {result.accuracy['max_top1_drop_pt']:g} pt "
             f"{'MET' if result.target_met else 'MISSED'}"
             + (f"; FP32 nodes: {', '.join(result.fallback_nodes)}"
                if result.fallback_nodes else ""))


# --- evaluate --------------------------------------------------------------------------

@main.command()
@click.option("--model", "models", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="An ONNX model (repeat to compare models side by side).")
@click.option("--images", type=click.Path(path_type=Path), required=True,
              help="An ImageFolder: one subfolder of images per class.")
@click.option("--provider", default="cpu", show_default=True,
              help="cpu, cuda or tensorrt (a missing provider is an error).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate a seeded random subset of this many images.")
@click.option("--seed", type=int, default=0, show_default=True)
@preprocess_options()
@json_option
def evaluate(models: tuple[Path, ...], images: Path, provider: str, batch_size: int,
             limit: int | None, seed: int, input_size: int | None, resize_size: int | None,
             mean: Any, std: Any, json_path: Path | None) -> None:
    """Top-1/top-5 accuracy of one or more models on a labelled ImageFolder.

    Class index = sorted folder name, unless every folder name is one of the model's
    labels, in which case folders map by name.

    \b
    Examples:
      resnet-deploy evaluate --model artifacts/resnet18.onnx --images val/
      resnet-deploy evaluate --model m.onnx --model m.int8.onnx --images dev/ --json acc.json
    """
    from .evaluate import EvaluateOptions
    from .evaluate import evaluate as run_evaluate
    from .report import format_table

    options = EvaluateOptions(provider=provider, batch_size=batch_size, limit=limit, seed=seed,
                              progress=progress_enabled(),
                              spec=build_spec(input_size, resize_size, mean, std))
    result = run_evaluate(models, images, options=options)
    emit(f"machine: {describe_machine()}")
    emit(f"{result.images}: {result.models[0].n} images, {result.classes} classes")
    emit(format_table([m.to_dict() for m in result.models], [
        ("model", "model"), ("precision", "prec"), ("provider", "provider"), ("n", "images"),
        ("top1", "top-1"), ("top5", "top-5"), ("label_mapping", "classes by")]))
    write_json_if(json_path, result.to_dict())


# --- bench -----------------------------------------------------------------------------

def split_batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--batch-size {value!r}: give comma-separated integers, "
                        "e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-size {value!r}: give positive integers, e.g. 1,8,32")
    return tuple(dict.fromkeys(sizes))


@main.command()
@click.option("--model", "models", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX model to time (repeatable; ratios are to the first).")
@click.option("--provider", default="cpu", show_default=True,
              help="ORT provider: cpu, cuda or tensorrt (strict: no silent fallback).")
@click.option("--batch-size", "batch_sizes", default="1", show_default=True,
              help="Comma-separated batch sizes, e.g. 1,8,32.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed iterations per model and batch size.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Timed iterations per model and batch size (default 100).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per model and batch size instead of --iterations.")
@click.option("--block", type=click.IntRange(min=1), default=5, show_default=True,
              help="Back-to-back iterations a model gets per round-robin round.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for ORT (and torch); default: ORT's choice.")
@click.option("--torch", "torch_baseline", is_flag=True,
              help="Add PyTorch eager (inference_mode, channels_last) as a baseline.")
@weights_option(None)
@click.option("--io-binding", is_flag=True,
              help="Inputs and outputs bound on the device (run_with_iobinding).")
@click.option("--cuda-graph", is_flag=True,
              help="Capture and replay a CUDA graph (cuda/tensorrt; needs --io-binding).")
@click.option("--trt-cache", type=click.Path(file_okay=False), default=None,
              help="TensorRT engine cache folder (default artifacts/trt_cache).")
@click.option("--placement/--no-placement", default=True, show_default=True,
              help="Count nodes per provider in a separate short profiled session.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the table as Markdown here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also draw latency and throughput to this PNG (matplotlib).")
def bench(models: tuple[Path, ...], provider: str, batch_sizes: str, warmup: int,
          iterations: int | None, duration: float | None, block: int, threads: int | None,
          torch_baseline: bool, weights: str | None, io_binding: bool, cuda_graph: bool,
          trt_cache: str | None, placement: bool, seed: int, json_path: Path | None,
          markdown_path: Path | None, plot_path: Path | None) -> None:
    """Measure latency and throughput of ONNX models, interleaved so drift hits all equally.

    Per model and batch size: p50/p90/p99/mean/min latency, images/s, session creation
    time, peak RSS and how many nodes each provider ran. Only the inference call is timed;
    models take turns in small blocks. --weights without --torch is ignored.

    \b
    Examples:
      resnet-deploy bench --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx --batch-size 1,32 --torch
      resnet-deploy bench --model a.onnx --provider cuda --io-binding --cuda-graph \\
          --batch-size 1,32,256 --json bench.json --markdown bench.md --plot bench.png
    """
    from .bench import BenchOptions, run_bench

    if iterations is not None and duration is not None:
        raise UserError("give either --iterations or --duration, not both")
    if plot_path is not None:
        from .report import require_matplotlib

        require_matplotlib()
    options = BenchOptions(
        provider=provider, batch_sizes=split_batch_sizes(batch_sizes), warmup=warmup,
        iterations=iterations or 100, duration_s=duration, block=block, threads=threads,
        io_binding=io_binding, cuda_graph=cuda_graph, torch_baseline=torch_baseline,
        torch_weights=weights, placement=placement, trt_cache_dir=trt_cache, seed=seed)
    say = (lambda message: click.echo(message, err=True)) if progress_enabled() else None
    report = run_bench(list(models), options, progress=say)
    render_bench(report)
    write_json_if(json_path, report.to_dict())
    if markdown_path is not None:
        from .bench import TABLE_COLUMNS, table_rows
        from .report import format_markdown, write_text

        machine = report.machine
        write_text(markdown_path, f"Machine: {describe_machine()}; onnxruntime "
                   f"{machine['versions']['onnxruntime']}\n\n"
                   + format_markdown(table_rows(report), TABLE_COLUMNS))
        emit(f"wrote {markdown_path}")
    if plot_path is not None:
        from .report import plot_bench

        plot_bench([r.to_dict() for r in report.results], plot_path)
        emit(f"wrote {plot_path}")


def render_bench(report: Any) -> None:
    from .bench import TABLE_COLUMNS, table_rows
    from .report import format_table

    machine = report.machine
    emit(f"machine: {describe_machine()}; onnxruntime "
         f"{machine['versions']['onnxruntime']}; providers: {', '.join(machine['providers'])}")
    options = report.options
    how = (f"{options.duration_s:g}s" if options.duration_s else f"{options.iterations} iterations")
    emit(f"{how} per model and batch after {options.warmup} warm-up, round-robin in blocks "
         f"of {options.block}{'; IO binding' if options.io_binding else ''}"
         f"{'; CUDA graph' if options.cuda_graph else ''}")
    emit(format_table(table_rows(report), TABLE_COLUMNS))
    first = report.results[0].model if report.results else "-"
    emit(f"p50 x first: p50 latency relative to {first} at the same batch size")
    for note in report.notes:
        emit(f"note: {note}")


# --- convert-fp16 ----------------------------------------------------------------------

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
    from .fp16 import Fp16Options
    from .fp16 import convert_fp16 as run_convert

    options = Fp16Options(check_images=check_images)
    show_result(lambda: run_convert(model, output, options=options), render_fp16, json_path)


def render_fp16(result: Any) -> None:
    check = result.check
    emit(f"machine: {describe_machine()}")
    emit(f"{result.output}: FP16 with float32 inputs/outputs, {result.nodes} nodes "
         f"({result.casts_added} Casts added), {result.size_bytes / 1e6:.1f} MB "
         f"(from {result.source_size_bytes / 1e6:.1f} MB)")
    emit(f"check vs FP32 on ORT CPU, {check['inputs']} ({check['tolerance']}): cosine min "
         f"{check['cosine_min']:.6f}, top-1 {check['top1_agreement']:.2%}, max abs diff "
         f"{check['max_abs_diff']:.3g}: {'PASS' if check['passed'] else 'FAIL'}")


if __name__ == "__main__":  # pragma: no cover
    main()
