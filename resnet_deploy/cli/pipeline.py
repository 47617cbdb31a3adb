"""``resnet-deploy pipeline`` and ``verify``: every step in one run, and the proof checked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.choices import EXPORTERS, METHODS, TARGETS, Exporter, Method, Target
from ..core.errors import CheckFailed, UserError
from ..core.files import check_outputs
from .app import main
from .options import (DEFAULT_IMAGES, INT8_GATE_FLAGS, SEED, FilePath, batch_sizes,
                      describe_machine, emit, int8_gate_options, json_option, provider_option,
                      random_banner, read_labels, write_json_if)
from .package import triton_options
from .source import source_options, source_preprocessing, warn_if_guessed

if TYPE_CHECKING:
    from ..pipeline.engine import PipelineResult


@main.command()
@source_options
@click.option("--calibration", type=click.Path(path_type=Path), default=DEFAULT_IMAGES,
              show_default=True, help="Photos for INT8 calibration (searched recursively).")
@click.option("--eval-images", type=click.Path(path_type=Path), default=None,
              help="A labelled ImageFolder: parity runs on it and evaluate measures top-1.")
@provider_option()
@click.option("--target", type=click.Choice(TARGETS), default="cpu", show_default=True,
              help="Where the INT8 model will run (see quantize --help).")
@click.option("--method", type=click.Choice(METHODS), default="minmax", show_default=True,
              help="Calibration method.")
@click.option("--num-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration images (a seeded subset of a larger folder).")
@click.option("--exporter", type=click.Choice(EXPORTERS), default="dynamo",
              show_default=True)
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True)
@click.option("--parity-limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="At most this many photos for parity (a seeded subset).")
@click.option("--bench-batch-size", default="1", show_default=True,
              help="Comma-separated batch sizes for the short bench.")
@click.option("--bench-iterations", type=click.IntRange(min=1), default=30, show_default=True)
@int8_gate_options
@click.option("--name", default=None, metavar="NAME",
              help="What the models are called (NAME.onnx, NAME.int8.onnx, and the Triton "
                   "models NAME, NAME_int8) [default: the checkpoint's file name, or "
                   "resnet18].")
@click.option("--triton", is_flag=True, help="Also write OUT/model_repository for Triton.")
@triton_options
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild every step.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              default=Path("artifacts"), show_default=True, help="The output folder.")
@json_option
def pipeline(weights: str, arch: str | None, features: bool, num_classes: int | None,
             input_size: int | None,
             resize_size: int | None, mean: Any, std: Any, labels: Path | None,
             calibration: Path, eval_images: Path | None, providers: tuple[str, ...],
             target: Target, method: Method, num_samples: int, exporter: Exporter,
             dynamic_batch: bool,
             parity_limit: int, bench_batch_size: str, bench_iterations: int,
             min_cosine: float | None, min_top1: float | None, name: str | None, triton: bool,
             max_batch_size: int, preferred: str | None, queue_delay_us: int, instances: int,
             seed: int, force: bool, output: Path, json_path: Path | None) -> None:
    """Checkpoint to INT8, FP16, parity proof, figures and a Triton repository in one run.

    Steps: export, quantize (with its gate), FP16 (with a GPU provider), parity of every
    model against PyTorch on every provider, evaluate (with --eval-images), a short bench,
    report.md with the latency plot, and with --triton OUT/model_repository. OUT/manifest.json
    records each step's inputs (content hashes), options, outputs and results; a rerun
    rebuilds only the steps whose inputs or options changed ("up to date" otherwise). A
    failed step stops the run with its own exit code; finished steps stay recorded.

    \b
    Examples:
      resnet-deploy pipeline --weights ft.pth --input-size 64 --resize-size 73 \\
          --calibration calib/ --eval-images dev/ --triton -o artifacts/
      resnet-deploy verify artifacts/manifest.json
    """
    from ..core.metrics import ToleranceOverrides
    from ..pipeline.steps import PipelineOptions, run_pipeline
    from ..serving.triton import TritonOptions
    if json_path is not None and json_path.resolve().is_relative_to(output.resolve()):
        raise UserError(f"--json {json_path}: is inside the output folder {output}, where the "
                        "pipeline keeps its artifacts and manifest; choose a path outside it")
    bench_sizes = batch_sizes(bench_batch_size, "--bench-batch-size")
    if not dynamic_batch and bench_sizes != (1,):
        raise UserError(f"--static-batch exports a model that takes batch 1 only; pass "
                        f"--bench-batch-size 1 (not {bench_batch_size})")
    check_outputs({"--json": json_path}, [labels, calibration, eval_images,
                                          Path(weights) if Path(weights).is_file() else None],
                  folders={"-o": output})
    random_banner(weights == "random")
    preprocessing = source_preprocessing(weights, input_size, resize_size, mean, std)
    warn_if_guessed(preprocessing, weights)
    options = PipelineOptions(
        weights=weights, arch=arch, features=features, num_classes=num_classes,
        spec=preprocessing.spec,
        spec_sources=preprocessing.sources, labels=tuple(read_labels(labels) or ()) or None,
        labels_source=f"{labels} (--labels)" if labels else None, name=valid_name(name),
        calibration=calibration, eval_images=eval_images, providers=providers, target=target,
        method=method, num_samples=num_samples, exporter=exporter,
        dynamic_batch=dynamic_batch, parity_limit=parity_limit,
        bench_batch_sizes=bench_sizes,
        bench_iterations=bench_iterations, seed=seed, force=force,
        gate=ToleranceOverrides(min_cosine=min_cosine, min_top1=min_top1,
                                precisions=("int8",)),
        triton=TritonOptions(max_batch_size=max_batch_size,
                             preferred_batch_sizes=(
                                 None if preferred is None
                                 else batch_sizes(preferred, "--preferred-batch-size")),
                             max_queue_delay_us=queue_delay_us,
                             instance_count=instances) if triton else None)
    emit(f"machine: {describe_machine()}")
    try:
        result = run_pipeline(output, options, progress=emit)
    except CheckFailed as exc:
        hint = gate_hint(exc.report)
        if hint:
            emit(hint)
        raise
    render_pipeline(result)
    write_json_if(json_path, result.to_dict())


def valid_name(name: str | None) -> str | None:
    """--name as Triton accepts a model name (letters, digits, _ and -), or a usage error."""
    import re

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", name):
        raise click.BadParameter(f"{name!r}: use letters, digits, '_' and '-' (a file and "
                                 "Triton model name)", param_hint="'--name'")
    return name


def gate_hint(report: Any) -> str | None:
    """After a failed INT8 gate: the pipeline's own options that would have passed it."""
    from ..core.render import pass_hint
    from ..pipeline.facts import QuantizeFacts

    needed = report.needed if isinstance(report, QuantizeFacts) else None
    hint = pass_hint(needed, INT8_GATE_FLAGS) if needed else ""
    return f"quantize gate: it would pass with {hint}" if hint else None


