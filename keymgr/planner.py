"""The pure planner: (state, policies, now) -> the transitions that are due.

No I/O, no clock, no randomness: everything it needs is an argument, so it can
be driven through years of simulated time in milliseconds and ``keymgr plan
--at`` can show operators exactly what a reconcile would do. The reconciler
executes the returned actions, applies their outcome with
:mod:`keymgr.transitions`, commits, and plans again until nothing is due (the
way a Kubernetes controller reconciles desired against observed state).
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from keymgr.errors import StateError
from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    IN_JWKS,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    Key,
    PublisherRecord,
    Ring,
    State,
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The timing rules of one key ring (docs/design.md#timing)."""

    ring: str
    backend: str
    algorithm: str
    rotation_period: timedelta  # P
    publish_ahead: timedelta  # A
    retire_grace: timedelta  # G
    destroy_after: timedelta  # D
    publishers: tuple[str, ...]
    #: How long a destroyed key's full record stays in the state
    #: (docs/design.md#history); its tombstone then stays TOMBSTONE_KEEP more.
    history: timedelta = timedelta(days=90)


#: How long a tombstone outlives the full record of a destroyed key, so that
#: its kid is recognised at least this long after destruction whatever
#: ``history`` is (0 included), and longer when ``history`` is longer (raising
#: ``history`` never shortens it). Recognised means: a backend that still
#: lists the key is not taken to hold a key the state never knew, ``keymgr
#: adopt`` refuses it, a target serving it is rewritten without it. 35 days
#: cover the longest pending-deletion window of the backends (AWS KMS: up to
#: 30 days, and a deletion cancelled in that window brings the key back with
#: its kid tag; Vault transit, PKCS#11 and the file backend delete at once)
#: plus margin for eventual consistency and clock skew. Fixed rather than per
#: policy, so each ring's state stays bounded by its policy: at most about
#: (history + TOMBSTONE_KEEP) / P destroyed entries, of which only those of
#: the last ``history`` are full records. Past it, a key that comes back
#: (say, a key directory restored from an old backup) is unknown again and
#: the pass refuses it: failing closed, never adopting it.
TOMBSTONE_KEEP = timedelta(days=35)


# --- actions ---------------------------------------------------------------


@dataclass(frozen=True)
class Generate:
    ring: str
    reason: str  # bootstrap | scheduled | rotate | emergency | replace

    name = "generate"
    kid = None


@dataclass(frozen=True)
class Publish:
    publisher: str

    name = "publish"


@dataclass(frozen=True)
class MarkPublished:
    ring: str
    kid: str

    name = "mark-published"


@dataclass(frozen=True)
class Promote:
    ring: str
    kid: str
    retire: str | None
    reason: str

    name = "promote"


@dataclass(frozen=True)
class Expire:
    ring: str
    kid: str

    name = "expire"


@dataclass(frozen=True)
class Destroy:
    ring: str
    kid: str

    name = "destroy"


@dataclass(frozen=True)
class Forget:
    """Replace a destroyed key's full record by its tombstone (``history`` passed)."""

    ring: str
    kid: str

    name = "forget"


@dataclass(frozen=True)
class DropTombstone:
    """Drop a tombstone (TOMBSTONE_KEEP after the record was forgotten)."""

    ring: str
    kid: str

    name = "drop-tombstone"


Action = Generate | Publish | MarkPublished | Promote | Expire | Destroy | Forget | DropTombstone


@dataclass(frozen=True)
class Upcoming:
    """The next transition of a ring that is not due yet."""

    action: str
    kid: str | None
    at: datetime


@dataclass(frozen=True)
class Plan:
    due: tuple[Action, ...]
    #: Per configured ring: the earliest transition that is not yet due.
    upcoming: Mapping[str, Upcoming | None]

    @property
    def next_at(self) -> datetime | None:
        times = [u.at for u in self.upcoming.values() if u is not None]
        return min(times) if times else None


# --- what each publisher should serve ----------------------------------------


