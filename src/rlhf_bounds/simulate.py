"""One whole problem, end to end: world, reward model, policy training, exact gap.

The simulation is three public stages, each a pure function, so that a study can reuse any of
them (the Ornstein-Uhlenbeck chains and the replace-one retraining start from :func:`prepare`
and train with the learner's own ``step``):

1. :func:`prepare` ``(spec, key) -> Prepared``: the problem's world, reward model and training
   sample, with its PRNG keys laid out by name (:class:`ProblemKeys`);
2. :func:`rlhf_bounds.learners.train_policies`: the policies of many problems trained together;
3. :func:`finish` ``(spec, prepared, fit) -> columns``: population values, Ĵ, the gap terms, the
   bound catalogue and the status flags of one problem.

:func:`simulate_batch` chains them for P problems (the engine's default kernel,
:data:`KERNEL`); :func:`simulate` gives one problem exactly as the engine computes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import gap
from .catalogue import Problem, bound_columns
from .gap import EvalSet
from .learners import LANE_BLOCK, PolicyFit, TrainData, lane_block, minibatch_indices, train_policies
from .reward import draw_preferences, fit_bradley_terry
from .spec import Spec
from .status import status_code
from .world import World, behaviour_log_probs, draw_prompts, draw_world, true_reward

__all__ = ["ProblemKeys", "Prepared", "problem_keys", "prepare", "finish", "reward_hat", "Extra", "simulate", "simulate_batch",
           "default_finish_block", "batch_block", "SimulateKernel", "KERNEL", "ARRAY_FIELDS"]

F32 = jnp.float32

#: Per-problem results that are arrays rather than scalars.
ARRAY_FIELDS = ("theta_star", "theta_hat", "w_last", "w_best", "traj_w", "traj_grad_norm")


class ProblemKeys(NamedTuple):
    """The PRNG keys of one problem, split from its key in this order (the layout is part of the
    results: changing it changes every problem's draws)."""

    world: jax.Array        # θ*, w_μ, the lowrank basis
    preferences: jax.Array  # the preference pairs of the reward model
    train: jax.Array        # the training prompts and their rollout uniforms
    fresh: jax.Array        # the fresh sample of n prompts and K rollouts (the fixed-policy Ĵ)
    eval: jax.Array         # the evaluation prompts (population values)
    posterior: jax.Array    # the Monte Carlo draws from B2's Gaussian posterior


def problem_keys(key: jax.Array) -> ProblemKeys:
    """The named keys of the problem with PRNG ``key``."""
    return ProblemKeys(*jax.random.split(key, len(ProblemKeys._fields)))


class Prepared(NamedTuple):
    """What one problem has before its policy is trained: world, reward model, training sample, keys."""

    world: World
    theta_hat: jax.Array
    fit_grad: jax.Array
    pref_u: jax.Array
    pref_z: jax.Array
    data: TrainData
    keys: ProblemKeys


def _oracle_residual(spec: Spec):
    # the oracle r̂ = r* includes the residual; a fitted r̂ is linear
    return spec.sigma_xi if spec.reward_model == "oracle" else 0.0


def reward_hat(spec: Spec, theta_hat, prompts) -> jax.Array:
    """r̂ on ``prompts`` (``[..., A]``): ⟨θ̂, φ⟩, plus σ_ξ ξ for the oracle reward (r̂ = r*, residual included).
    The one place r̂ is written; studies that draw prompts of their own call it."""
    return prompts.phi @ theta_hat + _oracle_residual(spec) * prompts.xi


_reward_hat = reward_hat


def prepare(spec: Spec, key: jax.Array) -> Prepared:
    """World, reward model and training sample of the problem with PRNG ``key`` (one problem; vmap it)."""
    keys = problem_keys(key)
    world = draw_world(spec, keys.world)
    if spec.reward_model == "mle":
        prefs = draw_preferences(spec, world, keys.preferences)
        fit = fit_bradley_terry(prefs.u, prefs.z, spec.ridge, spec.newton_steps)
        theta_hat, fit_grad, pref_u, pref_z = fit.theta, fit.grad_norm, prefs.u, prefs.z
    else:
        theta_hat, fit_grad = world.theta_star, jnp.zeros((), F32)
        pref_u, pref_z = jnp.zeros((0, spec.d), F32), jnp.zeros((0,), F32)
    k_tp, k_tu = jax.random.split(keys.train)
    train = draw_prompts(spec, world, k_tp, spec.prompts)
    u = jax.random.uniform(k_tu, (spec.prompts, spec.rollouts), F32)
    data = TrainData(train.phi, _reward_hat(spec, theta_hat, train), u)
    return Prepared(world, theta_hat, fit_grad, pref_u, pref_z, data, keys)


def finish(spec: Spec, prep: Prepared, fit_w: PolicyFit, catalogue: bool = True) -> dict[str, jax.Array]:
    """Everything after training for one problem: population values, Ĵ, gap terms, bounds, status.

    ``catalogue=False`` leaves out the bound columns (what the rest costs, for benchmarks).
    """
    world, theta_hat, data = prep.world, prep.theta_hat, prep.data
    n, K = spec.prompts, spec.rollouts
    w = fit_w.w_last
    reward_hat = lambda prompts: _reward_hat(spec, theta_hat, prompts)

    # ---- population values on the evaluation set ----------------------------------------
    ev = draw_prompts(spec, world, prep.keys.eval, spec.eval_prompts)
    log_mu = jax.vmap(lambda phi: behaviour_log_probs(spec, world, phi))(ev.phi)
    evalset = EvalSet(ev.phi, reward_hat(ev), true_reward(spec, world, ev), log_mu)
    stats = gap.prompt_stats(w, world.w_ref, evalset, spec.beta, spec.tau)
    pop = gap.population(stats)

    # ---- Ĵ on a fresh sample (fixed policy) and on the training sample -------------------
    k_fp, k_fu = jax.random.split(prep.keys.fresh)
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
    if catalogue:
        problem = Problem(w, world.w_ref, data, evalset, stats, pop, theta_hat, world.theta_star, prep.pref_u,
                          prep.pref_z,
                          out["reward_range"], out["log_ratio_range"], prep.keys.posterior)
        out.update(bound_columns(spec, problem))
    # Last, over every column: nothing non-finite leaves a problem without a flag.
    out["status"] = status_code(spec, out)
    return out


def default_finish_block() -> int | None:
    """Problems evaluated at once after training (see :func:`simulate_batch`).

    On CPU, 16: sixteen W1 evaluation sets (16 MB) stay in cache, and blocks of 8–16 ran
    fastest (benchmarks/README.md). On an accelerator, a whole lane block of the training loop
    at once (:data:`rlhf_bounds.learners.LANE_BLOCK` problems): a fixed width, so that results do
    not depend on the chunk size there either (``None`` would finish each chunk in one block).
    """
    return 16 if jax.default_backend() == "cpu" else LANE_BLOCK


def batch_block(spec: Spec, finish_block: int | None | str = "auto") -> int:
    """The multiple :func:`simulate_batch` pads its P problems up to: the training loop's lane block
    (:func:`rlhf_bounds.learners.lane_block`), a multiple of ``finish_block`` as well."""
    if finish_block == "auto":
        finish_block = default_finish_block()
    return math.lcm(lane_block(spec), finish_block or 1)


#: A study's extra columns: ``extra(spec, prep, fit, columns) -> {name: value}`` for one problem, called after
#: :func:`finish` with its ``columns`` (see :func:`simulate_batch`).
Extra = Callable[[Spec, Prepared, PolicyFit, dict], dict]


def simulate_batch(spec: Spec, keys: jax.Array, shared_key: jax.Array, finish_block: int | None | str = "auto",
                   catalogue: bool = True, extra: Extra | None = None) -> dict[str, jax.Array]:
    """:func:`simulate` for P problems at once: ``keys`` ``[P]``, every result with a leading axis P.

    The three stages: :func:`prepare` for each problem (``vmap``); the policies of all P
    problems trained together by :func:`rlhf_bounds.learners.train_policies` (problem axis last
    inside its loop, which is where vectorising across problems pays, in lane blocks of
    :func:`rlhf_bounds.learners.lane_block`); then :func:`finish` for each problem, ``vmap``-ed
    over blocks of ``finish_block`` problems at a time (``lax.map``; ``"auto"``:
    :func:`default_finish_block`; ``None``: all at once), so that the evaluation sets in flight
    stay small enough for the cache. ``catalogue=False`` leaves out the bound columns.

    ``extra``: a study's own columns for each problem, ``extra(spec, prep, fit, columns)`` with
    that problem's :class:`Prepared`, its trained :class:`~rlhf_bounds.learners.PolicyFit` and
    :func:`finish`'s columns; they are added to the columns and the ``status`` code is recomputed
    over all of them. The default columns stay those of the default kernel bit for bit. This is
    how a study that needs the trained policies of the default pipeline (the clipping sweep,
    the tightness ladder) plugs in without a copy of its stages.

    No arithmetic runs across problems, and every stage runs in blocks of fixed width: P is
    padded up to a multiple of :func:`batch_block` with copies of the first key (their results
    are dropped), so each problem's values are the same bit for bit whatever P, for a given
    ``finish_block`` (a kernel option: its vmapped reductions are compiled for that width;
    docs/engine.md, "Determinism").
    """
    if finish_block == "auto":
        finish_block = default_finish_block()
    P = keys.shape[0]
    pad = -P % batch_block(spec, finish_block)
    if pad:
        keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (pad,) + keys.shape[1:])])
    prep = jax.vmap(lambda k: prepare(spec, k))(keys)
    fit = train_policies(spec, prep.data, prep.world.w_ref, minibatch_indices(spec, shared_key))
    def finish_one(args):
        p, f = args
        out = finish(spec, p, f, catalogue=catalogue)
        if extra is not None:
            out.update(extra(spec, p, f, out))
            out["status"] = status_code(spec, out)
        return out

    if finish_block is None or finish_block >= P + pad:
        out = jax.vmap(finish_one)((prep, fit))
    else:
        out = jax.lax.map(finish_one, (prep, fit), batch_size=finish_block)
    return {k: v[:P] for k, v in out.items()} if pad else out


