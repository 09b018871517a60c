"""engine.py: determinism across chunk sizes and devices, saving, loading and resuming.

Problem i's key is fold_in(problems_key, i), so its random draws are the same
whatever the chunking or sharding; the kernel pads every chunk to fixed blocks
(simulate.batch_block), so on one device every value is the same bit for bit
whatever the chunk size, and across forced host device counts of one machine
(each device runs the same compiled blocks). Where a comparison is not exact
(a kernel compiled elsewhere), derived float32 values are compared at 1e-5
relative with a 1e-6 absolute floor (float32 eps 6e-8 times O(1) rewards and
objectives over a few operations; columns such as gap_sampling_rollout are
differences of O(1) numbers and can be ~0).

The multi-device check runs a subprocess with 4 forced host devices; it is
started when this module's first test starts and collected at the end, so its
compilation overlaps the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import rlhf_bounds as rb
from rlhf_bounds.engine import RunError
from conftest import tiny_spec

SPEC = tiny_spec()  # Bradley-Terry reward model, SGD with RLOO: every random stream of simulate is used
PROBLEMS, SEED = 20, 3
#: Outputs that are pure random draws (no batch-dependent arithmetic besides a norm): equal bit for bit.
EXACT = ("problem", "theta_star")
RTOL, ATOL = 1e-5, 1e-6

MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import rlhf_bounds as rb
    spec = rb.Spec.from_dict(json.loads(sys.argv[1]))
    res = rb.run(spec, problems=int(sys.argv[2]), seed=int(sys.argv[3]), chunk_size=8, out=sys.argv[4],
                 progress=False)
    from rlhf_bounds._cpu_pool import cpu_pool_threads
    print(json.dumps({"device_count": jax.device_count(), "devices": [str(d) for d in jax.devices()],
                      "problems": len(res), "pool": cpu_pool_threads()}))
""")

#: JAX's CPU client started before the package is imported: too late to add a pool thread.
LATE_IMPORT_SCRIPT = textwrap.dedent("""
    import json, warnings
    import jax
    jax.devices()
    import rlhf_bounds
    from rlhf_bounds._cpu_pool import cpu_pool_threads, run_devices
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = run_devices()
    print(json.dumps({"device_count": jax.device_count(), "used": len(used), "pool": cpu_pool_threads(),
                      "warnings": [str(w.message) for w in caught]}))
""")


