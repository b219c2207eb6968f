"""Pure state transitions: (state, outcome, now) -> (new state, audit events).

The reconciler and the planner's simulation tests share these functions, so the
rules that change state are written once. Each function records exactly one
audit event per key-state change (invariant 7); the event dicts are completed
(``ts``, ``actor``, ``seq``, ``prev``, ``hash``) by :mod:`keymgr.audit`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    EdgeRecord,
    Intent,
    Key,
    PublisherRecord,
    State,
    Tombstone,
)

Event = dict[str, Any]
Result = tuple[State, list[Event]]


def _event(
    name: str, ring: str | None, key: Key | Tombstone | None, now: datetime, **extra: Any
) -> Event:
    ev: Event = {"event": name, "ts": _floor(now), "ring": ring}
    if key is not None:
        ev["kid"] = key.kid
        ev["backend"] = key.backend
        ev["alg"] = key.alg
    ev.update({k: v for k, v in extra.items() if v is not None})
    return ev


def _floor(now: datetime) -> datetime:
    return now.replace(microsecond=0)


def _ceil(now: datetime) -> datetime:
    """Round up to the second: the times that gate promotion (published_at) and
    expiry (retired_at) must never be recorded before the real instant, or the
    planner, comparing whole seconds, promotes or unpublishes up to 1 s early
    (found by the soak harness). Drills with ``--at`` use whole seconds: no change."""
    whole = _floor(now)
    return whole if whole == now else whole + timedelta(seconds=1)


def _tick(state: State, now: datetime) -> State:
    now = _floor(now)
    if state.clock is None or now > state.clock:
        return replace(state, clock=now)
    return state


def _set_key(state: State, ring: str, key: Key, now: datetime) -> State:
    return _tick(state.with_ring(state.ring(ring).with_key(key)), now)


def _get(state: State, ring: str, kid: str) -> Key:
    k = state.ring(ring).key(kid)
    if k is None:
        raise KeyError(f"ring {ring!r} has no key {kid!r}")
    return k


def add_key(
    state: State,
    ring: str,
    kid: str,
    public_jwk: dict[str, str],
    alg: str,
    backend: str,
    now: datetime,
    reason: str,
    adopted: bool = False,
) -> Result:
    """Record a freshly generated (or adopted orphan) key as ``pending``."""
    if state.ring(ring).key(kid) is not None:
        raise KeyError(f"ring {ring!r} already records key {kid!r}")
    if state.ring(ring).tombstone(kid) is not None:
        # A destroyed key's leftover is never taken back (invariant 4).
        raise KeyError(f"ring {ring!r}: key {kid!r} was destroyed (tombstone)")
    key = Key(
        kid=kid,
        alg=alg,
        backend=backend,
        state=PENDING,
        public_jwk=public_jwk,
        created_at=_floor(now),
    )
    name = "key.adopted" if adopted else "key.generated"
    state = _close_intent(state, ring)
    return _set_key(state, ring, key, now), [_event(name, ring, key, now, reason=reason)]


def take_over(
    state: State,
    ring: str,
    kid: str,
    public_jwk: dict[str, str],
    alg: str,
    backend: str,
    as_state: str,
    now: datetime,
    actor_reason: str,
) -> Result:
    """``keymgr adopt``: record a key the backend holds but state does not.

    The operator's deliberate take-over of a key that no intent accounts for
    (after a state was lost or restored from an old copy). ``active`` makes
    it the signer again (a ring without one; it must be the key verifiers
    already have, as the publish that follows does not wait A); ``retired`` keeps
    it published for retire_grace, so tokens it signed keep verifying, then
    it expires and is destroyed on the usual schedule; ``expired`` keeps it
    out of the JWKS and destroys it after destroy_after.
    """
    if state.ring(ring).key(kid) is not None or state.find(kid) is not None:
        raise KeyError(f"state already records key {kid!r}")
    if state.find_forgotten(kid) is not None:
        raise KeyError(f"key {kid!r} was destroyed (its tombstone is in the state)")
    at = _floor(now)
    # The times each adopted state needs (keymgr.validate), all "now": the
    # key's real history is in the audit log of the state that was lost.
    times: dict[str, dict[str, datetime]] = {
        ACTIVE: {"published_at": at, "activated_at": at},
        RETIRED: {"published_at": at, "activated_at": at, "retired_at": _ceil(now)},
        EXPIRED: {"retired_at": at, "expired_at": at},
    }
    if as_state not in times:
        raise ValueError(f"cannot adopt a key as {as_state!r} (active, retired or expired)")
    if as_state == ACTIVE and state.ring(ring).active is not None:
        raise ValueError(f"ring {ring} already has an active key")
    key = Key(
        kid=kid,
        alg=alg,
        backend=backend,
        state=as_state,
        public_jwk=public_jwk,
        created_at=at,
        reason=actor_reason,
        **times[as_state],
    )
    return _set_key(state, ring, key, now), [
        _event("key.adopted", ring, key, now, reason=actor_reason, state=as_state)
    ]


def publisher_confirmed(
    state: State,
    publisher: str,
    sha256: str,
    kids: frozenset[str],
    now: datetime,
    written: bool,
) -> Result:
    """A publisher read back exactly the document we meant it to serve.

    A kid keeps the time since which it was served only when the previous
    record was intact (not stale) and held it: a target replaced atomically
    never stopped serving the keys both documents hold. Every other kid is
    counted from now, the first moment it is known to be served.
    """
    old = state.publishers.get(publisher)
    at = _floor(now)
    since: dict[str, datetime] = {}
    for kid in kids:
        prev = old.served_since(kid) if old is not None and kid in old.kids else None
        since[kid] = prev if prev is not None else _ceil(now)
    pubs = dict(state.publishers)
    pubs[publisher] = PublisherRecord(sha256=sha256, kids=kids, confirmed_at=at, since=since)
    new = _tick(replace(state, publishers=pubs), now)
    ev = _event(
        "jwks.published",
        None,
        None,
        now,
        publisher=publisher,
        sha256=sha256,
        keys=len(kids),
        written=written,
    )
    return new, [ev]


def publisher_unconfirmed(state: State, publisher: str, asked: frozenset[str]) -> State:
    """A write to ``publisher`` may or may not have landed: until a later
    confirmation shows what is served, the kids it was asked to hold count as
    served there (they block destruction) and nothing counts as continuously
    served (promotion waits)."""
    old = state.publishers.get(publisher)
    if old is None:
        rec = PublisherRecord(sha256="", kids=frozenset(), confirmed_at=None, stale=True)
    else:
        rec = replace(old, stale=True, since={})
    rec = replace(rec, asked=rec.asked | asked)
    pubs = dict(state.publishers)
    pubs[publisher] = rec
    return replace(state, publishers=pubs)


def publisher_drifted(state: State, publisher: str) -> State:
    """The target no longer serves the confirmed document (reverted, deleted,
    edited, headers changed) or could not be read: continuity is broken."""
    old = state.publishers[publisher]
    if old.stale and not old.since:
        return state
    pubs = dict(state.publishers)
    pubs[publisher] = replace(old, stale=True, since={})
    return replace(state, publishers=pubs)


def edge_observed(
    state: State,
    publisher: str,
    url: str,
    kids: frozenset[str] | None,
    now: datetime,
    error: str | None = None,
) -> Result:
    """A probe of one edge of ``publisher``: the kids its document holds, or
    None with ``error`` when it showed no JWKS.

    A kid keeps its time only while probes keep showing it; a kid seen for
    the first time is counted from now (rounded up: never earlier than the
    truth). A failed probe forgets every time (promotion waits for the edge
    again) but keeps the kids last shown (the edge may still serve them, so
    they are not destroyed). Only a change is recorded (an audit event: what
    an edge shows is part of every promotion's proof); a probe that shows
    what the last one showed changes nothing.
    """
    old = state.edge(publisher, url)
    at = _ceil(now)
    if kids is None:
        if old is not None and old.error is not None:
            return state, []
        rec = EdgeRecord(
            kids=old.kids if old is not None else frozenset(),
            since={},
            at=at,
            error=error or "no JWKS",
        )
        ev = _event("edge.unreachable", None, None, now, publisher=publisher, url=url,
                    reason=rec.error)
    else:
        if old is not None and old.error is None and old.kids == kids:
            return state, []
        since = {k: old.since[k] if old is not None and k in old.since else at for k in kids}
        rec = EdgeRecord(kids=kids, since=since, at=at)
        before = old.kids if old is not None else frozenset()
        ev = _event(
            "edge.updated", None, None, now, publisher=publisher, url=url,
            added=sorted(kids - before) or None, removed=sorted(before - kids) or None,
        )
    edges = {p: dict(u) for p, u in state.edges.items()}
    edges.setdefault(publisher, {})[url] = rec
    return _tick(replace(state, edges=edges), now), [ev]


def edges_configured(state: State, configured: Mapping[str, Collection[str]]) -> State:
    """Forget the records of edges no longer configured (their probes stopped)."""
    edges = {
        p: {u: e for u, e in urls.items() if u in configured.get(p, ())}
        for p, urls in state.edges.items()
    }
    edges = {p: urls for p, urls in edges.items() if urls}
    return state if edges == state.edges else replace(state, edges=edges)


def open_intent(
    state: State, ring: str, nonce: str, backend: str, alg: str, now: datetime
) -> State:
    """Record, before the backend call, that a key is about to be generated."""
    intents = dict(state.intents)
    intents[ring] = Intent(nonce=nonce, backend=backend, alg=alg, at=_floor(now))
    return _tick(replace(state, intents=intents), now)


def _close_intent(state: State, ring: str) -> State:
    if ring not in state.intents:
        return state
    intents = dict(state.intents)
    del intents[ring]
    return replace(state, intents=intents)


def mark_published(state: State, ring: str, kid: str, now: datetime) -> Result:
    key = _get(state, ring, kid)
    if key.state != PENDING:
        raise ValueError(f"key {kid}: cannot publish a {key.state} key")
    key = replace(key, state=PUBLISHED, published_at=_ceil(now))
    return _set_key(state, ring, key, now), [_event("key.published", ring, key, now)]


def promote(
    state: State, ring: str, kid: str, retire: str | None, now: datetime, reason: str
) -> Result:
    """Make ``kid`` the signer and retire the previous one in the same commit."""
    key = _get(state, ring, kid)
    if key.state != PUBLISHED:
        raise ValueError(f"key {kid}: cannot promote a {key.state} key")
    events: list[Event] = []
    r = state.ring(ring)
    if retire is not None:
        old = _get(state, ring, retire)
        if old.state != ACTIVE:
            raise ValueError(f"key {retire}: cannot retire a {old.state} key")
        old = replace(old, state=RETIRED, retired_at=_ceil(now))
        r = r.with_key(old)
        events.append(_event("key.retired", ring, old, now, reason=f"superseded by {kid}"))
    if r.active is not None:
        raise ValueError(f"ring {ring}: {r.active.kid} is still active")
    # A key promoted within the second it was published (bootstrap, emergency)
    # has published_at rounded up past ``now``: never record it active earlier.
    activated = _floor(now)
    if key.published_at is not None and key.published_at > activated:
        activated = key.published_at
    key = replace(key, state=ACTIVE, activated_at=activated)
    r = replace(r.with_key(key), rotate_at=None, emergency=False)
    events.insert(0, _event("key.promoted", ring, key, now, reason=reason))
    return _tick(state.with_ring(r), now), events


def expire(state: State, ring: str, kid: str, now: datetime) -> Result:
    key = _get(state, ring, kid)
    if key.state != RETIRED:
        raise ValueError(f"key {kid}: cannot expire a {key.state} key")
    key = replace(key, state=EXPIRED, expired_at=_floor(now))
    return _set_key(state, ring, key, now), [_event("key.expired", ring, key, now)]


def destroy(state: State, ring: str, kid: str, now: datetime) -> Result:
    key = _get(state, ring, kid)
    if key.state not in (EXPIRED, REVOKED):
        raise ValueError(f"key {kid}: cannot destroy a {key.state} key")
    key = replace(key, state=DESTROYED, destroyed_at=_floor(now))
    return _set_key(state, ring, key, now), [_event("key.destroyed", ring, key, now)]


def forget(state: State, ring: str, kid: str, now: datetime) -> Result:
    """Replace a destroyed key's full record by its tombstone (``history`` passed).

    The tombstone keeps what recognising the kid needs (kid, backend, alg,
    destroyed_at); the public JWK and the other times stay in the audit log,
    the permanent record. The tombstone takes the record's place at the end
    of ``forgotten``: oldest first, as they were destroyed.
    """
    key = _get(state, ring, kid)
    if key.state != DESTROYED or key.destroyed_at is None:
        raise ValueError(f"key {kid}: cannot forget a {key.state} key")
    r = state.ring(ring)
    tomb = Tombstone(kid=kid, alg=key.alg, backend=key.backend, destroyed_at=key.destroyed_at)
    r = replace(
        r, keys=tuple(k for k in r.keys if k.kid != kid), forgotten=(*r.forgotten, tomb)
    )
    ev = _event("key.forgotten", ring, tomb, now, destroyed_at=key.destroyed_at)
    return _tick(state.with_ring(r), now), [ev]


def drop_tombstone(state: State, ring: str, kid: str, now: datetime) -> Result:
    """Drop a tombstone: from now on only the audit log knows the kid."""
    r = state.ring(ring)
    tomb = r.tombstone(kid)
    if tomb is None:
        raise KeyError(f"ring {ring!r} has no tombstone {kid!r}")
    r = replace(r, forgotten=tuple(t for t in r.forgotten if t.kid != kid))
    ev = _event("key.tombstone_dropped", ring, tomb, now, destroyed_at=tomb.destroyed_at)
    return _tick(state.with_ring(r), now), [ev]


def revoke(state: State, kid: str, now: datetime, reason: str | None) -> Result:
    found = state.find(kid)
    if found is None:
        raise KeyError(kid)
    ring, key = found
    if key.state in (DESTROYED, REVOKED):
        raise ValueError(f"key {kid} is already {key.state}")
    key = replace(key, state=REVOKED, revoked_at=_floor(now), reason=reason)
    r = ring.with_key(key)
    return _tick(state.with_ring(r), now), [
        _event("key.revoked", ring.name, key, now, reason=reason)
    ]


def request_rotation(state: State, ring: str, now: datetime, emergency: bool) -> Result:
    r = state.ring(ring)
    r = replace(r, rotate_at=_floor(now), emergency=r.emergency or emergency)
    ev = _event("rotate.requested", ring, None, now, emergency=emergency)
    return _tick(state.with_ring(r), now), [ev]
