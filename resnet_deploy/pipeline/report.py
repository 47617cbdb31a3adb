"""report.md: the pipeline's provenance, caveats and figures, from its records.

Read through the steps' typed facts (:mod:`.facts`), so the report, the console summary
and a rerun that finds everything up to date tell the same story.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..core.machine import describe
from ..core.render import Column, cell, format_markdown
from ..data.spec import PreprocessSpec
from .facts import (FACTS, BenchFacts, EvaluateFacts, ExportFacts, Facts, ParityFacts,
                    QuantizeFacts, ServeFacts)
from .manifest import StepRecord

# How each figure a verdict rests on is written, in the order rules are listed.
_JUDGED = {"max_abs_diff": ("max abs diff", "error"), "cosine_min": ("worst cosine", "cosine"),
           "cosine_p1": ("cosine p1", "cosine"), "top1_agreement": ("top-1", "share")}


def facts(records: dict[str, StepRecord], step: str) -> Facts | None:
    """A step's facts, typed, when the run has that step."""
    record = records.get(step)
    return None if record is None else FACTS[step].from_dict(record.results)


def report_markdown(records: dict[str, StepRecord], plot: str | None) -> str:
    """report.md: provenance and caveats first, then artifacts, INT8, parity, accuracy and
    latency, from the step records."""
    parts = ["# resnet-deploy pipeline report\n", *provenance_lines(records, markdown=True)]
    artifacts = [{**o, "sha256": o["sha256"][:16]} for n, r in records.items()
                 if n not in ("report", "triton") for o in r.outputs]
    parts.append("## Artifacts\n\n" + format_markdown(artifacts, [
        ("path", "file"), Column("bytes", "bytes", "int"), ("sha256", "sha256 (first 16)"),
        ("step", "step")]))
    q = facts(records, "quantize")
    if isinstance(q, QuantizeFacts):
        notes = "".join(f"\n\nNote: {note}" for note in q.notes)
        parts.append(f"## INT8\n\nTarget {q.target}, {q.method} calibration on "
                     f"{q.num_calibration} photos; check on {q.held_out} photos: "
                     f"top-1 agreement {cell(q.top1_agreement, 'share')}, cosine "
                     f"p1 {cell(q.cosine_p1, 'cosine')}; size {q.size_ratio:.0%} of "
                     f"FP32.{notes}\n")
    p = facts(records, "parity")
    if isinstance(p, ParityFacts):
        verdicts = {True: "PASS", False: "FAIL", None: "skipped"}
        rows = [{**b.to_dict(), "verdict": verdicts[b.passed], "judged": judged_text(b.judged_on)}
                for b in p.backends]
        parts.append(f"## Parity against PyTorch ({p.inputs})\n\n" + format_markdown(rows, [
            ("backend", "backend"), ("precision", "prec"),
            Column("judged", "judged on", means="the figure each verdict rests on: max abs "
                   "diff (FP32), worst cosine (FP16), 1st-percentile cosine (INT8), and top-1 "
                   "agreement"),
            ("tolerance", "must meet"), ("verdict", "verdict")]))
    e = facts(records, "evaluate")
    if isinstance(e, EvaluateFacts) and e.models:
        chance = [m.model for m in e.models if m.near_chance]
        warning = (f"\n**Warning:** top-1 of {', '.join(chance)} is within 2 points of chance "
                   f"(1/{e.models[0].classes}): check the preprocessing and labels above.\n"
                   if chance else "")
        parts.append(f"## Accuracy on {e.images} labelled photos\n\n" + format_markdown(
            [m.to_dict() for m in e.models], [
                ("model", "model"), ("precision", "prec"), Column("top1", "top-1", "share"),
                Column("top5", "top-5", "share"),
                Column("top1_agreement", "agrees with first", "share"),
                Column("top1_drop_pt", "top-1 drop", "points")]) + warning)
    served = facts(records, "serve")
    if isinstance(served, ServeFacts):
        parts.append(served_section(served))
    b = facts(records, "bench")
    if isinstance(b, BenchFacts):
        parts.append("## Latency\n\n" + (f"**Warning:** {b.busy}.\n\n" if b.busy else "")
                     + format_markdown([r.to_dict() for r in b.rows], [
                         ("model", "model"), ("provider", "provider"), ("precision", "prec"),
                         Column("batch_size", "batch", "int"), Column("p50_ms", "p50 ms", "ms"),
                         Column("p90_ms", "p90 ms", "ms"),
                         Column("throughput_ips", "img/s", "number")]))
        if plot:
            parts.append(f"![latency and throughput]({plot})\n")
    return "\n".join(parts)


def judged_text(judged_on: Mapping[str, float]) -> str:
    """``cosine p1 0.998600, top-1 99.50%``: the figures a verdict rests on."""
    return ", ".join(f"{_JUDGED[k][0]} {cell(v, _JUDGED[k][1])}"  # type: ignore[arg-type]
                     for k, v in judged_on.items() if k in _JUDGED) or "-"


def served_section(served: ServeFacts) -> str:
    """Every endpoint of the served repository against parity's reference, or why the
    repository was not served."""
    if served.skipped:
        return f"## Served\n\nNot served: {served.skipped}\n"
    rows = [{**c, "judged": judged_text(c["result"]["judged_on"]),
             "tolerance": c["result"]["tolerance"],
             "verdict": "PASS" if c["result"]["passed"] else "FAIL"} for c in served.checks]
    return (f"## Served by Triton {served.triton} ({served.images} parity photos)\n\n"
            f"onnxruntime models ran on {served.onnxruntime_backend}.\n\n"
            + format_markdown(rows, [
                ("endpoint", "endpoint"), ("sent", "sent"), ("protocol", "protocol"),
                ("precision", "prec"), ("judged", "judged on"), ("tolerance", "must meet"),
                ("verdict", "verdict")]))


def provenance_lines(records: dict[str, StepRecord], *, markdown: bool = False) -> list[str]:
    """What every report states before its figures: the date and machine, the checkpoint
    (name, sha256 prefix), the preprocessing with its sources, the labels' source, and the
    caveats (random weights, a busy machine)."""
    from ..weights.card import Preprocessing

    lines = [f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}", f"Machine: {describe()}"]
    e = facts(records, "export")
    caveats = []
    if isinstance(e, ExportFacts):
        lines.append(f"Checkpoint: {e.checkpoint} (sha256 {(e.sha256 or '')[:12]})"
                     if e.checkpoint not in ("random", "imagenet") else f"Weights: {e.weights}")
        if e.preprocess:
            spec = PreprocessSpec.from_dict(e.preprocess)
            lines.append("Preprocessing: " + (
                Preprocessing(spec, e.preprocess_sources).describe() if e.preprocess_sources
                else f"{spec.input_size} px crop, resize {spec.resize_size}"))
        lines.append(f"Labels: {e.labels or 'unknown'}")
        if e.untrained:
            caveats.append("RANDOM WEIGHTS: the PyTorch model is untrained; every figure "
                           "below checks the plumbing only, and its accuracy is meaningless")
    b = facts(records, "bench")
    if isinstance(b, BenchFacts) and b.busy:
        caveats.append(f"{b.busy}: the latency figures are loose")
    if markdown:
        return ["  \n".join(lines) + "\n", *(f"> **Warning:** {c}\n" for c in caveats)]
    return lines + [f"warning: {c}" for c in caveats]
