"""The pipeline's steps for a ResNet checkpoint, and the run that executes them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.choices import Exporter, Method, Target, TrtPrecision
from ..core.errors import CheckFailed, UserError
from ..core.files import write_text
from ..core.machine import describe, machine_info
from ..core.metrics import ToleranceOverrides
from ..core.render import write_json
from ..data.spec import PreprocessSpec
from ..serving.triton import TritonOptions
from .manifest import (BUILT, FAILED, MANIFEST, UP_TO_DATE, Hashes, StepRecord, digest,
                       read_manifest, records_of, step_key, write_manifest)
from .report import report_markdown

log = logging.getLogger(__name__)

DEFAULT_NAME = "resnet18"

PRODUCERS = {"fp32": "export", "int8": "quantize", "fp16": "fp16"}

REPOSITORY = "model_repository"

GPU_PROVIDERS = ("cuda", "tensorrt")

# What the manifest keeps of each bench row (the full rows are in bench.json).
BENCH_KEYS = ("model", "provider", "precision", "batch_size", "p10_ms", "p50_ms", "p90_ms",
              "throughput_ips")


@dataclass(frozen=True)
class PipelineOptions:
    """Everything a run depends on besides its input files."""

    weights: str = "imagenet"
    num_classes: int | None = None
    spec: PreprocessSpec = PreprocessSpec.create(224)
    spec_sources: dict[str, str] = field(default_factory=dict)  # see card.Preprocessing
    labels: tuple[str, ...] | None = None
    labels_source: str | None = None  # where ``labels`` came from, in words
    name: str | None = None  # the artifacts' (and Triton models') name; None: from weights
    calibration: Path = Path("calibration")
    eval_images: Path | None = None
    providers: tuple[str, ...] = ("cpu",)
    target: Target = "cpu"
    method: Method = "minmax"
    num_samples: int = 256
    exporter: Exporter = "dynamo"
    dynamic_batch: bool = True
    parity_limit: int | None = 200
    bench_batch_sizes: tuple[int, ...] = (1,)
    bench_iterations: int = 30
    bench_warmup: int = 5
    triton: TritonOptions | None = None
    force: bool = False
    seed: int = 0
    gate: ToleranceOverrides = ToleranceOverrides(precisions=("int8",))  # INT8 floors

    @property
    def gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    @property
    def model_name(self) -> str:
        """``ft.pth`` -> ``ft``: what the artifacts and Triton models are called."""
        if self.name:
            return self.name
        if self.weights in ("random", "imagenet"):
            return DEFAULT_NAME
        return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(self.weights).stem).strip("_") \
            or DEFAULT_NAME

    def file(self, precision: str) -> str:
        """The model file of each precision: ``ft.onnx``, ``ft.int8.onnx``, ``ft.fp16.onnx``."""
        return f"{self.model_name}{'' if precision == 'fp32' else '.' + precision}.onnx"


@dataclass(frozen=True)
class PipelineResult:
    """Where the run wrote, and what each step did (built, up to date or failed)."""

    output: str
    manifest: str
    steps: tuple[StepRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # the same keys and shapes as StepRecord.to_dict


@dataclass(frozen=True)
class Outcome:
    """What a step function returns: files written (under the output folder) and figures."""

    outputs: tuple[Path, ...]
    results: dict[str, Any]


@dataclass(frozen=True)
class Step:
    name: str
    inputs: Callable[[Run], dict[str, Any]]
    options: Callable[[Run], dict[str, Any]]
    run: Callable[[Run], Outcome]


class Run:
    """The state one pipeline run shares between steps: paths, hashes, the torch model."""

    def __init__(self, output: Path, options: PipelineOptions) -> None:
        self.out = output
        self.options = options
        self.records: dict[str, StepRecord] = {}
        self.hashes = Hashes()
        self._torch: Any = None

    def model_path(self, precision: str) -> Path:
        return self.out / self.options.file(precision)

    def precisions(self) -> list[str]:
        """The models this run makes: FP32 and INT8, and FP16 for a GPU provider."""
        return ["fp32", "int8"] + (["fp16"] if self.options.gpu else [])

    def model_paths(self) -> list[Path]:
        return [self.model_path(p) for p in self.precisions()]

    def artifact(self, name: str, step: str) -> dict[str, Any]:
        path = self.out / name
        if not path.is_file():
            raise UserError(f"{path}: missing although step {step} finished; rerun with --force")
        return {"kind": "artifact", "path": name, "step": step, "sha256": self.hashes.file(path)}

    def model_input(self, precision: str) -> dict[str, Any]:
        return self.artifact(self.options.file(precision), PRODUCERS[precision])

    def models_input(self) -> dict[str, Any]:
        return {self.options.file(p): self.model_input(p) for p in self.precisions()}

    def weights_input(self) -> dict[str, Any]:
        weights = self.options.weights
        if weights in ("random", "imagenet"):
            return {"kind": "value", "value": weights}
        return self.hashes.file_input(Path(weights))

    def step_input(self, step: str) -> dict[str, Any]:
        return {"kind": "step", "step": step, "sha256": self.records[step].digest()}

    def torch_model(self) -> tuple[Any, Any]:
        if self._torch is None:
            from ..weights.checkpoints import load_model

            self._torch = load_model(self.options.weights, num_classes=self.options.num_classes,
                                     seed=self.options.seed)
        return self._torch

    def images(self) -> Path:
        """Parity's photos: the labelled set when given (calibration never saw it)."""
        return self.options.eval_images or self.options.calibration


