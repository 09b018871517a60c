"""W2 `ou-chains`: many constant-step SGD chains per problem from w_S, through the engine and beside a plain reference.

Both paths compute the same thing for each problem (docs/theory.md §8.2–§8.5): the problem's world and
training sample (``rlhf_bounds.simulate.prepare``), w_S, H, C_g and the two predictions
(``rlhf_bounds.ou_chains.ou_setup``), then ``chains`` constant-step SGD chains of T steps from w_S,
each with its own minibatch index sequence (``ou_chains.chain_indices``, shared by the problems), a
burn-in and batch means of x = w − w_S and x xᵀ, and the summary columns
(``ou_chains.summarise_moments``). They differ only in how the chains run:

* **engine**: ``rlhf_bounds.ou_chains.OUChainKernel(bounds=False)`` compiled by the engine
  (``engine.compile_chunk``, what ``rlhf_bounds.run`` calls, with the kernel's XLA options): the
  learner's own ``step`` on lane-major lanes (chains × problem_block lanes, each lane gathering its
  prompts' whole rows for two batched dots), running sums carried in the scan;
* **plain**: ``jit(vmap(vmap(chain)))`` written straightforwardly: one chain of one problem is a
  ``lax.scan`` of w ← w + η·mean_j ∇f_{i_j}(w) with ``learners.exact_gradient`` per prompt, keeping
  its own per-batch sums; ``vmap`` over chains, then over problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

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
    burn_fraction: float = 0.2
    batches: int = 4
    problem_block: int = 8


W2 = W2Shape()


def w2_spec(s: W2Shape = W2):
    import rlhf_bounds as rb
    return rb.Spec(d=s.d, actions=s.A, prompts=s.n, rollouts=2, batch=s.b, steps=s.T, record_every=s.T,
                   learner="SGD", estimator="exact", reward_model="oracle", train_log_ratio="exact",
                   beta=s.beta, lr=s.lr, sigma_xi=s.sigma_xi)


def engine_kernel(s: W2Shape = W2):
    from rlhf_bounds.ou_chains import OUChainKernel
    return OUChainKernel(chains=s.chains, burn_fraction=s.burn_fraction, batches=s.batches,
                         problem_block=s.problem_block, bounds=False)


def make_plain(s: W2Shape = W2):
    """The plain reference: ``jit(chunk(problems_key, shared_key, idx))`` with the chains as vmap(vmap(chain))."""
    from rlhf_bounds import ou_chains as oc
    from rlhf_bounds.learners import exact_gradient
    from rlhf_bounds.simulate import prepare

    spec = w2_spec(s)
    kernel = engine_kernel(s)
    burn, length = kernel.check(spec)
    beta, tau, eta = s.beta, jnp.inf, s.lr

    def chain(w_s, w_ref, phi, reward, idx):          # idx [T, b]: one chain of one problem
        w0 = w_s.astype(F32)

        def step(carry, inp):
            w, bx, bxx = carry
            t, i = inp
            g = jnp.mean(jax.vmap(exact_gradient, (None, None, 0, 0, None, None))(w, w_ref, phi[i], reward[i],
                                                                                  beta, tau), axis=0)
            w = w + eta * g
            x = w - w0
            j = jnp.clip((t - burn) // length, 0, s.batches - 1)
            keep = (t >= burn).astype(F32)
            bx = bx.at[j].add(keep * x)
            bxx = bxx.at[j].add(keep * jnp.outer(x, x))
            return (w, bx, bxx), None

        init = (w0, jnp.zeros((s.batches, s.d), F32), jnp.zeros((s.batches, s.d, s.d), F32))
        (_, bx, bxx), _ = jax.lax.scan(step, init, (jnp.arange(s.T), idx))
        m, M = jnp.asarray(bx, F64) / length, jnp.asarray(bxx, F64) / length
        return m.sum(0), jnp.einsum("ji,jk->ik", m, m), M.sum(0), (M * M).sum(0)

    def chunk(problems_key, shared_key, gidx):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(problems_key, gidx)
        prep = jax.vmap(lambda k: prepare(spec, k))(keys)
        w0 = prep.world.w_ref + prep.theta_hat / spec.beta
        setup = oc.ou_setups(spec, prep.data, prep.world.w_ref, w0, kernel.newton_steps, kernel.grad_tol)
        idx = jnp.moveaxis(oc.chain_indices(spec, s.chains, shared_key), -1, 0)      # [C, T, b]
        per_chain = jax.vmap(chain, (None, None, None, None, 0))
        sums = jax.vmap(per_chain, (0, 0, 0, 0, None))(setup.max.w, prep.world.w_ref, prep.data.phi,
                                                        prep.data.reward, idx)       # each [P, C, ...]
        n_b = float(s.chains * s.batches)
        P = gidx.shape[0]
        mom = oc.ChainMoments(jnp.full((P,), n_b, F64), jnp.full((P,), float(length), F64),
                              *(x.sum(axis=1) for x in sums))
        return jax.vmap(lambda st, mo: oc.summarise_moments(spec, st, mo, burn))(setup, mom)

    return jax.jit(chunk)


def flops_per_chain_step(s: W2Shape = W2) -> dict:
    """Hand count of one chain step: b prompts' exact gradients (logits A·d multiply-adds, softmax and
    the coefficients ≈ 12·A, the spread A·d multiply-adds and the mean E_πφ A·d), the update, and the
    batch sums (d + d² adds, d² multiplies); bytes: the b prompts' features and rewards read once."""
    per_prompt = 2 * (3 * s.A * s.d) + 12 * s.A
    flops = s.b * per_prompt + 2 * s.d + 2 * s.d * s.d + s.d
    return {"flops": flops, "bytes": s.b * (s.A * s.d + s.A) * 4}
