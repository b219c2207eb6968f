"""The projected path: every transition of every ring from now until a time T.

Pure, like the planner it drives: no I/O, no clock, no randomness. It asks the
real :func:`keymgr.planner.plan` what is due, applies the real pure
:mod:`keymgr.transitions` to its own copy of the state (states are immutable:
the caller's is never changed), waves by waves as
:class:`keymgr.reconciler.Reconciler` does, and jumps to the next upcoming
moment, until T. ``keymgr plan --at T`` prints the result.

It assumes the **optimistic path**: every publisher confirms each JWKS write
the moment it is due, every probed edge (``verify_urls``) shows a publisher's
confirmed document at once, and every backend call succeeds. A failed, slow
or unconfirmed publish, or a drifted target, only delays promotions and what
follows them (docs/design.md#promotion); it never brings anything forward.

Keys that do not exist yet get deterministic placeholder kids,
``<next-1 of RING>``, ``<next-2 of RING>``, ... in the order the ring would
generate them. They are not thumbprints, so :mod:`keymgr.validate` would refuse
any state holding one; the projected state itself is never returned, only the
steps and what comes after T.

:func:`migrations` uses the same walk to say, for a ring whose ``algorithm``
was changed, when the first key of the new algorithm is published and starts
signing, and when the last key of the old one leaves the JWKS.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from keymgr import transitions
from keymgr.errors import KeymgrError, UsageError
from keymgr.model import IN_JWKS, State
from keymgr.planner import (
    Action,
    Destroy,
    DropTombstone,
    Edges,
    Expire,
    Forget,
    Generate,
    MarkPublished,
    Policy,
    Promote,
    Publish,
    Upcoming,
    desired_keys,
    plan,
)
from keymgr.timefmt import format_duration, format_time

#: The farthest a projection looks ahead (as the longest duration keymgr parses).
MAX_HORIZON = timedelta(days=3650)
#: The most transitions a projection lists before it refuses.
MAX_STEPS = 10_000
#: The most distinct instants it visits before it refuses.
MAX_MOMENTS = 5_000
#: Waves per instant, as the reconciler (keymgr.reconciler.MAX_WAVES).
MAX_WAVES = 32

#: Said with every projection: what it takes for granted.
ASSUMPTION = (
    "optimistic path: every publisher confirms each JWKS write the moment it is due, "
    "every probed edge shows it at once, and every backend call succeeds; a failed, slow "
    "or unconfirmed publish, or a target serving an older document, delays the promotion "
    "and what follows it, never brings anything forward"
)

#: The digest recorded for a projected publish (never a real document's).
PROJECTED_DIGEST = "projected"

#: Key events of the transitions, and the action a step shows for each.
ACTIONS = {
    "key.generated": "generate",
    "key.published": "publish",
    "key.promoted": "promote",
    "key.retired": "retire",
    "key.expired": "expire",
    "key.destroyed": "destroy",
    "key.forgotten": "forget",
    "key.tombstone_dropped": "drop-tombstone",
}


class ProjectionLimit(UsageError):
    """A projection asked to look too far: one line, exit code 2."""


def placeholder_kid(ring: str, n: int) -> str:
    """The kid shown for the ``n``-th key ``ring`` would generate from now."""
    return f"<next-{n} of {ring}>"


def is_placeholder(kid: str) -> bool:
    return kid.startswith("<next-")


@dataclass(frozen=True)
class Step:
    """One transition on the projected path."""

    at: datetime
    ring: str
    #: generate | publish | promote | retire | expire | destroy | forget | drop-tombstone
    action: str
    kid: str  # a real kid, or a placeholder for a key not generated yet
    alg: str
    reason: str | None = None

    @property
    def placeholder(self) -> bool:
        return is_placeholder(self.kid)

    @property
    def event(self) -> str:
        """The audit event a reconcile would record for this step."""
        return next(e for e, a in ACTIONS.items() if a == self.action)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": format_time(self.at),
            "ring": self.ring,
            "action": self.action,
            "kid": self.kid,
            "placeholder": self.placeholder,
            "alg": self.alg,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Projection:
    start: datetime
    until: datetime
    #: Every transition from ``start`` to ``until`` (both included), in order.
    steps: tuple[Step, ...]
    #: Per ring: its next transition after ``until`` on the same path.
    upcoming: Mapping[str, Upcoming | None]


@dataclass(frozen=True)
class Migration:
    """A ring whose keys in the JWKS do not all have the configured algorithm.

    Times come from the state when they already happened, else from the
    projection (None: not within :data:`MAX_HORIZON`).
    """

    ring: str
    #: The other algorithms of the ring's keys still in (or on their way to) the JWKS.
    old: tuple[str, ...]
    new: str
    #: The first key of ``new`` is in every JWKS of the ring: from then on the
    #: JWKS holds keys of both algorithms.
    published_at: datetime | None
    #: It starts signing (the switch).
    active_at: datetime | None
    #: The last key of an old algorithm leaves the JWKS.
    old_unpublished_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ring": self.ring,
            "from": list(self.old),
            "to": self.new,
            "published_at": format_time(self.published_at),
            "active_at": format_time(self.active_at),
            "old_unpublished_at": format_time(self.old_unpublished_at),
        }


# --- the walk -------------------------------------------------------------------


def _edges_show(state: State, publisher: str, edges: Edges | None, now: datetime) -> State:
    """Optimistic probes: every edge of ``publisher`` shows what it confirmed."""
    rec = state.publishers.get(publisher)
    if rec is None or rec.stale:
        return state
    for url in (edges or {}).get(publisher, ()):
        state, _ = transitions.edge_observed(state, publisher, url, rec.kids, now)
    return state


def _apply(
    state: State,
    policies: Mapping[str, Policy],
    due: tuple[Action, ...],
    now: datetime,
    generated: dict[str, int],
    edges: Edges | None,
) -> tuple[State, list[dict[str, Any]]]:
    """One wave, as ``Reconciler.run`` executes it, with every outcome a success:
    publishes first, each writing what the planner's state wanted."""
    seen = state
    events: list[dict[str, Any]] = []
    for a in sorted(due, key=lambda a: 0 if isinstance(a, Publish) else 1):
        if isinstance(a, Publish):
            kids = frozenset(k.kid for k in desired_keys(seen, policies, a.publisher))
            state, _ = transitions.publisher_confirmed(
                state, a.publisher, PROJECTED_DIGEST, kids, now, written=True
            )
            state = _edges_show(state, a.publisher, edges, now)
            continue
        if isinstance(a, Generate):
            pol = policies[a.ring]
            n = generated.get(a.ring, 0) + 1
            generated[a.ring] = n
            state, evs = transitions.add_key(
                state,
                a.ring,
                placeholder_kid(a.ring, n),
                {},
                pol.algorithm,
                pol.backend,
                now,
                a.reason,
            )
        elif isinstance(a, MarkPublished):
            state, evs = transitions.mark_published(state, a.ring, a.kid, now)
        elif isinstance(a, Promote):
            state, evs = transitions.promote(state, a.ring, a.kid, a.retire, now, a.reason)
        elif isinstance(a, Expire):
            state, evs = transitions.expire(state, a.ring, a.kid, now)
        elif isinstance(a, Destroy):
            state, evs = transitions.destroy(state, a.ring, a.kid, now)
        elif isinstance(a, Forget):
            state, evs = transitions.forget(state, a.ring, a.kid, now)
        elif isinstance(a, DropTombstone):
            state, evs = transitions.drop_tombstone(state, a.ring, a.kid, now)
        else:  # an action this projection has no optimistic outcome for
            raise KeymgrError(f"projection: no outcome for planner action {a!r}")
        events.extend(evs)
    return state, events


