"""policy.py against NumPy/SciPy brute-force sums over responses (docs/theory.md §14).

Pure-maths tests run in float64 (the package turns x64 on) and compare at
1e-10 relative; the float32 tests use ~1e-5. Shapes cover A = 1 (degenerate
policy), several A, d, and logits of size 40 (probabilities down to e^-100).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from rlhf_bounds import policy
from conftest import assert_close, np_inverse_cdf, np_log_probs, np_log_ratio, np_probs, random_prompt

SHAPES = [(1, 3, 1.0), (2, 1, 1.0), (3, 5, 1.0), (5, 4, 3.0), (8, 8, 1.0), (8, 3, 40.0)]
SHAPE_IDS = [f"A{a}-d{d}-s{s:g}" for a, d, s in SHAPES]
TAUS = [0.0, 0.3, 1.5, math.inf]


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
def test_log_probs_probs_logits(rng, A, d, scale):
    w, _, phi = random_prompt(rng, A, d, scale)
    assert_close(policy.logits(w, phi), phi @ w, rtol=1e-12, atol=1e-12)
    lp = np.asarray(policy.log_probs(w, phi))
    assert lp.shape == (A,)
    assert np.all(np.isfinite(lp))
    assert_close(lp, np_log_probs(w, phi), rtol=1e-10, atol=1e-10)
    assert_close(policy.probs(w, phi), np_probs(w, phi), rtol=1e-10, atol=1e-300)
    assert_close(np.exp(logsumexp_np(lp)), 1.0, rtol=1e-12)


def logsumexp_np(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
def test_kl_and_log_ratio(rng, A, d, scale):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    ell = np_log_ratio(w, w_ref, phi)
    p = np_probs(w, phi)
    assert_close(policy.log_ratio(w, w_ref, phi), ell, rtol=1e-10, atol=1e-9)
    expected = np.sum(p * ell)
    kl = float(policy.kl(w, w_ref, phi))
    assert_close(kl, expected, rtol=1e-9, atol=1e-12)
    assert kl >= -1e-12
    # KL with a common reference is zero at w = w_ref.
    assert abs(float(policy.kl(w_ref, w_ref, phi))) < 1e-12


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("tau", TAUS)
def test_clipped_log_ratio_mean_and_tail(rng, A, d, scale, tau):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    ell = np_log_ratio(w, w_ref, phi)
    p = np_probs(w, phi)
    clipped = np.clip(ell, -tau, tau)
    assert_close(policy.clipped_log_ratio(w, w_ref, phi, tau), clipped, rtol=1e-10, atol=1e-9)
    got = float(policy.clipped_log_ratio_mean(w, w_ref, phi, tau))
    assert_close(got, np.sum(p * clipped), rtol=1e-9, atol=1e-12)
    tail = float(policy.clip_tail_excess(w, w_ref, phi, tau))
    assert_close(tail, np.sum(p * np.maximum(np.abs(ell) - tau, 0.0)), rtol=1e-9, atol=1e-12)
    # |E ℓ − E ℓ^τ| ≤ E(|ℓ| − τ)_+ (|ℓ − ℓ^τ| = (|ℓ| − τ)_+ pointwise).
    kl = float(policy.kl(w, w_ref, phi))
    assert abs(kl - got) <= tail + 1e-10
    if tau == math.inf:
        assert_close(got, kl, rtol=1e-12, atol=1e-14)
        assert tail == 0.0
    if tau == 0.0:
        assert got == 0.0
        assert_close(tail, np.sum(p * np.abs(ell)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_objective(rng, A, d, scale, beta):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    reward = rng.normal(size=A)
    p = np_probs(w, phi)
    expected = np.sum(p * reward) - beta * np.sum(p * np_log_ratio(w, w_ref, phi))
    assert_close(policy.objective(w, w_ref, phi, reward, beta), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
def test_feature_covariance(rng, A, d, scale):
    w, _, phi = random_prompt(rng, A, d, scale)
    p = np_probs(w, phi)
    V = np.asarray(policy.feature_covariance(w, phi))
    assert V.shape == (d, d)
    # NumPy's weighted covariance (weights π, normalised by Σπ) as the independent reference.
    expected = np.cov(phi.T, aweights=p, bias=True).reshape(d, d) if A > 1 else np.zeros((d, d))
    assert_close(V, expected, rtol=1e-8, atol=1e-11)
    assert_close(V, V.T, rtol=0, atol=1e-14)
    assert np.linalg.eigvalsh(V).min() >= -1e-12


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("beta", [0.05, 1.0])
def test_objective_gradient_linear_vs_autodiff_and_fd(rng, A, d, scale, beta):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    theta = rng.normal(size=d)
    closed = np.asarray(policy.objective_gradient_linear(w, w_ref, phi, theta, beta))
    auto = np.asarray(jax.grad(policy.objective)(jnp.asarray(w), w_ref, phi, phi @ theta, beta))
    assert_close(closed, auto, rtol=1e-8, atol=1e-10)

    # Central finite differences of the NumPy objective: error O(h²)·|f'''| + eps/h.
    def f(v):
        p = np_probs(v, phi)
        return np.sum(p * (phi @ theta)) - beta * np.sum(p * np_log_ratio(v, w_ref, phi))

    h = 1e-5 / max(1.0, scale)
    fd = np.array([(f(w + h * e) - f(w - h * e)) / (2 * h) for e in np.eye(d)])
    assert_close(closed, fd, rtol=1e-4, atol=1e-6 * max(1.0, scale * np.abs(theta).sum()))


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
def test_chi2_to(rng, A, d, scale):
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    mu = rng.dirichlet(np.ones(A))
    p = np_probs(w, phi)
    chi2 = float(policy.chi2_to(w, phi, mu))
    assert_close(chi2, np.sum((p - mu) ** 2 / mu), rtol=1e-8, atol=1e-10)  # the same quantity, other form
    assert chi2 >= -1e-12
    assert abs(float(policy.chi2_to(w, phi, p))) < 1e-9  # χ²(π‖π) = 0


@pytest.mark.parametrize("A,d,scale", SHAPES, ids=SHAPE_IDS)
def test_sample_actions_matches_searchsorted(rng, A, d, scale):
    w, _, phi = random_prompt(rng, A, d, scale)
    u = rng.uniform(size=4000)
    y = np.asarray(policy.sample_actions(w, phi, u))
    assert y.dtype == np.int32 and y.shape == u.shape
    np.testing.assert_array_equal(y, np_inverse_cdf(np_probs(w, phi), u))
    # Edge uniforms: 0 gives the first action with positive mass.
    p = np_probs(w, phi)
    assert int(policy.sample_actions(w, phi, np.zeros(1))[0]) == int(np.argmax(p > 0))


@pytest.mark.parametrize("A,d,scale", [(2, 3, 1.0), (5, 4, 2.0), (8, 2, 1.0)])
def test_sample_actions_frequencies(rng, A, d, scale):
    """Empirical frequencies over N uniforms vs π: each count within 4.5 binomial sd of Nπ_a.

    Counts are Binomial(N, π_a); with A ≤ 8 cells at 4.5 sd the chance that a
    correct sampler fails is < 8·7e-6. A chi-square goodness-of-fit test at
    p > 1e-6 checks the joint law as well.
    """
    w, _, phi = random_prompt(rng, A, d, scale)
    p = np_probs(w, phi)
    n = 200_000
    u = jax.random.uniform(jax.random.key(int(rng.integers(2**31))), (n,), jnp.float32)
    y = np.asarray(jax.jit(policy.sample_actions)(jnp.asarray(w, jnp.float32), jnp.asarray(phi, jnp.float32), u))
    counts = np.bincount(y, minlength=A)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4.5 * sd + 1), (counts, n * p)
    keep = n * p > 5  # chi-square needs expected counts ≳ 5; the rest are covered by the binomial check
    if keep.sum() > 1:
        expected = p[keep] / p[keep].sum() * counts[keep].sum()
        assert stats.chisquare(counts[keep], expected).pvalue > 1e-6


def test_inverse_cdf_never_draws_a_zero_probability_action():
    """A float32 CDF may end below 1 (e.g. 0.9999999); a uniform above it must not pick a π = 0 action.

    Found in review: Y was clamped to A − 1 even when π(A − 1) = 0 (here the last
    logit is −200, so π underflows to 0 and ℓ there is ≈ −200: one such draw
    adds ≈ 200β/nK to Ĵ). The draw must go to the last action with positive mass.
    """
    z = np.array([2.3003314, -4.730608, 2.4573674, -200.0], np.float32)
    p = jax.nn.softmax(jnp.asarray(z))
    assert float(p[-1]) == 0.0
    u = jnp.asarray([np.nextafter(np.float32(jnp.cumsum(p)[-1]), np.float32(1.0)), 0.99999994], jnp.float32)
    y = np.asarray(policy.inverse_cdf(p, u))
    assert np.all(np.asarray(p)[y] > 0), y
    np.testing.assert_array_equal(y, [2, 2])


def test_inverse_cdf_skips_interior_zero_mass():
    p = jnp.asarray([0.25, 0.0, 0.0, 0.5, 0.25], jnp.float64)
    u = jnp.asarray([0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.999999])
    np.testing.assert_array_equal(np.asarray(policy.inverse_cdf(p, u)), [0, 0, 3, 3, 3, 4, 4])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_large_logits_stay_finite(rng, dtype):
    """Logits of ±1e4 (float32 overflow in exp) keep every quantity finite and exact where defined."""
    A, d = 6, 3
    phi = rng.normal(size=(A, d))
    w = 1e4 * rng.normal(size=d)
    w_ref = np.zeros(d)
    args = [jnp.asarray(x, dtype) for x in (w, w_ref, phi)]
    lp = np.asarray(policy.log_probs(args[0], args[2]), np.float64)
    assert np.all(np.isfinite(lp))
    # The argmax response has log-probability ≈ 0 and the policy is a point mass on it.
    ref = np_log_probs(np.asarray(args[0], np.float64), np.asarray(args[2], np.float64))
    assert_close(lp, ref, rtol=1e-5 if dtype == jnp.float32 else 1e-10, atol=1e-3)
    for value in (policy.kl(*args), policy.clipped_log_ratio_mean(*args, 1.0), policy.clip_tail_excess(*args, 1.0),
                  policy.objective(*args[:2], args[2], jnp.ones(A, dtype), 0.5)):
        assert np.isfinite(float(value))
    # KL of a point mass against uniform is log A.
    assert_close(float(policy.kl(*args)), math.log(A), rtol=1e-5)


@pytest.mark.parametrize("A,d,scale", [(5, 4, 1.0), (8, 3, 5.0)])
def test_float32_matches_float64(rng, A, d, scale):
    """The float32 path (what the simulator runs) agrees with float64 to float32 accuracy."""
    w, w_ref, phi = random_prompt(rng, A, d, scale)
    reward = rng.normal(size=A)
    f32 = [jnp.asarray(x, jnp.float32) for x in (w, w_ref, phi, reward)]
    f64 = [jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in (w, w_ref, phi, reward)]
    for fn in (lambda w, r, p, rw: policy.kl(w, r, p),
               lambda w, r, p, rw: policy.objective(w, r, p, rw, 0.7),
               lambda w, r, p, rw: policy.clipped_log_ratio_mean(w, r, p, 0.5),
               lambda w, r, p, rw: policy.feature_covariance(w, p)):
        a, b = fn(*f32), fn(*f64)
        assert a.dtype == jnp.float32
        assert_close(a, b, rtol=2e-5, atol=1e-5 * (1 + np.max(np.abs(np.asarray(b)))))


def test_vmap_jit_consistency(rng):
    """jit(vmap(f)) over a batch of prompts equals f prompt by prompt (float64, 1e-12)."""
    m, A, d = 7, 5, 3
    phis = rng.normal(size=(m, A, d))
    rewards = rng.normal(size=(m, A))
    mus = rng.dirichlet(np.ones(A), size=m)
    us = rng.uniform(size=(m, 11))
    w, w_ref = rng.normal(size=d), rng.normal(size=d)
    theta = rng.normal(size=d)
    fns = {
        "log_probs": (lambda phi, r, mu, u: policy.log_probs(w, phi)),
        "kl": (lambda phi, r, mu, u: policy.kl(w, w_ref, phi)),
        "objective": (lambda phi, r, mu, u: policy.objective(w, w_ref, phi, r, 0.3)),
        "clipped": (lambda phi, r, mu, u: policy.clipped_log_ratio_mean(w, w_ref, phi, 0.2)),
        "tail": (lambda phi, r, mu, u: policy.clip_tail_excess(w, w_ref, phi, 0.2)),
        "cov": (lambda phi, r, mu, u: policy.feature_covariance(w, phi)),
        "grad": (lambda phi, r, mu, u: policy.objective_gradient_linear(w, w_ref, phi, theta, 0.3)),
        "chi2": (lambda phi, r, mu, u: policy.chi2_to(w, phi, mu)),
        "sample": (lambda phi, r, mu, u: policy.sample_actions(w, phi, u)),
    }
    for name, fn in fns.items():
        batched = np.asarray(jax.jit(jax.vmap(fn))(phis, rewards, mus, us))
        looped = np.stack([np.asarray(fn(phis[i], rewards[i], mus[i], us[i])) for i in range(m)])
        assert batched.shape == looped.shape, name
        assert_close(batched, looped, rtol=1e-12, atol=1e-14, what=name)


# ---- properties (hypothesis) -------------------------------------------------------------

# Few distinct shapes (each new shape compiles); the values vary freely.
_prompt = st.tuples(st.sampled_from([1, 3, 6]), st.sampled_from([2, 5]), st.integers(0, 2**31 - 1),
                    st.floats(0.01, 30.0))


@settings(max_examples=25, deadline=None)
@given(_prompt)
def test_property_invariances(args):
    """π is unchanged when a common vector is added to every row of Φ (all logits shift equally);
    KL ≥ 0, χ² ≥ 0, V ⪰ 0, and the clipping tail E(|ℓ| − τ)_+ is non-increasing in τ and 0 at τ = ∞."""
    A, d, seed, scale = args
    r = np.random.default_rng(seed)
    w, w_ref, phi = random_prompt(r, A, d, scale)
    c = r.normal(size=d)
    assert_close(policy.log_probs(w, phi + c), policy.log_probs(w, phi), rtol=1e-9, atol=1e-9 * (1 + scale))
    assert float(policy.kl(w, w_ref, phi)) >= -1e-10
    assert float(policy.chi2_to(w, phi, np.full(A, 1.0 / A))) >= -1e-10
    assert np.linalg.eigvalsh(np.asarray(policy.feature_covariance(w, phi))).min() >= -1e-10
    tails = [float(policy.clip_tail_excess(w, w_ref, phi, t)) for t in (0.0, 0.5, 2.0, math.inf)]
    assert all(a >= b - 1e-12 for a, b in zip(tails, tails[1:]))  # the tail shrinks as τ grows
    assert tails[-1] == 0.0
