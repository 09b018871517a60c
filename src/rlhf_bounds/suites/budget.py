"""``budget``: does B4's budget allocation help (docs/theory.md §19)?

Two questions, each judged on a grid of allocations of equal cost under a cost model
n(c_p + K c_d) + N_pref c_pref:

* **evaluation allocation** (the trained policy fixed; what B1's sampling term is about): for each
  cost ratio c_p/c_d of :data:`EVAL_RATIOS` and K of :data:`EVAL_KS`, n = ⌊B_eval/(c_p/c_d + K)⌋
  prompts with K rollouts each; the actual sampling error |Ĵ_{n,K} − EĴ| of the trained policy,
  from nested subsamples of one fresh sample (so every allocation and every cost ratio comes from
  one compilation: :class:`rlhf_bounds.advice.BudgetKernel`). Rules: K* = max{1, (c_p/c_d)^{2/3}}
  and the variance-aware K* = max{1, √((c_p/c_d)σ²_roll/σ²_prompt)}, each rounded to the nearest
  grid K (in log).
* **training allocation** (each regime is one allocation (n, K, N_pref) of the training budget at
  one cost model, :data:`TRAIN_COSTS`; static shapes, one compilation each): a line of K at the
  preference share 1/2 and a line of shares at K = K*. Rules: K* and the variance-aware K* on the
  K line; B4's preference share s* (§7.2) on the share line. Judged by J* of the trained policy and
  by the actual |G|.

Every rule's regret (criterion at the rule's choice minus the best grid choice) comes with a paired
bootstrap interval over problems; it *holds* when the interval's upper end is at most 10% of the
criterion's spread over the grid, or 1% of the best value if that is larger
(:func:`rlhf_bounds.advice.regret_allowance`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import bounds, plots
from ..advice import (BudgetKernel, allocation_cost, equal_cost_allocation, nearest, regret_allowance, regret_verdict,
                      rule_regret)
from ..report import markdown_table
from ..spec import Spec
from ._framework import Figure, Regime, Suite

PROBLEMS = {"quick": 512, "default": 4096, "full": 16384}
#: The training cost model: a prompt costs 8 decodes (K* = 8^{2/3} = 4), a preference pair 2.
TRAIN_COSTS = dict(cost_prompt=8.0, cost_decode=1.0, cost_pref=2.0)
TRAIN_BUDGET = 4096.0
TRAIN_RATIO = TRAIN_COSTS["cost_prompt"] / TRAIN_COSTS["cost_decode"]
#: The K line (at share 1/2) and the share line (at K = 4) of each profile.
K_LINE = {"quick": (2, 4, 8), "default": (2, 3, 4, 6, 8, 16), "full": (2, 3, 4, 6, 8, 16)}
SHARE_LINE = {"quick": (0.25, 0.5, 0.75), "default": (0.125, 0.25, 0.5, 0.75, 0.875),
              "full": (0.125, 0.25, 0.5, 0.75, 0.875)}
CENTRE_K, CENTRE_SHARE = 4, 0.5
#: The evaluation allocations: cost ratios c_p/c_d, rollouts per prompt, and the budget in units of c_d.
EVAL_RATIOS = (0.25, 1.0, 4.0, 16.0, 64.0)
EVAL_KS = (1, 2, 4, 8, 16, 32)
EVAL_BUDGET = 1024.0
KERNEL = BudgetKernel(EVAL_RATIOS, EVAL_KS, EVAL_BUDGET)
#: A small problem (as ``coverage``), a fitted reward model, the B1 catalogue only.
BASE = dict(d=8, actions=8, eval_prompts=1024, steps=200, record_every=50, batch=16, reward_model="mle", tau=1.0,
            bounds="b1")


def regime_name(K: int, share: float) -> str:
    return f"K{K}-s{share:g}"


CENTRE = regime_name(CENTRE_K, CENTRE_SHARE)
#: The rules, by the names the verdicts use: K* = max{1, (c_p/c_d)^(2/3)}, the variance-aware K*, B4's s*.
RULE_K, RULE_K_VAR, RULE_SHARE = "K*", "K*-var", "s*"


def allocations(profile: str) -> list[tuple[int, float]]:
    """(K, share) of every regime: the K line at share 1/2, then the rest of the share line at K = 4."""
    out = [(k, CENTRE_SHARE) for k in K_LINE[profile]]
    out += [(CENTRE_K, s) for s in SHARE_LINE[profile] if s != CENTRE_SHARE]
    return out


def grid(profile: str) -> list[Regime]:
    base = Spec().replace(**BASE)
    regimes = []
    for K, share in allocations(profile):
        n, n_pref = equal_cost_allocation(TRAIN_BUDGET, K, share, **TRAIN_COSTS)
        regimes.append(Regime(regime_name(K, share), base.replace(prompts=n, rollouts=K, pref_pairs=n_pref),
                              PROBLEMS[profile], ("prompts", "rollouts", "pref_pairs"),
                              {"K": K, "share": share, "n": n, "N_pref": n_pref}))
    return regimes


# ---- checks --------------------------------------------------------------------------------------

def _cache(study, key, compute):
    cache = study.__dict__.setdefault("_budget_cache", {})  # headline, checks and figures ask again
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def cost_rows(study) -> list[dict]:
    """Every regime's allocation spends the training budget: B − (c_p + K c_d + c_pref) < cost ≤ B."""
    rows = []
    for name, res in study.items():
        spec = res.record["spec"]
        n, K, n_pref = int(spec["prompts"]), int(spec["rollouts"]), int(spec["pref_pairs"])
        cost = float(allocation_cost(n, K, n_pref, **TRAIN_COSTS))
        slack = TRAIN_COSTS["cost_prompt"] + K * TRAIN_COSTS["cost_decode"] + TRAIN_COSTS["cost_pref"]
        ok = TRAIN_BUDGET - slack < cost <= TRAIN_BUDGET
        rows.append({"check": "allocation of equal cost", "regime": name, "n": len(res),
                     "verdict": "holds" if ok else "refuted",
                     "evidence": f"n = {n}, K = {K}, N_pref = {n_pref} cost {cost:g} of the budget {TRAIN_BUDGET:g} "
                                 f"(c_p = {TRAIN_COSTS['cost_prompt']:g}, c_d = {TRAIN_COSTS['cost_decode']:g}, "
                                 f"c_pref = {TRAIN_COSTS['cost_pref']:g}; rounding leaves less than {slack:g})"})
    return rows


