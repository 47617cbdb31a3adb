"""``resnet-deploy parity``: every backend against one reference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import UserError
from .app import main
from .options import (
    DEFAULT_IMAGES,
    build_spec,
    describe_machine,
    emit,
    json_option,
    preprocess_options,
    random_banner,
    weights_option,
    write_json_if,
)

if TYPE_CHECKING:
    from ..runtime import ModelFile


def split_providers(value: str) -> tuple[str, ...]:
    from ..runtime import provider_name, short_provider

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
    from ..model import load_model
    from ..parity import (
        ParityOptions,
        ToleranceOverrides,
        check,
        make_inputs,
        model_spec,
        run_parity,
    )
    from ..parity import load_outputs as load_golden
    from ..parity import save_outputs as save_golden
    from ..runtime import ModelFile

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
    from ..report import format_table

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
