"""The suite machinery: what a suite declares, and how a study is checked, run and configured.

A **suite** is one small declaration (:class:`Suite`): a name and a one-line claim; its grid of
regimes (:class:`Regime`: a name, a spec, a problem count and the spec fields that make the regime
what it is) for each profile (``quick``: minutes on a laptop; ``default``; ``full``: the scale a
paper needs); its checks (functions from the loaded results to verdict rows); its headline table;
and its figures (:class:`Figure`: functions from the loaded results to a matplotlib figure). The
engine runs every regime; the store saves them; :mod:`rlhf_bounds.report` turns the saved
results into ``summary.md`` and the figures. Adding a suite is adding one module to this package
that defines ``SUITE``.

A **study** is what one ``rlhf-bounds run SUITE`` makes: the suite's regimes for one profile,
with any overrides applied, all run with one seed (so regimes are paired: problem i draws the same
θ*, prompts and uniforms wherever the static shapes agree), saved in one folder with its full
configuration (``config.json``), which ``--config`` reruns exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import store
from ..engine import Kernel, check_run_size, run, run_identity
from ..results import StudyResults
from ..simulate import KERNEL
from ..spec import FIELDS, Spec, SpecError, parse_field

__all__ = ["PROFILES", "Regime", "Figure", "Suite", "apply_overrides", "parse_set", "study_record", "check_study",
           "run_study", "study_config", "regimes_from_config"]

PROFILES = ("quick", "default", "full")


@dataclass(frozen=True)
class Regime:
    """One cell of a suite's grid: ``spec`` run on ``problems`` problems.

    ``defining`` names the spec fields that make the regime what it is (``tau`` of a ``clipped``
    regime): an override of one of them is refused unless forced. ``labels`` are the swept values
    shown as columns of the tidy table (default: the defining fields' values).
    """

    name: str
    spec: Spec
    problems: int
    defining: tuple[str, ...] = ()
    labels: dict[str, Any] = field(default_factory=dict)

    def swept(self) -> dict[str, Any]:
        """The regime's swept values: its labels, else its defining fields."""
        return dict(self.labels) if self.labels else {k: getattr(self.spec, k) for k in self.defining}


@dataclass(frozen=True)
class Figure:
    """A figure of a suite: saved as ``name``.png and ``name``.pdf; ``caption`` says what it shows."""

    name: str
    caption: str
    draw: Callable[[StudyResults], Any]


@dataclass(frozen=True)
class Suite:
    """A named verification suite (see the module docstring)."""

    name: str
    claim: str
    grid: Callable[[str], list[Regime]]
    checks: tuple[Callable[[StudyResults], list[dict]], ...] = ()
    headline: Callable[[StudyResults], str] | None = None
    figures: tuple[Figure, ...] = ()
    kernel: Kernel = KERNEL
    notes: str = ""

    def regimes(self, profile: str = "default") -> list[Regime]:
        """The suite's grid for ``profile`` (``quick``, ``default`` or ``full``)."""
        if profile not in PROFILES:
            raise SpecError(f"profile={profile!r} is not allowed: must be one of {', '.join(PROFILES)}")
        return self.grid(profile)


# ---- overrides ------------------------------------------------------------------------------

def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["beta=0.1", "feature-law=lowrank"]`` → ``{"beta": 0.1, "feature_law": "lowrank"}``, each value
    parsed and range-checked as its spec field (:class:`SpecError` naming the field otherwise)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or not name:
            raise SpecError(f"--set {item!r} is not of the form field=value")
        if name not in FIELDS:
            raise SpecError(f"--set {name}: unknown spec field (see 'rlhf-bounds run --help' for the fields)")
        out[name] = parse_field(name, text.strip())
    return out


def apply_overrides(regimes: list[Regime], overrides: dict[str, Any], *, force: bool = False,
                    problems: int | None = None, suite_name: str = "") -> list[Regime]:
    """Every regime with ``overrides`` set on its spec (and ``problems`` problems, if given).

    An override of a regime's defining field is refused (:class:`SpecError`) unless ``force``:
    ``--set tau=0.2`` on the ``clipped`` regime of ``decomposition`` would change what the regime is.
    """
    out = []
    for r in regimes:
        clash = [k for k in overrides if k in r.defining and overrides[k] != getattr(r.spec, k)]
        if clash and not force:
            k = clash[0]
            raise SpecError(f"{k}={overrides[k]!r} would change the defining field {k} of regime {r.name!r}"
                            f"{' of suite ' + suite_name if suite_name else ''} ({k}={getattr(r.spec, k)!r} there); "
                            "use --force-set to override it anyway, or the suite 'single' for one spec of your own")
        spec = r.spec.replace(**overrides) if overrides else r.spec
        out.append(dataclasses.replace(r, spec=spec, problems=r.problems if problems is None else problems))
    return out


# ---- studies --------------------------------------------------------------------------------

def study_record(regimes: list[Regime], seed: int, suite_name: str | None = None,
                 profile: str | None = None) -> dict[str, Any]:
    """The record a study folder holds (what a rerun into it must match to resume)."""
    names = [r.name for r in regimes]
    if len(set(names)) != len(names):
        raise SpecError(f"regime names must be unique, got {names}")
    counts = {r.name: r.problems for r in regimes}
    problems: Any = names and counts[names[0]]
    if len(set(counts.values())) > 1:
        problems = counts
    record = {"suite": suite_name or "custom", "regimes": names, "problems": problems, "seed": seed}
    if profile is not None:
        record["profile"] = profile
    return record


def _regimes_of(regimes, problems: int | None) -> list[Regime]:
    """Accept (name, spec) pairs as well as :class:`Regime` s."""
    out = []
    for r in regimes:
        if isinstance(r, Regime):
            out.append(r if problems is None else dataclasses.replace(r, problems=problems))
        else:
            name, spec = r
            out.append(Regime(name, spec, problems if problems is not None else 1024))
    return out


def check_study(regimes, problems: int | None = None, *, seed: int = 0, out: str | os.PathLike | None = None,
                chunk_size: int | None = None, overwrite: bool = False, suite_name: str | None = None,
                profile: str | None = None, kernel: Kernel = KERNEL) -> dict[str, Any]:
    """Check a study before anything runs: every regime's spec and options, and the output folder.

    Returns the study record. Raises :class:`~rlhf_bounds.spec.SpecError` or
    :class:`~rlhf_bounds.store.RunError` (a folder holding another run or study, or not writable).
    """
    regimes = _regimes_of(regimes, problems)
    record = study_record(regimes, seed, suite_name, profile)
    identities = {r.name: run_identity(r.spec, r.problems, seed, chunk_size, kernel)[0] for r in regimes}
    for r in regimes:  # sizes that cannot fit are refused before anything is written or compiled
        check_run_size(r.spec, r.problems, identities[r.name]["chunk_size"], kernel, in_memory=out is None)
    if out is not None:
        store.check_study_folder(out, record, identities, overwrite)
        store.check_writable(Path(out))
    return record


def run_study(regimes, problems: int | None = None, *, seed: int = 0, out: str | os.PathLike | None = None,
              chunk_size: int | None = None, progress: bool = True, overwrite: bool = False,
              suite_name: str | None = None, profile: str | None = None, kernel: Kernel | None = None,
              config: dict | None = None) -> StudyResults:
    """Run every regime of a study and return all results.

    ``regimes``: :class:`Regime` s, or (name, spec) pairs run on ``problems`` problems each
    (default 1024). Everything is checked (:func:`check_study`) before the first regime runs;
    with ``out``, the study record and ``config`` (default :func:`study_config`) are saved
    there, and each regime in its own run folder. Rerunning the same call resumes.
    """
    regimes = _regimes_of(regimes, problems)
    kernel = KERNEL if kernel is None else kernel
    record = check_study(regimes, seed=seed, out=out, chunk_size=chunk_size, overwrite=overwrite,
                         suite_name=suite_name, profile=profile, kernel=kernel)
    folder = Path(out) if out is not None else None
    config = config or study_config(regimes, seed, suite_name, profile, chunk_size)
    if folder is not None:
        store.prepare_study_folder(folder, record)
        store.write_config(folder, config)
    results = {}
    for i, r in enumerate(regimes):
        results[r.name] = run(r.spec, r.problems, kernel=kernel, seed=seed,
                              out=None if folder is None else store.regime_folder(folder, r.name),
                              chunk_size=chunk_size, progress=progress, overwrite=overwrite,
                              label=f"[{i + 1}/{len(regimes)}] {r.name}")
    return StudyResults(results, record, folder, config)


# ---- configuration round trip ---------------------------------------------------------------

def study_config(regimes: list[Regime], seed: int, suite_name: str | None, profile: str | None,
                 chunk_size: int | None = None) -> dict[str, Any]:
    """The full grid of a study as plain data: every spec field of every regime, problem counts,
    seed, profile. ``rlhf-bounds run --config FILE`` reruns it exactly."""
    return {
        "suite": suite_name or "custom",
        "profile": profile,
        "seed": seed,
        "chunk_size": chunk_size,
        "regimes": [{"name": r.name, "problems": r.problems, "defining": list(r.defining),
                     "labels": {k: _plain(v) for k, v in r.swept().items()}, "spec": _plain_spec(r.spec)}
                    for r in regimes],
    }


def _plain(v):
    return ("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v


def _plain_spec(spec: Spec) -> dict[str, Any]:
    return {k: _plain(v) for k, v in spec.to_dict().items()}


def regimes_from_config(config: dict[str, Any]) -> list[Regime]:
    """The regimes of a configuration written by :func:`study_config` (:class:`SpecError` if malformed)."""
    regimes = config.get("regimes")
    if not isinstance(regimes, list) or not regimes:
        raise SpecError("config: no list of regimes")
    out = []
    for i, r in enumerate(regimes):
        if not isinstance(r, dict) or not isinstance(r.get("spec"), dict) or "name" not in r:
            raise SpecError(f"config: regime {i} needs a name and a spec")
        spec_values = {k: parse_field(k, v) if isinstance(v, str) else v for k, v in r["spec"].items()}
        problems = r.get("problems", 1024)
        if isinstance(problems, bool) or not isinstance(problems, int) or problems < 1:
            raise SpecError(f"config: regime {r['name']!r}: problems={problems!r} must be a whole number ≥ 1")
        out.append(Regime(str(r["name"]), Spec.from_dict(spec_values), problems, tuple(r.get("defining", ())),
                          dict(r.get("labels", {}))))
    return out


# ---- how long a study takes -----------------------------------------------------------------

#: Seconds per work unit (one feature multiply-add of the model below) and per compilation, measured
#: with the default kernel on the 2-core development machine (AMD EPYC; W1: 2.8 M units in about 2.9 ms).
SECONDS_PER_UNIT = 1.0e-9
COMPILE_SECONDS = {"b1": 8.0, "all": 14.0}


def work_units(spec: Spec) -> float:
    """A rough count of one problem's work: training (T steps of b prompts, or n for GA), evaluation
    (M prompts, three passes), and with ``bounds='all'`` the Gaussian posterior's draws and the Occam point."""
    from ..learners import batch_size
    per_prompt = spec.actions * spec.d
    train = spec.steps * batch_size(spec) * per_prompt * (1 + spec.rollouts / 8)
    evaluation = 3 * spec.eval_prompts * per_prompt + spec.pref_pairs * spec.d * spec.d
    posterior = 0.5 * (spec.posterior_draws + 1) * (spec.eval_prompts + spec.prompts) * per_prompt
    return train + evaluation + (posterior if spec.bounds == "all" else 0.0)


def estimate_seconds(regimes: list[Regime], kernel: Kernel | None = None) -> float:
    """Estimated wall time of a study on this machine: work units × :data:`SECONDS_PER_UNIT` plus one
    compilation per distinct static spec (the estimate is within a factor of about 2: CPUs differ).

    A kernel other than the default counts its own work with a ``work_units(spec)`` method in the
    same units (the OU chains, the replace-one retraining, the tightness redraws do)."""
    units = getattr(kernel, "work_units", None) or work_units
    statics = {tuple(getattr(r.spec, k) for k in Spec.static_names()): r.spec.bounds for r in regimes}
    compile_s = sum(COMPILE_SECONDS.get(b, 14.0) for b in statics.values())
    return compile_s + sum(r.problems * units(r.spec) for r in regimes) * SECONDS_PER_UNIT


def estimate_basis() -> str:
    """What :func:`estimate_seconds` assumes, in one line."""
    return (f"a work model calibrated on a 2-core AMD EPYC ({SECONDS_PER_UNIT * 1e9:.1f} ns per unit, "
            f"{COMPILE_SECONDS['all']:.0f} s per compilation); expect up to 2x more on slower CPUs")
