"""The timing rules of docs/design.md#timing, one by one.

Each test either asks the pure planner directly (``plan(state, policies, now)``)
on a hand-built state, or runs ``Sim``: the real ``keymgr.reconciler.Reconciler``
over the in-memory plug-ins of ``keymgr.testing.memory`` (store, key backend,
publishers; real keys and JWKS bytes) and a real audit log, in simulated time.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keymgr import jwks, transitions
from keymgr.audit import AuditLog
from keymgr.config import Config, DaemonConfig
from keymgr.errors import PublishError
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
from keymgr.planner import (
    Action,
    Destroy,
    Expire,
    Generate,
    MarkPublished,
    Policy,
    Promote,
    Publish,
    Upcoming,
    desired_keys,
    plan,
    publishers_in_use,
)
from keymgr.publishers import Served
from keymgr.reconciler import PassResult, Reconciler
from keymgr.testing.memory import MemoryBackend, MemoryPublisher, MemoryStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

P = 30 * DAY
A = HOUR
G = DAY
D = 7 * DAY


def policy(
    ring: str = "api",
    *,
    period: timedelta = P,
    ahead: timedelta = A,
    grace: timedelta = G,
    destroy_after: timedelta = D,
    publishers: tuple[str, ...] = ("site", "cdn"),
) -> Policy:
    return Policy(
        ring=ring,
        backend="mem",
        algorithm="EdDSA",
        rotation_period=period,
        publish_ahead=ahead,
        retire_grace=grace,
        destroy_after=destroy_after,
        publishers=publishers,
    )


def policies(*pols: Policy) -> dict[str, Policy]:
    return {p.ring: p for p in (pols or (policy(),))}


def jwk(kid: str) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": f"x-{kid}"}


def key(kid: str, state: str, created: datetime, **times: datetime) -> Key:
    return Key(
        kid=kid,
        alg="EdDSA",
        backend="mem",
        state=state,
        public_jwk=jwk(kid),
        created_at=created,
        **times,
    )


def build(
    *keys: Key,
    ring: str = "api",
    pols: dict[str, Policy] | None = None,
    listed: dict[str, Iterable[str]] | None = None,
    stale: Iterable[str] = (),
) -> State:
    """A state holding ``keys`` in ``ring``; by default every publisher confirmed
    exactly the keys that belong in its JWKS (``listed`` overrides per publisher)."""
    pols = pols or policies()
    state = State(rings={ring: Ring(name=ring, keys=keys)})
    listed = dict(listed or {})
    recs = {}
    for p in publishers_in_use(pols):
        kids = listed.get(p)
        if kids is None:
            kids = [k.kid for k in desired_keys(state, pols, p)]
        recs[p] = PublisherRecord(
            sha256="0" * 64,
            kids=frozenset(kids),
            confirmed_at=T0,
            stale=p in stale,
            since={} if p in stale else dict.fromkeys(kids, T0),
        )
    return replace(state, publishers=recs)


#: Each test's tmp_path, where its Sims keep their audit logs.
_SCRATCH: list[Path] = []


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path) -> Iterator[None]:
    _SCRATCH.append(tmp_path)
    yield
    _SCRATCH.remove(tmp_path)


class SimPublisher(MemoryPublisher):
    """A ``MemoryPublisher`` with the two failures it has no knob for.

    ``reject``: every write is refused (nothing written; reads still work).
    ``unconfirmed``: writes land (verifiers get them), but every read returns
    what was served when the knob was set, so no read-back ever matches.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.reject = False
        self.unconfirmed = False
        self._stale: bytes | None = None

    def set_unconfirmed(self, on: bool) -> None:
        if on and not self.unconfirmed:
            self._stale = self.peek()
        self.unconfirmed = on

    def read(self) -> bytes | None:
        body = super().read()
        return self._stale if self.unconfirmed else body

    def write(self, data: bytes) -> None:
        if self.reject:
            raise PublishError(f"publisher {self.name}: write: rejected")
        super().write(data)


