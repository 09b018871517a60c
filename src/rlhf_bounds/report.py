"""Summaries of results: per-term statistics by regime, as rows and as a printed table."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from . import bounds
from .results import Results, StudyResults
from .spec import Spec

__all__ = ["TERMS", "CHECKS", "VERDICTS", "Check", "term_stats", "summary_rows", "valid_shrink_factor", "verdict",
           "coverage_rows", "format_table", "markdown_table", "summarise", "verdict_rows", "summary_markdown",
           "write_report"]

#: The decomposition columns summarised by default (docs/theory.md §1).
TERMS = ("J_hat", "J_star", "gap_total", "gap_sampling", "gap_reward_shift", "gap_clipping", "gap_total_train")


#: Relative round-off allowed to a deterministic check (B1's exact inequalities evaluated in
#: float32): the two sides are means over M·A atoms summed in different orders, a relative
#: error of order log2(M·A)·2⁻²⁴ ≈ 1e-6 at W1's shape; 1e-5 leaves ten times that.
ROUND_OFF = 1e-5


class Check(NamedTuple):
    """A bound set beside the actual value it bounds: violated when |actual| > bound.

    ``delta_share``: the part of the spec's δ this bound is stated at (B7 and B2's levels use
    δ/2), so its violation rate is judged against ``delta_share``·δ.
    """

    label: str
    actual: str
    bound: str
    deterministic: bool = False  # holds on every problem (no δ), so any violation is a bug
    misuse: bool = False         # a bound applied outside its conditions, shown as a stress case
    delta_share: float = 1.0


#: The coverage checks (docs/theory.md §11): every rigorous bound of the catalogue, each PAC-Bayes
#: level on its own, B7's radius alone, and B1 used on the training sample (a misuse).
CHECKS = (
    Check("B1 total", "gap_total", "b1_total"),
    Check("B1 sampling", "gap_sampling", "b1_sampling"),
    Check("B1 reward shift", "gap_reward_shift", "b1_reward_shift", deterministic=True),
    Check("B1 clipping", "gap_clipping", "b1_clipping", deterministic=True),
    Check("B1 certified (B7)", "gap_total", "b1_total_certified"),
    Check("B7 radius", "b7_error_v", "b7_radius", delta_share=0.5),
    Check("B2 Occam", "gap_total_occam", "b2_occam_total"),
    Check("B2 Occam prompt level", "gap_sampling_prompt_occam", "b2_occam_prompt", delta_share=0.5),
    Check("B2 Occam rollout level", "gap_sampling_rollout_occam", "b2_occam_rollout", delta_share=0.5),
    Check("B2 Gaussian", "gap_total_gauss", "b2_gauss_total"),
    Check("B1 on train (misuse)", "gap_total_train", "b1_total", misuse=True),
)

#: Verdicts, in the order tables and figures list them.
VERDICTS = ("holds", "not enough problems", "vacuous", "refuted", "holds (misuse)", "fails (misuse)")


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


def _regimes(results: Results | StudyResults):
    return results.items() if isinstance(results, StudyResults) else [("run", results)]


def summary_rows(results: Results | StudyResults, terms: Iterable[str] = TERMS) -> list[dict]:
    """One row per (regime, term) over the problems with no status flag; flagged problems are counted apart."""
    rows = []
    for name, res in _regimes(results):
        ok = res.ok
        for term in terms:
            if term not in res.columns:
                continue
            rows.append({"regime": name, "term": term, "n_ok": int(ok.sum()), "n_flagged": int((~ok).sum()),
                         **term_stats(res[term][ok])})
    return rows


def valid_shrink_factor(actual: np.ndarray, bound: np.ndarray, delta: float, *, resamples: int = 200,
                        seed: int = 0) -> tuple[float, float, float]:
    """c* = the empirical (1 − δ)-quantile of |actual|/bound, with a bootstrap 95% interval over problems.

    c·bound still has violation rate ≤ δ here for every c ≥ c*, so c* ≪ 1 measures the bound's
    slack (docs/theory.md §11). Problems whose bound is infinite count as ratio 0 (never
    violated); a zero bound with a non-zero actual as +∞. Returns (c*, lo, hi); NaN without
    problems.
    """
    a = np.abs(np.asarray(actual, np.float64))
    b = np.asarray(bound, np.float64)
    if a.size == 0:
        return (np.nan, np.nan, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isinf(b), 0.0, np.where(b > 0, a / np.where(b > 0, b, 1.0), np.where(a > 0, np.inf, 0.0)))
    q = 1.0 - delta
    point = float(np.quantile(ratio, q, method="higher"))
    rng = np.random.default_rng(seed)
    boot = [np.quantile(ratio[rng.integers(0, ratio.size, ratio.size)], q, method="higher") for _ in range(resamples)]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return point, float(lo), float(hi)


def _violations(actual: np.ndarray, bound: np.ndarray, deterministic: bool) -> int:
    if deterministic:
        # An exact inequality between two float32 population means of the same per-atom
        # magnitudes (docs/theory.md): where it is tight, summation order alone can put
        # |actual| an ulp or so above the bound; only a larger excess is a violation.
        return int(np.sum(actual > bound * (1.0 + ROUND_OFF)))
    return int(np.sum(actual > bound))


def verdict(k: int, n: int, delta: float, *, deterministic: bool = False, misuse: bool = False,
            vacuous: bool = False, alpha: float = 0.05) -> str:
    """The verdict on a bound with ``k`` violations in ``n`` problems at level ``delta``.

    * ``refuted``: the one-sided (1 − alpha) Clopper-Pearson lower limit of the violation rate
      exceeds δ (for a deterministic inequality: any violation beyond round-off);
    * ``holds``: the one-sided upper limit is at most δ (the rate is below δ at 95% confidence;
      a deterministic inequality with no violation);
    * ``not enough problems``: neither: the interval still straddles δ;
    * ``vacuous``: the bound is +∞ on most problems (it says nothing);
    * for a misuse (a bound applied outside its conditions): ``fails (misuse)`` when refuted,
      else ``holds (misuse)``.
    """
    if n == 0:
        return "not enough problems"
    lower = float(bounds.clopper_pearson_lower(k, n, alpha))
    upper = float(bounds.clopper_pearson_upper(k, n, alpha))
    if misuse:
        return "fails (misuse)" if lower > delta else "holds (misuse)"
    if deterministic:
        return "refuted" if k else "holds"
    if vacuous:
        return "vacuous"
    if lower > delta:
        return "refuted"
    return "holds" if upper <= delta else "not enough problems"


def coverage_rows(results: Results | StudyResults, checks: Iterable[Check] = CHECKS, alpha: float = 0.05,
                  shrink: bool = False) -> list[dict]:
    """Per regime and check: violations of |actual| ≤ bound over status-0 problems, their rate with
    one-sided Clopper-Pearson (1 − alpha) limits, the :func:`verdict`, and tightness (bound/|actual|).

    With ``shrink``, also the valid-shrink factor c* with its bootstrap interval
    (:func:`valid_shrink_factor`) and the power check: the same test applied to the bound
    shrunk to c*/2 (``power_verdict``: ``refuted`` shows the check can see a bound that is too
    small).
    """
    rows = []
    for name, res in _regimes(results):
        ok = res.ok
        spec_delta = float(res.record["spec"]["delta"])
        for c in checks:
            if c.actual not in res.columns or c.bound not in res.columns:
                continue
            delta = spec_delta * c.delta_share
            actual = np.abs(res[c.actual][ok].astype(np.float64))
            bound = res[c.bound][ok].astype(np.float64)
            n = int(actual.size)
            if n and not c.deterministic and not np.any(bound) and not np.any(actual):
                continue  # does not apply here (B7 for the oracle reward: nothing to certify)
            k = _violations(actual, bound, c.deterministic)
            finite = np.isfinite(bound)
            vacuous = bool(n) and finite.mean() < 0.5
            ratio = bound[finite] / np.maximum(actual[finite], 1e-12)
            row = {"regime": name, "check": c.label, "n": n, "violations": k, "rate": k / n if n else np.nan,
                   "cp_upper": float(bounds.clopper_pearson_upper(k, n, alpha)) if n else np.nan,
                   "cp_lower": float(bounds.clopper_pearson_lower(k, n, alpha)) if n else np.nan,
                   "delta": delta, "deterministic": c.deterministic, "misuse": c.misuse,
                   "verdict": verdict(k, n, delta, deterministic=c.deterministic, misuse=c.misuse, vacuous=vacuous,
                                      alpha=alpha),
                   "actual_median": float(np.median(actual)) if n else np.nan,
                   "bound_median": float(np.median(bound)) if n else np.nan,
                   "tightness_median": float(np.median(ratio)) if ratio.size else np.inf}
            if shrink and n and not c.deterministic:
                cstar, lo, hi = valid_shrink_factor(actual, bound, delta)
                row.update(shrink=cstar, shrink_lo=lo, shrink_hi=hi)
                if 0 < cstar < np.inf:
                    kp = _violations(actual, 0.5 * cstar * bound, False)
                    row.update(power_violations=kp, power_verdict=verdict(kp, n, delta, alpha=alpha))
            rows.append(row)
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


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Render ``rows`` as a Markdown table; ``columns`` are (key, header, format) as in :func:`format_table`."""
    def cell(row, k, fmt):
        v = row.get(k)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return (format(v, fmt) if fmt else str(v)).replace("|", "\\|")
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"
    body = ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


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
    return ("Actual gap terms (docs/theory.md §1)\n" + terms_table +
            "\n\nBounds beside the actual values (violation: |actual| > bound; CP95: one-sided "
            "Clopper-Pearson)\n" + cov_table)


