"""Model-based tests of the real reconciler over months of simulated time.

The system under test is :class:`keymgr.reconciler.Reconciler` itself, wired as
``keymgr.manager`` wires it, over the in-memory plug-ins of
:mod:`keymgr.testing.memory` (real keys, real JWKS bytes, a real audit log).

The world
    Simulated time moves in random steps (seconds to weeks). The daemon wakes
    when its last pass said the next transition is due (``plan.next_at``),
    every ``reconcile_interval``, and after a failed pass with a backoff; at
    most ``MAX_WAKES`` times per step (beyond that it is not running until the
    step ends). Between wakes, rules make things go wrong: a publisher goes
    down, lags (a write is seen only after N reads) or is reverted to the
    document it served before (a stale deploy); a key backend goes down; the
    state document is lost, or edited (a key of an attacker's injected, a
    key's public JWK or kid replaced by an attacker's, a key's entry deleted)
    and later restored from a copy; the config changes (a publisher added to
    or dropped from a ring, a ring moved to another backend or algorithm);
    operators rotate, rotate --emergency and revoke through
    ``keymgr.transitions`` as ``KeyManager`` does.

The oracle (independent of the planner)
    An issuer signs tokens with each ring's active key as the state names it
    (as ``KeyManager.sign`` does), after every pass and whenever a rule says,
    with lifetimes L where L + skew <= G. Verifiers, each with its own JWKS
    cache lifetime C <= A and bound to one publisher of a ring, fetch at
    arbitrary times and whenever their cache is older than C; at every check
    each must accept every live token of its ring, its signature checked by
    PyJWT against the cached JWKS. The only exclusions are those docs/design.md#exclusions
    allows: the tokens of a revoked key; for A after a promotion forced by
    ``rotate --emergency`` or by revoking the signer, the new signer's tokens;
    and, for a document a revert (a hostile act) put on a publisher, the keys
    that were already in use when it was reverted (nothing can stop that: what
    is checked is what keymgr does next, e.g. promoting a key that document
    lacks). While the state is lost or edited, every pass must refuse it
    (StateError) and change nothing: no commit, no write, no key made or
    destroyed.

    After every step and every pass: every commit has at most one active key
    per ring, only legal transitions and exactly one audit event for each;
    ``AuditLog.verify`` accepts the log; every key the state records with
    private material is still in its backend; no published document holds a
    private member, or a key no backend made, or a key with another public
    JWK than its backend's; and no key the state ever recorded leaves its
    backend while a publisher serves it or a token it signed still lives.

``KEYMGR_MODEL_EXAMPLES=N`` runs N examples (default: sized for CI, ~30 s).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keymgr import jose, transitions
from keymgr.audit import AuditLog
from keymgr.config import Config, DaemonConfig
from keymgr.errors import BackendError, KeymgrError, StateError
from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    HAS_PRIVATE,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    State,
)
from keymgr.planner import Policy
from keymgr.reconciler import PassResult, Reconciler
from keymgr.testing.memory import (
    MemoryBackend,
    MemoryPublisher,
    MemoryStore,
    derive_private_key,
)
from keymgr.timefmt import parse_time

START = datetime(2030, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(weeks=1)

RINGS = ("r0", "r1", "r2")
PUBLISHERS = ("p0", "p1", "p2")
BACKENDS = ("b0", "b1")
ALGS = ("EdDSA", "ES256")
#: Daemon wake-ups per step at most (a bound on the test's cost; beyond it the
#: daemon is simply not running until the step ends).
MAX_WAKES = 12
#: First retry after a failed pass; doubles up to RETRY_MAX.
RETRY = 5 * MIN
RETRY_MAX = 6 * HOUR

#: Key-state changes a commit may record, and the one audit event each needs.
EVENT_FOR: dict[tuple[str | None, str], tuple[str, ...]] = {
    (None, PENDING): ("key.generated", "key.adopted"),
    (PENDING, PUBLISHED): ("key.published",),
    (PUBLISHED, ACTIVE): ("key.promoted",),
    (ACTIVE, RETIRED): ("key.retired",),
    (RETIRED, EXPIRED): ("key.expired",),
    (EXPIRED, DESTROYED): ("key.destroyed",),
    (REVOKED, DESTROYED): ("key.destroyed",),
    **{(s, REVOKED): ("key.revoked",) for s in (PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED)},
}
#: A destroyed key's record becomes a tombstone (``history`` passed), which is dropped later.
FORGET_EVENTS = ("key.forgotten", "key.tombstone_dropped")
TRANSITION_EVENTS = frozenset(e for names in EVENT_FOR.values() for e in names) | set(
    FORGET_EVENTS
)
#: What a published JWK may hold: key members and kid/alg/use, nothing else.
PUBLIC_MEMBERS = frozenset({"kty", "crv", "x", "y", "n", "e", "kid", "alg", "use"})


def _examples(default: int) -> int:
    """``KEYMGR_MODEL_EXAMPLES`` (run more locally), else ``default``."""
    return int(os.environ.get("KEYMGR_MODEL_EXAMPLES", default))


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """The reconciler logs every transition; thousands of passes need not print."""
    old = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        yield
    finally:
        structlog.configure(wrapper_class=old)


def _scratch_dir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="keymgr-model-", dir=base))


# --------------------------------------------------------------------------- verifier side


@dataclass
class Token:
    ring: str
    kid: str
    jws: str
    iat: datetime
    exp: datetime
    auto: bool  # signed by the issuer after a pass (a newer one replaces it)


@dataclass
class Verifier:
    name: str
    ring: str
    publisher: str
    cache_for: timedelta  # C <= A
    doc: bytes | None = None
    fetched_at: datetime | None = None
    #: Kids in use when the publisher was reverted, if the cached document came
    #: from that reverted target: their tokens may be rejected until it expires.
    tainted: frozenset[str] = frozenset()


_PYJWK: dict[str, Any] = {}
_VERDICTS: dict[tuple[str, bytes | None], str | None] = {}


def verdict(doc: bytes | None, token: str) -> str | None:
    """None if a verifier holding ``doc`` as its JWKS accepts ``token`` (signature,
    kid and alg; times are the world's business), else why not. PyJWT, not keymgr."""
    memo = (token, doc)
    if memo in _VERDICTS:
        return _VERDICTS[memo]
    out = _verdict(doc, token)
    if len(_VERDICTS) > 200_000:
        _VERDICTS.clear()
    _VERDICTS[memo] = out
    return out


def _verdict(doc: bytes | None, token: str) -> str | None:
    if doc is None:
        return "the publisher served no document"
    header = jwt.get_unverified_header(token)
    for jwk in json.loads(doc).get("keys", []):
        if jwk.get("kid") != header["kid"]:
            continue
        if jwk.get("alg") != header["alg"]:
            return f"JWK alg {jwk.get('alg')} but token alg {header['alg']}"
        raw = json.dumps(jwk, sort_keys=True)
        key = _PYJWK.get(raw)
        if key is None:
            key = _PYJWK[raw] = jwt.PyJWK.from_dict(jwk)
        try:
            jwt.decode(
                token,
                key.key,
                algorithms=[jwk["alg"]],
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidTokenError as e:
            return f"PyJWT rejects it: {e}"
        return None
    return "kid not in the cached JWKS"


def doc_kids(doc: bytes | None) -> set[str]:
    if doc is None:
        return set()
    return {str(j.get("kid")) for j in json.loads(doc).get("keys", [])}


# --------------------------------------------------------------------------- the world


@dataclass
class Fault:
    kind: str  # publisher-down | lag | backend-down
    target: str
    until: datetime


@dataclass
class Hostile:
    kind: str  # lost | tampered
    backup: bytes | None
    until: datetime
    detail: str = ""


@dataclass
class Snapshot:
    """What a refused pass must leave exactly as it was."""

    raw: bytes | None
    commits: int
    writes: dict[str, int]
    created: dict[str, int]
    destroyed: dict[str, int]

    def changes(self, after: Snapshot) -> list[str]:
        out = []
        if after.commits != self.commits:
            out.append(f"{after.commits - self.commits} state commit(s)")
        elif after.raw != self.raw:
            out.append("the state document rewritten")
        for what, label in (
            ("writes", "write(s) to"),
            ("created", "key(s) made in"),
            ("destroyed", "key(s) destroyed in"),
        ):
            old, new = getattr(self, what), getattr(after, what)
            out.extend(f"{new[n] - old[n]} {label} {n}" for n in new if new[n] != old[n])
        return out


@dataclass
class World:
    policies: dict[str, Policy]
    publishers: dict[str, MemoryPublisher]
    backends: dict[str, MemoryBackend]
    skew: timedelta
    interval: timedelta
    verifiers: list[Verifier]
    dir: Path
    now: datetime = START
    store: MemoryStore = field(default_factory=MemoryStore)
    tokens: list[Token] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    hostile: Hostile | None = None
    next_wake: datetime = START
    failed_passes: int = 0
    last_result: PassResult | None = None
    # What the state ever said, from its commits.
    recorded: dict[str, tuple[str, str]] = field(default_factory=dict)  # kid -> (ring, backend)
    last_state: State = field(default_factory=State)
    seen_commits: int = 0
    seen_writes: dict[str, int] = field(default_factory=dict)
    # Exclusions (docs/design.md#exclusions) and the facts they rest on.
    revoked: set[str] = field(default_factory=set)
    disrupted: set[str] = field(default_factory=set)  # rings whose next promotion is forced
    hasty_until: dict[str, datetime] = field(default_factory=dict)
    active_seen: dict[str, str] = field(default_factory=dict)  # ring -> kid
    reverted: dict[str, tuple[bytes | None, frozenset[str]]] = field(default_factory=dict)
    # Every key any backend made: kid -> public JWK (what a published key must be).
    made: dict[str, dict[str, str]] = field(default_factory=dict)
    passes: int = 0
    refusals: int = 0
    serial: int = 0

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.dir / "audit.jsonl")
        self.reconciler = self._reconciler()
        for b in self.backends.values():
            b.before_destroy = self._before_destroy(b)

    # -- wiring ------------------------------------------------------------------

    def config(self) -> Config:
        return Config(
            path=self.dir / "keymgr.toml",
            daemon=DaemonConfig(
                state=self.store.url,
                audit_log=self.dir / "audit.jsonl",
                reconcile_interval=self.interval,
                listen=("127.0.0.1", 0),
                log_level="info",
                lease_ttl=timedelta(seconds=30),
            ),
            backends=dict(self.backends),
            publishers=dict(self.publishers),
            policies=dict(self.policies),
            cache_control={p: None for p in self.publishers},
        )

    def _reconciler(self) -> Reconciler:
        return Reconciler(self.config(), self.store, self.audit, "daemon")

    def reconfigure(self, ring: str, **changes: Any) -> None:
        """A config reload (SIGHUP): a new reconciler, and a pass at once."""
        self.policies[ring] = replace(self.policies[ring], **changes)
        self.reconciler = self._reconciler()
        self.wake()

    def clock(self) -> datetime:
        return self.now

    # -- faults ---------------------------------------------------------------------

    def fault(self, kind: str, target: str, duration: timedelta, lag: int = 0) -> None:
        self.faults = [f for f in self.faults if (f.kind, f.target) != (kind, target)]
        self.faults.append(Fault(kind, target, self.now + duration))
        if kind == "publisher-down":
            self.publishers[target].down = True
        elif kind == "lag":
            self.publishers[target].lag = lag
        elif kind == "backend-down":
            self.backends[target].down = True

    def end_faults(self) -> None:
        for f in [f for f in self.faults if f.until <= self.now]:
            self.faults.remove(f)
            if f.kind == "publisher-down":
                self.publishers[f.target].down = False
            elif f.kind == "lag":
                self.publishers[f.target].lag = 0
            elif f.kind == "backend-down":
                self.backends[f.target].down = False
        if self.hostile is not None and self.hostile.until <= self.now:
            self.restore()

    def fault_ends(self) -> list[datetime]:
        ends = [f.until for f in self.faults]
        if self.hostile is not None:
            ends.append(self.hostile.until)
        return ends

    def backend_down(self) -> bool:
        return any(b.down for b in self.backends.values())

    def revert(self, p: str) -> None:
        """A stale deploy puts back the document served before the last write."""
        pub = self.publishers[p]
        pub.revert()
        self.reverted[p] = (pub.peek(), frozenset(self.in_use()))

    def in_use(self) -> set[str]:
        """Kids verifiers rely on right now: every signer, every live token's key."""
        kids = {t.kid for t in self.tokens if self.live(t)}
        state = self.last_state
        kids.update(r.active.kid for r in state.rings.values() if r.active is not None)
        return kids

    # -- hostile acts on the state ----------------------------------------------------

    def lose(self, duration: timedelta) -> None:
        self.hostile = Hostile("lost", self.store.raw, self.now + duration)
        self.store.lose()

    def tamper(self, how: str, ring: str, pick: int, duration: timedelta) -> None:
        backup = self.store.raw
        state = self.store.load()[0]
        pol = self.policies[ring]
        self.serial += 1
        seed = f"attacker-{self.serial}".encode()
        attacker = derive_private_key(pol.algorithm, seed)
        jwk = jose.public_jwk(attacker.public_key())
        kid = jose.thumbprint(jwk)
        victims = [
            k for k in state.ring(ring).keys if k.state in (PENDING, PUBLISHED, ACTIVE, RETIRED)
        ]
        if how != "inject" and not victims:
            how = "inject"
        if how == "inject":
            kind = (PENDING, PUBLISHED, RETIRED)[pick % 3]
            detail = f"inject a {kind} key {kid} of the attacker's into {ring}"

            def edit(doc: dict[str, Any]) -> None:
                t = doc["clock"]
                entry = {
                    "kid": kid,
                    "alg": pol.algorithm,
                    "backend": pol.backend,
                    "state": kind,
                    "created_at": t,
                    "published_at": t if kind != PENDING else None,
                    "activated_at": t if kind == RETIRED else None,
                    "retired_at": t if kind == RETIRED else None,
                    "expired_at": None,
                    "destroyed_at": None,
                    "revoked_at": None,
                    "reason": None,
                    "public_jwk": jwk,
                }
                rings = doc.setdefault("rings", {})
                rings.setdefault(ring, {"keys": [], "rotate_at": None, "emergency": False})
                rings[ring]["keys"].append(entry)

        elif how == "forget":
            victim = victims[pick % len(victims)]
            detail = f"delete the entry of {victim.state} key {victim.kid} from {ring}"

            def edit(doc: dict[str, Any]) -> None:
                keys = doc["rings"][ring]["keys"]
                keys[:] = [e for e in keys if e["kid"] != victim.kid]

        else:
            victim = victims[pick % len(victims)]
            if jose.alg_family(victim.alg) != jose.alg_family(pol.algorithm):
                attacker = derive_private_key(victim.alg, seed)
                jwk = jose.public_jwk(attacker.public_key())
                kid = jose.thumbprint(jwk)
            keep_kid = how == "swap-jwk"
            detail = (
                f"replace the public key of {victim.state} {victim.kid} in {ring} "
                f"with the attacker's{' (kid kept)' if keep_kid else f' (kid {kid})'}"
            )

            def edit(doc: dict[str, Any]) -> None:
                for entry in doc["rings"][ring]["keys"]:
                    if entry["kid"] == victim.kid:
                        entry["public_jwk"] = jwk
                        if not keep_kid:
                            entry["kid"] = kid

        self.store.tamper(edit)
        self.hostile = Hostile("tampered", backup, self.now + duration, detail)

    def restore(self) -> None:
        """The operator restores the state document from the copy taken before."""
        assert self.hostile is not None
        self.store.restore(self.hostile.backup)
        self.hostile = None

    def expect_refusal(self) -> bool:
        if self.hostile is None:
            return False
        if self.hostile.kind == "tampered":
            return True
        # A lost state may start afresh only when no backend holds any key.
        return any(b.held() for b in self.backends.values())

    # -- the daemon ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            raw=self.store.raw,
            commits=len(self.store.history),
            writes={n: len(p.writes) for n, p in self.publishers.items()},
            created={n: len(b.created) for n, b in self.backends.items()},
            destroyed={n: len(b.destroyed) for n, b in self.backends.items()},
        )

    def wake(self) -> None:
        """One daemon pass at ``now``, then the issuer signs and verifiers check."""
        before = self.snapshot()
        refused: KeymgrError | None = None
        result: PassResult | None = None
        try:
            result = self.reconciler.run(self.clock)
        except StateError as e:
            refused = e
        except BackendError as e:
            if not self.backend_down():
                raise
            refused = e
        self.passes += 1
        if self.expect_refusal():
            assert self.hostile is not None
            assert refused is not None, (
                f"the state was {self.hostile.kind} ({self.hostile.detail or 'document gone'}) "
                f"but the pass at {self.now} went ahead and did: "
                f"{_describe(result.events if result else [])}"
            )
            changed = before.changes(self.snapshot())
            assert not changed, (
                f"the pass at {self.now} refused the {self.hostile.kind} state ({refused}) "
                f"but not before it made {', '.join(changed)}"
            )
            self.refusals += 1
        elif isinstance(refused, StateError):
            raise AssertionError(f"a sound state was refused at {self.now}: {refused}")
        self.last_result = result
        self.after_commits()
        self.schedule(result)
        if result is not None and result.ok and self.hostile is None:
            self.check_settled(result)
        self.issue_all()
        self.check()

    def schedule(self, result: PassResult | None) -> None:
        nxt = self.now + self.interval
        if result is not None and result.plan is not None:
            at = result.plan.next_at
            if at is not None:
                nxt = min(nxt, at)
        if result is None or not result.ok:
            self.failed_passes += 1
            nxt = min(nxt, self.now + min(RETRY * 2 ** min(self.failed_passes - 1, 8), RETRY_MAX))
        else:
            self.failed_passes = 0
        self.next_wake = max(nxt, self.now + SEC)

    def check_settled(self, result: PassResult) -> None:
        """A pass without failures leaves nothing due and every ring a signer."""
        assert result.plan is not None
        assert not result.plan.due, f"a clean pass at {self.now} left {result.plan.due} due"
        nxt = result.plan.next_at
        assert nxt is None or nxt > self.now, f"next_at {nxt} is not after the pass at {self.now}"
        state = self.store.load()[0]
        for ring in self.policies:
            assert state.ring(ring).active is not None, (
                f"ring {ring} has no active key after a clean pass at {self.now}"
            )

    def advance(self, dt: timedelta) -> None:
        end = self.now + dt
        wakes = 0
        while True:
            self.end_faults()
            if wakes < MAX_WAKES and self.next_wake <= self.now:
                self.wake()
                wakes += 1
                continue
            later = [t for t in [end, *self.fault_ends()] if t > self.now]
            if wakes < MAX_WAKES and self.next_wake > self.now:
                later.append(self.next_wake)
            if self.now >= end or not later:
                break
            self.now = min(later)

    # -- operators (as KeyManager: mutate under the store's lock, commit, reconcile) --------

    def mutate(self, fn: Callable[[State, datetime], transitions.Result]) -> None:
        with self.store.exclusive():
            state, token = self.reconciler.load()
            new, events = fn(state, self.now)
            self.reconciler.commit(new, events, token)
        self.after_commits()
        self.wake()

    def rotate(self, ring: str, emergency: bool) -> None:
        if self.store.load()[0].ring(ring).active is None:
            return  # KeyManager.rotate refuses: no active key yet
        if emergency:
            self.disrupted.add(ring)
        self.mutate(lambda s, at: transitions.request_rotation(s, ring, at, emergency))

    def revoke(self, kid: str) -> None:
        state = self.store.load()[0]
        found = state.find(kid)
        assert found is not None
        ring, key = found
        self.revoked.add(kid)
        if key.state == ACTIVE:
            self.disrupted.add(ring.name)
        self.mutate(lambda s, at: transitions.revoke(s, kid, at, "compromised"))

    # -- the issuer ------------------------------------------------------------------------

    def issue(self, ring: str, lifetime: timedelta, auto: bool = False) -> None:
        """Sign as KeyManager.sign: the ring's active key as the state names it."""
        try:
            state = self.store.load()[0]
        except KeymgrError:
            return
        key = state.ring(ring).active
        backend = self.backends.get(key.backend) if key is not None else None
        if key is None or backend is None:
            return
        self.serial += 1
        iat = self.now
        exp = iat + lifetime
        claims = {
            "iss": "model",
            "sub": f"t{self.serial}",
            "iat": int(iat.timestamp()),
            "exp": int(exp.timestamp()),
        }
        try:
            signer = backend.signer(ring, key.kid, key.alg)
            header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
            jws = jose.encode_compact(header, claims, signer)
        except BackendError:
            return  # the backend is down (or does not hold the key: see check_backends)
        if auto:
            self.tokens = [t for t in self.tokens if not (t.auto and t.kid == key.kid)]
        self.tokens.append(Token(ring, key.kid, jws, iat, exp, auto))

    def issue_all(self) -> None:
        self.tokens = [t for t in self.tokens if self.now < t.exp + self.skew]
        for ring, pol in self.policies.items():
            self.issue(ring, pol.retire_grace - self.skew, auto=True)

    def live(self, t: Token) -> bool:
        return t.iat <= self.now < t.exp + self.skew

    # -- verifiers -------------------------------------------------------------------------

    def fetch(self, v: Verifier) -> bool:
        pub = self.publishers[v.publisher]
        try:
            doc = pub.read()
        except KeymgrError:
            return False
        v.doc, v.fetched_at = doc, self.now
        rev = self.reverted.get(v.publisher)
        if rev is not None and pub.peek() == rev[0]:
            v.tainted = rev[1]
        else:
            v.tainted = frozenset()
            self.reverted.pop(v.publisher, None)
        return True

    def ready(self, p: str, ring: str) -> bool:
        """Could verifiers of ``ring`` switch to ``p`` now (it serves what is in use)?"""
        served = doc_kids(self.publishers[p].peek())
        need = {t.kid for t in self.tokens if t.ring == ring and self.live(t)}
        active = self.last_state.ring(ring).active  # as last committed: not a lost copy
        if active is not None:
            need.add(active.kid)
        return need <= served

    def check_verifiers(self) -> None:
        for v in self.verifiers:
            expired = v.fetched_at is None or self.now - v.fetched_at >= v.cache_for
            if expired and not self.fetch(v):
                continue  # cache expired and the publisher is down: not keymgr's doing
            for t in self.tokens:
                if t.ring != v.ring or not self.live(t) or t.kid in self.revoked:
                    continue
                if t.kid in v.tainted:
                    continue
                hasty = self.hasty_until.get(t.kid)
                if hasty is not None and self.now < hasty:
                    continue
                why = verdict(v.doc, t.jws)
                assert why is None, (
                    f"verifier {v.name} ({v.ring} via {v.publisher}, cache {v.cache_for}, "
                    f"fetched {v.fetched_at}) rejects a live token of {t.kid} at {self.now} "
                    f"(signed {t.iat}, expires {t.exp}): {why}; cached kids "
                    f"{sorted(doc_kids(v.doc))}"
                )

    # -- invariants ----------------------------------------------------------------------------

    def _before_destroy(self, backend: MemoryBackend) -> Callable[[str, str], None]:
        def probe(ring: str, kid: str) -> None:
            if kid not in self.recorded:
                return
            serving = [n for n, p in self.publishers.items() if kid in doc_kids(p.peek())]
            assert not serving, (
                f"key {kid} of {ring} destroyed in {backend.name} at {self.now} while "
                f"{serving} still serve it"
            )
            if kid in self.revoked:
                return
            live = [t for t in self.tokens if t.kid == kid and self.live(t)]
            assert not live, (
                f"key {kid} of {ring} destroyed at {self.now} while a token it signed at "
                f"{live[0].iat} lives until {live[0].exp + self.skew}"
            )

        return probe

    def after_commits(self) -> None:
        """Check every commit since the last look against the one before it."""
        history = self.store.history
        while self.seen_commits < len(history):
            doc = json.loads(history[self.seen_commits])
            self.seen_commits += 1
            doc.pop("version", None)
            new = State.from_dict(doc)
            check_commit(self.last_state, new, list(new.audit.outbox))
            self.last_state = new
            for ring in new.rings.values():
                for k in ring.keys:
                    self.recorded.setdefault(k.kid, (ring.name, k.backend))
        # Signers as they appear: a promotion forced by an emergency or a
        # revocation may be rejected by caching verifiers for up to A.
        for name, ring in self.last_state.rings.items():
            active = ring.active
            if active is None or self.active_seen.get(name) == active.kid:
                continue
            self.active_seen[name] = active.kid
            if name in self.disrupted:
                self.disrupted.discard(name)
                self.hasty_until[active.kid] = self.now + self.policies[name].publish_ahead

    def check_documents(self) -> None:
        for b in self.backends.values():
            for (_, kid), jwk in b.made.items():
                self.made.setdefault(kid, jwk)
        for name, p in self.publishers.items():
            start = self.seen_writes.get(name, 0)
            for data in p.writes[start:]:
                check_document(data, self.made, f"a write to {name}")
            self.seen_writes[name] = len(p.writes)
            check_document(p.peek(), self.made, f"the document {name} serves")

    def check_backends(self) -> None:
        for ring in self.last_state.rings.values():
            for k in ring.keys:
                if k.state in HAS_PRIVATE:
                    b = self.backends.get(k.backend)
                    assert b is not None and b.holds(ring.name, k.kid), (
                        f"state records {k.state} key {k.kid} of {ring.name} but backend "
                        f"{k.backend} no longer holds it"
                    )

    def check_audit(self) -> None:
        n = self.audit.verify(self.last_state.audit)
        assert n == self.last_state.audit.seq

    def check(self) -> None:
        self.check_documents()
        self.check_backends()
        self.check_verifiers()


