"""``clipping``: does B3's optimal clipping threshold τ* help (docs/theory.md §19)?

Each regime trains the policy with one clipping threshold τ (the spec's ``tau``, a traced field:
every regime shares one compilation; with ``train_log_ratio='clipped'`` the same τ clips the
training reward and the default columns' Ĵ and B1). The kernel (:class:`rlhf_bounds.advice.ClipSweepKernel`)
then evaluates each trained policy on a grid of evaluation thresholds: B1's total and the actual
gap G(τ) = Ĵ_τ − J* on the fresh sample. The checks:

* **formula = bound argmin** (per regime, an implementation check): τ* by B3's formula lies within
  the grid's resolution of the argmin of B1 on the grid, on every problem;
* **τ* against the actual error** (per regime): the regret of |G(τ*)| against the best grid τ;
* **does τ* improve the deployed policy** (across regimes, reported on ``tau-inf``): train unclipped,
  read τ* off that policy, retrain at the grid τ nearest it; J* of that policy against the best
  training τ on the grid and against the unclipped policy, paired over problems;
* **split versus whole sample** (per regime): τ chosen on the evaluation sample itself (B3's
  empirical quantile of |ℓ| over its rollouts), B1 then applied to the same sample (the heuristic,
  reported as a misuse) or τ chosen on one half and B1 applied to the other (valid).
"""

from __future__ import annotations

import math

import numpy as np

from .. import bounds, plots
from ..advice import (TAU_GRID, ClipSweepKernel, argmin_agrees, mean_interval, nearest, regret_allowance,
                      regret_verdict, rule_regret)
from ..report import markdown_table, verdict
from ..spec import Spec
from ._framework import Figure, Regime, Suite

PROBLEMS = {"quick": 1024, "default": 4096, "full": 16384}
#: Training thresholds; ∞ is the unclipped policy the advice is read off.
TRAIN_TAUS = {"quick": (0.1, 0.2, 0.5, 1.0, 2.0, math.inf),
              "default": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, math.inf),
              "full": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, math.inf)}
#: A small problem (as ``coverage``), a fitted reward model, the B1 catalogue only.
BASE = dict(d=8, actions=8, prompts=128, rollouts=4, pref_pairs=256, eval_prompts=1024, steps=200,
            record_every=50, batch=16, reward_model="mle", train_log_ratio="clipped", bounds="b1")
UNCLIPPED = "tau-inf"
KERNEL = ClipSweepKernel(TAU_GRID)


def regime_name(tau: float) -> str:
    return f"tau-{tau:g}"


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE)
    return [Regime(regime_name(t), base.replace(tau=t), PROBLEMS[profile], ("tau",)) for t in TRAIN_TAUS[profile]]


# ---- checks --------------------------------------------------------------------------------------

