"""The clipping and budget studies' pieces (rlhf_bounds.advice), each against an independent computation.

Pure functions are checked against NumPy brute force or hand computations; the two kernels run on
the tiny problem family of conftest.py and must (i) leave every default column exactly as the
default kernel computes it, and (ii) give sweep and allocation columns that NumPy recomputes from
the same draws (gap.sample_objective on the same prompts and uniforms, sorted quantiles).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import advice, bounds, gap
from rlhf_bounds.spec import SpecError
from rlhf_bounds.world import draw_prompts

from conftest import np_inverse_cdf, np_log_ratio, np_probs, tiny_spec


# ---- pure pieces ----------------------------------------------------------------------------------

def _sample(rng, n=6, A=5, d=3, K=4):
    phi = rng.normal(size=(n, A, d)) / math.sqrt(d)
    w, w_ref = rng.normal(size=d), 0.3 * rng.normal(size=d)
    r_hat = rng.normal(size=(n, A))
    u = rng.uniform(size=(n, K))
    return w, w_ref, phi, r_hat, u


def test_rollout_atoms_and_sample_objective_at_match_numpy_and_gap(rng):
    w, w_ref, phi, r_hat, u = _sample(rng)
    atoms = advice.rollout_atoms(*(jnp.asarray(x) for x in (w, w_ref, phi, r_hat, u)))
    beta, taus = 0.7, np.array([0.0, 0.1, 0.5, 3.0])
    ref = []
    for tau in taus:
        h = []
        for i in range(phi.shape[0]):
            ell = np_log_ratio(w, w_ref, phi[i])
            y = np_inverse_cdf(np_probs(w, phi[i]), u[i])
            h.append(r_hat[i, y] - beta * np.clip(ell[y], -tau, tau))
        ref.append(np.mean(h))
    np.testing.assert_allclose(advice.sample_objective_at(atoms, beta, taus), ref, rtol=1e-10)
    # ... and each τ is gap.sample_objective's Ĵ on the same sample
    for tau, value in zip(taus, advice.sample_objective_at(atoms, beta, taus)):
        j_hat, _ = gap.sample_objective(w, w_ref, phi, r_hat, u, beta, tau)
        np.testing.assert_allclose(value, j_hat, rtol=1e-12)


def test_tail_excess_curve_is_the_brute_force_expectation(rng):
    v, p = rng.exponential(size=(7, 3)), rng.uniform(size=(7, 3))
    taus = np.array([0.0, 0.3, 1.0, 10.0])
    ref = [np.sum(p * np.maximum(v - t, 0)) / p.sum() for t in taus]
    np.testing.assert_allclose(advice.tail_excess_curve(v, p, taus), ref, rtol=1e-12)


def test_nested_means_are_means_of_leading_blocks(rng):
    x = rng.normal(size=(9, 5))
    allocs = [(9, 5), (3, 1), (4, 5), (1, 2)]
    np.testing.assert_allclose(advice.nested_means(jnp.asarray(x), allocs), [x[:n, :k].mean() for n, k in allocs],
                               rtol=1e-12)


def test_allocations_spend_the_budget():
    assert advice.allocation_cost(10, 4, 7, 8.0, 1.0, 2.0) == 10 * 12 + 14
    n, n_pref = advice.equal_cost_allocation(4096, 4, 0.5, 8.0, 1.0, 2.0)
    assert (n, n_pref) == (170, 1024)  # ⌊2048/12⌋, 2048/2
    for K in (1, 2, 3, 7):
        for share in (0.1, 0.5, 0.9):
            n, q = advice.equal_cost_allocation(1000, K, share, 5.0, 1.5, 3.0)
            cost = advice.allocation_cost(n, K, q, 5.0, 1.5, 3.0)
            assert 1000 - (5.0 + 1.5 * K + 3.0) < cost <= 1000
    assert advice.eval_allocations(100, (1.0, 4.0), (1, 4)) == ((1.0, 50, 1), (1.0, 20, 4), (4.0, 20, 1),
                                                                 (4.0, 12, 4))
    with pytest.raises(SpecError, match="share"):
        advice.equal_cost_allocation(100, 1, 1.0, 1, 1, 1)
    with pytest.raises(SpecError, match="budget"):
        advice.eval_allocations(10, (64.0,), (1,))
    with pytest.raises(SpecError, match="taus"):
        advice.ClipSweepKernel((0.5, 0.1))


def test_nearest_linear_and_log():
    grid = [1.0, 2.0, 4.0, 8.0]
    assert advice.nearest(grid, [1.4, 1.6, 3.1, 100.0]).tolist() == [0, 1, 2, 3]
    # 2.9: nearer 2 linearly (0.9 vs 1.1) and nearer 4 in log (log 4/2.9 = 0.32 < log 2.9/2 = 0.37)
    assert advice.nearest(grid, [2.9]).tolist() == [1] and advice.nearest(grid, [2.9], log=True).tolist() == [2]


def test_b3_tau_star_is_within_the_grid_resolution_of_the_bound_argmin(rng):
    """B1's τ-curve is const + 2βατ + βE(|ℓ| − τ)_+ (for τ below the log-ratio range): its grid argmin
    brackets τ* on random laws; τ* moved two grid steps away does not."""
    grid = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0])
    P, K, delta, beta = 40, 4, 0.05, 0.3
    v = rng.exponential(size=(P, 50)) * rng.uniform(0.1, 1.5, size=(P, 1))
    p = rng.uniform(size=(P, 50))
    n = rng.integers(8, 500, size=P)
    alpha = np.sqrt(np.log(4 / delta) / (2 * n)) + np.sqrt(np.log(4 / delta) / (2 * n * K))
    tail = np.sum(p[:, None] * np.maximum(v[:, None] - grid[:, None], 0), axis=-1) / p.sum(axis=1, keepdims=True)
    curves = 1.7 + 2 * beta * alpha[:, None] * grid + beta * tail
    stars = np.asarray(jax.vmap(lambda v, p, n: bounds.optimal_clip_threshold(v, p, n, K, delta))(v, p, n))
    assert advice.argmin_agrees(grid, curves, stars).all()
    i = np.argmin(curves, axis=1)
    planted = np.where(i >= 5, grid[0] / 2, grid[-1] * 2)  # two or more steps away from every argmin
    assert not advice.argmin_agrees(grid, curves, planted).any()


def test_rule_regret_against_brute_force(rng):
    P, G = 50, 4
    values = rng.normal(size=(P, G)) + np.array([0.0, 0.5, 0.2, -0.1])
    choice = rng.integers(0, G, P)
    rule = values[np.arange(P), choice]
    reg = advice.rule_regret(values, rule, maximise=True, resamples=300)
    means = values.mean(axis=0)
    assert reg.best_index == 1 and reg.regret == pytest.approx(means.max() - rule.mean())
    assert reg.spread == pytest.approx(means.max() - means.min()) and reg.n == P
    assert reg.lo <= reg.regret <= reg.hi
    low = advice.rule_regret(-values, -rule, maximise=False, resamples=300)  # the mirror image
    assert low.regret == pytest.approx(reg.regret) and low.best_index == 1
    exact = advice.rule_regret(values, values[:, 1], maximise=True, resamples=300)
    assert exact.regret == 0.0 and exact.hi >= 0.0
    # the bootstrap interval covers the true regret at about its level (paired, selection included)
    true_means = np.array([0.0, 1.0, 0.2, 0.1])
    cover = 0
    for s in range(60):
        r = np.random.default_rng(s)
        v = r.normal(size=(200, 4)) + true_means
        reg = advice.rule_regret(v, v[:, 2], maximise=True, resamples=200, seed=s)
        cover += reg.lo <= 0.8 <= reg.hi
    assert cover >= 51  # 95% nominal; 51/60 is the binomial 1% lower tail at 0.95


def test_regret_verdicts():
    R = advice.Regret
    assert advice.regret_verdict(R(0.01, 0.0, 0.05, 0, 0, 0, 1.0, 100)) == "holds"
    assert advice.regret_verdict(R(0.3, 0.2, 0.4, 0, 0, 0, 1.0, 100)) == "refuted"
    assert advice.regret_verdict(R(0.1, 0.05, 0.2, 0, 0, 0, 1.0, 100)) == "not enough problems"
    assert advice.regret_verdict(R(0.0, 0.0, 0.0, 0, 0, 0, 1.0, 3)) == "not enough problems"
    # a grid whose choices barely differ: 1% of the best value is the tolerance
    flat = R(0.002, 0.0, 0.005, 0.998, -1.0, 0, 0.001, 100)
    assert advice.regret_allowance(flat) == pytest.approx(0.01) and advice.regret_verdict(flat) == "holds"
    assert advice.regret_verdict(flat._replace(lo=0.02, hi=0.03)) == "refuted"


# ---- kernels ----------------------------------------------------------------------------------------

SPEC = tiny_spec(reward_model="mle", tau=0.5, bounds="b1")
PROBLEMS = 8


@pytest.fixture(scope="module")
def runs():
    kernel = advice.ClipSweepKernel((0.1, 0.5, 2.0))
    return {"default": rb.run(SPEC, PROBLEMS, seed=3, progress=False),
            "clip": rb.run(SPEC, PROBLEMS, seed=3, kernel=kernel, progress=False)}


def test_kernels_leave_the_default_columns_unchanged(runs):
    """Both kernels are simulate_batch with their own extra columns; the clipping one runs here (the
    budget one runs in its suite's smoke test)."""
    base = runs["default"]
    for col in base.columns:
        np.testing.assert_array_equal(runs["clip"][col], base[col], err_msg=col)


def test_clip_sweep_at_the_spec_tau_is_the_default_gap_and_bound(runs):
    res = runs["clip"]
    j = list(res["sweep_tau"][0]).index(SPEC.tau)
    np.testing.assert_allclose(res["sweep_gap"][:, j], res["gap_total"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["sweep_b1"][:, j], res["b1_total"], rtol=1e-5)
    # B1 on the grid, recomputed in NumPy from the saved population values and the tail at each τ:
    # only W_τ and the tail depend on τ, and the tail is non-increasing in τ
    n, K, beta, delta = SPEC.prompts, SPEC.rollouts, SPEC.beta, SPEC.delta
    alpha = math.sqrt(math.log(4 / delta) / (2 * n)) + math.sqrt(math.log(4 / delta) / (2 * n * K))
    width = res["reward_range"][:, None] + 2 * beta * np.minimum(res["sweep_tau"], res["log_ratio_range"][:, None])
    rest = res["sweep_b1"] - width * alpha - np.sqrt(np.exp(res["log1p_chi2"]) * res["l2_train"])[:, None]
    assert np.all(np.diff(rest, axis=1) <= 1e-6) and np.all(rest >= -1e-6)
    np.testing.assert_allclose(rest[:, j], beta * res["tail_excess"], rtol=1e-4, atol=1e-7)
    assert advice.argmin_agrees(res["sweep_tau"][0], res["sweep_b1"], res["b3_tau_star"]).all()


def test_split_and_whole_tau_against_numpy(runs):
    """One problem of the run computed by hand: τ̂ is the lower (1 − 2α)-quantile of |ℓ| over the fresh
    rollouts (all n prompts, or the first half with α at the other half's size), G is Ĵ at τ̂ on the whole
    sample, or on the second half, minus J*, and B1 is taken at τ̂ with n or n − ⌊n/2⌋ prompts."""
    from rlhf_bounds.simulate import prepare

    spec, res, i = SPEC, runs["clip"], 5
    problems_key, _ = rb.engine.problem_keys(3)
    names = ("J_star", "b3_tau_star", "reward_range", "log_ratio_range", "log1p_chi2", "l2_train")
    cols = {k: res[k][i] for k in names}
    w = res["w_last"][i]

    @jax.jit
    def one(key, w, cols):
        p = prepare(spec, key)
        out = advice.clip_sweep_columns(spec, p, w, cols, (0.5,))
        k_fp, k_fu = jax.random.split(p.keys.fresh)
        fresh = draw_prompts(spec, p.world, k_fp, spec.prompts)
        u = jax.random.uniform(k_fu, (spec.prompts, spec.rollouts), jnp.float32)
        ev = draw_prompts(spec, p.world, p.keys.eval, spec.eval_prompts)
        return out, p.world.w_ref, p.theta_hat, fresh.phi, u, ev.phi

    out, w_ref, theta_hat, phi, u, ev_phi = jax.device_get(one(jax.random.fold_in(problems_key, i), w, cols))
    for k in ("whole_tau", "split_tau", "b1_whole", "b1_split", "gap_whole", "gap_split"):
        np.testing.assert_allclose(out[k], res[k][i], rtol=1e-4, atol=1e-6, err_msg=k)  # the kernel's own value
    n, K, beta, delta = spec.prompts, spec.rollouts, spec.beta, spec.delta
    r_hat = phi @ theta_hat
    ell, rew = np.zeros((n, K)), np.zeros((n, K))
    for i in range(n):
        y = np_inverse_cdf(np_probs(w, phi[i]), u[i])
        ell[i], rew[i] = np_log_ratio(w, w_ref, phi[i])[y], r_hat[i, y]

    def quantile(x, n_bound):
        alpha = math.sqrt(math.log(4 / delta) / (2 * n_bound)) + math.sqrt(math.log(4 / delta) / (2 * n_bound * K))
        v = np.sort(np.abs(x).ravel())
        tail = 1.0 - np.arange(1, v.size + 1) / v.size  # P(|ℓ| > v_(j)) for distinct atoms
        return v[np.argmax(tail <= 2 * alpha)]

    half = n // 2
    tau_w, tau_s = quantile(ell, n), quantile(ell[:half], n - half)
    np.testing.assert_allclose(out["whole_tau"], tau_w, rtol=1e-5)
    np.testing.assert_allclose(out["split_tau"], tau_s, rtol=1e-5)
    j = lambda r, e, t: np.mean(r - beta * np.clip(e, -t, t))
    np.testing.assert_allclose(out["gap_whole"], j(rew, ell, tau_w) - cols["J_star"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["gap_split"], j(rew[half:], ell[half:], tau_s) - cols["J_star"], rtol=1e-4,
                               atol=1e-5)
    # B1 at τ̂ (n prompts, or the other half's n − ⌊n/2⌋), its tail E(|ℓ| − τ̂)_+ from the evaluation set
    abs_ell = np.array([np.abs(np_log_ratio(w, w_ref, x)) for x in ev_phi])
    prob = np.array([np_probs(w, x) for x in ev_phi])

    def b1(tau, n_bound):
        alpha = math.sqrt(math.log(4 / delta) / (2 * n_bound)) + math.sqrt(math.log(4 / delta) / (2 * n_bound * K))
        width = cols["reward_range"] + 2 * beta * min(tau, cols["log_ratio_range"])
        tail = np.sum(prob * np.maximum(abs_ell - tau, 0)) / prob.sum()
        return width * alpha + np.sqrt(np.exp(cols["log1p_chi2"]) * cols["l2_train"]) + beta * tail

    np.testing.assert_allclose(out["b1_whole"], b1(tau_w, n), rtol=1e-5)
    np.testing.assert_allclose(out["b1_split"], b1(tau_s, n - half), rtol=1e-5)


def test_budget_allocations_against_gap_sample_objective():
    """Each allocation's error is Ĵ on the first n prompts and K uniforms of the allocation sample (drawn
    again here from its key, evaluated by gap.sample_objective) minus EĴ."""
    from rlhf_bounds.simulate import prepare

    kernel = advice.BudgetKernel((1.0, 8.0), (1, 4), 80.0)
    allocs = kernel.allocations
    assert allocs == ((1.0, 40, 1), (1.0, 16, 4), (8.0, 8, 1), (8.0, 6, 4))
    n_max, k_max = max(a[1] for a in allocs), max(a[2] for a in allocs)

    @jax.jit
    def both(key, w):
        prep = prepare(SPEC, key)
        out = advice.budget_columns(SPEC, prep, w, {"J_hat_mean": jnp.float32(0.25)}, allocs)
        k_fp, k_fu = jax.random.split(jax.random.fold_in(prep.keys.fresh, 1))
        sample = draw_prompts(SPEC, prep.world, k_fp, n_max)
        u = jax.random.uniform(k_fu, (n_max, k_max), jnp.float32)
        r_hat = sample.phi @ prep.theta_hat
        ref = jnp.stack([gap.sample_objective(w, prep.world.w_ref, sample.phi[:n], r_hat[:n], u[:n, :k], SPEC.beta,
                                              SPEC.tau)[0] for _, n, k in allocs])
        return out, ref

    w = jnp.asarray(np.random.default_rng(5).normal(size=SPEC.d), jnp.float32)
    out, ref = both(jax.random.key(9), w)
    np.testing.assert_allclose(out["eval_alloc_error"], np.asarray(ref) - 0.25, rtol=1e-5, atol=1e-6)
    assert out["eval_alloc_n"].tolist() == [a[1] for a in allocs]
    assert out["eval_alloc_k"].tolist() == [a[2] for a in allocs]
    np.testing.assert_array_equal(out["eval_alloc_ratio"], [a[0] for a in allocs])
