"""Parity: run every backend on the same inputs and judge each against one reference.

The reference is PyTorch eager when weights are given, else the first model on ORT CPU, or
golden logits saved earlier (``--load-outputs``), which needs no PyTorch at all. Each
candidate is judged by the tolerance of its own precision (read from the model), and a
backend that cannot run is an error unless the caller asked to skip it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifact.model_file import ModelFile
from ..core.errors import CheckFailed, ProviderUnavailable, UserError
from ..core.files import atomic_output
from ..core.metrics import CheckResult, Comparison, ToleranceOverrides, looser
from ..data.folders import warn_skipped
from ..data.images import list_images, load_batch, seeded_subset
from ..data.spec import PreprocessSpec
from ..runtime.providers import provider_name, short_provider
from ..runtime.runners import OrtRunner, Runner, TorchRunner, torch_devices

if TYPE_CHECKING:
    from ..runtime.layerwise import LayerReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendResult:
    """One backend judged against the reference: its check, or why it was skipped."""

    backend: str
    model: str | None
    provider: str
    precision: str
    check: CheckResult | None = None
    skipped: str | None = None
    kind: str = "logits"  # what the output is: class scores, or an embedding (no top-1)
    arch: str | None = None
    # Layer by layer against the reference (``layerwise``), or why this pair has none.
    layerwise: LayerReport | str | None = None

    @property
    def passed(self) -> bool | None:
        return None if self.check is None else self.check.passed

    @property
    def comparison(self) -> Comparison | None:
        return None if self.check is None else self.check.comparison

    @property
    def failures(self) -> tuple[str, ...]:
        return () if self.check is None else self.check.failures

    @property
    def tolerance(self) -> str:
        return "-" if self.check is None else self.check.tolerance.describe()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"backend": self.backend, "model": self.model,
                                "provider": self.provider, "precision": self.precision,
                                "arch": self.arch, "kind": self.kind,
                                "tolerance": self.tolerance}
        if self.check is not None:
            data.update(self.check.to_dict())
        data.update(skipped=self.skipped, passed=self.passed)
        if isinstance(self.layerwise, str):
            data["layerwise"] = {"unavailable": self.layerwise}
        elif self.layerwise is not None:
            data["layerwise"] = self.layerwise.to_dict()
        return data


@dataclass
class ParityReport:
    reference: str
    inputs: dict[str, Any]
    results: list[BackendResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    untrained: bool = False  # the PyTorch reference is a random init

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
                "results": [r.to_dict() for r in self.results], "notes": self.notes,
                "passed": self.passed if self.results else None}


@dataclass(frozen=True)
class ParityOptions:
    providers: tuple[str, ...] = ("cpu",)
    reference: str | None = None  # "torch" or "MODEL@PROVIDER"; default: torch if weights
    batch_size: int = 8
    tolerances: ToleranceOverrides = ToleranceOverrides()
    skip_unavailable: bool = False
    # The reference outputs are the product (--save-outputs): a run with nothing else to
    # compare is complete, not an error.
    save_reference: bool = False
    output_name: str | None = None  # the output to read in models with several
    # Layer by layer for every pair, on the first ``layerwise_images`` inputs: information
    # only, it never changes a verdict.
    layerwise: bool = False
    layerwise_images: int = 8


class Inputs:
    """The inputs every backend sees, made one batch at a time so that memory does not grow
    with their number. After a pass it knows the names and hashes of what it gave (for the
    report and golden files); unreadable images are skipped and counted."""

    def __init__(self, spec: PreprocessSpec, *, paths: Sequence[Path] = (),
                 root: Path | None = None, random_count: int | None = None,
                 seed: int = 0, strict: bool = False) -> None:
        self.spec, self.paths, self.root = spec, list(paths), root
        self.random_count, self.seed, self.strict = random_count, seed, strict
        self.names: list[str] = []
        self.hashes: list[str] = []
        self.skipped: list[Path] = []
        self.used: list[Path] = []

    @property
    def planned(self) -> int:
        return self.random_count if self.random_count is not None else len(self.paths)

    @property
    def description(self) -> str:
        if self.random_count is not None:
            return f"{self.random_count} seeded random"
        return f"{len(self.names)} images from {self.root}"

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """Every input once, ``size`` at a time (one decode per image, shared by backends)."""
        self.names, self.hashes, self.skipped, self.used = [], [], [], []
        rng = np.random.default_rng(self.seed)  # chunked draws equal random_inputs' one draw
        for start in range(0, self.planned, size):
            stop = min(start + size, self.planned)
            if self.random_count is not None:
                shape = (stop - start, 3, self.spec.input_size, self.spec.input_size)
                batch = rng.standard_normal(shape, dtype=np.float32)
                names = [f"random-{i}" for i in range(start, stop)]
            else:
                batch, used, bad = load_batch(self.paths[start:stop], self.spec,
                                              strict=self.strict)
                self.skipped += bad
                self.used += used
                names = [_relative(p, self.root) for p in used]
                if not used:
                    continue
            self.names += names
            self.hashes += [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
                            for x in batch]
            yield batch
        warn_skipped(self.skipped, self.planned, f"images in {self.root}")
        if not self.names:
            raise UserError(f"{self.root}: holds no readable image; point `images` at a folder "
                            "of photos")

    def first(self, count: int) -> Inputs:
        """The first ``count`` inputs of a finished pass, as new inputs: the same random draws
        or the same readable photos (none decoded twice in vain, no skip warned twice)."""
        if self.random_count is not None:
            return Inputs(self.spec, random_count=min(count, self.random_count), seed=self.seed)
        return Inputs(self.spec, paths=self.used[:count], root=self.root, seed=self.seed)


def _relative(path: Path, root: Path | None) -> str:
    return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) \
        else str(path)


def make_inputs(spec: PreprocessSpec, *, images: Path | None, random_count: int | None,
                limit: int | None = None, seed: int = 0, strict: bool = False) -> Inputs:
    """Seeded random inputs, or a seeded subset of at most ``limit`` photos of ``images``."""
    if random_count is not None:
        return Inputs(spec, random_count=random_count, seed=seed)
    if images is None:
        raise UserError("give `images` DIR or `random_count` N")
    paths = seeded_subset(list_images(images), limit, seed)
    if not paths:
        raise UserError(f"{images}: holds no readable image; point `images` at a folder of "
                        "photos")
    return Inputs(spec, paths=paths, root=Path(images), seed=seed, strict=strict)


def model_spec(models: Sequence[ModelFile], override: PreprocessSpec | None) -> PreprocessSpec:
    """The preprocessing all models share; differing specs would make parity meaningless."""
    specs = {m.path: m.spec(override) for m in models}
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
            np.savez(fh, logits=logits, input_sha256=np.array(inputs.hashes),
                     input_names=np.array(inputs.names), reference=np.array(reference),
                     description=np.array(inputs.description))


@dataclass(frozen=True)
class Golden:
    """Reference logits saved by --save-outputs, with the hashes of the inputs they came from."""

    path: Path
    reference: str
    logits: np.ndarray
    hashes: tuple[str, ...]
    names: tuple[str, ...] = ()  # each input's path below the image folder, or random-N

    def match(self, inputs: Inputs) -> None:
        """Check, after a pass, that ``inputs`` are the ones the logits were made from."""
        mine = inputs.hashes
        if len(self.hashes) != len(mine):
            raise UserError(f"{self.path}: holds outputs for {len(self.hashes)} inputs but "
                            f"{len(mine)} were given; use the same `images`/`random_count` as "
                            "when it was saved")
        differing = sum(a != b for a, b in zip(self.hashes, mine, strict=True))
        if differing:
            raise UserError(f"{self.path}: {differing} of {len(mine)} inputs differ from those "
                            "the golden outputs were made from (other images or another "
                            "preprocessing); use the same images and model metadata as when it "
                            "was saved")


def load_outputs(path: Path) -> Golden:
    """Golden logits from ``path`` (checked against the inputs by :meth:`Golden.match`)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such golden-outputs file; make one with `save_outputs`")
    try:
        with np.load(path, allow_pickle=False) as data:
            logits, hashes = data["logits"], tuple(str(h) for h in data["input_sha256"])
            reference = str(data["reference"])
            names = tuple(str(n) for n in data["input_names"])
    except Exception as exc:
        raise UserError(f"{path}: not a golden-outputs .npz ({type(exc).__name__}); "
                        "make one with `save_outputs`") from None
    if logits.ndim != 2 or len(logits) != len(hashes) or len(names) != len(hashes):
        raise UserError(f"{path}: its logits do not match its input list; make it again with "
                        "`save_outputs`")
    return Golden(Path(path), f"{reference} (golden outputs from {path})", logits, hashes, names)


