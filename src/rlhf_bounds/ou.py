"""SGD as an Ornstein-Uhlenbeck process near a maximiser (THEORY.md §7 B5).

Near a maximiser w_S of F_S, with H = −∇²F_S(w_S) ≻ 0 and C_g the covariance
of one minibatch element's gradient at w_S, constant-step SGD with batch b is
approximated by dw = −H(w − w_S)dt + √(η/b) C_g^{1/2} dW, whose stationary law
is N(w_S, Σ) with HΣ + ΣH = (η/b)C_g (continuous Lyapunov; the discrete form
Σ = (I − ηH)Σ(I − ηH)ᵀ + (η²/b)C_g is exact for the linearised recursion).

Here are the per-problem pieces: H, C_g and Σ, and the two Lyapunov solvers
(``lyapunov_continuous``, ``lyapunov_discrete``); :mod:`rlhf_bounds.bounds`
re-exports the solvers with the rest of the catalogue's float64 numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .learners import TrainData, exact_gradient, gradient_estimator, prompt_objective, rollout_gradient, training_tau
from .spec import Spec

__all__ = ["objective_hessian", "prompt_gradients", "gradient_covariance", "stationary_covariance",
           "lyapunov_continuous", "lyapunov_discrete"]


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
    estimator = gradient_estimator(spec)
    if estimator == "exact":
        return jax.vmap(exact_gradient, in_axes=(None, None, 0, 0, None, None))(
            w, w_ref, data.phi, data.reward, spec.beta, tau)
    return jax.vmap(rollout_gradient, in_axes=(None, None, 0, 0, 0, None, None, None))(
        w, w_ref, data.phi, data.reward, data.u, spec.beta, tau, estimator)


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
    return lyapunov_continuous(h_pd, (lr / batch) * jnp.asarray(C_g, jnp.float64))


def lyapunov_continuous(H, C) -> jax.Array:
    """Solve HΣ + ΣH = C for symmetric H ≻ 0 (B5 with C = (η/b)C_g) [Mandt et al. 2017].

    H = U diag(λ) Uᵀ: Σ = U[(UᵀCU)_ij/(λ_i + λ_j)]Uᵀ. Shapes ``[d, d]`` → ``[d, d]``.
    H is read as symmetric (eigh); C need not be. If some λ_i + λ_j ≤ 0 there is no
    stationary law and the result is NaN.
    """
    H, C = jnp.asarray(H, jnp.float64), jnp.asarray(C, jnp.float64)
    eigval, eigvec = jnp.linalg.eigh(H)
    denom = eigval[:, None] + eigval[None, :]
    rotated = eigvec.T @ C @ eigvec
    solved = jnp.where(denom > 0, rotated / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    return eigvec @ solved @ eigvec.T


def lyapunov_discrete(A, C) -> jax.Array:
    """Solve Σ = AΣAᵀ + C for symmetric A with spectral radius < 1 (B5: A = I − ηH, C = (η²/b)C_g).

    A = U diag(a) Uᵀ: Σ = U[(UᵀCU)_ij/(1 − a_i a_j)]Uᵀ. Shapes ``[d, d]`` → ``[d, d]``.
    Exact stationary covariance of the linearised SGD recursion. If some a_i a_j ≥ 1
    (η ≥ 2/λ_max(H): unstable) the result is NaN.
    """
    A, C = jnp.asarray(A, jnp.float64), jnp.asarray(C, jnp.float64)
    eigval, eigvec = jnp.linalg.eigh(A)
    denom = 1.0 - eigval[:, None] * eigval[None, :]
    rotated = eigvec.T @ C @ eigvec
    solved = jnp.where(denom > 0, rotated / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    return eigvec @ solved @ eigvec.T
