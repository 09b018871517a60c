"""Coverage: Clopper–Pearson intervals for a violation rate (docs/theory.md §11).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

from ._numerics import _bisect_unit_interval, _f64


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def clopper_pearson_upper(k, n, alpha=0.05) -> jax.Array:
    """One-sided (1 − α) upper confidence bound on a binomial rate from k successes in n trials.

    p_U = Beta⁻¹(1 − α; k + 1, n − k), i.e. the p solving P(Bin(n, p) ≤ k) = α, found by
    60-step bisection on I_p(k + 1, n − k) ≤ 1 − α (``jax.scipy.special.betainc``),
    returning the bracket's upper end. k = n → 1. Elementwise; k, n integer-valued.
    """
    k, n, alpha = jnp.broadcast_arrays(_f64(k), _f64(n), _f64(alpha))
    full = k >= n
    b = jnp.where(full, 1.0, n - k)
    _, hi = _bisect_unit_interval(lambda p: betainc(k + 1.0, b, p) <= 1.0 - alpha, k.shape)
    return jnp.where(full, 1.0, hi)


@jax.jit  # the bisection closes over its inputs: without jit every eager call recompiles
def clopper_pearson_lower(k, n, alpha=0.05) -> jax.Array:
    """One-sided (1 − α) lower confidence bound: p_L = Beta⁻¹(α; k, n − k + 1).

    p_L solves P(Bin(n, p) ≥ k) = I_p(k, n − k + 1) = α; 60-step bisection returning the
    bracket's lower end. k = 0 → 0. Use it to refute a bound: p_L > δ. Elementwise.
    """
    k, n, alpha = jnp.broadcast_arrays(_f64(k), _f64(n), _f64(alpha))
    empty = k <= 0
    a = jnp.where(empty, 1.0, k)
    lo, _ = _bisect_unit_interval(lambda p: betainc(a, n - k + 1.0, p) < alpha, k.shape)
    return jnp.where(empty, 0.0, lo)


def clopper_pearson_interval(k, n, alpha=0.05):
    """Two-sided (1 − α) Clopper–Pearson interval: (lower at α/2, upper at α/2). Elementwise."""
    alpha = _f64(alpha)
    return clopper_pearson_lower(k, n, alpha / 2.0), clopper_pearson_upper(k, n, alpha / 2.0)