def _judge(row: BackendResult, reference: np.ndarray, outputs: np.ndarray,
           overrides: ToleranceOverrides, reference_precision: str = "fp32") -> BackendResult:
    if outputs.shape != reference.shape:
        raise UserError(f"{row.backend}: outputs have shape {outputs.shape} but the reference "
                        f"has {reference.shape}; the weights and the model disagree on classes")
    precision = looser(row.precision, reference_precision)
    check = CheckResult.judge(f"{row.backend} vs the reference", reference, outputs,
                              overrides.for_precision(precision, row.kind))
    return dataclasses.replace(row, check=check)


def run_parity(models: Sequence[ModelFile], *, inputs: Inputs, weights_model: Any | None = None,
               options: ParityOptions = ParityOptions(),
               golden: Golden | None = None) -> tuple[ParityReport, np.ndarray]:
    """Compare every backend with the reference; returns the report and reference logits.

    ``weights_model`` is a loaded torch module (from ``--weights``); ``golden`` replaces
    running a reference. Inputs stream through every runner in batches of
    ``options.batch_size``, so memory holds one batch of images and the logits only; every
    session is released when the comparison ends.
    """
    with contextlib.ExitStack() as stack:
        reference = _reference(models, weights_model, options, golden)
        report = ParityReport(reference.name, {})
        if reference.runner is not None:
            stack.enter_context(reference.runner)
        candidates = _candidates(models, weights_model, options, reference.ran, report, stack)
        outputs, references = _stream(inputs, options.batch_size, reference.runner,
                                      [runner for _, runner in candidates])
    if golden is not None:
        golden.match(inputs)
        logits = golden.logits
    else:
        logits = np.concatenate(references)
    report.inputs = {"description": inputs.description, "count": len(inputs.names)}
    judged = [_judge(row, logits, np.concatenate(collected), options.tolerances,
                     reference.precision)
              for (row, _), collected in zip(candidates, outputs, strict=True)]
    if options.layerwise and reference.runner is not None and candidates:
        judged = _layer_by_layer(judged, [runner for _, runner in candidates], reference,
                                 inputs.first(options.layerwise_images), options, report)
    report.results += judged
    if not report.results:
        if not options.save_reference:
            raise UserError("nothing was compared with the reference; add `models`, `weights` "
                            "or `providers`, or `save_outputs` FILE to keep its outputs")
        report.notes.append(f"only the reference ({reference.name}) ran, so nothing was "
                            "compared; its outputs are saved for a later `load_outputs`")
    return report, logits


