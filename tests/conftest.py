"""Shared helpers for the simulator-core tests.

Independent references live here: NumPy/SciPy versions of the per-prompt
policy maths, written from docs/theory.md §14 without calling the package, so a test
compares the package with a second implementation rather than with itself.

The engine-level tests share one tiny problem family (:data:`TINY`): a spec
compiles once per static configuration and chunk size, and every test that
uses the same statics reuses that compilation within the pytest process.
"""

from __future__ import annotations

import math
import os

# XLA's CPU backend spends most of a test run optimising code that then runs for
# milliseconds: the simulate kernel compiles ~2.5x faster at LLVM level 0 (the
# numbers are the same maths; every comparison here is within one configuration
# or tolerance-based). Set before JAX creates its backend; an explicit setting wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np
import pytest
from hypothesis import settings

# Property tests are reproducible: a fixed derandomised search, no example database.
settings.register_profile("rlhf-bounds", derandomize=True, database=None)
settings.load_profile("rlhf-bounds")
from scipy.special import logsumexp

import rlhf_bounds as rb

#: float32 machine epsilon: the unit for tolerances on simulation outputs.
EPS32 = float(np.finfo(np.float32).eps)

#: The tiny problem family shared by test_gap.py and test_engine.py (fast to run; see module docstring).
TINY = dict(d=4, actions=4, prompts=64, rollouts=4, pref_pairs=64, eval_prompts=256, steps=50,
            record_every=10, batch=8, newton_steps=8, learner="SGD", estimator="rloo")


def tiny_spec(**changes) -> rb.Spec:
    """:data:`TINY` with ``changes`` applied (validated)."""
    return rb.Spec().replace(**{**TINY, **changes})


# ---- NumPy references (docs/theory.md §14) --------------------------------------------------------

def np_log_probs(w, phi):
    """log π_w(·|x) = z − logsumexp(z), z = Φw (SciPy's logsumexp, float64)."""
    z = np.asarray(phi, np.float64) @ np.asarray(w, np.float64)
    return z - logsumexp(z)


def np_probs(w, phi):
    return np.exp(np_log_probs(w, phi))


def np_log_ratio(w, w_ref, phi):
    return np_log_probs(w, phi) - np_log_probs(w_ref, phi)


def np_inverse_cdf(p, u):
    """Y = min{a : Σ_{a'≤a} p(a') > u} (actions ordered by index), by NumPy's searchsorted."""
    cdf = np.cumsum(np.asarray(p, np.float64))
    return np.minimum(np.searchsorted(cdf, np.asarray(u, np.float64), side="right"), len(p) - 1)


def random_prompt(rng, A, d, scale=1.0):
    """A random (w, w_ref, Φ) in float64 with logits of size about ``scale``."""
    phi = rng.normal(size=(A, d)) / math.sqrt(d)
    w = scale * rng.normal(size=d)
    w_ref = 0.5 * scale * rng.normal(size=d)
    return w, w_ref, phi


def assert_close(actual, expected, *, rtol, atol=0.0, what=""):
    """np.testing.assert_allclose with float64 casting and a message."""
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name (fixed, but different per test)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.name)) % (2**32)
    return np.random.default_rng(seed)


# ---- each pytest process (one per xdist worker) runs many files: keep what it accumulates in check --

#: Groups that start first: the longest (a suite's smoke run, a matrix case) go out before the many short ones,
#: so that no worker is left with a long group at the end while the other idles.
_SLOW_FIRST = ("tests/test_suites.py", "tests/test_matrix.py")


def xdist_group(item) -> str | None:
    """The worker group of a test under ``pytest -n`` (``--dist loadgroup``) that has none of its own: its
    module, so that a module's shared fixtures are built once. The test_matrix.py cases go out one by one
    (each is its own compilation), and test_suites.py marks its tests by the suite run they read
    (``uses``), so that the two largest files spread over the workers."""
    if item.get_closest_marker("xdist_group"):
        return None
    module = item.module.__name__.rsplit(".", 1)[-1]
    return None if module == "test_matrix" else module


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(session, config, items):
    """Worker groups (:func:`xdist_group`) and the order the groups go out in: the Ctrl-C tests first, before
    the process holds the hundreds of compiled kernels of the other files (they time real subprocesses
    against signals, and failed twice in a one-process run after ~250 other tests while passing every time
    on their own; cause not yet found), then the suites and the matrix, then the rest."""
    for item in items:
        group = xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    rank = lambda i: (0 if i.module.__name__.endswith("test_interrupt")
                      else 1 if i.nodeid.startswith(_SLOW_FIRST) else 2)
    items[:] = sorted(items, key=rank)  # stable: collection order within each rank


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_kernels():
    """After each test module, drop the engine's and JAX's caches of compiled executables, so the suite's
    single process does not keep every kernel it ever compiled (each holds JIT-compiled code and its
    mappings; a full run compiles several hundred)."""
    yield
    import gc

    import jax

    from rlhf_bounds import engine
    engine._COMPILED.clear()
    jax.clear_caches()
    gc.collect()
