"""Policy learners: GA, SGA and SGD on the training objective (docs/theory.md §16).

The training objective on the sample S is
    F_S(w) = (1/n) Σ_i Σ_a π_w(a|x_i) [r̂(x_i, a) − β ℓ^τ_w(x_i, a)],
with ℓ^τ the clipped log-ratio (τ = ∞, or ``train_log_ratio='exact'``, gives
the exact KL and F_S = (1/n) Σ_i f_w(x_i; r̂, β)).

All three learners are one optax loop over a shared step function:

* ``GA``  [A]: full batch, exact gradient, constant η;
* ``SGA`` [A]: one prompt per step, η_t = η0/√t;
* ``SGD``: a minibatch of b prompts drawn with replacement, constant or η0/√t
  step, gradient exact over responses or the score-function estimate from the
  prompt's K rollouts Y_ik(w) = F^{-1}_{π_w(·|x_i)}(U_ik) with a leave-one-out
  baseline (``rloo``) or none.

GA always uses the exact gradient; SGA and SGD use the spec's estimator
(``estimator='exact'`` gives [A]'s SGA). The score-function estimators fold
the penalty into the reward, so their expectation is Cov_{π_w}(φ, r̂ − βℓ^τ):
the exact gradient of F_S when τ = ∞, but not of the clipped surrogate, whose
gradient has the extra term −β Σ_a π_w 1{|ℓ| < τ}(φ_a − E_{π_w}φ). With finite
τ, SGD on rollouts and GA therefore head for different fixed points, as in
practical RLHF, where the clipped log-ratio is part of the reward signal.

The learners are written in the style of blackjax: :func:`learner` gives a pair
``init(w0) -> LearnerState`` and ``step(state, batch) -> LearnerState`` over a
:class:`Minibatch` (the prompts one step sees, already gathered), and
:func:`train_policies` is a ``lax.scan`` over ``step``. Studies that train in
other ways (many SGD chains on the same data, retraining on a sample with one
prompt replaced) build their own minibatches and call the same ``step``. The
learner's rules (step size, batch size, which τ trains, which estimator) are
the functions :func:`step_size`, :func:`batch_size`, :func:`training_tau` and
:func:`gradient_estimator`, and nowhere else.

The arrays inside the loop are *problem-last*: P problems side by side on the
last axis (Φ ``[m, A, d, P]``, w ``[d, P]``), which is where vectorising across
problems pays on CPU; each problem's arithmetic is its own. Many SGD chains
that each gather their own prompts step *lane-major* instead (``learner(spec,
layout='lane_major')``: lanes first, Φ ``[L, m, A, d]``, w ``[L, d]``), where
each lane's gathered rows feed one batched dot as they are; both layouts share
:func:`response_coefficients`. :func:`train_policies`
runs the loop in blocks of :func:`lane_block` problems, one compiled width
whatever P, so that a problem's result is the same bit for bit in any batch.

The loop is a ``lax.scan`` over checkpoints (every ``record_every`` steps) of a
``lax.scan`` over steps; at each checkpoint it records w and ‖∇F_S(w)‖ (exact,
full batch). The best-gradient iterate ([A] Def. 6) is the checkpoint with the
smallest gradient norm; with ``record_every = 1`` it is exact.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .policy import inverse_cdf, log_probs, response_objective
from .spec import Spec

__all__ = ["TrainData", "PolicyFit", "Minibatch", "LearnerState", "Learner", "prompt_objective", "exact_gradient",
           "rollout_gradient", "full_gradient", "minibatch_indices", "train_policy", "train_policies",
           "training_tau", "step_size", "batch_size", "gradient_estimator", "learner", "problem_last",
           "gather", "gather_lanes", "contract", "spread", "log_softmax", "coefficients", "gradient",
           "response_coefficients", "contract_lanes", "spread_lanes", "gradient_lanes", "lane_rows", "gather_rows",
           "LAYOUTS",
           "LANE_BLOCK", "lane_block"]


class TrainData(NamedTuple):
    """The training sample S: features ``[n, A, d]``, reward r̂ ``[n, A]``, rollout uniforms ``[n, K]``."""

    phi: jax.Array
    reward: jax.Array
    u: jax.Array


class PolicyFit(NamedTuple):
    """A learner's output: last and best-gradient iterates and the recorded trajectory.

    ``traj_w`` ``[J, d]`` and ``traj_grad_norm`` ``[J]`` are recorded after steps
    record_every, 2·record_every, ..., T.
    """

    w_last: jax.Array
    w_best: jax.Array
    grad_norm_last: jax.Array
    grad_norm_best: jax.Array
    traj_w: jax.Array
    traj_grad_norm: jax.Array


class Minibatch(NamedTuple):
    """Prompts of P problems, problem-last: Φ ``[m, A, d, P]``, log π_ref ``[m, A, P]``, r̂ ``[m, A, P]``,
    rollout uniforms ``[m, K, P]``. The whole training sample (:func:`problem_last`) is one too.
    Lane-major (:func:`gradient_lanes`), the lanes come first: Φ ``[L, m, A, d]``, ``[L, m, A]``, ``[L, m, K]``."""

    phi: jax.Array
    lp_ref: jax.Array
    reward: jax.Array
    u: jax.Array


class LearnerState(NamedTuple):
    """A learner's state for P problems: w ``[d, P]`` (``[L, d]`` lane-major) and the optax state
    (its step count among it)."""

    w: jax.Array
    opt_state: optax.OptState


class Learner(NamedTuple):
    """``init(w0 [d, P]) -> LearnerState`` and ``step(state, batch: Minibatch) -> LearnerState``."""

    init: Callable[[jax.Array], LearnerState]
    step: Callable[[LearnerState, Minibatch], LearnerState]


# ---- the learner's rules --------------------------------------------------------------------

def training_tau(spec: Spec):
    """The clipping threshold used in the training reward (∞ when ``train_log_ratio='exact'``)."""
    return spec.tau if spec.train_log_ratio == "clipped" else jnp.inf


def step_size(spec: Spec):
    """η: η0/√(t+1) at step t for SGA and the ``inv_sqrt`` schedule (an optax schedule), else the constant η."""
    if spec.learner == "SGA" or (spec.learner == "SGD" and spec.schedule == "inv_sqrt"):
        return lambda t: spec.lr / jnp.sqrt(t + 1.0)
    return spec.lr


def batch_size(spec: Spec) -> int:
    """Prompts per step: all n for GA, one for SGA, b for SGD."""
    return {"GA": spec.prompts, "SGA": 1}.get(spec.learner, spec.batch)


def gradient_estimator(spec: Spec) -> str:
    """The gradient a step uses: GA always the exact one, SGA and SGD the spec's ``estimator``."""
    return "exact" if spec.learner == "GA" else spec.estimator