def desired_keys(
    state: State,
    policies: Mapping[str, Policy],
    publisher: str,
    index: Mapping[str, tuple[str, ...]] | None = None,
) -> list[Key]:
    """Keys the publisher's document must hold.

    Every JWKS key of the rings that use it, plus the JWKS keys it already
    serves for rings that no longer use it: dropping a publisher from a ring
    stops new keys going there, while the keys verifiers may have fetched from
    it leave on their usual schedule (expiry), never at once. ``index``:
    :func:`rings_of` of ``policies``, when the caller already built it.
    """
    names = (index if index is not None else rings_of(policies)).get(publisher, ())
    out = _own_keys(state, names)
    rec = state.publishers.get(publisher)
    if rec is not None and rec.kids:
        left = rec.kids.difference(k.kid for k in out)
        for kid in sorted(left):
            found = state.find(kid)
            if found is not None and found[1].state in IN_JWKS:
                out.append(found[1])
    return out


def _own_keys(state: State, names: Iterable[str]) -> list[Key]:
    """The JWKS keys of the rings ``names`` (those that use a publisher)."""
    out: list[Key] = []
    for name in names:
        ring = state.rings.get(name)
        if ring is not None:
            out.extend(k for k in ring.keys if k.state in IN_JWKS)
    return out


def _wanted(
    state: State,
    policies: Mapping[str, Policy],
    publisher: str,
    index: Mapping[str, tuple[str, ...]],
    memo: PlanMemo | None,
) -> frozenset[str]:
    """The kids of :func:`desired_keys`, remembered in ``memo`` while the
    publisher's record, the policies and each of its rings are the same
    objects, and it serves no kid of another ring (whose keys would be read)."""
    rec = state.publishers.get(publisher)
    names = index.get(publisher, ())
    rings = tuple(map(state.rings.get, names))
    if memo is not None:
        hit = memo.wants.get(publisher)
        if (
            hit is not None
            and hit[0] is rec
            and hit[1] is policies
            and len(hit[2]) == len(rings)
            and all(map(operator.is_, hit[2], rings))
        ):
            return hit[3]
    kids = frozenset(k.kid for k in _own_keys(state, names))
    if rec is not None and not rec.kids <= kids:
        # It still serves kids of rings that no longer use it: the whole rule.
        if memo is not None:
            memo.wants.pop(publisher, None)
        return frozenset(k.kid for k in desired_keys(state, policies, publisher, index))
    if memo is not None:
        memo.wants[publisher] = (rec, policies, rings, kids)
    return kids


def rings_of(policies: Mapping[str, Policy]) -> dict[str, tuple[str, ...]]:
    """The rings of each publisher, in policy order. :func:`plan` builds it once
    and hands it to every :func:`desired_keys` call: with 100,000 rings and
    hundreds of publishers, walking every ring for every publisher was most
    of a pass."""
    lists: dict[str, list[str]] = {}
    for name, pol in policies.items():
        for p in pol.publishers:
            lists.setdefault(p, []).append(name)
    return {p: tuple(names) for p, names in lists.items()}


def publishers_in_use(policies: Mapping[str, Policy]) -> list[str]:
    seen: dict[str, None] = {}
    for pol in policies.values():
        for p in pol.publishers:
            seen.setdefault(p, None)
    return list(seen)


def _confirmed_everywhere(state: State, pol: Policy, kid: str) -> bool:
    for p in pol.publishers:
        rec = state.publishers.get(p)
        if rec is None or rec.stale or kid not in rec.kids:
            return False
    return True


#: The edges (URLs verifiers fetch from) each publisher has probed, by name.
Edges = Mapping[str, Sequence[str]]


def served_since(
    state: State, pol: Policy, kid: str, edges: Edges | None = None
) -> datetime | None:
    """Since when every publisher of the ring, and every edge of each, has
    served ``kid`` without a break: the latest of their continuity times, or
    None while any of them does not (docs/design.md#promotion). An edge never
    probed, or whose last probe failed, holds it: an edge is never skipped."""
    latest: datetime | None = None
    for p in pol.publishers:
        rec = state.publishers.get(p)
        times = [rec.served_since(kid) if rec is not None else None]
        for url in (edges or {}).get(p, ()):
            edge = state.edge(p, url)
            times.append(edge.served_since(kid) if edge is not None else None)
        for t in times:
            if t is None:
                return None
            if latest is None or t > latest:
                latest = t
    return latest


