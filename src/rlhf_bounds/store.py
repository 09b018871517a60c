"""The run store: the one owner of the folder format in which runs and studies are saved.

A **run folder** holds::

    record.json                 the run record: its identity (kernel, spec, seed, problem count,
                                chunk size), status, machine, versions and timings
    chunks/chunk-NNNNNN.npz     one file per finished chunk: per-problem columns and small arrays,
                                with the problem numbers in the column ``problem``

A **study folder** holds ``study.json`` (suite, profile, regime names, problem counts, seed), its
full configuration ``config.json`` (every spec field of every regime: ``rlhf-bounds run --config``
reruns it), one run folder per regime, named for it, and what the report makes of them:
``summary.md`` and ``figures/NAME.png`` and ``.pdf``.

Every write is atomic (a temporary file, flushed and renamed), so an interrupted run never leaves
a half-written file that could be taken for a finished one. No other module names a file in
these folders: the engine, the suites, :mod:`rlhf_bounds.results` and the command line call the
functions here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RECORD", "STUDY", "CHUNKS", "IDENTITY", "DEFAULT_KERNEL", "LAZY_BYTES", "RunError", "LoadError",
           "json_default", "json_safe", "write_json_atomic", "read_json", "is_run", "is_study", "read_record",
           "identity_mismatch", "check_run_folder", "prepare_run_folder", "check_writable", "write_record",
           "chunk_files", "write_chunk", "chunk_intact", "check_same_columns", "read_study_record",
           "check_study_folder", "prepare_study_folder", "regime_folder", "write_config", "read_config",
           "summary_path", "figures_folder", "CONFIG", "SUMMARY", "FIGURES", "RunColumns", "load_run_columns"]

RECORD = "record.json"
STUDY = "study.json"
CONFIG = "config.json"
SUMMARY = "summary.md"
FIGURES = "figures"
CHUNKS = "chunks"
#: Record fields that identify a run: a folder whose record differs in any of them is refused.
IDENTITY = ("kernel", "spec", "seed", "problems", "chunk_size")
#: The kernel of a record that names none (written before kernels were recorded).
DEFAULT_KERNEL = "simulate"
#: Runs whose results would take more memory than this load lazily (see :func:`load_run_columns`).
LAZY_BYTES = 256 * 2**20

_CHUNK = re.compile(r"chunk-(\d{6})\.npz$")
_HINT = "use another output folder or --overwrite"


class RunError(RuntimeError):
    """A run cannot go ahead (bad option, or an output folder that belongs to another run)."""


class LoadError(RuntimeError):
    """A path does not hold saved results."""


# ---- JSON -----------------------------------------------------------------------------------

def json_default(x):
    """``json.dump``'s ``default=`` for what results hold: NumPy scalars and arrays, paths."""
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def json_safe(x: Any) -> Any:
    """``x`` with every non-finite float as the string "inf", "-inf" or "nan" (strict JSON has none).

    Python's ``json`` would write them as ``Infinity`` and ``NaN``, which other JSON parsers refuse
    (τ = ∞ is the default spec). Readers turn the strings back into floats where a number is
    expected (:meth:`rlhf_bounds.spec.Spec.from_dict`); :func:`identity_mismatch` compares in this form.
    NumPy scalars and arrays become Python numbers and lists on the way.
    """
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
    return x


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file).

    Strict JSON: non-finite floats are written as strings (:func:`json_safe`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(json_safe(data), fh, indent=2, default=json_default, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


# ---- run folders ----------------------------------------------------------------------------

def is_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a run record (and no study record)."""
    folder = Path(folder)
    return (folder / RECORD).exists() and not (folder / STUDY).exists()


def is_study(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a study record."""
    return (Path(folder) / STUDY).exists()


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run record of ``folder`` (None if it has none; :class:`RunError` if it cannot be read)."""
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    try:
        record = read_json(path, "run record")
    except LoadError as err:
        raise RunError(f"out={folder} holds an unreadable {RECORD} ({err}); {_HINT}") from None
    return record


def _show(d: Mapping, k: str) -> str:
    return repr(d[k]) if k in d else "absent"


def identity_mismatch(record: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """A description of the first identity field in which ``record`` differs from ``identity``, or None."""
    for field in IDENTITY:  # compared as written: a record read back holds "inf" where τ = ∞ (json_safe)
        there = json_safe(record.get(field, DEFAULT_KERNEL if field == "kernel" else None))
        here = json_safe(identity[field])
        if there == here:
            continue
        if field == "spec" and isinstance(there, dict):
            keys = list(here) + [k for k in there if k not in here]
            diffs = [f"{k}={_show(there, k)} there, {_show(here, k)} now" for k in keys
                     if (k in there) != (k in here) or there.get(k) != here.get(k)]
            return f"a different spec ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})"
        return f"a different {field} ({there!r} there, {here!r} now)"
    return None


def check_run_folder(out: str | os.PathLike, identity: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse ``out`` if it is a file or holds a different run (:class:`RunError`); writes nothing.

    ``identity`` holds the :data:`IDENTITY` fields of the run about to be made. With
    ``overwrite`` a different run is not refused (it will be discarded).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"out={out} is a file, not a folder")
    if overwrite:
        return
    record = read_record(out)
    if record is not None:
        why = identity_mismatch(record, identity)
        if why:
            raise RunError(f"out={out} holds a run with {why}; {_HINT}")


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that a file can be written there (:class:`RunError` if not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"out={folder} is not writable: {err.strerror or err}") from None


def prepare_run_folder(out: str | os.PathLike, identity: dict[str, Any], overwrite: bool,
                       new_record: dict[str, Any]) -> dict[str, Any]:
    """Make ``out`` ready for the run ``identity`` and return its record.

    Refuses a folder of another run (unless ``overwrite``, which discards it), checks that the
    folder can be written, removes temporary files a killed run left behind (they are never read)
    and, for a new run, writes ``new_record``. A resumed run gets the record it already has.
    """
    out = Path(out)
    check_run_folder(out, identity, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    check_writable(out / CHUNKS)
    for tmp in (out / CHUNKS).glob("*.tmp.npz"):
        tmp.unlink(missing_ok=True)
    record = read_record(out)
    if record is None:
        record = new_record
        write_record(out, record)
    return record


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the run record of ``folder`` (atomically)."""
    write_json_atomic(Path(folder) / RECORD, record)


def chunk_files(folder: str | os.PathLike) -> dict[int, Path]:
    """The finished chunk files of a run folder, by chunk number."""
    out = {}
    for path in sorted((Path(folder) / CHUNKS).glob("chunk-*.npz")):
        m = _CHUNK.search(path.name)
        if m:
            out[int(m.group(1))] = path
    return out


def write_chunk(folder: str | os.PathLike, c: int, result: dict[str, np.ndarray]) -> None:
    """Save chunk number ``c`` of a run (atomically: a temporary file, fsync, rename)."""
    final = Path(folder) / CHUNKS / f"chunk-{c:06d}.npz"
    tmp = final.with_suffix(".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **result)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def chunk_intact(path: Path, lo: int, count: int) -> bool:
    """Whether a saved chunk file reads back and holds exactly problems lo .. lo + count − 1."""
    try:
        with np.load(path) as z:
            return np.array_equal(z["problem"], np.arange(lo, lo + count))
    except Exception:  # any damage (truncated zip, missing column) means: recompute it
        return False


def check_same_columns(saved: Path, result: dict[str, np.ndarray], folder: Path) -> None:
    """Refuse to resume into chunks with other columns (written by another version of the kernel)."""
    with np.load(saved) as z:
        there = set(z.files)
    if there != set(result):
        diff = sorted(there ^ set(result))
        raise RunError(f"out={folder} holds chunks written by another version of the simulator (columns differ: "
                       f"{', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''}); {_HINT}")


# ---- study folders --------------------------------------------------------------------------

def write_config(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Save a study's full configuration beside its results."""
    write_json_atomic(Path(folder) / CONFIG, config)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A study configuration: a study folder's ``config.json``, or a configuration file itself."""
    path = Path(path)
    return read_json(path / CONFIG if path.is_dir() else path, "study configuration")


def summary_path(folder: str | os.PathLike) -> Path:
    """Where a study's report (Markdown) is written."""
    return Path(folder) / SUMMARY


def figures_folder(folder: str | os.PathLike) -> Path:
    """Where a study's figures are written (each as NAME.png and NAME.pdf)."""
    return Path(folder) / FIGURES


def regime_folder(folder: str | os.PathLike, name: str) -> Path:
    """The run folder of regime ``name`` inside a study folder."""
    return Path(folder) / name


def read_study_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The study record of ``folder`` (:class:`LoadError` if missing, unreadable or without regimes)."""
    path = Path(folder) / STUDY
    record = read_json(path, "study record")
    names = record.get("regimes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LoadError(f"{path}: the study record is damaged (no list of regimes)")
    return record


def check_study_folder(out: str | os.PathLike, study: dict[str, Any], identities: dict[str, dict[str, Any]],
                       overwrite: bool = False) -> None:
    """Refuse ``out`` before anything runs (:class:`RunError`); writes nothing.

    Refused: a file; a folder holding a single run (not a study); a study whose record differs
    from ``study`` in any of its fields; a regime folder holding a different run than
    ``identities[name]``. With ``overwrite`` only a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"out={out} is a file, not a folder")
    if overwrite:
        return
    if is_run(out):
        raise RunError(f"out={out} holds a single run saved by rlhf_bounds.run, not a study; {_HINT}")
    if is_study(out):
        try:
            there = read_json(out / STUDY, "study record")
        except LoadError as err:
            raise RunError(f"out={out}: {err}; {_HINT}") from None
        for key, now in study.items():
            if there.get(key) != now:
                raise RunError(f"out={out} holds a study with a different {key} ({there.get(key)!r} there, "
                               f"{now!r} now); {_HINT}")
    for name, identity in identities.items():
        check_run_folder(regime_folder(out, name), identity)


def prepare_study_folder(out: str | os.PathLike, study: dict[str, Any]) -> None:
    """Create ``out`` (checked by :func:`check_study_folder` first), check it is writable, write the study record."""
    out = Path(out)
    check_writable(out)
    write_json_atomic(out / STUDY, study)


# ---- loading --------------------------------------------------------------------------------

def _damaged(path: Path, why: str) -> LoadError:
    return LoadError(f"{path}: damaged chunk file ({why}); rerun the same command to recompute it")


def _unreadable(path: Path, why: str) -> LoadError:
    return LoadError(f"{path}: the chunk file cannot be read (truncated, or not a chunk file: {why}); "
                     "rerun the same command to recompute it")


@contextmanager
def _open_chunk(path: Path):
    """``np.load`` of one chunk file; whatever numpy raises inside becomes a :class:`LoadError` naming it."""
    try:
        with np.load(path) as z:
            if "problem" not in z.files:
                raise ValueError("no problem column")
            yield z
    except Exception as err:  # a truncated or foreign file: say which, whatever numpy raised
        raise _unreadable(path, f"{type(err).__name__}: {err}") from None


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


class RunColumns(Mapping):
    """What :func:`load_run_columns` reads: ``columns`` (1-D) and ``arrays`` by name, the record,
    the problem count and the bytes everything takes once loaded; ``lazy`` when read on demand."""

    def __init__(self, columns: Mapping, arrays: Mapping, record: dict, length: int, nbytes: int, lazy: bool):
        self.columns, self.arrays, self.record = columns, arrays, record
        self.length, self.nbytes, self.lazy = length, nbytes, lazy

    def __getitem__(self, name):
        return self.columns[name] if name in self.columns else self.arrays[name]

    def __iter__(self):
        yield from self.columns
        yield from self.arrays

    def __len__(self) -> int:
        return len(self.columns) + len(self.arrays)


def load_run_columns(folder: str | os.PathLike, lazy: bool | None = None) -> RunColumns:
    """Read a run folder's record and per-problem results, sorted by problem number.

    Eagerly (``lazy=False``), every column is filled one chunk file at a time, so memory is the
    results plus one chunk. Lazily (``lazy=True``), only the problem numbers are read now and each
    other column is read from the chunk files the first time it is asked for (then kept), so
    memory grows with the columns used, not with all of them. ``lazy=None`` (the default) loads
    lazily when the results would take more than :data:`LAZY_BYTES` (256 MiB: about 220,000 W1
    problems).
    """
    folder = Path(folder)
    if not (folder / RECORD).exists():
        raise LoadError(f"{folder} holds no {RECORD}: not a run folder")
    record = read_json(folder / RECORD, "run record")
    if not isinstance(record.get("spec"), dict):
        raise LoadError(f"{folder / RECORD}: the run record is damaged (it holds no spec)")
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
    order = np.argsort(problem, kind="stable") if np.any(np.diff(problem) < 0) else None
    if lazy is None:
        lazy = nbytes > LAZY_BYTES
    if lazy:
        columns, arrays = (_LazyColumns(files, lengths, layout, [k for k, (_, s) in layout.items() if bool(s) == nd],
                                        order) for nd in (False, True))
        columns._loaded["problem"] = problem if order is None else problem[order]
        return RunColumns(columns, arrays, record, len(problem), nbytes, lazy=True)
    data = {k: np.empty((len(problem), *shape), dtype) for k, (dtype, shape) in layout.items()}
    start = 0
    for i, (path, m) in enumerate(zip(files, lengths)):
        chunk = first if i == 0 else _read_chunk(path)
        for k, v in chunk.items():
            _place(data[k], start, v, m, path, k)
        start += m
        first = chunk = None
    columns, arrays = {}, {}
    for k in list(data):
        v = data.pop(k)
        if order is not None:
            v = v[order]  # one reordered column at a time, the old one released
        (columns if v.ndim == 1 else arrays)[k] = v
    return RunColumns(columns, arrays, record, len(problem), nbytes, lazy=False)
