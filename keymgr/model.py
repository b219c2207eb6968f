"""The key-ring state: plain immutable data, and its JSON form.

The state document is the single source of truth. Everything the planner
decides is derived from it (plus policy and ``now``), so it holds only facts:
which keys exist, in which state, since when, and what each publisher last
confirmed it serves.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from keymgr.timefmt import format_time, parse_time

FORMAT = 1

PENDING = "pending"
PUBLISHED = "published"
ACTIVE = "active"
RETIRED = "retired"
EXPIRED = "expired"
DESTROYED = "destroyed"
REVOKED = "revoked"

STATES = (PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED, DESTROYED, REVOKED)
#: States whose public key belongs in the JWKS (pending is added while it is
#: being published; it only becomes ``published`` once every publisher confirmed).
IN_JWKS = frozenset({PENDING, PUBLISHED, ACTIVE, RETIRED})
#: States in which the private key still exists in the backend.
HAS_PRIVATE = frozenset({PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED, REVOKED})

@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (restored after).

    Parsing a large document (a state or config of 10,000 rings) allocates
    hundreds of thousands of containers and no cycles; the collector would
    walk the growing heap again and again for nothing (~0.3 s at 10,000 rings).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


_TIME_FIELDS = (
    "created_at",
    "published_at",
    "activated_at",
    "retired_at",
    "expired_at",
    "destroyed_at",
    "revoked_at",
)


@dataclass(frozen=True)
class Key:
    kid: str
    alg: str
    backend: str
    state: str
    public_jwk: dict[str, str]
    created_at: datetime
    published_at: datetime | None = None
    activated_at: datetime | None = None
    retired_at: datetime | None = None
    expired_at: datetime | None = None
    destroyed_at: datetime | None = None
    revoked_at: datetime | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kid": self.kid,
            "alg": self.alg,
            "backend": self.backend,
            "state": self.state,
        }
        for f in _TIME_FIELDS:
            d[f] = format_time(getattr(self, f))
        d["reason"] = self.reason
        d["public_jwk"] = self.public_jwk
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Key:
        # Written out field by field (no dict of times, no **): a state of
        # 10,000 rings builds this 10,000+ times per load.
        get = d.get
        created = get("created_at")
        if not created:
            raise ValueError(f"key {get('kid')}: created_at missing")
        if d["state"] not in STATES:
            raise ValueError(f"key {get('kid')}: unknown state {d['state']!r}")
        return cls(
            kid=d["kid"],
            alg=d["alg"],
            backend=d["backend"],
            state=d["state"],
            public_jwk=dict(d["public_jwk"]),
            created_at=parse_time(created),
            published_at=_time_or_none(get("published_at")),
            activated_at=_time_or_none(get("activated_at")),
            retired_at=_time_or_none(get("retired_at")),
            expired_at=_time_or_none(get("expired_at")),
            destroyed_at=_time_or_none(get("destroyed_at")),
            revoked_at=_time_or_none(get("revoked_at")),
            reason=get("reason"),
        )


def _time_or_none(value: Any) -> datetime | None:
    return parse_time(value) if value else None


@dataclass(frozen=True)
class Ring:
    name: str
    keys: tuple[Key, ...] = ()
    #: ``keymgr rotate`` asked for a successor now (cleared on promotion).
    rotate_at: datetime | None = None
    #: ``rotate --emergency``: promote as soon as published, without waiting A.
    emergency: bool = False

    def key(self, kid: str) -> Key | None:
        for k in self.keys:
            if k.kid == kid:
                return k
        return None

    def in_state(self, *states: str) -> list[Key]:
        return [k for k in self.keys if k.state in states]

    @property
    def active(self) -> Key | None:
        for k in self.keys:
            if k.state == ACTIVE:
                return k
        return None

    def with_key(self, key: Key) -> Ring:
        """This ring with ``key`` replacing the key of the same kid (or appended)."""
        keys = list(self.keys)
        for i, k in enumerate(keys):
            if k.kid == key.kid:
                keys[i] = key
                break
        else:
            keys.append(key)
        return replace(self, keys=tuple(keys))

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": [k.to_dict() for k in self.keys],
            "rotate_at": format_time(self.rotate_at),
            "emergency": self.emergency,
        }

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Ring:
        return cls(
            name=name,
            keys=tuple(Key.from_dict(k) for k in d.get("keys", [])),
            rotate_at=parse_time(d["rotate_at"]) if d.get("rotate_at") else None,
            emergency=bool(d.get("emergency", False)),
        )


@dataclass(frozen=True)
class PublisherRecord:
    """What a publisher last confirmed (read back and compared) it serves."""

    sha256: str
    kids: frozenset[str]
    confirmed_at: datetime
    #: Set by the reconciler when the target no longer holds what was confirmed
    #: (deleted or edited out of band): the document must be written again.
    stale: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "kids": sorted(self.kids),
            "confirmed_at": format_time(self.confirmed_at),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PublisherRecord:
        return cls(
            sha256=d["sha256"],
            kids=frozenset(d.get("kids", [])),
            confirmed_at=parse_time(d["confirmed_at"]),
        )


@dataclass(frozen=True)
class AuditAnchor:
    """Head of the audit hash chain, plus the events of the last commit.

    The events are committed with the state (an outbox) and appended to the log
    afterwards, so a crash between the two neither loses nor repeats an event.
    """

    seq: int = 0
    hash: str = ""
    outbox: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "outbox": list(self.outbox)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditAnchor:
        return cls(seq=int(d["seq"]), hash=str(d["hash"]), outbox=tuple(d.get("outbox", [])))


@dataclass(frozen=True)
class State:
    rings: dict[str, Ring] = field(default_factory=dict)
    publishers: dict[str, PublisherRecord] = field(default_factory=dict)
    audit: AuditAnchor = field(default_factory=AuditAnchor)
    #: Newest time ever recorded; ``--at`` earlier than this is refused.
    clock: datetime | None = None

    def ring(self, name: str) -> Ring:
        return self.rings.get(name) or Ring(name=name)

    def with_ring(self, ring: Ring) -> State:
        rings = dict(self.rings)
        rings[ring.name] = ring
        return replace(self, rings=rings)

    def find(self, kid: str) -> tuple[Ring, Key] | None:
        for ring in self.rings.values():
            k = ring.key(kid)
            if k is not None:
                return ring, k
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "clock": format_time(self.clock),
            "rings": {n: r.to_dict() for n, r in sorted(self.rings.items())},
            "publishers": {n: p.to_dict() for n, p in sorted(self.publishers.items())},
            "audit": self.audit.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported state format {d.get('format')!r}")
        return cls(
            rings={n: Ring.from_dict(n, r) for n, r in d.get("rings", {}).items()},
            publishers={
                n: PublisherRecord.from_dict(p) for n, p in d.get("publishers", {}).items()
            },
            audit=AuditAnchor.from_dict(d.get("audit", {"seq": 0, "hash": ""})),
            clock=parse_time(d["clock"]) if d.get("clock") else None,
        )