def _export(run: Run) -> Outcome:
    from ..convert.export import ExportOptions, export

    o = run.options
    model, loaded = run.torch_model()
    # Seeded random inputs for export's own check: the FP32 model then depends on the
    # checkpoint and options only, and the parity step compares every model on photos.
    result = export(model, loaded, o.spec, run.model_path("fp32"),
                    labels=list(o.labels) if o.labels else None, labels_source=o.labels_source,
                    preprocess_sources=o.spec_sources,
                    options=ExportOptions(exporter=o.exporter, dynamic_batch=o.dynamic_batch,
                                          parity_images=None, seed=o.seed))
    checkpoint = Path(loaded.source).name if loaded.source not in ("random", "imagenet") \
        else loaded.source
    return Outcome((run.model_path("fp32"),), {
        "parity_passed": result.parity["passed"],
        "max_abs_diff": result.parity["max_abs_diff"], "nodes": result.nodes_after,
        "weights": result.weights, "checkpoint": checkpoint, "sha256": loaded.sha256,
        "untrained": loaded.is_random, "preprocess": result.preprocess,
        "preprocess_sources": result.preprocess_sources, "labels": result.labels_source})


def _quantize(run: Run) -> Outcome:
    from ..convert.quantize.publish import quantize
    from ..convert.quantize.recipe import QuantizeOptions

    o = run.options
    # The gate checks on --eval-images when given; otherwise quantize holds photos back.
    options = QuantizeOptions(method=o.method, num_samples=o.num_samples, target=o.target,
                              seed=o.seed, eval_images=o.eval_images, tolerances=o.gate)
    try:
        result = quantize(run.model_path("fp32"), o.calibration, run.model_path("int8"),
                          options=options)
    except CheckFailed as exc:
        if exc.report is not None:
            exc.report = _quantize_results(exc.report)
        raise
    return Outcome((run.model_path("int8"),), _quantize_results(result))


def _quantize_results(result: Any) -> dict[str, Any]:
    check = result.check
    return {"target": result.settings.target, "method": result.settings.method,
            "num_calibration": result.num_calibration, "held_out": result.held_out,
            "check_passed": None if check is None else check.passed,
            "top1_agreement": None if check is None else check.comparison.top1_agreement,
            "cosine_p1": None if check is None else check.comparison.cosine_p1,
            "needed": {} if check is None or check else check.needed(),
            "tolerance": None if check is None else check.tolerance.describe(),
            "notes": list(result.notes), "size_ratio": round(result.size_ratio, 4)}


def _fp16(run: Run) -> Outcome:
    from ..convert.fp16 import Fp16Options, convert_fp16

    result = convert_fp16(run.model_path("fp32"), run.model_path("fp16"),
                          options=Fp16Options(check_images=None, seed=run.options.seed))
    return Outcome((run.model_path("fp16"),), {
        "check_passed": result.check.passed, "cosine_min": result.check.comparison.cosine_min})


def _parity(run: Run) -> Outcome:
    from ..artifact.model_file import ModelFile
    from ..checks.parity import ParityOptions, check, make_inputs, model_spec, run_parity

    o = run.options
    files = [ModelFile.read(p) for p in run.model_paths()]
    inputs = make_inputs(model_spec(files, None), images=run.images(), random_count=None,
                         limit=o.parity_limit, seed=o.seed)
    report, _ = run_parity(files, inputs=inputs, weights_model=run.torch_model()[0],
                           options=ParityOptions(providers=o.providers, tolerances=o.gate))
    path = run.out / "parity.json"
    write_json(path, {"machine": machine_info(), **report.to_dict()})
    results = {"passed": report.passed, "inputs": report.inputs["description"],
               "backends": [{"backend": f"{Path(r.model).name}@{r.provider}" if r.model
                             else r.backend, "precision": r.precision, "passed": r.passed,
                             "tolerance": r.tolerance,
                             "judged_on": r.check.judged_on() if r.check else {},
                             "cosine_min": r.comparison.cosine_min if r.comparison else None,
                             "top1_agreement": (r.comparison.top1_agreement
                                                if r.comparison else None)}
                            for r in report.results]}
    try:
        check(report)
    except CheckFailed as exc:
        exc.report = results
        raise
    return Outcome((path,), results)


