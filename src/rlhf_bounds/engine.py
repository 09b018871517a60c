"""The engine: runs a kernel over many problems as compiled, sharded chunks and saves them.

This is the only module that knows about many problems. A run of ``problems`` problems from one
spec is cut into chunks; each chunk is one call of a compiled **kernel** (default
:data:`rlhf_bounds.simulate.KERNEL`, the whole simulation of :func:`rlhf_bounds.simulate.simulate_batch`)
whose problems are split across every device with ``shard_map`` (across hosts too once
``jax.distributed`` is initialised). Problem i's PRNG key is ``fold_in(problems_key, i)``.

A kernel is any hashable callable ``kernel(spec, keys, shared_key) -> {name: array}`` that is a
pure function of the spec, the P problems' keys ``[P]`` and the run's shared key, returning flat
per-problem columns and small arrays, each with leading axis P, and that has a ``name``
(recorded with the run). The engine gives every kernel the same chunking, sharding, progress
bar, status flags (a ``status`` column from :func:`rlhf_bounds.status.status_code` unless the
kernel returns its own), saving and resume.

Saving goes through :mod:`rlhf_bounds.store`: each finished chunk is written at once,
atomically, so an interrupted run loses no finished work, and running the same call again
resumes (the progress line says how many chunks are skipped). A folder written by a different
run (another kernel, spec, seed, problem count or chunk size) is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import store
from ._cpu_pool import cpu_pool_threads, run_devices
from ._version import __version__
from .results import Results
from .simulate import KERNEL
from .spec import Spec, SpecError
from .status import status_code
from .store import RunError

__all__ = ["run", "RunError", "Kernel", "kernel_name", "problem_keys", "chunk_indices", "chunk_kernel",
           "chunk_function", "compile_chunk", "simulate_one", "default_chunk_size", "machine_info",
           "check_run_options", "run_identity", "run_devices", "cpu_pool_threads"]

#: A kernel: ``kernel(spec, keys [P], shared_key) -> {name: [P, ...]}``, hashable, with a ``name``.
Kernel = Callable[[Spec, jax.Array, jax.Array], dict]


def kernel_name(kernel: Kernel) -> str:
    """The name a run records for its kernel: ``kernel.name``, else its qualified name."""
    name = getattr(kernel, "name", None)
    return name if isinstance(name, str) else f"{kernel.__module__}.{kernel.__qualname__}"


def problem_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(problems_key, shared_key) of a run: problem i uses fold_in(problems_key, i)."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def chunk_indices(lo: int, count: int, chunk: int) -> np.ndarray:
    """The problem numbers of a chunk of width ``chunk`` holding problems lo .. lo + count − 1.

    Lanes past ``count`` (the last chunk of a run) repeat problem ``lo``; their results are dropped.
    """
    idx = np.arange(lo, lo + chunk, dtype=np.int32)
    idx[count:] = lo
    return idx


def _with_status(spec: Spec, out: dict[str, jax.Array]) -> dict[str, jax.Array]:
    if "status" not in out:
        out = {**out, "status": jax.vmap(lambda o: status_code(spec, o))(out)}
    return out


def _chunk(spec: Spec, problems_key: jax.Array, shared_key: jax.Array, idx: jax.Array,
           kernel: Kernel = KERNEL) -> dict[str, jax.Array]:
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(problems_key, idx)
    return _with_status(spec, kernel(spec, keys, shared_key))


chunk_kernel = jax.jit(_chunk, static_argnames="kernel")
chunk_kernel.__doc__ = "jit of ``kernel`` over the problem indices ``idx`` of one chunk, on one device."


def chunk_function(mesh: Mesh, kernel: Kernel = KERNEL):
    """The chunk computation (spec, problems_key, shared_key, idx) → results, over every device of ``mesh``.

    With several devices the problem axis is split with ``shard_map``: each device simulates
    its own problems with no communication at all (a partitioned ``jit`` could split one
    problem's work across devices and insert collectives).
    """
    body = lambda spec, pk, sk, idx: _chunk(spec, pk, sk, idx, kernel)
    if mesh.size == 1:
        return body
    rep, split = PartitionSpec(), PartitionSpec("problems")
    return jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, rep, split), out_specs=split, check_vma=False)


_COMPILED: dict = {}

#: Default problems per device when several CPU devices are forced (see :func:`run_identity`).
CPU_MULTI_DEVICE_CHUNK = 32


def _static(spec: Spec) -> tuple:
    return tuple(getattr(spec, name) for name in Spec.static_names())


def _compiled(cache_key, build: Callable, *args):
    """Compile ``build`` for ``args`` once per ``cache_key``, under the classic threefry PRNG.

    The classic (non-partitionable) threefry is several times faster on CPU here, and each
    problem's draws stay whole on one device, since problems (not draws) are what is sharded.
    The package selects it on import too, so that direct calls draw the same numbers.
    """
    if cache_key not in _COMPILED:
        with jax.threefry_partitionable(False):
            _COMPILED[cache_key] = jax.jit(build).lower(*args).compile()
    return _COMPILED[cache_key]


def compile_chunk(spec: Spec, problems_key, shared_key, gidx: jax.Array, mesh: Mesh, kernel: Kernel = KERNEL):
    """The compiled chunk kernel that :func:`run` calls, for this kernel, static spec and chunk layout.

    Cached: regimes of a study that differ only in traced fields share one compilation. Call
    it as ``compiled(spec, problems_key, shared_key, gidx)``.
    """
    cache_key = ("chunk", kernel, _static(spec), gidx.shape, gidx.sharding)
    return _compiled(cache_key, chunk_function(mesh, kernel), spec, problems_key, shared_key, gidx)


def simulate_one(spec: Spec, key: jax.Array, shared_key: jax.Array, *, chunk_size: int | None = None,
                 kernel: Kernel = KERNEL) -> dict[str, jax.Array]:
    """One problem's results exactly as :func:`run` computes them (see :func:`rlhf_bounds.simulate`).

    ``kernel`` compiled as :func:`compile_chunk` compiles it, on one device, for a chunk of
    ``chunk_size`` problems (default :func:`default_chunk_size`) with ``key`` in every lane.
    """
    spec = _normalise(spec)
    chunk = default_chunk_size(spec) if chunk_size is None else check_run_options(1, 0, chunk_size)[2]

    def one(spec, key, shared_key):
        return _with_status(spec, kernel(spec, jnp.broadcast_to(key, (chunk,)), shared_key))

    compiled = _compiled(("one", kernel, _static(spec), chunk), one, spec, key, shared_key)
    return {k: v[0] for k, v in compiled(spec, key, shared_key).items()}


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


def _global_indices(idx: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The chunk's problem indices as one global array sharded over the problem axis (multi-host safe)."""
    return jax.make_array_from_callback(idx.shape, sharding, lambda s: idx[s])


def _to_host(tree: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return {k: np.asarray(v) for k, v in tree.items()}


def run(spec: Spec, problems: int = 1024, *, kernel: Kernel | None = None, seed: int = 0,
        out: str | os.PathLike | None = None, chunk_size: int | None = None, progress: bool = True,
        overwrite: bool = False, label: str | None = None) -> Results:
    """Run ``kernel`` (default: the whole simulation) on ``problems`` independent problems from ``spec``.

    With ``out`` the results are saved there chunk by chunk (and reloadable by
    :func:`rlhf_bounds.load`); rerunning the same call resumes. ``chunk_size``
    problems are computed per compiled call (rounded up to a multiple of the
    device count); every problem has its own key whatever the chunking.
    """
    kernel = KERNEL if kernel is None else kernel
    identity, spec = run_identity(spec, problems, seed, chunk_size, kernel)
    problems, seed, chunk = identity["problems"], identity["seed"], identity["chunk_size"]
    n_chunks = -(-problems // chunk)
    folder = Path(out) if out is not None else None
    is_writer = jax.process_index() == 0
    fresh = {**identity, "status": "running", "machine": machine_info(), "timings": {}}
    if folder is not None and is_writer:
        record = store.prepare_run_folder(folder, identity, overwrite, fresh)
    else:
        record = fresh

    mesh = Mesh(np.array(run_devices()), ("problems",))
    sharding = NamedSharding(mesh, PartitionSpec("problems"))
    problems_key, shared_key = problem_keys(seed)

    done: dict[int, dict[str, np.ndarray] | None] = {}
    saved = store.chunk_files(folder) if folder is not None else {}
    for c, path in saved.items():
        if c < n_chunks and store.chunk_intact(path, c * chunk, min(chunk, problems - c * chunk)):
            done[c] = None  # loaded from the folder at the end
    todo = [c for c in range(n_chunks) if c not in done]

    bar = _Progress(n_chunks, label or "simulating", progress and is_writer)
    compiled, compile_s = None, 0.0
    chunk_seconds = []
    problems_done = 0
    bar.announce_resume(len(done), folder)
    resumed_from = saved[min(done)] if done and todo else None
    bar.update(len(done), 0)
    for c in todo:
        lo = c * chunk
        count = min(chunk, problems - lo)
        gidx = _global_indices(chunk_indices(lo, count, chunk), sharding)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = compile_chunk(spec, problems_key, shared_key, gidx, mesh, kernel)
            compile_s = time.perf_counter() - t0
            bar.restart_clock()
        t0 = time.perf_counter()
        result = _to_host(compiled(spec, problems_key, shared_key, gidx))
        chunk_seconds.append(time.perf_counter() - t0)
        result = {k: v[:count] for k, v in result.items()}
        result["problem"] = np.arange(lo, lo + count, dtype=np.int64)
        if resumed_from is not None:  # once: the saved chunks must hold what this code computes
            store.check_same_columns(resumed_from, result, folder)
            resumed_from = None
        if folder is not None and is_writer:
            store.write_chunk(folder, c, result)
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
        store.write_record(folder, record)
        return Results.from_folder(folder)
    return Results.from_chunks([done[c] for c in range(n_chunks)], record)


def check_run_options(problems: Any, seed: Any, chunk_size: Any = None) -> tuple[int, int, int | None]:
    """Check a run's options (:class:`SpecError` naming the option, the value and the range)."""
    return (_positive_int("problems", problems), _nonnegative_int("seed", seed),
            None if chunk_size is None else _positive_int("chunk_size", chunk_size))


def _normalise(spec: Spec) -> Spec:
    """The validated spec with its traced fields as Python floats (so beta=1 and beta=1.0 share a kernel)."""
    spec = spec.validate()
    return dataclasses.replace(spec, **{name: float(getattr(spec, name)) for name in Spec.traced_names()})


def run_identity(spec: Spec, problems: int, seed: int = 0, chunk_size: int | None = None,
                 kernel: Kernel = KERNEL) -> tuple[dict[str, Any], Spec]:
    """(identity, normalised spec) of a run: what a run folder's record must match to be resumed.

    Validates the spec and options; the chunk size is the one actually used
    (default :func:`default_chunk_size`, rounded up to a multiple of the device count).
    """
    spec = _normalise(spec)
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
    return {"kernel": kernel_name(kernel), "spec": spec.to_dict(), "seed": seed, "problems": problems,
            "chunk_size": chunk}, spec


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpecError(f"{name}={value!r} out of range: must be a whole number ≥ 1")
    return int(value)


def _nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
        raise SpecError(f"{name}={value!r} out of range: must be a whole number in [0, 2^32)")
    return int(value)
