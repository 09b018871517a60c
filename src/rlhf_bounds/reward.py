"""The reward model: Bradley-Terry preference data and its ridge MLE (docs/theory.md §15, §16).

Preference pair j is (x'_j, a_j, a'_j, z_j) with a_j, a'_j i.i.d. from μ(·|x'_j)
and z_j ~ Bernoulli(σ(r*(x'_j, a_j) − r*(x'_j, a'_j))). The reward model is
linear, r̂ = ⟨θ̂, φ⟩, with θ̂ the minimiser of the convex ridge-regularised
logistic loss on the differences u_j = φ(x'_j, a_j) − φ(x'_j, a'_j).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .spec import Spec
from .world import Prompts, World, draw_prompts, sample_behaviour, true_reward

__all__ = ["Preferences", "RewardFit", "draw_preferences", "bt_loss", "fit_bradley_terry"]

F32 = jnp.float32


class Preferences(NamedTuple):
    """Preference data: differences u ``[N, d]``, labels z ``[N]`` (1: a preferred), prompts used."""

    u: jax.Array
    z: jax.Array
    prompts: Prompts


class RewardFit(NamedTuple):
    """θ̂ ``[d]`` and the norm of the loss gradient at θ̂ (convergence check)."""

    theta: jax.Array
    grad_norm: jax.Array


def draw_preferences(spec: Spec, world: World, key: jax.Array) -> Preferences:
    """N_pref Bradley-Terry pairs on fresh prompts, responses from μ."""
    k_prompts, k_actions, k_label = jax.random.split(key, 3)
    n = spec.pref_pairs
    prompts = draw_prompts(spec, world, k_prompts, n)
    u01 = jax.random.uniform(k_actions, (n, 2), F32)
    actions = jax.vmap(lambda phi, u: sample_behaviour(spec, world, phi, u))(prompts.phi, u01)
    rows = jnp.arange(n)
    r = true_reward(spec, world, prompts)
    a, b = actions[:, 0], actions[:, 1]
    diff = prompts.phi[rows, a] - prompts.phi[rows, b]
    margin = r[rows, a] - r[rows, b]
    z = (jax.random.uniform(k_label, (n,), F32) < jax.nn.sigmoid(margin)).astype(F32)
    return Preferences(diff, z, prompts)


def bt_loss(theta: jax.Array, u: jax.Array, z: jax.Array, ridge) -> jax.Array:
    """Σ_j [−z_j log σ(⟨θ, u_j⟩) − (1 − z_j) log σ(−⟨θ, u_j⟩)] + (λ/2)‖θ‖²."""
    s = u @ theta
    return jnp.sum(jax.nn.softplus(s) - z * s) + 0.5 * ridge * jnp.sum(theta * theta)


def fit_bradley_terry(u: jax.Array, z: jax.Array, ridge, steps: int) -> RewardFit:
    """Ridge Bradley-Terry MLE by ``steps`` Newton iterations from θ = 0.

    Gradient Σ_j (σ(s_j) − z_j) u_j + λθ, Hessian Σ_j σ'(s_j) u_j u_jᵀ + λI ⪰ λI,
    so each step is well defined; the loss is strongly convex and Newton's
    method converges quadratically once close (the returned gradient norm says
    how close it got).
    """
    d = u.shape[-1]
    eye = jnp.eye(d, dtype=u.dtype)

    def grad_hess(theta):
        s = u @ theta
        p = jax.nn.sigmoid(s)
        g = u.T @ (p - z) + ridge * theta
        h = (u * (p * (1.0 - p))[:, None]).T @ u + ridge * eye
        return g, h

    def newton(theta, _):
        g, h = grad_hess(theta)
        return theta - jnp.linalg.solve(h, g), None

    theta, _ = jax.lax.scan(newton, jnp.zeros((d,), u.dtype), None, length=steps)
    g, _ = grad_hess(theta)
    return RewardFit(theta, jnp.linalg.norm(g))