def _evaluate(run: Run) -> Outcome:
    from ..checks.evaluate import EvaluateOptions, evaluate

    assert run.options.eval_images is not None
    result = evaluate(run.model_paths(), run.options.eval_images,
                      options=EvaluateOptions(seed=run.options.seed))
    path = run.out / "evaluate.json"
    write_json(path, {"machine": machine_info(), **result.to_dict()})
    return Outcome((path,), {"images": result.models[0].n, "classes": result.classes,
                             "models": [{**m.to_dict(), "model": Path(m.model).name}
                                        for m in result.models]})


def _bench(run: Run) -> Outcome:
    from ..checks.bench import BenchOptions, busy_warning, run_bench

    o = run.options
    rows, reports, results = [], [], []  # type: ignore[var-annotated]
    for provider in o.providers:
        report = run_bench(run.model_paths(), BenchOptions(
            provider=provider, batch_sizes=o.bench_batch_sizes, warmup=o.bench_warmup,
            iterations=o.bench_iterations, placement=provider != "cpu", seed=o.seed))
        reports.append(report.to_dict())
        results += report.results
        rows += [{k: v for k, v in r.to_dict().items() if k in BENCH_KEYS}
                 | {"model": Path(r.model).name} for r in report.results]
    path = run.out / "bench.json"
    write_json(path, {"machine": machine_info(), "runs": reports})
    return Outcome((path,), {"rows": rows, "busy": busy_warning(results)})


def _report(run: Run) -> Outcome:
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
    return Outcome(tuple(outputs), {"plot": plot in outputs})


def _triton(run: Run) -> Outcome:
    from ..serving.repository import package_triton

    options, per_model = triton_plan(run)
    result = package_triton(run.model_paths(), run.out / REPOSITORY, options=options,
                            model_options=per_model)
    return Outcome(tuple(run.out / REPOSITORY / f for f in result.files),
                   {"models": [m.to_dict() for m in result.models]})


def triton_plan(run: Run) -> tuple[TritonOptions, dict[Path, TritonOptions]]:
    """GPU instances when a GPU provider was asked for; TensorRT when tensorrt was. An INT8
    model quantized for a CPU target stays on CPU instances: TensorRT takes only symmetric
    int8, and the CUDA provider has no INT8 convolution."""
    o = run.options
    base = o.triton or TritonOptions()
    if not o.gpu:
        return base, {}
    tensorrt: TrtPrecision | None = None
    if "tensorrt" in o.providers:
        tensorrt = "int8" if o.target == "tensorrt" else "fp16"
    options = dataclasses.replace(base, device="gpu", tensorrt=tensorrt)
    if tensorrt == "int8":
        return options, {}
    return options, {run.model_path("int8"): dataclasses.replace(base, device="cpu",
                                                                 tensorrt=None)}


def _triton_options(run: Run) -> dict[str, Any]:
    options, per_model = triton_plan(run)
    return {"default": options.to_dict(),
            "per_model": {p.name: v.to_dict() for p, v in per_model.items()}}


def _spec_options(o: PipelineOptions) -> dict[str, Any]:
    return {"weights": o.weights if o.weights in ("random", "imagenet") else "file",
            "num_classes": o.num_classes, "spec": o.spec.to_dict(),
            "sources": o.spec_sources, "labels_source": o.labels_source, "name": o.model_name,
            "labels": digest(list(o.labels)) if o.labels else None, "exporter": o.exporter,
            "dynamic_batch": o.dynamic_batch, "seed": o.seed}