def _steps(events: list[dict[str, Any]], now: datetime) -> list[Step]:
    return [
        Step(
            at=now,
            ring=str(ev["ring"]),
            action=ACTIONS[ev["event"]],
            kid=str(ev["kid"]),
            alg=str(ev["alg"]),
            reason=ev.get("reason"),
        )
        for ev in events
        if ev["event"] in ACTIONS
    ]


def _walk(
    state: State,
    policies: Mapping[str, Policy],
    start: datetime,
    publishers: Collection[str] | None,
    edges: Edges | None,
) -> Iterator[tuple[datetime, list[Step], State, Mapping[str, Upcoming | None]]]:
    """Each instant of the path from ``start``: the steps taken then, the state
    after them and, per ring, what comes next. Stops when nothing is upcoming."""
    for ring in state.rings.values():
        for k in ring.keys:
            if is_placeholder(k.kid):
                raise ValueError(f"ring {ring.name}: {k.kid} is a projected key, not a real one")
    generated: dict[str, int] = {}
    t = start
    while True:
        steps: list[Step] = []
        for name in edges or {}:  # a pass probes the edges first
            state = _edges_show(state, name, edges, t)
        for _ in range(MAX_WAVES):
            p = plan(state, policies, t, publishers, edges)
            if not p.due:
                break
            state, events = _apply(state, policies, p.due, t, generated, edges)
            steps.extend(_steps(events, t))
        else:
            raise KeymgrError(f"projection did not settle at {format_time(t)}")
        yield t, steps, state, p.upcoming
        nxt = p.next_at
        if nxt is None:
            return
        if nxt <= t:  # the planner promised something later and made it due now
            raise KeymgrError(f"projection: next transition {format_time(nxt)} is not later")
        t = nxt


