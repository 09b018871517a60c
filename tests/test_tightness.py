"""The tightness ladder: the new bound forms (bounds._tightness), the floor q_δ(w) and the kernel.

Each bound form is checked against an independent computation (SciPy's root finder for the kl
inversions, Maurer–Pontil's pairwise definition of the sample variance, the Bernstein exponent solved
back) and by Monte Carlo coverage on distributions where it is nearly tight (with the same test's power
shown on the bound halved); the floor's order-statistic interval against SciPy's binomial quantiles
and by its coverage of a known quantile; the kernel against the default kernel, NumPy recomputations
and the variance its redraws must have.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy import optimize, stats

import rlhf_bounds as rb
from rlhf_bounds import bounds, world
from rlhf_bounds.simulate import prepare
from rlhf_bounds.spec import SpecError
from rlhf_bounds.tightness import TightnessKernel, quantile_rank_interval, sample_moments, sampling_floor

from conftest import np_inverse_cdf, np_log_probs, np_probs, tiny_spec


def _np_kl(q, p):
    a = q * math.log(q / p) if q > 0 else 0.0
    b = (1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else 0.0
    return a + b


def _np_kl_deviation(q, c):
    """max |p − q| over kl(q‖p) ≤ c, by Brent's method on each side."""
    up = 1.0 if _np_kl(q, 1 - 1e-15) <= c else optimize.brentq(lambda p: _np_kl(q, p) - c, max(q, 1e-300),
                                                                   1 - 1e-15, xtol=1e-15)
    down = 0.0 if q == 0 or _np_kl(q, 1e-15) <= c else optimize.brentq(lambda p: _np_kl(q, p) - c, 1e-15, q,
                                                                       xtol=1e-15)
    return max(q - down, up - q)


def test_kl_deviation_matches_brent(rng):
    for q, c in [(0.3, 0.05), (0.01, 0.2), (0.5, 1e-4), (0.97, 0.02), (0.0, 0.1)] + \
            [(float(rng.uniform()), float(rng.uniform(1e-4, 0.5))) for _ in range(10)]:
        got = float(bounds.kl_deviation(q, c))
        want = _np_kl_deviation(q, c)
        assert got >= want - 1e-12 and got == pytest.approx(want, abs=1e-9), (q, c)


def test_kl_sampling_bound_by_level_and_below_hoeffding(rng):
    n, K, delta = 40, 3, 0.1
    width, lo = 2.5, -1.25
    for _ in range(8):
        h_bar, j_hat = rng.uniform(lo, lo + width, size=2)
        got = bounds.kl_sampling_bound(h_bar, j_hat, n, K, lo, width, delta)
        L = math.log(4 / delta)
        want_p = width * _np_kl_deviation((h_bar - lo) / width, L / n)
        want_r = width * _np_kl_deviation((j_hat - lo) / width, L / (n * K))
        assert float(got.prompt) == pytest.approx(want_p, rel=1e-9)
        assert float(got.rollout) == pytest.approx(want_r, rel=1e-9)
        assert float(got.total) == pytest.approx(want_p + want_r, rel=1e-9)
        hoeff = bounds.hoeffding_sampling_terms(n, K, width, delta)
        # Pinsker: the kl form is never looser than Hoeffding's, level by level.
        assert float(got.prompt) <= float(hoeff.prompt) * (1 + 1e-12)
        assert float(got.rollout) <= float(hoeff.rollout) * (1 + 1e-12)
    assert float(bounds.hoeffding_sampling_terms(n, K, width, delta).total) == pytest.approx(
        width * float(bounds.sampling_alpha(n, K, delta)), rel=1e-12)
    assert float(bounds.kl_sampling_bound(0.0, 0.0, n, K, 0.0, np.inf, delta).total) == np.inf
    assert float(bounds.kl_sampling_bound(0.0, 0.0, n, K, 0.0, 0.0, delta).total) == 0.0


def test_empirical_bernstein_matches_maurer_pontil_definition(rng):
    n, delta, width, lo = 30, 0.05, 3.0, -1.5
    h = rng.uniform(lo, lo + width, size=n) ** 3 / 4
    z = (h - lo) / width
    # Maurer & Pontil (2009): V_n = (1/(n(n−1))) Σ_{i<j} (Z_i − Z_j)², the bound on EZ − Z̄ at δ' = δ/4 per side.
    v_pairs = sum((z[i] - z[j]) ** 2 for i in range(n) for j in range(i + 1, n)) / (n * (n - 1))
    L = math.log(2 / (delta / 4))
    want = width * (math.sqrt(2 * v_pairs * L / n) + 7 * L / (3 * (n - 1)))
    got = float(bounds.empirical_bernstein_prompt(np.var(h, ddof=1), n, width, delta))
    assert got == pytest.approx(want, rel=1e-12)
    assert float(bounds.empirical_bernstein_prompt(0.1, 1, width, delta)) == np.inf