# ---- one prompt (reference forms, vmappable) -------------------------------------------------

def prompt_objective(w, w_ref, phi, reward, beta, tau) -> jax.Array:
    """Σ_a π_w(a|x) [r(x, a) − β ℓ^τ_w(x, a)] for one prompt (``phi`` ``[A, d]``, ``reward`` ``[A]``)."""
    lp = log_probs(w, phi)
    return jnp.sum(jnp.exp(lp) * response_objective(reward, lp - log_probs(w_ref, phi), beta, tau))


def _exact_gradient(w, lp_ref, phi, reward, beta, tau) -> jax.Array:
    """:func:`exact_gradient` with the reference log-probabilities ``lp_ref`` ``[A]`` given."""
    lp = log_probs(w, phi)
    p = jnp.exp(lp)
    ell = lp - lp_ref
    h = response_objective(reward, ell, beta, tau)
    inside = (jnp.abs(ell) < tau).astype(p.dtype)
    coef = p * (h - jnp.sum(p * h) - beta * inside)
    # Σ_a coef_a (φ_a − φ̄) with Σ_a coef_a φ̄ = φ̄ Σ_a coef_a
    return coef @ phi - jnp.sum(coef) * (p @ phi)


def exact_gradient(w, w_ref, phi, reward, beta, tau) -> jax.Array:
    """∇_w of :func:`prompt_objective`, exact over responses, by hand:

        ∇ Σ_a π_a h_a = Σ_a π_a (h_a − h̄ − β·1{|ℓ_a| < τ}) (φ_a − φ̄),

    with h = r − βℓ^τ, h̄ = Σ_a π_a h_a and φ̄ = E_{π_w}φ, from ∇π_a = π_a(φ_a − φ̄) and
    ∇ℓ^τ_a = 1{|ℓ_a| < τ}(φ_a − φ̄). The tests check it against autodiff.
    """
    return _exact_gradient(w, log_probs(w_ref, phi), phi, reward, beta, tau)


