"""report.md: the pipeline's provenance, caveats and figures, from its records.
"""

from __future__ import annotations

import time
from typing import Any

from ..core.machine import describe
from ..core.render import Column, cell, format_markdown
from ..data.spec import PreprocessSpec
from .manifest import StepRecord

# How each figure a verdict rests on is written, in the order rules are listed.
_JUDGED = {"max_abs_diff": ("max abs diff", "error"), "cosine_min": ("worst cosine", "cosine"),
           "cosine_p1": ("cosine p1", "cosine"), "top1_agreement": ("top-1", "share")}


def report_markdown(records: dict[str, StepRecord], plot: str | None) -> str:
    """report.md: provenance and caveats first, then artifacts, INT8, parity, accuracy and
    latency, from the step records."""
    parts = ["# resnet-deploy pipeline report\n", *provenance_lines(records, markdown=True)]
    artifacts = [{**o, "sha256": o["sha256"][:16]} for n, r in records.items()
                 if n not in ("report", "triton") for o in r.outputs]
    parts.append("## Artifacts\n\n" + format_markdown(artifacts, [
        ("path", "file"), Column("bytes", "bytes", "int"), ("sha256", "sha256 (first 16)"),
        ("step", "step")]))
    quant = records.get("quantize")
    if quant is not None:
        q = quant.results
        notes = "".join(f"\n\nNote: {note}" for note in q.get("notes", []))
        parts.append(f"## INT8\n\nTarget {q['target']}, {q['method']} calibration on "
                     f"{q['num_calibration']} photos; check on {q['held_out']} photos: "
                     f"top-1 agreement {cell(q['top1_agreement'], 'share')}, cosine "
                     f"p1 {cell(q['cosine_p1'], 'cosine')}; size {q['size_ratio']:.0%} of "
                     f"FP32.{notes}\n")
    parity = records.get("parity")
    if parity is not None:
        verdicts = {True: "PASS", False: "FAIL", None: "skipped"}
        rows = [{**b, "verdict": verdicts[b["passed"]], "judged": judged_text(b)}
                for b in parity.results["backends"]]
        parts.append(f"## Parity against PyTorch ({parity.results['inputs']})\n\n"
                     + format_markdown(rows, [
                         ("backend", "backend"), ("precision", "prec"),
                         Column("judged", "judged on", means="the figure each verdict rests "
                                "on: max abs diff (FP32), worst cosine (FP16), 1st-percentile "
                                "cosine (INT8), and top-1 agreement"),
                         ("tolerance", "must meet"), ("verdict", "verdict")]))
    evaluation = records.get("evaluate")
    if evaluation is not None:
        e = evaluation.results
        chance = [m["model"] for m in e["models"] if m.get("near_chance")]
        warning = (f"\n**Warning:** top-1 of {', '.join(chance)} is within 2 points of chance "
                   f"(1/{e['models'][0].get('classes')}): check the preprocessing and labels "
                   "above.\n" if chance else "")
        parts.append(f"## Accuracy on {e['images']} labelled photos\n\n"
                     + format_markdown(e["models"], [
                         ("model", "model"), ("precision", "prec"),
                         Column("top1", "top-1", "share"), Column("top5", "top-5", "share"),
                         Column("top1_agreement", "agrees with first", "share"),
                         Column("top1_drop_pt", "top-1 drop", "points")]) + warning)
    bench = records.get("bench")
    if bench is not None:
        busy = bench.results.get("busy")
        parts.append("## Latency\n\n" + (f"**Warning:** {busy}.\n\n" if busy else "")
                     + format_markdown(bench.results["rows"], [
                         ("model", "model"), ("provider", "provider"), ("precision", "prec"),
                         Column("batch_size", "batch", "int"), Column("p50_ms", "p50 ms", "ms"),
                         Column("p90_ms", "p90 ms", "ms"),
                         Column("throughput_ips", "img/s", "number")]))
        if plot:
            parts.append(f"![latency and throughput]({plot})\n")
    return "\n".join(parts)


def judged_text(backend: dict[str, Any]) -> str:
    """``cosine p1 0.998600, top-1 99.50%``: the figures a parity verdict rests on."""
    figures = backend.get("judged_on") or {}
    return ", ".join(f"{_JUDGED[k][0]} {cell(v, _JUDGED[k][1])}"  # type: ignore[arg-type]
                     for k, v in figures.items() if k in _JUDGED) or "-"


def provenance_lines(records: dict[str, StepRecord], *, markdown: bool = False) -> list[str]:
    """What every report states before its figures: the date and machine, the checkpoint
    (name, sha256 prefix), the preprocessing with its sources, the labels' source, and the
    caveats (random weights, a busy machine)."""
    from ..weights.card import Preprocessing

    export = records.get("export")
    e = export.results if export is not None else {}
    lines = [f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}", f"Machine: {describe()}"]
    if e:
        sha = (e.get("sha256") or "")[:12]
        lines.append(f"Checkpoint: {e.get('checkpoint')} (sha256 {sha})"
                     if e.get("checkpoint") not in ("random", "imagenet", None)
                     else f"Weights: {e.get('weights')}")
        if e.get("preprocess"):
            spec = PreprocessSpec.from_dict(e["preprocess"])
            sources = e.get("preprocess_sources") or {}
            lines.append("Preprocessing: " + (Preprocessing(spec, sources).describe()
                                              if sources else
                                              f"{spec.input_size} px crop, resize "
                                              f"{spec.resize_size}"))
        lines.append(f"Labels: {e.get('labels', 'unknown')}")
    caveats = []
    if e.get("untrained"):
        caveats.append("RANDOM WEIGHTS: the PyTorch model is untrained; every figure below "
                       "checks the plumbing only, and its accuracy is meaningless")
    bench = records.get("bench")
    if bench is not None and bench.results.get("busy"):
        caveats.append(f"{bench.results['busy']}: the latency figures are loose")
    if markdown:
        return ["  \n".join(lines) + "\n", *(f"> **Warning:** {c}\n" for c in caveats)]
    return lines + [f"warning: {c}" for c in caveats]
