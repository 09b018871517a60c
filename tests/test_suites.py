"""Suites: every registered suite runs end to end, and what it writes can be trusted and rebuilt.

Each suite runs its ``quick`` grid with 8 problems per regime (a smoke test of the whole path:
engine, store, checks, report, figures; the statistics themselves are tested in
test_catalogue.py and below on constructed numbers). Then: its outputs exist, its summary
has a verdict row for every regime, its figures are valid PNG and PDF files, ``report`` rebuilds
``summary.md`` byte for byte and the same figures, ``config.json`` reruns the same study, and
the tidy export has one row per problem.
"""

from __future__ import annotations

import csv
import json

import matplotlib.image
import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import cli, report, store, suites
from rlhf_bounds.simulate import KERNEL
from rlhf_bounds.spec import SpecError

SMOKE_PROBLEMS = 8
_studies: dict = {}

#: Suites whose smoke run spends more time running than compiling at the tests' LLVM level 0
#: (conftest.py): their kernels compile at level 1 (``engine.xla_options``). Measured alone on the
#: 2-core machine, 8 problems per regime: tightness 66 → 26 s, coverage 62 → 37 s; decomposition
#: (47 → 41 s) and budget (51 → 57 s) gain little or lose, and stay at level 0.
RUN_BOUND = {"tightness", "coverage"}


def smoke(name, tmp_path_factory):
    if name not in _studies:
        out = tmp_path_factory.mktemp(name) / "study"
        with rb.engine.xla_options({"xla_backend_optimization_level": 1} if name in RUN_BOUND else {}):
            _studies[name] = (out, suites.run_suite(name, "quick", problems=SMOKE_PROBLEMS, out=out,
                                                     progress=False, chunk_size=SMOKE_PROBLEMS))
    return _studies[name]


def uses(name):
    """The test reads suite ``name``'s :func:`smoke` run: under ``pytest -n`` it goes to the worker that holds it
    (``--dist loadgroup``; tests/conftest.py groups every other test by module)."""
    return pytest.mark.xdist_group(f"suite-{name}")


#: Every suite, each marked as using its own smoke run.
EVERY_SUITE = [pytest.param(name, marks=uses(name)) for name in suites.SUITES]


def test_every_suite_module_imports():
    """A suite module that fails to import is skipped with a warning (so the others still run); here it fails."""
    assert suites.BROKEN == {}, suites.BROKEN


@pytest.mark.parametrize("name", EVERY_SUITE)
def test_suite_runs_and_writes_its_report(name, tmp_path_factory):
    out, study = smoke(name, tmp_path_factory)
    s = suites.get(name)
    regimes = [r.name for r in s.regimes("quick")]
    assert list(study) == regimes and study.complete
    summary = store.summary_path(out).read_text()
    assert summary.startswith(f"# Suite `{name}`") and s.claim in summary
    rows = report.verdict_rows(rb.load(out))
    assert {r["regime"] for r in rows} == set(regimes), "a verdict row for every regime"
    assert all(r["verdict"] in report.VERDICTS and r["evidence"] for r in rows)
    for r in regimes:
        assert f"| {r} |" in summary
    for fig in s.figures:
        png = store.figures_folder(out) / f"{fig.name}.png"
        pdf = store.figures_folder(out) / f"{fig.name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-", fig.name
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 300, fig.name
        assert image[..., :3].std() > 0.05, f"{fig.name} is blank"
        assert f"figures/{fig.name}.png" in summary


@pytest.mark.parametrize("name", EVERY_SUITE)
def test_report_rebuilds_the_summary_byte_for_byte(name, tmp_path_factory):
    out, _ = smoke(name, tmp_path_factory)
    before = store.summary_path(out).read_bytes()
    figures = sorted(p.name for p in store.figures_folder(out).glob("*")) if store.figures_folder(out).exists() else []
    store.summary_path(out).unlink()
    assert cli.main(["report", str(out)]) == 0
    assert store.summary_path(out).read_bytes() == before
    after = sorted(p.name for p in store.figures_folder(out).glob("*")) if store.figures_folder(out).exists() else []
    assert after == figures


@uses("decomposition")
def test_config_round_trip_reruns_the_same_study(tmp_path_factory, tmp_path):
    out, study = smoke("decomposition", tmp_path_factory)
    config = store.read_config(out)
    assert config["suite"] == "decomposition" and config["profile"] == "quick"
    names = [r["name"] for r in config["regimes"]]
    assert names == list(study)
    clipped = config["regimes"][names.index("clipped")]
    assert clipped["spec"]["tau"] == 0.5 and clipped["problems"] == SMOKE_PROBLEMS and "tau" in clipped["defining"]
    # Rerunning the configuration into the same folder resumes it (nothing recomputed, nothing refused) ...
    assert cli.main(["run", "--config", str(out / "config.json"), "--out", str(out), "--chunk-size",
                     str(SMOKE_PROBLEMS), "--no-progress"]) == 0
    assert all(r.record["computed_problems"] == 0 for r in rb.load(out).regimes.values())
    # ... and an edited configuration is a new study: refused in the old folder.
    clipped["spec"]["tau"] = 0.25
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(config))
    assert cli.main(["run", "--config", str(edited), "--out", str(out), "--no-progress"]) == 2


