"""Tests of rlhf_bounds.bounds: every function against an independent computation.

References are NumPy/SciPy (scipy is a test-only dependency), closed forms written out
independently, brute-force searches and enumerations, and seeded Monte Carlo checks whose
tolerances are derived from their own standard errors.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import linalg, optimize, special, stats

from rlhf_bounds import bounds as B
from rlhf_bounds.bounds._numerics import _f64_exact

PROPERTY = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# One compiled copy per function, reused by every property-test example.
kl_up = jax.jit(B.kl_inverse_upper)
kl_lo = jax.jit(B.kl_inverse_lower)
tau_star = jax.jit(B.optimal_clip_threshold)
clip_obj = jax.jit(B.clip_objective)


def np_kl(q, p):
    """kl(q‖p) from scipy's rel_entr (its own 0·log 0 conventions)."""
    return special.rel_entr(q, p) + special.rel_entr(1.0 - q, 1.0 - p)


def brentq_kl_upper(q, c):
    if q >= 1.0:
        return 1.0
    b = 1.0 - 1e-15
    if np_kl(q, b) <= c:
        return 1.0
    return optimize.brentq(lambda p: np_kl(q, p) - c, q, b, xtol=1e-15, rtol=4 * np.finfo(float).eps)


def brentq_kl_lower(q, c):
    if q <= 0.0:
        return 0.0
    a = 1e-300
    if np_kl(q, a) <= c:
        return 0.0
    return optimize.brentq(lambda p: np_kl(q, p) - c, a, q, xtol=1e-15, rtol=4 * np.finfo(float).eps)


# ---------------------------------------------------------------------------------------
# kl, kl-inverse
# ---------------------------------------------------------------------------------------


def test_kl_bernoulli_matches_scipy_and_conventions():
    rng = np.random.default_rng(0)
    q = np.concatenate([rng.uniform(size=200), [0.0, 1.0, 0.0, 1.0, 0.5, 1e-12, 1e-45, 0.5, 1 - 1e-17, 0.3]])
    p = np.concatenate([rng.uniform(size=200), [0.3, 0.3, 0.0, 1.0, 0.5 + 1e-9, 1e-12, 0.5, 1e-200, 0.5, 1e-300]])
    got = np.asarray(B.kl_bernoulli(q, p))
    np.testing.assert_allclose(got, np_kl(q, p), rtol=1e-10, atol=1e-15)
    assert got.dtype == np.float64
    # +inf when p ∈ {0, 1} and q ≠ p; 0 at q = p on the boundary
    assert np.all(np.isinf(np.asarray(B.kl_bernoulli([0.2, 0.2, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]))))
    assert float(B.kl_bernoulli(0.0, 0.0)) == 0.0 and float(B.kl_bernoulli(1.0, 1.0)) == 0.0
    # small-gap accuracy: kl ≈ (p − q)²/(2q(1 − q))
    gap = 1e-7
    np.testing.assert_allclose(float(B.kl_bernoulli(0.3, 0.3 + gap)), gap**2 / (2 * 0.3 * 0.7), rtol=1e-5)


def test_kl_inverse_matches_brentq():
    rng = np.random.default_rng(1)
    q = np.concatenate([rng.uniform(size=150), 10.0 ** rng.uniform(-8, -1, 30), 1 - 10.0 ** rng.uniform(-8, -1, 30)])
    c = 10.0 ** rng.uniform(-6, 0.7, q.size)
    up, lo = np.asarray(kl_up(q, c)), np.asarray(kl_lo(q, c))
    ref_up = np.array([brentq_kl_upper(a, b) for a, b in zip(q, c)])
    ref_lo = np.array([brentq_kl_lower(a, b) for a, b in zip(q, c)])
    np.testing.assert_allclose(up, ref_up, atol=1e-9, rtol=0)
    np.testing.assert_allclose(lo, ref_lo, atol=1e-9, rtol=0)
    # conservative ends of the bracket: never inside the exact interval by more than round-off
    assert np.all(up >= ref_up - 1e-13) and np.all(lo <= ref_lo + 1e-13)
    # the returned ends are (just) outside or on the set {kl ≤ c}
    inside = np_kl(q, up - 1e-12) <= c * (1 + 1e-9) + 1e-15
    assert np.all(inside | (up < q + 1e-12))


def test_kl_inverse_edge_cases_exact():
    c = np.array([0.0, 0.1, 2.0, np.inf])
    # closed forms (to the ulp of XLA's expm1/exp)
    np.testing.assert_allclose(np.asarray(B.kl_inverse_upper(0.0, c)), -np.expm1(-c), rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(B.kl_inverse_upper(1.0, c)), np.ones(4))
    np.testing.assert_allclose(np.asarray(B.kl_inverse_lower(1.0, c)), np.exp(-c), rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(B.kl_inverse_lower(0.0, c)), np.zeros(4))
    q = np.array([0.0, 0.2, 0.7, 1.0])
    np.testing.assert_array_equal(np.asarray(B.kl_inverse_upper(q, 0.0)), q)
    np.testing.assert_array_equal(np.asarray(B.kl_inverse_lower(q, 0.0)), q)
    np.testing.assert_array_equal(np.asarray(B.kl_inverse_upper(q, np.inf)), np.ones(4))
    np.testing.assert_array_equal(np.asarray(B.kl_inverse_lower(q, np.inf)), np.zeros(4))


