"""Divergences, their inverses and the PAC-Bayes toolkit [B; E; Maurer 2004; Catoni 2007].

Binary and Gaussian KL, the kl-inversions (fixed 60-step bisection), the McAllester and
Maurer bounds, the Hoeffding PAC-Bayes-λ bound over its fixed λ grid, and the Occam grid
Θ_ε (its size, the KL of a point mass on it, and quantisation onto it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from ._numerics import _F64, _bisect_unit_interval, _f64


#: Exponents j of the default λ grid λ_j = (√(8 n_terms)/W)·2^j of ``default_lambda_grid``.
LAMBDA_GRID_EXPONENTS = tuple(range(-10, 11))
# Relative slack when counting grid points, so that a 2R/ε that is an integer in exact
# arithmetic but rounds just below it in float64 is still counted (can only overcount).
_GRID_COUNT_SLACK = 1e-9


# ---------------------------------------------------------------------------------------
# Divergences and their inverses
# ---------------------------------------------------------------------------------------


def _x_log_x_over_y(x, y, x_minus_y):
    """x·log(x/y) ≥ −∞ for x, y ∈ [0, 1], with 0·log(0/y) = 0 and x·log(x/0) = +∞ (x > 0).

    ``x_minus_y`` is passed in because the caller can form it without cancellation. Near
    x = y it uses log1p((x − y)/y) (absolute error O(eps·|x − y|)); for x ≤ y/2, where
    1 + (x − y)/y would lose all its digits, log x − log y.
    """
    y_pos = jnp.where(y > 0, y, 1.0)
    x_pos = jnp.where(x > 0, x, 1.0)
    log_ratio = jnp.where(x > 0.5 * y, jnp.log1p(x_minus_y / y_pos), jnp.log(x_pos) - jnp.log(y_pos))
    return jnp.where(x > 0, jnp.where(y > 0, x * log_ratio, jnp.inf), 0.0)


def kl_bernoulli(q, p) -> jax.Array:
    """Binary relative entropy kl(q‖p) = q log(q/p) + (1 − q) log((1 − q)/(1 − p)).

    Conventions: 0·log(0/·) = 0; kl = +∞ when p ∈ {0, 1} and q ≠ p. Each term is computed
    from the exact difference p − q with ``log1p`` where q/p (or (1 − q)/(1 − p)) is near 1,
    so that for p close to q the absolute rounding error is O(eps·|p − q|) rather than
    O(eps), and from log-differences where the ratio is small. Inputs outside [0, 1] are
    outside the domain. Elementwise, broadcasting.
    """
    q, p = jnp.broadcast_arrays(_f64(q), _f64(p))
    value = _x_log_x_over_y(q, p, q - p) + _x_log_x_over_y(1.0 - q, 1.0 - p, p - q)
    return jnp.maximum(value, 0.0)


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def kl_inverse_upper(q, c) -> jax.Array:
    """kl⁻¹₊(q, c) = max{p ∈ [q, 1] : kl(q‖p) ≤ c} (Langford–Seeger / Maurer inversion).

    Fixed 60-step bisection on the bracket [0, 1] with the monotone predicate
    "p ≤ q or kl(q‖p) ≤ c"; returns the bracket's *upper* end, so the result is ≥ the
    exact value and exceeds it by at most 2^-60 (one float64 ulp in practice).
    Exact cases: q = 0 → 1 − e^{−c}; q = 1 → 1; c ≤ 0 → q; c = ∞ → 1.
    q ∈ [0, 1], c ≥ 0; elementwise, broadcasting. Monotone non-decreasing in q and c.
    """
    q, c = jnp.broadcast_arrays(_f64(q), _f64(c))
    _, hi = _bisect_unit_interval(lambda p: (p <= q) | (kl_bernoulli(q, p) <= c), q.shape)
    out = jnp.where(q <= 0, -jnp.expm1(-c), hi)
    out = jnp.where(q >= 1, 1.0, out)
    return jnp.where(c <= 0, q, out)


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def kl_inverse_lower(q, c) -> jax.Array:
    """kl⁻¹₋(q, c) = min{p ∈ [0, q] : kl(q‖p) ≤ c}.

    Fixed 60-step bisection on [0, 1] with the monotone predicate "p < q and
    kl(q‖p) > c"; returns the bracket's *lower* end, so the result is ≤ the exact
    value, by at most 2^-60 (one float64 ulp in practice).
    Exact cases: q = 0 → 0; q = 1 → e^{−c}; c ≤ 0 → q; c = ∞ → 0.
    q ∈ [0, 1], c ≥ 0; elementwise, broadcasting. Non-increasing in c, non-decreasing in q.
    """
    q, c = jnp.broadcast_arrays(_f64(q), _f64(c))
    lo, _ = _bisect_unit_interval(lambda p: (p < q) & (kl_bernoulli(q, p) > c), q.shape)
    out = jnp.where(q <= 0, 0.0, lo)
    out = jnp.where(q >= 1, jnp.exp(-c), out)
    return jnp.where(c <= 0, q, out)


def gaussian_kl(mean_q, cov_q, mean_p, cov_p) -> jax.Array:
    """KL(N(m_q, Σ_q) ‖ N(m_p, Σ_p)) for full covariances.

    KL = ½[tr(Σ_p⁻¹Σ_q) + (m_p − m_q)ᵀΣ_p⁻¹(m_p − m_q) − d + log det Σ_p − log det Σ_q],
    computed with Cholesky factors L_p, L_q: tr(Σ_p⁻¹Σ_q) = ‖L_p⁻¹L_q‖²_F, the quadratic
    form is ‖L_p⁻¹(m_p − m_q)‖², log det Σ = 2 Σ log diag L.
    Shapes: means ``[d]``, covariances ``[d, d]`` (symmetric) → scalar; vmap for batches.
    If either covariance is not numerically positive definite (Cholesky fails), the KL
    is +∞ — the right value for a singular PSD covariance (e.g. Σ_OU = 0 when C_g = 0).
    """
    mean_q, cov_q, mean_p, cov_p = map(_f64, (mean_q, cov_q, mean_p, cov_p))
    d = mean_q.shape[-1]
    chol_q = jnp.linalg.cholesky(cov_q)
    chol_p = jnp.linalg.cholesky(cov_p)
    ratio = solve_triangular(chol_p, chol_q, lower=True)
    shift = solve_triangular(chol_p, mean_p - mean_q, lower=True)
    diag_q, diag_p = jnp.diagonal(chol_q), jnp.diagonal(chol_p)
    logdet_gap = 2.0 * (jnp.sum(jnp.log(diag_p)) - jnp.sum(jnp.log(diag_q)))
    value = 0.5 * (jnp.sum(ratio**2) + jnp.sum(shift**2) - d + logdet_gap)
    ok = (jnp.all(jnp.isfinite(chol_q)) & jnp.all(jnp.isfinite(chol_p))
          & jnp.all(diag_q > 0) & jnp.all(diag_p > 0))
    return jnp.where(ok, jnp.maximum(value, 0.0), jnp.inf)


def gaussian_kl_isotropic(mean_q, chol_q, mean_p, variance) -> jax.Array:
    """KL(N(m_q, Σ_q) ‖ N(m_p, σ²I)) for every prior variance σ² in ``variance`` at once.

    ``gaussian_kl`` with Σ_p = σ²I in closed form, from the lower Cholesky factor ``chol_q`` of
    Σ_q = L_q L_qᵀ: ½[‖L_q‖²_F/σ² + ‖m_p − m_q‖²/σ² − d + d log σ² − 2 Σ log diag L_q]
    (tr Σ_q = ‖L_q‖²_F). One factorisation serves the whole grid, and the caller's (the one its
    Monte Carlo draws use). Shapes: means ``[d]``, ``chol_q`` ``[d, d]``; ``variance`` any shape,
    the result has its shape. +∞ where the factor is not finite with a positive diagonal (Σ_q
    not numerically positive definite: ``jnp.linalg.cholesky`` returns NaN) or σ² ≤ 0.
    """
    mean_q, chol_q, mean_p, variance = map(_f64, (mean_q, chol_q, mean_p, variance))
    d = mean_q.shape[-1]
    diag_q = jnp.diagonal(chol_q)
    logdet_q = 2.0 * jnp.sum(jnp.log(diag_q))
    spread = jnp.sum(jnp.square(chol_q)) + jnp.sum(jnp.square(mean_p - mean_q))
    value = 0.5 * (spread / variance - d + d * jnp.log(variance) - logdet_q)
    ok = jnp.all(jnp.isfinite(chol_q)) & jnp.all(diag_q > 0) & (variance > 0)
    return jnp.where(ok, jnp.maximum(value, 0.0), jnp.inf)


# ---------------------------------------------------------------------------------------
# PAC-Bayes toolkit
# ---------------------------------------------------------------------------------------


def _maurer_confidence(kl, n, delta):
    """c = (KL + log(2√n/δ))/n, the right-hand side of Maurer's kl bound."""
    n = _f64(n)
    return (_f64(kl) + jnp.log(2.0 * jnp.sqrt(n) / _f64(delta))) / n


