"""Property-based tests (hypothesis) over the spec space: the policy maths and the spec validation.

* Policy maths at any scale of w, φ, β and τ (0 and ∞ included): finite,
  probabilities that sum to 1, KL ≥ 0, the clipped mean inside [−τ, τ], and
  log(1 + χ²) finite even where χ² itself overflows.
* Validation: any value a field accepts is in its documented range and runs
  a tiny problem with no NaN or inf left unflagged; any value it rejects
  raises :class:`SpecError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as hs

import rlhf_bounds as rb
from rlhf_bounds import gap, learners, policy
from rlhf_bounds import status as st
from rlhf_bounds.spec import F32_MAX, F32_TINY, FIELDS, SpecError
from rlhf_bounds.world import World, behaviour_log_probs

#: The same tiny static spec and chunk size as tests/test_reliability.py: one shared compilation.
TINY = rb.Spec(d=3, actions=3, prompts=16, rollouts=2, pref_pairs=32, eval_prompts=32, steps=4, record_every=2,
               batch=4, feature_law="anisotropic")
CHUNK = 1

SHAPES = [(1, 1), (2, 3), (4, 4), (5, 2)]  # (A, d): few shapes, few compilations


def log_uniform(lo_exp: float, hi_exp: float):
    return hs.floats(lo_exp, hi_exp).map(lambda e: 10.0 ** e)


@hs.composite
def prompt_cases(draw):
    """(w, w_ref, w_mu, Φ, θ, β, τ, ε) with every scale from tiny to huge."""
    A, d = draw(hs.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(hs.integers(0, 2**32 - 1)))
    w_scale = draw(hs.just(0.0) | log_uniform(-3, 6))
    ref_scale = draw(hs.just(0.0) | log_uniform(-3, 4))
    mu_scale = draw(hs.just(0.0) | log_uniform(-3, 5))
    phi_scale = draw(log_uniform(-3, 3))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return dict(
        w=f32(w_scale * rng.normal(size=d)), w_ref=f32(ref_scale * rng.normal(size=d)),
        w_mu=f32(mu_scale * rng.normal(size=d)), phi=f32(phi_scale * rng.normal(size=(A, d))),
        theta=f32(rng.normal(size=d) * draw(log_uniform(-2, 2))),
        beta=draw(log_uniform(-4, 4)),
        tau=draw(hs.sampled_from([0.0, math.inf]) | log_uniform(-3, 3)),
        eps=draw(hs.sampled_from([0.0, 1e-6, 0.1, 1.0])),
    )


@jax.jit
def _maths(w, w_ref, w_mu, phi, theta, beta, tau, eps):
    """Every per-prompt quantity of docs/theory.md §14 for one prompt, through the package's functions."""
    d = w.shape[0]
    world = World(theta, w_mu, w_ref, jnp.zeros((d, 0), jnp.float32))
    log_mu = behaviour_log_probs(_with_eps(eps), world, phi)
    reward = phi @ theta
    stats = gap.prompt_stats(w, w_ref, gap.EvalSet(phi[None], reward[None], reward[None], log_mu[None]), beta, tau)
    return dict(
        log_probs=policy.log_probs(w, phi), probs=policy.probs(w, phi), log_ratio=policy.log_ratio(w, w_ref, phi),
        kl=policy.kl(w, w_ref, phi), clipped=policy.clipped_log_ratio(w, w_ref, phi, tau),
        clipped_mean=policy.clipped_log_ratio_mean(w, w_ref, phi, tau),
        tail=policy.clip_tail_excess(w, w_ref, phi, tau), objective=policy.objective(w, w_ref, phi, reward, beta),
        grad=learners.exact_gradient(w, w_ref, phi, reward, beta, tau),
        grad_linear=policy.objective_gradient_linear(w, w_ref, phi, theta, beta),
        chi2=stats.chi2[0], log1p_chi2=stats.log1p_chi2[0], log_mu=log_mu,
    )


