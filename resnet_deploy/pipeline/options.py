"""What a pipeline run depends on (:class:`PipelineOptions`) and what its steps share
while it runs (:class:`Run`): the output folder, the hashes, the records, the torch model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.choices import Exporter, Method, Target
from ..core.errors import UserError
from ..core.metrics import ToleranceOverrides
from ..data.spec import PreprocessSpec
from ..serving.triton import TritonOptions
from .manifest import Hashes, StepRecord

DEFAULT_NAME = "resnet18"


PRODUCERS = {"fp32": "export", "int8": "quantize", "fp16": "fp16"}


GPU_PROVIDERS = ("cuda", "tensorrt")


@dataclass(frozen=True)
class PipelineOptions:
    """Everything a run depends on besides its input files."""

    weights: str = "imagenet"
    arch: str | None = None  # None: read from the checkpoint (resnet18 for imagenet/random)
    features: bool = False  # export the pooled embedding instead of the class scores
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
            return self.arch or DEFAULT_NAME
        return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(self.weights).stem).strip("_") \
            or DEFAULT_NAME

    def file(self, precision: str) -> str:
        """The model file of each precision: ``ft.onnx``, ``ft.int8.onnx``, ``ft.fp16.onnx``."""
        return f"{self.model_name}{'' if precision == 'fp32' else '.' + precision}.onnx"

    @property
    def precisions(self) -> list[str]:
        """The models this run makes: FP32 and INT8, and FP16 for a GPU provider."""
        return ["fp32", "int8"] + (["fp16"] if self.gpu else [])


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

    def model_paths(self) -> list[Path]:
        return [self.model_path(p) for p in self.options.precisions]

    def artifact(self, name: str, step: str) -> dict[str, Any]:
        path = self.out / name
        if not path.is_file():
            raise UserError(f"{path}: missing although step {step} finished; rerun with `force`")
        return {"kind": "artifact", "path": name, "step": step, "sha256": self.hashes.file(path)}

    def model_input(self, precision: str) -> dict[str, Any]:
        return self.artifact(self.options.file(precision), PRODUCERS[precision])

    def models_input(self) -> dict[str, Any]:
        return {self.options.file(p): self.model_input(p) for p in self.options.precisions}

    def weights_input(self) -> dict[str, Any]:
        weights = self.options.weights
        if weights in ("random", "imagenet"):
            return {"kind": "value", "value": weights}
        return self.hashes.file_input(Path(weights))

    def step_input(self, step: str) -> dict[str, Any]:
        return {"kind": "step", "step": step, "sha256": self.records[step].digest()}

    def images(self) -> Path:
        """Parity's photos: the labelled set when given (calibration never saw it)."""
        return self.options.eval_images or self.options.calibration

    def torch_model(self) -> tuple[Any, Any]:
        """The PyTorch model of the run's weights (built once per run)."""
        if self._torch is None:
            from ..weights.checkpoints import load_model

            o = self.options
            self._torch = load_model(o.weights, arch=o.arch, num_classes=o.num_classes,
                                     seed=o.seed, features=o.features)
        return self._torch
