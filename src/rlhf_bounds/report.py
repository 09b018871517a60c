"""Summaries of results: per-term statistics by regime, as rows and as a printed table."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .results import Results, StudyResults

__all__ = ["TERMS", "term_stats", "summary_rows", "format_table", "summarise"]

#: The decomposition columns summarised by default (THEORY.md §6).
TERMS = ("J_hat", "J_star", "gap_total", "gap_sampling", "gap_reward_shift", "gap_clipping", "gap_total_train",
         "gap_sampling_train")


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
    """The printed summary of a run or study: per regime and term, mean ± se, p5, p95, flagged count."""
    rows = summary_rows(results, terms)
    return format_table(rows, [
        ("regime", "regime", ""), ("term", "term", ""), ("mean", "mean", "+.4f"), ("se", "se", ".4f"),
        ("p5", "p5", "+.4f"), ("p95", "p95", "+.4f"), ("n_ok", "ok", "d"), ("n_flagged", "flagged", "d"),
    ])