# ---- the report of a suite: summary.md and figures, rebuilt from saved results only ----------

def _suite_of(study: StudyResults):
    from . import suites
    return suites.SUITES.get(study.record.get("suite"))


def verdict_rows(study: StudyResults) -> list[dict]:
    """Every check of the study's suite (or, for a custom study, the coverage checks), as verdict rows."""
    from .suites._checks import coverage_verdicts
    s = _suite_of(study)
    checks = s.checks if s is not None else (coverage_verdicts,)
    return [row for check in checks for row in check(study)]


def _grid_rows(study: StudyResults) -> list[dict]:
    default = Spec().to_dict()
    rows = []
    for name in study.expected:
        res = study.regimes.get(name)
        spec = res.spec.to_dict() if res is not None else {}
        changes = ", ".join(f"{k}={v}" for k, v in spec.items() if k in default and default[k] != v)
        swept = study.swept(name)
        rows.append({"regime": name, "problems": len(res) if res is not None else 0,
                     "swept": ", ".join(f"{k}={v}" for k, v in swept.items()),
                     "changes": changes or "defaults"})
    return rows


def _machine(study: StudyResults) -> str:
    for res in study.regimes.values():
        m = res.record.get("machine") or {}
        if m:
            return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('backend', '?')} "
                    f"({len(m.get('devices', []))} device(s)), JAX {m.get('jax', '?')}, rlhf-bounds "
                    f"{m.get('rlhf_bounds', '?')}")
    return "unknown"