def _visible_anywhere(
    state: State, kid: str, managed: Collection[str] | None, edges: Edges | None = None
) -> bool:
    """Could a publisher we manage, or one of its edges, still be serving ``kid``?

    Every configured publisher counts, used by a ring or not: one dropped from
    a ring still serves what it last confirmed until it confirms a document
    without the key. A publisher removed from the config is no longer ours to
    confirm; its last record must not block destruction forever (the docs say
    so). A stale record says only what was served once: a write whose
    read-back failed may have put any key there since, so until a publish is
    confirmed again every key counts as visible on it, and so do the kids of
    any write never confirmed (``asked``). An edge counts until a probe there
    shows a document without the key: one never probed shows nothing yet, and
    one whose probe failed may still serve what it showed last.
    """
    if any(
        rec.stale or kid in rec.kids or kid in rec.asked
        for name, rec in state.publishers.items()
        if managed is None or name in managed
    ):
        return True
    for p, urls in (edges or {}).items():
        if managed is not None and p not in managed:
            continue
        for url in urls:
            edge = state.edge(p, url)
            if edge is None or edge.error is not None or kid in edge.kids:
                return True
    return False


def _managed(policies: Mapping[str, Policy], publishers: Collection[str] | None) -> list[str]:
    """Publishers keymgr keeps: those rings use, then any other configured one."""
    names = publishers_in_use(policies)
    if publishers is not None:
        known = set(names)
        names.extend(p for p in publishers if p not in known)
    return names


# --- the planner -------------------------------------------------------------


class PlanMemo:
    """What :func:`plan` found for steady rings, so a pass over 100,000 rings
    where nothing changed does not plan each ring again.

    A ring's plan is a pure function of the ring, its policy, the publisher
    and edge records, the managed publishers, the edges and ``now``. For a
    *steady* ring (a signer, nothing pending or published, nothing due)
    ``now`` only enters through thresholds that are each either passed or
    among the ring's upcoming times (``test_sleeping_until_next_at_misses_nothing``
    checks that every threshold is reported); so for the same inputs and any
    later ``now`` before the earliest of them, the plan is the same: no due
    action and the same next transition. The inputs are compared by identity
    (state objects are immutable; a store hands back the same objects for
    what did not change), the small ones by equality; anything else plans
    the ring again. One memo per :class:`~keymgr.reconciler.Reconciler`.

    Of those records, a steady ring's plan reads the publisher and edge
    records, the managed publishers and the edges only for an expired or
    revoked key (its destruction waits until nothing serves it). So a change
    there forgets only the plans of such rings (:attr:`reading`): a one-ring
    rotation changes one publisher's record, and the other 99,999 rings of a
    100,000-ring state keep their plans (benchmarks/bench_scale.py).
    """

    def __init__(self) -> None:
        self.context: tuple[object, ...] | None = None
        #: ring name -> (ring, policy, when planned, its next transition)
        self.rings: dict[str, tuple[Ring, Policy, datetime, Upcoming | None]] = {}
        #: The remembered rings whose plan reads the publisher and edge records.
        self.reading: set[str] = set()
        #: publisher -> (its record, the policies, its rings, the kids it must
        #: serve): see :func:`_wanted`.
        self.wants: dict[
            str, tuple[PublisherRecord | None, object, tuple[Ring | None, ...], frozenset[str]]
        ] = {}
        self._index: tuple[object, dict[str, tuple[str, ...]]] | None = None

    def rings_of(self, policies: Mapping[str, Policy]) -> dict[str, tuple[str, ...]]:
        """:func:`rings_of`, built again only for other policies (a reload)."""
        if self._index is None or self._index[0] is not policies:
            self._index = (policies, rings_of(policies))
        return self._index[1]

    def enter(
        self, state: State, managed: Sequence[str], edges: Edges | None
    ) -> None:
        """Forget the plans that read the publisher and edge records, the
        managed publishers or the edges, unless those are the same."""
        old = self.context
        if (
            old is None
            or old[0] is not state.publishers
            or old[1] is not state.edges
            or old[2] != tuple(managed)
            or old[3] != (dict(edges) if edges is not None else None)
        ):
            for name in self.reading:
                self.rings.pop(name, None)
            self.reading.clear()
        self.context = (
            state.publishers,
            state.edges,
            tuple(managed),
            dict(edges) if edges is not None else None,
        )

    def get(
        self, name: str, ring: Ring, pol: Policy, now: datetime
    ) -> tuple[bool, Upcoming | None]:
        """(True, its next transition) when ``ring``'s plan at ``now`` is known."""
        hit = self.rings.get(name)
        if hit is None or hit[0] is not ring or hit[1] is not pol or now < hit[2]:
            return False, None
        nxt = hit[3]
        if nxt is not None and now >= nxt.at:
            return False, None
        return True, nxt

    def put(
        self, name: str, ring: Ring, pol: Policy, now: datetime, nxt: Upcoming | None
    ) -> None:
        """Remember a plan with nothing due, if the ring is steady."""
        if ring.active is not None and not ring.in_state(PENDING, PUBLISHED):
            self.rings[name] = (ring, pol, now, nxt)
            if ring.in_state(EXPIRED, REVOKED):
                self.reading.add(name)
            else:
                self.reading.discard(name)
        else:
            self.forget(name)

    def forget(self, name: str) -> None:
        self.rings.pop(name, None)
        self.reading.discard(name)


