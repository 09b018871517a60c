"""``rates``: log-log slopes of the actual gap terms and of their bounds against n, K, N_pref and T.

Four sweeps through one base regime (``base``: d 8, A 8, n 128, K 4, N_pref 256, M 1024, T 200, SGD
with constant step), each moving one static field: the prompts n, the rollouts per prompt K, the
preference pairs N_pref and the SGD steps T (``quick`` sweeps n and K only). For every quantity
the slope of log E|quantity| against log x is fitted by least squares over the sweep's points,
with a bootstrap 95% interval over problems (``rlhf_bounds.fits``), and set beside the theory's
slope (docs/theory.md §4, §11, §18):

* n: the sampling error and both its parts ∝ n^-1/2 (Hoeffding, and the central limit theorem for
  the actual error); B1's sampling term and its rollout part ∝ n^-1/2 (exactly, for a fixed W_τ). The
  actual error is measured against EĴ on M evaluation prompts, whose own error is independent of the
  fresh sample: the theory's slope for it is that of √(1/n + 1/M) over the sweep's points (−0.5 as M → ∞);
* K (n fixed): the rollout part of the actual error and of B1 ∝ K^-1/2; the prompt part does not
  depend on K (slope 0);
* N_pref: the reward shift with the ridge MLE, ‖θ̂ − θ*‖ and B1's reward-shift term ∝ N_pref^-1/2
  (the MLE's error is O_P(N_pref^-1/2) and both terms are linear in it, or its root mean square; the
  ridge's bias, O(λ/N_pref) along θ*, is of lower order but not negligible at small N_pref);
* T (on the oracle reward with a residual σ_ξ = 0.5, so that the minibatch gradients do not all vanish
  at w_S): constant-step SGD contracts to a stationary law around w_S whose spread is set by η/b, not
  by T (the OU picture of B5); past the mixing time, of order 1/(ηβλ_min(V)) ≈ 20 steps here, the
  gradient norm, the sampling error and the gap have slope 0 in T. [A]'s T^-1/4 is an upper rate for
  GA's best iterate, not a prediction for constant-step SGD.

A slope whose interval excludes the theory's is reported as ``refuted`` (a finding about these
problems, with the interval as evidence); quantities without a power law in x (the total gap
against n, whose reward-shift part does not shrink with n) are shown without a verdict.

The theory's rates are for a fixed policy; each point of a sweep trains its own. The rollout part's
scale is the trained policy's conditional spread σ_roll = √E_x Var_{π_w}[r̂ − βℓ^τ], which vanishes at
the KL-regularised optimum (there r̂ − βℓ is constant over responses) and so shrinks as training gets
closer to it; the sweeps show σ_roll beside the rollout part, and the rollout part divided by σ_roll,
which is where the fixed-policy (nK)^-1/2 must show.
"""

from __future__ import annotations

import math

import matplotlib.ticker
import matplotlib.transforms
import numpy as np

from .. import fits, plots
from ..report import CHECKS, markdown_table
from ..spec import Spec
from ._checks import coverage_verdicts
from ._framework import Figure, Regime, Suite

PROBLEMS = {"quick": 256, "default": 512, "full": 4096}

BASE = dict(d=8, actions=8, prompts=128, rollouts=4, pref_pairs=256, eval_prompts=1024, steps=200,
            record_every=50, batch=16, reward_model="mle", bounds="b1")

#: The T sweep trains on the oracle reward with a residual (σ_ξ = 0.5, τ = ∞): with a linear r̂ every prompt's
#: RLOO gradient vanishes at w_S = θ̂/β (B5's degenerate corner C_g = 0) and SGD converges linearly to float32
#: round-off; with a clipped KL (finite τ) the training objective need not have a maximiser at all (the clipped
#: penalty stops growing), and w drifts. The residual keeps a strictly concave objective with C_g > 0.
T_SWEEP = dict(reward_model="oracle", sigma_xi=0.5)

#: axis → (spec field, symbol, values per profile, other changes); the n, K and N_pref sweeps pass through BASE.
AXES = {
    "n": ("prompts", "n", {"quick": (32, 128, 512), "default": (32, 64, 128, 256, 512),
                           "full": (32, 64, 128, 256, 512, 1024)}, {}),
    # K ≥ 2: the RLOO gradient estimator needs two rollouts per prompt
    "K": ("rollouts", "K", {"quick": (2, 4, 16), "default": (2, 4, 8, 16, 32), "full": (2, 4, 8, 16, 32, 64)}, {}),
    "N_pref": ("pref_pairs", "N_pref", {"default": (64, 128, 256, 1024, 4096),
                                        "full": (64, 128, 256, 1024, 4096, 16384)}, {}),
    "T": ("steps", "T", {"default": (100, 200, 400, 800), "full": (100, 200, 400, 800, 1600)}, T_SWEEP),
}


