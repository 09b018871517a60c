"""The catalogue's bound formulas: B3 (optimal clipping), B1 and B2 (sampling bounds), B7
(certified reward-model error) [A; B; E; Abbasi-Yadkori et al. 2011; Filippi et al. 2010].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from ._divergences import _maurer_confidence, hoeffding_lambda_bound, kl_inverse_lower, kl_inverse_upper
from ._numerics import _F64, _f64, tail_threshold


# ---------------------------------------------------------------------------------------
# B3: the optimal clipping threshold
# ---------------------------------------------------------------------------------------


def sampling_alpha(n, K, delta) -> jax.Array:
    """α = √(log(4/δ)/2n) + √(log(4/δ)/2nK), the confidence factor of B1's sampling term [B, Thm 1].

    Two-sided Hoeffding at δ/2 over n prompts plus δ/2 over the nK rollouts given the
    prompts. K = ∞ (exact expectations over responses) drops the second term. Elementwise.
    """
    n, K, delta = _f64(n), _f64(K), _f64(delta)
    log_term = jnp.log(4.0 / delta)
    return jnp.sqrt(log_term / (2.0 * n)) + jnp.sqrt(log_term / (2.0 * n * K))


def _discrete_law(values, weights):
    """Flatten a discrete law of |ℓ| and normalise its weights to sum 1."""
    v = jnp.abs(jnp.ravel(_f64(values)))
    w = jnp.ravel(_f64(weights))
    return v, w / jnp.sum(w)


def clip_objective(tau, abs_log_ratio, weights, alpha, beta) -> jax.Array:
    """h(τ) = 2βατ + β E(|ℓ| − τ)_+, the τ-dependent part of B1 [B] (for τ ≤ L_ℓ).

    The expectation is under the discrete law with atoms ``abs_log_ratio`` (any shape,
    flattened; abs is taken) and probabilities ``weights`` (same shape; normalised to
    sum 1 here). ``tau`` may have any shape; the result has tau's shape.
    """
    v, w = _discrete_law(abs_log_ratio, weights)
    tau, alpha, beta = _f64(tau), _f64(alpha), _f64(beta)
    tail = jnp.sum(w * jnp.maximum(v - tau[..., None], 0.0), axis=-1)
    return 2.0 * beta * alpha * tau + beta * tail


def optimal_clip_threshold(abs_log_ratio, weights, n, K, delta) -> jax.Array:
    """B3 [B]: τ* = inf{t ≥ 0 : P(|ℓ| > t) ≤ 2α}, α = ``sampling_alpha(n, K, δ)``.

    This is the lower (1 − 2α)-quantile of |ℓ|: the smallest t with P(|ℓ| ≤ t) ≥ 1 − 2α.
    It minimises h(τ) = 2βατ + βE(|ℓ| − τ)_+ over τ ≥ 0 (β > 0): h is convex and piecewise
    linear with right derivative β(2α − P(|ℓ| > τ)), which is < 0 for τ < τ* and ≥ 0 at τ*.
    τ* = 0 when 2α ≥ 1. The law is discrete: atoms ``abs_log_ratio`` (any shape,
    flattened) with probabilities ``weights`` (same shape, normalised to sum 1), e.g.
    |ℓ_w(x_m, a)| with weight π_w(a|x_m)/M over an evaluation set. τ* is one of the atoms
    (or 0), is independent of β, and is non-decreasing in n, K and δ. Returns a scalar.
    The weights' scale does not matter: pass π_w(a|x_m) itself, as the catalogue does, to share the
    weight normalisation, keys and first radix pass with ``gap.weighted_quantiles`` of the same law.
    """
    v = jnp.abs(jnp.asarray(abs_log_ratio))  # float32 atoms keep 32-bit keys: 3 radix passes, not 6
    two_alpha = 2.0 * sampling_alpha(n, K, delta)
    tau = tail_threshold(v, weights, two_alpha)
    return jnp.where(two_alpha >= 1.0, 0.0, tau)


# ---------------------------------------------------------------------------------------
# B1 and B2
# ---------------------------------------------------------------------------------------


def log_ratio_range(feature_bound, weight_distance) -> jax.Array:
    """A-priori bound L_ℓ = 2C‖w − w_ref‖ on |ℓ_w(x, a)| for every x, a (‖φ‖ ≤ C).

    ℓ_w(x, a) = ⟨Δw, φ_a⟩ − log E_{b∼π_ref} e^{⟨Δw, φ_b⟩}, Δw = w − w_ref; both terms lie
    in [−C‖Δw‖, C‖Δw‖] (a log-mean-exp lies between the min and the max). Elementwise.
    """
    return 2.0 * _f64(feature_bound) * _f64(weight_distance)


def objective_range(reward_range, beta, tau, log_ratio_range=jnp.inf) -> jax.Array:
    """W_τ = reward_range + 2β·min(τ, L_ℓ): the width of an interval holding r̂ − βℓ^τ_w [B].

    ``reward_range`` = sup r̂ − inf r̂ (2‖θ̂‖C for r̂ = ⟨θ̂, φ⟩; 1 for rewards in [0, 1]).
    τ = L_ℓ = ∞ gives ∞. β = 0 gives reward_range (no 0·∞). Elementwise.
    """
    reward_range, beta = _f64(reward_range), _f64(beta)
    half_width = jnp.minimum(_f64(tau), _f64(log_ratio_range))
    return reward_range + jnp.where(beta > 0, 2.0 * beta * half_width, 0.0)


class B1Terms(NamedTuple):
    """The three terms of B1 and their sum (each broadcast to a common shape)."""

    sampling: jax.Array
    reward_shift: jax.Array
    clipping: jax.Array
    total: jax.Array


def b1_terms(reward_range, beta, tau, n, K, delta, chi2, l2_train, tail_excess,
             log_ratio_range=jnp.inf) -> B1Terms:
    """B1 [B, Thm 1]: for w fixed independently of the sample, with probability ≥ 1 − δ,

    |G(w)| ≤ W_τ·α  +  √(1 + χ²(D_w‖D_train))·√(L²_train)  +  β·E_{D_w}(|ℓ_w| − τ)_+
             (sampling)        (reward_shift)                     (clipping)

    W_τ = ``objective_range(reward_range, β, τ, log_ratio_range)``, α =
    ``sampling_alpha(n, K, δ)`` (δ/2 two-sided over prompts, δ/2 two-sided over rollouts
    given prompts). Only the sampling term is random; the others are population values.
    χ² is of the joint laws; with a shared prompt marginal it is E_x χ²(π_w(·|x)‖μ(·|x)).
    τ = L_ℓ = ∞ gives sampling = ∞. Scalars broadcast elementwise.
    """
    width = objective_range(reward_range, beta, tau, log_ratio_range)
    sampling = width * sampling_alpha(n, K, delta)
    reward_shift = jnp.sqrt(1.0 + _f64(chi2)) * jnp.sqrt(_f64(l2_train))
    beta = _f64(beta)
    clipping = jnp.where(beta > 0, beta * _f64(tail_excess), 0.0)
    sampling, reward_shift, clipping = jnp.broadcast_arrays(sampling, reward_shift, clipping)
    return B1Terms(sampling, reward_shift, clipping, sampling + reward_shift + clipping)


class B2Terms(NamedTuple):
    """B2's sampling part: prompt level (kl-inverse and square-root forms), rollout level, totals."""

    prompt: jax.Array
    prompt_sqrt: jax.Array
    rollout: jax.Array
    total: jax.Array
    total_sqrt: jax.Array


