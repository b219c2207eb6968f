"""The pure planner: (state, policies, now) -> the transitions that are due.

No I/O, no clock, no randomness: everything it needs is an argument, so it can
be driven through years of simulated time in milliseconds and ``keymgr plan
--at`` can show operators exactly what a reconcile would do. The reconciler
executes the returned actions, applies their outcome with
:mod:`keymgr.transitions`, commits, and plans again until nothing is due (the
way a Kubernetes controller reconciles desired against observed state).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from keymgr.model import (
    ACTIVE,
    EXPIRED,
    IN_JWKS,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    Key,
    Ring,
    State,
)


@dataclass(frozen=True)
class Policy:
    """The timing rules of one key ring (design.md, "Timing rules")."""

    ring: str
    backend: str
    algorithm: str
    rotation_period: timedelta  # P
    publish_ahead: timedelta  # A
    retire_grace: timedelta  # G
    destroy_after: timedelta  # D
    publishers: tuple[str, ...]


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


Action = Generate | Publish | MarkPublished | Promote | Expire | Destroy


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


def desired_keys(state: State, policies: Mapping[str, Policy], publisher: str) -> list[Key]:
    """Keys the publisher's JWKS must hold, across every ring that uses it."""
    out: list[Key] = []
    for name, pol in policies.items():
        if publisher in pol.publishers:
            ring = state.rings.get(name)
            if ring is not None:
                out.extend(k for k in ring.keys if k.state in IN_JWKS)
    return out


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


def _visible_anywhere(state: State, kid: str, in_use: Collection[str] | None) -> bool:
    """Could a publisher we manage still be serving ``kid``?

    A publisher removed from the config is no longer ours to confirm; its last
    record must not block destruction forever. A stale record says only what was
    served once: a write whose read-back failed may have put any key there since,
    so until a publish is confirmed again every key counts as visible on it.
    """
    return any(
        rec.stale or kid in rec.kids
        for name, rec in state.publishers.items()
        if in_use is None or name in in_use
    )


# --- the planner -------------------------------------------------------------


def plan(state: State, policies: Mapping[str, Policy], now: datetime) -> Plan:
    due: list[Action] = []
    upcoming: dict[str, Upcoming | None] = {}
    in_use = publishers_in_use(policies)
    for p in in_use:
        want = frozenset(k.kid for k in desired_keys(state, policies, p))
        rec = state.publishers.get(p)
        if (rec is None and want) or (rec is not None and (rec.stale or rec.kids != want)):
            due.append(Publish(p))
    for name, pol in policies.items():
        ring_due, nxt = plan_ring(state, state.ring(name), pol, now, in_use)
        due.extend(ring_due)
        upcoming[name] = nxt
    return Plan(due=tuple(due), upcoming=upcoming)


def _earliest(cands: Iterable[Upcoming]) -> Upcoming | None:
    best: Upcoming | None = None
    for c in cands:
        if best is None or c.at < best.at:
            best = c
    return best


def successor_times(ring: Ring, pol: Policy, active: Key) -> tuple[datetime, datetime]:
    """(when to generate the successor, earliest promotion ignoring publication)."""
    assert active.activated_at is not None
    base = active.activated_at + pol.rotation_period
    if ring.rotate_at is not None and ring.rotate_at < base:
        base = ring.rotate_at
        return base, base
    return base - pol.publish_ahead, base


def plan_ring(
    state: State, ring: Ring, pol: Policy, now: datetime, in_use: Collection[str] | None = None
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
            assert published.published_at is not None
            if ring.emergency:
                promote_at = published.published_at
            else:
                promote_at = max(promote_base, published.published_at + pol.publish_ahead)
            if now >= promote_at:
                if _confirmed_everywhere(state, pol, published.kid):
                    reason = "emergency" if ring.emergency else "scheduled"
                    if ring.rotate_at is not None and not ring.emergency:
                        reason = "rotate"
                    due.append(Promote(ring.name, published.kid, active.kid, reason))
            else:
                later.append(Upcoming("promote", published.kid, promote_at))

    for k in ring.keys:
        if k.state == RETIRED:
            assert k.retired_at is not None
            at = k.retired_at + pol.retire_grace
            if now >= at:
                due.append(Expire(ring.name, k.kid))
            else:
                later.append(Upcoming("expire", k.kid, at))
        elif k.state == EXPIRED:
            assert k.expired_at is not None
            at = k.expired_at + pol.destroy_after
            if now >= at:
                if not _visible_anywhere(state, k.kid, in_use):
                    due.append(Destroy(ring.name, k.kid))
            else:
                later.append(Upcoming("destroy", k.kid, at))
        elif k.state == REVOKED and not _visible_anywhere(state, k.kid, in_use):
            due.append(Destroy(ring.name, k.kid))

    return due, _earliest(later)
