"""learners.py: the per-prompt objective, its gradients and the GA/SGA/SGD loops (docs/theory.md §16).

Hand references (NumPy, float64):

* ∇_w Σ_a π_w(a)[r_a − βℓ^τ_w(a)] = Σ_a π_a (φ_a − φ̄)(r_a − βℓ^τ_a) − β Σ_a π_a 1{|ℓ_a| < τ}(φ_a − φ̄),
  using ∇_w log π_w(a) = φ_a − φ̄ and ∇_w ℓ^τ_a = 1{|ℓ_a| < τ}(φ_a − φ̄);
  for a linear reward and τ = ∞ this is V_x(w)(θ − β(w − w_ref)) ([A] Lemma 11);
* the score-function estimator's expectation: E ĝ = Cov_π(φ, r − βℓ^τ) (the
  penalty is treated as a reward, not differentiated), for ``none`` and for
  ``rloo`` (the leave-one-out baseline is independent of Y_k). Its second
  term above is missing, so E ĝ = ∇ of the objective exactly when τ = ∞ (then
  Σ_a π_a ∇ℓ_a = E_π ∇log π = 0).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_bounds import learners as L
from rlhf_bounds import world as W
from rlhf_bounds.policy import inverse_cdf
from rlhf_bounds.spec import Spec
from conftest import assert_close, np_inverse_cdf, np_log_ratio, np_probs, random_prompt

INF = math.inf

# Jitted once per shape: far fewer compilations than op-by-op dispatch on a small CPU.
prompt_objective = jax.jit(L.prompt_objective)
exact_gradient = jax.jit(L.exact_gradient)
rollout_gradient = jax.jit(L.rollout_gradient, static_argnums=7)
full_gradient = jax.jit(L.full_gradient)


def np_prompt_objective(w, w_ref, phi, r, beta, tau):
    p = np_probs(w, phi)
    return np.sum(p * (r - beta * np.clip(np_log_ratio(w, w_ref, phi), -tau, tau)))


def np_prompt_gradient(w, w_ref, phi, r, beta, tau):
    """The hand gradient in the module docstring (full derivative of the clipped objective)."""
    p = np_probs(w, phi)
    ell = np_log_ratio(w, w_ref, phi)
    centred = phi - p @ phi
    h = r - beta * np.clip(ell, -tau, tau)
    inside = (np.abs(ell) < tau).astype(np.float64)
    return (p * h) @ centred - beta * (p * inside) @ centred


def np_detached_gradient(w, w_ref, phi, r, beta, tau):
    """Cov_π(φ, r − βℓ^τ): the expectation of the score-function estimator."""
    p = np_probs(w, phi)
    h = r - beta * np.clip(np_log_ratio(w, w_ref, phi), -tau, tau)
    return (p * h) @ (phi - p @ phi)


def np_rollout_gradient(w, w_ref, phi, r, u, beta, tau, baseline):
    """The estimator on one draw, written from the docstring with NumPy's searchsorted inverse CDF."""
    p = np_probs(w, phi)
    y = np_inverse_cdf(p, u)
    R = r[y] - beta * np.clip(np_log_ratio(w, w_ref, phi)[y], -tau, tau)
    K = len(u)
    adv = R - (R.sum() - R) / (K - 1) if baseline == "rloo" else R
    return adv @ (phi[y] - p @ phi) / K


def np_train_objective(w, phi, r, w_ref, beta, tau):
    return np.mean([np_prompt_objective(w, w_ref, phi[i], r[i], beta, tau) for i in range(len(phi))])


def np_full_gradient(w, phi, r, w_ref, beta, tau):
    return np.mean([np_prompt_gradient(w, w_ref, phi[i], r[i], beta, tau) for i in range(len(phi))], axis=0)


# ---- per-prompt maths ------------------------------------------------------------------------

CASES = [(5, 3, 1.0, 0.3, INF), (5, 3, 2.0, 1.0, 0.4), (8, 4, 1.0, 2.0, 0.05),
         (4, 6, 3.0, 0.1, 1.0)]
CASE_IDS = [f"A{a}-d{d}-s{s:g}-b{b:g}-t{t:g}" for a, d, s, b, t in CASES]


