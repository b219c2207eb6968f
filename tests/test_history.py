"""Bounded history (issue 15): a destroyed key leaves the state ``history``
after its destruction as a compact tombstone, dropped TOMBSTONE_KEEP later.

- the pure rules: when each of the two transitions is due, what it leaves,
  what it refuses (keymgr.planner, keymgr.transitions, keymgr.projection);
- the document: tombstones survive a round trip, old documents load, and a
  malformed entry is one line naming the ring and the kid (keymgr.model,
  keymgr.validate), as is a bad ``history`` in the config;
- a tombstone's kid is recognised: never adopted, never taken for a foreign
  key, its audit events accepted (keymgr.reconciler, keymgr.audit);
- a model test drives the real Reconciler over in-memory fakes whose backend
  keeps listing destroyed keys for a pending-deletion window, as AWS KMS does;
- end to end through the CLI: two years of daily-ish rotations on the file
  backend, the state per ring bounded by a figure computed from the policy,
  the audit log still holding every key's whole life.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymgr import transitions
from keymgr.audit import AuditLog
from keymgr.config import Config, DaemonConfig, load_config
from keymgr.errors import ConfigError, StateError
from keymgr.jose import thumbprint
from keymgr.model import DESTROYED, Key, Ring, State, Tombstone
from keymgr.notify import KNOWN_EVENTS
from keymgr.planner import (
    TOMBSTONE_KEEP,
    DropTombstone,
    Forget,
    Policy,
    Upcoming,
    plan,
)
from keymgr.projection import project
from keymgr.reconciler import Reconciler
from keymgr.testing.memory import MemoryBackend, MemoryPublisher, MemoryStore
from keymgr.validate import check_state
from tests.conftest import Home

T = datetime(2031, 3, 1, 8, 0, 0, tzinfo=UTC)
SEC = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
KID = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"  # any 43 base64url characters
JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


def _policy(**kw: Any) -> Policy:
    base: dict[str, Any] = {
        "ring": "r0",
        "backend": "b0",
        "algorithm": "EdDSA",
        "rotation_period": 10 * DAY,
        "publish_ahead": HOUR,
        "retire_grace": DAY,
        "destroy_after": DAY,
        "publishers": ("p0",),
        "history": 20 * DAY,
    }
    return Policy(**{**base, **kw})


def _destroyed(kid: str = KID, at: datetime = T) -> Key:
    return Key(
        kid=kid,
        alg="EdDSA",
        backend="b0",
        state=DESTROYED,
        public_jwk=dict(JWK),
        created_at=at - 30 * DAY,
        published_at=at - 30 * DAY,
        activated_at=at - 30 * DAY,
        retired_at=at - 20 * DAY,
        expired_at=at - 10 * DAY,
        destroyed_at=at,
    )


def _state(*keys: Key, forgotten: tuple[Tombstone, ...] = (), clock: datetime = T) -> State:
    return State(rings={"r0": Ring("r0", keys=keys, forgotten=forgotten)}, clock=clock)


def _ring_actions(state: State, pol: Policy, now: datetime) -> tuple[list[object], Any]:
    """What the planner says is due about history (a ring without a signer
    also bootstraps), and the ring's next transition."""
    p = plan(state, {"r0": pol}, now)
    return [a for a in p.due if isinstance(a, Forget | DropTombstone)], p.upcoming["r0"]


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("history", [timedelta(0), 3 * DAY, 400 * DAY])
def test_forget_is_due_exactly_history_after_destruction(history: timedelta) -> None:
    pol = _policy(history=history)
    state = _state(_destroyed())
    if history:
        due, nxt = _ring_actions(state, pol, T + history - SEC)
        assert due == [] and nxt == Upcoming("forget", KID, T + history)
    due, _ = _ring_actions(state, pol, T + history)
    assert due == [Forget("r0", KID)]


def test_forget_leaves_a_tombstone_and_one_audit_event() -> None:
    now = T + 20 * DAY
    state, events = transitions.forget(_state(_destroyed()), "r0", KID, now)
    ring = state.ring("r0")
    assert ring.keys == ()
    assert ring.forgotten == (Tombstone(KID, "EdDSA", "b0", T),)
    assert ring.known_kids() == {KID}
    assert state.find(KID) is None and state.find_forgotten(KID) == (ring, ring.forgotten[0])
    assert state.clock == now
    (ev,) = events
    assert ev == {
        "event": "key.forgotten", "ts": now, "ring": "r0", "kid": KID, "backend": "b0",
        "alg": "EdDSA", "destroyed_at": T,
    }
    # What the document keeps of it: no public key, no other time.
    assert ring.to_dict()["forgotten"] == [
        {"kid": KID, "alg": "EdDSA", "backend": "b0", "destroyed_at": "2031-03-01T08:00:00Z"}
    ]


