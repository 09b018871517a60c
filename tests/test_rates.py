"""The ``rates`` suite's grid and its slope table, on constructed results with planted rates.

The suite runs end to end in tests/test_suites.py; here the slope machinery is checked on numbers whose
rates are known: each quantity scaled by x^s with noise, so that the fitted slope must find s within
its bootstrap error, the verdict must follow, and a planted wrong rate must be refuted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_bounds import bounds
from rlhf_bounds.spec import Spec
from rlhf_bounds.suites import rates


def test_grid_sweeps_pass_through_the_base_and_move_one_field():
    for profile in ("quick", "default", "full"):
        regimes = rates.grid(profile)
        names = [r.name for r in regimes]
        assert len(set(names)) == len(names) and names[0] == rates.BASE_NAME
        base = next(r.spec for r in regimes if r.name == rates.BASE_NAME)
        sweeps = rates.sweeps(profile)
        assert set(sweeps) == ({"n", "K"} if profile == "quick" else {"n", "K", "N_pref", "T"})
        for axis, points in sweeps.items():
            field, _, _, extra = rates.AXES[axis]
            if not extra:
                assert rates.BASE_NAME in [name for name, _ in points], axis
            for name, x in points:
                spec = next(r.spec for r in regimes if r.name == name)
                assert getattr(spec, field) == x
                assert spec == base.replace(**{field: x, **extra})
    # The T sweep is off the degenerate corner C_g = 0: the oracle reward with a residual.
    assert all(r.spec.reward_model == "oracle" and r.spec.sigma_xi > 0 for r in rates.grid("default")
               if r.name.startswith("T-"))


class _Res:
    def __init__(self, spec: Spec, columns: dict):
        self.columns = columns
        self.ok = np.ones(next(iter(columns.values())).size, bool)
        self.record = {"spec": spec.to_dict()}

    def __getitem__(self, name):
        return self.columns[name]


class _Study:
    def __init__(self, regimes: dict, profile: str):
        self.regimes = regimes
        self.record = {"profile": profile}

    def items(self):
        return self.regimes.items()

    def __getitem__(self, name):
        return self.regimes[name]

    def __iter__(self):
        return iter(self.regimes)


def _planted(profile="default", problems=200, sampling_power=-0.5, seed=0):
    rng = np.random.default_rng(seed)
    regimes = {}
    for r in rates.grid(profile):
        s = r.spec
        n, K, N, delta = s.prompts, s.rollouts, s.pref_pairs, s.delta
        z = lambda: rng.normal(size=problems)
        sigma = 0.3
        width = 2.0 + 0.1 * rng.uniform(size=problems)
        regimes[r.name] = _Res(s, {
            # measured against EĴ on M evaluation prompts: the fixed-policy error plus the evaluation set's own
            "gap_sampling": z() * (np.sqrt(1 / n + 1 / s.eval_prompts) if sampling_power == -0.5 else
                                   n ** sampling_power),
            "gap_sampling_prompt": z() * np.sqrt(1 / n + 1 / s.eval_prompts) * 0.8,
            "gap_sampling_rollout": z() * sigma * (n * K) ** -0.5,
            "var_rollout": np.full(problems, sigma ** 2),
            "b1_sampling": width * np.asarray(bounds.sampling_alpha(n, K, delta)),
            "gap_total": z() + 3.0,
            "gap_reward_shift": z() * N ** -0.5,
            "reward_error": np.abs(z()) * N ** -0.5,
            "b1_reward_shift": 3.0 * N ** -0.5 * (1 + 0.01 * z()),
            "policy_grad_norm_last": np.abs(z()) + 0.1,
        })
    return _Study(regimes, profile)


def test_slope_table_recovers_planted_rates_and_refutes_a_wrong_one():
    study = _planted()
    rows = rates.slope_rows(study)
    assert {r["axis"] for r in rows} == {"n", "K", "N_pref", "T"}
    for r in rows:
        if r["theory"] is None:
            continue
        half = (r["hi"] - r["lo"]) / 2
        assert 0 < half < 0.1, r
        # the planted slope is the theory's: within 4 bootstrap standard errors (half-width / 1.96)
        assert abs(r["slope"] - r["theory"]) < 4 * half / 1.96, r
    # B1's rollout part is W√(log(4/δ)/2nK), exactly the planted deterministic rate.
    k_row = next(r for r in rows if r["axis"] == "K" and r["quantity"] == "B1 rollout part")
    assert k_row["slope"] == pytest.approx(-0.5, abs=0.02)
    res = study[rates.BASE_NAME]
    s = Spec.from_dict(res.record["spec"])
    want = res["b1_sampling"] / float(bounds.sampling_alpha(s.prompts, s.rollouts, s.delta)) * \
        math.sqrt(math.log(4 / s.delta) / (2 * s.prompts * s.rollouts))
    np.testing.assert_allclose(rates._b1_rollout_part(res, res.ok), want, rtol=1e-12)
    # The theory's slope for the measured sampling error is that of √(1/n + 1/M), flatter than −1/2.
    n_row = next(r for r in rows if r["axis"] == "n" and r["quantity"] == "|sampling error|")
    xs = [x for _, x in rates.sweeps("default")["n"]]
    M = Spec().replace(**rates.BASE).eval_prompts
    lx, ly = np.log(xs), 0.5 * np.log(1 / np.asarray(xs, float) + 1 / M)
    assert n_row["theory"] == pytest.approx(np.polyfit(lx, ly, 1)[0], rel=1e-9) and -0.5 < n_row["theory"] < -0.4
    # A sampling error planted at n^-1 is refuted against the theory's n^-1/2.
    wrong = rates.slope_rows(_planted(sampling_power=-1.0))
    row = next(r for r in wrong if r["axis"] == "n" and r["quantity"] == "|sampling error|")
    assert row["slope"] == pytest.approx(-1.0, abs=0.1) and row["verdict"] == "refuted"


def test_quick_study_fits_only_its_axes():
    rows = rates.slope_rows(_planted("quick", problems=64))
    assert {r["axis"] for r in rows} == {"n", "K"}
    assert all(r["xs"] == tuple(x for _, x in rates.sweeps("quick")[r["axis"]]) for r in rows)