@dataclasses.dataclass(frozen=True)
class SimulateKernel:
    """The engine's default kernel: :func:`simulate_batch` as a per-chunk computation.

    A kernel is a hashable callable ``kernel(spec, keys [P], shared_key) -> {name: [P, ...]}``
    with a ``name`` (recorded with the run; a folder written by another kernel is refused).
    ``catalogue=False`` gives the simulator without the bound columns (for benchmarks).
    """

    finish_block: int | None | str = "auto"
    catalogue: bool = True

    @property
    def name(self) -> str:
        return "simulate" if self.catalogue else "simulate-no-catalogue"

    def __call__(self, spec: Spec, keys: jax.Array, shared_key: jax.Array) -> dict[str, jax.Array]:
        return simulate_batch(spec, keys, shared_key, self.finish_block, self.catalogue)


#: The kernel ``rlhf_bounds.run`` runs unless told otherwise.
KERNEL = SimulateKernel()


def simulate(spec: Spec, key: jax.Array, shared_key: jax.Array, *, chunk_size: int | None = None
             ) -> dict[str, jax.Array]:
    """Simulate one problem drawn from ``spec`` with PRNG ``key``.

    ``shared_key`` draws what all problems of a run may share without losing
    independence (the minibatch index sequence). The returned dict has the
    decomposition columns for the fixed-policy case (a fresh sample of n
    prompts and K rollouts drawn after training) and, with suffix ``_train``,
    on the training sample itself; the quantities later bounds need; the
    problem's parameters; and a ``status`` code.

    It is the engine's own computation of one problem: the default kernel compiled as the
    engine compiles it, on a one-problem chunk. Each chunk is padded to the kernel's fixed
    blocks (:func:`batch_block`), so a problem's results do not depend on its chunk, and
    problem i of ``rlhf_bounds.run(spec, problems, seed=s, chunk_size=c)`` equals
    ``simulate(spec, fold_in(problems_key, i), shared_key)`` bit for bit for every c, with
    ``(problems_key, shared_key) = rlhf_bounds.engine.problem_keys(s)`` (on one device;
    docs/engine.md, "Determinism"). ``chunk_size`` computes the problem in a chunk of that
    width (the same results).
    """
    from . import engine  # the engine imports this module

    return engine.simulate_one(spec, key, shared_key, chunk_size=chunk_size)