@pytest.mark.parametrize("state", ["expired", "retired", "active", "revoked"])
def test_only_a_destroyed_key_is_forgotten(state: str) -> None:
    key = _destroyed()
    times = {"revoked": {"revoked_at": T}}.get(state, {})
    key = replace(key, state=state, destroyed_at=None, **times)
    with pytest.raises(ValueError, match=f"cannot forget a {state} key"):
        transitions.forget(_state(key), "r0", KID, T + 400 * DAY)


def test_the_tombstone_is_dropped_tombstone_keep_after_the_forget() -> None:
    pol = _policy(history=5 * DAY)
    tomb = Tombstone(KID, "EdDSA", "b0", T)
    state = _state(forgotten=(tomb,), clock=T + 5 * DAY)
    drop_at = T + 5 * DAY + TOMBSTONE_KEEP
    due, nxt = _ring_actions(state, pol, drop_at - SEC)
    assert due == [] and nxt == Upcoming("drop-tombstone", KID, drop_at)
    due, _ = _ring_actions(state, pol, drop_at)
    assert due == [DropTombstone("r0", KID)]
    after, events = transitions.drop_tombstone(state, "r0", KID, drop_at)
    assert after.ring("r0").forgotten == () and after.find_forgotten(KID) is None
    assert [e["event"] for e in events] == ["key.tombstone_dropped"]
    with pytest.raises(KeyError):
        transitions.drop_tombstone(after, "r0", KID, drop_at)


def test_a_tombstoned_kid_is_never_recorded_again() -> None:
    state = _state(forgotten=(Tombstone(KID, "EdDSA", "b0", T),))
    with pytest.raises(KeyError, match="destroyed"):
        transitions.add_key(state, "r0", KID, dict(JWK), "EdDSA", "b0", T, "x", adopted=True)
    with pytest.raises(KeyError, match="tombstone"):
        transitions.take_over(state, "r0", KID, dict(JWK), "EdDSA", "b0", "retired", T, "op")


def test_projection_shows_forget_and_drop_at_their_times() -> None:
    """``plan --at`` walks the same planner: a key generated now is forgotten
    history after its destruction and its tombstone dropped TOMBSTONE_KEEP later."""
    pol = _policy(rotation_period=30 * DAY, history=7 * DAY)
    proj = project(State(), {"r0": pol}, T, T + 200 * DAY)
    first = {s.action: s.at for s in proj.steps if s.kid == "<next-1 of r0>"}
    assert first["destroy"] == T + 30 * DAY + pol.retire_grace + pol.destroy_after
    assert first["forget"] == first["destroy"] + pol.history
    assert first["drop-tombstone"] == first["forget"] + TOMBSTONE_KEEP
    assert next(s.event for s in proj.steps if s.action == "forget") == "key.forgotten"


# --------------------------------------------------------------------------- the document


def test_tombstones_round_trip_and_old_documents_load() -> None:
    state = _state(_destroyed("a" * 43), forgotten=(Tombstone(KID, "ES256", "b1", T),))
    doc = json.loads(json.dumps(state.to_dict()))
    assert State.from_dict(doc) == state
    old = json.loads(json.dumps(_state(_destroyed()).to_dict()))
    assert "forgotten" not in old["rings"]["r0"]  # written as before the field existed
    assert State.from_dict(old).ring("r0").forgotten == ()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"kid": KID, "alg": "EdDSA", "backend": "b0"}, "destroyed_at must be a non-empty"),
        ({"kid": KID, "alg": "EdDSA", "backend": "b0", "destroyed_at": "soon"}, "destroyed_at:"),
        ({"kid": KID, "alg": "EdDSA", "backend": "", "destroyed_at": "2031-03-01T08:00:00Z"},
         "backend must be"),
        ({"kid": KID, "alg": "EdDSA", "backend": "b0", "destroyed_at": "2031-03-01T08:00:00Z",
          "public_jwk": JWK}, "unexpected field(s) public_jwk"),
        ("KID", "not an object"),
    ],
)
def test_a_malformed_tombstone_is_one_line_naming_ring_and_kid(entry: Any, problem: str) -> None:
    doc = _state().to_dict()
    doc["rings"]["r0"]["forgotten"] = [entry]
    with pytest.raises(ValueError) as e:
        State.from_dict(doc)
    kid = KID if isinstance(entry, dict) else "?"
    assert str(e.value).startswith(f"ring r0: forgotten key {kid}: ")
    assert problem in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("tomb", "keys", "problem"),
    [
        (Tombstone("short", "EdDSA", "b0", T), (),
         "kid is not an RFC 7638 thumbprint (43 base64url characters)"),
        (Tombstone(KID, "HS256", "b0", T), (), "alg: 'HS256' is not a supported JWS algorithm"),
        (Tombstone(KID, "EdDSA", "b0", T + SEC), (),
         "destroyed_at is later than the state's clock"),
        (Tombstone(KID, "EdDSA", "b0", T), ("key",), "recorded twice (also in ring r0)"),
    ],
)
def test_validate_refuses_a_bad_tombstone_in_one_line(
    tomb: Tombstone, keys: tuple[str, ...], problem: str
) -> None:
    live = [_destroyed(thumbprint(JWK))] if keys else []
    if keys:
        tomb = Tombstone(live[0].kid, tomb.alg, tomb.backend, tomb.destroyed_at)
    with pytest.raises(StateError) as e:
        check_state(_state(*live, forgotten=(tomb,)), "state X")
    assert str(e.value) == f"state X: ring r0: forgotten key {tomb.kid}: {problem}"
    check_state(_state(*live), "state X")  # the same state without it is fine


