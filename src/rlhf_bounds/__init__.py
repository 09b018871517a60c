"""rlhf-bounds: a JAX Monte Carlo verification engine for the generalisation theory of RLHF.

    import rlhf_bounds as rb
    res = rb.run(rb.Spec(beta=0.5, tau=1.0), problems=2048, out="runs/mine")
    res = rb.load("runs/mine")          # later, in one line
    res["gap_total"], res["gap_sampling"], res.ok

Importing the package turns on JAX's float64 support (``jax_enable_x64``):
bounds, log-determinants and kl-inversions are computed in float64
(THEORY.md §9), while the simulation keeps float32 by explicit dtypes.
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

from . import _cpu_pool  # noqa: E402

_cpu_pool.reserve_spare_thread()  # before anything starts JAX's CPU client

__version__ = "0.1.0"

from . import gap, learners, policy, reward, world  # noqa: E402
from .engine import RunError, run  # noqa: E402
from .results import LoadError, Results, StudyResults, load  # noqa: E402
from .simulate import simulate  # noqa: E402
from .spec import Spec, SpecError  # noqa: E402
from .suites import SUITES, run_study, suite  # noqa: E402

__all__ = ["Spec", "SpecError", "run", "run_study", "suite", "SUITES", "load", "Results", "StudyResults",
           "simulate", "RunError", "LoadError", "policy", "world", "reward", "learners", "gap", "__version__"]
