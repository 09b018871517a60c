"""The engine: runs many problems as compiled, vmapped, sharded chunks and saves them.

This is the only module that knows about many problems. A run of ``problems``
problems from one spec is cut into chunks; each chunk is one call of a
compiled :func:`rlhf_bounds.simulate.simulate_batch` kernel whose problems are
split across every device with ``shard_map`` (across hosts too once
``jax.distributed`` is initialised). Problem i's PRNG key is ``fold_in(problems_key, i)``, so its
results do not depend on the chunk size or the number of devices.

Each finished chunk is written at once, atomically (write to a temporary file,
then rename), so an interrupted run loses no finished work: running the same
call again resumes and skips finished chunks (the progress line says how many).
A temporary file left by a killed run is removed, and a chunk file that cannot
be read back, or holds other problems, is recomputed. A folder written by a
different run (another spec, seed, problem count or chunk size) is refused
rather than mixed in, with a message naming what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import __version__
from ._cpu_pool import run_devices
from .results import Results, chunk_files, read_record, write_json_atomic
from .simulate import simulate_batch
from .spec import Spec, SpecError

__all__ = ["run", "RunError", "problem_keys", "chunk_kernel", "chunk_function", "compile_chunk",
           "default_chunk_size", "default_finish_block", "machine_info",
           "check_run_options", "run_identity", "check_folder"]

RECORD = "record.json"
CHUNKS = "chunks"
#: Record fields that identify a run: a folder whose record differs in any of them is refused.
IDENTITY = ("spec", "seed", "problems", "chunk_size")


class RunError(RuntimeError):
    """A run cannot go ahead (bad option, or an output folder that belongs to another run)."""


def problem_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(problems_key, shared_key) of a run: problem i uses fold_in(problems_key, i)."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def _chunk(spec: Spec, problems_key: jax.Array, shared_key: jax.Array, idx: jax.Array,
           finish_block: int | None = None) -> dict[str, jax.Array]:
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(problems_key, idx)
    return simulate_batch(spec, keys, shared_key, finish_block)


chunk_kernel = jax.jit(_chunk, static_argnames="finish_block")
chunk_kernel.__doc__ = "jit(simulate_batch) over the problem indices ``idx`` of one chunk, on one device."


def default_finish_block() -> int | None:
    """Problems evaluated at once after training (see :func:`rlhf_bounds.simulate.simulate_batch`).

    On CPU, 16: sixteen W1 evaluation sets (16 MB) stay in cache, and blocks of 8–16 ran
    fastest (benchmarks/README.md). On an accelerator, the whole chunk at once.
    """
    return 16 if jax.default_backend() == "cpu" else None


def chunk_function(mesh: Mesh, finish_block: int | None):
    """The chunk computation (spec, problems_key, shared_key, idx) → results, over every device of ``mesh``.

    With several devices the problem axis is split with ``shard_map``: each device simulates
    its own problems with no communication at all (a partitioned ``jit`` could split one
    problem's work across devices and insert collectives).
    """
    body = functools.partial(_chunk, finish_block=finish_block)
    if mesh.size == 1:
        return body
    rep, split = PartitionSpec(), PartitionSpec("problems")
    return jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, rep, split), out_specs=split, check_vma=False)


_COMPILED: dict = {}

#: Default problems per device when several CPU devices are forced (see :func:`run_identity`).
CPU_MULTI_DEVICE_CHUNK = 32


def compile_chunk(spec: Spec, problems_key, shared_key, gidx: jax.Array, mesh: Mesh,
                  finish_block: int | None = None):
    """The compiled chunk kernel that :func:`run` calls, for this static spec and chunk layout.

    Cached: regimes of a study that differ only in traced fields share one compilation.
    ``finish_block`` defaults to :func:`default_finish_block`. Call it as
    ``kernel(spec, problems_key, shared_key, gidx)``.
    """
    if finish_block is None:
        finish_block = default_finish_block()
    static = tuple(getattr(spec, name) for name in Spec.static_names())
    cache_key = (static, gidx.shape, gidx.sharding, finish_block)
    if cache_key not in _COMPILED:
        # The classic (non-partitionable) threefry is several times faster on CPU here, and each
        # problem's draws stay whole on one device, since problems (not draws) are what is sharded.
        with jax.threefry_partitionable(False):
            kernel = jax.jit(chunk_function(mesh, finish_block))
            _COMPILED[cache_key] = kernel.lower(spec, problems_key, shared_key, gidx).compile()
    return _COMPILED[cache_key]


def default_chunk_size(spec: Spec) -> int:
    """Problems per compiled call: what keeps the training loop's vector lanes full within memory.

    The policies of a chunk are trained together with the problem axis last, so wider chunks
    amortise each step's fixed cost (benchmarks/README.md); the chunk's training sets (n·A·d
    floats per problem) are kept within about 64 MB, and on an accelerator its evaluation sets
    within about 1 GB.
    """
    train = 4 * spec.prompts * spec.actions * spec.d
    size = 64e6 // max(train, 1)
    if jax.default_backend() != "cpu":
        size = min(size, 1e9 // max(4 * spec.eval_prompts * spec.actions * spec.d * 3, 1))
    size = int(max(8, min(256, size)))
    return 1 << (size.bit_length() - 1)  # a power of two


def machine_info() -> dict[str, Any]:
    """The machine, for records and benchmarks: CPU, cores, backend, devices, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in run_devices()],
        "process_count": jax.process_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "rlhf_bounds": __version__,
    }


