"""One whole problem, end to end: world, reward model, policy training, exact gap.

:func:`simulate` is a pure function of (spec, key, shared_key) returning a
flat dict of per-problem results: scalars (the columns of a results table) and
a few small arrays (weights, trajectory). The engine batches it with
``jax.vmap`` over keys and compiles it once per static spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import gap
from .catalogue import EvalSet, Problem, bound_columns
from .learners import TrainData, minibatch_indices, train_policy
from .reward import draw_preferences, fit_bradley_terry
from .spec import Spec
from .status import status_code
from .world import behaviour_log_probs, draw_prompts, draw_world, true_reward

__all__ = ["simulate", "ARRAY_FIELDS"]

F32 = jnp.float32

#: Per-problem results that are arrays rather than scalars.
ARRAY_FIELDS = ("theta_star", "theta_hat", "w_last", "w_best", "traj_w", "traj_grad_norm")


def simulate(spec: Spec, key: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
    """Simulate one problem drawn from ``spec`` with PRNG ``key``.

    ``shared_key`` draws what all problems of a run may share without losing
    independence (the minibatch index sequence). The returned dict has the
    decomposition columns for the fixed-policy case (a fresh sample of n
    prompts and K rollouts drawn after training) and, with suffix ``_train``,
    on the training sample itself; the quantities later bounds need; the
    problem's parameters; and a ``status`` code.
    """
    k_world, k_pref, k_train, k_fresh, k_eval, k_post = jax.random.split(key, 6)
    world = draw_world(spec, k_world)
    n, K = spec.prompts, spec.rollouts

    # ---- reward model -------------------------------------------------------------------
    if spec.reward_model == "mle":
        prefs = draw_preferences(spec, world, k_pref)
        fit = fit_bradley_terry(prefs.u, prefs.z, spec.ridge, spec.newton_steps)
        theta_hat, fit_grad, pref_u, pref_z = fit.theta, fit.grad_norm, prefs.u, prefs.z
        oracle_residual = 0.0
    else:
        theta_hat, fit_grad = world.theta_star, jnp.zeros((), F32)
        pref_u, pref_z = jnp.zeros((0, spec.d), F32), jnp.zeros((0,), F32)
        oracle_residual = spec.sigma_xi  # the oracle r̂ = r* includes the residual

    def reward_hat(prompts):
        return prompts.phi @ theta_hat + oracle_residual * prompts.xi

    # ---- policy -------------------------------------------------------------------------
    k_tp, k_tu = jax.random.split(k_train)
    train = draw_prompts(spec, world, k_tp, n)
    data = TrainData(train.phi, reward_hat(train), jax.random.uniform(k_tu, (n, K), F32))
    fit_w = train_policy(spec, data, world.w_ref, minibatch_indices(spec, shared_key))
    w = fit_w.w_last

    # ---- population values on the evaluation set ----------------------------------------
    ev = draw_prompts(spec, world, k_eval, spec.eval_prompts)
    log_mu = jax.vmap(lambda phi: behaviour_log_probs(spec, world, phi))(ev.phi)
    evalset = EvalSet(ev.phi, reward_hat(ev), true_reward(spec, world, ev), log_mu)
    stats = gap.prompt_stats(w, world.w_ref, *evalset, spec.beta, spec.tau)
    pop = gap.population(stats)

    # ---- Ĵ on a fresh sample (fixed policy) and on the training sample -------------------
    k_fp, k_fu = jax.random.split(k_fresh)
    fresh = draw_prompts(spec, world, k_fp, n)
    u_fresh = jax.random.uniform(k_fu, (n, K), F32)
    j_fresh = gap.sample_objective(w, world.w_ref, fresh.phi, reward_hat(fresh), u_fresh, spec.beta, spec.tau)
    j_train = gap.sample_objective(w, world.w_ref, data.phi, data.reward, data.u, spec.beta, spec.tau)

    out = dict(gap.decompose(*j_fresh, pop))
    out.update({f"{k}_train": v for k, v in gap.decompose(*j_train, pop).items()})
    out.update({k: v for k, v in pop.items() if k not in out})

    C = spec.feature_bound
    theta_hat_norm = jnp.linalg.norm(theta_hat)
    out.update(
        theta_star_norm=jnp.linalg.norm(world.theta_star),
        theta_hat_norm=theta_hat_norm,
        reward_error=jnp.linalg.norm(theta_hat - world.theta_star),
        reward_fit_grad_norm=fit_grad,
        # sup r̂ − inf r̂ over ‖φ‖ ≤ C (and |ξ| ≤ 1 for the oracle with misspecification)
        reward_range=2.0 * (theta_hat_norm * C + oracle_residual),
        w_norm=jnp.linalg.norm(w - world.w_ref),
        # |ℓ_w(x, a)| ≤ 2C‖w − w_ref‖ for every x, a (docs/theory.md)
        log_ratio_range=2.0 * C * jnp.linalg.norm(w - world.w_ref),
        policy_grad_norm_last=fit_w.grad_norm_last,
        policy_grad_norm_best=fit_w.grad_norm_best,
        theta_star=world.theta_star,
        theta_hat=theta_hat,
        w_last=w,
        w_best=fit_w.w_best,
        traj_w=fit_w.traj_w,
        traj_grad_norm=fit_w.traj_grad_norm,
    )
    problem = Problem(w, world.w_ref, data, evalset, stats, pop, theta_hat, pref_u, pref_z, out["reward_range"],
                      out["log_ratio_range"], k_post)
    out.update(bound_columns(spec, problem))
    # Last, over every column: nothing non-finite leaves a problem without a flag.
    out["status"] = status_code(spec, out)
    return out
