"""What an INT8 model is made with: the targets' defaults, the calibrators'
options, and the user's choices resolved against them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.choices import METHODS, QUANT_TYPES, TARGETS, Method, QuantType, Target
from ...core.errors import UserError
from ...core.metrics import ToleranceOverrides
from ...data.spec import PreprocessSpec

DEFAULT_NUM_SAMPLES = 256

# Calibration feeds batches: one ORT run per 32 images instead of per image. The batch size
# is part of the calibration recipe, since moving-average MinMax averages per-batch extremes.
DEFAULT_BATCH = 32

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
    spec: PreprocessSpec | None = None
    calibrator_options: dict[str, Any] | None = None
    check: bool = True
    tolerances: ToleranceOverrides = ToleranceOverrides()  # on top of INT8's tolerance
    output_name: str | None = None  # the output to check, in models with several

    def __post_init__(self) -> None:
        for name, value, choices in (("`method`", self.method, METHODS),
                                     ("`target`", self.target, TARGETS),
                                     ("`activation_type`", self.activation_type, QUANT_TYPES),
                                     ("`weight_type`", self.weight_type, QUANT_TYPES)):
            if value is not None and value not in choices:
                raise UserError(f"{name} {value!r}: choose from {', '.join(choices)}")
        if self.max_top1_drop is not None and self.eval_images is None:
            raise UserError("`max_top1_drop` needs `eval_images` DIR, a labelled ImageFolder "
                            "(one subfolder per class) to measure top-1 on")
        if not self.check and (self.max_top1_drop is not None or self.eval_images is not None):
            raise UserError("`check` skips the check that `eval_images` and "
                            "`max_top1_drop` feed; drop one or the other")

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
