"""``coverage``: every rigorous bound holds at its δ, at a scale where a 1% violation rate is visible.

For each bound of the catalogue (B1 for the fixed policy, B1 certified by B7, B7's radius alone,
B2 with the Occam prior and each of its two levels on its own, B2 with the Gaussian posterior) the
violation rate over independent problems, with its one-sided Clopper-Pearson interval, gives a
verdict: holds, refuted, or not enough problems to tell (docs/theory.md §11). Every check shows
its power (the same test on the bound shrunk to half its valid-shrink factor must refute it), and
the valid-shrink factor c* says how much smaller the bound could be and still hold here.

The regimes use a smaller problem than the default spec (d 8, n 128, M 1024, T 200), since
coverage needs many problems rather than large ones, and one regime, ``train-misuse``, is where
B1 applied to the *training* sample must fail (the policy fits the sample beyond the linear
reward: the oracle reward with a residual as large as the signal, d ≫ n, a small β and finite τ,
GA run far): a coverage report that never sees a failure has not shown that it can see one.
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..report import CHECKS, markdown_table
from ..spec import Spec
from ._checks import coverage_verdicts
from ._framework import Figure, Regime, Suite

#: Problems per regime; ``train-misuse`` (expensive: d 128) needs far fewer to show its failure.
PROBLEMS = {"quick": 2000, "default": 10000, "full": 100000}
MISUSE_PROBLEMS = {"quick": 128, "default": 512, "full": 2048}

BASE = dict(d=8, actions=8, prompts=128, rollouts=4, pref_pairs=256, eval_prompts=1024, steps=200,
            record_every=50, batch=16, posterior_draws=16)

GRID = (
    ("reward-model", dict(reward_model="mle", tau=1.0), ("reward_model", "tau")),
    ("shifted-clipped", dict(reward_model="mle", shift=-0.5, tau=0.3), ("reward_model", "shift", "tau")),
    ("misspecified", dict(reward_model="oracle", sigma_xi=0.5, tau=1.0), ("reward_model", "sigma_xi", "tau")),
)
#: The recipe for B1's misuse (docs/theory.md §11): the policy fits the training sample beyond the linear reward.
MISUSE = dict(d=128, actions=8, prompts=64, rollouts=4, eval_prompts=1024, reward_model="oracle", sigma_xi=1.0,
              reward_norm=0.1, beta=0.05, tau=0.5, learner="GA", lr=20.0, steps=400, record_every=50,
              bounds="b1")


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE)
    regimes = [Regime(name, base.replace(**changes), PROBLEMS[profile], defining)
               for name, changes, defining in GRID]
    regimes.append(Regime("train-misuse", Spec().replace(**MISUSE), MISUSE_PROBLEMS[profile],
                          ("reward_model", "sigma_xi", "reward_norm", "beta", "tau", "learner", "lr", "d", "prompts")))
    return regimes


def verdicts(study) -> list[dict]:
    return coverage_verdicts(study, CHECKS)


def headline(study) -> str:
    rows = [r for r in verdicts(study) if not r["deterministic"]]
    return markdown_table(rows, [("check", "bound", ""), ("regime", "regime", ""), ("n", "problems", "d"),
                                 ("violations", "violations", "d"), ("rate", "rate", ".4f"),
                                 ("cp_upper", "CP95 upper", ".4f"), ("delta", "δ", "g"), ("verdict", "verdict", ""),
                                 ("shrink", "c*", ".3g"), ("shrink_lo", "c* lo", ".3g"), ("shrink_hi", "c* hi", ".3g"),
                                 ("power_verdict", "c*/2 is", "")])


def _random_rows(study):
    return [r for r in verdicts(study) if not r["deterministic"] and r["n"]]


def violation_rates(study):
    """Violation rate of each bound with its 95% CP interval, per regime, against the δ it is stated at."""
    rows = _random_rows(study)
    labels = [c.label for c in CHECKS if any(r["check"] == c.label for r in rows)]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.55)
    step = 0.8 / max(len(regimes), 1)
    floor = 1e-5
    for j, regime in enumerate(regimes):
        pts = [(labels.index(r["check"]), r) for r in rows if r["regime"] == regime]
        y = np.array([i for i, _ in pts]) + (j - (len(regimes) - 1) / 2) * step
        lo = np.array([max(r["cp_lower"], floor) for _, r in pts])
        hi = np.array([max(r["cp_upper"], floor) for _, r in pts])
        rate = np.array([max(r["rate"], floor) for _, r in pts])
        err = np.vstack([rate - lo, hi - rate])
        ax.errorbar(rate, y, xerr=err, fmt="o", color=plots.colour(j), label=regime, capsize=2, elinewidth=0.8,
                    markersize=3.5)
        for (i, r), yy in zip(pts, y):
            ax.plot([r["delta"]] * 2, [yy - step / 2, yy + step / 2], color="black", linewidth=1.0)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, 1.0)
    ax.set_xlabel(f"violation rate (log; 0 drawn at {floor:g}); black ticks: the bound's δ")
    ax.set_title("Violation rates with one-sided 95% Clopper-Pearson intervals")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(regimes))
    return fig


def shrink_factors(study):
    """The valid-shrink factor c* of each bound (the (1 − δ)-quantile of |actual|/bound) with its bootstrap
    interval: how much smaller the bound could be and still hold on these problems."""
    rows = [r for r in _random_rows(study) if "shrink" in r and np.isfinite(r["shrink"]) and r["shrink"] > 0]
    labels = [c.label for c in CHECKS if any(r["check"] == c.label for r in rows)]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.55)
    step = 0.8 / max(len(regimes), 1)
    for j, regime in enumerate(regimes):
        pts = [(labels.index(r["check"]), r) for r in rows if r["regime"] == regime]
        if not pts:
            continue
        y = np.array([i for i, _ in pts]) + (j - (len(regimes) - 1) / 2) * step
        c = np.array([r["shrink"] for _, r in pts])
        err = np.vstack([c - np.array([r["shrink_lo"] for _, r in pts]), np.array([r["shrink_hi"] for _, r in pts]) - c])
        ax.errorbar(c, y, xerr=np.maximum(err, 0), fmt="o", color=plots.colour(j), label=regime, capsize=2,
                    elinewidth=0.8, markersize=3.5)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("valid-shrink factor c* (log; 1 = no slack, right of 1 = violated)")
    ax.set_title("How much smaller each bound could be and still hold (95% bootstrap intervals)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(regimes))
    return fig


SUITE = Suite(
    name="coverage",
    claim="Every rigorous bound of the catalogue (B1, B1 certified by B7, B7's radius, B2 Occam and each of its "
          "levels, B2 Gaussian) is violated on at most a fraction δ of independent problems, while B1 applied to "
          "the training sample, outside its conditions, fails.",
    grid=grid,
    checks=(verdicts,),
    headline=headline,
    figures=(Figure("coverage-violation-rates", "Each bound's violation rate with its one-sided 95% Clopper-Pearson "
                    "interval per regime, against the δ it is stated at (black ticks): left of the tick is a "
                    "bound that holds.", violation_rates),
             Figure("coverage-valid-shrink-factors", "The valid-shrink factor c* of each bound with its bootstrap "
                    "interval: c* = 0.1 means a bound ten times smaller would still hold here.", shrink_factors)),
)
