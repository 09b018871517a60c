"""Does the advice help: kernels and pure functions of the clipping and budget studies (docs/theory.md §19).

Tang, Chen and He draw two practical rules from B1: an optimal clipping threshold τ* (B3) and a
budget allocation across prompts, rollouts and preference pairs (B4). The studies ask whether
following a rule gives a smaller actual error or a better deployed policy than the best choice
on a grid. This module holds

* two kernels that run the default stages of :mod:`rlhf_bounds.simulate` (``prepare`` →
  ``learners.train_policies`` → ``finish``) and then evaluate the trained policy further:
  :class:`ClipSweepKernel` (B1 and the actual gap G on a grid of evaluation thresholds, and τ
  chosen on the evaluation sample, split or whole) and :class:`BudgetKernel` (the actual sampling
  error of Ĵ for many (n, K) evaluation allocations of equal cost, from one fresh sample);
* the pure pieces they use (rollout atoms, Ĵ at many τ, nested subsample means);
* the analysis in NumPy: equal-cost allocations, nearest grid points, the argmin agreement of
  B3 with B1 on a grid, and the regret of following a rule with a paired bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import bounds
from .policy import inverse_cdf, log_probs, response_objective
from .simulate import Prepared, reward_hat, simulate_batch
from .spec import Spec, SpecError
from .world import draw_prompts

__all__ = ["TAU_GRID", "ClipSweepKernel", "BudgetKernel", "RolloutAtoms", "rollout_atoms", "sample_objective_at",
           "tail_excess_curve", "b1_curve", "clip_sweep_columns", "nested_means", "eval_allocations",
           "budget_columns", "allocation_cost", "equal_cost_allocation", "nearest",
           "argmin_agrees", "Regret", "rule_regret", "mean_interval",
           "REGRET_TOLERANCE", "REGRET_FLOOR", "regret_allowance", "regret_verdict"]

F32 = jnp.float32

#: Evaluation thresholds of the τ sweep (finite: B1's τ-dependent part is linear above the largest |ℓ|).
TAU_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0)


# ---- pure pieces (one problem; vmap at the edge) ----------------------------------------------

class RolloutAtoms(NamedTuple):
    """What a sample's rollouts show of a policy: r̂(x_i, Y_ik) and ℓ_w(x_i, Y_ik), each ``[n, K]``."""

    reward: jax.Array
    log_ratio: jax.Array


def rollout_atoms(w, w_ref, phi, r_hat, u) -> RolloutAtoms:
    """The rollouts Y_ik = F⁻¹_{π_w(·|x_i)}(U_ik) of a sample (``phi`` ``[n, A, d]``, ``r_hat`` ``[n, A]``,
    ``u`` ``[n, K]``) and, at each, r̂ and ℓ_w: Ĵ at any τ is a mean of r̂ − β·clip(ℓ, −τ, τ) over them."""
    def one(phi_i, r_i, u_i):
        lp = log_probs(w, phi_i)
        y = inverse_cdf(jnp.exp(lp), u_i)
        return r_i[y], (lp - log_probs(w_ref, phi_i))[y]

    return RolloutAtoms(*jax.vmap(one)(phi, r_hat, u))


def sample_objective_at(atoms: RolloutAtoms, beta, taus) -> jax.Array:
    """Ĵ_τ = mean over the rollouts of h = r̂ − β·clip(ℓ, −τ, τ), for every τ of ``taus`` ``[G]`` → ``[G]``.

    At one τ it is :func:`rlhf_bounds.gap.sample_objective`'s Ĵ on the same sample (a test checks it)."""
    taus = jnp.asarray(taus, atoms.log_ratio.dtype)
    h = response_objective(atoms.reward[None], atoms.log_ratio[None], beta, taus[:, None, None])
    return jnp.mean(h, axis=(1, 2))


def tail_excess_curve(abs_log_ratio, weights, taus) -> jax.Array:
    """E(|ℓ| − τ)_+ under the discrete law (atoms ``abs_log_ratio``, probabilities ``weights``, normalised
    here) at every τ of ``taus`` (float64): B1's clipping term over β, :func:`rlhf_bounds.bounds.clip_objective`
    with α = 0, β = 1."""
    return bounds.clip_objective(jnp.asarray(taus, jnp.float64), abs_log_ratio, weights, 0.0, 1.0)


