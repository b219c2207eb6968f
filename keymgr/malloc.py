"""glibc malloc tuning for the daemon.

glibc gives each thread that allocates its own malloc arena (up to eight per
core), and memory freed in a secondary arena is returned to the system less
readily than in the main one. The daemon's passes run on scheduler threads,
so at 100,000 rings (benchmarks/bench_scale.py) the arenas of those threads
held 38 MB more than one arena would. Python allocates under the GIL, so more
arenas buy the daemon little concurrency: :func:`limit_arenas` caps them, as
``MALLOC_ARENA_MAX`` does for servers such as gunicorn.

glibc also keeps what the program frees: only free memory at the top of a
heap goes back to the system by itself. A pass that reads a large state
frees its transient objects (each shard file's text, the parsed documents)
among the records it keeps, so that memory stays resident until reused:
:func:`release` hands it back after each pass (``malloc_trim``, 1 ms at
100,000 rings; 40 MB of the daemon's RSS there).

Best effort, as keymgr.hardening: another libc, or a refusal, changes nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

#: From glibc's <malloc.h>.
M_ARENA_MAX = -8
#: Arenas the daemon keeps: the main thread's and one for the threads.
ARENAS = 2

log = logging.getLogger("keymgr.malloc")

_libc: Any = None


def _glibc() -> Any:
    """glibc through ctypes, loaded once; None when this is another libc."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                lib = ctypes.CDLL(None)
                lib.mallopt.restype = ctypes.c_int
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.malloc_trim.restype = ctypes.c_int
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = lib
            except Exception as e:  # not glibc (no mallopt) or no ctypes: nothing to tune
                log.debug("glibc malloc unavailable: %s", e)
    return _libc or None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas from now on (glibc); True when set.

    An operator's ``MALLOC_ARENA_MAX`` stands (glibc read it at start). Call
    before starting threads: arenas already made stay. Never raises.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_ARENA_MAX, arenas) == 1)
    if not done:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return done


def release() -> bool:
    """Give the memory glibc holds free back to the system (``malloc_trim(0)``,
    which also returns whole free pages inside a heap); True when some was.
    Never raises."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0) == 1)
