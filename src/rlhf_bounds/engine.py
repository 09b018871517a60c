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
kernel returns its own), saving and resume. A kernel may also have a method
``compiler_options(backend) -> dict``: XLA options for its compilation on that backend
(:func:`kernel_compiler_options`; an option the installed XLA refuses is dropped with a warning).

Saving goes through :mod:`rlhf_bounds.store`: each finished chunk is written at once,
atomically, so an interrupted run loses no finished work, and running the same call again
resumes (the progress line says how many chunks are skipped). A folder written by a different
run (another kernel, spec, seed, problem count or chunk size) is refused rather than mixed in.
"""

from __future__ import annotations

import _thread
import dataclasses
import gc
import os
import platform
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, NamedTuple

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
           "chunk_function", "compile_chunk", "kernel_compiler_options", "xla_options", "simulate_one",
           "default_chunk_size", "machine_info", "check_run_options", "run_identity", "run_devices",
           "cpu_pool_threads", "chunk_memory_bytes", "chunk_memory_parts", "MemoryPart", "result_bytes",
           "memory_available", "check_run_size"]

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
CPU_MULTI_DEVICE_CHUNK = 128  # one lane block of the default kernel (learners.LANE_BLOCK): no padding


def _static(spec: Spec) -> tuple:
    return tuple(getattr(spec, name) for name in Spec.static_names())


def kernel_compiler_options(kernel: Kernel, backend: str | None = None) -> dict[str, Any]:
    """The XLA compiler options ``kernel`` asks for on ``backend`` (default: JAX's default backend):
    its ``compiler_options(backend)`` if it has one, else none."""
    get = getattr(kernel, "compiler_options", None)
    return dict(get(backend or jax.default_backend())) if get is not None else {}


_REFUSED_OPTIONS: set = set()
_EXTRA_OPTIONS: dict[str, Any] = {}


@contextmanager
def xla_options(options: dict[str, Any]):
    """Within the block, the engine compiles every kernel with ``options`` added to (and winning over)
    the kernel's own :func:`kernel_compiler_options`: XLA debug options by name, as
    ``Lowered.compile(compiler_options=...)`` takes them, which override ``XLA_FLAGS`` for these
    compilations only. For example ``{"xla_backend_optimization_level": 0}`` compiles a short
    exploratory run faster (the results are the same maths; the last bits may differ). Compilations
    are cached per set of options. An option XLA refuses is dropped with a warning."""
    global _EXTRA_OPTIONS
    previous = _EXTRA_OPTIONS
    _EXTRA_OPTIONS = {**previous, **dict(options)}
    try:
        yield
    finally:
        _EXTRA_OPTIONS = previous


def _compile(lowered, options: dict[str, Any]):
    """``lowered.compile`` with ``options``; without them (and a warning, once per set) if XLA refuses them."""
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except Exception as err:  # an option unknown to this jaxlib (or a value it rejects): compile as usual
        key = tuple(sorted(options.items()))
        if key not in _REFUSED_OPTIONS:
            _REFUSED_OPTIONS.add(key)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"XLA compiler options {dict(key)} not accepted ({first}); compiling without them",
                          RuntimeWarning, stacklevel=3)
        return lowered.compile()


def _compiled(cache_key, build: Callable, *args, options: dict[str, Any] | None = None):
    """Compile ``build`` for ``args`` once per ``cache_key``, under the classic threefry PRNG.

    The classic (non-partitionable) threefry is several times faster on CPU here, and each
    problem's draws stay whole on one device, since problems (not draws) are what is sharded.
    The package selects it on import too, so that direct calls draw the same numbers.
    ``options``: XLA compiler options (:func:`kernel_compiler_options`), with those of an enclosing
    :func:`xla_options` block added.
    """
    options = {**(options or {}), **_EXTRA_OPTIONS}
    cache_key = (cache_key, tuple(sorted(options.items())))
    if cache_key not in _COMPILED:
        with jax.threefry_partitionable(False):
            _COMPILED[cache_key] = _compile(jax.jit(build).lower(*args), options)
    return _COMPILED[cache_key]


def compile_chunk(spec: Spec, problems_key, shared_key, gidx: jax.Array, mesh: Mesh, kernel: Kernel = KERNEL):
    """The compiled chunk kernel that :func:`run` calls, for this kernel, static spec and chunk layout.

    Cached: regimes of a study that differ only in traced fields share one compilation. Call
    it as ``compiled(spec, problems_key, shared_key, gidx)``.
    """
    cache_key = ("chunk", kernel, _static(spec), gidx.shape, gidx.sharding)
    return _compiled(cache_key, chunk_function(mesh, kernel), spec, problems_key, shared_key, gidx,
                     options=kernel_compiler_options(kernel, mesh.devices.flat[0].platform))


def simulate_one(spec: Spec, key: jax.Array, shared_key: jax.Array, *, chunk_size: int | None = None,
                 kernel: Kernel = KERNEL) -> dict[str, jax.Array]:
    """One problem's results exactly as :func:`run` computes them (see :func:`rlhf_bounds.simulate`).

    ``kernel`` compiled on one device, under the engine's PRNG mode, for a chunk of
    ``chunk_size`` problems with ``key`` in every lane (default: one lane). The default kernel
    pads every chunk to its fixed blocks (:func:`rlhf_bounds.simulate.batch_block`), so its
    results do not depend on the chunk's width and one lane is problem i of any run bit for
    bit; ``chunk_size`` is for a kernel whose results do (give it the run's chunk size).
    """
    spec = _normalise(spec)
    chunk = 1 if chunk_size is None else check_run_options(1, 0, chunk_size)[2]

    def one(spec, key, shared_key):
        return _with_status(spec, kernel(spec, jnp.broadcast_to(key, (chunk,)), shared_key))

    compiled = _compiled(("one", kernel, _static(spec), chunk), one, spec, key, shared_key,
                         options=kernel_compiler_options(kernel))
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


class _ChunksLeft:
    """The chunks a run still has to compute, in order, without listing them (a run may have millions).

    ``finished`` is read once, when this is made: its length and its chunks stay what they were then.
    """

    def __init__(self, total: int, finished):
        self.total, self.finished = total, frozenset(finished)

    def __len__(self) -> int:
        return self.total - len(self.finished)

    def __iter__(self):
        return (c for c in range(self.total) if c not in self.finished)


#: What the compile notice says compilation takes the first time (the decomposition study's specs on
#: a 2-core CPU: 10–25 s; later runs in the same process reuse the compiled kernel and say nothing).
COMPILE_HINT = "10–30 s the first time"


class _CompileNotice:
    """Around the first compilation of a run: if it takes longer than half a second (it was not cached),
    say so on stderr, since the progress bar has nothing to show until the first chunk is done. On a
    terminal the line is then cleared, for the bar to take its place."""

    DELAY_S = 0.5

    def __init__(self, bar: "_Progress"):
        self.bar = bar
        self.shown = False
        self.timer = threading.Timer(self.DELAY_S, self._show)
        self.timer.daemon = True

    def _show(self) -> None:
        self.shown = True
        text = f"{self.bar.label}: compiling the kernel for this spec ({COMPILE_HINT})..."
        sys.stderr.write(("\r\x1b[K" + text) if self.bar.tty else text + "\n")
        sys.stderr.flush()

    def __enter__(self):
        if self.bar.enabled:
            self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        if self.timer.is_alive():
            self.timer.join()
        if self.shown and self.bar.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@contextmanager
def _interrupt_kept():
    """Around compilation: a Ctrl-C is never lost, however JAX handles what it raises.

    JAX 0.10's compile path reads the compiled executable's layouts and memory kinds inside bare
    ``except:`` clauses, and a SIGINT that arrives while XLA compiles in C++ is raised at the first
    Python line after it, which can be inside one of them; or it lands in JAX's garbage-collector
    callback, where Python prints the KeyboardInterrupt and ignores it. Either way the run went on
    (2 tries in 6 at the default spec). Inside the block SIGINT still raises KeyboardInterrupt at
    once, except in a gc callback, where it is delivered again a moment later; and it is
    remembered: if the block then ends normally, it is raised again here. Only where SIGINT has
    Python's default handler, in the main thread.
    """
    seen: list[int] = []
    later: list[threading.Timer] = []

    def remember(signum, frame):
        seen.append(signum)
        callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
        for _ in range(8):
            if frame is None:
                break
            if frame.f_code in callbacks:  # raised here, it would be printed and ignored
                later.append(threading.Timer(0.01, _thread.interrupt_main))
                later[-1].daemon = True
                later[-1].start()
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for timer in later:
            timer.cancel()
    if seen:
        raise KeyboardInterrupt


#: A run estimated to take longer than this (seconds) after its first chunk gets a warning on stderr.
LONG_RUN_S = 86400.0


def _warn_if_long(label: str, first_chunk_s: float, chunks_left: int, chunk: int) -> None:
    """Warn on stderr when ``chunks_left`` more chunks at the first chunk's time take longer than a day."""
    eta = first_chunk_s * chunks_left
    if eta <= LONG_RUN_S:
        return
    sys.stderr.write(f"{label}: warning: this run will take about {eta / 86400:,.1f} days ({chunks_left:,} more "
                     f"chunks of {chunk} problems at {first_chunk_s:.3g} s each, from the first chunk); finished "
                     "chunks are saved as they go: stop it with Ctrl-C and rerun the same command to resume, "
                     "or ask for fewer problems\n")
    sys.stderr.flush()


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
    check_run_size(spec, problems, chunk, kernel, in_memory=out is None)  # before anything is written or compiled
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
    todo = _ChunksLeft(n_chunks, done)

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
            with _CompileNotice(bar), _interrupt_kept():
                compiled = compile_chunk(spec, problems_key, shared_key, gidx, mesh, kernel)
            compile_s = time.perf_counter() - t0
            bar.update(len(done), 0)
            bar.restart_clock()
        t0 = time.perf_counter()
        result = _to_host(compiled(spec, problems_key, shared_key, gidx))
        chunk_seconds.append(time.perf_counter() - t0)
        if len(chunk_seconds) == 1 and is_writer:
            _warn_if_long(bar.label, chunk_seconds[0], len(todo) - 1, chunk)
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
    record.update(status="complete", resumed_chunks=n_chunks - len(todo), computed_problems=problems_done)
    if folder is not None and is_writer:
        store.write_record(folder, record)
        return Results.from_folder(folder)
    return Results.from_chunks([done[c] for c in range(n_chunks)], record)


def check_run_options(problems: Any, seed: Any, chunk_size: Any = None) -> tuple[int, int, int | None]:
    """Check a run's options (:class:`SpecError` naming the option, the value and the range)."""
    return (_positive_int("problems", problems), _nonnegative_int("seed", seed),
            None if chunk_size is None else _positive_int("chunk_size", chunk_size))


# ---- sizes: what a chunk needs, what the machine has ----------------------------------------

#: Problem numbers are int32 (``chunk_indices``), so every lane of every chunk must number below 2^31.
MAX_PROBLEM_LANES = 2**31


class MemoryPart(NamedTuple):
    """One part of a chunk's memory (:func:`chunk_memory_parts`)."""

    bytes: float
    fields: tuple[str, ...]  # the spec fields it grows with, the most telling first
    phase: str               # "kept" (from the draw to the end), or the stage it lives in: "draw", "train", "finish"


def result_bytes(spec: Spec) -> float:
    """Bytes of one problem's results on the host (the default kernel): its per-problem columns (at most
    about 200 numbers), w, θ and the trajectory of J = T/record_every iterates (a W1 problem: 1,184 bytes
    measured, 1,736 estimated)."""
    J = spec.steps // spec.record_every
    return 4.0 * (J * spec.d + 4 * spec.d + J + 200)


def chunk_memory_parts(spec: Spec, chunk: int, kernel: Kernel = KERNEL) -> dict[str, MemoryPart]:
    """The memory one compiled chunk of ``chunk`` problems of the default kernel needs on one device, by part.

    Empty for a kernel other than a :class:`rlhf_bounds.simulate.SimulateKernel` (its shapes are
    not known here). Each part counts the large float32 arrays of one stage of the kernel, from
    the spec's shapes, with P = ``chunk``, F = the finishing block (16 on CPU, P on an
    accelerator), J = T/record_every, N = N_pref, M_Q = posterior draws, in floats (P counts the
    lanes the kernel pads the chunk to, :func:`rlhf_bounds.simulate.batch_block`):

    * kept from the draw to the end: the training samples P·(n·A·d + 3·n·A + n·K) and the
      trajectories and results P·(2·J·d + 8·d + 2·J + 400);
    * the draw (all P at once): the preference data P·3·N·A·d (Bradley-Terry reward model only)
      and the normals the training features are drawn from, P·n·A·d;
    * training: the problem-last copy of the training features and the loop's per-response
      arrays, P·(n·A·d + 8·n·A);
    * finishing, F problems at a time: the evaluation sets F·(c·M·A·d + 12·M·A) (c = 3 with the
      reward model, whose certificate B7 weights a copy of the features, else 2) and the fresh
      samples F·2·n·A·d; with ``bounds='all'`` also B2's posterior draws F·M_Q·(M·A + n·A), the
      OU Hessian by autodiff F·n·A·d²/2 and the float64 d × d matrices F·32·d² (8 bytes each).

    The multiples count the copies that live at once; they were fitted to XLA's account of
    compiled chunks (``compiled.memory_analysis()``) on CPU, which :func:`chunk_memory_bytes`
    matches within a factor of 1.5 on the shapes tried (tests/test_sizes.py checks a factor 2).
    """
    from .simulate import SimulateKernel, default_finish_block
    try:
        from .simulate import batch_block  # the kernel pads P to a multiple of its fixed blocks
    except ImportError:
        batch_block = None

    if not isinstance(kernel, SimulateKernel):
        return {}
    pad = batch_block(spec, kernel.finish_block) if batch_block is not None else 1
    P = float(-(-chunk // pad) * pad)
    block = default_finish_block() if kernel.finish_block == "auto" else kernel.finish_block
    F = P if block is None else float(min(block, P))
    n, A, d, K = spec.prompts, spec.actions, spec.d, spec.rollouts
    N, M, Q = spec.pref_pairs, spec.eval_prompts, spec.posterior_draws
    mle = spec.reward_model == "mle"
    f32 = 4.0
    train_fields, eval_fields = ("prompts", "actions", "d"), ("eval_prompts", "actions", "d")
    parts = {
        "the training samples": MemoryPart(f32 * P * (n * A * d + 3 * n * A + n * K), train_fields, "kept"),
        "the trajectories and results": MemoryPart(2 * P * result_bytes(spec), ("steps", "d"), "kept"),
        "the draw of the training samples": MemoryPart(f32 * P * n * A * d, train_fields, "draw"),
        "the training loop": MemoryPart(f32 * P * (n * A * d + 8 * n * A), train_fields, "train"),
        "the evaluation sets": MemoryPart(f32 * F * ((3 if mle else 2) * M * A * d + 12 * M * A), eval_fields,
                                          "finish"),
        "the fresh samples": MemoryPart(f32 * F * 2 * n * A * d, train_fields, "finish"),
    }
    if mle:
        parts["the preference data"] = MemoryPart(f32 * P * 3 * N * A * d, ("pref_pairs", "actions", "d"), "draw")
    if spec.bounds == "all":
        parts["B2's posterior draws"] = MemoryPart(f32 * F * Q * (M * A + n * A),
                                                   ("posterior_draws", "eval_prompts", "actions"), "finish")
        parts["the OU Hessian"] = MemoryPart(f32 * F * n * A * d * d / 2 + 8.0 * F * 32 * d * d,
                                             ("d", "prompts", "actions"), "finish")
    return parts


def chunk_memory_bytes(spec: Spec, chunk: int, kernel: Kernel = KERNEL) -> int | None:
    """Estimated peak bytes of one compiled chunk of ``chunk`` problems on one device (None: unknown kernel).

    What is kept from the draw to the end, plus the largest of the stages (draw, training,
    finishing) of :func:`chunk_memory_parts`: a stage's arrays are freed before the next one's.
    """
    parts = chunk_memory_parts(spec, chunk, kernel)
    if not parts:
        return None
    stage = {}
    for part in parts.values():
        stage[part.phase] = stage.get(part.phase, 0.0) + part.bytes
    kept = stage.pop("kept", 0.0)
    return int(kept + max(stage.values(), default=0.0))


def memory_available() -> int | None:
    """Bytes a chunk may use now: on CPU the host's available memory (``MemAvailable`` of
    /proc/meminfo, else ``os.sysconf``, capped by a cgroup limit); on an accelerator the smallest free
    memory of the run's devices; None when unknown."""
    if jax.default_backend() != "cpu":
        free = []
        for dev in run_devices():
            try:
                stats = dev.memory_stats()
            except Exception:  # a backend without memory statistics
                stats = None
            if stats and "bytes_limit" in stats:
                free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return min(free) if free else None
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def _bytes_text(x: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if x >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x / 2**10:,.1f} KiB"


def check_run_size(spec: Spec, problems: int, chunk: int, kernel: Kernel = KERNEL, *, in_memory: bool = False,
                   available: int | None = None) -> None:
    """Refuse, before compiling, a run that cannot work at its size (:class:`RunError`, one line).

    * Its problem numbers must fit in int32: every lane of every chunk below 2^31.
    * One chunk must fit in memory: :func:`chunk_memory_bytes` per device (several forced CPU
      devices share the host's memory) against :func:`memory_available` (or ``available``). The
      message names the spec fields the largest part grows with, the estimate, the memory
      available and, where one exists, a chunk size that fits.
    * ``in_memory`` (no output folder): all results are kept in memory until the run returns, so
      they must fit too.
    """
    lanes = -(-problems // chunk) * chunk
    if lanes > MAX_PROBLEM_LANES:
        raise RunError(f"problems={problems} out of range: problem numbers are 32-bit, so a run holds at most "
                       f"{MAX_PROBLEM_LANES // chunk * chunk:,} problems in chunks of {chunk}")
    parts = chunk_memory_parts(spec, 1, kernel)
    if not parts:
        return
    available = memory_available() if available is None else available
    if available is None:
        return
    n_dev = len(run_devices())
    sharing = n_dev if jax.default_backend() == "cpu" else 1
    need_at = lambda c: sharing * chunk_memory_bytes(spec, max(c // n_dev, 1), kernel)
    need = need_at(chunk)
    if need > available:
        parts = chunk_memory_parts(spec, max(chunk // n_dev, 1), kernel)
        what, largest = max(parts.items(), key=lambda kv: kv[1].bytes)
        names = largest.fields
        default = Spec()
        names = sorted(names, key=lambda k: -getattr(spec, k) / max(getattr(default, k), 1))
        fits = next((c for c in (chunk >> k for k in range(1, chunk.bit_length())) if c >= n_dev
                     and need_at(c) <= available), None)
        hint = (f"; a chunk of {fits} problems would fit (chunk_size={fits}, --chunk-size {fits})" if fits
                else f"; make {names[0]} smaller")
        raise RunError(f"{names[0]}={getattr(spec, names[0])} is too large for this machine: a chunk of {chunk} "
                       f"problems needs about {_bytes_text(need)} (mostly {what}), more than the "
                       f"{_bytes_text(available)} of memory available{hint}")
    if in_memory:
        results = problems * result_bytes(spec)
        if results > available:
            raise RunError(f"problems={problems} is too large to keep in memory: the results need about "
                           f"{_bytes_text(results)}, more than the {_bytes_text(available)} available; save them "
                           "to a folder instead (out=...), which keeps one chunk in memory at a time")


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
            # on one device: one lane block per device (the kernel pads a device's share to a
            # block anyway), which keeps each device's LAPACK batches small too (a second guard
            # besides the pool's spare thread, _cpu_pool.py).
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