@pytest.mark.parametrize("A,d,scale,beta,tau", CASES, ids=CASE_IDS)
def test_prompt_objective_and_exact_gradient(rng, A, d, scale, beta, tau):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    r = rng.normal(size=A)
    assert_close(prompt_objective(w, w_ref, phi, r, beta, tau), np_prompt_objective(w, w_ref, phi, r, beta, tau),
                 rtol=1e-10, atol=1e-12)
    g = np.asarray(exact_gradient(jnp.asarray(w), w_ref, phi, r, beta, tau))
    assert_close(g, np_prompt_gradient(w, w_ref, phi, r, beta, tau), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("A,d,scale,beta", [(3, 2, 1.0, 0.5), (6, 4, 2.0, 0.1), (8, 8, 1.0, 3.0)])
def test_exact_gradient_closed_form_linear_reward(rng, A, d, scale, beta):
    """Linear reward ⟨θ, φ⟩ and τ = ∞: ∇ = V_x(w)(θ − β(w − w_ref)), V_x the π_w-covariance of φ (NumPy)."""
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    theta = rng.normal(size=d)
    p = np_probs(w, phi)
    V = np.cov(phi.T, aweights=p, bias=True)
    expected = V @ (theta - beta * (w - w_ref))
    assert_close(exact_gradient(jnp.asarray(w), w_ref, phi, phi @ theta, beta, INF), expected,
                 rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("A,d,scale,beta,tau", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("baseline", ["none", "rloo"])
def test_rollout_gradient_single_draw_matches_numpy(rng, A, d, scale, beta, tau, baseline):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    r = rng.normal(size=A)
    u = rng.uniform(size=5)
    got = rollout_gradient(jnp.asarray(w), w_ref, phi, r, u, beta, tau, baseline)
    assert_close(got, np_rollout_gradient(w, w_ref, phi, r, u, beta, tau, baseline), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("A,d,scale,beta,tau", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("baseline,K", [("none", 1), ("none", 3), ("rloo", 3)])
def test_rollout_gradient_expectation_by_enumeration(rng, A, d, scale, beta, tau, baseline, K):
    """E_U ĝ computed exactly: every (Y_1..Y_K) ∈ [A]^K, weight Π π(Y_k), u_k at the middle of Y_k's CDF cell.

    E ĝ = Cov_π(φ, r − βℓ^τ) for both baselines; at τ = ∞ that is the exact
    gradient of the true objective (score function with the KL penalty as reward is unbiased).
    """
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    r = rng.normal(size=A)
    p = np_probs(w, phi)
    assert p.min() > 1e-8  # cells wide enough for the midpoints to be unambiguous
    mids = np.cumsum(p) - p / 2
    combos = np.array(list(itertools.product(range(A), repeat=K)))
    weights = np.prod(p[combos], axis=1)
    args = [jnp.asarray(x) for x in (w, w_ref, phi, r)]
    grads = jax.jit(jax.vmap(lambda u: rollout_gradient(*args, u, beta, tau, baseline)))(mids[combos])
    expectation = weights @ np.asarray(grads)
    assert_close(expectation, np_detached_gradient(w, w_ref, phi, r, beta, tau), rtol=1e-8, atol=1e-11)
    if tau == INF:
        assert_close(expectation, exact_gradient(jnp.asarray(w), w_ref, phi, r, beta, tau), rtol=1e-8, atol=1e-11)


def test_rollout_gradient_monte_carlo_mean():
    """Float32, random uniforms (as in training): the mean of 40 000 draws of ĝ within 4.5 SE of ∇f (τ = ∞).

    The standard error per coordinate is the sample sd of ĝ over draws / √N (CLT).
    """
    rng = np.random.default_rng(5)
    w, w_ref, phi = random_prompt(rng, 6, 3, 1.5)
    r = rng.normal(size=6)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    u = jax.random.uniform(jax.random.key(6), (40_000, 4), jnp.float32)
    for baseline in ("none", "rloo"):
        g = np.asarray(jax.jit(jax.vmap(lambda uk: rollout_gradient(f32(w), f32(w_ref), f32(phi), f32(r), uk,
                                                                        0.7, INF, baseline)))(u), np.float64)
        target = np_prompt_gradient(w, w_ref, phi, r, 0.7, INF)
        se = g.std(axis=0, ddof=1) / math.sqrt(len(g))
        assert np.all(np.abs(g.mean(axis=0) - target) <= 4.5 * se + 1e-6), (baseline, g.mean(axis=0), target, se)


def test_rloo_reduces_variance_at_the_optimum():
    """At w = w_ref + θ/β with a linear reward, r − βℓ is the same for every response, so RLOO's ĝ is 0 exactly
    (docs/theory.md §8's degenerate corner) while the baseline-free estimator is not."""
    rng = np.random.default_rng(7)
    _, w_ref, phi = random_prompt(rng, 5, 3, 1.0)
    theta = rng.normal(size=3)
    args = [jnp.asarray(x) for x in (w_ref + theta / 0.5, w_ref, phi, phi @ theta)]
    u = rng.uniform(size=(50, 4))
    rloo = np.asarray(jax.jit(jax.vmap(lambda uk: rollout_gradient(*args, uk, 0.5, INF, "rloo")))(u))
    none = np.asarray(jax.jit(jax.vmap(lambda uk: rollout_gradient(*args, uk, 0.5, INF, "none")))(u))
    assert np.abs(rloo).max() < 1e-12
    assert np.abs(none).max() > 1e-3


def test_full_gradient_is_mean_of_prompt_gradients(rng):
    n, A, d = 6, 4, 3
    phi = rng.normal(size=(n, A, d))
    r = rng.normal(size=(n, A))
    w, w_ref = rng.normal(size=d), rng.normal(size=d)
    data = L.TrainData(phi, r, rng.uniform(size=(n, 2)))
    for tau in (0.3, INF):
        assert_close(full_gradient(jnp.asarray(w), w_ref, data, 0.4, tau), np_full_gradient(w, phi, r, w_ref, 0.4, tau),
                     rtol=1e-8, atol=1e-11)


def test_training_tau():
    assert L.training_tau(Spec(tau=0.7, train_log_ratio="clipped")) == 0.7
    assert L.training_tau(Spec(tau=0.7, train_log_ratio="exact")) == INF


@pytest.mark.parametrize("learner,b", [("GA", 5), ("SGA", 1), ("SGD", 5)])
def test_minibatch_indices(learner, b):
    spec = Spec(prompts=7, steps=40, batch=5, record_every=10, learner=learner).validate()
    idx = np.asarray(L.minibatch_indices(spec, jax.random.key(0)))
    assert idx.shape == (40, b) and idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < 7
    assert len(np.unique(idx)) == 7  # 40·b uniform draws from 7 prompts hit all of them (P(miss) < 7·(6/7)^40)


# ---- the training loops ----------------------------------------------------------------------

def problem(spec, seed, sigma=0.0):
    """A realizable (σ = 0) or misspecified training set in float32: r = ⟨θ*, φ⟩ + σξ."""
    world = jax.jit(W.draw_world)(spec, jax.random.key(seed))
    pr = jax.jit(W.draw_prompts, static_argnums=3)(spec, world, jax.random.key(seed + 1), spec.prompts)
    reward = pr.phi @ world.theta_star + sigma * pr.xi
    u = jax.random.uniform(jax.random.key(seed + 2), (spec.prompts, spec.rollouts), jnp.float32)
    return world, L.TrainData(pr.phi, reward, u)


train = jax.jit(L.train_policy)


def loop_spec(learner, estimator="exact", **traced):
    """The loop tests' shared static shapes (one compilation per learner/estimator; β, τ, η are traced)."""
    return Spec(d=3, actions=6, prompts=32, rollouts=4, steps=100, record_every=10, batch=8, learner=learner,
                estimator=estimator, reward_model="oracle", **traced).validate()


def as64(data):
    return [np.asarray(x, np.float64) for x in data]


def test_ga_converges_to_closed_form_optimum():
    """Realizable oracle data, τ = ∞, exact gradient: GA reaches w = w_ref + θ*/β ([A] Prop. 1).

    F_S = mean_i −βKL(π_w ‖ π_{w_ref+θ*/β}) + const, maximised at w_ref + θ*/β; with
    features spanning R^d it is the unique maximiser. η = 1 contracts by ≈ (1 − ηβλ(V)) per step.
    """
    spec = loop_spec("GA", beta=0.8, lr=1.0)
    world, data = problem(spec, 10)
    fit = train(spec, data, world.w_ref, L.minibatch_indices(spec, jax.random.key(0)))
    w_star = np.asarray(world.theta_star, np.float64) / spec.beta  # w_ref = 0
    assert np.linalg.norm(np.asarray(fit.w_last) - w_star) <= 1e-5 * (1 + np.linalg.norm(w_star))
    phi, r, _ = as64(data)
    # w* is stationary up to the float32 rounding of the data r = ⟨θ*, φ⟩ (~1e-7 relative).
    assert np.linalg.norm(np_full_gradient(w_star, phi, r, np.zeros(3), spec.beta, INF)) < 1e-6
    assert float(fit.grad_norm_last) < 1e-6
    assert np.all(np.diff(np.asarray(fit.traj_grad_norm))[:4] < 0)  # linear convergence: norms fall at first


@pytest.mark.parametrize("learner,estimator,schedule", [("GA", "exact", "constant"), ("SGA", "exact", "constant"),
                                                        ("SGD", "exact", "inv_sqrt"), ("SGD", "rloo", "constant")])
def test_first_steps_by_hand(learner, estimator, schedule):
    """record_every = 1, T = 3: each recorded w_t equals w_{t−1} + η_t ĝ_t computed in NumPy.

    GA: η, full gradient; SGA: η0/√t, one prompt; SGD: batch mean, η or η0/√t;
    the clipped log-ratio (τ = 0.3) is used in the training reward.
    """
    spec = Spec(d=3, actions=5, prompts=8, rollouts=3, steps=3, record_every=1, batch=4, learner=learner,
                estimator=estimator, schedule=schedule, beta=0.5, lr=0.7, tau=0.3).validate()
    world, data = problem(spec, 20, sigma=0.5)
    idx = L.minibatch_indices(spec, jax.random.key(1))
    fit = train(spec, data, world.w_ref, idx)
    phi, r, u = as64(data)
    idx = np.asarray(idx)
    w_ref = np.zeros(3)
    w = w_ref.copy()
    for t in range(1, 4):
        if learner == "GA":
            g = np_full_gradient(w, phi, r, w_ref, 0.5, 0.3)
        elif estimator == "exact":
            g = np.mean([np_prompt_gradient(w, w_ref, phi[i], r[i], 0.5, 0.3) for i in idx[t - 1]], axis=0)
        else:
            g = np.mean([np_rollout_gradient(w, w_ref, phi[i], r[i], u[i], 0.5, 0.3, estimator) for i in idx[t - 1]],
                        axis=0)
        eta = 0.7 / math.sqrt(t) if (learner == "SGA" or schedule == "inv_sqrt") else 0.7
        w = w + eta * g
        assert_close(fit.traj_w[t - 1], w, rtol=1e-5, atol=1e-6, what=f"step {t}")
        assert_close(fit.traj_grad_norm[t - 1], np.linalg.norm(np_full_gradient(w, phi, r, w_ref, 0.5, 0.3)),
                     rtol=1e-4, atol=1e-6, what=f"grad norm {t}")


LOOPS = [("GA", "exact"), ("SGA", "exact"), ("SGD", "exact"), ("SGD", "rloo"), ("SGD", "none")]


@pytest.mark.parametrize("learner,estimator", LOOPS)
def test_trajectory_and_best_iterate(learner, estimator):
    """Shapes; w_last = last recorded w; w_best = argmin of recorded ‖∇F_S‖; each recorded norm is ‖∇F_S(w_j)‖.

    Misspecified reward (σ = 0.3) and τ = 1 with β = 0.3, η = 2: the clipped objective's gradient norms.
    """
    spec = loop_spec(learner, estimator, beta=0.3, lr=2.0, tau=1.0)
    world, data = problem(spec, 30, sigma=0.3)
    fit = train(spec, data, world.w_ref, L.minibatch_indices(spec, jax.random.key(2)))
    J = spec.steps // spec.record_every
    assert fit.traj_w.shape == (J, 3) and fit.traj_grad_norm.shape == (J,)
    assert fit.w_last.shape == fit.w_best.shape == (3,)
    np.testing.assert_array_equal(np.asarray(fit.w_last), np.asarray(fit.traj_w[-1]))
    best = int(np.argmin(np.asarray(fit.traj_grad_norm)))
    np.testing.assert_array_equal(np.asarray(fit.w_best), np.asarray(fit.traj_w[best]))
    assert float(fit.grad_norm_best) == float(np.min(np.asarray(fit.traj_grad_norm)))
    assert float(fit.grad_norm_last) == float(fit.traj_grad_norm[-1])
    phi, r, _ = as64(data)
    norms = [np.linalg.norm(np_full_gradient(np.asarray(wj, np.float64), phi, r, np.zeros(3), 0.3, 1.0))
             for wj in np.asarray(fit.traj_w)]
    assert_close(fit.traj_grad_norm, norms, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("learner,estimator", LOOPS[1:])
def test_stochastic_learners_increase_the_training_objective(learner, estimator):
    """From w_ref, SGA/SGD raise F_S and close most of the gap to its maximum (found by GA to ‖∇‖ < 1e-6).

    Realizable oracle reward and τ = ∞, so the maximum is at w_ref + θ*/β. A
    stochastic learner with a fixed seed must recover at least half of F_S(w*) − F_S(w_ref).
    """
    spec = loop_spec(learner, estimator, beta=0.8, lr=1.0)
    world, data = problem(spec, 40)
    fit = train(spec, data, world.w_ref, L.minibatch_indices(spec, jax.random.key(3)))
    phi, r, _ = as64(data)
    w_ref = np.zeros(3)
    w_star = np.asarray(world.theta_star, np.float64) / spec.beta
    F = lambda w: np_train_objective(np.asarray(w, np.float64), phi, r, w_ref, spec.beta, INF)
    f0, f_star, f_last = F(w_ref), F(w_star), F(fit.w_last)
    assert f_star > f0
    assert f_last > f0 + 0.5 * (f_star - f0), (f0, f_last, f_star)
    assert f_last <= f_star + 1e-6


@pytest.mark.parametrize("A,d,scale,beta,tau", CASES, ids=CASE_IDS)
def test_hand_gradient_matches_autodiff(rng, A, d, scale, beta, tau):
    """The hand-written exact gradient against jax.grad of the per-prompt objective (float64)."""
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    r = rng.normal(size=A)
    args = [jnp.asarray(x, jnp.float64) for x in (w, w_ref, phi, r)]
    auto = jax.grad(L.prompt_objective)(*args, beta, tau)
    assert_close(L.exact_gradient(*args, beta, tau), auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("learner,estimator,d", [("GA", "exact", 3), ("SGA", "exact", 3), ("SGD", "exact", 3),
                                                 ("SGD", "rloo", 3), ("SGD", "none", 3), ("SGD", "rloo", 70)])
def test_train_policies_is_train_policy_per_problem(learner, estimator, d):
    """The engine's batched trainer (problem axis last) gives each problem what it gets alone.

    Three problems with their own data, trained together, against train_policy on each
    (which is train_policies with one problem: the rollout, clipping, schedule and
    checkpoint logic is pinned by the NumPy step tests above). d = 70 takes the einsum
    path instead of the unrolled multiply-adds. Both train in one block of
    ``lane_block(spec)`` lanes (padded), so the results are the same bit for bit.
    """
    spec = Spec(d=d, actions=6, prompts=32, rollouts=4, steps=100, record_every=10, batch=8, learner=learner,
                estimator=estimator, reward_model="oracle", beta=0.5, lr=0.5, tau=0.4).validate()
    worlds, datas = zip(*(problem(spec, 40 + 7 * i, sigma=0.3) for i in range(3)))
    idx = L.minibatch_indices(spec, jax.random.key(4))
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *datas)
    w_ref = jnp.stack([wd.w_ref for wd in worlds])
    together = jax.jit(L.train_policies)(spec, stacked, w_ref, idx)
    for i in range(3):
        alone = train(spec, datas[i], worlds[i].w_ref, idx)
        for name in L.PolicyFit._fields:
            got, want = np.asarray(getattr(together, name)[i]), np.asarray(getattr(alone, name))
            assert got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_train_policies_gives_a_problem_the_same_bits_in_any_batch():
    """A problem trained alone, among 3, or among 130 (two lane blocks, the second padded) ends bit for
    bit the same: the loop XLA compiles has one width, ``lane_block(spec)``, whatever the batch (with
    one loop over the whole batch, ``lanes=None``, the vector layout and so the last bits change with
    the batch width, and the clipped, rollout-driven SGD below amplifies them)."""
    spec = Spec(d=4, actions=6, prompts=32, rollouts=4, steps=200, record_every=50, batch=8, learner="SGD",
                estimator="rloo", reward_model="oracle", beta=0.5, lr=1.0, tau=0.3).validate()
    assert L.lane_block(spec) == L.LANE_BLOCK == 128
    worlds, datas = zip(*(problem(spec, 60 + 5 * i, sigma=0.3) for i in range(5)))
    idx = L.minibatch_indices(spec, jax.random.key(6))
    picks = [0, 1, 2] + [3 + (i % 2) for i in range(127)]  # problems 0-2, then 127 lanes of problems 3 and 4
    stack = lambda ids: (jax.tree_util.tree_map(lambda *x: jnp.stack(x), *(datas[i] for i in ids)),
                         jnp.stack([worlds[i].w_ref for i in ids]))
    fits = {P: jax.jit(L.train_policies)(spec, *stack(picks[:P]), idx) for P in (1, 3, 130)}
    for name in L.PolicyFit._fields:
        for P in (1, 3):
            np.testing.assert_array_equal(np.asarray(getattr(fits[P], name)[:P]),
                                          np.asarray(getattr(fits[130], name)[:P]), err_msg=f"{name}, P={P}")


@pytest.mark.parametrize("baseline", ["rloo", "none"])
def test_batched_rollouts_never_pick_a_response_of_probability_zero(baseline):
    """Responses whose π_w underflows to 0 in float32 are never drawn, even at u → 1 where the cdf's
    round-off leaves cdf[-1] < u (these logits were found by search to do that): the batched
    coefficients give the per-prompt score-function estimate (policy.inverse_cdf's draws)."""
    logits = np.array([[-3.7771964, 4.5417714, 4.0376263, 2.343934, -300.0, -400.0],
                       [0.9869089, -0.7757176, 4.7504187, 3.961083, -300.0, -400.0],
                       [3.6892614, -3.316101, 3.0904655, 0.5304374, -300.0, -400.0]], np.float32)
    phi = np.stack([logits, np.linspace(-0.5, 0.5, 18, dtype=np.float32).reshape(3, 6)], axis=-1)  # [3, 6, 2]
    reward = np.array([[1.0, -1.0, 0.5, 2.0, 5.0, 7.0]] * 3, np.float32)
    top = np.nextafter(np.float32(1), np.float32(0))
    u = np.array([[top, 0.5, 0.25], [top, 0.1, 0.99], [0.3, top, 0.7]], np.float32)
    w, w_ref = np.array([1.0, 0.0], np.float32), np.zeros(2, np.float32)
    beta, tau = 0.5, 1.0
    p = np.asarray(jax.nn.softmax(jnp.asarray(phi) @ w, axis=-1))
    assert np.all(p[:, 4:] == 0) and np.all(np.cumsum(p, axis=-1, dtype=np.float32)[:, -1] < top)
    lp_ref = jax.nn.log_softmax(jnp.asarray(phi) @ w_ref, axis=-1)
    batch = L.Minibatch(jnp.asarray(phi)[..., None], lp_ref[..., None], jnp.asarray(reward)[..., None],
                        jnp.asarray(u)[..., None])
    c = L.coefficients(jnp.asarray(w)[:, None], batch, beta, tau, baseline)[..., 0]
    got = np.einsum("ma,mad->md", np.asarray(c), phi)
    # the lane-major layout (one lane, responses on the last axis): the same coefficients
    lanes = L.Minibatch(*(jnp.asarray(x)[None] for x in (phi, lp_ref, reward, u)))
    c_lanes = L.response_coefficients(L.contract_lanes(lanes.phi, jnp.asarray(w)[None]), lanes, beta, tau,
                                      baseline, axis=-1)[0]
    got_lanes = np.einsum("ma,mad->md", np.asarray(c_lanes), phi)
    for i in range(3):
        assert np.all(p[i][np.asarray(inverse_cdf(jnp.asarray(p[i]), jnp.asarray(u[i])))] > 0)
        want = L.rollout_gradient(w, w_ref, phi[i], reward[i], u[i], beta, tau, baseline)
        assert_close(got[i], want, rtol=1e-5, atol=1e-5, what=f"prompt {i}")
        assert_close(got_lanes[i], want, rtol=1e-5, atol=1e-5, what=f"prompt {i}, lane-major")


def test_learner_step_runs_many_chains_on_one_sample():
    """The OU study's shape: several SGD chains of one problem side by side (lanes), each with its own
    index sequence, driven by the learner's own ``step``; each chain is the learner run alone with
    its indices (float32 round-off of another lane width allowed, as above)."""
    spec = Spec(d=3, actions=5, prompts=24, rollouts=4, steps=60, record_every=60, batch=4, learner="SGD",
                estimator="rloo", reward_model="oracle", beta=0.5, lr=0.5, tau=0.4).validate()
    world, data = problem(spec, 11, sigma=0.3)
    chains = 3
    idx = jnp.stack([L.minibatch_indices(spec, jax.random.key(20 + c)) for c in range(chains)], axis=-1)  # [T, b, C]
    lanes = jax.tree_util.tree_map(lambda x: jnp.stack([x] * chains), data)
    full = L.problem_last(lanes, jnp.stack([world.w_ref] * chains))
    init, step = L.learner(spec)

    @jax.jit
    def run(full, idx):
        state, _ = jax.lax.scan(lambda s, i: (step(s, L.gather_lanes(full, i)), None),
                                init(jnp.stack([world.w_ref] * chains, axis=-1)), idx)
        return state.w.T

    w = np.asarray(run(full, idx))
    for c in range(chains):
        alone = train(spec, data, world.w_ref, idx[..., c])
        assert_close(w[c], alone.w_last, rtol=1e-5, atol=1e-6, what=f"chain {c}")
    assert not np.allclose(w[0], w[1]), "chains with other indices end elsewhere"


@pytest.mark.parametrize("estimator", ["exact", "rloo", "none"])
def test_lane_major_step_is_the_learner_alone(estimator):
    """``learner(spec, layout='lane_major')`` on the rows of two problems' samples (``gather_rows``:
    lane q·C + c, chain c of problem q with its own index sequence): each lane ends where the learner trained
    alone on its problem with its indices does (:func:`train_policy`; float32 round-off allowed)."""
    spec = Spec(d=3, actions=5, prompts=24, rollouts=4, steps=60, record_every=60, batch=4, learner="SGD",
                estimator=estimator, reward_model="oracle", beta=0.5, lr=0.5, tau=0.4).validate()
    worlds, datas = zip(*(problem(spec, 30 + 3 * q, sigma=0.3) for q in range(2)))
    data = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *datas)            # [Q, ...]
    w_ref = jnp.stack([w.w_ref for w in worlds])                               # [Q, d]
    chains, Q = 3, 2
    idx = jnp.stack([L.minibatch_indices(spec, jax.random.key(40 + c)) for c in range(chains)], axis=-1)  # [T, b, C]
    rows = L.lane_rows(data, w_ref)
    init, step = L.learner(spec, layout="lane_major")

    @jax.jit
    def run(rows, idx):
        state, _ = jax.lax.scan(lambda s, i: (step(s, L.gather_rows(rows, i, spec.prompts)), None),
                                init(jnp.repeat(w_ref, chains, axis=0)), idx)
        return state.w.reshape(Q, chains, spec.d)

    w = np.asarray(run(rows, idx))
    for q in range(Q):
        for c in range(chains):
            alone = train(spec, datas[q], worlds[q].w_ref, idx[..., c])
            assert_close(w[q, c], alone.w_last, rtol=1e-5, atol=1e-6, what=f"problem {q}, chain {c}")
    assert not np.allclose(w[0, 0], w[0, 1]), "chains with other indices end elsewhere"
    with pytest.raises(ValueError, match="layout="):
        L.learner(spec, layout="lanes")


def test_retraining_with_one_prompt_replaced_uses_the_same_randomness():
    """The stability study's shape: S and S' (prompt j replaced) trained side by side with the same
    minibatch indices and rollout uniforms. A prompt that no minibatch draws leaves w bit for bit
    unchanged; one that is drawn moves it."""
    spec = Spec(d=3, actions=5, prompts=24, rollouts=4, steps=10, record_every=10, batch=2, learner="SGD",
                estimator="rloo", reward_model="oracle", beta=0.5, lr=0.5, tau=0.4).validate()
    world, data = problem(spec, 12, sigma=0.3)
    _, other = problem(spec, 13, sigma=0.3)
    idx = L.minibatch_indices(spec, jax.random.key(5))
    used = set(np.asarray(idx).ravel().tolist())
    assert len(used) < spec.prompts  # 20 draws of 24 prompts leave some undrawn (about 10 on average)
    unused, drawn = min(set(range(spec.prompts)) - used), min(used)

    def replaced(j):
        return L.TrainData(data.phi.at[j].set(other.phi[0]), data.reward.at[j].set(other.reward[0]), data.u)

    for j, moves in ((unused, False), (drawn, True)):
        pair = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), data, replaced(j))
        fit = jax.jit(L.train_policies)(spec, pair, jnp.stack([world.w_ref] * 2), idx)
        same = np.array_equal(np.asarray(fit.w_last[0]), np.asarray(fit.w_last[1]))
        assert same != moves, f"prompt {j}"
