"""The pipeline's steps for a ResNet checkpoint, and the run that executes them.

Each step's plan is the library's own options object (or a small record of exactly what
the step passes to the library function), built from :class:`PipelineOptions` in one
place; the engine keys the step on it, so an option can neither be passed without
counting nor count without being passed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks.bench import BenchOptions
from ..checks.evaluate import EvaluateOptions
from ..checks.parity import ParityOptions
from ..convert.export import ExportOptions
from ..convert.fp16 import Fp16Options
from ..convert.quantize.recipe import QuantizeOptions
from ..core.choices import TrtPrecision
from ..core.errors import CheckFailed, UserError
from ..core.files import write_text
from ..core.machine import describe, machine_info
from ..core.metrics import ToleranceOverrides
from ..core.render import write_json
from ..data.spec import PreprocessSpec
from ..serving.triton import TritonOptions
from .engine import Outcome, PipelineResult, Step, StepSkipped, execute
from .facts import (AccuracyFacts, BackendFacts, BenchFacts, EvaluateFacts, ExportFacts, Fp16Facts,
                    LatencyFacts, ParityFacts, QuantizeFacts, ReportFacts, ServeFacts, TritonFacts)
from .options import PipelineOptions, Run
from .report import report_markdown

log = logging.getLogger(__name__)

REPOSITORY = "model_repository"
PARITY_OUTPUTS = "parity_outputs.npz"  # the reference's logits, in parity's --save-outputs form


# --- the plans: what each step hands to the library ------------------------------------------

@dataclass(frozen=True)
class ExportPlan:
    """What :func:`convert.export.export` gets, and the model it is built from."""

    weights: str  # "imagenet", "random", or "file" (the checkpoint is hashed as an input)
    arch: str | None
    features: bool
    num_classes: int | None
    seed: int
    spec: PreprocessSpec
    preprocess_sources: dict[str, str]
    labels: tuple[str, ...] | None
    labels_source: str | None
    output: str
    options: ExportOptions


def export_plan(run: Run) -> ExportPlan:
    o = run.options
    # Seeded random inputs for export's own check (no parity_images): the FP32 model then
    # depends on the checkpoint and options only, and the parity step compares on photos.
    return ExportPlan(
        weights=o.weights if o.weights in ("random", "imagenet") else "file",
        arch=o.arch, features=o.features, num_classes=o.num_classes, seed=o.seed, spec=o.spec,
        preprocess_sources=dict(o.spec_sources), labels=o.labels,
        labels_source=o.labels_source, output=o.file("fp32"),
        options=ExportOptions(exporter=o.exporter, dynamic_batch=o.dynamic_batch,
                              parity_images=None, seed=o.seed))


def _export(run: Run, plan: ExportPlan) -> Outcome:
    from ..convert.export import export

    model, loaded = run.torch_model()
    result = export(model, loaded, plan.spec, run.out / plan.output,
                    labels=list(plan.labels) if plan.labels else None,
                    labels_source=plan.labels_source,
                    preprocess_sources=plan.preprocess_sources, options=plan.options)
    checkpoint = Path(loaded.source).name if loaded.source not in ("random", "imagenet") \
        else loaded.source
    return Outcome((run.out / plan.output,), ExportFacts(
        parity_passed=result.parity["passed"], max_abs_diff=result.parity["max_abs_diff"],
        nodes=result.nodes_after, weights=result.weights, checkpoint=checkpoint,
        sha256=loaded.sha256, untrained=loaded.is_random, preprocess=result.preprocess,
        preprocess_sources=result.preprocess_sources, labels=result.labels_source))


@dataclass(frozen=True)
class QuantizePlan:
    output: str
    options: QuantizeOptions


def quantize_plan(run: Run) -> QuantizePlan:
    o = run.options
    # The gate checks on --eval-images when given; otherwise quantize holds photos back.
    return QuantizePlan(o.file("int8"), QuantizeOptions(
        method=o.method, num_samples=o.num_samples, target=o.target, seed=o.seed,
        eval_images=o.eval_images, tolerances=o.gate))


def _quantize(run: Run, plan: QuantizePlan) -> Outcome:
    from ..convert.quantize import quantize

    try:
        result = quantize(run.model_path("fp32"), run.options.calibration,
                          run.out / plan.output, options=plan.options)
    except CheckFailed as exc:
        if exc.report is not None:
            exc.report = _quantize_facts(exc.report)
        raise
    return Outcome((run.out / plan.output,), _quantize_facts(result))


def _quantize_facts(result: Any) -> QuantizeFacts:
    check = result.check
    return QuantizeFacts(
        target=result.settings.target, method=result.settings.method,
        num_calibration=result.num_calibration, held_out=result.held_out,
        check_passed=None if check is None else check.passed,
        top1_agreement=None if check is None else check.comparison.top1_agreement,
        cosine_p1=None if check is None else check.comparison.cosine_p1,
        needed={} if check is None or check else check.needed(),
        tolerance=None if check is None else check.tolerance.describe(),
        notes=tuple(result.notes), size_ratio=round(result.size_ratio, 4))


@dataclass(frozen=True)
class Fp16Plan:
    output: str
    options: Fp16Options


def fp16_plan(run: Run) -> Fp16Plan:
    return Fp16Plan(run.options.file("fp16"), Fp16Options(check_images=None,
                                                          seed=run.options.seed))


def _fp16(run: Run, plan: Fp16Plan) -> Outcome:
    from ..convert.fp16 import convert_fp16

    result = convert_fp16(run.model_path("fp32"), run.out / plan.output, options=plan.options)
    return Outcome((run.out / plan.output,), Fp16Facts(
        check_passed=result.check.passed, cosine_min=result.check.comparison.cosine_min))


@dataclass(frozen=True)
class ParityPlan:
    """:func:`checks.parity.run_parity`'s options and the photos it is fed (how many, which
    seeded subset)."""

    limit: int | None
    seed: int
    options: ParityOptions
    saved_outputs: str = PARITY_OUTPUTS  # the reference's logits, for the serve step


def parity_plan(run: Run) -> ParityPlan:
    o = run.options
    return ParityPlan(o.parity_limit, o.seed, ParityOptions(providers=o.providers,
                                                            tolerances=o.gate))


def _parity(run: Run, plan: ParityPlan) -> Outcome:
    from ..artifact.model_file import ModelFile
    from ..checks.parity import check, make_inputs, model_spec, run_parity, save_outputs

    files = [ModelFile.read(p) for p in run.model_paths()]
    inputs = make_inputs(model_spec(files, None), images=run.images(), random_count=None,
                         limit=plan.limit, seed=plan.seed)
    report, logits = run_parity(files, inputs=inputs,
                                weights_model=run.torch_model()[0],
                                options=plan.options)
    path = run.out / "parity.json"
    write_json(path, {"machine": machine_info(), **report.to_dict()})
    save_outputs(run.out / plan.saved_outputs, report.reference, inputs, logits)
    facts = ParityFacts(passed=report.passed, inputs=report.inputs["description"], backends=tuple(
        BackendFacts(backend=f"{Path(r.model).name}@{r.provider}" if r.model else r.backend,
                     precision=r.precision, passed=r.passed, tolerance=r.tolerance,
                     judged_on=r.check.judged_on() if r.check else {},
                     cosine_min=r.comparison.cosine_min if r.comparison else None,
                     top1_agreement=r.comparison.top1_agreement if r.comparison else None)
        for r in report.results))
    try:
        check(report)
    except CheckFailed as exc:
        exc.report = facts
        raise
    return Outcome((path, run.out / plan.saved_outputs), facts)


def evaluate_plan(run: Run) -> EvaluateOptions:
    return EvaluateOptions(seed=run.options.seed)


def _evaluate(run: Run, plan: EvaluateOptions) -> Outcome:
    from ..checks.evaluate import evaluate

    assert run.options.eval_images is not None
    result = evaluate(run.model_paths(), run.options.eval_images, options=plan)
    path = run.out / "evaluate.json"
    write_json(path, {"machine": machine_info(), **result.to_dict()})
    return Outcome((path,), EvaluateFacts(
        images=result.models[0].n, classes=result.classes,
        models=tuple(AccuracyFacts.from_dict({**m.to_dict(), "model": Path(m.model).name})
                     for m in result.models)))


@dataclass(frozen=True)
class BenchPlan:
    """One bench run per provider, and the machine: latency is a fact of the machine too."""

    runs: tuple[BenchOptions, ...]
    machine: str


def bench_plan(run: Run) -> BenchPlan:
    o = run.options
    return BenchPlan(tuple(BenchOptions(
        provider=provider, batch_sizes=o.bench_batch_sizes, warmup=o.bench_warmup,
        iterations=o.bench_iterations, placement=provider != "cpu", seed=o.seed)
        for provider in o.providers), describe())


def _bench(run: Run, plan: BenchPlan) -> Outcome:
    from ..checks.bench import busy_warning, run_bench

    reports = [run_bench(run.model_paths(), options) for options in plan.runs]
    results = [r for report in reports for r in report.results]
    path = run.out / "bench.json"
    write_json(path, {"machine": machine_info(), "runs": [r.to_dict() for r in reports]})
    return Outcome((path,), BenchFacts(
        rows=tuple(LatencyFacts.from_dict({**r.to_dict(), "model": Path(r.model).name})
                   for r in results), busy=busy_warning(results)))


def _report(run: Run, plan: None) -> Outcome:
    from ..core.render import plot_bench

    records = run.records
    outputs = [run.out / "report.md"]
    plot = run.out / "bench.png"
    try:
        plot_bench(records["bench"].results["rows"], plot, machine=machine_info())
        outputs.append(plot)
    except UserError as exc:  # matplotlib missing: the tables still say everything
        log.warning("report without the latency plot: %s", exc)
    write_text(outputs[0], report_markdown(records, plot.name if plot in outputs else None))
    return Outcome(tuple(outputs), ReportFacts(plot=plot in outputs))


@dataclass(frozen=True)
class TritonPlan:
    """The models packaged (their file names are the Triton names), the options they all
    get, and the models that get others."""

    models: tuple[str, ...]
    options: TritonOptions
    per_model: tuple[tuple[str, TritonOptions], ...]


def triton_plan(run: Run) -> TritonPlan:
    """GPU instances when a GPU provider was asked for; TensorRT when tensorrt was. An INT8
    model quantized for a CPU target stays on CPU instances: TensorRT takes only symmetric
    int8, and the CUDA provider has no INT8 convolution."""
    o = run.options
    models = tuple(o.file(p) for p in o.precisions)
    base = o.triton or TritonOptions()
    if not o.gpu:
        return TritonPlan(models, base, ())
    tensorrt: TrtPrecision | None = None
    if "tensorrt" in o.providers:
        tensorrt = "int8" if o.target == "tensorrt" else "fp16"
    options = dataclasses.replace(base, device="gpu", tensorrt=tensorrt)
    if tensorrt == "int8":
        return TritonPlan(models, options, ())
    return TritonPlan(models, options, ((o.file("int8"), dataclasses.replace(
        base, device="cpu", tensorrt=None)),))


def _triton(run: Run, plan: TritonPlan) -> Outcome:
    from ..serving.repository import package_triton

    result = package_triton([run.out / m for m in plan.models], run.out / REPOSITORY,
                            options=plan.options,
                            model_options={run.out / m: o for m, o in plan.per_model})
    return Outcome(tuple(run.out / REPOSITORY / f for f in result.files),
                   TritonFacts(models=tuple(m.to_dict() for m in result.models)))


@dataclass(frozen=True)
class ServePlan:
    """How the served repository is proven: the protocols its endpoints are asked over
    and the tolerances (parity's) that the served answers must meet."""

    protocols: tuple[str, ...]
    tolerances: ToleranceOverrides


def serve_plan(run: Run) -> ServePlan:
    return ServePlan(("http", "grpc"), run.options.gate)


def _serve(run: Run, plan: ServePlan) -> Outcome:
    """A real Triton on the repository; parity's photos through ``<name>`` and
    ``<name>_image`` of every model, judged against parity's reference outputs."""
    from ..checks.parity import load_outputs
    from ..serving.proof import prove_protocols
    from ..serving.stub_env import unavailable

    reason = unavailable()
    if reason is not None:
        raise StepSkipped(reason, ServeFacts(skipped=reason))
    golden = load_outputs(run.out / PARITY_OUTPUTS)
    photos = [run.images() / name for name in golden.names]
    packaged = TritonFacts.from_dict(run.records["triton"].results).models
    proof = prove_protocols(run.out / REPOSITORY, photos,
                            {m["name"]: golden.logits for m in packaged},
                            protocols=plan.protocols, overrides=plan.tolerances)
    facts = ServeFacts(passed=bool(proof), triton=proof.triton,
                       onnxruntime_backend=proof.onnxruntime_backend, images=proof.images,
                       checks=tuple(c.to_dict() for c in proof.checks))
    if proof.failures:
        raise CheckFailed(proof.failure_line(golden.reference), report=facts)
    return Outcome((), facts)


# --- the plan and the run ----------------------------------------------------------------

def _quantize_inputs(run: Run) -> dict[str, Any]:
    o = run.options
    extra = {"eval_images": run.hashes.folder_input(o.eval_images)} \
        if o.eval_images is not None else {}
    return {"fp32_model": run.model_input("fp32"),
            "calibration": run.hashes.folder_input(o.calibration), **extra}


def steps(options: PipelineOptions) -> list[Step]:
    """The steps these options ask for, in order."""
    plan = [Step("export", export_plan, lambda r: {"weights": r.weights_input()}, _export),
            Step("quantize", quantize_plan, _quantize_inputs, _quantize)]
    if options.gpu:
        plan.append(Step("fp16", fp16_plan, lambda r: {"fp32_model": r.model_input("fp32")},
                         _fp16))
    plan.append(Step("parity", parity_plan, lambda r: {
        "weights": r.weights_input(), **r.models_input(),
        "images": r.hashes.folder_input(r.images())}, _parity))
    if options.eval_images is not None and not options.features:  # embeddings: no accuracy
        plan.append(Step("evaluate", evaluate_plan, lambda r: {
            **r.models_input(), "eval_images": r.hashes.folder_input(r.options.eval_images)},
            _evaluate))
    plan.append(Step("bench", bench_plan, lambda r: r.models_input(), _bench))
    if options.triton is not None:
        plan.append(Step("triton", triton_plan, lambda r: r.models_input(), _triton))
        plan.append(Step("serve", serve_plan, lambda r: {
            "parity_outputs": r.artifact(PARITY_OUTPUTS, "parity"),
            "repository": r.step_input("triton"),
            "images": r.hashes.folder_input(r.images())}, _serve))
    reported = [s.name for s in plan]
    plan.append(Step("report", lambda r: None,
                     lambda r: {n: r.step_input(n) for n in reported}, _report))
    return plan


def known_steps() -> tuple[str, ...]:
    """Every step the pipeline can run, in order: its plan with every optional step on."""
    everything = PipelineOptions(eval_images=Path("."), providers=("cpu", "cuda"),
                                 triton=TritonOptions())
    return tuple(s.name for s in steps(everything))


def run_pipeline(output: str | Path, options: PipelineOptions, *,
                 progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Run the steps that are not up to date; raise the failing step's own error.

    ``progress`` gets one line per step. Bad inputs (a provider that cannot run, a missing
    checkpoint or photo folder) fail before any step runs.
    """
    from ..runtime.providers import require_provider

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    for provider in options.providers:
        require_provider(provider)  # before any work: a missing one is exit 2 right away
    run = Run(out, options)
    run.weights_input()
    for folder in (options.calibration, options.eval_images):
        if folder is not None:
            run.hashes.folder_input(folder)
    out.mkdir(parents=True, exist_ok=True)
    return execute(steps(options), run, known=known_steps(), force=options.force,
                   say=progress or (lambda line: log.info("%s", line)))
