"""Rendering results: plain-text tables, JSON and Markdown, written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import UserError
from .files import atomic_output, write_text

if TYPE_CHECKING:
    from .metrics import CheckResult

# One style for every number a command prints (JSON keeps the full values):
#   share   accuracy and agreement, a fraction shown as a percentage with 2 decimals: 99.46%
#   points  a difference of two percentages, in points, with the same 2 decimals: 0.12
#   error   differences and tolerances, 3 significant figures: 0.0409, 9.80e-07
#   ms      latency, 3 significant figures: 1.70, 24.1
#   cosine  6 decimals, so 0.999 (the FP16 floor) and 0.9989 never print alike: 0.999305
#   ratio   3 significant figures and an x: 0.353x
#   number  other measured quantities (images/s, seconds, MB), 3 significant figures
Kind = Literal["text", "int", "share", "points", "error", "ms", "cosine", "ratio",
               "number"]
SHARE_DECIMALS = 2
SIGNIFICANT = 3


def share(value: float) -> str:
    """A fraction as a percentage with a fixed number of decimals: 0.9946 -> ``99.46%``."""
    return f"{value * 100:.{SHARE_DECIMALS}f}%"


def significant(value: float, digits: int = SIGNIFICANT) -> str:
    """``digits`` significant figures, trailing zeros kept; scientific only when tiny or huge.

    Integers above the precision keep all their digits (1663, not 1.66e+03).
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3 or magnitude >= 6:
        return f"{value:.{digits - 1}e}"
    text = f"{value:.{max(0, digits - 1 - magnitude)}f}"
    # Rounding can carry into a new digit (9.996 -> 10.00): format the rounded value again.
    rounded = float(text)
    if rounded and math.floor(math.log10(abs(rounded))) != magnitude:
        return significant(rounded, digits)
    return text


def cosine(value: float) -> str:
    return f"{value:.6f}"


def ratio(value: float) -> str:
    return f"{significant(value)}x"


