"""The bound catalogue (docs/theory.md §4–§9) and its numerical toolkit, in float64.

Every function is a small pure function of numbers the engine already has. All
are ``jit``- and ``vmap``-safe: no Python control flow on traced values, no
``while_loop`` (a vmapped while-loop runs until its slowest lane), and every
iterative solve is a fixed-length ``lax.fori_loop`` bisection. Scalar arguments
broadcast elementwise unless a docstring gives shapes. Inputs are cast to
float64 here (``jnp.asarray(x, jnp.float64)``), so callers may pass float32
simulation outputs; results are float64.

Sources: [A] Li et al., arXiv 2601.16403; [B] Tang, Chen, He, arXiv 2602.21765;
[E] this project's own derivation, written out in ``docs/theory.md``.

Conventions used throughout:

* δ is the failure probability of a bound; every split of δ is stated in the
  docstring that makes it.
* W_τ = (range of r̂) + 2β·min(τ, L_ℓ) is the width of the interval that holds
  every per-rollout term r̂ − βℓ^τ_w, where L_ℓ is an a-priori bound on |ℓ_w|
  (e.g. ``log_ratio_range``: 2C‖w − w_ref‖). Bounds that need W_τ are only as
  valid as the range they are given.
* ∞ is a legal value for τ, L_ℓ and for the c of a kl-inversion; the result is
  then the vacuous bound (∞, or 1 / 0 for probabilities), never NaN.

This module is the public face; the code lives in private files, one concern each:

* ``_numerics.py``: float64 casts (exact float32 widening included), the fixed-step
  bisection on [0, 1] (``BISECTION_ITERATIONS``) and ``tail_threshold``, the exact
  weighted tail quantile by radix select;
* ``_divergences.py``: binary and Gaussian KL, the kl-inversions, the McAllester and
  Maurer bounds, the Hoeffding PAC-Bayes-λ bound and its λ grid
  (``LAMBDA_GRID_EXPONENTS``), the Occam grid;
* ``_catalogue.py``: the formulas of B1–B3 and B7 (sampling α, clipping objective and τ*,
  ranges, ``b1_terms``, ``b2_sampling_bound``, ``certified_reward_error``);
* ``_budget.py``: B4, the budget allocation (K*, preference-data share);
* ``_statistics.py``: Clopper–Pearson intervals for coverage (docs/theory.md §11).

The B5 Lyapunov solvers ``lyapunov_continuous`` and ``lyapunov_discrete`` live in
:mod:`rlhf_bounds.ou` and are re-exported here.
"""

from __future__ import annotations

import jax

# Idempotent; the package __init__ does the same. Bounds are float64 (docs/theory.md §0).
jax.config.update("jax_enable_x64", True)

from ..ou import lyapunov_continuous, lyapunov_discrete  # noqa: E402
from ._budget import (  # noqa: E402
    integer_rollouts_per_prompt,
    preference_objective,
    preference_share,
    rollout_sampling_objective,
    rollouts_per_prompt,
)
from ._catalogue import (  # noqa: E402
    B1Terms,
    B2Terms,
    RewardCertificate,
    b1_terms,
    b2_sampling_bound,
    certified_reward_error,
    clip_objective,
    log_ratio_range,
    logistic_derivative,
    mc_error_hoeffding,
    objective_range,
    optimal_clip_threshold,
    sampling_alpha,
)
from ._divergences import (  # noqa: E402
    LAMBDA_GRID_EXPONENTS,
    default_lambda_grid,
    gaussian_kl,
    gaussian_kl_isotropic,
    hoeffding_lambda_bound,
    kl_bernoulli,
    kl_inverse_lower,
    kl_inverse_upper,
    maurer_bound,
    mcallester_bound,
    occam_grid_size,
    occam_log_cardinality,
    occam_quantize,
)
from ._numerics import BISECTION_ITERATIONS, tail_threshold  # noqa: E402
from ._statistics import clopper_pearson_interval, clopper_pearson_lower, clopper_pearson_upper  # noqa: E402
from ._tightness import (  # noqa: E402
    SamplingRungs,
    bernstein_rollout,
    bernstein_sampling_bound,
    empirical_bernstein_prompt,
    hoeffding_sampling_terms,
    kl_deviation,
    kl_sampling_bound,
)

__all__ = [
    "BISECTION_ITERATIONS",
    "LAMBDA_GRID_EXPONENTS",
    "kl_bernoulli",
    "kl_inverse_upper",
    "kl_inverse_lower",
    "gaussian_kl",
    "gaussian_kl_isotropic",
    "sampling_alpha",
    "clip_objective",
    "optimal_clip_threshold",
    "tail_threshold",
    "rollout_sampling_objective",
    "rollouts_per_prompt",
    "integer_rollouts_per_prompt",
    "preference_objective",
    "preference_share",
    "mcallester_bound",
    "maurer_bound",
    "default_lambda_grid",
    "hoeffding_lambda_bound",
    "occam_grid_size",
    "occam_log_cardinality",
    "occam_quantize",
    "log_ratio_range",
    "objective_range",
    "B1Terms",
    "b1_terms",
    "B2Terms",
    "b2_sampling_bound",
    "mc_error_hoeffding",
    "logistic_derivative",
    "RewardCertificate",
    "certified_reward_error",
    "lyapunov_continuous",
    "lyapunov_discrete",
    "clopper_pearson_upper",
    "clopper_pearson_lower",
    "clopper_pearson_interval",
    "SamplingRungs",
    "kl_deviation",
    "hoeffding_sampling_terms",
    "kl_sampling_bound",
    "empirical_bernstein_prompt",
    "bernstein_rollout",
    "bernstein_sampling_bound",
]
