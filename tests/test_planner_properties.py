"""Properties of the pure planner alone, on arbitrary well-formed states.

No reconcile loop here: ``tests/test_model_reconciler.py`` drives the real
reconciler through time, faults and hostile acts. These tests build states
directly (every key state, times in lifecycle order, publisher records fresh,
stale or with unconfirmed writes, rotations requested) and check what a single
``plan(state, policies, now)`` may return against the rules of docs/design.md#timing, stated
here on the state rather than copied from the planner:

- a key is promoted only from ``published``, and, while a signer exists and
  no emergency was asked for, only once every publisher of its ring has
  served it without a break for A and its predecessor's period (or a
  requested rotation) is over (invariant 2, "Timing rules");
- a key expires only ``retire_grace`` after it retired (invariant 3);
- a key is destroyed only when expired for ``destroy_after`` or revoked, and
  only while no managed publisher may still serve it (invariant 4);
- a destroyed key's record is forgotten only ``history`` after its
  destruction, and its tombstone dropped only ``TOMBSTONE_KEEP`` later;
- sleeping until ``next_at`` misses nothing: no transition becomes due before
  it that was not due already, and what it announces is due when it comes.

They are fast (the mutation-testing run in pyproject.toml selects this file).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    IN_JWKS,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    STATES,
    Key,
    PublisherRecord,
    Ring,
    State,
    Tombstone,
)
from keymgr.planner import (
    TOMBSTONE_KEEP,
    Destroy,
    DropTombstone,
    Expire,
    Forget,
    Generate,
    MarkPublished,
    Plan,
    PlanMemo,
    Policy,
    Promote,
    Publish,
    plan,
)

NOW = datetime(2031, 6, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
PUBLISHERS = ("p0", "p1", "p2")
RINGS = ("r0", "r1")
#: How far back the generated history reaches.
PAST = 120 * DAY


def secs(lo: timedelta, hi: timedelta) -> st.SearchStrategy[timedelta]:
    return st.integers(int(lo.total_seconds()), int(hi.total_seconds())).map(
        lambda s: timedelta(seconds=s)
    )


def past() -> st.SearchStrategy[datetime]:
    """A whole second in the last PAST before NOW: often NOW itself or just
    before (where a wait of A or a grace G is not over yet)."""
    return st.one_of(
        st.just(NOW), secs(0 * SEC, 2 * DAY).map(NOW.__sub__), secs(0 * SEC, PAST).map(NOW.__sub__)
    )


@st.composite
def ring_keys(draw: st.DrawFn, ring: str) -> tuple[Key, ...]:
    if draw(often(4)):
        # The usual shape: older keys, a signer, perhaps a successor.
        old = (RETIRED, EXPIRED, DESTROYED, REVOKED)
        states = draw(st.lists(st.sampled_from(old), max_size=3))
        if draw(often(5)):
            states.append(ACTIVE)
        states.extend(draw(st.sampled_from([(), (PENDING,), (PUBLISHED,), (PUBLISHED,)])))
    else:
        states = draw(st.lists(st.sampled_from(STATES), max_size=5))
    keys = []
    active = False
    for i, state in enumerate(states):
        if state == ACTIVE and active:
            state = RETIRED  # at most one signer (validate refuses more)
        active = active or state == ACTIVE
        # created <= published <= activated <= retired <= expired <= destroyed
        c, p, a, r, e, d = sorted(draw(st.lists(past(), min_size=6, max_size=6)))
        times: dict[str, datetime | None] = {"created_at": c}
        if state in (PUBLISHED, ACTIVE, RETIRED, EXPIRED):
            times["published_at"] = p
        if state in (ACTIVE, RETIRED, EXPIRED):
            times["activated_at"] = a
        if state in (RETIRED, EXPIRED):
            times["retired_at"] = r
        if state == EXPIRED:
            times["expired_at"] = e
        if state == DESTROYED:
            times["destroyed_at"] = d
        if state == REVOKED:
            times["revoked_at"] = d
        keys.append(
            Key(
                kid=f"{ring}-k{i}",
                alg="EdDSA",
                backend="b0",
                state=state,
                public_jwk={"kty": "OKP", "crv": "Ed25519", "x": f"x{ring}{i}"},
                **times,  # type: ignore[arg-type]
            )
        )
    return tuple(keys)


@st.composite
def tombstones(draw: st.DrawFn, ring: str) -> tuple[Tombstone, ...]:
    """Tombstones of keys forgotten earlier, destroyed up to PAST + 60 days ago
    (some past their TOMBSTONE_KEEP, some not)."""
    ago = st.one_of(past(), secs(0 * SEC, 60 * DAY).map(lambda d: NOW - PAST - d))
    return tuple(
        Tombstone(kid=f"{ring}-t{i}", alg="EdDSA", backend="b0", destroyed_at=t)
        for i, t in enumerate(draw(st.lists(ago, max_size=3)))
    )


def often(p_true: int) -> st.SearchStrategy[bool]:
    """True about ``p_true`` times in 6."""
    return st.sampled_from([True] * p_true + [False] * (6 - p_true))


@st.composite
def records(draw: st.DrawFn, keys: list[Key]) -> dict[str, PublisherRecord]:
    """Mostly what keymgr would have confirmed (every key of the JWKS states),
    sometimes any subset, stale, or with writes never confirmed."""
    kids = [k.kid for k in keys]
    in_jwks = {k.kid for k in keys if k.state in IN_JWKS}
    out = {}
    for p in PUBLISHERS:
        if not draw(often(5)):
            continue
        usual = draw(often(4)) or not kids
        held = set(in_jwks) if usual else draw(st.sets(st.sampled_from(kids)))
        stale = draw(often(1))
        since = {} if stale else {k: draw(past()) for k in sorted(held)}
        asked = draw(st.sets(st.sampled_from(kids))) if kids and draw(often(1)) else set()
        out[p] = PublisherRecord(
            sha256=f"digest-{p}",
            kids=frozenset(held),
            confirmed_at=draw(past()),
            stale=stale,
            since=since,
            asked=frozenset(asked),
        )
    return out


@st.composite
def worlds(draw: st.DrawFn) -> tuple[State, dict[str, Policy], datetime]:
    rings = RINGS[: draw(st.integers(1, 2))]
    policies = {}
    state_rings = {}
    for name in rings:
        period = draw(secs(HOUR, 2 * DAY) | secs(HOUR, 60 * DAY))
        policies[name] = Policy(
            ring=name,
            backend="b0",
            algorithm="EdDSA",
            rotation_period=period,
            publish_ahead=draw(secs(SEC, min(period, DAY)) | secs(SEC, period)),
            retire_grace=draw(secs(SEC, 2 * DAY) | secs(SEC, 30 * DAY)),
            destroy_after=draw(st.just(timedelta(0)) | secs(SEC, 2 * DAY) | secs(SEC, 30 * DAY)),
            history=draw(st.just(timedelta(0)) | secs(SEC, 2 * DAY) | secs(SEC, 120 * DAY)),
            publishers=tuple(
                draw(st.lists(st.sampled_from(PUBLISHERS), min_size=1, max_size=3, unique=True))
            ),
        )
        rotate_at = draw(st.none() | past())
        state_rings[name] = Ring(
            name=name,
            keys=draw(ring_keys(name)),
            rotate_at=rotate_at,
            emergency=rotate_at is not None and draw(st.booleans()),
            forgotten=draw(tombstones(name)),
        )
    keys = [k for r in state_rings.values() for k in r.keys]
    state = State(rings=state_rings, publishers=draw(records(keys)), clock=NOW)
    # Often a boundary: a recorded time plus one of the ring's durations, to
    # the second or one second either side of it.
    edges = []
    for name, r in state_rings.items():
        pol = policies[name]
        spans = (pol.publish_ahead, pol.retire_grace, pol.destroy_after, pol.rotation_period,
                 pol.history, pol.history + TOMBSTONE_KEEP)
        times = [t for k in r.keys for t in (k.published_at, k.activated_at, k.retired_at,
                                             k.expired_at, k.destroyed_at) if t is not None]
        times += [t.destroyed_at for t in r.forgotten]
        times += [t for rec in state.publishers.values() for t in rec.since.values()]
        if r.rotate_at is not None:
            times.append(r.rotate_at)
        edges += [t + d + e for t in times for d in spans for e in (-SEC, 0 * SEC, SEC)]
    edges = sorted(t for t in set(edges) if t >= NOW)
    later = st.just(0 * SEC) | secs(SEC, DAY) | secs(SEC, 90 * DAY)
    now = draw(st.sampled_from(edges)) if edges and draw(often(3)) else NOW + draw(later)
    return state, policies, now


def _key(state: State, ring: str, kid: str) -> Key:
    key = state.ring(ring).key(kid)
    assert key is not None, (ring, kid)
    return key


def ring_actions(p: Plan) -> set[object]:
    return {a for a in p.due if not isinstance(a, Publish)}


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_what_is_due_follows_the_timing_rules(
    world: tuple[State, dict[str, Policy], datetime],
) -> None:
    state, policies, now = world
    p = plan(state, policies, now, PUBLISHERS)
    assert p == plan(state, policies, now, PUBLISHERS)  # pure: same question, same answer
    promoted: set[str] = set()
    for a in p.due:
        if isinstance(a, Publish):
            assert a.publisher in PUBLISHERS
            continue
        pol = policies[a.ring]
        ring = state.ring(a.ring)
        if isinstance(a, Promote):
            assert a.ring not in promoted, f"two promotions in {a.ring}"
            promoted.add(a.ring)
            key = _key(state, a.ring, a.kid)
            assert key.state == PUBLISHED, a
            active = ring.active
            assert a.retire == (active.kid if active is not None else None), a
            recs = [state.publishers.get(q) for q in pol.publishers]
            for q, rec in zip(pol.publishers, recs, strict=True):
                assert rec is not None and not rec.stale and a.kid in rec.kids, (a, q, rec)
            if active is not None and not ring.emergency:
                assert active.activated_at is not None and key.published_at is not None
                for rec in recs:
                    assert rec is not None
                    since = rec.since.get(a.kid)
                    assert since is not None and since + pol.publish_ahead <= now, (a, rec)
                assert key.published_at + pol.publish_ahead <= now, a
                period_over = active.activated_at + pol.rotation_period <= now
                asked = ring.rotate_at is not None and ring.rotate_at <= now
                assert period_over or asked, a
        elif isinstance(a, MarkPublished):
            assert _key(state, a.ring, a.kid).state == PENDING, a
            for q in pol.publishers:
                rec = state.publishers.get(q)
                assert rec is not None and not rec.stale and a.kid in rec.kids, (a, q)
        elif isinstance(a, Generate):
            assert not ring.in_state(PENDING, PUBLISHED), (a, ring.keys)
        elif isinstance(a, Expire):
            key = _key(state, a.ring, a.kid)
            assert key.state == RETIRED and key.retired_at is not None, a
            assert key.retired_at + pol.retire_grace <= now, a
        elif isinstance(a, Destroy):
            key = _key(state, a.ring, a.kid)
            assert key.state in (EXPIRED, REVOKED), a
            if key.state == EXPIRED:
                assert key.expired_at is not None
                assert key.expired_at + pol.destroy_after <= now, a
            for q, rec in state.publishers.items():
                assert not (rec.stale or a.kid in rec.kids or a.kid in rec.asked), (a, q, rec)
        elif isinstance(a, Forget):
            key = _key(state, a.ring, a.kid)
            assert key.state == DESTROYED and key.destroyed_at is not None, a
            assert key.destroyed_at + pol.history <= now, a
        elif isinstance(a, DropTombstone):
            tomb = ring.tombstone(a.kid)
            assert tomb is not None, a
            assert tomb.destroyed_at + pol.history + TOMBSTONE_KEEP <= now, a
        else:  # pragma: no cover
            raise AssertionError(a)


@settings(max_examples=200, deadline=None)
@given(world=worlds(), fraction=st.floats(0, 1))
def test_sleeping_until_next_at_misses_nothing(
    world: tuple[State, dict[str, Policy], datetime], fraction: float
) -> None:
    state, policies, now = world
    p = plan(state, policies, now, PUBLISHERS)
    nxt = p.next_at
    if nxt is None:
        # Nothing announced: nothing may become due later either.
        for t in (now + SEC, now + timedelta(seconds=int(400 * 86400 * fraction) + 1)):
            assert ring_actions(plan(state, policies, t, PUBLISHERS)) <= ring_actions(p), t
        return
    assert nxt > now, (nxt, now)
    due_now = ring_actions(p)
    # Any moment before next_at: nothing new is due (the daemon may sleep).
    seconds = int((nxt - now).total_seconds())
    for t in {now + SEC, nxt - SEC, now + timedelta(seconds=int(seconds * fraction))}:
        if now < t < nxt:
            assert ring_actions(plan(state, policies, t, PUBLISHERS)) <= due_now, t
    # At next_at, what was announced for then is due: expiry and generation
    # unconditionally, promotion once every publisher serves the key without
    # a break, destruction once no publisher may serve it.
    at_next = ring_actions(plan(state, policies, nxt, PUBLISHERS))
    for name, up in p.upcoming.items():
        if up is None or up.at != nxt:
            continue
        kinds = {type(a) for a in at_next if getattr(a, "ring", None) == name}
        kids = {getattr(a, "kid", None) for a in at_next if getattr(a, "ring", None) == name}
        if up.action == "expire":
            assert Expire(name, up.kid or "") in at_next, up
        elif up.action == "generate":
            assert Generate in kinds, up
        elif up.action == "promote" and served_everywhere(state, policies[name], up.kid):
            assert Promote in kinds and up.kid in kids, up
        elif up.action == "destroy" and not maybe_served(state, up.kid):
            assert Destroy(name, up.kid or "") in at_next, up
        elif up.action == "forget":
            assert Forget(name, up.kid or "") in at_next, up
        elif up.action == "drop-tombstone":
            assert DropTombstone(name, up.kid or "") in at_next, up


def served_everywhere(state: State, pol: Policy, kid: str | None) -> bool:
    for q in pol.publishers:
        rec = state.publishers.get(q)
        if rec is None or rec.stale or kid not in rec.kids or kid not in rec.since:
            return False
    return True


def maybe_served(state: State, kid: str | None) -> bool:
    return any(r.stale or kid in r.kids or kid in r.asked for r in state.publishers.values())


@settings(max_examples=300, deadline=None)
@given(world=worlds(), steps=st.lists(st.floats(0, 1), min_size=1, max_size=4),
       change=st.sampled_from(["none", "ring", "publishers", "backwards"]))
def test_a_plan_memo_changes_nothing(
    world: tuple[State, dict[str, Policy], datetime], steps: list[float], change: str
) -> None:
    """``plan`` with a PlanMemo kept across calls gives exactly the plan
    without one: at later times, after a ring or the publisher records change
    (new objects), and when time goes backwards (``--at``)."""
    state, policies, now = world
    memo = PlanMemo()
    assert plan(state, policies, now, PUBLISHERS, memo=memo) == plan(
        state, policies, now, PUBLISHERS
    )
    t = now
    for f in steps:
        t = t + timedelta(seconds=int(60 * 86400 * f))
        if change == "ring" and state.rings:
            name = sorted(state.rings)[int(f * (len(state.rings) - 1))]
            r = state.rings[name]
            state = state.with_ring(dataclasses.replace(r, keys=r.keys[1:]))
        elif change == "publishers" and state.publishers:
            state = dataclasses.replace(state, publishers={
                n: dataclasses.replace(rec, kids=frozenset(), since={}, asked=frozenset())
                for n, rec in state.publishers.items()
            })
        elif change == "backwards":
            t = now - timedelta(seconds=int(3600 * f))
        assert plan(state, policies, t, PUBLISHERS, memo=memo) == plan(
            state, policies, t, PUBLISHERS
        ), (t, change)


def test_a_plan_memo_sees_a_publisher_stop_serving_an_expired_key() -> None:
    """An expired key past ``destroy_after`` still served somewhere: nothing is
    due and the memo keeps the ring's plan; once no publisher serves it (new
    publisher records), destruction is due at once, memo or not."""
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    jwk = {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}
    active = Key("a", "ES256", "local", ACTIVE, jwk, t0, t0, t0)
    old = Key("o", "ES256", "local", EXPIRED, jwk, t0, t0, t0, t0, t0)
    ring = Ring("r", (active, old))
    pol = Policy("r", "local", "ES256", timedelta(days=30), timedelta(hours=1),
                 timedelta(days=1), timedelta(days=1), ("p0",))
    served = PublisherRecord("ab" * 32, frozenset({"a", "o"}), t0, since={"a": t0, "o": t0})
    state = State(rings={"r": ring}, publishers={"p0": served}, clock=t0)
    now = t0 + timedelta(days=2)
    memo = PlanMemo()
    first = plan(state, {"r": pol}, now, ("p0",), memo=memo)
    assert not ring_actions(first) and "r" in memo.rings
    gone = dataclasses.replace(served, kids=frozenset({"a"}), since={"a": t0})
    state = dataclasses.replace(state, publishers={"p0": gone})
    later = now + timedelta(minutes=1)
    with_memo = plan(state, {"r": pol}, later, ("p0",), memo=memo)
    assert with_memo == plan(state, {"r": pol}, later, ("p0",))
    assert Destroy("r", "o") in with_memo.due


def test_a_publisher_change_replans_only_the_rings_that_read_publisher_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new publisher record (a rotation of some ring) forgets only the memo
    entries of rings whose plan reads it (an expired key waits until nothing
    serves it); the others are not planned again, and the plan is the same."""
    from keymgr import planner

    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    jwk = {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}
    calm = Ring("calm", (
        Key("a", "ES256", "local", ACTIVE, jwk, t0, t0, t0),
        Key("r", "ES256", "local", RETIRED, jwk, t0, t0, t0, t0),
    ))
    waiting = Ring("waiting", (
        Key("b", "ES256", "local", ACTIVE, jwk, t0, t0, t0),
        Key("o", "ES256", "local", EXPIRED, jwk, t0, t0, t0, t0, t0),
    ))
    pols = {
        name: Policy(name, "local", "ES256", 30 * DAY, HOUR, 10 * DAY, DAY, ("p0",))
        for name in ("calm", "waiting")
    }
    served = PublisherRecord(
        "ab" * 32, frozenset({"a", "r", "b", "o"}), t0, since=dict.fromkeys("arbo", t0)
    )
    state = State(rings={"calm": calm, "waiting": waiting}, publishers={"p0": served}, clock=t0)
    memo = PlanMemo()
    now = t0 + 2 * DAY
    first = plan(state, pols, now, ("p0",), memo=memo)
    assert not ring_actions(first) and set(memo.rings) == {"calm", "waiting"}
    assert memo.reading == {"waiting"}

    planned: list[str] = []
    real = planner.plan_ring

    def counted(st: State, ring: Ring, *args: Any) -> Any:
        planned.append(ring.name)
        return real(st, ring, *args)

    gone = dataclasses.replace(
        served, kids=frozenset({"a", "r", "b"}), since=dict.fromkeys("arb", t0)
    )
    state = dataclasses.replace(state, publishers={"p0": gone})
    later = now + HOUR
    monkeypatch.setattr(planner, "plan_ring", counted)
    with_memo = plan(state, pols, later, ("p0",), memo=memo)
    assert planned == ["waiting"]
    monkeypatch.setattr(planner, "plan_ring", real)
    assert with_memo == plan(state, pols, later, ("p0",))
    assert Destroy("waiting", "o") in with_memo.due and "waiting" not in memo.rings
    assert memo.reading == set() and "calm" in memo.rings


