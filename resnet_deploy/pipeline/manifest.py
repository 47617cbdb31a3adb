"""The pipeline's manifest: step records, content hashes, and a reader that trusts nothing.

``manifest.json`` records per step its inputs (content hashes), options, outputs (path,
bytes, sha256) and results, plus a top-level summary of every artifact. The pipeline reads
it to decide what is up to date and ``verify`` to prove what was built; either way a record
is used only after it passed the schema below, so a hand-edited, truncated or forged
manifest is a one-line error (exit 2), never a traceback nor a check that checked nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..core.errors import UserError
from ..core.files import file_sha256
from ..core.machine import machine_info, package_versions
from ..data.images import list_images

MANIFEST = "manifest.json"
FORMAT = "resnet-deploy-manifest/1"
BUILT, UP_TO_DATE, FAILED, SKIPPED = "built", "up to date", "failed", "skipped"
STATUSES = (BUILT, UP_TO_DATE, FAILED, SKIPPED)
INPUT_KINDS = ("file", "folder", "artifact", "step", "value")
SHA256 = re.compile(r"[0-9a-f]{64}")


def digest(data: Any) -> str:
    """The sha256 of a JSON value in canonical form."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class StepRecord:
    """One step in the manifest: what went in, how, what came out, what it measured."""

    step: str
    status: str
    key: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def digest(self) -> str:
        """What a downstream step sees of this one: its outputs and results."""
        return digest({"outputs": self.outputs, "results": self.results})


def step_key(inputs: dict[str, Any], options: dict[str, Any]) -> str:
    """The step's identity: input hashes and options (not file lists or paths)."""
    return digest({"inputs": {k: v.get("sha256", v.get("value")) for k, v in inputs.items()},
                   "options": options})


