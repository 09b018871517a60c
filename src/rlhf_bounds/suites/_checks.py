"""Checks that suites share: functions from loaded results to verdict rows.

A verdict row is a dict with at least ``check``, ``regime``, ``verdict`` (one of
:data:`rlhf_bounds.report.VERDICTS`) and ``evidence`` (one sentence a reviewer can verify); the
report renders them. Numbers the figures need ride along (``rate``, ``cp_lower``, ``shrink`` ...).
"""

from __future__ import annotations

import numpy as np

from .. import bounds
from ..report import CHECKS, coverage_rows
from ..results import StudyResults

__all__ = ["identity_verdicts", "coverage_verdicts", "investigate", "EPS32"]

EPS32 = float(np.finfo(np.float32).eps)

#: The decomposition identities: (total, its parts).
IDENTITIES = (("gap_total", ("gap_sampling", "gap_reward_shift", "gap_clipping")),
              ("gap_sampling", ("gap_sampling_prompt", "gap_sampling_rollout")),
              ("gap_total_train", ("gap_sampling_train", "gap_reward_shift_train", "gap_clipping_train")))


def identity_verdicts(study: StudyResults) -> list[dict]:
    """G = sampling + reward shift + clipping (and the sampling split), on every problem, to float32
    round-off: 64·eps32 times the size of the terms (each is a mean of float32 values over a few
    thousand atoms, summed in another order than the total)."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        worst, n = 0.0, int(ok.sum())
        for total, parts in IDENTITIES:
            if total not in res.columns or not all(p in res.columns for p in parts):
                continue
            t = res[total][ok].astype(np.float64)
            ps = [res[p][ok].astype(np.float64) for p in parts]
            scale = np.abs(t) + sum(np.abs(p) for p in ps) + 1.0
            worst = max(worst, float(np.max(np.abs(t - sum(ps)) / (64 * EPS32 * scale), initial=0.0)))
        rows.append({"check": "decomposition adds up", "regime": name, "n": n,
                     "verdict": "holds" if worst <= 1.0 else "refuted",
                     "evidence": f"largest |G − Σ terms| is {worst:.2f} × the float32 tolerance (64·eps·scale) "
                                 f"over {n} problems"})
    return rows


def coverage_verdicts(study: StudyResults, checks=CHECKS, shrink: bool = True) -> list[dict]:
    """Every check's verdict per regime (:func:`rlhf_bounds.report.coverage_rows`), with its evidence:
    the violation count and Clopper-Pearson interval, the valid-shrink factor and the power check,
    and for a refuted bound what was checked to tell a bug from a finding (:func:`investigate`)."""
    cache = study.__dict__.setdefault("_verdict_cache", {})  # figures and tables ask again: compute once
    key = (tuple(checks), shrink)
    if key in cache:
        return [dict(r) for r in cache[key]]
    rows = coverage_rows(study, checks, shrink=shrink)
    by_label = {c.label: c for c in checks}
    for row in rows:
        ev = (f"{row['violations']} of {row['n']} problems violate (rate {row['rate']:.4f}, one-sided 95% CP "
              f"[{row['cp_lower']:.4f}, {row['cp_upper']:.4f}]) against δ = {row['delta']:g}")
        if row["deterministic"]:
            ev = (f"{row['violations']} of {row['n']} problems exceed the bound by more than round-off "
                  "(a deterministic inequality: any violation is a bug)")
        if "shrink" in row:
            ev += f"; valid-shrink factor c* = {row['shrink']:.3g} [{row['shrink_lo']:.3g}, {row['shrink_hi']:.3g}]"
        if "power_verdict" in row:
            ev += f"; the bound shrunk to c*/2 is {row['power_verdict']} ({row['power_violations']} violations)"
        if row["verdict"] in ("refuted", "fails (misuse)"):
            ev += "; " + investigate(study[row["regime"]], by_label[row["check"]])
        row["evidence"] = ev
    cache[key] = rows
    return [dict(r) for r in rows]


def investigate(res, check) -> str:
    """What tells a bug from a finding for a violated check: the violations in two independent halves
    of the problems (a replicate of the same regime), and, for B1, the bound recomputed in NumPy
    from the saved population values (the reference computation) and its deterministic terms."""
    ok = res.ok
    actual = np.abs(res[check.actual][ok].astype(np.float64))
    bound = res[check.bound][ok].astype(np.float64)
    halves = []
    problem = res["problem"][ok]
    for parity in (0, 1):
        m = problem % 2 == parity
        k, n = int(np.sum(actual[m] > bound[m])), int(m.sum())
        halves.append(f"{k}/{n} (CP lower {float(bounds.clopper_pearson_lower(k, n, 0.05)) if n else float('nan'):.3f})")
    out = f"replicates (even / odd problems): {halves[0]} and {halves[1]}"
    if check.bound == "b1_total" and all(c in res.columns for c in ("reward_range", "log_ratio_range", "tail_excess")):
        out += "; " + _b1_reference(res, ok)
    return out


def _b1_reference(res, ok) -> str:
    """B1 recomputed with NumPy from the saved population values, against the saved column."""
    spec = res.record["spec"]
    beta, tau, n, K, delta = (float(spec[k]) for k in ("beta", "tau", "prompts", "rollouts", "delta"))
    width = res["reward_range"][ok] + 2 * beta * np.minimum(tau, res["log_ratio_range"][ok].astype(np.float64))
    alpha = np.sqrt(np.log(4 / delta) / (2 * n)) + np.sqrt(np.log(4 / delta) / (2 * n * K))
    chi2 = np.expm1(res["log1p_chi2"][ok].astype(np.float64))
    ref = width * alpha + np.sqrt(1 + chi2) * np.sqrt(res["l2_train"][ok].astype(np.float64)) + \
        beta * res["tail_excess"][ok]
    saved = res["b1_total"][ok].astype(np.float64)
    finite = np.isfinite(ref) & np.isfinite(saved)
    diff = float(np.max(np.abs(ref[finite] - saved[finite]) / np.maximum(np.abs(ref[finite]), 1e-12), initial=0.0))
    shift_ok = bool(np.all(np.abs(res["gap_reward_shift"][ok]) <= res["b1_reward_shift"][ok] * (1 + 1e-5) + 1e-12))
    clip_ok = bool(np.all(np.abs(res["gap_clipping"][ok]) <= res["b1_clipping"][ok] * (1 + 1e-5) + 1e-12))
    return (f"reference recomputation of B1 in NumPy: largest relative difference {diff:.1e}; its deterministic "
            f"terms hold on every problem: reward shift {'yes' if shift_ok else 'NO'}, clipping "
            f"{'yes' if clip_ok else 'NO'}")
