"""End to end: the real CLI driven through simulated time, checked by independent verifiers.

Every test here runs ``keymgr`` in a subprocess (the ``home`` fixture) and moves
time with ``--at``. Tokens are verified by PyJWT and jwcrypto against the JWKS
file exactly as it is on disk at that moment, never by keymgr's own code. Since
the simulated time is years ahead of the real clock, the libraries' own
time-based claim checks are disabled and ``exp`` is checked against the
simulated time here.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws

from tests.conftest import SHORT_POLICY, T0, A, D, G, P

ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"]
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
KTY = {"ES": "EC", "RS": "RSA", "PS": "RSA", "Ed": "OKP"}
CRV = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "EdDSA": "Ed25519"}
IN_JWKS = {"published", "active", "retired"}
EVENT_FOR = {
    "generate": "key.generated",
    "promote": "key.promoted",
    "expire": "key.expired",
    "destroy": "key.destroyed",
}

SEC = timedelta(seconds=1)
# The defaults written by ``keymgr init``.
DEFAULT_A, DEFAULT_G = timedelta(hours=1), timedelta(days=1)


# --------------------------------------------------------------------------- helpers


def ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Token:
    jws: str
    kid: str
    alg: str
    iat: int
    exp: int
    jti: str

    def live_at(self, now: datetime) -> bool:
        """RFC 7519 4.1.4: valid only while the current time is before ``exp``."""
        return now.timestamp() < self.exp


@dataclass
class JwksOnDisk:
    """The JWKS file as read at one instant, parsed once for each verifier."""

    raw: bytes
    doc: dict[str, Any]
    pyjwt_set: jwt.PyJWKSet | None
    jwcrypto_set: jwc_jwk.JWKSet

    @classmethod
    def read(cls, path: Path) -> JwksOnDisk:
        raw = path.read_bytes()
        doc = json.loads(raw)
        pyjwt_set = jwt.PyJWKSet.from_dict(doc) if doc["keys"] else None
        return cls(raw, doc, pyjwt_set, jwc_jwk.JWKSet.from_json(raw.decode()))

    @property
    def kids(self) -> list[str]:
        return [k["kid"] for k in self.doc["keys"]]


def verify_pyjwt(jwks: JwksOnDisk, token: Token) -> dict[str, Any]:
    if jwks.pyjwt_set is None:
        raise LookupError("empty JWKS")
    key = jwks.pyjwt_set[jwt.get_unverified_header(token.jws)["kid"]]
    return jwt.decode(
        token.jws,
        key.key,
        algorithms=[token.alg],
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


def verify_jwcrypto(jwks: JwksOnDisk, token: Token) -> dict[str, Any]:
    obj = jwc_jws.JWS()
    obj.deserialize(token.jws)
    obj.allowed_algs = [token.alg]
    obj.verify(jwks.jwcrypto_set)
    return json.loads(obj.payload)


def assert_verifies(jwks: JwksOnDisk, token: Token, why: str = "") -> None:
    for name, fn in (("PyJWT", verify_pyjwt), ("jwcrypto", verify_jwcrypto)):
        try:
            claims = fn(jwks, token)
        except Exception as e:
            raise AssertionError(
                f"{name} rejects a live token {token.jti} (kid {token.kid}, exp {token.exp}) "
                f"{why}: {type(e).__name__}: {e}\nJWKS kids: {jwks.kids}"
            ) from e
        assert claims["jti"] == token.jti and claims["exp"] == token.exp, (name, claims)


def assert_rejected(jwks: JwksOnDisk, token: Token) -> None:
    for name, fn in (("PyJWT", verify_pyjwt), ("jwcrypto", verify_jwcrypto)):
        try:
            fn(jwks, token)
        except Exception:
            continue
        raise AssertionError(f"{name} still accepts token {token.jti} of kid {token.kid}")


def check_jwks_document(jwks: JwksOnDisk, alg: str) -> None:
    kids = jwks.kids
    assert kids == sorted(kids) and len(set(kids)) == len(kids), kids
    for j in jwks.doc["keys"]:
        leaked = PRIVATE_MEMBERS & set(j)
        assert not leaked, f"JWKS holds private members {leaked} for kid {j.get('kid')}"
        for member in ("kty", "kid", "alg"):
            assert isinstance(j.get(member), str) and j[member], (member, j)
        assert j["use"] == "sig", j
        assert j["alg"] == alg, j
        assert j["kty"] == KTY[alg[:2]], j
        if alg in CRV:
            assert j["crv"] == CRV[alg], j
        # kid is the RFC 7638 thumbprint, as computed by jwcrypto.
        assert jwc_jwk.JWK(**j).thumbprint() == j["kid"], j


def key_files(home: Any, ring: str = "default") -> set[str]:
    d = home.dir / "keys" / ring
    if not d.is_dir():
        return set()
    names = os.listdir(d)
    stray = [n for n in names if not n.endswith(".key") or n.startswith(".")]
    assert not stray, f"unexpected files in {d}: {stray}"
    return {n[: -len(".key")] for n in names}


def file_id(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class Driver:
    """Drives one ``home`` through simulated time and checks it at every step."""

    home: Any
    alg: str
    rng: random.Random
    grace: timedelta = G  # the ring's retire_grace: the longest token lifetime
    ring: str = "default"
    now: datetime | None = None
    tokens: list[Token] = field(default_factory=list)
    revoked_tokens: list[Token] = field(default_factory=list)
    status_ring: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    # In-process CLI calls (keymgr.cli.main): same parsing, output and exit
    # codes, without an interpreter start-up per call. One algorithm of the
    # rotation test and every other test here use real subprocesses.
    inproc: bool = False
    _audit_bytes: bytes = b""
    _jti: int = 0

    # -- CLI ---------------------------------------------------------------

    def run(self, *args: str) -> Any:
        return self.home.run(*args, inproc=self.inproc)

    def cli(self, *args: str) -> list[str]:
        proc = self.home.run(*args, check=True, inproc=self.inproc)
        assert "Traceback" not in proc.stderr, proc.stderr
        return [line for line in proc.stdout.splitlines() if line.strip()]

    def refresh_status(self) -> dict[str, Any]:
        self.status_ring = json.loads("\n".join(self.cli("status", "--json")))["rings"][self.ring]
        return self.status_ring

    def ring_keys(self, *states: str) -> list[dict[str, Any]]:
        return [k for k in self.status_ring["keys"] if not states or k["state"] in states]

    def active_kid(self) -> str:
        active = self.ring_keys("active")
        assert len(active) == 1, f"expected exactly one active key: {self.ring_keys()}"
        return active[0]["kid"]

    def audit_verify(self) -> None:
        proc = self.run("audit", "verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self._audit_bytes = (self.home.dir / "audit.jsonl").read_bytes()

    def sign(self, ttl: timedelta) -> Token:
        assert self.now is not None
        self._jti += 1
        jti = f"{self.alg}-{self._jti}"
        claims = json.dumps({"sub": "e2e", "jti": jti})
        out = self.cli(
            "sign", self.ring, "--claims", claims, "--ttl", f"{int(ttl.total_seconds())}s",
            "--at", ts(self.now),
        )
        assert len(out) == 1, out
        header = jwt.get_unverified_header(out[0])
        assert header["alg"] == self.alg and header["typ"] == "JWT", header
        assert header["kid"] == self.active_kid(), (header, self.ring_keys())
        payload = jwt.decode(out[0], options={"verify_signature": False})
        iat = int(self.now.timestamp())
        assert payload["iat"] == iat and payload["exp"] == iat + int(ttl.total_seconds()), payload
        token = Token(out[0], header["kid"], self.alg, iat, payload["exp"], jti)
        self.tokens.append(token)
        return token

    def reconcile(self, at: datetime) -> list[str]:
        out = self.cli("reconcile", "--at", ts(at))
        self.now = at
        self.log.append(f"reconcile --at {ts(at)}: {out}")
        return out

    # -- checks ------------------------------------------------------------

    def check(self) -> JwksOnDisk:
        """Every per-step invariant, against the files as they are on disk now."""
        assert self.now is not None
        jwks = JwksOnDisk.read(self.home.jwks_path)
        check_jwks_document(jwks, self.alg)
        keys = self.ring_keys()
        assert len(self.ring_keys("active")) <= 1, keys
        assert not self.ring_keys("pending"), f"a pass left a pending key: {keys}"
        in_jwks = {k["kid"] for k in keys if k["state"] in IN_JWKS}
        assert set(jwks.kids) == in_jwks, (jwks.kids, keys)
        alive = {k["kid"] for k in keys if k["state"] != "destroyed"}
        assert key_files(self.home, self.ring) == alive, keys
        for k in keys:
            assert k["alg"] == self.alg, k
            assert (k["destroyed_at"] is None) == (k["state"] != "destroyed"), k
        live = [t for t in self.tokens if t.live_at(self.now)]
        for t in live:
            assert_verifies(jwks, t, f"at {ts(self.now)}")
        for t in self.revoked_tokens:
            assert t.kid not in jwks.kids
            assert_rejected(jwks, t)
        return jwks

    def step(self, at: datetime, expect: set[str] | None = None) -> list[str]:
        """reconcile at ``at``, sign a token, check everything.

        ``expect`` is the set of audit events the pass must apply (empty: none).
        """
        jwks_path = self.home.jwks_path
        before_id = file_id(jwks_path) if jwks_path.exists() else None
        before_bytes = jwks_path.read_bytes() if jwks_path.exists() else None
        state_before = (self.home.dir / "state.json").read_bytes() if self.now else b""
        out = self.reconcile(at)
        events = {line.split()[1] for line in out}
        if expect is not None:
            assert events >= expect, (ts(at), out, self.status_ring.get("next"))
            if not expect:
                assert not out, f"nothing was due at {ts(at)}, but the pass applied {out}"
        changed = bool(out) or (self.home.dir / "state.json").read_bytes() != state_before
        if changed or not self.status_ring:
            self.refresh_status()
            self.audit_verify()
        else:
            # Nothing applied: the audit log is byte for byte what was verified.
            assert (self.home.dir / "audit.jsonl").read_bytes() == self._audit_bytes
        after = JwksOnDisk.read(jwks_path)
        if before_bytes is not None:
            old_kids = [k["kid"] for k in json.loads(before_bytes)["keys"]]
            if old_kids == after.kids:
                # Unchanged key set: the file must not have been rewritten.
                assert after.raw == before_bytes
                assert file_id(jwks_path) == before_id, f"JWKS rewritten at {ts(at)}: {out}"
        ttl = G if self.rng.random() < 0.4 else timedelta(seconds=self.rng.randint(60, 2 * 86400))
        self.sign(min(ttl, self.grace))
        self.check()
        return out

    def mark_revoked(self, kid: str) -> None:
        """Tokens of ``kid`` must from now on be rejected."""
        self.revoked_tokens += [t for t in self.tokens if t.kid == kid]
        self.tokens = [t for t in self.tokens if t.kid != kid]


def driver(home: Any, alg: str, seed: str) -> Driver:
    """A driver for a ring of ``alg`` with the default policy of ``keymgr init``."""
    if alg != "ES256":
        home.set_ring(algorithm=alg)
    return Driver(home, alg, random.Random(seed), grace=DEFAULT_G)


def expected_next(ring: dict[str, Any]) -> tuple[str, str | None, datetime]:
    """The next transition per docs/design.md#timing, from ``status --json`` keys."""
    cands: list[tuple[datetime, str, str | None]] = []
    by = {s: [k for k in ring["keys"] if k["state"] == s] for s in ("active", "published")}
    active = by["active"][0]
    act_at = parse(active["activated_at"])
    assert act_at is not None
    if by["published"]:
        succ = by["published"][0]
        pub_at = parse(succ["published_at"])
        assert pub_at is not None
        cands.append((max(act_at + P, pub_at + A), "promote", succ["kid"]))
    else:
        cands.append((act_at + P - A, "generate", None))
    for k in ring["keys"]:
        if k["state"] == "retired":
            cands.append((parse(k["retired_at"]) + G, "expire", k["kid"]))  # type: ignore[operator]
        elif k["state"] == "expired":
            cands.append((parse(k["expired_at"]) + D, "destroy", k["kid"]))  # type: ignore[operator]
    at, action, kid = min(cands, key=lambda c: c[0])
    return action, kid, at


