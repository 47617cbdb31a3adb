"""Parity: run every backend on the same inputs and judge each against one reference.

The reference is PyTorch eager when weights are given, else the first model on ORT CPU, or
golden logits saved earlier (``--load-outputs``), which needs no PyTorch at all. Each
candidate is judged by the tolerance of its own precision (read from the model), and a
backend that cannot run is an error unless the caller asked to skip it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from .errors import CheckFailed, ProviderUnavailable, UserError
from .files import atomic_output
from .metrics import TOLERANCES, Comparison, Tolerance, compare
from .preprocess import PreprocessSpec, image_inputs, random_inputs, resolve_spec
from .runtime import (ModelFile, OrtBackend, TorchBackend, provider_name,
                      run_batched, short_provider, torch_devices)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToleranceOverrides:
    """CLI overrides applied on top of each backend's precision-based tolerance."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

    def apply(self, base: Tolerance) -> Tolerance:
        return base.override(atol=self.atol, rtol=self.rtol, min_cosine=self.min_cosine,
                             min_top1=self.min_top1)


@dataclass(frozen=True)
class BackendResult:
    backend: str
    model: str | None
    provider: str
    precision: str
    tolerance: str
    comparison: Comparison | None = None
    failures: tuple[str, ...] = ()
    skipped: str | None = None

    @property
    def passed(self) -> bool | None:
        return None if self.skipped else not self.failures

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"backend": self.backend, "model": self.model,
                                "provider": self.provider, "precision": self.precision,
                                "tolerance": self.tolerance}
        if self.comparison is not None:
            data.update(self.comparison.to_dict())
        data.update(failures=list(self.failures), skipped=self.skipped, passed=self.passed)
        return data


@dataclass
class ParityReport:
    reference: str
    inputs: dict[str, Any]
    results: list[BackendResult] = field(default_factory=list)

    @property
    def measured(self) -> list[BackendResult]:
        return [r for r in self.results if r.skipped is None]

    @property
    def passed(self) -> bool:
        """True only when something was measured and nothing failed: skips prove nothing."""
        return bool(self.measured) and all(r.passed for r in self.measured)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "inputs": self.inputs,
                "results": [r.to_dict() for r in self.results], "passed": self.passed}


@dataclass(frozen=True)
class ParityOptions:
    providers: tuple[str, ...] = ("cpu",)
    reference: str | None = None  # "torch" or "MODEL@PROVIDER"; default: torch if weights
    batch_size: int = 8
    tolerances: ToleranceOverrides = ToleranceOverrides()
    skip_unavailable: bool = False


@dataclass(frozen=True)
class Inputs:
    """The batch every backend sees, and how it was made (for reports and golden files)."""

    batch: np.ndarray
    description: str
    names: tuple[str, ...]

    def hashes(self) -> list[str]:
        return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
                for x in self.batch]


def make_inputs(spec: PreprocessSpec, *, images: Path | None, random_count: int | None,
                limit: int | None = None, seed: int = 0) -> Inputs:
    if random_count is not None:
        return Inputs(random_inputs(spec, random_count, seed), f"{random_count} seeded random",
                      tuple(f"random-{i}" for i in range(random_count)))
    if images is None:
        raise UserError("give --images DIR or --random N")
    batch, used = image_inputs(images, spec, limit, seed)
    return Inputs(batch, f"{len(used)} images from {images}",
                  tuple(str(p.relative_to(images)) for p in used))


def model_spec(models: Sequence[ModelFile], override: PreprocessSpec | None) -> PreprocessSpec:
    """The preprocessing all models share; differing specs would make parity meaningless."""
    specs = {m.path: resolve_spec(m.meta, override, m.path) for m in models}
    first = next(iter(specs.values()))
    for path, spec in specs.items():
        if spec != first:
            raise UserError(f"{path}: its preprocessing {spec} differs from {models[0].path}'s; "
                            "compare models exported with the same input size and normalisation")
    return first


def save_outputs(path: Path, reference: str, inputs: Inputs, logits: np.ndarray) -> None:
    """Golden outputs: reference logits plus input hashes, so another machine can compare."""
    with atomic_output(Path(path), suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, logits=logits, input_sha256=np.array(inputs.hashes()),
                     input_names=np.array(inputs.names), reference=np.array(reference),
                     description=np.array(inputs.description))