def b2_sampling_bound(emp_prompt_mean, kl, n, K, lo, width, delta, lambdas=None,
                      mc_radius=0.0) -> B2Terms:
    """B2 [B, Thm 2; exact form E]: w.p. ≥ 1 − δ, for all posteriors Q simultaneously,
    |E_Q Ĵ − E_Q EĴ| ≤ ``total``.

    Ĵ(w) − EĴ(w) = [Ĵ(w) − h̄_S(w)] + [h̄_S(w) − E_x h_w(x)], with
    h_w(x) = E_{a∼π_w}[r̂ − βℓ^τ_w](x) ∈ [lo, lo + W] and h̄_S(w) = (1/n)Σ_i h_w(x_i).

    δ split (total δ):
      * prompt level, δ/2, both sides from one event: Maurer's kl bound on the rescaled
        q̂ = (E_Q h̄_S − lo)/W ∈ [0, 1] with c = (KL + log(2√n/(δ/2)))/n;
        prompt = W·max(q̂ − kl⁻¹₋(q̂, c), kl⁻¹₊(q̂, c) − q̂);
        prompt_sqrt = W·√(c/2) (the square-root form, same event, via Pinsker);
      * rollout level, δ/2 = δ/4 per side: Hoeffding PAC-Bayes-λ over the n·K conditionally
        independent terms of width W (common random numbers make Ĵ a deterministic function
        of w given (x_i, U_ik)); rollout = ``hoeffding_lambda_bound(KL, nK, W, δ/4, lambdas)``.

    ``emp_prompt_mean`` = E_Q h̄_S (the exact-over-responses training mean, averaged over Q).
    If it is itself a Monte Carlo estimate with |error| ≤ ``mc_radius`` (e.g.
    ``mc_error_hoeffding`` at its own δ_MC, to be added to δ), the prompt term is taken at
    the worst q̂ in the interval: W·max(q_+ − kl⁻¹₋(q_−, c), kl⁻¹₊(q_+, c) − q_−) with
    q_± = clip(q̂ ± mc_radius/W, 0, 1). W must be valid for every w in Q's support and fixed
    before the prompts and rollouts (it may depend on the preference data); W = ∞ (τ = ∞
    with no finite log-ratio range) gives ∞ terms. For several priors (a σ₀ grid of size G)
    call with δ/G and take the minimum over the grid. Scalars broadcast elementwise.
    """
    emp, kl, n, K, lo, width, delta = map(_f64, (emp_prompt_mean, kl, n, K, lo, width, delta))
    # W = 0: no deviation; W = ∞: vacuous. Subnormal W counts as 0 (XLA on CPU flushes
    # subnormals in arithmetic but not always in comparisons).
    usable = (width >= jnp.finfo(_F64).tiny) & jnp.isfinite(width)
    safe_width = jnp.where(usable, width, 1.0)
    q_hat = jnp.clip((emp - jnp.where(usable, lo, emp)) / safe_width, 0.0, 1.0)
    radius = _f64(mc_radius) / safe_width
    q_minus, q_plus = jnp.clip(q_hat - radius, 0.0, 1.0), jnp.clip(q_hat + radius, 0.0, 1.0)
    c = _maurer_confidence(kl, n, delta / 2.0)
    deviation = jnp.maximum(q_plus - kl_inverse_lower(q_minus, c), kl_inverse_upper(q_plus, c) - q_minus)
    prompt = jnp.where(usable, width * deviation, jnp.where(jnp.isinf(width), jnp.inf, 0.0))
    prompt_sqrt = width * jnp.sqrt(c / 2.0)
    rollout = hoeffding_lambda_bound(kl, n * K, width, delta / 4.0, lambdas)
    prompt, prompt_sqrt, rollout = jnp.broadcast_arrays(prompt, prompt_sqrt, rollout)
    return B2Terms(prompt, prompt_sqrt, rollout, prompt + rollout, prompt_sqrt + rollout)


