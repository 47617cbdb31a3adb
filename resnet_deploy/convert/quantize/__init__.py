"""FP32 ONNX -> INT8 (QDQ) with onnxruntime, honest calibrators and a built-in check.

onnxruntime's ``quantize_static`` hands its calibrator only a few options, so Entropy runs
with 128 bins into 128 quantized bins, which leaves a single candidate threshold: the full
range, i.e. MinMax under another name. Here the calibrator is driven directly with the
options each method needs, its ranges are saved as onnxruntime's calibration cache, and
``quantize_static`` quantizes with exactly those ranges (``calibration_cache_path``). The
same cache makes the accuracy-aware fallback cheap: re-quantizing with a node kept in FP32
does not calibrate again.

The work goes in four steps, one module each: :mod:`.prepare` (the graph made ready, layer
names), :mod:`.calibrate` (the ranges, the QDQ graph), :mod:`.check` (FP32 against INT8,
the fallback) and :mod:`.publish` (the metadata, the file, the verdict); :mod:`.recipe`
holds what each target gets.
"""

from .publish import QuantizeResult, default_output, quantize
from .recipe import QuantizeOptions, QuantSettings

__all__ = ["QuantSettings", "QuantizeOptions", "QuantizeResult", "default_output", "quantize"]
