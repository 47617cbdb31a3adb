"""The INT8 gate: FP32 against INT8 on photos calibration never saw, and the
accuracy-aware fallback that keeps in FP32 the layers where most INT8 error enters.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...artifact.model_file import ModelFile
from ...core.errors import UserError
from ...core.files import file_sha256
from ...core.machine import cpu_info, saturates
from ...core.metrics import CheckResult, ToleranceOverrides, hits
from ...core.progress import Progress
from ...data.folders import LabelledImages, labelled_images, read_images
from ...data.images import list_images, seeded_subset
from ...data.spec import PreprocessSpec
from ...runtime.providers import SessionConfig
from ...runtime.runners import OrtRunner, run_model
from .calibrate import ImageFolderReader, quantize_with_ranges
from .prepare import SENSITIVE_OPS, Prepared
from .recipe import DEFAULT_BATCH, QuantizeOptions, QuantSettings

log = logging.getLogger(__name__)

# Held-out images are preprocessed once and kept in memory (the fallback runs them many
# times); above this many bytes a seeded subset is used, and the report says how many.
MAX_EVAL_BYTES = 1 << 30

# Images the error budget ranks layers on: per-layer SQNR settles well before this.
BUDGET_SAMPLES = 128


@dataclass(frozen=True)
class FallbackStep:
    """One step of the accuracy-aware loop: the nodes kept in FP32 and the accuracy then."""

    fp32_nodes: tuple[str, ...]
    top1: float
    top5: float
    drop_pt: float

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_nodes": list(self.fp32_nodes), "top1": round(self.top1, 6),
                "top5": round(self.top5, 6), "drop_pt": round(self.drop_pt, 4)}


def _bounded(paths: list[Path], spec: PreprocessSpec, seed: int) -> list[Path]:
    per_image = 3 * spec.input_size * spec.input_size * 4
    limit = max(1, MAX_EVAL_BYTES // per_image)
    if len(paths) > limit:
        log.warning("checking on a seeded subset of %d of the %d held-out images (memory)",
                    limit, len(paths))
    return seeded_subset(paths, limit, seed)


@dataclass(frozen=True)
class _EvalSet:
    inputs: np.ndarray
    targets: np.ndarray | None
    source: str
    note: str | None = None  # calibration photos among them, in words


@dataclass(frozen=True)
class Candidate:
    """The INT8 model the gate checks, and what it was made from: the FP32 model (its
    path and opened file), the spec, settings and options, the prepared graph, the ranges,
    the reader that calibrated (its held-out photos), and where progress goes."""

    model: Path
    file: ModelFile
    spec: PreprocessSpec
    settings: QuantSettings
    options: QuantizeOptions
    prepared: Prepared
    cache: Path
    int8: Path
    reader: ImageFolderReader
    progress: Progress | None = None

    @property
    def output(self) -> str:
        return self.file.io.output_name


def _eval_set(job: Candidate) -> _EvalSet:
    """The held-out images: --eval-images, else calibration photos calibration did not use.

    An --eval-images ImageFolder gives top-1 only when its folders map to the model's
    classes; otherwise --max-top1-drop is an error, and a plain check uses the photos alone.
    Photos that calibration also used (same content) are counted and warned about.
    """
    options, reader, spec = job.options, job.reader, job.spec
    if job.file.kind == "features" and options.max_top1_drop is not None:
        raise UserError(f"{job.model}: gives an embedding, which has no top-1 to hold "
                        "within `max_top1_drop`; drop it (the gate judges embeddings by "
                        "cosine)", path=job.model, param="max_top1_drop")
    labelled: LabelledImages | None = None
    labels, classes = (job.file.meta.labels if job.file.meta else None), job.file.io.classes
    if options.eval_images is not None and job.file.kind == "features":
        paths, source = list_images(options.eval_images), str(options.eval_images)
    elif options.eval_images is not None:
        try:
            labelled = labelled_images(options.eval_images)
            labelled.class_indices(labels, classes)
            paths = list(labelled.paths)
        except UserError as exc:
            if options.max_top1_drop is not None:
                raise
            if labelled is not None:
                log.warning("%s; checking INT8 against FP32 on these images without top-1", exc)
                labelled = None
            paths = list_images(options.eval_images)
        source = str(options.eval_images)
        if not paths:
            raise UserError(f"{options.eval_images}: no images to check the INT8 model on")
    else:
        paths, source = reader.held_out, f"{reader.root} (held out from calibration)"
    inputs, used = read_images(_bounded(paths, spec, options.seed), spec,
                               strict=options.strict, progress=job.progress,
                               what="held-out images")
    targets = labelled.targets(used, labels, classes)[0] if labelled is not None else None
    note = None
    if options.eval_images is not None:
        seen = {file_sha256(p) for p in reader.used}
        shared = sum(file_sha256(p) in seen for p in used)
        if shared:
            note = (f"{shared} of the {len(used)} evaluation photos are also calibration "
                    "photos (same content), so the check is partly measured on photos "
                    "calibration saw")
    return _EvalSet(inputs, targets, f"{len(used)} images from {source}", note)


def _accuracy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    return hits(logits, targets, 1) / len(targets), hits(logits, targets, 5) / len(targets)


def _run(model: Path, inputs: np.ndarray, batch_size: int, *, output: str | None = None,
         simulate: bool = False, shown_as: Path | None = None) -> np.ndarray:
    label = None if shown_as is None else f"the INT8 model quantized from {shown_as}"
    return run_model(model, inputs, batch_size, config=SessionConfig(simulate_int8=simulate),
                     label=label, output=output)


class _Held:
    """Held-out arrays as layerwise's streaming inputs."""

    def __init__(self, inputs: np.ndarray) -> None:
        self.inputs = inputs
        self.names: list[str] = []

    def batches(self, size: int) -> Iterator[np.ndarray]:
        self.names = [f"held-out {i}" for i in range(len(self.inputs))]
        for start in range(0, len(self.inputs), size):
            yield self.inputs[start:start + size]


