"""B5 Lyapunov solvers and SGD's predicted stationary covariance (``rlhf_bounds.ou``, docs/theory.md §8).

References are independent of the package: SciPy's Bartels–Stewart solvers, closed forms of
linear-Gaussian processes, and a NumPy Monte Carlo of the linear SGD recursion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from rlhf_bounds import ou


def rel_frob(x, ref):
    return float(np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref))


def spd(rng, d, floor=0.2):
    g = rng.normal(size=(d, d))
    return g @ g.T / d + floor * np.eye(d)


def stable_general(rng, d):
    """A non-symmetric H whose eigenvalues all have real part ≥ 0.3."""
    g = rng.normal(size=(d, d))
    return g + (0.3 - np.linalg.eigvals(g).real.min()) * np.eye(d)


def contraction(rng, d, radius=0.9):
    """A non-symmetric A with spectral radius ``radius``."""
    g = rng.normal(size=(d, d))
    return g * radius / np.abs(np.linalg.eigvals(g)).max()


DIMS = [1, 2, 5, 9]


# ---------------------------------------------------------------------------------------
# SciPy agreement: symmetric and general inputs, several d, batches element by element
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
def test_continuous_matches_scipy(d):
    rng = np.random.default_rng(100 + d)
    q = spd(rng, d)
    h_sym, h_gen = spd(rng, d), stable_general(rng, d)
    q_gen = rng.normal(size=(d, d))  # the solver does not need a symmetric right-hand side
    cases = [(h_sym, q, True), (h_sym, q, False), (h_gen, q, False), (h_gen, q_gen, False)]
    for h, rhs, symmetric in cases:
        sol = ou.solve_lyapunov_continuous(h, rhs, symmetric=symmetric)
        ref = linalg.solve_continuous_lyapunov(h, rhs)  # solves AX + XAᴴ = Q: A = H
        assert bool(sol.ok) and sol.sigma.dtype == jnp.float64
        assert rel_frob(sol.sigma, ref) < 1e-8
        np.testing.assert_allclose(ou.lyapunov_continuous(h, rhs, symmetric=symmetric), sol.sigma, rtol=0, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_discrete_matches_scipy(d):
    rng = np.random.default_rng(200 + d)
    q = spd(rng, d)
    h = spd(rng, d)
    a_sym = np.eye(d) - (1.5 / np.linalg.eigvalsh(h).max()) * h  # eigenvalues in (−0.5, 1)
    a_gen = contraction(rng, d)
    cases = [(a_sym, q, True), (a_sym, q, False), (a_gen, q, False), (a_gen, rng.normal(size=(d, d)), False)]
    for a, rhs, symmetric in cases:
        sol = ou.solve_lyapunov_discrete(a, rhs, symmetric=symmetric)
        ref = linalg.solve_discrete_lyapunov(a, rhs)  # solves AXAᴴ − X + Q = 0
        assert bool(sol.ok) and sol.sigma.dtype == jnp.float64
        assert rel_frob(sol.sigma, ref) < 1e-8
        np.testing.assert_allclose(ou.lyapunov_discrete(a, rhs, symmetric=symmetric), sol.sigma, rtol=0, atol=0)


def test_non_normal_inputs_are_solved_not_flagged():
    # Stability is about eigenvalues, not the symmetric part: H = [[1, 10], [0, 1]] has
    # eigenvalues 1, 1 but an indefinite symmetric part; A = [[.5, 3], [0, .5]] has ρ = .5, ‖A‖ > 1.
    q = np.array([[1.0, 0.3], [0.3, 2.0]])
    h = np.array([[1.0, 10.0], [0.0, 1.0]])
    a = np.array([[0.5, 3.0], [0.0, 0.5]])
    c, dd = ou.solve_lyapunov_continuous(h, q), ou.solve_lyapunov_discrete(a, q)
    assert bool(c.ok) and bool(dd.ok)
    assert rel_frob(c.sigma, linalg.solve_continuous_lyapunov(h, q)) < 1e-8
    assert rel_frob(dd.sigma, linalg.solve_discrete_lyapunov(a, q)) < 1e-8


@pytest.mark.parametrize("symmetric", [False, True])
def test_batched_inputs_match_scipy_element_by_element(symmetric):
    rng = np.random.default_rng(7)
    d = 4
    if symmetric:
        hs = np.stack([np.stack([spd(rng, d) for _ in range(3)]) for _ in range(2)])
        a_s = np.eye(d) - 0.4 * hs / np.linalg.eigvalsh(hs).max(axis=-1)[..., None, None]
    else:
        hs = np.stack([np.stack([stable_general(rng, d) for _ in range(3)]) for _ in range(2)])
        a_s = np.stack([np.stack([contraction(rng, d, 0.5 + 0.1 * j) for j in range(3)]) for _ in range(2)])
    qs = np.stack([spd(rng, d) for _ in range(3)])  # [3, d, d] broadcasts against [2, 3, d, d]
    cont = ou.solve_lyapunov_continuous(hs, qs, symmetric=symmetric)
    disc = ou.solve_lyapunov_discrete(a_s, qs, symmetric=symmetric)
    assert cont.sigma.shape == disc.sigma.shape == (2, 3, d, d) and cont.ok.shape == disc.ok.shape == (2, 3)
    assert bool(jnp.all(cont.ok)) and bool(jnp.all(disc.ok))
    for i in range(2):
        for j in range(3):
            assert rel_frob(cont.sigma[i, j], linalg.solve_continuous_lyapunov(hs[i, j], qs[j])) < 1e-8
            assert rel_frob(disc.sigma[i, j], linalg.solve_discrete_lyapunov(a_s[i, j], qs[j])) < 1e-8
    # one H against a batch of Q broadcasts the other way
    one = ou.solve_lyapunov_continuous(hs[0, 0], qs, symmetric=symmetric)
    assert one.sigma.shape == (3, d, d)
    for j in range(3):
        assert rel_frob(one.sigma[j], linalg.solve_continuous_lyapunov(hs[0, 0], qs[j])) < 1e-8


# ---------------------------------------------------------------------------------------
# Closed forms of linear-Gaussian processes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_closed_forms(symmetric):
    # scalar OU dx = −h x dt + √q dW: Var = q/(2h)
    for h, q in [(0.5, 1.0), (3.0, 0.2), (1e-3, 2.0)]:
        sol = ou.solve_lyapunov_continuous([[h]], [[q]], symmetric=symmetric)
        assert float(sol.sigma[0, 0]) == pytest.approx(q / (2 * h), rel=1e-12)
    # AR(1) x_{t+1} = a x_t + ε, Var ε = q: Var = q/(1 − a²)
    for a, q in [(0.5, 1.0), (-0.9, 0.3), (0.999, 1.0)]:
        sol = ou.solve_lyapunov_discrete([[a]], [[q]], symmetric=symmetric)
        assert float(sol.sigma[0, 0]) == pytest.approx(q / (1 - a * a), rel=1e-9)
    # diagonal H, diagonal Q: independent coordinates, Σ = diag(q_i / (2 h_i)); a full Q couples
    # them only through Σ_ij = Q_ij / (h_i + h_j) (continuous), Q_ij / (1 − a_i a_j) (discrete)
    hd, qd = np.array([0.2, 1.0, 5.0]), np.array([1.0, 0.5, 2.0])
    np.testing.assert_allclose(ou.lyapunov_continuous(np.diag(hd), np.diag(qd), symmetric=symmetric),
                               np.diag(qd / (2 * hd)), rtol=1e-12, atol=1e-15)
    rng = np.random.default_rng(3)
    q_full = spd(rng, 3)
    np.testing.assert_allclose(ou.lyapunov_continuous(np.diag(hd), q_full, symmetric=symmetric),
                               q_full / (hd[:, None] + hd[None, :]), rtol=1e-12)
    ad = np.array([0.9, -0.5, 0.1])
    np.testing.assert_allclose(ou.lyapunov_discrete(np.diag(ad), q_full, symmetric=symmetric),
                               q_full / (1 - ad[:, None] * ad[None, :]), rtol=1e-12)
    # scalar SGD: continuous (η/b)c/(2h); discrete (η²/b)c/(1 − (1 − ηh)²) = (η/b)c/(2h − ηh²)
    h, c, eta, b = 2.0, 3.0, 0.1, 8
    cont = ou.ou_covariance_continuous([[h]], [[c]], eta, b, symmetric=symmetric)
    disc = ou.ou_covariance_discrete([[h]], [[c]], eta, b, symmetric=symmetric)
    assert float(cont.sigma[0, 0]) == pytest.approx(eta / b * c / (2 * h), rel=1e-12)
    assert float(disc.sigma[0, 0]) == pytest.approx(eta / b * c / (2 * h - eta * h * h), rel=1e-12)


# ---------------------------------------------------------------------------------------
# Monte Carlo of the linear SGD recursion against ou_covariance_discrete
# ---------------------------------------------------------------------------------------


def test_monte_carlo_matches_discrete_prediction():
    d, chains, steps, burn, eta, b = 3, 200, 20_000, 1_000, 0.1, 4
    rng = np.random.default_rng(2024)
    u = np.linalg.qr(rng.normal(size=(d, d)))[0]
    h = (u * np.array([0.5, 2.0, 6.0])) @ u.T  # ηλ = 0.05, 0.2, 0.6
    c_g = spd(rng, d, 0.5)
    a = np.eye(d) - eta * h
    noise_factor = np.sqrt(eta**2 / b) * np.linalg.cholesky(c_g)  # Cov = (η²/b) C_g
    w = np.zeros((chains, d))
    moment = np.zeros((chains, d, d))  # per-chain sum of w wᵀ after burn-in (the mean is exactly 0)
    block = 1_000
    for start in range(0, steps, block):
        xi = rng.standard_normal((block, chains, d)) @ noise_factor.T
        path = np.empty((block, chains, d))
        for t in range(block):
            w = w @ a.T + xi[t]
            path[t] = w
        if start >= burn:
            moment += np.einsum("tci,tcj->cij", path, path)
    per_chain = moment / (steps - burn)
    empirical = per_chain.mean(axis=0)
    # Tolerance from the Monte Carlo error: the 200 chains are independent, so the per-chain
    # time averages are i.i.d. and their spread over chains gives the standard error of the
    # pooled mean whatever the autocorrelation within a chain (for a Gaussian chain that is
    # about √((Σ_iiΣ_jj + Σ_ij²)·τ/(chains·steps)), τ ≈ (1 + ρ²)/(1 − ρ²) ≈ 20 for ρ = 0.95:
    # ~0.3% of Σ). 5 standard errors per entry: with the 200-chain estimate of the SE itself
    # good to ~5%, a correct prediction fails with negligible probability (the seed is fixed).
    se = per_chain.std(axis=0, ddof=1) / np.sqrt(chains)
    pred = ou.ou_covariance_discrete(h, c_g, eta, b)
    assert bool(pred.ok)
    assert np.all(np.abs(empirical - np.asarray(pred.sigma)) <= 5 * se)
    assert np.all(se <= 0.01 * np.sqrt(np.outer(np.diag(empirical), np.diag(empirical))))
    # power: the continuous prediction (off by a relative O(ηλ)) is rejected by the same test
    cont = ou.ou_covariance_continuous(h, c_g, eta, b, symmetric=True)
    assert np.any(np.abs(empirical - np.asarray(cont.sigma)) > 5 * se)


# ---------------------------------------------------------------------------------------
# Flags: no stationary solution gives ok = False, finite sigma, no NaN in the rest of a batch
# ---------------------------------------------------------------------------------------


def _transforms(fn):
    """The solver eagerly, under jit, under vmap and under jit(vmap) over the leading axis."""
    return {"eager": fn, "jit": jax.jit(fn), "vmap": jax.vmap(fn), "jit_vmap": jax.jit(jax.vmap(fn))}


def _check_flagged_batch(fn, ms, qs, expected_ok, single):
    for name, f in _transforms(fn).items():
        sol = f(ms, qs)
        np.testing.assert_array_equal(np.asarray(sol.ok), expected_ok, err_msg=name)
        assert np.all(np.isfinite(np.asarray(sol.sigma))), name
        for i, good in enumerate(expected_ok):
            if good:
                np.testing.assert_allclose(sol.sigma[i], single(ms[i], qs[i]), rtol=1e-12, atol=1e-14, err_msg=name)
            else:
                assert np.all(np.asarray(sol.sigma[i]) == 0.0), name


@pytest.mark.parametrize("symmetric", [False, True])
def test_continuous_flag(symmetric):
    rng = np.random.default_rng(11)
    d = 3
    u = np.linalg.qr(rng.normal(size=(d, d)))[0]
    bad = (u * np.array([-0.5, 1.0, 2.0])) @ u.T  # one negative eigenvalue (λ_1 + λ_2 > 0 still)
    singular = (u * np.array([0.0, 1.0, 2.0])) @ u.T  # λ_1 + λ_1 = 0: no unique solution
    hs = np.stack([spd(rng, d), bad, spd(rng, d), singular])
    qs = np.stack([spd(rng, d) for _ in range(4)])

    def fn(h, q):
        return ou.solve_lyapunov_continuous(h, q, symmetric=symmetric)

    _check_flagged_batch(fn, hs, qs, [True, False, True, False],
                         lambda h, q: linalg.solve_continuous_lyapunov(h, q))
    arr = np.asarray(ou.lyapunov_continuous(hs, qs, symmetric=symmetric))
    assert np.all(np.isnan(arr[[1, 3]])) and np.all(np.isfinite(arr[[0, 2]]))


def test_continuous_flag_non_symmetric():
    q = np.eye(2)
    spiral_in = np.array([[0.1, 5.0], [-5.0, 0.1]])  # eigenvalues 0.1 ± 5i: stable
    spiral_out = np.array([[-0.1, 5.0], [-5.0, -0.1]])  # −0.1 ± 5i: unstable, symmetric part −0.1 I
    hidden = np.array([[2.0, 0.0], [9.0, -0.5]])  # eigenvalues 2, −0.5
    hs = np.stack([spiral_in, spiral_out, hidden])
    _check_flagged_batch(ou.solve_lyapunov_continuous, hs, np.stack([q] * 3), [True, False, False],
                         lambda h, q: linalg.solve_continuous_lyapunov(h, q))


def test_discrete_flag():
    rng = np.random.default_rng(12)
    d = 2
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    a_s = np.stack([
        contraction(rng, d, 0.8),
        1.01 * np.eye(d),  # ρ > 1
        np.diag([1.0, 0.5]),  # ρ = 1 exactly: I − A ⊗ A is singular
        1.05 * rot,  # ρ = 1.05 with eigenvalues ±1.05i: the symmetric part is 0
        np.array([[0.5, 3.0], [0.0, 0.5]]),  # ρ = 0.5, ‖A‖ > 1: stable
        np.array([[0.5, 3.0], [0.0, -1.0]]),  # ρ = 1 on a non-normal matrix
    ])
    qs = np.stack([spd(rng, d) for _ in range(len(a_s))])
    _check_flagged_batch(ou.solve_lyapunov_discrete, a_s, qs, [True, False, False, False, True, False],
                         lambda a, q: linalg.solve_discrete_lyapunov(a, q))
    arr = np.asarray(ou.lyapunov_discrete(a_s, qs))
    assert np.all(np.isnan(arr[[1, 2, 3, 5]])) and np.all(np.isfinite(arr[[0, 4]]))
    # the eigh path on symmetric inputs
    sym = np.stack([a_s[0] @ a_s[0].T * 0.5, 1.01 * np.eye(d), np.diag([1.0, 0.5]), -np.eye(d)])
    sym_q = qs[:4]
    _check_flagged_batch(lambda a, q: ou.solve_lyapunov_discrete(a, q, symmetric=True), sym, sym_q,
                         [True, False, False, False], lambda a, q: linalg.solve_discrete_lyapunov(a, q))


def test_sgd_step_too_large_is_flagged():
    rng = np.random.default_rng(13)
    h, c_g = spd(rng, 3), spd(rng, 3)
    lam_max = np.linalg.eigvalsh(h).max()
    lrs = np.array([0.5, 1.9, 2.1]) / lam_max  # stable iff ηλ_max < 2
    for symmetric in (False, True):
        disc = ou.ou_covariance_discrete(h, c_g, lrs, 4, symmetric=symmetric)
        cont = ou.ou_covariance_continuous(h, c_g, lrs, 4, symmetric=symmetric)
        np.testing.assert_array_equal(np.asarray(disc.ok), [True, True, False])
        np.testing.assert_array_equal(np.asarray(cont.ok), [True, True, True])
        assert np.all(np.isfinite(np.asarray(disc.sigma)))
        np.testing.assert_allclose(disc.sigma[0], linalg.solve_discrete_lyapunov(
            np.eye(3) - lrs[0] * h, lrs[0] ** 2 / 4 * c_g), rtol=1e-10)


# ---------------------------------------------------------------------------------------
# The continuous-minus-discrete gap is first order in η
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_gap_shrinks_in_proportion_to_step(symmetric):
    rng = np.random.default_rng(14)
    d, b = 4, 8
    h, c_g = spd(rng, d), spd(rng, d, 0.5)
    eta = 0.02 / np.linalg.eigvalsh(h).max()

    def gap(lr):
        cont = ou.ou_covariance_continuous(h, c_g, lr, b, symmetric=symmetric)
        disc = ou.ou_covariance_discrete(h, c_g, lr, b, symmetric=symmetric)
        assert bool(cont.ok) and bool(disc.ok)
        return rel_frob(disc.sigma, np.asarray(cont.sigma))

    # Σ_disc/Σ_cont − 1 = ηλ_iλ_j/(λ_i + λ_j − ηλ_iλ_j) in the eigenbasis: ratio 2 + O(ηλ_max)
    g1, g2, g4 = gap(eta), gap(eta / 2), gap(eta / 4)
    assert 1e-4 < g1 < 0.02
    assert g1 / g2 == pytest.approx(2.0, abs=0.03)
    assert g2 / g4 == pytest.approx(2.0, abs=0.015)


# ---------------------------------------------------------------------------------------
# The catalogue's path: stationary_covariance is bit for bit the original eigh solver
# ---------------------------------------------------------------------------------------


def _original_stationary_covariance(H, C_g, lr, batch, min_curvature=1e-3):
    """The eigh solver as it was before the general solvers (a verbatim copy)."""
    eigval, eigvec = jnp.linalg.eigh(jnp.asarray(H, jnp.float64))
    h_pd = (eigvec * jnp.maximum(eigval, min_curvature)) @ eigvec.T
    H, C = h_pd, (lr / batch) * jnp.asarray(C_g, jnp.float64)
    eigval, eigvec = jnp.linalg.eigh(H)
    denom = eigval[:, None] + eigval[None, :]
    rotated = eigvec.T @ C @ eigvec
    solved = jnp.where(denom > 0, rotated / jnp.where(denom > 0, denom, 1.0), jnp.nan)
    return eigvec @ solved @ eigvec.T


@pytest.mark.parametrize("d", [1, 3, 8])
def test_stationary_covariance_is_unchanged(d):
    rng = np.random.default_rng(15 + d)
    g = rng.normal(size=(d, d))
    h = g @ g.T / d - 0.3 * np.eye(d)  # some eigenvalues below the floor
    c_g = spd(rng, d)
    for lr, batch in [(0.3, 4), (1.0, 16)]:
        new, old = ou.stationary_covariance(h, c_g, lr, batch), _original_stationary_covariance(h, c_g, lr, batch)
        assert np.array_equal(np.asarray(new), np.asarray(old))
        new_j = jax.jit(ou.stationary_covariance)(h, c_g, lr, batch)
        old_j = jax.jit(_original_stationary_covariance)(h, c_g, lr, batch)
        assert np.array_equal(np.asarray(new_j), np.asarray(old_j))