class Sim:
    """The real ``Reconciler`` over in-memory plug-ins, in simulated time.

    One ``MemoryStore``, one ``MemoryBackend`` ("mem"), a ``SimPublisher`` per
    publisher the policies use and a real ``AuditLog``; ``run(at)`` is one
    ``Reconciler.run`` with the clock at ``at``; ``rotate`` and ``revoke``
    commit through the store as ``KeyManager`` does (without the pass after).

    Keys are real, so their kids are thumbprints. Sim names them "RING-N" in
    the order the backend made them (N counts across rings), or, for a
    hand-built ``state``, by the kids it was built with (each gets a real key,
    and each publisher serves what its record says it confirmed).
    ``kid(name)`` and ``name(kid)`` translate; ``key(name)``, ``revoke(name)``
    and everything Sim reports (events, ``served``, ``backend``, ``plan``,
    ``upcoming``, ``log``) use names.

    ``served`` is what each publisher really serves. ``fail[p]`` makes publisher
    p fail from the next run on: "reject" (nothing written), "down" (nothing
    written and unreadable) or "unconfirmed" (written, read-back fails);
    ``backend_down`` makes every backend call fail. Destroying a key that a
    publisher still serves fails the test.
    """

    def __init__(
        self, *pols: Policy, state: State | None = None, now: datetime = T0
    ) -> None:
        self.policies = policies(*pols)
        self.now = now
        self.mem = MemoryBackend("mem")
        self.publishers = {p: SimPublisher(p) for p in publishers_in_use(self.policies)}
        self.store = MemoryStore()
        home = Path(tempfile.mkdtemp(dir=_SCRATCH[-1]))
        config = Config(
            path=home / "keymgr.toml",
            daemon=DaemonConfig(
                state=self.store.url,
                audit_log=home / "audit.jsonl",
                reconcile_interval=MIN,
                listen=("127.0.0.1", 0),
                log_level="info",
                lease_ttl=30 * SEC,
            ),
            backends={"mem": self.mem},
            publishers=dict(self.publishers),
            policies=self.policies,
            cache_control=dict.fromkeys(self.publishers),
        )
        self.reconciler = Reconciler(config, self.store, AuditLog(home / "audit.jsonl"), "daemon")
        self.fail: dict[str, str] = {}
        self.log: list[tuple[datetime, str]] = []
        self.last: PassResult | None = None
        self._names: dict[str, str] = {}  # kid -> name
        self._named = 0  # entries of mem.created named so far
        self._serial = 0
        if state is not None:
            self._seed(state)
        self.mem.before_destroy = self._not_served

    def _seed(self, state: State) -> None:
        kids: dict[str, str] = {}
        rings = {}
        for ring in state.rings.values():
            keys = []
            for k in ring.keys:
                made = self.mem.generate(ring.name, k.alg)
                kids[k.kid] = made.kid
                self._names[made.kid] = k.kid
                if k.state == DESTROYED:
                    self.mem.destroy(ring.name, made.kid)
                keys.append(replace(k, kid=made.kid, public_jwk=made.public_jwk))
            rings[ring.name] = replace(ring, keys=tuple(keys))
        real = replace(state, rings=rings)
        recs = {}
        for p, rec in state.publishers.items():
            held = [k for r in rings.values() for k in r.keys if self.name(k.kid) in rec.kids]
            data = jwks.encode(jwks.document(held))
            pub = self.publishers[p]
            pub.write(data)
            recs[p] = replace(
                rec,
                sha256=Served(data, pub.headers()).digest(),
                kids=frozenset(kids[k] for k in rec.kids),
                since={kids[k]: t for k, t in rec.since.items()},
                asked=frozenset(kids[k] for k in rec.asked),
            )
        self.store.commit(replace(real, publishers=recs), 0)

    def _not_served(self, ring: str, kid: str) -> None:
        serving = sorted(
            p for p, pub in self.publishers.items() if kid in jwks.served_keys(pub.peek())
        )
        assert not serving, f"destroyed {self.name(kid)} while {serving} still serve it"

    # -- names -------------------------------------------------------------

    def _name_new_keys(self) -> None:
        for ring, kid in self.mem.created[self._named :]:
            if kid not in self._names:
                self._serial += 1
                self._names[kid] = f"{ring}-{self._serial}"
        self._named = len(self.mem.created)

    def name(self, kid: str) -> str:
        self._name_new_keys()
        return self._names.get(kid, kid)

    def kid(self, name: str) -> str:
        self._name_new_keys()
        found = [kid for kid, n in self._names.items() if n == name]
        assert found, f"no key named {name}"
        return found[0]

    def _action(self, a: Action) -> Action:
        if isinstance(a, Promote):
            retire = None if a.retire is None else self.name(a.retire)
            return replace(a, kid=self.name(a.kid), retire=retire)
        if isinstance(a, MarkPublished | Expire | Destroy):
            return replace(a, kid=self.name(a.kid))
        return a

    def _record(self, events: Iterable[dict[str, Any]]) -> list[str]:
        out = [
            f"{e['event']} {self.name(e['kid'])}"
            for e in events
            if str(e["event"]).startswith("key.")
        ]
        self.log.extend((self.now, e) for e in out)
        return out

    # -- knobs -------------------------------------------------------------

    @property
    def backend_down(self) -> bool:
        return self.mem.down

    @backend_down.setter
    def backend_down(self, down: bool) -> None:
        self.mem.down = down

    def _apply_faults(self) -> None:
        for p, pub in self.publishers.items():
            mode = self.fail.get(p)
            assert mode in (None, "reject", "down", "unconfirmed"), mode
            pub.down = mode == "down"
            pub.reject = mode == "reject"
            pub.set_unconfirmed(mode == "unconfirmed")

    # -- operator (as KeyManager: mutate under the store's lock, commit) -----

    def _mutate(self, fn: Callable[[State, datetime], transitions.Result]) -> None:
        with self.store.exclusive():
            state, token = self.reconciler.load()
            new, events = fn(state, self.now)
            self.reconciler.commit(new, events, token)
        self._record(events)

    def rotate(self, ring: str = "api", *, emergency: bool = False) -> None:
        self._mutate(lambda s, at: transitions.request_rotation(s, ring, at, emergency))

    def revoke(self, name: str) -> None:
        kid = self.kid(name)
        self._mutate(lambda s, at: transitions.revoke(s, kid, at, "test"))

    # -- the pass ----------------------------------------------------------

    def run(self, at: datetime | None = None) -> list[str]:
        """One reconcile pass at ``at``; returns the key events it recorded."""
        if at is not None:
            assert at >= self.now
            self.now = at
        self._apply_faults()
        self.last = self.reconciler.run(lambda: self.now)
        assert not any("did not settle" in f for f in self.last.failures), self.last.failures
        return self._record(self.last.events)

    # -- looking -----------------------------------------------------------

    @property
    def state(self) -> State:
        return self.store.load()[0]

    @property
    def served(self) -> dict[str, frozenset[str]]:
        return {
            p: frozenset(self.name(kid) for kid in jwks.served_keys(pub.peek()))
            for p, pub in self.publishers.items()
        }

    @property
    def backend(self) -> set[str]:
        """The keys the backend holds."""
        return {self.name(kid) for _, kid in self.mem.held()}

    def key(self, name: str) -> Key:
        found = self.state.find(self.kid(name))
        assert found is not None, name
        return found[1]

    def ring(self, name: str = "api") -> Ring:
        return self.state.ring(name)

    def plan(self, at: datetime) -> tuple[Action, ...]:
        return tuple(self._action(a) for a in self.reconciler.plan(self.state, at).due)

    def upcoming(self, at: datetime, ring: str = "api") -> Upcoming | None:
        up = self.reconciler.plan(self.state, at).upcoming[ring]
        if up is None or up.kid is None:
            return up
        return replace(up, kid=self.name(up.kid))

    def wake_until(self, end: datetime) -> None:
        """The daemon: sleep until the last pass's plan's next_at, reconcile, repeat."""
        self.run()
        while True:
            assert self.last is not None and self.last.plan is not None
            nxt = self.last.plan.next_at
            if nxt is None or nxt > end:
                return
            assert nxt > self.now
            self.run(nxt)


