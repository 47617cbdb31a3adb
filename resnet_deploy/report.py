"""Rendering results: plain-text tables, JSON and Markdown, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from .errors import UserError
from .files import atomic_output, write_text


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        if abs(value) < 1:
            return f"{value:.6g}"  # cosines and agreements need their digits
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` is (key, header) pairs; numbers right-aligned, text left-aligned."""
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
                   for row in rows) for key, _ in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def format_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


PLOT_INSTALL_HINT = "pip install 'resnet-deploy[plot]' (matplotlib)"


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when a plot was asked for and cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"--plot needs matplotlib, which is not installed; "
                        f"{PLOT_INSTALL_HINT}") from None


def plot_bench(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG: p50 latency against batch size (left), throughput bars per batch size (right).

    ``rows`` are bench results (``model``, ``provider``, ``batch_size``, ``p50_ms``,
    ``throughput_ips``); one line and one bar colour per model@provider.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    labels = list(dict.fromkeys(f"{Path(r['model']).name}@{r['provider']}" for r in rows))
    batches = sorted({int(r["batch_size"]) for r in rows})
    by_key = {(f"{Path(r['model']).name}@{r['provider']}", int(r["batch_size"])): r for r in rows}
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [b for b in batches if (label, b) in by_key]
        lat.plot(xs, [by_key[label, b]["p50_ms"] for b in xs], marker="o", label=label)
        thr.bar([batches.index(b) + (i - (len(labels) - 1) / 2) * width for b in xs],
                [by_key[label, b]["throughput_ips"] for b in xs], width=width, label=label)
    lat.set(xlabel="batch size", ylabel="p50 latency (ms)", title="Latency")
    if len(batches) > 1:
        lat.set_xscale("log", base=2)
        lat.set_yscale("log")
        lat.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    lat.set_xticks(batches, [str(b) for b in batches])
    lat.grid(True, alpha=0.3)
    lat.legend(fontsize=8)
    thr.set(xlabel="batch size", ylabel="images/s at p50", title="Throughput")
    thr.set_xticks(range(len(batches)), [str(b) for b in batches])
    thr.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
