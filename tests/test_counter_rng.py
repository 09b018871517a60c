"""counter_rng.py: the counter-based normal/uniform generator, tested for exactness and law.

Three layers. (1) The words equal an independent NumPy implementation of the documented hash,
whose inner round reproduces SplitMix64's published seed-0 outputs. (2) The API contracts:
determinism, distinct keys give distinct streams, vmap over keys equals per-key calls
bit for bit, layout/prefix stability, both threefry modes. (3) A statistical battery with SciPy
as the oracle, every limit derived from the null sampling law, never from observed values:

* KS statistic of normals/uniforms against the exact CDF, limited by the (1 − 1e-4) quantile
  of its exact null law (``scipy.stats.kstwo``);
* mean, variance, skewness and excess kurtosis within 5 standard errors (SEs of the null law);
* serial correlations (lags 1, 16, 128 and the two halves of one 64-bit word) and
  correlations between the streams of neighbouring keys, of z and of z² (volatility), each
  standardised with the null moments, so its SE is exactly 1/√n: limit 5 SE;
* 32×32 chi-square uniformity of non-overlapping consecutive uniform pairs and of cross-stream
  pairs, limited by the (1 − 1e-4) quantile of χ²(1023).

A false alarm per check has probability at most 1e-4 (5 SE: 6e-7); seeds are fixed, so the
outcome is reproducible. The
battery must also have teeth: :func:`test_battery_rejects_weak_generators` feeds it generators
with known defects and requires each to fail the checks aimed at that defect.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from rlhf_bounds import counter_rng as cr

# Jitted entry points (op-by-op dispatch would compile every primitive per shape).
normal = jax.jit(cr.normal, static_argnames=("shape", "dtype"))
uniform = jax.jit(cr.uniform, static_argnames=("shape", "dtype"))
bits = jax.jit(cr.bits, static_argnames=("shape",))

N = 1 << 20           # draws per stream in the statistical battery
Z = 5.0               # standard errors allowed for moment and correlation checks
ALPHA = 1e-4          # false-alarm level of the KS and chi-square checks
GRID = 32             # chi-square grid per axis

# ---- NumPy reference of the documented hash (written from the module docstring) ---------------

M64 = (1 << 64) - 1
GAMMA, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
C_S, C_T = 0x243F6A8885A308D3, 0x13198A2E03707344


def np_mix(z):
    z = np.asarray(z, np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
    return z ^ (z >> np.uint64(31))


def np_words64(key, n):
    hi, lo = (int(x) for x in np.asarray(jax.random.key_data(key)))
    k = np.uint64((hi << 32) | lo)
    s, t = np_mix(k ^ np.uint64(C_S)), np_mix(k ^ np.uint64(C_T))
    with np.errstate(over="ignore"):
        inner = s + np.arange(n, dtype=np.uint64) * np.uint64(GAMMA)
    return np_mix(np_mix(inner) ^ t)


def np_bits(key, n):
    z = np_words64(key, (n + 1) // 2)
    return np.stack([(z & np.uint64(0xFFFFFFFF)), z >> np.uint64(32)], -1).reshape(-1)[:n].astype(np.uint32)


def np_uniform(w):
    """(2a+1)/2^24 with a the top 23 bits of each word (float64, exact)."""
    return ((w.astype(np.int64) >> 9) * 2 + 1) / 2.0**24


def np_normal(w):
    """√2·erfinv((2a+1−2^24)/2^24) with a the top 24 bits, in float64 (SciPy's erfinv)."""
    v = ((w.astype(np.int64) >> 8) * 2 + 1 - 2**24) / 2.0**24
    return math.sqrt(2.0) * special.erfinv(v)


# ---- (1) exactness against the references ------------------------------------------------------

def test_inner_round_is_published_splitmix64():
    # Vigna's splitmix64.c seeded with 0: its first outputs are mix(γ), mix(2γ), ...
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    states = [(j * GAMMA) & M64 for j in range(1, 5)]
    assert [int(x) for x in np.asarray(cr._mix(jnp.asarray(states, jnp.uint64)))] == published
    assert [int(x) for x in np_mix(states)] == published


KEYS = {"key(0)": lambda: jax.random.key(0), "key(2**31+7)": lambda: jax.random.key(2**31 + 7),
        "fold_in": lambda: jax.random.fold_in(jax.random.key(3), 11),
        "split": lambda: jax.random.split(jax.random.key(4))[1]}


@pytest.mark.parametrize("name", KEYS)
def test_words_and_maps_match_numpy_reference(name):
    key, n = KEYS[name](), 1001  # odd: the last element uses half a 64-bit word
    w = np_bits(key, n)
    np.testing.assert_array_equal(np.asarray(bits(key, (n,))), w)
    np.testing.assert_array_equal(np.asarray(uniform(key, (n,)), np.float64), np_uniform(w))
    # XLA's float32 erf_inv is an approximation (relative error up to ~6e-6 in the far tails):
    # compare in probability, where the map must be exact to within two cells of its input grid
    # (2·2^-24; test_float32_normal_map_on_its_whole_grid checks all 2^24 points).
    z = np.asarray(normal(key, (n,)), np.float64)
    assert np.max(np.abs(special.ndtr(-np.abs(z)) - special.ndtr(-np.abs(np_normal(w))))) <= 2 * 2.0**-24
    z = np_words64(key, n)
    u64 = ((z >> np.uint64(12)).astype(np.float64) * 2 + 1) / 2.0**53
    np.testing.assert_array_equal(np.asarray(uniform(key, (n,), jnp.float64)), u64)
    v64 = (((z >> np.uint64(11)).astype(np.int64) * 2 + 1) - 2**53) / 2.0**53
    np.testing.assert_allclose(np.asarray(normal(key, (n,), jnp.float64)), math.sqrt(2) * special.erfinv(v64),
                               rtol=1e-13, atol=1e-15)


def test_float32_normal_map_on_its_whole_grid():
    """Every one of the 2^24 float32 normals: strictly increasing in a, odd-symmetric, and
    within two grid cells (2·2^-24) in probability of the exact quantile Φ⁻¹((2a+1)/2^25)."""
    a = jnp.arange(1 << 24, dtype=jnp.uint32)
    z = np.asarray(jax.jit(lambda a: cr._to_normal(a, jnp.dtype(jnp.float32), 24))(a))
    h = 1 << 23
    assert np.all(np.diff(z) > 0)
    np.testing.assert_array_equal(z[:h], -z[:h - 1:-1])  # so the upper half decides the accuracy
    tail = np.arange(2 * h - 1, 0, -2) / 2.0**25  # P(Z > z) for a = 2^23, ..., 2^24 - 1
    assert np.max(np.abs(special.ndtr(-z[h:].astype(np.float64)) - tail)) <= 2 * 2.0**-24


def test_ranges_are_open_and_tails_bounded():
    extremes = np.array([0, 1, 255, 256, 2**31, 2**32 - 257, 2**32 - 1], np.uint32)
    u, z = np_uniform(extremes), np_normal(extremes)
    assert u.min() > 0 and u.max() < 1 and np.all(np.isfinite(z))
    key = jax.random.key(5)
    u = np.asarray(uniform(key, (N,)))
    assert u.min() > 0 and u.max() < 1
    s = np.asarray(uniform(key, (N,), minval=-1.0, maxval=1.0))
    assert s.min() > -1 and s.max() < 1
    np.testing.assert_array_equal(s, 2 * u - 1)  # exact in float32 on this grid
    z = np.asarray(normal(key, (N,)))
    assert np.all(np.abs(z) <= stats.norm.isf(2.0**-25) * (1 + 1e-6))


# ---- (2) API contracts -------------------------------------------------------------------------

def test_same_key_same_stream_different_keys_different_streams():
    k = jax.random.key(7)
    a = np.asarray(normal(k, (4096,)))
    np.testing.assert_array_equal(a, np.asarray(normal(jax.random.key(7), (4096,))))
    np.testing.assert_array_equal(a, np.asarray(cr.normal(k, (4096,))))  # op by op, unjitted
    others = [jax.random.key(8), jax.random.fold_in(k, 0), jax.random.fold_in(k, 1), *jax.random.split(k)]
    for other in others:
        b = np.asarray(normal(other, (4096,)))
        assert np.sum(a == b) <= 2  # 24-bit values: ≈ 4096·2^-24 coincidences expected


def test_layout_and_prefix_stability():
    k = jax.random.key(9)
    flat = np.asarray(normal(k, (2 * 3 * 5,)))
    np.testing.assert_array_equal(np.asarray(normal(k, (2, 3, 5))).reshape(-1), flat)
    np.testing.assert_array_equal(np.asarray(normal(k, (7,))), flat[:7])
    assert normal(k, ()).shape == () and uniform(k, (0, 3)).shape == (0, 3)


@pytest.mark.parametrize("fn", [cr.normal, cr.uniform, cr.bits])  # the plain functions
def test_vmap_over_keys_equals_per_key_calls(fn):
    shape = (33, 8, 3)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(10), jnp.arange(6))
    batched = np.asarray(jax.jit(jax.vmap(lambda k: fn(k, shape)))(keys))
    one = jax.jit(lambda k: fn(k, shape))
    for i in range(keys.shape[0]):
        np.testing.assert_array_equal(batched[i], np.asarray(one(keys[i])))