def bootstrapped(*pols: Policy) -> Sim:
    sim = Sim(*pols)
    sim.run(T0)
    return sim


# --- bootstrap ---------------------------------------------------------------


def test_bootstrap_plans_a_generate_for_an_empty_ring() -> None:
    p = plan(State(), policies(), T0)
    assert p.due == (Generate("api", "bootstrap"),)
    assert p.upcoming == {"api": None}


def test_bootstrap_generates_publishes_and_promotes_at_once() -> None:
    sim = Sim()
    assert sim.run(T0) == ["key.generated api-1", "key.published api-1", "key.promoted api-1"]
    k = sim.key("api-1")
    assert k.state == ACTIVE
    assert k.created_at == k.published_at == k.activated_at == T0
    assert sim.served == {"site": {"api-1"}, "cdn": {"api-1"}}


def test_bootstrap_waits_for_every_publisher() -> None:
    sim = Sim()
    sim.fail["cdn"] = "reject"
    assert sim.run(T0) == ["key.generated api-1"]
    assert sim.key("api-1").state == PENDING
    assert sim.ring().active is None
    del sim.fail["cdn"]
    assert sim.run(T0 + HOUR) == ["key.published api-1", "key.promoted api-1"]


# --- successor generation ------------------------------------------------------


def test_successor_generated_exactly_at_activated_plus_P_minus_A() -> None:
    sim = bootstrapped()
    gen_at = T0 + P - A
    assert sim.plan(gen_at - SEC) == ()
    assert sim.upcoming(gen_at - SEC) == Upcoming("generate", None, gen_at)
    assert sim.plan(gen_at) == (Generate("api", "scheduled"),)

    assert sim.run(gen_at - SEC) == []
    assert sim.run(gen_at) == ["key.generated api-2", "key.published api-2"]
    assert sim.key("api-2").published_at == gen_at
    assert sim.key("api-1").state == ACTIVE
    assert sim.served == {"site": {"api-1", "api-2"}, "cdn": {"api-1", "api-2"}}


def test_successor_generated_at_once_when_publish_ahead_equals_period() -> None:
    sim = bootstrapped(policy(period=DAY, ahead=DAY))
    assert sim.key("api-1").state == ACTIVE
    # The successor is due the moment the first key became active.
    assert sim.ring().in_state(PUBLISHED)[0].published_at == T0
    assert sim.run(T0 + DAY - SEC) == []
    assert sim.run(T0 + DAY)[:2] == ["key.promoted api-2", "key.retired api-1"]