def plan(
    state: State,
    policies: Mapping[str, Policy],
    now: datetime,
    publishers: Collection[str] | None = None,
    edges: Edges | None = None,
    memo: PlanMemo | None = None,
) -> Plan:
    """What is due at ``now``. ``publishers``: every configured publisher
    (default: those the rings use), so one dropped from every ring is still
    kept consistent and still counts before a key is destroyed. ``edges``:
    the URLs probed for each publisher (``verify_urls``), each of which must
    show a key before its promotion clock starts and stop showing it before
    it is destroyed. ``memo``: a :class:`PlanMemo` kept between calls, which
    skips steady rings whose inputs did not change (same result)."""
    due: list[Action] = []
    upcoming: dict[str, Upcoming | None] = {}
    managed = _managed(policies, publishers)
    index = memo.rings_of(policies) if memo is not None else rings_of(policies)
    for p in managed:
        rec = state.publishers.get(p)
        want = _wanted(state, policies, p, index, memo)
        if (rec is None and want) or (rec is not None and (rec.stale or rec.kids != want)):
            due.append(Publish(p))
    if memo is not None:
        memo.enter(state, managed, edges)
    for name, pol in policies.items():
        ring = state.ring(name)
        if memo is not None:
            known, nxt = memo.get(name, ring, pol, now)
            if known:
                upcoming[name] = nxt
                continue
        ring_due, nxt = plan_ring(state, ring, pol, now, managed, edges)
        due.extend(ring_due)
        upcoming[name] = nxt
        if memo is not None:
            if ring_due:
                memo.forget(name)
            else:
                memo.put(name, ring, pol, now, nxt)
    return Plan(due=tuple(due), upcoming=upcoming)


def _earliest(cands: Iterable[Upcoming]) -> Upcoming | None:
    best: Upcoming | None = None
    for c in cands:
        if best is None or c.at < best.at:
            best = c
    return best


def successor_times(ring: Ring, pol: Policy, active: Key) -> tuple[datetime, datetime]:
    """(when to generate the successor, earliest promotion ignoring publication)."""
    base = _required(active.activated_at, ring, active, "activated_at") + pol.rotation_period
    if ring.rotate_at is not None and ring.rotate_at < base:
        base = ring.rotate_at
        return base, base
    return base - pol.publish_ahead, base


