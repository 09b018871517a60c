"""Rates: log-log slopes with bootstrap intervals, and the smallest constant of a ``≲`` shape.

Every rate check of the suites goes through here (docs/theory.md §11):

    from rlhf_bounds import fits
    fit = fits.bootstrap_slope([32, 128, 512], [gaps_32, gaps_128, gaps_512])   # per-problem |gap| at each n
    fit.slope, fit.lo, fit.hi                      # the slope of log E|gap| against log n, 95% interval
    fits.slope_verdict(fit, -0.5)                  # "holds" if -1/2 is inside the interval, else "refuted"
    c = fits.shape_constants([32, 128, 512], [gaps_32, ...], lambda n: n ** -0.5)
    c.constants, c.drift                           # C(n) = stat(|gap|)/shape(n), and the slope of log C(n)

The statistic at each x (default: the mean) is taken over independent problems; the bootstrap
resamples the problems of each x independently (the x's are independent groups, or paired groups
when ``paired=True``: the same problem index at every x, resampled together), refits, and takes the
percentile interval. Slopes are ordinary least squares of log(stat) on log(x).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = ["loglog_slope", "SlopeFit", "bootstrap_slope", "slope_verdict", "ShapeConstants", "shape_constants"]


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """The least-squares slope of log y against log x (x, y > 0; at least two distinct x)."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if lx.size < 2 or np.ptp(lx) == 0:
        raise ValueError("loglog_slope needs at least two distinct x")
    lx = lx - lx.mean()
    return float(np.sum(lx * (ly - ly.mean())) / np.sum(lx * lx))


class SlopeFit(NamedTuple):
    """A log-log slope with its bootstrap interval (``level``, percentile), from ``n_boot`` resamples."""

    slope: float
    lo: float
    hi: float
    level: float
    n_boot: int
    stats: tuple[float, ...]   # the statistic at each x


def _groups(samples) -> list[np.ndarray]:
    out = []
    for s in samples:
        v = np.asarray(s, np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError("every x needs at least one finite value")
        out.append(v)
    return out


def bootstrap_slope(x: Sequence[float], samples: Sequence[Sequence[float]], *,
                    stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0, paired: bool = False) -> SlopeFit:
    """The slope of log stat(samples[j]) against log x[j], with a percentile bootstrap interval.

    ``samples[j]``: the per-problem values at ``x[j]`` (non-finite values dropped). ``stat`` must be
    positive on every resample (e.g. the mean of |gap|). ``paired``: the groups are the same problems
    at each x (equal sizes), resampled with one index draw; otherwise each group independently.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} is not allowed: must be in (0, 1)")
    groups = _groups(samples)
    if len(groups) != len(x):
        raise ValueError(f"{len(x)} x values but {len(groups)} groups of samples")
    stats = [float(stat(g)) for g in groups]
    slope = loglog_slope(x, stats)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    if paired:
        sizes = {g.size for g in groups}
        if len(sizes) != 1:
            raise ValueError("paired=True needs the same number of finite values at every x")
        m = sizes.pop()
        for b in range(n_boot):
            idx = rng.integers(0, m, m)
            boots[b] = loglog_slope(x, [stat(g[idx]) for g in groups])
    else:
        for b in range(n_boot):
            boots[b] = loglog_slope(x, [stat(g[rng.integers(0, g.size, g.size)]) for g in groups])
    a = (1 - level) / 2
    lo, hi = np.quantile(boots, [a, 1 - a])
    return SlopeFit(slope, float(lo), float(hi), level, n_boot, tuple(stats))


def slope_verdict(fit: SlopeFit, theory: float, *, upper: bool = False) -> str:
    """``"holds"`` if the theory's slope is inside the interval (``upper``: a ``≲`` rate, which holds if
    the fitted slope is no steeper upward than the theory's, i.e. lo ≤ theory), else ``"refuted"``."""
    if upper:
        return "holds" if fit.lo <= theory else "refuted"
    return "holds" if fit.lo <= theory <= fit.hi else "refuted"


class ShapeConstants(NamedTuple):
    """The smallest constant C(x) = stat(values at x) / shape(x) at each x, and the log-log slope of C
    against x (``drift``, with its bootstrap interval): a ``≲ shape`` result whose constant drifts
    (interval excluding 0) does not have that shape on these problems."""

    x: tuple[float, ...]
    constants: tuple[float, ...]
    drift: SlopeFit


def shape_constants(x: Sequence[float], samples: Sequence[Sequence[float]], shape: Callable[[float], float], *,
                    stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0, paired: bool = False) -> ShapeConstants:
    """C(x) = stat(samples at x) / shape(x): the smallest constant with stat ≤ C·shape at that x; its drift
    is the bootstrap slope of log C(x) against log x (the slope of the values minus the shape's)."""
    scale = [float(shape(v)) for v in x]
    if any(not np.isfinite(s) or s <= 0 for s in scale):
        raise ValueError("shape(x) must be finite and positive at every x")
    scaled = [np.asarray(g, np.float64) / s for g, s in zip(samples, scale)]
    drift = bootstrap_slope(x, scaled, stat=stat, n_boot=n_boot, level=level, seed=seed, paired=paired)
    return ShapeConstants(tuple(float(v) for v in x), drift.stats, drift)