def error_budget(pre: Path, int8: Path, candidates: Sequence[str], inputs: np.ndarray, *,
                 batch_size: int = DEFAULT_BATCH) -> list[dict[str, Any]]:
    """Where the INT8 error enters: the prepared FP32 graph against the INT8 candidate
    layer by layer (``runtime.layerwise``), each candidate node ranked by the SQNR it adds
    (its input's SQNR minus its output's), most first.

    One pass of both models, where a one-node-at-a-time search quantizes and runs the
    model once per node (18x slower on the CIFAR ResNet-18), and it measures each layer
    inside the whole INT8 model, where the search sees it alone: with entropy ranges the
    stem conv, first here, cut the top-1 drop from 2.5 to 1.55 points; with the search's
    first one to eight choices it stayed between 2.25 and 2.5 (CIFAR-10 ResNet-18)."""
    from ...runtime.layerwise import compare_layers

    [report] = compare_layers(OrtRunner(ModelFile.read(pre)),
                              [(OrtRunner(ModelFile.read(int8)), "int8")], _Held(inputs),
                              batch_size, ToleranceOverrides())
    assert not isinstance(report, str)  # one graph and its own QDQ share every node
    wanted = set(candidates)
    ranked = sorted((row for row in report.layers if row.node in wanted),
                    key=lambda row: -(row.added_db if row.added_db is not None else -math.inf))
    return [{"rank": rank, "node": row.node, "op_type": row.op,
             **{key: value for key, value in row.to_dict(budget=True).items()
                if key in ("added_db", "sqnr_db", "cosine_p1")}}
            for rank, row in enumerate(ranked, 1)]


@dataclass(frozen=True)
class FallbackOutcome:
    """What the accuracy-aware loop did: each step's accuracy, and the nodes left in FP32."""

    table: tuple[dict[str, Any], ...] = ()
    steps: tuple[FallbackStep, ...] = ()
    nodes: tuple[str, ...] = ()
    met: bool | None = None
    logits: np.ndarray | None = None

    def accuracy(self, reference: np.ndarray, targets: np.ndarray,
                 max_drop: float | None) -> dict[str, Any]:
        fp32_top1, fp32_top5 = _accuracy(reference, targets)
        last = self.steps[-1]
        return {"n": len(targets), "fp32_top1": round(fp32_top1, 6),
                "fp32_top5": round(fp32_top5, 6), "int8_top1": round(last.top1, 6),
                "int8_top5": round(last.top5, 6), "top1_drop_pt": round(last.drop_pt, 4),
                "max_top1_drop_pt": max_drop}