def b1_curve(spec: Spec, cols: dict, tail, taus, n=None) -> jax.Array:
    """B1's total for the fixed policy of one problem at every threshold of ``taus``, with its population
    values from ``cols`` (``reward_range``, ``log_ratio_range``, ``log1p_chi2``, ``l2_train``) and its tail
    E(|ℓ| − τ)_+ at each τ given (``tail``, same shape as ``taus``); ``n`` prompts (default the spec's)."""
    chi2 = jnp.expm1(jnp.asarray(cols["log1p_chi2"], jnp.float64))
    n = spec.prompts if n is None else n
    return bounds.b1_terms(cols["reward_range"], spec.beta, jnp.asarray(taus, jnp.float64), n, spec.rollouts,
                           spec.delta, chi2, cols["l2_train"], tail, cols["log_ratio_range"]).total


def _eval_atoms(spec: Spec, prep: Prepared, w):
    """|ℓ_w| and π_w on the problem's evaluation set (the same prompts ``finish`` draws), each ``[M, A]``."""
    ev = draw_prompts(spec, prep.world, prep.keys.eval, spec.eval_prompts)

    def one(phi):
        lp = log_probs(w, phi)
        return jnp.abs(lp - log_probs(prep.world.w_ref, phi)), jnp.exp(lp)

    return jax.vmap(one)(ev.phi)


def _reward_hat(spec: Spec, prep: Prepared, prompts):
    return reward_hat(spec, prep.theta_hat, prompts)


def _fresh_sample(spec: Spec, prep: Prepared):
    """The fresh sample of n prompts and K uniforms that ``finish`` evaluates Ĵ on (the same draws)."""
    k_fp, k_fu = jax.random.split(prep.keys.fresh)
    fresh = draw_prompts(spec, prep.world, k_fp, spec.prompts)
    u = jax.random.uniform(k_fu, (spec.prompts, spec.rollouts), F32)
    return fresh, u


def clip_sweep_columns(spec: Spec, prep: Prepared, w, cols: dict, taus) -> dict[str, jax.Array]:
    """The clipping study's columns for one problem whose trained policy is ``w`` (``cols``: its ``finish``
    columns). On the evaluation-threshold grid ``taus``: ``sweep_b1`` (B1's total), ``sweep_gap`` (the
    actual G = Ĵ_τ − J* on the fresh sample), ``sweep_tau``. At B3's τ* (``b3_tau_star``): ``b1_at_tau_star``,
    ``gap_at_tau_star``. τ chosen on the fresh sample itself, as B3's empirical quantile of |ℓ| over its
    rollouts: ``whole_*`` (τ̂ from all n prompts, B1 and G on the same n: the heuristic) and ``split_*``
    (τ̂ from the first ⌊n/2⌋ prompts, B1 with n − ⌊n/2⌋ prompts and G on those: valid)."""
    taus = jnp.asarray(taus, jnp.float64)
    beta, n, K, delta = spec.beta, spec.prompts, spec.rollouts, spec.delta
    abs_ell, prob = _eval_atoms(spec, prep, w)
    fresh, u = _fresh_sample(spec, prep)
    atoms = rollout_atoms(w, prep.world.w_ref, fresh.phi, _reward_hat(spec, prep, fresh), u)
    j_star = cols["J_star"]

    tau_star = jnp.asarray(cols["b3_tau_star"], jnp.float64)
    grid_and_star = jnp.concatenate([taus, tau_star[None]])
    tail = tail_excess_curve(abs_ell, prob, grid_and_star)
    b1 = b1_curve(spec, cols, tail, grid_and_star)
    gap_ = sample_objective_at(atoms, beta, grid_and_star.astype(F32)) - j_star

    half = n // 2
    if half == 0:
        raise SpecError(f"prompts={n} out of range: the split-sample τ needs prompts ≥ 2")
    first, second = (RolloutAtoms(*(x[s] for x in atoms)) for s in (slice(0, half), slice(half, n)))
    tau_whole = bounds.optimal_clip_threshold(atoms.log_ratio, jnp.ones_like(atoms.log_ratio), n, K, delta)
    tau_split = bounds.optimal_clip_threshold(first.log_ratio, jnp.ones_like(first.log_ratio), n - half, K, delta)
    chosen = jnp.stack([tau_whole, tau_split]).astype(jnp.float64)
    tail_chosen = tail_excess_curve(abs_ell, prob, chosen)
    b1_whole = b1_curve(spec, cols, tail_chosen[0], chosen[0])
    b1_split = b1_curve(spec, cols, tail_chosen[1], chosen[1], n=n - half)
    gap_whole = sample_objective_at(atoms, beta, chosen[:1].astype(F32))[0] - j_star
    gap_split = sample_objective_at(second, beta, chosen[1:].astype(F32))[0] - j_star
    return {"sweep_tau": taus, "sweep_b1": b1[:-1], "sweep_gap": gap_[:-1],
            "b1_at_tau_star": b1[-1], "gap_at_tau_star": gap_[-1],
            "whole_tau": tau_whole, "b1_whole": b1_whole, "gap_whole": gap_whole,
            "split_tau": tau_split, "b1_split": b1_split, "gap_split": gap_split}