def load_outputs(path: Path, inputs: Inputs) -> tuple[str, np.ndarray]:
    """Golden logits from ``path``, after checking they were made from these same inputs."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such golden-outputs file; make one with --save-outputs")
    try:
        with np.load(path, allow_pickle=False) as data:
            logits, hashes = data["logits"], [str(h) for h in data["input_sha256"]]
            reference = str(data["reference"])
    except Exception as exc:
        raise UserError(f"{path}: not a golden-outputs .npz ({type(exc).__name__}); "
                        "make one with --save-outputs") from None
    mine = inputs.hashes()
    if len(hashes) != len(mine):
        raise UserError(f"{path}: holds outputs for {len(hashes)} inputs but {len(mine)} were "
                        "given; use the same --images/--random as when it was saved")
    differing = sum(a != b for a, b in zip(hashes, mine))
    if differing:
        raise UserError(f"{path}: {differing} of {len(mine)} inputs differ from those the golden "
                        "outputs were made from (other images or another preprocessing); use "
                        "the same images and model metadata as when it was saved")
    return f"{reference} (golden outputs from {path})", logits


def _tolerance(precision: str, overrides: ToleranceOverrides) -> Tolerance:
    return overrides.apply(TOLERANCES[precision])


def _judge(backend: str, model: str | None, provider: str, precision: str,
           reference: np.ndarray, outputs: np.ndarray, overrides: ToleranceOverrides
           ) -> BackendResult:
    if outputs.shape != reference.shape:
        raise UserError(f"{backend}: outputs have shape {outputs.shape} but the reference has "
                        f"{reference.shape}; the weights and the model disagree on classes")
    tolerance = _tolerance(precision, overrides)
    cmp = compare(reference, outputs)
    return BackendResult(backend, model, provider, precision, tolerance.describe(), cmp,
                         tuple(tolerance.failures(cmp)))


def run_parity(models: Sequence[ModelFile], *, inputs: Inputs, weights_model: Any | None = None,
               options: ParityOptions = ParityOptions(),
               golden: tuple[str, np.ndarray] | None = None) -> tuple[ParityReport, np.ndarray]:
    """Compare every backend with the reference; returns the report and reference logits.

    ``weights_model`` is a loaded torch module (from ``--weights``); ``golden`` is a
    (name, logits) pair from :func:`load_outputs` that replaces running a reference.
    """
    providers = [short_provider(provider_name(p)) for p in options.providers]
    reference_name = options.reference or ("torch" if weights_model is not None else None)
    if reference_name is None:
        if not models:
            raise UserError("nothing to compare: give --model and/or --weights")
        reference_name = f"{models[0].path}@cpu"
    ran: set[str] = set()
    if golden is not None:
        reference_name, reference = golden
    elif reference_name == "torch":
        if weights_model is None:
            raise UserError("--reference torch needs --weights")
        reference = TorchBackend(weights_model).infer(inputs.batch)
        ran.add("torch@cpu")
    else:
        model, _, provider = reference_name.rpartition("@")
        if not model:
            raise UserError(f"--reference {reference_name!r}: use torch or MODEL@PROVIDER")
        reference = run_batched(OrtBackend(Path(model), provider), inputs.batch,
                                options.batch_size)
        ran.add(f"{Path(model)}@{short_provider(provider_name(provider))}")
    report = ParityReport(reference_name, {"description": inputs.description,
                                           "count": len(inputs.batch)})
    if weights_model is not None:
        for device in torch_devices():
            if f"torch@{device}" in ran:
                continue
            outputs = TorchBackend(weights_model, device).infer(inputs.batch)
            report.results.append(_judge(f"torch@{device}", None, f"torch-{device}", "fp32",
                                         reference, outputs, options.tolerances))
    for model_file in models:
        model, precision = model_file.path, model_file.precision
        for provider in providers:
            name = f"{model}@{provider}"
            if name in ran:
                continue
            model_file.warn_if_wrong_cpu(provider)
            try:
                backend = OrtBackend(model, provider)
            except ProviderUnavailable as exc:
                if not options.skip_unavailable:
                    raise
                report.results.append(BackendResult(name, str(model), provider, precision,
                                                    "-", skipped=str(exc)))
                continue
            outputs = run_batched(backend, inputs.batch, options.batch_size)
            report.results.append(_judge(name, str(model), provider, precision, reference,
                                         outputs, options.tolerances))
    if not report.results:
        raise UserError("nothing was compared with the reference; add --model or --providers")
    return report, reference


def check(report: ParityReport) -> None:
    """Raise CheckFailed naming each failing backend (exit 1 at the CLI)."""
    if not report.measured:
        raise CheckFailed("every backend was skipped, so nothing was verified", report=report)
    failed = [r for r in report.results if r.passed is False]
    if failed:
        raise CheckFailed("; ".join(f"{r.backend}: {', '.join(r.failures)}" for r in failed),
                          report=report)