# --------------------------------------------------------------------------- rotation


@pytest.mark.slow
@pytest.mark.parametrize("alg", ALGS)
def test_three_rotations_never_break_a_live_token(home, alg):
    rng = random.Random(f"keymgr-e2e-{alg}")
    home.set_ring(algorithm=alg, **SHORT_POLICY)
    d = Driver(home, alg, rng, inproc=alg != "ES256")
    start = T0 + timedelta(seconds=rng.randint(0, 86400))

    d.step(start, expect={"key.generated", "key.published", "key.promoted"})
    first = d.ring_keys()
    assert [k["state"] for k in first] == ["active"], first
    assert first[0]["activated_at"] == ts(start)

    # Three full rotations: keys 1, 2 and 3 each go active -> retired ->
    # expired -> destroyed; key 4 is the signer at the end.
    for _ in range(40):
        if len(d.ring_keys("destroyed")) == 3:
            break
        nxt = d.status_ring["next"]
        assert nxt is not None, d.status_ring
        due = parse(nxt["at"])
        assert due is not None and d.now is not None
        assert due > d.now, (nxt, ts(d.now))
        action, kid, at = expected_next(d.status_ring)
        assert (nxt["action"], nxt["kid"], nxt["at"]) == (action, kid, ts(at)), (
            nxt,
            d.status_ring["keys"],
        )
        # A random instant in between, in about a third of the intervals (the
        # seed varies which ones across algorithms; each CLI call costs ~0.3 s).
        if due - d.now > 2 * SEC and rng.random() < 0.35:
            gap = int((due - d.now).total_seconds())
            d.step(d.now + timedelta(seconds=rng.randint(1, gap - 2)), expect=set())
        if due - SEC > d.now:
            d.step(due - SEC, expect=set())
        out = d.step(due, expect={EVENT_FOR[action]})
        if kid is not None:
            assert any(EVENT_FOR[action] in line and kid in line for line in out), out
    else:
        pytest.fail("three rotations did not complete:\n" + "\n".join(d.log))

    keys = d.ring_keys()
    assert [k["state"] for k in keys] == ["destroyed"] * 3 + ["active"], keys
    # The schedule, from the recorded times: each successor was generated at
    # activated + P - A, promoted at activated + P (after being published for
    # A), its predecessor expired G later and was destroyed D after that.
    for old, new in itertools.pairwise(keys):
        o = {f: parse(v) for f, v in old.items() if f.endswith("_at")}
        n = {f: parse(v) for f, v in new.items() if f.endswith("_at")}
        assert n["created_at"] == n["published_at"] == o["activated_at"] + P - A, (old, new)
        assert n["activated_at"] == o["activated_at"] + P == n["published_at"] + A
        assert o["retired_at"] == n["activated_at"]
        assert o["expired_at"] == o["retired_at"] + G
        assert o["destroyed_at"] == o["expired_at"] + D
    check_jwks_command(d)
    assert len(d.tokens) >= 25


