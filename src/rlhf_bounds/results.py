"""Results of a run (one spec) and of a study (several named specs), saved and loaded.

A run's folder holds ``record.json`` (spec, seed, problem count, chunk size,
machine, versions, timings) and ``chunks/chunk-NNNNNN.npz`` (per-problem
columns and small arrays). A study's folder holds ``study.json`` and one run
folder per regime. ``rlhf_bounds.load(path)`` reads either back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .spec import Spec

__all__ = ["Results", "StudyResults", "load", "read_record", "read_json", "write_json_atomic", "chunk_files",
           "LoadError"]

_CHUNK = re.compile(r"chunk-(\d{6})\.npz$")


class LoadError(RuntimeError):
    """A path does not hold saved results."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def read_record(folder: Path) -> dict[str, Any]:
    """The run record ``folder/record.json`` (OSError if missing, ValueError if not valid JSON)."""
    with open(Path(folder) / "record.json") as fh:
        return json.load(fh)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or :class:`LoadError` saying why it cannot be read."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as err:
        raise LoadError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    except ValueError as err:
        raise LoadError(f"{path}: the {what} is damaged (not valid JSON: {err})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: the {what} is damaged (not a JSON object)")
    return data


def chunk_files(folder: Path) -> dict[int, Path]:
    """The finished chunk files of a run folder, by chunk number."""
    out = {}
    for path in sorted((Path(folder) / "chunks").glob("chunk-*.npz")):
        m = _CHUNK.search(path.name)
        if m:
            out[int(m.group(1))] = path
    return out


def _damaged(path: Path, why: str) -> LoadError:
    return LoadError(f"{path}: damaged chunk file ({why}); rerun the same command to recompute it")


@contextmanager
def _open_chunk(path: Path):
    """``np.load`` of one chunk file; whatever numpy raises inside becomes a :class:`LoadError` naming it."""
    try:
        with np.load(path) as z:
            if "problem" not in z.files:
                raise ValueError("no problem column")
            yield z
    except Exception as err:  # a damaged file: say which, whatever numpy raised
        raise _damaged(path, f"{type(err).__name__}: {err}") from None


def _read_chunk(path: Path, *names: str) -> dict[str, np.ndarray]:
    """The columns ``names`` (default all) of one chunk file."""
    with _open_chunk(path) as z:
        return {k: z[k] for k in (names or z.files)}


def _chunk_index(path: Path) -> tuple[set[str], np.ndarray]:
    """The column names and the problem numbers of one chunk file (one opening, one column read)."""
    with _open_chunk(path) as z:
        return set(z.files), z["problem"]


def _place(out: np.ndarray, start: int, v: np.ndarray, rows: int, path: Path, name: str) -> None:
    """Copy one chunk's column ``v`` (``rows`` problems) into ``out`` from row ``start``."""
    if v.shape != (rows, *out.shape[1:]):
        raise _damaged(path, f"column {name} has shape {v.shape}")
    out[start:start + rows] = v


#: Runs whose results would take more memory than this load lazily (see :meth:`Results.from_folder`).
LAZY_BYTES = 256 * 2**20


