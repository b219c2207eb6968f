"""Crash points for the crash-safety tests.

``KEYMGR_CRASH_AT=NAME[:N]`` makes the process SIGKILL itself the N-th time (1 by
default) it reaches the crash point NAME: a real, uncatchable kill at an exact
place, so the tests can prove that the next run repairs every one of them. Unset
(production), a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("KEYMGR_CRASH_AT")
_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    if _spec is None:
        return
    target, _, count = _spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