def mcallester_bound(emp, kl, n, delta) -> jax.Array:
    """Square-root PAC-Bayes bound (McAllester 1999 in Maurer's 2004 form), losses in [0, 1].

    With probability ≥ 1 − δ over n i.i.d. samples, for all posteriors Q simultaneously,
    E_Q L ≤ E_Q L̂ + √((KL(Q‖P) + log(2√n/δ))/(2n)). ``emp`` = E_Q L̂. It is Pinsker's
    relaxation of ``maurer_bound``; the same δ covers both sides (emp − the same root is
    the matching lower bound). Not clipped to 1. Elementwise.
    """
    return _f64(emp) + jnp.sqrt(_maurer_confidence(kl, n, delta) / 2.0)


def maurer_bound(emp, kl, n, delta):
    """Maurer (2004) / Langford–Seeger kl PAC-Bayes bound, losses in [0, 1]; returns (lower, upper).

    With probability ≥ 1 − δ, for all Q: kl(E_Q L̂ ‖ E_Q L) ≤ c = (KL + log(2√n/δ))/n
    (valid for all n ≥ 1: E e^{n kl(L̂‖L)} ≤ ξ(n) ≤ 2√n). Both ends come from this one
    event, so the interval is two-sided at δ:
    lower = ``kl_inverse_lower(emp, c)``, upper = ``kl_inverse_upper(emp, c)``. Elementwise.
    """
    c = _maurer_confidence(kl, n, delta)
    return kl_inverse_lower(emp, c), kl_inverse_upper(emp, c)


