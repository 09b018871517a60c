"""Keep several forced host CPU devices from deadlocking XLA:CPU's intra-op thread pool.

jaxlib 0.10's batched LAPACK kernels (getrf for the Bradley–Terry Newton solve, syevd for B7's
eigenvalues, ...) split a large batch into tasks on the CPU client's intra-op pool and block the
calling pool thread until they finish. With k host devices each running such a call from a pool
thread at once, a pool of k threads (or fewer) waits on itself for ever. The pool is sized when
the CPU client starts, from ``PJRT_NPROC`` (default: the cores), so:

* :func:`reserve_spare_thread`, called on import of the package, sets ``PJRT_NPROC`` to at least
  k + 1 when k > 1 host devices are forced and JAX has not started its backends yet;
* :func:`run_devices`, which the engine shards over, falls back to one device per process (with a
  warning saying how to use them all) when the pool is still too small, for example because JAX
  was started before the package was imported.

Forced host devices exist to test sharding on one machine; on one CPU device the kernel already
uses every core (README.md).
"""

from __future__ import annotations

import functools
import os
import re
import warnings

__all__ = ["forced_cpu_devices", "reserve_spare_thread", "cpu_pool_threads", "run_devices"]

_FORCE = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def forced_cpu_devices() -> int:
    """Host devices requested through ``XLA_FLAGS`` or ``JAX_NUM_CPU_DEVICES`` (0 if none)."""
    found = _FORCE.findall(os.environ.get("XLA_FLAGS", ""))
    if found:
        return int(found[-1])
    value = os.environ.get("JAX_NUM_CPU_DEVICES", "")
    return int(value) if value.isdigit() else 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def reserve_spare_thread() -> None:
    """With k > 1 forced host devices, size the CPU pool to at least k + 1 threads (if still possible)."""
    from jax._src import xla_bridge

    k = forced_cpu_devices()
    if k > 1 and "PJRT_NPROC" not in os.environ and not xla_bridge.backends_are_initialized():
        os.environ["PJRT_NPROC"] = str(max(_cores(), k + 1))


def cpu_pool_threads() -> int:
    """Threads in XLA:CPU's intra-op pool: its ``tf_XLAEigen`` threads on Linux, else ``PJRT_NPROC`` or the cores."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as fh:
                n += fh.read().strip() == "tf_XLAEigen"
        except OSError:  # a thread that ended meanwhile
            pass
    if n:
        return n
    value = os.environ.get("PJRT_NPROC", "")
    return int(value) if value.isdigit() and int(value) > 0 else _cores()


@functools.cache
def run_devices() -> tuple:
    """The devices a run shards over: all of them, except host CPU devices whose pool could deadlock."""
    import jax

    devices = jax.devices()
    k = jax.local_device_count()
    if jax.default_backend() == "cpu" and k > 1:
        pool = cpu_pool_threads()
        if pool <= k:
            warnings.warn(f"{k} host CPU devices share an intra-op pool of {pool} threads, which can deadlock "
                          "in JAX 0.10's batched LAPACK calls: running on one device per process. Import "
                          f"rlhf_bounds before starting JAX, or set PJRT_NPROC={k + 1} or more, to use them all.",
                          RuntimeWarning, stacklevel=2)
            devices = [next(d for d in devices if d.process_index == p) for p in range(jax.process_count())]
    return tuple(devices)