unit = st.floats(0.0, 1.0, allow_nan=False)
budget_c = st.one_of(st.floats(0.0, 50.0, allow_nan=False), st.just(np.inf))


@PROPERTY
@given(q1=unit, q2=unit, c1=budget_c, c2=budget_c)
def test_kl_inverse_properties(q1, q2, c1, c2):
    q1, q2 = sorted((q1, q2))
    c1, c2 = sorted((c1, c2))
    vals = np.asarray(kl_up(np.array([q1, q2, q1]), np.array([c1, c1, c2])))
    lows = np.asarray(kl_lo(np.array([q1, q2, q1]), np.array([c1, c1, c2])))
    assert np.all(np.isfinite(vals)) and np.all(np.isfinite(lows))
    assert np.all((0 <= lows) & (lows <= np.array([q1, q2, q1])))
    assert np.all((np.array([q1, q2, q1]) <= vals) & (vals <= 1))
    assert vals[0] <= vals[1]  # non-decreasing in q
    assert vals[0] <= vals[2]  # non-decreasing in c
    assert lows[0] <= lows[1]  # non-decreasing in q
    assert lows[2] <= lows[0]  # non-increasing in c


# ---------------------------------------------------------------------------------------
# Gaussian KL
# ---------------------------------------------------------------------------------------


def np_gaussian_kl(mq, sq, mp, sp):
    d = mq.size
    diff = mp - mq
    return 0.5 * (np.trace(np.linalg.solve(sp, sq)) + diff @ np.linalg.solve(sp, diff) - d
                  + np.linalg.slogdet(sp)[1] - np.linalg.slogdet(sq)[1])


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


@pytest.mark.parametrize("d", [1, 3, 6])
def test_gaussian_kl_matches_numpy(d):
    rng = np.random.default_rng(d)
    for _ in range(5):
        mq, mp = rng.normal(size=d), rng.normal(size=d)
        sq, sp = random_spd(rng, d, 0.3), random_spd(rng, d, 2.0)
        np.testing.assert_allclose(float(B.gaussian_kl(mq, sq, mp, sp)), np_gaussian_kl(mq, sq, mp, sp), rtol=1e-10)
    assert float(B.gaussian_kl(mq, sq, mq, sq)) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_kl_one_dimensional_closed_form_and_singular():
    mq, sq, mp, sp = 0.3, 0.5, -1.0, 2.0
    ref = math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5
    got = B.gaussian_kl(np.array([mq]), np.array([[sq**2]]), np.array([mp]), np.array([[sp**2]]))
    assert float(got) == pytest.approx(ref, rel=1e-12)
    # a singular posterior covariance (the C_g = 0 corner) has infinite KL
    assert np.isinf(float(B.gaussian_kl(np.zeros(2), np.zeros((2, 2)), np.zeros(2), np.eye(2))))


# ---------------------------------------------------------------------------------------
# B3: τ*
# ---------------------------------------------------------------------------------------


def np_tau_star(values, weights, two_alpha):
    """Smallest atom t (or 0) with Σ_k w_k 1[v_k > t] ≤ 2α, by direct enumeration."""
    v, w = np.abs(np.ravel(values)), np.ravel(weights) / np.sum(weights)
    if two_alpha >= 1:
        return 0.0
    return min(t for t in v if w[v > t].sum() <= two_alpha + 1e-15)


def random_law(rng, size=(7, 5)):
    values = np.round(np.minimum(np.abs(rng.standard_cauchy(size)), 8.0), 2)  # rounding makes ties
    weights = rng.dirichlet(np.ones(values.size)).reshape(size)
    weights[rng.uniform(size=size) < 0.1] = 0.0  # atoms of zero mass
    return values, weights / weights.sum()


def test_optimal_clip_threshold_is_grid_argmin_and_quantile():
    rng = np.random.default_rng(3)
    for _ in range(20):
        values, weights = random_law(rng)
        n, K, delta = int(rng.integers(2, 400)), int(rng.integers(1, 16)), 0.05
        alpha = float(B.sampling_alpha(n, K, delta))
        got = float(tau_star(values, weights, n, K, delta))
        assert got == pytest.approx(np_tau_star(values, weights, 2 * alpha), abs=1e-12)
        step = 1e-3
        grid = np.arange(0.0, values.max() + 2 * step, step)
        objective = np.asarray(clip_obj(grid, values, weights, alpha, 0.7))
        best = grid[np.argmin(objective)]
        # τ* attains the minimum (an exact check), and the grid argmin is within one step
        assert float(clip_obj(got, values, weights, alpha, 0.7)) <= objective.min() + 1e-12
        assert abs(best - got) <= step + 1e-12


def test_clip_objective_matches_direct_sum():
    rng = np.random.default_rng(4)
    values, weights = random_law(rng)
    tau = np.array([0.0, 0.4, 3.0])
    ref = [2 * 0.5 * t * 0.1 + 0.5 * np.sum(weights * np.maximum(values - t, 0)) for t in tau]
    np.testing.assert_allclose(np.asarray(B.clip_objective(tau, values, weights, 0.1, 0.5)), ref, rtol=1e-12)