def _k_rule(ratio, var_prompt=None, var_rollout=None):
    return np.asarray(bounds.integer_rollouts_per_prompt(ratio, 1.0, var_prompt, var_rollout), np.float64)


def eval_regrets(study) -> list[dict]:
    """Per cost ratio and K rule: the regret in mean |Ĵ − EĴ| over the evaluation K grid (centre regime)."""
    def compute():
        if CENTRE not in study.regimes:
            return []
        res = study[CENTRE]
        ok = res.ok
        err = np.abs(res["eval_alloc_error"][ok].astype(np.float64))
        ratio, ks, ns = (res[c][0] for c in ("eval_alloc_ratio", "eval_alloc_k", "eval_alloc_n"))
        var_p, var_r = res["var_prompt"][ok], res["var_rollout"][ok]
        rows = []
        for r in dict.fromkeys(ratio.tolist()):
            cols = np.flatnonzero(ratio == r)
            grid_k = ks[cols].astype(np.float64)
            values = err[:, cols]
            for rule, k_star in ((RULE_K, np.broadcast_to(_k_rule(r), var_p.shape)),
                                 (RULE_K_VAR, _k_rule(r, var_p, var_r))):
                choice = nearest(grid_k, np.minimum(k_star, 1e6), log=True)
                reg = rule_regret(values, values[np.arange(len(choice)), choice], maximise=False)
                rows.append({"rule": rule, "ratio": float(r), "reg": reg, "k_rule": float(np.median(grid_k[choice])),
                             "var_ratio": float(np.median(var_r / var_p)),
                             "k_best": float(grid_k[reg.best_index]) if reg.best_index >= 0 else np.nan,
                             "n_best": int(ns[cols][reg.best_index]) if reg.best_index >= 0 else -1})
        return rows
    return _cache(study, "eval", compute)


def _paired(study, names, col):
    """``col`` of the regimes ``names`` for the problems status-0 in all of them, as ``[P, len(names)]``."""
    common = None
    for n in names:
        s = set(study[n]["problem"][study[n].ok].tolist())
        common = s if common is None else common & s
    problems = np.array(sorted(common), dtype=np.int64)

    def at(res):
        pos = {int(p): i for i, p in enumerate(res["problem"])}
        return res[col][[pos[p] for p in problems]].astype(np.float64)
    return problems, np.stack([at(study[n]) for n in names], axis=1)