class Hashes:
    """File hashes for one run: each file is read once however many steps name it."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = file_sha256(path)
        return self._cache[key]

    def file_input(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        return {"kind": "file", "path": str(path.resolve()), "sha256": self.file(path)}

    def folder_files(self, folder: Path) -> dict[str, str]:
        """Every image below ``folder`` (relative POSIX path) with its content hash."""
        root = Path(folder)
        return {p.relative_to(root).as_posix(): self.file(p) for p in list_images(root)
                if p.is_file()}

    def folder_input(self, folder: Path) -> dict[str, Any]:
        """Every image below ``folder`` with its content hash; the sha256 covers them all."""
        files = self.folder_files(folder)
        if not files:
            raise UserError(f"{folder}: holds no images; point to a folder of photos")
        return {"kind": "folder", "path": str(Path(folder).resolve()), "sha256": digest(files),
                "files": files}

    def output(self, root: Path, path: Path, step: str) -> dict[str, Any]:
        return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
                "sha256": self.file(path), "step": step}


def write_manifest(out: Path, records: dict[str, StepRecord], order: Sequence[str]) -> Path:
    """Atomically: a reader never sees half a manifest, an interrupted run keeps its steps."""
    from ..core.render import write_json

    ordered = [n for n in order if n in records] + [n for n in records if n not in order]
    steps_data = {n: records[n].to_dict() for n in ordered}
    artifacts = [{**entry, "step": n} for n in ordered for entry in records[n].outputs]
    path = out / MANIFEST
    write_json(path, {"format": FORMAT, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "machine": machine_info(), "versions": package_versions(),
                      "artifacts": artifacts, "steps": steps_data})
    return path


# --- reading, with the schema ------------------------------------------------------------

class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if repeated is not None:
        raise _Duplicate(f"the key {repeated!r} appears twice in one object")
    return dict(pairs)


def read_manifest(path: Path, known_steps: Collection[str]) -> dict[str, Any]:
    """The manifest's JSON, checked against the schema; UserError (exit 2) naming the first
    flaw when it is missing, unreadable, malformed, or records no step or no artifact.

    ``known_steps`` are the names the pipeline can write (its own step list).
    """
    fix = "rerun 'resnet-deploy pipeline' to rewrite it"
    try:
        data = json.loads(Path(path).read_text("utf-8"), object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise UserError(f"{path}: no such manifest; run 'resnet-deploy pipeline -o DIR' "
                        "first") from None
    except _Duplicate as exc:
        raise UserError(f"{path}: not a valid manifest ({exc}); {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: not a readable manifest ({type(exc).__name__}); {fix}"
                        ) from None
    problem = _schema_problem(data, known_steps)
    if problem is not None:
        raise UserError(f"{path}: not a valid manifest ({problem}); {fix}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None


def _inside(value: Any) -> bool:
    """A relative path that stays inside the folder it is relative to."""
    if not isinstance(value, str) or not 0 < len(value) < 4096 or "\x00" in value:
        return False
    parts = PurePosixPath(value).parts
    return not value.startswith("/") and ".." not in parts and bool(parts)


def _input_problem(name: str, entry: Any, known_steps: Collection[str]) -> str | None:
    if not isinstance(entry, dict) or entry.get("kind") not in INPUT_KINDS:
        return f"input {name!r} is not an object of a known kind ({', '.join(INPUT_KINDS)})"
    kind = entry["kind"]
    if kind == "value":
        return None if isinstance(entry.get("value"), (str, int, float, bool, type(None))) \
            else f"input {name!r} has no plain value"
    if not _is_sha(entry.get("sha256")):
        return f"input {name!r}: sha256 is not 64 hex digits"
    if kind in ("file", "folder") and not (isinstance(entry.get("path"), str)
                                          and Path(entry["path"]).is_absolute()):
        return f"input {name!r}: path is not an absolute path"
    if kind == "folder":
        files = entry.get("files")
        if not isinstance(files, dict) or not files or not all(
                _inside(k) and _is_sha(v) for k, v in files.items()):
            return f"input {name!r}: files must map relative paths to sha256 hashes"
    if kind in ("artifact", "step") and entry.get("step") not in known_steps:
        return f"input {name!r} names an unknown step {entry.get('step')!r}"
    if kind == "artifact" and not _inside(entry.get("path")):
        return f"input {name!r}: path must stay inside the manifest's folder"
    return None


def _output_problem(step: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"an output of step {step} is not an object"
    if not _inside(entry.get("path")):
        return (f"output {entry.get('path')!r} of step {step} is not a path inside the "
                "manifest's folder")
    if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
        return f"output {entry['path']!r}: bytes must be a non-negative integer"
    if not _is_sha(entry.get("sha256")):
        return f"output {entry['path']!r}: sha256 is not 64 hex digits"
    if entry.get("step", step) != step:
        return f"output {entry['path']!r} is recorded under step {step} as {entry['step']!r}"
    return None


_RECORD_TYPES: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "step": (str, True), "status": (str, True), "key": (str, True), "inputs": (dict, True),
    "options": (dict, True), "outputs": (list, False), "results": (dict, False),
    "seconds": ((int, float), False), "error": ((str, type(None)), False)}


def _record_problem(name: str, record: Any, known_steps: Collection[str]) -> str | None:
    if name not in known_steps:
        return f"step {name!r} is not one the pipeline runs ({', '.join(known_steps)})"
    if not isinstance(record, dict):
        return f"the record of step {name} is not an object"
    for key, (kind, required) in _RECORD_TYPES.items():
        if key not in record:
            if required:
                return f"the record of step {name} has no {key!r}"
        elif not isinstance(record[key], kind) or isinstance(record[key], bool):
            return f"the record of step {name}: {key!r} has the wrong type"
    if record["step"] != name:
        return f"the record under {name!r} says it is step {record['step']!r}"
    if record["status"] not in STATUSES:
        return f"step {name}: status {record['status']!r} is not one of {', '.join(STATUSES)}"
    if not _is_sha(record["key"]):
        return f"step {name}: key is not 64 hex digits"
    if record.get("seconds", 0) < 0:
        return f"step {name}: seconds is negative"
    for input_name, entry in record["inputs"].items():
        problem = _input_problem(input_name, entry, known_steps)
        if problem:
            return f"step {name}: {problem}"
    for entry in record.get("outputs", []):
        problem = _output_problem(name, entry)
        if problem:
            return problem
    return None


def _schema_problem(data: Any, known_steps: Collection[str]) -> str | None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"not a {FORMAT} document"
    steps, artifacts = data.get("steps"), data.get("artifacts")
    if not isinstance(steps, dict):
        return "'steps' is not an object"
    if not isinstance(artifacts, list):
        return "'artifacts' is not a list"
    if not steps:
        return "it records no step"
    for name, record in steps.items():
        problem = _record_problem(name, record, known_steps)
        if problem:
            return problem
    for entry in artifacts:
        step = entry.get("step") if isinstance(entry, dict) else None
        if not isinstance(step, str) or step not in known_steps:
            return f"in 'artifacts': an entry names no known step ({step!r})"
        problem = _output_problem(step, entry)
        if problem:
            return f"in 'artifacts': {problem}"
    if not any(r.get("outputs") for r in steps.values() if r["status"] != FAILED):
        return "it records no artifact"
    return None


def records_of(data: dict[str, Any]) -> dict[str, StepRecord]:
    """The step records of a manifest that passed :func:`read_manifest`."""
    return {name: StepRecord.from_dict(record) for name, record in data["steps"].items()}
