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
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keymgr import discovery, jwks, transitions
from keymgr.audit import AuditLog
from keymgr.backend import Backend
from keymgr.config import Config
from keymgr.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    KeymgrError,
    KeyNotFoundError,
    PublishError,
    StateError,
)
from keymgr.faults import crashpoint
from keymgr.jose import alg_family, curve_for
from keymgr.logs import get_logger
from keymgr.model import HAS_PRIVATE, EdgeRecord, Key, Ring, State
from keymgr.planner import (
    Action,
    Destroy,
    DropTombstone,
    Expire,
    Forget,
    Generate,
    MarkPublished,
    Plan,
    PlanMemo,
    Promote,
    Publish,
    desired_keys,
    plan,
    publishers_in_use,
)
from keymgr.probes import ProbeResult, probe_all
from keymgr.publishers import Served
from keymgr.stores import StateStore, Token
from keymgr.timefmt import format_time
from keymgr.validate import check_state

FAILURE_EVENTS = frozenset({"publish.failed", "backend.failed"})
#: What an operational log line repeats of an audit event (never key material).
LOG_FIELDS = ("ring", "kid", "publisher", "url", "added", "removed", "backend", "reason")

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


def pass_time(clock: Callable[[], datetime], state: State) -> datetime:
    """The clock, never earlier than the newest time in ``state``: what a pass
    records moves forward, whatever the clock did."""
    now = clock()
    return state.clock if state.clock is not None and now < state.clock else now