def _layer_by_layer(rows: Sequence[BackendResult], runners: Sequence[Runner],
                    reference: _Reference, inputs: Inputs, options: ParityOptions,
                    report: ParityReport) -> list[BackendResult]:
    """``rows`` with their layer-by-layer comparison against the reference, run after every
    parity session is released (each side opens its own, with the extra outputs)."""
    from ..runtime.layerwise import INT8_NOTE, compare_layers

    assert reference.runner is not None
    log.info("layerwise: %d pair(s) on up to %d inputs", len(rows), options.layerwise_images)
    layers = compare_layers(reference.runner,
                            [(runner, row.precision) for row, runner in zip(rows, runners,
                                                                             strict=True)],
                            inputs, options.batch_size, options.tolerances,
                            reference.precision)
    if "int8" in {reference.precision, *(row.precision for row in rows)}:
        report.notes.append(INT8_NOTE)
    return [dataclasses.replace(row, layerwise=found)
            for row, found in zip(rows, layers, strict=True)]


@dataclass(frozen=True)
class _Reference:
    """What the others are judged against: its name, its runner (None for golden outputs),
    its precision, and the backends it already covers."""

    name: str
    runner: Runner | None
    precision: str
    ran: frozenset[str]


def _reference(models: Sequence[ModelFile], weights_model: Any | None, options: ParityOptions,
               golden: Golden | None) -> _Reference:
    name = options.reference or ("torch" if weights_model is not None else None)
    if name is None:
        if not models:
            raise UserError("nothing to compare: give `models` and/or `weights`")
        name = f"{models[0].path}@cpu"
    if golden is not None:
        return _Reference(golden.reference, None, "fp32", frozenset())
    if name == "torch":
        if weights_model is None:
            raise UserError("`reference` torch needs `weights`")
        return _Reference(name, TorchRunner(weights_model), "fp32", frozenset({"torch@cpu"}))
    model, _, provider = name.rpartition("@")
    if not model:
        raise UserError(f"`reference` {name!r}: use torch or MODEL@PROVIDER")
    opened = next((m for m in models if m.path == Path(model)), None) \
        or ModelFile.read(model, options.output_name)
    return _Reference(name, OrtRunner(opened, provider), opened.precision,
                      frozenset({f"{Path(model)}@{short_provider(provider_name(provider))}"}))


