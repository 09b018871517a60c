"""``ou``: constant-step SGD at the empirical maximiser is the Ornstein-Uhlenbeck process B5 predicts.

Each problem runs many SGD chains (the learner's own step) on its own training sample from the
maximiser w_S of F_S (:mod:`rlhf_bounds.ou_chains`), and sets their empirical stationary covariance
beside the two predictions of docs/theory.md §8: the continuous Lyapunov solution (the OU law) and
the discrete one (exact for the linearised recursion). The grid sweeps the step η (traced: one
compiled kernel) at batch b = 4 in a non-degenerate regime (the oracle reward with misspecification
σ_ξ = 0.5, exact expectations over responses, so every per-prompt gradient at w_S is not 0 and
C_g ≠ 0), adds b = 16 at two steps for the η/b dependence of B2's Gaussian posterior
(He, Liu & Tao 2019), and one ``degenerate`` regime (realizable reward, σ_ξ = 0: C_g = 0 at w_S,
SGD stands still) that the kernel detects and the report shows as such.

The shape is small (d 6, A 5, n 128) so that chains can run far past their autocorrelation time
(docs/theory.md §8.2–§8.5). The log-ratio trains exact (τ = ∞) and is clipped at τ = 1 only where
the gap is evaluated: B2 needs a bounded objective, and Q's support is all of R^d.
"""

from __future__ import annotations

import matplotlib.ticker
import numpy as np

from .. import plots
from ..ou_chains import OUChainKernel
from ..report import CHECKS, markdown_table
from ..spec import Spec
from ._checks import coverage_verdicts
from ._framework import Figure, Regime, Suite

#: Problems per regime (the covariance check asks for at least MIN_PROBLEMS) and chain length T.
PROBLEMS = {"quick": 128, "default": 128, "full": 1024}
STEPS = {"quick": 1000, "default": 4000, "full": 16000}
#: The b = 16 regimes of the η/b sweep need fewer problems (they feed the bound's medians).
SWEEP_PROBLEMS = {"quick": 32, "default": 64, "full": 256}
MIN_PROBLEMS = 128

#: The steps swept at b = 4 in each profile, and the b = 16 regimes' steps.
ETAS = {"quick": (2.0, 4.0), "default": (0.5, 1.0, 2.0, 4.0), "full": (0.25, 0.5, 1.0, 2.0, 4.0)}
WIDE_ETAS = {"quick": (), "default": (2.0, 8.0), "full": (2.0, 4.0, 8.0)}
BATCH, WIDE_BATCH = 4, 16

BASE = dict(d=6, actions=5, prompts=128, rollouts=2, eval_prompts=512, posterior_draws=16, learner="SGD",
            estimator="exact", schedule="constant", reward_model="oracle", train_log_ratio="exact", tau=1.0,
            sigma_xi=0.5, batch=BATCH)
DEFINING = ("lr", "batch", "sigma_xi", "reward_model", "estimator", "train_log_ratio")

#: The kernel: 128 chains per problem, a fifth of T burnt, the rest in 4 batches per chain.
KERNEL = OUChainKernel(chains=128, burn_fraction=0.2, batches=4)

#: Verdict thresholds (the issue's acceptance criteria): median relative Frobenius error against the discrete
#: prediction, the covariance's own sampling error, chain length in autocorrelation times, slope tolerance.
MAX_ERROR, MAX_SE, MIN_IATS, SLOPE_TOL = 0.10, 0.05, 20.0, 0.1


def _name(eta, b):
    return f"eta-{eta:g}" + ("" if b == BATCH else f"-b{b}")


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE, steps=STEPS[profile], record_every=STEPS[profile])
    regimes = [Regime(_name(eta, BATCH), base.replace(lr=eta), PROBLEMS[profile], DEFINING)
               for eta in ETAS[profile]]
    regimes += [Regime(_name(eta, WIDE_BATCH), base.replace(lr=eta, batch=WIDE_BATCH), SWEEP_PROBLEMS[profile],
                       DEFINING) for eta in WIDE_ETAS[profile]]
    regimes.append(Regime("degenerate", base.replace(lr=ETAS[profile][0], sigma_xi=0.0), SWEEP_PROBLEMS[profile],
                          DEFINING))
    return regimes


# ---- reading the results -------------------------------------------------------------------

def _spec(res):
    return res.record["spec"]


def _col(res, name, keep=None):
    ok = res.ok if keep is None else keep
    return np.asarray(res[name], float)[ok]


