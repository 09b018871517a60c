"""``tightness``: where B1's slack comes from, as a ladder of valid bounds from the paper's to the best possible.

For the fixed trained policy of each problem (docs/theory.md §18), the sampling term
Ĵ − EĴ on the fresh sample is bounded by each rung at the same δ split (δ/2 prompts, δ/2
rollouts given the prompts):

1. the paper's form, Hoeffding at both levels: W_τ(√(log(4/δ)/2n) + √(log(4/δ)/2nK));
2. the kl (Chernoff–Hoeffding) form at both levels;
3. the Bernstein forms: Maurer–Pontil's empirical Bernstein on the prompts, Bernstein with the
   exact conditional variances on the rollouts;
4. the per-problem floor q_δ(w): the (1 − δ)-quantile of |Ĵ − EĴ| over R redraws of the fresh sample
   for the same w, which no bound that is a function of w alone (as the paper's is) can go below.

Each rung's ratio to the actual |Ĵ − EĴ| and to the floor is reported, and how much of the paper's
excess over the floor each better form recovers; each new rung's coverage is checked like every
bound (its violation rate with a Clopper–Pearson interval). The reward-shift term gets its own
ladder: B1's Cauchy–Schwarz change of measure √(1 + χ²)√L²_train, the root mean square
√E_{D_w}[(r̂ − r*)²] under the policy's own law (the change of measure's price alone), and the exact
E_{D_w}[r̂ − r*]. B2's ladder: its Gaussian-posterior bound as used, in the square-root form, without
the union bound over the σ₀ grid and without the Monte Carlo radii (the last two are limits, not
valid bounds), and its Occam bound in both forms.
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..report import Check, markdown_table
from ..spec import Spec
from ..tightness import TightnessKernel, sampling_floor
from ._checks import coverage_verdicts
from ._framework import Figure, Regime, Suite

PROBLEMS = {"quick": 256, "default": 512, "full": 4096}
#: Redraws of the fresh sample per problem for the floor q_δ(w) (its relative error is reported).
REDRAWS = 400
KERNEL = TightnessKernel(redraws=REDRAWS)

#: The quick profile's smaller shape; default and full use the default spec's shapes (n 256, M 2048, T 400).
QUICK = dict(prompts=128, eval_prompts=1024, steps=200, record_every=50, pref_pairs=256, batch=16)

GRID = (
    ("reward-model", dict(reward_model="mle"), ("reward_model",)),
    ("clipped", dict(reward_model="mle", tau=0.5), ("reward_model", "tau")),
    ("misspecified", dict(reward_model="mle", sigma_xi=0.5, tau=1.0), ("reward_model", "sigma_xi", "tau")),
)

#: The coverage checks of the rungs (the paper's and B1's reward shift for reference).
RUNG_CHECKS = (
    Check("sampling: paper (Hoeffding)", "gap_sampling", "b1_sampling"),
    Check("sampling: kl form", "gap_sampling", "rung_kl_total"),
    Check("sampling: Bernstein forms", "gap_sampling", "rung_bernstein_total"),
    Check("prompt level: kl", "gap_sampling_prompt", "rung_kl_prompt", delta_share=0.5),
    Check("prompt level: empirical Bernstein", "gap_sampling_prompt", "rung_bernstein_prompt", delta_share=0.5),
    Check("rollout level: kl", "gap_sampling_rollout", "rung_kl_rollout", delta_share=0.5),
    Check("rollout level: Bernstein, exact variance", "gap_sampling_rollout", "rung_bernstein_rollout",
          delta_share=0.5),
    Check("reward shift: B1 (Cauchy-Schwarz)", "gap_reward_shift", "b1_reward_shift", deterministic=True),
    Check("reward shift: RMS under D_w", "gap_reward_shift", "rung_shift_l2_policy", deterministic=True),
    Check("B2 Gaussian sampling (as used)", "gap_sampling_gauss", "b2r_gauss_used"),
    Check("B2 Gaussian sampling, square-root form", "gap_sampling_gauss", "b2r_gauss_sqrt"),
    Check("B2 Occam sampling (kl form)", "gap_sampling_occam", "b2r_occam_kl"),
    Check("B2 Occam sampling, square-root form", "gap_sampling_occam", "b2r_occam_sqrt"),
)

#: B2's ladder: (posterior, label, column, valid?) — the ratios are to the bound as used.
B2_RUNGS = (("Gaussian", "as used (δ/G over the σ₀ grid, Monte Carlo radii)", "b2r_gauss_used", True),
            ("Gaussian", "square-root prompt level", "b2r_gauss_sqrt", True),
            ("Gaussian", "best σ₀ fixed in advance (no union bound)", "b2r_gauss_no_union", False),
            ("Gaussian", "Monte Carlo radii 0 (exact E_Q)", "b2r_gauss_no_mc", False),
            ("Occam", "as used (kl-inverse prompt level)", "b2r_occam_kl", True),
            ("Occam", "square-root prompt level", "b2r_occam_sqrt", True))
B2_ACTUAL = {"Gaussian": ("gap_sampling_gauss", "b2r_gauss_used"), "Occam": ("gap_sampling_occam", "b2r_occam_kl")}

#: The sampling ladder: (label, level, bound column or None for the floor itself).
SAMPLING_RUNGS = (("paper (Hoeffding)", "total", "b1_sampling"), ("kl", "total", "rung_kl_total"),
                  ("Bernstein", "total", "rung_bernstein_total"),
                  ("paper (Hoeffding)", "prompt", "rung_hoeffding_prompt"), ("kl", "prompt", "rung_kl_prompt"),
                  ("empirical Bernstein", "prompt", "rung_bernstein_prompt"),
                  ("paper (Hoeffding)", "rollout", "rung_hoeffding_rollout"), ("kl", "rollout", "rung_kl_rollout"),
                  ("Bernstein, exact variance", "rollout", "rung_bernstein_rollout"))
ACTUAL = {"total": "gap_sampling", "prompt": "gap_sampling_prompt", "rollout": "gap_sampling_rollout"}


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(bounds="all", **(QUICK if profile == "quick" else {}))
    return [Regime(name, base.replace(**changes), PROBLEMS[profile], defining) for name, changes, defining in GRID]


def _floor(res):
    """q_δ(w) per status-0 problem (total and prompt level) from the saved redraws."""
    ok = res.ok
    delta = float(res.record["spec"]["delta"])
    return sampling_floor(res["redraw_J_hat"][ok], res["redraw_h_bar"][ok], delta)


def _q(v, p):
    return float(np.percentile(v, p)) if v.size else float("nan")


def ladder_rows(study) -> list[dict]:
    """Per regime and rung: median bound, median bound/|actual|, bound/floor (median, p5, p95), and the median
    share of the paper's excess over the floor that the rung recovers, (paper − rung)/(paper − floor)."""
    cache = study.__dict__.get("_ladder_cache")
    if cache is not None:
        return [dict(r) for r in cache]
    rows = []
    for name, res in study.items():
        ok = res.ok
        if not ok.any():
            continue
        floor = _floor(res)
        floors = {"total": floor["q"], "prompt": floor["q_prompt"]}
        paper = {"total": res["b1_sampling"][ok], "prompt": res["rung_hoeffding_prompt"][ok],
                 "rollout": res["rung_hoeffding_rollout"][ok]}
        for label, level, col in SAMPLING_RUNGS:
            b = res[col][ok].astype(np.float64)
            a = np.abs(res[ACTUAL[level]][ok].astype(np.float64))
            row = {"regime": name, "rung": label, "level": level, "bound": float(np.median(b)),
                   "to_actual": float(np.median(b / np.maximum(a, 1e-12)))}
            if level in floors:
                f = floors[level]
                r = b / np.maximum(f, 1e-12)
                excess = paper[level] - f
                row.update(to_floor=float(np.median(r)), to_floor_p5=_q(r, 5), to_floor_p95=_q(r, 95),
                           recovered=float(np.median((paper[level] - b) / np.where(excess > 0, excess, np.nan))))
            rows.append(row)
        for level in ("total", "prompt"):
            f = floors[level]
            a = np.abs(res[ACTUAL[level]][ok].astype(np.float64))
            rows.append({"regime": name, "rung": "floor q_δ(w)", "level": level, "bound": float(np.median(f)),
                         "to_actual": float(np.median(f / np.maximum(a, 1e-12))), "to_floor": 1.0, "to_floor_p5": 1.0,
                         "to_floor_p95": 1.0, "recovered": 1.0, "floor_rel_error": float(np.nanmedian(floor["rel_error"]))})
            r = a / np.maximum(f, 1e-12)
            rows.append({"regime": name, "rung": "actual |error|", "level": level, "bound": float(np.median(a)),
                         "to_actual": 1.0, "to_floor": float(np.median(r)), "to_floor_p5": _q(r, 5),
                         "to_floor_p95": _q(r, 95)})
    study.__dict__["_ladder_cache"] = rows
    return [dict(r) for r in rows]


