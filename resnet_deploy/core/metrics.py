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
    ``cosine_p1`` is the 1st percentile of the per-input cosine: unlike the minimum, it does
    not keep falling as more inputs are compared, so an INT8 verdict does not depend on how
    many photos were checked.
    """

    n: int
    max_abs_diff: float
    mean_abs_diff: float
    p99_abs_diff: float
    max_rel_diff: float
    cosine_min: float
    cosine_p1: float
    cosine_mean: float
    top1_agreement: float
    top5_agreement: float
    nonfinite: int
    reference_max_abs: float

    @property
    def min_atol(self) -> float:
        """The smallest absolute tolerance the observed error passes."""
        return self.max_abs_diff

    @property
    def min_rtol(self) -> float:
        """The smallest tolerance relative to max |reference logit| that it passes."""
        return self.max_abs_diff / self.reference_max_abs if self.reference_max_abs else math.inf

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
    top5 = [set(a) == set(b) for a, b in zip(top_k(ref, 5), top_k(cand, 5), strict=True)]
    return Comparison(
        n=len(ref),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        p99_abs_diff=float(np.percentile(diff, 99)),
        max_rel_diff=float(rel.max()),
        cosine_min=float(cos.min()),
        cosine_p1=float(np.percentile(cos, 1)),
        cosine_mean=float(cos.mean()),
        top1_agreement=float((ref.argmax(1) == cand.argmax(1)).mean()),
        top5_agreement=float(np.mean(top5)),
        nonfinite=nonfinite,
        reference_max_abs=float(np.abs(ref).max()),
    )


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria. ``rtol`` is relative to the largest |reference logit|, so it scales
    with the model instead of with each (possibly near-zero) logit.

    The absolute rule is ``max abs diff <= atol + rtol * max|ref|`` as soon as either is
    set (the one not set counts as 0): ``atol=0`` alone demands exact equality, and FP32's
    ``rtol`` keeps its own rule when only ``atol`` is overridden. Neither set: no such rule.
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_cosine_p1: float | None = None
    min_top1: float | None = None

    def allowed_abs(self, cmp: Comparison) -> float | None:
        if self.atol is None and self.rtol is None:
            return None
        return (self.atol or 0.0) + (self.rtol or 0.0) * cmp.reference_max_abs

    def failures(self, cmp: Comparison) -> list[str]:
        """Human-readable reasons for failing; empty when ``cmp`` passes."""
        out = []
        if cmp.nonfinite:
            out.append(f"{cmp.nonfinite} NaN/Inf outputs")
        allowed = self.allowed_abs(cmp)
        if allowed is not None and cmp.max_abs_diff > allowed:
            out.append(f"max abs diff {cmp.max_abs_diff:.3g} > {allowed:.3g}")
        if self.min_cosine is not None and cmp.cosine_min < self.min_cosine:
            out.append(f"worst cosine {cmp.cosine_min:.6f} < {self.min_cosine}")
        if self.min_cosine_p1 is not None and cmp.cosine_p1 < self.min_cosine_p1:
            out.append(f"1st-percentile cosine {cmp.cosine_p1:.4f} < {self.min_cosine_p1}")
        if self.min_top1 is not None and cmp.top1_agreement < self.min_top1:
            out.append(f"top-1 agreement {cmp.top1_agreement:.2%} < {self.min_top1:.2%}")
        return out

    def describe(self) -> str:
        parts = []
        if self.atol is not None or self.rtol is not None:
            parts.append(f"abs diff <= {self.atol or 0:g} + {self.rtol or 0:g}*max|ref|")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.min_cosine_p1 is not None:
            parts.append(f"cosine p1 >= {self.min_cosine_p1:g}")
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {self.min_top1:.0%}")
        return ", ".join(parts) or "none"

    def override(self, *, atol: float | None = None, rtol: float | None = None,
                  min_cosine: float | None = None, min_top1: float | None = None) -> Tolerance:
        """Replace the given rules; ``min_cosine`` replaces whichever cosine rule is in force
        (the 1st percentile for INT8, the worst input otherwise)."""
        changes: dict[str, float] = {k: v for k, v in dict(atol=atol, rtol=rtol,
                                                            min_top1=min_top1).items()
                                     if v is not None}
        if min_cosine is not None:
            changes["min_cosine_p1" if self.min_cosine_p1 is not None else "min_cosine"] = \
                min_cosine
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CheckResult:
    """A comparison judged against a tolerance: the figures, the rules, the verdict, the
    reasons it failed, and the loosest settings it would have needed to pass.

    Its truth value is the verdict, so ``if not result:`` reads as "the check failed".
    """

    subject: str
    comparison: Comparison
    tolerance: Tolerance
    failures: tuple[str, ...]

    @classmethod
    def judge(cls, subject: str, reference: np.ndarray, candidate: np.ndarray,
              tolerance: Tolerance) -> CheckResult:
        cmp = compare(reference, candidate)
        return cls(subject, cmp, tolerance, tuple(tolerance.failures(cmp)))

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    @property
    def reason(self) -> str:
        return "; ".join(self.failures)

    def needed(self) -> dict[str, float]:
        """For each rule these figures fail, the loosest setting they would pass: ``atol``,
        ``min_cosine`` (the cosine rule in force) and ``min_top1``, the override names that
        parity, quantize and the pipeline share. NaN/Inf outputs pass no setting."""
        cmp, tol, out = self.comparison, self.tolerance, {}
        allowed = tol.allowed_abs(cmp)
        if allowed is not None and cmp.max_abs_diff > allowed:
            out["atol"] = cmp.max_abs_diff
        if tol.min_cosine is not None and cmp.cosine_min < tol.min_cosine:
            out["min_cosine"] = cmp.cosine_min
        if tol.min_cosine_p1 is not None and cmp.cosine_p1 < tol.min_cosine_p1:
            out["min_cosine"] = cmp.cosine_p1
        if tol.min_top1 is not None and cmp.top1_agreement < tol.min_top1:
            out["min_top1"] = cmp.top1_agreement
        return out

    def judged_on(self) -> dict[str, float]:
        """The figure behind each rule in force: what the verdict rests on (max abs diff for
        FP32, the worst cosine for FP16, the 1st-percentile cosine for INT8, top-1)."""
        cmp, tol, out = self.comparison, self.tolerance, {}
        if tol.allowed_abs(cmp) is not None:
            out["max_abs_diff"] = cmp.max_abs_diff
        if tol.min_cosine is not None:
            out["cosine_min"] = cmp.cosine_min
        if tol.min_cosine_p1 is not None:
            out["cosine_p1"] = cmp.cosine_p1
        if tol.min_top1 is not None:
            out["top1_agreement"] = cmp.top1_agreement
        return out

    def would_pass(self) -> dict[str, float]:
        """The tightest settings of each rule that these figures still meet."""
        cmp = self.comparison
        return {"atol": round_sig(cmp.min_atol), "rtol": round_sig(cmp.min_rtol),
                "min_cosine": round_sig(cmp.cosine_min),
                "min_cosine_p1": round_sig(cmp.cosine_p1),
                "min_top1": round_sig(cmp.top1_agreement)}

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, **self.comparison.to_dict(),
                "tolerance": self.tolerance.describe(), "passed": self.passed,
                "failures": list(self.failures), "would_pass": self.would_pass(),
                "needed": {k: round_sig(v) for k, v in self.needed().items()},
                "judged_on": {k: round_sig(v) for k, v in self.judged_on().items()}}


@dataclass(frozen=True)
class ToleranceOverrides:
    """Overrides applied on top of each precision's tolerance (``precisions``: only to
    those; None: to all). The pipeline's INT8 gate options reach INT8 models only."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    precisions: tuple[str, ...] | None = None

    def apply(self, base: Tolerance, precision: str | None = None) -> Tolerance:
        if self.precisions is not None and precision not in self.precisions:
            return base
        return base.override(atol=self.atol, rtol=self.rtol, min_cosine=self.min_cosine,
                             min_top1=self.min_top1)

    def for_precision(self, precision: str, kind: str = "logits") -> Tolerance:
        """The tolerance ``precision`` is judged by (see :func:`tolerance`), these overrides
        applied."""
        return self.apply(tolerance(precision, kind), precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# INT8 is judged on figures that do not drift with the number of images: top-1 agreement
# and the 1st percentile of the per-image cosine (the minimum keeps falling as photos are
# added: 0.993 on 744 photos, 0.990 on 5,000 for the same good model). Chosen on the CIFAR-10
# ResNet-18, 5,000 dev photos (agreement / cosine p1):
#   7-bit recipes (quantize's cpu target)          99.26-99.56% / 0.9978-0.9980  pass
#   8-bit weights on AVX2 (int16 saturation)       95.6%        / 0.836          fail
#   --method entropy (clips the post-ReLU tails)   91.98%       / 0.764          fail
# Either rule alone fails both bad models; 0.97 leaves room for 1000-class models, whose
# near-tied logits flip top-1 more often.
# From strictest to loosest: a pair is judged by the looser of its two precisions, so an
# FP32 model compared with an INT8 reference gets INT8's tolerance, as the other way round.
PRECISIONS = ("fp32", "fp16", "int8")


def looser(*precisions: str) -> str:
    """The precision a pair (or more) is judged by: the loosest of theirs."""
    return max(precisions, key=PRECISIONS.index)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-4, min_top1=1.0),
    "fp16": Tolerance(min_cosine=0.999, min_top1=0.99),
    "int8": Tolerance(min_cosine_p1=0.97, min_top1=0.97),
}


def hits(logits: np.ndarray, targets: np.ndarray, k: int) -> int:
    """How many rows have their target among the ``k`` largest logits."""
    return int((top_k(logits, k) == targets[:, None]).any(axis=1).sum())


def tolerance(precision: str, kind: str = "logits") -> Tolerance:
    """What an output of ``kind`` at ``precision`` must meet. An embedding (``features``)
    has no classes, so it is judged without top-1: by the absolute rule at FP32 and by
    cosine at FP16 and INT8, with the same floors, since a classifier's logits are a linear
    map of that embedding (its cosine bounds theirs)."""
    base = TOLERANCES[precision]
    return dataclasses.replace(base, min_top1=None) if kind == "features" else base
