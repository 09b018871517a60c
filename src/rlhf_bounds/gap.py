"""The generalisation gap and its oracle decomposition (docs/theory.md §14, §1).

For a policy w, with the empirical objective on n prompts and K rollouts
    Ĵ(w) = (1/nK) Σ_{i,k} [r̂(x_i, Y_ik(w)) − β ℓ^τ_w(x_i, Y_ik(w))]
and the deployment objective J*(w) = E_x E_{a∼π_w}[r*(x, a) − β ℓ_w(x, a)],
    G(w) = Ĵ(w) − J*(w) = [Ĵ − EĴ] + E_{D_w}[r̂ − r*] + β E_{D_w}[ℓ − ℓ^τ]
           (sampling)     (reward shift)       (clipping)
The population expectations are means over an evaluation set of M prompts,
exact over responses, so the identity holds to float round-off; their
standard errors over prompts are reported beside them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import bounds
from .policy import inverse_cdf, log_probs, response_objective

__all__ = ["QUANTILE_LEVELS", "EvalSet", "PromptStats", "prompt_stats", "population_means", "population",
           "sample_objective", "weighted_quantiles", "decompose"]

#: Levels at which the law of |ℓ_w| under D_w is summarised (columns ``abs_log_ratio_qXX``).
QUANTILE_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


class EvalSet(NamedTuple):
    """The evaluation prompts: Φ ``[M, A, d]``, r̂ and r* ``[M, A]``, log μ ``[M, A]``."""

    phi: jax.Array
    r_hat: jax.Array
    r_star: jax.Array
    log_mu: jax.Array


class PromptStats(NamedTuple):
    """Exact per-prompt quantities of a policy w (each ``[m]`` for m prompts unless stated)."""

    j_hat_mean: jax.Array   # Σ_a π_w (r̂ − βℓ^τ): E over rollouts of one prompt's Ĵ term
    j_star: jax.Array       # Σ_a π_w (r* − βℓ)
    reward_shift: jax.Array  # Σ_a π_w (r̂ − r*)
    clipping: jax.Array     # β Σ_a π_w (ℓ − ℓ^τ)
    tail_excess: jax.Array  # Σ_a π_w (|ℓ| − τ)_+
    kl: jax.Array           # Σ_a π_w ℓ
    chi2: jax.Array         # Σ_a π_w² / μ − 1
    l2_train: jax.Array     # Σ_a μ (r̂ − r*)²
    abs_log_ratio: jax.Array  # |ℓ_w(x, a)|, ``[m, A]``
    prob: jax.Array           # π_w(a|x), ``[m, A]``
    log1p_chi2: jax.Array     # log(1 + χ²) = logsumexp_a(2 log π_w − log μ): finite where χ² overflows


def _one_prompt(w, w_ref, phi, r_hat, r_star, log_mu, beta, tau):
    lp = log_probs(w, phi)
    p = jnp.exp(lp)
    ell = lp - log_probs(w_ref, phi)
    ell_tau = jnp.clip(ell, -tau, tau)
    abs_ell = jnp.abs(ell)
    diff = r_hat - r_star
    return PromptStats(
        j_hat_mean=jnp.sum(p * response_objective(r_hat, ell, beta, tau)),
        j_star=jnp.sum(p * (r_star - beta * ell)),
        reward_shift=jnp.sum(p * diff),
        clipping=beta * jnp.sum(p * (ell - ell_tau)),
        tail_excess=jnp.sum(p * jnp.maximum(abs_ell - tau, 0.0)),
        kl=jnp.sum(p * ell),
        # π²/μ in log space: μ may be tiny where π is not.
        chi2=jnp.sum(jnp.exp(2.0 * lp - log_mu)) - 1.0,
        l2_train=jnp.sum(jnp.exp(log_mu) * diff * diff),
        abs_log_ratio=abs_ell,
        prob=p,
        log1p_chi2=jax.nn.logsumexp(2.0 * lp - log_mu),
    )


def prompt_stats(w, w_ref, evalset: EvalSet, beta, tau) -> PromptStats:
    """:class:`PromptStats` of the policy w on every prompt of ``evalset`` (m prompts)."""
    return jax.vmap(_one_prompt, in_axes=(None, None, 0, 0, 0, 0, None, None))(w, w_ref, *evalset, beta, tau)


def weighted_quantiles(values: jax.Array, weights: jax.Array, levels) -> jax.Array:
    """Quantiles of the discrete law Σ weights·δ_values: the smallest v with P(V ≤ v) ≥ level.

    ``values`` and ``weights`` are flattened; weights are normalised to sum 1. Computed by
    :func:`rlhf_bounds.bounds.tail_threshold` (exact radix select, no sort; all levels share its
    passes over the atoms), returned in ``values``' dtype: float32 atoms come back bit for bit,
    never through a float64 round trip (XLA's CPU backend would flush a subnormal to 0).
    """
    levels = jnp.asarray(levels, jnp.float64)
    atoms = bounds.tail_threshold(values, weights, 1.0 - levels, keep_dtype=True)
    return atoms.astype(jnp.result_type(values))


#: Population names of the per-prompt values that average over prompts.
_MEANS = {"j_hat_mean": "J_hat_mean", "j_star": "J_star", "reward_shift": "reward_shift", "clipping": "clipping",
          "tail_excess": "tail_excess", "kl": "kl", "chi2": "chi2", "l2_train": "l2_train"}


def population_means(stats: PromptStats) -> dict[str, jax.Array]:
    """The population values of a policy: means over the evaluation prompts of its per-prompt values
    (``J_hat_mean``, ``J_star``, ``reward_shift``, ``clipping``, ``tail_excess``, ``kl``, ``chi2``,
    ``l2_train``). The one place population means are taken."""
    return {name: jnp.mean(getattr(stats, field)) for field, name in _MEANS.items()}


def population(stats: PromptStats) -> dict[str, jax.Array]:
    """:func:`population_means` with their standard errors over prompts, log(1 + χ²) and the
    quantiles of |ℓ_w| under D_w."""
    m = stats.j_star.shape[0]
    se = lambda x: jnp.std(x) / jnp.sqrt(jnp.asarray(m, x.dtype))
    out = population_means(stats)
    out.update(
        J_hat_mean_se=se(stats.j_hat_mean),
        J_star_se=se(stats.j_star),
        # log(1 + χ²(D_w‖D_train)) = log mean_x (1 + χ²_x), in log space (χ² overflows when μ ≈ 0).
        log1p_chi2=jax.nn.logsumexp(stats.log1p_chi2) - jnp.log(jnp.asarray(m, stats.log1p_chi2.dtype)),
    )
    q = weighted_quantiles(stats.abs_log_ratio, stats.prob, QUANTILE_LEVELS)
    for level, value in zip(QUANTILE_LEVELS, q):
        out[f"abs_log_ratio_q{_level_name(level)}"] = value
    return out


def _level_name(level: float) -> str:
    """0.5 → '50', 0.999 → '99_9' (percent, with '_' for the decimal point)."""
    return f"{100 * level:g}".replace(".", "_")


def sample_objective(w, w_ref, phi, r_hat, u, beta, tau) -> tuple[jax.Array, jax.Array]:
    """Ĵ(w) on a sample of prompts ``phi`` ``[n, A, d]`` with rollout uniforms ``u`` ``[n, K]``.

    Returns (Ĵ, (1/n) Σ_i E_{a∼π_w}[r̂ − βℓ^τ](x_i)): the second is Ĵ's
    expectation over the rollouts given the prompts, which splits the sampling
    error into its prompt part and its rollout part.
    """
    def one(phi_i, r_i, u_i):
        lp = log_probs(w, phi_i)
        p = jnp.exp(lp)
        h = response_objective(r_i, lp - log_probs(w_ref, phi_i), beta, tau)
        y = inverse_cdf(p, u_i)
        return jnp.mean(h[y]), jnp.sum(p * h)

    rollout_means, exact_means = jax.vmap(one)(phi, r_hat, u)
    return jnp.mean(rollout_means), jnp.mean(exact_means)


def decompose(j_hat: jax.Array, j_hat_prompts: jax.Array, pop: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The gap G = Ĵ − J* and its three terms (plus the two parts of the sampling term)."""
    return {
        "J_hat": j_hat,
        "J_star": pop["J_star"],
        "gap_total": j_hat - pop["J_star"],
        "gap_sampling": j_hat - pop["J_hat_mean"],
        "gap_sampling_prompt": j_hat_prompts - pop["J_hat_mean"],
        "gap_sampling_rollout": j_hat - j_hat_prompts,
        "gap_reward_shift": pop["reward_shift"],
        "gap_clipping": pop["clipping"],
    }
