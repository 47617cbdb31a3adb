"""Make's rule with content hashes for times, over any list of steps.

A step is a name, a *plan* (the options object it hands to the library), its inputs (with
content hashes) and a function that runs it. Its key is the hash of its inputs' hashes and
its plan, every field of it except input paths, whose contents are hashed as inputs: a step
runs again only when an input's content or an option it really passes changed, or an output
is missing or no longer has its recorded hash. Since a step's inputs include the hashes of
the outputs it consumes, a change ripples down exactly the steps that depend on it. The
manifest is written after every step, so an interrupted run keeps the steps it finished.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import CheckFailed, UserError
from .facts import Facts
from .manifest import (BUILT, FAILED, MANIFEST, SKIPPED, UP_TO_DATE, Hashes, StepRecord,
                       read_manifest, records_of, step_key, write_manifest)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a step's run returns: the files it wrote (under the output folder) and what it
    found."""

    outputs: tuple[Path, ...]
    facts: Facts


class Context(Protocol):
    """What the steps of one run share: the output folder, the hashes, the records."""

    out: Path
    hashes: Hashes
    records: dict[str, StepRecord]


class StepSkipped(Exception):
    """A step that cannot run here (an optional extra is missing): recorded as skipped with
    this reason, never up to date, so it runs once what it needs is there."""

    def __init__(self, reason: str, facts: Facts) -> None:
        super().__init__(reason)
        self.facts = facts


@dataclass(frozen=True)
class Step:
    """``plan`` gives the options object the step passes to the library (None: none);
    ``inputs`` the hashed inputs; ``run`` does the work with that very plan."""

    name: str
    plan: Callable[[Any], Any]
    inputs: Callable[[Any], dict[str, Any]]
    run: Callable[[Any, Any], Outcome]


@dataclass(frozen=True)
class PipelineResult:
    """Where the run wrote, and what each step did (built, up to date or failed)."""

    output: str
    manifest: str
    steps: tuple[StepRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # the same keys and shapes as StepRecord.to_dict


def fingerprint(plan: Any) -> Any:
    """A plan as its key sees it: every field, recursively, but input paths (a ``Path``),
    whose contents the step hashes as inputs instead."""
    if dataclasses.is_dataclass(plan) and not isinstance(plan, type):
        return {f.name: fingerprint(getattr(plan, f.name)) for f in dataclasses.fields(plan)
                if not isinstance(getattr(plan, f.name), Path)}
    if isinstance(plan, (list, tuple)):
        return [fingerprint(v) for v in plan]
    if isinstance(plan, dict):
        return {str(k): fingerprint(v) for k, v in plan.items()}
    return None if isinstance(plan, Path) else plan


def _recorded(plan: Any) -> dict[str, Any]:
    """The plan as the manifest's ``options`` object records it."""
    seen = fingerprint(plan)
    return seen if isinstance(seen, dict) else {} if seen is None else {"plan": seen}


def previous_records(out: Path, known: Sequence[str]) -> dict[str, StepRecord]:
    """The records of an earlier run into ``out``; none when its manifest is unreadable."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        return records_of(read_manifest(path, known))
    except UserError:
        log.warning("%s: unreadable; every step runs again", path)
        return {}


def _outputs_hold(record: StepRecord, out: Path, hashes: Hashes) -> bool:
    for entry in record.outputs:
        path = out / entry["path"]
        if not path.is_file() or hashes.file(path) != entry["sha256"]:
            return False
    return True


def execute(plan: Sequence[Step], context: Context, *, known: Sequence[str], force: bool,
            say: Callable[[str], None]) -> PipelineResult:
    """Run the steps of ``plan`` that are not up to date, in order; raise the failing step's
    own error after recording it (its figures too, when it measured any). Steps after a
    failure keep their previous records, which ``verify`` then reports as stale."""
    out, records = context.out, context.records
    order = [s.name for s in plan]
    # Steps this plan no longer has (evaluate, fp16, triton) are forgotten now, so neither
    # the report nor a manifest written after a failure shows their old figures.
    records.update({name: record for name, record in previous_records(out, known).items()
                    if name in order})
    for index, step in enumerate(plan, start=1):
        options = step.plan(context)
        inputs = step.inputs(context)
        key = step_key(inputs, fingerprint(options))
        prev = records.get(step.name)
        prefix = f"[{index}/{len(plan)}] {step.name}:"
        if (not force and prev is not None and prev.status not in (FAILED, SKIPPED)
                and prev.key == key and _outputs_hold(prev, out, context.hashes)):
            # Same hashes, perhaps other paths: record where the inputs are now.
            records[step.name] = dataclasses.replace(prev, status=UP_TO_DATE, inputs=inputs)
            say(f"{prefix} up to date")
            continue
        start = time.perf_counter()
        try:
            outcome = step.run(context, options)
        except (CheckFailed, UserError) as exc:
            report = getattr(exc, "report", None)
            records[step.name] = StepRecord(
                step.name, FAILED, key, inputs, _recorded(options),
                results=report.to_dict() if isinstance(report, Facts) else {},
                seconds=round(time.perf_counter() - start, 3), error=str(exc))
            write_manifest(out, records, order)
            say(f"{prefix} FAILED after {time.perf_counter() - start:.1f}s")
            raise
        except StepSkipped as skipped:
            records[step.name] = StepRecord(
                step.name, SKIPPED, key, inputs, _recorded(options),
                results=skipped.facts.to_dict(), seconds=round(time.perf_counter() - start, 3))
            write_manifest(out, records, order)
            say(f"{prefix} skipped: {skipped}")
            continue
        seconds = round(time.perf_counter() - start, 3)
        records[step.name] = StepRecord(
            step.name, BUILT, key, inputs, _recorded(options),
            outputs=[context.hashes.output(out, p, step.name) for p in outcome.outputs],
            results=outcome.facts.to_dict(), seconds=seconds)
        write_manifest(out, records, order)
        say(f"{prefix} built in {seconds:.1f}s")
    path = write_manifest(out, records, order)
    return PipelineResult(str(out), str(path), tuple(records[n] for n in order))