class _Progress:
    """A one-line progress bar over chunks on stderr (a line per 10% when not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_decile = -1
        self.resumed = 0

    def announce_resume(self, resumed: int, folder: Path) -> None:
        """Say that ``resumed`` finished chunks were found in ``folder`` and will be skipped."""
        self.resumed = resumed
        if self.enabled and resumed:
            sys.stderr.write(f"{self.label}: resuming from {folder}: {resumed} of {self.total} chunks already "
                             f"finished, skipping them\n")
            sys.stderr.flush()

    def restart_clock(self) -> None:
        """Start timing after compilation, so the rate and eta describe the compiled kernel."""
        self.start = time.perf_counter()

    def update(self, done: int, problems_done: int) -> None:
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        rate = problems_done / elapsed if elapsed > 0 else 0.0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"{self.label} [{bar}] {done}/{self.total} chunks"
        if problems_done:
            eta = elapsed * (self.total - done) / max(done - self.resumed, 1)
            line += f", {rate:,.0f} problems/s, eta {eta:,.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if done == self.total else ""))
            sys.stderr.flush()
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def _read_record(out: Path) -> dict[str, Any] | None:
    if not (out / RECORD).exists():
        return None
    try:
        record = read_record(out)
    except (OSError, ValueError) as err:
        raise RunError(f"out={out} holds an unreadable {RECORD} ({err}); use another output folder or "
                       "--overwrite") from None
    if not isinstance(record, dict):
        raise RunError(f"out={out} holds a {RECORD} that is not a run record; use another output folder or "
                       "--overwrite")
    return record


def _identity_mismatch(record: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """A description of the first identity field in which ``record`` differs from ``identity``, or None."""
    for field in IDENTITY:
        there, here = record.get(field), identity[field]
        if there == here:
            continue
        if field == "spec" and isinstance(there, dict):
            keys = list(here) + [k for k in there if k not in here]
            show = lambda d, k: repr(d[k]) if k in d else "absent"
            diffs = [f"{k}={show(there, k)} there, {show(here, k)} now" for k in keys
                     if (k in there) != (k in here) or there.get(k) != here.get(k)]
            return f"a different spec ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})"
        return f"a different {field} ({there!r} there, {here!r} now)"
    return None


def check_folder(out: str | os.PathLike, identity: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse ``out`` if it is a file or holds a different run (:class:`RunError`); writes nothing.

    ``identity`` is :func:`run_identity`'s first value. With ``overwrite`` a
    different run is not refused (it will be discarded).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"out={out} is a file, not a folder")
    if overwrite:
        return
    record = _read_record(out)
    if record is not None:
        why = _identity_mismatch(record, identity)
        if why:
            raise RunError(f"out={out} holds a run with {why}; use another output folder or --overwrite")


def _prepare_folder(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    check_folder(out, identity, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    try:
        (out / CHUNKS).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"out={out} is not writable: {err.strerror or err}") from None
    # A run killed while writing a chunk leaves its temporary file behind: it is never read, remove it.
    for tmp in (out / CHUNKS).glob("*.tmp.npz"):
        tmp.unlink(missing_ok=True)


def _check_same_columns(saved: Path, result: dict[str, np.ndarray], folder: Path) -> None:
    """Refuse to resume into chunks with other columns (written by another version of the simulator)."""
    with np.load(saved) as z:
        there = set(z.files)
    if there != set(result):
        diff = sorted(there ^ set(result))
        raise RunError(f"out={folder} holds chunks written by another version of the simulator (columns differ: "
                       f"{', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''}); use another output folder or "
                       "--overwrite")


def _chunk_intact(path: Path, lo: int, count: int) -> bool:
    """Whether a saved chunk file reads back and holds exactly problems lo .. lo + count − 1."""
    try:
        with np.load(path) as z:
            return np.array_equal(z["problem"], np.arange(lo, lo + count))
    except Exception:  # any damage (truncated zip, missing column) means: recompute it
        return False


def _global_indices(idx: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The chunk's problem indices as one global array sharded over the problem axis (multi-host safe)."""
    return jax.make_array_from_callback(idx.shape, sharding, lambda s: idx[s])