class _LazyColumns(Mapping):
    """Columns of a run folder, each read from every chunk file on first access and then kept."""

    def __init__(self, files: list[Path], lengths: list[int], layout: dict, names: list[str],
                 order: np.ndarray | None):
        self._files, self._lengths, self._layout, self._names, self._order = files, lengths, layout, names, order
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            dtype, shape = self._layout[name]
            out = np.empty((sum(self._lengths), *shape), dtype)
            start = 0
            for path, m in zip(self._files, self._lengths):
                _place(out, start, _read_chunk(path, name)[name], m, path, name)
                start += m
            self._loaded[name] = out if self._order is None else out[self._order]
        return self._loaded[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


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
        """Load a run folder.

        Eagerly (``lazy=False``), every column is filled one chunk file at a time, so memory is the
        results plus one chunk. Lazily (``lazy=True``), only the problem numbers are read now and each
        other column is read from the chunk files the first time it is asked for (then kept), so
        memory grows with the columns used, not with all of them. ``lazy=None`` (the default) loads
        lazily when the results would take more than ``LAZY_BYTES`` (256 MiB: about 220,000 W1
        problems).
        """
        folder = Path(folder)
        if not (folder / "record.json").exists():
            raise LoadError(f"{folder} holds no record.json: not a run folder")
        record = read_json(folder / "record.json", "run record")
        if not isinstance(record.get("spec"), dict):
            raise LoadError(f"{folder / 'record.json'}: the run record is damaged (it holds no spec)")
        files = [path for _, path in sorted(chunk_files(folder).items())]
        if not files:
            raise LoadError(f"{folder} holds no finished chunks: no saved results there")
        first = _read_chunk(files[0])
        layout = {k: (v.dtype, v.shape[1:]) for k, v in first.items()}
        problems = [first["problem"]]
        for path in files[1:]:
            names, problem = _chunk_index(path)
            if names != set(layout):
                raise LoadError(f"{folder}: chunk files hold different columns (written by different versions?)")
            problems.append(problem)
        lengths = [len(p) for p in problems]
        problem = np.concatenate(problems)
        nbytes = sum(len(problem) * dtype.itemsize * int(np.prod(shape)) for dtype, shape in layout.values())
        if lazy is None:
            lazy = nbytes > LAZY_BYTES
        if lazy:
            order = np.argsort(problem, kind="stable") if np.any(np.diff(problem) < 0) else None
            columns, arrays = (_LazyColumns(files, lengths, layout, [k for k, (_, s) in layout.items() if bool(s) == nd],
                                            order) for nd in (False, True))
            columns._loaded["problem"] = problem if order is None else problem[order]
            self = cls.__new__(cls)
            self._set(columns, arrays, record, folder, len(problem), nbytes)
            return self
        data = {k: np.empty((len(problem), *shape), dtype) for k, (dtype, shape) in layout.items()}
        start = 0
        for i, (path, m) in enumerate(zip(files, lengths)):
            chunk = first if i == 0 else _read_chunk(path)
            for k, v in chunk.items():
                _place(data[k], start, v, m, path, k)
            start += m
            first = chunk = None
        return cls(data, record, folder)

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    @property
    def lazy(self) -> bool:
        """Whether columns are read from the run folder when first used (:meth:`from_folder`)."""
        return isinstance(self.columns, _LazyColumns)

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
        return self.record.get("status") == "complete" and len(self) == self.record.get("problems")

    @property
    def ok(self) -> np.ndarray:
        """Problems with no status flag (the ones that enter averages)."""
        return self["status"] == 0

    def to_pandas(self):
        """The per-problem columns as a pandas DataFrame (pandas must be installed)."""
        import pandas as pd
        return pd.DataFrame(dict(self.columns))

    def __repr__(self) -> str:
        return f"Results({len(self)} problems, {len(self.columns)} columns, spec: {self.spec.describe()})"


class StudyResults:
    """Results of a study: an ordered mapping from regime name to :class:`Results`."""

    def __init__(self, regimes: dict[str, Results], record: dict[str, Any], path: Path | None = None):
        self.regimes = regimes
        self.record = record
        self.path = path

    def __getitem__(self, name: str) -> Results:
        return self.regimes[name]

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
    if (folder / "study.json").exists():
        record = read_json(folder / "study.json", "study record")
        names = record.get("regimes")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LoadError(f"{folder / 'study.json'}: the study record is damaged (no list of regimes)")
        regimes = {}
        for name in names:  # an interrupted study: the regimes that have finished chunks
            sub = folder / name
            if (sub / "record.json").exists() and chunk_files(sub):
                regimes[name] = Results.from_folder(sub)
        if not regimes:
            raise LoadError(f"{folder} is a study folder whose regimes hold no finished chunks: "
                            "no saved results there")
        return StudyResults(regimes, record, folder)
    if (folder / "record.json").exists():
        return Results.from_folder(folder)
    raise LoadError(f"{folder} holds neither study.json nor record.json: no saved results there")