def _cache(study, key, compute):
    cache = study.__dict__.setdefault("_clipping_cache", {})  # headline, checks and figures ask again
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def argmin_rows(study) -> list[dict]:
    """B3's formula against B1's own argmin on the evaluation grid: within the grid's resolution on every problem."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        grid_ = res["sweep_tau"][0] if len(res) else np.asarray(TAU_GRID)
        agree = argmin_agrees(grid_, res["sweep_b1"][ok], res["b3_tau_star"][ok])
        n, bad = int(agree.size), int((~agree).sum())
        i = np.argmin(res["sweep_b1"][ok], axis=1) if n else np.zeros(0, int)
        rows.append({"check": "τ* = B1's grid argmin", "regime": name, "n": n, "disagree": bad,
                     "verdict": "holds" if n and not bad else ("refuted" if bad else "not enough problems"),
                     "tau_star_median": float(np.median(res["b3_tau_star"][ok])) if n else np.nan,
                     "argmin_median": float(np.median(grid_[i])) if n else np.nan,
                     "evidence": f"B3's τ* lies strictly between the grid neighbours of B1's argmin on {n - bad} of "
                                 f"{n} problems (grid of {len(grid_)} τ from {grid_[0]:g} to {grid_[-1]:g}; a "
                                 "deterministic check: any failure is a bug)"})
    return rows


def actual_error_rows(study) -> list[dict]:
    """|G(τ*)| against the best evaluation τ on the grid (mean |G| over problems), per regime."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        reg = rule_regret(np.abs(res["sweep_gap"][ok]), np.abs(res["gap_at_tau_star"][ok]), maximise=False)
        grid_ = res["sweep_tau"][0] if len(res) else np.asarray(TAU_GRID)
        rows.append({"check": "τ* against the actual error", "regime": name, "n": reg.n, "regret": reg.regret,
                     "lo": reg.lo, "hi": reg.hi, "verdict": regret_verdict(reg),
                     "best_tau": float(grid_[reg.best_index]) if reg.best_index >= 0 else np.nan,
                     "evidence": f"mean |G| at τ* is {reg.rule_value:.4g} against {reg.best_value:.4g} at the best "
                                 f"grid τ = {grid_[reg.best_index]:g}: regret {reg.regret:.3g} (paired bootstrap 95% "
                                 f"[{reg.lo:.3g}, {reg.hi:.3g}]) against the tolerance "
                                 f"{regret_allowance(reg):.3g} (10% of the grid's spread or 1% of the best)"})
    return rows


def deployed(study) -> dict:
    """J* of the policies trained at each τ (paired by problem), the advised τ per problem (the training τ
    nearest, in log, to τ* of the unclipped policy), its regret and its gain over the unclipped policy."""
    def compute():
        names = [n for n in study if n in study.regimes]
        taus = np.array([float(study[n].record["spec"]["tau"]) for n in names])
        if UNCLIPPED not in names or len(names) < 2:
            return {}
        base = study[UNCLIPPED]
        common = set(base["problem"][base.ok].tolist())
        for n in names:
            common &= set(study[n]["problem"][study[n].ok].tolist())
        problems = np.array(sorted(common), dtype=np.int64)

        def at(res, col):
            pos = {int(p): i for i, p in enumerate(res["problem"])}
            return res[col][[pos[p] for p in problems]].astype(np.float64)

        jstar = np.stack([at(study[n], "J_star") for n in names], axis=1)
        finite = np.isfinite(taus)
        tau_star = at(base, "b3_tau_star")
        choice_finite = nearest(taus[finite], np.maximum(tau_star, 1e-6), log=True)
        choice = np.flatnonzero(finite)[choice_finite]
        advised = jstar[np.arange(len(problems)), choice]
        reg = rule_regret(jstar, advised, maximise=True)
        gain = mean_interval(advised - jstar[:, names.index(UNCLIPPED)])
        means = [mean_interval(jstar[:, j]) for j in range(len(names))]
        return {"names": names, "taus": taus, "jstar": jstar, "means": means, "regret": reg, "gain": gain,
                "tau_star": tau_star, "choice": choice}
    return _cache(study, "deployed", compute)


def deployed_rows(study) -> list[dict]:
    d = deployed(study)
    if not d:
        return []
    reg, (g, glo, ghi) = d["regret"], d["gain"]
    best = d["names"][reg.best_index]
    return [{"check": "τ* improves the deployed policy", "regime": UNCLIPPED, "n": reg.n, "regret": reg.regret,
             "lo": reg.lo, "hi": reg.hi, "verdict": regret_verdict(reg),
             "evidence": f"training at the grid τ nearest the unclipped policy's τ* (median "
                         f"{np.median(d['tau_star']):.3g}) gives mean J* {reg.rule_value:.4g}: {g:+.3g} "
                         f"[{glo:+.3g}, {ghi:+.3g}] against training unclipped, and regret {reg.regret:.3g} "
                         f"[{reg.lo:.3g}, {reg.hi:.3g}] against the best training τ ({best}, mean J* "
                         f"{reg.best_value:.4g}); paired bootstrap 95% over {reg.n} problems, tolerance "
                         f"{regret_allowance(reg):.3g} (10% of the grid's spread or 1% of the best)"}]


