"""The bound catalogue applied to one simulated problem: every bound beside its actual value.

:func:`bound_columns` takes what :func:`rlhf_bounds.simulate.simulate` knows
about a problem (the trained policy, the samples, the evaluation set, the
reward model and its data) and returns the per-problem columns of docs/theory.md
§4–§9, computed by the pure functions of :mod:`rlhf_bounds.bounds`:

* ``b1_*``: B1 for the fixed policy (its actual value is ``gap_total``, on a
  sample drawn after training); ``b1_total_certified`` replaces the oracle
  L²_train by B7's certified bound (B1 at δ/2, B7 at δ/2). B1 next to
  ``gap_total_train`` is the misuse docs/theory.md §11 shows.
* ``b2_occam_*``: B2 with a uniform prior on the grid Θ_ε ⊂ [−R_w, R_w]^d and
  the point-mass posterior at the grid point nearest the trained w, on the
  training sample itself (actual: ``gap_total_occam``); its two levels apart,
  ``b2_occam_prompt`` and ``b2_occam_rollout`` (actual:
  ``gap_sampling_prompt_occam``, ``gap_sampling_rollout_occam``).
* ``b7_radius``: B7's bound on ‖θ̂ − θ*‖_V (actual: ``b7_error_v``).
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
           "PB_SHARE", "MC_SHARE", "GAUSS_TRAIN_PROMPTS", "GAUSS_EVAL_PROMPTS", "GaussPosterior", "gauss_posterior",
           "gauss_draws"]

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
    theta_star: jax.Array    # the true reward weights (for the actual value B7 bounds)
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
        # What B7's radius bounds: ‖θ̂ − θ*‖_V with V = Σ_j u_j u_jᵀ + λI.
        err = th64 - jnp.asarray(p.theta_star, jnp.float64)
        actual = jnp.sqrt(jnp.sum(jnp.square(u64 @ err)) + spec.ridge * jnp.sum(err * err))
    else:
        l2_certified, radius, actual = (jnp.zeros((), jnp.float64),) * 3
    b1c = bounds.b1_terms(p.reward_range, beta, tau, n, K, delta / 2, chi2, l2_certified,
                          pop["tail_excess"], p.log_ratio_range)
    out.update(b1_total_certified=b1c.total, b7_radius=radius, b7_l2_bound=l2_certified, b7_error_v=actual)

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
        "gap_sampling_prompt_occam": j_hat_prompts - pop_q["J_hat_mean"],
        "gap_sampling_rollout_occam": j_hat - j_hat_prompts,
        "b2_occam_prompt": b2.prompt,
        "b2_occam_rollout": b2.rollout,
        "quantization_effect": jnp.abs(pop_q["J_star"] - p.pop["J_star"]),
        "b2_occam_kl": kl,
        "b2_occam_sampling": b2.total,
        "b2_occam_total": b2.total + shift + clip,
    }


#: Draws from B2's Gaussian posterior are evaluated on random subsamples of this many training
#: prompts (with their rollouts) and this many evaluation prompts (docs/theory.md §5.3).
GAUSS_TRAIN_PROMPTS = 16
GAUSS_EVAL_PROMPTS = 32


class GaussPosterior(NamedTuple):
    """B2's Gaussian posterior Q = N(w_S, Σ_OU + s²I) of one problem, and its KL to the best prior."""

    hessian: jax.Array      # H = −∇²F_S(w_S) ``[d, d]``
    grad_cov: jax.Array     # C_g ``[d, d]``
    sigma_ou: jax.Array     # Σ_OU ``[d, d]``
    min_curvature: jax.Array  # the smallest eigenvalue of H
    mean: jax.Array         # w_S ``[d]`` (float64)
    chol: jax.Array         # the Cholesky factor of Σ_OU + s²I
    kl: jax.Array           # min over PRIOR_SCALES of KL(Q ‖ N(w_ref, σ₀²I))


def _posterior_factors(spec: Spec, h, c_g):
    """(Σ_OU, the smallest eigenvalue of H, the Cholesky factor of Σ_OU + s²I) of one problem.

    Mapped one problem at a time even under ``vmap`` (``sequential_vmap``): jaxlib 0.10's
    batched LAPACK kernels on CPU split a batch into tasks on the intra-op pool and block the
    calling pool thread until they finish, so two batched factorisations running at once on a
    2-thread pool wait on each other for ever (seen here: two ``syevd`` of the finishing stage,
    docs/engine.md). Unbatched calls run on the calling thread.
    """
    def factors(h, c_g, lr, floor):
        sigma_ou = ou.stationary_covariance(h, c_g, lr, batch_size(spec))
        min_curvature = jnp.linalg.eigvalsh(h)[0]
        chol = jnp.linalg.cholesky(sigma_ou + floor**2 * jnp.eye(spec.d, dtype=jnp.float64))
        return sigma_ou, min_curvature, chol

    lr, floor = (jnp.asarray(x, jnp.float64) for x in (spec.lr, spec.posterior_floor))
    return jax.custom_batching.sequential_vmap(factors)(h, c_g, lr, floor)


