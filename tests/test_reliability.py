"""Reliability: status flags at numerical extremes, determinism, and runs that survive interruption.

All in-process runs use one static spec (:data:`TINY`) and one chunk size, so
they share a single compiled kernel; the extremes below change traced fields
only. The kill-and-resume test runs the real command line in subprocesses
with a persistent compilation cache, so the rerun does not compile again.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_bounds as rb
from rlhf_bounds import status as st
from rlhf_bounds.engine import RunError

#: The tiny static spec of every in-process run here, as command-line options and as a Spec.
TINY_ARGS = ["--d", "3", "--actions", "3", "--prompts", "16", "--rollouts", "2", "--pref-pairs", "32",
             "--eval-prompts", "32", "--steps", "4", "--record-every", "2", "--batch", "4",
             "--feature-law", "anisotropic"]
TINY = rb.Spec(d=3, actions=3, prompts=16, rollouts=2, pref_pairs=32, eval_prompts=32, steps=4, record_every=2,
               batch=4, feature_law="anisotropic")
CHUNK = 1  # one chunk size everywhere: one compilation

#: The simulation results that must stay finite at every benign extreme (docs/theory.md §14, §1).
CORE = ("J_hat", "J_star", "gap_total", "gap_sampling", "gap_reward_shift", "gap_clipping", "gap_total_train",
        "kl", "tail_excess", "log1p_chi2", "l2_train", "theta_hat_norm", "w_norm")


def bits_equal(a: rb.Results, b: rb.Results) -> None:
    """Every per-problem column and array of ``a`` and ``b`` is bit-identical."""
    names_a = set(a.columns) | set(a.arrays)
    assert names_a == set(b.columns) | set(b.arrays)
    for name in sorted(names_a):
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


def assert_nothing_silent(res: rb.Results) -> None:
    """No NaN or inf in a problem whose status is 0 (the columns the status rule requires finite)."""
    ok = res.ok
    for name in set(res.columns) | set(res.arrays):
        v = np.asarray(res[name])
        if v.dtype.kind != "f":
            continue
        bad = ~np.isfinite(v).reshape(len(v), -1).all(axis=1)
        if not st.must_be_finite(name):
            bad = np.isnan(v).reshape(len(v), -1).any(axis=1)
        assert not np.any(bad & ok), f"{name}: non-finite in {int(np.sum(bad & ok))} unflagged problem(s)"


# ---- status flags (no compilation) ------------------------------------------------------------
def _out(**overrides):
    base = {"gap_total": jnp.float32(0.1), "chi2": jnp.float32(0.5), "w_last": jnp.ones(3, jnp.float32),
            "w_norm": jnp.float32(1.0), "reward_fit_grad_norm": jnp.float32(0.0), "tau": jnp.inf,
            "b1_total": jnp.inf, "b7_radius": jnp.float32(2.0)}
    return {**base, **overrides}


def test_status_rule_exempts_bounds_and_parameters_but_never_nan():
    spec = rb.Spec()
    assert int(st.status_code(spec, _out())) == st.STATUS_OK  # b1_total = +inf and tau = inf are allowed
    assert st.status_names(st.status_code(spec, _out(b1_total=jnp.nan))) == ["bound_nan"]
    assert st.status_names(st.status_code(spec, _out(gap_total=jnp.inf))) == ["nonfinite"]
    assert st.status_names(st.status_code(spec, _out(chi2=jnp.inf))) == ["chi2_overflow"]
    assert st.status_names(st.status_code(spec, _out(chi2=jnp.nan))) == ["nonfinite"]
    assert st.status_names(st.status_code(spec, _out(tau=jnp.nan))) == ["nonfinite"]
    assert set(st.status_names(st.status_code(spec, _out(w_last=jnp.array([1.0, jnp.inf, 0.0]))))) == {
        "nonfinite", "policy_overflow"}
    assert st.status_names(st.status_code(spec, _out(reward_fit_grad_norm=jnp.nan))) == ["nonfinite", "reward_fit"]
    assert st.status_names(st.status_code(spec, _out(reward_fit_grad_norm=jnp.float32(1e9)))) == ["reward_fit"]
    assert int(st.status_code(spec.replace(reward_model="oracle"), _out(reward_fit_grad_norm=jnp.float32(1e9)))) == 0


def test_status_rule_is_explicit_and_replaceable():
    spec = rb.Spec(reward_model="oracle")
    out = _out(extra=jnp.inf)
    assert st.status_names(st.status_code(spec, out)) == ["nonfinite"]
    # A predicate, or the collection of names that must be finite.
    assert int(st.status_code(spec, out, finite=lambda name: st.must_be_finite(name) and name != "extra")) == 0
    assert int(st.status_code(spec, out, finite=["gap_total", "w_norm"])) == 0
    assert st.status_names(st.status_code(spec, out, finite=["extra"])) == ["nonfinite"]
    assert not st.must_be_finite("b4_k_star") and not st.must_be_finite("tau")
    assert st.must_be_finite("gap_total") and st.must_be_finite("b5_cov_error")
    assert st.flag_counts(np.array([0, 1, 5, 4])) == {"nonfinite": 2, "chi2_overflow": 2}


# ---- numerical extremes (one compiled kernel, traced fields only) ------------------------------
BENIGN = {
    "tiny beta": dict(beta=1e-4),
    "tiny beta, near-deterministic policy": dict(beta=1e-4, lr=100.0, reward_norm=5.0),
    "large D*C": dict(reward_norm=50.0, feature_bound=10.0),
    "large D*C, tau 1": dict(reward_norm=50.0, feature_bound=10.0, tau=1.0),
    "tau zero": dict(tau=0.0),
    "tau infinite": dict(tau=math.inf),
    "tau zero, tiny beta, large D*C": dict(tau=0.0, beta=1e-4, reward_norm=50.0, feature_bound=10.0),
    "condition 1e6": dict(condition=1e6),
    "mix_eps 0, mild shift": dict(mix_eps=0.0, shift=0.5),
}


@pytest.mark.parametrize("changes", list(BENIGN.values()), ids=list(BENIGN))
def test_benign_extremes_stay_finite(changes):
    res = rb.run(TINY.replace(**changes), 8, seed=11, chunk_size=CHUNK, progress=False)
    assert_nothing_silent(res)
    for name in CORE:
        assert np.all(np.isfinite(res[name])), name
    assert np.all(res["kl"] >= -1e-4)
    assert np.all(~(res["status"] & (st.STATUS_CHI2_OVERFLOW | st.STATUS_POLICY_OVERFLOW)))


def test_lowrank_features_at_the_extremes():
    """Coverage fails on purpose (features in a k = 1 subspace): a second compilation, so one run only."""
    spec = TINY.replace(feature_law="lowrank", rank=1, beta=1e-4, reward_norm=50.0, feature_bound=10.0, tau=0.0)
    res = rb.run(spec, 4, seed=11, chunk_size=4, progress=False)
    assert_nothing_silent(res)
    for name in CORE:
        assert np.all(np.isfinite(res[name])), name


def test_tiny_behaviour_probabilities_flag_chi2_overflow_and_keep_its_log():
    # μ = π_{w_μ} with w_μ = 50·θ*/β and no uniform mixing: μ(a|x) ≈ e^{-hundreds} where π_w is not small.
    res = rb.run(TINY.replace(mix_eps=0.0, shift=-50.0), 8, seed=11, chunk_size=CHUNK, progress=False)
    assert_nothing_silent(res)
    overflow = np.isposinf(res["chi2"])
    assert np.mean(overflow) >= 0.5
    np.testing.assert_array_equal(res["status"] & st.STATUS_CHI2_OVERFLOW != 0, overflow)
    assert np.all(np.isfinite(res["log1p_chi2"]))
    # Some prompt's 1 + χ²_x passed float32's 3.4e38 = e^88.7, so their mean is above e^88.7 / M.
    assert np.all(res["log1p_chi2"][overflow] > 88.7 - math.log(TINY.eval_prompts))
    for name in ("gap_total", "J_star", "kl"):
        assert np.all(np.isfinite(res[name]))


def test_chi2_and_its_log_agree_where_both_are_finite():
    res = rb.run(TINY.replace(shift=-1.0), 8, seed=11, chunk_size=CHUNK, progress=False)
    np.testing.assert_allclose(np.log1p(res["chi2"].astype(np.float64)), res["log1p_chi2"], rtol=1e-4, atol=1e-5)


def test_diverging_learner_is_flagged_as_policy_overflow():
    res = rb.run(TINY.replace(lr=1e30), 8, seed=11, chunk_size=CHUNK, progress=False)
    assert_nothing_silent(res)
    assert np.all(res["status"] & st.STATUS_POLICY_OVERFLOW)
    res = rb.run(TINY.replace(beta=1e30), 8, seed=11, chunk_size=CHUNK, progress=False)  # η·β·C² ≫ 2
    assert_nothing_silent(res)
    assert np.all(res["status"] != 0)


# ---- determinism and resumption -----------------------------------------------------------------
def test_same_call_twice_is_bit_identical(tmp_path):
    first = rb.run(TINY, 6, seed=5, chunk_size=CHUNK, progress=False)
    second = rb.run(TINY, 6, seed=5, chunk_size=CHUNK, progress=False)
    saved = rb.run(TINY, 6, seed=5, chunk_size=CHUNK, progress=False, out=tmp_path / "run")
    bits_equal(first, second)
    bits_equal(first, rb.load(tmp_path / "run"))
    bits_equal(first, saved)
    other = rb.run(TINY, 6, seed=6, chunk_size=CHUNK, progress=False)
    assert not np.array_equal(first["gap_total"], other["gap_total"])


def test_resume_skips_finished_chunks_and_repairs_damage(tmp_path, capsys):
    out = tmp_path / "run"
    full = rb.run(TINY, 6, seed=5, chunk_size=CHUNK, progress=False, out=out)
    chunks = out / "chunks"
    (chunks / "chunk-000001.npz").unlink()                        # never finished
    (chunks / "chunk-000004.npz").write_bytes(b"PK\x03\x04 torn")  # damaged (a disk, not this engine)
    (chunks / "chunk-000001.tmp.npz").write_bytes(b"half-written")  # left by a killed writer
    capsys.readouterr()
    again = rb.run(TINY, 6, seed=5, chunk_size=CHUNK, progress=True, out=out)
    err = capsys.readouterr().err
    assert f"resuming from {out}: 4 of 6 chunks already finished, skipping them" in err
    assert again.record["resumed_chunks"] == 4
    assert not list(chunks.glob("*.tmp*"))
    bits_equal(full, again)
    bits_equal(full, rb.load(out))


def test_resume_refuses_chunks_of_another_simulator_version(tmp_path):
    out = tmp_path / "run"
    rb.run(TINY, 3, seed=5, chunk_size=CHUNK, progress=False, out=out)
    first = out / "chunks" / "chunk-000000.npz"
    with np.load(first) as z:
        data = {k: z[k] for k in z.files}
    with open(first, "wb") as fh:
        np.savez(fh, retired_column=data["status"], **data)
    (out / "chunks" / "chunk-000002.npz").unlink()
    with pytest.raises(RunError, match="another version of the simulator.*retired_column"):
        rb.run(TINY, 3, seed=5, chunk_size=CHUNK, progress=False, out=out)


def test_folder_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    rb.run(TINY, 4, seed=5, chunk_size=CHUNK, progress=False, out=out)
    with pytest.raises(RunError, match=r"different spec \(beta=0\.5 there, 0\.25 now\).*--overwrite"):
        rb.run(TINY.replace(beta=0.25), 4, seed=5, chunk_size=CHUNK, progress=False, out=out)
    with pytest.raises(RunError, match=r"different seed \(5 there, 6 now\)"):
        rb.run(TINY, 4, seed=6, chunk_size=CHUNK, progress=False, out=out)
    with pytest.raises(RunError, match=r"different problems \(4 there, 5 now\)"):
        rb.run(TINY, 5, seed=5, chunk_size=CHUNK, progress=False, out=out)
    with pytest.raises(RunError, match=r"different chunk_size \(1 there, 2 now\)"):
        rb.run(TINY, 4, seed=5, chunk_size=2, progress=False, out=out)
    (out / "record.json").write_text("{torn")
    with pytest.raises(RunError, match="unreadable record.json"):
        rb.run(TINY, 4, seed=5, chunk_size=CHUNK, progress=False, out=out)


def test_run_options_are_checked_before_compiling():
    for kwargs, text in [(dict(problems=0), "problems=0"), (dict(problems=4, seed=-1), "seed=-1"),
                         (dict(problems=4, chunk_size=0), "chunk_size=0"), (dict(problems=2.5), "problems=2.5"),
                         (dict(problems=True), "problems=True")]:
        with pytest.raises(rb.SpecError, match=re.escape(text)):
            rb.run(TINY, progress=False, **kwargs)


def test_killed_command_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real ``rlhf-bounds run`` after its first chunk file appears; rerun; compare bit for bit."""
    problems, seed = 48, 7
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "rlhf_bounds.cli", "run", "--suite", "single", *TINY_ARGS,
            "--problems", str(problems), "--seed", str(seed), "--chunk-size", str(CHUNK), "--out", str(out)]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "PYTHONWARNINGS": "ignore"}
    chunks = out / "single" / "chunks"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    seen = {}

    def kill_after_first_chunk():
        deadline = time.monotonic() + 400
        while first.poll() is None and time.monotonic() < deadline:
            if chunks.is_dir() and any(chunks.glob("chunk-??????.npz")):
                first.send_signal(signal.SIGKILL)
                seen["killed"] = True
                return
            time.sleep(0.001)

    killer = threading.Thread(target=kill_after_first_chunk)
    killer.start()
    reference = rb.run(TINY, problems, seed=seed, chunk_size=CHUNK, progress=False)  # meanwhile, in-process
    killer.join()
    first.wait(timeout=60)
    log.close()
    assert seen.get("killed") and first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    finished = len(list(chunks.glob("chunk-??????.npz")))
    assert 1 <= finished < problems, f"{finished} chunks at the kill: it did not stop mid-way"
    print(f"killed after {finished} of {problems} chunks")
    # A torn temporary file of the next chunk, as a kill during a write leaves it.
    (chunks / f"chunk-{finished:06d}.tmp.npz").write_bytes(b"PK\x03\x04 torn")

    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=400)
    assert second.returncode == 0, second.stderr
    assert (f"resuming from {out / 'single'}: {finished} of {problems} chunks already finished, skipping them"
            in second.stderr), second.stderr
    resumed = rb.load(out)["single"]
    assert resumed.record["resumed_chunks"] == finished and resumed.complete
    assert not list(chunks.glob("*.tmp*"))
    bits_equal(reference, resumed)
