"""``decomposition``: each term of the gap beside the B1 term that bounds it, across the world's knobs.

One regime per term of G = sampling + reward shift + clipping (docs/theory.md §1), then the
feature law, β and the behaviour shift moved one at a time:

* ``oracle``: r̂ = r*, realizable, τ = ∞: only the sampling term is non-zero;
* ``reward-model``: the Bradley-Terry MLE from reference-policy data adds the reward-shift term;
* ``shifted``: preference data from an adversarially shifted μ (s = −1): large χ²;
* ``clipped``: τ = 0.5 adds the clipping term;
* ``misspecified``: σ_ξ = 0.5 and τ = 1: no linear reward fits r*;
* ``anisotropic``: features with a condition number of 10 (the reward model sees some directions little);
* ``small-beta``: β = 0.1 with τ = 1: a weak KL anchor, far-moving policies.
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..report import CHECKS, markdown_table
from ..spec import Spec
from ._framework import Figure, Regime, Suite
from ._checks import coverage_verdicts, identity_verdicts

PROBLEMS = {"quick": 256, "default": 1024, "full": 16384}

#: (name, spec changes, the fields that define the regime)
GRID = (
    ("oracle", dict(reward_model="oracle"), ("reward_model",)),
    ("reward-model", dict(reward_model="mle"), ("reward_model",)),
    ("shifted", dict(reward_model="mle", shift=-1.0), ("reward_model", "shift")),
    ("clipped", dict(reward_model="mle", tau=0.5), ("reward_model", "tau")),
    ("misspecified", dict(reward_model="mle", sigma_xi=0.5, tau=1.0), ("reward_model", "sigma_xi", "tau")),
    ("anisotropic", dict(reward_model="mle", feature_law="anisotropic"), ("reward_model", "feature_law")),
    ("small-beta", dict(reward_model="mle", beta=0.1, tau=1.0), ("reward_model", "beta", "tau")),
)

#: The B1 checks this suite reports (each term and the total).
B1_CHECKS = tuple(c for c in CHECKS if c.label in ("B1 total", "B1 sampling", "B1 reward shift", "B1 clipping",
                                                     "B1 certified (B7)", "B2 Occam", "B2 Gaussian"))


def grid(profile: str) -> list[Regime]:
    base = Spec()
    return [Regime(name, base.replace(**changes), PROBLEMS[profile], defining) for name, changes, defining in GRID]


#: The headline's columns: (column, header).
HEADLINE = (("gap_total", "G"), ("gap_sampling", "sampling"), ("gap_reward_shift", "reward shift"),
            ("gap_clipping", "clipping"), ("b1_total", "B1 total"), ("gap_total_train", "G on train"))


def headline(study) -> str:
    """One row per regime: each term's mean ± se over status-0 problems, B1's median, the flagged count."""
    table = []
    for name, res in study.items():
        ok = res.ok
        row = {"regime": name, "ok": int(ok.sum()), "flagged": int((~ok).sum())}
        for col, head in HEADLINE:
            v = res[col][ok].astype(float)
            if col.startswith("b1"):
                row[head] = f"{np.median(v):.4f} (median)"
            else:
                se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else float("nan")
                row[head] = f"{v.mean():+.4f} ± {se:.4f}"
        table.append(row)
    return markdown_table(table, [("regime", "regime", "")] + [(h, h, "") for _, h in HEADLINE] +
                          [("ok", "ok", "d"), ("flagged", "flagged", "d")])


#: (actual column, bound column, panel title) of the figure's four panels.
PANELS = (("gap_sampling", "b1_sampling", "sampling"), ("gap_reward_shift", "b1_reward_shift", "reward shift"),
          ("gap_clipping", "b1_clipping", "clipping"), ("gap_total", "b1_total", "total"))


def terms_vs_bounds(study):
    """ECDF of |actual| / B1 term per regime: where each term sits under its bound (violations right of 1)."""
    fig, axes = plots.figure(2, 2, width=2 * plots.COLUMN_WIDTH, aspect=0.7)
    for ax, (actual, bound, title) in zip(axes.flat, PANELS):
        drawn, lowest = False, 1.0
        for i, (name, res) in enumerate(study.items()):
            ok = res.ok
            a, b = np.abs(res[actual][ok].astype(float)), res[bound][ok].astype(float)
            keep = np.isfinite(b) & (b > 0)
            if keep.sum() < 2:
                continue
            ratio = np.sort(np.maximum(a[keep] / b[keep], 1e-6))
            lowest = min(lowest, ratio[0])
            ecdf = np.arange(1, ratio.size + 1) / ratio.size
            ax.step(ratio, ecdf, where="post", color=plots.colour(i), label=name)
            drawn = True
        ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(max(1e-6, lowest / 2), 2.0)
        ax.set_title(f"{title}: |actual| / B1 bound")
        ax.set_xlabel("|actual| / bound (log)")
        ax.set_ylabel("fraction of problems ≤ x")
        if not drawn:
            ax.text(0.5, 0.5, "term is 0 in every regime", transform=ax.transAxes, ha="center")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4))
    fig.suptitle("Each gap term under its B1 bound (dashed: the bound; right of it: a violation)")
    return fig


def terms_by_regime(study):
    """Mean of each actual term per regime with ±2 se bars, beside the median B1 term."""
    names = list(study)
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.4)
    width = 0.8 / len(PANELS[:3])
    for j, (actual, bound, title) in enumerate(PANELS[:3]):
        x = np.arange(len(names)) + (j - 1) * width
        means, ses, meds = [], [], []
        for name in names:
            res = study[name]
            v = np.abs(res[actual][res.ok].astype(float))
            means.append(v.mean())
            ses.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0)
            b = res[bound][res.ok].astype(float)
            meds.append(np.median(b[np.isfinite(b)]) if np.isfinite(b).any() else np.nan)
        means, ses = np.array(means), np.array(ses)
        ax.bar(x, means, width, color=plots.colour(j), label=f"|{title}| (mean ± 2 se)", yerr=2 * ses, capsize=2)
        ax.scatter(x, meds, marker="_", s=120, color="black", zorder=3, label="B1 term (median)" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("value (log)")
    ax.set_title("Gap terms and their B1 bounds by regime")
    ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return fig


SUITE = Suite(
    name="decomposition",
    claim="Each term of the gap (sampling, reward shift, clipping) stays under its B1 term, and the three add up "
          "to the gap, across reward models, behaviour shift, clipping, misspecification, feature law and β.",
    grid=grid,
    checks=(identity_verdicts, lambda study: coverage_verdicts(study, B1_CHECKS)),
    headline=headline,
    figures=(Figure("decomposition-terms-vs-bounds", "The ECDF of |actual term| / B1 term in each regime: every "
                    "curve reaching 1 left of the dashed line means no violation.", terms_vs_bounds),
             Figure("decomposition-terms-by-regime", "The mean size of each actual term per regime (bars, ±2 se) "
                    "beside the median of its B1 bound (black ticks).", terms_by_regime)),
)