def _lambda_grid_powers() -> jax.Array:
    return 2.0 ** jnp.asarray(LAMBDA_GRID_EXPONENTS, _F64)


def default_lambda_grid(n_terms, width) -> jax.Array:
    """The fixed λ grid of the Hoeffding PAC-Bayes-λ bound: λ_j = (√(8 n_terms)/W)·2^j, j = −10..10.

    The minimiser over λ > 0 of (KL + L)/λ + λW²/(8 n_terms) is √(8 n_terms (KL + L))/W, so
    this grid covers KL + L ∈ [2^-20, 2^20] with a factor-2 step; at the worst grid point the
    bound exceeds its continuous optimum by the factor (√2 + 1/√2)/2 ≈ 1.061, and the union
    bound costs log 21 ≈ 3.04 added to KL. It depends only on n_terms and W, which must be
    fixed before the data it is applied to. Shape: ``broadcast(n_terms, width) + [21]``.
    """
    n_terms, width = _f64(n_terms), _f64(width)
    scale = jnp.sqrt(8.0 * n_terms) / width
    return scale[..., None] * _lambda_grid_powers()


def hoeffding_lambda_bound(kl, n_terms, width, delta, lambdas=None) -> jax.Array:
    """One-sided Hoeffding PAC-Bayes-λ bound with a union bound over a λ grid [E; Catoni 2007].

    For n_terms independent (not necessarily identically distributed) terms, each in an
    interval of width W, and X(w) = their mean minus its expectation: with probability
    ≥ 1 − δ, for all Q,
    E_Q X ≤ min_{λ∈Λ} [(KL(Q‖P) + log(|Λ|/δ))/λ + λW²/(8·n_terms)].
    (Hoeffding's lemma, Donsker–Varadhan, Markov at δ/|Λ| per grid point.) The other side
    is the same bound for −X at another δ. ``lambdas``: shape ``[G]`` (or broadcastable
    ``[..., G]``), fixed before the data; default ``default_lambda_grid(n_terms, W)``.
    W = 0 gives 0. Scalars broadcast; returns the broadcast shape without the grid axis.
    """
    kl, n_terms, width, delta = map(_f64, (kl, n_terms, width, delta))
    if lambdas is None:
        # On the default grid λ_j W/√(8 n_terms) = 2^j, so the bound is
        # W/√(8 n_terms) · min_j [(KL + log(21/δ)) 2^-j + 2^j]: no overflow for tiny W.
        powers = _lambda_grid_powers()
        confidence = kl + jnp.log(powers.size / delta)
        scaled = jnp.min(confidence[..., None] / powers + powers, axis=-1)
        return width / jnp.sqrt(8.0 * n_terms) * scaled
    lam = _f64(lambdas)
    confidence = kl + jnp.log(lam.shape[-1] / delta)
    values = confidence[..., None] / lam + lam * (width**2 / (8.0 * n_terms))[..., None]
    return jnp.where(width > 0, jnp.min(values, axis=-1), 0.0)