_FORMATS: dict[str, Callable[[float], str]] = {
    "share": share, "points": lambda v: f"{v:.{SHARE_DECIMALS}f}", "error": significant,
    "ms": significant, "cosine": cosine,
    "ratio": ratio, "number": significant, "int": lambda v: str(int(v)),
}


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header, how its numbers look (``kind``), and what
    it means when the header alone does not say (shown in the table's footer)."""

    key: str
    header: str
    kind: Kind = "text"
    means: str = ""


def cell(value: Any, kind: Kind = "text") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and kind in _FORMATS:
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return _FORMATS[kind](value)
    if isinstance(value, float):
        return significant(value)
    return str(value)


def _columns(columns: Sequence[Column | tuple[str, str]]) -> list[Column]:
    return [c if isinstance(c, Column) else Column(*c) for c in columns]


def footer(columns: Sequence[Column | tuple[str, str]]) -> str:
    """One line explaining every column whose header is not self-evident ("" when none)."""
    parts = [f"{c.header} = {c.means}" for c in _columns(columns) if c.means]
    return ("columns: " + "; ".join(parts)) if parts else ""


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column | tuple[str, str]],
                 *, explain: bool = True) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned, then the footer line.

    ``columns`` are :class:`Column` specs (plain ``(key, header)`` pairs are text columns).
    """
    cols = _columns(columns)
    cells = [[cell(row.get(c.key), c.kind) for c in cols] for row in rows]
    headers = [c.header for c in cols]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row.get(c.key), (int, float)) and not isinstance(row.get(c.key), bool)
                   for row in rows) for c in cols]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    lines = [line(headers), line(["-" * w for w in widths]), *map(line, cells)]
    note = footer(cols) if explain else ""
    return "\n".join(lines + ([note] if note else []))


def comparison_columns(between: str) -> list[Column]:
    """The columns every check shows, in one order and one wording (``between`` names the
    two sides, e.g. ``FP32 - INT8``)."""
    return [
        Column("top1_agreement", "matches on top-1", "share",
               "images where both pick the same class"),
        Column("top5_agreement", "matches on top-5", "share",
               "images whose five best classes are the same set"),
        Column("cosine_p1", "cosine p1", "cosine",
               "1st percentile of the per-image cosine of the logits: 99% of images are closer"),
        Column("cosine_min", "worst cosine", "cosine",
               "lowest per-image cosine (1 = same direction)"),
        Column("max_abs_diff", "largest abs diff", "error",
               f"largest |{between}| over every logit (also the smallest `atol` that passes)"),
    ]


def format_checks(title: str, checks: Sequence[CheckResult], between: str, *,
                  lead: Sequence[tuple[Column, Sequence[Any]]] = (), verdict: str = "check",
                  flags: Mapping[str, str] | None = None) -> str:
    """A block for one or more CheckResults: the title with the rules, a table (``lead``
    columns first, one value per check), and the verdict. On failure it names the loosest
    settings that would have passed, as ``flags`` (rule -> the option that sets it, only
    those the command accepts) spells them: a hint that, pasted back, passes."""
    rows = [{**{col.key: values[i] for col, values in lead}, **c.comparison.to_dict()}
            for i, c in enumerate(checks)]
    table = format_table(rows, [col for col, _ in lead] + comparison_columns(between))
    failed = [c for c in checks if not c]
    lines = [f"{title} ({checks[0].tolerance.describe()}):", table]
    if failed:
        hint = pass_hint(needed_by_all(failed), flags or {})
        lines.append(f"{verdict}: FAIL ({'; '.join(c.reason for c in failed)})"
                     + (f"; it would pass with {hint}" if hint else ""))
    else:
        lines.append(f"{verdict}: PASS")
    return "\n".join(lines)


def pass_hint(needed: Mapping[str, float], flags: Mapping[str, str]) -> str:
    """``--min-cosine 0.998763 --min-top1 0.9545``: each failing rule that has a flag, at
    its loosest passing value (:meth:`CheckResult.needed`), rounded towards passing (floors
    down, the absolute tolerance up) so that the printed value itself passes."""
    return " ".join(f"{flags[rule]} {_towards_passing(rule, value)}"
                    for rule, value in needed.items() if rule in flags)


def needed_by_all(failed: Sequence[CheckResult]) -> dict[str, float]:
    """The settings that pass every one of ``failed``: the loosest of each rule."""
    needed: dict[str, float] = {}
    for check in failed:
        for rule, value in check.needed().items():
            loosest = max if rule == "atol" else min
            needed[rule] = loosest(needed.get(rule, value), value)
    return needed


def _towards_passing(rule: str, value: float) -> str:
    if rule == "atol":
        if value <= 0:
            return "0"
        step = 10.0 ** (math.floor(math.log10(value)) - SIGNIFICANT + 1)
        return significant(math.ceil(value / step) * step)
    decimals = 6 if rule == "min_cosine" else 4
    return f"{math.floor(value * 10 ** decimals) / 10 ** decimals:.{decimals}f}"


def format_markdown(rows: Sequence[dict[str, Any]],
                    columns: Sequence[Column | tuple[str, str]]) -> str:
    """The same table in Markdown, its footer as a paragraph below it."""
    cols = _columns(columns)
    head = "| " + " | ".join(c.header for c in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(cell(row.get(c.key), c.kind).replace("|", "\\|") for c in cols)
            + " |" for row in rows]
    note = footer(cols)
    return "\n".join([head, rule, *body]) + "\n" + (f"\n{note}\n" if note else "")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


PLOT_INSTALL_HINT = "pip install 'resnet-deploy[plot]' (matplotlib)"


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when a plot was asked for and cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"`plot` needs matplotlib, which is not installed; "
                        f"{PLOT_INSTALL_HINT}") from None


def plot_bench(rows: Sequence[dict[str, Any]], path: str | Path, *,
               machine: dict[str, Any] | None = None, when: date | None = None) -> None:
    """PNG: p50 latency against batch size (left), throughput per batch size (right).

    ``rows`` are bench results (``model``, ``provider``, ``batch_size``, ``p10_ms``,
    ``p50_ms``, ``p90_ms``, ``throughput_ips``); one line and one bar colour per
    model@provider. Error bars span p10 to p90 (and the throughput those latencies give),
    so a busy machine shows as long bars; the title names the CPU, its int8 path and the date.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .machine import describe

    path = Path(path)
    labels = list(dict.fromkeys(f"{Path(r['model']).name}@{r['provider']}" for r in rows))
    batches = sorted({int(r["batch_size"]) for r in rows})
    by_key = {(f"{Path(r['model']).name}@{r['provider']}", int(r["batch_size"])): r for r in rows}
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 5))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [b for b in batches if (label, b) in by_key]
        picked = [by_key[label, b] for b in xs]
        p50 = [r["p50_ms"] for r in picked]
        low = [r["p50_ms"] - r.get("p10_ms", r["p50_ms"]) for r in picked]
        high = [r["p90_ms"] - r["p50_ms"] for r in picked]
        lat.errorbar(xs, p50, yerr=[low, high], marker="o", capsize=3, label=label)
        ips = [r["throughput_ips"] for r in picked]
        ips_low = [ips_ - b * 1000.0 / r["p90_ms"]
                   for ips_, b, r in zip(ips, xs, picked, strict=True)]
        ips_high = [b * 1000.0 / r.get("p10_ms", r["p50_ms"]) - ips_
                    for ips_, b, r in zip(ips, xs, picked, strict=True)]
        thr.bar([batches.index(b) + (i - (len(labels) - 1) / 2) * width for b in xs], ips,
                width=width, yerr=[ips_low, ips_high], capsize=3, label=label)
    lat.set(xlabel="batch size", ylabel="latency per call, ms (p50; bars p10 to p90)",
            title="Latency")
    if len(batches) > 1:
        lat.set_xscale("log", base=2)
        lat.set_yscale("log")
        lat.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    lat.set_xticks(batches, [str(b) for b in batches])
    lat.grid(True, alpha=0.3)
    thr.set(xlabel="batch size", ylabel="images/s at p50 (bars: at p90 to p10)",
            title="Throughput")
    thr.set_xticks(range(len(batches)), [str(b) for b in batches])
    thr.grid(True, axis="y", alpha=0.3)
    for axes in (lat, thr):
        axes.legend(fontsize=8)
    fig.suptitle(f"{describe(machine) if machine else describe()}; "
                 f"{(when or date.today()).isoformat()}", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
