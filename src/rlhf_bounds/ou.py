"""SGD as an Ornstein-Uhlenbeck process near a maximiser (THEORY.md §7 B5).

Near a maximiser w_S of F_S, with H = −∇²F_S(w_S) ≻ 0 and C_g the covariance
of one minibatch element's gradient at w_S, constant-step SGD with batch b is
approximated by dw = −H(w − w_S)dt + √(η/b) C_g^{1/2} dW, whose stationary law
is N(w_S, Σ) with HΣ + ΣH = (η/b)C_g (continuous Lyapunov; the discrete form
Σ = (I − ηH)Σ(I − ηH)ᵀ + (η²/b)C_g is exact for the linearised recursion).

Here are the per-problem pieces: H, C_g and Σ. The Lyapunov solvers live with
the other float64 numerics in :mod:`rlhf_bounds.bounds`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import bounds
from .learners import TrainData, exact_gradient, prompt_objective, rollout_gradient, training_tau
from .spec import Spec

__all__ = ["objective_hessian", "prompt_gradients", "gradient_covariance", "stationary_covariance"]


def objective_hessian(spec: Spec, data: TrainData, w, w_ref) -> jax.Array:
    """H = −∇²F_S(w) (exact over responses, autodiff), ``[d, d]`` float64."""
    tau = training_tau(spec)

    def f(v):
        per_prompt = jax.vmap(prompt_objective, in_axes=(None, None, 0, 0, None, None))(
            v, w_ref, data.phi, data.reward, spec.beta, tau)
        return jnp.mean(per_prompt)

    h = -jax.hessian(f)(w)
    return jnp.asarray(0.5 * (h + h.T), jnp.float64)


def prompt_gradients(spec: Spec, data: TrainData, w, w_ref) -> jax.Array:
    """The gradient one minibatch element contributes at w, for every training prompt: ``[n, d]``.

    Uses the spec's estimator (exact over responses, or the score function on the
    prompt's own rollouts with the rloo/no baseline), as SGD does.
    """
    tau = training_tau(spec)
    if spec.estimator == "exact" or spec.learner == "GA":
        return jax.vmap(exact_gradient, in_axes=(None, None, 0, 0, None, None))(
            w, w_ref, data.phi, data.reward, spec.beta, tau)
    return jax.vmap(rollout_gradient, in_axes=(None, None, 0, 0, 0, None, None, None))(
        w, w_ref, data.phi, data.reward, data.u, spec.beta, tau, spec.estimator)


def gradient_covariance(spec: Spec, data: TrainData, w, w_ref) -> jax.Array:
    """C_g = Cov_i[g_i(w)] over the training prompts (population covariance, divisor n), float64 ``[d, d]``."""
    g = jnp.asarray(prompt_gradients(spec, data, w, w_ref), jnp.float64)
    centred = g - jnp.mean(g, axis=0)
    return centred.T @ centred / g.shape[0]


def stationary_covariance(H, C_g, lr, batch, min_curvature=1e-3) -> jax.Array:
    """Σ solving HΣ + ΣH = (η/b)C_g, with H's eigenvalues floored at ``min_curvature``.

    The floor keeps Σ finite when w_S is not a strict maximiser (H ⋡ 0); where it
    acts, Σ is a choice of posterior covariance rather than the OU law.
    """
    eigval, eigvec = jnp.linalg.eigh(jnp.asarray(H, jnp.float64))
    h_pd = (eigvec * jnp.maximum(eigval, min_curvature)) @ eigvec.T
    return bounds.lyapunov_continuous(h_pd, (lr / batch) * jnp.asarray(C_g, jnp.float64))
