"""Log-linear policy maths for one prompt (docs/theory.md §14).

Every function here works on a single prompt: ``phi`` is the prompt's feature
matrix Φ(x) of shape ``[A, d]`` (one row per candidate response) and ``w`` a
weight vector of shape ``[d]``. Batch over prompts and problems with
``jax.vmap`` at the call site.

The policy is π_w(a|x) = softmax_a ⟨w, φ(x, a)⟩ and the log-ratio against the
reference policy is ℓ_w(x, a) = log π_w(a|x) − log π_ref(a|x). Everything is
computed from logits with ``logsumexp`` so that large logits (tiny β, large
‖θ*‖·C) do not overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "logits",
    "log_probs",
    "probs",
    "log_ratio",
    "kl",
    "clipped_log_ratio",
    "response_objective",
    "clipped_log_ratio_mean",
    "clip_tail_excess",
    "objective",
    "feature_covariance",
    "objective_gradient_linear",
    "inverse_cdf",
    "sample_actions",
    "chi2_to",
]


def logits(w: jax.Array, phi: jax.Array) -> jax.Array:
    """z_a = ⟨w, φ(x, a)⟩. Shapes: w ``[d]``, phi ``[A, d]`` → ``[A]``."""
    return phi @ w


def log_probs(w: jax.Array, phi: jax.Array) -> jax.Array:
    """log π_w(a|x) = z_a − logsumexp(z) for every response a. Returns ``[A]``."""
    z = logits(w, phi)
    return z - jax.nn.logsumexp(z)


def probs(w: jax.Array, phi: jax.Array) -> jax.Array:
    """π_w(·|x) = softmax(Φ(x) w). Returns ``[A]``."""
    return jax.nn.softmax(logits(w, phi))


def log_ratio(w: jax.Array, w_ref: jax.Array, phi: jax.Array) -> jax.Array:
    """ℓ_w(x, a) = log π_w(a|x) − log π_ref(a|x), π_ref = π_{w_ref}. Returns ``[A]``."""
    return log_probs(w, phi) - log_probs(w_ref, phi)


def clipped_log_ratio(w: jax.Array, w_ref: jax.Array, phi: jax.Array, tau) -> jax.Array:
    """ℓ^τ_w(x, a) = clip(ℓ_w(x, a), −τ, τ). τ = ∞ leaves ℓ unchanged. Returns ``[A]``."""
    return jnp.clip(log_ratio(w, w_ref, phi), -tau, tau)


def response_objective(reward: jax.Array, log_ratio: jax.Array, beta, tau) -> jax.Array:
    """h(x, a) = r(x, a) − β·clip(ℓ(x, a), −τ, τ): the per-response objective that RLHF maximises.

    The one place this expression is written: the training objective F_S, the empirical objective
    Ĵ, the gradient estimators and the variance terms of B4 are all expectations of it. τ = ∞
    gives the exact KL penalty (clip is then the identity). Any shape; ``reward`` and
    ``log_ratio`` broadcast.
    """
    return reward - beta * jnp.clip(log_ratio, -tau, tau)


def kl(w: jax.Array, w_ref: jax.Array, phi: jax.Array) -> jax.Array:
    """KL(π_w(·|x) ‖ π_ref(·|x)) = Σ_a π_w(a|x) ℓ_w(x, a). Scalar."""
    lp = log_probs(w, phi)
    return jnp.sum(jnp.exp(lp) * (lp - log_probs(w_ref, phi)))


def clipped_log_ratio_mean(w: jax.Array, w_ref: jax.Array, phi: jax.Array, tau) -> jax.Array:
    """E_{a∼π_w}[clip(ℓ_w(x, a), −τ, τ)]. With τ = ∞ this is the KL. Scalar."""
    lp = log_probs(w, phi)
    return jnp.sum(jnp.exp(lp) * jnp.clip(lp - log_probs(w_ref, phi), -tau, tau))


def clip_tail_excess(w: jax.Array, w_ref: jax.Array, phi: jax.Array, tau) -> jax.Array:
    """E_{a∼π_w}(|ℓ_w(x, a)| − τ)_+ = E|ℓ − ℓ^τ|, the per-prompt clipping tail. Scalar."""
    lp = log_probs(w, phi)
    excess = jnp.maximum(jnp.abs(lp - log_probs(w_ref, phi)) - tau, 0.0)
    return jnp.sum(jnp.exp(lp) * excess)


def objective(w: jax.Array, w_ref: jax.Array, phi: jax.Array, reward: jax.Array, beta) -> jax.Array:
    """f_w(x; r, β) = Σ_a π_w(a|x) r(x, a) − β·KL(π_w(·|x) ‖ π_ref(·|x)).

    ``reward`` has shape ``[A]`` (the reward of every response of this prompt).
    """
    lp = log_probs(w, phi)
    p = jnp.exp(lp)
    return jnp.sum(p * (reward - beta * (lp - log_probs(w_ref, phi))))


def feature_covariance(w: jax.Array, phi: jax.Array) -> jax.Array:
    """V_x(w) = Cov_{a∼π_w}[φ(x, a)], shape ``[d, d]``."""
    p = probs(w, phi)
    mean = p @ phi
    centred = phi - mean
    return (centred * p[:, None]).T @ centred


def objective_gradient_linear(w, w_ref, phi, theta, beta) -> jax.Array:
    """∇_w f_w(x; ⟨θ, φ⟩, β) = V_x(w)(θ − β(w − w_ref))  ([A] Lemma 11, rescaled).

    Closed form of the gradient of :func:`objective` for a linear reward; the
    tests check it against autodiff.
    """
    return feature_covariance(w, phi) @ (theta - beta * (w - w_ref))


def inverse_cdf(p: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF draws from a discrete law ``p`` ``[A]`` at uniforms ``u`` ``[K]``.

    Y = min{a : Σ_{a'≤a} p(a') > u}, responses ordered by index. Returns int32 ``[K]``.
    """
    cdf = jnp.cumsum(p)
    # Count the CDF values ≤ u. When cdf[-1] < 1 by round-off, a u above it is sent
    # to the last response with positive mass (never to one with π = 0).
    idx = jnp.sum(cdf[None, :] <= u[:, None], axis=-1)
    last = p.shape[0] - 1 - jnp.argmax(p[::-1] > 0)
    return jnp.minimum(idx, last).astype(jnp.int32)


def sample_actions(w: jax.Array, phi: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF draws from π_w(·|x) at uniforms ``u`` of shape ``[K]``.

    With ``u`` fixed this is a deterministic function of w (common random
    numbers, docs/theory.md §2), and an exact draw from π_w when u ~ U(0, 1).
    Returns int32 indices of shape ``[K]``.
    """
    return inverse_cdf(probs(w, phi), u)


def chi2_to(w: jax.Array, phi: jax.Array, mu: jax.Array) -> jax.Array:
    """χ²(π_w(·|x) ‖ μ(·|x)) = Σ_a π_w(a|x)² / μ(a|x) − 1 for a behaviour law ``mu`` ``[A]``."""
    p = probs(w, phi)
    return jnp.sum(p * p / mu) - 1.0
