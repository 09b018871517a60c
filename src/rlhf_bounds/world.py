"""The simulated world of one problem (docs/theory.md §13, §15).

A problem is its true reward θ*, its behaviour policy μ and its feature law;
prompts are drawn from the feature law as feature matrices Φ(x) ∈ R^{A×d}
together with a misspecification residual ξ(x) ∈ [−1, 1]^A. All draws are
float32 and depend only on the key they are given, so a problem's data are the
same however problems are batched, chunked or sharded. The bulk draws (features
and residuals of every prompt: about 400,000 numbers per W1 problem) come from
:mod:`rlhf_bounds.counter_rng`, a counter-based generator about twice as fast as
threefry on CPU, with its statistical tests in tests/test_counter_rng.py; keys
and the few world constants come from ``jax.random``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import counter_rng
from .policy import inverse_cdf, log_probs
from .spec import Spec

__all__ = ["World", "Prompts", "draw_world", "draw_prompts", "true_reward", "behaviour_log_probs",
           "anisotropic_scales", "project_to_ball"]

F32 = jnp.float32


class World(NamedTuple):
    """The per-problem constants: θ* ``[d]``, w_μ ``[d]``, w_ref ``[d]`` and the lowrank basis ``[d, k]``."""

    theta_star: jax.Array
    w_mu: jax.Array
    w_ref: jax.Array
    basis: jax.Array


class Prompts(NamedTuple):
    """A batch of prompts: features Φ ``[m, A, d]`` and residuals ξ ``[m, A]``."""

    phi: jax.Array
    xi: jax.Array


def project_to_ball(x: jax.Array, radius) -> jax.Array:
    """Rows of ``x`` scaled by min(1, radius/‖row‖): the Euclidean projection onto the ball."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30))


def _unit_rows(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def anisotropic_scales(d: int, condition) -> jax.Array:
    """Per-coordinate standard deviations of Σ_φ = diag(s²) with condition number ``condition``.

    Eigenvalues s_j² = κ^{−j/(d−1)} (j = 0..d−1), normalised so that tr Σ_φ = 1
    (the caller scales by C). With d = 1 the single scale is 1.
    """
    j = jnp.arange(d, dtype=F32)
    expo = j / max(d - 1, 1)
    var = jnp.asarray(condition, F32) ** (-expo)
    return jnp.sqrt(var / jnp.sum(var))


def draw_world(spec: Spec, key: jax.Array) -> World:
    """θ* = D·u with u uniform on the unit sphere; w_μ = w_ref + s·θ*/β + noise; w_ref = 0."""
    k_theta, k_noise, k_basis = jax.random.split(key, 3)
    d = spec.d
    theta = spec.reward_norm * _unit_rows(jax.random.normal(k_theta, (d,), F32))
    w_ref = jnp.zeros((d,), F32)
    w_mu = w_ref + spec.shift * theta / spec.beta + spec.mu_noise * jax.random.normal(k_noise, (d,), F32)
    if spec.feature_law == "lowrank":
        basis, _ = jnp.linalg.qr(jax.random.normal(k_basis, (d, spec.rank), F32))
    else:
        basis = jnp.zeros((d, 0), F32)
    return World(theta.astype(F32), w_mu.astype(F32), w_ref, basis.astype(F32))


def draw_features(spec: Spec, world: World, key: jax.Array, m: int) -> jax.Array:
    """Φ for ``m`` prompts from the spec's feature law, every row with ‖φ‖ ≤ C. Shape ``[m, A, d]``."""
    A, d, C = spec.actions, spec.d, spec.feature_bound
    law = spec.feature_law
    if law == "sphere":
        return C * _unit_rows(counter_rng.normal(key, (m, A, d), F32))
    if law == "gaussian":
        g = counter_rng.normal(key, (m, A, d), F32) * (C / jnp.sqrt(jnp.asarray(d, F32)))
        return project_to_ball(g, C)
    if law == "anisotropic":
        g = counter_rng.normal(key, (m, A, d), F32) * (C * anisotropic_scales(d, spec.condition))
        return project_to_ball(g, C)
    if law == "lowrank":
        g = counter_rng.normal(key, (m, A, world.basis.shape[1]), F32)
        return C * _unit_rows(g) @ world.basis.T
    if law == "shared":
        k_common, k_own = jax.random.split(key)
        common = counter_rng.normal(k_common, (m, 1, d), F32)
        own = counter_rng.normal(k_own, (m, A, d), F32)
        rho = spec.shared_weight
        g = (jnp.sqrt(rho) * common + jnp.sqrt(1.0 - rho) * own) * (C / jnp.sqrt(jnp.asarray(d, F32)))
        return project_to_ball(g, C)
    raise ValueError(f"unknown feature law {law!r}")


def draw_prompts(spec: Spec, world: World, key: jax.Array, m: int) -> Prompts:
    """``m`` i.i.d. prompts: features from the law and residuals ξ ~ Uniform[−1, 1]^A."""
    k_phi, k_xi = jax.random.split(key)
    phi = draw_features(spec, world, k_phi, m)
    xi = counter_rng.uniform(k_xi, (m, spec.actions), F32, minval=-1.0, maxval=1.0)
    return Prompts(phi, xi)


def true_reward(spec: Spec, world: World, prompts: Prompts) -> jax.Array:
    """r*(x, a) = ⟨θ*, φ(x, a)⟩ + σ_ξ ξ(x, a). Shape ``[m, A]``."""
    return prompts.phi @ world.theta_star + spec.sigma_xi * prompts.xi


def behaviour_log_probs(spec: Spec, world: World, phi: jax.Array) -> jax.Array:
    """log μ(a|x) for μ = (1 − ε)·π_{w_μ} + ε·uniform, computed in log space. ``phi`` ``[A, d]`` → ``[A]``."""
    A = phi.shape[-2]
    lp = log_probs(world.w_mu, phi)
    eps = jnp.asarray(spec.mix_eps, F32)
    # log((1−ε)e^{lp} + ε/A) by logaddexp; log(0) = -inf is fine inside logaddexp.
    return jnp.logaddexp(jnp.log1p(-eps) + lp, jnp.log(eps) - jnp.log(jnp.asarray(A, F32)))


def sample_behaviour(spec: Spec, world: World, phi: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF draws from μ(·|x) at uniforms ``u`` ``[K]`` → int32 ``[K]``."""
    return inverse_cdf(jnp.exp(behaviour_log_probs(spec, world, phi)), u)


__all__ += ["draw_features", "sample_behaviour"]
