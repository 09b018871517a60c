"""Rates: the log-log slope against numpy's polyfit, the bootstrap interval's coverage on a known law,
and the shape constants of an exact power law."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_bounds import fits


def test_loglog_slope_matches_polyfit():
    rng = np.random.default_rng(0)
    x = np.array([32.0, 64, 128, 512, 4096])
    y = np.exp(rng.normal(size=x.size)) * x ** -0.7
    assert fits.loglog_slope(x, y) == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], rel=1e-12)
    with pytest.raises(ValueError, match="two distinct"):
        fits.loglog_slope([3.0, 3.0], [1.0, 2.0])


def test_bootstrap_interval_covers_the_true_slope_at_about_its_level():
    """|N(0, 1/x)| has mean √(2/π) x^-1/2: the fitted slope's 90% interval should cover -1/2 in about 90% of
    independent repetitions. 200 repetitions: the count is Binomial(200, 0.9) (sd 4.2), and the percentile
    bootstrap with 400 problems per x is close to nominal; accept 160..196 (about ±7 sd above, ±4.7 below the
    nominal 180, allowing the percentile interval's small undercoverage)."""
    rng = np.random.default_rng(1)
    x = np.array([16.0, 64.0, 256.0])
    covered = 0
    for rep in range(200):
        samples = [np.abs(rng.normal(size=400)) / np.sqrt(v) for v in x]
        fit = fits.bootstrap_slope(x, samples, n_boot=300, level=0.9, seed=rep)
        assert fit.lo <= fit.slope <= fit.hi
        covered += fit.lo <= -0.5 <= fit.hi
    assert 160 <= covered <= 196, covered


def test_paired_bootstrap_and_verdicts():
    rng = np.random.default_rng(2)
    x = [10.0, 100.0, 1000.0]
    base = np.abs(rng.normal(size=300)) + 0.1
    samples = [base * v ** -1.0 for v in x]       # the same problems, an exact x^-1 law: no sampling spread
    fit = fits.bootstrap_slope(x, samples, paired=True, n_boot=200)
    assert fit.slope == pytest.approx(-1.0, abs=1e-12) and fit.hi - fit.lo < 1e-9
    assert fits.slope_verdict(fit, -1.0 + 1e-3) == "refuted"
    assert fits.slope_verdict(fit._replace(lo=-1.1, hi=-0.9), -1.0) == "holds"
    assert fits.slope_verdict(fit._replace(lo=-1.1, hi=-0.9), -0.5) == "refuted"
    assert fits.slope_verdict(fit._replace(lo=-1.1, hi=-0.9), -0.5, upper=True) == "holds"
    assert fits.slope_verdict(fit._replace(lo=-0.4, hi=-0.2), -0.5, upper=True) == "refuted"
    with pytest.raises(ValueError, match="same number"):
        fits.bootstrap_slope(x, [base, base[:10], base], paired=True)


def test_shape_constants_of_an_exact_law_do_not_drift_and_of_a_wrong_shape_do():
    rng = np.random.default_rng(3)
    x = [32.0, 256.0, 2048.0]
    samples = [np.abs(rng.normal(size=2000)) * 3.0 / np.sqrt(v) for v in x]
    right = fits.shape_constants(x, samples, lambda n: n ** -0.5)
    assert np.allclose(right.constants, 3.0 * np.sqrt(2 / np.pi), rtol=0.08)   # 4 se of a 2000-mean of |N|
    assert right.drift.lo <= 0.0 <= right.drift.hi
    wrong = fits.shape_constants(x, samples, lambda n: n ** -1.0)             # claims a faster rate
    assert wrong.drift.lo > 0.3                                               # C(n) grows like n^1/2
    assert wrong.constants[-1] / wrong.constants[0] == pytest.approx(8.0, rel=0.1)


def test_quartiles_of_the_figures_interval_bars():
    """plots.quartiles (the interquartile bars of the ou and stability figures): a hand case, then NumPy's
    percentile and median on a random sample."""
    from rlhf_bounds import plots

    np.testing.assert_allclose(plots.quartiles([4, 1, 3, 2]), [1.75, 2.5, 3.25])
    x = np.random.default_rng(5).standard_normal(101)
    np.testing.assert_allclose(plots.quartiles(x), [np.percentile(x, 25), np.median(x), np.percentile(x, 75)])