def _b1_rollout_part(res, ok):
    """B1's rollout part W_τ√(log(4/δ)/2nK), from the saved B1 sampling term W_τ·α."""
    spec = res.record["spec"]
    n, K, delta = float(spec["prompts"]), float(spec["rollouts"]), float(spec["delta"])
    log_term = np.log(4 / delta)
    alpha = np.sqrt(log_term / (2 * n)) + np.sqrt(log_term / (2 * n * K))
    return res["b1_sampling"][ok].astype(np.float64) / alpha * np.sqrt(log_term / (2 * n * K))


def _eval_corrected():
    """The theory's slope of E|h̄_S − Ê_M h| against n: the fixed-policy error n^-1/2 plus the evaluation set's own
    error M^-1/2 (EĴ is a mean over M evaluation prompts), independent: ∝ √(1/n + 1/M) by the central limit theorem."""
    def slope(xs, specs):
        return fits.loglog_slope(xs, [math.sqrt(1 / x + 1 / s["eval_prompts"]) for x, s in zip(xs, specs)])
    return slope


def _column(name):
    return lambda res, ok: res[name][ok].astype(np.float64)


def _sigma_roll(res, ok):
    """σ_roll = √E_x Var_{a∼π_w}[r̂ − βℓ^τ] of the trained policy (on the evaluation set)."""
    return np.sqrt(res["var_rollout"][ok].astype(np.float64))


def _rollout_per_sigma(res, ok):
    """The rollout part over σ_roll: the fixed-policy statement's (nK)^-1/2 with the policy's own spread divided out."""
    return res["gap_sampling_rollout"][ok].astype(np.float64) / np.maximum(_sigma_roll(res, ok), 1e-30)


#: axis → (label, per-problem values, theory slope or None)
QUANTITIES = {
    "n": (("|sampling error|", _column("gap_sampling"), _eval_corrected()),
          ("|prompt part|", _column("gap_sampling_prompt"), _eval_corrected()),
          ("|rollout part|", _column("gap_sampling_rollout"), -0.5),
          ("B1 sampling", _column("b1_sampling"), -0.5),
          ("B1 rollout part", _b1_rollout_part, -0.5),
          ("|rollout part| / σ_roll", _rollout_per_sigma, -0.5),
          ("σ_roll of the trained policy", _sigma_roll, None),
          ("|G|", _column("gap_total"), None)),
    "K": (("|rollout part|", _column("gap_sampling_rollout"), -0.5),
          ("B1 rollout part", _b1_rollout_part, -0.5),
          ("|rollout part| / σ_roll", _rollout_per_sigma, -0.5),
          ("σ_roll of the trained policy", _sigma_roll, None),
          ("|prompt part|", _column("gap_sampling_prompt"), 0.0),
          ("|sampling error|", _column("gap_sampling"), None)),
    "N_pref": (("|reward shift|", _column("gap_reward_shift"), -0.5),
               ("‖θ̂ − θ*‖", _column("reward_error"), -0.5),
               ("B1 reward shift", _column("b1_reward_shift"), -0.5)),
    "T": (("‖∇F_S(w_T)‖", _column("policy_grad_norm_last"), 0.0),
          ("|sampling error|", _column("gap_sampling"), 0.0),
          ("|G|", _column("gap_total"), 0.0)),
}

BASE_NAME = "base"


def _regime_name(axis: str, value) -> str:
    field, _, _, extra = AXES[axis]
    return BASE_NAME if value == BASE[field] and not extra else f"{axis}-{value}"


def sweeps(profile: str) -> dict[str, list[tuple[str, int]]]:
    """axis → [(regime name, x)] for the axes of ``profile``."""
    return {axis: [(_regime_name(axis, v), v) for v in values[profile]]
            for axis, (_, _, values, _) in AXES.items() if profile in values}


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE)
    regimes = {BASE_NAME: Regime(BASE_NAME, base, PROBLEMS[profile], ())}
    for axis, points in sweeps(profile).items():
        field, _, _, extra = AXES[axis]
        for name, v in points:
            if name not in regimes:
                regimes[name] = Regime(name, base.replace(**{field: v, **extra}), PROBLEMS[profile],
                                       (field, *extra), labels={field: v, **extra})
    return list(regimes.values())