def _live(res):
    """Status-0 problems that are not degenerate."""
    return res.ok & (np.asarray(res["chain_degenerate"]) == 0)


def _sweep(study, batch=BATCH):
    """(η, regime name, results) of the non-degenerate regimes at batch ``batch``, by η."""
    out = [(float(_spec(r)["lr"]), n, r) for n, r in study.items()
           if int(_spec(r)["batch"]) == batch and float(_spec(r)["sigma_xi"]) > 0]
    return sorted(out)


def _median(x):
    x = np.asarray(x, float)
    return float(np.median(x)) if x.size else float("nan")


def loglog_slope(x, ys, resamples=400, seed=0):
    """Least-squares slope of log median(y) on log x over the regimes, with a bootstrap 95% interval
    (problems resampled within each regime). ``ys``: one array of per-problem values per x."""
    lx = np.log(np.asarray(x, float))
    fit = lambda meds: float(np.polyfit(lx, np.log(meds), 1)[0])
    slope = fit([np.median(y) for y in ys])
    rng = np.random.default_rng(seed)
    boot = [fit([np.median(rng.choice(y, y.size)) for y in ys]) for _ in range(resamples)]
    return slope, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


# ---- checks --------------------------------------------------------------------------------

def covariance_verdicts(study) -> list[dict]:
    """Per regime: the median relative Frobenius error of the chains' covariance against the discrete
    prediction, with the covariance's sampling error and the chains' length in autocorrelation times."""
    rows = []
    for name, res in study.items():
        live = _live(res)
        n, degenerate = int(live.sum()), int((res.ok & (np.asarray(res["chain_degenerate"]) == 1)).sum())
        if n == 0:
            rows.append({"check": "OU covariance (discrete)", "regime": name, "n": 0, "verdict": "vacuous",
                         "evidence": f"all {degenerate} status-0 problems are degenerate (tr C_g ≈ 0 at w_S: "
                                     "SGD does not move, Σ = 0), so no relative error is defined"})
            continue
        disc, cont = _median(_col(res, "chain_rel_err_disc", live)), _median(_col(res, "chain_rel_err_cont", live))
        se = _median(_col(res, "chain_cov_se", live))
        length = _col(res, "chain_samples", live) / KERNEL.chains / _col(res, "chain_iat_max", live)
        iats = _median(length)
        if se >= MAX_SE or iats < MIN_IATS or n < MIN_PROBLEMS:
            verdict = "not enough problems"
        else:
            verdict = "holds" if disc < MAX_ERROR else "refuted"
        rows.append({"check": "OU covariance (discrete)", "regime": name, "n": n, "verdict": verdict,
                     "rel_err_disc": disc, "rel_err_cont": cont, "cov_se": se,
                     "evidence": f"median ‖Σ̂ − Σ_disc‖_F/‖Σ_disc‖_F = {disc:.4f} (continuous: {cont:.4f}) over {n} "
                                 f"problems, against {MAX_ERROR:g}; median sampling error of Σ̂ from its ESS "
                                 f"{se:.4f} (needs < {MAX_SE:g}); chains ran a median {iats:.0f} autocorrelation "
                                 f"times after burn-in (needs ≥ {MIN_IATS:g}; ≥ {MIN_PROBLEMS} problems needed)"})
    return rows


def gap_slope_verdicts(study) -> list[dict]:
    """The continuous-minus-discrete gap ‖Σ_cont − Σ_disc‖_F/‖Σ_disc‖_F grows like η: log-log slope ≈ 1."""
    sweep = _sweep(study)
    rows = []
    if len(sweep) < 2:
        return rows
    etas = [e for e, _, _ in sweep]
    gaps = [_col(r, "chain_cont_vs_disc", _live(r)) for _, _, r in sweep]
    if any(g.size == 0 for g in gaps):
        return rows
    slope, lo, hi = loglog_slope(etas, gaps)
    emp = [_col(r, "chain_rel_err_cont", _live(r)) - _col(r, "chain_rel_err_disc", _live(r)) for _, _, r in sweep]
    verdict = "holds" if abs(slope - 1.0) <= SLOPE_TOL else "refuted"
    for (eta, name, res), g, e in zip(sweep, gaps, emp):
        rows.append({"check": "continuous − discrete ∝ η", "regime": name, "n": int(g.size), "verdict": verdict,
                     "slope": slope, "slope_lo": lo, "slope_hi": hi,
                     "evidence": f"log-log slope of the median ‖Σ_cont − Σ_disc‖_F/‖Σ_disc‖_F on η over η ∈ "
                                 f"{{{', '.join(f'{x:g}' for x in etas)}}} (b = {BATCH}) is {slope:.3f} "
                                 f"(95% bootstrap [{lo:.3f}, {hi:.3f}]; holds within ±{SLOPE_TOL:g} of 1); here the "
                                 f"gap is {_median(g):.4f} = {_median(g) / eta:.4f}·η, and the chains' continuous "
                                 f"minus discrete error {_median(e):+.4f}"})
    return rows


