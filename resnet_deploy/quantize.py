"""FP32 ONNX -> INT8 (QDQ) with onnxruntime, honest calibrators and a built-in check.

onnxruntime's ``quantize_static`` hands its calibrator only a few options, so Entropy runs
with 128 bins into 128 quantized bins, which leaves a single candidate threshold: the full
range, i.e. MinMax under another name. Here the calibrator is driven directly with the
options each method needs, its ranges are saved as onnxruntime's calibration cache, and
``quantize_static`` quantizes with exactly those ranges (``calibration_cache_path``). The
same cache makes the accuracy-aware fallback cheap: re-quantizing with a node kept in FP32
does not calibrate again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import logging.handlers
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import layers
from .calibration import (DEFAULT_BATCH, DEFAULT_NUM_SAMPLES, ImageFolderReader, LabelledImages,
                          hits, labelled_images, read_images)
from .choices import METHODS, QUANT_TYPES, TARGETS, Method, QuantType, Target
from .errors import CheckFailed, UserError
from .files import atomic_output, beside
from .machine import cpu_info, saturates
from .metrics import CheckResult, ToleranceOverrides, compare, round_sig
from .model import file_sha256
from .preprocess import ModelMetadata, PreprocessSpec, list_images, seeded_subset, write_metadata
from .runtime import (ModelFile, OrtBackend, SessionConfig, create_session, int8_weight_peak,
                      run_batched)

log = logging.getLogger(__name__)

SENSITIVE_OPS = ("Conv", "Gemm", "MatMul")
# Held-out images are preprocessed once and kept in memory (the fallback runs them many
# times); above this many bytes a seeded subset is used, and the report says how many.
MAX_EVAL_BYTES = 1 << 30
SENSITIVITY_SAMPLES = 256

# What each calibration method needs to be itself (passed to create_calibrator).
# minmax: a plain MinMax range only widens as calibration grows (one outlier photo sets it).
# Measured on the CIFAR-10 ResNet-18 (64x64), 5000 dev photos, INT8/FP32 top-1 agreement:
#   plain MinMax, 500 / 1000 photos:                        99.32% / 99.16%
#   moving average (mean of per-batch extremes), batch 32:   99.56% / 99.50%  <- default
#   moving average, batch 16 / batch 1 (per-image extremes): 99.50% / 98.54%
# onnxruntime's moving_average within one collect_data pass averages the per-batch
# ReduceMin/ReduceMax, so the batch size (DEFAULT_BATCH) is part of this recipe.
# entropy (2048 bins -> 128, TensorRT's recipe) measured 91.98% agreement and 79.14% top-1
# (FP32 81.54%) and takes ~50 s: the KL threshold clips the post-ReLU tails hard here.
# percentile 99.999: 99.54%, ~15 s of calibration.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {"moving_average": True, "averaging_constant": 0.01},
    # 2048 histogram bins searched down to 128 quantized bins: the TensorRT recipe.
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


@dataclass(frozen=True)
class TargetDefaults:
    """Types and ranges that run fast, and correctly, where the model will be deployed."""

    activation_type: QuantType
    weight_type: QuantType
    per_channel: bool
    symmetric: bool
    seven_bit_weights: bool  # int8 weights within +-64: no int16 saturation on any x86 CPU


# Which recipe each target gets, chosen by measurement. The CIFAR-10 ResNet-18 at 64 px,
# MinMax (moving average) on 500 calibration photos, compared with FP32 on 5,000 held-out
# dev photos. "AVX2" rows ran under qemu-x86_64 -cpu Haswell (AVX2, no VNNI) on 500 photos;
# the 7-bit model gave bit-identical logits there and on AVX512-VNNI.
#   recipe (uint8 activations)           int8 path     top-1 agreement  drop    cosine p1
#   int8 weights (8-bit)                 avx512-vnni   99.56%           -0.02   0.9979
#   int8 weights (8-bit)                 avx2          95.6% (500)      +3.0    0.836
#   int8 weights, 7-bit        <- cpu    any           99.44%           +0.04   0.9979
#   7-bit, stem conv in FP32             any           99.34%           +0.10   0.9980
#   7-bit, stem conv uint8 weights       any           99.26%           +0.12   0.9978
#   uint8 weights (u8 x u8 kernels)      any           99.52%           +0.08   0.9978
#   8-bit, stem conv in FP32 (overflow   avx512-vnni   99.52%           +0.08   0.9980
#     can remain in the other layers)
# 7-bit weights are the only recipe with no saturation by construction at the speed of the
# 8-bit one (uint8 weights ran 0.76x FP32 against 0.55x on AVX2): the cpu default.
# int8 activations let only 9 of 20 convs fuse into QLinearConv on x86, so uint8 it is.
# tensorrt: TensorRT takes only symmetric int8 (zero point 0).
TARGET_DEFAULTS: dict[Target, TargetDefaults] = {
    # any x86 CPU
    "cpu": TargetDefaults("uint8", "int8", per_channel=True, symmetric=False,
                          seven_bit_weights=True),
    # x86 CPUs with VNNI or AMX (machine.VNNI_PATHS)
    "cpu-vnni": TargetDefaults("uint8", "int8", per_channel=True, symmetric=False,
                               seven_bit_weights=False),
    # TensorRT on an NVIDIA GPU
    "tensorrt": TargetDefaults("int8", "int8", per_channel=True, symmetric=True,
                               seven_bit_weights=False),
}

@dataclass(frozen=True)
class QuantizeOptions:
    """What the user asked for; None means "the target's default"."""

    method: Method = "minmax"
    num_samples: int | None = DEFAULT_NUM_SAMPLES
    per_channel: bool | None = None
    activation_type: QuantType | None = None
    weight_type: QuantType | None = None
    reduce_range: bool = False
    target: Target = "cpu"
    exclude: tuple[str, ...] = ()
    eval_images: Path | None = None
    max_top1_drop: float | None = None
    max_fallback: int = 5
    strict: bool = False
    seed: int = 0
    batch_size: int = DEFAULT_BATCH
    progress: bool = False
    spec: PreprocessSpec | None = None
    calibrator_options: dict[str, Any] | None = None
    check: bool = True
    tolerances: ToleranceOverrides = ToleranceOverrides()  # on top of INT8's tolerance
    output_name: str | None = None  # the output to check, in models with several

    def __post_init__(self) -> None:
        for name, value, choices in (("--method", self.method, METHODS),
                                     ("--target", self.target, TARGETS),
                                     ("--activation-type", self.activation_type, QUANT_TYPES),
                                     ("--weight-type", self.weight_type, QUANT_TYPES)):
            if value is not None and value not in choices:
                raise UserError(f"{name} {value!r}: choose from {', '.join(choices)}")
        if self.max_top1_drop is not None and self.eval_images is None:
            raise UserError("--max-top1-drop needs --eval-images DIR, a labelled ImageFolder "
                            "(one subfolder per class) to measure top-1 on")
        if not self.check and (self.max_top1_drop is not None or self.eval_images is not None):
            raise UserError("--no-check skips the check that --eval-images and "
                            "--max-top1-drop feed; drop one or the other")

    def settings(self) -> QuantSettings:
        """Resolve the target's defaults against explicit choices."""
        target = TARGET_DEFAULTS[self.target]
        calibrator = dict(CALIBRATOR_OPTIONS[self.method])
        calibrator.update(self.calibrator_options or {})
        calibrator["symmetric"] = target.symmetric
        weight_type = self.weight_type or target.weight_type
        return QuantSettings(
            method=self.method, target=self.target,
            activation_type=self.activation_type or target.activation_type,
            weight_type=weight_type,
            per_channel=target.per_channel if self.per_channel is None else self.per_channel,
            reduce_range=self.reduce_range or (target.seven_bit_weights
                                               and weight_type == "int8"),
            activation_symmetric=target.symmetric,
            weight_symmetric=True if target.symmetric else None,
            calibrator=calibrator)