def test_optimal_clip_threshold_ignores_the_scale_of_its_weights():
    """The catalogue passes π_w(a|x_m) unscaled (not π/M) so that the weights, keys and first radix
    pass are the ones gap.population's quantiles already computed; τ* must not depend on the scale.
    float32 atoms and weights as the engine has them; dividing by a power of two is exact."""
    rng = np.random.default_rng(11)
    for m in (2048, 1000):
        values = np.abs(rng.standard_normal((m, 8))).astype(np.float32)
        probs = rng.dirichlet(np.ones(8), size=m).astype(np.float32)
        scaled = float(tau_star(values, probs / np.float32(m), 256, 4, 0.05))
        unscaled = float(tau_star(values, probs, 256, 4, 0.05))
        if m == 2048:
            assert unscaled == scaled
        else:  # π/M rounds in float32: only a cumulative mass within round-off of 2α could move τ*
            assert unscaled == pytest.approx(scaled, abs=1e-6)
        assert unscaled == pytest.approx(np_tau_star(values, probs, 2 * float(B.sampling_alpha(256, 4, 0.05))),
                                         abs=1e-7)


def test_optimal_clip_threshold_edge_cases():
    values, weights = np.array([0.5, 1.0, 2.0]), np.array([0.2, 0.3, 0.5])
    assert float(B.optimal_clip_threshold(values, weights, 1, 1, 0.5)) == 0.0  # 2α ≥ 1
    # huge n: τ* → the largest atom with positive mass
    assert float(B.optimal_clip_threshold(values, weights, 1e12, 1e6, 0.05)) == 2.0
    # zero-mass top atom is never chosen
    assert float(B.optimal_clip_threshold([0.5, 9.0], [1.0, 0.0], 1e12, 1, 0.05)) == 0.5


def np_tail_threshold(values, weights, mass):
    """Smallest atom t of positive weight with Σ w·1[v > t] ≤ mass, by enumeration (float64 sums)."""
    v, w = np.ravel(values), np.ravel(weights).astype(np.float64)
    w = w / w.sum()
    atoms = np.unique(v[w > 0])
    return np.array([min([t for t in atoms if w[v > t].sum() <= m], default=atoms.max()) for m in mass], v.dtype)


def test_tail_threshold_extreme_masses_and_zero_weights():
    values = np.array([5.0, -1.0, 3.0, 7.0, -2.0, 3.0])
    weights = np.array([0.2, 0.3, 0.1, 0.0, 0.0, 0.4])  # the largest (7) and smallest (−2) atoms have no mass
    got = np.asarray(B.tail_threshold(values, weights, np.array([1.0, 1.5, 0.75, 0.2, 0.0, -0.1, np.nan])))
    # mass ≥ 1: the smallest atom of positive weight; mass < 0 or NaN: the largest
    np.testing.assert_array_equal(got, [-1.0, -1.0, -1.0, 3.0, 5.0, 5.0, 5.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tail_threshold_wide_exponents_vs_enumeration(dtype):
    """Atoms spread over the whole exponent range (every radix digit of the keys matters), ±0, ties."""
    rng = np.random.default_rng(21)
    n = 300
    span = 36 if dtype == np.float32 else 300
    values = rng.choice([-1.0, 1.0], size=n) * 10.0 ** rng.uniform(-span, span, size=n)
    values[rng.uniform(size=n) < 0.1] = 0.0
    values[rng.uniform(size=n) < 0.05] = -0.0
    values[rng.uniform(size=n) < 0.2] = values[0]
    values = values.astype(dtype)
    weights = rng.exponential(size=n) * (rng.uniform(size=n) < 0.85)
    mass = np.concatenate([rng.uniform(size=20), [0.0, 1.0, 1e-3]])
    got = np.asarray(jax.jit(B.tail_threshold)(values, weights, mass))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np_tail_threshold(values, weights, mass).astype(np.float64))


def test_tail_threshold_float32_subnormals_exact():
    """float32 subnormal atoms and weights are exact: the atom comes back as its float64 value (or,
    with keep_dtype, as the float32 itself), never flushed to 0 by a float32 → float64 convert."""
    values = np.array([3e-45, 2e-40, -7e-42, 1e-38, 1.0], np.float32)
    weights = np.array([0.25, 0.25, 0.25, 0.25, 1e-40], np.float32)  # a subnormal weight is a positive weight
    mass = np.array([1.0, 0.7, 0.3, 0.1, 0.0])
    want = np.array([-7e-42, 3e-45, 2e-40, 1e-38, 1.0], np.float32)
    got = np.asarray(jax.jit(B.tail_threshold)(values, weights, mass))
    np.testing.assert_array_equal(got, want.astype(np.float64))
    got32 = np.asarray(jax.jit(lambda v, w, m: B.tail_threshold(v, w, m, keep_dtype=True))(values, weights, mass))
    assert got32.dtype == np.float32
    np.testing.assert_array_equal(got32.view(np.uint32), want.view(np.uint32))


def test_exact_float32_widening_every_class():
    bits = np.random.default_rng(5).integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    specials = np.array([0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000,
                         0xFF800000, 0x7FC00000], np.uint32)
    x = np.concatenate([bits, specials]).view(np.float32)
    got = np.asarray(jax.jit(_f64_exact)(x))
    with np.errstate(invalid="ignore"):
        ref = x.astype(np.float64)
    same = (got.view(np.uint64) == ref.view(np.uint64)) | (np.isnan(got) & np.isnan(ref))
    assert same.all()


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), n1=st.integers(1, 10**7), n2=st.integers(1, 10**7),
       K=st.integers(1, 64), delta=st.floats(1e-6, 0.5))