def _candidates(models: Sequence[ModelFile], weights_model: Any | None, options: ParityOptions,
                ran: frozenset[str], report: ParityReport, stack: contextlib.ExitStack,
                ) -> list[tuple[BackendResult, Runner]]:
    """Every backend to judge, activated on ``stack``; a provider that cannot run is
    reported as skipped when the options allow it, else an error."""
    planned: list[tuple[BackendResult, Runner]] = []
    if weights_model is not None:
        kind, arch = (models[0].kind, models[0].arch) if models else ("logits", None)
        planned += [(BackendResult(f"torch@{device}", None, f"torch-{device}", "fp32",
                                   kind=kind, arch=arch),
                     TorchRunner(weights_model, device))
                    for device in torch_devices() if f"torch@{device}" not in ran]
    for model_file in models:
        for provider in (short_provider(provider_name(p)) for p in options.providers):
            name = f"{model_file.path}@{provider}"
            if name not in ran:
                model_file.warn_if_wrong_cpu(provider)
                planned.append((BackendResult(name, str(model_file.path), provider,
                                              model_file.precision, kind=model_file.kind,
                                              arch=model_file.arch),
                                OrtRunner(model_file, provider)))
    active = []
    for row, runner in planned:
        try:
            stack.enter_context(runner)
        except ProviderUnavailable as exc:
            if not options.skip_unavailable:
                raise
            report.results.append(dataclasses.replace(row, skipped=str(exc)))
            continue
        active.append((row, runner))
    return active


def _stream(inputs: Inputs, batch_size: int, reference: Runner | None,
            runners: Sequence[Runner]) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Each batch once through the reference and every runner: (outputs per runner, the
    reference's outputs)."""
    outputs: list[list[np.ndarray]] = [[] for _ in runners]
    references: list[np.ndarray] = []
    for batch in inputs.batches(batch_size):
        if reference is not None:
            references.append(reference.infer(batch))
        for collected, runner in zip(outputs, runners, strict=True):
            collected.append(runner.infer(batch))
    return outputs, references


def compare_backends(models: Sequence[str | Path], *, weights: str | None = None,
                     images: Path | None = None, random_count: int | None = None,
                     limit: int | None = None, spec: PreprocessSpec | None = None,
                     load_outputs_from: Path | None = None, save_outputs_to: Path | None = None,
                     strict: bool = False,
                     options: ParityOptions = ParityOptions()) -> ParityReport:
    """What ``resnet-deploy parity`` does: open the models, build the reference and the
    inputs, compare, and save golden outputs when asked. ``spec`` overrides the models'
    own preprocessing; a random ``weights`` init is rebuilt exactly as the first model's."""
    from ..weights.card import IMAGENET_DEFAULTS
    from ..weights.checkpoints import load_for

    if images is not None and random_count is not None:
        raise UserError("give either `images` or `random_count`, not both")
    if load_outputs_from is not None and (weights or options.reference):
        raise UserError("`load_outputs` is the reference; drop `weights`/`reference`")
    if load_outputs_from is not None and options.layerwise:
        raise UserError(f"{load_outputs_from}: golden outputs hold only logits, so "
                        "`layerwise` has no reference layers; drop `load_outputs` and give "
                        "`weights` or a `reference` model")
    if options.layerwise and options.layerwise_images < 1:
        raise UserError("`layerwise_images` must be at least 1")
    if not models and weights is None:
        raise UserError("nothing to compare: give `models` (and/or `weights`)")
    files = [ModelFile.read(path, options.output_name) for path in models]
    spec = model_spec(files, spec) if files else spec
    golden = load_outputs(load_outputs_from) if load_outputs_from is not None else None
    weights_model, untrained = None, False
    if weights is not None:
        recorded = files[0].meta.weights if files and files[0].meta else None
        # The recorded architecture and head: parity with --weights imagenet against a
        # ResNet-50 export builds a ResNet-50.
        weights_model, loaded, _ = load_for(recorded, weights)
        untrained = loaded.is_random
        spec = spec or PreprocessSpec.create(IMAGENET_DEFAULTS["input_size"],
                                             IMAGENET_DEFAULTS["resize_size"])
    if spec is None:
        raise UserError("no preprocessing known: pass `input_size` (and `resize_size`, "
                        "`mean`, `std`)")
    inputs = make_inputs(spec, images=images, random_count=random_count, limit=limit,
                         strict=strict)
    report, reference = run_parity(files, inputs=inputs, weights_model=weights_model,
                                   options=options, golden=golden)
    report.untrained = untrained
    if save_outputs_to is not None:
        save_outputs(save_outputs_to, report.reference, inputs, reference)
        report.notes.append(f"wrote the reference outputs to {save_outputs_to}")
    return report


def check(report: ParityReport) -> None:
    """Raise CheckFailed naming each failing backend (exit 1 at the CLI)."""
    if not report.results:  # only the reference ran, to save its outputs
        return
    if not report.measured:
        raise CheckFailed("every backend was skipped, so nothing was verified", report=report)
    failed = [r for r in report.results if r.passed is False]
    if failed:
        raise CheckFailed("; ".join(f"{r.backend}: {', '.join(r.failures)}" for r in failed)
                          + "; if that difference is expected, loosen the tolerance (`atol`, "
                          "`min_cosine`, `min_top1`: the report shows what would pass)",
                          report=report)