def test_same_draws_under_both_threefry_modes():
    key = jax.random.fold_in(jax.random.key(11), 3)
    draws = []
    for partitionable in (False, True):
        with jax.threefry_partitionable(partitionable):
            f = jax.jit(jax.vmap(lambda k: normal(k, (64, 5))))
            draws.append(np.asarray(f(jnp.stack([key, key]))))
    np.testing.assert_array_equal(draws[0], draws[1])


def test_rejects_what_it_cannot_draw():
    with pytest.raises(TypeError):
        normal(jax.random.key(0), (3,), jnp.float16)
    with pytest.raises(ValueError):
        normal(jax.random.split(jax.random.key(0), 2), (3,))


# ---- (3) statistical battery -------------------------------------------------------------------

def _corr_check(x, y):
    """Mean product of null-standardised samples, in units of its exact null SE 1/√n."""
    return abs(np.mean(x * y)) * math.sqrt(len(x)), Z


def _chi2_check(u, v):
    counts, _, _ = np.histogram2d(u, v, bins=GRID, range=[[0, 1], [0, 1]])
    expected = len(u) / GRID**2
    return np.sum((counts - expected) ** 2 / expected), stats.chi2.ppf(1 - ALPHA, GRID**2 - 1)


def battery(z_a, u_a, z_b, u_b):
    """{check: (statistic, limit)} for stream a (normals z_a, uniforms u_a) and a neighbouring
    stream b. A check passes when statistic ≤ limit."""
    n = len(z_a)
    ks_limit = stats.kstwo.ppf(1 - ALPHA, n)
    out = {"ks normal": (stats.kstest(z_a, special.ndtr).statistic, ks_limit),
           "ks uniform": (stats.kstest(u_a, stats.uniform.cdf).statistic, ks_limit)}
    m = {"mean": (np.mean(z_a), 1 / math.sqrt(n)), "variance": (np.var(z_a) - 1, math.sqrt(2 / n)),
         "skewness": (stats.skew(z_a), math.sqrt(6 / n)), "kurtosis": (stats.kurtosis(z_a), math.sqrt(24 / n)),
         "uniform mean": (np.mean(u_a) - 0.5, math.sqrt(1 / 12 / n)),
         "uniform variance": (np.var(u_a) - 1 / 12, math.sqrt((1 / 80 - 1 / 144) / n))}
    out.update({f"{k} (SE units)": (abs(v) / se, Z) for k, (v, se) in m.items()})
    sq_a, sq_b = (z_a**2 - 1) / math.sqrt(2), (z_b**2 - 1) / math.sqrt(2)  # null mean 0, variance 1
    for lag in (1, 16, 128):
        out[f"serial corr z lag {lag}"] = _corr_check(z_a[:-lag], z_a[lag:])
        out[f"serial corr z² lag {lag}"] = _corr_check(sq_a[:-lag], sq_a[lag:])
    out["corr of word halves z"] = _corr_check(z_a[0::2], z_a[1::2])
    out["corr of word halves z²"] = _corr_check(sq_a[0::2], sq_a[1::2])
    out["cross-stream corr z"] = _corr_check(z_a, z_b)
    out["cross-stream corr z²"] = _corr_check(sq_a, sq_b)
    out["cross-stream corr z lag 1"] = _corr_check(z_a[:-1], z_b[1:])
    out["chi2 serial pairs"] = _chi2_check(u_a[0::2], u_a[1::2])
    out["chi2 cross-stream pairs"] = _chi2_check(u_a, u_b)
    return out


