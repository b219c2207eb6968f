"""glibc malloc tuning for the daemon.

glibc gives each thread that allocates its own malloc arena (up to eight per
core), and memory freed in a secondary arena is returned to the system less
readily than in the main one. The daemon's passes run on scheduler threads,
so at 100,000 rings (benchmarks/bench_scale.py) the arenas of those threads
held 38 MB more than one arena would. Python allocates under the GIL, so more
arenas buy the daemon little concurrency: :func:`limit_arenas` caps them, as
``MALLOC_ARENA_MAX`` does for servers such as gunicorn.

Best effort, as keymgr.hardening: another libc, or a refusal, changes nothing.
"""

from __future__ import annotations

import logging
import os
import sys

#: From glibc's <malloc.h>.
M_ARENA_MAX = -8
#: Arenas the daemon keeps: the main thread's and one for the threads.
ARENAS = 2

log = logging.getLogger("keymgr.malloc")


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas from now on (glibc); True when set.

    An operator's ``MALLOC_ARENA_MAX`` stands (glibc read it at start). Call
    before starting threads: arenas already made stay. Never raises.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        mallopt.restype = ctypes.c_int
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        done = bool(mallopt(M_ARENA_MAX, arenas) == 1)
    except Exception as e:  # not glibc (no mallopt) or no ctypes: nothing to tune
        log.debug("mallopt(M_ARENA_MAX) unavailable: %s", e)
        return False
    if not done:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return done