def _config_with(home: Home, extra: str) -> None:
    text = home.config.read_text()
    home.config.write_text(text.replace('destroy_after = "7d"', f'destroy_after = "7d"\n{extra}'))


def test_history_defaults_to_90_days(home: Home) -> None:
    assert load_config(home.config).policies["default"].history == timedelta(days=90)
    _config_with(home, 'history = "0s"')
    assert load_config(home.config).policies["default"].history == timedelta(0)


@pytest.mark.parametrize("value", ['"90"', '"forever"', "90", '""'])
def test_a_bad_history_is_one_line_naming_the_field(home: Home, value: str) -> None:
    _config_with(home, f"history = {value}")
    with pytest.raises(ConfigError) as e:
        load_config(home.config)
    assert str(e.value).startswith(f"{home.config}: keyrings.default.history: ")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- recognition


def test_audit_outbox_checks_accept_tombstone_events_and_nothing_else() -> None:
    problem = AuditLog._transition_problem
    tomb = Tombstone(KID, "EdDSA", "b0", T)
    with_tomb, with_key, gone = _state(forgotten=(tomb,)), _state(_destroyed()), _state()
    ev = {"event": "key.forgotten", "ring": "r0", "kid": KID, "backend": "b0", "alg": "EdDSA"}
    assert problem(with_tomb, ev) is None
    assert "still recorded in full" in (problem(with_key, ev) or "")
    assert "does not hold" in (problem(gone, ev) or "")
    assert "'ES256' differs" in (problem(with_tomb, {**ev, "alg": "ES256"}) or "")
    dropped = {**ev, "event": "key.tombstone_dropped"}
    assert problem(gone, dropped) is None
    assert "still recorded" in (problem(with_tomb, dropped) or "")
    assert "still recorded" in (problem(with_key, dropped) or "")
    # A tombstone stands for a destroyed key of its own ring, and nothing else.
    assert problem(with_tomb, {**ev, "event": "key.destroyed"}) is None
    assert "does not hold" in (problem(with_tomb, {**ev, "ring": "r1"}) or "")
    revoked_key = _state(replace(_destroyed(), state="revoked", revoked_at=T))
    assert "holds it as revoked" in (
        problem(revoked_key, {**ev, "event": "key.destroyed"}) or ""
    )
    assert problem(with_tomb, {**ev, "event": "key.orphan_destroyed"}) is None
    assert {"key.forgotten", "key.tombstone_dropped"} <= set(KNOWN_EVENTS)


# --------------------------------------------------------------------------- model