def test_bernstein_rollout_solves_the_bernstein_exponent():
    for var, n, K, width, delta in [(0.3, 50, 4, 2.0, 0.05), (1e-6, 10, 1, 5.0, 0.2), (2.0, 256, 8, 4.0, 0.01)]:
        t = float(bounds.bernstein_rollout(var, n, K, width, delta))
        N, L = n * K, math.log(4 / delta)
        # exp(−N t²/(2σ̄² + 2Wt/3)) = δ/4 at the returned t ...
        assert N * t * t / (2 * var + 2 * width * t / 3) == pytest.approx(L, rel=1e-10)
        # ... which lies between the variance term alone and the familiar closed form.
        assert math.sqrt(2 * var * L / N) <= t <= math.sqrt(2 * var * L / N) + 2 * width * L / (3 * N)


def _violations(err, bound):
    return int(np.sum(np.abs(err) > bound))


def test_rungs_cover_at_their_delta_and_the_test_has_power():
    """Monte Carlo coverage where the forms are nearly tight: Bernoulli prompts (the kl form's extreme case) and
    rollouts from per-prompt laws of different means and variances (not identically distributed)."""
    rng = np.random.default_rng(20260101)
    trials, n, K, delta = 20000, 40, 4, 0.1
    p = 0.1
    x = rng.binomial(1, p, size=(trials, n)).astype(np.float64)   # the h_w(x_i), in [0, 1]
    z_bar = x.mean(axis=1)
    kl_p = np.asarray(bounds.kl_sampling_bound(z_bar, z_bar, n, K, 0.0, 1.0, delta).prompt)
    eb_p = np.asarray(bounds.empirical_bernstein_prompt(x.var(axis=1, ddof=1), n, 1.0, delta))
    for name, b in (("kl prompt", kl_p), ("empirical Bernstein prompt", eb_p)):
        k = _violations(z_bar - p, b)
        assert float(bounds.clopper_pearson_upper(k, trials, 0.05)) <= delta / 2 or \
            float(bounds.clopper_pearson_lower(k, trials, 0.05)) <= delta / 2, name
    # Power: the kl form halved is refuted by the same test.
    k_half = _violations(z_bar - p, 0.5 * kl_p)
    assert float(bounds.clopper_pearson_lower(k_half, trials, 0.05)) > delta / 2
    # Rollout level, given fixed prompts: three-point laws per prompt with different means and variances.
    means = np.linspace(0.05, 0.6, n)
    values = np.stack([np.zeros(n), means * 2, np.ones(n)], axis=1)          # support {0, 2m, 1}
    probs = np.stack([0.5 * (1 - means), 0.5 * np.ones(n), 0.5 * means], axis=1)
    probs = probs / probs.sum(axis=1, keepdims=True)
    h = (probs * values).sum(axis=1)
    sig2 = (probs * (values - h[:, None]) ** 2).sum(axis=1)
    draws = (rng.uniform(size=(trials, n, K))[..., None] > np.cumsum(probs, axis=1)[None, :, None, :]).sum(-1)
    g = values[np.arange(n)[None, :, None], np.minimum(draws, 2)]
    j = g.mean(axis=(1, 2))
    err = j - h.mean()
    kl_r = np.asarray(bounds.kl_sampling_bound(h.mean(), j, n, K, 0.0, 1.0, delta).rollout)
    bern = float(bounds.bernstein_rollout(sig2.mean(), n, K, 1.0, delta))
    for name, b in (("kl rollout", kl_r), ("Bernstein rollout", bern)):
        k = _violations(err, b)
        assert float(bounds.clopper_pearson_lower(k, trials, 0.05)) <= delta / 2, (name, k)
    assert float(bounds.clopper_pearson_lower(_violations(err, 0.5 * bern), trials, 0.05)) > delta / 2


def test_quantile_rank_interval_matches_binomial_quantiles():
    for R, level in [(400, 0.95), (1000, 0.99), (50, 0.9), (200, 0.5)]:
        k, l, u = quantile_rank_interval(R, level)
        assert k == math.ceil(level * R)
        assert l == max(int(stats.binom.ppf(0.025, R, level)), 1)
        assert u == min(int(stats.binom.ppf(0.975, R, level)) + 1, R)
    with pytest.raises(ValueError):
        quantile_rank_interval(10, 1.0)