def failures(results):
    return {k: v for k, v in results.items() if not v[0] <= v[1]}


def _draws(key):
    return (np.asarray(normal(key, (N,)), np.float64), np.asarray(uniform(key, (N,)), np.float64))


PAIRS = {
    "fold_in(k, i) vs fold_in(k, i+1)": lambda: [jax.random.fold_in(jax.random.key(12), i) for i in (41, 42)],
    "split(k)": lambda: list(jax.random.split(jax.random.key(13))),
    "key(0) vs key(1) (key data differ in one bit)": lambda: [jax.random.key(0), jax.random.key(1)],
}


@pytest.mark.parametrize("pair", PAIRS)
def test_battery_passes(pair):
    a, b = PAIRS[pair]()
    bad = failures(battery(*_draws(a), *_draws(b)))
    assert not bad, f"{pair}: {bad}"


def test_bit_frequencies():
    w = np.asarray(bits(jax.random.key(14), (N,)))
    ones = (w[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    dev = np.abs(ones.mean(0) - 0.5) / (0.5 / math.sqrt(N))
    assert dev.max() <= Z, dev


# ---- the battery's power: weak generators must fail it ----------------------------------------

def _fmix32(h):
    h = np.asarray(h, np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16)); h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13)); h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


I = np.arange(N, dtype=np.uint32)
WEAK = {  # name: (words of the stream for key word c, the two key words, normal-map scale, checks that must fail)
    # An LCG/Weyl map of the counter: exact marginals, but neighbours lie on lattice lines.
    "LCG of the counter": (lambda c: I * np.uint32(1664525) + np.uint32(c), (1, 2), 1.0,
                           {"serial corr z lag 1", "chi2 serial pairs"}),
    # Two fmix32 rounds on counter ^ key: a sound stream, but keys whose words differ by d give
    # the same stream permuted (i -> i ^ d); only the lagged cross-stream check can see it.
    "fmix32(fmix32(counter ^ key))": (lambda c: _fmix32(_fmix32(I ^ np.uint32(c))), (0, 1), 1.0,
                                      {"cross-stream corr z lag 1"}),
    # A sound stream but the key only shifts it: neighbouring keys' streams are near-copies.
    "fmix32(counter) + key": (lambda c: _fmix32(I) + np.uint32(c), (0x1234567, 0x1234568), 1.0,
                              {"cross-stream corr z", "chi2 cross-stream pairs"}),
    # counter_rng's own words with a 1% scale error in the normal map (a plausible mapping bug).
    "counter_rng words, normals scaled by 1.01": (lambda c: np_bits(jax.random.key(c), N), (15, 16), 1.01,
                                                  {"ks normal", "variance (SE units)"}),
}


@pytest.mark.parametrize("name", WEAK)
def test_battery_rejects_weak_generators(name):
    words, (ca, cb), scale, must_fail = WEAK[name]
    wa, wb = words(ca), words(cb)
    bad = failures(battery(scale * np_normal(wa), np_uniform(wa), scale * np_normal(wb), np_uniform(wb)))
    assert must_fail <= set(bad), f"{name}: failed only {sorted(bad)}"