def test_optimal_clip_threshold_monotone_in_n(seed, n1, n2, K, delta):
    values, weights = random_law(np.random.default_rng(seed), size=(12,))
    n1, n2 = sorted((n1, n2))
    t1, t2 = float(tau_star(values, weights, n1, K, delta)), float(tau_star(values, weights, n2, K, delta))
    assert 0.0 <= t1 <= t2 <= values.max()


# ---------------------------------------------------------------------------------------
# B4: budget allocation
# ---------------------------------------------------------------------------------------


def b1_sampling_under_budget(K, cp, cd, budget, width=1.7, delta=0.05, var=None):
    """B1's sampling term (or the std of Ĵ) written from scratch at n = budget/(cp + K cd)."""
    n = budget / (cp + K * cd)
    if var is None:
        log_term = np.log(4 / delta)
        return width * (np.sqrt(log_term / (2 * n)) + np.sqrt(log_term / (2 * n * K)))
    var_prompt, var_roll = var
    return np.sqrt(var_prompt / n + var_roll / (n * K))


@pytest.mark.parametrize("cp,cd,var", [(1.0, 1.0, None), (8.0, 1.0, None), (50.0, 1.0, None),
                                       (1000.0, 0.7, None), (0.3, 1.0, None), (20.0, 1.0, (0.5, 3.0)),
                                       (3.0, 2.0, (1.0, 0.1)), (200.0, 1.0, (0.2, 5.0))])
def test_rollouts_per_prompt_brute_force(cp, cd, var):
    budget = 1e5
    ks = np.arange(1, 20001, dtype=float)
    objective = b1_sampling_under_budget(ks, cp, cd, budget, var=var)
    kwargs = {} if var is None else {"var_prompt": var[0], "var_rollout": var[1]}
    assert float(B.integer_rollouts_per_prompt(cp, cd, **kwargs)) == ks[np.argmin(objective)]
    res = optimize.minimize_scalar(lambda lk: b1_sampling_under_budget(np.exp(lk), cp, cd, budget, var=var),
                                   bounds=(0.0, np.log(2e4)), method="bounded", options={"xatol": 1e-10})
    k_cont = float(B.rollouts_per_prompt(cp, cd, **kwargs))
    assert k_cont == pytest.approx(max(1.0, float(np.exp(res.x))), rel=1e-4)
    # the objective helper is B1's sampling term per unit W√(log(4/δ)/2)
    scale = 1.7 * np.sqrt(np.log(4 / 0.05) / 2) if var is None else 1.0
    np.testing.assert_allclose(np.asarray(B.rollout_sampling_objective(ks[:50], cp, cd, budget, **kwargs)) * scale,
                               objective[:50], rtol=1e-12)


def test_rollouts_per_prompt_formulas():
    assert float(B.rollouts_per_prompt(1.0, 1.0)) == 1.0
    assert float(B.rollouts_per_prompt(27.0, 1.0)) == pytest.approx(9.0)
    assert float(B.rollouts_per_prompt(2.0, 1.0, 1.0, 8.0)) == pytest.approx(4.0)
    assert np.isinf(float(B.rollouts_per_prompt(2.0, 1.0, 0.0, 8.0)))


@pytest.mark.parametrize("a,b,cn,cpref", [(1.0, 1.0, 1.0, 1.0), (2.0, 0.3, 5.0, 0.5), (0.1, 4.0, 1.0, 30.0),
                                          (1.0, 0.0, 1.0, 1.0), (3.0, 2.0, 0.01, 100.0)])
def test_preference_share_brute_force(a, b, cn, cpref):
    budget = 1e4

    def objective(s):
        return a / np.sqrt((1 - s) * budget / cn) + (b / np.sqrt(s * budget / cpref) if b > 0 else 0.0)

    res = optimize.minimize_scalar(objective, bounds=(1e-12, 1 - 1e-12), method="bounded",
                                   options={"xatol": 1e-12})
    got = float(B.preference_share(a, b, cn, cpref))
    assert got == pytest.approx(res.x, abs=1e-6)
    value = float(B.preference_objective(got, a, b, cn, cpref, budget))
    assert value <= res.fun * (1 + 1e-12)
    closed = (a ** (2 / 3) * cn ** (1 / 3) + b ** (2 / 3) * cpref ** (1 / 3)) ** 1.5 / np.sqrt(budget)
    assert value == pytest.approx(closed, rel=1e-10)


# ---------------------------------------------------------------------------------------
# PAC-Bayes toolkit
# ---------------------------------------------------------------------------------------


def test_maurer_constant_xi_below_two_sqrt_n():
    """The 2√n in log(2√n/δ) bounds ξ(n) = E e^{n kl(L̂‖L)} at its worst (binary losses), for every n ≥ 1."""
    for n in list(range(1, 200)) + [1000, 5000]:
        k = np.arange(n + 1)
        log_terms = (special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
                     + special.xlogy(k, k / n) + special.xlogy(n - k, (n - k) / n))
        assert np.exp(special.logsumexp(log_terms)) <= 2 * np.sqrt(n) * (1 + 1e-12)