# --- promotion -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("published_at", "promote_at"),
    [
        # published early: activated_at + P is the later bound
        (T0 + P - 3 * A, T0 + P),
        # published exactly on schedule: both bounds coincide
        (T0 + P - A, T0 + P),
        # published late (e.g. a publisher was down): published_at + A is later
        (T0 + P - A + 20 * MIN, T0 + P + 20 * MIN),
        (T0 + P + 5 * HOUR, T0 + P + 5 * HOUR + A),
    ],
)
def test_promotion_at_later_of_activated_plus_P_and_published_plus_A(
    published_at: datetime, promote_at: datetime
) -> None:
    state = build(
        key("k1", ACTIVE, T0, published_at=T0, activated_at=T0),
        key("k2", PUBLISHED, published_at, published_at=published_at),
    )
    pols = policies()
    before = plan(state, pols, promote_at - SEC)
    assert before.due == ()
    assert before.upcoming["api"] == Upcoming("promote", "k2", promote_at)
    assert plan(state, pols, promote_at).due == (Promote("api", "k2", "k1", "scheduled"),)


def test_promotion_waits_A_after_a_publisher_recovers() -> None:
    sim = bootstrapped()
    gen_at = T0 + P - A
    sim.fail["cdn"] = "reject"
    assert sim.run(gen_at) == ["key.generated api-2"]
    # The schedule says promote at T0 + P, but cdn never confirmed api-2.
    assert sim.run(T0 + P) == []
    assert sim.run(T0 + P + 6 * HOUR) == []
    assert sim.key("api-2").state == PENDING
    assert sim.key("api-1").state == ACTIVE
    del sim.fail["cdn"]
    recovered = T0 + P + 7 * HOUR
    assert sim.run(recovered) == ["key.published api-2"]
    assert sim.key("api-2").published_at == recovered
    assert sim.run(recovered + A - SEC) == []
    assert sim.run(recovered + A)[:2] == ["key.promoted api-2", "key.retired api-1"]


def test_unconfirmed_write_never_leads_to_promotion() -> None:
    sim = bootstrapped()
    sim.fail["cdn"] = "unconfirmed"  # the document is written, the read-back fails
    sim.run(T0 + P - A)
    assert "api-2" in sim.served["cdn"]
    for t in (T0 + P, T0 + P + A, T0 + P + 10 * DAY):
        sim.run(t)
        assert sim.key("api-2").state == PENDING
        assert sim.key("api-1").state == ACTIVE


def test_promotion_needs_fresh_confirmation_from_a_stale_publisher() -> None:
    state = build(
        key("k1", ACTIVE, T0, published_at=T0, activated_at=T0),
        key("k2", PUBLISHED, T0 + P - A, published_at=T0 + P - A),
        stale={"cdn"},
    )
    assert plan(state, policies(), T0 + P).due == (Publish("cdn"),)


# --- retirement, expiry, destruction ------------------------------------------------


def test_retired_key_expires_exactly_at_retired_plus_G() -> None:
    t = T0 + P
    state = build(
        key("k1", RETIRED, T0, published_at=T0, activated_at=T0, retired_at=t),
        key("k2", ACTIVE, t - A, published_at=t - A, activated_at=t),
    )
    pols = policies()
    before = plan(state, pols, t + G - SEC)
    assert before.due == ()
    assert before.upcoming["api"] == Upcoming("expire", "k1", t + G)
    assert plan(state, pols, t + G).due == (Expire("api", "k1"),)

    sim = Sim(state=state, now=t)
    assert sim.run(t + G - SEC) == []
    assert "k1" in sim.served["site"]
    assert sim.run(t + G) == ["key.expired k1"]
    assert sim.served == {"site": {"k2"}, "cdn": {"k2"}}


def _expired_k1(listed: dict[str, Iterable[str]] | None = None, **kw: object) -> State:
    t = T0 + P + G
    return build(
        key("k1", EXPIRED, T0, published_at=T0, activated_at=T0, retired_at=T0 + P, expired_at=t),
        key("k2", ACTIVE, T0 + P - A, published_at=T0 + P - A, activated_at=T0 + P),
        listed=listed,
        **kw,  # type: ignore[arg-type]
    )


def test_expired_key_destroyed_exactly_at_expired_plus_D() -> None:
    state = _expired_k1()
    t = T0 + P + G
    pols = policies()
    before = plan(state, pols, t + D - SEC)
    assert before.due == ()
    assert before.upcoming["api"] == Upcoming("destroy", "k1", t + D)
    assert plan(state, pols, t + D).due == (Destroy("api", "k1"),)


def test_expired_key_with_zero_destroy_after_goes_once_unpublished() -> None:
    sim = bootstrapped(policy(destroy_after=timedelta(0)))
    sim.wake_until(T0 + P)
    assert sim.run(T0 + P + G) == ["key.expired api-1", "key.destroyed api-1"]
    assert "api-1" not in sim.backend


