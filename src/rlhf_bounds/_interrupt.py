"""Leaving the program at once on Ctrl-C (the command line's interrupt handler uses it).

When SIGINT reaches ``rlhf-bounds run``, XLA may still be working in threads of its own: a
chunk dispatched asynchronously is still running on the CPU client's thread pool, or the
compiler's threads are finishing. A normal exit then runs the interpreter's teardown (module
globals, the JAX backend, ``atexit`` handlers) while those threads still use what is being
destroyed, and the process crashed with a segfault (exit 139, a null address) in about three
exits out of eight. Nothing is left to save by then: every finished chunk and the run record are
already on disk, each written atomically (a temporary file, fsync, rename), and a temporary file
that a write in progress leaves behind is removed by the next run. So the program writes its
message, flushes its streams and leaves with :func:`os._exit`, which skips the teardown.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

__all__ = ["exit_now"]


def exit_now(code: int, message: str) -> NoReturn:
    """Write ``message`` to stderr, flush stdout and stderr, and end the process with ``code``.

    A second Ctrl-C while this runs is ignored, so it cannot interrupt the exit itself.
    """
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to change
        pass
    for stream, text in ((sys.stdout, ""), (sys.stderr, message)):
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to say there
            pass
    os._exit(code)