def project(
    state: State,
    policies: Mapping[str, Policy],
    now: datetime,
    until: datetime,
    publishers: Collection[str] | None = None,
    edges: Edges | None = None,
    *,
    max_steps: int = MAX_STEPS,
) -> Projection:
    """Every transition of every ring from ``now`` to ``until``, in order.

    ``publishers`` and ``edges`` as for :func:`keymgr.planner.plan`. Raises
    :class:`ProjectionLimit` when ``until`` is more than :data:`MAX_HORIZON`
    ahead, or the path holds more than ``max_steps`` transitions or
    :data:`MAX_MOMENTS` instants.
    """
    if until < now:
        raise ValueError("until is before now")
    if until - now > MAX_HORIZON:
        raise ProjectionLimit(
            f"{format_time(until)} is more than {format_duration(MAX_HORIZON)} after "
            f"{format_time(now)}: a projection looks at most that far ahead"
        )
    steps: list[Step] = []
    upcoming: Mapping[str, Upcoming | None] = {}
    for moments, (t, taken, _, nxt) in enumerate(_walk(state, policies, now, publishers, edges)):
        if t > until:
            break
        steps.extend(taken)
        upcoming = nxt
        if len(steps) > max_steps or moments >= MAX_MOMENTS:
            raise ProjectionLimit(
                f"the path to {format_time(until)} holds more than "
                f"{min(len(steps), max_steps)} transitions (by {format_time(t)}); "
                "project to an earlier time"
            )
    return Projection(start=now, until=until, steps=tuple(steps), upcoming=upcoming)


# --- algorithm changes --------------------------------------------------------------


def migrating(state: State, policies: Mapping[str, Policy]) -> list[str]:
    """Rings with a key in (or on its way to) the JWKS whose algorithm is not the
    configured one: the ring's ``algorithm`` was changed and the change is not over."""
    out = []
    for name, pol in policies.items():
        ring = state.rings.get(name)
        if ring is not None and any(
            k.state in IN_JWKS and k.alg != pol.algorithm for k in ring.keys
        ):
            out.append(name)
    return out