def test_expired_key_not_destroyed_while_a_publisher_record_lists_it() -> None:
    t = T0 + P + G
    state = _expired_k1(listed={"site": ["k2"], "cdn": ["k1", "k2"]})
    due = plan(state, policies(), t + D + 30 * DAY).due
    assert Publish("cdn") in due
    assert not [a for a in due if isinstance(a, Destroy)]

    sim = Sim(state=state, now=t)
    sim.fail["cdn"] = "reject"
    assert sim.run(t + D) == []
    assert sim.key("k1").state == EXPIRED
    del sim.fail["cdn"]
    assert sim.run(t + D + HOUR) == ["key.destroyed k1"]
    assert sim.served == {"site": {"k2"}, "cdn": {"k2"}}


def test_expired_key_not_destroyed_while_any_record_lists_it_even_another_rings() -> None:
    pols = policies(policy(), policy("web", publishers=("www",)))
    state = _expired_k1(pols=pols, listed={"www": ["k1"]})
    due = plan(state, pols, T0 + P + G + D).due
    assert not [a for a in due if isinstance(a, Destroy)]


# --- rotate, rotate --emergency, revoke ------------------------------------------------


def test_rotate_moves_generation_to_now_but_promotion_waits_A() -> None:
    sim = bootstrapped()
    t = T0 + 5 * DAY
    sim.now = t
    sim.rotate()
    assert sim.plan(t) == (Generate("api", "rotate"),)
    assert sim.run(t) == ["key.generated api-2", "key.published api-2"]
    assert sim.upcoming(t) == Upcoming("promote", "api-2", t + A)
    assert sim.run(t + A - SEC) == []
    assert sim.plan(t + A) == (Promote("api", "api-2", "api-1", "rotate"),)
    assert sim.run(t + A) == ["key.promoted api-2", "key.retired api-1"]
    assert sim.ring().rotate_at is None
    assert sim.upcoming(t + A) == Upcoming("expire", "api-1", t + A + G)
    assert sim.run(t + A + G) == ["key.expired api-1"]
    assert sim.upcoming(t + A + G) == Upcoming("destroy", "api-1", t + A + G + D)
    assert sim.run(t + A + G + D) == ["key.destroyed api-1"]
    # The new key gets a full period from its own activation.
    assert sim.upcoming(t + A + G + D) == Upcoming("generate", None, (t + A) + P - A)


def test_rotate_with_a_publisher_down_still_waits_A_after_confirmation() -> None:
    sim = bootstrapped()
    t = T0 + 5 * DAY
    sim.now = t
    sim.rotate()
    sim.fail["site"] = "down"
    assert sim.run(t) == ["key.generated api-2"]
    del sim.fail["site"]
    assert sim.run(t + 3 * HOUR) == ["key.published api-2"]
    assert sim.run(t + 3 * HOUR + A - SEC) == []
    assert sim.run(t + 3 * HOUR + A)[0] == "key.promoted api-2"


def test_emergency_rotation_promotes_as_soon_as_published() -> None:
    sim = bootstrapped()
    t = T0 + 5 * DAY
    sim.now = t
    sim.rotate(emergency=True)
    assert sim.plan(t) == (Generate("api", "emergency"),)
    assert sim.run(t) == [
        "key.generated api-2",
        "key.published api-2",
        "key.promoted api-2",
        "key.retired api-1",
    ]
    assert sim.key("api-2").activated_at == t
    assert sim.ring().emergency is False and sim.ring().rotate_at is None
    # The old key still serves its tokens' lifetime.
    assert sim.served["site"] == {"api-1", "api-2"}
    assert sim.upcoming(t) == Upcoming("expire", "api-1", t + G)


def test_emergency_rotation_promotes_a_waiting_successor_at_once() -> None:
    sim = bootstrapped()
    sim.run(T0 + P - A)
    assert sim.key("api-2").state == PUBLISHED
    t = T0 + P - A + 10 * MIN
    sim.now = t
    sim.rotate(emergency=True)
    assert sim.plan(t) == (Promote("api", "api-2", "api-1", "emergency"),)


def test_emergency_rotation_still_needs_every_publisher() -> None:
    sim = bootstrapped()
    t = T0 + 5 * DAY
    sim.now = t
    sim.rotate(emergency=True)
    sim.fail["cdn"] = "unconfirmed"
    assert sim.run(t) == ["key.generated api-2"]
    assert sim.key("api-1").state == ACTIVE
    del sim.fail["cdn"]
    assert sim.run(t + MIN)[:2] == ["key.published api-2", "key.promoted api-2"]


def test_revoking_the_active_key_replaces_it_at_once() -> None:
    sim = bootstrapped()
    t = T0 + 5 * DAY
    sim.now = t
    sim.revoke("api-1")
    assert sim.plan(t) == (Publish("site"), Publish("cdn"), Generate("api", "replace"))
    events = sim.run(t)
    assert events == [
        "key.generated api-2",
        "key.destroyed api-1",
        "key.published api-2",
        "key.promoted api-2",
    ]
    assert sim.ring().active == sim.key("api-2")
    assert sim.key("api-2").activated_at == t
    assert sim.served == {"site": {"api-2"}, "cdn": {"api-2"}}
    assert "api-1" not in sim.backend
    assert sim.plan(t) == ()
    assert sim.upcoming(t) == Upcoming("generate", None, t + P - A)


