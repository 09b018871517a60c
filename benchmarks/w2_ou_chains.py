"""W2 `ou-chains`: constant-step SGD chains from the maximiser, empirical covariance, both Lyapunov solves.

Per problem (docs/theory.md §4–§9 B5), built from the engine's public functions
(``rlhf_bounds.world``, ``rlhf_bounds.learners.prompt_objective`` / ``exact_gradient``):

1. world and n training prompts; reward the oracle r* = ⟨θ*, φ⟩ + σ_ξ ξ with σ_ξ > 0
   (misspecified, so the per-prompt gradients do not all vanish at w_S and C_g ≠ 0:
   the realizable corner of B5 is degenerate), exact log-ratio (τ = ∞);
2. w_S = argmax F_S by Newton's method from w_ref + θ*/β (the realizable optimum);
3. H = −∇²F_S(w_S) (autodiff), C_g = Cov_i ∇f_i(w_S) over the n prompts (divisor n);
4. ``chains`` constant-step SGD chains (step η, batch b of prompts with replacement, exact
   gradient over responses) started at w_S, T steps; each chain has its own index sequence,
   shared by the problems (each problem has its own data, so problems stay independent);
5. the empirical covariance of w_t − w̄ pooled over chains and over the second half of the steps;
6. continuous Lyapunov HΣ + ΣH = (η/b)C_g and discrete Σ = (I−ηH)Σ(I−ηH)ᵀ + (η²/b)C_g, both by
   ``rlhf_bounds.ou``'s solvers (float64), and the relative Frobenius error of the empirical
   covariance against each.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

F32, F64 = jnp.float32, jnp.float64


@dataclass(frozen=True)
class W2Shape:
    d: int = 16
    A: int = 8
    n: int = 256
    b: int = 16
    T: int = 2000
    chains: int = 64
    beta: float = 0.5
    lr: float = 1.0
    sigma_xi: float = 0.5
    newton: int = 12


W2 = W2Shape()


def w2_spec(s: W2Shape = W2):
    import rlhf_bounds as rb
    return rb.Spec(d=s.d, actions=s.A, prompts=s.n, rollouts=2, batch=s.b, steps=s.T, record_every=s.T,
                   learner="SGD", estimator="exact", reward_model="oracle", train_log_ratio="exact",
                   beta=s.beta, lr=s.lr, sigma_xi=s.sigma_xi)


def lyapunov_solves(H, C_g, lr, b):
    """(Σ_continuous, Σ_discrete) in float64 by the package's solvers (``rlhf_bounds.ou``)."""
    from rlhf_bounds import ou
    eye = jnp.eye(H.shape[0], dtype=F64)
    return ou.lyapunov_continuous(H, (lr / b) * C_g), ou.lyapunov_discrete(eye - lr * H, (lr * lr / b) * C_g)


def make_kernel(s: W2Shape = W2):
    """jit(vmap(one_problem)) over a chunk's problem keys; chain index sequences shared."""
    from rlhf_bounds.learners import exact_gradient, prompt_objective
    from rlhf_bounds.world import draw_prompts, draw_world, true_reward

    spec = w2_spec(s)
    beta, tau = s.beta, jnp.inf
    burn = s.T // 2

    def one_problem(key, chain_idx):
        k_world, k_data = jax.random.split(key)
        world = draw_world(spec, k_world)
        prompts = draw_prompts(spec, world, k_data, s.n)
        phi, reward = prompts.phi, true_reward(spec, world, prompts)
        w_ref = world.w_ref

        def F(w):
            return jnp.mean(jax.vmap(prompt_objective, (None, None, 0, 0, None, None))(w, w_ref, phi, reward,
                                                                                     beta, tau))

        grad_F, hess_F = jax.grad(F), jax.hessian(F)

        def newton(w, _):
            return w - jnp.linalg.solve(hess_F(w), grad_F(w)), None

        w_s, _ = jax.lax.scan(newton, w_ref + world.theta_star / beta, None, length=s.newton)
        H = -jnp.asarray(hess_F(w_s), F64)
        H = 0.5 * (H + H.T)
        g_i = jnp.asarray(jax.vmap(exact_gradient, (None, None, 0, 0, None, None))(w_s, w_ref, phi, reward,
                                                                                  beta, tau), F64)
        gc = g_i - jnp.mean(g_i, 0)
        C_g = gc.T @ gc / s.n

        def step(carry, idx_t):                      # idx_t [chains, b]
            w, s1, s2, t = carry
            g = jax.vmap(lambda wc, ic: jnp.mean(jax.vmap(exact_gradient, (None, None, 0, 0, None, None))(
                wc, w_ref, phi[ic], reward[ic], beta, tau), 0))(w, idx_t)
            w = w + s.lr * g
            keep = (t >= burn).astype(F32)
            dw = w - w_s
            s1 = s1 + keep * dw
            s2 = s2 + keep * jnp.einsum("ci,cj->ij", dw, dw)
            return (w, s1, s2, t + 1), None

        w0 = jnp.broadcast_to(w_s, (s.chains, s.d))
        init = (w0, jnp.zeros((s.chains, s.d), F32), jnp.zeros((s.d, s.d), F32), jnp.zeros((), jnp.int32))
        (w_T, s1, s2, _), _ = jax.lax.scan(step, init, chain_idx)
        count = s.chains * (s.T - burn)
        mean = jnp.sum(s1, 0) / count
        emp = jnp.asarray(s2 / count, F64) - jnp.outer(mean, mean).astype(F64)
        cont, disc = lyapunov_solves(H, C_g, s.lr, s.b)
        lam = jnp.linalg.eigvalsh(H)
        rel = lambda X: jnp.linalg.norm(emp - X) / jnp.linalg.norm(X)
        return {
            "grad_norm_at_ws": jnp.linalg.norm(grad_F(w_s)),
            "h_min_eig": lam[0], "h_max_eig": lam[-1],
            "cg_trace": jnp.trace(C_g),
            "sigma_emp_trace": jnp.trace(emp),
            "sigma_cont_trace": jnp.trace(cont),
            "sigma_disc_trace": jnp.trace(disc),
            "rel_err_cont": rel(cont),
            "rel_err_disc": rel(disc),
            "mean_offset_norm": jnp.linalg.norm(mean),
        }

    def chunk(root, idx, chain_idx):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(root, idx)
        return jax.vmap(one_problem, (0, None))(keys, chain_idx)

    return jax.jit(chunk)


def chain_indices(s: W2Shape, seed: int = 0):
    """[T, chains, b] minibatch indices, one sequence per chain, shared by every problem."""
    return jax.random.randint(jax.random.key(seed + 7919), (s.T, s.chains, s.b), 0, s.n, dtype=jnp.int32)
