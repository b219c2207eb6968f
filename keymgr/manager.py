"""``KeyManager``: the Python API, and what every CLI command goes through."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymgr import jose, jwks, transitions
from keymgr.audit import AuditLog
from keymgr.backend import Signer
from keymgr.config import Config, load_config
from keymgr.errors import KeymgrError, UsageError
from keymgr.model import ACTIVE, DESTROYED, PUBLISHED, REVOKED, State
from keymgr.reconciler import PassResult, Reconciler, cli_actor, pass_time
from keymgr.stores import StateStore, open_store
from keymgr.timefmt import format_time, utcnow

if TYPE_CHECKING:
    from keymgr.notify import Notifier
    from keymgr.planner import Plan


@dataclass(frozen=True)
class _SignCache:
    kid: str
    alg: str
    #: ``BASE64URL(header) "."``: the constant start of every signing input.
    prefix: bytes
    signer: Signer


_monotonic_ns = time.monotonic_ns


class KeyManager:
    """One configured keymgr: its state store, backends, publishers and audit log."""

    def __init__(self, config: Config, actor: str | None = None) -> None:
        self.config = config
        self.store: StateStore = open_store(config.daemon.state)
        self.audit = AuditLog.for_config(config, self.store)
        self.actor = actor or f"cli:{cli_actor()}"
        self.reconciler = Reconciler(config, self.store, self.audit, self.actor)
        self._sign_cache: dict[str, _SignCache] = {}
        # Store fingerprint the cache was built against, and until when
        # (time.monotonic_ns) it may be trusted without asking the store again.
        self._sign_fp: object = None
        self._sign_fresh_until = 0
        self._sign_window_ns = int(self.store.fingerprint_window * 1e9)
        self._sign_metrics: dict[str, tuple[Any, Any, Any]] = {}
        #: Set by the daemon (keymgr.metrics.Metrics) to count and time sign calls.
        self.metrics: Any = None
        #: ``[notify]``: fed by the audit log right after each append (keymgr.notify).
        self.notifier: Notifier | None = None
        if config.notify is not None:
            from keymgr.notify import Notifier

            self.notifier = Notifier(
                config.notify, metrics=lambda: self.metrics, stderr=self.actor != "daemon"
            )
            self.audit.on_append = self.notifier.submit

    @classmethod
    def from_config(cls, path: str | Path, actor: str | None = None) -> KeyManager:
        return cls(load_config(path), actor)

    def close(self, wait: float | None = None) -> None:
        """Stop notifying (``[notify]``): deliver what is queued for up to
        ``flush_timeout`` (blocking up to ``wait`` s, default ``flush_timeout``),
        then drop the rest. A process that exits does this by itself."""
        if self.notifier is not None:
            n = self.notifier
            n.close(n.settings.flush_timeout if wait is None else wait)

    # -- time ----------------------------------------------------------------

    def _clock(self, at: datetime | None, state: State) -> datetime:
        """``--at``, or the wall clock clamped to the newest time in state: events
        a command records never go back in time, as in a pass."""
        if at is None:
            return pass_time(utcnow, state)
        if state.clock is not None and at < state.clock:
            raise UsageError(
                f"--at {format_time(at)} is earlier than the newest time in state "
                f"({format_time(state.clock)}); time only moves forward"
            )
        return at

    def state(self) -> State:
        state = self.store.load()[0]
        self.reconciler.validate(state)
        return state

    def shown_state(self) -> State:
        """The state as ``status`` and ``plan`` show it: :meth:`state`, refused
        (AuditError, one line) when the audit log contradicts it, as the next
        pass would refuse it. A state put back from an older copy reads as a
        sound one, keys active that were retired since; the log, which went on
        past its anchor, is what tells (keymgr.audit.AuditLog.check_agrees).
        Nothing is written."""
        state = self.state()
        self.audit.check_agrees(state)
        return state

    def current_state(self) -> State:
        """The state as ``sign`` and the daemon's readiness use it: :meth:`state`,
        refused (AuditError, one line) when the audit log holds events past its
        anchor that the store does not anchor: a state older than the log (put
        back from an older copy) names as active a key that may have been
        retired since, and verifiers may already reject its tokens. A log that
        is missing, behind or damaged is not such a sign: the state is right,
        tokens go on, and the next pass refuses to commit on that log
        (keymgr.audit.AuditLog.check_current). Nothing is written."""
        state = self.state()
        self.audit.check_current(state)
        return state

    # -- reconcile -----------------------------------------------------------

    def reconcile(self, now: datetime | None = None) -> PassResult:
        """One pass. ``now`` replaces the clock (drills, tests) and stays fixed for the pass."""
        try:
            if now is None:
                # Sub-second precision: recorded times are floored, except the
                # ones gating promotion and expiry, which round up (transitions).
                return self.reconciler.run(lambda: datetime.now(UTC))
            fixed = now
            return self.reconciler.run(lambda: fixed, check=lambda st: self._clock(fixed, st))
        finally:
            # What this process just committed is seen by its next sign() at once.
            self._sign_fresh_until = 0

    def plan(self, now: datetime | None = None) -> dict[str, Any]:
        state = self.shown_state()
        at = self._clock(now, state)
        state = self.reconciler.observe(state)
        p = self.reconciler.plan(state, at)
        return {
            "at": format_time(at),
            "due": [_action_dict(a) for a in p.due],
            "upcoming": {
                ring: (
                    None
                    if u is None
                    else {"action": u.action, "kid": u.kid, "at": format_time(u.at)}
                )
                for ring, u in p.upcoming.items()
            },
        }

    # -- operator commands ---------------------------------------------------

    def _mutate(self, fn: Any, now: datetime | None) -> tuple[State, list[dict[str, Any]]]:
        with self.store.exclusive():
            state, token = self.reconciler.load()
            at = self._clock(now, state)
            new, events = fn(state, at)
            self.reconciler.commit(new, events, token)
            return new, events

    def rotate(self, ring: str, emergency: bool = False, now: datetime | None = None) -> PassResult:
        if ring not in self.config.policies:
            raise UsageError(
                f"unknown ring {ring!r} (configured: {', '.join(sorted(self.config.policies))})"
            )

        def fn(state: State, at: datetime) -> transitions.Result:
            if state.ring(ring).active is None:
                raise UsageError(f"ring {ring!r} has no active key yet; run 'keymgr reconcile'")
            return transitions.request_rotation(state, ring, at, emergency)

        _, events = self._mutate(fn, now)
        res = self.reconcile(now)
        if emergency:
            res = self._finish_emergency(ring, res, now)
        res.events[:0] = events
        return res

    def _finish_emergency(self, ring: str, res: PassResult, now: datetime | None) -> PassResult:
        """Make ``rotate --emergency`` return only once the new key signs.

        The pass that publishes the successor records ``published_at`` rounded
        up to the next second (so a scheduled promotion is never early), which
        leaves the emergency promotion due within that second, after the pass.
        Emergency means now: wait for that second (under 1 s; a drill's ``--at``
        never waits) and run one more pass. A successor that is not confirmed
        by every publisher is not promoted: the command then fails like the
        pass that could not publish it.
        """
        if not res.ok:
            return res
        r = self.state().ring(ring)
        waiting = [k for k in r.in_state(PUBLISHED) if r.emergency]
        if not waiting:
            return res
        at = max(k.published_at for k in waiting if k.published_at is not None)
        if now is None:
            delay = (at - datetime.now(UTC)).total_seconds()
            if delay > 0:
                time.sleep(min(delay, 1.0) + 0.001)
            more = self.reconcile()
        else:
            more = self.reconcile(max(now, at))
        more.events[:0] = res.events
        return more

    def revoke(
        self, kid: str, reason: str | None = None, now: datetime | None = None
    ) -> PassResult:
        def fn(state: State, at: datetime) -> transitions.Result:
            found = state.find(kid)
            if found is None and state.find_forgotten(kid) is not None:
                raise UsageError(f"key {kid} is already destroyed (only its tombstone is left)")
            if found is None:
                raise UsageError(f"unknown key id {kid!r}")
            if found[1].state in (DESTROYED, REVOKED):
                raise UsageError(f"key {kid} is already {found[1].state}")
            return transitions.revoke(state, kid, at, reason)

        _, events = self._mutate(fn, now)
        self._sign_cache.clear()
        self._sign_fresh_until = 0
        res = self.reconcile(now)
        res.events[:0] = events
        return res

    def adopt(
        self, ring: str, kid: str, as_state: str, now: datetime | None = None
    ) -> PassResult:
        """Take over a key the ring's backend holds but state does not record.

        The deliberate, audited counterpart of the refusal a pass gives when
        it finds such a key: its public key comes from the backend (and must
        hash to ``kid``), its lifecycle from the operator (``as_state``). It
        records the key and runs no pass: the next ``reconcile`` (or the
        daemon) goes on once every key the backend holds is known again.
        """
        if ring not in self.config.policies:
            raise UsageError(
                f"unknown ring {ring!r} (configured: {', '.join(sorted(self.config.policies))})"
            )
        if as_state not in ("active", "retired", "expired"):
            raise UsageError(f"--as {as_state!r}: expected active, retired or expired")
        pol = self.config.policies[ring]
        backend = self.reconciler.backend(pol.backend)

        def fn(state: State, at: datetime) -> transitions.Result:
            if state.find(kid) is not None:
                raise UsageError(f"key {kid} is already recorded in state")
            if state.find_forgotten(kid) is not None:
                # A destroyed key's leftover (a pending deletion, a restored
                # copy) is never taken over: its tombstone says what it is.
                raise UsageError(f"key {kid} was destroyed (its tombstone is in state)")
            if kid not in backend.list_keys(ring):
                raise UsageError(
                    f"backend {pol.backend} holds no keymgr key {kid} for ring {ring!r}"
                )
            jwk = backend.public_jwk(ring, kid)
            if jose.thumbprint(jwk) != kid:
                raise KeymgrError(f"key {kid}: backend {pol.backend} returned another key")
            if as_state == "active" and state.ring(ring).active is not None:
                raise UsageError(
                    f"ring {ring!r} already has an active key; adopt {kid} --as retired"
                )
            try:
                alg = _alg_of(jwk, pol.algorithm)
            except ValueError as e:
                raise UsageError(f"key {kid}: {e}") from None
            return transitions.take_over(
                state, ring, kid, jwk, alg, pol.backend, as_state, at, f"adopted by {self.actor}"
            )

        _, events = self._mutate(fn, now)
        self._sign_cache.clear()
        self._sign_fresh_until = 0
        # No pass here: after a lost state, every key the backend holds must be
        # adopted before a pass may act (it refuses while any is unknown).
        return PassResult(events=events)

    # -- signing ---------------------------------------------------------------

    def _check_fresh(self, t: int) -> None:
        """Drop the cached signers when the state may have changed since they were built.

        ``sign`` calls this at most once per ``store.fingerprint_window`` (1 ms
        for the file store: one ``os.stat``; 1 s for the S3 and Vault stores,
        where asking is a request), not before every signature, and always
        right after this process itself reconciled, rotated or revoked. So
        after another process promotes a successor, this one may go on signing
        with the previous key for up to that window. That is harmless, by
        the timing rules of docs/design.md#timing: promotion retires the previous key but keeps
        it published for ``retire_grace`` (G >= the longest token lifetime plus
        clock skew, and at least 1 s), so a token it signs one window late
        still verifies for its whole life; at worst its last window-length
        of validity comes out of the clock-skew margin. No key can go from active to
        unpublished within the window except through ``revoke`` (compromise,
        where docs/design.md#exclusions already accepts rejected tokens), and a revoking
        process drops its own cache at once. A per-call ``stat`` would not
        close that gap either (the state can change between the stat and the
        signature); it would only make it microseconds wide, at ~10% of an
        ES256 signature. A store that cannot fingerprint (None) is re-read
        before every signature, as before.
        """
        fp = self.store.fingerprint()
        if fp is None or fp != self._sign_fp:
            self._sign_cache.clear()
            self._sign_fp = fp
        self._sign_fresh_until = t + self._sign_window_ns if fp is not None else 0

    def _signing_key(self, ring: str) -> _SignCache:
        if ring not in self.config.policies:
            raise UsageError(f"unknown ring {ring!r}")
        # current_state: a state put back from an older copy names as active
        # a key that was retired since, and may already be out of the JWKS;
        # its tokens would be rejected. The audit log's last line, read once
        # per cache rebuild (not per signature), tells.
        state = self.current_state()
        key = state.ring(ring).active
        if key is None or key.state != ACTIVE:
            raise KeymgrError(f"ring {ring!r} has no active key; run 'keymgr reconcile'")
        backend = self.reconciler.backend(key.backend)
        header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
        entry = _SignCache(
            kid=key.kid,
            alg=key.alg,
            prefix=jose.b64url_bytes(jose.compact_json(header).encode()) + b".",
            signer=backend.signer(ring, key.kid, key.alg),
        )
        self._sign_cache[ring] = entry
        return entry

    def sign(
        self,
        ring: str,
        claims: Mapping[str, Any],
        ttl: timedelta | None = None,
        now: datetime | None = None,
        *,
        issuer: bool = False,
    ) -> str:
        """A compact JWS signed by the ring's active key; ``ttl`` adds iat and exp.

        ``issuer``: add ``iss``, the ring's issuer (:meth:`issuer`), when the
        claims have none; claims whose ``iss`` differs from it are refused
        (verifiers reading the issuer's discovery document reject them).

        A state older than the audit log (put back from an older copy) is
        refused, AuditError, when the signer is looked up again: it may name
        as active a key that was retired since (:meth:`current_state`).
        """
        if issuer:
            claims = self._with_iss(ring, claims)
        # The hot path, in one frame: one clock read, one dict lookup, the
        # claims' JSON and base64url, and the backend's signer (cached per
        # key). The state is re-checked as _check_fresh explains. The same
        # clock read times the call for the daemon's metrics.
        t = _monotonic_ns()
        if t >= self._sign_fresh_until:
            self._check_fresh(t)
        entry = self._sign_cache.get(ring)
        if entry is None:
            entry = self._signing_key(ring)
        if ttl is not None:
            iat = int(now.timestamp()) if now is not None else int(time.time())
            claims = {**claims, "iat": iat, "exp": iat + int(ttl.total_seconds())}
        signing_input = entry.prefix + _b64(_claims_json(claims))
        token = (signing_input + b"." + _b64(entry.signer(signing_input))).decode("ascii")
        if self.metrics is not None:
            self._observe_sign(ring, t)
        return token

    def issuer(self, ring: str) -> str | None:
        """The ring's issuer: the ``issuer`` its publishers name, or None."""
        if ring not in self.config.policies:
            raise UsageError(
                f"unknown ring {ring!r} (configured: {', '.join(sorted(self.config.policies))})"
            )
        return self.config.issuers.get(ring)

    def _with_iss(self, ring: str, claims: Mapping[str, Any]) -> Mapping[str, Any]:
        iss = self.issuer(ring)
        if iss is None:
            return claims
        given = claims.get("iss")
        if given is None:
            return {**claims, "iss": iss}
        if given != iss:
            raise UsageError(
                f"claims: iss {given!r} is not the issuer of ring {ring!r} ({iss!r}, from its "
                "publishers' issuer): verifiers of that issuer would reject the token"
            )
        return claims

    def _observe_sign(self, ring: str, t0: int) -> None:
        m = self.metrics
        children = self._sign_metrics.get(ring)
        if children is None or children[0] is not m:
            assert m is not None
            children = (m, m.sign_calls.labels(ring), m.sign_latency.labels(ring))
            self._sign_metrics[ring] = children
        children[1].inc()
        children[2].observe((_monotonic_ns() - t0) / 1e9)

    # -- reading ----------------------------------------------------------------

    def jwks(self, ring: str | None = None) -> dict[str, Any]:
        """The JWKS as published (read back from the publishers)."""
        if ring is not None and ring not in self.config.policies:
            raise UsageError(f"unknown ring {ring!r}")
        names = (
            self.config.policies[ring].publishers
            if ring is not None
            else tuple(self.config.publishers)
        )
        state = self.state()
        ring_kids = {k.kid for k in state.ring(ring).keys} if ring is not None else None
        seen: dict[str, dict[str, Any]] = {}
        for name in names:
            data = self.config.publishers[name].read()
            if data is None:
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                raise KeymgrError(f"publisher {name}: published document is not JSON") from None
            for jwk in doc.get("keys", []):
                if ring_kids is None or jwk.get("kid") in ring_kids:
                    seen.setdefault(jwk["kid"], jwk)
        return {"keys": [seen[k] for k in sorted(seen)]}

    def status(self) -> dict[str, Any]:
        """``status --json`` as one document (the API); see :meth:`status_parts`."""
        return {section: dict(items) for section, items in self.status_parts()}

    def status_parts(self) -> Iterator[tuple[str, Iterator[tuple[str, Any]]]]:
        """The status document, section by section and ring by ring, built lazily.

        ``keymgr status --json`` writes each ring as it is produced
        (keymgr.render.write_sections), so with 100,000 rings the output is
        never held whole in memory; only the plan (one pass over the state)
        is computed up front. Consume each section before the next.

        The state is read, checked and planned here, when called, not at the
        first section: a refused state raises before anything is written.
        """
        state = self.shown_state()
        at = self._clock(None, state)
        p = self.reconciler.plan(self.reconciler.observe(state), at)
        due_by_ring: dict[str, Any] = {}
        for a in p.due:
            r = getattr(a, "ring", None)
            if r is not None and r not in due_by_ring:
                due_by_ring[r] = {
                    "action": a.name,
                    "kid": getattr(a, "kid", None),
                    "at": format_time(at),
                }

        def rings() -> Iterator[tuple[str, Any]]:
            for name in sorted(set(self.config.policies) | set(state.rings)):
                ring = state.ring(name)
                nxt = due_by_ring.get(name)
                if nxt is None:
                    u = p.upcoming.get(name)
                    if u is not None:
                        nxt = {"action": u.action, "kid": u.kid, "at": format_time(u.at)}
                doc: dict[str, Any] = {"keys": [k.summary() for k in ring.keys], "next": nxt}
                if ring.forgotten:  # destroyed keys past their history (tombstones)
                    doc["forgotten"] = [t.to_dict() for t in ring.forgotten]
                yield name, doc

        def sections() -> Iterator[tuple[str, Iterator[tuple[str, Any]]]]:
            yield "rings", rings()
            if self.config.edges:
                # What each edge showed at its last recorded probe (a change is
                # committed by the pass that saw it; never probed: null).
                yield "edges", (
                    (
                        pub,
                        {
                            url: (e.to_dict() if (e := state.edge(pub, url)) is not None else None)
                            for url in settings.urls
                        },
                    )
                    for pub, settings in sorted(self.config.edges.items())
                )

        return sections()

    def timeline_svg(
        self, rings: Collection[str] | None = None, max_rings: int | None = None
    ) -> str:
        """``status --timeline FILE.svg``: each ring's keys as bars over time,
        as a self-contained SVG document (keymgr.timeline); at most
        ``max_rings`` rings (default keymgr.timeline.MAX_RINGS), with a note."""
        from keymgr import timeline

        state, p, at = self._timeline_inputs()
        limit = timeline.MAX_RINGS if max_rings is None else max_rings
        return timeline.svg(
            state, self.config.policies, p, at, rings=rings, max_rings=limit
        )

    def timeline_text(
        self,
        width: int = 80,
        rings: Collection[str] | None = None,
        max_rings: int | None = None,
    ) -> str:
        """``status --timeline -``: the same timeline for a terminal ``width`` wide."""
        from keymgr import timeline

        state, p, at = self._timeline_inputs()
        limit = timeline.MAX_RINGS if max_rings is None else max_rings
        return timeline.text(
            state, self.config.policies, p, at, width=width, rings=rings, max_rings=limit
        )

    def _timeline_inputs(self) -> tuple[State, Plan, datetime]:
        """What ``status`` plans from: the state (publishers observed) and the
        plan now (the wall clock clamped to the state's newest time)."""
        state = self.shown_state()
        at = self._clock(None, state)
        state = self.reconciler.observe(state)
        return state, self.reconciler.plan(state, at), at


_b64 = jose.b64url_bytes
_claims_json = jose.claims_json


def _alg_of(jwk: Mapping[str, str], configured: str) -> str:
    """The algorithm an adopted key signs with: the ring's when the key fits it,
    else the one its key type implies (EC curve, Ed25519); RSA keys that do
    not match the ring's family have no single answer."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if jose.alg_family(configured) == kty and (kty != "EC" or jose.curve_for(configured) == crv):
        return configured
    by_curve = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}
    if isinstance(crv, str) and crv in by_curve:
        return by_curve[crv]
    raise ValueError(f"a {kty} key does not fit the ring's {configured}")


def _action_dict(a: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"action": a.name}
    for f in ("ring", "kid", "publisher", "reason", "retire"):
        v = getattr(a, f, None)
        if v is not None:
            d[f] = v
    return d


def jwks_bytes(doc: dict[str, Any]) -> bytes:
    return jwks.encode(doc)