def _rollout_gradient(w, lp_ref, phi, reward, u, beta, tau, baseline: str) -> jax.Array:
    """:func:`rollout_gradient` with the reference log-probabilities ``lp_ref`` ``[A]`` given."""
    lp = log_probs(w, phi)
    p = jnp.exp(lp)
    y = inverse_cdf(p, u)
    r = response_objective(reward[y], lp[y] - lp_ref[y], beta, tau)
    k = u.shape[0]
    if baseline == "rloo":
        adv = r - (jnp.sum(r) - r) / (k - 1)
    else:
        adv = r
    score = phi[y] - p @ phi
    return adv @ score / k


def rollout_gradient(w, w_ref, phi, reward, u, beta, tau, baseline: str) -> jax.Array:
    """Score-function estimate of the policy gradient from K rollouts of one prompt.

    With Y_k = F^{-1}_{π_w}(u_k) and R_k = r(x, Y_k) − β ℓ^τ_w(x, Y_k) treated as
    a reward (the KL penalty folded into the reward, as practical RLHF does),
        ĝ = (1/K) Σ_k (R_k − b_k) ∇_w log π_w(Y_k|x),   ∇_w log π_w(a|x) = φ(x, a) − E_{π_w}φ,
    with b_k = (Σ_{j≠k} R_j)/(K − 1) for ``rloo`` and b_k = 0 for ``none``.
    """
    return _rollout_gradient(w, log_probs(w_ref, phi), phi, reward, u, beta, tau, baseline)


def full_gradient(w, w_ref, data: TrainData, beta, tau) -> jax.Array:
    """∇F_S(w), exact over responses, averaged over all n training prompts."""
    lp_ref = jax.vmap(log_probs, in_axes=(None, 0))(w_ref, data.phi)
    g = jax.vmap(_exact_gradient, in_axes=(None, 0, 0, 0, None, None))(w, lp_ref, data.phi, data.reward, beta, tau)
    return jnp.mean(g, axis=0)


def minibatch_indices(spec: Spec, key: jax.Array) -> jax.Array:
    """The minibatch prompt indices ``[T, b]`` (b = 1 for SGA, unused by GA).

    The engine draws them from one key shared by all problems of a run: each
    problem's prompts are i.i.d., so a fixed index sequence is as random for
    each problem as a private one, and sharing it keeps the run's results
    independent of how problems are chunked.
    """
    b = 1 if spec.learner == "SGA" else spec.batch
    return jax.random.randint(key, (spec.steps, b), 0, spec.prompts, dtype=jnp.int32)


# ---- P problems, problem-last (the engine's layout) ------------------------------------------

_UNROLL_D = 64


def contract(phi, w):
    """Σ_k phi[..., k, :] · w[k, :] for problem-last ``phi`` ``[..., d, P]`` and ``w`` ``[d, P]``.

    Written as d multiply-adds of ``[..., P]`` slabs, so that XLA on CPU vectorises along
    the problem axis (an einsum or ``sum(axis=d)`` contracts d within each problem and runs
    about 2× slower here, benchmarks/README.md); an einsum beyond ``_UNROLL_D`` features.
    """
    d = w.shape[0]
    if d > _UNROLL_D:
        return jnp.einsum("...kp,kp->...p", phi, w)
    z = phi[..., 0, :] * w[0]
    for k in range(1, d):
        z = z + phi[..., k, :] * w[k]
    return z


def spread(coef, phi):
    """Σ over every leading axis of coef[..., a, P] · phi[..., a, k, P] → ``[d, P]`` (the transpose of :func:`contract`).

    One reduction over the leading axes, keeping (k, P) (d separate reductions ran 20% slower
    in the W1 training loop at 256 problems; an einsum would contract within each problem).
    """
    axes = tuple(range(coef.ndim - 1))
    return jnp.sum(coef[..., None, :] * phi, axis=axes)


def log_softmax(z, axis: int = 1):
    """log π over the response axis (axis 1 of ``[m, A, P]``), as :func:`rlhf_bounds.policy.log_probs` does it."""
    return z - jax.nn.logsumexp(z, axis=axis, keepdims=True)


def problem_last(data: TrainData, w_ref: jax.Array) -> Minibatch:
    """The training samples of P problems (leading axis P) as one problem-last :class:`Minibatch`.

    π_ref does not move: its log-probabilities are computed here once, not at every step.
    """
    phi = jnp.moveaxis(data.phi, 0, -1)                   # [n, A, d, P]
    w0 = jnp.moveaxis(w_ref, 0, -1)                       # [d, P]
    return Minibatch(phi, log_softmax(contract(phi, w0)), jnp.moveaxis(data.reward, 0, -1),
                     jnp.moveaxis(data.u, 0, -1))


