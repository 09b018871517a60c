"""Results of a run (one spec) and of a study (several named specs), in memory.

:class:`Results` holds one run's per-problem columns; :class:`StudyResults` the
runs of a study by regime name. ``rlhf_bounds.load(path)`` reads either back
from the folder a run or study was saved in (the folder format is
:mod:`rlhf_bounds.store`'s).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

from . import store
from .spec import Spec
from .store import LAZY_BYTES, LoadError, chunk_files, read_json, write_json_atomic

__all__ = ["Results", "StudyResults", "load", "LoadError", "PartialResultsWarning", "LAZY_BYTES", "read_json", "write_json_atomic",
           "chunk_files"]


class PartialResultsWarning(UserWarning):
    """Loaded results are a part of what was asked for (an interrupted run or study)."""


class Results:
    """Per-problem results of one spec: ``columns`` (1-D, one value per problem) and ``arrays``.

    ``results["gap_total"]`` is a NumPy array over problems; ``results.ok`` is
    the mask of problems with no status flag; ``results.spec`` the spec.
    ``columns`` and ``arrays`` are mappings from name to array; for a large run
    loaded from its folder they read each column on first access
    (:meth:`from_folder`).
    """

    def __init__(self, data: dict[str, np.ndarray], record: dict[str, Any], path: Path | None = None):
        order = None
        if "problem" in data and np.any(np.diff(data["problem"]) < 0):
            order = np.argsort(data["problem"], kind="stable")
        columns, arrays = {}, {}
        for k in list(data):
            v = data[k]
            if order is not None:
                v = data[k] = v[order]  # one reordered column at a time, the old one released
            (columns if v.ndim == 1 else arrays)[k] = v
        self._set(columns, arrays, record, path, len(next(iter(data.values()))) if data else 0,
                  sum(v.nbytes for v in data.values()))

    def _set(self, columns: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], record: dict[str, Any],
             path: Path | None, length: int, nbytes: int) -> None:
        self.columns, self.arrays, self.record, self.path = columns, arrays, record, path
        self._len, self._nbytes = length, nbytes

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_chunks(cls, chunks: list[dict[str, np.ndarray]], record: dict[str, Any],
                    path: Path | None = None) -> "Results":
        if not chunks:
            raise LoadError("no finished chunks")
        keys = chunks[0].keys()
        return cls({k: np.concatenate([c[k] for c in chunks]) for k in keys}, record, path)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, lazy: bool | None = None) -> "Results":
        """Load a run folder (:func:`rlhf_bounds.store.load_run_columns`: eagerly, or lazily, each
        column read from the chunk files on first use; by default lazily above ``LAZY_BYTES``)."""
        cols = store.load_run_columns(folder, lazy)
        self = cls.__new__(cls)
        self._set(cols.columns, cols.arrays, cols.record, Path(folder), cols.length, cols.nbytes)
        return self

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def lazy(self) -> bool:
        """Whether columns are read from the run folder when first used (:meth:`from_folder`)."""
        return not isinstance(self.columns, dict)

    @property
    def nbytes(self) -> int:
        """Bytes the results take in memory once every column is loaded."""
        return self._nbytes

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.columns:
            return self.columns[name]
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns or name in self.arrays

    @property
    def spec(self) -> Spec:
        return Spec.from_dict(self.record["spec"])

    @property
    def complete(self) -> bool:
        """Whether every problem of the run is here (an interrupted run loads its finished chunks only)."""
        return self.record.get("status") == "complete" and len(self) == self.record.get("problems")

    @property
    def missing(self) -> str | None:
        """What an unfinished run lacks, in a few words (None when complete)."""
        if self.complete:
            return None
        return f"{len(self)} of {self.record.get('problems', '?')} problems"

    @property
    def ok(self) -> np.ndarray:
        """Problems with no status flag (the ones that enter averages)."""
        return self["status"] == 0

    def to_pandas(self):
        """The per-problem columns as a pandas DataFrame (``pip install 'rlhf-bounds[pandas]'``)."""
        return _pandas().DataFrame(dict(self.columns))

    def __repr__(self) -> str:
        return f"Results({len(self)} problems, {len(self.columns)} columns, spec: {self.spec.describe()})"


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas needs pandas: pip install 'rlhf-bounds[pandas]' (or use "
                          "StudyResults.table(), or 'rlhf-bounds export DIR --csv')") from None
    return pandas


class StudyResults:
    """Results of a study: an ordered mapping from regime name to :class:`Results`.

    ``study["clipped"]`` is a regime's :class:`Results`; a study of one regime also answers for it
    directly (``study["gap_total"]``, ``study.ok``). ``study.table()`` (or ``.to_pandas()``) is one
    tidy table of every regime's per-problem columns with the regime and its swept fields as
    columns. ``complete`` is False when regimes or problems are missing (``missing`` says which).
    """

    def __init__(self, regimes: dict[str, Results], record: dict[str, Any], path: Path | None = None,
                 config: dict[str, Any] | None = None):
        self.regimes = regimes
        self.record = record
        self.path = path
        self.config = config or {}

    def __getitem__(self, name: str) -> Results | np.ndarray:
        if name in self.regimes:
            return self.regimes[name]
        if len(self.regimes) == 1:  # a one-regime study answers for its regime
            return next(iter(self.regimes.values()))[name]
        raise KeyError(f"{name!r} is not a regime of this study (regimes: {', '.join(self.regimes)}); "
                       f"use study[REGIME][{name!r}]")

    def __getattr__(self, name: str):
        regimes = self.__dict__.get("regimes", {})
        if len(regimes) == 1 and name in ("ok", "columns", "arrays", "spec"):
            return getattr(next(iter(regimes.values())), name)
        raise AttributeError(name)

    @property
    def expected(self) -> list[str]:
        """The regimes the study was run with (from its record)."""
        return list(self.record.get("regimes", list(self.regimes)))

    @property
    def missing(self) -> list[str]:
        """What is not finished: one entry per missing or partial regime (empty when complete)."""
        out = [f"{name}: not started" for name in self.expected if name not in self.regimes]
        out += [f"{name}: {res.missing}" for name, res in self.regimes.items() if not res.complete]
        return out

    @property
    def complete(self) -> bool:
        return not self.missing

    def swept(self, name: str) -> dict[str, Any]:
        """The swept values of regime ``name`` (from the study's configuration)."""
        for r in self.config.get("regimes", []):
            if r.get("name") == name:
                return dict(r.get("labels", {}))
        return {}

    def table(self) -> dict[str, np.ndarray]:
        """One tidy table over every regime: ``regime``, its swept fields, then every 1-D column
        (a column a regime lacks is NaN there). Columns as NumPy arrays of equal length."""
        names = list(self.regimes)
        swept_keys = sorted({k for n in names for k in self.swept(n)})
        cols: list[str] = []
        for res in self.regimes.values():
            cols += [c for c in res.columns if c not in cols]
        out: dict[str, list] = {"regime": [], **{k: [] for k in swept_keys}, **{c: [] for c in cols}}
        for name, res in self.regimes.items():
            m = len(res)
            out["regime"].append(np.full(m, name, dtype=object))
            sw = self.swept(name)
            for k in swept_keys:
                out[k].append(np.full(m, sw.get(k, None), dtype=object))
            for c in cols:
                out[c].append(res.columns[c] if c in res.columns else np.full(m, np.nan))
        return {k: np.concatenate(v) if v else np.array([]) for k, v in out.items()}

    def to_pandas(self):
        """:meth:`table` as a pandas DataFrame (``pip install 'rlhf-bounds[pandas]'``)."""
        return _pandas().DataFrame(self.table())

    def __iter__(self) -> Iterator[str]:
        return iter(self.regimes)

    def __len__(self) -> int:
        return len(self.regimes)

    def items(self):
        return self.regimes.items()

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {len(v)}" for k, v in self.regimes.items())
        return f"StudyResults({self.record.get('suite', '?')}: {inner})"


def load(path: str | os.PathLike) -> Results | StudyResults:
    """Load saved results: a run folder gives :class:`Results`, a study folder :class:`StudyResults`."""
    folder = Path(path)
    if not folder.exists():
        raise LoadError(f"{folder} does not exist: no saved results there")
    if not folder.is_dir():
        raise LoadError(f"{folder} is a file, not a results folder")
    if store.is_study(folder):
        record = store.read_study_record(folder)
        regimes = {}
        for name in record["regimes"]:  # an interrupted study: the regimes that have finished chunks
            sub = store.regime_folder(folder, name)
            if store.is_run(sub) and chunk_files(sub):
                regimes[name] = Results.from_folder(sub)
        if not regimes:
            raise LoadError(f"{folder} is a study folder whose regimes hold no finished chunks: "
                            "no saved results there")
        config = store.read_config(folder) if (folder / store.CONFIG).exists() else None
        study = StudyResults(regimes, record, folder, config)
        if not study.complete:
            warnings.warn(f"{folder} holds a partial study ({'; '.join(study.missing)}); rerun the command "
                          "that made it to finish it", PartialResultsWarning, stacklevel=2)
        return study
    if store.is_run(folder):
        res = Results.from_folder(folder)
        if not res.complete:
            warnings.warn(f"{folder} holds a partial run ({res.missing}); rerun the same call to finish it",
                          PartialResultsWarning, stacklevel=2)
        return res
    raise LoadError(f"{folder} holds neither {store.STUDY} nor {store.RECORD}: no saved results there")