def check_jwks_command(d: Driver) -> None:
    """``keymgr jwks`` prints exactly the keys of the file on disk."""
    on_disk = json.loads(d.home.jwks_path.read_text())
    for args in (("jwks",), ("jwks", "--ring", d.ring)):
        printed = json.loads(d.home.run(*args, check=True, inproc=d.inproc).stdout)
        assert printed == on_disk, args


# --------------------------------------------------------------------------- revoke


def test_revoke_unpublishes_destroys_and_replaces(home):
    d = driver(home, "ES256", "revoke")
    d.step(T0, expect={"key.promoted"})
    k1 = d.active_kid()
    tok1 = d.sign(timedelta(hours=20))
    # A manual rotation, promoted after publish_ahead: k1 retired, k2 active.
    d.cli("rotate", "default", "--at", ts(T0 + timedelta(hours=1)))
    d.now = T0 + timedelta(hours=1)
    d.refresh_status()
    d.step(T0 + timedelta(hours=2), expect={"key.promoted", "key.retired"})
    k2 = d.active_kid()
    assert k2 != k1 and d.status_ring["keys"][0]["state"] == "retired"
    tok2 = d.sign(timedelta(hours=12))
    d.check()
    assert_verifies(JwksOnDisk.read(home.jwks_path), tok1)

    # Revoke the active key: unpublished, destroyed, and a replacement is the
    # signer when the command returns.
    at = T0 + timedelta(hours=3)
    out = d.cli("revoke", k2, "--reason", "leaked in a log", "--at", ts(at))
    d.now = at
    events = [line.split()[1] for line in out]
    for ev in ("key.revoked", "key.destroyed", "key.generated", "key.promoted"):
        assert ev in events, out
    assert any("key.destroyed" in line and k2 in line for line in out), out
    d.refresh_status()
    d.audit_verify()
    states = {k["kid"]: k for k in d.ring_keys()}
    assert states[k2]["state"] == "destroyed" and states[k2]["revoked_at"] == ts(at)
    k3 = d.active_kid()
    assert k3 not in (k1, k2)
    assert states[k3]["activated_at"] == ts(at)
    assert k2 not in key_files(home)
    d.mark_revoked(k2)
    assert tok2 in d.revoked_tokens
    jwks = d.check()  # tok1 (k1, retired) still verifies; tok2 is rejected
    assert k2 not in jwks.kids and k1 in jwks.kids
    tok3 = d.sign(timedelta(hours=1))
    assert tok3.kid == k3
    d.check()

    # Revoke the retired key: its tokens stop verifying, the signer stays.
    at = T0 + timedelta(hours=4)
    d.reconcile(at)
    out = d.cli("revoke", k1, "--at", ts(at))
    events = [line.split()[1] for line in out]
    assert "key.revoked" in events and "key.destroyed" in events, out
    assert "key.promoted" not in events and "key.generated" not in events, out
    d.refresh_status()
    d.audit_verify()
    assert d.active_kid() == k3
    d.mark_revoked(k1)
    assert tok1 in d.revoked_tokens
    jwks = d.check()
    assert jwks.kids == [k3]
    assert key_files(home) == {k3}

    # Revoking again is a usage error and changes nothing.
    before = home.jwks_path.read_bytes()
    proc = home.run("revoke", k1, "--at", ts(at))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert home.jwks_path.read_bytes() == before

    # Time goes on without resurrecting anything.
    d.step(at + DEFAULT_G + timedelta(hours=1), expect=set())
    d.audit_verify()