def render_pipeline(result: PipelineResult) -> None:
    from ..core.render import Column, format_table
    from ..pipeline.facts import QuantizeFacts
    from ..pipeline.report import facts, provenance_lines

    records = {r.step: r for r in result.steps}
    for line in provenance_lines(records):
        if line.startswith("warning: "):
            click.echo(line, err=True)
        else:
            emit(line[0].lower() + line[1:])
    quantized = facts(records, "quantize")
    for note in quantized.notes if isinstance(quantized, QuantizeFacts) else ():
        emit(f"note: quantize: {note}")
    rows = [{"step": r.step, "status": r.status,
             "seconds": None if r.status == "up to date" else r.seconds,
             "outputs": len(r.outputs), "result": step_summary(r)} for r in result.steps]
    emit(format_table(rows, [("step", "step"), ("status", "status"),
                             Column("seconds", "seconds", "number",
                                    "time this run spent on the step"),
                             Column("outputs", "files", "int"), ("result", "result")]))
    emit("artifacts:")
    emit(format_table(artifact_rows(result), [("path", "path"), ("step", "made by"),
                                              Column("kb", "kB", "number")]))
    emit(f"manifest: {result.manifest} (check it any time: resnet-deploy verify "
         f"{result.manifest})")


def artifact_rows(result: Any) -> list[dict[str, Any]]:
    """Where each artifact is, in the order the steps made them; a folder of many files
    (the Triton repository) is one row with their total size."""
    out = Path(result.output)
    rows: dict[str, dict[str, Any]] = {}
    for record in result.steps:
        for entry in record.outputs:
            top, _, inner = entry["path"].partition("/")
            row = rows.setdefault(top, {"path": str(out / top) + ("/" if inner else ""),
                                        "step": record.step, "kb": 0.0})
            row["kb"] += entry["bytes"] / 1e3
    return list(rows.values())


