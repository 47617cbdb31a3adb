"""Logit comparison: error statistics, tolerances by precision, and the verdict.

Kept apart from :mod:`parity` because export and quantize check their own outputs with the
same arithmetic before parity's multi-backend orchestration exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def round_sig(value: float) -> float:
    """Six significant digits: enough for any report, short enough to read in JSON."""
    return float(f"{value:.6g}") if math.isfinite(value) else value


@dataclass(frozen=True)
class Comparison:
    """How far ``candidate`` logits are from ``reference`` logits, over ``n`` inputs.

    ``top5_agreement`` is the fraction of inputs whose five best classes are the same set.
    ``min_atol`` is the smallest absolute tolerance that the observed error would pass.
    """

    n: int
    max_abs_diff: float
    mean_abs_diff: float
    p99_abs_diff: float
    max_rel_diff: float
    cosine_min: float
    cosine_mean: float
    top1_agreement: float
    top5_agreement: float
    nonfinite: int
    reference_max_abs: float

    @property
    def min_atol(self) -> float:
        return self.max_abs_diff

    def to_dict(self) -> dict[str, Any]:
        data = {k: (round_sig(v) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}
        data["min_atol"] = round_sig(self.min_atol)
        return data


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def compare(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Compare two (N, classes) logit arrays."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape}, "
                         f"candidate {candidate.shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    nonfinite = int((~np.isfinite(cand)).sum())
    cand = np.nan_to_num(cand, nan=0.0, posinf=1e30, neginf=-1e30)
    diff = np.abs(ref - cand)
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(denom > 0, (ref * cand).sum(axis=1) / np.maximum(denom, 1e-300), 0.0)
    top5 = [set(a) == set(b) for a, b in zip(top_k(ref, 5), top_k(cand, 5))]
    return Comparison(
        n=len(ref),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        p99_abs_diff=float(np.percentile(diff, 99)),
        max_rel_diff=float(rel.max()),
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        top1_agreement=float((ref.argmax(1) == cand.argmax(1)).mean()),
        top5_agreement=float(np.mean(top5)),
        nonfinite=nonfinite,
        reference_max_abs=float(np.abs(ref).max()),
    )


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria. ``rtol`` is relative to the largest |reference logit|, so it scales
    with the model instead of with each (possibly near-zero) logit."""

    atol: float = 0.0
    rtol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

    def allowed_abs(self, cmp: Comparison) -> float | None:
        if self.rtol is None and self.atol == 0.0:
            return None
        return self.atol + (self.rtol or 0.0) * cmp.reference_max_abs

    def failures(self, cmp: Comparison) -> list[str]:
        """Human-readable reasons for failing; empty when ``cmp`` passes."""
        out = []
        if cmp.nonfinite:
            out.append(f"{cmp.nonfinite} NaN/Inf outputs")
        allowed = self.allowed_abs(cmp)
        if allowed is not None and cmp.max_abs_diff > allowed:
            out.append(f"max abs diff {cmp.max_abs_diff:.3g} > {allowed:.3g}")
        if self.min_cosine is not None and cmp.cosine_min < self.min_cosine:
            out.append(f"cosine {cmp.cosine_min:.6f} < {self.min_cosine}")
        if self.min_top1 is not None and cmp.top1_agreement < self.min_top1:
            out.append(f"top-1 agreement {cmp.top1_agreement:.2%} < {self.min_top1:.2%}")
        return out

    def describe(self) -> str:
        parts = []
        if self.rtol is not None or self.atol:
            parts.append(f"abs diff <= {self.atol:g} + {self.rtol or 0:g}*max|ref|")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {self.min_top1:.0%}")
        return ", ".join(parts) or "none"

    def override(self, *, atol: float | None = None, rtol: float | None = None,
                  min_cosine: float | None = None, min_top1: float | None = None) -> Tolerance:
        changes = {k: v for k, v in dict(atol=atol, rtol=rtol, min_cosine=min_cosine,
                                          min_top1=min_top1).items() if v is not None}
        return dataclasses.replace(self, **changes)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-4, min_top1=1.0),
    "fp16": Tolerance(min_cosine=0.999, min_top1=0.99),
    "int8": Tolerance(min_cosine=0.99, min_top1=0.97),
}