@dataclass(frozen=True)
class QuantSettings:
    """The settings actually used; stored in the INT8 model's metadata."""

    method: Method
    target: Target
    activation_type: QuantType
    weight_type: QuantType
    per_channel: bool
    reduce_range: bool  # 7-bit weights
    activation_symmetric: bool
    weight_symmetric: bool | None  # None: onnxruntime's default (symmetric for int8)
    calibrator: dict[str, Any]

    @property
    def eight_bit_weights(self) -> bool:
        """int8 weights over the full range: they saturate on CPUs without VNNI/AMX."""
        return self.weight_type == "int8" and not self.reduce_range

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


@dataclass(frozen=True)
class QuantizeResult:
    """Everything the CLI prints and writes to --json."""

    input: str
    output: str
    settings: QuantSettings
    num_calibration: int
    skipped: int
    calibration_sha256: str
    seconds: dict[str, float]
    fp32_bytes: int
    int8_bytes: int
    check: CheckResult | None
    check_note: str
    held_out: int = 0
    notes: tuple[str, ...] = ()
    accuracy: dict[str, Any] | None = None
    sensitivity: tuple[dict[str, Any], ...] = ()
    steps: tuple[FallbackStep, ...] = ()
    fallback_nodes: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()  # nodes kept in FP32 by --exclude
    target_met: bool | None = None
    layers: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> PyTorch module

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "settings": self.settings.to_dict(),
            "num_calibration": self.num_calibration, "skipped": self.skipped,
            "calibration_sha256": self.calibration_sha256, "seconds": self.seconds,
            "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes,
            "size_ratio": round(self.size_ratio, 4),
            "check": self.check.to_dict() if self.check is not None else None,
            "check_note": self.check_note, "held_out": self.held_out, "notes": list(self.notes),
            "accuracy": self.accuracy,
            "sensitivity": list(self.sensitivity), "steps": [s.to_dict() for s in self.steps],
            "fallback_nodes": list(self.fallback_nodes), "excluded": list(self.excluded),
            "target_met": self.target_met,
        }


