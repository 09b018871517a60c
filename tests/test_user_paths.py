"""A new user's paths through the command line: partial results are never silent, a custom run gets a
folder of its own that names what it changed, and the README's Python block works on what its quick
start wrote."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import cli, store
from rlhf_bounds.results import PartialResultsWarning

ROOT = Path(__file__).resolve().parents[1]
#: A small single-regime study (one compilation, shared by the tests of this file).
TINY = ["--d", "4", "--actions", "4", "--prompts", "32", "--eval-prompts", "128", "--steps", "20", "--record-every",
        "10", "--pref-pairs", "32", "--posterior-draws", "4", "--batch", "8", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("user") / "study"
    assert cli.main(["run", "single", "--problems", "12", "--chunk-size", "4", "--out", str(out), *TINY]) == 0
    return out


def test_partial_study_is_reported_as_partial(finished, tmp_path, capsys):
    """An interrupted study (a chunk missing; a regime not started) loads with a warning and complete = False,
    and `report` refuses it (exit 3) naming what is missing, unless --partial."""
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    sorted(store.chunk_files(partial / "single").values())[-1].unlink()
    with pytest.warns(PartialResultsWarning, match="8 of 12 problems"):
        study = rb.load(partial)
    assert not study.complete and study.missing == ["single: 8 of 12 problems"]
    capsys.readouterr()
    assert cli.main(["report", str(partial)]) == cli.EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "partial" in err and "8 of 12 problems" in err and "--partial" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["report", str(partial), "--partial"]) == 0
    assert "Partial results" in store.summary_path(partial).read_text()
    # A finished study is complete and silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialResultsWarning)
        assert rb.load(finished).complete


def test_partial_single_run_warns(tmp_path):
    spec = rb.Spec(d=4, actions=4, prompts=32, eval_prompts=128, steps=20, record_every=10, pref_pairs=32,
                   posterior_draws=4, batch=8)
    out = tmp_path / "run"
    rb.run(spec, 12, seed=0, chunk_size=4, out=out, progress=False)
    sorted(store.chunk_files(out).values())[0].unlink()
    with pytest.warns(PartialResultsWarning, match="8 of 12 problems"):
        res = rb.load(out)
    assert not res.complete and res.missing == "8 of 12 problems"


def test_default_folder_names_what_differs(monkeypatch, tmp_path):
    """A custom run never collides with the default one: its folder names the suite, profile, seed and overrides."""
    seen = {}

    def capture(name, profile, **kwargs):
        seen["out"] = Path(kwargs["out"])
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rb.suites, "run_suite", capture)
    cli.main(["run", "single", "--problems", "256", "--beta", "0.1", "--feature-law", "anisotropic"])
    assert seen["out"] == Path("runs/single-seed0-beta=0.1-feature_law=anisotropic-problems=256")
    cli.main(["run", "--quick"])
    assert seen["out"] == Path("runs/decomposition-quick-seed0")
    cli.main(["run", "coverage", "--set", "delta=0.1", "--seed", "3"])
    assert seen["out"] == Path("runs/coverage-seed3-delta=0.1")


def test_header_names_every_override(monkeypatch, capsys):
    monkeypatch.setattr(rb.suites, "run_suite", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    cli.main(["run", "single", "--beta", "0.2", "--set", "delta=0.1", "--out", "/tmp/never-written"])
    out = capsys.readouterr().out
    assert "overrides (every regime): beta=0.2, delta=0.1" in out


def test_readme_python_block_runs_on_what_the_quick_start_wrote(finished, monkeypatch, tmp_path):
    """The README's loading example, run as written against a study folder like the quick start's."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Loading results\n.*?```python\n(.*?)```", text, re.S)
    assert block, "README has a 'Loading results' section with a python block"
    code = block.group(1)
    assert "runs/decomposition-seed0" in code
    # The quick start's folder, with this file's study standing in for it (same layout, one regime).
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "runs" / "decomposition-seed0"
    shutil.copytree(finished, target)
    regime = next(iter(rb.load(target)))
    namespace: dict = {}
    exec(compile(code.replace('"clipped"', repr(regime)), "README.md", "exec"), namespace)
    assert isinstance(namespace["study"], rb.StudyResults)
    assert np.isfinite(namespace["gaps"]).all()
