"""``stability``: [A]'s stability results (Li et al. 2026) checked at scale, each labelled by its regime.

The kernel (:class:`rlhf_bounds.stability.StabilityKernel`) trains, for every problem, the empirical
optimum θ*_S (GA to a gradient tolerance), [A]'s GA (η = 1/L_F) and [A]'s SGA (η_t = 1/(2L_F√t)) on S
and on R = 8 samples with one prompt replaced, with the same randomness, and computes [A]'s
assumption diagnostics and bounds (docs/theory.md §17). The grid ([A]'s setting: the oracle reward,
exact KL, sphere features, d 8, A 4, β 0.5, D = C = 1):

* ``realizable-nN``: σ_ξ = 0, n = N over the profile's n grid (the degenerate corner at the optimum:
  θ*_S = θ* for every S, so its stability is 0 up to round-off);
* ``misspecified-nN``: σ_ξ = 0.5 (no linear reward fits r*: θ*_S moves with S);
* ``lowrank``: features in a 2-dimensional subspace: Assumption 3 fails (σ = 0), coverage holds;
* ``uncovered``: A 2 and n 3 in d 8: V_S has rank ≤ 3, so Assumption 5's ε_n is large;
* ``thm1-d1`` (default and full): d 1, A 2, D 0.1, n 8192, where n exceeds Theorem 1's sample-size threshold
  (σ ≈ 0.5), so its conclusion (θ*_S = θ*) is checked rather than vacuous.

The evaluation set has M = max(1024, 8n) prompts, so its own noise inflates the mean |gap| by the same
factor √(1 + n/M) ≤ 1.06 at every n ≥ 128 (the slope is unbiased there; 0.01 at most over 32..4096).
"""

from __future__ import annotations


import numpy as np

from .. import bounds, fits, plots
from ..report import markdown_table, verdict
from ..spec import Spec
from ..stability import NULL_TOL, StabilityKernel, theorem2_generalisation_shape
from ._framework import Figure, Regime, Suite

KERNEL = StabilityKernel()

PROBLEMS = {"quick": 256, "default": 1024, "full": 4096}
N_GRID = {"quick": (32, 64, 128), "default": (32, 64, 128, 256, 512, 1024, 2048, 4096),
          "full": (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)}
#: The n of the lowrank regime and of the T rates' headline, per profile.
N_MID = {"quick": 64, "default": 256, "full": 256}

BASE = dict(d=8, actions=4, rollouts=2, pref_pairs=1, reward_model="oracle", train_log_ratio="exact", learner="GA",
            steps=256, record_every=16, beta=0.5, reward_norm=1.0, feature_bound=1.0, bounds="b1")
SIGMA_MISSPECIFIED = 0.5
#: n of the regime where Theorem 1's threshold is within reach: d 1, A 2, D 0.1 (σ ≈ 0.5, threshold ≈ 6,000).
THM1_N = 8192
#: Distance ‖θ*_S − θ*‖ below which the empirical stationary point "is θ*" (float32 GA reaches ~1e-6).
STATIONARY_TOL = 1e-3
#: ‖∇F_S(θ*_S)‖ below which GA reached the empirical optimum.
GRAD_TOL = 1e-5
#: |f| differences below this are round-off (float32 values of size ~1): a stability of 0.
ROUND_OFF = 1e-5


