"""The command line: every user mistake is one line on stderr, exit code 2, no traceback, nothing run.

Most cases run in-process through :func:`rlhf_bounds.cli.main` with the study
runner replaced by one that fails the test, which proves the error comes
before anything is compiled or simulated. A handful run as real subprocesses
(in parallel) to prove the exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_bounds import cli, suites
from rlhf_bounds.engine import run_identity
from rlhf_bounds.spec import Spec

#: Small, valid options; every case adds one mistake to them.
BASE = ["--suite", "single", "--d", "2", "--actions", "2", "--prompts", "4", "--rollouts", "2", "--steps", "2",
        "--record-every", "1", "--eval-prompts", "4", "--pref-pairs", "4"]


@pytest.fixture
def no_run(monkeypatch):
    """Replace the study runner: reaching it means validation let a mistake through."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started: a mistake passed validation")
    monkeypatch.setattr(suites, "run_study", refuse)


def call(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse errors
        return stop.code


def one_line_error(capsys, argv: list[str]) -> str:
    rc = call(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, (argv, rc, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rlhf-bounds: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


# (what, extra options, substrings the message must contain: the field, the value, the allowed range)
SPEC_MISTAKES = [
    ("beta zero", ["--beta", "0"], ["beta=0", "(0, inf)"]),
    ("beta negative", ["--beta", "-1"], ["beta=-1", "(0, inf)"]),
    ("beta nan", ["--beta", "nan"], ["beta=nan", "(0, inf)"]),
    ("beta infinite", ["--beta", "inf"], ["beta=inf", "finite"]),
    ("beta below float32", ["--beta", "1e-320"], ["beta=1e-320", "float32"]),
    ("beta not a number", ["--beta", "abc"], ["--beta", "'abc'", "not a number", "(0, inf)"]),
    ("beta empty", ["--beta", ""], ["--beta", "not a number"]),
    ("prompts zero", ["--prompts", "0"], ["prompts=0", "[1, inf)"]),
    ("rollouts negative", ["--rollouts", "-3"], ["rollouts=-3", "[1, inf)"]),
    ("pref_pairs zero", ["--pref-pairs", "0"], ["pref_pairs=0", "[1, inf)"]),
    ("eval_prompts zero", ["--eval-prompts", "0"], ["eval_prompts=0", "[1, inf)"]),
    ("steps zero", ["--steps", "0"], ["steps=0", "[1, inf)"]),
    ("batch zero", ["--batch", "0"], ["batch=0", "[1, inf)"]),
    ("newton_steps zero", ["--newton-steps", "0"], ["newton_steps=0", "[1, inf)"]),
    ("d zero", ["--d", "0"], ["d=0", "[1, inf)"]),
    ("d fractional", ["--d", "1.5"], ["--d", "'1.5'", "whole number", "[1, inf)"]),
    ("actions zero", ["--actions", "0"], ["actions=0", "[1, inf)"]),
    ("delta zero", ["--delta", "0"], ["delta=0", "(0, 1)"]),
    ("delta one", ["--delta", "1"], ["delta=1", "(0, 1)"]),
    ("delta above one", ["--delta", "1.5"], ["delta=1.5", "(0, 1)"]),
    ("tau negative", ["--tau", "-1"], ["tau=-1", "[0, inf]"]),
    ("tau minus infinity", ["--tau", "-inf"], ["tau=-inf", "[0, inf]"]),
    ("lowrank rank above d", ["--feature-law", "lowrank", "--rank", "5"], ["rank=5", "d=2"]),
    ("unknown feature law", ["--feature-law", "cube"], ["feature_law='cube'", "sphere"]),
    ("unknown learner", ["--learner", "adam"], ["learner='adam'", "SGD"]),
    ("unknown estimator", ["--estimator", "ppo"], ["estimator='ppo'", "rloo"]),
    ("unknown reward model", ["--reward-model", "dpo"], ["reward_model='dpo'", "oracle"]),
    ("record_every not dividing steps", ["--steps", "5", "--record-every", "2"], ["record_every=2", "steps=5"]),
    ("rloo with one rollout", ["--rollouts", "1"], ["rollouts=1", "rloo", "≥ 2"]),
    ("mix_eps above one", ["--mix-eps", "2"], ["mix_eps=2", "[0, 1]"]),
    ("shared_weight negative", ["--shared-weight", "-0.5"], ["shared_weight=-0.5", "[0, 1]"]),
    ("condition below one", ["--condition", "0.5"], ["condition=0.5", "[1, inf)"]),
    ("lr zero", ["--lr", "0"], ["lr=0", "(0, inf)"]),
    ("lr beyond float32", ["--lr", "1e39"], ["lr=1e+39", "float32"]),
    ("ridge negative", ["--ridge", "-1"], ["ridge=-1", "(0, inf)"]),
    ("sigma_xi negative", ["--sigma-xi", "-1e-3"], ["sigma_xi=-0.001", "[0, inf)"]),
    ("reward_norm zero", ["--reward-norm", "0"], ["reward_norm=0", "(0, inf)"]),
    ("feature_bound nan", ["--feature-bound", "nan"], ["feature_bound=nan", "(0, inf)"]),
    ("shift -inf", ["--shift", "-inf"], ["shift=-inf", "finite"]),
]

RUN_MISTAKES = [
    ("unknown suite", ["--suite", "nope"], ["suite='nope'", "decomposition"]),
    ("problems zero", ["--problems", "0"], ["problems=0", "≥ 1"]),
    ("problems not a number", ["--problems", "many"], ["--problems", "'many'", "≥ 1"]),
    ("seed negative", ["--seed", "-1"], ["seed=-1", "[0, 2^32)"]),
    ("seed too large", ["--seed", str(2**32)], [f"seed={2**32}", "[0, 2^32)"]),
    ("chunk size zero", ["--chunk-size", "0"], ["chunk_size=0", "≥ 1"]),
    ("chunk size fractional", ["--chunk-size", "1.5"], ["--chunk-size", "'1.5'", "whole number"]),
    ("unknown option", ["--frobnicate", "1"], ["unrecognized arguments", "--frobnicate"]),
    ("empty output folder name", ["--out", ""], ["out=''"]),
]


@pytest.mark.parametrize("what, extra, expected", SPEC_MISTAKES + RUN_MISTAKES, ids=lambda x: x if
                         isinstance(x, str) else "")
def test_each_mistake_is_one_clean_line(capsys, no_run, tmp_path, what, extra, expected):
    line = one_line_error(capsys, ["run", *BASE, "--out", str(tmp_path / "out"), *extra])
    for text in expected:
        assert text in line, (what, line)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_output_folder_mistakes(capsys, no_run, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    line = one_line_error(capsys, ["run", *BASE, "--out", str(a_file)])
    assert f"out={a_file} is a file" in line
    line = one_line_error(capsys, ["run", *BASE, "--out", str(a_file / "sub")])
    assert f"out={a_file / 'sub'} is not writable" in line
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_line_error(capsys, ["run", *BASE, "--out", str(locked / "sub")])
        assert "is not writable" in line


def test_folder_of_another_run_or_study_is_refused_before_running(capsys, no_run, tmp_path):
    out = tmp_path / "study"
    spec = Spec().replace(d=2, actions=2, prompts=4, rollouts=2, steps=2, record_every=1, eval_prompts=4,
                          pref_pairs=4)
    # The regime folder holds a run of another β: refused, naming the field and both values.
    identity, _ = run_identity(spec.replace(beta=0.25), 8, 0, None)
    (out / "single").mkdir(parents=True)
    (out / "single" / "record.json").write_text(json.dumps(identity))
    line = one_line_error(capsys, ["run", *BASE, "--problems", "8", "--out", str(out)])
    assert "holds a run with a different spec" in line and "beta=0.25 there, 0.5 now" in line
    assert "--overwrite" in line

    # The study record says another problem count: refused before any regime is looked at.
    (out / "study.json").write_text(json.dumps({"suite": "single", "regimes": ["single"], "problems": 16,
                                                "seed": 0}))
    line = one_line_error(capsys, ["run", *BASE, "--problems", "8", "--out", str(out)])
    assert "holds a study with a different problems (16 there, 8 now)" in line

    # A damaged study record.
    (out / "study.json").write_text("{not json")
    line = one_line_error(capsys, ["run", *BASE, "--problems", "8", "--out", str(out)])
    assert "study.json" in line and "damaged" in line

    # A folder holding a single run saved by the Python API is not a study.
    single = tmp_path / "single-run"
    single.mkdir()
    (single / "record.json").write_text(json.dumps(identity))
    line = one_line_error(capsys, ["run", *BASE, "--out", str(single)])
    assert "holds a single run" in line


def _write_chunk(path: Path, problems: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, problem=problems, status=np.zeros(len(problems), np.int32),
                 gap_total=np.zeros(len(problems), np.float32))


def test_report_of_a_path_without_results(capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    run_no_chunks = tmp_path / "run-no-chunks"
    (run_no_chunks / "chunks").mkdir(parents=True)
    (run_no_chunks / "record.json").write_text(json.dumps({"spec": {}, "problems": 4}))
    study_empty = tmp_path / "study-empty"
    (study_empty / "a").mkdir(parents=True)
    (study_empty / "study.json").write_text(json.dumps({"suite": "single", "regimes": ["a"]}))
    bad_record = tmp_path / "bad-record"
    _write_chunk(bad_record / "chunks" / "chunk-000000.npz", np.arange(2))
    (bad_record / "record.json").write_text("{\"spec\": ")
    bad_chunk = tmp_path / "bad-chunk"
    (bad_chunk / "chunks").mkdir(parents=True)
    (bad_chunk / "chunks" / "chunk-000000.npz").write_bytes(b"PK\x03\x04 truncated")
    (bad_chunk / "record.json").write_text(json.dumps({"spec": Spec().to_dict(), "problems": 4}))
    no_spec = tmp_path / "no-spec"
    _write_chunk(no_spec / "chunks" / "chunk-000000.npz", np.arange(2))
    (no_spec / "record.json").write_text(json.dumps({"problems": 2}))

    cases = {
        tmp_path / "missing": "does not exist",
        a_file: "is a file",
        tmp_path / "empty": "holds neither study.json nor record.json",
        run_no_chunks: "holds no finished chunks",
        study_empty: "regimes hold no finished chunks",
        bad_record: "record.json: the run record is damaged",
        bad_chunk: "chunk-000000.npz: the chunk file cannot be read (truncated, or not a chunk file",
        no_spec: "the run record is damaged (it holds no spec)",
    }
    for path, expected in cases.items():
        line = one_line_error(capsys, ["report", str(path)])
        assert expected in line, (path, line)


def test_report_prints_saved_results(capsys, tmp_path):
    run_dir = tmp_path / "study" / "single"
    _write_chunk(run_dir / "chunks" / "chunk-000000.npz", np.arange(3))
    (run_dir / "chunks" / "chunk-000001.tmp.npz").write_bytes(b"half-written")  # ignored
    record = {"spec": Spec().to_dict(), "seed": 0, "problems": 3, "chunk_size": 2, "status": "complete"}
    (run_dir / "record.json").write_text(json.dumps(record))
    (tmp_path / "study" / "study.json").write_text(json.dumps({"suite": "single", "regimes": ["single"]}))
    assert call(["report", str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "gap_total" in out and "single" in out


def test_negative_values_and_infinity_are_accepted(monkeypatch, capsys, tmp_path):
    seen = {}

    def capture(regimes, *args, **kwargs):
        seen["spec"] = regimes[0].spec
        raise KeyboardInterrupt  # stop here; also checks the interrupt message

    monkeypatch.setattr(suites, "run_study", capture)
    rc = call(["run", *BASE, "--shift", "-1e-3", "--tau", "inf", "--mu-noise", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert seen["spec"].shift == -1e-3 and seen["spec"].tau == float("inf")
    assert rc == 130
    assert "interrupted; finished chunks are saved, run the same command to resume" in err
    assert "Traceback" not in err


def test_help_lists_every_spec_field_with_its_range(capsys):
    assert call(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for name, f in Spec.__dataclass_fields__.items():
        assert f.metadata["cli"] in text, name
    assert "allowed (0, inf)" in text


def test_real_processes_exit_2_without_traceback(tmp_path):
    """A few mistakes through the real entry point, in parallel: exit 2, one line, no traceback."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ["run", *BASE, "--beta", "0", "--out", str(tmp_path / "a")],
        ["run", *BASE, "--prompts", "abc", "--out", str(tmp_path / "b")],
        ["run", *BASE, "--out", str(a_file / "sub")],
        ["report", str(tmp_path / "nothing-here")],
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "rlhf_bounds.cli", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for argv in cases]
    for argv, proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, err)
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rlhf-bounds: error: "), err
        assert out == ""