def _with_eps(eps):
    """The default spec with mix_eps = ε (a tracer here, so built without validation)."""
    return dataclasses.replace(rb.Spec(), mix_eps=eps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_cases())
def test_policy_maths_is_finite_and_consistent_at_every_scale(case):
    out = {k: np.asarray(v, np.float64) for k, v in _maths(**case).items()}
    tau = float(np.float32(case["tau"]))  # τ as the float32 simulation sees it
    for name in ("log_probs", "probs", "log_ratio", "kl", "clipped", "clipped_mean", "tail", "objective", "grad",
                 "grad_linear", "log1p_chi2", "log_mu"):
        assert np.all(np.isfinite(out[name])), (name, out[name])
    assert not np.isnan(out["chi2"])  # +inf possible (μ ≈ 0 where π is not): flagged, and log1p_chi2 holds it

    p = out["probs"]
    A = p.shape[0]
    assert np.all(p >= 0) and abs(p.sum() - 1.0) <= 1e-5 * A
    assert np.all(out["log_probs"] <= 0.0)
    scale = 1.0 + float(np.sum(p * np.abs(out["log_ratio"])))  # size of the terms KL sums
    assert out["kl"] >= -1e-5 * scale
    assert np.all(np.abs(out["clipped"]) <= tau)
    # A mean of values in [−τ, τ] under float32 probabilities, whose sum is 1 only up to a few
    # tens of float32 ulps (≈ 1.2e-7 each) when logits reach 10⁴: allow 1e-5 relative.
    assert abs(out["clipped_mean"]) <= tau * (1.0 + 1e-5)
    assert out["tail"] >= 0.0
    # |E(ℓ − ℓ^τ)| ≤ E|ℓ − ℓ^τ| = E(|ℓ| − τ)_+, and τ = ∞ leaves the KL unchanged.
    assert abs(out["kl"] - out["clipped_mean"]) <= out["tail"] + 1e-5 * scale
    if tau == math.inf:
        assert out["clipped_mean"] == pytest.approx(out["kl"], rel=1e-6, abs=1e-6)
        assert out["tail"] == 0.0
    # log(1 + χ²) ≥ 0 (up to round-off), and it matches χ² wherever χ² did not overflow.
    assert out["log1p_chi2"] >= -1e-5 * (1.0 + abs(out["log1p_chi2"]))
    if np.isfinite(out["chi2"]):
        assert np.log1p(max(out["chi2"], -1 + 1e-30)) == pytest.approx(out["log1p_chi2"], rel=1e-3, abs=1e-4)
    else:  # χ² overflowed float32 (above 3.4e38)
        assert out["log1p_chi2"] > 88.0


@settings(max_examples=40, deadline=None)
@given(prompt_cases())
def test_probabilities_are_invariant_to_shifting_all_logits(case):
    """Adding the same vector c to every response's feature adds ⟨w, c⟩ to every logit: π_w is unchanged."""
    w, phi = case["w"], case["phi"]
    assume(float(jnp.max(jnp.abs(phi @ w))) < 1e4)  # the shift must not swamp the logits in float32
    c = jnp.ones_like(w) * 0.5
    p0 = np.asarray(policy.probs(w, phi), np.float64)
    p1 = np.asarray(policy.probs(w, phi + c[None, :]), np.float64)
    np.testing.assert_allclose(p0, p1, atol=1e-4 * (1.0 + abs(float(c @ w))))


# ---- spec validation ----------------------------------------------------------------------------
SPECIAL = [0, 1, -1, 2, 7, 2**31, -0.0, 0.5, 1.0, 1.5, 1e-320, 1e-39, F32_TINY, 1e-30, 1e30, F32_MAX, 1e39,
           math.inf, -math.inf, math.nan, True, False, None, "", "1", "nan", "sphere", "lowrank", "GA", "SGD",
           "rloo", "exact", "oracle", "mle", "clipped", "inv_sqrt", [1], np.float32(0.5), np.int64(3)]

