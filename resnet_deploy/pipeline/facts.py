"""What each pipeline step found, as typed records: written to the manifest as JSON, read
back from it (a step that is up to date reports its earlier facts), and used by the
summary, the report and the CLI through their attributes, never through dict keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self


@dataclass(frozen=True)
class Facts:
    """A step's results. ``from_dict`` takes a manifest's record leniently (a manifest from
    an older version may lack a field: it gets its default), and nested facts come back
    typed."""

    step: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            values[f.name] = _typed(hints[f.name], data[f.name])
        return cls(**values)


def _typed(hint: Any, value: Any) -> Any:
    """``value`` from JSON as ``hint`` says: nested facts, tuples of facts."""
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        (inner, *_rest) = typing.get_args(hint)
        return tuple(_typed(inner, v) for v in value)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _typed(options[0], value) if value is not None and len(options) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Facts) and isinstance(value, dict):
        return hint.from_dict(value)
    return value


@dataclass(frozen=True)
class ExportFacts(Facts):
    step: ClassVar[str] = "export"
    parity_passed: bool = False
    max_abs_diff: float = 0.0
    nodes: int = 0
    weights: str = ""  # in words: the source, its hash, or the random-init warning
    checkpoint: str = ""  # the file's name, or "random" / "imagenet"
    sha256: str | None = None
    untrained: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    preprocess_sources: dict[str, str] = field(default_factory=dict)
    labels: str = ""  # where the class names came from, in words


@dataclass(frozen=True)
class QuantizeFacts(Facts):
    step: ClassVar[str] = "quantize"
    target: str = ""
    method: str = ""
    num_calibration: int = 0
    held_out: int = 0
    check_passed: bool | None = None
    top1_agreement: float | None = None
    cosine_p1: float | None = None
    needed: dict[str, float] = field(default_factory=dict)  # what would have passed
    tolerance: str | None = None
    notes: tuple[str, ...] = ()
    size_ratio: float = 0.0


@dataclass(frozen=True)
class Fp16Facts(Facts):
    step: ClassVar[str] = "fp16"
    check_passed: bool = False
    cosine_min: float = 0.0


@dataclass(frozen=True)
class BackendFacts(Facts):
    backend: str = ""
    precision: str = ""
    passed: bool | None = None
    tolerance: str = ""
    judged_on: dict[str, float] = field(default_factory=dict)  # the figures verdicts rest on
    cosine_min: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True)
class ParityFacts(Facts):
    step: ClassVar[str] = "parity"
    passed: bool = False
    inputs: str = ""
    backends: tuple[BackendFacts, ...] = ()


@dataclass(frozen=True)
class AccuracyFacts(Facts):
    model: str = ""
    precision: str = ""
    provider: str = ""
    n: int = 0
    top1: float = 0.0
    top5: float = 0.0
    label_mapping: str = ""
    classes: int = 0
    near_chance: bool = False
    top1_agreement: float | None = None
    top1_drop_pt: float | None = None


@dataclass(frozen=True)
class EvaluateFacts(Facts):
    step: ClassVar[str] = "evaluate"
    images: int = 0
    classes: int = 0
    models: tuple[AccuracyFacts, ...] = ()


@dataclass(frozen=True)
class LatencyFacts(Facts):
    model: str = ""
    provider: str = ""
    precision: str = ""
    batch_size: int = 0
    p10_ms: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    throughput_ips: float = 0.0


@dataclass(frozen=True)
class BenchFacts(Facts):
    step: ClassVar[str] = "bench"
    rows: tuple[LatencyFacts, ...] = ()
    busy: str | None = None  # the busy-machine warning, when a row's spread called for it


@dataclass(frozen=True)
class ReportFacts(Facts):
    step: ClassVar[str] = "report"
    plot: bool = False


@dataclass(frozen=True)
class TritonFacts(Facts):
    step: ClassVar[str] = "triton"
    models: tuple[dict[str, Any], ...] = ()  # serving.repository.PackagedModel records


@dataclass(frozen=True)
class ServeFacts(Facts):
    """The served repository's verdict: every endpoint against parity's saved outputs
    (``passed`` None and ``skipped`` the reason when the serve extra is missing)."""

    step: ClassVar[str] = "serve"
    passed: bool | None = None
    skipped: str | None = None
    triton: str | None = None
    onnxruntime_backend: str | None = None
    images: int = 0
    checks: tuple[dict[str, Any], ...] = ()  # serving.proof.EndpointProof records


FACTS: dict[str, type[Facts]] = {cls.step: cls for cls in (
    ExportFacts, QuantizeFacts, Fp16Facts, ParityFacts, EvaluateFacts, BenchFacts, ReportFacts,
    TritonFacts, ServeFacts)}