def shift_rows(study) -> list[dict]:
    """The reward-shift ladder per regime: each form's ratio to the exact |E_{D_w}[r̂ − r*]| (median, p5, p95)."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        exact = np.abs(res["gap_reward_shift"][ok].astype(np.float64))
        if not ok.any() or not np.any(exact > 0):
            continue
        keep = exact > 0
        cs, rms = res["b1_reward_shift"][ok].astype(np.float64), res["rung_shift_l2_policy"][ok].astype(np.float64)
        for label, b in (("B1: √(1 + χ²)·√L²_train", cs), ("RMS under D_w: √E_{D_w}(r̂ − r*)²", rms),
                         ("exact |E_{D_w}[r̂ − r*]|", exact)):
            r = b[keep] / exact[keep]
            rows.append({"regime": name, "rung": label, "bound": float(np.median(b)), "to_exact": float(np.median(r)),
                         "p5": _q(r, 5), "p95": _q(r, 95)})
        r = cs[keep] / np.maximum(rms[keep], 1e-30)
        rows.append({"regime": name, "rung": "B1 / RMS (the change of measure's price)", "bound": float("nan"),
                     "to_exact": float(np.median(r)), "p5": _q(r, 5), "p95": _q(r, 95)})
    return rows


def b2_rows(study) -> list[dict]:
    """B2's ladder per regime: each rung's median, its ratio to the bound as used and to the actual |value|
    (medians over the problems where the bound is finite; the Gaussian bound needs τ < ∞)."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        if not ok.any() or "b2r_gauss_used" not in res.columns:
            continue
        for post, label, col, valid in B2_RUNGS:
            actual_col, used_col = B2_ACTUAL[post]
            b, used = res[col][ok].astype(np.float64), res[used_col][ok].astype(np.float64)
            a = np.abs(res[actual_col][ok].astype(np.float64))
            keep = np.isfinite(b) & np.isfinite(used)
            if not keep.any():
                rows.append({"regime": name, "posterior": post, "rung": label, "valid": "yes" if valid else "no (limit)",
                             "bound": float("inf")})
                continue
            rows.append({"regime": name, "posterior": post, "rung": label, "valid": "yes" if valid else "no (limit)",
                         "bound": float(np.median(b[keep])), "to_used": float(np.median(b[keep] / used[keep])),
                         "to_actual": float(np.median(b[keep] / np.maximum(a[keep], 1e-12)))})
    return rows