def gather(full: Minibatch, idx: jax.Array) -> Minibatch:
    """The prompts ``idx`` ``[b]`` of every problem (the same indices for all P problems)."""
    return Minibatch(*(x[idx] for x in full))


def gather_lanes(full: Minibatch, idx: jax.Array) -> Minibatch:
    """The prompts ``idx[:, p]`` of lane p, for ``idx`` ``[b, P]``: each lane its own minibatch
    (many SGD chains side by side, each with its own index sequence)."""
    take = jax.vmap(lambda x, i: x[i], in_axes=(-1, -1), out_axes=-1)
    return Minibatch(*(take(x, idx) for x in full))


def coefficients(w, batch: Minibatch, beta, tau, estimator: str):
    """Per-response coefficients c ``[m, A, P]`` with the prompt's gradient estimate Σ_a c_a φ_a.

    Problem-last layout (:class:`Minibatch`), ``w`` ``[d, P]``: :func:`response_coefficients` of
    the logits φ·w (:func:`contract`) over the response axis 1.
    """
    return response_coefficients(contract(batch.phi, w), batch, beta, tau, estimator, axis=1)


def response_coefficients(z, batch: Minibatch, beta, tau, estimator: str, axis: int):
    """The coefficients c of the gradient estimate Σ_a c_a φ_a from the policy's logits ``z``, whose
    response axis is ``axis`` (1 in the problem-last layout, −1 lane-major); ``batch``'s log π_ref
    and r̂ are laid out as ``z``, and its rollout uniforms with the K rollouts on that axis.

    Both estimators are of the form Σ_a c_a (φ_a − φ̄) with φ̄ = Σ_a π_a φ_a, that is
    Σ_a (c_a − π_a Σ_a' c_a') φ_a:

    * exact: c_a = π_a (h_a − h̄ − β·1{|ℓ_a| < τ}) (:func:`exact_gradient`);
    * rollouts: c_a = (1/K) Σ_k adv_k 1{Y_k = a} (:func:`rollout_gradient`).
    """
    _, lp_ref, reward, u = batch
    ax = axis % z.ndim
    total = lambda x: jnp.sum(x, axis=ax, keepdims=True)
    lp = log_softmax(z, axis=ax)
    p = jnp.exp(lp)
    ell = lp - lp_ref
    h = response_objective(reward, ell, beta, tau)
    if estimator == "exact":
        inside = (jnp.abs(ell) < tau).astype(p.dtype)
        c = p * (h - total(p * h) - beta * inside)
    else:
        # the rollouts' axis K sits where the responses' axis is; the pairs (k, a) on axes (ax, ax + 1)
        shape = [1] * z.ndim
        shape[ax] = p.shape[ax]
        responses = jnp.arange(p.shape[ax], dtype=jnp.int32).reshape(shape)
        cdf = jnp.cumsum(p, axis=ax)
        y = jnp.sum(jnp.expand_dims(cdf, ax) <= jnp.expand_dims(u, ax + 1), axis=ax + 1, dtype=jnp.int32)
        # as policy.inverse_cdf: never a response of probability 0 when cdf[-1] < 1 by round-off
        last = jnp.max(jnp.where(p > 0, responses, 0), axis=ax, keepdims=True)
        y = jnp.minimum(y, last)                                                 # K on axis ax
        onehot = (jnp.expand_dims(y, ax + 1) == jnp.expand_dims(responses, ax)).astype(p.dtype)
        r = jnp.sum(onehot * jnp.expand_dims(h, ax), axis=ax + 1)                # K on axis ax
        k = u.shape[ax]
        adv = r - (jnp.sum(r, axis=ax, keepdims=True) - r) / (k - 1) if estimator == "rloo" else r
        c = jnp.sum(onehot * jnp.expand_dims(adv, ax + 1), axis=ax) / k          # A on axis ax
    return c - p * total(c)


def gradient(w, batch: Minibatch, beta, tau, estimator: str) -> jax.Array:
    """The gradient estimate ``[d, P]`` of the mean objective over the batch's prompts (ascent direction)."""
    return spread(coefficients(w, batch, beta, tau, estimator), batch.phi) / batch.phi.shape[0]


# ---- L lanes, lane-major (many chains, each with its own minibatch) -------------------------------