class Reconciler:
    def __init__(self, config: Config, store: StateStore, audit: AuditLog, actor: str) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.actor = actor
        self._validated: State | None = None
        #: (backend, ring, kid) -> the public JWK the backend returned: checked
        #: once per process before a key is published (see _check_keys).
        self._backend_jwks: dict[tuple[str, str, str], dict[str, str]] = {}
        #: Rings of the last state found sound (keymgr.validate.check_state).
        self._checked_rings: dict[str, Ring] = {}
        #: Steady rings' plans, reused while nothing they depend on changed.
        self._plan_memo = PlanMemo()
        #: One plan at a time per memo: the daemon plans from its pass, its
        #: heartbeat and the service's ``GET /v1/status`` threads, and the
        #: memo's context (:meth:`PlanMemo.enter`) is only right for the plan
        #: that entered it.
        self._plan_lock = threading.Lock()
        #: The config and the rings :meth:`check_rings` last found configured.
        self._rings_ok: tuple[object, dict[str, Ring]] = (None, {})
        #: Called after each edge probe (publisher, result, record before,
        #: state after): the daemon's metrics.
        self.on_probe: Callable[[str, ProbeResult, EdgeRecord | None, State], None] | None = None

    # -- loading -----------------------------------------------------------

    def load(self) -> tuple[State, Token]:
        """Load and validate the state, and bring the audit log up to its anchor."""
        state, token = self.store.load()
        self.validate(state)
        self.audit.flush(state)
        return state, token

    def validate(self, state: State) -> None:
        """Schema-check a loaded state (keymgr.validate), once per document object:
        the stores hand back the same immutable object while the bytes are unchanged."""
        if state is self._validated:
            return
        check_state(state, f"state {self.store.url}", self._checked_rings)
        self._validated = state

    def check_rings(self, state: State) -> None:
        """Every ring with live keys is configured, and so is every backend holding one.

        A ring that passed for this config is not walked again while the store
        hands back the same (immutable) Ring object: a pass over 100,000
        unchanged rings costs a dictionary lookup each.
        """
        config, passed = self._rings_ok
        if config is not self.config:
            passed = {}
        now_ok: dict[str, Ring] = {}
        for name, ring in state.rings.items():
            if passed.get(name) is not ring:
                self._check_ring(name, ring)
            now_ok[name] = ring
        self._rings_ok = (self.config, now_ok)

    def _check_ring(self, name: str, ring: Ring) -> None:
        if name not in self.config.policies and ring.in_state(*HAS_PRIVATE):
            raise ConfigError(
                f"{self.config.path}: keyrings.{name}: missing, but the state still holds "
                f"live keys of ring {name!r}; restore the ring (removing it would drop "
                "keys verifiers may still need)"
            )
        for k in ring.keys:
            if k.state in HAS_PRIVATE and k.backend not in self.config.backends:
                raise ConfigError(
                    f"{self.config.path}: backends.{k.backend}: missing, but key {k.kid} of "
                    f"ring {name} ({k.state}) lives there; keep the backend configured "
                    "until its keys are destroyed (a moved ring keeps its old keys where "
                    "they are)"
                )

    def commit(
        self, state: State, events: list[dict[str, Any]], token: Token
    ) -> tuple[State, Token]:
        # A commit that changes how the state is stored (the move to shards)
        # says so in the audit chain (StateStore.layout_event).
        layout = self.store.layout_event(state, token)
        if layout is not None:
            events = [*events, layout]
        new = self.audit.prepare(state, events, self.actor)
        token = self.store.commit(new, token)
        crashpoint("reconcile.after_commit")
        self.audit.flush(new)
        return new, token

    # -- observing ---------------------------------------------------------

    def observe(self, state: State) -> State:
        """Break the continuity of every publisher that no longer serves what it
        confirmed: body or headers changed, deleted, or unreadable.

        Every configured publisher with a record is read, used by a ring or not
        (a publisher dropped from a ring still serves keys until it confirms a
        document without them).
        """
        for name in self.managed_publishers():
            rec = state.publishers.get(name)
            if rec is None or (rec.stale and not rec.since):
                continue
            if not self.still_served(name, rec.sha256):
                state = transitions.publisher_drifted(state, name)
        return state

    def still_served(self, name: str, sha256: str) -> bool:
        """Does the publisher still serve what it confirmed (``sha256``)?

        The headers are compared with the config too: a cache_control changed
        there must reach the target (and counts as a new document). With a
        discovery document, the pair was confirmed (discovery.pair_digest):
        the document too must be what was confirmed, and what the config and
        the served JWKS make of it now (an issuer or extra field changed).
        """
        publisher = self.config.publishers[name]
        disc = self.config.discovery.get(name)
        try:
            served = publisher.fetch()
            if served is None or dict(served.headers) != publisher.headers_for(served.body):
                return False
            if disc is None:
                return served.digest() == sha256
            doc = disc.publisher.fetch()
        except PublishError:
            return False
        return (
            doc is not None
            and doc.body == disc.document(served.body)
            and dict(doc.headers) == disc.publisher.headers_for(doc.body)
            and discovery.pair_digest(served, doc) == sha256
        )

    def probe_edges(self, state: State, now: datetime) -> tuple[State, list[dict[str, Any]]]:
        """Probe every configured edge (keymgr.probes) and record what changed."""
        state = transitions.edges_configured(state, self.config.edge_urls())
        events: list[dict[str, Any]] = []
        for name, results in probe_all(self.config.edges).items():
            for r in results:
                before = state.edge(name, r.url)
                state, evs = transitions.edge_observed(state, name, r.url, r.kids, now, r.error)
                events.extend(evs)
                if self.on_probe is not None:
                    self.on_probe(name, r, before, state)
        return state, events

    def managed_publishers(self) -> list[str]:
        names = publishers_in_use(self.config.policies)
        names.extend(p for p in self.config.publishers if p not in names)
        return names

    def plan(self, state: State, now: datetime) -> Plan:
        with self._plan_lock:
            return plan(
                state,
                self.config.policies,
                now,
                self.config.publishers,
                self.config.edge_urls(),
                self._plan_memo,
            )

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
            if self.audit.imported:
                # The file log this load imported into the store: recorded by
                # the first commit after it, as `keymgr audit import` does.
                now = pass_time(clock, state)
                imported = [{**e, "ts": now} for e in self.audit.imported]
                try:
                    state, token = self.commit(state, imported, token)
                    result.events.extend(state.audit.outbox)
                    self.audit.imported.clear()
                except ConflictError:
                    state, token = self.load()  # another writer: recorded next pass
            state = self.observe(state)
            if self.config.edges or state.edges:
                state, token = self.record_edges(state, token, clock, result)
            failed: set[Action] = set()
            planned: tuple[State, datetime] | None = None
            for _ in range(MAX_WAVES):
                now = pass_time(clock, state)
                p = self.plan(state, now)
                result.plan = p
                planned = (state, now)
                wave = [a for a in p.due if a not in failed]
                if not wave:
                    break
                # Publishers first, against the state the planner saw.
                wave.sort(key=lambda a: 0 if isinstance(a, Publish) else 1)
                events: list[dict[str, Any]] = []
                # Everything that can refuse the state runs before any commit or write.
                for pub, err in self.vet(state, wave):
                    wave.remove(pub)
                    failed.add(pub)
                    result.failures.append(str(err))
                    result.failed.append((pub, err))
                    events.append(self.failure_event(pub, err, now))
                self.check_unknown_before_bootstrap(state, wave)
                gens = [a for a in wave if isinstance(a, Generate)]
                if gens:
                    try:
                        state, token, refused = self.open_intents(state, gens, now, token)
                    except ConflictError:
                        state, token = self.load()
                        state = self.observe(state)
                        continue
                    for gen, err in refused:
                        wave.remove(gen)
                        failed.add(gen)
                        result.failures.append(str(err))
                        result.failed.append((gen, err))
                        events.append(self.failure_event(gen, err, now))
                new = state
                for action in wave:
                    try:
                        new, evs = self.execute(new, state, action, now)
                        events.extend(evs)
                    except StateError:
                        raise  # the state cannot be acted on: commit nothing
                    except KeymgrError as e:
                        failed.add(action)
                        result.failures.append(str(e))
                        result.failed.append((action, e))
                        if isinstance(action, Publish):
                            # The write may have landed: what it held counts
                            # as served there until a publish is confirmed.
                            asked = desired_keys(state, self.config.policies, action.publisher)
                            new = transitions.publisher_unconfirmed(
                                new, action.publisher, frozenset(k.kid for k in asked)
                            )
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
            now = pass_time(clock, state)
            # The last plan already is this one when nothing changed since (the
            # steady state): planning 10,000 rings twice per pass is waste.
            if planned is None or planned[0] is not state or planned[1] != now:
                result.plan = self.plan(state, now)
        return result

    def record_edges(
        self, state: State, token: Token, clock: Callable[[], datetime], result: PassResult
    ) -> tuple[State, Token]:
        """Probe the edges and commit what changed at once: a kid's time at an
        edge must survive to the next pass, planned on or not."""
        now = pass_time(clock, state)
        probed, events = self.probe_edges(state, now)
        if probed == state:
            return state, token
        try:
            new, token = self.commit(probed, events, token)
        except ConflictError:
            return self.load()  # another writer won: probe again next pass
        result.events.extend(new.audit.outbox)
        for ev in new.audit.outbox:
            fields = {f: ev[f] for f in LOG_FIELDS if ev.get(f) is not None}
            (log.warning if ev["event"] == "edge.unreachable" else log.info)(ev["event"], **fields)
        return new, token

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
            # Never dated before the newest recorded time: the log's times
            # stay in order (audit show seeks by them), whatever the clock did.
            floor = state.clock
            dated = [
                {**e, "ts": floor} if floor is not None and e.get("ts") is not None
                and e["ts"] < floor else e
                for e in [*self.audit.imported, *events]
            ]
            try:
                self.commit(state, dated, token)
                self.audit.imported.clear()
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
        if isinstance(action, Forget):
            return transitions.forget(state, action.ring, action.kid, now)
        if isinstance(action, DropTombstone):
            return transitions.drop_tombstone(state, action.ring, action.kid, now)
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
        # The keys were vetted against their backends before the wave (vet()).
        keys = desired_keys(seen, self.config.policies, name)
        publisher = self.config.publishers[name]
        data = jwks.encode(jwks.document(keys))
        rec = state.publishers.get(name)
        # An earlier write that was never confirmed may still land (a lagging
        # or retried request): write again even if the target already shows
        # these bytes, so the last write is ours.
        force = rec is not None and bool(rec.asked)
        written = publisher.publish(data, force=force)
        served = Served(data, publisher.headers_for(data))
        digest = served.digest()
        disc = self.config.discovery.get(name)
        if disc is not None:
            # The discovery document only once the JWKS it points to is
            # confirmed: it then advertises exactly the algorithms of that
            # JWKS. A new algorithm is advertised only after its key is
            # served; a gone one is dropped only after its last key left
            # (docs/issuer.md#consistency). Both confirmed, or the publish
            # fails (no promotion) and the next pass writes both again.
            doc = disc.document(data)
            written = disc.publisher.publish(doc, force=force) or written
            digest = discovery.pair_digest(served, Served(doc, disc.publisher.headers_for(doc)))
        crashpoint("publish.before_commit")
        return transitions.publisher_confirmed(
            state, name, digest, frozenset(k.kid for k in keys), now, written
        )

    def vet(self, seen: State, wave: list[Action]) -> list[tuple[Publish, KeymgrError]]:
        """Check every key the wave's publishes would add, before any of them writes.

        Only a key verifiers cannot already fetch from a target needs its
        backend's word: a backend outage blocks adding keys, never removing
        them. A target that cannot be read counts as serving nothing (every
        key is checked). A key its backend does not vouch for stops the whole
        pass (StateError) before anything is written anywhere; a backend that
        cannot answer fails that publish only (returned).
        """
        failed: list[tuple[Publish, KeymgrError]] = []
        for action in wave:
            if not isinstance(action, Publish):
                continue
            keys = desired_keys(seen, self.config.policies, action.publisher)
            try:
                current = self.config.publishers[action.publisher].fetch()
            except PublishError:
                current = None
            served = jwks.served_keys(current.body if current is not None else None)
            # A key the target serves that state does not record at all was
            # forgotten by the state (lost, restored from an old copy, entry
            # deleted): unpublishing it could reject live tokens. Refuse. A
            # destroyed key's tombstone is known: a copy of an old document
            # brought it back, and it leaves the document like any destroyed key.
            # A target that cannot be read may still serve what its record last
            # confirmed or asked for: those kids count as served here (a write
            # may succeed where the read failed).
            maybe_served = set(served)
            rec = seen.publishers.get(action.publisher)
            if current is None and rec is not None:
                maybe_served |= rec.kids | rec.asked
            wanted = {k.kid for k in keys}
            forgotten = sorted(
                k
                for k in maybe_served
                if k not in wanted and seen.find(k) is None and seen.find_forgotten(k) is None
            )
            if forgotten:
                raise StateError(
                    f"state {self.store.url}: publisher {action.publisher} serves "
                    f"{len(forgotten)} key(s) that state does not record "
                    f"({', '.join(forgotten[:3])}{', ...' if len(forgotten) > 3 else ''}); "
                    "refusing to unpublish them: "
                    "restore the state, or take each key over with 'keymgr adopt RING KID "
                    "--as retired' (or remove them from the target if they are not keymgr's)"
                )
            try:
                self.check_keys(seen, [k for k in keys if served.get(k.kid) != jwks.jwk_for(k)])
            except StateError:
                raise
            except KeymgrError as e:
                failed.append((action, e))
        return failed

    def check_keys(self, state: State, keys: list[Key]) -> None:
        """Publish no key whose public half its backend does not vouch for.

        The state says which keys to publish, but anyone who can write the
        state could add an entry with their own public key (and a correct
        thumbprint). Before a key is added to a document, its backend must
        hold it with exactly that public key; the answer is kept for the life
        of the process (a key's public half never changes).
        """
        for key in keys:
            found = state.find(key.kid)
            ring = found[0].name if found is not None else ""
            cache = (key.backend, ring, key.kid)
            if self._backend_jwks.get(cache) == key.public_jwk:
                continue
            try:
                jwk = self.backend(key.backend).public_jwk(ring, key.kid)
            except KeyNotFoundError:
                raise StateError(
                    f"state {self.store.url}: ring {ring}: key {key.kid}: backend "
                    f"{key.backend} does not hold this key; refusing to publish it "
                    "(state edited?)"
                ) from None
            if jwk != key.public_jwk:
                raise StateError(
                    f"state {self.store.url}: ring {ring}: key {key.kid}: public_jwk differs "
                    f"from the key backend {key.backend} holds; refusing to publish it "
                    "(state edited?)"
                )
            self._backend_jwks[cache] = jwk

    def open_intents(
        self, state: State, gens: list[Generate], now: datetime, token: Token
    ) -> tuple[State, Token, list[tuple[Generate, KeymgrError]]]:
        """Commit a write-ahead intent for each ring about to generate a key.

        Before that, each ring's backend is asked which keymgr keys it holds:
        any the state does not record and no open intent accounts for stops
        the pass here, before anything is written (see :meth:`orphans`). A
        backend that cannot answer fails that ring's generate (returned, for
        the pass to record as a failure like any other). A ring whose intent
        is still open (an earlier attempt failed or crashed) keeps it, so the
        keys that attempt may have made stay recognisable as its orphans.
        """
        new = state
        refused: list[tuple[Generate, KeymgrError]] = []
        for g in gens:
            pol = self.config.policies[g.ring]
            try:
                self.orphans(state, g.ring, pol.backend)
            except StateError:
                raise
            except KeymgrError as e:
                refused.append((g, e))
                continue
            intent = state.intents.get(g.ring)
            if intent is not None and intent.backend == pol.backend and intent.alg == pol.algorithm:
                continue
            # Only the algorithm changed (a migration) while an attempt was
            # open: keep its nonce, so the key that attempt may have left is
            # still recognised as its orphan (and destroyed by generate, as it
            # no longer fits), not taken for a key the state never knew.
            same_backend = intent is not None and intent.backend == pol.backend
            nonce = intent.nonce if intent is not None and same_backend else secrets.token_hex(8)
            new = transitions.open_intent(new, g.ring, nonce, pol.backend, pol.algorithm, now)
        if new is state:
            return state, token, refused
        state, token = self.commit(new, [], token)
        return state, token, refused

    def check_unknown_before_bootstrap(self, state: State, wave: list[Action]) -> None:
        """Before a ring without a signer promotes at once (bootstrap, replace),
        make sure no backend holds keymgr keys of that ring that state does not
        know: a state whose active entry was deleted or lost would otherwise
        promote a fresh key at once while verifiers still need the old one."""
        rings = {a.ring for a in wave if isinstance(a, Promote) and a.retire is None}
        # A ring that has keys but no signer is either bootstrapping (its first
        # key not yet confirmed) or missing its signer's entry: either way the
        # backends must hold no keymgr key of it that state does not know.
        if any(isinstance(a, Publish) for a in wave):
            rings.update(
                name
                for name in self.config.policies
                if (r := state.rings.get(name)) is not None and r.keys and r.active is None
            )
        for ring in sorted(rings):
            try:
                self.orphans(state, ring, self.config.policies[ring].backend)
            except StateError:
                raise
            except KeymgrError:
                # A backend that cannot answer now: the actions that need it
                # fail on their own and are recorded; the check runs again.
                continue

    def orphans(self, state: State, ring: str, backend_name: str) -> list[str]:
        """Keys of ``ring`` in the backend that state does not record and that
        carry the ring's open intent: crash orphans, safe to adopt or destroy.

        Any other unrecorded keymgr key means the state does not describe the
        backend (lost, replaced by an old copy, mistyped URL, edited): that is
        refused with a StateError, and such a key is never destroyed. A kid
        the ring keeps a tombstone of is recorded: the leftover of a key it
        destroyed (a pending deletion, a restored copy), neither foreign nor
        an orphan, so never adopted (keymgr.planner.TOMBSTONE_KEEP).
        """
        known = state.ring(ring).known_kids()
        intent = state.intents.get(ring)
        orphans: list[str] = []
        unknown: list[str] = []
        # Every configured backend, not only the ring's own: a ring moved to
        # another backend left its earlier keys in the old one.
        for name in sorted(self.config.backends, key=lambda n: n != backend_name):
            backend = self.config.backends[name]
            try:
                unrecorded = sorted(kid for kid in backend.list_keys(ring) if kid not in known)
            except StateError:
                raise
            except KeymgrError as e:
                raise BackendError(f"backend {name}: list keys of ring {ring}: {e}") from None
            nonce = intent.nonce if intent is not None and intent.backend == name else None
            for kid in unrecorded:
                mark = backend.intent_of(ring, kid) if nonce is not None else None
                if mark is not None and mark == nonce and name == backend_name:
                    orphans.append(kid)
                else:
                    unknown.append(kid)
        if unknown:
            raise StateError(
                f"ring {ring}: backend(s) {', '.join(sorted(self.config.backends))} hold "
                f"{len(unknown)} keymgr key(s) that "
                f"state {self.store.url} does not record ({', '.join(unknown[:3])}"
                f"{', ...' if len(unknown) > 3 else ''}): the state was lost, replaced or "
                "edited; restore it, or take each key over with 'keymgr adopt "
                f"{ring} KID --as active|retired|expired'"
            )
        return orphans

    def generate(
        self, state: State, action: Generate, now: datetime
    ) -> tuple[State, list[dict[str, Any]]]:
        pol = self.config.policies[action.ring]
        backend = self.backend(pol.backend)
        events: list[dict[str, Any]] = []
        adopted = False
        for kid in self.orphans(state, action.ring, pol.backend):
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
                        "reason": "created by an interrupted run (its intent), not recorded",
                    }
                )
        if adopted:
            return state, events
        intent = state.intents.get(action.ring)
        gen = backend.generate(
            action.ring, pol.algorithm, intent=intent.nonce if intent is not None else None
        )
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
