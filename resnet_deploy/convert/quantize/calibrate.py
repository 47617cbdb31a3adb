"""Preparing, calibrating and QDQ-quantizing a graph with onnxruntime's tools.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...artifact.model_file import ModelFile
from ...core.errors import UserError
from ...core.progress import Counter, Progress
from ...data.folders import list_hash, warn_skipped
from ...data.images import list_images, load_batch, seeded_subset
from ...data.spec import PreprocessSpec
from ...runtime.runners import fill_batch
from .prepare import quiet_ort, scrubbed
from .recipe import DEFAULT_BATCH, DEFAULT_NUM_SAMPLES, QuantSettings

log = logging.getLogger(__name__)

# When calibration would use every photo in the folder, a seeded share is held back so the
# INT8 model can be checked on photos calibration never saw: 20%, at least this many.
HELD_OUT_SHARE = 0.2

MIN_HELD_OUT = 8


class ImageFolderReader:
    """onnxruntime's CalibrationDataReader protocol over a folder of photos.

    ``get_next()`` returns one feed dict (a batch of preprocessed images) per call, then
    None. Duck-typed rather than subclassed so importing this module does not load
    onnxruntime; the calibrators only call ``get_next``. Build one with :meth:`for_model`.
    """

    def __init__(self, paths: Sequence[Path], spec: PreprocessSpec, input_name: str, *,
                 root: Path, batch_size: int = DEFAULT_BATCH, fixed_batch: bool = False,
                 strict: bool = False, progress: Progress | None = None,
                 held_out: Sequence[Path] = ()) -> None:
        if not paths:
            raise UserError(f"{root}: no images to calibrate with")
        self.paths = list(paths)
        self.spec = spec
        self.input_name = input_name
        self.root = root
        self.batch_size = batch_size
        self.fixed_batch = fixed_batch
        self.strict = strict
        self.progress = progress
        self.held_out = list(held_out)
        self.used: list[Path] = []
        self.skipped: list[Path] = []
        self._next = 0
        self._counter: Counter | None = None
        self._warned = False

    @classmethod
    def for_model(cls, model: str | Path, folder: str | Path, *,
                  num_samples: int | None = DEFAULT_NUM_SAMPLES, seed: int = 0,
                  batch_size: int = DEFAULT_BATCH, strict: bool = False,
                  progress: Progress | None = None, spec: PreprocessSpec | None = None,
                  file: ModelFile | None = None,
                  hold_out: bool = False) -> ImageFolderReader:
        """A reader preprocessing the way ``model``'s metadata says (``spec`` overrides).

        A folder with more than ``num_samples`` images gives a seeded random subset; the
        rest are in :attr:`held_out` for checking the quantized model. With ``hold_out``,
        a folder that calibration would use whole keeps back :data:`HELD_OUT_SHARE` of it
        (at least :data:`MIN_HELD_OUT` images) instead. ``file`` is the already-opened
        model, when the caller has it, so the file is not parsed twice.
        """
        file = file if file is not None else ModelFile.read(model)
        spec = file.spec(spec)
        input_name, fixed = file.io.input_name, file.io.batch
        root = Path(folder)
        everything = list_images(root)
        if not everything:
            raise UserError(f"{root}: no images (of any format Pillow reads) in this "
                            "folder or below it; point `calibration` at a folder of photos")
        chosen = seeded_subset(everything, num_samples, seed)
        if hold_out and len(chosen) == len(everything):
            held = max(MIN_HELD_OUT, math.ceil(HELD_OUT_SHARE * len(everything)))
            if held >= len(everything):
                raise UserError(
                    f"{root}: {len(everything)} images are too few both to calibrate and to "
                    f"check the INT8 model on {MIN_HELD_OUT} held-out ones; add photos (at "
                    f"least {MIN_HELD_OUT + 1}), pass `eval_images` DIR, or skip the check "
                    "with `check`")
            chosen = seeded_subset(everything, len(everything) - held, seed)
        chosen_set = set(chosen)
        return cls(chosen, spec, input_name, root=root, batch_size=fixed or batch_size,
                   fixed_batch=fixed is not None, strict=strict, progress=progress,
                   held_out=[p for p in everything if p not in chosen_set])

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._counter is None:
            self._counter = Counter(self.progress, "calibrating", len(self.paths), "images")
        while self._next < len(self.paths):
            chunk = self.paths[self._next:self._next + self.batch_size]
            self._next += len(chunk)
            batch, ok, bad = load_batch(chunk, self.spec, strict=self.strict)
            self.used += ok
            self.skipped += bad
            self._counter.update(len(chunk))
            if not ok:
                continue
            if self.fixed_batch:
                batch = fill_batch(batch, self.batch_size)
            return {self.input_name: batch}
        self._finish()
        return None

    def _finish(self) -> None:
        if not self.used:
            raise UserError(f"{self.root}: none of the {len(self.paths)} images could be read; "
                            "point `calibration` at a folder of valid photos")
        if not self._warned:
            self._warned = True
            warn_skipped(self.skipped, len(self.paths), "calibration images")

    def __iter__(self) -> ImageFolderReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def file_list_sha256(self) -> str:
        """Identifies the photos that calibrated (after skipping unreadable ones)."""
        return list_hash(self.used, self.root)


def _ort_enums(settings: QuantSettings) -> tuple[Any, Any, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    return method, types[settings.activation_type], types[settings.weight_type]


def _op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def calibrate(model: Path, reader: ImageFolderReader, settings: QuantSettings,
              workdir: Path) -> Any:
    """Run the chosen calibrator over ``reader``; returns onnxruntime's TensorsData ranges."""
    from onnxruntime.quantization.calibrate import create_calibrator

    method, _, _ = _ort_enums(settings)
    with quiet_ort():
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
        with quiet_ort():
            quantize_static(str(model), str(output), calibration_data_reader=None,
                            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                            reduce_range=settings.reduce_range, activation_type=activation_type,
                            weight_type=weight_type, nodes_to_exclude=list(exclude),
                            nodes_to_quantize=list(only), calibrate_method=method,
                            extra_options=extra, calibration_cache_path=str(ranges_cache))
    except Exception as exc:
        shown = shown_as or model
        raise UserError(f"{shown}: onnxruntime could not quantize it "
                        f"({scrubbed(exc, output.parent, shown)})") from None
