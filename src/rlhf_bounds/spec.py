"""The problem spec: everything that defines one simulated RLHF problem (docs/theory.md §13).

A :class:`Spec` is a frozen dataclass registered as a JAX pytree. Its *static*
fields (shapes, step counts, choices of law or learner) are pytree metadata, so
they select a compiled kernel; its *traced* fields (β, τ, D, C, σ_ξ, the
behaviour shift, the learning rate, ...) are pytree leaves, so a population of
specs that share their static fields can be stacked and vmapped, and changing a
traced field does not recompile.

Every field carries its allowed range; a spec is checked when it is made
(:meth:`Spec.validate`, called by the constructor, :meth:`Spec.replace` and
:meth:`Spec.from_dict`), with a :class:`SpecError` whose one-line message names
the field, the value and the range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

import jax
import numpy as np

__all__ = ["Spec", "SpecError", "FIELDS", "FEATURE_LAWS", "LEARNERS", "ESTIMATORS", "parse_field"]

FEATURE_LAWS = ("sphere", "gaussian", "anisotropic", "lowrank", "shared")
LEARNERS = ("GA", "SGA", "SGD")
ESTIMATORS = ("exact", "rloo", "none")
SCHEDULES = ("constant", "inv_sqrt")
REWARD_MODELS = ("oracle", "mle")
TRAIN_LOG_RATIOS = ("clipped", "exact")
BOUND_SETS = ("all", "b1")


#: float32's smallest normal and largest finite numbers: traced fields must be representable in float32.
F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)


class SpecError(ValueError):
    """A spec field (or command-line option) is outside its allowed range."""


def _f(default, help, *, static=False, lo=None, hi=None, lo_open=False, hi_open=False,
       choices=None, allow_inf=False, cli=None, symbol=None):
    """A spec field with its range, help text and command-line name."""
    meta = dict(help=help, static=static, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open,
                choices=choices, allow_inf=allow_inf, cli=cli, symbol=symbol)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    """One RLHF problem family; each problem drawn from it has its own PRNG key.

    Static fields (compile-time) come first, traced fields (vmappable) after.
    """

    # ---- static: shapes and counts ------------------------------------------------------
    d: int = _f(8, "feature dimension d", static=True, lo=1, cli="--d", symbol="d")
    actions: int = _f(8, "candidate responses per prompt A", static=True, lo=1, cli="--actions", symbol="A")
    prompts: int = _f(256, "training prompts n (and prompts in the fresh evaluation sample)", static=True, lo=1,
                      cli="--prompts", symbol="n")
    rollouts: int = _f(4, "rollouts per prompt K", static=True, lo=1, cli="--rollouts", symbol="K")
    pref_pairs: int = _f(512, "preference pairs N_pref for the reward model", static=True, lo=1,
                         cli="--pref-pairs", symbol="N_pref")
    eval_prompts: int = _f(2048, "evaluation prompts M for population values (exact over responses)", static=True,
                           lo=1, cli="--eval-prompts", symbol="M")
    steps: int = _f(400, "policy optimisation steps T", static=True, lo=1, cli="--steps", symbol="T")
    batch: int = _f(32, "SGD minibatch size b (prompts drawn with replacement)", static=True, lo=1,
                    cli="--batch", symbol="b")
    record_every: int = _f(50, "record the trajectory every this many steps (must divide T)", static=True, lo=1,
                           cli="--record-every")
    newton_steps: int = _f(8, "Newton steps of the Bradley-Terry reward-model fit", static=True, lo=1,
                           cli="--newton-steps")
    posterior_draws: int = _f(32, "Monte Carlo draws from B2's Gaussian posterior", static=True, lo=1,
                              cli="--posterior-draws", symbol="M_Q")
    rank: int = _f(2, "subspace dimension k of the lowrank feature law (k ≤ d)", static=True, lo=1, cli="--rank",
                   symbol="k")
    # ---- static: choices ----------------------------------------------------------------
    feature_law: str = _f("sphere", "feature law of φ(x, a)", static=True, choices=FEATURE_LAWS,
                          cli="--feature-law")
    learner: str = _f("SGD", "policy learner: GA (full batch), SGA (one prompt, η0/√t), SGD (optax, batch b)",
                      static=True, choices=LEARNERS, cli="--learner")
    estimator: str = _f("rloo", "policy gradient: exact over responses, or score function over the K rollouts "
                        "with a leave-one-out baseline (rloo) or none", static=True, choices=ESTIMATORS,
                        cli="--estimator")
    schedule: str = _f("constant", "SGD step-size schedule (SGA always uses η0/√t)", static=True,
                       choices=SCHEDULES, cli="--schedule")
    reward_model: str = _f("mle", "reward used in training: the oracle r* or the Bradley-Terry MLE r̂",
                           static=True, choices=REWARD_MODELS, cli="--reward-model")
    train_log_ratio: str = _f("clipped", "log-ratio in the training reward: clipped at τ or exact", static=True,
                              choices=TRAIN_LOG_RATIOS, cli="--train-log-ratio")
    bounds: str = _f("all", "bound columns: all, or b1 (B1, B1 certified by B7, B3 and B4 inputs; no PAC-Bayes "
                     "posteriors: faster to compile and run)", static=True, choices=BOUND_SETS, cli="--bounds")
    # ---- traced: the world --------------------------------------------------------------
    beta: float = _f(0.5, "KL weight β", lo=0.0, lo_open=True, cli="--beta", symbol="β")
    tau: float = _f(math.inf, "clipping threshold τ on the log-ratio (inf: no clipping)", lo=0.0, allow_inf=True,
                    cli="--tau", symbol="τ")
    reward_norm: float = _f(1.0, "‖θ*‖ = D", lo=0.0, lo_open=True, cli="--reward-norm", symbol="D")
    feature_bound: float = _f(1.0, "feature bound ‖φ‖ ≤ C", lo=0.0, lo_open=True, cli="--feature-bound",
                              symbol="C")
    sigma_xi: float = _f(0.0, "misspecification σ_ξ (0: realizable)", lo=0.0, cli="--sigma-xi", symbol="σ_ξ")
    condition: float = _f(10.0, "condition number of Σ_φ for the anisotropic law", lo=1.0, cli="--condition")
    shared_weight: float = _f(0.5, "weight of the prompt component in the shared law", lo=0.0, hi=1.0,
                              cli="--shared-weight")
    shift: float = _f(0.0, "behaviour shift s: w_μ = w_ref + s·θ*/β + noise", lo=-math.inf, cli="--shift",
                      symbol="s")
    mix_eps: float = _f(0.1, "uniform mixing ε of the behaviour policy μ", lo=0.0, hi=1.0, cli="--mix-eps",
                        symbol="ε")
    mu_noise: float = _f(0.0, "standard deviation of the noise added to w_μ", lo=0.0, cli="--mu-noise")
    # ---- traced: learners ---------------------------------------------------------------
    lr: float = _f(1.0, "step size η (η0 for SGA and inv_sqrt)", lo=0.0, lo_open=True, cli="--lr", symbol="η")
    ridge: float = _f(1.0, "ridge λ of the reward-model fit", lo=0.0, lo_open=True, cli="--ridge", symbol="λ")
    # ---- traced: bounds -----------------------------------------------------------------
    delta: float = _f(0.05, "failure probability δ of the bounds", lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                      cli="--delta", symbol="δ")
    occam_radius: float = _f(4.0, "half-width R_w of the box [−R_w, R_w]^d of B2's finite (Occam) grid", lo=0.0,
                             lo_open=True, cli="--occam-radius", symbol="R_w")
    occam_spacing: float = _f(0.05, "spacing ε of B2's finite (Occam) grid", lo=0.0, lo_open=True,
                              cli="--occam-spacing", symbol="ε_grid")
    posterior_floor: float = _f(0.05, "s in B2's Gaussian posterior N(w_S, Σ_OU + s²I)", lo=0.0, lo_open=True,
                                cli="--posterior-floor")

    # -------------------------------------------------------------------------------------
    def __post_init__(self):
        # A spec is checked when it is made, so a bad value fails where it was written. JAX rebuilds
        # specs from their leaves without this (see the pytree registration at the end of the module).
        self.validate()

    @classmethod
    def static_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["static"])

    @classmethod
    def traced_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if not f.metadata["static"])

    def replace(self, **changes: Any) -> "Spec":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise SpecError(f"unknown spec field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Spec":
        """A spec from :meth:`to_dict`'s fields, also as read back from JSON: a number field may hold
        "inf", "-inf" or "nan", as :func:`rlhf_bounds.store.json_safe` writes non-finite floats."""
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise SpecError(f"unknown spec field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: _from_json(FIELDS[k], v) for k, v in values.items()})

    def validate(self) -> "Spec":
        """Check every field against its range; raise :class:`SpecError` on the first bad one."""
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.steps % self.record_every:
            raise SpecError(f"record_every={self.record_every} out of range: must divide steps={self.steps}")
        if self.feature_law == "lowrank" and self.rank > self.d:
            raise SpecError(f"rank={self.rank} out of range: the lowrank law needs 1 ≤ rank ≤ d={self.d}")
        if self.estimator == "rloo" and self.learner != "GA" and self.rollouts < 2:
            raise SpecError(f"rollouts={self.rollouts} out of range: the rloo estimator (learner {self.learner}) "
                            "needs rollouts ≥ 2")
        return self

    def describe(self) -> str:
        """A short human description of the fields that differ from the defaults."""
        default = Spec()
        diff = [f"{k}={v}" for k, v in self.to_dict().items() if getattr(default, k) != v]
        return ", ".join(diff) if diff else "defaults"


def _range_text(m) -> str:
    if m["choices"]:
        return "one of " + ", ".join(m["choices"])
    lo, hi = m["lo"], m["hi"]
    left = "(" if m["lo_open"] else "["
    right = ")" if (m["hi_open"] or hi is None) else "]"
    lo_s = "-inf" if lo is None or lo == -math.inf else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    if m["allow_inf"] and hi is None:
        right = "]"
    if lo is None or lo == -math.inf:
        left = "("  # −∞ itself is never allowed
    return f"{left}{lo_s}, {hi_s}{right}"


def _whole_line(m) -> bool:
    """Whether a number field takes every finite number (the behaviour shift s)."""
    return (m["lo"] is None or m["lo"] == -math.inf) and m["hi"] is None and not m["allow_inf"]


def _must_be(m) -> str:
    """What a number field must be, after "must be": "in [0, inf)", or "a finite number" for the whole line."""
    return "a finite number" if _whole_line(m) else f"in {_range_text(m)}"


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _from_json(f, value):
    """A number field's value as JSON holds it: "inf", "-inf" and "nan" back to floats (see :meth:`Spec.from_dict`)."""
    if isinstance(value, str) and f.metadata["choices"] is None and value.lower() in _NON_FINITE:
        return _NON_FINITE[value.lower()]
    return value