def _preference_share(study, names_centre=CENTRE):
    """B4's s* per problem from the centre regime's values: a = W_τ√(log(4/δ)/2)(1 + K^{-1/2}),
    b = √((1 + χ²)·κ_pref) with κ_pref = L²_train·N_pref, c_n = c_p + K c_d (docs/theory.md §7.2)."""
    res = study[names_centre]
    spec = res.record["spec"]
    beta, tau, delta = float(spec["beta"]), float(spec["tau"]), float(spec["delta"])
    K, n_pref = int(spec["rollouts"]), int(spec["pref_pairs"])
    width = np.asarray(bounds.objective_range(res["reward_range"], beta, tau, res["log_ratio_range"]))
    a = width * math.sqrt(math.log(4 / delta) / 2) * (1 + K ** -0.5)
    b = np.sqrt(np.exp(res["log1p_chi2"].astype(np.float64)) * res["l2_train"].astype(np.float64) * n_pref)
    c_n = TRAIN_COSTS["cost_prompt"] + K * TRAIN_COSTS["cost_decode"]
    return res["problem"], np.asarray(bounds.preference_share(a, b, c_n, TRAIN_COSTS["cost_pref"]))


def train_regrets(study) -> list[dict]:
    """The training-allocation rules on their lines, by J* (maximise) and |G| (minimise)."""
    def compute():
        labels = {n: study.swept(n) for n in study.regimes}
        k_line = sorted([n for n, l in labels.items() if l.get("share") == CENTRE_SHARE], key=lambda n: labels[n]["K"])
        s_line = sorted([n for n, l in labels.items() if l.get("K") == CENTRE_K], key=lambda n: labels[n]["share"])
        if CENTRE not in study.regimes or len(k_line) < 2 or len(s_line) < 2:
            return []
        centre = study[CENTRE]
        pos = {int(p): i for i, p in enumerate(centre["problem"])}
        rows = []
        for line, axis in ((k_line, "K"), (s_line, "share")):
            grid_ = np.array([labels[n][axis] for n in line], np.float64)
            problems, jstar = _paired(study, line, "J_star")
            _, gap_ = _paired(study, line, "gap_total")
            idx = [pos[p] for p in problems]
            if axis == "K":
                rules = ((RULE_K, np.full(len(problems), float(_k_rule(TRAIN_RATIO)))),
                         (RULE_K_VAR, _k_rule(TRAIN_RATIO, centre["var_prompt"][idx],
                                                       centre["var_rollout"][idx])))
            else:
                _, share = _preference_share(study)
                rules = ((RULE_SHARE, share[idx]),)
            for rule, target in rules:
                choice = nearest(grid_, np.clip(target, 1e-6, 1e6), log=(axis == "K"))
                for crit, values, maximise in (("J*", jstar, True), ("|G|", np.abs(gap_), False)):
                    reg = rule_regret(values, values[np.arange(len(choice)), choice], maximise=maximise)
                    rows.append({"rule": rule, "criterion": crit, "reg": reg, "line": line, "grid": grid_,
                                 "target": float(np.median(target)), "rule_choice": float(np.median(grid_[choice])),
                                 "best": float(grid_[reg.best_index]) if reg.best_index >= 0 else np.nan,
                                 "axis": axis})
        return rows
    return _cache(study, "train", compute)


def _regret_text(reg) -> str:
    return f"{reg.regret:.3g} [{reg.lo:.3g}, {reg.hi:.3g}]"


def regret_rows(study) -> list[dict]:
    rows = []
    for e in eval_regrets(study):
        reg = e["reg"]
        rows.append({"check": f"{e['rule']} eval c_p/c_d={e['ratio']:g}", "regime": CENTRE, "n": reg.n,
                     "verdict": regret_verdict(reg),
                     "evidence": f"mean |Ĵ − EĴ| at the rule's K (median {e['k_rule']:g}; median σ²_roll/σ²_prompt "
                                 f"{e['var_ratio']:.3g}) is {reg.rule_value:.4g} "
                                 f"against {reg.best_value:.4g} at the best grid K = {e['k_best']:g} (n = "
                                 f"{e['n_best']}): regret {_regret_text(reg)} (paired bootstrap 95%), tolerance "
                                 f"{regret_allowance(reg):.3g} (10% of the grid's spread or 1% of the best)"})
    for t in train_regrets(study):
        reg = t["reg"]
        rows.append({"check": f"{t['rule']} train {t['criterion']}", "regime": CENTRE, "n": reg.n,
                     "verdict": regret_verdict(reg),
                     "evidence": f"the rule asks for {t['axis']} ≈ {t['target']:.3g} (median; grid choice "
                                 f"{t['rule_choice']:g}); mean {t['criterion']} there is {reg.rule_value:.4g} against "
                                 f"{reg.best_value:.4g} at the best {t['axis']} = {t['best']:g}: regret "
                                 f"{_regret_text(reg)} (paired bootstrap 95% over {reg.n} problems), tolerance "
                                 f"{regret_allowance(reg):.3g}"})
    return rows