def keep_error_sources_in_fp32(job: Candidate, inputs: np.ndarray, targets: np.ndarray,
                               reference: np.ndarray, *,
                               simulate: bool = False) -> FallbackOutcome:
    """Measure INT8 top-1 on labelled images; while it misses `max_top1_drop`, re-quantize
    the candidate with the next node of the error budget (:func:`error_budget`) kept in
    FP32, up to `max_fallback`."""
    options, output = job.options, job.output
    pre, cache, int8, settings = job.prepared.path, job.cache, job.int8, job.settings
    fp32_top1, _ = _accuracy(reference, targets)

    def measure(nodes: tuple[str, ...]) -> tuple[FallbackStep, np.ndarray]:
        logits = _run(int8, inputs, options.batch_size, simulate=simulate, output=output)
        top1, top5 = _accuracy(logits, targets)
        return FallbackStep(nodes, top1, top5, 100 * (fp32_top1 - top1)), logits

    step, logits = measure(())
    steps = [step]
    limit = options.max_top1_drop
    met = None if limit is None else step.drop_pt <= limit
    if limit is None or met or options.max_fallback <= 0:
        return FallbackOutcome(steps=tuple(steps), met=met, logits=logits)
    op_types = job.prepared.op_types
    candidates = [n for n, t in op_types.items() if t in SENSITIVE_OPS and n not in options.exclude]
    chosen = seeded_subset(list(range(len(inputs))), BUDGET_SAMPLES, options.seed)
    table = error_budget(pre, int8, candidates, inputs[chosen], batch_size=options.batch_size)
    nodes: tuple[str, ...] = ()
    for row in table[:options.max_fallback]:
        nodes = (*nodes, row["node"])
        quantize_with_ranges(pre, cache, int8, settings, exclude=[*options.exclude, *nodes])
        step, logits = measure(nodes)
        steps.append(step)
        log.info("kept %s in FP32: top-1 %.2f%% (drop %.2f pt)", row["node"], 100 * step.top1,
                 step.drop_pt)
        met = step.drop_pt <= limit
        if met:
            break
    return FallbackOutcome(tuple(table), tuple(steps), nodes, met, logits)


def simulated_check(settings: QuantSettings, cpu: dict[str, Any] | None = None) -> str | None:
    """Why the check must simulate the target's arithmetic instead of running this CPU's
    int8 kernels (see ``SessionConfig.simulate_int8``); None when the kernels represent it."""
    cpu = cpu or cpu_info()
    target = settings.target
    if target == "tensorrt":
        return ("the check ran the QDQ graph unfused on ONNX Runtime's CPU provider, which "
                "computes TensorRT's quantized arithmetic but is not TensorRT; verify on the "
                "GPU with 'resnet-deploy parity --provider tensorrt'")
    if settings.eight_bit_weights and saturates(cpu["int8_path"]):
        return (f"this CPU ({cpu['cpu']}, int8 path {cpu['int8_path']}) lacks the VNNI/AMX "
                f"that target {target} needs and would saturate its 8-bit weights, so the "
                "check does not represent the target's kernels: it simulated their arithmetic "
                "(QDQ unfused, in float)")
    return None


@dataclass(frozen=True)
class Gate:
    """What the check against FP32 found (all None/empty with --no-check)."""

    check: CheckResult | None = None
    accuracy: dict[str, Any] | None = None
    fallback: FallbackOutcome = FallbackOutcome()
    held_out: int = 0
    notes: tuple[str, ...] = ()


# Below this many held-out photos, one disagreement moves top-1 agreement by over a point.
FEW_PHOTOS = 100


def check_against_fp32(job: Candidate) -> Gate:
    """FP32 vs INT8 on held-out photos, judged by INT8's tolerance (with the overrides);
    with labels and `max_top1_drop`, the accuracy-aware fallback."""
    options = job.options
    cpu_note = simulated_check(job.settings)
    simulate = cpu_note is not None
    evalset = _eval_set(job)
    notes = [n for n in (cpu_note, evalset.note) if n]
    held_out = len(evalset.inputs)
    if held_out < FEW_PHOTOS:
        notes.append(f"the verdict rests on few photos: {held_out} held out (under "
                     f"{FEW_PHOTOS}), so one disagreement moves top-1 agreement by "
                     f"{100 / held_out:.2f} points; check on more photos for a firmer one")
    reference = _run(job.model, evalset.inputs, options.batch_size, output=job.output)
    logits = _run(job.int8, evalset.inputs, options.batch_size, output=job.output,
                  simulate=simulate, shown_as=job.model)
    fallback, accuracy = FallbackOutcome(), None
    if evalset.targets is not None:
        fallback = keep_error_sources_in_fp32(job, evalset.inputs, evalset.targets, reference,
                                          simulate=simulate)
        assert fallback.logits is not None  # it measured at least the plain model
        logits = fallback.logits
        accuracy = fallback.accuracy(reference, evalset.targets, options.max_top1_drop)
    check = CheckResult.judge(f"FP32 vs INT8 on {evalset.source}", reference, logits,
                              options.tolerances.for_precision("int8", job.file.kind))
    return Gate(check, accuracy, fallback, held_out, tuple(notes))
