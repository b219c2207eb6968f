"""The imperative shell: execute what the planner says is due, safely.

Each pass loads the state, observes the publishers, then repeats
plan -> execute one wave -> commit until nothing is due. Every action is safe
to repeat after a crash at any point:

- ``generate``: the key is committed as ``pending`` before anything uses it; a
  key the backend made but state never recorded (an orphan) is found on the
  next generate for that ring and adopted, or destroyed, with an audit event.
- ``publish``: writes are atomic and idempotent, and only a read-back that
  matches counts; an unconfirmed publish never leads to a promotion.
- ``destroy``: idempotent in every backend, recorded after it succeeded.
- the rest are pure state changes, committed with their audit events.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from backends import Backend
from keymgr import jwks, transitions
from keymgr.audit import AuditLog
from keymgr.config import Config
from keymgr.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    KeymgrError,
    PublishError,
)
from keymgr.faults import crashpoint
from keymgr.jose import alg_family, curve_for
from keymgr.logs import get_logger
from keymgr.model import HAS_PRIVATE, State
from keymgr.planner import (
    Action,
    Destroy,
    Expire,
    Generate,
    MarkPublished,
    Plan,
    Promote,
    Publish,
    desired_keys,
    plan,
    publishers_in_use,
)
from keymgr.stores import StateStore, Token
from keymgr.timefmt import format_time

FAILURE_EVENTS = frozenset({"publish.failed", "backend.failed"})
#: What an operational log line repeats of an audit event (never key material).
LOG_FIELDS = ("ring", "kid", "publisher", "backend", "reason")

log = get_logger("keymgr.reconcile")

MAX_WAVES = 32


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class PassResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failed: list[tuple[Action, KeymgrError]] = field(default_factory=list)
    plan: Plan | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


class Reconciler:
    def __init__(self, config: Config, store: StateStore, audit: AuditLog, actor: str) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.actor = actor

    # -- loading -----------------------------------------------------------

    def load(self) -> tuple[State, Token]:
        """Load state and bring the audit log up to its anchor."""
        state, token = self.store.load()
        self.audit.flush(state)
        return state, token

    def check_rings(self, state: State) -> None:
        for name, ring in state.rings.items():
            if name not in self.config.policies and ring.in_state(*HAS_PRIVATE):
                raise ConfigError(
                    f"{self.config.path}: keyrings.{name}: missing, but the state still holds "
                    f"live keys of ring {name!r}; restore the ring (removing it would drop "
                    "keys verifiers may still need)"
                )

    def commit(
        self, state: State, events: list[dict[str, Any]], token: Token
    ) -> tuple[State, Token]:
        new = self.audit.prepare(state, events, self.actor)
        token = self.store.commit(new, token)
        crashpoint("reconcile.after_commit")
        self.audit.flush(new)
        return new, token

    # -- observing ---------------------------------------------------------

    def observe(self, state: State) -> State:
        """Mark publisher records stale when the target no longer serves them."""
        pubs = dict(state.publishers)
        changed = False
        for name in publishers_in_use(self.config.policies):
            rec = pubs.get(name)
            if rec is None:
                continue
            try:
                data = self.config.publishers[name].read()
            except PublishError:
                data = None
            if data is None or jwks.digest(data) != rec.sha256:
                pubs[name] = replace(rec, stale=True)
                changed = True
        return replace(state, publishers=pubs) if changed else state

    # -- the pass ----------------------------------------------------------

    def run(
        self, clock: Callable[[], datetime], check: Callable[[State], object] | None = None
    ) -> PassResult:
        """One pass; ``check`` may refuse it (by raising) once the state is loaded."""
        result = PassResult()
        with self.store.exclusive():
            state, token = self.load()
            if check is not None:
                check(state)
            self.check_rings(state)
            state = self.observe(state)
            failed: set[Action] = set()
            planned: tuple[State, datetime] | None = None
            for _ in range(MAX_WAVES):
                now = clock()
                if state.clock is not None and now < state.clock:
                    now = state.clock
                p = plan(state, self.config.policies, now)
                result.plan = p
                planned = (state, now)
                wave = [a for a in p.due if a not in failed]
                if not wave:
                    break
                # Publishers first, against the state the planner saw.
                wave.sort(key=lambda a: 0 if isinstance(a, Publish) else 1)
                events: list[dict[str, Any]] = []
                new = state
                for action in wave:
                    try:
                        new, evs = self.execute(new, state, action, now)
                        events.extend(evs)
                    except KeymgrError as e:
                        failed.add(action)
                        result.failures.append(str(e))
                        result.failed.append((action, e))
                        # Committed with the wave, so the anchor covers it:
                        # removing a failure from the log is then detectable.
                        events.append(self.failure_event(action, e, now))
                if events:
                    try:
                        state, token = self.commit(new, events, token)
                    except ConflictError:
                        # Another writer won the race: forget our wave and plan
                        # again from what it committed. Keys we generated in this
                        # wave were never recorded or used: destroy them now
                        # rather than leave orphans for a later generate.
                        state, token = self.load()
                        self.discard_generated(events, state)
                        state = self.observe(state)
                        continue
                    result.events.extend(state.audit.outbox)
                    for ev in state.audit.outbox:
                        if ev["event"] in FAILURE_EVENTS:
                            continue  # logged as an error when it happened
                        fields = {f: ev[f] for f in LOG_FIELDS if ev.get(f) is not None}
                        log.info(ev["event"], **fields)
            else:
                result.failures.append("reconcile did not settle (internal limit reached)")
            now = clock()
            if state.clock is not None and now < state.clock:
                now = state.clock
            # The last plan already is this one when nothing changed since (the
            # steady state): planning 10,000 rings twice per pass is waste.
            if planned is None or planned[0] is not state or planned[1] != now:
                result.plan = plan(state, self.config.policies, now)
        return result

    def discard_generated(self, events: list[dict[str, Any]], winner: State) -> None:
        """Destroy keys generated in a wave whose commit lost, unless the winner
        recorded them (a writer without a pass lock may have adopted them)."""
        for ev in events:
            if ev["event"] != "key.generated" or winner.find(ev["kid"]) is not None:
                continue
            try:
                self.backend(ev["backend"]).destroy(ev["ring"], ev["kid"])
                log.warning(
                    "key.discarded",
                    ring=ev["ring"],
                    kid=ev["kid"],
                    reason="lost a state commit race; key never recorded",
                )
            except KeymgrError as e:  # left as an orphan for the next generate
                log.warning("key.discard_failed", ring=ev["ring"], kid=ev["kid"], error=str(e))

    def failure_event(self, action: Action, err: KeymgrError, now: datetime) -> dict[str, Any]:
        kind = "publish.failed" if isinstance(err, PublishError) else "backend.failed"
        ev: dict[str, Any] = {
            "event": kind,
            "ts": now,
            "ring": getattr(action, "ring", None),
            "kid": getattr(action, "kid", None),
            "action": action.name,
            "reason": str(err),
        }
        if isinstance(action, Publish):
            ev["publisher"] = action.publisher
        fields = {f: ev[f] for f in ("ring", "kid", "publisher") if ev.get(f) is not None}
        log.error(kind, action=action.name, error=str(err), **fields)
        return ev

    def record(self, events: list[dict[str, Any]]) -> None:
        """Commit events that change no key (daemon start, config reload).

        They go through the state like every other event, so that the anchor
        covers them and their removal from the log shows in ``audit verify``.
        A lost CAS race is retried against the newer state.
        """
        for _ in range(5):
            state, token = self.load()
            try:
                self.commit(state, events, token)
                return
            except ConflictError:
                continue
        raise ConflictError("state store: could not record an audit event (busy)")

    # -- actions -----------------------------------------------------------

    def execute(
        self, state: State, seen: State, action: Action, now: datetime
    ) -> tuple[State, list[dict[str, Any]]]:
        if isinstance(action, Publish):
            return self.publish(state, seen, action.publisher, now)
        if isinstance(action, Generate):
            return self.generate(state, action, now)
        if isinstance(action, MarkPublished):
            return transitions.mark_published(state, action.ring, action.kid, now)
        if isinstance(action, Promote):
            return transitions.promote(
                state, action.ring, action.kid, action.retire, now, action.reason
            )
        if isinstance(action, Expire):
            return transitions.expire(state, action.ring, action.kid, now)
        if isinstance(action, Destroy):
            key = state.ring(action.ring).key(action.kid)
            assert key is not None
            self.backend(key.backend).destroy(action.ring, action.kid)
            crashpoint("destroy.after_backend")
            return transitions.destroy(state, action.ring, action.kid, now)
        raise AssertionError(action)

    def backend(self, name: str) -> Backend:
        try:
            return self.config.backends[name]
        except KeyError:
            raise BackendError(
                f"backend {name!r} is recorded in state but not configured"
            ) from None

    def publish(
        self, state: State, seen: State, name: str, now: datetime
    ) -> tuple[State, list[dict[str, Any]]]:
        keys = desired_keys(seen, self.config.policies, name)
        data = jwks.encode(jwks.document(keys))
        written = self.config.publishers[name].publish(data)
        crashpoint("publish.before_commit")
        return transitions.publisher_confirmed(
            state, name, jwks.digest(data), frozenset(k.kid for k in keys), now, written
        )

    def generate(
        self, state: State, action: Generate, now: datetime
    ) -> tuple[State, list[dict[str, Any]]]:
        pol = self.config.policies[action.ring]
        backend = self.backend(pol.backend)
        ring = state.ring(action.ring)
        known = {k.kid for k in ring.keys}
        events: list[dict[str, Any]] = []
        adopted = False
        try:
            orphans = [kid for kid in backend.list_keys(action.ring) if kid not in known]
        except KeymgrError as e:
            raise BackendError(
                f"backend {pol.backend}: list keys of ring {action.ring}: {e}"
            ) from None
        for kid in sorted(orphans):
            jwk = backend.public_jwk(action.ring, kid)
            if not adopted and _fits(jwk, pol.algorithm):
                state, evs = transitions.add_key(
                    state,
                    action.ring,
                    kid,
                    jwk,
                    pol.algorithm,
                    pol.backend,
                    now,
                    action.reason,
                    adopted=True,
                )
                events.extend(evs)
                adopted = True
            else:
                backend.destroy(action.ring, kid)
                events.append(
                    {
                        "event": "key.orphan_destroyed",
                        "ts": now,
                        "ring": action.ring,
                        "kid": kid,
                        "backend": pol.backend,
                        "reason": "created by an interrupted run, not recorded in state",
                    }
                )
        if adopted:
            return state, events
        gen = backend.generate(action.ring, pol.algorithm)
        crashpoint("generate.after_backend")
        state, evs = transitions.add_key(
            state,
            action.ring,
            gen.kid,
            gen.public_jwk,
            pol.algorithm,
            pol.backend,
            now,
            action.reason,
        )
        return state, events + evs


def _fits(jwk: dict[str, str], alg: str) -> bool:
    fam = alg_family(alg)
    if jwk.get("kty") != fam:
        return False
    if fam == "EC":
        return jwk.get("crv") == curve_for(alg)
    return True


def describe(ev: dict[str, Any]) -> str:
    """One line per applied transition, for the CLI."""
    parts = [
        str(ev.get("ts") if isinstance(ev.get("ts"), str) else format_time(ev.get("ts"))),
        str(ev["event"]),
    ]
    for k in ("ring", "kid", "publisher", "reason"):
        if ev.get(k) is not None:
            parts.append(f"{k}={ev[k]}")
    return " ".join(parts)