def headline(study) -> str:
    rows = []
    for e in eval_regrets(study):
        reg = e["reg"]
        rows.append({"rule": e["rule"], "judged": "evaluation: mean |Ĵ − EĴ|", "ratio": e["ratio"],
                     "choice": f"K = {e['k_rule']:g}", "best": f"K = {e['k_best']:g}", "value": reg.rule_value,
                     "best_value": reg.best_value, "regret": _regret_text(reg), "verdict": regret_verdict(reg)})
    for t in train_regrets(study):
        reg = t["reg"]
        rows.append({"rule": t["rule"], "judged": f"training: {t['criterion']}",
                     "ratio": TRAIN_RATIO, "choice": f"{t['axis']} = {t['rule_choice']:g}",
                     "best": f"{t['axis']} = {t['best']:g}", "value": reg.rule_value, "best_value": reg.best_value,
                     "regret": _regret_text(reg), "verdict": regret_verdict(reg)})
    return markdown_table(rows, [("rule", "rule", ""), ("judged", "judged by", ""), ("ratio", "c_p/c_d", "g"),
                                 ("choice", "rule's choice (p50)", ""), ("best", "best on grid", ""),
                                 ("value", "at rule", ".4g"), ("best_value", "at best", ".4g"),
                                 ("regret", "regret [95%]", ""), ("verdict", "verdict", "")])


def all_rows(study) -> list[dict]:
    return cost_rows(study) + regret_rows(study)


# ---- figure --------------------------------------------------------------------------------------

def regret_vs_cost_ratio(study):
    """Left: the regret of each K rule in the evaluation error, relative to the best grid value, against
    c_p/c_d; right: each training rule's regret in J* at the training cost model."""
    fig, axes = plots.figure(ncols=2, width=2 * plots.COLUMN_WIDTH, aspect=0.8)
    ax, bx = axes[0]
    ev = eval_regrets(study)
    for j, rule in enumerate(dict.fromkeys(e["rule"] for e in ev)):
        pts = [e for e in ev if e["rule"] == rule]
        x = np.array([e["ratio"] for e in pts]) * (1.08 if j else 1 / 1.08)
        scale = np.array([e["reg"].best_value for e in pts])
        reg = [e["reg"] for e in pts]
        plots.interval_bars(ax, x, [r.lo for r in reg] / scale, [r.hi for r in reg] / scale,
                            centre=[r.regret for r in reg] / scale, color=plots.colour(j), label=rule)
        ax.plot(x, [r.regret for r in reg] / scale, color=plots.colour(j), linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("cost ratio c_p/c_d (log)")
    ax.set_ylabel("regret / best mean |Ĵ − EĴ|")
    ax.set_title(f"Evaluation allocation, budget {EVAL_BUDGET:g} c_d ({CENTRE})")
    ax.legend(loc="upper left")
    tr = [t for t in train_regrets(study) if t["criterion"] == "J*"]
    if tr:
        y = np.arange(len(tr))
        reg = [t["reg"] for t in tr]
        bx.errorbar([r.regret for r in reg], y, xerr=np.vstack([np.maximum([r.regret - r.lo for r in reg], 0),
                                                                np.maximum([r.hi - r.regret for r in reg], 0)]),
                    fmt="o", color=plots.colour(2), capsize=2, elinewidth=0.8)
        for yy, r in zip(y, reg):
            bx.plot([regret_allowance(r)] * 2, [yy - 0.3, yy + 0.3], color=plots.colour(3), linewidth=1.2)
        bx.axvline(0.0, color="black", linewidth=0.8)
        bx.set_yticks(y)
        bx.set_yticklabels([t["rule"] for t in tr])
        bx.invert_yaxis()
        bx.set_xlabel("regret in J* of the trained policy (95% paired bootstrap)")
        bx.set_title(f"Training allocation at c_p/c_d = {TRAIN_RATIO:g} (red ticks: tolerance)")
    return fig


SUITE = Suite(
    name="budget",
    claim="Allocating a fixed budget by B4's rules (K* from the cost ratio, its variance-aware form, the preference "
          "share s*) is near-optimal: its regret against the best allocation of equal cost on a grid, judged by the "
          "actual error and by J* of the trained policy, is within 10% of the grid's spread (or 1% of the best).",
    grid=grid,
    checks=(all_rows,),
    headline=headline,
    figures=(Figure("budget-regret-vs-cost-ratio", "Left: the regret of each K rule in the evaluation error (mean "
                    "|Ĵ − EĴ| at the rule's K minus the best grid K, over the best), against the cost ratio c_p/c_d, "
                    "with paired bootstrap 95% intervals. Right: each training rule's regret in J* of the trained "
                    "policy at the training cost model, with its tolerance (10% of the grid's spread or 1% of the best "
                    "J*).", regret_vs_cost_ratio),),
    kernel=KERNEL,
)