def test_revoke_published_successor_keeps_signer(home):
    d = driver(home, "EdDSA", "revoke-published")
    d.step(T0, expect={"key.promoted"})
    k1 = d.active_kid()
    at = T0 + timedelta(minutes=10)
    d.cli("rotate", "default", "--at", ts(at))
    d.now = at
    d.refresh_status()
    succ = d.ring_keys("published")
    assert len(succ) == 1
    d.check()
    bad = succ[0]["kid"]
    out = d.cli("revoke", bad, "--at", ts(at))
    assert {"key.revoked", "key.destroyed"} <= {line.split()[1] for line in out}, out
    assert "key.promoted" not in {line.split()[1] for line in out}, out
    d.refresh_status()
    d.audit_verify()
    assert d.active_kid() == k1
    assert bad not in key_files(home)
    jwks = d.check()
    assert bad not in jwks.kids and k1 in jwks.kids
    # The rotation request still stands: a fresh successor (never the revoked
    # one) is published and waits publish_ahead like any other.
    fresh = d.ring_keys("published")
    assert [k["kid"] for k in fresh] != [bad]
    if fresh:
        assert d.status_ring["next"]["action"] == "promote"
        assert parse(d.status_ring["next"]["at"]) == at + DEFAULT_A
    assert d.sign(timedelta(minutes=5)).kid == k1