def _check_field(f, value) -> None:
    """Raise :class:`SpecError` unless ``value`` lies in field ``f``'s range (see :meth:`Spec.validate`).

    Choice fields take one of their strings; int fields an integer (not bool,
    not a float such as 2.0, since it becomes an array shape); float fields a
    real number (int, float, NumPy scalar or 0-d array), not bool, not NaN,
    and infinite only where the range says so (τ = ∞). A traced field may also
    hold an array (a stacked population of specs): every element is checked.
    """
    m = f.metadata
    name = f.name
    if m["choices"] is not None:
        if not isinstance(value, str) or value not in m["choices"]:
            raise SpecError(f"{name}={value!r} is not allowed: must be {_range_text(m)}")
        return
    is_int = f.type in ("int", int)
    if not is_int and not m["static"] and isinstance(value, jax.core.Tracer):
        return  # a traced value inside a transformation: checked where it was concrete
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, jax.core.Tracer):
        arr = np.asarray(value)
        if arr.ndim and not is_int and not m["static"] and arr.dtype.kind in "iuf":
            for v in arr.reshape(-1):
                _check_field(f, v.item())
            return
        if arr.ndim == 0 and arr.dtype.kind in ("iu" if is_int else "iuf"):
            value = arr.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecError(f"{name}={value!r} is not a number: must be "
                        f"{'a whole number in ' + _range_text(m) if is_int else _must_be(m)}")
    if is_int and not isinstance(value, numbers.Integral):
        raise SpecError(f"{name}={value!r} is not a whole number (an int): must be a whole number in "
                        f"{_range_text(m)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf if value > 0 else -math.inf
    shown = str(int(value)) if isinstance(value, numbers.Integral) and math.isfinite(v) else repr(v)
    if math.isnan(v):
        raise SpecError(f"{name}=nan is not allowed: must be {_must_be(m)}")
    if math.isinf(v) and not (m["allow_inf"] and v > 0):
        raise SpecError(f"{name}={shown} out of range: must be {'' if _whole_line(m) else 'finite, '}{_must_be(m)}")
    lo, hi = m["lo"], m["hi"]
    bad = (lo is not None and (v < lo or (m["lo_open"] and v == lo))) or \
          (hi is not None and (v > hi or (m["hi_open"] and v == hi)))
    if bad:
        raise SpecError(f"{name}={shown} out of range: must be in {_range_text(m)}")
    if not m["static"] and math.isfinite(v) and v != 0.0:
        # Traced fields enter the simulation as float32: a value it would round to 0 or ±inf is refused.
        if abs(v) < F32_TINY:
            raise SpecError(f"{name}={shown} out of range: a nonzero value must be at least {F32_TINY:.3g} in size "
                            "(the simulation runs in float32, where it would be 0)")
        if abs(v) > F32_MAX:
            raise SpecError(f"{name}={shown} out of range: must be at most {F32_MAX:.3g} in size "
                            "(the simulation runs in float32, where it would be infinite)")


FIELDS = {f.name: f for f in fields(Spec)}

_STATIC, _TRACED = Spec.static_names(), Spec.traced_names()


def _flatten(spec: Spec):
    return [getattr(spec, n) for n in _TRACED], tuple(getattr(spec, n) for n in _STATIC)


def _flatten_with_keys(spec: Spec):
    return [(jax.tree_util.GetAttrKey(n), getattr(spec, n)) for n in _TRACED], \
        tuple(getattr(spec, n) for n in _STATIC)


def _unflatten(static: tuple, traced) -> Spec:
    """A spec rebuilt from its leaves, without ``__init__`` and so without its checks: JAX rebuilds
    specs whose traced fields hold tracers, abstract values, placeholder objects or zero
    cotangents, none of which is a spec a user wrote."""
    spec = object.__new__(Spec)
    for name, value in zip(_STATIC + _TRACED, (*static, *traced)):
        object.__setattr__(spec, name, value)
    return spec


# Static fields are pytree metadata (they select a compilation), traced fields are leaves.
jax.tree_util.register_pytree_with_keys(Spec, _flatten_with_keys, _unflatten, _flatten)


def parse_field(name: str, value: Any) -> Any:
    """A value for spec field ``name`` from text ("0.1", "inf", "lowrank", "16") or a number, checked
    against the field's range (:class:`SpecError` naming the field and the range otherwise)."""
    f = FIELDS.get(name)
    if f is None:
        raise SpecError(f"unknown spec field {name!r}")
    m = f.metadata
    if isinstance(value, str) and not m["choices"]:
        try:
            number = float(value)
        except ValueError:
            raise SpecError(f"{name}={value!r} is not a number: must be in {_range_text(m)}") from None
        is_int = f.type in ("int", int)
        if is_int and not (math.isfinite(number) and number.is_integer()):
            raise SpecError(f"{name}={value!r} is not a whole number: must be a whole number in {_range_text(m)}")
        value = int(number) if is_int else number
    _check_field(f, value)
    return value
