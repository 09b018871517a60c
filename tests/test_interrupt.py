"""Ctrl-C at any moment of a real ``rlhf-bounds run`` exits with code 130 and one message, and the folder resumes.

SIGINT is sent to real subprocesses at three kinds of moments: while the default kernel compiles
(each try with an empty compilation cache, so that it really compiles, at a random point of it), in
the middle of a run, and right after a chunk file appears. Every try must exit with exactly 130
after the one-line message. Before the fix, an interrupt during compilation ended in a segfault of
the interpreter's teardown while XLA's threads still ran (exit 139, "segfault at address 0"), or
was swallowed by JAX so that the run went on. The mid-run tries resume each other's folder, and a
last run of the same command completes it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import rlhf_bounds as rb

TINY_ARGS = ["--d", "3", "--actions", "3", "--prompts", "16", "--rollouts", "2", "--pref-pairs", "32",
             "--eval-prompts", "32", "--steps", "4", "--record-every", "2", "--batch", "4",
             "--feature-law", "anisotropic"]
PROBLEMS, SEED = 40, 3
MESSAGE = "rlhf-bounds: interrupted; finished chunks are saved, run the same command to resume"


def _default_sigint():
    """In the child before exec: SIGINT to its default disposition. A shell that starts a job in the
    background (``cmd &``, as CI harnesses and nohup runs do) ignores SIGINT for it, that disposition is
    inherited through exec, and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A running ``rlhf-bounds run`` whose stderr is read line by line as it comes."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=_default_sigint)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, ready, timeout=300.0, poll=0.0005) -> bool:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if ready():
                return True
            time.sleep(poll)
        return False

    def finish(self, timeout=300.0) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc, "".join(self.lines)


def check_interrupted(what: str, rc: int, err: str) -> None:
    assert rc == 130, f"{what}: exit {rc}, not 130:\n{err}"
    assert err.rstrip().endswith(MESSAGE) and err.count(MESSAGE) == 1, f"{what}:\n{err}"
    assert "Traceback" not in err, f"{what}:\n{err}"


def test_ctrl_c_while_the_default_kernel_compiles_exits_130(tmp_path):
    """The default spec's kernel compiles for seconds: SIGINT at random moments of it, each try with an
    empty compilation cache. Before the fix a try ended in a segfault (-11) or, when JAX swallowed
    the KeyboardInterrupt, ran on to the end (exit 0), in about half the tries."""
    rng = random.Random(7)
    outcomes = []
    for i in range(3):
        out = tmp_path / f"run-{i}"
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"cache-{i}")}
        child = Child([sys.executable, "-m", "rlhf_bounds.cli", "run", "--suite", "single", "--problems", "64",
                       "--out", str(out)], env)
        reached = child.wait_for(lambda: any("compiling the kernel" in line for line in child.lines))
        delay = rng.uniform(0.0, 3.0)
        time.sleep(delay)
        child.proc.send_signal(signal.SIGINT)
        rc, err = child.finish()
        outcomes.append((round(delay, 2), rc))
        assert reached, f"the compile notice never came (rc {rc}):\n{err}"
        check_interrupted(f"{delay:.2f} s into compiling", rc, err)
        assert not list(out.rglob("chunk-*.npz"))
    print("interrupts while compiling (delay, exit):", outcomes)


def test_ctrl_c_mid_run_exits_130_and_the_folder_resumes(tmp_path):
    out = tmp_path / "run"
    chunks = out / "single" / "chunks"
    argv = [sys.executable, "-m", "rlhf_bounds.cli", "run", "--suite", "single", *TINY_ARGS,
            "--problems", str(PROBLEMS), "--seed", str(SEED), "--chunk-size", "1", "--out", str(out)]
    base_env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    shared_cache = {**base_env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    count = lambda: len(list(chunks.glob("chunk-??????.npz"))) if chunks.is_dir() else 0
    rng = random.Random(0)

    def compiling(child):
        return lambda: any("compiling the kernel" in line for line in child.lines)

    def mid_run(child):
        target = count() + 5
        def ready():
            if count() >= target:
                time.sleep(rng.uniform(0.0, 0.003))  # inside a chunk's computation or its write
                return True
            return False
        return ready

    def after_a_chunk(child):
        target = count() + 1
        return lambda: count() >= target

    moments = [("compiling", compiling), ("mid-run", mid_run), ("after a chunk", after_a_chunk),
               ("mid-run", mid_run), ("after a chunk", after_a_chunk)]
    outcomes = []
    for what, moment in moments:
        env = {**base_env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "fresh")} if what == "compiling" else shared_cache
        before, t0 = count(), time.monotonic()
        child = Child(argv, env)
        reached = child.wait_for(moment(child))
        if reached:
            child.proc.send_signal(signal.SIGINT)
        rc, err = child.finish()
        outcomes.append((what, rc, before, count(), round(time.monotonic() - t0, 1)))
        assert reached, f"{what}: the moment never came (rc {rc}):\n{err}"
        check_interrupted(what, rc, err)
        assert count() < PROBLEMS, f"{what}: the run finished before the interrupt"
    print("interrupts (moment, exit, chunks before, after, seconds):", outcomes)

    t0 = time.monotonic()
    final = subprocess.run(argv, capture_output=True, text=True, env=shared_cache, timeout=300)
    print(f"final run: {time.monotonic() - t0:.1f} s")
    assert final.returncode == 0, final.stderr
    assert "chunks already finished, skipping them" in final.stderr, final.stderr
    resumed = rb.load(out)["single"]
    assert resumed.complete and resumed.record["resumed_chunks"] == outcomes[-1][3]
    assert not list(chunks.glob("*.tmp*"))
    np.testing.assert_array_equal(resumed["problem"], np.arange(PROBLEMS))
    assert np.all(np.isfinite(resumed["gap_total"]))
    # (that a resumed run equals an uninterrupted one bit for bit is test_reliability's kill test)