class PendingDeletionBackend(MemoryBackend):
    """A MemoryBackend that, like AWS KMS, goes on listing a destroyed key for
    ``window`` (its pending-deletion window) before it is gone for good."""

    def __init__(self, name: str, window: timedelta, clock: list[datetime]) -> None:
        super().__init__(name, seed=f"fixed-{name}".encode())
        self.window = window
        self.clock = clock
        self.pending: dict[tuple[str, str], datetime] = {}

    def destroy(self, ring: str, kid: str) -> None:
        if (ring, kid) in self._keys:
            self.pending[(ring, kid)] = self.clock[0] + self.window
        super().destroy(ring, kid)

    def list_keys(self, ring: str) -> list[str]:
        now = self.clock[0]
        listed = {kid for (r, kid), until in self.pending.items() if r == ring and until > now}
        return sorted(set(super().list_keys(ring)) | listed)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    period=st.integers(1, 6).map(lambda d: d * DAY),
    grace=st.sampled_from([HOUR, DAY, 3 * DAY]),
    destroy_after=st.sampled_from([timedelta(0), DAY, 5 * DAY]),
    history=st.sampled_from([timedelta(0), 2 * DAY, 12 * DAY, 40 * DAY]),
    window=st.sampled_from([timedelta(0), 7 * DAY, 30 * DAY]),
    interval=st.sampled_from([6 * HOUR, DAY]),
)
def test_real_reconciler_keeps_each_ring_bounded_and_recognises_leftovers(
    period: timedelta,
    grace: timedelta,
    destroy_after: timedelta,
    history: timedelta,
    window: timedelta,
    interval: timedelta,
) -> None:
    """The real Reconciler, a daemon waking at the planner's next time (or
    every ``interval``), for 150 days. After every pass: no refusal (a listed
    pending deletion is a destroyed key's leftover, not a foreign key), every
    destroyed record within its history, every tombstone between its forget
    and its drop, a destroyed kid never live again, and the whole life of
    every key in the audit log."""
    clock = [T]
    pol = _policy(
        rotation_period=period, retire_grace=grace, destroy_after=destroy_after, history=history
    )
    backend = PendingDeletionBackend("b0", window, clock)
    scratch = Path(tempfile.mkdtemp(prefix="keymgr-history-"))
    try:
        store = MemoryStore()
        audit = AuditLog(scratch / "audit.jsonl")
        config = Config(
            path=scratch / "keymgr.toml",
            daemon=DaemonConfig(
                state=store.url, audit_log=scratch / "audit.jsonl", reconcile_interval=interval,
                listen=("127.0.0.1", 0), log_level="info", lease_ttl=timedelta(seconds=30),
            ),
            backends={"b0": backend},
            publishers={"p0": MemoryPublisher("p0")},
            policies={"r0": pol},
            cache_control={"p0": None},
        )
        rec = Reconciler(config, store, audit, "daemon")
        destroyed: set[str] = set()
        end = T + 150 * DAY
        while clock[0] <= end:
            result = rec.run(lambda: clock[0])
            assert result.ok, result.failures
            state = store.load()[0]
            ring, now = state.ring("r0"), clock[0]
            for k in ring.keys:
                assert k.kid not in destroyed or k.state == DESTROYED, k
                if k.state == DESTROYED:
                    assert k.destroyed_at is not None and now < k.destroyed_at + history
                    destroyed.add(k.kid)
            for t in ring.forgotten:
                assert t.destroyed_at + history <= now < t.destroyed_at + history + TOMBSTONE_KEEP
                destroyed.add(t.kid)
            nxt = result.plan.next_at if result.plan is not None else None
            clock[0] = min(nxt, now + interval) if nxt is not None else now + interval
        n = audit.verify(state.audit)
        assert n == state.audit.seq
        log = [json.loads(line) for line in (scratch / "audit.jsonl").read_text().splitlines()]
        lives: dict[str, list[str]] = {}
        for e in log:
            if e["event"].startswith("key."):
                lives.setdefault(e["kid"], []).append(e["event"])
        assert set(lives) == {kid for _, kid in backend.created}
        for kid, life in lives.items():
            want = ["key.generated", "key.published", "key.promoted", "key.retired",
                    "key.expired", "key.destroyed", "key.forgotten", "key.tombstone_dropped"]
            assert life == want[: len(life)], (kid, life)  # in order, none repeated
        assert any(len(life) == len(want) for life in lives.values())  # some went all the way
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- end to end


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _size(obj: Any) -> int:
    return len(json.dumps(obj))