def verdicts(study) -> list[dict]:
    """Coverage of every rung (and B1's), and the floor check: the paper's rung, a function of w alone, is never
    below the floor's lower confidence limit."""
    rows = coverage_verdicts(study, RUNG_CHECKS)
    for name, res in study.items():
        ok = res.ok
        if not ok.any():
            continue
        floor = _floor(res)
        below = int(np.sum(res["b1_sampling"][ok] < floor["lo"]))
        n = int(ok.sum())
        rows.append({"check": "paper's sampling term ≥ the floor q_δ(w)", "regime": name,
                     "verdict": "holds" if below == 0 else "refuted", "n": n, "violations": below,
                     "evidence": f"{below} of {n} problems have B1's sampling term below the lower 95% limit of "
                                 f"their floor (R = {floor['R']} redraws each; the floor's median relative error "
                                 f"{np.nanmedian(floor['rel_error']):.3f}, its centre's median standard error "
                                 f"{np.median(floor['centre_se']):.2g}); median paper/floor "
                                 f"{np.median(res['b1_sampling'][ok] / np.maximum(floor['q'], 1e-12)):.3g}"})
    return rows


def headline(study) -> str:
    rows = ladder_rows(study)
    for r in rows:
        if "to_floor_p5" in r:
            r["spread"] = f"[{r['to_floor_p5']:.3g}, {r['to_floor_p95']:.3g}]"
    sampling = markdown_table(rows, [("regime", "regime", ""), ("level", "level", ""), ("rung", "rung", ""),
                                     ("bound", "median value", ".4g"), ("to_actual", "÷ actual (median)", ".3g"),
                                     ("to_floor", "÷ floor (median)", ".3g"), ("spread", "÷ floor p5–p95", ""),
                                     ("recovered", "paper's excess recovered", ".3f")])
    shift = markdown_table(shift_rows(study), [("regime", "regime", ""), ("rung", "form", ""),
                                               ("bound", "median value", ".4g"),
                                               ("to_exact", "÷ exact (median)", ".3g"), ("p5", "p5", ".3g"),
                                               ("p95", "p95", ".3g")])
    b2 = markdown_table(b2_rows(study), [("regime", "regime", ""), ("posterior", "posterior", ""), ("rung", "rung", ""),
                                         ("valid", "valid bound", ""), ("bound", "median value", ".4g"),
                                         ("to_used", "÷ as used (median)", ".3f"),
                                         ("to_actual", "÷ actual (median)", ".3g")])
    return ("**The sampling term's ladder** (floor: the (1 − δ)-quantile of |Ĵ − EĴ| over "
            f"{REDRAWS} redraws of the fresh sample for the same policy; recovered: (paper − rung)/(paper − floor)).\n\n"
            + sampling + "\n\n**The reward-shift term's ladder** (ratios to the exact E_{D_w}[r̂ − r*]).\n\n" + shift
            + "\n\n**B2's ladder** (sampling part; the Gaussian posterior's bound is +∞ where τ = ∞).\n\n" + b2)


