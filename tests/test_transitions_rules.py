"""The pure state transitions (keymgr.transitions), one rule at a time.

Each test builds a small in-memory state, applies one transition and checks
the whole result: the new key or publisher record (compared field by field
with what it must be), how times round (times that gate promotion or expiry
round *up* to the second, every other recorded time *down*), what is refused,
and the audit events, exactly one per key-state change (invariant 7). The
planner-level tests (test_planner_rules.py, test_planner_properties.py) drive
these functions too, but only see what changes a later plan; these pin what
the state document and the audit log record. They were written to close the
gaps mutation testing found (benchmarks/README.md, "Mutation testing").
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keymgr import transitions
from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    Intent,
    Key,
    PublisherRecord,
    Ring,
    State,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HALF = timedelta(milliseconds=500)
SEC = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def jwk(kid: str) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": f"x-{kid}"}


def key(kid: str, state: str, **times: datetime) -> Key:
    return Key(
        kid=kid,
        alg="EdDSA",
        backend="mem",
        state=state,
        public_jwk=jwk(kid),
        created_at=T0,
        **times,
    )


def ring_state(*keys: Key, ring: str = "api", **fields: object) -> State:
    return State(rings={ring: Ring(name=ring, keys=keys, **fields)})  # type: ignore[arg-type]


def ev(name: str, ts: datetime, ring: str | None, k: Key | None = None, **extra: object) -> dict:
    """The event a transition must record (``kid``/``backend``/``alg`` from ``k``)."""
    out: dict[str, object] = {"event": name, "ts": ts, "ring": ring}
    if k is not None:
        out.update(kid=k.kid, backend=k.backend, alg=k.alg)
    out.update(extra)
    return out


def rec(
    kids: set[str], since: dict[str, datetime] | None = None, **fields: object
) -> PublisherRecord:
    return PublisherRecord(
        sha256="a" * 64,
        kids=frozenset(kids),
        confirmed_at=T0,
        since=dict(since or {}),
        **fields,  # type: ignore[arg-type]
    )


# --- add_key -------------------------------------------------------------------------


def test_add_key_records_a_pending_key_and_one_generated_event() -> None:
    state, events = transitions.add_key(
        State(), "api", "k1", jwk("k1"), "EdDSA", "mem", T0 + HALF, "bootstrap"
    )
    want = key("k1", PENDING)
    assert state.ring("api").keys == (want,)
    assert state.clock == T0
    assert events == [ev("key.generated", T0, "api", want, reason="bootstrap")]


def test_add_key_adopted_orphan_is_audited_as_adopted_and_closes_the_intent() -> None:
    intent = Intent(nonce="n1", backend="mem", alg="EdDSA", at=T0)
    other = Intent(nonce="n2", backend="mem", alg="EdDSA", at=T0)
    start = replace(State(), intents={"api": intent, "web": other})
    state, events = transitions.add_key(
        start, "api", "k1", jwk("k1"), "EdDSA", "mem", T0, "orphan", adopted=True
    )
    assert state.intents == {"web": other}
    assert [e["event"] for e in events] == ["key.adopted"]
    assert events[0]["reason"] == "orphan"


def test_add_key_keeps_the_intents_of_other_rings() -> None:
    other = Intent(nonce="n2", backend="mem", alg="EdDSA", at=T0)
    start = replace(State(), intents={"web": other})
    state, _ = transitions.add_key(start, "api", "k1", jwk("k1"), "EdDSA", "mem", T0, "x")
    assert state.intents == {"web": other}


def test_add_key_refuses_a_kid_the_ring_already_records() -> None:
    start = ring_state(key("k1", ACTIVE))
    with pytest.raises(KeyError, match="k1"):
        transitions.add_key(start, "api", "k1", jwk("k1"), "EdDSA", "mem", T0, "x")


# --- take_over (keymgr adopt) --------------------------------------------------------------


def test_take_over_as_active_makes_the_signer_at_once() -> None:
    state, events = transitions.take_over(
        State(), "api", "k1", jwk("k1"), "EdDSA", "mem", ACTIVE, T0 + HALF, "adopted by op"
    )
    want = replace(key("k1", ACTIVE, published_at=T0, activated_at=T0), reason="adopted by op")
    assert state.ring("api").keys == (want,)
    assert state.clock == T0
    assert events == [ev("key.adopted", T0, "api", want, reason="adopted by op", state=ACTIVE)]


def test_take_over_as_retired_rounds_retired_at_up() -> None:
    state, events = transitions.take_over(
        State(), "api", "k1", jwk("k1"), "EdDSA", "mem", RETIRED, T0 + HALF, "adopted by op"
    )
    want = replace(
        key("k1", RETIRED, published_at=T0, activated_at=T0, retired_at=T0 + SEC),
        reason="adopted by op",
    )
    assert state.ring("api").keys == (want,)
    assert events == [ev("key.adopted", T0, "api", want, reason="adopted by op", state=RETIRED)]


def test_take_over_as_expired_is_out_of_the_jwks_since_now() -> None:
    state, events = transitions.take_over(
        State(), "api", "k1", jwk("k1"), "EdDSA", "mem", EXPIRED, T0 + HALF, "adopted by op"
    )
    want = replace(key("k1", EXPIRED, retired_at=T0, expired_at=T0), reason="adopted by op")
    assert state.ring("api").keys == (want,)
    assert events == [ev("key.adopted", T0, "api", want, reason="adopted by op", state=EXPIRED)]


@pytest.mark.parametrize("as_state", [PENDING, PUBLISHED, DESTROYED, REVOKED, "bogus"])
def test_take_over_refuses_any_other_state(as_state: str) -> None:
    with pytest.raises(ValueError, match="cannot adopt"):
        transitions.take_over(
            State(), "api", "k1", jwk("k1"), "EdDSA", "mem", as_state, T0, "adopted by op"
        )


def test_take_over_as_active_refuses_a_ring_that_has_a_signer() -> None:
    start = ring_state(key("k0", ACTIVE, published_at=T0, activated_at=T0))
    with pytest.raises(ValueError, match="already has an active key"):
        transitions.take_over(
            start, "api", "k1", jwk("k1"), "EdDSA", "mem", ACTIVE, T0, "adopted by op"
        )
    # the same key as retired is fine: the ring keeps its signer
    state, _ = transitions.take_over(
        start, "api", "k1", jwk("k1"), "EdDSA", "mem", RETIRED, T0, "adopted by op"
    )
    assert [k.state for k in state.ring("api").keys] == [ACTIVE, RETIRED]


@pytest.mark.parametrize("where", ["api", "web"])
def test_take_over_refuses_a_kid_recorded_in_any_ring(where: str) -> None:
    start = ring_state(key("k1", EXPIRED, retired_at=T0, expired_at=T0), ring=where)
    with pytest.raises(KeyError, match="k1"):
        transitions.take_over(
            start, "api", "k1", jwk("k1"), "EdDSA", "mem", RETIRED, T0, "adopted by op"
        )


# --- publishers ---------------------------------------------------------------------------


def test_publisher_confirmed_first_time_counts_every_kid_from_now_rounded_up() -> None:
    state, events = transitions.publisher_confirmed(
        State(), "site", "b" * 64, frozenset({"k1", "k2"}), T0 + HALF, written=True
    )
    assert state.publishers == {
        "site": PublisherRecord(
            sha256="b" * 64,
            kids=frozenset({"k1", "k2"}),
            confirmed_at=T0,
            since={"k1": T0 + SEC, "k2": T0 + SEC},
        )
    }
    assert state.clock == T0
    assert events == [
        ev("jwks.published", T0, None, publisher="site", sha256="b" * 64, keys=2, written=True)
    ]


def test_publisher_confirmed_keeps_continuity_only_of_kids_an_intact_record_held() -> None:
    old = rec({"k1", "k2"}, since={"k1": T0 - DAY, "k2": T0 - HOUR})
    start = replace(State(), publishers={"site": old, "cdn": rec(set())})
    state, events = transitions.publisher_confirmed(
        start, "site", "c" * 64, frozenset({"k2", "k3"}), T0, written=False
    )
    new = state.publishers["site"]
    assert new.since == {"k2": T0 - HOUR, "k3": T0}
    assert (new.kids, new.sha256, new.confirmed_at, new.stale) == (
        frozenset({"k2", "k3"}),
        "c" * 64,
        T0,
        False,
    )
    assert state.publishers["cdn"] == rec(set())
    assert events[0]["written"] is False
    assert events[0]["keys"] == 2


def test_publisher_confirmed_after_a_stale_record_restarts_every_kid() -> None:
    old = rec({"k1"}, since={"k1": T0 - DAY}, stale=True, asked=frozenset({"k9"}))
    start = replace(State(), publishers={"site": old})
    state, _ = transitions.publisher_confirmed(
        start, "site", "c" * 64, frozenset({"k1"}), T0, written=True
    )
    new = state.publishers["site"]
    assert new.since == {"k1": T0}
    assert not new.stale
    # what was asked and never confirmed is settled by this confirmation
    assert new.asked == frozenset()


def test_publisher_confirmed_never_carries_a_time_for_a_kid_the_record_did_not_list() -> None:
    # ``since`` holding a kid that ``kids`` does not is not a continuity the
    # record vouches for: that kid starts from now.
    old = rec({"k1"}, since={"k1": T0 - DAY, "k2": T0 - DAY})
    start = replace(State(), publishers={"site": old})
    state, _ = transitions.publisher_confirmed(
        start, "site", "c" * 64, frozenset({"k1", "k2"}), T0, written=True
    )
    assert state.publishers["site"].since == {"k1": T0 - DAY, "k2": T0}


def test_publisher_unconfirmed_without_a_record_makes_a_stale_one_listing_what_was_asked() -> None:
    start = replace(State(), clock=T0)
    state = transitions.publisher_unconfirmed(start, "site", frozenset({"k1"}))
    assert state.publishers == {
        "site": PublisherRecord(
            sha256="",
            kids=frozenset(),
            confirmed_at=None,
            stale=True,
            asked=frozenset({"k1"}),
        )
    }
    assert state.rings == start.rings
    assert state.clock == T0


def test_publisher_unconfirmed_breaks_continuity_and_accumulates_asked() -> None:
    old = rec({"k1"}, since={"k1": T0 - DAY}, asked=frozenset({"k0"}))
    other = rec({"k1"}, since={"k1": T0 - DAY})
    start = replace(State(), publishers={"site": old, "cdn": other})
    state = transitions.publisher_unconfirmed(start, "site", frozenset({"k2"}))
    assert state.publishers == {
        "site": replace(old, stale=True, since={}, asked=frozenset({"k0", "k2"})),
        "cdn": other,
    }


def test_publisher_drifted_marks_the_record_stale_and_forgets_every_time() -> None:
    old = rec({"k1"}, since={"k1": T0 - DAY})
    other = rec({"k1"}, since={"k1": T0 - DAY})
    start = replace(State(), publishers={"site": old, "cdn": other})
    state = transitions.publisher_drifted(start, "site")
    assert state.publishers == {"site": replace(old, stale=True, since={}), "cdn": other}
    assert start.publishers["site"] == old  # the input state is not changed


def test_publisher_drifted_marks_an_intact_record_stale_even_when_it_lists_nothing() -> None:
    # An empty document confirmed (no key yet): a drift must still make the
    # target be written and confirmed again.
    start = replace(State(), publishers={"site": rec(set())})
    state = transitions.publisher_drifted(start, "site")
    assert state.publishers["site"].stale


def test_publisher_drifted_on_a_stale_record_that_kept_times_forgets_them() -> None:
    old = rec({"k1"}, since={"k1": T0 - DAY}, stale=True)
    start = replace(State(), publishers={"site": old})
    state = transitions.publisher_drifted(start, "site")
    assert state.publishers["site"] == replace(old, since={})


# --- intents ------------------------------------------------------------------------------


def test_open_intent_records_the_intent_rounded_down_and_ticks_the_clock() -> None:
    other = Intent(nonce="n0", backend="kms", alg="ES256", at=T0 - DAY)
    start = replace(State(), intents={"web": other})
    state = transitions.open_intent(start, "api", "n1", "mem", "EdDSA", T0 + HALF)
    assert state.intents == {
        "web": other,
        "api": Intent(nonce="n1", backend="mem", alg="EdDSA", at=T0),
    }
    assert state.clock == T0


# --- the key lifecycle ----------------------------------------------------------------------


def test_mark_published_rounds_published_at_up() -> None:
    start = ring_state(key("k1", PENDING))
    state, events = transitions.mark_published(start, "api", "k1", T0 + HALF)
    want = key("k1", PUBLISHED, published_at=T0 + SEC)
    assert state.ring("api").keys == (want,)
    assert state.clock == T0
    assert events == [ev("key.published", T0, "api", want)]


@pytest.mark.parametrize("st", [PUBLISHED, ACTIVE, RETIRED, EXPIRED, DESTROYED, REVOKED])
def test_mark_published_refuses_a_key_that_is_not_pending(st: str) -> None:
    with pytest.raises(ValueError, match=f"cannot publish a {st} key"):
        transitions.mark_published(ring_state(key("k1", st)), "api", "k1", T0)


def test_a_transition_on_an_unknown_kid_names_it() -> None:
    start = ring_state(key("k1", PENDING))
    with pytest.raises(KeyError, match="k9"):
        transitions.mark_published(start, "api", "k9", T0)


def test_promote_retires_the_old_signer_and_clears_a_rotation_request() -> None:
    old = key("k0", ACTIVE, published_at=T0 - DAY, activated_at=T0 - DAY)
    new = key("k1", PUBLISHED, published_at=T0 - HOUR)
    start = ring_state(old, new, rotate_at=T0 - HOUR, emergency=True)
    state, events = transitions.promote(start, "api", "k1", "k0", T0 + HALF, "emergency")
    r = state.ring("api")
    want_old = replace(old, state=RETIRED, retired_at=T0 + SEC)
    want_new = replace(new, state=ACTIVE, activated_at=T0)
    assert r == Ring(name="api", keys=(want_old, want_new), rotate_at=None, emergency=False)
    assert state.clock == T0
    assert events == [
        ev("key.promoted", T0, "api", want_new, reason="emergency"),
        ev("key.retired", T0, "api", want_old, reason="superseded by k1"),
    ]


def test_promote_within_the_second_of_publication_activates_no_earlier() -> None:
    new = key("k1", PUBLISHED, published_at=T0 + SEC)
    state, events = transitions.promote(ring_state(new), "api", "k1", None, T0 + HALF, "bootstrap")
    assert state.ring("api").key("k1") == replace(new, state=ACTIVE, activated_at=T0 + SEC)
    assert len(events) == 1


def test_promote_refuses_anything_but_a_published_successor() -> None:
    for st in (PENDING, ACTIVE, RETIRED, EXPIRED, DESTROYED, REVOKED):
        with pytest.raises(ValueError, match=f"cannot promote a {st} key"):
            transitions.promote(ring_state(key("k1", st)), "api", "k1", None, T0, "x")


def test_promote_refuses_to_retire_a_key_that_is_not_the_signer() -> None:
    start = ring_state(key("k0", RETIRED, retired_at=T0), key("k1", PUBLISHED, published_at=T0))
    with pytest.raises(ValueError, match="cannot retire a retired key"):
        transitions.promote(start, "api", "k1", "k0", T0, "x")


def test_promote_refuses_to_leave_two_signers() -> None:
    start = ring_state(key("k0", ACTIVE, activated_at=T0), key("k1", PUBLISHED, published_at=T0))
    with pytest.raises(ValueError, match="k0 is still active"):
        transitions.promote(start, "api", "k1", None, T0, "x")


def test_expire_records_expired_at_rounded_down() -> None:
    start = ring_state(key("k1", RETIRED, retired_at=T0 - DAY))
    state, events = transitions.expire(start, "api", "k1", T0 + HALF)
    want = key("k1", EXPIRED, retired_at=T0 - DAY, expired_at=T0)
    assert state.ring("api").keys == (want,)
    assert state.clock == T0
    assert events == [ev("key.expired", T0, "api", want)]


@pytest.mark.parametrize("st", [PENDING, PUBLISHED, ACTIVE, EXPIRED, DESTROYED, REVOKED])
def test_expire_refuses_a_key_that_is_not_retired(st: str) -> None:
    with pytest.raises(ValueError, match=f"cannot expire a {st} key"):
        transitions.expire(ring_state(key("k1", st)), "api", "k1", T0)


@pytest.mark.parametrize("st", [EXPIRED, REVOKED])
def test_destroy_records_destroyed_at_rounded_down(st: str) -> None:
    start = ring_state(key("k1", st))
    state, events = transitions.destroy(start, "api", "k1", T0 + HALF)
    want = key("k1", DESTROYED, destroyed_at=T0)
    assert state.ring("api").keys == (want,)
    assert state.clock == T0
    assert events == [ev("key.destroyed", T0, "api", want)]


@pytest.mark.parametrize("st", [PENDING, PUBLISHED, ACTIVE, RETIRED, DESTROYED])
def test_destroy_refuses_a_key_that_is_still_needed_or_gone(st: str) -> None:
    with pytest.raises(ValueError, match=f"cannot destroy a {st} key"):
        transitions.destroy(ring_state(key("k1", st)), "api", "k1", T0)


def test_revoke_finds_the_key_in_its_ring_and_records_the_reason() -> None:
    k1 = key("k1", ACTIVE, activated_at=T0 - DAY)
    start = State(
        rings={
            "web": Ring(name="web", keys=(key("w1", ACTIVE),)),
            "api": Ring(name="api", keys=(k1,)),
        }
    )
    state, events = transitions.revoke(start, "k1", T0 + HALF, "compromised")
    want = replace(k1, state=REVOKED, revoked_at=T0, reason="compromised")
    assert state.ring("api").keys == (want,)
    assert state.ring("web") == start.ring("web")
    assert state.clock == T0
    assert events == [ev("key.revoked", T0, "api", want, reason="compromised")]


def test_revoke_without_a_reason_records_none() -> None:
    state, events = transitions.revoke(ring_state(key("k1", RETIRED)), "k1", T0, None)
    assert state.ring("api").keys[0].reason is None
    assert "reason" not in events[0]


def test_revoke_of_an_unknown_kid_names_it() -> None:
    with pytest.raises(KeyError, match="k9"):
        transitions.revoke(ring_state(key("k1", ACTIVE)), "k9", T0, None)


@pytest.mark.parametrize("st", [DESTROYED, REVOKED])
def test_revoke_refuses_a_key_already_gone(st: str) -> None:
    with pytest.raises(ValueError, match=f"already {st}"):
        transitions.revoke(ring_state(key("k1", st)), "k1", T0, None)


@pytest.mark.parametrize(
    ("had", "asked", "want"),
    [
        (False, False, False),
        (False, True, True),
        (True, False, True),  # an emergency already asked for stays one
        (True, True, True),
    ],
)
def test_request_rotation(had: bool, asked: bool, want: bool) -> None:
    start = ring_state(key("k1", ACTIVE), emergency=had)
    state, events = transitions.request_rotation(start, "api", T0 + HALF, asked)
    assert state.ring("api") == Ring(
        name="api", keys=start.ring("api").keys, rotate_at=T0, emergency=want
    )
    assert state.clock == T0
    assert events == [ev("rotate.requested", T0, "api", emergency=asked)]


# --- the state clock ------------------------------------------------------------------------


def test_the_state_clock_only_moves_forward() -> None:
    start = replace(ring_state(key("k1", RETIRED, retired_at=T0)), clock=T0 + DAY)
    state, events = transitions.expire(start, "api", "k1", T0 + HOUR)
    assert state.clock == T0 + DAY
    # the event and the key still carry the transition's own time
    assert events[0]["ts"] == T0 + HOUR
    assert state.ring("api").keys[0].expired_at == T0 + HOUR
    later, _ = transitions.destroy(state, "api", "k1", T0 + 2 * DAY)
    assert later.clock == T0 + 2 * DAY