def _study_sweeps(study) -> dict[str, list[tuple[str, int]]]:
    """The sweeps present in a loaded study (its profile's axes, whose regimes are all there)."""
    profile = study.record.get("profile") or "default"
    out = {}
    for axis, points in sweeps(profile if profile in ("quick", "default", "full") else "default").items():
        have = [(name, x) for name, x in points if name in study.regimes]
        if len(have) >= 2:
            out[axis] = have
    return out


def slope_rows(study) -> list[dict]:
    """One row per (axis, quantity): the fitted slope with its bootstrap interval, the theory's slope, the verdict."""
    cache = study.__dict__.setdefault("_rates_cache", None)
    if cache is not None:
        return [dict(r) for r in cache]
    rows = []
    for axis, points in _study_sweeps(study).items():
        xs = [x for _, x in points]
        for label, values, theory in QUANTITIES[axis]:
            groups = [np.abs(values(study[name], study[name].ok)) for name, _ in points]
            if any(g.size == 0 or not np.any(g > 0) for g in groups):
                continue
            fit = fits.bootstrap_slope(xs, groups, n_boot=1000, seed=0)
            if callable(theory):
                theory = theory(xs, [study[name].record["spec"] for name, _ in points])
            row = {"axis": axis, "quantity": label, "x": ", ".join(str(x) for x in xs), "slope": fit.slope,
                   "lo": fit.lo, "hi": fit.hi, "theory": theory, "problems": int(sum(g.size for g in groups)),
                   "stats": fit.stats, "xs": tuple(xs), "regimes": tuple(n for n, _ in points)}
            if theory is not None:
                row["verdict"] = fits.slope_verdict(fit, theory)
                shape = fits.shape_constants(xs, groups, lambda x, s=theory: x ** s, n_boot=1000, seed=0)
                row.update(c_first=shape.constants[0], c_last=shape.constants[-1])
            rows.append(row)
    study.__dict__["_rates_cache"] = rows
    return [dict(r) for r in rows]


def verdicts(study) -> list[dict]:
    """The slope verdicts (listed under the ``base`` regime every sweep passes through) and, per regime,
    B1's coverage (total and sampling term: the bounds whose slopes are fitted hold at every point)."""
    out = []
    for r in slope_rows(study):
        if r["theory"] is None:
            continue
        out.append({"check": f"slope of E{r['quantity']} vs {r['axis']}", "regime": BASE_NAME if BASE_NAME in r["regimes"]
                    else r["regimes"][0], "verdict": "holds" if r["verdict"] == "holds" else "refuted",
                    "evidence": f"fitted slope {r['slope']:+.3f}, bootstrap 95% [{r['lo']:+.3f}, {r['hi']:+.3f}] over "
                                f"{r['problems']} problems at {r['axis']} = {r['x']}; theory {r['theory']:+.2f} is "
                                f"{'inside' if r['verdict'] == 'holds' else 'outside'} the interval; smallest constant "
                                f"E|·|/x^{r['theory']:+.2f}: {r['c_first']:.3g} at the first point, {r['c_last']:.3g} at "
                                "the last", "slope": r["slope"], "lo": r["lo"], "hi": r["hi"], "theory": r["theory"]})
    checks = tuple(c for c in CHECKS if c.label in ("B1 total", "B1 sampling"))
    return out + coverage_verdicts(study, checks, shrink=False)


def headline(study) -> str:
    rows = slope_rows(study)
    for r in rows:
        r["theory_text"] = "—" if r["theory"] is None else f"{r['theory']:+.2f}"
        r["verdict_text"] = r.get("verdict", "no power law: shown only")
        r["interval"] = f"[{r['lo']:+.3f}, {r['hi']:+.3f}]"
    return markdown_table(rows, [("axis", "axis", ""), ("x", "points", ""), ("quantity", "quantity", ""),
                                 ("slope", "fitted slope", "+.3f"), ("interval", "bootstrap 95%", ""),
                                 ("theory_text", "theory", ""), ("verdict_text", "verdict", ""),
                                 ("problems", "problems", "d")])


