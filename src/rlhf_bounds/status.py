"""Per-problem status flags: no NaN or inf, and no failed fit, enters a summary silently.

Each problem carries an int32 ``status``: 0 when every result is usable, else
the OR of the flags below. Reports average over status-0 problems and count
the flagged ones apart (:func:`rlhf_bounds.report.summary_rows`).

Which results must be finite is an explicit rule, :func:`must_be_finite`:
every simulation result must, except

* bound columns (names starting with ``b1_``, ``b2_``, ``b3_``, ``b4_``,
  ``b7_``): a bound that does not apply is legitimately ``+inf``; such a
  column is only required not to be NaN (flag ``bound_nan``);
* parameters that may be infinite by design (``tau``: τ = ∞ is no clipping);
* ``chi2``, which overflows float32 when μ puts tiny mass where π_w does not
  (``mix_eps = 0`` with a large shift); it has its own flag, ``chi2_overflow``,
  and ``log1p_chi2`` (always finite) carries its logarithm.

Pass another rule to :func:`status_code` (a predicate on the column name, or
the collection of names that must be finite) where a caller knows better.
"""

from __future__ import annotations

from typing import Callable, Collection

import jax
import jax.numpy as jnp

from .spec import Spec

__all__ = ["STATUS_OK", "STATUS_NONFINITE", "STATUS_REWARD_FIT", "STATUS_CHI2_OVERFLOW", "STATUS_POLICY_OVERFLOW",
           "STATUS_BOUND_NAN", "FLAGS", "MAY_BE_INFINITE_PREFIXES", "MAY_BE_INFINITE", "must_be_finite",
           "status_code", "status_names", "flag_counts"]

STATUS_OK = 0
#: A result of this problem is NaN or infinite where it must be finite (see :func:`must_be_finite`).
STATUS_NONFINITE = 1
#: The reward-model Newton iterations did not reach a small gradient (or the gradient is NaN).
STATUS_REWARD_FIT = 2
#: χ²(D_w‖D_train) overflowed float32: μ is (numerically) zero where π_w is not.
STATUS_CHI2_OVERFLOW = 4
#: The trained policy overflowed: w, its trajectory or ‖w − w_ref‖ is not finite (the learner diverged,
#: e.g. η·β·C² far above 2, or logits beyond float32).
STATUS_POLICY_OVERFLOW = 8
#: A bound column is NaN (a bound may be +inf when it does not apply, never NaN).
STATUS_BOUND_NAN = 16

#: Flag bit → name.
FLAGS = {STATUS_NONFINITE: "nonfinite", STATUS_REWARD_FIT: "reward_fit", STATUS_CHI2_OVERFLOW: "chi2_overflow",
         STATUS_POLICY_OVERFLOW: "policy_overflow", STATUS_BOUND_NAN: "bound_nan"}

#: Column-name prefixes of bounds, which may be +inf (a bound that does not apply).
MAY_BE_INFINITE_PREFIXES = ("b1_", "b2_", "b3_", "b4_", "b7_")
#: Columns that may be infinite by design: parameters (τ = ∞) and χ² (flagged on its own).
MAY_BE_INFINITE = ("tau", "chi2")
#: The policy results whose overflow sets :data:`STATUS_POLICY_OVERFLOW`.
POLICY_COLUMNS = ("w_last", "w_best", "traj_w", "w_norm")


def must_be_finite(name: str) -> bool:
    """The default rule: must result ``name`` be finite? (see the module docstring)"""
    return not (name.startswith(MAY_BE_INFINITE_PREFIXES) or name in MAY_BE_INFINITE)


def status_names(status: int) -> list[str]:
    """The flags set in a status code, by name."""
    return [name for bit, name in FLAGS.items() if int(status) & bit]


def flag_counts(status) -> dict[str, int]:
    """How many problems carry each flag, for an array of status codes (flags with a zero count left out)."""
    import numpy as np

    s = np.asarray(status)
    counts = {name: int(np.count_nonzero(s & bit)) for bit, name in FLAGS.items()}
    return {name: c for name, c in counts.items() if c}


def _rule(finite: Callable[[str], bool] | Collection[str] | None) -> Callable[[str], bool]:
    if finite is None:
        return must_be_finite
    if callable(finite):
        return finite
    names = frozenset(finite)
    return lambda name: name in names


def _all_finite(values) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(v)) for v in values]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _no_nan(values) -> jax.Array:
    flags = [~jnp.any(jnp.isnan(v)) for v in values]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def status_code(spec: Spec, out: dict[str, jax.Array],
                finite: Callable[[str], bool] | Collection[str] | None = None) -> jax.Array:
    """The status of one problem from its results ``out`` (inside the kernel; int32 scalar).

    ``finite`` says which results must be finite: a predicate on the name, or
    the names themselves; default :func:`must_be_finite`. Results it exempts
    must still not be NaN (bound columns: :data:`STATUS_BOUND_NAN`; others:
    :data:`STATUS_NONFINITE`), and ``chi2 = +inf`` sets
    :data:`STATUS_CHI2_OVERFLOW`. A ``status`` entry already in ``out`` is ignored.
    """
    rule = _rule(finite)
    items = {k: v for k, v in out.items() if k != "status"}
    checked = [v for k, v in items.items() if rule(k)]
    bounds_ = [v for k, v in items.items() if not rule(k) and k.startswith(MAY_BE_INFINITE_PREFIXES)]
    others = [v for k, v in items.items() if not rule(k) and not k.startswith(MAY_BE_INFINITE_PREFIXES)]

    status = jnp.where(_all_finite(checked) & _no_nan(others), 0, STATUS_NONFINITE)
    status = status | jnp.where(_no_nan(bounds_), 0, STATUS_BOUND_NAN)
    if "chi2" in items:
        status = status | jnp.where(jnp.any(jnp.isposinf(items["chi2"])), STATUS_CHI2_OVERFLOW, 0)
    policy = [items[k] for k in POLICY_COLUMNS if k in items]
    if policy:
        status = status | jnp.where(_all_finite(policy), 0, STATUS_POLICY_OVERFLOW)
    if spec.reward_model == "mle" and "reward_fit_grad_norm" in items:
        # The summed loss's gradient scales with N_pref; Newton in float32 reaches ~1e-6 of it.
        # Written as "not ≤" so that a NaN gradient (a diverged fit) is flagged too.
        tol = 1e-3 * spec.pref_pairs * spec.feature_bound
        status = status | jnp.where(items["reward_fit_grad_norm"] <= tol, 0, STATUS_REWARD_FIT)
    return status.astype(jnp.int32)