def step_summary(record: Any) -> str:
    """One phrase per step for the summary table."""
    from ..core.render import cell
    from ..pipeline import facts as f

    found = f.FACTS[record.step].from_dict(record.results)
    if isinstance(found, f.QuantizeFacts) and found.check_passed is not None:
        return (f"check {'PASS' if found.check_passed else 'FAIL'}, top-1 agreement "
                f"{cell(found.top1_agreement, 'share')} on {found.held_out} photos")
    if isinstance(found, f.ParityFacts):
        return (f"{'PASS' if found.passed else 'FAIL'}, {len(found.backends)} backends on "
                f"{found.inputs}")
    if isinstance(found, f.EvaluateFacts):
        return ", ".join(f"{m.precision} {cell(m.top1, 'share')}" for m in found.models)
    if isinstance(found, f.BenchFacts):
        return ", ".join(f"{row.precision}@{row.provider} b{row.batch_size} "
                         f"{cell(row.p50_ms, 'ms')} ms" for row in found.rows)
    if isinstance(found, f.TritonFacts):
        return ", ".join(m["name"] for m in found.models)
    if isinstance(found, f.ServeFacts):
        if found.skipped:
            return found.skipped
        protocols = sorted({c["protocol"] for c in found.checks})
        return (f"{'PASS' if found.passed else 'FAIL'}, {len(found.checks)} endpoint checks "
                f"({'/'.join(protocols)}) on {found.images} photos, Triton {found.triton}")
    if isinstance(found, f.ExportFacts):
        return "check PASS" if found.parity_passed else "-"
    if isinstance(found, f.Fp16Facts):
        return "check PASS" if found.check_passed else "-"
    return "-"


@main.command()
@click.argument("manifest", type=FilePath(),
                default=Path("artifacts/manifest.json"))
@json_option
def verify(manifest: Path, json_path: Path | None) -> None:
    """Re-hash every artifact and input a pipeline manifest records.

    Exit 0 when every artifact holds; 1 naming each one that is missing, modified, or
    stale (an input it was built from has changed since); 2 when the manifest itself is
    missing or unreadable.

    \b
    Examples:
      resnet-deploy verify artifacts/manifest.json
      resnet-deploy verify out/manifest.json --json verify.json
    """
    from ..pipeline.verify import recorded_files, verify as run_verify

    check_outputs({"--json": json_path}, [manifest, *recorded_files(manifest)])
    report = run_verify(manifest)
    for problem in report.problems:
        emit(problem)
    emit(f"{report.manifest}: {report.checked} artifacts and {report.inputs} input files "
         "checked, "
         f"{'all hold' if report else f'{len(report.problems)} problem(s)'}")
    write_json_if(json_path, report.to_dict())
    if not report:
        raise CheckFailed(f"{report.manifest}: {report.problems[0]}"
                          + (f" (and {len(report.problems) - 1} more)"
                             if len(report.problems) > 1 else "")
                          + "; rerun 'resnet-deploy pipeline' with the same options")