def eval_prompts(n: int) -> int:
    return max(1024, 8 * n)


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE)
    out = []
    for n in N_GRID[profile]:
        for fam, sx in (("realizable", 0.0), ("misspecified", SIGMA_MISSPECIFIED)):
            out.append(Regime(f"{fam}-n{n}", base.replace(prompts=n, eval_prompts=eval_prompts(n), sigma_xi=sx),
                              PROBLEMS[profile], ("sigma_xi", "prompts", "feature_law"),
                              {"family": fam, "n": n}))
    m = N_MID[profile]
    out.append(Regime("lowrank", base.replace(prompts=m, eval_prompts=eval_prompts(m), feature_law="lowrank",
                                              rank=2), PROBLEMS[profile], ("feature_law", "rank"),
                      {"family": "lowrank", "n": m}))
    out.append(Regime("uncovered", base.replace(prompts=3, actions=2, eval_prompts=1024), PROBLEMS[profile],
                      ("prompts", "actions"), {"family": "uncovered", "n": 3}))
    if profile != "quick":
        out.append(Regime("thm1-d1", base.replace(d=1, actions=2, reward_norm=0.1, prompts=THM1_N,
                                                  eval_prompts=eval_prompts(THM1_N)), PROBLEMS[profile],
                          ("d", "actions", "reward_norm", "prompts"), {"family": "thm1", "n": THM1_N}))
    return out


# ---- regime labels ------------------------------------------------------------------------------

def _spec(res) -> dict:
    return res.record["spec"]


def _f(res, col) -> np.ndarray:
    return np.asarray(res[col][res.ok], np.float64)


def assumptions(res) -> dict[str, float]:
    """The fraction of (status-0) problems meeting each of [A]'s assumptions, and the regime's facts."""
    s = _spec(res)
    n, C = int(s["prompts"]), float(s["feature_bound"])
    return {
        "realizable": float(s["sigma_xi"]) == 0.0,
        "A3": float(np.mean(_f(res, "a3_sigma_path") > NULL_TOL * C * C)),
        "A4": float((int(s["actions"]) <= int(s["d"])) * np.mean(_f(res, "a4_pivot") > 1e-3)),
        "A5": float(np.mean(_f(res, "a5_eps_max") * n <= 1.0)),
        "Thm1 n": float(np.mean(n > _f(res, "b6_thm1_n"))),
        "converged": float(np.mean(_f(res, "opt_grad_norm_max") <= GRAD_TOL)),
    }


def degenerate(res) -> bool:
    """[A]'s degenerate corner: realizable, exact expectations, covered, and θ*_S = θ* (stability 0)."""
    a = assumptions(res)
    return bool(a["realizable"] and a["A5"] == 1.0 and np.all(_f(res, "stab_opt") <= ROUND_OFF))


def label(res) -> str:
    a = assumptions(res)
    parts = ["realizable" if a["realizable"] else "misspecified"]
    parts += [f"{k} {'met' if a[k] == 1.0 else 'fails' if a[k] == 0.0 else f'{a[k]:.0%}'}" for k in ("A3", "A4", "A5")]
    if degenerate(res):
        parts.append("degenerate")
    return ", ".join(parts)


def _families(study, fam):
    rows = [(int(_spec(r)["prompts"]), name, r) for name, r in study.items() if name.startswith(fam + "-n")]
    return sorted(rows)


# ---- checks -------------------------------------------------------------------------------------

def _cp(k, n):
    return float(bounds.clopper_pearson_lower(k, n, 0.05)), float(bounds.clopper_pearson_upper(k, n, 0.05))


