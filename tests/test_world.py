"""world.py: feature laws, θ*, the behaviour policy and Bradley-Terry labels (docs/theory.md §2, §4).

Distribution checks compare a sample mean with an independent reference and
allow 4.5 standard errors (two-sided chance of a false alarm ≈ 7e-6 per
check), the standard error estimated from the same sample (over prompts, so
that responses of one prompt may be dependent). Seeds are fixed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from rlhf_bounds import world as W
from rlhf_bounds.spec import FEATURE_LAWS, Spec
from conftest import EPS32, assert_close, np_inverse_cdf, np_log_probs

Z = 4.5  # standard errors allowed in a statistical check


def law_spec(law, **kw):
    return Spec(d=5, actions=4, feature_bound=2.5, rank=2, condition=30.0, shared_weight=0.6,
                feature_law=law, **kw).validate()


def draw(spec, seed, m):
    k_world, k_phi = jax.random.split(jax.random.key(seed))
    world = jax.jit(W.draw_world)(spec, k_world)
    phi = jax.jit(W.draw_features, static_argnums=3)(spec, world, k_phi, m)
    return world, np.asarray(phi, np.float64)


# ---- NumPy reference samplers of each law (docs/theory.md §2.1) ----------------------------------

def np_project(x, radius):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x * np.minimum(1.0, radius / np.maximum(norm, 1e-300))


def np_reference_features(spec, basis, rng, m):
    A, d, C = spec.actions, spec.d, spec.feature_bound
    g = rng.normal(size=(m, A, d))
    if spec.feature_law == "sphere":
        return C * g / np.linalg.norm(g, axis=-1, keepdims=True)
    if spec.feature_law == "gaussian":
        return np_project(g * C / math.sqrt(d), C)
    if spec.feature_law == "anisotropic":
        var = spec.condition ** (-np.arange(d) / max(d - 1, 1))
        return np_project(g * C * np.sqrt(var / var.sum()), C)
    if spec.feature_law == "lowrank":
        h = rng.normal(size=(m, A, basis.shape[1]))
        return C * (h / np.linalg.norm(h, axis=-1, keepdims=True)) @ basis.T
    if spec.feature_law == "shared":
        rho = spec.shared_weight
        common = rng.normal(size=(m, 1, d))
        return np_project((math.sqrt(rho) * common + math.sqrt(1 - rho) * g) * C / math.sqrt(d), C)
    raise AssertionError(spec.feature_law)


def prompt_moments(phi):
    """Per-prompt statistics: mean over responses of φ_j² (each j), of ‖φ‖, and ⟨φ_0, φ_1⟩."""
    sq = np.mean(phi ** 2, axis=1)
    norm = np.mean(np.linalg.norm(phi, axis=-1), axis=1, keepdims=True)
    cross = np.sum(phi[:, 0] * phi[:, 1], axis=-1, keepdims=True)
    return np.concatenate([sq, norm, cross], axis=1)


@pytest.mark.parametrize("law", FEATURE_LAWS)
def test_feature_law_shapes_and_bound(law):
    spec = law_spec(law)
    world, phi = draw(spec, 1, 300)
    prompts = W.draw_prompts(spec, world, jax.random.key(2), 300)
    assert prompts.phi.shape == (300, spec.actions, spec.d) and prompts.phi.dtype == jnp.float32
    assert prompts.xi.shape == (300, spec.actions) and prompts.xi.dtype == jnp.float32
    assert phi.shape == (300, spec.actions, spec.d)
    norms = np.linalg.norm(phi, axis=-1)
    C = spec.feature_bound
    assert norms.max() <= C * (1 + 8 * EPS32), norms.max()
    assert norms.min() > 0
    if law in ("sphere", "lowrank"):
        assert_close(norms, C, rtol=8 * EPS32, what="rows on the sphere of radius C")
    if law in ("gaussian", "anisotropic", "shared"):
        inside = norms < C * (1 - 1e-4)
        assert 0.05 < inside.mean() < 0.95, "projected law: some rows strictly inside the ball, some on it"
    if law == "lowrank":
        B = np.asarray(world.basis, np.float64)
        assert B.shape == (spec.d, spec.rank)
        assert_close(B.T @ B, np.eye(spec.rank), rtol=0, atol=1e-6, what="orthonormal basis")
        resid = phi - phi @ B @ B.T
        assert np.abs(resid).max() <= 1e-5 * C, "rows lie in the span of the basis"
        assert np.linalg.matrix_rank(phi.reshape(-1, spec.d), tol=1e-4) == spec.rank
    else:
        assert world.basis.shape == (spec.d, 0)
        assert np.linalg.matrix_rank(phi.reshape(-1, spec.d), tol=1e-4) == spec.d


@pytest.mark.parametrize("law", FEATURE_LAWS)
def test_feature_law_distribution(law):
    """Second moments E φ_j², E‖φ‖ and E⟨φ_0, φ_1⟩ against a NumPy sampler of the law in docs/theory.md §2.

    Package: m = 3000 prompts, standard error over prompts. Reference: 200 000
    NumPy prompts (its own standard error is added in quadrature).
    """
    spec = law_spec(law)
    world, phi = draw(spec, 3, 3000)
    ref = np_reference_features(spec, np.asarray(world.basis, np.float64), np.random.default_rng(4), 200_000)
    got, exp = prompt_moments(phi), prompt_moments(ref)
    se = np.sqrt(got.var(axis=0, ddof=1) / len(got) + exp.var(axis=0, ddof=1) / len(exp))
    diff = np.abs(got.mean(axis=0) - exp.mean(axis=0))
    assert np.all(diff <= Z * se + 1e-9), (got.mean(axis=0), exp.mean(axis=0), se)


def test_gaussian_projection_fraction():
    """Gaussian law: ‖g‖² ~ (C²/d)χ²_d, so a row is projected onto the sphere w.p. P(χ²_d > d)."""
    from scipy.stats import chi2
    spec = law_spec("gaussian")
    _, phi = draw(spec, 5, 5000)
    on_sphere = np.linalg.norm(phi, axis=-1) >= spec.feature_bound * (1 - 8 * EPS32)
    q = chi2.sf(spec.d, spec.d)
    # Rows are i.i.d. under this law, so the count is Binomial(m·A, q).
    n = on_sphere.size
    assert abs(on_sphere.sum() - n * q) <= Z * math.sqrt(n * q * (1 - q))


def test_shared_law_limits():
    """shared_weight = 1: every response of a prompt has the same feature; 0: rows independent."""
    spec = law_spec("shared").replace(shared_weight=1.0)
    _, phi = draw(spec, 6, 50)
    assert_close(phi, np.broadcast_to(phi[:, :1], phi.shape), rtol=1e-6, atol=1e-7)
    spec0 = law_spec("shared").replace(shared_weight=0.0)
    _, phi0 = draw(spec0, 6, 50)
    assert np.abs(phi0[:, 0] - phi0[:, 1]).max() > 0.1


@pytest.mark.parametrize("d,condition", [(1, 5.0), (2, 10.0), (6, 100.0)])
def test_anisotropic_scales(d, condition):
    s = np.asarray(W.anisotropic_scales(d, condition), np.float64)
    assert s.shape == (d,)
    assert_close(np.sum(s ** 2), 1.0, rtol=1e-6, what="tr Σ_φ = 1")
    if d > 1:
        assert np.all(np.diff(s) < 0)
        assert_close(s[0] ** 2 / s[-1] ** 2, condition, rtol=1e-5, what="condition number")
        expected = condition ** (-np.arange(d) / (d - 1))
        assert_close(s ** 2, expected / expected.sum(), rtol=1e-6)


def test_project_to_ball():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) * rng.uniform(0.1, 5, size=(50, 1))
    got = np.asarray(W.project_to_ball(jnp.asarray(x), 2.0))
    assert_close(got, np_project(x, 2.0), rtol=1e-12)
    assert np.all(np.linalg.norm(got, axis=-1) <= 2.0 * (1 + 1e-12))


@pytest.mark.parametrize("D,shift,beta", [(1.0, 0.0, 0.5), (3.0, 1.0, 2.0), (0.2, -1.5, 0.1)])
def test_draw_world_theta_and_behaviour_weights(D, shift, beta):
    """‖θ*‖ = D exactly; w_μ = w_ref + s·θ*/β with no noise; w_ref = 0; direction uniform on the sphere."""
    spec = Spec(d=4, reward_norm=D, shift=shift, beta=beta).validate()
    keys = jax.random.split(jax.random.key(7), 4000)
    worlds = jax.vmap(lambda k: W.draw_world(spec, k))(keys)
    theta = np.asarray(worlds.theta_star, np.float64)
    assert worlds.theta_star.dtype == jnp.float32 and theta.shape == (4000, 4)
    assert_close(np.linalg.norm(theta, axis=1), D, rtol=4 * EPS32)
    assert np.all(np.asarray(worlds.w_ref) == 0)
    assert_close(worlds.w_mu, shift * theta / beta, rtol=4 * EPS32, atol=1e-7 * D / beta)
    # u = θ*/D uniform on S^{d−1}: E u = 0 (Var u_j = 1/d) and E u uᵀ = I/d (Var u_j² = 3/(d(d+2)) − 1/d²).
    u, d, n = theta / D, 4, len(theta)
    assert np.all(np.abs(u.mean(axis=0)) <= Z * math.sqrt(1 / d / n))
    sd_sq = math.sqrt(3 / (d * (d + 2)) - 1 / d ** 2)
    assert np.all(np.abs((u ** 2).mean(axis=0) - 1 / d) <= Z * sd_sq / math.sqrt(n))


def test_behaviour_noise():
    """mu_noise = σ: w_μ − s·θ*/β ~ N(0, σ² I) coordinate-wise (sample sd within 4.5 SE of σ)."""
    spec = Spec(d=3, shift=0.5, mu_noise=0.3).validate()
    keys = jax.random.split(jax.random.key(8), 4000)
    worlds = jax.vmap(lambda k: W.draw_world(spec, k))(keys)
    noise = np.asarray(worlds.w_mu, np.float64) - 0.5 * np.asarray(worlds.theta_star, np.float64) / spec.beta
    n = noise.size
    assert abs(noise.mean()) <= Z * 0.3 / math.sqrt(n)
    # Var of the sample variance of N(0, σ²) is 2σ⁴/(n − 1).
    assert abs(noise.var(ddof=1) - 0.09) <= Z * math.sqrt(2 * 0.3 ** 4 / (n - 1))


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_behaviour_log_probs(eps, scale):
    """log μ = log((1 − ε)π_{w_μ} + ε/A) in float64 NumPy; Σ μ = 1."""
    rng = np.random.default_rng(int(100 * eps + scale))
    spec = Spec(d=3, actions=6, mix_eps=eps).validate()
    world = W.World(jnp.zeros(3, jnp.float32), jnp.asarray(scale * rng.normal(size=3), jnp.float32),
                    jnp.zeros(3, jnp.float32), jnp.zeros((3, 0), jnp.float32))
    phi = jnp.asarray(rng.normal(size=(6, 3)) / math.sqrt(3), jnp.float32)
    got = np.asarray(W.behaviour_log_probs(spec, world, phi), np.float64)
    pi = np.exp(np_log_probs(np.asarray(world.w_mu, np.float64), np.asarray(phi, np.float64)))
    with np.errstate(divide="ignore"):
        expected = np.log((1 - eps) * pi + eps / 6)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(got), finite)
    # float32 log-space: absolute error ~ a few ulp of |log μ| (plus 1e-6 for log1p/logaddexp).
    assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-6)
    assert_close(np.sum(np.exp(got)), 1.0, rtol=1e-5)
    if eps > 0:
        assert np.all(got >= math.log(eps / 6) - 1e-5)


def test_sample_behaviour_is_inverse_cdf_of_mu():
    spec = Spec(d=3, actions=5, mix_eps=0.2, shift=1.0).validate()
    world = W.draw_world(spec, jax.random.key(9))
    phi = W.draw_features(spec, world, jax.random.key(10), 1)[0]
    u = jax.random.uniform(jax.random.key(11), (200_000,), jnp.float32)
    y = np.asarray(W.sample_behaviour(spec, world, phi, u))
    mu = np.exp(np.asarray(W.behaviour_log_probs(spec, world, phi), np.float64))
    np.testing.assert_array_equal(y, np_inverse_cdf(mu, np.asarray(u, np.float64)))
    counts = np.bincount(y, minlength=5)
    n = len(y)
    assert np.all(np.abs(counts - n * mu) <= Z * np.sqrt(n * mu * (1 - mu)) + 1)


def test_true_reward_and_residuals():
    spec = Spec(d=4, actions=3, sigma_xi=0.7, feature_law="gaussian").validate()
    world = W.draw_world(spec, jax.random.key(12))
    prompts = W.draw_prompts(spec, world, jax.random.key(13), 4000)
    phi, xi = np.asarray(prompts.phi, np.float64), np.asarray(prompts.xi, np.float64)
    expected = phi @ np.asarray(world.theta_star, np.float64) + 0.7 * xi
    assert_close(W.true_reward(spec, world, prompts), expected, rtol=1e-5, atol=1e-6)
    # ξ ~ Uniform[−1, 1]: in range, mean 0 (sd 1/√3), E ξ² = 1/3 (sd of ξ² is √(1/5 − 1/9)).
    assert xi.min() >= -1 and xi.max() <= 1
    n = xi.size
    assert abs(xi.mean()) <= Z / math.sqrt(3 * n)
    assert abs((xi ** 2).mean() - 1 / 3) <= Z * math.sqrt(1 / 5 - 1 / 9) / math.sqrt(n)


def test_draws_depend_only_on_the_key():
    spec = law_spec("shared")
    w1, p1 = draw(spec, 14, 20)
    w2, p2 = draw(spec, 14, 20)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(np.asarray(w1.theta_star), np.asarray(w2.theta_star))
    _, p3 = draw(spec, 15, 20)
    assert not np.array_equal(p1, p3)


# ---- Bradley-Terry labels (docs/theory.md §15) ----------------------------------------------------

def recover_pairs(prefs, world, spec):
    """The responses (a_j, b_j) behind u_j = φ(x'_j, a_j) − φ(x'_j, b_j), found by brute force over A²."""
    phi = np.asarray(prefs.prompts.phi, np.float64)
    u = np.asarray(prefs.u, np.float64)
    diffs = phi[:, :, None, :] - phi[:, None, :, :]          # [N, A, A, d]
    err = np.linalg.norm(diffs - u[:, None, None, :], axis=-1).reshape(len(u), -1)
    best = np.argmin(err, axis=1)
    assert np.all(err[np.arange(len(u)), best] <= 1e-5), "every u_j is a difference of two responses"
    a, b = np.divmod(best, spec.actions)
    return a, b


def test_bradley_terry_labels_are_calibrated():
    """z_j ~ Bernoulli(σ(r*(a_j) − r*(b_j))), residual ξ included (σ_ξ = 0.5).

    With p_j = σ(margin_j), S = Σ_j c_j (z_j − p_j) has mean 0 and variance
    Σ_j c_j² p_j(1 − p_j) given the pairs: checked for c = 1, c = margin (a
    wrong sign or scale of the margin fails it) and in 8 margin bins.
    """
    spec = Spec(d=4, actions=5, reward_norm=3.0, sigma_xi=0.5, shift=0.5, pref_pairs=20_000).validate()
    world = W.draw_world(spec, jax.random.key(20))
    from rlhf_bounds.reward import draw_preferences
    prefs = jax.jit(draw_preferences)(spec, world, jax.random.key(21))
    assert prefs.u.shape == (20_000, 4) and prefs.z.shape == (20_000,)
    z = np.asarray(prefs.z, np.float64)
    assert set(np.unique(z)) <= {0.0, 1.0}
    a, b = recover_pairs(prefs, world, spec)
    r = np.asarray(W.true_reward(spec, world, prefs.prompts), np.float64)
    rows = np.arange(len(z))
    margin = r[rows, a] - r[rows, b]
    p = expit(margin)
    v = p * (1 - p)
    for c in (np.ones_like(margin), margin):
        assert abs(np.sum(c * (z - p))) <= Z * math.sqrt(np.sum(c * c * v))
    edges = np.quantile(margin, np.linspace(0, 1, 9))
    bins = np.clip(np.searchsorted(edges, margin, side="right") - 1, 0, 7)
    for k in range(8):
        sel = bins == k
        assert abs(np.sum(z[sel] - p[sel])) <= Z * math.sqrt(np.sum(v[sel]) + 1e-12), k
    # Responses come from μ: P(a_j = k, b_j ≠ k) = μ_k(1 − μ_k) (a tie a = b is not identifiable from u).
    mu = np.exp(np.asarray(jax.vmap(lambda ph: W.behaviour_log_probs(spec, world, ph))(prefs.prompts.phi),
                           np.float64))
    distinct = a != b
    for k in range(spec.actions):
        q = mu[:, k] * (1 - mu[:, k])
        hits = np.sum(distinct & (a == k))
        assert abs(hits - q.sum()) <= Z * math.sqrt(np.sum(q * (1 - q))), k
