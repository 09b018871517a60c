"""One whole problem, end to end: world, reward model, policy training, exact gap.

:func:`simulate` is a pure function of (spec, key, shared_key) returning a
flat dict of per-problem results: scalars (the columns of a results table) and
a few small arrays (weights, trajectory). :func:`simulate_batch` runs many
problems at once (the engine compiles it once per static spec and chunk);
a problem's results are the same whichever way it is run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import gap
from .catalogue import EvalSet, Problem, bound_columns
from .learners import PolicyFit, TrainData, minibatch_indices, train_policies
from .reward import draw_preferences, fit_bradley_terry
from .spec import Spec
from .status import status_code
from .world import World, behaviour_log_probs, draw_prompts, draw_world, true_reward

__all__ = ["simulate", "simulate_batch", "ARRAY_FIELDS"]

F32 = jnp.float32

#: Per-problem results that are arrays rather than scalars.
ARRAY_FIELDS = ("theta_star", "theta_hat", "w_last", "w_best", "traj_w", "traj_grad_norm")


class _Prepared(NamedTuple):
    """What one problem has before its policy is trained: world, reward model, training sample."""

    world: World
    theta_hat: jax.Array
    fit_grad: jax.Array
    pref_u: jax.Array
    pref_z: jax.Array
    data: TrainData
    k_fresh: jax.Array
    k_eval: jax.Array
    k_post: jax.Array


def _oracle_residual(spec: Spec):
    # the oracle r̂ = r* includes the residual; a fitted r̂ is linear
    return spec.sigma_xi if spec.reward_model == "oracle" else 0.0


def _reward_hat(spec: Spec, theta_hat, prompts):
    return prompts.phi @ theta_hat + _oracle_residual(spec) * prompts.xi


def _prepare(spec: Spec, key: jax.Array) -> _Prepared:
    """World, reward model and training sample of the problem with PRNG ``key``."""
    k_world, k_pref, k_train, k_fresh, k_eval, k_post = jax.random.split(key, 6)
    world = draw_world(spec, k_world)
    if spec.reward_model == "mle":
        prefs = draw_preferences(spec, world, k_pref)
        fit = fit_bradley_terry(prefs.u, prefs.z, spec.ridge, spec.newton_steps)
        theta_hat, fit_grad, pref_u, pref_z = fit.theta, fit.grad_norm, prefs.u, prefs.z
    else:
        theta_hat, fit_grad = world.theta_star, jnp.zeros((), F32)
        pref_u, pref_z = jnp.zeros((0, spec.d), F32), jnp.zeros((0,), F32)
    k_tp, k_tu = jax.random.split(k_train)
    train = draw_prompts(spec, world, k_tp, spec.prompts)
    u = jax.random.uniform(k_tu, (spec.prompts, spec.rollouts), F32)
    data = TrainData(train.phi, _reward_hat(spec, theta_hat, train), u)
    return _Prepared(world, theta_hat, fit_grad, pref_u, pref_z, data, k_fresh, k_eval, k_post)


def _finish(spec: Spec, prep: _Prepared, fit_w: PolicyFit) -> dict[str, jax.Array]:
    """Everything after training for one problem: population values, Ĵ, gap terms, bounds, status."""
    world, theta_hat, data = prep.world, prep.theta_hat, prep.data
    n, K = spec.prompts, spec.rollouts
    w = fit_w.w_last
    reward_hat = lambda prompts: _reward_hat(spec, theta_hat, prompts)

    # ---- population values on the evaluation set ----------------------------------------
    ev = draw_prompts(spec, world, prep.k_eval, spec.eval_prompts)
    log_mu = jax.vmap(lambda phi: behaviour_log_probs(spec, world, phi))(ev.phi)
    evalset = EvalSet(ev.phi, reward_hat(ev), true_reward(spec, world, ev), log_mu)
    stats = gap.prompt_stats(w, world.w_ref, *evalset, spec.beta, spec.tau)
    pop = gap.population(stats)

    # ---- Ĵ on a fresh sample (fixed policy) and on the training sample -------------------
    k_fp, k_fu = jax.random.split(prep.k_fresh)
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
        reward_fit_grad_norm=prep.fit_grad,
        # sup r̂ − inf r̂ over ‖φ‖ ≤ C (and |ξ| ≤ 1 for the oracle with misspecification)
        reward_range=2.0 * (theta_hat_norm * C + _oracle_residual(spec)),
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
    problem = Problem(w, world.w_ref, data, evalset, stats, pop, theta_hat, prep.pref_u, prep.pref_z,
                      out["reward_range"], out["log_ratio_range"], prep.k_post)
    out.update(bound_columns(spec, problem))
    # Last, over every column: nothing non-finite leaves a problem without a flag.
    out["status"] = status_code(spec, out)
    return out


def simulate_batch(spec: Spec, keys: jax.Array, shared_key: jax.Array,
                   finish_block: int | None = None) -> dict[str, jax.Array]:
    """:func:`simulate` for P problems at once: ``keys`` ``[P]``, every result with a leading axis P.

    Three stages: each problem's world, reward model and training sample (``vmap``); the
    policies of all P problems trained together by :func:`rlhf_bounds.learners.train_policies`
    (problem axis last inside its loop, which is where vectorising across problems pays); then
    each problem's evaluation, gap terms and bounds, ``vmap``-ed over blocks of ``finish_block``
    problems at a time (``lax.map``), so that the evaluation sets in flight stay small enough for
    the cache. A problem's results do not depend on P or on ``finish_block``.
    """
    prep = jax.vmap(lambda k: _prepare(spec, k))(keys)
    fit = train_policies(spec, prep.data, prep.world.w_ref, minibatch_indices(spec, shared_key))
    finish = lambda args: _finish(spec, *args)
    P = keys.shape[0]
    if finish_block is None or finish_block >= P:
        return jax.vmap(finish)((prep, fit))
    return jax.lax.map(finish, (prep, fit), batch_size=finish_block)


def simulate(spec: Spec, key: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
    """Simulate one problem drawn from ``spec`` with PRNG ``key``.

    ``shared_key`` draws what all problems of a run may share without losing
    independence (the minibatch index sequence). The returned dict has the
    decomposition columns for the fixed-policy case (a fresh sample of n
    prompts and K rollouts drawn after training) and, with suffix ``_train``,
    on the training sample itself; the quantities later bounds need; the
    problem's parameters; and a ``status`` code. It is :func:`simulate_batch`
    with one problem (the engine calls that directly).
    """
    out = simulate_batch(spec, key[None], shared_key)
    return {k: v[0] for k, v in out.items()}