# --------------------------------------------------------------------------- rotate


def test_rotate_publishes_now_and_promotes_after_publish_ahead(home):
    d = driver(home, "ES384", "rotate")
    d.step(T0, expect={"key.promoted"})
    k1 = d.active_kid()
    at = T0 + timedelta(days=3, minutes=7)
    out = d.cli("rotate", "default", "--at", ts(at))
    d.now = at
    events = [line.split()[1] for line in out]
    assert "key.generated" in events and "key.published" in events, out
    assert "key.promoted" not in events, out
    d.refresh_status()
    d.audit_verify()
    succ = d.ring_keys("published")
    assert len(succ) == 1 and succ[0]["published_at"] == ts(at), d.ring_keys()
    assert d.active_kid() == k1
    assert d.status_ring["next"] == {"action": "promote", "kid": succ[0]["kid"], "at": ts(at + A)}
    jwks = d.check()
    assert set(jwks.kids) == {k1, succ[0]["kid"]}
    assert d.sign(timedelta(hours=1)).kid == k1

    d.step(at + DEFAULT_A - SEC, expect=set())
    assert d.active_kid() == k1
    d.step(at + DEFAULT_A, expect={"key.promoted", "key.retired"})
    assert d.active_kid() == succ[0]["kid"]
    assert d.tokens[-1].kid == succ[0]["kid"]
    retired = d.ring_keys("retired")
    assert [k["kid"] for k in retired] == [k1] and retired[0]["retired_at"] == ts(at + A)
    # The old key stays published for retire_grace.
    assert d.status_ring["next"] == {"action": "expire", "kid": k1, "at": ts(at + A + DEFAULT_G)}


