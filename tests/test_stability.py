"""The stability study (docs/theory.md §17): [A]'s diagnostics on cases whose answer is known by hand, the
bound formulas against independent NumPy forms, the certified smoothness against autodiff Hessians, and
the replace-one kernel (the same randomness for S and S', the degenerate corner, the engine path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import learners as L
from rlhf_bounds import stability as S
from rlhf_bounds import world as W
from rlhf_bounds.policy import objective
from rlhf_bounds.spec import Spec, SpecError

from conftest import np_probs

RNG = np.random.default_rng(20260113)


def unit_rows(x, c=1.0):
    return c * x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_cov(w, phi):
    p = np_probs(w, phi)
    c = phi - p @ phi
    return (c * p[:, None]).T @ c


# ---- the β mapping, the Hessian and the certified smoothness -------------------------------------

def test_objective_is_beta_times_the_papers_objective_with_reward_over_beta():
    phi = jnp.asarray(unit_rows(RNG.normal(size=(5, 3))), jnp.float32)
    w, r = jnp.asarray(RNG.normal(size=3), jnp.float32), jnp.asarray(RNG.normal(size=5), jnp.float32)
    for beta in (0.1, 0.5, 2.0):
        got = objective(w, jnp.zeros(3), phi, r, beta)
        want = beta * objective(w, jnp.zeros(3), phi, r / beta, 1.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert S.paper_radius(1.0, 0.5) == 6.0


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_objective_hessian_matches_autodiff(beta):
    phi = jnp.asarray(unit_rows(RNG.normal(size=(6, 4))), jnp.float64)
    w, w_ref = jnp.asarray(RNG.normal(size=4)), jnp.asarray(0.3 * RNG.normal(size=4))
    r = jnp.asarray(RNG.normal(size=6))
    auto = jax.hessian(lambda v: objective(v, w_ref, phi, r, beta))(w)
    np.testing.assert_allclose(S.objective_hessian(w, w_ref, phi, r, beta), auto, rtol=1e-9, atol=1e-12)
    # the mean over prompts (one contraction) against the per-prompt Hessians averaged
    phis = jnp.asarray(unit_rows(RNG.normal(size=(9, 6, 4))))
    rs = jnp.asarray(RNG.normal(size=(9, 6)))
    each = jax.vmap(S.objective_hessian, in_axes=(None, None, 0, 0, None))(w, w_ref, phis, rs, beta)
    np.testing.assert_allclose(S.mean_hessian(w, w_ref, phis, rs, beta), np.mean(each, 0), rtol=1e-9, atol=1e-12)


def test_certified_smoothness_bounds_every_hessian_in_the_ball():
    d, A, D, C, beta, sx = 4, 6, 1.3, 0.8, 0.4, 0.5
    lf = S.smoothness_bound(reward_norm=D, feature_bound=C, beta=beta, sigma_xi=sx)
    assert lf == pytest.approx(C**2 * (8 * D * C + 2 * sx + beta))
    R = S.paper_radius(D, beta)
    theta = unit_rows(RNG.normal(size=d), D)
    worst = 0.0
    hess = jax.jit(jax.vmap(S.objective_hessian, in_axes=(0, None, 0, 0, None)))
    for scale in (0.1, 0.5, 1.0):
        m = 512
        w = unit_rows(RNG.normal(size=(m, d)), scale * R)
        phi = unit_rows(RNG.normal(size=(m, A, d)), C)
        # the reward that stretches h most: ⟨θ*, φ⟩ plus a residual of ±σ_ξ
        r = phi @ theta + sx * np.sign(RNG.normal(size=(m, A)))
        h = np.asarray(hess(jnp.asarray(w), jnp.zeros(d), jnp.asarray(phi), jnp.asarray(r), beta))
        worst = max(worst, float(np.max(np.abs(np.linalg.eigvalsh(h)))))
    assert 0 < worst <= lf
    # and a Hessian with curvature near β‖V‖ exists: the bound is not off by orders of magnitude in that term
    assert worst >= 0.05 * beta * C**2 / A


# ---- the assumption diagnostics on constructed cases ----------------------------------------------

def test_mean_covariance_and_sigma_against_numpy():
    phi = unit_rows(RNG.normal(size=(40, 5, 3)))
    w = RNG.normal(size=3)
    ref = np.mean([np_cov(w, p) for p in phi], axis=0)
    got = S.mean_covariance(jnp.asarray(w), jnp.asarray(phi))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert float(S.assumption3_sigma(jnp.asarray(w), jnp.asarray(phi))) == pytest.approx(np.linalg.eigvalsh(ref)[0],
                                                                                          rel=1e-9)


def test_lowrank_law_fails_assumption3_and_is_covered():
    spec = Spec(d=6, actions=4, feature_law="lowrank", rank=2, prompts=64, eval_prompts=256)
    world = W.draw_world(spec, jax.random.key(3))
    phi = W.draw_features(spec, world, jax.random.key(4), 200)
    w = jnp.asarray(RNG.normal(size=6), jnp.float32)
    sigma = float(S.assumption3_sigma(w, phi))
    v = S.mean_covariance(w, phi)
    top = float(np.linalg.eigvalsh(np.asarray(v, np.float64))[-1])
    assert abs(sigma) <= S.NULL_TOL * top  # 4 of the 6 directions carry no feature variance
    # every evaluation feature lies in the span of V_S: Assumption 5 holds with ε_n = 0 (to round-off)
    ev = W.draw_features(spec, world, jax.random.key(5), 100)
    cov = S.coverage_diagnostics(v, ev)
    assert float(cov.eps) < 1e-5
    assert float(cov.sigma_min_plus) > S.NULL_TOL * top and float(cov.sigma_max) == pytest.approx(top, rel=1e-6)


def test_coverage_residual_when_v_s_is_diagonal():
    """V_S = diag(1, 2, 0): the null space is e_3, so ε_n = max |φ_3|; σ_max = 2, σ⁺_min = 1."""
    v = jnp.diag(jnp.asarray([1.0, 2.0, 0.0]))
    phi = RNG.normal(size=(7, 4, 3))
    cov = S.coverage_diagnostics(v, jnp.asarray(phi))
    assert float(cov.eps) == pytest.approx(np.max(np.abs(phi[..., 2])), rel=1e-12)
    assert float(cov.sigma_max) == 2.0 and float(cov.sigma_min_plus) == 1.0
    # full rank: no null space, ε_n = 0
    full = S.coverage_diagnostics(jnp.diag(jnp.asarray([1.0, 2.0, 0.5])), jnp.asarray(phi))
    assert float(full.eps) == 0.0 and float(full.sigma_min_plus) == 0.5


def test_gram_schmidt_pivot_detects_linearly_dependent_features():
    q, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
    assert float(S.gram_schmidt_pivot(jnp.asarray(q[:3]))) == pytest.approx(1.0, abs=1e-12)  # orthonormal rows
    x = RNG.normal(size=(4, 6))
    dependent = x.copy()
    dependent[2] = 0.7 * x[0] - 1.3 * x[1]
    assert float(S.gram_schmidt_pivot(jnp.asarray(dependent))) == 0.0
    assert float(S.gram_schmidt_pivot(jnp.asarray(RNG.normal(size=(5, 3))))) == 0.0  # A > d: always dependent
    # independent rows: the smallest |R_ii| of a QR factorisation of Φᵀ
    ref = np.min(np.abs(np.diag(np.linalg.qr(x.T)[1])))
    assert float(S.gram_schmidt_pivot(jnp.asarray(x))) == pytest.approx(ref, rel=1e-9)
    # over prompts: one dependent prompt fails the set
    batch = jnp.asarray(np.stack([x, dependent, x]))
    assert float(S.assumption4_pivot(batch)) == 0.0 and float(S.assumption4_pivot(batch[::2])) > 0.1 * ref


# ---- the bound formulas against NumPy -------------------------------------------------------------

def test_bound_formulas_against_numpy():
    D, C, beta, rho, n, d = 1.2, 0.9, 0.4, 0.05, 256, 5
    R = 3 * D / beta
    assert float(S.lemma1_bound(n, reward_norm=D, feature_bound=C, delta=rho)) == pytest.approx(
        beta * 3 * R * C * np.sqrt(2 * np.log(2 / rho) / n), rel=1e-12)
    sigma = 0.07
    want = 128 * C**4 / sigma**2 * (np.log(1 / rho) + d * np.log(432 * R * C**5 / sigma**2))
    assert float(S.theorem1_threshold(sigma, d, reward_norm=D, feature_bound=C, beta=beta, delta=rho)) == \
        pytest.approx(want, rel=1e-12)
    assert float(S.theorem1_threshold(0.0, d, reward_norm=D, feature_bound=C, beta=beta, delta=rho)) == np.inf
    g = float(S.gamma1(n, 0.01, 0.02, 0.3, 0.05, 0.04, reward_norm=D, feature_bound=C, beta=beta))
    assert g == pytest.approx(4 * n * R * 0.02 + 8 * R * C**3 * 0.3 / (0.05 * 0.04), rel=1e-12)
    assert float(S.theorem2_stability_bound(n, g, reward_norm=D, feature_bound=C, beta=beta)) == pytest.approx(
        beta * (g / n + 2 * R * C * np.sqrt(g / n)), rel=1e-12)
    lf = S.smoothness_bound(reward_norm=D, feature_bound=C, beta=beta)
    # [A]'s 12 L_f R C / T in [A]'s units (L_f = L_F/β), times β² for the engine's gradients
    assert float(S.lemma2_bound(100, lf, reward_norm=D, feature_bound=C)) == pytest.approx(
        beta**2 * 12 * (lf / beta) * R * C / 100, rel=1e-12)


def test_lemma2_holds_for_ga_at_the_certified_step():
    spec = Spec(d=3, actions=5, prompts=32, steps=200, record_every=1, learner="GA", reward_model="oracle",
                train_log_ratio="exact", beta=0.5)
    world = W.draw_world(spec, jax.random.key(1))
    pr = W.draw_prompts(spec, world, jax.random.key(2), spec.prompts)
    data = L.TrainData(pr.phi, pr.phi @ world.theta_star + 0.5 * pr.xi, jnp.zeros((32, 4), jnp.float32))
    lf = S.smoothness_bound(reward_norm=1.0, feature_bound=1.0, beta=0.5, sigma_xi=0.5)
    fit = L.train_policy(spec.replace(lr=1.0 / lf), data, world.w_ref, jnp.zeros((200, 1), jnp.int32))
    best = np.minimum.accumulate(np.asarray(fit.traj_grad_norm, np.float64) ** 2)
    bound = np.asarray(S.lemma2_bound(np.arange(1, 201), lf, reward_norm=1.0, feature_bound=1.0))
    assert np.all(best <= bound) and best[-1] < best[0]


# ---- replace-one retraining -----------------------------------------------------------------------

def test_replace_one_changes_exactly_the_replaced_prompt():
    n, R = 10, 3
    data = L.TrainData(*(jnp.asarray(RNG.normal(size=s), jnp.float32) for s in ((n, 4, 2), (n, 4), (n, 2))))
    new = L.TrainData(*(jnp.asarray(RNG.normal(size=s), jnp.float32) for s in ((R, 4, 2), (R, 4), (R, 2))))
    idx = jnp.asarray([7, 0, 4])
    both = S.replace_one(data, new, idx)
    for x, y, z in zip(data, new, both):
        assert z.shape == (R + 1,) + x.shape
        np.testing.assert_array_equal(z[0], x)
        for r in range(R):
            changed = [i for i in range(n) if not np.array_equal(z[r + 1][i], x[i])]
            assert changed == [int(idx[r])] and np.array_equal(z[r + 1][int(idx[r])], y[r])
    spec = Spec(prompts=n)
    got = np.asarray(S.replaced_indices(spec, jax.random.key(0), 5))
    assert len(set(got.tolist())) == 5 and got.min() >= 0 and got.max() < n
    with pytest.raises(SpecError, match="replacements"):
        S.replaced_indices(spec, jax.random.key(0), 11)


def test_replace_one_fits_use_the_same_randomness():
    """SGA on S and S' with the same index sequence: a replaced prompt that no step draws leaves w bit for bit
    unchanged (stability exactly 0); one that is drawn moves it. Lane 0 is the learner on S alone."""
    spec = Spec(d=3, actions=4, prompts=40, steps=12, record_every=12, learner="SGA", estimator="exact",
                reward_model="oracle", train_log_ratio="exact", lr=0.5)
    world, data_s = [], []
    for p in range(2):
        wld = W.draw_world(spec, jax.random.key(10 + p))
        pr = W.draw_prompts(spec, wld, jax.random.key(20 + p), spec.prompts)
        world.append(wld)
        data_s.append(L.TrainData(pr.phi, pr.phi @ wld.theta_star + 0.3 * pr.xi, jnp.zeros((40, 4), jnp.float32)))
    data = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *data_s)
    new = jax.tree_util.tree_map(lambda x: x[:, :2] + 0.5, data)
    indices = L.minibatch_indices(spec, jax.random.key(3))
    used = set(np.asarray(indices).ravel().tolist())
    unused, drawn = min(set(range(40)) - used), min(used)
    idx = jnp.asarray([unused, drawn])
    fit = jax.jit(S.replace_one_fits, static_argnums=0)(spec, data, new, idx, jnp.zeros((2, 3)), indices)
    assert fit.w_last.shape == (2, 3, 3)
    for p in range(2):
        np.testing.assert_array_equal(fit.w_last[p, 1], fit.w_last[p, 0])
        assert not np.array_equal(fit.w_last[p, 2], fit.w_last[p, 0])
        alone = L.train_policy(spec, data_s[p], world[p].w_ref, indices)
        np.testing.assert_allclose(fit.w_last[p, 0], alone.w_last, rtol=1e-6, atol=1e-7)
    f = RNG.normal(size=6)
    fr = f[None] + RNG.normal(size=(3, 6))
    assert float(S.empirical_stability(jnp.asarray(f), jnp.asarray(fr))) == pytest.approx(np.max(np.abs(fr - f)))


# ---- the kernel through the engine ----------------------------------------------------------------

TINY = dict(d=3, actions=3, prompts=16, rollouts=2, eval_prompts=128, steps=64, record_every=16, pref_pairs=1,
            reward_model="oracle", train_log_ratio="exact", learner="GA")
KERNEL = S.StabilityKernel(replacements=4, opt_steps=300, pop_steps=50, diag_prompts=128)


@pytest.fixture(scope="module")
def runs():
    spec = Spec().replace(**TINY)
    return {sx: rb.run(spec.replace(sigma_xi=sx), 16, kernel=KERNEL, progress=False, seed=4) for sx in (0.0, 0.5)}


def test_kernel_degenerate_corner_and_misspecified_stability(runs):
    real, mis = runs[0.0], runs[0.5]
    for res in (real, mis):
        assert np.all(res["status"] == 0)
        assert np.all(res["opt_grad_norm_max"] < 1e-5)        # GA reached θ*_S on S and every S'
        assert np.all(res["pop_grad_norm"] < 1e-5)             # and the population optimum on the evaluation set
        assert res["ga_excess_best"].shape == (16, 4) and res["b6_lemma2"].shape == (16, 4)
        assert np.all(res["hess_norm_max"] <= res["L_F"])
        assert np.all(res["lemma1_actual"] <= res["b6_lemma1"])
        assert np.all(res["stab_opt"] <= res["b6_thm2"])
        assert np.all(res["a5_eps_max"] == 0) and np.all(res["a3_sigma_path"] > 1e-3)
    # realizable: θ*_S = θ* = θ*/β for every S (stability 0 to round-off); misspecified: it is not
    assert np.all(real["opt_dist_linear"] < 1e-4) and np.all(real["stab_opt"] < 1e-5)
    assert np.all(mis["opt_dist"] > 1e-3) and np.all(mis["stab_opt"] > 1e-4)
    # finite-T GA is not degenerate even when the optimum is
    assert np.all(real["stab_ga_last"] > 1e-5)


def test_kernel_matches_an_independent_recomputation(runs):
    """Problem 0 recomputed in NumPy (float64) from its own training sample: θ*_S is stationary for F_S, and
    J_S(θ*_S), the gap and Lemma 1's bound are what the kernel reports."""
    from rlhf_bounds import engine
    from rlhf_bounds.simulate import prepare
    spec = Spec().replace(**TINY, sigma_xi=0.5)
    res = runs[0.5]
    pk, _ = engine.problem_keys(4)
    prep = jax.jit(prepare)(spec, jax.random.fold_in(pk, 0))
    phi, r = np.asarray(prep.data.phi, np.float64), np.asarray(prep.data.reward, np.float64)
    w = np.asarray(res["w_opt"][0], np.float64)
    grads, values = [], []
    for x, rx in zip(phi, r):
        p = np_probs(w, x)
        ell = np.log(p) - np.log(1 / spec.actions)
        h = rx - spec.beta * ell
        grads.append(((x - p @ x) * (p * (h - p @ h))[:, None]).sum(0))
        values.append(p @ h)
    assert np.linalg.norm(np.mean(grads, 0)) < 1e-5
    assert res["J_S_opt"][0] == pytest.approx(np.mean(values), abs=1e-5)
    assert res["gen_gap_opt"][0] == pytest.approx(res["J_S_opt"][0] - res["J_opt"][0], abs=1e-6)
    assert res["lemma1_actual"][0] == pytest.approx(abs(res["J_S_opt"][0] - res["J_pop"][0]), abs=1e-6)
    assert float(res["b6_lemma1"][0]) == pytest.approx(9 * np.sqrt(2 * np.log(2 / spec.delta) / spec.prompts))


def test_kernel_refuses_settings_outside_the_papers():
    spec = Spec().replace(**{**TINY, "reward_model": "mle"})
    with pytest.raises(SpecError, match="reward_model"):
        KERNEL(spec, jnp.zeros((1,), jnp.uint32), jax.random.key(0))
    assert KERNEL.name.startswith("stability-R4-")


def test_kernel_results_do_not_depend_on_the_chunk_size(runs):
    """Problems 0..15 computed in chunks of 8 equal the run in one chunk of 16, bit for bit in every column
    (the kernel pads to its fixed finishing block and trains in fixed lane blocks; docs/engine.md)."""
    spec = Spec().replace(**TINY, sigma_xi=0.5)
    chunked = rb.run(spec, 16, kernel=KERNEL, progress=False, seed=4, chunk_size=8)
    whole = runs[0.5]
    assert set(chunked.columns) == set(whole.columns)
    for col in whole.columns:
        np.testing.assert_array_equal(chunked[col], whole[col], err_msg=col)