def nested_means(values, allocations) -> jax.Array:
    """Means of ``values`` ``[n_max, K_max]`` over the first n rows and first K columns, for each (n, K) of
    ``allocations`` (static pairs) → ``[len(allocations)]``: nested subsamples of one sample."""
    return jnp.stack([jnp.mean(values[:n, :k]) for n, k in allocations])


def eval_allocations(budget: float, ratios, ks) -> tuple[tuple[float, int, int], ...]:
    """The evaluation allocations (c_p/c_d, n, K): for each cost ratio r and K, n = ⌊budget/(r + K)⌋
    prompts with K rollouts each (costs c_d = 1, c_p = r; every n ≥ 2)."""
    out = []
    for r in ratios:
        for k in ks:
            n = int(math.floor(budget / (r + k) + 1e-9))
            if n < 2:
                raise SpecError(f"eval budget={budget:g} too small: ratio {r:g} with K={k} leaves n={n} < 2 prompts")
            out.append((float(r), n, int(k)))
    return tuple(out)


def budget_columns(spec: Spec, prep: Prepared, w, cols: dict, allocations) -> dict[str, jax.Array]:
    """The budget study's columns for one problem: the actual sampling error Ĵ_{n,K} − EĴ of the trained
    policy ``w`` for each evaluation allocation (r, n, K) of ``allocations`` (``eval_alloc_error``), from one
    sample of max n prompts and max K uniforms each, drawn from its own key (``eval_alloc_ratio``,
    ``eval_alloc_n``, ``eval_alloc_k`` say which allocation each entry is)."""
    n_max = max(n for _, n, _ in allocations)
    k_max = max(k for _, _, k in allocations)
    k_fp, k_fu = jax.random.split(jax.random.fold_in(prep.keys.fresh, 1))
    sample = draw_prompts(spec, prep.world, k_fp, n_max)
    u = jax.random.uniform(k_fu, (n_max, k_max), F32)
    atoms = rollout_atoms(w, prep.world.w_ref, sample.phi, _reward_hat(spec, prep, sample), u)
    h = response_objective(atoms.reward, atoms.log_ratio, spec.beta, spec.tau)
    means = nested_means(h, [(n, k) for _, n, k in allocations])
    return {"eval_alloc_error": means - cols["J_hat_mean"],
            "eval_alloc_ratio": jnp.asarray([r for r, _, _ in allocations], jnp.float64),
            "eval_alloc_n": jnp.asarray([n for _, n, _ in allocations], jnp.int32),
            "eval_alloc_k": jnp.asarray([k for _, _, k in allocations], jnp.int32)}


