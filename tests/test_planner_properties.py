"""Property tests: the pure planner + transitions through years of simulated time.

``World`` stands in for everything outside the pure core and runs the
reconciler's loop over it (observe, then plan -> execute a wave, Publish first
and from the state the planner saw -> apply the outcome through
``keymgr.transitions`` -> repeat until nothing is due; a failed action is
skipped for the rest of the pass). It keeps the facts the state cannot lie
about:

- what each publisher really serves (changed only by a Publish that wrote),
- which private keys exist in the backend,
- when each key last signed a token (the active key signs at every wake-up,
  before and after the pass: the earliest and the latest moment of a state).

The daemon wakes at ``Plan.next_at`` (or a retry interval after a failure),
a bounded number of times per step; beyond that it is "down" until the step
ends. Operators rotate, rotate --emergency and revoke; publishers and the key
backend fail for a while. Every design.md invariant is checked at the moment it
could break (a key leaving a served set, a destroy, a promotion, a signature)
and after every transition and every pass.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keymgr import jwks, transitions
from keymgr.jose import PRIVATE_MEMBERS
from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    HAS_PRIVATE,
    IN_JWKS,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    State,
)
from keymgr.planner import (
    Action,
    Destroy,
    Expire,
    Generate,
    MarkPublished,
    Plan,
    Policy,
    Promote,
    Publish,
    desired_keys,
    plan,
    publishers_in_use,
)

START = datetime(2030, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(weeks=1)
YEAR = 365 * DAY

#: How soon the daemon first retries after a pass with failures.
RETRY = 15 * MIN
MAX_WAVES = 64
PUBLISHERS = ("p0", "p1", "p2")
RINGS = ("r0", "r1", "r2")

#: Allowed key-state changes, and the audit event each one records (invariant 7).
EVENT_FOR: dict[tuple[str | None, str], str] = {
    (None, PENDING): "key.generated",
    (PENDING, PUBLISHED): "key.published",
    (PUBLISHED, ACTIVE): "key.promoted",
    (ACTIVE, RETIRED): "key.retired",
    (RETIRED, EXPIRED): "key.expired",
    (EXPIRED, DESTROYED): "key.destroyed",
    (REVOKED, DESTROYED): "key.destroyed",
    **{(s, REVOKED): "key.revoked" for s in (PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED)},
}
PUBLIC_MEMBERS = {"kty", "crv", "x", "y", "n", "e", "kid", "alg", "use"}


class Failed(Exception):
    """A simulated backend or publisher error (the reconciler's KeymgrError)."""


def public_jwk(kid: str) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": f"pub-{kid}"}


class World:
    def __init__(self, policies: dict[str, Policy]) -> None:
        self.pols = policies
        self.pubs = publishers_in_use(policies)
        self.state = State()
        self.now = START
        # What each publisher really serves, since when (continuously), and since
        # when a successful publish (read back and compared) confirmed it.
        self.served: dict[str, frozenset[str]] = {p: frozenset() for p in self.pubs}
        self.served_since: dict[str, dict[str, datetime]] = {p: {} for p in self.pubs}
        self.confirmed_since: dict[str, dict[str, datetime]] = {p: {} for p in self.pubs}
        # Private keys that exist in each ring's backend.
        self.backend: dict[str, set[str]] = {r: set() for r in policies}
        self.destroyed: set[str] = set()
        # Faults: until when, and how.
        self.pub_fault: dict[str, tuple[datetime, str]] = {}
        self.gen_fault: dict[str, tuple[datetime, str]] = {}
        self.destroy_fault: dict[str, datetime] = {}
        # Facts about signing.
        self.last_signed: dict[str, datetime] = {}
        self.signatures = 0
        self.exempt: set[str] = set()  # promoted by bootstrap, replacement or emergency
        self.emergency: set[str] = set()  # rings with an emergency rotation requested
        self.bootstrapped: set[str] = set()
        self.serial = 0
        self.passes = 0
        self.failed: list[Action] = []
        self.failed_passes = 0
        self.last_plan: Plan | None = None

    # -- faults ------------------------------------------------------------

    def _fault(self, table: dict[str, tuple[datetime, str]], name: str) -> str | None:
        f = table.get(name)
        return f[1] if f is not None and self.now < f[0] else None

    def fail_publisher(self, p: str, duration: timedelta, mode: str) -> None:
        self.pub_fault[p] = (self.now + duration, mode)

    def fail_generate(self, ring: str, duration: timedelta, mode: str) -> None:
        self.gen_fault[ring] = (self.now + duration, mode)

    def fail_destroy(self, ring: str, duration: timedelta) -> None:
        self.destroy_fault[ring] = self.now + duration

    # -- operator ----------------------------------------------------------

    def rotate(self, ring: str, emergency: bool) -> None:
        assert self.state.ring(ring).active is not None
        self._apply(transitions.request_rotation, ring, self.now, emergency)
        if emergency:
            self.emergency.add(ring)
        self.wake()

    def revoke(self, kid: str) -> None:
        self._apply(transitions.revoke, kid, self.now, "compromised")
        self.wake()

    def live_kids(self) -> list[str]:
        return [
            k.kid
            for name in sorted(self.state.rings)
            for k in self.state.rings[name].keys
            if k.state not in (DESTROYED, REVOKED)
        ]

    # -- time ----------------------------------------------------------------

    def advance(self, dt: timedelta, max_wakes: int = 6) -> None:
        """Time passes; the daemon wakes when its plan says (at most ``max_wakes``)."""
        end = self.now + dt
        for _ in range(max_wakes):
            nxt = self.next_wake()
            if nxt is None or nxt >= end:
                break
            assert nxt > self.now
            self.now = nxt
            self.wake()
        self.now = end
        self.wake()

    def next_wake(self) -> datetime | None:
        assert self.last_plan is not None
        nxt = self.last_plan.next_at
        if self.failed:
            # Retry with backoff: 15 min, 30 min, ... at most 8 h.
            retry = self.now + min(RETRY * 2 ** min(self.failed_passes, 6), 8 * HOUR)
            nxt = retry if nxt is None else min(nxt, retry)
        return nxt

    def wake(self) -> None:
        self.sign()
        self.reconcile()
        self.sign()

    # -- the reconcile pass --------------------------------------------------

    def reconcile(self) -> None:
        self.passes += 1
        self.observe()
        failed: list[Action] = []
        for _ in range(MAX_WAVES):
            p = plan(self.state, self.pols, self.now)
            wave = [a for a in p.due if a not in failed]
            if not wave:
                break
            wave.sort(key=lambda a: not isinstance(a, Publish))
            seen = self.state
            for action in wave:
                try:
                    self.execute(action, seen)
                except Failed:
                    failed.append(action)
        else:
            raise AssertionError(f"the pass at {self.now} did not settle: {p.due}")
        self.failed = failed
        self.failed_passes = self.failed_passes + 1 if failed else 0
        self.last_plan = p
        self.check_pass(p)

    def observe(self) -> None:
        """As the reconciler: a record is stale when its target is unreadable or
        serves something else (the ``stale`` flag is not persisted, so each pass
        starts from what the store holds)."""
        pubs = {}
        for name, rec in self.state.publishers.items():
            unreadable = self._fault(self.pub_fault, name) == "down"
            pubs[name] = replace(rec, stale=unreadable or self.served[name] != rec.kids)
        self.state = replace(self.state, publishers=pubs)

    def execute(self, action: Action, seen: State) -> None:
        if isinstance(action, Publish):
            self.publish(action.publisher, seen)
        elif isinstance(action, Generate):
            self.generate(action)
        elif isinstance(action, MarkPublished):
            self.check_mark_published(action)
            self._apply(transitions.mark_published, action.ring, action.kid, self.now)
        elif isinstance(action, Promote):
            self.promote(action)
        elif isinstance(action, Expire):
            key = self.state.ring(action.ring).key(action.kid)
            assert key is not None and key.retired_at is not None
            assert self.now >= key.retired_at + self.pols[action.ring].retire_grace
            self._apply(transitions.expire, action.ring, action.kid, self.now)
        elif isinstance(action, Destroy):
            self.destroy(action)
        else:  # pragma: no cover
            raise AssertionError(action)

    def publish(self, p: str, seen: State) -> None:
        keys = desired_keys(seen, self.pols, p)
        doc = jwks.document(keys)
        # Invariant 5: public members only.
        for j in doc["keys"]:
            assert not PRIVATE_MEMBERS & set(j), j
            assert set(j) <= PUBLIC_MEMBERS, j
            assert j["use"] == "sig"
        kids = frozenset(k.kid for k in keys)
        assert [j["kid"] for j in doc["keys"]] == sorted(kids)
        digest = jwks.digest(" ".join(sorted(kids)).encode())  # cheaper than encode()
        mode = self._fault(self.pub_fault, p)
        if mode in ("unconfirmed", "breaks"):  # written, but the read-back failed
            self.serve(p, kids, confirmed=False)
        if mode == "breaks":  # ... and then the publisher went down
            self.pub_fault[p] = (self.pub_fault[p][0], "down")
        if mode is not None:
            raise Failed(f"publisher {p}: {mode}")
        self.serve(p, kids, confirmed=True)
        self._apply(
            transitions.publisher_confirmed, p, digest, kids, self.now, True
        )

    def generate(self, action: Generate) -> None:
        ring, pol = action.ring, self.pols[action.ring]
        mode = self._fault(self.gen_fault, ring)
        if mode == "before":
            raise Failed("backend down")
        known = {k.kid for k in self.state.ring(ring).keys}
        orphans = sorted(self.backend[ring] - known)
        assert len(orphans) <= 1, orphans
        if orphans:  # a key made by an interrupted generate: adopt it
            self._apply(
                transitions.add_key,
                ring,
                orphans[0],
                public_jwk(orphans[0]),
                pol.algorithm,
                pol.backend,
                self.now,
                action.reason,
                True,
                created="key.adopted",
            )
            return
        self.serial += 1
        kid = f"{ring}-k{self.serial}"
        self.backend[ring].add(kid)
        if mode == "after":  # the backend made the key, then the call failed
            raise Failed("backend timeout")
        self._apply(
            transitions.add_key,
            ring,
            kid,
            public_jwk(kid),
            pol.algorithm,
            pol.backend,
            self.now,
            action.reason,
        )

    def promote(self, action: Promote) -> None:
        ring, kid, pol = action.ring, action.kid, self.pols[action.ring]
        had_active = self.state.ring(ring).active is not None
        exempt = not had_active or ring in self.emergency
        for p in pol.publishers:
            # Invariant 6: only a confirmed publish counts.
            assert kid in self.served[p], f"promoting {kid}, not served by {p}"
            assert kid in self.confirmed_since[p], f"promoting {kid}, never confirmed by {p}"
            if not exempt:
                # Invariant 2: confirmed published for at least A, everywhere.
                since = max(self.served_since[p][kid], self.confirmed_since[p][kid])
                assert since <= self.now - pol.publish_ahead, (
                    f"{kid} promoted at {self.now}, served by {p} only since {since}"
                )
        if not exempt:
            assert action.reason in ("scheduled", "rotate"), action
        self._apply(
            transitions.promote, ring, kid, action.retire, self.now, action.reason
        )
        if exempt:
            self.exempt.add(kid)
        self.emergency.discard(ring)
        self.bootstrapped.add(ring)

    def destroy(self, action: Destroy) -> None:
        ring, kid = action.ring, action.kid
        if self.now < self.destroy_fault.get(ring, self.now):
            raise Failed("backend down")
        key = self.state.ring(ring).key(kid)
        assert key is not None and key.state in (EXPIRED, REVOKED), key
        # Invariant 4: only once it left every publisher (revoked keys too).
        serving = [p for p in self.pubs if kid in self.served[p]]
        assert not serving, f"destroying {kid} ({key.state}) while {serving} serve it"
        if key.state == EXPIRED:
            assert key.expired_at is not None
            assert self.now >= key.expired_at + self.pols[ring].destroy_after
        assert kid in self.backend[ring]
        self.backend[ring].discard(kid)
        self.destroyed.add(kid)
        self._apply(transitions.destroy, ring, kid, self.now)

    def check_mark_published(self, action: MarkPublished) -> None:
        for p in self.pols[action.ring].publishers:
            assert action.kid in self.served[p], (action, p)
            assert action.kid in self.confirmed_since[p], (action, p)

    # -- what publishers serve -------------------------------------------------

    def serve(self, p: str, kids: frozenset[str], confirmed: bool) -> None:
        old = self.served[p]
        for kid in old - kids:
            self.check_leave(p, kid)
            del self.served_since[p][kid]
            self.confirmed_since[p].pop(kid, None)
        for kid in kids - old:
            found = self.state.find(kid)
            assert found is not None and found[1].state != DESTROYED, (p, kid)
            self.served_since[p][kid] = self.now
        self.served[p] = kids
        if confirmed:
            for kid in kids:
                self.confirmed_since[p].setdefault(kid, self.now)

    def check_leave(self, p: str, kid: str) -> None:
        """Invariant 3 and the central promise, when ``kid`` leaves ``p``."""
        found = self.state.find(kid)
        assert found is not None
        ring, key = found
        if key.revoked_at is not None:
            return  # revocation excepted
        assert key.state not in IN_JWKS, f"{kid} ({key.state}) left {p}"
        grace = self.pols[ring.name].retire_grace
        if key.activated_at is not None:
            assert key.retired_at is not None, key
            assert self.now >= key.retired_at + grace, (
                f"{kid} left {p} at {self.now}, retired {key.retired_at}"
            )
        signed = self.last_signed.get(kid)
        if signed is not None:
            # A token signed at ``signed`` lives until signed + G (lifetime + skew = G).
            assert self.now >= signed + grace, (
                f"{kid} left {p} at {self.now}; a token it signed at {signed} is still valid"
            )

    # -- signing ---------------------------------------------------------------

    def sign(self) -> None:
        """Every ring's active key signs a token now; every verifier must accept it."""
        for name, pol in self.pols.items():
            key = self.state.ring(name).active
            if key is None:
                continue
            assert key.activated_at is not None
            # Invariant 4: never a destroyed key; the private key must exist.
            assert key.kid not in self.destroyed and key.kid in self.backend[name], key
            # A verifier whose cache is at most A old must already know the key:
            # served continuously since now - A (bootstrap, replacement and
            # emergency promotions: at least since the promotion).
            required = self.now - pol.publish_ahead
            if key.kid in self.exempt:
                required = max(required, key.activated_at)
            for p in pol.publishers:
                assert key.kid in self.served[p], f"{key.kid} signs but {p} does not serve it"
                since = self.served_since[p][key.kid]
                assert since <= required, (
                    f"{key.kid} signs at {self.now}, served by {p} only since {since}"
                )
            self.last_signed[key.kid] = self.now
            self.signatures += 1

    # -- state changes and their audit events --------------------------------------

    def _apply(self, fn: Any, *args: Any, created: str = "key.generated") -> None:
        before = self.state
        after, events = fn(before, *args)
        check_events(before, after, events, created)
        self.state = after

    # -- invariants after a pass ---------------------------------------------------------

    def check_pass(self, p: Plan) -> None:
        failed = self.failed
        for name, pol in self.pols.items():
            ring = self.state.ring(name)
            active = ring.in_state(ACTIVE)
            assert len(active) <= 1, active
            if not active:
                # Invariant 1: no signer only while a failure blocks its replacement
                # (never bootstrapped yet, or the last signer was revoked).
                blocked = [
                    a
                    for a in failed
                    if (isinstance(a, Generate) and a.ring == name)
                    or (isinstance(a, Publish) and a.publisher in pol.publishers)
                ]
                assert blocked, f"ring {name} has no active key after a pass without failures"
                if name in self.bootstrapped:
                    # Keys are appended in creation order: the last promoted is the last signer.
                    last = [k for k in ring.keys if k.activated_at is not None][-1]
                    assert last.revoked_at is not None, last
        self.check_world()
        if not failed:
            assert p.due == (), p.due
            self.check_upcoming(p)

    def check_upcoming(self, p: Plan) -> None:
        """Sleeping until next_at misses nothing, and next_at has what it announced."""
        for name in self.pols:
            if self.state.ring(name).active is not None:
                assert p.upcoming[name] is not None, name
        nxt = p.next_at
        if nxt is None:
            return
        assert nxt > self.now
        if nxt - SEC > self.now:
            assert plan(self.state, self.pols, nxt - SEC).due == ()
        due = plan(self.state, self.pols, nxt).due
        for name, up in p.upcoming.items():
            if up is not None and up.at == nxt:
                assert any(
                    a.name == up.action and getattr(a, "ring", None) == name and a.kid == up.kid
                    for a in due
                    if not isinstance(a, Publish)
                ), (up, due)

    def check_world(self) -> None:
        for name in self.pols:
            ring = self.state.ring(name)
            pubs = self.pols[name].publishers
            for k in ring.keys:
                # Invariant 6: state never records a key the backend lost.
                if k.state in HAS_PRIVATE:
                    assert k.kid in self.backend[name], k
                else:
                    assert k.kid not in self.backend[name] and k.kid in self.destroyed, k
                # Once confirmed, a key stays served while it belongs in the JWKS.
                if k.state in (PUBLISHED, ACTIVE, RETIRED):
                    for p in pubs:
                        assert k.kid in self.served[p], (k, p)
            # Orphans only come from an interrupted generate.
            orphans = self.backend[name] - {k.kid for k in ring.keys}
            assert len(orphans) <= 1, orphans
        for p, kids in self.served.items():
            assert not kids & self.destroyed, (p, kids & self.destroyed)


def check_events(
    before: State, after: State, events: list[dict[str, Any]], created: str
) -> None:
    """Invariant 7, and only legal transitions; no key ever leaves the state."""
    want: Counter[tuple[str, str, str]] = Counter()
    for name, old_ring in before.rings.items():
        assert name in after.rings, f"ring {name} vanished from state"
    for name, ring in after.rings.items():
        old_ring = before.rings.get(name)
        if old_ring is ring:
            continue
        old_keys = {k.kid: k for k in old_ring.keys} if old_ring is not None else {}
        assert set(old_keys) <= {k.kid for k in ring.keys}, f"a key of {name} vanished"
        assert len(ring.in_state(ACTIVE)) <= 1, f"ring {name} has several active keys"
        for k in ring.keys:
            old = old_keys.get(k.kid)
            if old is k:
                continue
            old_state = old.state if old is not None else None
            if old_state == k.state:
                continue
            assert (old_state, k.state) in EVENT_FOR, (k.kid, old_state, k.state)
            ev = created if old_state is None else EVENT_FOR[(old_state, k.state)]
            want[(ev, name, k.kid)] += 1
    got = Counter(
        (e["event"], e["ring"], e["kid"]) for e in events if e["event"].startswith("key.")
    )
    assert got == want, (got, want)


# --- strategies -----------------------------------------------------------------


def _secs(lo: timedelta, hi: timedelta) -> st.SearchStrategy[timedelta]:
    return st.integers(int(lo.total_seconds()), int(hi.total_seconds())).map(
        lambda s: timedelta(seconds=s)
    )


@st.composite
def ring_policy(draw: st.DrawFn, ring: str, min_period: timedelta = HOUR) -> Policy:
    # P from hours to 90 days (from min_period on).
    days = st.integers(max(1, -(-min_period // DAY)), 90).map(lambda d: d * DAY)
    if min_period < 48 * HOUR:
        hours = st.integers(-(-min_period // HOUR), 48).map(lambda h: h * HOUR)
        days = st.one_of(hours, days)
    period = draw(days)
    ahead = draw(st.one_of(_secs(MIN, min(period, HOUR)), _secs(SEC, period)))
    grace = draw(st.one_of(_secs(MIN, DAY), _secs(SEC, 30 * DAY)))
    destroy_after = draw(st.one_of(st.just(timedelta(0)), _secs(SEC, 30 * DAY)))
    pubs = draw(st.lists(st.sampled_from(PUBLISHERS), min_size=1, max_size=2, unique=True))
    return Policy(
        ring=ring,
        backend=f"backend-{ring}",
        algorithm="EdDSA",
        rotation_period=period,
        publish_ahead=ahead,
        retire_grace=grace,
        destroy_after=destroy_after,
        publishers=tuple(pubs),
    )


@st.composite
def policies(draw: st.DrawFn, min_period: timedelta = HOUR) -> dict[str, Policy]:
    n = draw(st.integers(1, 3))
    return {r: draw(ring_policy(r, min_period)) for r in RINGS[:n]}


#: Seconds to weeks.
steps = st.one_of(
    _secs(SEC, MIN),
    _secs(MIN, HOUR),
    _secs(HOUR, DAY),
    _secs(DAY, WEEK),
    _secs(WEEK, 6 * WEEK),
)
#: A while: minutes to weeks.
outages = st.one_of(_secs(MIN, 2 * HOUR), _secs(2 * HOUR, 3 * DAY), _secs(3 * DAY, 3 * WEEK))
#: reject: nothing written; down: nothing written, unreadable; unconfirmed: written,
#: read-back failed; breaks: the first write goes through unconfirmed, then down.
publisher_modes = st.sampled_from(["reject", "down", "unconfirmed", "breaks"])


# --- the state machine ---------------------------------------------------------------


class PlannerWorld(RuleBasedStateMachine):
    """Random policies, time steps, operator commands and failures."""

    world: World

    @initialize(pols=policies())
    def start(self, pols: dict[str, Policy]) -> None:
        self.world = World(pols)
        self.world.wake()
        self.rings = sorted(pols)

    def ring(self, i: int) -> str:
        return self.rings[i % len(self.rings)]

    @rule(dt=steps)
    def time_passes(self, dt: timedelta) -> None:
        self.world.advance(dt)

    @rule(dt=_secs(30 * DAY, YEAR))
    def daemon_down_for_months(self, dt: timedelta) -> None:
        self.world.advance(dt, max_wakes=0)

    @rule(i=st.integers(0, 2), emergency=st.booleans())
    def rotate(self, i: int, emergency: bool) -> None:
        ring = self.ring(i)
        if self.world.state.ring(ring).active is not None:
            self.world.rotate(ring, emergency)

    @precondition(lambda self: self.world.live_kids())
    @rule(i=st.integers(0, 15))
    def revoke(self, i: int) -> None:
        live = self.world.live_kids()
        # Recent keys first: the pending/published/active ones are the interesting ones.
        self.world.revoke(live[-1 - i % len(live)])

    @rule(p=st.sampled_from(PUBLISHERS), duration=outages, mode=publisher_modes)
    def publisher_fails(self, p: str, duration: timedelta, mode: str) -> None:
        if p in self.world.pubs:
            self.world.fail_publisher(p, duration, mode)

    @rule(i=st.integers(0, 2), duration=outages, mode=st.sampled_from(["before", "after"]))
    def generate_fails(self, i: int, duration: timedelta, mode: str) -> None:
        self.world.fail_generate(self.ring(i), duration, mode)

    @rule(i=st.integers(0, 2), duration=outages)
    def destroy_fails(self, i: int, duration: timedelta) -> None:
        self.world.fail_destroy(self.ring(i), duration)

    @invariant()
    def world_is_consistent(self) -> None:
        if hasattr(self, "world"):
            self.world.check_world()


PlannerWorld.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_planner_world = PlannerWorld.TestCase


# --- years of unattended operation --------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pols=policies(min_period=2 * WEEK), data=st.data())
def test_years_of_operation_with_occasional_trouble(
    pols: dict[str, Policy], data: st.DataObject
) -> None:
    """Three years, the daemon waking at every next_at, now and then a failure or
    an operator command; every invariant checked at every step."""
    w = World(pols)
    w.wake()
    rings = sorted(pols)
    end = START + 3 * YEAR
    while w.now < end:
        what = data.draw(
            st.sampled_from(
                ["quiet"] * 6 + ["rotate", "emergency", "revoke", "publisher", "backend"]
            )
        )
        ring = data.draw(st.sampled_from(rings))
        if what in ("rotate", "emergency") and w.state.ring(ring).active is not None:
            w.rotate(ring, what == "emergency")
        elif what == "revoke" and w.live_kids():
            w.revoke(data.draw(st.sampled_from(w.live_kids())))
        elif what == "publisher":
            w.fail_publisher(
                data.draw(st.sampled_from(w.pubs)), data.draw(outages), data.draw(publisher_modes)
            )
        elif what == "backend":
            when = data.draw(st.sampled_from(["before", "after"]))
            w.fail_generate(ring, data.draw(outages), when)
            w.fail_destroy(ring, data.draw(outages))
        # 1 to 84 days, simplest (for Hypothesis) the longest: few steps to shrink.
        w.advance(85 * DAY - data.draw(_secs(DAY, 84 * DAY)), max_wakes=10**6)
    assert w.now - START >= 3 * YEAR
    for name in rings:
        promoted = [k for k in w.state.ring(name).keys if k.activated_at is not None]
        assert len(promoted) >= 3 * YEAR / max(pols[name].rotation_period, 13 * WEEK) - 1


@settings(max_examples=25, deadline=None)
@given(pols=policies(min_period=WEEK))
def test_two_years_without_trouble_rotate_exactly_on_schedule(pols: dict[str, Policy]) -> None:
    """Nothing fails and nobody intervenes: every key signs for exactly P, is
    published exactly A before, expires G after and is destroyed D after that."""
    w = World(pols)
    w.wake()
    w.advance(2 * YEAR, max_wakes=10**6)
    assert not w.failed
    for name, pol in pols.items():
        keys = sorted(w.state.ring(name).keys, key=lambda k: k.created_at)
        assert len(keys) >= 2 * YEAR // pol.rotation_period
        for prev, nxt in itertools.pairwise(keys):
            assert prev.activated_at is not None
            assert nxt.created_at == nxt.published_at == (
                prev.activated_at + pol.rotation_period - pol.publish_ahead
            )
            if nxt.activated_at is not None:
                assert nxt.activated_at == prev.activated_at + pol.rotation_period
                assert prev.retired_at == nxt.activated_at
            if prev.expired_at is not None:
                assert prev.retired_at is not None
                assert prev.expired_at == prev.retired_at + pol.retire_grace
            if prev.destroyed_at is not None:
                assert prev.expired_at is not None
                assert prev.destroyed_at == prev.expired_at + pol.destroy_after
        assert keys[0].created_at == keys[0].activated_at == START


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pols=policies(), data=st.data())
def test_revocations_and_rotations_while_publishers_misbehave(
    pols: dict[str, Policy], data: st.DataObject
) -> None:
    """A dense mix of the risky moments: revocations (mostly of the newest key),
    rotations and publisher faults, minutes to hours apart."""
    w = World(pols)
    w.wake()
    rings = sorted(pols)
    for _ in range(data.draw(st.integers(1, 30))):
        what = data.draw(st.sampled_from(["revoke-newest", "revoke", "fault", "rotate", "wait"]))
        live = w.live_kids()
        if what == "revoke-newest" and live:
            w.revoke(max(live, key=lambda kid: w.state.find(kid)[1].created_at))  # type: ignore[index]
        elif what == "revoke" and live:
            w.revoke(data.draw(st.sampled_from(live)))
        elif what == "fault":
            w.fail_publisher(
                data.draw(st.sampled_from(w.pubs)),
                data.draw(_secs(MIN, DAY)),
                data.draw(publisher_modes),
            )
        elif what == "rotate":
            ring = data.draw(st.sampled_from(rings))
            if w.state.ring(ring).active is not None:
                w.rotate(ring, data.draw(st.booleans()))
        w.advance(data.draw(_secs(SEC, 6 * HOUR)))
