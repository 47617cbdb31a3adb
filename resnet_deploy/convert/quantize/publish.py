"""``quantize``: prepare, calibrate, check, publish, in that order.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...artifact import layers
from ...artifact.metadata import ModelMetadata, write_metadata
from ...artifact.model_file import ModelFile, int8_weight_peak
from ...core.errors import CheckFailed, UserError
from ...core.files import atomic_output, beside, file_sha256
from ...core.machine import cpu_info
from ...core.metrics import CheckResult, round_sig
from ...core.progress import Progress
from ...data.spec import PreprocessSpec
from .calibrate import ImageFolderReader, calibrate, quantize_with_ranges
from .check import FEW_PHOTOS, Candidate, FallbackStep, Gate, check_against_fp32
from .prepare import prepare
from .recipe import QuantizeOptions, QuantSettings


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
    error_budget: tuple[dict[str, Any], ...] = ()  # the fallback's ranking
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
            "error_budget": list(self.error_budget), "steps": [s.to_dict() for s in self.steps],
            "fallback_nodes": list(self.fallback_nodes), "excluded": list(self.excluded),
            "target_met": self.target_met,
        }


def default_output(model: str | Path) -> Path:
    """resnet18.onnx -> resnet18.int8.onnx, beside the input."""
    return beside(model, "int8")


def _metadata(file: ModelFile, spec: PreprocessSpec) -> ModelMetadata:
    """The FP32 record (with the spec actually used), or a minimal one for a foreign model."""
    if file.meta is not None:
        return dataclasses.replace(file.meta, preprocess=spec)
    import onnxruntime

    return ModelMetadata(preprocess=spec, labels=None, weights={"source": "unknown"},
                         exporter="unknown", opset=file.opset,
                         versions={"onnxruntime": onnxruntime.__version__},
                         output={"name": file.io.output_name, "kind": "logits"})


def _quantization_record(model: Path, reader: ImageFolderReader, settings: QuantSettings,
                         options: QuantizeOptions, gate: Gate, peak: int | None,
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
            f"INT8 top-1 drops {result.steps[-1].drop_pt:.2f} pt (> `max_top1_drop` "
            f"{options.max_top1_drop:g}) with {len(result.fallback_nodes)} node(s) kept in "
            f"FP32 (`max_fallback` {options.max_fallback}); {output} was not written",
            report=result)
    if check is not None and not check:
        n = check.comparison.n
        raise CheckFailed(
            f"INT8 check on {n} held-out images: {check.reason} ({check.tolerance.describe()}); "
            f"{output} was not written"
            + (f"; the verdict rests on few photos (under {FEW_PHOTOS})" if n < FEW_PHOTOS
               else ""), report=result)


def quantize(model: str | Path, calibration: str | Path, output: str | Path | None = None, *,
             options: QuantizeOptions = QuantizeOptions(),
             progress: Progress | None = None) -> QuantizeResult:
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
        prepared, excluded = prepare(model, file, options, workdir)
        options = dataclasses.replace(options, exclude=excluded)
        reader = ImageFolderReader.for_model(
            model, calibration, num_samples=options.num_samples, seed=options.seed,
            batch_size=options.batch_size, strict=options.strict, progress=progress,
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
        gate = Gate()
        if options.check:
            start = time.perf_counter()
            gate = check_against_fp32(Candidate(model, file, spec, settings, options, prepared,
                                                cache, int8, reader, progress))
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
            "skipped (`check`): the INT8 model was not compared with FP32",
            held_out=gate.held_out, notes=gate.notes, accuracy=gate.accuracy,
            error_budget=tuple({**row, "module": prepared.names.get(row["node"])}
                              for row in gate.fallback.table),
            steps=tuple(gate.fallback.steps), fallback_nodes=tuple(gate.fallback.nodes),
            target_met=gate.fallback.met, layers=prepared.names, excluded=options.exclude)
        _refuse_if_failed(result, options)
    return result