# ---- the kernels ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipSweepKernel:
    """The default kernel plus the clipping study's columns (:func:`clip_sweep_columns`) on the grid ``taus``."""

    taus: tuple[float, ...] = TAU_GRID
    finish_block: int | None | str = "auto"

    def __post_init__(self):
        if not self.taus or any(not (0.0 <= t < math.inf) for t in self.taus) or list(self.taus) != sorted(self.taus):
            raise SpecError(f"taus={self.taus!r} out of range: a non-empty increasing tuple of finite τ ≥ 0")

    @property
    def name(self) -> str:
        return "clip-sweep(taus=" + ",".join(f"{t:g}" for t in self.taus) + ")"

    def work_units(self, spec: Spec) -> float:
        """One problem's work in the units of :func:`rlhf_bounds.suites.estimate_seconds`: the default
        kernel's, and B1 and G at every τ of the grid (the evaluation set and the fresh sample again)."""
        from .suites._framework import work_units

        per_prompt = spec.actions * spec.d
        return work_units(spec) + len(self.taus) * 3 * (spec.eval_prompts + spec.prompts) * per_prompt

    def __call__(self, spec: Spec, keys: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
        return simulate_batch(spec, keys, shared_key, self.finish_block,
                              extra=lambda s, p, f, c: clip_sweep_columns(s, p, f.w_last, c, self.taus))


@dataclasses.dataclass(frozen=True)
class BudgetKernel:
    """The default kernel plus the budget study's evaluation allocations (:func:`budget_columns`): for each
    cost ratio of ``ratios`` and K of ``ks``, n = ⌊``eval_budget``/(r + K)⌋ prompts."""

    ratios: tuple[float, ...]
    ks: tuple[int, ...]
    eval_budget: float
    finish_block: int | None | str = "auto"

    def __post_init__(self):
        eval_allocations(self.eval_budget, self.ratios, self.ks)  # refuses a budget that leaves n < 2

    @property
    def allocations(self):
        return eval_allocations(self.eval_budget, self.ratios, self.ks)

    @property
    def name(self) -> str:
        return (f"budget(ratios={','.join(f'{r:g}' for r in self.ratios)};ks={','.join(map(str, self.ks))};"
                f"eval_budget={self.eval_budget:g})")

    def __call__(self, spec: Spec, keys: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
        allocations = self.allocations
        return simulate_batch(spec, keys, shared_key, self.finish_block,
                              extra=lambda s, p, f, c: budget_columns(s, p, f.w_last, c, allocations))


# ---- analysis (NumPy, float64) ----------------------------------------------------------------

def allocation_cost(n, K, n_pref, cost_prompt, cost_decode, cost_pref) -> np.ndarray:
    """B4's cost of an allocation: n(c_p + K c_d) + N_pref c_pref. Elementwise (float64)."""
    n, K, n_pref, cp, cd, cq = (np.asarray(x, np.float64) for x in (n, K, n_pref, cost_prompt, cost_decode, cost_pref))
    return n * (cp + K * cd) + n_pref * cq


def equal_cost_allocation(budget, K, share, cost_prompt, cost_decode, cost_pref) -> tuple[int, int]:
    """(n, N_pref) spending the fraction ``share`` of ``budget`` on preference pairs and the rest on prompts
    with K rollouts each, rounded down: N_pref = ⌊share·B/c_pref⌋, n = ⌊(1 − share)·B/(c_p + K c_d)⌋. The
    cost is at most B and falls short by less than c_p + K c_d + c_pref. Both must be ≥ 1."""
    if not (0.0 < share < 1.0):
        raise SpecError(f"share={share!r} out of range: must be in (0, 1)")
    n_pref = int(math.floor(share * budget / cost_pref + 1e-9))
    n = int(math.floor((1.0 - share) * budget / (cost_prompt + K * cost_decode) + 1e-9))
    if n < 1 or n_pref < 1:
        raise SpecError(f"budget={budget!r} too small for K={K}, share={share}: n={n}, N_pref={n_pref}")
    return n, n_pref


def nearest(grid, values, log: bool = False) -> np.ndarray:
    """Index of the grid point nearest each value (in log space with ``log``; ties to the smaller point)."""
    g = np.asarray(grid, np.float64)
    v = np.asarray(values, np.float64)
    if log:
        g, v = np.log(g), np.log(v)
    return np.argmin(np.abs(v[..., None] - g), axis=-1)


def argmin_agrees(grid, curves, tau_star) -> np.ndarray:
    """Per problem, whether B3's τ* lies within the grid's resolution of the argmin of its bound curve:
    with g the first argmin of ``curves`` ``[P, G]`` over ``grid``, τ_{g−1} < τ* < τ_{g+1} (τ_{−1} = −∞,
    τ_G = +∞). A curve c(τ) = const + h(min(τ, L)) with h convex and minimal at τ* always satisfies it
    (docs/theory.md §19), so a failure is an implementation error."""
    g = np.asarray(grid, np.float64)
    c = np.asarray(curves, np.float64)
    t = np.asarray(tau_star, np.float64)
    i = np.argmin(c, axis=-1)
    padded = np.concatenate([[-np.inf], g, [np.inf]])
    return (padded[i] < t) & (t < padded[i + 2])


class Regret(NamedTuple):
    """The regret of following a rule: criterion at the rule's choice minus the best on the grid."""

    regret: float      # (best − rule) for a criterion to maximise, (rule − best) to minimise: ≥ 0 unless the rule wins
    lo: float          # paired bootstrap 95% interval
    hi: float
    rule_value: float  # mean criterion at the rule's choice
    best_value: float  # best mean criterion on the grid
    best_index: int    # the grid choice with the best mean
    spread: float      # best − worst mean on the grid (the scale the regret is judged against)
    n: int


def rule_regret(values, rule_values, *, maximise: bool, resamples: int = 1000, seed: int = 0) -> Regret:
    """Regret of a rule over a grid of choices, with a paired bootstrap interval over problems.

    ``values`` ``[P, G]``: the criterion of problem p at grid choice g (paired: problem p is the same
    problem in every column); ``rule_values`` ``[P]``: the criterion at the rule's choice for each problem
    (e.g. ``values[p, choice_p]``, or a value off the grid). The regret is
    best_g mean_p values[:, g] − mean_p rule_values (for ``maximise``; rule − best to minimise): ≥ 0
    unless the rule beats every grid choice. The bootstrap resamples problems and recomputes both terms,
    the best grid choice included, so the interval carries the selection of the best. Problems with a
    non-finite value are dropped.
    """
    v = np.asarray(values, np.float64)
    r = np.asarray(rule_values, np.float64)
    keep = np.all(np.isfinite(v), axis=1) & np.isfinite(r)
    v, r = v[keep], r[keep]
    P = v.shape[0]
    if P == 0:
        return Regret(np.nan, np.nan, np.nan, np.nan, np.nan, -1, np.nan, 0)
    sign = 1.0 if maximise else -1.0

    def stat(idx):
        means = v[idx].mean(axis=0)
        return np.max(sign * means) - sign * r[idx].mean()

    point = stat(np.arange(P))
    rng = np.random.default_rng(seed)
    boot = np.array([stat(rng.integers(0, P, P)) for _ in range(resamples)])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    means = v.mean(axis=0)
    best = int(np.argmax(sign * means))
    return Regret(float(point), float(lo), float(hi), float(r.mean()), float(means[best]), best,
                  float(np.max(means) - np.min(means)), P)


def mean_interval(x, *, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the finite ``x`` with a bootstrap 95% percentile interval over its entries (NaN if none)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


#: A rule is judged near-optimal when its regret is at most this fraction of the grid's spread ...
REGRET_TOLERANCE = 0.1
#: ... or of the best value's magnitude, whichever is larger (a grid whose choices barely differ).
REGRET_FLOOR = 0.01


def regret_allowance(reg: Regret, tolerance: float = REGRET_TOLERANCE, floor: float = REGRET_FLOOR) -> float:
    """The regret a rule may have and still be near-optimal: max(``tolerance`` × spread, ``floor`` × |best|)."""
    return max(tolerance * reg.spread, floor * abs(reg.best_value))


def regret_verdict(reg: Regret, tolerance: float = REGRET_TOLERANCE, floor: float = REGRET_FLOOR,
                   min_problems: int = 8) -> str:
    """``holds`` when the regret's upper interval end is at most :func:`regret_allowance` (the rule is within
    ``tolerance`` of the grid's spread, or ``floor`` of the best value, of the best grid choice), ``refuted``
    when the lower end exceeds it, else ``not enough problems``."""
    if reg.n < min_problems or not np.isfinite(reg.hi):
        return "not enough problems"
    allowed = regret_allowance(reg, tolerance, floor)
    if reg.hi <= allowed:
        return "holds"
    return "refuted" if reg.lo > allowed else "not enough problems"