def default_output(model: str | Path) -> Path:
    """resnet18.onnx -> resnet18.int8.onnx, beside the input."""
    return beside(model, "int8")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantization tools print progress to stdout and log what they recover
    from (a traceback included) at error level; both go to our debug log instead, and our
    own errors say what failed."""
    buffer = io.StringIO()
    ort_log = logging.getLogger("onnxruntime.quantization")
    held = logging.handlers.MemoryHandler(capacity=1 << 16, flushLevel=logging.CRITICAL + 1)
    propagate = ort_log.propagate
    ort_log.addHandler(held)
    ort_log.propagate = False
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        ort_log.removeHandler(held)
        ort_log.propagate = propagate
        said = [buffer.getvalue().strip(), *(r.getMessage() for r in held.buffer)]
        if any(said):
            log.debug("onnxruntime.quantization:\n%s", "\n".join(filter(None, said)))


def _ort_enums(settings: QuantSettings) -> tuple[Any, Any, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    return method, types[settings.activation_type], types[settings.weight_type]


def _op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


# QDQ with per-channel weight scales needs opset 13 (QuantizeLinear's axis attribute).
MIN_OPSET = 13


def _scrubbed(exc: BaseException, workdir: Path | None, shown_as: Path) -> str:
    """An exception's first line with any internal temp path replaced by the user's file."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if workdir is not None:
        text = re.sub(re.escape(str(workdir)) + r"/\S*", str(shown_as), text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def convert_opset(model: Path, output: Path) -> None:
    """A model made elsewhere below opset 13, converted with onnx's version converter."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(onnx.load(str(model)), MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise UserError(f"{model}: its opset is below {MIN_OPSET}, which INT8 QDQ needs, and "
                        f"onnx cannot convert it ({_scrubbed(exc, output.parent, model)}); "
                        f"export it again at opset {MIN_OPSET} or later") from None
    onnx.save(converted, str(output))


def preprocess_for_quantization(model: Path, output: Path, *, shown_as: Path | None = None,
                                ) -> None:
    """onnxruntime's quant_pre_process: shape inference and graph cleanup before QDQ.
    ``shown_as``: the user's file, named in errors in place of a temp copy."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    shown = shown_as or model
    try:
        with _quiet():
            quant_pre_process(str(model), str(output))
    except Exception as exc:
        raise UserError(f"{shown}: onnxruntime cannot prepare it for quantization "
                        f"({_scrubbed(exc, output.parent, shown)})") from None


def calibrate(model: Path, reader: ImageFolderReader, settings: QuantSettings,
              workdir: Path) -> Any:
    """Run the chosen calibrator over ``reader``; returns onnxruntime's TensorsData ranges."""
    from onnxruntime.quantization.calibrate import create_calibrator

    method, _, _ = _ort_enums(settings)
    with _quiet():
        calibrator = create_calibrator(model, _op_types(),
                                       augmented_model_path=str(workdir / "augmented.onnx"),
                                       calibrate_method=method,
                                       extra_options=settings.calibrator)
        if settings.method == "minmax":
            # One pass: with moving_average, compute_data averages the per-batch extremes.
            # (Separate passes would be merged by an EMA that the first batch dominates.)
            calibrator.collect_data(reader)
        else:
            # Histograms merge across passes; feeding one batch per pass bounds memory,
            # since the histogram calibrators hold every intermediate tensor of a pass.
            for feed in reader:
                calibrator.collect_data(_OneFeed(feed))
        return calibrator.compute_data()


class _OneFeed:
    """A reader that yields one feed dict, then None."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def quantize_with_ranges(model: Path, ranges_cache: Path, output: Path, settings: QuantSettings,
                         *, exclude: Sequence[str] = (), only: Sequence[str] = (),
                         shown_as: Path | None = None) -> None:
    """QDQ-quantize ``model`` with precomputed ranges (no calibration happens here);
    ``shown_as`` is the user's file, named in errors in place of the temp copies."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    method, activation_type, weight_type = _ort_enums(settings)
    # The logits stay float: quantizing the fc output clipped them at the calibration range
    # and rounded them to one step (0.025 on the CIFAR model), which tied the top two
    # classes on 14 of 5,000 dev photos. onnxruntime still fuses it into QGemm (float out).
    extra: dict[str, Any] = {"ActivationSymmetric": settings.activation_symmetric,
                             "OpTypesToExcludeOutputQuantization": ["Gemm"]}
    if settings.weight_symmetric is not None:
        extra["WeightSymmetric"] = settings.weight_symmetric
    try:
        with _quiet():
            quantize_static(str(model), str(output), calibration_data_reader=None,
                            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                            reduce_range=settings.reduce_range, activation_type=activation_type,
                            weight_type=weight_type, nodes_to_exclude=list(exclude),
                            nodes_to_quantize=list(only), calibrate_method=method,
                            extra_options=extra, calibration_cache_path=str(ranges_cache))
    except Exception as exc:
        shown = shown_as or model
        raise UserError(f"{shown}: onnxruntime could not quantize it "
                        f"({_scrubbed(exc, output.parent, shown)})") from None


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


def _eval_set(reader: ImageFolderReader, spec: PreprocessSpec, options: QuantizeOptions,
              file: ModelFile) -> _EvalSet:
    """The held-out images: --eval-images, else calibration photos calibration did not use.

    An --eval-images ImageFolder gives top-1 only when its folders map to the model's
    classes; otherwise --max-top1-drop is an error, and a plain check uses the photos alone.
    Photos that calibration also used (same content) are counted and warned about.
    """
    labelled: LabelledImages | None = None
    labels, classes = (file.meta.labels if file.meta else None), file.io.classes
    if options.eval_images is not None:
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
                               strict=options.strict, progress=options.progress,
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
    config = SessionConfig(simulate_int8=simulate)
    label = None if shown_as is None else f"the INT8 model quantized from {shown_as}"
    backend = OrtBackend(model, "cpu", config, label=label, output=output)
    return run_batched(backend, inputs, batch_size)


def sensitivity(pre: Path, cache: Path, settings: QuantSettings, candidates: Sequence[str],
                inputs: np.ndarray, reference: np.ndarray, workdir: Path, *,
                batch_size: int = DEFAULT_BATCH, progress: bool = False,
                op_types: dict[str, str] | None = None, simulate: bool = False,
                output: str | None = None) -> list[dict[str, Any]]:
    """Per-node sensitivity: the output error when only that node is quantized.

    Costs one quantize and one run per node (about a second each for ResNet-18 on two
    cores) and, unlike leave-one-out, does not depend on the order nodes are removed in.
    Sorted most sensitive first.
    """
    from tqdm import tqdm

    rows = []
    path = workdir / "single.onnx"
    for node in tqdm(candidates, desc="sensitivity", unit="node", disable=not progress,
                     leave=False):
        quantize_with_ranges(pre, cache, path, settings, only=[node])
        cmp = compare(reference, _run(path, inputs, batch_size, simulate=simulate,
                                      output=output))
        rows.append({"node": node, "op_type": (op_types or {}).get(node, "?"),
                     "error": round_sig(1.0 - cmp.cosine_mean),
                     "cosine_mean": round_sig(cmp.cosine_mean),
                     "max_abs_diff": round_sig(cmp.max_abs_diff),
                     "top1_agreement": round_sig(cmp.top1_agreement)})
    rows.sort(key=lambda r: (-r["error"], -r["max_abs_diff"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


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


def keep_sensitive_in_fp32(pre: Path, cache: Path, int8: Path, settings: QuantSettings,
                           options: QuantizeOptions, op_types: dict[str, str],
                           inputs: np.ndarray, targets: np.ndarray,
                           reference: np.ndarray, *, simulate: bool = False,
                           output: str | None = None) -> FallbackOutcome:
    """Measure INT8 top-1 on labelled images; while it misses --max-top1-drop, re-quantize
    ``int8`` with the next most sensitive node kept in FP32, up to --max-fallback nodes."""
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
    candidates = [n for n, t in op_types.items() if t in SENSITIVE_OPS and n not in options.exclude]
    chosen = seeded_subset(list(range(len(inputs))), SENSITIVITY_SAMPLES, options.seed)
    table = sensitivity(pre, cache, settings, candidates, inputs[chosen],
                        reference[chosen], int8.parent, batch_size=options.batch_size,
                        progress=options.progress, op_types=op_types, simulate=simulate,
                        output=output)
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


def _metadata(file: ModelFile, spec: PreprocessSpec) -> ModelMetadata:
    """The FP32 record (with the spec actually used), or a minimal one for a foreign model."""
    if file.meta is not None:
        return dataclasses.replace(file.meta, preprocess=spec)
    import onnxruntime

    return ModelMetadata(preprocess=spec, labels=None, weights={"source": "unknown"},
                         exporter="unknown", opset=file.opset,
                         versions={"onnxruntime": onnxruntime.__version__},
                         output={"name": file.io.output_name, "kind": "logits"})


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
class _Prepared:
    """The FP32 graph made ready for QDQ: where it is, its nodes and their layer names."""

    path: Path
    op_types: dict[str, str]
    names: dict[str, str]


def _prepare(model: Path, file: ModelFile, options: QuantizeOptions, workdir: Path,
             ) -> tuple[_Prepared, tuple[str, ...]]:
    """Shape inference and cleanup (a model below opset 13 is converted first), the layer
    names, and --exclude resolved to nodes."""
    import onnx

    create_session(model, "cpu")  # onnxruntime must run it: else say so, naming this file
    source = model
    if file.opset < MIN_OPSET:
        source = workdir / "opset13.onnx"
        convert_opset(model, source)
    pre = workdir / "pre.onnx"
    preprocess_for_quantization(source, pre, shown_as=model)
    proto = onnx.load(str(pre), load_external_data=False)
    op_types = {n.name: n.op_type for n in proto.graph.node}
    names = layers.for_model(proto, file.meta)
    excluded, unknown = layers.resolve(options.exclude, op_types, names)
    if unknown:
        convs = [n for n, t in op_types.items() if t in SENSITIVE_OPS]
        raise UserError(f"--exclude {unknown[0]}: no such node or PyTorch module in {model}; "
                        + layers.closest(unknown[0], convs, names, "Conv/Gemm layers"))
    return _Prepared(pre, op_types, names), tuple(excluded)


@dataclass(frozen=True)
class _Gate:
    """What the check against FP32 found (all None/empty with --no-check)."""

    check: CheckResult | None = None
    accuracy: dict[str, Any] | None = None
    fallback: FallbackOutcome = FallbackOutcome()
    held_out: int = 0
    notes: tuple[str, ...] = ()


# Below this many held-out photos, one disagreement moves top-1 agreement by over a point.
FEW_PHOTOS = 100


def _check(model: Path, file: ModelFile, prepared: _Prepared, cache: Path, int8: Path,
           reader: ImageFolderReader, spec: PreprocessSpec, settings: QuantSettings,
           options: QuantizeOptions) -> _Gate:
    """FP32 vs INT8 on held-out photos, judged by INT8's tolerance (with the overrides);
    with labels and --max-top1-drop, the accuracy-aware fallback."""
    cpu_note = simulated_check(settings)
    simulate = cpu_note is not None
    evalset = _eval_set(reader, spec, options, file)
    notes = [n for n in (cpu_note, evalset.note) if n]
    held_out = len(evalset.inputs)
    if held_out < FEW_PHOTOS:
        notes.append(f"the verdict rests on few photos: {held_out} held out (under "
                     f"{FEW_PHOTOS}), so one disagreement moves top-1 agreement by "
                     f"{100 / held_out:.2f} points; check on more photos for a firmer one")
    output = file.io.output_name
    reference = _run(model, evalset.inputs, options.batch_size, output=output)
    logits = _run(int8, evalset.inputs, options.batch_size, output=output, simulate=simulate,
                  shown_as=model)
    fallback, accuracy = FallbackOutcome(), None
    if evalset.targets is not None:
        fallback = keep_sensitive_in_fp32(prepared.path, cache, int8, settings, options,
                                          prepared.op_types, evalset.inputs, evalset.targets,
                                          reference, simulate=simulate, output=output)
        assert fallback.logits is not None  # it measured at least the plain model
        logits = fallback.logits
        accuracy = fallback.accuracy(reference, evalset.targets, options.max_top1_drop)
    check = CheckResult.judge(f"FP32 vs INT8 on {evalset.source}", reference, logits,
                              options.tolerances.for_precision("int8"))
    return _Gate(check, accuracy, fallback, held_out, tuple(notes))


def _quantization_record(model: Path, reader: ImageFolderReader, settings: QuantSettings,
                         options: QuantizeOptions, gate: _Gate, peak: int | None,
                         ) -> dict[str, Any]:
    """What the INT8 model's metadata says of how it was made and checked."""
    import onnxruntime

    check = gate.check
    return {
        **settings.to_dict(), "format": "QDQ", "num_samples": len(reader.used),
        "calibration_sha256": reader.file_list_sha256(),
        "fp32_sha256": file_sha256(model), "fp32_model": model.name,
        "excluded": list(options.exclude), "fallback": list(gate.fallback.nodes),
        "int8_weight_peak": peak, "onnxruntime": onnxruntime.__version__,
        "check": (None if check is None else
                  {"passed": check.passed, "n": check.comparison.n,
                   "top1_agreement": round_sig(check.comparison.top1_agreement),
                   "cosine_p1": round_sig(check.comparison.cosine_p1),
                   "int8_path": cpu_info()["int8_path"]}),
    }


def _refuse_if_failed(result: QuantizeResult, options: QuantizeOptions) -> None:
    """CheckFailed (exit 1, nothing written) for a missed accuracy target or check."""
    check, output = result.check, result.output
    if result.target_met is False:
        raise CheckFailed(
            f"INT8 top-1 drops {result.steps[-1].drop_pt:.2f} pt (> --max-top1-drop "
            f"{options.max_top1_drop:g}) with {len(result.fallback_nodes)} node(s) kept in "
            f"FP32 (--max-fallback {options.max_fallback}); {output} was not written",
            report=result)
    if check is not None and not check:
        n = check.comparison.n
        raise CheckFailed(
            f"INT8 check on {n} held-out images: {check.reason} ({check.tolerance.describe()}); "
            f"{output} was not written"
            + (f"; the verdict rests on few photos (under {FEW_PHOTOS})" if n < FEW_PHOTOS
               else ""), report=result)


def quantize(model: str | Path, calibration: str | Path, output: str | Path | None = None, *,
             options: QuantizeOptions = QuantizeOptions()) -> QuantizeResult:
    """Quantize ``model`` to a QDQ INT8 file and check it against FP32 on held-out images.

    Four phases: prepare the graph, calibrate and quantize, check against FP32, publish.
    The output appears only when everything passed. A check that misses the INT8 tolerances
    (``metrics.TOLERANCES["int8"]``, with ``options.tolerances``) or a missed
    --max-top1-drop target raises CheckFailed (exit 1) carrying the full report, and writes
    nothing.
    """
    import onnx

    model = Path(model)
    output = Path(output) if output is not None else default_output(model)
    if output.resolve() == model.resolve():
        raise UserError(f"{output}: the output would overwrite the FP32 input; choose another -o")
    file = ModelFile.read(model, options.output_name)
    if file.precision != "fp32":
        raise UserError(f"{model}: is already {file.precision.upper()}; pass the FP32 model it "
                        "was made from (quantizing from FP16 or INT8 would compound the rounding)")
    spec = file.spec(options.spec)
    settings = options.settings()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rd-quant-") as tmp, \
            atomic_output(output, suffix=".onnx") as out_tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        prepared, excluded = _prepare(model, file, options, workdir)
        options = dataclasses.replace(options, exclude=excluded)
        reader = ImageFolderReader.for_model(
            model, calibration, num_samples=options.num_samples, seed=options.seed,
            batch_size=options.batch_size, strict=options.strict, progress=options.progress,
            spec=spec, file=file, hold_out=options.check and options.eval_images is None)
        ranges = calibrate(prepared.path, reader, settings, workdir)
        seconds["calibrate"] = time.perf_counter() - start
        from onnxruntime.quantization.calibrate import save_tensors_data

        cache = workdir / "ranges.json"
        save_tensors_data(ranges, cache)
        start = time.perf_counter()
        int8 = workdir / "int8.onnx"
        quantize_with_ranges(prepared.path, cache, int8, settings, exclude=options.exclude,
                             shown_as=model)
        seconds["quantize"] = time.perf_counter() - start
        gate = _Gate()
        if options.check:
            start = time.perf_counter()
            gate = _check(model, file, prepared, cache, int8, reader, spec, settings, options)
            seconds["check"] = time.perf_counter() - start

        quantized = onnx.load(str(int8))
        record = _metadata(file, spec)
        if layers.METADATA_KEY not in record.extra:  # a foreign model: name its nodes now
            record = dataclasses.replace(record, extra={**record.extra,
                                                        layers.METADATA_KEY: prepared.names})
        quantization = _quantization_record(model, reader, settings, options, gate,
                                            int8_weight_peak(quantized))
        write_metadata(quantized, dataclasses.replace(record, quantization=quantization))
        onnx.save(quantized, str(out_tmp))
        result = QuantizeResult(
            input=str(model), output=str(output), settings=settings,
            num_calibration=len(reader.used), skipped=len(reader.skipped),
            calibration_sha256=quantization["calibration_sha256"],
            seconds={k: round(v, 3) for k, v in seconds.items()},
            fp32_bytes=model.stat().st_size, int8_bytes=out_tmp.stat().st_size,
            check=gate.check,
            check_note="" if options.check else
            "skipped (--no-check): the INT8 model was not compared with FP32",
            held_out=gate.held_out, notes=gate.notes, accuracy=gate.accuracy,
            sensitivity=tuple({**row, "module": prepared.names.get(row["node"])}
                              for row in gate.fallback.table),
            steps=tuple(gate.fallback.steps), fallback_nodes=tuple(gate.fallback.nodes),
            target_met=gate.fallback.met, layers=prepared.names, excluded=options.exclude)
        _refuse_if_failed(result, options)
    return result