def mc_error_hoeffding(width, m, delta_mc) -> jax.Array:
    """Two-sided Hoeffding radius W·√(log(2/δ_MC)/(2m)) for a mean of m i.i.d. draws in a width-W interval.

    Bounds |(1/m)Σ_j f(w_j) − E_Q f| for w_j ∼ Q, e.g. E_Q terms of B2 under a Gaussian
    posterior. Its δ_MC adds to the bound's δ. Elementwise.
    """
    width, m, delta_mc = _f64(width), _f64(m), _f64(delta_mc)
    return width * jnp.sqrt(jnp.log(2.0 / delta_mc) / (2.0 * m))


# ---------------------------------------------------------------------------------------
# B7: certified reward-model error
# ---------------------------------------------------------------------------------------


def logistic_derivative(t) -> jax.Array:
    """σ'(t) = σ(t)(1 − σ(t)) = e^{−|t|}/(1 + e^{−|t|})², even and decreasing in |t|. Elementwise."""
    e = jnp.exp(-jnp.abs(_f64(t)))
    return e / (1.0 + e) ** 2


class RewardCertificate(NamedTuple):
    """B7's outputs: the confidence radius ‖θ̂ − θ*‖_V and the bound on L²_train."""

    radius: jax.Array
    l2_bound: jax.Array