def _to_host(tree: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return {k: np.asarray(v) for k, v in tree.items()}


def run(spec: Spec, problems: int = 1024, *, seed: int = 0, out: str | os.PathLike | None = None,
        chunk_size: int | None = None, progress: bool = True, overwrite: bool = False,
        label: str | None = None) -> Results:
    """Simulate ``problems`` independent problems from ``spec`` and return their :class:`Results`.

    With ``out`` the results are saved there chunk by chunk (and reloadable by
    :func:`rlhf_bounds.load`); rerunning the same call resumes. ``chunk_size``
    problems are simulated per compiled call (rounded up to a multiple of the
    device count); the results do not depend on it.
    """
    identity, spec = run_identity(spec, problems, seed, chunk_size)
    problems, seed, chunk = identity["problems"], identity["seed"], identity["chunk_size"]
    n_chunks = -(-problems // chunk)
    folder = Path(out) if out is not None else None
    is_writer = jax.process_index() == 0
    if folder is not None and is_writer:
        _prepare_folder(folder, identity, overwrite)
        record = _read_record(folder)
        if record is None:
            record = {**identity, "status": "running", "machine": machine_info(), "timings": {}}
            write_json_atomic(folder / RECORD, record)
    else:
        record = {**identity, "status": "running", "machine": machine_info(), "timings": {}}

    mesh = Mesh(np.array(run_devices()), ("problems",))
    sharding = NamedSharding(mesh, PartitionSpec("problems"))
    problems_key, shared_key = problem_keys(seed)

    done: dict[int, dict[str, np.ndarray]] = {}
    if folder is not None:
        for c, path in chunk_files(folder).items():
            if c < n_chunks and _chunk_intact(path, c * chunk, min(chunk, problems - c * chunk)):
                done[c] = None  # loaded lazily by Results
    todo = [c for c in range(n_chunks) if c not in done]

    bar = _Progress(n_chunks, label or "simulating", progress and is_writer)
    compiled, compile_s = None, 0.0
    chunk_seconds = []
    problems_done = 0
    bar.announce_resume(len(done), folder)
    resumed_from = chunk_files(folder)[min(done)] if done and todo else None
    bar.update(len(done), 0)
    for c in todo:
        lo = c * chunk
        count = min(chunk, problems - lo)
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        idx[count:] = lo  # padding lanes repeat the first problem and are dropped
        gidx = _global_indices(idx, sharding)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = compile_chunk(spec, problems_key, shared_key, gidx, mesh)
            compile_s = time.perf_counter() - t0
            bar.restart_clock()
        t0 = time.perf_counter()
        result = _to_host(compiled(spec, problems_key, shared_key, gidx))
        chunk_seconds.append(time.perf_counter() - t0)
        result = {k: v[:count] for k, v in result.items()}
        result["problem"] = np.arange(lo, lo + count, dtype=np.int64)
        if resumed_from is not None:  # once: the saved chunks must hold what this code computes
            _check_same_columns(resumed_from, result, folder)
            resumed_from = None
        if folder is not None and is_writer:
            _write_chunk(folder, c, result)
            done[c] = None
        else:
            done[c] = result
        problems_done += count
        bar.update(len(done), problems_done)

    if todo or not record.get("timings"):  # a rerun of a finished run keeps the timings of the run that did it
        timings = {"compile_s": compile_s, "chunk_s": chunk_seconds,
                   "problems_per_s": (problems_done / sum(chunk_seconds)) if chunk_seconds else None}
        record.update(timings=timings)
    record.update(status="complete", resumed_chunks=n_chunks - len(todo))
    if folder is not None and is_writer:
        write_json_atomic(folder / RECORD, record)
        return Results.from_folder(folder)
    return Results.from_chunks([done[c] for c in range(n_chunks)], record)


def _write_chunk(folder: Path, c: int, result: dict[str, np.ndarray]) -> None:
    final = folder / CHUNKS / f"chunk-{c:06d}.npz"
    tmp = final.with_suffix(".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **result)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def check_run_options(problems: Any, seed: Any, chunk_size: Any = None) -> tuple[int, int, int | None]:
    """Check a run's options (:class:`SpecError` naming the option, the value and the range)."""
    return (_positive_int("problems", problems), _nonnegative_int("seed", seed),
            None if chunk_size is None else _positive_int("chunk_size", chunk_size))


def run_identity(spec: Spec, problems: int, seed: int = 0,
                 chunk_size: int | None = None) -> tuple[dict[str, Any], Spec]:
    """(identity, normalised spec) of a run: what a run folder's record must match to be resumed.

    Validates the spec and options; the chunk size is the one actually used
    (default :func:`default_chunk_size`, rounded up to a multiple of the device count).
    """
    spec = spec.validate()
    # Traced fields as Python floats, so that beta=1 and beta=1.0 share one compiled kernel.
    spec = dataclasses.replace(spec, **{name: float(getattr(spec, name)) for name in Spec.traced_names()})
    problems, seed, chunk_size = check_run_options(problems, seed, chunk_size)
    n_dev = len(run_devices())
    if chunk_size is not None:
        chunk = chunk_size
    else:
        chunk = default_chunk_size(spec)
        if n_dev > 1 and jax.default_backend() == "cpu":
            # Several forced host devices share one CPU, where the kernel already uses every core
            # on one device: small per-device chunks keep each device's LAPACK batches small
            # (a second guard besides the pool's spare thread, _cpu_pool.py).
            chunk = min(chunk, CPU_MULTI_DEVICE_CHUNK * n_dev)
        chunk = min(chunk, -(-problems // n_dev) * n_dev)  # no wider than the run (padding is wasted work)
    chunk = -(-chunk // n_dev) * n_dev
    return {"spec": spec.to_dict(), "seed": seed, "problems": problems, "chunk_size": chunk}, spec


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpecError(f"{name}={value!r} out of range: must be a whole number ≥ 1")
    return int(value)


def _nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
        raise SpecError(f"{name}={value!r} out of range: must be a whole number in [0, 2^32)")
    return int(value)