def steps(options: PipelineOptions) -> list[Step]:
    """The plan for these options, in order."""
    plan = [
        Step("export", lambda r: {"weights": r.weights_input()},
             lambda r: _spec_options(r.options), _export),
        Step("quantize", lambda r: {
            "fp32_model": r.model_input("fp32"),
            "calibration": r.hashes.folder_input(r.options.calibration),
            **({"eval_images": r.hashes.folder_input(r.options.eval_images)}
               if r.options.eval_images is not None else {})},
            lambda r: {"method": r.options.method, "num_samples": r.options.num_samples,
                       "target": r.options.target, "seed": r.options.seed,
                       "gate": r.options.gate.to_dict()}, _quantize),
    ]
    if options.gpu:
        plan.append(Step("fp16", lambda r: {"fp32_model": r.model_input("fp32")},
                         lambda r: {"seed": r.options.seed}, _fp16))
    plan.append(Step("parity", lambda r: {"weights": r.weights_input(), **r.models_input(),
                                          "images": r.hashes.folder_input(r.images())},
                     lambda r: {"providers": list(r.options.providers),
                                "limit": r.options.parity_limit, "seed": r.options.seed,
                                "gate": r.options.gate.to_dict()},
                     _parity))
    eval_images = options.eval_images
    if eval_images is not None:
        plan.append(Step("evaluate", lambda r: {
            **r.models_input(), "eval_images": r.hashes.folder_input(eval_images)},
            lambda r: {"provider": "cpu", "seed": r.options.seed}, _evaluate))
    plan.append(Step("bench", lambda r: r.models_input(), lambda r: {
        "providers": list(r.options.providers), "batch_sizes": list(r.options.bench_batch_sizes),
        "iterations": r.options.bench_iterations, "warmup": r.options.bench_warmup,
        "machine": describe()}, _bench))
    reported = [s.name for s in plan]
    plan.append(Step("report", lambda r: {n: r.step_input(n) for n in reported},
                     lambda r: {}, _report))
    if options.triton is not None:
        plan.append(Step("triton", lambda r: r.models_input(), _triton_options, _triton))
    return plan


def known_steps() -> tuple[str, ...]:
    """Every step the pipeline can run, in order: its plan with every optional step on."""
    everything = PipelineOptions(eval_images=Path("."), providers=("cpu", "cuda"),
                                 triton=TritonOptions())
    return tuple(s.name for s in steps(everything))


def _previous(out: Path) -> dict[str, StepRecord]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        return records_of(read_manifest(path, known_steps()))
    except UserError:
        log.warning("%s: unreadable; every step runs again", path)
        return {}


def _outputs_hold(record: StepRecord, out: Path, hashes: Hashes) -> bool:
    for entry in record.outputs:
        path = out / entry["path"]
        if not path.is_file() or hashes.file(path) != entry["sha256"]:
            return False
    return True


def run_pipeline(output: str | Path, options: PipelineOptions, *,
                 progress: Callable[[str], None] | None = None) -> PipelineResult:
    """Run the steps that are not up to date; raise the failing step's own error.

    ``progress`` gets one line per step. A failed step is recorded with its error (and its
    figures, when it measured any) before the error propagates; steps after it keep their
    previous records, which ``verify`` then reports as stale.
    """
    from ..runtime.providers import require_provider

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    for provider in options.providers:
        require_provider(provider)  # before any work: a missing one is exit 2 right away
    say = progress or (lambda line: log.info("%s", line))
    run = Run(out, options)
    run.weights_input()  # bad inputs fail here, not after the steps before them ran
    for folder in (options.calibration, options.eval_images):
        if folder is not None:
            run.hashes.folder_input(folder)
    out.mkdir(parents=True, exist_ok=True)
    plan = steps(options)
    order = [s.name for s in plan]
    # Steps these options no longer ask for (evaluate, fp16, triton) are forgotten now, so
    # neither report.md nor a manifest written after a failure shows their old figures.
    run.records.update({name: record for name, record in _previous(out).items()
                        if name in order})
    records = run.records
    for index, step in enumerate(plan, start=1):
        inputs, opts = step.inputs(run), step.options(run)
        key = step_key(inputs, opts)
        prev = records.get(step.name)
        prefix = f"[{index}/{len(plan)}] {step.name}:"
        if (not options.force and prev is not None and prev.status != FAILED
                and prev.key == key and _outputs_hold(prev, out, run.hashes)):
            # Same hashes, perhaps other paths: record where the inputs are now.
            records[step.name] = dataclasses.replace(prev, status=UP_TO_DATE, inputs=inputs)
            say(f"{prefix} up to date")
            continue
        start = time.perf_counter()
        try:
            outcome = step.run(run)
        except (CheckFailed, UserError) as exc:
            report = getattr(exc, "report", None)
            records[step.name] = StepRecord(
                step.name, FAILED, key, inputs, opts, results=report if isinstance(
                    report, dict) else {}, seconds=round(time.perf_counter() - start, 3),
                error=str(exc))
            write_manifest(out, records, order)
            say(f"{prefix} FAILED after {time.perf_counter() - start:.1f}s")
            raise
        seconds = round(time.perf_counter() - start, 3)
        records[step.name] = StepRecord(
            step.name, BUILT, key, inputs, opts,
            outputs=[run.hashes.output(out, p, step.name) for p in outcome.outputs],
            results=outcome.results, seconds=seconds)
        write_manifest(out, records, order)
        say(f"{prefix} built in {seconds:.1f}s")
    path = write_manifest(out, records, order)
    return PipelineResult(str(out), str(path), tuple(records[n] for n in order))