def certified_reward_error(u, theta_hat, ridge_lambda, s_theta, feature_second_moment, delta,
                           grad_residual_norm=0.0) -> RewardCertificate:
    """B7 [E; Abbasi-Yadkori et al. 2011 Thm 1; Filippi et al. 2010]: w.p. ≥ 1 − δ over the labels,

    ‖θ̂ − θ*‖_V ≤ radius = (1/κ)[½√(2 log(1/δ) + log det(V/λ)) + √λ·S_θ + ‖r‖/√λ],
    L²_train = E_{D_train}⟨θ̂ − θ*, φ⟩² ≤ l2_bound = radius²·λ_max(V^{-1/2} M V^{-1/2}),

    V = Σ_j u_j u_jᵀ + λI, κ = σ'(max_j max(|⟨θ̂, u_j⟩|, S_θ‖u_j‖)), M = E_{D_train}[φφᵀ],
    r = ∇ of the *summed* loss Σ_j logloss_j + (λ/2)‖θ‖² at θ̂ (0 for the exact ridge MLE;
    pass the final Newton gradient norm otherwise). Assumes the Bradley–Terry model holds
    with a linear reward (σ_ξ = 0) and ‖θ*‖ ≤ S_θ; needs no bound on ‖u‖.
    Shapes: u ``[N, d]``, theta_hat ``[d]``, feature_second_moment ``[d, d]``; scalars else.
    """
    u, theta_hat, lam, s_theta, second_moment, delta = map(
        _f64, (u, theta_hat, ridge_lambda, s_theta, feature_second_moment, delta))
    d = theta_hat.shape[-1]
    gram = u.T @ u + lam * jnp.eye(d, dtype=_F64)
    chol = jnp.linalg.cholesky(gram)
    logdet_ratio = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))) - d * jnp.log(lam)
    worst_margin = jnp.max(jnp.maximum(jnp.abs(u @ theta_hat), s_theta * jnp.linalg.norm(u, axis=-1)))
    kappa = logistic_derivative(worst_margin)
    noise = 0.5 * jnp.sqrt(2.0 * jnp.log(1.0 / delta) + logdet_ratio)
    bias = jnp.sqrt(lam) * s_theta + _f64(grad_residual_norm) / jnp.sqrt(lam)
    radius = (noise + bias) / kappa
    # λ_max(V^{-1/2} M V^{-1/2}) = λ_max(L⁻¹ M L⁻ᵀ) for V = L Lᵀ (same spectrum as V⁻¹M).
    whitened = solve_triangular(chol, solve_triangular(chol, second_moment, lower=True).T, lower=True)
    top = jnp.linalg.eigvalsh(0.5 * (whitened + whitened.T))[-1]
    return RewardCertificate(radius, radius**2 * jnp.maximum(top, 0.0))