def gauss_posterior(spec: Spec, p: Problem) -> GaussPosterior:
    """Q = N(w_S, Σ_OU + s²I) (B5's stationary covariance with the floor s) and min_σ₀ KL(Q ‖ N(w_ref, σ₀²I))."""
    h = ou.objective_hessian(spec, p.data, p.w, p.w_ref)
    c_g = ou.gradient_covariance(spec, p.data, p.w, p.w_ref)
    sigma_ou, min_curvature, chol = _posterior_factors(spec, h, c_g)
    mean_q = jnp.asarray(p.w, jnp.float64)
    variances = jnp.square(jnp.asarray(PRIOR_SCALES, jnp.float64))
    kl = jnp.min(bounds.gaussian_kl_isotropic(mean_q, chol, p.w_ref, variances))
    return GaussPosterior(h, c_g, sigma_ou, min_curvature, mean_q, chol, kl)


def gauss_draws(spec: Spec, p: Problem, post: GaussPosterior) -> dict[str, jax.Array]:
    """Per draw w_j ∼ Q (``spec.posterior_draws`` of them), on its own random prompts: ``j_hat`` (Ĵ on
    GAUSS_TRAIN_PROMPTS training prompts with their rollouts), ``j_hat_prompts`` (their exact mean h̄),
    ``j_hat_mean``, ``j_star``, ``chi2``, ``tail_excess``, ``l2_train`` on GAUSS_EVAL_PROMPTS evaluation
    prompts. Each is an unbiased estimate, given the data, of the value on the whole sample or set."""
    m, d = spec.posterior_draws, spec.d
    k_w, k_train, k_eval = jax.random.split(p.key, 3)
    z = jax.random.normal(k_w, (m, d), jnp.float64)
    draws = (post.mean + z @ post.chol.T).astype(p.w.dtype)
    i_train = jax.random.randint(k_train, (m, GAUSS_TRAIN_PROMPTS), 0, spec.prompts)
    i_eval = jax.random.randint(k_eval, (m, GAUSS_EVAL_PROMPTS), 0, spec.eval_prompts)

    def one(w, it, ie):
        t = p.data
        j_hat, j_hat_prompts = gap.sample_objective(w, p.w_ref, t.phi[it], t.reward[it], t.u[it], spec.beta,
                                                    spec.tau)
        ev = EvalSet(*(x[ie] for x in p.evalset))
        q = gap.population_means(gap.prompt_stats(w, p.w_ref, ev, spec.beta, spec.tau))
        return dict(j_hat=j_hat, j_hat_prompts=j_hat_prompts, **{k: q[k] for k in (
            "J_hat_mean", "J_star", "chi2", "tail_excess", "l2_train")})

    return jax.vmap(one)(draws, i_train, i_eval)


def b2_gauss_columns(spec: Spec, p: Problem) -> dict[str, jax.Array]:
    """B2, Gaussian posterior Q = N(w_S, Σ_OU + s²I) vs priors N(w_ref, σ₀²I), σ₀ ∈ PRIOR_SCALES.

    E_Q by Monte Carlo over ``spec.posterior_draws`` draws, each evaluated on its own random
    prompts (:func:`gauss_draws`); the Hoeffding radii cover the draws and the prompts together
    (docs/theory.md §5.3).
    """
    n, K, beta, tau, delta = spec.prompts, spec.rollouts, spec.beta, spec.tau, spec.delta
    post = gauss_posterior(spec, p)
    v = gauss_draws(spec, p, post)
    width = bounds.objective_range(p.reward_range, beta, tau)  # Q's support is all of R^d: only τ bounds ℓ
    m = spec.posterior_draws
    mc_prompt = bounds.mc_error_hoeffding(width, m, MC_SHARE * delta)
    mc_sampling = bounds.mc_error_hoeffding(2.0 * width, m, MC_SHARE * delta)
    b2 = bounds.b2_sampling_bound(jnp.mean(v["j_hat_prompts"]), post.kl, n, K, -0.5 * width, width,
                                  PB_SHARE * delta / len(PRIOR_SCALES), mc_radius=mc_prompt)
    shift = jnp.mean(jnp.sqrt(1.0 + v["chi2"]) * jnp.sqrt(v["l2_train"]))
    clip = beta * jnp.mean(v["tail_excess"])
    # With τ = ∞ no finite width holds r̂ − βℓ^τ over all of R^d: the bound is vacuous (∞), not NaN.
    vacuous = lambda x: jnp.where(jnp.isfinite(width), x, jnp.inf)
    return {
        "gap_total_gauss": jnp.mean(v["j_hat"] - v["J_star"]),
        "gap_sampling_gauss": jnp.mean(v["j_hat"] - v["J_hat_mean"]),
        "b2_gauss_kl": post.kl,
        "b2_gauss_sampling": vacuous(b2.total),
        "b2_gauss_mc": vacuous(mc_sampling),
        "b2_gauss_total": vacuous(b2.total + mc_sampling + shift + clip),
        "ou_trace": jnp.trace(post.sigma_ou),
        "ou_grad_cov_trace": jnp.trace(post.grad_cov),
        "ou_min_curvature": post.min_curvature,
    }
