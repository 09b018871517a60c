"""Further valid forms of B1's sampling term: the rungs of the tightness ladder (docs/theory.md §18).

Each is a bound on the same sampling error Ĵ(w) − EĴ(w) of a fixed policy w at the same δ split as
B1 (δ/2 over the prompts, δ/2 over the rollouts given the prompts, each two-sided), and each splits
into the same two levels:

    Ĵ − EĴ = [h̄_S − E_x h_w]  +  [Ĵ − h̄_S],      h̄_S = (1/n) Σ_i h_w(x_i),
              (prompt level)     (rollout level)   h_w(x) = E_{a∼π_w}[r̂ − βℓ^τ](x) ∈ [lo, lo + W].

* ``hoeffding_sampling_terms``: the paper's form [B, Thm 1], W√(log(4/δ)/2n) and W√(log(4/δ)/2nK);
* ``kl_sampling_bound``: the Chernoff–Hoeffding (kl) form at both levels [Hoeffding 1963, Thm 1];
* ``empirical_bernstein_prompt``: Maurer & Pontil (2009, Thm 4) on the prompt level;
* ``bernstein_rollout``: Bernstein's inequality with the exact conditional variances, rollout level;
* ``bernstein_sampling_bound``: the last two together.

All are pure float64 functions, elementwise over their scalar arguments, ``jit``- and ``vmap``-safe.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._divergences import kl_inverse_lower, kl_inverse_upper
from ._numerics import _f64

__all__ = ["SamplingRungs", "kl_deviation", "hoeffding_sampling_terms", "kl_sampling_bound",
           "empirical_bernstein_prompt", "bernstein_rollout", "bernstein_sampling_bound"]


class SamplingRungs(NamedTuple):
    """A bound on the sampling error by level: prompt, rollout, and their sum."""

    prompt: jax.Array
    rollout: jax.Array
    total: jax.Array


def _rungs(prompt, rollout) -> SamplingRungs:
    prompt, rollout = jnp.broadcast_arrays(prompt, rollout)
    return SamplingRungs(prompt, rollout, prompt + rollout)


def kl_deviation(q, c) -> jax.Array:
    """max(q − kl⁻¹₋(q, c), kl⁻¹₊(q, c) − q): the largest |p − q| over {p ∈ [0, 1] : kl(q‖p) ≤ c}.

    The half-width of the kl confidence interval around an empirical mean q ∈ [0, 1] (clipped there);
    conservative, since both inversions return the conservative end of their bracket. Elementwise.
    """
    q = jnp.clip(_f64(q), 0.0, 1.0)
    c = _f64(c)
    return jnp.maximum(q - kl_inverse_lower(q, c), kl_inverse_upper(q, c) - q)


def hoeffding_sampling_terms(n, K, width, delta) -> SamplingRungs:
    """B1's sampling term by level [B, Thm 1]: prompt W√(log(4/δ)/2n), rollout W√(log(4/δ)/2nK).

    Two-sided Hoeffding at δ/2 per level; ``total`` = W·``sampling_alpha(n, K, δ)``. Elementwise.
    """
    n, K, width, delta = map(_f64, (n, K, width, delta))
    log_term = jnp.log(4.0 / delta)
    return _rungs(width * jnp.sqrt(log_term / (2.0 * n)), width * jnp.sqrt(log_term / (2.0 * n * K)))


def kl_sampling_bound(prompt_mean, sample_mean, n, K, lo, width, delta) -> SamplingRungs:
    """The kl (Chernoff–Hoeffding) form of B1's sampling term. W.p. ≥ 1 − δ, |Ĵ − EĴ| ≤ ``total``.

    For N independent variables in [0, 1] with mean of means p and empirical mean p̂, Hoeffding
    (1963, Thm 1; the variables need not be identically distributed) gives, per side,
    P(p̂ − p ≥ t) ≤ e^{−N kl(p + t‖p)} and P(p − p̂ ≥ t) ≤ e^{−N kl(p − t‖p)}, so
    P(kl(p̂‖p) > ε) ≤ 2e^{−Nε} and p ∈ [kl⁻¹₋(p̂, ε), kl⁻¹₊(p̂, ε)] w.p. ≥ 1 − 2e^{−Nε}.

    * prompt level, δ/2: N = n i.i.d. Z_i = (h_w(x_i) − lo)/W, p̂ = (``prompt_mean`` − lo)/W with
      ``prompt_mean`` = h̄_S, ε = log(4/δ)/n; prompt = W·``kl_deviation``(p̂, ε);
    * rollout level, δ/2, given the prompts: N = nK independent (g_ik − lo)/W with mean of means
      (h̄_S − lo)/W, p̂ = (``sample_mean`` − lo)/W with ``sample_mean`` = Ĵ, ε = log(4/δ)/(nK).

    Never larger than the Hoeffding form (Pinsker: kl(p̂‖p) ≥ 2(p − p̂)²). W = ∞ gives ∞, W = 0 gives 0.
    """
    prompt_mean, sample_mean, n, K, lo, width, delta = map(
        _f64, (prompt_mean, sample_mean, n, K, lo, width, delta))
    usable = (width >= jnp.finfo(jnp.float64).tiny) & jnp.isfinite(width)
    safe = jnp.where(usable, width, 1.0)
    log_term = jnp.log(4.0 / delta)

    def level(mean, count):
        dev = kl_deviation((mean - jnp.where(usable, lo, mean)) / safe, log_term / count)
        return jnp.where(usable, width * dev, jnp.where(jnp.isinf(width), jnp.inf, 0.0))

    return _rungs(level(prompt_mean, n), level(sample_mean, n * K))


def empirical_bernstein_prompt(prompt_variance, n, width, delta) -> jax.Array:
    """Maurer & Pontil (2009, Thm 4) on the prompt level, two-sided at δ/2 (δ/4 per side):

    |h̄_S − E_x h_w| ≤ √(2 V_n L / n) + 7 W L / (3(n − 1)),   L = log(2/(δ/4)) = log(8/δ),

    with V_n = (1/(n − 1)) Σ_i (h_w(x_i) − h̄_S)² the unbiased sample variance of the per-prompt values
    (``prompt_variance``, in the units of h; the theorem on Z_i = (h_w(x_i) − lo)/W ∈ [0, 1] rescaled
    by W). Needs n ≥ 2 (n = 1 gives ∞). Elementwise.
    """
    v, n, width, delta = map(_f64, (prompt_variance, n, width, delta))
    log_term = jnp.log(8.0 / delta)
    safe_n1 = jnp.maximum(n - 1.0, 1.0)
    bound = jnp.sqrt(2.0 * jnp.maximum(v, 0.0) * log_term / n) + 7.0 * width * log_term / (3.0 * safe_n1)
    return jnp.where(n >= 2.0, bound, jnp.inf)


def bernstein_rollout(conditional_variance, n, K, width, delta) -> jax.Array:
    """Bernstein's inequality on the rollout level with the exact conditional variances, δ/2 (δ/4 per side).

    Given the prompts the N = nK terms g_ik are independent, |g_ik − h_w(x_i)| ≤ W, with variances
    σ²_i = Var_{a∼π_w(·|x_i)}[r̂ − βℓ^τ] (functions of the prompts only); σ̄² = (1/n)Σ_i σ²_i
    (``conditional_variance``). Bernstein: P(Ĵ − h̄_S ≥ t) ≤ exp(−N t² / (2σ̄² + 2Wt/3)); solving
    N t² = L(2σ̄² + 2Wt/3) for t, per side at L = log(4/δ):

    |Ĵ − h̄_S| ≤ t = W L/(3N) + √((W L/(3N))² + 2σ̄² L/N)   (≤ √(2σ̄² L/N) + 2W L/(3N)).  Elementwise.
    """
    v, n, K, width, delta = map(_f64, (conditional_variance, n, K, width, delta))
    count = n * K
    log_term = jnp.log(4.0 / delta)
    a = width * log_term / (3.0 * count)
    return a + jnp.sqrt(a * a + 2.0 * jnp.maximum(v, 0.0) * log_term / count)


def bernstein_sampling_bound(prompt_variance, conditional_variance, n, K, width, delta) -> SamplingRungs:
    """The Bernstein forms of B1's sampling term: ``empirical_bernstein_prompt`` (δ/2) on the prompt level
    plus ``bernstein_rollout`` (δ/2) on the rollout level. W.p. ≥ 1 − δ, |Ĵ − EĴ| ≤ ``total``."""
    return _rungs(empirical_bernstein_prompt(prompt_variance, n, width, delta),
                  bernstein_rollout(conditional_variance, n, K, width, delta))