def test_mcallester_and_maurer():
    emp, kl, n, delta = 0.2, 3.0, 500, 0.05
    c = (kl + np.log(2 * np.sqrt(n) / delta)) / n
    assert float(B.mcallester_bound(emp, kl, n, delta)) == pytest.approx(emp + np.sqrt(c / 2), rel=1e-14)
    lo, hi = B.maurer_bound(emp, kl, n, delta)
    assert float(lo) == pytest.approx(brentq_kl_lower(emp, c), abs=1e-10)
    assert float(hi) == pytest.approx(brentq_kl_upper(emp, c), abs=1e-10)
    # the kl form is never looser than its Pinsker relaxation
    assert float(hi) <= float(B.mcallester_bound(emp, kl, n, delta))
    assert float(lo) >= emp - np.sqrt(c / 2)


def test_hoeffding_lambda_bound_brute_force_and_grid_loss():
    kl, n_terms, width, delta = 4.0, 3000, 2.5, 0.01
    lam = np.asarray(B.default_lambda_grid(n_terms, width))
    np.testing.assert_allclose(lam, np.sqrt(8 * n_terms) / width * 2.0 ** np.arange(-10, 11), rtol=1e-14)
    ref = min((kl + np.log(21 / delta)) / x + x * width**2 / (8 * n_terms) for x in lam)
    assert float(B.hoeffding_lambda_bound(kl, n_terms, width, delta)) == pytest.approx(ref, rel=1e-13)
    custom = np.array([1.0, 10.0, 100.0])
    ref_custom = min((kl + np.log(3 / delta)) / x + x * width**2 / (8 * n_terms) for x in custom)
    assert float(B.hoeffding_lambda_bound(kl, n_terms, width, delta, custom)) == pytest.approx(ref_custom, rel=1e-13)
    # within the documented factor of the continuous optimum over the covered range
    for kl in [0.0, 0.5, 10.0, 1e3, 1e5]:
        a, b = kl + np.log(21 / delta), width**2 / (8 * n_terms)
        got = float(B.hoeffding_lambda_bound(kl, n_terms, width, delta))
        assert 2 * np.sqrt(a * b) * (1 - 1e-12) <= got <= 2 * np.sqrt(a * b) * 1.0607
    assert float(B.hoeffding_lambda_bound(kl, n_terms, 0.0, delta)) == 0.0


