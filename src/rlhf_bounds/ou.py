"""SGD as an Ornstein-Uhlenbeck process near a maximiser (B5, docs/theory.md §8).

Near a maximiser w_S of F_S, with H = −∇²F_S(w_S) ≻ 0 and C_g the covariance
of one minibatch element's gradient at w_S, constant-step SGD with batch b is
approximated by dw = −H(w − w_S)dt + √(η/b) C_g^{1/2} dW, whose stationary law
is N(w_S, Σ) with HΣ + ΣH = (η/b)C_g (continuous Lyapunov; the discrete form
Σ = (I − ηH)Σ(I − ηH)ᵀ + (η²/b)C_g is exact for the linearised recursion).

Here are the per-problem pieces: H, C_g and Σ; the two Lyapunov solvers, batched and
float64, as arrays (``lyapunov_continuous``, ``lyapunov_discrete``: NaN where no solution
exists) and with a per-element flag (``solve_lyapunov_continuous``,
``solve_lyapunov_discrete`` → ``LyapunovSolution(sigma, ok)``); and SGD's predicted
stationary covariance (``ou_covariance_continuous``, ``ou_covariance_discrete``).
:mod:`rlhf_bounds.bounds` re-exports the array solvers with the rest of the catalogue's
float64 numerics. :mod:`rlhf_bounds.ou_chains` checks the predictions against SGD itself: many
chains of the learner's own step at w_S, as an engine kernel (the suite ``ou``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .learners import TrainData, exact_gradient, gradient_estimator, prompt_objective, rollout_gradient, training_tau
from .spec import Spec

__all__ = ["objective_hessian", "prompt_gradients", "gradient_covariance", "stationary_covariance",
           "lyapunov_continuous", "lyapunov_discrete", "LyapunovSolution", "solve_lyapunov_continuous",
           "solve_lyapunov_discrete", "ou_covariance_continuous", "ou_covariance_discrete"]


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
    return lyapunov_continuous(h_pd, (lr / batch) * jnp.asarray(C_g, jnp.float64), symmetric=True)


class LyapunovSolution(NamedTuple):
    """A Lyapunov solve: ``sigma`` ``[..., d, d]`` float64 and ``ok`` ``[...]`` bool, per batch element.

    ``ok`` is False where no stationary solution exists (continuous: some Re λ(H) ≤ 0, for
    symmetric H some λ_i + λ_j ≤ 0; discrete: spectral radius of A ≥ 1) or where the solve
    overflowed; ``sigma`` is 0 there (never NaN, so nothing leaks into reductions or gradients).
    """

    sigma: jax.Array
    ok: jax.Array


def _broadcast_pair(M, Q):
    """M, Q as float64 with their leading batch axes broadcast together: ``[..., d, d]`` each."""
    M, Q = jnp.asarray(M, jnp.float64), jnp.asarray(Q, jnp.float64)
    batch = jnp.broadcast_shapes(M.shape[:-2], Q.shape[:-2])
    return jnp.broadcast_to(M, batch + M.shape[-2:]), jnp.broadcast_to(Q, batch + Q.shape[-2:])


def _eigen_solve(M, Q, pair_denominator):
    """Symmetric M = U diag(m) Uᵀ: Σ = U[(UᵀQU)_ij / den(m_i, m_j)]Uᵀ and whether every den > 0.

    Where some den ≤ 0 the entry is set to 0 (the caller masks the whole matrix by the flag).
    For an unbatched M with all den > 0 this is bit for bit the original eigh solver.
    """
    eigval, eigvec = jnp.linalg.eigh(M)
    denom = pair_denominator(eigval[..., :, None], eigval[..., None, :])
    positive = denom > 0
    rotated = eigvec.mT @ Q @ eigvec
    solved = jnp.where(positive, rotated / jnp.where(positive, denom, 1.0), 0.0)
    return eigvec @ solved @ eigvec.mT, jnp.all(positive, axis=(-2, -1))


def _vec_solve(operator, Q):
    """Solve ``operator · vec Σ = vec Q`` (row-major vec, ``operator`` ``[..., d², d²]``) by LU.

    The same factorisation also solves ``operator · vec P = vec I``. Both equations here are
    Lyapunov operators L with L(P) = I, and by Lyapunov's (Stein's) theorem the system is
    stable iff that P is positive definite, so the flag needs no non-symmetric eigensolver
    (``jnp.linalg.eig`` is not on every backend) and is exact up to round-off.
    """
    d = Q.shape[-1]
    probe = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float64), Q.shape)
    rhs = jnp.stack([Q.reshape(Q.shape[:-2] + (d * d,)), probe.reshape(Q.shape[:-2] + (d * d,))], axis=-1)
    sol = jnp.linalg.solve(operator, rhs)
    sigma, p = sol[..., 0].reshape(Q.shape), sol[..., 1].reshape(Q.shape)
    p_finite = jnp.all(jnp.isfinite(p), axis=(-2, -1))
    p_safe = jnp.where(p_finite[..., None, None], p, 0.0)
    stable = p_finite & (jnp.linalg.eigvalsh(0.5 * (p_safe + p_safe.mT))[..., 0] > 0)
    return sigma, stable


def _continuous(H, Q, symmetric):
    H, Q = _broadcast_pair(H, Q)
    if symmetric:
        return _eigen_solve(H, Q, lambda a, b: a + b)
    d = H.shape[-1]
    eye = jnp.eye(d, dtype=jnp.float64)
    # row (i, j), column (k, l): H_ik δ_jl + δ_ik H_jl, i.e. (H ⊗ I + I ⊗ H) in row-major vec
    operator = H[..., :, None, :, None] * eye[None, :, None, :] + eye[:, None, :, None] * H[..., None, :, None, :]
    return _vec_solve(operator.reshape(H.shape[:-2] + (d * d, d * d)), Q)


def _discrete(A, Q, symmetric):
    A, Q = _broadcast_pair(A, Q)
    if symmetric:
        return _eigen_solve(A, Q, lambda a, b: 1.0 - a * b)
    d = A.shape[-1]
    # row (i, j), column (k, l): δ_ik δ_jl − A_ik A_jl, i.e. (I − A ⊗ A) in row-major vec
    operator = jnp.eye(d * d, dtype=jnp.float64) - (A[..., :, None, :, None] * A[..., None, :, None, :]).reshape(
        A.shape[:-2] + (d * d, d * d))
    return _vec_solve(operator, Q)


def _flagged(sigma, stable) -> LyapunovSolution:
    ok = stable & jnp.all(jnp.isfinite(sigma), axis=(-2, -1))
    return LyapunovSolution(jnp.where(ok[..., None, None], sigma, 0.0), ok)


def _nan_where_unstable(sigma, stable) -> jax.Array:
    return jnp.where(stable[..., None, None], sigma, jnp.nan)


def solve_lyapunov_continuous(H, Q, *, symmetric: bool = False) -> LyapunovSolution:
    """Solve HΣ + ΣHᵀ = Q with a per-element flag (B5 with Q = (η/b)C_g) [Mandt et al. 2017].

    Shapes: H ``[..., d, d]``, Q ``[..., d, d]`` (leading axes broadcast) → ``LyapunovSolution``
    with ``sigma`` ``[..., d, d]`` float64 and ``ok`` ``[...]`` bool. jit- and vmap-safe
    (``symmetric`` is a Python bool: static under jit).

    * ``symmetric=False`` (default, any H): the Kronecker form (I ⊗ H + H ⊗ I) vec Σ = vec Q by
      ``jnp.linalg.solve`` (a d² × d² LU: fine for d ≤ 32). ``ok`` iff every eigenvalue of H has
      positive real part (−H Hurwitz: a stationary law exists), tested as P ≻ 0 for HP + PHᵀ = I.
    * ``symmetric=True`` (H read as symmetric: ``eigh``, cheaper): H = U diag(λ)Uᵀ,
      Σ = U[(UᵀQU)_ij/(λ_i + λ_j)]Uᵀ; ``ok`` iff every λ_i + λ_j > 0, i.e. H ≻ 0.

    Q need not be symmetric. Where ``ok`` is False (also if the solve overflowed) ``sigma`` is 0.
    """
    return _flagged(*_continuous(H, Q, symmetric))


def solve_lyapunov_discrete(A, Q, *, symmetric: bool = False) -> LyapunovSolution:
    """Solve Σ = AΣAᵀ + Q with a per-element flag (B5: A = I − ηH, Q = (η²/b)C_g).

    Shapes as :func:`solve_lyapunov_continuous`. The exact stationary covariance of the linear
    recursion x_{t+1} = A x_t + ε_t, Cov ε_t = Q.

    * ``symmetric=False`` (default, any A): (I − A ⊗ A) vec Σ = vec Q by ``jnp.linalg.solve``.
      ``ok`` iff the spectral radius of A is < 1, tested as P ≻ 0 for P = APAᵀ + I.
    * ``symmetric=True`` (A read as symmetric: ``eigh``): Σ = U[(UᵀQU)_ij/(1 − a_i a_j)]Uᵀ;
      ``ok`` iff every a_i a_j < 1, i.e. max|a_i| < 1 (for A = I − ηH: 0 < ηλ_i < 2).

    Where ``ok`` is False ``sigma`` is 0.
    """
    return _flagged(*_discrete(A, Q, symmetric))


def lyapunov_continuous(H, Q, *, symmetric: bool = False) -> jax.Array:
    """Σ solving HΣ + ΣHᵀ = Q, NaN (the whole matrix) where no stationary solution exists.

    The array form of :func:`solve_lyapunov_continuous` (same paths, shapes and ``symmetric``
    keyword; ``symmetric=True`` is the eigh solver :func:`stationary_covariance` uses).
    """
    return _nan_where_unstable(*_continuous(H, Q, symmetric))


def lyapunov_discrete(A, Q, *, symmetric: bool = False) -> jax.Array:
    """Σ solving Σ = AΣAᵀ + Q, NaN (the whole matrix) where the spectral radius of A is ≥ 1.

    The array form of :func:`solve_lyapunov_discrete` (same paths, shapes and keyword).
    """
    return _nan_where_unstable(*_discrete(A, Q, symmetric))


def _step_scale(lr, batch, power):
    """η^power / b as ``[..., 1, 1]``, so a batch of steps or batch sizes broadcasts with C_g."""
    return (jnp.asarray(lr, jnp.float64) ** power / jnp.asarray(batch, jnp.float64))[..., None, None]


def ou_covariance_continuous(H, C_g, lr, batch, *, symmetric: bool = False) -> LyapunovSolution:
    """The OU prediction of constant-step SGD's stationary covariance: HΣ + ΣHᵀ = (η/b)C_g.

    H ``[..., d, d]`` (−∇²F_S at the maximiser; H = Hᵀ there, so ``symmetric=True`` is the
    cheaper exact path), C_g ``[..., d, d]``, step η = ``lr`` and batch b scalars or ``[...]``.
    Returns ``LyapunovSolution(sigma, ok)`` (:func:`solve_lyapunov_continuous`).
    """
    return solve_lyapunov_continuous(H, _step_scale(lr, batch, 1) * jnp.asarray(C_g, jnp.float64), symmetric=symmetric)


def ou_covariance_discrete(H, C_g, lr, batch, *, symmetric: bool = False) -> LyapunovSolution:
    """The stationary covariance of linearised SGD: Σ = (I − ηH)Σ(I − ηH)ᵀ + (η²/b)C_g.

    Exact for w_{t+1} − w_S = (I − ηH)(w_t − w_S) + η ε_t, Cov ε_t = C_g/b; differs from
    :func:`ou_covariance_continuous` by a relative O(ηλ_max) (docs/theory.md §8). ``ok`` is False
    unless 0 < ηλ < 2 for H's eigenvalues (for non-symmetric H: |1 − ηλ| < 1). Arguments as
    :func:`ou_covariance_continuous`.
    """
    H = jnp.asarray(H, jnp.float64)
    A = jnp.eye(H.shape[-1], dtype=jnp.float64) - _step_scale(lr, 1.0, 1) * H
    return solve_lyapunov_discrete(A, _step_scale(lr, batch, 2) * jnp.asarray(C_g, jnp.float64), symmetric=symmetric)