def bound_verdicts(study) -> list[dict]:
    """Lemma 1 (coverage at δ), Theorem 1 (threshold), Theorem 2 (stability bound), Lemma 2 and L_F, per regime."""
    rows = []
    for name, res in study.items():
        s = _spec(res)
        delta, n = float(s["delta"]), int(s["prompts"])
        lab = label(res)
        N = int(res.ok.sum())
        # Lemma 1: |J_S(θ*_S) − J(θ*)| ≤ 9DC√(2 log(2/ρ)/n) w.p. ≥ 1 − ρ
        a, b = _f(res, "lemma1_actual"), _f(res, "b6_lemma1")
        k = int(np.sum(a > b))
        lo, hi = _cp(k, N)
        rows.append({"check": "Lemma 1", "regime": name, "verdict": verdict(k, N, delta),
                     "evidence": f"[{lab}] {k} of {N} problems violate (rate {k / max(N, 1):.4f}, one-sided 95% CP "
                                 f"[{lo:.4f}, {hi:.4f}]) against ρ = {delta:g}; median |J_S(θ*_S) − J(θ*)| "
                                 f"{np.median(a):.3g} under the bound {np.median(b):.3g}",
                     "rate": k / max(N, 1), "cp_lower": lo, "cp_upper": hi, "n": N, "violations": k})
        # Theorem 1: above the threshold, θ*_S must be θ*
        thr = _f(res, "b6_thm1_n")
        above = n > thr
        dist = _f(res, "opt_dist")
        if above.sum() == 0:
            med = np.median(thr)
            rows.append({"check": "Theorem 1", "regime": name, "verdict": "vacuous",
                         "evidence": f"[{lab}] n = {n} is below the sample-size threshold on all {N} problems "
                                     f"(median threshold {med:.3g}{'' if np.isfinite(med) else ': σ = 0'}); "
                                     f"‖θ*_S − θ*‖ median {np.median(dist):.2g}"})
        else:
            m = int(above.sum())
            good = int(np.sum(dist[above] <= STATIONARY_TOL))
            rows.append({"check": "Theorem 1", "regime": name, "verdict": verdict(m - good, m, delta),
                         "evidence": f"[{lab}] {m} of {N} problems have n above the threshold; on {good} of them "
                                     f"the empirical stationary point is θ* (‖θ*_S − θ*‖ ≤ {STATIONARY_TOL:g})"})
        # Theorem 2: the empirical stability of θ*_S under its bound (a plug-in: Γ₁ over the pairs tried)
        st, b2 = _f(res, "stab_opt"), _f(res, "b6_thm2")
        k = int(np.sum(st > b2))
        if degenerate(res):
            v, why = "vacuous", ("degenerate corner (realizable, exact, covered): θ*_S = θ* for every S, so the "
                                 f"stability is 0 up to round-off (largest {np.max(st):.2g}); not a confirmation")
        else:
            v, why = verdict(k, N, delta, deterministic=True), f"{k} of {N} problems exceed the bound"
        rows.append({"check": "Theorem 2 stability", "regime": name, "verdict": v,
                     "evidence": f"[{lab}] {why}; median empirical stability {np.median(st):.3g} (max over "
                                 f"{KERNEL.replacements} replaced prompts) against the bound {np.median(b2):.3g} "
                                 f"(Γ₁ median {np.median(_f(res, 'b6_gamma1')):.3g})"})
        # Lemma 2 at every checkpoint, and the certified smoothness on the path
        g2, l2 = np.asarray(res["ga_grad2_best"][res.ok], np.float64), np.asarray(res["b6_lemma2"][res.ok], np.float64)
        k = int(np.sum(np.any(g2 > l2, axis=1)))
        hess, lf, ball = _f(res, "hess_norm_max"), _f(res, "L_F"), _f(res, "ga_ball")
        kh = int(np.sum(hess > lf))
        rows.append({"check": "Lemma 2 (GA)", "regime": name, "verdict": verdict(k + kh, N, delta, deterministic=True),
                     "evidence": f"[{lab}] {k} of {N} problems have min_t ‖∇F_S‖² above 36·L_F·D·C/T at a "
                                 f"checkpoint (median ratio at T {int(s['steps'])}: "
                                 f"{np.median(g2[:, -1] / l2[:, -1]):.2g}); largest Hessian norm on the path "
                                 f"{np.max(hess):.3g} ≤ L_F = {np.median(lf):.3g} on {N - kh} of {N}; the path stays "
                                 f"in ‖w‖ ≤ R (largest ‖w‖/R {np.max(ball):.2g})"})
    return rows