def test_revoking_the_active_key_promotes_a_waiting_successor() -> None:
    sim = bootstrapped()
    t = T0 + P - A + 10 * MIN
    sim.run(T0 + P - A)
    sim.now = t
    sim.revoke("api-1")
    assert Promote("api", "api-2", None, "replace") in sim.plan(t)
    sim.run(t)
    assert sim.ring().active == sim.key("api-2")


def test_revoked_key_destroyed_only_once_no_publisher_record_lists_it() -> None:
    t = T0 + DAY
    k0 = key("k0", REVOKED, T0, published_at=T0, activated_at=T0, revoked_at=t)
    k1 = key("k1", ACTIVE, t, published_at=t, activated_at=t)
    listed = build(k0, k1, listed={"site": ["k1"], "cdn": ["k0", "k1"]})
    due = plan(listed, policies(), t).due
    assert due == (Publish("cdn"),)

    unlisted = build(k0, k1)
    assert plan(unlisted, policies(), t).due == (Destroy("api", "k0"),)

    sim = Sim(state=listed, now=t)
    sim.fail["cdn"] = "reject"
    assert sim.run(t) == []
    assert sim.key("k0").state == REVOKED
    assert "k0" in sim.backend
    del sim.fail["cdn"]
    assert sim.run(t + MIN) == ["key.destroyed k0"]


def test_revoked_pending_key_not_destroyed_while_a_publisher_still_serves_it() -> None:
    """A write whose read-back failed leaves a publisher serving more than its record.

    api-2 is generated and written to ``site``, but the read-back fails, so the
    record still says {api-1}. The operator revokes api-2; ``site`` then goes down.
    ``observe`` marks the record stale: the planner knows the record no longer
    says what ``site`` serves, yet it trusts the stale record's kids and destroys
    api-2 while ``site`` still serves it (invariant 4).
    """
    sim = bootstrapped(policy(publishers=("site",)))
    gen_at = T0 + P - A
    sim.fail["site"] = "unconfirmed"
    assert sim.run(gen_at) == ["key.generated api-2"]
    assert sim.served["site"] == {"api-1", "api-2"}
    assert sim.state.publishers["site"].kids == {sim.kid("api-1")}
    sim.now = gen_at + MIN
    sim.revoke("api-2")
    sim.fail["site"] = "down"
    sim.run(gen_at + 2 * MIN)
    assert sim.key("api-2").state == REVOKED  # kept until site no longer serves it
    del sim.fail["site"]
    sim.run(gen_at + HOUR)
    assert sim.key("api-2").state == DESTROYED
    assert sim.served["site"] == {"api-1", "api-3"}


# --- publishers ------------------------------------------------------------------------


def test_stale_publisher_record_makes_publish_due() -> None:
    k1 = key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)
    assert plan(build(k1), policies(), T0 + HOUR).due == ()
    assert plan(build(k1, stale={"site"}), policies(), T0 + HOUR).due == (Publish("site"),)


def test_publisher_without_record_gets_published() -> None:
    k1 = key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)
    state = replace(build(k1), publishers={})
    assert plan(state, policies(), T0).due == (Publish("site"), Publish("cdn"))


def test_pending_key_confirmed_everywhere_is_marked_published() -> None:
    k1 = key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)
    k2 = key("k2", PENDING, T0 + P - A)
    assert plan(build(k1, k2, listed={"site": ["k1"], "cdn": ["k1"]}), policies(), T0).due == (
        Publish("site"),
        Publish("cdn"),
    )
    half = build(k1, k2, listed={"site": ["k1", "k2"], "cdn": ["k1"]})
    assert plan(half, policies(), T0 + P - A).due == (Publish("cdn"),)
    both = build(k1, k2)
    assert plan(both, policies(), T0 + P - A).due == (MarkPublished("api", "k2"),)


def test_shared_publisher_serves_every_ring_that_uses_it() -> None:
    pols = (policy("api", publishers=("site",)), policy("web", publishers=("site", "cdn")))
    sim = Sim(*pols)
    sim.run(T0)
    assert sim.served == {"site": {"api-1", "web-2"}, "cdn": {"web-2"}}
    served = sim.publishers["site"].peek()
    assert served == jwks.encode(jwks.document(desired_keys(sim.state, sim.policies, "site")))
    doc = json.loads(served or b"{}")
    assert [j["kid"] for j in doc["keys"]] == sorted([sim.kid("api-1"), sim.kid("web-2")])
    assert all(set(j) == {"kty", "crv", "x", "kid", "alg", "use"} for j in doc["keys"])


# --- Plan.upcoming --------------------------------------------------------------------


def test_upcoming_is_the_earliest_transition_per_ring() -> None:
    sim = Sim(policy("api"), policy("web", period=7 * DAY, ahead=2 * HOUR))
    sim.run(T0)
    p = plan(sim.state, sim.policies, T0)
    assert p.upcoming == {
        "api": Upcoming("generate", None, T0 + P - A),
        "web": Upcoming("generate", None, T0 + 7 * DAY - 2 * HOUR),
    }
    assert p.next_at == T0 + 7 * DAY - 2 * HOUR


