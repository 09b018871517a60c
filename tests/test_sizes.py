"""Sizes: runs that cannot fit are refused before compiling, the memory estimate is close to XLA's own
account, a run longer than a day says so, compilation says it is compiling, and the rate counts only
the problems computed by the call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import rlhf_bounds as rb
from rlhf_bounds import cli, engine, store

TINY = rb.Spec(d=3, actions=3, prompts=16, rollouts=2, pref_pairs=32, eval_prompts=32, steps=4, record_every=2,
               batch=4, feature_law="anisotropic")


@pytest.fixture
def no_compile(monkeypatch):
    """Compiling fails the test: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("compile_chunk was called: the size check came too late")
    monkeypatch.setattr(engine, "compile_chunk", refuse)


# ---- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--d", "100000000"], ["d=100000000 is too large for this machine", "TiB", "of memory available",
                            "make d smaller"]),
    (["--eval-prompts", "1000000000"], ["eval_prompts=1000000000 is too large for this machine",
                                        "mostly the evaluation sets", "of memory available"]),
    (["--problems", "10000000000"], ["problems=10000000000 out of range: problem numbers are 32-bit"]),
], ids=["d", "eval_prompts", "problems"])
def test_sizes_that_cannot_fit_are_refused_fast_in_one_line(capsys, no_compile, tmp_path, extra, expected):
    t0 = time.perf_counter()
    rc = cli.main(["run", "--suite", "single", *extra, "--out", str(tmp_path / "out")])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("rlhf-bounds: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert elapsed < 30, f"{elapsed:.1f} s to refuse"
    assert not list((tmp_path / "out").rglob("chunk-*.npz"))


def test_a_chunk_size_that_fits_is_suggested(no_compile):
    spec = rb.Spec(d=16, actions=8, prompts=256, eval_prompts=2048)
    need = engine.chunk_memory_bytes(spec, 256)
    available = int(0.6 * need)  # half the chunk fits (narrower chunks are padded to the kernel's lane block)
    with pytest.raises(rb.RunError) as err:
        engine.check_run_size(spec, 4096, 256, available=available)
    text = str(err.value)
    assert "is too large for this machine: a chunk of 256 problems needs about" in text
    fits = int(text.split("a chunk of ")[-1].split(" problems would fit")[0])
    assert fits < 256 and engine.chunk_memory_bytes(spec, fits) <= available
    assert f"(chunk_size={fits}, --chunk-size {fits})" in text
    engine.check_run_size(spec, 4096, 256, available=need)  # fits: no error


def test_results_kept_in_memory_must_fit_too(no_compile):
    with pytest.raises(rb.RunError, match=r"problems=2000000000 is too large to keep in memory.*out=\.\.\."):
        rb.run(rb.Spec(), 2_000_000_000, progress=False)


def test_other_kernels_are_not_estimated():
    assert engine.chunk_memory_bytes(TINY, 8, kernel=SlowKernel()) is None
    assert engine.chunk_memory_bytes(TINY, 8) > 0


def test_memory_available_is_plausible():
    avail = engine.memory_available()
    assert avail is None or 2**26 < avail < 2**50


# ---- the estimate against XLA's account of the compiled chunk -----------------------------------
ESTIMATED = {
    # W1's shapes with few steps: the training samples and the evaluation sets dominate
    "w1-shapes": (rb.Spec(d=16, actions=8, prompts=256, rollouts=4, pref_pairs=512, eval_prompts=2048, steps=10,
                          record_every=5, batch=32, tau=1.0, bounds="b1"), 64),
    # every bound: B2's posterior draws and the OU Hessian
    "all-bounds": (rb.Spec(d=8, actions=8, prompts=128, rollouts=4, pref_pairs=256, eval_prompts=1024, steps=10,
                           record_every=5, batch=16, posterior_draws=16, tau=1.0), 32),
}


@pytest.mark.parametrize("name", list(ESTIMATED))
def test_estimate_is_within_a_factor_two_of_the_compiled_chunk(name):
    spec, chunk = ESTIMATED[name]
    spec = engine.run_identity(spec, chunk, 0, chunk)[1]
    mesh = Mesh(np.array(jax.devices()[:1]), ("problems",))
    pk, sk = engine.problem_keys(0)
    gidx = jnp.asarray(engine.chunk_indices(0, chunk, chunk))
    stats = engine.compile_chunk(spec, pk, sk, gidx, mesh).memory_analysis()
    actual = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
    estimate = engine.chunk_memory_bytes(spec, chunk)
    print(f"{name}: estimate {estimate / 2**20:.1f} MiB, XLA {actual / 2**20:.1f} MiB")
    assert actual / 2 <= estimate <= 2 * actual, (estimate, actual)


# ---- long runs, the compile notice, the rate ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SlowKernel:
    """A kernel that compiles at once and spends about a millisecond per chunk."""

    name: ClassVar[str] = "slow-test"

    def __call__(self, spec, keys, shared_key):
        x = jax.lax.fori_loop(0, 3000, lambda i, x: jnp.sin(x) + 1.0, jnp.zeros((keys.shape[0], 64), jnp.float32))
        return {"x": x[:, 0], "status": jnp.zeros(keys.shape[0], jnp.int32)}


class Stop(Exception):
    pass


def test_a_run_longer_than_a_day_says_so_after_its_first_chunk(monkeypatch, capsys, tmp_path):
    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(store, "write_chunk", stop)
    with pytest.raises(Stop):
        rb.run(TINY, 2**31 - 1, kernel=SlowKernel(), chunk_size=1, progress=False, out=tmp_path / "long")
    err = capsys.readouterr().err
    line = next((x for x in err.splitlines() if "warning: this run will take about" in x), None)
    assert line is not None, err
    assert "days (2,147,483,646 more chunks of 1 problems at" in line and "resume" in line


def test_a_short_run_does_not_warn(capsys):
    rb.run(TINY, 3, kernel=SlowKernel(), chunk_size=1, progress=False)
    assert "warning" not in capsys.readouterr().err


def test_compilation_is_announced_when_it_takes_a_while(capsys):
    spec = TINY.replace(newton_steps=3)  # statics of its own: compiled here, not cached by another test
    rb.run(spec, 2, chunk_size=2, progress=True, label="tiny")
    err = capsys.readouterr().err
    assert f"tiny: compiling the kernel for this spec ({engine.COMPILE_HINT})...\n" in err, err
    assert err.index("0/1 chunks") < err.index("compiling the kernel") < err.index("1/1 chunks")
    rb.run(spec, 2, chunk_size=2, progress=True, label="tiny")  # compiled already: nothing to announce
    assert "compiling" not in capsys.readouterr().err


def test_a_resumed_run_times_only_the_problems_it_computes(tmp_path):
    out = tmp_path / "run"
    rb.run(TINY, 4, seed=1, chunk_size=1, progress=False, out=out)
    for c in (1, 3):
        (out / "chunks" / f"chunk-{c:06d}.npz").unlink()
    again = rb.run(TINY, 4, seed=1, chunk_size=1, progress=False, out=out).record
    timings = again["timings"]
    assert again["resumed_chunks"] == 2 and again["computed_problems"] == 2
    assert len(timings["chunk_s"]) == 2
    assert timings["problems_per_s"] == pytest.approx(2 / sum(timings["chunk_s"]))
    finished = rb.run(TINY, 4, seed=1, chunk_size=1, progress=False, out=out).record
    assert finished["computed_problems"] == 0 and finished["resumed_chunks"] == 4
    assert finished["timings"] == timings  # the timings of the call that computed them