def summary_markdown(study: StudyResults, figure_files: list[tuple[str, str]] = ()) -> str:
    """The suite's report as Markdown: claim, grid, headline table, each verdict with its evidence,
    the figures. Built from the saved results alone, so a rebuild gives the same text."""
    s = _suite_of(study)
    name = study.record.get("suite", "custom")
    lines = [f"# Suite `{name}`", ""]
    prof = study.record.get("profile")
    lines.append(f"Profile `{prof or 'custom'}`, seed {study.record.get('seed')}, "
                 f"{sum(len(r) for r in study.regimes.values())} problems in {len(study.regimes)} regime(s); "
                 f"machine: {_machine(study)}.")
    lines.append("")
    if s is not None:
        lines += [f"**Claim.** {s.claim}", ""]
    if not study.complete:
        lines += [f"**Partial results.** Missing: {'; '.join(study.missing)}. Rerun the command that made this "
                  "folder to finish it; the verdicts below cover only what is here.", ""]
    lines += ["## Grid", "", markdown_table(_grid_rows(study), [("regime", "regime", ""), ("problems", "problems", "d"),
                                                                 ("swept", "swept", ""),
                                                                 ("changes", "spec fields not at their default", "")]),
              ""]
    if s is not None and s.headline is not None:
        lines += ["## Headline", "", s.headline(study), ""]
    rows = verdict_rows(study)
    if rows:
        counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
        lines += ["## Verdicts", "", ", ".join(f"{v}: {c}" for v, c in counts.items() if c) + ".", "",
                  "A bound *holds* when the one-sided 95% Clopper-Pearson upper limit of its violation rate is at "
                  "most its δ, is *refuted* when the lower limit exceeds δ, and there are *not enough problems* "
                  "when the interval straddles δ (docs/theory.md §11).", "",
                  markdown_table(rows, [("check", "check", ""), ("regime", "regime", ""), ("verdict", "verdict", ""),
                                        ("evidence", "evidence", "")]), ""]
    if figure_files:
        lines += ["## Figures", ""]
        for fname, caption in figure_files:
            lines += [f"![{caption}](figures/{fname}.png)", "", f"*{fname}*: {caption} "
                      f"([PDF](figures/{fname}.pdf))", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(study: StudyResults) -> Path:
    """Write ``summary.md`` and every figure of the study's suite into its folder; returns the summary's path."""
    from . import plots, store
    if study.path is None:
        raise ValueError("write_report needs a study loaded from (or saved to) a folder")
    s = _suite_of(study)
    made = []
    for fig in (s.figures if s is not None else ()):
        with plots.style():
            plots.save(fig.draw(study), store.figures_folder(study.path), fig.name)
        made.append((fig.name, fig.caption))
    path = store.summary_path(study.path)
    text = summary_markdown(study, made)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


#: Short forms of the verdicts for the terminal's verdict map.
SHORT = {"holds": "holds", "not enough problems": "n/e", "vacuous": "vacuous", "refuted": "REFUTED",
         "holds (misuse)": "holds*", "fails (misuse)": "fails*"}


def verdict_map(study: StudyResults) -> str:
    """The verdicts as a regime × check text table (n/e: not enough problems; *: a misuse, shown as a stress case)."""
    rows = verdict_rows(study)
    checks = list(dict.fromkeys(r["check"] for r in rows))
    table = []
    for regime in study.expected:
        by = {r["check"]: SHORT.get(r["verdict"], r["verdict"]) for r in rows if r["regime"] == regime}
        table.append({"regime": regime, **{c: by.get(c, "") for c in checks}})
    return format_table(table, [("regime", "regime", "")] + [(c, c, "") for c in checks])


def suite_text(study: StudyResults) -> str:
    """What the command line prints after a suite: its headline table and the verdict map."""
    s = _suite_of(study)
    parts = []
    if s is not None and s.headline is not None:
        parts += [f"{s.name}: {s.claim}", "", s.headline(study), ""]
    parts += ["Verdicts (n/e: not enough problems to tell; *: a bound used outside its conditions; the evidence "
              "for each is in summary.md)", verdict_map(study)]
    if not study.complete:
        parts += ["", f"PARTIAL: missing {'; '.join(study.missing)}"]
    return "\n".join(parts)