def migrations(
    state: State,
    policies: Mapping[str, Policy],
    now: datetime,
    publishers: Collection[str] | None = None,
    edges: Edges | None = None,
) -> list[Migration]:
    """For each ring changing algorithm: when the first new-algorithm key is
    published and starts signing, and when the last old one leaves the JWKS.

    Projected on the optimistic path (see :data:`ASSUMPTION`) over the changing
    rings only, until every answer is known or :data:`MAX_HORIZON` has passed.
    """
    names = migrating(state, policies)
    if not names:
        return []
    subset = {n: policies[n] for n in names}
    found: dict[str, dict[str, datetime | None]] = {}
    old: dict[str, set[str]] = {}
    for n in names:
        new = subset[n].algorithm
        ring = state.ring(n)
        live = [k for k in ring.keys if k.state in IN_JWKS]
        old[n] = {k.alg for k in live if k.alg != new}
        published = [k.published_at for k in live if k.alg == new and k.published_at]
        active = ring.active
        found[n] = {
            "published_at": min(published) if published else None,
            "active_at": active.activated_at if active and active.alg == new else None,
            "old_unpublished_at": None,
        }
    end = now + MAX_HORIZON
    walk = _walk(state, subset, now, publishers, edges)
    for moments, (t, taken, projected, _) in enumerate(walk):
        if t > end or moments >= MAX_MOMENTS:
            break
        for s in taken:
            f = found[s.ring]
            new = subset[s.ring].algorithm
            if s.alg == new and s.action == "publish" and f["published_at"] is None:
                f["published_at"] = t
            if s.alg == new and s.action == "promote" and f["active_at"] is None:
                f["active_at"] = t
            if s.alg != new and s.action in ("generate", "publish"):
                old[s.ring].add(s.alg)
        for n in names:
            f = found[n]
            new = subset[n].algorithm
            if f["old_unpublished_at"] is None and not any(
                k.state in IN_JWKS and k.alg != new for k in projected.ring(n).keys
            ):
                f["old_unpublished_at"] = t
        if all(v is not None for f in found.values() for v in f.values()):
            break
    return [
        Migration(
            ring=n,
            old=tuple(sorted(old[n])),
            new=subset[n].algorithm,
            published_at=found[n]["published_at"],
            active_at=found[n]["active_at"],
            old_unpublished_at=found[n]["old_unpublished_at"],
        )
        for n in names
    ]


def migration_warning(m: Migration, now: datetime) -> str:
    """One line: when the switch happens, and what verifiers must allow meanwhile."""

    def when(verb_future: str, verb_past: str, t: datetime | None) -> str:
        if t is None:
            return f"{verb_future} not within {format_duration(MAX_HORIZON)}"
        return f"{verb_past if t <= now else verb_future} {format_time(t)}"

    old = " and ".join(m.old)
    return (
        f"keyrings.{m.ring}.algorithm: changing from {old} to {m.new}: the first {m.new} key "
        f"{when('is published at', 'was published at', m.published_at)} and "
        f"{when('starts signing at', 'signs since', m.active_at)}; the last {old} key "
        f"{when('leaves the JWKS at', 'left the JWKS at', m.old_unpublished_at)}. "
        f"Meanwhile the JWKS holds {old} and {m.new} keys: every verifier must accept "
        f"{m.new} from the moment its key is published and keep accepting {old} until "
        f"the last {old} key leaves the JWKS, or it rejects valid tokens "
        "(times projected on the optimistic path: publishes confirmed when due)"
    )


def migration_warnings(
    state: State,
    policies: Mapping[str, Policy],
    now: datetime,
    publishers: Collection[str] | None = None,
    edges: Edges | None = None,
) -> list[str]:
    return [
        migration_warning(m, now) for m in migrations(state, policies, now, publishers, edges)
    ]


__all__ = [
    "ASSUMPTION",
    "MAX_HORIZON",
    "MAX_MOMENTS",
    "MAX_STEPS",
    "Migration",
    "Projection",
    "ProjectionLimit",
    "Step",
    "is_placeholder",
    "migrating",
    "migration_warning",
    "migration_warnings",
    "migrations",
    "placeholder_kid",
    "project",
]