@pytest.fixture(scope="module", autouse=True)
def multi_device_run(request, tmp_path_factory):
    """Start the 4-device subprocess now (if its test is selected); the multi-device test waits for it."""
    if not any(item.originalname == "test_multi_device_matches_single_device" for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("multi") / "run"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.Popen([sys.executable, "-c", MULTI_DEVICE_SCRIPT, json.dumps(SPEC.to_dict()), str(PROBLEMS),
                             str(SEED), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


_runs: dict[int, rb.Results] = {}


def run_chunked(chunk_size: int) -> rb.Results:
    """The reference run (SPEC, PROBLEMS, SEED) with a given chunk size, in memory (cached per module)."""
    if chunk_size not in _runs:
        _runs[chunk_size] = rb.run(SPEC, PROBLEMS, seed=SEED, chunk_size=chunk_size, progress=False)
    return _runs[chunk_size]


def assert_same_results(a: rb.Results, b: rb.Results, *, exact: bool, rows=slice(None)):
    assert set(a.columns) == set(b.columns)
    assert set(a.arrays) == set(b.arrays)
    for name in list(a.columns) + list(a.arrays):
        x, y = a[name][rows], b[name]
        assert x.shape == y.shape, name
        if exact or name in EXACT or not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            np.testing.assert_array_equal(np.isfinite(x64), np.isfinite(y64), err_msg=name)
            f = np.isfinite(x64)
            np.testing.assert_allclose(x64[f], y64[f], rtol=RTOL, atol=ATOL, err_msg=name)


def test_results_shape_and_order():
    res = run_chunked(8)
    assert len(res) == PROBLEMS
    np.testing.assert_array_equal(res["problem"], np.arange(PROBLEMS))
    assert res["theta_star"].shape == (PROBLEMS, SPEC.d)
    assert res["traj_w"].shape == (PROBLEMS, SPEC.steps // SPEC.record_every, SPEC.d)
    assert np.all(res.ok)
    assert res.spec == SPEC and res.complete
    # Problems are distinct draws (padding lanes of the last chunk were dropped, not kept).
    assert len(np.unique(res["theta_star"][:, 0])) == PROBLEMS


@pytest.mark.slow  # one compilation of the whole kernel per chunk size (~10-30 s each on 2 cores)
@pytest.mark.parametrize("chunk_size", [5, 16])
def test_results_do_not_depend_on_chunk_size(chunk_size):
    """5 (4 full chunks), 8 (last chunk padded) and 16 (padded): the same results bit for bit (every
    chunk is padded to the kernel's fixed blocks, simulate.batch_block)."""
    assert_same_results(run_chunked(chunk_size), run_chunked(8), exact=True)


#: The clipped regime (a fitted reward, τ = 0.5: clip indicators and inverse-CDF draws flip on a
#: last-bit change, and SGD amplifies it); SPEC's static fields, so chunk 8 shares its compilation.
CLIPPED = SPEC.replace(tau=0.5)
#: More problems than one 128-lane block of the training loop.
CLIPPED_PROBLEMS = 130


@pytest.mark.slow  # one compilation of the whole kernel per chunk size
def test_chunk_size_changes_no_bit_in_the_clipped_regime():
    """Chunks of 8 and 64 (multiples of the 16-float vector width, less than a lane block), 40 (not a
    multiple of 16), 128 (one block) and 200 (two blocks, the second padded): every column and array of
    every problem bit for bit the same (docs/engine.md, "Determinism")."""
    runs = {c: rb.run(CLIPPED, CLIPPED_PROBLEMS, seed=77, chunk_size=c, progress=False) for c in (8, 40, 64, 128, 200)}
    for c in (8, 40, 64, 200):
        assert_same_results(runs[c], runs[128], exact=True)


def test_same_run_twice_is_bit_identical():
    first = run_chunked(8)
    again = rb.run(SPEC, PROBLEMS, seed=SEED, chunk_size=8, progress=False)
    assert_same_results(again, first, exact=True)


def test_another_seed_gives_other_problems():
    other = rb.run(SPEC, 8, seed=SEED + 1, chunk_size=8, progress=False)
    assert not np.array_equal(other["theta_star"], run_chunked(8)["theta_star"][:8])


def test_problem_results_do_not_depend_on_problem_count():
    """Problem i is problem i in a run of 8 and in a run of 20 (same seed, same compiled chunk)."""
    short = rb.run(SPEC, 8, seed=SEED, chunk_size=8, progress=False)
    assert_same_results(run_chunked(8), short, exact=True, rows=slice(0, 8))


def test_save_load_and_resume(tmp_path):
    out = tmp_path / "run"
    saved = rb.run(SPEC, PROBLEMS, seed=SEED, chunk_size=8, out=out, progress=False)
    assert_same_results(saved, run_chunked(8), exact=True)
    loaded = rb.load(out)
    assert isinstance(loaded, rb.Results)
    assert_same_results(loaded, run_chunked(8), exact=True)
    assert loaded.spec == SPEC and loaded.complete
    assert loaded.record["seed"] == SEED and loaded.record["problems"] == PROBLEMS
    assert loaded.record["chunk_size"] == 8

    chunks = sorted((out / "chunks").glob("chunk-*.npz"))
    assert [p.name for p in chunks] == ["chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"]
    before = {p.name: p.stat().st_mtime_ns for p in chunks}
    chunks[1].unlink()
    # An interrupted run's folder is incomplete: loading it gives the finished problems only.
    partial = rb.load(out)
    np.testing.assert_array_equal(partial["problem"], np.r_[0:8, 16:20])

    resumed = rb.run(SPEC, PROBLEMS, seed=SEED, chunk_size=8, out=out, progress=False)
    assert_same_results(resumed, run_chunked(8), exact=True)
    assert_same_results(rb.load(out), run_chunked(8), exact=True)
    assert len(resumed.record["timings"]["chunk_s"]) == 1, "only the missing chunk was simulated"
    after = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk-*.npz")}
    assert after["chunk-000000.npz"] == before["chunk-000000.npz"]
    assert after["chunk-000002.npz"] == before["chunk-000002.npz"]

    # A finished folder: rerunning the same call rewrites no chunk and returns the same results.
    again = rb.run(SPEC, PROBLEMS, seed=SEED, chunk_size=8, out=out, progress=False)
    assert_same_results(again, run_chunked(8), exact=True)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk-*.npz")} == after
    # A folder that belongs to another run is refused, not mixed in.
    with pytest.raises(RunError, match="seed"):
        rb.run(SPEC, PROBLEMS, seed=SEED + 1, chunk_size=8, out=out, progress=False)


def test_study_saves_and_loads(tmp_path):
    regimes = [("base", SPEC), ("clipped", SPEC.replace(tau=0.5))]  # traced change only: one compilation
    study = rb.run_study(regimes, problems=8, seed=SEED, out=tmp_path / "study", chunk_size=8, progress=False)
    loaded = rb.load(tmp_path / "study")
    assert isinstance(loaded, rb.StudyResults)
    assert list(loaded) == ["base", "clipped"] and len(loaded) == 2
    for name, spec in regimes:
        assert loaded[name].spec == spec
        assert_same_results(loaded[name], study[name], exact=True)
    # Regimes are paired: the base regime's problems are those of a plain run with the same seed.
    assert_same_results(run_chunked(8), loaded["base"], exact=True, rows=slice(0, 8))
    np.testing.assert_array_equal(loaded["clipped"]["theta_star"], loaded["base"]["theta_star"])


@pytest.mark.slow  # a subprocess that imports JAX and compiles the kernel (overlapped with the tests above)
def test_multi_device_matches_single_device(multi_device_run):
    """4 forced host devices (problem axis sharded 2 per device) vs 1 device in this process."""
    proc, out = multi_device_run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["device_count"] == 4, info
    assert info["pool"] >= 5, info  # the package reserved a spare pool thread (rlhf_bounds/_cpu_pool.py)
    assert info["problems"] == PROBLEMS
    assert jax.device_count() == 1  # this process: the comparison really is across device counts
    multi = rb.load(out)
    assert multi.record["machine"]["devices"] == info["devices"]
    # Each device runs the same compiled blocks on its share of the chunk (padded): bit for bit the same
    # on one machine (docs/engine.md, "Determinism": not across machines or backends).
    assert_same_results(multi, run_chunked(8), exact=True)


def test_multi_device_falls_back_when_pool_too_small():
    """JAX started (4 forced devices, a pool of max(PJRT_NPROC, 4) = 4 threads) before the import: one device, a warning."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PJRT_NPROC"] = "2"
    proc = subprocess.run([sys.executable, "-c", LATE_IMPORT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["device_count"] == 4 and info["pool"] == 4, info
    assert info["used"] == 1, info
    assert len(info["warnings"]) == 1 and "PJRT_NPROC=5" in info["warnings"][0], info


# ---- one PRNG path ----------------------------------------------------------------------------

def test_simulate_is_problem_i_of_run_bit_for_bit():
    """rb.simulate on problem i's key (one problem, one block of lanes) gives problem i of rb.run in
    chunks of 8 exactly: results do not depend on the chunk."""
    problems_key, shared_key = rb.engine.problem_keys(SEED)
    ran = run_chunked(8)
    for i in (0, 7, 19):
        one = rb.simulate(SPEC, jax.random.fold_in(problems_key, i), shared_key)
        assert set(one) == set(ran.columns) - {"problem"} | set(ran.arrays)
        for name, value in one.items():
            np.testing.assert_array_equal(np.asarray(value), ran[name][i], err_msg=f"problem {i}: {name}")


def test_simulate_batch_draws_what_run_draws():
    """Called directly (not through the engine's compile), simulate_batch draws the same θ* and data."""
    from rlhf_bounds.simulate import prepare, simulate_batch
    problems_key, shared_key = rb.engine.problem_keys(SEED)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(problems_key, jax.numpy.arange(4))
    direct = jax.jit(simulate_batch)(SPEC, keys, shared_key)
    np.testing.assert_array_equal(np.asarray(direct["theta_star"]), run_chunked(8)["theta_star"][:4])
    # θ̂ is arithmetic on those draws (compiled in another shape): equal to float32 round-off
    np.testing.assert_allclose(np.asarray(direct["theta_hat"]), run_chunked(8)["theta_hat"][:4], rtol=RTOL, atol=ATOL)
    eager = prepare(SPEC, keys[2])  # eagerly, op by op: the same draws (normalised by other code: round-off)
    np.testing.assert_allclose(np.asarray(eager.world.theta_star), run_chunked(8)["theta_star"][2], rtol=RTOL)
    # ... which the default (partitionable) threefry would not give: the check has power.
    with jax.threefry_partitionable(True):
        other = prepare(SPEC, keys[2])
    assert not np.allclose(np.asarray(other.world.theta_star), run_chunked(8)["theta_star"][2], rtol=0.1)


# ---- the engine runs any kernel ---------------------------------------------------------------

class MomentKernel:
    """A kernel from outside the engine: the first two moments of a few normal draws per problem."""

    name = "test-moments"

    def __init__(self, draws: int = 16):
        self.draws = draws

    def __hash__(self):
        return hash((self.name, self.draws))

    def __eq__(self, other):
        return isinstance(other, MomentKernel) and other.draws == self.draws

    def __call__(self, spec, keys, shared_key):
        scale = jax.numpy.asarray(spec.reward_norm, jax.numpy.float32)
        z = jax.vmap(lambda k: jax.random.normal(k, (self.draws,), jax.numpy.float32))(keys) * scale
        return {"mean": z.mean(axis=1), "second": (z * z).mean(axis=1), "draws": z}


def test_engine_runs_a_kernel_from_outside(tmp_path):
    spec = rb.Spec(reward_norm=2.0)
    kernel = MomentKernel()
    out = tmp_path / "moments"
    res = rb.run(spec, 21, kernel=kernel, seed=SEED, chunk_size=8, out=out, progress=False)
    assert len(res) == 21 and res.complete and np.all(res.ok)
    np.testing.assert_array_equal(res["problem"], np.arange(21))
    assert res.record["kernel"] == "test-moments"
    # Problem i is the kernel on fold_in(problems_key, i), whatever its chunk.
    problems_key, shared_key = rb.engine.problem_keys(SEED)
    for i in (0, 13, 20):
        want = 2.0 * jax.random.normal(jax.random.fold_in(problems_key, i), (16,), jax.numpy.float32)
        np.testing.assert_allclose(res["draws"][i], np.asarray(want), rtol=1e-6)
    assert abs(res["second"].mean() - 4.0) < 4 * 4.0 * np.sqrt(2 / (21 * 16))  # E z² = D², sd √2·D²/√N
    # The engine added the status flags; a non-finite column is flagged.
    bad = rb.run(spec.replace(reward_norm=3e38), 8, kernel=kernel, seed=SEED, chunk_size=8, progress=False)
    assert np.all(bad["status"] & rb.status.STATUS_NONFINITE)
    # Saving, loading and resuming are the engine's, for this kernel too.
    np.testing.assert_array_equal(rb.load(out)["mean"], res["mean"])
    again = rb.run(spec, 21, kernel=kernel, seed=SEED, chunk_size=8, out=out, progress=False)
    assert again.record["resumed_chunks"] == 3
    # A folder written by another kernel is refused, naming the kernel.
    with pytest.raises(RunError, match="kernel"):
        rb.run(spec, 21, seed=SEED, chunk_size=8, out=out, progress=False)


class OptionKernel:
    """A kernel with XLA compiler options: a reduction large enough that XLA:CPU gives it to YNNPACK."""

    name = "test-options"

    def __init__(self, options=()):
        self.options = tuple(options)

    def __hash__(self):
        return hash((self.name, self.options))

    def __eq__(self, other):
        return isinstance(other, OptionKernel) and other.options == self.options

    def compiler_options(self, backend):
        return dict(self.options)

    def __call__(self, spec, keys, shared_key):
        z = jax.vmap(lambda k: jax.random.normal(k, (128, 512), jax.numpy.float32))(keys)
        return {"sq": (z * z).sum(axis=(1, 2))}


def test_a_kernels_compiler_options_reach_its_compilation():
    """``compiler_options(backend)`` goes to XLA with the chunk's compilation: YNNPACK's fusions
    turned off there leave none in the compiled module, and so do the same options given to
    ``engine.xla_options``; an option XLA refuses is dropped with one warning naming it, and the
    kernel still runs, to the same numbers."""
    if jax.default_backend() != "cpu":
        pytest.skip("the option tested is XLA:CPU's")
    spec = rb.Spec()
    mesh = Mesh(np.array(jax.devices()[:1]), ("problems",))
    pk, sk = rb.engine.problem_keys(SEED)
    gidx = jax.numpy.asarray(rb.engine.chunk_indices(0, 8, 8))
    text = lambda kernel: rb.engine.compile_chunk(spec, pk, sk, gidx, mesh, kernel).as_text().lower()
    if "ynn" not in text(OptionKernel()):
        pytest.skip("this jaxlib's XLA:CPU gives the reduction no YNNPACK fusion")
    off = OptionKernel({"xla_cpu_experimental_ynn_fusion_type": ""}.items())
    assert rb.engine.kernel_compiler_options(off, "cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert rb.engine.kernel_compiler_options(MomentKernel()) == {}
    assert "ynn" not in text(off)
    # xla_options adds options to every compilation within its block (cached apart from the others)
    with rb.engine.xla_options({"xla_cpu_experimental_ynn_fusion_type": ""}):
        assert "ynn" not in text(OptionKernel())
    assert "ynn" in text(OptionKernel())
    plain = rb.run(spec, 8, kernel=OptionKernel(), seed=SEED, chunk_size=8, progress=False)
    bad = OptionKernel({"xla_no_such_option_here": True}.items())
    with pytest.warns(RuntimeWarning, match="xla_no_such_option_here"):
        refused = rb.run(spec, 8, kernel=bad, seed=SEED, chunk_size=8, progress=False)
    np.testing.assert_allclose(refused["sq"], plain["sq"], rtol=1e-6)
    np.testing.assert_allclose(plain["sq"].mean(), 128 * 512, rtol=4 * np.sqrt(2 / (8 * 128 * 512)))


def test_no_module_but_the_store_names_a_run_folder_file():
    """The run-folder format has one owner (rlhf_bounds.store)."""
    import pathlib
    import re
    src = pathlib.Path(rb.__file__).parent
    names = re.compile(r"""["'](record\.json|study\.json|config\.json|summary\.md|chunks["'/]|chunk-[{\d*])""")
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "store.py" and names.search(p.read_text())]
    assert offenders == []