def iat_verdicts(study) -> list[dict]:
    """The slowest mode's autocorrelation time against the linearised chain's AR(1) value (batch means)."""
    rows = []
    for name, res in study.items():
        live = _live(res)
        if not live.any():
            continue
        emp = _col(res, "chain_iat_slow", live)
        pred = _col(res, "chain_iat_slow_bm_pred", live)
        inv = _col(res, "chain_inv_eta_lambda_min", live)
        ratio = _median(emp / pred)
        rows.append({"check": "autocorrelation time", "regime": name, "n": int(live.sum()),
                     "verdict": "holds" if abs(ratio - 1.0) <= 0.15 else "refuted",
                     "evidence": f"median τ̂ along H's slowest eigenvector / its AR(1) value (2 − ηλ_min)/(ηλ_min) "
                                 f"less the batch-means edge term is {ratio:.3f} (holds within ±0.15); median τ̂ "
                                 f"{_median(emp):.1f} beside 1/(ηλ_min) = {_median(inv):.1f}"})
    return rows


def degenerate_verdicts(study) -> list[dict]:
    """The degenerate corner is detected where it should be and nowhere else, and w_S reaches its tolerance."""
    rows = []
    for name, res in study.items():
        ok = res.ok
        flagged = int((np.asarray(res["chain_degenerate"])[ok] == 1).sum())
        unconverged = int((np.asarray(res["chain_ws_converged"])[ok] == 0).sum())
        n = int(ok.sum())
        expect = float(_spec(res)["sigma_xi"]) == 0.0
        good = (flagged == n) if expect else (flagged == 0)
        rel = _col(res, "chain_cg_relative")
        rows.append({"check": "degenerate corner flagged", "regime": name, "n": n,
                     "verdict": "holds" if good and unconverged == 0 else "refuted",
                     "evidence": f"{flagged} of {n} problems flagged degenerate (tr C_g ≤ 1e-6 · mean ‖g_i(w_ref)‖²; "
                                 f"median ratio {_median(rel):.2e}), expected {'all' if expect else 'none'}; "
                                 f"{unconverged} problems' w_S missed ‖∇F_S‖ ≤ {KERNEL.grad_tol:g} (median "
                                 f"{_median(_col(res, 'chain_ws_grad_norm')):.1e})"})
    return rows


B2_GAUSS = tuple(c for c in CHECKS if c.label == "B2 Gaussian")


def bound_verdicts(study) -> list[dict]:
    return coverage_verdicts(study, B2_GAUSS)


# ---- headline ------------------------------------------------------------------------------

def headline(study) -> str:
    table = []
    for name, res in study.items():
        s, live = _spec(res), _live(res)
        row = {"regime": name, "eta": float(s["lr"]), "b": int(s["batch"]), "ok": int(res.ok.sum()),
               "degenerate": int((np.asarray(res["chain_degenerate"])[res.ok] == 1).sum())}
        if live.any():
            row.update(disc=_median(_col(res, "chain_rel_err_disc", live)),
                       cont=_median(_col(res, "chain_rel_err_cont", live)),
                       gap=_median(_col(res, "chain_cont_vs_disc", live)),
                       se=_median(_col(res, "chain_cov_se", live)),
                       ess=_median(_col(res, "chain_ess", live)),
                       iat=_median(_col(res, "chain_iat_slow", live)),
                       iat_pred=_median(_col(res, "chain_iat_slow_pred", live)),
                       iat_bm=_median(_col(res, "chain_iat_slow_bm_pred", live)),
                       inv=_median(_col(res, "chain_inv_eta_lambda_min", live)))
        row.update(trace=_median(_col(res, "chain_sigma_trace")), trace_disc=_median(_col(res, "chain_sigma_disc_trace")),
                   bound=_median(_col(res, "b2_gauss_total")), actual=float(np.mean(_col(res, "gap_total_gauss"))))
        table.append(row)
    return markdown_table(table, [("regime", "regime", ""), ("eta", "η", "g"), ("b", "b", "d"), ("ok", "ok", "d"),
                                  ("degenerate", "degenerate", "d"), ("disc", "err vs discrete", ".4f"),
                                  ("cont", "err vs continuous", ".4f"), ("gap", "‖Σc−Σd‖/‖Σd‖", ".4f"),
                                  ("se", "Σ̂ sampling error", ".4f"), ("ess", "ESS", ".0f"),
                                  ("iat", "τ slow", ".1f"), ("iat_bm", "τ slow pred (batch means)", ".1f"),
                                  ("iat_pred", "τ slow pred (AR(1))", ".1f"),
                                  ("inv", "1/(ηλ_min)", ".1f"), ("trace", "tr Σ̂", ".3g"),
                                  ("trace_disc", "tr Σ_disc", ".3g"), ("bound", "B2 Gauss (median)", ".3f"),
                                  ("actual", "E_Q gap (mean)", "+.4f")])