values = hs.one_of(hs.sampled_from(SPECIAL), hs.integers(-10**6, 10**6),
                   hs.floats(allow_nan=True, allow_infinity=True), hs.text(max_size=4))


def in_documented_range(name: str, value) -> bool:
    """The field's range as documented by its metadata, decided without the validator."""
    m = FIELDS[name].metadata
    if m["choices"]:
        return isinstance(value, str) and value in m["choices"]
    is_int = FIELDS[name].type in ("int", int)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    if is_int and not isinstance(value, (int, np.integer)):
        return False
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not (m["allow_inf"] and v > 0)):
        return False
    lo, hi = m["lo"], m["hi"]
    if lo is not None and (v < lo or (m["lo_open"] and v == lo)):
        return False
    if hi is not None and (v > hi or (m["hi_open"] and v == hi)):
        return False
    if not m["static"] and v != 0 and math.isfinite(v) and not F32_TINY <= abs(v) <= F32_MAX:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(name=hs.sampled_from(sorted(FIELDS)), value=values)
def test_validation_accepts_exactly_the_documented_range(name, value):
    values = {**rb.Spec().to_dict(), name: value}
    expected = in_documented_range(name, value)
    if expected:  # cross-field rules with the other fields at their defaults
        expected = values["steps"] % values["record_every"] == 0 if name in ("steps", "record_every") else expected
        expected = expected and not (name == "rollouts" and value < 2)  # default: SGD with rloo
    try:
        rb.Spec(**{name: value}).validate()  # construction checks already (Spec.__post_init__)
    except SpecError as err:
        assert not expected, f"{name}={value!r} rejected: {err}"
        assert name in str(err), str(err)
        assert "\n" not in str(err)
    else:
        assert expected, f"{name}={value!r} accepted outside its range"


def test_unknown_fields_are_refused_by_name():
    with pytest.raises(SpecError, match="temperature"):
        rb.Spec().replace(temperature=1.0)
    with pytest.raises(SpecError, match="temperature"):
        rb.Spec.from_dict({"temperature": 1.0})


#: Traced fields and wide ranges for them (edges of float32, zero, infinity for τ).
TRACED = {
    "beta": log_uniform(-30, 30), "tau": hs.sampled_from([0.0, math.inf, -1.0]) | log_uniform(-30, 30),
    "reward_norm": log_uniform(-30, 30), "feature_bound": log_uniform(-6, 6),
    "sigma_xi": hs.just(0.0) | log_uniform(-6, 6), "condition": log_uniform(0, 12),
    "shared_weight": hs.floats(0, 1), "shift": hs.floats(-1e4, 1e4), "mix_eps": hs.sampled_from([0.0, 1e-8, 1.0])
    | hs.floats(0, 1), "mu_noise": hs.just(0.0) | log_uniform(-6, 6), "lr": log_uniform(-30, 30),
    "ridge": log_uniform(-30, 30), "delta": hs.floats(0, 1),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.fixed_dictionaries({}, optional=TRACED))
def test_accepted_values_run_without_silent_nan(changes):
    """Whatever the validator accepts runs; a NaN or inf in a result always carries a status flag."""
    try:
        spec = TINY.replace(**changes)
    except SpecError as err:
        assert str(err).split("=")[0] in changes, str(err)
        return
    res = rb.run(spec, 2, seed=3, chunk_size=CHUNK, progress=False)
    ok = res.ok
    for name in set(res.columns) | set(res.arrays):
        v = np.asarray(res[name])
        if v.dtype.kind != "f":
            continue
        flat = v.reshape(len(v), -1)
        bad = ~np.isfinite(flat).all(axis=1) if st.must_be_finite(name) else np.isnan(flat).any(axis=1)
        assert not np.any(bad & ok), f"{name} non-finite without a flag for {changes}"
