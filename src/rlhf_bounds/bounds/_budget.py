"""B4: budget allocation [B; E] — rollouts per prompt K*, and the budget share on preference data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._numerics import _f64


def rollout_sampling_objective(K, cost_prompt, cost_decode, budget=1.0, var_prompt=None,
                               var_rollout=None) -> jax.Array:
    """B1's sampling term per unit W_τ√(log(4/δ)/2), at n = budget/(c_p + K c_d) prompts [B4].

    Without variances: √(1/n) + √(1/(nK)) = √((c_p + K c_d)/budget)·(1 + K^{-1/2}).
    With variances (the standard deviation of Ĵ):
    √(σ²_prompt/n + σ²_roll/(nK)) = √((c_p + K c_d)/budget · (σ²_prompt + σ²_roll/K)).
    K is treated as a real number ≥ 1; n is not rounded. Elementwise.
    """
    K, cp, cd, budget = map(_f64, (K, cost_prompt, cost_decode, budget))
    per_prompt = (cp + K * cd) / budget
    if var_prompt is None or var_rollout is None:
        return jnp.sqrt(per_prompt) * (1.0 + 1.0 / jnp.sqrt(K))
    return jnp.sqrt(per_prompt * (_f64(var_prompt) + _f64(var_rollout) / K))


def rollouts_per_prompt(cost_prompt, cost_decode, var_prompt=None, var_rollout=None) -> jax.Array:
    """B4 [B]: continuous minimiser K* of ``rollout_sampling_objective`` under the budget.

    K* = max{1, (c_p/c_d)^{2/3}}: the objective's K-derivative has the sign of
    K^{3/2} − c_p/c_d (derivation in docs/theory.md §7.1; [B]'s rule).
    Variance-aware: K* = max{1, √((c_p/c_d)·σ²_roll/σ²_prompt)}: the derivative of
    (c_p + K c_d)(σ²_p + σ²_r/K) has the sign of c_d σ²_p K² − c_p σ²_r.
    Both objectives are unimodal in K, so K* is the global minimiser on [1, ∞).
    σ²_prompt = 0 (or c_d = 0) gives K* = ∞. The budget does not enter. Elementwise.
    """
    ratio = _f64(cost_prompt) / _f64(cost_decode)
    if var_prompt is None or var_rollout is None:
        k = ratio ** (2.0 / 3.0)
    else:
        k = jnp.sqrt(ratio * _f64(var_rollout) / _f64(var_prompt))
    return jnp.maximum(1.0, k)


def integer_rollouts_per_prompt(cost_prompt, cost_decode, var_prompt=None, var_rollout=None) -> jax.Array:
    """Best integer K ≥ 1: ⌊K*⌋ or ⌈K*⌉, whichever gives the smaller objective (ties: ⌊K*⌋).

    Exact because the objective is unimodal in K (see ``rollouts_per_prompt``).
    Returned as an integer-valued float64 (∞ when K* = ∞). Elementwise.
    """
    k = rollouts_per_prompt(cost_prompt, cost_decode, var_prompt, var_rollout)
    k_lo, k_hi = jnp.floor(k), jnp.ceil(k)
    obj_lo = rollout_sampling_objective(k_lo, cost_prompt, cost_decode, 1.0, var_prompt, var_rollout)
    obj_hi = rollout_sampling_objective(k_hi, cost_prompt, cost_decode, 1.0, var_prompt, var_rollout)
    return jnp.where(obj_hi < obj_lo, k_hi, k_lo)


def preference_objective(share, a, b, cost_per_prompt, cost_pref, budget=1.0) -> jax.Array:
    """a/√n + b/√N_pref with n = (1 − s)·budget/c_n and N_pref = s·budget/c_pref [B4, E].

    s = ``share`` is the fraction of the budget spent on preference pairs; c_n = c_p + K c_d
    is the cost of one prompt with its K rollouts. A zero coefficient contributes 0.
    Elementwise.
    """
    s, a, b, cn, cpref, budget = map(_f64, (share, a, b, cost_per_prompt, cost_pref, budget))
    prompt_part = jnp.where(a > 0, a * jnp.sqrt(cn / ((1.0 - s) * budget)), 0.0)
    pref_part = jnp.where(b > 0, b * jnp.sqrt(cpref / (s * budget)), 0.0)
    return prompt_part + pref_part


def preference_share(a, b, cost_per_prompt, cost_pref) -> jax.Array:
    """B4 [E]: the budget share s* on preference data minimising ``preference_objective``.

    s* = b^{2/3} c_pref^{1/3} / (a^{2/3} c_n^{1/3} + b^{2/3} c_pref^{1/3}) (Lagrangian in
    docs/theory.md §7.2). The minimum value is
    (a^{2/3} c_n^{1/3} + b^{2/3} c_pref^{1/3})^{3/2}/√budget. Typical use: a = W_τ·α·√n
    (B1's sampling coefficient), b = √((1 + χ²) κ_pref) with L²_train ≈ κ_pref/N_pref.
    a, b ≥ 0; a = b = 0 (nothing to trade) returns 0. Elementwise.
    """
    a, b, cn, cpref = map(_f64, (a, b, cost_per_prompt, cost_pref))
    prompt_weight = a ** (2.0 / 3.0) * cn ** (1.0 / 3.0)
    pref_weight = b ** (2.0 / 3.0) * cpref ** (1.0 / 3.0)
    total = prompt_weight + pref_weight
    return jnp.where(total > 0, pref_weight / jnp.where(total > 0, total, 1.0), 0.0)
