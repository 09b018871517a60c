"""``stress``: regimes where the bounds' assumptions fail on purpose, and what each bound does there.

Each regime breaks one thing the theory leans on; for every bound the suite reports whether it
still holds, becomes vacuous (+∞: it says nothing), or is refuted:

* ``lowrank``: features in a 2-dimensional subspace of R^8 (feature coverage fails);
* ``near-deterministic-mu``: preference data from a heavily shifted, almost deterministic μ
  (s = −3, ε = 0.001): χ²(D_w‖D_train) explodes;
* ``tiny-beta``: β = 0.01 (τ = 1): the KL anchor almost gone;
* ``tau-zero``: τ = 0: the whole KL penalty is clipped away;
* ``large-DC``: ‖θ*‖·C = 10: rewards ten times the default range;
* ``n-below-d``: 16 training prompts for d = 32 features.
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..report import CHECKS, VERDICTS, markdown_table
from ..spec import Spec
from ._checks import coverage_verdicts
from ._framework import Figure, Regime, Suite

PROBLEMS = {"quick": 256, "default": 2048, "full": 16384}
BASE = dict(reward_model="mle", tau=1.0, steps=200, record_every=50, eval_prompts=1024)

GRID = (
    ("lowrank", dict(feature_law="lowrank", rank=2), ("feature_law", "rank")),
    ("near-deterministic-mu", dict(shift=-3.0, mix_eps=0.001), ("shift", "mix_eps")),
    ("tiny-beta", dict(beta=0.01), ("beta",)),
    ("tau-zero", dict(tau=0.0), ("tau",)),
    ("large-DC", dict(reward_norm=10.0), ("reward_norm",)),
    ("n-below-d", dict(d=32, prompts=16, batch=8), ("d", "prompts")),
)


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE)
    return [Regime(name, base.replace(**changes), PROBLEMS[profile], defining) for name, changes, defining in GRID]


def verdicts(study) -> list[dict]:
    return coverage_verdicts(study, CHECKS)


def headline(study) -> str:
    rows = verdicts(study)
    labels = [c.label for c in CHECKS if any(r["check"] == c.label for r in rows)]
    table = []
    for regime in study:
        by = {r["check"]: r["verdict"] for r in rows if r["regime"] == regime}
        table.append({"regime": regime, **{lab: by.get(lab, "") for lab in labels}})
    return markdown_table(table, [("regime", "regime", "")] + [(lab, lab, "") for lab in labels])


def verdict_map(study):
    """Regime × bound, each cell coloured by its verdict (the legend names them)."""
    rows = verdicts(study)
    labels = [c.label for c in CHECKS if any(r["check"] == c.label for r in rows)]
    regimes = list(study)
    codes = {v: i for i, v in enumerate(VERDICTS)}
    grid_ = np.full((len(regimes), len(labels)), np.nan)
    for r in rows:
        grid_[regimes.index(r["regime"]), labels.index(r["check"])] = codes[r["verdict"]]
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap([plots.VERDICT_COLOURS[v] for v in VERDICTS])
    fig, ax = plots.figure(width=2 * plots.COLUMN_WIDTH, aspect=0.5)
    ax.imshow(grid_, cmap=cmap, vmin=-0.5, vmax=len(VERDICTS) - 0.5, aspect="auto")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right")
    ax.set_yticks(range(len(regimes)))
    ax.set_yticklabels(regimes)
    ax.grid(False)
    for i in range(len(regimes)):
        for j in range(len(labels)):
            if np.isfinite(grid_[i, j]):
                ax.text(j, i, VERDICTS[int(grid_[i, j])].split(" (")[0].replace("not enough problems", "n/e"),
                        ha="center", va="center", fontsize=6)
    used = sorted({int(v) for v in grid_[np.isfinite(grid_)]})
    handles = [plots.plt.Rectangle((0, 0), 1, 1, color=plots.VERDICT_COLOURS[VERDICTS[u]]) for u in used]
    ax.legend(handles, [VERDICTS[u] for u in used], loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Which bounds survive broken assumptions (n/e: not enough problems)")
    return fig


SUITE = Suite(
    name="stress",
    claim="Where the assumptions fail on purpose (low-rank features, a near-deterministic behaviour policy, tiny "
          "β, τ = 0, large rewards, n < d), the rigorous bounds still hold or become vacuous; none is refuted.",
    grid=grid,
    checks=(verdicts,),
    headline=headline,
    figures=(Figure("stress-verdict-map", "Each bound's verdict in each broken-assumption regime: green holds, "
                    "grey is vacuous (+∞), red would be a refutation.", verdict_map),),
)
