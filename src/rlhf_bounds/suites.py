"""Studies: named grids of specs run by the same engine.

A study is an ordered list of (regime name, :class:`Spec`). Every regime is
one engine run, saved in its own sub-folder; all regimes share the seed, so
regime comparisons are paired (problem i draws the same θ*, prompts and
uniforms wherever the static shapes agree).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from . import store
from .engine import Kernel, run, run_identity
from .results import StudyResults
from .simulate import KERNEL
from .spec import Spec, SpecError

__all__ = ["SUITES", "suite", "run_study", "check_study", "study_record", "DEFAULT_PROBLEMS"]

DEFAULT_PROBLEMS = 1024


def _decomposition(base: Spec) -> list[tuple[str, Spec]]:
    """The default study: one regime per term of the gap decomposition (THEORY.md §6).

    * ``oracle``: r̂ = r*, realizable, τ = ∞: only the sampling term is non-zero;
    * ``reward-model``: the Bradley-Terry MLE from reference-policy data adds the reward-shift term;
    * ``shifted``: preference data from an adversarially shifted μ (s = −1): large χ²;
    * ``clipped``: τ = 0.5 adds the clipping term;
    * ``misspecified``: σ_ξ = 0.5 and τ = 1: no linear reward fits r*.
    """
    return [
        ("oracle", base.replace(reward_model="oracle")),
        ("reward-model", base.replace(reward_model="mle")),
        ("shifted", base.replace(reward_model="mle", shift=-1.0)),
        ("clipped", base.replace(reward_model="mle", tau=0.5)),
        ("misspecified", base.replace(reward_model="mle", sigma_xi=0.5, tau=1.0)),
    ]


def _single(base: Spec) -> list[tuple[str, Spec]]:
    """One regime: the spec exactly as given by the options."""
    return [("single", base)]


#: Suite name → function of a base spec giving the regimes.
SUITES: dict[str, Callable[[Spec], list[tuple[str, Spec]]]] = {
    "decomposition": _decomposition,
    "single": _single,
}


def suite(name: str, **overrides: Any) -> list[tuple[str, Spec]]:
    """The regimes of suite ``name``; ``overrides`` set spec fields in every regime (after the suite's own)."""
    if name not in SUITES:
        raise SpecError(f"suite={name!r} is not allowed: must be one of {', '.join(SUITES)}")
    base = Spec().replace(**overrides) if overrides else Spec()
    regimes = SUITES[name](base)
    return [(rname, spec.replace(**overrides) if overrides else spec) for rname, spec in regimes]


def study_record(regimes: list[tuple[str, Spec]], problems: int, seed: int, suite_name: str | None = None
                 ) -> dict[str, Any]:
    """The record a study folder holds (what a rerun into it must match to resume)."""
    names = [name for name, _ in regimes]
    if len(set(names)) != len(names):
        raise SpecError(f"regime names must be unique, got {names}")
    return {"suite": suite_name or "custom", "regimes": names, "problems": problems, "seed": seed}


def check_study(regimes: list[tuple[str, Spec]], problems: int, *, seed: int = 0,
                out: str | os.PathLike | None = None, chunk_size: int | None = None, overwrite: bool = False,
                suite_name: str | None = None, kernel: Kernel = KERNEL) -> dict[str, Any]:
    """Check a study before anything runs: every regime's spec and options, and the output folder.

    Returns the study record. Raises :class:`~rlhf_bounds.spec.SpecError` or
    :class:`~rlhf_bounds.store.RunError` (a folder holding another run or study, or not writable).
    """
    record = study_record(regimes, problems, seed, suite_name)
    identities = {name: run_identity(spec, problems, seed, chunk_size, kernel)[0] for name, spec in regimes}
    if out is not None:
        store.check_study_folder(out, record, identities, overwrite)
        store.check_writable(Path(out))
    return record


def run_study(regimes: list[tuple[str, Spec]] | str, problems: int = DEFAULT_PROBLEMS, *, seed: int = 0,
              out: str | os.PathLike | None = None, chunk_size: int | None = None, progress: bool = True,
              overwrite: bool = False, suite_name: str | None = None, kernel: Kernel | None = None
              ) -> StudyResults:
    """Run every regime of a study (a suite name or a list of (name, spec)) and return all results.

    Everything is checked (:func:`check_study`) before the first regime runs.
    """
    if isinstance(regimes, str):
        suite_name = suite_name or regimes
        regimes = suite(regimes)
    kernel = KERNEL if kernel is None else kernel
    record = check_study(regimes, problems, seed=seed, out=out, chunk_size=chunk_size, overwrite=overwrite,
                         suite_name=suite_name, kernel=kernel)
    folder = Path(out) if out is not None else None
    if folder is not None:
        store.prepare_study_folder(folder, record)
    results = {}
    for i, (name, spec) in enumerate(regimes):
        results[name] = run(spec, problems, kernel=kernel, seed=seed,
                            out=None if folder is None else store.regime_folder(folder, name),
                            chunk_size=chunk_size, progress=progress, overwrite=overwrite,
                            label=f"[{i + 1}/{len(regimes)}] {name}")
    return StudyResults(results, record, folder)