def test_what_each_publisher_must_serve_is_remembered_while_its_rings_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kids a publisher must serve are worked out again only when its
    record, the policies or one of its rings is a new object; a publisher
    that still serves a key of a ring that left it is worked out every time
    (that key's ring is read), and every answer is the memo-less one."""
    from keymgr import planner

    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    jwk = {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}
    rings = {
        n: Ring(n, (Key(f"k{n}", "ES256", "local", ACTIVE, jwk, t0, t0, t0),))
        for n in ("a", "b", "c")
    }
    pols = {
        n: Policy(n, "local", "ES256", 30 * DAY, HOUR, DAY, DAY, (pub,))
        for n, pub in (("a", "p0"), ("b", "p0"), ("c", "p1"))
    }
    recs = {
        "p0": PublisherRecord("ab" * 32, frozenset({"ka", "kb"}), t0, since={}),
        # p1 still serves ring b's key (b moved to p0): its answer reads ring b.
        "p1": PublisherRecord("cd" * 32, frozenset({"kb", "kc"}), t0, since={}),
    }
    state = State(rings=rings, publishers=recs, clock=t0)
    memo = PlanMemo()
    now = t0 + DAY
    worked: list[tuple[str, ...]] = []
    real = planner._own_keys

    def counted(st: State, names: Any) -> Any:
        worked.append(tuple(names))
        return real(st, names)

    monkeypatch.setattr(planner, "_own_keys", counted)
    for step in ("first", "same", "ring b replaced"):
        if step == "ring b replaced":
            b = rings["b"]
            state = state.with_ring(dataclasses.replace(b, rotate_at=t0 + 2 * DAY))
        expected = plan(state, pols, now, ("p0", "p1"))
        worked.clear()
        assert plan(state, pols, now, ("p0", "p1"), memo=memo) == expected, step
        assert "p1" not in memo.wants and "p0" in memo.wants, step
        # p1 every time (it serves b's key: its own rings, then the whole rule);
        # p0 only when one of its rings is new.
        assert worked.count(("c",)) == 2, (step, worked)
        assert (("a", "b") in worked) == (step != "same"), (step, worked)