def check_document(data: bytes | None, made: dict[str, dict[str, str]], what: str) -> None:
    """Public members only, and only keys a backend made, with their own public key."""
    if data is None:
        return
    doc = json.loads(data)
    for jwk in doc["keys"]:
        leaked = jose.PRIVATE_MEMBERS & set(jwk)
        assert not leaked, f"{what} holds private members {sorted(leaked)}"
        assert set(jwk) <= PUBLIC_MEMBERS, f"{what}: unexpected members {sorted(jwk)}"
        kid = jwk.get("kid")
        assert kid in made, f"{what} publishes {kid}, a key no backend made (forged)"
        members = {k: v for k, v in jwk.items() if k not in ("kid", "alg", "use")}
        assert members == made[kid], f"{what} publishes {kid} with another public key"


def check_commit(before: State, after: State, events: list[dict[str, Any]]) -> None:
    """One commit: legal transitions only, each with exactly one audit event; no
    key or ring vanishes (a destroyed key becomes a tombstone, a tombstone is
    dropped, each with its event); at most one active key per ring."""
    want: Counter[tuple[str, str]] = Counter()
    allowed: dict[tuple[str, str], tuple[str, ...]] = {}
    for name in before.rings:
        assert name in after.rings, f"ring {name} vanished from state"
    for name, ring in after.rings.items():
        actives = ring.in_state(ACTIVE)
        assert len(actives) <= 1, f"ring {name} has {len(actives)} active keys"
        old = before.rings.get(name)
        old_keys = {k.kid: k for k in old.keys} if old is not None else {}
        gone = set(old_keys) - {k.kid for k in ring.keys}
        tombs = {t.kid for t in ring.forgotten}
        for kid in gone & tombs:
            assert old_keys[kid].state == DESTROYED, f"{kid} forgotten as {old_keys[kid].state}"
            allowed[(name, kid)] = FORGET_EVENTS[:1]
            want[(name, kid)] += 1
        assert not gone - tombs, f"keys {sorted(gone - tombs)} of {name} vanished from state"
        old_tombs = {t.kid for t in old.forgotten} if old is not None else set()
        assert not tombs & set(k.kid for k in ring.keys), f"{name}: a tombstone is also a key"
        assert tombs <= old_tombs | gone, f"{name}: tombstones {sorted(tombs)} out of nowhere"
        for kid in old_tombs - tombs:
            allowed[(name, kid)] = FORGET_EVENTS[1:]
            want[(name, kid)] += 1
        for k in ring.keys:
            prev = old_keys.get(k.kid)
            prev_state = prev.state if prev is not None else None
            if prev_state == k.state:
                continue
            names = EVENT_FOR.get((prev_state, k.state))
            assert names is not None, f"illegal transition of {k.kid}: {prev_state} -> {k.state}"
            allowed[(name, k.kid)] = names
            want[(name, k.kid)] += 1
    got: Counter[tuple[str, str]] = Counter()
    for ev in events:
        if ev["event"] not in TRANSITION_EVENTS:
            continue
        key = (ev.get("ring"), ev.get("kid"))
        assert key in allowed and ev["event"] in allowed[key], (
            f"audit event {ev['event']} for {key} matches no transition in its commit"
        )
        got[key] += 1
    assert got == want, f"transitions {dict(want)} but audit events {dict(got)}"


