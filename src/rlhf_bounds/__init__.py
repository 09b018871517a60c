"""rlhf-bounds: a JAX Monte Carlo verification engine for the generalisation theory of RLHF.

    import rlhf_bounds as rb
    res = rb.run(rb.Spec(beta=0.5, tau=1.0), problems=2048, out="runs/mine")
    res = rb.load("runs/mine")          # later, in one line
    res["gap_total"], res["gap_sampling"], res.ok

Importing the package sets two JAX options for the whole process: float64
support (``jax_enable_x64``), since bounds, log-determinants and kl-inversions
are computed in float64 (docs/theory.md) while the simulation keeps float32 by
explicit dtypes; and the classic threefry PRNG (``jax_threefry_partitionable``
off), which the engine compiles with, so that :func:`simulate`,
:func:`rlhf_bounds.simulate.simulate_batch` and :func:`run` draw the same
numbers from the same key whichever is called.
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)
_jax.config.update("jax_threefry_partitionable", False)

from . import _cpu_pool  # noqa: E402

_cpu_pool.reserve_spare_thread()  # before anything starts JAX's CPU client

from ._version import __version__  # noqa: E402
from . import gap, learners, policy, reward, store, world  # noqa: E402
from .engine import run  # noqa: E402
from .results import Results, StudyResults, load  # noqa: E402
from .store import LoadError, RunError  # noqa: E402
from .simulate import simulate  # noqa: E402
from .spec import Spec, SpecError  # noqa: E402
from .suites import SUITES, run_study, suite  # noqa: E402

__all__ = ["Spec", "SpecError", "run", "run_study", "suite", "SUITES", "load", "Results", "StudyResults",
           "simulate", "RunError", "LoadError", "policy", "world", "reward", "learners", "gap", "store", "__version__"]