def contract_lanes(phi, w):
    """Σ_k phi[l, ..., k] · w[l, k] for lane-major ``phi`` ``[L, ..., d]`` and ``w`` ``[L, d]`` → ``[L, ...]``.

    One batched XLA dot over the lanes: when each lane gathers its own prompts, the gathered rows
    (A·d contiguous floats per prompt) are the dot's operand as they are, with no transpose.
    """
    lanes, d = w.shape
    z = jax.lax.dot_general(phi.reshape(lanes, -1, d), w, (((2,), (1,)), ((0,), (0,))),
                            precision=jax.lax.Precision.HIGHEST)
    return z.reshape(phi.shape[:-1])


def spread_lanes(coef, phi):
    """Σ over every middle axis of coef[l, ..., a] · phi[l, ..., a, k] → ``[L, d]``
    (the transpose of :func:`contract_lanes`)."""
    lanes, d = coef.shape[0], phi.shape[-1]
    return jax.lax.dot_general(coef.reshape(lanes, -1), phi.reshape(lanes, -1, d), (((1,), (1,)), ((0,), (0,))),
                               precision=jax.lax.Precision.HIGHEST)


def gradient_lanes(w, batch: Minibatch, beta, tau, estimator: str) -> jax.Array:
    """:func:`gradient` in the lane-major layout: ``w`` ``[L, d]``, Φ ``[L, m, A, d]``, log π_ref and r̂
    ``[L, m, A]``, rollout uniforms ``[L, m, K]``; the same coefficients (:func:`response_coefficients`)."""
    c = response_coefficients(contract_lanes(batch.phi, w), batch, beta, tau, estimator, axis=-1)
    return spread_lanes(c, batch.phi) / batch.phi.shape[1]


def lane_rows(data: TrainData, w_ref: jax.Array) -> Minibatch:
    """The training samples of Q problems (leading axis Q) as rows: Φ ``[Q·n, A, d]``, log π_ref and
    r̂ ``[Q·n, A]``, uniforms ``[Q·n, K]``; row q·n + i is prompt i of problem q. Indexing it with
    rows ``[L, m]`` gives a lane-major :class:`Minibatch` for :func:`gradient_lanes`."""
    lp_ref = jnp.moveaxis(problem_last(data, w_ref).lp_ref, -1, 0)   # the same bits (the rest is dead code to XLA)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    return Minibatch(flat(data.phi), flat(lp_ref), flat(data.reward), flat(data.u))


def gather_rows(rows: Minibatch, idx: jax.Array, prompts: int) -> Minibatch:
    """The lane-major minibatch of ``idx`` ``[b, C]`` from Q problems' :func:`lane_rows`: lane q·C + c
    holds prompts ``idx[:, c]`` of problem q (C chains per problem, each with its own indices,
    shared by the problems), each prompt one whole row."""
    Q = rows.phi.shape[0] // prompts
    lanes = (idx.T[None] + prompts * jnp.arange(Q, dtype=idx.dtype)[:, None, None]).reshape(-1, idx.shape[0])
    return Minibatch(*(x[lanes] for x in rows))


#: The layouts a :func:`learner` steps in: P problems side by side on the last axis, or L lanes on the first.
LAYOUTS = ("problem_last", "lane_major")