def test_sampling_floor_covers_a_known_quantile():
    rng = np.random.default_rng(7)
    N, R, delta, sd = 400, 400, 0.05, 0.3
    h = rng.normal(0, 1e-4, size=(N, R))                 # h̄_r: the centre, known up to tiny noise
    j = h + rng.normal(0, sd, size=(N, R))
    f = sampling_floor(j, h, delta)
    true_q = sd * stats.norm.ppf(1 - delta / 2)          # the (1 − δ)-quantile of |N(0, sd²)|
    covered = np.mean((f["lo"] <= true_q) & (true_q <= f["hi"]))
    assert covered >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / N)
    assert np.median(f["q"]) == pytest.approx(true_q, rel=0.03)
    assert f["R"] == R and np.all(f["q_prompt"] < 1e-3)


def test_sample_moments_against_numpy(rng):
    n, K, A, d, beta, tau = 6, 5, 4, 3, 0.7, 0.4
    phi = rng.normal(size=(n, A, d)) / math.sqrt(d)
    r = rng.normal(size=(n, A))
    u = rng.uniform(size=(n, K))
    w, w_ref = rng.normal(size=d), 0.3 * rng.normal(size=d)
    got = sample_moments(*(jax.numpy.asarray(x, jax.numpy.float32) for x in (w, w_ref, phi, r, u)), beta, tau)
    rollouts, hs, vs = [], [], []
    for i in range(n):
        p = np_probs(w, phi[i])
        g = r[i] - beta * np.clip(np_log_probs(w, phi[i]) - np_log_probs(w_ref, phi[i]), -tau, tau)
        rollouts.append(g[np_inverse_cdf(p, u[i])].mean())
        hs.append(p @ g)
        vs.append(p @ (g - p @ g) ** 2)
    tol = dict(rel=1e-5, abs=1e-6)
    assert float(got["J_hat"]) == pytest.approx(np.mean(rollouts), **tol)
    assert float(got["h_bar"]) == pytest.approx(np.mean(hs), **tol)
    assert float(got["prompt_var"]) == pytest.approx(np.var(hs, ddof=1), rel=1e-4)
    assert float(got["rollout_var"]) == pytest.approx(np.mean(vs), rel=1e-4)


def test_kernel_rejects_bad_options():
    with pytest.raises(SpecError, match="redraws"):
        TightnessKernel(redraws=1)
    with pytest.raises(SpecError, match="redraw_batch"):
        TightnessKernel(redraw_batch=0)
    assert TightnessKernel(redraws=64).name == "tightness-R64"


SPEC = tiny_spec(prompts=16, rollouts=2, eval_prompts=128, steps=20, record_every=10, tau=0.5, bounds="all",
                 posterior_draws=8)
R = 64


@pytest.fixture(scope="module")
def runs():
    kernel = TightnessKernel(redraws=R, redraw_batch=16)
    return (rb.run(SPEC, 8, kernel=kernel, seed=3, chunk_size=8, progress=False),
            rb.run(SPEC, 8, seed=3, chunk_size=8, progress=False))


def test_kernel_keeps_the_default_columns_and_adds_the_ladder(runs):
    lad, default = runs
    assert lad.record["kernel"] == f"tightness-R{R}" and np.all(lad.ok)
    for col in ("gap_total", "gap_sampling", "J_hat_mean", "b1_sampling", "b1_total", "gap_reward_shift"):
        np.testing.assert_array_equal(lad[col], default[col], err_msg=col)
    np.testing.assert_allclose(lad["rung_hoeffding_total"], lad["b1_sampling"], rtol=1e-12)
    assert lad.arrays["redraw_J_hat"].shape == (8, R) and lad.arrays["redraw_h_bar"].shape == (8, R)
    # The rungs are computed on the fresh sample finish used: rebuild the kl form from the saved columns.
    width = lad["objective_width"]
    h_bar = lad["gap_sampling_prompt"].astype(np.float64) + lad["J_hat_mean"]
    kl = bounds.kl_sampling_bound(h_bar, lad["J_hat"], SPEC.prompts, SPEC.rollouts, -width / 2, width, SPEC.delta)
    np.testing.assert_allclose(np.asarray(kl.prompt), lad["rung_kl_prompt"], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(kl.rollout), lad["rung_kl_rollout"], rtol=1e-3)
    # Each new rung is at most the paper's at its level where it must be (kl, Pinsker).
    assert np.all(lad["rung_kl_total"] <= lad["b1_sampling"] * (1 + 1e-9))


