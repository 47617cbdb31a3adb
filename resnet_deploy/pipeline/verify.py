"""``verify``: re-hash everything a pipeline manifest records and name what no longer holds.

pip's ``--require-hashes`` and ``sha256sum -c`` for the pipeline's artifacts: every output
and every input (the checkpoint, each calibration and evaluation photo) is hashed again, and
the top-level artifact summary is held against the step records. Exit 1 names each problem:
``missing``, ``modified`` or ``stale`` artifacts, ``missing input`` and ``modified input``.
A manifest that fails the schema, or records no step or no artifact, never reaches this
point: it is exit 2 (:func:`manifest.read_manifest`), so a pass always means files were
hashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import FAILED, Hashes, StepRecord, digest, read_manifest, records_of
from .steps import known_steps


@dataclass(frozen=True)
class VerifyReport:
    manifest: str
    checked: int  # artifacts re-hashed
    inputs: int  # input files re-hashed
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "checked": self.checked, "inputs": self.inputs,
                "problems": list(self.problems), "passed": self.passed}


def recorded_files(manifest: str | Path) -> list[Path]:
    """Every artifact a manifest records: what verify reads, so no output may replace it."""
    path = Path(manifest)
    steps = read_manifest(path, known_steps())["steps"]
    return [path.parent / entry["path"] for record in steps.values()
            for entry in record.get("outputs", [])]


def verify(manifest: str | Path) -> VerifyReport:
    """Re-hash every artifact and every input; name what is missing, modified or stale."""
    path = Path(manifest)
    data = read_manifest(path, known_steps())
    out, hashes = path.parent, Hashes()
    records = records_of(data)
    problems = _summary_problems(data["artifacts"], records)
    checked = inputs = 0
    tainted: set[str] = set()  # steps whose outputs cannot be trusted: downstream is stale
    for name, record in records.items():
        if record.status == FAILED:
            problems.append(f"step {name} failed: {record.error}")
            tainted.add(name)
            continue
        count = len(problems)
        for entry in record.outputs:
            checked += 1
            file = out / entry["path"]
            if not file.is_file():
                problems.append(f"missing: {entry['path']} ({name})")
            elif file.stat().st_size != entry["bytes"] or hashes.file(file) != entry["sha256"]:
                problems.append(f"modified: {entry['path']} ({name})")
        changed = []
        for key, entry in record.inputs.items():
            check = _check_input(key, entry, name, records, hashes)
            inputs += check.hashed
            problems += check.problems
            if check.changed:
                changed.append(key)
        upstream = sorted({v["step"] for v in record.inputs.values()
                           if v.get("kind") in ("artifact", "step")} & tainted)
        if changed or upstream:
            why = (f"{', '.join(changed)} changed since it was built" if changed else
                   f"built from {', '.join(upstream)}, which no longer holds")
            problems.append(f"stale: {_paths(record.outputs) or name} ({name}: {why})")
        if len(problems) > count:
            tainted.add(name)
    return VerifyReport(str(path), checked, inputs, tuple(problems))


def _summary_problems(artifacts: list[dict[str, Any]],
                      records: dict[str, StepRecord]) -> list[str]:
    """The top-level summary must list exactly the outputs the step records hold."""
    recorded = {(name, o["path"]): o for name, r in records.items() for o in r.outputs}
    listed = {(a.get("step"), a["path"]): a for a in artifacts}
    problems = []
    for key, entry in listed.items():
        own = recorded.get(key)  # type: ignore[arg-type]
        if own is None:
            problems.append(f"modified record: the artifacts summary lists {entry['path']}, "
                            "which no step recorded")
        elif (own["sha256"], own["bytes"]) != (entry["sha256"], entry["bytes"]):
            problems.append(f"modified record: the artifacts summary and step {key[0]} "
                            f"disagree on {entry['path']}")
    for name, path in recorded.keys() - listed.keys():
        problems.append(f"modified record: {path} ({name}) is missing from the artifacts "
                        "summary")
    return problems


@dataclass(frozen=True)
class _InputCheck:
    """One recorded input checked again: what is missing or forged, whether it changed (the
    step is then stale), and how many files were hashed."""

    problems: tuple[str, ...] = ()
    changed: bool = False
    hashed: int = 0


def _check_input(key: str, entry: dict[str, Any], step: str,
                 records: dict[str, StepRecord], hashes: Hashes) -> _InputCheck:
    kind = entry.get("kind")
    if kind == "file":
        file = Path(entry["path"])
        if not file.is_file():
            return _InputCheck((f"missing input: {file} ({step})",))
        return _InputCheck(changed=hashes.file(file) != entry["sha256"], hashed=1)
    if kind == "folder":
        return _check_folder(key, entry, step, hashes)
    if kind in ("artifact", "step"):
        producer = records.get(entry["step"])
        if producer is None:
            return _InputCheck(changed=True)
        if kind == "step":
            return _InputCheck(changed=producer.digest() != entry["sha256"])
        made = any(o["path"] == entry["path"] and o["sha256"] == entry["sha256"]
                   for o in producer.outputs)
        return _InputCheck(changed=not made)
    return _InputCheck()


def _check_folder(key: str, entry: dict[str, Any], step: str, hashes: Hashes) -> _InputCheck:
    """Each recorded photo hashed again: missing ones named, changed or added ones making
    the step stale; a file list that does not add up to its own hash is a forged record."""
    recorded: dict[str, str] = entry["files"]
    if digest(recorded) != entry["sha256"]:
        return _InputCheck((f"modified record: input {key} of step {step} does not match its "
                            "own file list",))
    root = Path(entry["path"])
    missing = tuple(f"missing input: {root / rel} ({step})" for rel in recorded
                    if not (root / rel).is_file())
    changed = any(hashes.file(root / rel) != sha for rel, sha in recorded.items()
                  if (root / rel).is_file())
    now = hashes.folder_files(root) if root.is_dir() else {}
    return _InputCheck(missing, changed or bool(set(now) - set(recorded)), len(recorded))


def _paths(outputs: Sequence[dict[str, Any]], shown: int = 3) -> str:
    names = [o["path"] for o in outputs]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