def test_rotate_emergency_promotes_at_once(home):
    d = driver(home, "PS256", "emergency")
    d.step(T0, expect={"key.promoted"})
    k1 = d.active_kid()
    old = d.sign(timedelta(hours=6))
    at = T0 + timedelta(hours=5)
    out = d.cli("rotate", "default", "--emergency", "--at", ts(at))
    d.now = at
    events = [line.split()[1] for line in out]
    for ev in ("key.generated", "key.published", "key.promoted", "key.retired"):
        assert ev in events, out
    d.refresh_status()
    d.audit_verify()
    k2 = d.active_kid()
    assert k2 != k1
    k = {x["kid"]: x for x in d.ring_keys()}
    assert k[k2]["activated_at"] == ts(at) and k[k1]["retired_at"] == ts(at)
    assert k[k1]["state"] == "retired"
    jwks = d.check()  # the old key's live token still verifies
    assert set(jwks.kids) == {k1, k2}
    assert old.live_at(at)
    assert d.sign(timedelta(minutes=5)).kid == k2
    d.check()


# --------------------------------------------------------------------------- no-op passes


def test_noop_reconcile_leaves_jwks_file_untouched(home):
    d = driver(home, "ES256", "noop")
    d.step(T0, expect={"key.promoted"})
    path = home.jwks_path
    raw, ident = path.read_bytes(), file_id(path)
    for at in (T0, T0 + SEC, T0 + timedelta(days=3)):
        assert d.reconcile(at) == [], ts(at)
        assert path.read_bytes() == raw and file_id(path) == ident, ts(at)
    # Without --at: the real clock is years behind the state, so nothing is due.
    assert d.cli("reconcile") == []
    assert path.read_bytes() == raw and file_id(path) == ident
    d.audit_verify()

    # After a real change, the next idle pass is a no-op again.
    d.refresh_status()
    gen_at = parse(d.status_ring["next"]["at"])
    assert gen_at is not None
    d.step(gen_at, expect={"key.generated"})
    raw2, ident2 = path.read_bytes(), file_id(path)
    assert raw2 != raw
    assert d.reconcile(gen_at + timedelta(minutes=1)) == []
    assert path.read_bytes() == raw2 and file_id(path) == ident2
    d.audit_verify()


def test_jwks_command_is_deterministic(home):
    d = driver(home, "ES512", "jwks")
    d.step(T0, expect={"key.promoted"})
    d.cli("rotate", "default", "--at", ts(T0 + timedelta(hours=1)))
    d.now = T0 + timedelta(hours=1)
    d.refresh_status()
    check_jwks_command(d)
    first = home.run("jwks", check=True).stdout
    assert home.run("jwks", check=True).stdout == first
    doc = json.loads(first)
    assert [k["kid"] for k in doc["keys"]] == sorted(k["kid"] for k in d.ring_keys(*IN_JWKS))
