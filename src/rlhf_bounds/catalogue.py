"""The bound catalogue applied to one simulated problem: every bound beside its actual value.

:func:`bound_columns` takes what :func:`rlhf_bounds.simulate.simulate` knows
about a problem (the trained policy, the samples, the evaluation set, the
reward model and its data) and returns the per-problem columns of THEORY.md
§7, computed by the pure functions of :mod:`rlhf_bounds.bounds`:

* ``b1_*``: B1 for the fixed policy (its actual value is ``gap_total``, on a
  sample drawn after training); ``b1_total_certified`` replaces the oracle
  L²_train by B7's certified bound (B1 at δ/2, B7 at δ/2). B1 next to
  ``gap_total_train`` is the misuse THEORY.md §7 asks to show.
* ``b2_occam_*``: B2 with a uniform prior on the grid Θ_ε ⊂ [−R_w, R_w]^d and
  the point-mass posterior at the grid point nearest the trained w, on the
  training sample itself (actual: ``gap_total_occam``).
* ``b2_gauss_*``: B2 with the Gaussian posterior Q = N(w_S, Σ_OU + s²I)
  against priors N(w_ref, σ₀²I) on a fixed σ₀ grid, E_Q by Monte Carlo with
  its error bounded and added (actual: ``gap_total_gauss``).
* ``b3_tau_star``: B3's optimal clipping threshold for the trained policy;
  ``var_prompt``/``var_rollout`` for B4's variance-aware K*.

docs/theory.md has the statements, proofs and every split of δ.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import bounds, gap, ou
from .gap import EvalSet
from .learners import TrainData, batch_size
from .policy import log_ratio, response_objective
from .spec import Spec

__all__ = ["EvalSet", "Problem", "bound_columns", "b2_occam_columns", "b2_gauss_columns", "PRIOR_SCALES",
           "PB_SHARE", "MC_SHARE"]

#: σ₀ grid of the Gaussian priors N(w_ref, σ₀²I) (fixed before any data; union bound over it).
PRIOR_SCALES = tuple(0.05 * 2.0**k for k in range(8))
#: Share of δ given to the PAC-Bayes event in the Gaussian-posterior bound; the rest is split
#: equally between its two Monte Carlo events.
PB_SHARE = 0.9
MC_SHARE = (1.0 - PB_SHARE) / 2.0


class Problem(NamedTuple):
    """What the catalogue needs of one simulated problem."""

    w: jax.Array             # the trained policy (last iterate)
    w_ref: jax.Array
    data: TrainData          # the training sample (prompts, r̂, rollout uniforms)
    evalset: EvalSet
    stats: gap.PromptStats   # per-prompt values of w on the evaluation set
    pop: dict                # population values of w
    theta_hat: jax.Array
    pref_u: jax.Array        # preference differences u_j ``[N, d]`` (empty for the oracle)
    pref_z: jax.Array        # preference labels z_j ``[N]``
    reward_range: jax.Array  # sup r̂ − inf r̂
    log_ratio_range: jax.Array  # 2C‖w − w_ref‖
    key: jax.Array           # this problem's key for the Monte Carlo draws from Q


def _population_at(spec: Spec, p: Problem, w) -> dict[str, jax.Array]:
    """The population values of another policy w of this problem (no quantiles)."""
    return gap.population_means(gap.prompt_stats(w, p.w_ref, p.evalset, spec.beta, spec.tau))


def _train_sample_at(spec: Spec, p: Problem, w):
    d = p.data
    return gap.sample_objective(w, p.w_ref, d.phi, d.reward, d.u, spec.beta, spec.tau)


def bound_columns(spec: Spec, p: Problem) -> dict[str, jax.Array]:
    """Every bound of the catalogue for one problem, with the actual values they bound."""
    n, K, beta, tau, delta, C = spec.prompts, spec.rollouts, spec.beta, spec.tau, spec.delta, spec.feature_bound
    pop, out = p.pop, {}

    # ---- B1, fixed policy ---------------------------------------------------------------
    # χ² from log(1 + χ²) in float64: finite even where float32 χ² overflows.
    chi2 = jnp.expm1(jnp.asarray(pop["log1p_chi2"], jnp.float64))
    b1 = bounds.b1_terms(p.reward_range, beta, tau, n, K, delta, chi2, pop["l2_train"],
                         pop["tail_excess"], p.log_ratio_range)
    out.update(b1_sampling=b1.sampling, b1_reward_shift=b1.reward_shift, b1_clipping=b1.clipping,
               b1_total=b1.total)

    # ---- B7 and the certified B1 (B1 at δ/2, B7 at δ/2) ----------------------------------
    if spec.reward_model == "mle":
        mu = jnp.exp(p.evalset.log_mu)
        # M = E_{D_train}[φφᵀ] = XᵀX/M with the rows of X the √μ-weighted features (one matmul).
        x = (jnp.sqrt(mu)[..., None] * p.evalset.phi).reshape(-1, spec.d)
        second_moment = x.T @ x / mu.shape[0]
        # B7 needs the residual gradient of the fit in float64 (the fit itself ran in float32).
        u64, z64, th64 = (jnp.asarray(x, jnp.float64) for x in (p.pref_u, p.pref_z, p.theta_hat))
        residual = jnp.linalg.norm(u64.T @ (jax.nn.sigmoid(u64 @ th64) - z64) + spec.ridge * th64)
        cert = bounds.certified_reward_error(p.pref_u, p.theta_hat, spec.ridge, spec.reward_norm,
                                             second_moment, delta / 2, residual)
        l2_certified, radius = cert.l2_bound, cert.radius
    else:
        l2_certified, radius = jnp.zeros((), jnp.float64), jnp.zeros((), jnp.float64)
    b1c = bounds.b1_terms(p.reward_range, beta, tau, n, K, delta / 2, chi2, l2_certified,
                          pop["tail_excess"], p.log_ratio_range)
    out.update(b1_total_certified=b1c.total, b7_radius=radius, b7_l2_bound=l2_certified)

    # ---- B3 and B4 inputs ---------------------------------------------------------------
    # The law of |ℓ| under D_w: atoms |ℓ(x_m, a)| with weight π_w(a|x_m)/M, passed without the 1/M
    # (the radix select normalises) so that XLA shares its keys and first pass with the quantiles
    # gap.population takes of the same law.
    out["b3_tau_star"] = bounds.optimal_clip_threshold(p.stats.abs_log_ratio, p.stats.prob, n, K, delta)
    out.update(_variances(spec, p))

    if spec.bounds == "all":
        # ---- B2 with the uniform prior on a finite grid (Occam) --------------------------
        out.update(b2_occam_columns(spec, p))
        # ---- B2 with the Gaussian (OU) posterior ---------------------------------------------
        out.update(b2_gauss_columns(spec, p))
    return out


def _variances(spec: Spec, p: Problem) -> dict[str, jax.Array]:
    """σ²_prompt = Var_x E_{π_w}[h] and σ²_roll = E_x Var_{π_w}[h] of h = r̂ − βℓ^τ (B4's variance-aware K*).

    ℓ is recomputed with exactly the expressions of :func:`gap.prompt_stats` on purpose: in the
    engine both run in one XLA computation (``simulate._finish``), whose common-subexpression
    elimination shares their matvecs and log-sum-exps, so ℓ costs nothing here.
    """
    s, e = p.stats, p.evalset
    ell = jax.vmap(log_ratio, in_axes=(None, None, 0))(p.w, p.w_ref, e.phi)
    h = response_objective(e.r_hat, ell, spec.beta, spec.tau)
    mean_h = jnp.sum(s.prob * h, axis=-1)
    var_roll = jnp.sum(s.prob * (h - mean_h[:, None]) ** 2, axis=-1)
    return {"var_prompt": jnp.var(mean_h), "var_rollout": jnp.mean(var_roll)}


def b2_occam_columns(spec: Spec, p: Problem) -> dict[str, jax.Array]:
    """B2, uniform prior over Θ_ε, point mass at the nearest grid point w_q; KL = log|Θ_ε|."""
    n, K, beta, tau, C = spec.prompts, spec.rollouts, spec.beta, spec.tau, spec.feature_bound
    radius, spacing = spec.occam_radius, spec.occam_spacing
    w_q = bounds.occam_quantize(p.w - p.w_ref, radius, spacing).astype(p.w.dtype) + p.w_ref
    kl = bounds.occam_log_cardinality(spec.d, radius, spacing)
    # |ℓ| ≤ 2C‖w_q − w_ref‖ ≤ 2C·R_w√d on the whole grid: fixed before the training data.
    width = bounds.objective_range(p.reward_range, beta, tau, bounds.log_ratio_range(C, radius * jnp.sqrt(spec.d)))
    lo = -0.5 * width
    j_hat, j_hat_prompts = _train_sample_at(spec, p, w_q)
    pop_q = _population_at(spec, p, w_q)
    b2 = bounds.b2_sampling_bound(j_hat_prompts, kl, n, K, lo, width, spec.delta)
    shift = jnp.sqrt(1.0 + pop_q["chi2"]) * jnp.sqrt(p.pop["l2_train"])  # L²_train does not depend on w
    clip = beta * pop_q["tail_excess"]
    return {
        "gap_total_occam": j_hat - pop_q["J_star"],
        "gap_sampling_occam": j_hat - pop_q["J_hat_mean"],
        "quantization_effect": jnp.abs(pop_q["J_star"] - p.pop["J_star"]),
        "b2_occam_kl": kl,
        "b2_occam_sampling": b2.total,
        "b2_occam_total": b2.total + shift + clip,
    }


def b2_gauss_columns(spec: Spec, p: Problem) -> dict[str, jax.Array]:
    """B2, Gaussian posterior Q = N(w_S, Σ_OU + s²I) vs priors N(w_ref, σ₀²I), σ₀ ∈ PRIOR_SCALES."""
    n, K, beta, tau, delta = spec.prompts, spec.rollouts, spec.beta, spec.tau, spec.delta
    d = spec.d
    h = ou.objective_hessian(spec, p.data, p.w, p.w_ref)
    c_g = ou.gradient_covariance(spec, p.data, p.w, p.w_ref)
    sigma_ou = ou.stationary_covariance(h, c_g, spec.lr, batch_size(spec))
    cov_q = sigma_ou + spec.posterior_floor**2 * jnp.eye(d, dtype=jnp.float64)
    mean_q = jnp.asarray(p.w, jnp.float64)
    w_ref64 = jnp.asarray(p.w_ref, jnp.float64)
    scales = jnp.asarray(PRIOR_SCALES, jnp.float64)
    kls = jax.vmap(lambda s: bounds.gaussian_kl(mean_q, cov_q, w_ref64, s**2 * jnp.eye(d, dtype=jnp.float64)))(scales)
    kl = jnp.min(kls)

    chol = jnp.linalg.cholesky(cov_q)
    z = jax.random.normal(p.key, (spec.posterior_draws, d), jnp.float64)
    draws = (mean_q + z @ chol.T).astype(p.w.dtype)
    def one(w):
        j_hat, j_hat_prompts = _train_sample_at(spec, p, w)
        q = _population_at(spec, p, w)
        return j_hat, j_hat_prompts, q["J_hat_mean"], q["J_star"], q["chi2"], q["tail_excess"], q["l2_train"]

    j_hat, j_hat_prompts, j_hat_mean, j_star, chi2, tail, l2 = jax.vmap(one)(draws)
    width = bounds.objective_range(p.reward_range, beta, tau)  # Q's support is all of R^d: only τ bounds ℓ
    m = spec.posterior_draws
    mc_prompt = bounds.mc_error_hoeffding(width, m, MC_SHARE * delta)
    mc_sampling = bounds.mc_error_hoeffding(2.0 * width, m, MC_SHARE * delta)
    b2 = bounds.b2_sampling_bound(jnp.mean(j_hat_prompts), kl, n, K, -0.5 * width, width,
                                  PB_SHARE * delta / len(PRIOR_SCALES), mc_radius=mc_prompt)
    shift = jnp.mean(jnp.sqrt(1.0 + chi2) * jnp.sqrt(l2))
    clip = beta * jnp.mean(tail)
    # With τ = ∞ no finite width holds r̂ − βℓ^τ over all of R^d: the bound is vacuous (∞), not NaN.
    vacuous = lambda x: jnp.where(jnp.isfinite(width), x, jnp.inf)
    return {
        "gap_total_gauss": jnp.mean(j_hat - j_star),
        "gap_sampling_gauss": jnp.mean(j_hat - j_hat_mean),
        "b2_gauss_kl": kl,
        "b2_gauss_sampling": vacuous(b2.total),
        "b2_gauss_mc": vacuous(mc_sampling),
        "b2_gauss_total": vacuous(b2.total + mc_sampling + shift + clip),
        "ou_trace": jnp.trace(sigma_ou),
        "ou_grad_cov_trace": jnp.trace(c_g),
        "ou_min_curvature": jnp.linalg.eigvalsh(h)[0],
    }
