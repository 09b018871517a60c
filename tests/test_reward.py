"""reward.py: the Bradley-Terry loss and its ridge MLE by Newton's method (docs/theory.md §16).

References: the loss written in NumPy with ``np.logaddexp``, and the
minimiser found by SciPy (Newton-CG and BFGS with tight tolerances) on the same
data. The loss is λ-strongly convex, so ‖θ̂ − θ_opt‖ ≤ ‖∇L(θ̂)‖/λ: the
agreement tolerance follows from the gradient norms reached.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy.special import expit
from scipy.stats import chi2

from rlhf_bounds import reward as R
from rlhf_bounds import world as W
from rlhf_bounds.spec import Spec
from conftest import assert_close

# One compilation per shape instead of one per primitive (eager dispatch is slow on a small CPU).
draw_preferences = jax.jit(R.draw_preferences)
draw_world = jax.jit(W.draw_world)
fit_bradley_terry = jax.jit(R.fit_bradley_terry, static_argnums=3)
bt_loss = jax.jit(R.bt_loss)


def np_loss(theta, u, z, ridge):
    s = u @ theta
    return np.sum(np.logaddexp(0.0, s) - z * s) + 0.5 * ridge * theta @ theta


def np_grad(theta, u, z, ridge):
    return u.T @ (expit(u @ theta) - z) + ridge * theta


def np_hess(theta, u, z, ridge):
    p = expit(u @ theta)
    return (u * (p * (1 - p))[:, None]).T @ u + ridge * np.eye(u.shape[1])


def random_data(rng, n, d, scale=1.0):
    u = scale * rng.normal(size=(n, d))
    theta = rng.normal(size=d)
    z = (rng.uniform(size=n) < expit(u @ theta)).astype(np.float64)
    return u, z


def scipy_fit(u, z, ridge):
    res = optimize.minimize(np_loss, np.zeros(u.shape[1]), args=(u, z, ridge), jac=np_grad, hess=np_hess,
                            method="Newton-CG", options={"xtol": 1e-14, "maxiter": 500})
    assert np.linalg.norm(np_grad(res.x, u, z, ridge)) < 1e-8 * max(1.0, len(z))
    return res.x


@pytest.mark.parametrize("n,d,ridge,scale", [(1, 1, 1.0, 1.0), (40, 3, 0.5, 1.0), (300, 6, 1e-2, 2.0),
                                             (50, 4, 10.0, 5.0)])
def test_bt_loss_matches_numpy(rng, n, d, ridge, scale):
    u, z = random_data(rng, n, d, scale)
    theta = rng.normal(size=d) * 3
    assert_close(bt_loss(theta, u, z, ridge), np_loss(theta, u, z, ridge), rtol=1e-12)
    # Autodiff gradient of the package loss equals the hand gradient used by Newton.
    assert_close(jax.grad(R.bt_loss)(jnp.asarray(theta), u, z, ridge), np_grad(theta, u, z, ridge),
                 rtol=1e-10, atol=1e-10)
    # Large margins (|s| ~ 1e3) stay finite: softplus, not log(1 + e^s).
    big = 1e3 * theta / np.linalg.norm(theta)
    value = float(bt_loss(big, u, z, ridge))
    assert np.isfinite(value)
    assert_close(value, np_loss(big, u, z, ridge), rtol=1e-12)


@pytest.mark.parametrize("n,d,ridge,scale", [(40, 3, 0.5, 1.0), (300, 6, 1e-2, 2.0), (50, 4, 10.0, 5.0),
                                             (500, 2, 1.0, 0.5)])
def test_fit_matches_scipy_float64(rng, n, d, ridge, scale):
    u, z = random_data(rng, n, d, scale)
    fit = fit_bradley_terry(jnp.asarray(u), jnp.asarray(z), ridge, 30)
    ref = scipy_fit(u, z, ridge)
    # Also BFGS, a different algorithm, as a second opinion on the optimum.
    bfgs = optimize.minimize(np_loss, np.zeros(d), args=(u, z, ridge), jac=np_grad, method="BFGS",
                             options={"gtol": 1e-10}).x
    assert_close(bfgs, ref, rtol=0, atol=1e-6)
    theta = np.asarray(fit.theta)
    g = np.linalg.norm(np_grad(theta, u, z, ridge))
    assert_close(fit.grad_norm, g, rtol=1e-6, atol=1e-12)
    assert g < 1e-8 * n
    # Strong convexity: ‖θ̂ − θ_opt‖ ≤ (‖∇L(θ̂)‖ + ‖∇L(θ_ref)‖)/λ.
    assert np.linalg.norm(theta - ref) <= (g + 1e-8 * n) / ridge + 1e-10


def test_fit_float32_simulated_preferences_matches_scipy():
    """On float32 preference data from the simulator (the engine's setting): θ̂ to 1e-4 of SciPy's optimum."""
    spec = Spec(d=5, actions=6, pref_pairs=512, shift=0.5, reward_norm=2.0).validate()
    world = draw_world(spec, jax.random.key(0))
    prefs = draw_preferences(spec, world, jax.random.key(1))
    assert prefs.u.dtype == jnp.float32
    fit = fit_bradley_terry(prefs.u, prefs.z, spec.ridge, spec.newton_steps)
    assert fit.theta.dtype == jnp.float32
    u, z = np.asarray(prefs.u, np.float64), np.asarray(prefs.z, np.float64)
    ref = scipy_fit(u, z, spec.ridge)
    assert_close(fit.theta, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))
    # The reported gradient norm is the float32 one; it must be small relative to the loss scale N_pref·C.
    assert float(fit.grad_norm) < 1e-3 * spec.pref_pairs


def test_single_newton_step_closed_form(rng):
    """From θ = 0: θ₁ = (¼ UᵀU + λI)⁻¹ Uᵀ(z − ½) (σ(0) = ½, σ'(0) = ¼)."""
    u, z = random_data(rng, 60, 4)
    theta1 = np.asarray(fit_bradley_terry(jnp.asarray(u), jnp.asarray(z), 0.7, 1).theta)
    expected = np.linalg.solve(0.25 * u.T @ u + 0.7 * np.eye(4), u.T @ (z - 0.5))
    assert_close(theta1, expected, rtol=1e-10, atol=1e-12)


def test_fit_is_vmappable(rng):
    """vmap over problems gives the per-problem fits (the engine vmaps it)."""
    us, zs = zip(*(random_data(rng, 30, 3) for _ in range(4)))
    us, zs = np.stack(us), np.stack(zs)
    batched = jax.jit(jax.vmap(lambda u, z: R.fit_bradley_terry(u, z, 0.5, 20)))(us, zs)
    for i in range(4):
        one = fit_bradley_terry(jnp.asarray(us[i]), jnp.asarray(zs[i]), 0.5, 20)
        assert_close(batched.theta[i], one.theta, rtol=1e-10, atol=1e-12)


def test_mle_is_consistent_for_theta_star():
    """With N = 20 000 pairs and λ = 1e-3, (θ̂ − θ*)ᵀ H (θ̂ − θ*) ≈ χ²_d (H the observed Fisher information).

    The asymptotic law of the MLE is N(θ*, H⁻¹); the check allows the
    1 − 1e-5 quantile of χ²_d. Ridge bias is ‖λ H⁻¹θ*‖_H ≈ λ‖θ*‖/√λ_min(H) ≪ 1.
    """
    spec = Spec(d=4, actions=5, reward_norm=2.0, pref_pairs=20_000, ridge=1e-3, mix_eps=0.3).validate()
    world = draw_world(spec, jax.random.key(30))
    prefs = draw_preferences(spec, world, jax.random.key(31))
    fit = fit_bradley_terry(prefs.u, prefs.z, spec.ridge, 12)
    u, z = np.asarray(prefs.u, np.float64), np.asarray(prefs.z, np.float64)
    theta_hat = np.asarray(fit.theta, np.float64)
    delta = theta_hat - np.asarray(world.theta_star, np.float64)
    H = np_hess(theta_hat, u, z, 0.0)
    stat = delta @ H @ delta
    assert stat <= chi2.ppf(1 - 1e-5, spec.d), stat
    # The reported gradient is small relative to the summed loss's scale N_pref.
    assert float(fit.grad_norm) < 1e-3 * spec.pref_pairs


def test_draw_preferences_shapes():
    spec = Spec(d=3, actions=4, pref_pairs=33).validate()
    world = draw_world(spec, jax.random.key(40))
    prefs = draw_preferences(spec, world, jax.random.key(41))
    assert prefs.u.shape == (33, 3) and prefs.z.shape == (33,)
    assert prefs.prompts.phi.shape == (33, 4, 3)
    assert np.all(np.linalg.norm(np.asarray(prefs.u), axis=-1) <= 2 * spec.feature_bound * (1 + 1e-6))
    again = draw_preferences(spec, world, jax.random.key(41))
    np.testing.assert_array_equal(np.asarray(prefs.u), np.asarray(again.u))
    np.testing.assert_array_equal(np.asarray(prefs.z), np.asarray(again.z))
    assert math.isfinite(float(np.sum(np.asarray(prefs.u))))