def learner(spec: Spec, layout: str = "problem_last") -> Learner:
    """The spec's learner as ``(init, step)``: optax SGD with :func:`step_size`, ascending
    :func:`gradient` with :func:`gradient_estimator` at :func:`training_tau`.

    ``layout='lane_major'`` steps w ``[L, d]`` on lane-major minibatches (:func:`gradient_lanes`,
    the same coefficients): the layout of many SGD chains that each gather their own prompts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not allowed: must be one of {', '.join(LAYOUTS)}")
    beta, tau, estimator = spec.beta, training_tau(spec), gradient_estimator(spec)
    grad = gradient if layout == "problem_last" else gradient_lanes
    opt = optax.sgd(step_size(spec))

    def init(w0: jax.Array) -> LearnerState:
        return LearnerState(w0, opt.init(w0))

    def step(state: LearnerState, batch: Minibatch) -> LearnerState:
        g = grad(state.w, batch, beta, tau, estimator)
        updates, opt_state = opt.update(-g, state.opt_state, state.w)  # ascent on F_S
        return LearnerState(optax.apply_updates(state.w, updates), opt_state)

    return Learner(init, step)


#: Problems trained side by side in one compiled loop (:func:`train_policies`): the lane block.
LANE_BLOCK = 128


def lane_block(spec: Spec) -> int:
    """Lanes of one compiled training loop: :func:`train_policies` trains any number of problems
    in blocks of this many, so that the loop XLA compiles, and hence each problem's float32
    arithmetic, is the same whatever the number of problems.

    :data:`LANE_BLOCK` (128: on CPU at W1's shape as fast per problem as one loop over 256
    problems, and 64 lanes were slower, benchmarks/README.md), halved while a block's training
    sets (n·A·d floats per problem) would exceed 64 MB, down to 8. A function of the spec's
    shapes only, never of the number of problems.
    """
    block, per_problem = LANE_BLOCK, 4 * spec.prompts * spec.actions * spec.d
    while block > 8 and block * per_problem > 64e6:
        block //= 2
    return block


def _train_block(spec: Spec, data: TrainData, w_ref: jax.Array, indices: jax.Array) -> PolicyFit:
    """The training loop over one block of problems (leading axis P on every input and output)."""
    full = problem_last(data, w_ref)
    init, step = learner(spec)
    beta, tau = spec.beta, training_tau(spec)

    def full_gradient_norm(w):
        return jnp.sqrt(jnp.sum(jnp.square(gradient(w, full, beta, tau, "exact")), axis=0))

    def one_step(state, idx):
        return step(state, full if spec.learner == "GA" else gather(full, idx)), None

    def checkpoint(state, idx_block):
        state, _ = jax.lax.scan(one_step, state, idx_block)
        return state, (state.w, full_gradient_norm(state.w))

    n_ckpt = spec.steps // spec.record_every
    idx = indices.reshape(n_ckpt, spec.record_every, -1)
    state, (traj_w, traj_g) = jax.lax.scan(checkpoint, init(jnp.moveaxis(w_ref, 0, -1)), idx)
    # traj_w [J, d, P], traj_g [J, P]
    best = jnp.argmin(traj_g, axis=0)                     # [P]
    w_best = jnp.take_along_axis(traj_w, best[None, None, :], axis=0)[0]
    g_best = jnp.take_along_axis(traj_g, best[None, :], axis=0)[0]
    return PolicyFit(state.w.T, w_best.T, traj_g[-1], g_best, jnp.transpose(traj_w, (2, 0, 1)), traj_g.T)


def train_policies(spec: Spec, data: TrainData, w_ref: jax.Array, indices: jax.Array,
                   lanes: int | None | str = "auto") -> PolicyFit:
    """:func:`train_policy` for P problems at once (leading axis P on every input and output).

    The engine's kernel: a ``lax.scan`` of :func:`learner`'s ``step`` over the problem-last
    training samples (:func:`problem_last`), which is 1.8× faster on CPU than
    ``vmap(train_policy)`` (benchmarks/README.md). Each problem's arithmetic is its own: no
    reduction runs across problems. ``indices`` ``[T, b]`` are shared by all P (GA ignores them).

    The problems are trained in blocks of ``lanes`` (``"auto"``: :func:`lane_block`), one
    compiled loop of that width run over the blocks (P is padded with copies of problem 0 up
    to a multiple of it, and the copies dropped). XLA vectorises the problem axis differently
    for other widths, and SGD amplifies a last-bit difference, so a fixed block is what makes
    every problem's result bit for bit the same whatever P (``lanes=None``: one loop over all P).
    """
    P = w_ref.shape[0]
    lanes = lane_block(spec) if lanes == "auto" else lanes
    if lanes is None:
        return _train_block(spec, data, w_ref, indices)
    blocks = -(-P // lanes)
    pad = blocks * lanes - P

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
        return x.reshape((blocks, lanes) + x.shape[1:])

    train = lambda b: _train_block(spec, b[0], b[1], indices)
    blocked = jax.tree_util.tree_map(split, (data, w_ref))
    fit = jax.lax.map(train, blocked)  # a loop over blocks: vmap would widen the loop again
    return jax.tree_util.tree_map(lambda x: x.reshape((blocks * lanes,) + x.shape[2:])[:P], fit)


def train_policy(spec: Spec, data: TrainData, w_ref: jax.Array, indices: jax.Array) -> PolicyFit:
    """Run the spec's learner from w_0 = w_ref for T steps; see the module docstring.

    One problem: :func:`train_policies` with P = 1 (padded to one lane block), so that there is
    one implementation and the result is the engine's for this problem, bit for bit.
    """
    fit = train_policies(spec, jax.tree_util.tree_map(lambda x: x[None], data), w_ref[None], indices)
    return jax.tree_util.tree_map(lambda x: x[0], fit)