def split_rows(study) -> list[dict]:
    """B1 with τ chosen on the evaluation sample: split (valid) and whole (the heuristic, a misuse)."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        spec_delta = float(res.record["spec"]["delta"])
        for label, key, misuse in (("B1, τ̂ on one half, B1 on the other", "split", False),
                                   ("B1, τ̂ and B1 on the whole sample (misuse)", "whole", True)):
            actual = np.abs(res[f"gap_{key}"][ok].astype(np.float64))
            bound = res[f"b1_{key}"][ok].astype(np.float64)
            n, k = int(actual.size), int(np.sum(actual > bound))
            lo = float(bounds.clopper_pearson_lower(k, n, 0.05)) if n else np.nan
            hi = float(bounds.clopper_pearson_upper(k, n, 0.05)) if n else np.nan
            rows.append({"check": label, "regime": name, "n": n, "violations": k, "rate": k / n if n else np.nan,
                         "cp_lower": lo, "cp_upper": hi, "delta": spec_delta,
                         "verdict": verdict(k, n, spec_delta, misuse=misuse),
                         "tau_median": float(np.median(res[f"{key}_tau"][ok])) if n else np.nan,
                         "evidence": f"{k} of {n} problems violate (rate {k / n if n else np.nan:.4f}, one-sided 95% "
                                     f"CP [{lo:.4f}, {hi:.4f}]) against δ = {spec_delta:g}; median τ̂ "
                                     f"{np.median(res[f'{key}_tau'][ok]) if n else np.nan:.3g}, median bound/|G| "
                                     f"{np.median(bound / np.maximum(actual, 1e-12)) if n else np.nan:.3g}"})
    return rows


def headline(study) -> str:
    arg = {r["regime"]: r for r in argmin_rows(study)}
    err = {r["regime"]: r for r in actual_error_rows(study)}
    split = {(r["regime"], "split" if "half" in r["check"] else "whole"): r for r in split_rows(study)}
    d = deployed(study)
    table = []
    for j, name in enumerate(study):
        res = study[name]
        row = {"regime": name, "tau_star": arg[name]["tau_star_median"], "argmin": arg[name]["argmin_median"],
               "agree": f"{arg[name]['n'] - arg[name]['disagree']}/{arg[name]['n']}",
               "best_tau": err[name]["best_tau"], "err_regret": f"{err[name]['regret']:.3g} "
               f"[{err[name]['lo']:.3g}, {err[name]['hi']:.3g}]",
               "split": f"{split[(name, 'split')]['rate']:.3f} (≤{split[(name, 'split')]['cp_upper']:.3f})",
               "whole": f"{split[(name, 'whole')]['rate']:.3f} (≤{split[(name, 'whole')]['cp_upper']:.3f})",
               "price": float(np.median(res["b1_split"][res.ok] / res["b1_whole"][res.ok])) if res.ok.any() else np.nan}
        if d and name in d["names"]:
            m, lo, hi = d["means"][d["names"].index(name)]
            row["jstar"] = f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
        table.append(row)
    text = markdown_table(table, [("regime", "training τ", ""), ("tau_star", "τ* p50", ".3g"),
                                  ("argmin", "B1 argmin p50", ".3g"), ("agree", "τ* = argmin", ""),
                                  ("best_tau", "best τ for \\|G\\|", ".3g"), ("err_regret", "\\|G\\| regret of τ*", ""),
                                  ("jstar", "J* of trained policy", ""), ("split", "B1 split: rate (CP95)", ""),
                                  ("whole", "B1 whole: rate (CP95)", ""), ("price", "B1 split / whole p50", ".3g")])
    if d:
        reg, (g, glo, ghi) = d["regret"], d["gain"]
        text += (f"\n\n**τ* verdict.** Training at the τ nearest the unclipped policy's τ* changes J* by {g:+.4f} "
                 f"[{glo:+.4f}, {ghi:+.4f}] against training unclipped; its regret against the best training τ on the "
                 f"grid ({d['names'][reg.best_index]}) is {reg.regret:.4f} [{reg.lo:.4f}, {reg.hi:.4f}] (paired "
                 f"bootstrap 95%, {reg.n} problems).")
    return text


# ---- figure --------------------------------------------------------------------------------------

def tau_sweep_curves(study):
    """Left: B1 and the actual |G| of the unclipped policy against the evaluation τ (medians with their
    interquartile bands), τ* marked; right: J* of the policies trained at each τ (means with 95% intervals)."""
    fig, axes = plots.figure(ncols=2, width=2 * plots.COLUMN_WIDTH, aspect=0.8)
    ax, bx = axes[0]
    name = UNCLIPPED if UNCLIPPED in study.regimes else next(iter(study.regimes))
    res = study[name]
    ok = res.ok
    grid_ = res["sweep_tau"][0]
    for j, (col, label) in enumerate((("sweep_b1", "B1 total"), ("sweep_gap", "actual |G(τ)|"))):
        v = np.abs(res[col][ok].astype(np.float64))
        q25, q50, q75 = np.percentile(v, [25, 50, 75], axis=0)
        ax.plot(grid_, q50, marker="o", color=plots.colour(j), label=label + " (median)")
        ax.fill_between(grid_, q25, q75, color=plots.colour(j), alpha=0.2, linewidth=0)
    ts = res["b3_tau_star"][ok]
    ax.axvline(np.median(ts), color="black", linestyle="--", linewidth=0.9, label="B3's τ* (median)")
    ax.axvspan(*np.percentile(ts, [25, 75]), color="black", alpha=0.08, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation clipping threshold τ (log)")
    ax.set_ylabel("|G| and its bound (log)")
    ax.set_title(f"Policy trained with {name}: bands 25–75%")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    d = deployed(study)
    if d:
        taus = d["taus"]
        finite = np.isfinite(taus)
        m = np.array([x[0] for x in d["means"]])
        lo = np.array([x[1] for x in d["means"]])
        hi = np.array([x[2] for x in d["means"]])
        plots.interval_bars(bx, taus[finite], lo[finite], hi[finite], centre=m[finite], color=plots.colour(2),
                            label="trained at τ (mean, 95%)")
        bx.plot(taus[finite], m[finite], color=plots.colour(2), linewidth=0.8)
        k = int(np.flatnonzero(~finite)[0])
        bx.axhspan(lo[k], hi[k], color=plots.colour(4), alpha=0.2, linewidth=0)
        bx.axhline(m[k], color=plots.colour(4), linewidth=1.0, label="trained unclipped (τ = ∞)")
        bx.axvline(np.median(d["tau_star"]), color="black", linestyle="--", linewidth=0.9,
                   label="τ* of the unclipped policy (median)")
        bx.set_xscale("log")
        bx.set_xlabel("training clipping threshold τ (log)")
        bx.set_ylabel("J* of the trained policy")
        bx.set_title("Does training at τ* help?")
        bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    return fig


SUITE = Suite(
    name="clipping",
    claim="B3's τ* equals B1's own argmin on a τ grid (to the grid's resolution), and the sweep shows whether "
          "following it lowers the actual error or improves J* of the trained policy; τ chosen on a split of the "
          "evaluation sample keeps B1 valid.",
    grid=grid,
    checks=(argmin_rows, actual_error_rows, deployed_rows, split_rows),
    headline=headline,
    figures=(Figure("clipping-tau-sweep-curves", "Left: B1 and the actual |G| of the unclipped policy against the "
                    "evaluation τ (medians, 25–75% bands), B3's τ* dashed (its 25–75% band shaded). Right: J* of the "
                    "policies trained at each τ (means, 95% bootstrap intervals), the unclipped policy's J* as a "
                    "band, and the τ* read off it.", tau_sweep_curves),),
    kernel=KERNEL,
    notes="",
)