def rate_plots(study):
    """E|quantity| against each swept field (log-log) with ±2 se bars, the fitted slope (solid) and the theory's
    slope through the same geometric mean (dashed)."""
    rows = slope_rows(study)
    axes_present = list(dict.fromkeys(r["axis"] for r in rows)) or ["n"]
    ncols = 2 if len(axes_present) > 1 else 1
    nrows = -(-len(axes_present) // ncols)
    # one row (the quick grid) needs as much height for its legends as two rows do
    fig, axes = plots.figure(ncols, nrows, width=2 * plots.COLUMN_WIDTH, aspect=0.8 if nrows > 1 else 1.3)
    axes = np.atleast_1d(axes).ravel()
    for ax, axis in zip(axes, axes_present):
        symbol = AXES[axis][1]
        for i, r in enumerate(q for q in rows if q["axis"] == axis):
            xs, stats = np.asarray(r["xs"], float), np.asarray(r["stats"], float)
            se = []
            for name in r["regimes"]:
                label_fn = next(v for lab, v, _ in QUANTITIES[axis] if lab == r["quantity"])
                g = np.abs(label_fn(study[name], study[name].ok))
                se.append(g.std(ddof=1) / np.sqrt(g.size) if g.size > 1 else 0.0)
            se = np.asarray(se)
            c = plots.colour(i)
            ax.errorbar(xs, stats, yerr=np.vstack([np.minimum(2 * se, stats * 0.999), 2 * se]), fmt="o", color=c,
                        capsize=2, elinewidth=0.8, markersize=3.5,
                        label=f"{r['quantity']}: {r['slope']:+.2f}" + ("" if r["theory"] is None else
                                                                       f" (theory {r['theory']:+.2f})"))
            lx = np.log(xs)
            centre_x, centre_y = lx.mean(), np.log(stats).mean()
            grid_x = np.linspace(lx.min(), lx.max(), 20)
            ax.plot(np.exp(grid_x), np.exp(centre_y + r["slope"] * (grid_x - centre_x)), color=c, linewidth=1.0)
            if r["theory"] is not None:
                ax.plot(np.exp(grid_x), np.exp(centre_y + r["theory"] * (grid_x - centre_x)), color=c,
                        linewidth=0.9, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({x for r in rows if r["axis"] == axis for x in r["xs"]})
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel(f"{symbol} (log)")
        ax.set_ylabel("mean over problems (log)")
        ax.set_title(f"against {symbol}: fitted slope (solid), theory (dashed)")
        # a fixed distance below the axis (in inches, not axes fractions): the quick grid's one row of
        # short axes put the legend over the x label otherwise
        below = ax.transAxes + matplotlib.transforms.ScaledTranslation(0, -0.42, fig.dpi_scale_trans)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=1)
    for ax in axes[len(axes_present):]:
        ax.set_visible(False)
    fig.suptitle("Log-log rates of the gap terms and their bounds (bars: ±2 se over problems)")
    return fig


def slope_intervals(study):
    """Every fitted slope with its bootstrap 95% interval beside the theory's slope (black tick)."""
    rows = [r for r in slope_rows(study) if r["theory"] is not None]
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.5)
    axes_present = list(dict.fromkeys(r["axis"] for r in rows))
    for j, r in enumerate(rows):
        c = plots.colour(axes_present.index(r["axis"]))
        ax.errorbar([r["slope"]], [j], xerr=[[max(r["slope"] - r["lo"], 0)], [max(r["hi"] - r["slope"], 0)]],
                    fmt="o", color=c, capsize=2, elinewidth=0.8, markersize=3.5)
        ax.plot([r["theory"]] * 2, [j - 0.35, j + 0.35], color="black", linewidth=1.2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['quantity']} vs {AXES[r['axis']][1]}" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("log-log slope (dots: fitted, bars: bootstrap 95%; black ticks: theory)")
    ax.set_title("Fitted slopes against the theory's")
    return fig


SUITE = Suite(
    name="rates",
    claim="The sampling error and B1's sampling term shrink as n^-1/2 (the rollout parts as (nK)^-1/2), the reward "
          "shift with the MLE as N_pref^-1/2, and constant-step SGD past its mixing time does not change the gap "
          "with T: each fitted log-log slope's bootstrap 95% interval contains the theory's.",
    grid=grid,
    checks=(verdicts,),
    headline=headline,
    figures=(Figure("rates-loglog-fitted-vs-theory", "E|quantity| against n, K, N_pref and T on log-log axes with "
                    "±2 se bars; solid lines: the fitted slope, dashed: the theory's slope through the same "
                    "geometric mean (legend: fitted, theory).", rate_plots),
             Figure("rates-slope-intervals", "Each fitted slope with its bootstrap 95% interval (coloured by "
                    "axis) beside the theory's slope (black tick): a tick outside the bar is a refuted rate.",
                    slope_intervals)),
)