def _describe(events: list[dict[str, Any]]) -> str:
    parts = []
    for ev in events:
        bits = [str(ev.get("event"))]
        for f in ("ring", "kid", "publisher", "reason"):
            if ev.get(f) is not None:
                bits.append(f"{f}={ev[f]}")
        parts.append(" ".join(bits))
    return "; ".join(parts) or "nothing"


# --------------------------------------------------------------------------- strategies


def secs(lo: timedelta, hi: timedelta) -> st.SearchStrategy[timedelta]:
    return st.integers(int(lo.total_seconds()), int(hi.total_seconds())).map(
        lambda s: timedelta(seconds=s)
    )


@st.composite
def ring_policy(
    draw: st.DrawFn, ring: str, publishers: tuple[str, ...], min_period: timedelta = 6 * HOUR
) -> Policy:
    short = secs(min_period, 2 * DAY) if min_period < 2 * DAY else st.nothing()
    period = draw(st.one_of(short, secs(max(min_period, 2 * DAY), 60 * DAY)))
    ahead = draw(st.one_of(secs(MIN, min(period, HOUR)), secs(SEC, period)))
    grace = draw(st.one_of(secs(MIN, DAY), secs(SEC, 30 * DAY)))
    destroy_after = draw(st.one_of(st.just(timedelta(0)), secs(SEC, 30 * DAY)))
    pubs = draw(st.lists(st.sampled_from(publishers), min_size=1, max_size=2, unique=True))
    history = draw(st.one_of(st.just(timedelta(0)), secs(SEC, 60 * DAY), st.just(90 * DAY)))
    return Policy(
        history=history,
        ring=ring,
        backend=draw(st.sampled_from(BACKENDS)),
        algorithm=draw(st.sampled_from(ALGS)),
        rotation_period=period,
        publish_ahead=ahead,
        retire_grace=grace,
        destroy_after=destroy_after,
        publishers=tuple(pubs),
    )


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    pubs = PUBLISHERS[: draw(st.integers(1, 3))]
    rings = RINGS[: draw(st.integers(1, 3))]
    policies = {r: draw(ring_policy(r, pubs)) for r in rings}
    min_grace = min(p.retire_grace for p in policies.values())
    skew = min(draw(st.sampled_from([0, 1, 30, 300])) * SEC, min_grace // 2)
    skew = timedelta(seconds=int(skew.total_seconds()))
    interval = draw(st.sampled_from([30 * MIN, 6 * HOUR, DAY, WEEK]))
    verifiers = []
    for i in range(draw(st.integers(1, 4))):
        ring = draw(st.sampled_from(rings))
        pol = policies[ring]
        verifiers.append(
            Verifier(
                name=f"v{i}",
                ring=ring,
                publisher=draw(st.sampled_from(pol.publishers)),
                cache_for=cache_lifetime(pol, draw(st.integers(1, 100) | st.just(100))),
            )
        )
    return {
        "policies": policies,
        "publishers": pubs,
        "skew": skew,
        "interval": interval,
        "verifiers": verifiers,
    }


def cache_lifetime(pol: Policy, percent: int) -> timedelta:
    """C <= A: ``percent`` of A, in whole seconds, at least 1 s."""
    return max(SEC, timedelta(seconds=int(pol.publish_ahead.total_seconds()) * percent // 100))


#: Seconds to weeks.
steps = st.one_of(
    secs(SEC, MIN), secs(MIN, HOUR), secs(HOUR, DAY), secs(DAY, WEEK), secs(WEEK, 6 * WEEK)
)
#: A while: minutes to weeks.
outages = st.one_of(secs(MIN, 2 * HOUR), secs(2 * HOUR, 3 * DAY), secs(3 * DAY, 3 * WEEK))
indices = st.integers(0, 99)


# --------------------------------------------------------------------------- the machine


class ReconcilerModel(RuleBasedStateMachine):
    """Random worlds, faults, hostile acts, config changes and operators."""

    world: World

    @initialize(spec=worlds())
    def start(self, spec: dict[str, Any]) -> None:
        self.dir = _scratch_dir()
        self.world = World(
            policies=spec["policies"],
            publishers={p: MemoryPublisher(p) for p in spec["publishers"]},
            backends={b: MemoryBackend(b, seed=f"model-{b}".encode()) for b in BACKENDS},
            skew=spec["skew"],
            interval=spec["interval"],
            verifiers=spec["verifiers"],
            dir=self.dir,
        )
        self.world.wake()

    def teardown(self) -> None:
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------

    @property
    def rings(self) -> list[str]:
        return sorted(self.world.policies)

    def ring(self, i: int) -> str:
        return self.rings[i % len(self.rings)]

    def publisher(self, i: int) -> str:
        names = sorted(self.world.publishers)
        return names[i % len(names)]

    def calm(self) -> bool:
        return self.world.hostile is None

    # -- time ------------------------------------------------------------------------

    @rule(dt=steps)
    def time_passes(self, dt: timedelta) -> None:
        self.world.advance(dt)

    @rule()
    def until_the_daemon_wakes(self) -> None:
        """Exactly to the daemon's next wake-up (a promotion, an expiry, a retry)."""
        w = self.world
        w.advance(max(SEC, min(w.next_wake - w.now, 90 * DAY)))

    @rule(percent=st.integers(1, 99))
    def part_way_to_the_next_wake(self, percent: int) -> None:
        """Into the window before the daemon's next wake-up (a successor waiting
        for its promotion, a retry), where faults do the most harm."""
        w = self.world
        gap = int(min(w.next_wake - w.now, 90 * DAY).total_seconds())
        w.advance(timedelta(seconds=max(1, gap * percent // 100)))

    @rule()
    def reconcile_now(self) -> None:
        """An extra pass (the interval timer, a CLI reconcile)."""
        self.world.end_faults()
        self.world.wake()

    # -- issuer and verifiers -----------------------------------------------------------

    @rule(i=indices, percent=st.integers(1, 100) | st.just(100))
    def issue_token(self, i: int, percent: int) -> None:
        ring = self.ring(i)
        w = self.world
        room = int((w.policies[ring].retire_grace - w.skew).total_seconds())
        w.issue(ring, max(SEC, timedelta(seconds=room * percent // 100)))
        w.check_verifiers()

    @rule(i=st.integers(0, 6))
    def verifiers_fetch(self, i: int) -> None:
        """One verifier (or, for i beyond their number, all) fetches its JWKS now."""
        w = self.world
        for v in w.verifiers if i >= len(w.verifiers) else [w.verifiers[i]]:
            w.fetch(v)
        w.check_verifiers()

    @rule(i=indices, j=indices)
    def verifier_switches_publisher(self, i: int, j: int) -> None:
        """A verifier is pointed at another publisher of its ring that already
        serves every key in use (operators do not point verifiers at an empty one)."""
        w = self.world
        v = w.verifiers[i % len(w.verifiers)]
        pubs = w.policies[v.ring].publishers
        p = pubs[j % len(pubs)]
        if w.ready(p, v.ring):
            v.publisher = p

    @rule(i=indices, j=indices, percent=st.integers(1, 100) | st.just(100))
    def verifier_joins(self, i: int, j: int, percent: int) -> None:
        w = self.world
        if len(w.verifiers) >= 6:
            return
        ring = self.ring(i)
        pol = w.policies[ring]
        p = pol.publishers[j % len(pol.publishers)]
        if w.ready(p, ring):
            name = f"v{len(w.verifiers)}"
            w.verifiers.append(Verifier(name, ring, p, cache_lifetime(pol, percent)))

    # -- faults --------------------------------------------------------------------------

    @rule(i=indices, duration=outages)
    def publisher_down(self, i: int, duration: timedelta) -> None:
        self.world.fault("publisher-down", self.publisher(i), duration)

    @rule(i=indices, n=st.integers(1, 5), duration=outages)
    def publisher_lags(self, i: int, n: int, duration: timedelta) -> None:
        self.world.fault("lag", self.publisher(i), duration, lag=n)

    @rule(i=indices, seen=st.booleans())
    def publisher_reverted(self, i: int, seen: bool) -> None:
        """A stale deploy; ``seen``: its verifiers happen to fetch right then."""
        w = self.world
        p = self.publisher(i)
        w.revert(p)
        if seen:
            for v in w.verifiers:
                if v.publisher == p:
                    w.fetch(v)
        w.check_verifiers()

    @precondition(lambda self: self.calm())
    @rule(i=indices, duration=outages)
    def backend_down(self, i: int, duration: timedelta) -> None:
        self.world.fault("backend-down", BACKENDS[i % len(BACKENDS)], duration)

    # -- hostile acts on the state ----------------------------------------------------------

    @precondition(lambda self: self.calm() and not self.world.backend_down())
    @rule(duration=outages)
    def state_lost(self, duration: timedelta) -> None:
        w = self.world
        if not any(b.held() for b in w.backends.values()):
            return
        w.lose(duration)
        w.wake()  # the daemon notices at once (a pass is the first thing that reads it)

    @precondition(lambda self: self.calm() and not self.world.backend_down())
    @rule(
        how=st.sampled_from(["inject", "swap-jwk", "swap-kid", "forget"]),
        i=indices,
        pick=indices,
        duration=outages,
    )
    def state_tampered(self, how: str, i: int, pick: int, duration: timedelta) -> None:
        self.world.tamper(how, self.ring(i), pick, duration)
        self.world.wake()

    @precondition(lambda self: not self.calm())
    @rule()
    def state_restored(self) -> None:
        self.world.restore()
        self.world.wake()

    # -- config changes (a reload: new reconciler, a pass at once) -------------------------------

    @rule(i=indices, j=indices)
    def config_adds_publisher(self, i: int, j: int) -> None:
        ring, p = self.ring(i), self.publisher(j)
        pol = self.world.policies[ring]
        if p not in pol.publishers:
            self.world.reconfigure(ring, publishers=(*pol.publishers, p))

    @rule(i=indices, j=indices)
    def config_drops_publisher(self, i: int, j: int) -> None:
        w = self.world
        ring = self.ring(i)
        pol = w.policies[ring]
        if len(pol.publishers) < 2:
            return
        p = pol.publishers[j % len(pol.publishers)]
        rest = [q for q in pol.publishers if q != p]
        target = next((q for q in rest if w.ready(q, ring)), None)
        if target is None:
            return  # operators move verifiers first; no publisher is ready for them
        for v in w.verifiers:
            if v.ring == ring and v.publisher == p:
                v.publisher = target
        w.reconfigure(ring, publishers=tuple(rest))

    @rule(i=indices)
    def config_moves_ring_to_other_backend(self, i: int) -> None:
        ring = self.ring(i)
        pol = self.world.policies[ring]
        other = BACKENDS[(BACKENDS.index(pol.backend) + 1) % len(BACKENDS)]
        self.world.reconfigure(ring, backend=other)

    @rule(i=indices)
    def config_changes_algorithm(self, i: int) -> None:
        ring = self.ring(i)
        pol = self.world.policies[ring]
        other = ALGS[(ALGS.index(pol.algorithm) + 1) % len(ALGS)]
        self.world.reconfigure(ring, algorithm=other)

    # -- operators --------------------------------------------------------------------------------

    @precondition(lambda self: self.calm())
    @rule(i=indices, emergency=st.booleans())
    def operator_rotates(self, i: int, emergency: bool) -> None:
        self.world.rotate(self.ring(i), emergency)

    @precondition(lambda self: self.calm())
    @rule(i=indices)
    def operator_revokes(self, i: int) -> None:
        state = self.world.store.load()[0]
        keys = [k for r in state.rings.values() for k in r.keys]
        live = sorted(
            (k for k in keys if k.state not in (DESTROYED, REVOKED)),
            key=lambda k: (k.created_at, k.kid),
            reverse=True,
        )
        if live:
            # Newest first: the pending, published and active keys are the interesting ones.
            self.world.revoke(live[i % len(live)].kid)

    # -- after every step -----------------------------------------------------------------------

    @invariant()
    def everything_holds(self) -> None:
        if not hasattr(self, "world"):
            return
        w = self.world
        w.after_commits()
        w.check()
        w.check_audit()


ReconcilerModel.TestCase.settings = settings(
    max_examples=_examples(300),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
test_reconciler_model = ReconcilerModel.TestCase


# --------------------------------------------------------------------------- fixed scenarios


def make_world(
    policies: dict[str, Policy],
    verifiers: list[Verifier],
    interval: timedelta = DAY,
    skew: timedelta = timedelta(0),
) -> World:
    pubs = sorted({p for pol in policies.values() for p in pol.publishers})
    return World(
        policies=policies,
        publishers={p: MemoryPublisher(p) for p in pubs},
        backends={b: MemoryBackend(b, seed=f"fixed-{b}".encode()) for b in BACKENDS},
        skew=skew,
        interval=interval,
        verifiers=verifiers,
        dir=_scratch_dir(),
    )


def _policy(**kw: Any) -> Policy:
    base: dict[str, Any] = {
        "ring": "r0",
        "backend": "b0",
        "algorithm": "EdDSA",
        "rotation_period": DAY,
        "publish_ahead": HOUR,
        "retire_grace": DAY,
        "destroy_after": DAY,
        "publishers": ("p0",),
    }
    return Policy(**{**base, **kw})


def _keys(w: World, ring: str = "r0") -> dict[str, Any]:
    return {k.state: k for k in w.store.load()[0].ring(ring).keys}


def test_a_reverted_jwks_restarts_the_wait_for_promotion() -> None:
    """docs/design.md#invariant-2: the successor's A starts again once a document
    without it was served; a verifier that cached the reverted document at
    23:30 for A = 1 h still holds it at 00:00, when the successor would
    otherwise be promoted."""
    w = make_world({"r0": _policy()}, [Verifier("v0", "r0", "p0", HOUR)])
    try:
        w.wake()
        w.advance(w.next_wake - w.now)  # 23:00: the successor is generated and published
        successor = _keys(w)[PUBLISHED]
        w.advance(30 * MIN)
        w.revert("p0")  # a stale deploy puts back the document without the successor
        w.fetch(w.verifiers[0])
        assert successor.kid not in doc_kids(w.verifiers[0].doc)
        w.advance(3 * HOUR)  # the world checks every verifier at every wake
        promoted = w.store.load()[0].ring("r0").key(successor.kid)
        assert promoted is not None and promoted.activated_at is not None
        # Re-published at the first pass after the revert (00:00), then A.
        assert promoted.activated_at >= START + DAY + HOUR
        w.check_audit()
    finally:
        shutil.rmtree(w.dir, ignore_errors=True)


def test_a_lost_state_is_refused_and_nothing_is_destroyed() -> None:
    """docs/design.md#crash-safety: a missing state while the backend holds
    keymgr keys is refused, never treated as a fresh start; restored from a
    copy, the ring goes on as if nothing happened."""
    w = make_world({"r0": _policy()}, [Verifier("v0", "r0", "p0", HOUR)])
    try:
        w.wake()
        w.advance(w.next_wake - w.now + 10 * MIN)  # a successor waits for its promotion
        held = w.backends["b0"].held()
        assert len(held) == 2
        w.lose(DAY)
        w.wake()  # must refuse (StateError) and change nothing: the world asserts it
        w.advance(6 * HOUR)  # retries, all refused; the restore comes after a day
        assert w.backends["b0"].held() == held
        w.restore()
        w.advance(3 * DAY)
        assert w.refusals >= 2
        w.check_audit()
    finally:
        shutil.rmtree(w.dir, ignore_errors=True)


@settings(
    max_examples=max(8, _examples(0) // 50),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_undisturbed_rings_rotate_exactly_on_schedule(data: st.DataObject) -> None:
    """Nothing fails and nobody intervenes, for a year: every key signs for
    exactly P, is published exactly A before, expires G after it retires and
    is destroyed D after that (and every check of the model holds throughout)."""
    pubs = PUBLISHERS[: data.draw(st.integers(1, 3))]
    rings = RINGS[: data.draw(st.integers(1, 3))]
    policies = {r: data.draw(ring_policy(r, pubs, min_period=2 * WEEK)) for r in rings}
    verifiers = [
        Verifier(f"v{i}", r, p, max(SEC, policies[r].publish_ahead))
        for i, r in enumerate(rings)
        for p in policies[r].publishers[:1]
    ]
    w = make_world(policies, verifiers, interval=WEEK)
    try:
        w.wake()
        end = START + 365 * DAY
        while w.now < end:
            w.advance(min(w.next_wake, end) - w.now)
        w.check_audit()
        state = w.store.load()[0]
        # The keys the state forgot (``history``) are in the audit log for good.
        log = [json.loads(line) for line in (w.dir / "audit.jsonl").read_text().splitlines()]
        for name, pol in policies.items():
            ring = state.ring(name)
            keys = sorted(ring.keys, key=lambda k: k.created_at)
            made = [e for e in log if e["event"] == "key.generated" and e["ring"] == name]
            forgot = {e["kid"]: e for e in log if e["event"] == "key.forgotten"
                      and e["ring"] == name}
            if not forgot:
                assert keys[0].created_at == keys[0].activated_at == START
            assert len(made) >= 365 * DAY // pol.rotation_period
            assert {e["kid"] for e in made} == {k.kid for k in keys} | set(forgot)
            for e in forgot.values():  # each forgotten exactly ``history`` after destruction
                destroyed = parse_time(e["destroyed_at"])
                assert parse_time(e["ts"]) == destroyed + pol.history, e
            for prev, nxt in itertools.pairwise(keys):
                assert prev.activated_at is not None
                successor_at = prev.activated_at + pol.rotation_period
                assert nxt.created_at == nxt.published_at == successor_at - pol.publish_ahead
                if nxt.activated_at is not None:
                    assert nxt.activated_at == successor_at
                    assert prev.retired_at == successor_at
                if prev.expired_at is not None:
                    assert prev.retired_at is not None
                    assert prev.expired_at == prev.retired_at + pol.retire_grace
                if prev.destroyed_at is not None:
                    assert prev.expired_at is not None
                    assert prev.destroyed_at == prev.expired_at + pol.destroy_after
    finally:
        shutil.rmtree(w.dir, ignore_errors=True)