@uses("ou")
def test_a_suite_with_its_own_kernel_resumes_from_the_command_line(tmp_path_factory):
    """The command line checks the folder with the suite's own kernel (the OU chains here), so rerunning
    the same command resumes instead of refusing the folder as another kernel's."""
    out, _ = smoke("ou", tmp_path_factory)
    assert suites.get("ou").kernel.name != KERNEL.name
    assert cli.main(["run", "ou", "--quick", "--problems", str(SMOKE_PROBLEMS), "--chunk-size", str(SMOKE_PROBLEMS),
                     "--out", str(out), "--no-progress"]) == 0
    assert all(r.record["computed_problems"] == 0 for r in rb.load(out).regimes.values())


def test_set_refuses_a_defining_field_unless_forced():
    with pytest.raises(SpecError, match="defining field tau of regime 'clipped'"):
        suites.suite_regimes("decomposition", "quick", {"tau": 0.2})
    forced = suites.suite_regimes("decomposition", "quick", {"tau": 0.2}, force=True)
    assert all(r.spec.tau == 0.2 for r in forced)
    # A field no regime defines is set everywhere.
    regimes = suites.suite_regimes("decomposition", "quick", suites.parse_set(["delta=0.1", "eval-prompts=512"]))
    assert all(r.spec.delta == 0.1 and r.spec.eval_prompts == 512 for r in regimes)
    with pytest.raises(SpecError, match="unknown spec field"):
        suites.parse_set(["nope=1"])
    with pytest.raises(SpecError, match="beta"):
        suites.parse_set(["beta=-1"])


@uses("decomposition")
def test_export_writes_one_tidy_table(tmp_path_factory, tmp_path):
    out, study = smoke("decomposition", tmp_path_factory)
    target = tmp_path / "all.csv"
    assert cli.main(["export", str(out), "--csv", str(target)]) == 0
    with open(target) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(r) for r in study.regimes.values())
    assert {"regime", "reward_model", "tau", "gap_total", "b1_total"} <= set(rows[0])
    clipped = [r for r in rows if r["regime"] == "clipped"]
    assert len(clipped) == SMOKE_PROBLEMS and all(float(r["tau"]) == 0.5 for r in clipped)
    np.testing.assert_allclose([float(r["gap_total"]) for r in clipped], study["clipped"]["gap_total"], rtol=1e-6)


@uses("single")
def test_one_regime_study_answers_for_its_regime(tmp_path_factory):
    out, study = smoke("single", tmp_path_factory)
    loaded = rb.load(out)
    np.testing.assert_array_equal(loaded["gap_total"], loaded["single"]["gap_total"])
    assert loaded.ok.shape == (SMOKE_PROBLEMS,)


def test_verdicts_say_when_there_are_not_enough_problems():
    """4 problems with no violation: the 95% upper limit is 0.53, far above δ: not 'holds'."""
    assert report.verdict(0, 4, 0.05) == "not enough problems"
    assert report.verdict(0, 100, 0.05) == "holds"          # upper limit 0.0295 ≤ 0.05
    assert report.verdict(12, 100, 0.05) == "refuted"       # lower limit 0.070 > 0.05
    assert report.verdict(6, 100, 0.05) == "not enough problems"
    assert report.verdict(1, 10_000, 0.0, deterministic=True) == "refuted"
    assert report.verdict(0, 10_000, 0.05, vacuous=True) == "vacuous"


def test_valid_shrink_factor_against_a_sorted_reference():
    """c* is the (1 − δ)-quantile of |actual|/bound: for ratios 1/1000 .. 1000/1000 and δ = 0.05 the
    950th smallest; the bound scaled by c* has at most δ violations, and by c*/2 many more."""
    ratio = np.arange(1, 1001) / 1000.0
    rng = np.random.default_rng(0)
    bound = rng.uniform(0.5, 2.0, 1000)
    actual = rng.permutation(ratio) * bound
    order = np.argsort(actual / bound)
    cstar, lo, hi = report.valid_shrink_factor(actual[order], bound[order], 0.05)
    assert cstar == pytest.approx(0.951, abs=1e-9) and lo <= cstar <= hi
    assert np.mean(actual > cstar * bound) <= 0.05 < np.mean(actual > 0.5 * cstar * bound)


def test_the_time_estimate_counts_a_kernels_own_work():
    """The OU chains' work is chains × T × b × A × d per problem on top of Newton and the default finishing
    stage: the estimate the command line prints for the suite must include it (without it, the quick
    profile, about a minute here, was announced as 14 s)."""
    from rlhf_bounds.suites import _framework

    regimes = suites.suite_regimes("ou", "quick")
    kernel = suites.get("ou").kernel
    chain_units = sum(r.problems * kernel.chains * r.spec.steps * r.spec.batch * r.spec.actions * r.spec.d
                      for r in regimes)
    extra = suites.estimate_seconds(regimes, kernel) - suites.estimate_seconds(regimes)
    assert extra >= chain_units * _framework.SECONDS_PER_UNIT > 0