def _ladder_axes(ax, items, title, xlabel, reference):
    """Rungs on the y axis, one offset row per regime: median with p5–p95 bars (log x)."""
    labels = list(dict.fromkeys(label for _, label, *_ in items))
    regimes = list(dict.fromkeys(reg for reg, *_ in items))
    step = 0.8 / max(len(regimes), 1)
    for j, regime in enumerate(regimes):
        pts = [(labels.index(label), m, lo, hi) for reg, label, m, lo, hi in items if reg == regime]
        y = np.array([i for i, *_ in pts]) + (j - (len(regimes) - 1) / 2) * step
        m = np.array([p[1] for p in pts])
        err = np.vstack([np.maximum(m - np.array([p[2] for p in pts]), 0), np.maximum(np.array([p[3] for p in pts]) - m, 0)])
        ax.errorbar(m, y, xerr=err, fmt="o", color=plots.colour(j), label=regime, capsize=2, elinewidth=0.8,
                    markersize=3.5)
    ax.axvline(reference, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)


def sampling_ladder(study):
    """Each rung of the sampling term over the per-problem floor q_δ(w) (median, p5–p95), total and prompt level."""
    rows = [r for r in ladder_rows(study) if "to_floor_p5" in r]
    fig, axes = plots.figure(2, 1, width=2 * plots.COLUMN_WIDTH, aspect=0.7)
    for ax, level in zip(axes.ravel(), ("total", "prompt")):
        items = [(r["regime"], r["rung"], r["to_floor"], r["to_floor_p5"], r["to_floor_p95"]) for r in rows
                 if r["level"] == level]
        _ladder_axes(ax, items, f"{'sampling term' if level == 'total' else 'prompt level'}: bound ÷ floor",
                     "÷ floor q_δ(w) (log; dashed: the floor)", 1.0)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    fig.suptitle("How far each valid form of the sampling term sits above the per-problem floor (median, p5–p95)")
    return fig


def shift_ladder(study):
    """Each form of the reward-shift term over the exact |E_{D_w}[r̂ − r*]| (median, p5–p95)."""
    rows = [r for r in shift_rows(study) if not r["rung"].startswith("exact")]
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.4)
    items = [(r["regime"], r["rung"], r["to_exact"], r["p5"], r["p95"]) for r in rows]
    if items:
        _ladder_axes(ax, items, "Reward-shift term: each form ÷ the exact value (last row: B1 ÷ RMS)",
                     "ratio (log; dashed: 1)", 1.0)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    else:
        ax.text(0.5, 0.5, "the reward shift is 0 in every regime", transform=ax.transAxes, ha="center")
    return fig


def b2_ladder(study):
    """Each rung of B2's sampling part over the bound as used (median per regime; only finite bounds)."""
    rows = [r for r in b2_rows(study) if "to_used" in r]
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.45)
    items = [(r["regime"], f"{r['posterior']}: {r['rung']}", r["to_used"], r["to_used"], r["to_used"]) for r in rows]
    if items:
        _ladder_axes(ax, items, "B2's sampling part: each rung ÷ the bound as used (median)",
                     "ratio (log; dashed: 1 = the bound as used)", 1.0)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    else:
        ax.text(0.5, 0.5, "no finite B2 bound in any regime", transform=ax.transAxes, ha="center")
    return fig


SUITE = Suite(
    name="tightness",
    claim="Every rung of the sampling term's ladder (the paper's Hoeffding form, the kl form, the Bernstein forms) "
          "holds at its δ, none that depends on the policy alone falls below the per-problem floor q_δ(w), and the "
          "ladder says how much of the paper's slack each better form recovers; the reward-shift term's slack splits "
          "into the change of measure's price and the root mean square's.",
    grid=grid,
    checks=(verdicts,),
    headline=headline,
    figures=(Figure("tightness-ladder-sampling-term", "Each valid bound of the sampling term divided by the "
                    "per-problem floor q_δ(w) (median with p5–p95 bars, per regime), for the whole term and its "
                    "prompt level; the actual |error| is drawn on the same scale; the dashed line is the floor.",
                    sampling_ladder),
             Figure("tightness-ladder-reward-shift", "B1's Cauchy-Schwarz reward-shift term and the root mean square "
                    "under D_w, each divided by the exact reward shift (median with p5–p95 bars per regime), and "
                    "their ratio (the change of measure's price).", shift_ladder),
             Figure("tightness-ladder-b2", "B2's sampling part: each rung divided by the bound as used (median per "
                    "regime): the square-root form, the union bound's price (best σ₀ fixed in advance) and the Monte "
                    "Carlo price (radii 0) for the Gaussian posterior; the square-root form for Occam.", b2_ladder)),
    kernel=KERNEL,
)
