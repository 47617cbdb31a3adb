"""Proof that a model repository serves what was built: every model's two endpoints, on a
real Triton, against the outputs the caller expects for the same photos.

``<name>`` gets the photos preprocessed here with the spec recorded in its model file;
``<name>_image`` gets the files' bytes and preprocesses them itself. Each is judged by the
tolerance of the model's precision and output kind (:func:`core.metrics.tolerance`), so a
served FP32 model must match to 1e-4 of its largest logit with the same top-1 (on CPU, the
same onnxruntime build gives equal outputs bit for bit), and an INT8 one by cosine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.model_file import ModelFile
from ..checks.served import ServedClient
from ..core.errors import CheckFailed, UserError
from ..core.metrics import CheckResult, ToleranceOverrides
from ..core.progress import Progress, to_log
from ..data.images import list_images, load_batch, seeded_subset
from ..runtime.runners import fill_batch, run_model
from .image_endpoint import IMAGE_INPUT, image_name, is_image_config
from .server import ServerOptions, TritonServer, repository_models
from .triton import CONFIG_FILE, MODEL_FILE, VERSION, parse_config


@dataclass(frozen=True)
class EndpointProof:
    """One endpoint judged: what was sent (``tensor`` or ``photos``), by which protocol,
    and the check; truthy when it passes."""

    endpoint: str
    model: str
    sent: str
    protocol: str
    precision: str
    kind: str
    result: CheckResult

    def __bool__(self) -> bool:
        return bool(self.result)

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name != "result"}, "result": self.result.to_dict()}


@dataclass(frozen=True)
class ServedProof:
    """Every endpoint's check; truthy when all pass. ``without_photos``: models whose
    repository has no ``<name>_image`` (a model without recorded preprocessing)."""

    repository: str
    triton: str
    onnxruntime_backend: str
    images: int
    checks: tuple[EndpointProof, ...]
    without_photos: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.checks) and all(self.checks)

    @property
    def failures(self) -> tuple[EndpointProof, ...]:
        return tuple(c for c in self.checks if not c)

    def failure_line(self, reference: str) -> str:
        """The first failing endpoint in one line, against ``reference`` (what it should
        have matched): the message of the CheckFailed the callers raise."""
        first = self.failures[0]
        return (f"served {first.endpoint} ({first.sent}, {first.protocol}) differs from "
                f"{reference}: {first.result.reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"repository": self.repository, "triton": self.triton,
                "onnxruntime_backend": self.onnxruntime_backend, "images": self.images,
                "passed": bool(self), "checks": [c.to_dict() for c in self.checks],
                "without_photos": list(self.without_photos)}


def prove_repository(repository: str | Path, images: Sequence[Path],
                     expected: Mapping[str, np.ndarray], *, protocol: str = "http",
                     overrides: ToleranceOverrides | None = None, batch_size: int = 8,
                     server: TritonServer | None = None,
                     options: ServerOptions = ServerOptions(),
                     progress: Progress | None = None) -> ServedProof:
    """Serve ``repository`` (or use the running ``server`` on it), send ``images`` to
    ``<name>`` and ``<name>_image`` for every ``name`` in ``expected`` (its (N, C) outputs
    for those images, in order), judge each, stop the server it started, and return the
    checks. ``protocol``: ``http`` or ``grpc``. Bad input (a model not in the repository,
    an unreadable photo, expected rows that are not one per photo) is a UserError; a
    check that fails is a falsy result, not an exception: the caller decides."""
    repository = Path(repository)
    if protocol not in ("http", "grpc"):
        raise UserError(f"`protocol` {protocol!r}: choose http or grpc")
    if not images:
        raise UserError("give `images`: the photos the expected outputs were computed on")
    for name, rows in expected.items():
        if not (repository / name / CONFIG_FILE).is_file():
            raise UserError(f"{repository}: has no model {name!r}; package it first")
        if len(rows) != len(images):
            raise UserError(f"`expected` {name!r} has {len(rows)} rows for {len(images)} images")
    say = progress or to_log
    if server is None:
        with TritonServer(repository, options, progress=progress) as started:
            return prove_repository(repository, images, expected, protocol=protocol,
                                    overrides=overrides, batch_size=batch_size,
                                    server=started, progress=progress)
    address = server.grpc_url if protocol == "grpc" else server.http_url
    client = ServedClient(f"{protocol}://{address}")
    checks: list[EndpointProof] = []
    without: list[str] = []
    try:
        for name, rows in expected.items():
            say(f"proving {name} over {protocol} on {len(images)} photos")
            checks += _prove_model(client, repository, name, images, np.asarray(rows),
                                   overrides or ToleranceOverrides(), batch_size, without)
    finally:
        client.close()
    return ServedProof(str(repository), str(server.metadata().get("version", "?")),
                       server.onnxruntime_backend(), len(images), tuple(checks),
                       tuple(without))


def prove_protocols(repository: str | Path, images: Sequence[Path],
                    expected: Mapping[str, np.ndarray], *,
                    protocols: Sequence[str] = ("http", "grpc"),
                    overrides: ToleranceOverrides | None = None,
                    options: ServerOptions = ServerOptions(),
                    progress: Progress | None = None) -> ServedProof:
    """:func:`prove_repository` over each of ``protocols`` on one server it starts and
    stops: one proof holding every endpoint's check for every protocol."""
    with TritonServer(repository, options, progress=progress) as server:
        proofs = [prove_repository(repository, images, expected, protocol=protocol,
                                   overrides=overrides, server=server, progress=progress)
                  for protocol in protocols]
    return dataclasses.replace(proofs[0], checks=tuple(c for p in proofs for c in p.checks))


