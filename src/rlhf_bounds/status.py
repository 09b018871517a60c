"""Per-problem status flags: no NaN or inf, and no failed fit, enters a summary silently.

Each problem carries an int32 ``status``: 0 when every result is usable, else
the OR of the flags below. Reports average over status-0 problems and count
the flagged ones apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .spec import Spec

__all__ = ["STATUS_OK", "STATUS_NONFINITE", "STATUS_REWARD_FIT", "FLAGS", "status_code", "status_names"]

STATUS_OK = 0
#: A result of this problem is NaN or infinite where it must be finite.
STATUS_NONFINITE = 1
#: The reward-model Newton iterations did not reach a small gradient.
STATUS_REWARD_FIT = 2

#: Flag bit → name.
FLAGS = {STATUS_NONFINITE: "nonfinite", STATUS_REWARD_FIT: "reward_fit"}


def status_names(status: int) -> list[str]:
    """The flags set in a status code, by name."""
    return [name for bit, name in FLAGS.items() if status & bit]


def status_code(spec: Spec, out: dict[str, jax.Array]) -> jax.Array:
    """The status of one problem from its results ``out`` (inside the kernel)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in out.values()]))
    status = jnp.where(finite, 0, STATUS_NONFINITE)
    if spec.reward_model == "mle":
        # The summed loss's gradient scales with N_pref; Newton in float32 reaches ~1e-6 of it.
        tol = 1e-3 * spec.pref_pairs * spec.feature_bound
        status = status | jnp.where(out["reward_fit_grad_norm"] > tol, STATUS_REWARD_FIT, 0)
    return status.astype(jnp.int32)