def _rate_row(check, regime, fit, theory, lab, extra="", x=None):
    v = fits.slope_verdict(fit, theory, upper=True)
    if x is not None:
        # Õ hides log factors: T^a·log T has the local slope a + 1/ln T at the range's geometric middle
        mid = float(np.exp(np.mean(np.log(x))))
        extra += (f"; one log factor (the Õ) would allow slopes up to {theory + 1 / np.log(mid):+.3f} at "
                  f"{mid:.0f}")
    return {"check": check, "regime": regime, "verdict": v, "slope": fit.slope, "lo": fit.lo, "hi": fit.hi,
            "theory": theory,
            "evidence": f"[{lab}] log-log slope {fit.slope:+.3f} (95% bootstrap [{fit.lo:+.3f}, {fit.hi:+.3f}], "
                        f"{fit.n_boot} resamples) against the theory's {theory:+.3f} (a ≲ rate: holds unless the "
                        f"decline is significantly slower){extra}"}


def _drift_text(sc):
    """The smallest constants of a ≲ shape and their drift: a constant that grows (interval above 0) refutes the
    shape on these problems; one that falls says the quantity falls faster than the shape."""
    d = sc.drift
    what = ("grows: refutes the shape here" if d.lo > 0 else "falls: faster than the shape" if d.hi < 0
            else "no drift")
    shown = sc.constants if len(sc.constants) <= 8 else sc.constants[:: max(1, len(sc.constants) // 6)]
    return (f"; smallest constants {', '.join(f'{c:.3g}' for c in shown)}"
            f"{' (every few)' if len(shown) < len(sc.constants) else ''}, drift slope {d.slope:+.3f} "
            f"[{d.lo:+.3f}, {d.hi:+.3f}]: {what}")


def n_rates(study) -> list[dict]:
    """The generalisation gap of θ*_S against n (theory n^-1/2) per family, with the shape's constants and drift."""
    rows = []
    for fam in ("realizable", "misspecified"):
        cells = _families(study, fam)
        if len(cells) < 2:
            continue
        ns = [c[0] for c in cells]
        gaps = [np.abs(_f(r, "gen_gap_opt")) for _, _, r in cells]
        fit = fits.bootstrap_slope(ns, gaps, n_boot=1000)
        sc = fits.shape_constants(ns, gaps, lambda n: n ** -0.5, n_boot=1000)
        rows.append(_rate_row("rate: |J_S(θ*_S) − J(θ*_S)| vs n", cells[-1][1], fit, -0.5,
                              f"{fam}, n {ns[0]}..{ns[-1]}", _drift_text(sc), x=ns))
        # Theorem 2's generalisation shape ℰ_stab·log n·log(1/ρ) + 6βRC√(log(1/ρ)/n), its mean at each n
        shape = {}
        for n, _, r in cells:
            sp = _spec(r)
            shape[n] = float(np.mean(theorem2_generalisation_shape(
                n, _f(r, "stab_opt"), reward_norm=float(sp["reward_norm"]), feature_bound=float(sp["feature_bound"]),
                beta=float(sp["beta"]), delta=float(sp["delta"]))))
        sc2 = fits.shape_constants(ns, gaps, lambda n: shape[n], n_boot=1000)
        d = sc2.drift
        rows.append({"check": "Thm 2 generalisation shape", "regime": cells[-1][1],
                     "verdict": "refuted" if d.lo > 0 else "holds",
                     "evidence": f"[{fam}, n {ns[0]}..{ns[-1]}] mean |gap| / (ℰ_stab log n log(1/ρ) + "
                                 f"6βRC√(log(1/ρ)/n)), a ≲ with an unstated constant" + _drift_text(sc2)})
    return rows


def _t_fit(res, col, theory):
    s = _spec(res)
    T = np.arange(1, int(s["steps"]) // int(s["record_every"]) + 1) * int(s["record_every"])
    if col.startswith("sga"):
        T = T * KERNEL.sga_factor
    v = np.maximum(np.asarray(res[col][res.ok], np.float64), 0.0)
    samples = [v[:, j] for j in range(v.shape[1])]
    if not all(np.mean(x) > 0 for x in samples):
        return None, T, samples
    return fits.bootstrap_slope(T, samples, n_boot=500, paired=True), T, samples


def t_rates(study) -> list[dict]:
    """The optimisation error J_S(θ*_S) − J_S(w_T) against T for GA (theory T^-1/4) and SGA (T^-1/8), at the
    best-gradient iterate (the last iterate beside it): the T-part of [A]'s Õ(T^-1/4 + n^-1/2), whose n-part is
    the gap at θ*_S (:func:`n_rates`)."""
    rows = []
    for name, res in study.items():
        lab = label(res)
        for learner, theory in (("ga", -0.25), ("sga", -0.125)):
            fit, T, samples = _t_fit(res, f"{learner}_opt_gap_best", theory)
            if fit is None:
                rows.append({"check": f"rate: {learner.upper()} vs T", "regime": name, "verdict": "vacuous",
                             "evidence": f"[{lab}] J_S(θ*_S) − J_S(w_T) is 0 at some T (round-off)"})
                continue
            last, _, _ = _t_fit(res, f"{learner}_opt_gap_last", theory)
            sc = fits.shape_constants(T, samples, lambda t, a=theory: t ** a, n_boot=300, paired=True)
            extra = (f"; last iterate {last.slope:+.3f} [{last.lo:+.3f}, {last.hi:+.3f}]" if last else "") + \
                f"; T {T[0]}..{T[-1]}" + _drift_text(sc)
            rows.append(_rate_row(f"rate: {learner.upper()} vs T", name, fit, theory, lab, extra, x=T))
    return rows


# ---- headline ---------------------------------------------------------------------------------

def headline(study) -> str:
    rows = []
    for name, res in study.items():
        a = assumptions(res)
        N = int(res.ok.sum())
        k = int(np.sum(_f(res, "lemma1_actual") > _f(res, "b6_lemma1")))
        lo, hi = _cp(k, N)
        rows.append({"regime": name, "n": int(_spec(res)["prompts"]), "label": label(res),
                     "gap": f"{np.mean(np.abs(_f(res, 'gen_gap_opt'))):.3g}",
                     "l1": f"{k}/{N} [{lo:.3f}, {hi:.3f}]",
                     "stab": f"{np.median(_f(res, 'stab_opt')):.2g}", "thm2": f"{np.median(_f(res, 'b6_thm2')):.3g}",
                     "ga": f"{np.median(_f(res, 'stab_ga_best')):.2g}", "sga": f"{np.median(_f(res, 'stab_sga_best')):.2g}",
                     "thr": f"{np.median(_f(res, 'b6_thm1_n')):.3g}",
                     "sigma": f"{np.median(_f(res, 'a3_sigma_path')):.3g}", "eps": f"{np.median(_f(res, 'a5_eps_max')):.2g}",
                     "grad": f"{np.max(_f(res, 'opt_grad_norm_max')):.1e}" + ("" if a["converged"] == 1.0 else " (not all reached)"),
                     "ok": N})
    return markdown_table(rows, [("regime", "regime", ""), ("n", "n", "d"), ("label", "regime label", ""),
                                 ("gap", "mean \\|gen gap\\| at θ*_S", ""), ("l1", "Lemma 1 violations [CP95]", ""),
                                 ("stab", "stability θ*_S (p50)", ""), ("thm2", "Thm 2 bound (p50)", ""),
                                 ("ga", "stability GA (p50)", ""), ("sga", "stability SGA (p50)", ""),
                                 ("thr", "Thm 1 n threshold (p50)", ""), ("sigma", "σ (A3, p50)", ""),
                                 ("eps", "ε_n (A5, p50)", ""), ("grad", "max ‖∇F_S(θ*_S)‖", ""),
                                 ("ok", "ok", "d")])


# ---- figures ------------------------------------------------------------------------------------

def stability_vs_theorem2(study):
    """The empirical stability (median, interquartile bars) of θ*_S, GA and SGA against n, beside Theorem 2's value."""
    fig, axes = plots.figure(2, 1, width=2 * plots.COLUMN_WIDTH, aspect=0.8, sharey=True)
    floor = 1e-9
    for ax, fam in zip(axes.flat, ("realizable", "misspecified")):
        cells = _families(study, fam)
        ns = np.array([c[0] for c in cells], float)
        for j, (col, lab) in enumerate((("stab_opt", "θ*_S (empirical optimum)"), ("stab_ga_best", "GA, best iterate"),
                                        ("stab_sga_best", "SGA, best iterate"), ("b6_thm2", "Theorem 2 bound"))):
            q = np.array([plots.quartiles(np.maximum(_f(r, col), floor)) for _, _, r in cells])
            if q.size == 0:
                continue
            x = ns * (1 + 0.04 * (j - 1.5))
            plots.interval_bars(ax, x, q[:, 0], q[:, 2], centre=q[:, 1],
                                color=plots.colour(j), label=lab, marker="s" if col.startswith("b6") else "o")
            ax.plot(x, q[:, 1], color=plots.colour(j), linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("training prompts n (log)")
        title = fam + (" (θ*_S = θ*: degenerate, 0 up to round-off)" if fam == "realizable" else "")
        ax.set_title(title)
    axes.flat[0].set_ylabel(f"max_x |f_S(x) − f_S'(x)| (log; 0 drawn at {floor:g})")
    handles, labels = axes.flat[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4)
    fig.suptitle("Empirical uniform stability (median, IQR) against Theorem 2's bound")
    return fig


def gap_rates(study):
    """Mean |gap| against n at θ*_S, and the optimisation error J_S(θ*_S) − J_S(w_T) against T for GA and SGA, with
    fitted and theory slopes."""
    fig, axes = plots.figure(3, 1, width=2.4 * plots.COLUMN_WIDTH, aspect=1.15)
    ax = axes.flat[0]
    for j, fam in enumerate(("realizable", "misspecified")):
        cells = _families(study, fam)
        if len(cells) < 2:
            continue
        ns = np.array([c[0] for c in cells], float)
        g = [np.abs(_f(r, "gen_gap_opt")) for _, _, r in cells]
        m = np.array([x.mean() for x in g])
        se = np.array([x.std(ddof=1) / np.sqrt(x.size) for x in g])
        fit = fits.bootstrap_slope(ns, g, n_boot=300)
        plots.interval_bars(ax, ns, m - 2 * se, m + 2 * se, centre=m, color=plots.colour(j),
                            label=f"{fam}: slope {fit.slope:+.2f} [{fit.lo:+.2f}, {fit.hi:+.2f}]")
        ax.plot(ns, m[0] * (ns / ns[0]) ** fit.slope, color=plots.colour(j), linewidth=0.8)
    if len(ax.lines):
        ns = np.array([c[0] for c in _families(study, "realizable")], float)
        ref = np.mean(np.abs(_f(_families(study, "realizable")[0][2], "gen_gap_opt")))
        ax.plot(ns, ref * (ns / ns[0]) ** -0.5, color="black", linestyle="--", linewidth=0.8, label="theory n^-1/2")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (log)")
    ax.set_ylabel("mean |J_S(θ*_S) − J(θ*_S)|")
    ax.set_title("gap at θ*_S vs n")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=6)
    for ax, learner, theory in ((axes.flat[1], "ga", -0.25), (axes.flat[2], "sga", -0.125)):
        shown = [c for fam in ("realizable", "misspecified") for c in _families(study, fam)
                 if c[0] == N_MID.get(study.record.get("profile"), c[0])] or \
                [c for fam in ("realizable", "misspecified") for c in _families(study, fam)[:1]]
        for j, (n, name, res) in enumerate(shown):
            fit, T, samples = _t_fit(res, f"{learner}_opt_gap_best", theory)
            m = np.array([x.mean() for x in samples])
            se = np.array([x.std(ddof=1) / np.sqrt(x.size) for x in samples])
            lab = name.split("-")[0] + (f": slope {fit.slope:+.2f} [{fit.lo:+.2f}, {fit.hi:+.2f}]" if fit else "")
            plots.interval_bars(ax, T, np.maximum(m - 2 * se, 1e-12), m + 2 * se, centre=np.maximum(m, 1e-12),
                                color=plots.colour(j), label=lab)
            _, _, last = _t_fit(res, f"{learner}_opt_gap_last", theory)
            ax.plot(T, np.maximum([x.mean() for x in last], 1e-12), color=plots.colour(j), linestyle=":",
                    linewidth=0.8, label=f"{name.split('-')[0]}, last iterate")
            if j == 0:
                ax.plot(T, m[0] * (T / T[0]) ** theory, color="black", linestyle="--", linewidth=0.8,
                        label=f"theory T^{theory:g}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps T (log)")
        ax.set_ylabel("J_S(θ*_S) − J_S(w_T), best iterate")
        ax.set_title(f"{learner.upper()} vs T" + (f" (n = {shown[0][0]})" if shown else ""))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=6)
    fig.suptitle("Rates (means ± 2 se): fitted log-log slopes with 95% bootstrap intervals, theory dashed")
    return fig


ASSUMPTIONS = ("realizable", "A3", "A4", "A5", "Thm1 n", "converged")


def assumption_map(study):
    """For every regime, the fraction of problems meeting each assumption (1: all, 0: none)."""
    names = list(study)
    vals = np.array([[float(assumptions(study[n])[k]) for k in ASSUMPTIONS] for n in names])
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.12 + 0.045 * len(names))
    im = ax.imshow(vals, cmap="cividis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(ASSUMPTIONS)))
    ax.set_xticklabels(["realizable", "A3: σ > 0", "A4: A ≤ d, indep.", "A5: ε_n ≤ 1/n", "n > Thm 1 threshold",
                        "θ*_S reached"], rotation=20, ha="right")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.grid(False)
    for i in range(len(names)):
        for j in range(len(ASSUMPTIONS)):
            ax.text(j, i, f"{vals[i, j]:.0%}", ha="center", va="center", fontsize=6,
                    color="black" if vals[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=ax, label="fraction of problems")
    ax.set_title("Which regimes meet which of [A]'s assumptions")
    return fig


SUITE = Suite(
    name="stability",
    claim="[A]'s stability results, each checked where its assumptions hold and labelled where they do not: "
          "Lemma 1 covers at its ρ, Theorem 2 bounds the empirical replace-one stability, Lemma 2 bounds GA's "
          "gradient with the certified L_F, and the gaps fall no slower than n^-1/2, T^-1/4 (GA) and T^-1/8 (SGA).",
    grid=grid,
    checks=(bound_verdicts, n_rates, t_rates),
    headline=headline,
    figures=(Figure("stability-vs-theorem2", "The empirical uniform stability (median and interquartile range over "
                    "problems, max over 8 replaced prompts) of the empirical optimum, GA and SGA against n, beside "
                    "Theorem 2's bound (squares).", stability_vs_theorem2),
             Figure("stability-gap-rates", "The mean gap at the empirical optimum against n, and the "
                    "optimisation error J_S(θ*_S) − J_S(w_T) of GA and SGA against T (±2 se; dotted: last iterate), with the fitted slopes "
                    "(95% bootstrap) and the theory's slope (dashed).", gap_rates),
             Figure("stability-assumption-map", "The fraction of problems of each regime that meet each of [A]'s "
                    "assumptions.", assumption_map)),
    kernel=KERNEL,
)