def occam_grid_size(radius, spacing) -> jax.Array:
    """Points per coordinate of the grid {−R + kε : k = 0, 1, …} ∩ [−R, R]: ⌊2R/ε⌋ + 1.

    ⌊·⌋ is taken with a relative slack of 1e-9, so an exact-integer 2R/ε that rounds down
    in float64 is still counted; the slack can only overcount, which keeps the Occam KL
    conservative. Returned as an integer-valued float64. Elementwise.
    """
    ratio = 2.0 * _f64(radius) / _f64(spacing)
    return jnp.floor(ratio * (1.0 + _GRID_COUNT_SLACK)) + 1.0


def occam_log_cardinality(d, radius, spacing) -> jax.Array:
    """KL of a point mass under the uniform prior on Θ_ε [B, special case 1]: log|Θ_ε| = d·log m.

    m = ``occam_grid_size(R, ε)`` = ⌊2R/ε⌋ + 1 exactly (the usual d·log(2R/ε + 1) when
    2R/ε is an integer, smaller otherwise). Elementwise.
    """
    return _f64(d) * jnp.log(occam_grid_size(radius, spacing))


def occam_quantize(w, radius, spacing) -> jax.Array:
    """Nearest point of Θ_ε = {−R + kε}^d ∩ [−R, R]^d to w (coordinatewise, clipped to the box).

    k_i = clip(round((w_i + R)/ε), 0, m − 1), w_q,i = −R + k_i ε, m = ``occam_grid_size``.
    Shape: w ``[..., d]`` → same. The grid is a product, so the coordinatewise nearest point
    is the Euclidean nearest point.
    """
    w, radius, spacing = _f64(w), _f64(radius), _f64(spacing)
    m = occam_grid_size(radius, spacing)
    k = jnp.clip(jnp.round((w + radius) / spacing), 0.0, m - 1.0)
    return -radius + k * spacing
