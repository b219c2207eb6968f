"""Process hardening for commands that may hold decrypted private keys.

A core dump (a crash, or ``gcore``/``gdb`` attached by another process of the
same user) would write every decrypted key in memory to disk. :func:`no_core_dumps`
turns both off for this process: ``RLIMIT_CORE`` to 0 (no core file on a crash)
and, on Linux, ``PR_SET_DUMPABLE`` to 0 (no core file even if the limit is raised
again, and no ptrace attach or /proc/PID/mem read by other unprivileged
processes of the same user).

Best effort by design: a platform or sandbox that refuses either call must not
stop keymgr from working, so failures are logged at debug level and swallowed.
"""

from __future__ import annotations

import logging
import sys

#: From <linux/prctl.h>.
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

log = logging.getLogger("keymgr.hardening")


def no_core_dumps() -> None:
    """No core dumps and (Linux) no same-user ptrace of this process. Never raises."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except Exception as e:  # best effort: never stop a command over it
        log.debug("RLIMIT_CORE not set to 0: %s", e)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
        if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    except Exception as e:  # best effort, as above
        log.debug("prctl(PR_SET_DUMPABLE, 0) unavailable: %s", e)
