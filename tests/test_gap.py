"""gap.py: exact per-prompt statistics, Ĵ, quantiles and the oracle decomposition (docs/theory.md §14, §1).

Unit tests compare with NumPy brute force in float64. The simulated tests run
the engine on the tiny family of conftest.py: the decomposition identity
G = sampling + reward shift + clipping for every regime of the default study,
and, in the realizable oracle setting with τ = ∞, exact zeros for the
reward-shift and clipping terms and a zero-mean sampling term over 2,000
problems.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_bounds as rb
from rlhf_bounds import gap
from conftest import EPS32, TINY, assert_close, np_inverse_cdf, np_log_ratio, np_probs, tiny_spec

INF = math.inf


def random_eval_set(rng, m, A, d, scale=1.0):
    phi = rng.normal(size=(m, A, d)) / math.sqrt(d)
    r_hat = rng.normal(size=(m, A))
    r_star = r_hat + 0.3 * rng.normal(size=(m, A))
    mu = rng.dirichlet(np.ones(A), size=m)
    w, w_ref = scale * rng.normal(size=d), 0.5 * rng.normal(size=d)
    return w, w_ref, phi, r_hat, r_star, np.log(mu)


def np_prompt_stats(w, w_ref, phi_i, rh, rs, log_mu, beta, tau):
    p = np_probs(w, phi_i)
    ell = np_log_ratio(w, w_ref, phi_i)
    ell_t = np.clip(ell, -tau, tau)
    mu = np.exp(log_mu)
    return dict(
        j_hat_mean=np.sum(p * (rh - beta * ell_t)),
        j_star=np.sum(p * (rs - beta * ell)),
        reward_shift=np.sum(p * (rh - rs)),
        clipping=beta * np.sum(p * (ell - ell_t)),
        tail_excess=np.sum(p * np.maximum(np.abs(ell) - tau, 0)),
        kl=np.sum(p * ell),
        chi2=np.sum(p ** 2 / mu) - 1,
        l2_train=np.sum(mu * (rh - rs) ** 2),
        abs_log_ratio=np.abs(ell),
        prob=p,
        log1p_chi2=np.log(np.sum(p ** 2 / mu)),
    )


def np_weighted_quantile(values, weights, level):
    """Brute force: the smallest v among the values with Σ_{v_i ≤ v} w_i / Σ w_i ≥ level."""
    v, wt = np.ravel(values), np.ravel(weights)
    total = wt.sum()
    for c in np.unique(v):
        if wt[v <= c].sum() / total >= level:
            return c
    return v.max()


@pytest.mark.parametrize("tau", [0.0, 0.4, 2.0, INF])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_prompt_stats_brute_force(rng, tau, scale):
    m, A, d, beta = 9, 5, 3, 0.7
    args = random_eval_set(rng, m, A, d, scale)
    stats = gap.prompt_stats(args[0], args[1], gap.EvalSet(*args[2:]), beta, tau)
    w, w_ref, phi, rh, rs, lmu = args
    for i in range(m):
        ref = np_prompt_stats(w, w_ref, phi[i], rh[i], rs[i], lmu[i], beta, tau)
        for name, value in ref.items():
            assert_close(getattr(stats, name)[i], value, rtol=1e-9, atol=1e-11, what=f"{name}[{i}]")
    assert stats.abs_log_ratio.shape == (m, A) and stats.prob.shape == (m, A)


def test_prompt_stats_chi2_log_space_with_tiny_mu():
    """χ² in log space: μ = e^-300 next to π ≈ 1 gives the exact (huge, finite in float64) value."""
    phi = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    w = np.array([50.0, 0.0])
    log_mu = np.log(np.array([[1e-300, 0.5, 0.5]]))
    stats = gap.prompt_stats(w, np.zeros(2), gap.EvalSet(phi, np.zeros((1, 3)), np.zeros((1, 3)), log_mu), 1.0, INF)
    p = np_probs(w, phi[0])
    assert_close(stats.chi2[0], p[0] ** 2 / 1e-300 + np.sum(p[1:] ** 2 / 0.5) - 1, rtol=1e-9)
    assert_close(stats.log1p_chi2[0], np.log(p[0] ** 2 / 1e-300 + np.sum(p[1:] ** 2 / 0.5)), rtol=1e-12)


def test_prompt_stats_log1p_chi2_where_chi2_overflows():
    """float32, μ(a) = e^-200 where π(a) ≈ 1: χ² overflows to inf, log(1 + χ²) ≈ 200 stays exact."""
    phi = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    w = np.array([30.0, 0.0], np.float32)
    log_mu = np.array([[-200.0, np.log1p(-np.exp(-200.0))]], np.float32)
    z = np.zeros((1, 2), np.float32)
    stats = gap.prompt_stats(w, np.zeros(2, np.float32), gap.EvalSet(phi, z, z, log_mu), np.float32(1.0),
                             np.float32(INF))
    p = np_probs(w.astype(np.float64), phi[0].astype(np.float64))
    expected = np.logaddexp(2 * np.log(p[0]) + 200.0, 2 * np.log(p[1]) - float(log_mu[0, 1]))
    assert not np.isfinite(float(stats.chi2[0]))
    assert_close(stats.log1p_chi2[0], expected, rtol=1e-6)


def test_population_means_standard_errors_and_quantiles(rng):
    m, A, d, beta, tau = 40, 4, 3, 0.5, 0.6
    args = random_eval_set(rng, m, A, d, 3.0)
    stats = gap.prompt_stats(args[0], args[1], gap.EvalSet(*args[2:]), beta, tau)
    pop = gap.population(stats)
    w, w_ref, phi, rh, rs, lmu = args
    per = [np_prompt_stats(w, w_ref, phi[i], rh[i], rs[i], lmu[i], beta, tau) for i in range(m)]
    col = lambda k: np.array([p[k] for p in per])
    names = {"J_hat_mean": "j_hat_mean", "J_star": "j_star", "reward_shift": "reward_shift", "clipping": "clipping",
             "tail_excess": "tail_excess", "kl": "kl", "chi2": "chi2", "l2_train": "l2_train"}
    for key, name in names.items():
        assert_close(pop[key], col(name).mean(), rtol=1e-9, atol=1e-12, what=key)
    # log(1 + χ²(D_w‖D_train)) = log mean_x (1 + χ²_x)
    assert_close(pop["log1p_chi2"], np.log(np.mean(1 + col("chi2"))), rtol=1e-9)
    # Standard error of a mean over m prompts: sd/√m. The package may use the n or n − 1 convention;
    # they differ by the factor √(m/(m − 1)), which the tolerance allows and nothing more.
    for key, name in (("J_hat_mean_se", "j_hat_mean"), ("J_star_se", "j_star")):
        se1 = col(name).std(ddof=1) / math.sqrt(m)
        assert abs(float(pop[key]) / se1 - 1) <= 1 - math.sqrt((m - 1) / m) + 1e-9, key
    absl = np.stack([p["abs_log_ratio"] for p in per])
    prob = np.stack([p["prob"] for p in per])
    for level in gap.QUANTILE_LEVELS:
        key = "abs_log_ratio_q" + f"{100 * level:g}".replace(".", "_")
        assert_close(pop[key], np_weighted_quantile(absl, prob, level), rtol=1e-12, what=key)


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_weighted_quantiles_random(rng, n):
    values = rng.normal(size=n)
    weights = rng.uniform(size=n) * (rng.uniform(size=n) > 0.2)
    if weights.sum() == 0:
        weights[0] = 1.0
    levels = [0.01, 0.3, 0.5, 0.9, 0.999]
    got = np.asarray(gap.weighted_quantiles(values, weights, levels))
    np.testing.assert_array_equal(got, [np_weighted_quantile(values, weights, q) for q in levels])


def test_weighted_quantiles_edge_cases():
    # Exact cumulative levels: P(V ≤ 2) = 0.5 ≥ 0.5, so the median is 2 (not 3).
    v, wt = np.array([4.0, 1.0, 3.0, 2.0]), np.full(4, 0.25)
    np.testing.assert_array_equal(np.asarray(gap.weighted_quantiles(v, wt, [0.25, 0.5, 0.75, 0.76])),
                                  [1.0, 2.0, 3.0, 4.0])
    # Zero-weight values are never a quantile; unnormalised weights are normalised; 2-D input flattened.
    v, wt = np.array([[1.0, 2.0], [3.0, 0.5]]), np.array([[3.0, 0.0], [3.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(gap.weighted_quantiles(v, wt, [0.1, 0.5, 0.51, 0.99])),
                                  [1.0, 1.0, 3.0, 3.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-10, 10), st.floats(0.0, 5.0)), min_size=1, max_size=12),
       st.sampled_from([0.05, 0.5, 0.95]))
def test_weighted_quantiles_property(pairs, level):
    """On arbitrary (value, weight) lists, including ties and zero weights: the brute-force definition."""
    values = np.array([p[0] for p in pairs])
    weights = np.array([p[1] for p in pairs])
    if weights.sum() <= 1e-6:
        weights = weights + 1.0
    # Pad to a fixed length with zero-weight copies of the first value (one compilation for every example).
    pad = 12 - len(values)
    values = np.concatenate([values, np.full(pad, values[0])])
    weights = np.concatenate([weights, np.zeros(pad)])
    cdf_levels = np.cumsum(np.sort(weights)) / weights.sum()
    if np.any(np.abs(cdf_levels - level) < 1e-12):
        return  # a cumulative weight equal to the level up to round-off: either neighbour is right
    got = float(gap.weighted_quantiles(values, weights, [level])[0])
    assert got == np_weighted_quantile(values, weights, level)


def np_sorted_weighted_quantiles(values, weights, levels, tie_tol=1e-12):
    """Reference by sorting: merge equal values, cumulate their weights (float64, exact widening of
    float32), and take the first value of positive weight whose CDF reaches the level. Also
    returns, per level, the set of answers a float64 computation may legitimately give: both
    neighbours where a CDF value lies within ``tie_tol`` of the level (summation order decides)."""
    v = np.ravel(values)
    w = np.ravel(weights).astype(np.float64)
    uniq, inverse = np.unique(v, return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=w, minlength=uniq.size)
    keep = mass > 0
    uniq, cdf = uniq[keep], np.cumsum(mass[keep]) / w.sum()
    answers, allowed = [], []
    for level in levels:
        i = min(int(np.searchsorted(cdf, level, side="left")), uniq.size - 1)
        answers.append(uniq[i])
        near = np.nonzero(np.abs(cdf - level) <= tie_tol)[0]
        allowed.append({uniq[i]} | {uniq[min(j + k, uniq.size - 1)] for j in near for k in (0, 1)})
    return np.array(answers, v.dtype), allowed


def random_w1_law(rng, kind):
    """A float32 law of W1 shape [2048, 8] with many ties, zero weights and subnormal atoms."""
    m, A = 2048, 8
    if kind == "abs_log_ratio":   # the engine's law: |ℓ| ≥ 0, weights π(a|x) (one softmax per prompt)
        logits = rng.normal(size=(m, A)) * 2.0
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights = p / p.sum(axis=1, keepdims=True)
        values = np.abs(rng.normal(size=(m, A)) * rng.uniform(0, 3, size=(m, 1)))
        values = np.where(rng.uniform(size=(m, A)) < 0.2, np.ceil(values * 10) / 10, values)  # ties (none at 0)
    else:                         # signed values on a coarse grid: heavy ties, both signs, ±0
        values = rng.integers(-40, 40, size=(m, A)) / 8.0
        values = np.where(rng.uniform(size=(m, A)) < 0.05, -0.0, values)
        weights = rng.exponential(size=(m, A)) * (rng.uniform(size=(m, A)) < 0.9)  # ~10% zero
    values = values.astype(np.float32)
    # Subnormal atoms (below 2^-126 ≈ 1.2e-38) with real mass, and a few subnormal weights.
    tiny = rng.uniform(size=(m, A)) < 0.03
    values[tiny] = (rng.integers(1, 50, size=int(tiny.sum())) * 1e-45).astype(np.float32) * (
        1 if kind == "abs_log_ratio" else rng.choice([-1, 1], size=int(tiny.sum())))
    weights = weights.astype(np.float32)
    weights[rng.uniform(size=(m, A)) < 0.01] = np.float32(3e-41)
    return values, weights


@pytest.mark.parametrize("kind", ["abs_log_ratio", "signed_grid"])
def test_weighted_quantiles_w1_shape_vs_numpy_sort(kind):
    """At W1 shape (float32 [2048, 8], jit and vmap over laws as the engine runs it): the atom
    returned, a float32 equal to an atom, is the sort-based weighted quantile, subnormals included."""
    rng = np.random.default_rng(17 if kind == "abs_log_ratio" else 18)
    laws = [random_w1_law(rng, kind) for _ in range(4)]
    values = np.stack([v for v, _ in laws])
    weights = np.stack([w for _, w in laws])
    levels = list(gap.QUANTILE_LEVELS) + [1e-4, 0.123456, 0.3, 0.6180339887, 0.9999]
    got = np.asarray(jax.jit(jax.vmap(lambda v, w: gap.weighted_quantiles(v, w, levels)))(values, weights))
    assert got.dtype == np.float32 and got.shape == (len(laws), len(levels))
    subnormal_answers = 0
    for i in range(len(laws)):
        expected, allowed = np_sorted_weighted_quantiles(values[i], weights[i], levels)
        for j, level in enumerate(levels):
            assert got[i, j] in allowed[j], (i, level, got[i, j], expected[j])
            subnormal_answers += 0 < abs(got[i, j]) < np.finfo(np.float32).tiny
    if kind == "abs_log_ratio":
        # The law puts ~3% of its mass on subnormal atoms: the smallest level lands on one.
        assert subnormal_answers > 0


@pytest.mark.parametrize("tau", [0.3, INF])
def test_sample_objective_vs_numpy(rng, tau):
    n, K, A, d, beta = 6, 5, 4, 3, 0.8
    w, w_ref, phi, rh, _, _ = random_eval_set(rng, n, A, d, 2.0)
    u = rng.uniform(size=(n, K))
    j_hat, j_prompts = gap.sample_objective(w, w_ref, phi, rh, u, beta, tau)
    rollout, exact = [], []
    for i in range(n):
        p = np_probs(w, phi[i])
        h = rh[i] - beta * np.clip(np_log_ratio(w, w_ref, phi[i]), -tau, tau)
        y = np_inverse_cdf(p, u[i])
        rollout.append(h[y].mean())
        exact.append(np.sum(p * h))
    assert_close(j_hat, np.mean(rollout), rtol=1e-10, atol=1e-12)
    assert_close(j_prompts, np.mean(exact), rtol=1e-10, atol=1e-12)


def test_sample_objective_is_unbiased_over_rollouts():
    """Given the prompts, E_U Ĵ = (1/n)Σ_i E_π[r̂ − βℓ^τ]: mean over 20 000 uniform draws within 4.5 SE."""
    rng = np.random.default_rng(3)
    w, w_ref, phi, rh, _, _ = random_eval_set(rng, 4, 5, 3, 1.5)
    us = jax.random.uniform(jax.random.key(4), (20_000, 4, 3), jnp.float64)
    j, jp = jax.jit(jax.vmap(lambda u: gap.sample_objective(w, w_ref, phi, rh, u, 0.6, 0.5)))(us)
    j = np.asarray(j)
    assert np.all(np.asarray(jp) == float(jp[0]))
    assert abs(j.mean() - float(jp[0])) <= 4.5 * j.std(ddof=1) / math.sqrt(len(j))


def test_decompose_identity_on_numbers():
    pop = {"J_star": 0.25, "J_hat_mean": 0.5, "reward_shift": 0.125, "clipping": 0.125}
    out = gap.decompose(1.0, 0.75, pop)
    assert out["gap_total"] == 0.75 and out["gap_sampling"] == 0.5
    assert out["gap_sampling_prompt"] == 0.25 and out["gap_sampling_rollout"] == 0.25
    assert out["gap_reward_shift"] == 0.125 and out["gap_clipping"] == 0.125


# ---- simulated problems -------------------------------------------------------------------------

def identity_tolerance(res, suffix=""):
    """64 float32 ulps of the largest magnitude entering the identity (means of 256 × 4 float32 terms).

    |ℓ| ≤ log_ratio_range, so β·log_ratio_range bounds the KL terms; |r| ≤ reward_range.
    """
    spec = res.spec
    scale = (1 + np.abs(res["J_hat" + suffix]) + np.abs(res["J_hat_mean"]) + np.abs(res["J_star"])
             + res["reward_range"] + spec.beta * res["log_ratio_range"])
    return 64 * EPS32 * scale


def check_decomposition(res):
    for suffix in ("", "_train"):
        total = res["gap_total" + suffix]
        parts = res["gap_sampling" + suffix] + res["gap_reward_shift" + suffix] + res["gap_clipping" + suffix]
        tol = identity_tolerance(res, suffix)
        assert np.all(np.abs(total - parts) <= tol), np.max(np.abs(total - parts) / tol)
        split = res["gap_sampling_prompt" + suffix] + res["gap_sampling_rollout" + suffix]
        assert np.all(np.abs(res["gap_sampling" + suffix] - split) <= tol)
        assert np.all(np.abs(total - (res["J_hat" + suffix] - res["J_star"])) <= tol)
    assert np.all(np.abs(res["gap_sampling"] - (res["J_hat"] - res["J_hat_mean"])) <= identity_tolerance(res))
    np.testing.assert_array_equal(res["gap_reward_shift"], res["reward_shift"])
    np.testing.assert_array_equal(res["gap_clipping"], res["clipping"])
    # |β E(ℓ − ℓ^τ)| ≤ β E(|ℓ| − τ)_+ (pointwise |ℓ − ℓ^τ| = (|ℓ| − τ)_+).
    assert np.all(np.abs(res["gap_clipping"]) <= res.spec.beta * res["tail_excess"] * (1 + 1e-5) + 1e-7)


ORACLE = dict(reward_model="oracle", tau=INF, sigma_xi=0.0)
STAT_PROBLEMS = 2000


@pytest.fixture(scope="module")
def oracle_run():
    """The realizable oracle setting, τ = ∞, over 2,000 problems (chunk 16: small compile, ~125 calls)."""
    return rb.run(tiny_spec(**ORACLE), problems=STAT_PROBLEMS, seed=11, chunk_size=16, progress=False)


@pytest.fixture(scope="module")
def regime_runs():
    """The mle regimes of the default study (8 problems each; they share one compilation)."""
    regimes = [(name, spec) for name, spec in rb.suite("decomposition", **TINY)
               if spec.reward_model == "mle"]
    assert len(regimes) >= 4
    return {name: rb.run(spec, problems=8, seed=12, chunk_size=8, progress=False) for name, spec in regimes}


@pytest.mark.slow  # its fixtures compile two kernels and simulate 2,032 problems (~20-30 s on 2 cores)
def test_decomposition_identity_every_regime(regime_runs, oracle_run):
    """G = sampling + reward shift + clipping (fresh and training sample) in every regime, to float32 round-off."""
    names = [name for name, _ in rb.suite("decomposition", **TINY)]
    runs = {**regime_runs, **{n: oracle_run for n, s in rb.suite("decomposition", **TINY)
                              if s.reward_model == "oracle"}}
    assert set(runs) == set(names)
    for name, res in runs.items():
        assert np.all(res.ok), name
        check_decomposition(res)
    # The terms the regimes are meant to switch on are really on (the identity is not 0 = 0).
    assert np.all(np.abs(regime_runs["reward-model"]["gap_reward_shift"]) > 0)
    assert np.any(np.abs(regime_runs["clipped"]["gap_clipping"]) > 1e-4)


@pytest.mark.slow
def test_oracle_realizable_terms(oracle_run):
    """r̂ = r*, τ = ∞: the reward-shift and clipping terms are exactly 0 for every problem (in both samples)."""
    res = oracle_run
    assert len(res) == STAT_PROBLEMS and np.all(res.ok)
    for suffix in ("", "_train"):
        assert np.all(res["gap_reward_shift" + suffix] == 0.0)
        assert np.all(res["gap_clipping" + suffix] == 0.0)
    assert np.all(res["tail_excess"] == 0.0)
    np.testing.assert_array_equal(res["gap_total"], res["gap_sampling"])


@pytest.mark.slow
@pytest.mark.parametrize("column", ["gap_sampling", "gap_sampling_prompt", "gap_sampling_rollout"])
def test_oracle_sampling_term_has_mean_zero(oracle_run, column):
    """Fixed policy, fresh sample: E[Ĵ − EĴ] = 0, and each part (prompts; rollouts given prompts) too.

    The N = 2,000 problems are independent, so the sample mean has standard error
    sd/√N; |mean| ≤ 4·sd/√N fails with probability ≈ 6e-5 for a correct engine (CLT).
    """
    x = np.asarray(oracle_run[column], np.float64)
    n = len(x)
    assert n == STAT_PROBLEMS
    sd = x.std(ddof=1)
    assert sd > 0
    assert abs(x.mean()) <= 4 * sd / math.sqrt(n), (x.mean(), sd / math.sqrt(n))


@pytest.mark.slow
def test_oracle_reported_standard_error_matches_spread(oracle_run):
    """The reported J_hat_mean_se agrees with the spread of the prompt part of the sampling term.

    Given w (independent of both samples), gap_sampling_prompt = mean of h over n fresh prompts −
    mean over M evaluation prompts, h = Σ_a π(r̂ − βℓ^τ): variance σ_h²(1/n + 1/M), mean 0. The
    reported SE² is s_h²/M, E s_h² = σ_h²(M − 1)/M (n-convention) — so
    E[x²] = E[SE²]·(1 + M/n)·M/(M − 1). Both sides are means over the N problems; the tolerance is
    4 standard errors of their difference, computed from the same data.
    """
    res = oracle_run
    spec = res.spec
    n, M = spec.prompts, spec.eval_prompts
    x2 = np.asarray(res["gap_sampling_prompt"], np.float64) ** 2
    se2 = np.asarray(res["J_hat_mean_se"], np.float64) ** 2 * (1 + M / n) * M / (M - 1)
    N = len(x2)
    diff = x2.mean() - se2.mean()
    tol = 4 * math.sqrt(np.var(x2 - se2, ddof=1) / N)
    assert abs(diff) <= tol, (x2.mean(), se2.mean(), tol)