# ---- figures -------------------------------------------------------------------------------

def covariance_error(study):
    """Median relative Frobenius error (quartile bars) against η, discrete and continuous, with the
    predictions' own gap and the covariance's sampling error."""
    fig, ax = plots.figure(width=1.4 * plots.COLUMN_WIDTH, aspect=0.7)
    sweep = [(e, n, r) for e, n, r in _sweep(study) if _live(r).any()]
    if not sweep:
        ax.text(0.5, 0.5, "no non-degenerate regime", transform=ax.transAxes, ha="center")
        return fig
    etas = np.array([e for e, _, _ in sweep])
    series = (("chain_rel_err_disc", "chains vs discrete", "o"), ("chain_rel_err_cont", "chains vs continuous", "s"),
              ("chain_cont_vs_disc", "‖Σ_cont − Σ_disc‖/‖Σ_disc‖", "^"), ("chain_cov_se", "Σ̂ sampling error (ESS)", "v"))
    for i, (col, label, marker) in enumerate(series):
        q = np.array([plots.quartiles(_col(r, col, _live(r))) for _, _, r in sweep])
        plots.interval_bars(ax, etas * (1 + 0.03 * (i - 1.5)), q[:, 0], q[:, 2], centre=q[:, 1],
                            color=plots.colour(i), label=label, marker=marker)
        ax.plot(etas, q[:, 1], color=plots.colour(i), linewidth=0.8, alpha=0.7)
    gaps = [_col(r, "chain_cont_vs_disc", _live(r)) for _, _, r in sweep]
    title = "Chains' covariance against the OU predictions (median, quartiles)"
    if len(sweep) >= 2:
        slope, lo, hi = loglog_slope(etas, gaps)
        title += f"\nthe predictions' gap grows like η^{slope:.2f} (95% [{lo:.2f}, {hi:.2f}])"
    ax.axhline(MAX_ERROR, color="black", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # ticks at the swept η, not 2×10⁰
    ax.set_xticks([float(v) for v in etas], [f"{float(v):g}" for v in etas])
    ax.set_xlabel(f"step η (log; b = {BATCH})")
    ax.set_ylabel("relative Frobenius error (log)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return fig


def autocorrelation(study):
    """The slowest mode's autocorrelation time: chains (batch means) against the AR(1) prediction."""
    fig, ax = plots.figure(width=1.2 * plots.COLUMN_WIDTH, aspect=0.8)
    lo, hi = np.inf, 0.0
    i = 0
    for name, res in study.items():
        live = _live(res)
        if not live.any():
            continue
        emp, pred = _col(res, "chain_iat_slow", live), _col(res, "chain_iat_slow_bm_pred", live)
        ax.scatter(pred, emp, s=6, color=plots.colour(i), label=name, alpha=0.6)
        lo, hi = min(lo, pred.min(), emp.min()), max(hi, pred.max(), emp.max())
        i += 1
    if hi > 0:
        line = np.array([lo / 1.2, hi * 1.2])
        ax.plot(line, line, color="black", linestyle="--", linewidth=0.8, label="equal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted τ: (2 − ηλ_min)/(ηλ_min), batch-means edge term removed")
    ax.set_ylabel("chains' τ along H's slowest eigenvector")
    ax.set_title("Autocorrelation time of the slowest mode")
    ax.legend(loc="upper left", fontsize=6)
    return fig


def bound_vs_step(study):
    """Left: B2 with Q = N(w_S, Σ_OU + s²I) (median, quartiles) and the actual |E_Q gap| (mean ± 2 se) against
    η/b; right: what carries the η/b dependence, KL(Q ‖ prior) and tr Σ_OU (medians, quartiles)."""
    fig, axes = plots.figure(2, width=2 * plots.COLUMN_WIDTH, aspect=0.75)
    ax, ax2 = axes.flat
    batches = sorted({int(_spec(r)["batch"]) for _, r in study.items()})
    x_all = []
    for j, b in enumerate(batches):
        sweep = [(e, n, r) for e, n, r in _sweep(study, b) if r.ok.any()]
        if not sweep:
            continue
        x = np.array([e / b for e, _, _ in sweep])
        x_all.extend(x)
        q = np.array([plots.quartiles(_col(r, "b2_gauss_total")) for _, _, r in sweep])
        plots.interval_bars(ax, x, q[:, 0], q[:, 2], centre=q[:, 1], color=plots.colour(2 * j),
                            label=f"B2 Gaussian bound, b = {b}", marker="o")
        ax.plot(x, q[:, 1], color=plots.colour(2 * j), linewidth=0.8)
        gaps = [np.abs(_col(r, "gap_total_gauss")) for _, _, r in sweep]
        m = np.array([g.mean() for g in gaps])
        se = np.array([g.std(ddof=1) / np.sqrt(g.size) if g.size > 1 else 0.0 for g in gaps])
        plots.interval_bars(ax, x, np.maximum(m - 2 * se, 1e-6), m + 2 * se, centre=m, color=plots.colour(2 * j + 1),
                            label=f"|E_Q gap| (mean ± 2 se), b = {b}", marker="s")
        ax.plot(x, m, color=plots.colour(2 * j + 1), linewidth=0.8)
        for col, marker, lab, c in (("b2_gauss_kl", "o", "KL(Q ‖ prior)", 2 * j), ("ou_trace", "^", "tr Σ_OU",
                                                                                      2 * j + 1)):
            q = np.array([plots.quartiles(_col(r, col)) for _, _, r in sweep])
            plots.interval_bars(ax2, x, q[:, 0], q[:, 2], centre=q[:, 1], color=plots.colour(c), marker=marker,
                                label=f"{lab}, b = {b}")
            ax2.plot(x, q[:, 1], color=plots.colour(c), linewidth=0.8)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("η / b (log)")
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the crowded minor labels overlapped
        a.set_xticks(sorted({float(v) for v in x_all}), [f"{v:g}" for v in sorted({float(v) for v in x_all})])
        a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=1)
    ax.set_ylabel("value (log)")
    ax.set_title("B2 with the OU posterior and the gap it bounds")
    ax2.set_title("What moves with η/b: KL and tr Σ_OU")
    return fig


SUITE = Suite(
    name="ou",
    claim="Constant-step SGD chains at the empirical maximiser have the stationary covariance of the discrete "
          "Lyapunov equation (median relative Frobenius error below 10% at every step swept), the continuous "
          "(OU) prediction departs from it in proportion to η, the slowest mode decorrelates in (2 − ηλ_min)/(ηλ_min) "
          "steps, and the degenerate corner (C_g = 0) is flagged.",
    grid=grid,
    checks=(covariance_verdicts, gap_slope_verdicts, iat_verdicts, degenerate_verdicts, bound_verdicts),
    headline=headline,
    figures=(Figure("ou-covariance-error-vs-eta", "Median relative Frobenius error (quartile bars) of the chains' "
                    "covariance against the discrete and the continuous prediction, the predictions' own gap with "
                    "its log-log slope on η, and Σ̂'s sampling error, against η (non-degenerate regimes at b = 4; "
                    "dashed: the 10% criterion).", covariance_error),
             Figure("ou-autocorrelation-time", "Each problem's autocorrelation time along H's slowest eigenvector "
                    "(batch means) against the linearised chain's AR(1) value (dashed: equal); non-degenerate "
                    "regimes.", autocorrelation),
             Figure("ou-bound-vs-eta-over-b", "B2 with the Gaussian posterior N(w_S, Σ_OU + s²I) (median, quartile "
                    "bars) and the actual |E_Q gap| (mean ± 2 se) against η/b, per batch size b (left), and the "
                    "posterior's KL to the best prior and tr Σ_OU, through which the bound depends on η/b (right); "
                    "non-degenerate regimes.", bound_vs_step)),
    kernel=KERNEL,
    notes="The kernel is rlhf_bounds.ou_chains.OUChainKernel; see docs/theory.md §8.2–§8.5.",
)
