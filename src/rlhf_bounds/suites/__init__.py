"""Named verification suites, each one module of this package that defines ``SUITE``.

    import rlhf_bounds as rb
    from rlhf_bounds import suites
    suites.SUITES                                   # name → Suite (claim, grid, checks, figures)
    study = suites.run_suite("coverage", profile="quick", out="runs/coverage")
    rb.load("runs/coverage")                        # every regime, later

:mod:`rlhf_bounds.suites._framework` has what a suite declares; the command line is
``rlhf-bounds list`` / ``run SUITE [--quick|--full]`` / ``report DIR`` / ``export DIR --csv``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from typing import Any

from ..results import StudyResults
from ..spec import Spec, SpecError
from ._framework import (PROFILES, Figure, Regime, Suite, apply_overrides, check_study, estimate_basis,
                         estimate_seconds, parse_set, regimes_from_config, run_study, study_config, study_record)

__all__ = ["SUITES", "BROKEN", "DEFAULT_SUITE", "DEFAULT_PROBLEMS", "PROFILES", "Suite", "Regime", "Figure", "get", "suite",
           "suite_regimes", "run_suite", "run_study", "check_study", "study_record", "study_config",
           "regimes_from_config", "apply_overrides", "parse_set", "estimate_seconds", "estimate_basis"]

#: The suite ``rlhf-bounds run`` runs when none is named.
DEFAULT_SUITE = "decomposition"
#: Problems per regime of the default suite's default profile.
DEFAULT_PROBLEMS = 1024


#: Suite modules that failed to import: module name → the error, one line (a warning names each).
BROKEN: dict[str, str] = {}


def _discover() -> dict[str, Suite]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:  # one broken suite module must not take the others (and the CLI) down
            BROKEN[info.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"suite module {info.name!r} failed to import and is skipped ({BROKEN[info.name]})",
                          stacklevel=2)
            continue
        s = getattr(module, "SUITE", None)
        if isinstance(s, Suite):
            found[s.name] = s
    order = [DEFAULT_SUITE] + sorted(k for k in found if k not in (DEFAULT_SUITE, "single")) + ["single"]
    return {k: found[k] for k in order if k in found}


#: Suite name → :class:`Suite`, the default suite first.
SUITES: dict[str, Suite] = _discover()


def get(name: str) -> Suite:
    """The suite called ``name`` (:class:`SpecError` listing the suites otherwise)."""
    if name not in SUITES:
        raise SpecError(f"suite={name!r} is not allowed: must be one of {', '.join(SUITES)}")
    return SUITES[name]


def suite_regimes(name: str, profile: str = "default", overrides: dict[str, Any] | None = None, *,
                  force: bool = False, problems: int | None = None) -> list[Regime]:
    """The regimes of suite ``name`` for ``profile``, with ``overrides`` set on every spec
    (:func:`apply_overrides`: a regime's defining field only with ``force``)."""
    s = get(name)
    return apply_overrides(s.regimes(profile), overrides or {}, force=force, problems=problems, suite_name=name)


def suite(name: str, **overrides: Any) -> list[tuple[str, Spec]]:
    """The (name, spec) pairs of suite ``name``'s default profile, ``overrides`` set in every regime."""
    return [(r.name, r.spec) for r in suite_regimes(name, "default", overrides)]


def run_suite(name: str, profile: str = "default", *, seed: int = 0, out: str | os.PathLike | None = None,
              overrides: dict[str, Any] | None = None, force: bool = False, problems: int | None = None,
              chunk_size: int | None = None, progress: bool = True, overwrite: bool = False,
              regimes: list[Regime] | None = None) -> StudyResults:
    """Run suite ``name`` (its ``profile`` grid, or the given ``regimes``, e.g. from a config file) and,
    with ``out``, write its report (``summary.md`` and every figure) there."""
    from .. import report

    s = get(name)
    if regimes is None:
        regimes = suite_regimes(name, profile, overrides, force=force, problems=problems)
    results = run_study(regimes, seed=seed, out=out, chunk_size=chunk_size, progress=progress, overwrite=overwrite,
                        suite_name=name, profile=profile, kernel=s.kernel,
                        config=study_config(regimes, seed, name, profile, chunk_size))
    if out is not None:
        report.write_report(results)
    return results
