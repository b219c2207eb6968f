"""Leader lease for several replicas sharing one state store.

Only the holder of an unexpired lease reconciles; the others stay ready. Every
replica runs a heartbeat every ``min(reconcile_interval, ttl / 3)``: the holder
renews, the standbys look. When the holder stops renewing, its lease runs out
within ``ttl`` and a standby takes it at its next heartbeat: at most ``ttl`` +
one heartbeat (+1 s, timestamps being whole seconds) after a crash, one
heartbeat after a graceful :meth:`Lease.release`. The lease is a small record
in the same store, written by the store's own compare-and-swap: no home-made
consensus. Expiry compares wall clocks, so the TTL must exceed the
replicas' clock skew by a wide margin (the default is 30 s).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from datetime import datetime, timedelta

from keymgr.errors import ConflictError
from keymgr.stores import StateStore
from keymgr.timefmt import format_time, parse_time


def supports_lease(store: StateStore) -> bool:
    """Whether ``store`` implements the lease record (``read_lease``/``write_lease``)."""
    return store.supports_lease


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    def __init__(self, store: StateStore, ttl: timedelta, holder: str | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.holder = holder or replica_id()
        self.expires: datetime | None = None

    def held(self, now: datetime) -> bool:
        return self.expires is not None and now < self.expires

    def acquire(self, now: datetime) -> bool:
        """Take or renew the lease; False when another live replica holds it."""
        doc, token = self.store.read_lease()
        if doc is not None and doc.get("holder") != self.holder:
            try:
                theirs = parse_time(str(doc["expires"]))
            except (KeyError, ValueError):
                theirs = now  # unreadable record: treat as expired
            if now < theirs:
                self.expires = None
                return False
        expires = now + self.ttl
        try:
            self.store.write_lease(
                {
                    "holder": self.holder,
                    "expires": format_time(expires),
                    "renewed": format_time(now),
                },
                token,
            )
        except ConflictError:
            self.expires = None
            return False
        self.expires = expires
        return True

    def release(self) -> None:
        """Give the lease up at a graceful stop so another replica takes over at once."""
        if self.expires is None:
            return
        doc, token = self.store.read_lease()
        if doc is not None and doc.get("holder") == self.holder:
            with contextlib.suppress(ConflictError):
                self.store.write_lease(
                    {
                        "holder": None,
                        "expires": "1970-01-01T00:00:00Z",
                        "renewed": doc.get("renewed"),
                    },
                    token,
                )
        self.expires = None