def test_two_years_of_rotations_keep_the_state_bounded(home: Home) -> None:
    """P = 2 days for two years (365 rotations) on the file backend, through
    ``reconcile --at``. The ring's state never exceeds a bound computed from
    the policy; the audit log holds every event of every key and verifies; a
    copy of a destroyed key's file put back while its tombstone lasts is
    recognised (passes go on, ``adopt`` refuses it), and once the tombstone
    is gone the same leftover is refused as unknown (failing closed)."""
    p, a, g, hist = 2 * DAY, HOUR, HOUR, 10 * DAY
    _config_with(home, 'history = "10d"')
    home.set_ring(rotation_period="2d", publish_ahead="1h", retire_grace="1h",
                  destroy_after="0s")
    keys_dir = home.dir / "keys" / "default"

    def reconcile(at: datetime) -> None:
        proc = home.run("reconcile", "--at", _ts(at), inproc=True)
        assert proc.returncode == 0, proc.stderr

    reconcile(T)
    # Each cycle: the successor is generated at P - A (the previous retired
    # key expires and is destroyed in the same pass, D = 0), promoted at P.
    largest, kept, tomb_max = 0, {"key": 0, "tomb": 0}, 0
    saved, saved_key, old_jwks = "", b"", b""
    restored_at: datetime | None = None
    cycles = 365
    for i in range(cycles):
        base = T + i * p
        for at in (base + p - a, base + p):
            reconcile(at)
            ring = home.state()["rings"]["default"]
            largest = max(largest, _size(ring))
            kept["key"] = max([kept["key"], *(_size(k) for k in ring["keys"])])
            kept["tomb"] = max([kept["tomb"], *(_size(t) for t in ring.get("forgotten", []))])
            tomb_max = max(tomb_max, len(ring.get("forgotten", [])))
        if i == 3:  # a backup of the signer's key file and of the JWKS
            active = next(k["kid"] for k in ring["keys"] if k["state"] == "active")
            saved, saved_key = active, (keys_dir / f"{active}.key").read_bytes()
            old_jwks = home.jwks_path.read_bytes()
        leftover = keys_dir / f"{saved}.key"
        if saved and restored_at is None and any(
            t["kid"] == saved for t in ring.get("forgotten", [])
        ):
            # The backup comes back while the tombstone lasts: a leftover.
            leftover.write_bytes(saved_key)
            restored_at = base + p
            refused = home.run("adopt", "default", saved, "--as", "retired", inproc=True)
            assert refused.returncode != 0 and "tombstone" in refused.stderr, refused
            # So does the JWKS of then: its keys are destroyed ones the state
            # still recognises, so it is rewritten, not refused as unknown keys.
            home.jwks_path.write_bytes(old_jwks)
            reconcile(restored_at)
            assert saved not in {k["kid"] for k in home.jwks()["keys"]}
        if restored_at is not None and leftover.exists() and base > restored_at + 3 * p:
            leftover.unlink()  # the operator cleans it up

    assert restored_at is not None
    end = T + cycles * p
    state = home.state()
    ring = state["rings"]["default"]
    # The bound, from the policy: keys not destroyed (the signer, its
    # successor, the keys within G + D after retiring), destroyed records of
    # the last ``history``, tombstones of the TOMBSTONE_KEEP after that; at
    # most one key is destroyed per P.
    live = 2 + (g + timedelta(0)) // p + 1
    full = hist // p + 1
    tombs = TOMBSTONE_KEEP // p + 1
    empty: dict[str, Any] = {"keys": [], "rotate_at": None, "emergency": False, "forgotten": []}
    bound = _size(empty) + (live + full) * (kept["key"] + 2) + tombs * (kept["tomb"] + 2)
    assert largest <= bound, (largest, bound)
    assert tomb_max == tombs - 1 or tomb_max == tombs  # the bound is reached, not vacuous
    # Without forgetting, the ring would hold every key ever made.
    log = [json.loads(line) for line in (home.dir / "audit.jsonl").read_text().splitlines()]
    made = [e["kid"] for e in log if e["event"] == "key.generated"]
    assert len(made) == cycles + 1
    assert len(made) * kept["key"] > 10 * bound
    # Every key's life is in the log, in order, up to where the time reached.
    life: dict[str, list[str]] = {}
    for e in log:
        if e["event"].startswith("key."):
            life.setdefault(e["kid"], []).append(e["event"])
    full_life = ["key.generated", "key.published", "key.promoted", "key.retired",
                 "key.expired", "key.destroyed", "key.forgotten", "key.tombstone_dropped"]
    for kid in made:
        assert life[kid] == full_life[: len(life[kid])], (kid, life[kid])
    old_enough = made[: cycles - (hist + TOMBSTONE_KEEP) // p - 5]
    assert old_enough and all(life[k] == full_life for k in old_enough)
    assert {k["kid"] for k in ring["keys"]} | {t["kid"] for t in ring["forgotten"]} == {
        k for k in made if life[k][-1] != "key.tombstone_dropped"
    }
    verify = home.run("audit", "verify", inproc=True)
    assert verify.returncode == 0, verify.stderr
    # Once the tombstone is gone the same leftover is a key the state does
    # not know: the next generate refuses it rather than guess.
    assert not any(t["kid"] == saved for t in ring["forgotten"])
    (keys_dir / f"{saved}.key").write_bytes(saved_key)
    proc = home.run("reconcile", "--at", _ts(end + p), inproc=True)
    assert proc.returncode != 0 and saved in proc.stderr and "does not record" in proc.stderr