def test_upcoming_with_nothing_time_based_left() -> None:
    assert plan(State(), {}, T0).next_at is None
    # A ring whose signer was revoked while the backend is down: only a retry helps.
    sim = bootstrapped()
    sim.backend_down = True
    sim.revoke("api-1")
    sim.run(T0 + HOUR)
    assert sim.ring().active is None
    assert sim.plan(T0 + HOUR) == (Generate("api", "replace"), Destroy("api", "api-1"))
    assert sim.upcoming(T0 + HOUR) is None


def test_daemon_waking_at_next_at_follows_the_timeline() -> None:
    """Sleeping until ``Plan.next_at`` and reconciling reproduces docs/design.md#timeline."""
    sim = Sim()
    sim.wake_until(T0 + 2 * P + G + D)
    timeline = [(t - T0, e) for t, e in sim.log]
    assert timeline == [
        (timedelta(0), "key.generated api-1"),
        (timedelta(0), "key.published api-1"),
        (timedelta(0), "key.promoted api-1"),
        (P - A, "key.generated api-2"),
        (P - A, "key.published api-2"),
        (P, "key.promoted api-2"),
        (P, "key.retired api-1"),
        (P + G, "key.expired api-1"),
        (P + G + D, "key.destroyed api-1"),
        (2 * P - A, "key.generated api-3"),
        (2 * P - A, "key.published api-3"),
        (2 * P, "key.promoted api-3"),
        (2 * P, "key.retired api-2"),
        (2 * P + G, "key.expired api-2"),
        (2 * P + G + D, "key.destroyed api-2"),
    ]
    assert {sim.name(k.kid): k.state for k in sim.ring().keys} == {
        "api-1": DESTROYED,
        "api-2": DESTROYED,
        "api-3": ACTIVE,
    }
    assert all(
        k.state in IN_JWKS or sim.name(k.kid) not in sim.served["site"] for k in sim.ring().keys
    )


# --- sub-second clocks ----------------------------------------------------------------


def test_gating_times_round_up_so_promotion_is_never_early() -> None:
    """The daemon's clock has microseconds; state keeps whole seconds.

    published_at is rounded up, so a key confirmed at 10:00:00.7 is promoted no
    earlier than 10:00:01 + A, never at 10:00:00 + A (0.7 s too early for a
    verifier whose cache was filled just before the publish).
    """
    k1 = key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)
    k2 = key("k2", PENDING, T0 + P - A)
    state = build(k1, k2, listed={"site": ["k1", "k2"], "cdn": ["k1", "k2"]})
    confirmed = T0 + P - A + timedelta(milliseconds=700)
    state, _ = transitions.mark_published(state, "api", "k2", confirmed)
    published = state.ring("api").key("k2").published_at
    assert published == T0 + P - A + SEC
    assert published >= confirmed
    just_before = confirmed + A + timedelta(milliseconds=200)  # < published + A
    assert not any(isinstance(a, Promote) for a in plan(state, policies(), just_before).due)
    assert Promote("api", "k2", "k1", "scheduled") in plan(state, policies(), published + A).due
    # Whole-second clocks (--at drills) are unchanged.
    state2, _ = transitions.mark_published(build(k1, k2), "api", "k2", T0 + P - A)
    assert state2.ring("api").key("k2").published_at == T0 + P - A


def test_retired_at_rounds_up_and_the_state_clock_down() -> None:
    k1 = key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)
    k2 = key("k2", PUBLISHED, T0 + P - A, published_at=T0 + P - A)
    at = T0 + P + timedelta(milliseconds=300)
    state, _ = transitions.promote(build(k1, k2), "api", "k2", "k1", at, "scheduled")
    assert state.ring("api").key("k1").retired_at == T0 + P + SEC
    assert state.ring("api").key("k2").activated_at == T0 + P
    assert state.clock == T0 + P  # never ahead of the real clock


def test_promotion_in_the_second_of_publication_never_precedes_it() -> None:
    """Bootstrap and emergency rotations publish and promote in one pass: the key's
    activated_at must not fall before its rounded-up published_at (found by the
    soak's timestamp-order check)."""
    k1 = key("k1", PENDING, T0)
    at = T0 + timedelta(milliseconds=400)
    state, _ = transitions.mark_published(build(k1), "api", "k1", at)
    state, _ = transitions.promote(state, "api", "k1", None, at, "bootstrap")
    k = state.ring("api").key("k1")
    assert k.created_at <= k.published_at <= k.activated_at == T0 + SEC


# --- gaps found by mutation testing (benchmarks/README.md, "Mutation testing") --------