@pytest.mark.parametrize("radius,spacing", [(Fraction(1), Fraction(1, 2)), (Fraction(3, 10), Fraction(1, 5)),
                                            (Fraction(1, 2), Fraction(3, 10)), (Fraction(7, 10), Fraction(1, 10)),
                                            (Fraction(2), Fraction(3))])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_occam_count_and_quantize_by_enumeration(radius, spacing, d):
    axis = []
    k = 0
    while -radius + k * spacing <= radius:  # exact rational arithmetic
        axis.append(-radius + k * spacing)
        k += 1
    points = np.array(list(itertools.product(*[[float(x) for x in axis]] * d)))
    got = float(B.occam_log_cardinality(d, float(radius), float(spacing)))
    assert got == pytest.approx(math.log(len(points)), rel=1e-14, abs=1e-14)
    rng = np.random.default_rng(d)
    w = rng.uniform(-1.5 * float(radius), 1.5 * float(radius), size=(20, d))
    nearest = points[np.argmin(((w[:, None, :] - points[None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_allclose(np.asarray(B.occam_quantize(w, float(radius), float(spacing))), nearest, atol=1e-12)


# ---------------------------------------------------------------------------------------
# B1, B2
# ---------------------------------------------------------------------------------------


def test_b1_terms_formula_and_conventions():
    rr, beta, tau, n, K, delta, chi2, l2, tail = 1.3, 0.2, 1.5, 400, 8, 0.05, 0.7, 0.02, 0.11
    out = B.b1_terms(rr, beta, tau, n, K, delta, chi2, l2, tail)
    w = rr + 2 * beta * tau
    sampling = w * (np.sqrt(np.log(4 / delta) / (2 * n)) + np.sqrt(np.log(4 / delta) / (2 * n * K)))
    assert float(out.sampling) == pytest.approx(sampling, rel=1e-14)
    assert float(out.reward_shift) == pytest.approx(np.sqrt(1 + chi2) * np.sqrt(l2), rel=1e-14)
    assert float(out.clipping) == pytest.approx(beta * tail, rel=1e-14)
    assert float(out.total) == pytest.approx(sampling + np.sqrt(1 + chi2) * np.sqrt(l2) + beta * tail, rel=1e-14)
    assert np.isinf(float(B.b1_terms(rr, beta, np.inf, n, K, delta, chi2, l2, 0.0).sampling))
    capped = B.b1_terms(rr, beta, np.inf, n, K, delta, chi2, l2, 0.0, log_ratio_range=0.9)
    assert float(capped.sampling) == pytest.approx((rr + 2 * beta * 0.9) / w * sampling, rel=1e-14)
    no_kl = B.b1_terms(rr, 0.0, np.inf, n, K, delta, chi2, l2, np.inf)
    assert np.isfinite(float(no_kl.total)) and float(no_kl.clipping) == 0.0
    assert float(B.log_ratio_range(2.0, 0.25)) == 1.0


def test_b2_matches_independent_assembly():
    emp, kl, n, K, lo, width, delta = 0.4, 6.0, 700, 4, -0.5, 2.0, 0.05
    out = B.b2_sampling_bound(emp, kl, n, K, lo, width, delta)
    q = (emp - lo) / width
    c = (kl + np.log(2 * np.sqrt(n) / (delta / 2))) / n
    prompt = width * max(q - brentq_kl_lower(q, c), brentq_kl_upper(q, c) - q)
    lam = np.sqrt(8 * n * K) / width * 2.0 ** np.arange(-10, 11)
    rollout = min((kl + np.log(21 / (delta / 4))) / x + x * width**2 / (8 * n * K) for x in lam)
    assert float(out.prompt) == pytest.approx(prompt, abs=1e-9)
    assert float(out.prompt_sqrt) == pytest.approx(width * np.sqrt(c / 2), rel=1e-13)
    assert float(out.rollout) == pytest.approx(rollout, rel=1e-13)
    assert float(out.total) == pytest.approx(prompt + rollout, abs=1e-9)
    assert float(out.prompt) <= float(out.prompt_sqrt)
    widened = [float(B.b2_sampling_bound(emp, kl, n, K, lo, width, delta, mc_radius=r).prompt) for r in (0, 0.01, 0.1)]
    assert widened[0] == pytest.approx(float(out.prompt), rel=1e-15) and widened[0] < widened[1] < widened[2]
    vacuous = B.b2_sampling_bound(emp, kl, n, K, -np.inf, np.inf, delta)
    assert all(np.isposinf(float(v)) for v in vacuous)
    assert all(float(v) == 0.0 for v in B.b2_sampling_bound(emp, kl, n, K, lo, 0.0, delta))
    assert float(B.mc_error_hoeffding(2.0, 400, 0.01)) == pytest.approx(2.0 * np.sqrt(np.log(200) / 800), rel=1e-14)


def test_b2_coverage_monte_carlo_occam():
    """Finite hypothesis class with a uniform prior and point-mass posteriors (B2's Occam case).

    Hypothesis j has h_j(x) = x^{γ_j} on x ∼ U(0, 1), rollouts Y = 1[U < h_j(x)] by common random
    numbers, so E Ĵ_j = 1/(1 + γ_j). The bound must hold for all j at once w.p. ≥ 1 − δ.
    """
    rng = np.random.default_rng(11)
    gammas = np.linspace(0.2, 5.0, 16)
    n, K, delta, reps = 60, 3, 0.2, 400
    x = rng.uniform(size=(reps, n, 1))
    u = rng.uniform(size=(reps, n, K, 1))
    h = x ** gammas  # [reps, n, m]
    j_hat = (u < h[:, :, None, :]).mean(axis=(1, 2))  # [reps, m]
    prompt_mean = h.mean(axis=1)
    bound = np.asarray(jax.vmap(lambda e: B.b2_sampling_bound(e, np.log(gammas.size), n, K, 0.0, 1.0, delta).total)(
        prompt_mean))
    violated = np.any(np.abs(j_hat - 1 / (1 + gammas)) > bound, axis=1)
    assert violated.mean() <= delta + 3 * np.sqrt(delta * (1 - delta) / reps)


@PROPERTY
@given(emp=unit, kl=st.floats(0, 1e4), n=st.integers(1, 10**6), K=st.integers(1, 256),
       width=st.floats(0, 100), delta=st.floats(1e-9, 0.999), chi2=st.floats(0, 1e6), l2=st.floats(0, 1e3),
       tail=st.floats(0, 10), beta=st.floats(0, 10), tau=st.one_of(st.floats(0, 50), st.just(np.inf)))
def test_bounds_nonnegative_and_finite(emp, kl, n, K, width, delta, chi2, l2, tail, beta, tau):
    b2 = _jit_b2(emp * width, kl, n, K, 0.0, width, delta)
    assert all(np.isfinite(float(v)) and float(v) >= 0 for v in b2)
    b1 = _jit_b1(width, beta, tau, n, K, delta, chi2, l2, tail, 5.0)
    assert all(np.isfinite(float(v)) and float(v) >= 0 for v in b1)
    assert float(B.mcallester_bound(emp, kl, n, delta)) >= emp
    lo, hi = B.maurer_bound(emp, kl, n, delta)
    assert 0 <= float(lo) <= emp <= float(hi) <= 1


_jit_b1 = jax.jit(B.b1_terms)
_jit_b2 = jax.jit(B.b2_sampling_bound)


# ---------------------------------------------------------------------------------------
# B7
# ---------------------------------------------------------------------------------------


def np_certificate(u, theta_hat, lam, s_theta, second_moment, delta, residual=0.0):
    d = theta_hat.size
    gram = u.T @ u + lam * np.eye(d)
    evals, evecs = np.linalg.eigh(gram)
    inv_sqrt = evecs @ np.diag(evals**-0.5) @ evecs.T
    t = np.max(np.maximum(np.abs(u @ theta_hat), s_theta * np.linalg.norm(u, axis=1)))
    kappa = special.expit(t) * special.expit(-t)
    logdet = np.sum(np.log(evals / lam))
    radius = (0.5 * np.sqrt(2 * np.log(1 / delta) + logdet) + np.sqrt(lam) * s_theta + residual / np.sqrt(lam)) / kappa
    top = np.linalg.eigvalsh(inv_sqrt @ second_moment @ inv_sqrt).max()
    return radius, radius**2 * top


def test_certified_reward_error_matches_numpy():
    rng = np.random.default_rng(5)
    for d in (1, 3, 5):
        u = rng.normal(size=(80, d))
        theta_hat = 0.3 * rng.normal(size=d)
        m = random_spd(rng, d)
        got = B.certified_reward_error(u, theta_hat, 0.7, 0.9, m, 0.05, 1e-6)
        np.testing.assert_allclose(np.array(got), np_certificate(u, theta_hat, 0.7, 0.9, m, 0.05, 1e-6), rtol=1e-10)


def _fit_bradley_terry(u, z, lam):
    def loss(th):
        t = u @ th
        return np.sum(np.logaddexp(0.0, t) - z * t) + 0.5 * lam * th @ th

    def grad(th):
        return u.T @ (special.expit(u @ th) - z) + lam * th

    def hess(th):
        s = special.expit(u @ th)
        return (u * (s * (1 - s))[:, None]).T @ u + lam * np.eye(u.shape[1])

    res = optimize.minimize(loss, np.zeros(u.shape[1]), jac=grad, hess=hess, method="trust-exact",
                            options={"gtol": 1e-12})
    return res.x, np.linalg.norm(grad(res.x))


def test_certified_reward_error_coverage_monte_carlo():
    """B7 on a realizable logistic model: violation rate ≤ δ + 3 standard errors."""
    rng = np.random.default_rng(7)
    d, n_pairs, lam, delta, reps = 2, 150, 1.0, 0.1, 300
    theta_star = np.array([1.0, -0.5])
    second_moment = 0.5 * np.eye(d)  # φ ∼ N(0, I/2) per response, u = φ − φ' ∼ N(0, I)
    us, fits, residuals = [], [], []
    for _ in range(reps):
        u = rng.normal(size=(n_pairs, d))
        z = (rng.uniform(size=n_pairs) < special.expit(u @ theta_star)).astype(float)
        theta_hat, residual = _fit_bradley_terry(u, z, lam)
        us.append(u), fits.append(theta_hat), residuals.append(residual)
    us, fits, residuals = np.array(us), np.array(fits), np.array(residuals)
    cert = jax.vmap(B.certified_reward_error, in_axes=(0, 0, None, None, None, None, 0))(
        us, fits, lam, np.linalg.norm(theta_star), second_moment, delta, residuals)
    diff = fits - theta_star
    gram = np.einsum("rni,rnj->rij", us, us) + lam * np.eye(d)
    v_norm = np.sqrt(np.einsum("ri,rij,rj->r", diff, gram, diff))
    l2_true = np.einsum("ri,ij,rj->r", diff, second_moment, diff)
    violated = (v_norm > np.asarray(cert.radius)) | (l2_true > np.asarray(cert.l2_bound))
    assert np.all(np.isfinite(np.asarray(cert.radius)))
    assert violated.mean() <= delta + 3 * np.sqrt(delta * (1 - delta) / reps)
    # the check has power: the self-normalised term alone (no 1/κ, no bias) is violated often
    noise_only = 0.5 * np.sqrt(2 * np.log(1 / delta) + np.linalg.slogdet(gram)[1] - d * np.log(lam))
    assert (v_norm > noise_only).mean() > 0.3


# ---------------------------------------------------------------------------------------
# Lyapunov, Clopper–Pearson
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 5])
def test_lyapunov_solvers_match_scipy(d):
    rng = np.random.default_rng(10 + d)
    H = random_spd(rng, d)
    C = random_spd(rng, d, 0.5)
    sigma = np.asarray(B.lyapunov_continuous(H, C))
    np.testing.assert_allclose(sigma, linalg.solve_continuous_lyapunov(H, C), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H @ sigma + sigma @ H, C, atol=1e-11)
    eta = 0.9 / np.linalg.eigvalsh(H).max()
    A = np.eye(d) - eta * H
    sigma_d = np.asarray(B.lyapunov_discrete(A, eta**2 * C))
    np.testing.assert_allclose(sigma_d, linalg.solve_discrete_lyapunov(A, eta**2 * C), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(A @ sigma_d @ A.T + eta**2 * C, sigma_d, atol=1e-11)
    # unstable step: no stationary law
    assert np.all(np.isnan(np.asarray(B.lyapunov_discrete(np.eye(d) * 1.01, C))))


def test_clopper_pearson_matches_scipy_beta():
    cases = [(0, 10), (3, 100), (50, 100), (100, 100), (1, 5000), (4990, 5000), (17, 40)]
    for k, n in cases:
        for alpha in (0.05, 0.01):
            up = float(B.clopper_pearson_upper(k, n, alpha))
            low = float(B.clopper_pearson_lower(k, n, alpha))
            ref_up = 1.0 if k == n else stats.beta.ppf(1 - alpha, k + 1, n - k)
            ref_low = 0.0 if k == 0 else stats.beta.ppf(alpha, k, n - k + 1)
            assert up == pytest.approx(ref_up, abs=1e-9) and up >= ref_up - 1e-12
            assert low == pytest.approx(ref_low, abs=1e-9) and low <= ref_low + 1e-12
            lo2, hi2 = B.clopper_pearson_interval(k, n, alpha)
            assert float(lo2) == pytest.approx(0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1), abs=1e-9)
            assert float(hi2) == pytest.approx(1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k), abs=1e-9)


# ---------------------------------------------------------------------------------------
# jit and vmap: a batch through jit(vmap(f)) equals a Python loop of eager calls
# ---------------------------------------------------------------------------------------


def _vmap_cases():
    rng = np.random.default_rng(99)
    nb, d = 3, 3
    spd = np.stack([random_spd(rng, d) for _ in range(nb)])
    spd2 = np.stack([random_spd(rng, d, 0.3) for _ in range(nb)])
    vec = rng.normal(size=(nb, d))
    q, c = rng.uniform(size=nb), rng.uniform(0, 2, size=nb)
    pos = rng.uniform(0.5, 3.0, size=nb)
    law = np.abs(rng.normal(size=(nb, 4, 5)))
    law_w = rng.dirichlet(np.ones(20), size=nb).reshape(nb, 4, 5)
    ns = np.array([10.0, 200.0, 5000.0])
    eta = 0.5 / np.linalg.eigvalsh(spd).max(axis=1)
    return {
        "kl_bernoulli": (B.kl_bernoulli, (q, c / 2)),
        "kl_inverse_upper": (B.kl_inverse_upper, (q, c)),
        "kl_inverse_lower": (B.kl_inverse_lower, (q, c)),
        "gaussian_kl": (B.gaussian_kl, (vec, spd2, vec[::-1], spd)),
        "sampling_alpha": (B.sampling_alpha, (ns, pos, q / 2)),
        "clip_objective": (B.clip_objective, (pos, law, law_w, q / 3, pos)),
        "optimal_clip_threshold": (B.optimal_clip_threshold, (law, law_w, ns, pos, q / 2)),
        "rollouts_per_prompt": (B.rollouts_per_prompt, (pos * 10, pos)),
        "rollouts_per_prompt_var": (lambda a, b, s, t: B.rollouts_per_prompt(a, b, s, t), (pos * 10, pos, pos, c)),
        "integer_rollouts_per_prompt": (B.integer_rollouts_per_prompt, (pos * 10, pos)),
        "rollout_sampling_objective": (B.rollout_sampling_objective, (pos, pos * 10, pos, ns)),
        "preference_share": (B.preference_share, (pos, c, pos, pos[::-1])),
        "preference_objective": (B.preference_objective, (q, pos, c, pos, pos[::-1], ns)),
        "mcallester_bound": (B.mcallester_bound, (q, pos, ns, q / 2)),
        "maurer_bound": (B.maurer_bound, (q, pos, ns, q / 2)),
        "default_lambda_grid": (B.default_lambda_grid, (ns, pos)),
        "hoeffding_lambda_bound": (B.hoeffding_lambda_bound, (pos, ns, pos, q / 2)),
        "occam_log_cardinality": (B.occam_log_cardinality, (np.array([1.0, 2.0, 3.0]), pos, q + 0.1)),
        "occam_quantize": (B.occam_quantize, (vec, pos, q + 0.1)),
        "log_ratio_range": (B.log_ratio_range, (pos, q)),
        "objective_range": (B.objective_range, (pos, q, pos, c)),
        "b1_terms": (B.b1_terms, (pos, q, pos, ns, pos, q / 2, c, q, c)),
        "b2_sampling_bound": (B.b2_sampling_bound, (q, pos, ns, pos, np.zeros(nb), pos, q / 2)),
        "mc_error_hoeffding": (B.mc_error_hoeffding, (pos, ns, q / 2)),
        "logistic_derivative": (B.logistic_derivative, (c,)),
        "certified_reward_error": (B.certified_reward_error,
                                   (rng.normal(size=(nb, 20, d)), vec, pos, pos, spd, q / 2)),
        "lyapunov_continuous": (B.lyapunov_continuous, (spd, spd2)),
        "lyapunov_discrete": (B.lyapunov_discrete, (np.eye(d) - eta[:, None, None] * spd, spd2)),
        "clopper_pearson_upper": (B.clopper_pearson_upper, (np.array([0.0, 3.0, 10.0]), np.array([10.0, 30.0, 10.0]))),
        "clopper_pearson_lower": (B.clopper_pearson_lower, (np.array([0.0, 3.0, 10.0]), np.array([10.0, 30.0, 10.0]))),
        "clopper_pearson_interval": (B.clopper_pearson_interval, (np.array([1.0, 3.0]), np.array([10.0, 30.0]),
                                                                  np.array([0.05, 0.1]))),
    }


VMAP_CASES = _vmap_cases()


@pytest.mark.parametrize("name", sorted(VMAP_CASES))
def test_jit_and_vmap_equal_a_loop(name):
    fn, args = VMAP_CASES[name]
    batched = jax.jit(jax.vmap(fn))(*args)
    nb = args[0].shape[0]
    looped = [fn(*(a[i] for a in args)) for i in range(nb)]
    for leaf, *leaves in zip(jax.tree.leaves(batched), *(jax.tree.leaves(x) for x in looped)):
        np.testing.assert_allclose(np.asarray(leaf), np.stack([np.asarray(x) for x in leaves]), rtol=1e-12, atol=1e-14)
        assert np.asarray(leaf).dtype == np.float64
        assert np.all(np.isfinite(np.asarray(leaf)))