def test_redraws_are_fresh_samples_of_n_prompts_and_k_rollouts(runs):
    lad, _ = runs
    j, h = lad.arrays["redraw_J_hat"].astype(np.float64), lad.arrays["redraw_h_bar"].astype(np.float64)
    # Independent keys: no redraw repeats the fresh sample or another redraw.
    assert not np.any(j == lad["J_hat"][:, None])
    assert all(np.unique(row).size == R for row in j)
    # Their mean is EĴ (within the evaluation set's and the redraws' standard errors) ...
    se = np.sqrt(lad["J_hat_mean_se"].astype(np.float64) ** 2 + h.var(axis=1, ddof=1) / R)
    assert np.all(np.abs(h.mean(axis=1) - lad["J_hat_mean"]) <= 5 * se)
    # ... and their variance is Var(Ĵ) = σ²_prompt/n + σ²_roll/(nK) (the population values on the evaluation set):
    # a redraw that reused prompts or rollouts would miss one of the two parts.
    n, K = SPEC.prompts, SPEC.rollouts
    predicted = lad["var_prompt"].astype(np.float64) / n + lad["var_rollout"].astype(np.float64) / (n * K)
    ratio = j.var(axis=1, ddof=1) / predicted
    assert abs(np.mean(ratio) - 1) < 4 * math.sqrt(2 / R) / math.sqrt(ratio.size) + 0.15
    prompt_ratio = h.var(axis=1, ddof=1) / (lad["var_prompt"].astype(np.float64) / n)
    assert abs(np.mean(prompt_ratio) - 1) < 4 * math.sqrt(2 / R) / math.sqrt(prompt_ratio.size) + 0.15


def test_reward_shift_rung_against_numpy(runs):
    lad, _ = runs
    # Jensen, on every problem: √E_{D_w}(r̂ − r*)² ≥ |E_{D_w}[r̂ − r*]|.
    assert np.all(lad["rung_shift_l2_policy"] >= np.abs(lad["gap_reward_shift"]) * (1 - 1e-5))
    # Recompute E_{D_w}(r̂ − r*)² for problem 0 in NumPy from its evaluation prompts.
    problems_key, _ = rb.engine.problem_keys(3)
    draw = jax.jit(lambda k: (lambda prep: world.draw_prompts(SPEC, prep.world, prep.keys.eval, SPEC.eval_prompts))(
        prepare(SPEC, k)))
    ev = draw(jax.random.fold_in(problems_key, 0))
    phi, theta_hat, theta = (np.asarray(x, np.float64) for x in (ev.phi, lad.arrays["theta_hat"][0],
                                                                  lad.arrays["theta_star"][0]))
    w = np.asarray(lad.arrays["w_last"][0], np.float64)
    diff = phi @ (theta_hat - theta)                     # the MLE's r̂ − r* (σ_ξ = 0)
    want = np.mean([np_probs(w, phi[m]) @ diff[m] ** 2 for m in range(phi.shape[0])])
    assert float(lad["l2_policy"][0]) == pytest.approx(want, rel=1e-4)


def test_b2_rungs_reproduce_the_catalogue_and_are_ordered(runs):
    lad, _ = runs
    # The rung "as used" is the catalogue's own Gaussian bound; the Occam kl form is the catalogue's Occam bound.
    np.testing.assert_allclose(lad["b2r_gauss_used"], lad["b2_gauss_sampling"] + lad["b2_gauss_mc"], rtol=1e-6)
    np.testing.assert_allclose(lad["b2r_occam_kl"], lad["b2_occam_sampling"], rtol=1e-6)
    # Dropping the union bound or the Monte Carlo radii can only lower it; the square-root form never does.
    assert np.all(lad["b2r_gauss_no_union"] <= lad["b2r_gauss_used"] * (1 + 1e-12))
    assert np.all(lad["b2r_gauss_no_mc"] <= lad["b2r_gauss_used"] * (1 + 1e-12))
    # The square-root prompt level does not depend on q̂, so it pays no Monte Carlo radius for it: it is never below
    # the kl form *without* that radius (Pinsker), though it may be below the kl form with it.
    assert np.all(lad["b2r_gauss_sqrt"] - lad["b2_gauss_mc"] >= lad["b2r_gauss_no_mc"] * (1 - 1e-9))
    assert np.all(lad["b2r_occam_sqrt"] >= lad["b2r_occam_kl"] * (1 - 1e-12))
    # The union bound's price is log G nats in the confidence term: strictly positive here.
    assert np.all(lad["b2r_gauss_no_union"] < lad["b2r_gauss_used"])