def prove_against_inprocess(repository: str | Path, folder: str | Path, *, limit: int = 64,
                            options: ServerOptions = ServerOptions(),
                            progress: Progress | None = None) -> ServedProof:
    """Try a repository before shipping it: a seeded subset of at most ``limit`` photos of
    ``folder`` through every endpoint over HTTP and gRPC, against onnxruntime in this
    process. A failing endpoint raises CheckFailed carrying the proof."""
    photos = seeded_subset(list_images(folder), limit)
    if not photos:
        raise UserError(f"{folder}: holds no image; point `folder` at a folder of photos")
    expected = inprocess_outputs(repository, photos)
    proof = prove_protocols(repository, photos, expected, options=options, progress=progress)
    if proof.failures:
        raise CheckFailed(f"{repository}: {proof.failure_line('onnxruntime in this process')}",
                          report=proof)
    return proof


def inprocess_outputs(repository: str | Path, images: Sequence[Path],
                      batch_size: int = 8) -> dict[str, np.ndarray]:
    """What onnxruntime in this process gives on ``images`` for every model of the
    repository but the ``<name>_image`` ones, each preprocessed as its model file records:
    the answers a served repository must reproduce."""
    outputs = {}
    for name in repository_models(Path(repository)):
        folder = Path(repository) / name
        if is_image_config(parse_config(folder / CONFIG_FILE)):
            continue
        file = ModelFile.read(folder / VERSION / MODEL_FILE)
        batch, _, _ = load_batch(images, file.spec(), strict=True)
        outputs[name] = run_model(file, batch, batch_size)
    return outputs


def _prove_model(client: ServedClient, repository: Path, name: str, images: Sequence[Path],
                 expected: np.ndarray, overrides: ToleranceOverrides, batch_size: int,
                 without: list[str]) -> list[EndpointProof]:
    config = parse_config(repository / name / CONFIG_FILE)
    file = ModelFile.read(repository / name / VERSION / MODEL_FILE)
    precision = config.parameters["precision"].string_value \
        if "precision" in config.parameters else file.precision
    tolerance = overrides.for_precision(precision, file.kind)
    batch, _, _ = load_batch(images, file.spec(), strict=True)
    # A static-batch graph takes exactly its batch: the last chunk is filled up, as
    # in-process runners fill it, and only the rows asked for are kept.
    step = min(batch_size, config.max_batch_size) if config.max_batch_size else \
        int(config.input[0].dims[0])
    classes = expected.shape[1]

    def send(endpoint: str, feed: str, rows: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            sent = chunk if config.max_batch_size else fill_batch(chunk, step)
            out = client.infer(endpoint, {feed: sent}, file.io.output_name)
            parts.append(out.reshape(-1, classes)[:len(chunk)])
        return np.concatenate(parts)

    def proof(endpoint: str, sent: str, candidate: np.ndarray) -> EndpointProof:
        subject = f"{endpoint} ({sent}, {client.protocol}) vs expected"
        return EndpointProof(endpoint, name, sent, client.protocol, precision, file.kind,
                             CheckResult.judge(subject, expected, candidate, tolerance))

    found = [proof(name, "tensor", send(name, config.input[0].name, batch))]
    photos = image_name(name)
    if not (repository / photos / CONFIG_FILE).is_file():
        without.append(name)
        return found
    blobs = np.array([path.read_bytes() for path in images], dtype=object)
    rows = blobs.reshape(-1, 1) if config.max_batch_size else blobs
    return [*found, proof(photos, "photos", send(photos, IMAGE_INPUT, rows))]
