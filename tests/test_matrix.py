"""An end-to-end test matrix over the static choices of a spec (in the style of gymnax's test matrix).

The six static choices (learner, estimator, reward model, training log-ratio, feature law, bound
set) have 3·3·2·2·5·2 = 360 combinations, each a compilation of the whole kernel. Most bugs that
depend on the choices at all depend on an interaction of two of them, so the cases form a
pairwise (all-pairs) covering design: every pair of levels of any two factors appears in at least
one case. :func:`all_pairs` builds it deterministically (greedy, AETG style) in 15 cases, the
least possible (5 feature laws × 3 learners), and :func:`test_design_covers_every_pair` checks the
table itself, so that it cannot silently lose coverage.

Every case runs the same end-to-end checks: finite columns, status 0, the gap decomposition and
Ĵ − J* to float32 round-off (fresh sample and training sample), results independent of the chunk
size (one that pads the last chunk), and the same run twice bit-identical.

Notes on the design: ``estimator`` only matters for SGA and SGD (GA uses the exact gradient), and
``train_log_ratio='clipped'`` only with a finite τ, so every case has τ = 1.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds.spec import BOUND_SETS, ESTIMATORS, FEATURE_LAWS, LEARNERS, REWARD_MODELS, TRAIN_LOG_RATIOS
from rlhf_bounds.status import MAY_BE_INFINITE_PREFIXES, must_be_finite, status_names

from conftest import EPS32, tiny_spec
# The chunk-size comparison of test_engine.py (1e-5 relative, 1e-6 absolute; bit for bit on the pure
# draws): one definition, so that tightening it there tightens it here.
from test_engine import assert_same_results

#: The factors of the matrix: the spec's static choices, each with all its levels.
FACTORS = {
    "learner": LEARNERS,
    "estimator": ESTIMATORS,
    "reward_model": REWARD_MODELS,
    "train_log_ratio": TRAIN_LOG_RATIOS,
    "feature_law": FEATURE_LAWS,
    "bounds": BOUND_SETS,
}

#: The tiny problem family of every case (small shapes: each case's cost is its two compilations).
BASE = dict(d=4, actions=4, prompts=32, rollouts=4, eval_prompts=128, steps=20, record_every=10, batch=8,
            pref_pairs=32, newton_steps=8, posterior_draws=4, rank=2, tau=1.0)
#: 6 problems in chunks of 4 (the last chunk padded with 2 lanes) and in one chunk of 6.
PROBLEMS, SEED, CHUNK, OTHER_CHUNK = 6, 11, 4, 6


def level_pairs(i: int, row_i, j: int, row_j):
    return ((i, row_i), (j, row_j))


def all_pairs(factors: dict[str, tuple]) -> list[dict[str, str]]:
    """A deterministic greedy all-pairs design: a list of cases covering every pair of levels.

    Each new case is the best of one candidate per still-uncovered pair: seeded with that pair, its
    other factors filled in order, each with the level that covers the most uncovered pairs with the
    factors already set (ties: the level in the most uncovered pairs overall, then the first level).
    """
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    n = len(names)
    uncovered = {level_pairs(i, a, j, b) for i, j in combinations(range(n), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}

    def pairs_of(row):
        return {level_pairs(i, row[i], j, row[j]) for i, j in combinations(range(n), 2)}

    rows = []
    while uncovered:
        best = None
        for seed in sorted(uncovered):
            row = dict(seed)
            for k in range(n):
                if k in row:
                    continue

                def score(level, k=k, row=row):
                    now = sum(tuple(sorted([(k, level), (m, v)])) in uncovered for m, v in row.items())
                    later = sum((k, level) in p for p in uncovered)
                    return now, later, -level

                row[k] = max(range(sizes[k]), key=score)
            candidate = tuple(row[k] for k in range(n))
            gain = len(pairs_of(candidate) & uncovered)
            if best is None or gain > best[0]:
                best = (gain, candidate)
        rows.append(best[1])
        uncovered -= pairs_of(best[1])
    return [{name: factors[name][level] for name, level in zip(names, row)} for row in rows]


CASES = all_pairs(FACTORS)


def case_id(case: dict[str, str]) -> str:
    return "-".join(case[name] for name in FACTORS)


def test_design_covers_every_pair():
    """Every pair of levels of any two factors is in some case, with valid levels only, and no case twice."""
    assert len(CASES) == 15  # the least possible: |feature_law| · |learner| = 5 · 3
    assert len({case_id(c) for c in CASES}) == len(CASES)
    for case in CASES:
        assert set(case) == set(FACTORS)
        for name, level in case.items():
            assert level in FACTORS[name], (name, level)
    for f, g in combinations(FACTORS, 2):
        seen = {(case[f], case[g]) for case in CASES}
        missing = {(a, b) for a in FACTORS[f] for b in FACTORS[g]} - seen
        assert not missing, f"pairs of {f} × {g} in no case: {sorted(missing)}"


def identity_tolerance(res: rb.Results, suffix: str = "") -> np.ndarray:
    """Per-problem tolerance of the float32 identities (as in test_gap.py): 64 ulps of their scale.

    Each side of an identity is a handful of float32 subtractions of population means and sample
    means; each mean is over at most M·A = 512 float32 terms bounded by the rewards (|r̂|, |r*| ≤
    reward_range, up to the misspecification) and the KL terms (β|ℓ| ≤ β·log_ratio_range), so the
    round-off of each is a few tens of ulps (eps = 2^-23) of ``scale`` below (pairwise/blocked
    summation; random-walk error). 64·eps·scale allows that with room: it is 2–6e-5 here, the
    errors seen are under 1% of it, and an error of 1e-4 planted in one term exceeds it 3-fold.
    """
    scale = (1 + np.abs(res["J_hat" + suffix]) + np.abs(res["J_hat_mean"]) + np.abs(res["J_star"])
             + res["reward_range"] + res.spec.beta * res["log_ratio_range"])
    return 64 * EPS32 * scale.astype(np.float64)


def assert_within(actual, expected, tol, what):
    err = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    assert np.all(err <= tol), f"{what}: max |error| / tolerance = {np.max(err / tol):.3g}"


def check_finite(res: rb.Results):
    """Status-0 problems: every result finite, except those must_be_finite exempts, which are never NaN
    (bound columns may be +inf, not −inf)."""
    ok = res.ok
    for name in list(res.columns) + list(res.arrays):
        x = res[name][ok]
        if not np.issubdtype(x.dtype, np.floating):
            continue
        if must_be_finite(name):
            assert np.all(np.isfinite(x)), f"{name} not finite: {x}"
        else:
            assert not np.any(np.isnan(x)), f"{name} is NaN: {x}"
            if name.startswith(MAY_BE_INFINITE_PREFIXES):
                assert not np.any(np.isneginf(x)), f"bound {name} is -inf: {x}"


def check_decomposition(res: rb.Results):
    """G = sampling + reward shift + clipping, sampling = prompt + rollout, G = Ĵ − J* (fresh and train)."""
    for suffix in ("", "_train"):
        col = lambda name: res[name + suffix].astype(np.float64)
        tol = identity_tolerance(res, suffix)
        assert_within(col("gap_total"), col("gap_sampling") + col("gap_reward_shift") + col("gap_clipping"), tol,
                      f"gap_total{suffix} = sampling + reward_shift + clipping")
        assert_within(col("gap_sampling"), col("gap_sampling_prompt") + col("gap_sampling_rollout"), tol,
                      f"gap_sampling{suffix} = prompt + rollout")
        assert_within(col("J_hat") - col("J_star"), col("gap_total"), tol,
                      f"J_hat{suffix} - J_star{suffix} = gap_total")


# Two compilations of the whole kernel per case (~7 s each here at LLVM level 0): the 15 cases take
# 4-5 minutes on 2 cores, so they are slow; the design check above stays in quick runs.
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matrix_case(case):
    """One case of the design, end to end: finite, status 0, the identities, chunk-size independence."""
    spec = tiny_spec(**BASE, **case)
    res = rb.run(spec, PROBLEMS, seed=SEED, chunk_size=CHUNK, progress=False)
    assert len(res) == PROBLEMS and res.spec == spec

    check_finite(res)
    flagged = {int(i): status_names(s) for i, s in zip(res["problem"], res["status"]) if s}
    assert not flagged, f"flagged problems: {flagged}"
    assert np.all(res.ok)
    check_decomposition(res)

    # Same chunk size twice (the cached compilation): bit for bit.
    assert_same_results(rb.run(spec, PROBLEMS, seed=SEED, chunk_size=CHUNK, progress=False), res, exact=True)
    # Another chunk size (chunks of 4 pad the last one, one chunk of 6 does not): same per-problem values.
    assert_same_results(rb.run(spec, PROBLEMS, seed=SEED, chunk_size=OTHER_CHUNK, progress=False), res, exact=False)