def _expired_and_listed_by(publisher: str) -> State:
    """k1 expired D ago (due for destruction), k2 the signer; ``publisher``,
    used by no ring, last confirmed a document still holding k1."""
    t = T0 + P + G
    state = build(
        key("k1", EXPIRED, T0, published_at=T0, activated_at=T0, retired_at=T0 + P, expired_at=t),
        key("k2", ACTIVE, T0 + P - A, published_at=T0 + P - A, activated_at=T0 + P),
    )
    rec = PublisherRecord(
        sha256="1" * 64, kids=frozenset({"k1", "k2"}), confirmed_at=t, since={"k1": T0, "k2": T0}
    )
    return replace(state, publishers={**state.publishers, publisher: rec})


def test_a_publisher_removed_from_the_config_does_not_block_destruction() -> None:
    """Its last record is no longer ours to confirm (docs: a removed publisher must
    not keep a key alive forever), whether the configured publishers are given
    or default to those the rings use."""
    state = _expired_and_listed_by("gone")
    at = T0 + P + G + D
    assert plan(state, policies(), at).due == (Destroy("api", "k1"),)
    assert plan(state, policies(), at, publishers=["site", "cdn"]).due == (Destroy("api", "k1"),)
    # the same for a revoked key, destroyed as soon as no publisher of ours lists it
    k1 = state.ring("api").key("k1")
    assert k1 is not None
    revoked = state.with_ring(state.ring("api").with_key(replace(k1, state=REVOKED, revoked_at=at)))
    assert plan(revoked, policies(), at).due == (Destroy("api", "k1"),)
    assert plan(revoked, policies(), at, publishers=["site", "cdn", "gone"]).due == (
        Publish("gone"),
    )


def test_a_configured_publisher_no_ring_uses_is_kept_and_blocks_destruction() -> None:
    """Dropped from every ring but still configured: its document is brought up to
    date (k1 leaves it), and k1 is destroyed only once it confirmed that."""
    state = _expired_and_listed_by("old")
    at = T0 + P + G + D
    assert plan(state, policies(), at, publishers=["site", "cdn", "old"]).due == (Publish("old"),)
    done = replace(
        state,
        publishers={
            **state.publishers,
            "old": replace(state.publishers["old"], kids=frozenset({"k2"}), since={"k2": T0}),
        },
    )
    # k2 stays there: it is the signer, and verifiers may have fetched it from "old".
    assert plan(done, policies(), at, publishers=["site", "cdn", "old"]).due == (
        Destroy("api", "k1"),
    )


def test_promotion_without_a_signer_is_bootstrap_until_a_key_was_ever_active() -> None:
    """The reason reaches the audit log (``key.promoted``): "bootstrap" for a ring's
    first key, "replace" once a signer existed and was revoked."""
    k1 = key("k1", PUBLISHED, T0, published_at=T0)
    assert plan(build(k1), policies(), T0).due == (Promote("api", "k1", None, "bootstrap"),)

    k0 = key("k0", REVOKED, T0, published_at=T0, activated_at=T0, revoked_at=T0 + DAY)
    k2 = key("k2", PUBLISHED, T0 + DAY, published_at=T0 + DAY)
    due = plan(build(k0, k2), policies(), T0 + DAY).due
    assert Promote("api", "k2", None, "replace") in due


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        (key("k1", ACTIVE, T0, published_at=T0), "activated_at"),
        (key("k1", PUBLISHED, T0), "published_at"),
        (key("k1", RETIRED, T0, published_at=T0, activated_at=T0), "retired_at"),
        (key("k1", EXPIRED, T0, published_at=T0, activated_at=T0, retired_at=T0), "expired_at"),
    ],
)
def test_a_key_missing_a_time_its_state_needs_is_refused_naming_ring_key_and_field(
    broken: Key, field: str
) -> None:
    """keymgr.validate refuses such a state first; the planner on an unchecked
    state still fails with the one line an operator can act on (errors.py: every
    error names the thing at fault), not a TypeError from ``None + timedelta``."""
    from keymgr.errors import StateError

    signer = key("k0", ACTIVE, T0, published_at=T0, activated_at=T0)
    keys = (broken,) if broken.state == ACTIVE else (signer, broken)
    with pytest.raises(StateError) as err:
        plan(build(*keys), policies(), T0 + HOUR)
    assert str(err.value) == f"ring api: key k1: {field} missing for a {broken.state} key"


def test_an_emergency_promotion_blocked_by_a_publisher_has_no_upcoming_time() -> None:
    """Waiting for a publisher is not waiting for a time: nothing is "upcoming" (the
    publish is retried every reconcile interval). An upcoming time of now would
    make a daemon that wakes at ``next_at`` run pass after pass for nothing."""
    t = T0 + 5 * DAY
    k1 = key("k1", ACTIVE, T0, published_at=T0, activated_at=T0)
    k2 = key("k2", PUBLISHED, t, published_at=t)
    state = build(k1, k2, listed={"site": ["k1", "k2"], "cdn": ["k1"]})
    state = state.with_ring(replace(state.ring("api"), rotate_at=t, emergency=True))
    p = plan(state, policies(), t)
    assert p.due == (Publish("cdn"),)
    assert p.upcoming == {"api": None}
    assert p.next_at is None