def plan_ring(
    state: State,
    ring: Ring,
    pol: Policy,
    now: datetime,
    managed: Collection[str] | None = None,
    edges: Edges | None = None,
) -> tuple[list[Action], Upcoming | None]:
    due: list[Action] = []
    later: list[Upcoming] = []

    # One pass over the keys (a plan visits every ring of the config):
    # the first active key, and the newest pending and published ones.
    active = pending = published = None
    for k in ring.keys:
        st = k.state
        if st == ACTIVE:
            if active is None:
                active = k
        elif st == PENDING:
            if pending is None or (k.created_at, k.kid) > (pending.created_at, pending.kid):
                pending = k
        elif st == PUBLISHED and (
            published is None or (k.created_at, k.kid) > (published.created_at, published.kid)
        ):
            published = k

    if pending is not None and _confirmed_everywhere(state, pol, pending.kid):
        due.append(MarkPublished(ring.name, pending.kid))

    if active is None:
        # Bootstrap, or every signer was revoked: nothing valid can be signed
        # right now, so there is nothing for verifiers to lose by acting at once.
        if published is not None:
            if _confirmed_everywhere(state, pol, published.kid):
                ever = any(k.activated_at is not None for k in ring.keys)
                reason = "replace" if ever else "bootstrap"
                due.append(Promote(ring.name, published.kid, None, reason))
        elif pending is None:
            reason = "replace" if ring.in_state(REVOKED) else "bootstrap"
            due.append(Generate(ring.name, reason))
    else:
        gen_at, promote_base = successor_times(ring, pol, active)
        if pending is None and published is None:
            if now >= gen_at:
                if ring.emergency:
                    reason = "emergency"
                elif ring.rotate_at is not None:
                    reason = "rotate"
                else:
                    reason = "scheduled"
                due.append(Generate(ring.name, reason))
            else:
                later.append(Upcoming("generate", None, gen_at))
        elif published is not None and pending is None:
            # Promotion waits A from the moment the *last* publisher started
            # serving the key without a break: a document reverted or lost
            # since restarts the wait (docs/design.md#invariant-2).
            served = served_since(state, pol, published.kid, edges)
            start = served if served is not None else now
            start = max(start, _required(published.published_at, ring, published, "published_at"))
            promote_at = start if ring.emergency else max(promote_base, start + pol.publish_ahead)
            if now >= promote_at and served is not None:
                if _confirmed_everywhere(state, pol, published.kid):
                    reason = "emergency" if ring.emergency else "scheduled"
                    if ring.rotate_at is not None and not ring.emergency:
                        reason = "rotate"
                    due.append(Promote(ring.name, published.kid, active.kid, reason))
            elif now < promote_at:
                later.append(Upcoming("promote", published.kid, promote_at))

    for k in ring.keys:
        if k.state == RETIRED:
            at = _required(k.retired_at, ring, k, "retired_at") + pol.retire_grace
            if now >= at:
                due.append(Expire(ring.name, k.kid))
            else:
                later.append(Upcoming("expire", k.kid, at))
        elif k.state == EXPIRED:
            at = _required(k.expired_at, ring, k, "expired_at") + pol.destroy_after
            if now >= at:
                if not _visible_anywhere(state, k.kid, managed, edges):
                    due.append(Destroy(ring.name, k.kid))
            else:
                later.append(Upcoming("destroy", k.kid, at))
        elif k.state == REVOKED and not _visible_anywhere(state, k.kid, managed, edges):
            due.append(Destroy(ring.name, k.kid))
        elif k.state == DESTROYED:
            at = _required(k.destroyed_at, ring, k, "destroyed_at") + pol.history
            if now >= at:
                due.append(Forget(ring.name, k.kid))
            else:
                later.append(Upcoming("forget", k.kid, at))
    for t in ring.forgotten:
        at = t.destroyed_at + pol.history + TOMBSTONE_KEEP
        if now >= at:
            due.append(DropTombstone(ring.name, t.kid))
        else:
            later.append(Upcoming("drop-tombstone", t.kid, at))

    return due, _earliest(later)


def _required(t: datetime | None, ring: Ring, key: Key, name: str) -> datetime:
    """A time the key's state requires. keymgr.validate refuses a state without
    it before planning; a planner used on an unchecked state fails in one line
    instead of an assert that would crash-loop a daemon."""
    if t is None:
        raise StateError(f"ring {ring.name}: key {key.kid}: {name} missing for a {key.state} key")
    return t
