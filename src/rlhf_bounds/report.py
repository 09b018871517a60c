"""Summaries of results: per-term statistics by regime, as rows and as a printed table."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from . import bounds

from .results import Results, StudyResults

__all__ = ["TERMS", "CHECKS", "Check", "term_stats", "summary_rows", "coverage_rows", "format_table", "summarise"]

#: The decomposition columns summarised by default (THEORY.md §6).
TERMS = ("J_hat", "J_star", "gap_total", "gap_sampling", "gap_reward_shift", "gap_clipping", "gap_total_train")


#: Relative round-off allowed to a deterministic check (THEORY's exact inequalities evaluated in
#: float32): the two sides are means over M·A atoms summed in different orders, a relative
#: error of order log2(M·A)·2⁻²⁴ ≈ 1e-6 at W1's shape; 1e-5 leaves ten times that.
ROUND_OFF = 1e-5


class Check(NamedTuple):
    """A bound set beside the actual value it bounds: violated when |actual| > bound."""

    label: str
    actual: str
    bound: str
    deterministic: bool = False  # holds on every problem (no δ), so any violation is a bug
    misuse: bool = False         # a bound applied outside its conditions, shown as a stress case


#: The coverage checks of THEORY.md §8.1 (and the B1 misuse of §7).
CHECKS = (
    Check("B1 total", "gap_total", "b1_total"),
    Check("B1 sampling", "gap_sampling", "b1_sampling"),
    Check("B1 reward shift", "gap_reward_shift", "b1_reward_shift", deterministic=True),
    Check("B1 clipping", "gap_clipping", "b1_clipping", deterministic=True),
    Check("B1 certified (B7)", "gap_total", "b1_total_certified"),
    Check("B2 Occam", "gap_total_occam", "b2_occam_total"),
    Check("B2 Gaussian", "gap_total_gauss", "b2_gauss_total"),
    Check("B1 on train (misuse)", "gap_total_train", "b1_total", misuse=True),
)


def term_stats(values: np.ndarray) -> dict[str, float]:
    """Mean, its standard error, and the 5th and 95th percentiles of finite ``values``."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        return {"mean": np.nan, "se": np.nan, "p5": np.nan, "p95": np.nan}
    return {
        "mean": float(v.mean()),
        "se": float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan,
        "p5": float(np.percentile(v, 5)),
        "p95": float(np.percentile(v, 95)),
    }


def summary_rows(results: Results | StudyResults, terms: Iterable[str] = TERMS) -> list[dict]:
    """One row per (regime, term) over the problems with no status flag; flagged problems are counted apart."""
    regimes = results.items() if isinstance(results, StudyResults) else [("run", results)]
    rows = []
    for name, res in regimes:
        ok = res.ok
        for term in terms:
            if term not in res.columns:
                continue
            rows.append({"regime": name, "term": term, "n_ok": int(ok.sum()), "n_flagged": int((~ok).sum()),
                         **term_stats(res[term][ok])})
    return rows


def coverage_rows(results: Results | StudyResults, checks: Iterable[Check] = CHECKS,
                  alpha: float = 0.05) -> list[dict]:
    """Per regime and check: violations of |actual| ≤ bound over status-0 problems, their rate with a
    one-sided Clopper-Pearson (1 − alpha) upper limit, the verdict, and tightness (bound/|actual|).

    A bound is *refuted* when the Clopper-Pearson lower limit of its violation rate exceeds δ
    (for a deterministic inequality: any violation at all, beyond a relative round-off of
    ``ROUND_OFF``, since both sides are float32 sums of the same terms).
    """
    regimes = results.items() if isinstance(results, StudyResults) else [("run", results)]
    rows = []
    for name, res in regimes:
        ok = res.ok
        delta = float(res.record["spec"]["delta"])
        for c in checks:
            if c.actual not in res.columns or c.bound not in res.columns:
                continue
            actual = np.abs(res[c.actual][ok].astype(np.float64))
            bound = res[c.bound][ok].astype(np.float64)
            n = int(actual.size)
            if c.deterministic:
                # An exact inequality between two float32 population means of the same per-atom
                # magnitudes (docs/theory.md): where it is tight, summation order alone can put
                # |actual| an ulp or so above the bound; only a larger excess is a violation.
                k = int(np.sum(actual > bound * (1.0 + ROUND_OFF)))
            else:
                k = int(np.sum(actual > bound))
            lower = float(bounds.clopper_pearson_lower(k, n, alpha)) if n else np.nan
            upper = float(bounds.clopper_pearson_upper(k, n, alpha)) if n else np.nan
            if c.deterministic:
                verdict = "REFUTED" if k else "holds"
            else:
                verdict = "REFUTED" if lower > delta else "holds"
            if c.misuse:
                verdict = ("fails" if lower > delta else "holds") + " (misuse)"
            finite = np.isfinite(bound)
            ratio = bound[finite] / np.maximum(actual[finite], 1e-12)
            rows.append({"regime": name, "check": c.label, "n": n, "violations": k, "rate": k / n if n else np.nan,
                         "cp_upper": upper, "cp_lower": lower, "delta": delta, "verdict": verdict,
                         "actual_median": float(np.median(actual)) if n else np.nan,
                         "bound_median": float(np.median(bound)) if n else np.nan,
                         "tightness_median": float(np.median(ratio)) if ratio.size else np.inf})
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Render ``rows`` as a fixed-width text table; ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("" if row.get(k) is None else format(row[k], fmt) if fmt else str(row[k]))
                      for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarise(results: Results | StudyResults, terms: Iterable[str] = TERMS) -> str:
    """The printed summary of a run or study: the actual terms (mean ± se, p5, p95, flagged count per
    regime), then every bound beside the value it bounds with its violation rate and interval."""
    terms_table = format_table(summary_rows(results, terms), [
        ("regime", "regime", ""), ("term", "term", ""), ("mean", "mean", "+.4f"), ("se", "se", ".4f"),
        ("p5", "p5", "+.4f"), ("p95", "p95", "+.4f"), ("n_ok", "ok", "d"), ("n_flagged", "flagged", "d"),
    ])
    cov = coverage_rows(results)
    if not cov:
        return terms_table
    cov_table = format_table(cov, [
        ("regime", "regime", ""), ("check", "bound", ""), ("actual_median", "|actual| p50", ".4f"),
        ("bound_median", "bound p50", ".4f"), ("tightness_median", "bound/actual p50", ".3g"),
        ("violations", "violations", "d"), ("n", "of", "d"), ("rate", "rate", ".4f"),
        ("cp_upper", "CP95 upper", ".4f"), ("delta", "δ", "g"), ("verdict", "verdict", ""),
    ])
    return ("Actual gap terms (THEORY.md §6)\n" + terms_table +
            "\n\nBounds beside the actual values (violation: |actual| > bound; CP95: one-sided "
            "Clopper-Pearson)\n" + cov_table)
