"""The OU chain kernel (``rlhf_bounds.ou_chains``, docs/theory.md §8.2–§8.5).

References: the AR(1) process's closed forms (its autocorrelation time and what batch means of
length L estimate, the latter also summed lag by lag in NumPy), the realizable problem's closed-form
maximiser w_ref + θ*/β, and the learner's own step run alone in NumPy-checked Python loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import learners as L
from rlhf_bounds import ou_chains as oc
from rlhf_bounds.simulate import prepare
from rlhf_bounds.spec import SpecError

SEED = 3


def setup(spec, data, w_ref, w0):
    """:func:`rlhf_bounds.ou_chains.ou_setup`, compiled (eager dispatch of its Newton loop is slow)."""
    return jax.jit(lambda d, r, w: oc.ou_setup(spec, d, r, w))(data, w_ref, w0)


def small_spec(**changes):
    base = dict(d=3, actions=4, prompts=32, rollouts=2, batch=2, steps=1200, record_every=1200, learner="SGD",
                estimator="exact", reward_model="oracle", train_log_ratio="exact", tau=1.0, sigma_xi=0.5, lr=1.0,
                eval_prompts=64, posterior_draws=4)
    base.update(changes)
    return rb.Spec(**base)


# ---- the AR(1) reference ----------------------------------------------------------------------

def test_batch_means_expectation_matches_the_lag_sum():
    """L·Var(batch mean)/Var(x) = 1 + 2Σ_{k<L}(1 − k/L)a^k for AR(1), summed lag by lag in NumPy."""
    for a in (-0.5, 0.0, 0.3, 0.9, 0.99):
        for length in (1, 7, 100, 1000):
            k = np.arange(1, length)
            want = 1.0 + 2.0 * np.sum((1.0 - k / length) * a**k)
            np.testing.assert_allclose(float(oc.ar1_batch_means_iat(a, length)), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(oc.ar1_iat(a)), 1.0 + 2.0 * np.sum(a ** np.arange(1, 20000)), rtol=1e-8)


def test_iat_estimator_recovers_ar1():
    """The streaming batch-means estimator on AR(1) chains: τ̂ within 4 standard errors of its
    expectation (the batch-means value above), where the standard error is √(2/N_b)·τ (the relative
    error of a variance estimated from N_b independent, normal batch means), and Σ̂ = 1/(1 − a²) within
    4 of its own. Two coordinates with a = 0.5 and 0.9, 200 chains, 8 batches of 400 steps."""
    a = jnp.asarray([0.5, 0.9], jnp.float32)
    chains, batches, length, burn = 200, 8, 400, 0
    key = jax.random.key(SEED)
    k0, k1 = jax.random.split(key)
    x0 = jax.random.normal(k0, (2, chains), jnp.float32) / jnp.sqrt(1 - a[:, None] ** 2)  # stationary start
    noise = jax.random.normal(k1, (batches, length, 2, chains), jnp.float32)
    step = lambda x, e: a[:, None] * x + e
    _, mom = jax.jit(lambda x0, n: oc.accumulate_chains(step, x0, n[:0, 0], n, lambda x: x[:, :, None], chains)
                     )(x0, noise)
    mom = oc.ChainMoments(*(x[..., 0] for x in mom))
    n_b = chains * batches
    assert float(mom.count) == n_b and float(mom.length) == length
    tau = np.asarray(oc.batch_means_iat(mom, jnp.eye(2, dtype=jnp.float64)))
    want = np.asarray(oc.ar1_batch_means_iat(np.asarray(a, np.float64), length))
    se = np.sqrt(2.0 / n_b) * want
    assert np.all(np.abs(tau - want) <= 4 * se), (tau, want, se)
    sigma = np.asarray(mom.M / mom.count - np.outer(mom.m, mom.m) / mom.count**2)
    var = 1.0 / (1.0 - np.asarray(a, np.float64) ** 2)
    samples = n_b * length
    se_var = var * np.sqrt(2.0 * (1 + np.asarray(a, np.float64) ** 2) / (1 - np.asarray(a, np.float64) ** 2) / samples)
    assert np.all(np.abs(np.diag(sigma) - var) <= 4 * se_var), (np.diag(sigma), var)
    assert abs(sigma[0, 1]) <= 4 * np.sqrt(var[0] * var[1] / (samples / want[1]))  # independent coordinates


# ---- w_S and the degenerate corner ------------------------------------------------------------

def test_maximiser_of_the_realizable_problem_is_the_closed_form():
    """With r = ⟨θ*, φ⟩ and τ = ∞, F_S is maximised at w_ref + θ*/β (every prompt's optimum); Newton from
    a perturbed start reaches it, the per-prompt gradients vanish there (C_g ≈ 0: degenerate), and a
    misspecified reward is not degenerate."""
    spec = small_spec(sigma_xi=0.0)
    prep = prepare(spec, jax.random.key(SEED))
    w_ref, theta = prep.world.w_ref, prep.world.theta_star
    start = w_ref + theta / spec.beta + 0.3
    s = setup(spec, prep.data, w_ref, start)
    np.testing.assert_allclose(np.asarray(s.max.w), np.asarray(w_ref + theta / spec.beta, np.float64), atol=1e-5)
    assert bool(s.max.converged) and float(s.max.grad_norm) <= 1e-6
    assert bool(s.degenerate) and float(jnp.trace(s.grad_cov)) < 1e-10 * float(s.grad_scale)
    assert np.all(np.asarray(s.eigval) > 0)
    mis_data = prepare(small_spec(sigma_xi=0.5), jax.random.key(SEED)).data
    mis = setup(small_spec(sigma_xi=0.5), mis_data, w_ref, start)
    assert bool(mis.max.converged) and not bool(mis.degenerate)
    # The gradient at w_S is the exact ∇F_S, there ~0; H there is −∇²F_S by central differences of it.
    d64 = L.TrainData(jnp.asarray(mis_data.phi, jnp.float64), jnp.asarray(mis_data.reward, jnp.float64), mis_data.u)
    g = lambda w: L.full_gradient(w, jnp.asarray(w_ref, jnp.float64), d64, spec.beta, jnp.inf)
    eps = 1e-5
    fd = np.stack([(np.asarray(g(mis.max.w + eps * e)) - np.asarray(g(mis.max.w - eps * e))) / (2 * eps)
                   for e in np.eye(spec.d)])
    np.testing.assert_allclose(-fd, np.asarray(mis.hessian), atol=1e-7)


def test_tolerance_flag_when_newton_stops_short():
    spec = small_spec()
    prep = prepare(spec, jax.random.key(SEED))
    far = prep.world.w_ref + 5.0
    m = oc.refine_maximiser(spec, prep.data, prep.world.w_ref, far, steps=1, grad_tol=1e-12)
    assert not bool(m.converged) and float(m.grad_norm) > 1e-12


def test_kernel_refuses_what_it_does_not_model():
    with pytest.raises(SpecError, match="learner"):
        oc.KERNEL.check(small_spec(learner="GA"))
    with pytest.raises(SpecError, match="schedule"):
        oc.KERNEL.check(small_spec(schedule="inv_sqrt"))
    with pytest.raises(SpecError, match="steps"):
        oc.OUChainKernel(batches=8).check(small_spec(steps=5, record_every=5))
    with pytest.raises(SpecError, match="chains"):
        oc.OUChainKernel(chains=0)
    with pytest.raises(SpecError, match="burn_fraction"):
        oc.OUChainKernel(burn_fraction=1.0)
    assert oc.chain_schedule(1000, 0.2, 3) == (1000 - 3 * 266, 266)


# ---- the kernel against the learner alone -----------------------------------------------------

def test_kernel_is_the_learners_chains_and_agrees_with_the_prediction():
    """Through the engine (8 problems, 2 in a lane block), problem 5's chains are the learner's own
    step run alone (all its chains side by side from w_S, the same indices), their moments summed in
    NumPy; and the covariance agrees with the discrete prediction to within 3× its sampling error."""
    spec = small_spec(lr=0.5)
    kernel = oc.OUChainKernel(chains=48, batches=4, problem_block=2, bounds=False)
    res = rb.run(spec, 8, kernel=kernel, seed=SEED, chunk_size=8, progress=False)
    assert np.all(res.ok) and np.all(res["chain_ws_converged"] == 1) and np.all(res["chain_degenerate"] == 0)

    problems_key, shared_key = rb.engine.problem_keys(SEED)
    i = 5
    prep = prepare(spec, jax.random.fold_in(problems_key, i))
    s = setup(spec, prep.data, prep.world.w_ref, prep.world.w_ref + prep.theta_hat / spec.beta)
    idx = oc.chain_indices(spec, kernel.chains, shared_key)               # [T, b, C]
    C = kernel.chains
    lanes = jax.tree_util.tree_map(lambda x: jnp.stack([x] * C), prep.data)
    full = L.problem_last(lanes, jnp.stack([prep.world.w_ref] * C))
    init, step = L.learner(spec)
    w_s = jnp.asarray(s.max.w, jnp.float32)

    @jax.jit
    def traj(full, idx):
        _, ws = jax.lax.scan(lambda st, i: (lambda n: (n, n.w))(step(st, L.gather_lanes(full, i))),
                             init(jnp.stack([w_s] * C, axis=-1)), idx)
        return ws                                                            # [T, d, C]

    x = np.asarray(traj(full, idx), np.float64) - np.asarray(w_s, np.float64)[None, :, None]
    burn, length = kernel.check(spec)
    post = x[burn:].reshape(kernel.batches, length, spec.d, C)
    m = post.mean(axis=1)                                                    # [J, d, C]
    M = np.einsum("jtic,jtkc->jikc", post, post) / length                    # [J, d, d, C]
    n_b = kernel.batches * C
    mbar = m.sum(axis=(0, 2)) / n_b
    sigma = M.sum(axis=(0, 3)) / n_b - np.outer(mbar, mbar)
    np.testing.assert_allclose(res.arrays["chain_sigma"][i], sigma, rtol=1e-5, atol=1e-6 * np.abs(sigma).max())
    np.testing.assert_allclose(res.arrays["chain_sigma_disc"][i], np.asarray(s.sigma_disc), rtol=1e-5,
                               atol=1e-6 * float(np.abs(s.sigma_disc).max()))
    mom = oc.ChainMoments(jnp.asarray(float(n_b)), jnp.asarray(float(length)), jnp.asarray(m.sum(axis=(0, 2))),
                          jnp.asarray(np.einsum("jic,jkc->ik", m, m)), jnp.asarray(M.sum(axis=(0, 3))),
                          jnp.asarray((M * M).sum(axis=(0, 3))))
    np.testing.assert_allclose(res.arrays["chain_iat_eig"][i], np.asarray(oc.batch_means_iat(mom, s.eigvec)),
                               rtol=1e-2)
    # The relative Frobenius error is a sampling error here (η small, the problem nearly quadratic).
    assert np.median(res["chain_rel_err_disc"]) <= 3 * np.median(res["chain_cov_se"])
    assert np.all(res["chain_cov_se"] > 0) and np.all(np.isfinite(res["chain_cov_se"]))
    # The slowest mode's τ̂ beside its AR(1) value, within the estimator's √(2/N_b) relative error (×4).
    ratio = res["chain_iat_slow"] / res["chain_iat_slow_bm_pred"]
    assert abs(np.median(ratio) - 1) <= 4 * np.sqrt(2 / n_b), ratio


def test_setup_factorises_one_problem_at_a_time():
    """Under the kernel's batch, the setup's LAPACK calls (Newton's solves, eigh) see one problem's d × d
    matrices, never a batch (batched CPU LAPACK on a 2-thread pool can deadlock, docs/engine.md)."""
    spec = small_spec()
    preps = jax.vmap(lambda k: prepare(spec, k))(jax.random.split(jax.random.key(SEED), 4))
    w0 = preps.world.w_ref + preps.theta_hat / spec.beta
    jaxpr = jax.make_jaxpr(lambda d, r, w: oc.ou_setups(spec, d, r, w))(preps.data, preps.world.w_ref, w0)
    shapes = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name in ("eigh", "lu", "cholesky", "getrf", "lu_pivots_to_permutation"):
                shapes.append(tuple(eqn.invars[0].aval.shape))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert shapes, "the setup factorises something"
    assert all(s == (spec.d, spec.d) for s in shapes if s[-2:] == (spec.d, spec.d)), shapes
    assert all(len(s) == 2 for s in shapes), shapes
