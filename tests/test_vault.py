"""The Vault / OpenBao transit backend and the Vault KV state store, against a real OpenBao.

No mocks: every test talks to the ``bao server -dev`` of ``tests/servers_bao.py``
(one per xdist worker; the TLS test starts its own ``-dev-tls`` server). Each
test uses its own key prefix and KV path, so tests sharing a server never see
each other's keys. Tokens are verified by PyJWT *and* jwcrypto against the JWKS
file as it is on disk, never by keymgr's own code; transit keys and KV secrets
are inspected through OpenBao's HTTP API with urllib.

Speed: the CLI is what is under test, but every ``keymgr`` run costs an
interpreter start-up, so the rotation test moves ten rings (one per
algorithm) with each ``reconcile``, and state is read back from its store
rather than through ``keymgr status`` wherever the CLI's output is not itself
the subject.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest.mock import patch

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws
from keymgr.backends.vault.transit import VaultTransitBackend, key_type_for

from keymgr.errors import BackendError, ConfigError, StoreError
from keymgr.model import State
from tests.conftest import SHORT_POLICY, T0, A, D, G, P, read_state, with_state_url

ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"]
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
TIMEOUT = 2  # seconds: the backend's request timeout in these tests
REPO = Path(__file__).resolve().parent.parent
POLICY_FILE = REPO / "deploy" / "vault" / "keymgr-policy.hcl"


def ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unique(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:10]}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- verifiers


class Verifiers:
    """PyJWT and jwcrypto, each loaded with one JWKS document as published."""

    def __init__(self, jwks_doc: dict[str, Any]) -> None:
        self.pyjwt = jwt.PyJWKSet.from_dict(jwks_doc)
        self.jwcrypto = jwc_jwk.JWKSet.from_json(json.dumps(jwks_doc))

    def verify(self, token: str, alg: str) -> dict[str, Any]:
        """Both libraries must accept ``token`` (only ``alg``) and agree on the claims."""
        kid = jwt.get_unverified_header(token)["kid"]
        claims = jwt.decode(
            token,
            self.pyjwt[kid].key,
            algorithms=[alg],
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
        obj = jwc_jws.JWS()
        obj.deserialize(token)
        obj.allowed_algs = [alg]
        obj.verify(self.jwcrypto)
        assert json.loads(obj.payload) == claims
        return dict(claims)


def verify_token(jwks_doc: dict[str, Any], token: str, alg: str) -> dict[str, Any]:
    return Verifiers(jwks_doc).verify(token, alg)


def signing_input(alg: str, claims: dict[str, Any] | None = None) -> bytes:
    header = {"alg": alg, "kid": "k", "typ": "JWT"}
    payload = claims if claims is not None else {"sub": "x"}
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}".encode()


def verify_with_jwk(public_jwk: dict[str, str], token: str, alg: str) -> None:
    doc = {"keys": [{**public_jwk, "alg": alg, "use": "sig", "kid": "k"}]}
    header = jwt.get_unverified_header(token)
    assert header["kid"] == "k"
    verify_token(doc, token, alg)


def transit_kid(bao: Any, name: str, mount: str = "transit") -> str:
    """The RFC 7638 thumbprint of a transit key's version 1, computed by jwcrypto."""
    data = bao.ok("GET", f"{mount}/keys/{name}")["data"]
    pub = data["keys"]["1"]["public_key"]
    if data["type"] == "ed25519":
        key = jwc_jwk.JWK(kty="OKP", crv="Ed25519", x=b64url(base64.b64decode(pub)))
    else:
        key = jwc_jwk.JWK.from_pem(pub.encode())
    return str(key.thumbprint())


def kv_state(bao: Any, path: str, mount: str = "secret") -> dict[str, Any]:
    """The state document of a ``vault://`` store, read straight from KV (no keymgr code)."""
    status, doc = bao.api("GET", f"{mount}/data/{path}")
    if status == 404:
        return {"rings": {}}
    assert status == 200, (status, doc)
    state = dict(json.loads(doc["data"]["data"]["state"]))
    if "sharding" not in state:
        return state
    # A sharded head (KEYMGR_TEST_SHARDS): the whole state it stands for,
    # read through the store, which checks every shard it names.
    from keymgr.stores import open_store

    # The server's address and token in the environment for the call, restored after.
    with patch.dict(os.environ, VAULT_ADDR=bao.addr, VAULT_TOKEN=bao.token):
        whole, version = open_store(f"vault://{mount}/{path}").load()
    return {"version": version, **whole.to_dict()}


# --------------------------------------------------------------------------- CLI home


@dataclass
class VaultHome:
    """A ``home`` whose rings live in OpenBao transit (and maybe its state in KV)."""

    home: Any
    bao: Any
    prefix: str
    token: str
    state_url: str | None = None
    secrets: list[str] = field(default_factory=list)
    _kids: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in self.home.env().items() if not k.startswith(("VAULT_", "BAO_"))}
        env["VAULT_TOKEN"] = self.token
        if self.state_url:
            env["VAULT_ADDR"] = self.bao.addr
        env.update(extra)
        return env

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = self.home.run(*args, env=env or self.env(), timeout=timeout)
        out = proc.stdout + proc.stderr
        for secret in [self.token, self.bao.token, *self.secrets]:
            leaked = secret in out  # never let pytest print the secret itself
            assert not leaked, f"a credential leaked into the output of keymgr {args}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str) -> list[str]:
        proc = self.run(*args)
        assert proc.returncode == 0, f"keymgr {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return [line for line in proc.stdout.splitlines() if line.strip()]

    def fails(self, *args: str, timeout: float = 30) -> tuple[str, float]:
        """Run a command that must fail: exit 1, exactly one error line; (line, seconds)."""
        start = time.monotonic()
        proc = self.run(*args, timeout=timeout)
        elapsed = time.monotonic() - start
        assert proc.returncode == 1, (args, proc.returncode, proc.stdout, proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("keymgr: error:")]
        assert len(errors) == 1, proc.stderr
        return errors[0], elapsed

    def state_doc(self) -> dict[str, Any]:
        """The stored state, read from its file or KV secret directly."""
        if self.state_url is None:
            path = self.home.dir / "state.json"
            return read_state(path) if path.exists() else {"rings": {}}
        return kv_state(self.bao, self.state_url.split("/", 3)[3].split("?")[0])

    def ring_keys(self, ring: str = "default") -> list[dict[str, Any]]:
        r = self.state_doc()["rings"].get(ring)
        return list(r["keys"]) if r else []

    def states(self, ring: str = "default") -> dict[str, str]:
        return {k["kid"]: k["state"] for k in self.ring_keys(ring)}

    def sign(self, at: datetime, ttl: timedelta, jti: str, ring: str = "default") -> str:
        out = self.ok(
            "sign",
            ring,
            "--claims",
            json.dumps({"sub": "vault-e2e", "jti": jti}),
            "--ttl",
            f"{int(ttl.total_seconds())}s",
            "--at",
            ts(at),
        )
        assert len(out) == 1, out
        return out[0]

    def jwks(self) -> dict[str, Any]:
        return json.loads(self.home.jwks_path.read_text())

    def status_json(self) -> dict[str, Any]:
        return dict(json.loads("\n".join(self.ok("status", "--json"))))

    def transit_by_ring(self) -> dict[str, set[str]]:
        """ring -> kids of the transit keys under this home's prefix (keymgr's naming)."""
        out: dict[str, set[str]] = {}
        for name in self.bao.transit_keys():
            if not name.startswith(self.prefix):
                continue
            ring, dot, suffix = name[len(self.prefix) :].rpartition(".")
            if not dot or len(suffix) != 32 or suffix.strip("0123456789abcdef"):
                continue
            if name not in self._kids:  # names are never reused: cache the thumbprint
                self._kids[name] = transit_kid(self.bao, name)
            out.setdefault(ring, set()).add(self._kids[name])
        return out

    def ring_names(self, ring: str = "default") -> list[str]:
        head = f"{self.prefix}{ring}."
        return [
            n
            for n in self.bao.transit_keys()
            if n.startswith(head) and "." not in n[len(head) :] and len(n) - len(head) == 32
        ]

    def transit_kids(self, ring: str = "default") -> set[str]:
        return self.transit_by_ring().get(ring, set())

    def audit_text(self) -> str:
        path = self.home.dir / "audit.jsonl"
        return path.read_text() if path.exists() else ""

    def assert_no_secret_at_rest(self) -> None:
        texts = [self.audit_text(), self.home.config.read_text(), json.dumps(self.state_doc())]
        for text in texts:
            for secret in [self.token, self.bao.token, *self.secrets]:
                leaked = secret in text
                assert not leaked, "a credential was stored at rest"


def setup_home(
    home: Any,
    bao: Any,
    alg: str = "ES256",
    *,
    token: str | None = None,
    state_url: str | None = None,
    timeout: float = TIMEOUT,
    extra: str = "",
) -> VaultHome:
    prefix = unique("t") + "-"
    text = home.config.read_text()
    if state_url is not None:
        text = with_state_url(text, state_url)
    text += (
        "\n[backends.vault]\n"
        'type = "vault-transit"\n'
        f'url = "{bao.addr}"\n'
        'mount = "transit"\n'
        f'key_prefix = "{prefix}"\n'
        f"timeout = {timeout}\n"
        f"{extra}"
    )
    home.config.write_text(text)
    home.set_ring(backend="vault", algorithm=alg, **SHORT_POLICY)
    return VaultHome(home, bao, prefix, token or bao.token, state_url)


def events_of(lines: list[str]) -> list[tuple[str, str | None]]:
    """(event, kid) of each transition line printed by ``reconcile``."""
    return [(ev, kid) for ev, _, kid in ring_events(lines)]


def ring_events(lines: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(event, ring, kid) of each transition line printed by ``reconcile``."""
    out = []
    for line in lines:
        parts = line.split()
        ring = next((p[5:] for p in parts if p.startswith("ring=")), None)
        kid = next((p[4:] for p in parts if p.startswith("kid=")), None)
        out.append((parts[1], ring, kid))
    return out


def backend(bao: Any, prefix: str | None = None, **options: Any) -> VaultTransitBackend:
    opts = {
        "type": "vault-transit",
        "url": bao.addr,
        "key_prefix": prefix or unique("t") + "-",
        "timeout": TIMEOUT,
        "rsa_bits": 2048,
        **options,
    }
    return VaultTransitBackend("vault", opts, "/nonexistent")


@pytest.fixture
def vault_env(bao: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """VAULT_ADDR / VAULT_TOKEN of the test server in this process (for in-process objects)."""
    for k in list(os.environ):
        if k.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    return bao


class RequestCounter:
    """Records the HTTP requests a client's session sends (a response hook, no mocking)."""

    def __init__(self, session: Any) -> None:
        self.urls: list[str] = []
        self.bodies: list[bytes | str | None] = []
        session.hooks["response"].append(self._hook)

    def _hook(self, resp: Any, *args: Any, **kwargs: Any) -> None:
        self.urls.append(f"{resp.request.method} {resp.request.url}")
        self.bodies.append(resp.request.body)

    def reset(self) -> None:
        self.urls.clear()
        self.bodies.clear()


# --------------------------------------------------------------------------- rotations


# The rotation test's policy packs three rotations into few passes: a retired
# key expires exactly when the next successor is generated (G = P - A) and is
# destroyed in the same pass (D = 0), so each pass of the CLI moves several keys.
ROT_G = P - A
ROT_POLICY = {**SHORT_POLICY, "retire_grace": "239h", "destroy_after": "0s"}


def ring_name(alg: str) -> str:
    return "default" if alg == "ES256" else alg.lower()


@dataclass
class RingTrack:
    """What one ring should look like, from the transitions the CLI printed."""

    alg: str
    index: int
    alive: set[str] = field(default_factory=set)  # in transit
    in_jwks: set[str] = field(default_factory=set)
    active: str | None = None
    retired: list[str] = field(default_factory=list)
    tokens: list[tuple[str, str, int]] = field(default_factory=list)  # (jws, kid, exp)
    old_key_tokens: int = 0  # live tokens verified while their key was retired
    cli_tokens: int = 0

    @property
    def name(self) -> str:
        return ring_name(self.alg)


def test_three_rotations_every_algorithm(home, bao, monkeypatch):
    """Three full rotations of ten rings (one per algorithm) through the CLI, with ``--at``.

    After each ``keymgr reconcile``: the JWKS on disk holds exactly the keys
    that should be published, with no private member; transit holds exactly
    the keys not yet destroyed; a token is signed with every ring's active key
    and every token still live verifies with PyJWT and jwcrypto against that
    JWKS. Each ring gets one token from ``keymgr sign`` (spread over the four
    promotions) and the rest from the Python API (a fresh ``KeyManager``, the
    daemon's signing path): one process start per step, not one per ring.
    """
    from keymgr.manager import KeyManager

    vh = setup_home(home, bao, "ES256", extra="rsa_bits = 2048\n")
    home.set_ring(**ROT_POLICY)
    text = home.config.read_text()
    for alg in ALGS[1:]:
        text += f'\n[keyrings.{ring_name(alg)}]\nbackend = "vault"\nalgorithm = "{alg}"\n'
        text += "".join(f'{k} = "{v}"\n' for k, v in ROT_POLICY.items())
        text += 'publishers = ["site"]\n'
    home.config.write_text(text)
    monkeypatch.setenv("VAULT_TOKEN", vh.token)
    rings = {ring_name(alg): RingTrack(alg, i) for i, alg in enumerate(ALGS)}
    promotions = 0

    def step(at: datetime, expect: set[str]) -> dict[str, list[tuple[str, str | None]]]:
        nonlocal promotions
        lines = vh.ok("reconcile", "--at", ts(at))
        by_ring: dict[str, list[tuple[str, str | None]]] = {r: [] for r in rings}
        for ev, ring, kid in ring_events(lines):
            assert ev not in {"key.adopted", "key.orphan_destroyed", "backend.failed"}, lines
            if ring is not None:
                by_ring[ring].append((ev, kid))
        for name, r in rings.items():
            evs = by_ring[name]
            assert expect <= {e for e, _ in evs}, (r.alg, ts(at), evs)
            for ev, kid in evs:
                if ev == "key.generated":
                    r.alive.add(kid)
                elif ev == "key.published":
                    r.in_jwks.add(kid)
                elif ev == "key.promoted":
                    r.active = kid
                elif ev == "key.retired":
                    r.retired.append(kid)
                elif ev == "key.expired":
                    r.in_jwks.discard(kid)
                elif ev == "key.destroyed":
                    assert kid not in r.in_jwks, f"{r.alg}: destroyed while still published"
                    r.alive.discard(kid)
        # What verifiers fetch, and what the backend holds.
        doc = vh.jwks()
        published = {k["kid"]: k for k in doc["keys"]}
        in_transit = vh.transit_by_ring()
        for name, r in rings.items():
            assert {k for k in published if k in r.alive} == r.in_jwks, (r.alg, ts(at))
            for kid in r.in_jwks:
                k = published[kid]
                assert k["alg"] == r.alg and k["use"] == "sig", k
                assert not PRIVATE_MEMBERS & set(k), k
                assert jwc_jwk.JWK(**k).thumbprint() == kid
            assert in_transit.get(name, set()) == r.alive, (r.alg, ts(at))
        assert set(published) == set().union(*(r.in_jwks for r in rings.values()))
        # Sign a token now with every ring's signer, with the longest lifetime
        # the ring allows ...
        promoted = "key.promoted" in expect
        km = KeyManager.from_config(home.config)
        for name, r in rings.items():
            jti = f"{r.alg}-{ts(at)}"
            if promoted and r.index % 4 == promotions:
                tok = vh.sign(at, ROT_G, jti, ring=name)
                r.cli_tokens += 1
            else:
                tok = km.sign(name, {"sub": "vault-e2e", "jti": jti}, ROT_G, at)
            assert jwt.get_unverified_header(tok) == {"alg": r.alg, "kid": r.active, "typ": "JWT"}
            assert r.active is not None
            r.tokens.append((tok, r.active, int((at + ROT_G).timestamp())))
        promotions += promoted
        # ... and every token still live verifies against the JWKS on disk.
        verifiers = Verifiers(doc)
        for r in rings.values():
            for tok, kid, exp in r.tokens:
                if at.timestamp() < exp:
                    assert kid in r.in_jwks, (r.alg, ts(at))
                    assert verifiers.verify(tok, r.alg)["exp"] == exp
                    if kid != r.active:
                        r.old_key_tokens += 1
        return by_ring

    step(T0, {"key.generated", "key.published", "key.promoted"})
    for i in range(1, 5):
        at = T0 + i * P
        before = {n: list(r.retired) for n, r in rings.items()}
        by_ring = step(at - A, {"key.generated", "key.published"})
        if i >= 2:
            # The key retired one rotation ago leaves the JWKS and transit now.
            for name, evs in by_ring.items():
                last = before[name][-1]
                assert ("key.expired", last) in evs and ("key.destroyed", last) in evs, evs
        if i == 4:
            break
        olds = {n: r.active for n, r in rings.items()}
        by_ring = step(at, {"key.promoted", "key.retired"})
        for name, evs in by_ring.items():
            assert ("key.retired", olds[name]) in evs, evs

    status = vh.status_json()
    for name, r in rings.items():
        assert r.cli_tokens == 1 and r.old_key_tokens == 3, (r.alg, r)
        keys = status["rings"][name]["keys"]
        assert [k["state"] for k in keys] == ["destroyed"] * 3 + ["active", "published"], keys
        assert [k["kid"] for k in keys[:3]] == r.retired[:3]
        assert all(k["alg"] == r.alg and k["backend"] == "vault" for k in keys)
        # Destroyed means deleted in transit: only the signer and its successor are left.
        assert vh.transit_by_ring()[name] == {r.active, keys[-1]["kid"]}
    proc = vh.run("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    vh.assert_no_secret_at_rest()


# --------------------------------------------------------------------------- backend behaviour


def test_one_request_per_signature(vault_env):
    bao = vault_env
    b = backend(bao)
    counter = RequestCounter(b.vault.session)
    for alg in ALGS:
        gen = b.generate("r", alg)
        signer = b.signer("r", gen.kid, alg)
        for i in range(3):
            counter.reset()
            si = signing_input(alg, {"i": i, "alg": alg})
            sig = signer(si)
            assert len(counter.urls) == 1, counter.urls
            assert counter.urls[0].startswith("POST ") and "/sign/" in counter.urls[0]
            verify_with_jwk(gen.public_jwk, si.decode() + "." + b64url(sig), alg)


def test_one_request_per_signature_through_keymanager(home, bao, monkeypatch):
    """The whole signing path of the Python API, state in Vault KV: one request per token.

    The signer and the state are cached; the store's fingerprint (one KV
    metadata read) is asked at most once per ``fingerprint_window`` (1 s).
    """
    kv_path = unique("keymgr-state-")
    vh = setup_home(home, bao, "PS256", state_url=f"vault://secret/{kv_path}")
    vh.ok("reconcile", "--at", ts(T0))
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    from keymgr.manager import KeyManager

    km = KeyManager.from_config(home.config)
    km.sign("default", {"warm": True})  # first use: state read, index built (LIST + read)
    to_transit = RequestCounter(km.config.backends["vault"].vault.session)
    to_kv = RequestCounter(km.store.adapter.vault.session)
    start = time.monotonic()
    tokens = [km.sign("default", {"i": i}) for i in range(5)]
    elapsed = time.monotonic() - start
    assert len(to_transit.urls) == 5, to_transit.urls
    assert all(u.startswith("POST ") and "/transit/sign/" in u for u in to_transit.urls)
    assert all("/secret/metadata/" in u for u in to_kv.urls), to_kv.urls
    assert len(to_kv.urls) <= 1 + int(elapsed), (elapsed, to_kv.urls)
    doc = vh.jwks()
    for tok in tokens:
        verify_token(doc, tok, "PS256")


def test_public_key_and_params_match_what_verifiers_expect(vault_env):
    """A fresh backend (no cache) finds a key by kid and signs PS384/ES512/EdDSA validly."""
    bao = vault_env
    prefix = unique("t") + "-"
    first = backend(bao, prefix)
    made = {alg: first.generate("r.x", alg) for alg in ("PS384", "ES512", "EdDSA")}
    fresh = backend(bao, prefix)
    assert sorted(fresh.list_keys("r.x")) == sorted(g.kid for g in made.values())
    assert fresh.list_keys("r") == [], "ring 'r' must not claim the keys of ring 'r.x'"
    for alg, gen in made.items():
        assert fresh.public_jwk("r.x", gen.kid) == gen.public_jwk
        si = signing_input(alg)
        sig = fresh.signer("r.x", gen.kid, alg)(si)
        verify_with_jwk(gen.public_jwk, si.decode() + "." + b64url(sig), alg)
    # Transit's own view of each key: never exportable, no plaintext backup.
    for name in bao.transit_keys():
        if name.startswith(prefix):
            data = bao.ok("GET", f"transit/keys/{name}")["data"]
            assert data["exportable"] is False and data["allow_plaintext_backup"] is False


def test_existing_key_of_another_type_is_refused(vault_env, monkeypatch):
    """create_key on an existing name answers 200 and changes nothing: detected."""
    bao = vault_env
    import keymgr.backends.vault.transit as vt

    b = backend(bao)
    fixed = "ab" * 16
    name = b.key_name("default", fixed)
    bao.ok("POST", f"transit/keys/{name}", {"type": "rsa-2048"})
    monkeypatch.setattr(vt, "_random_id", lambda *_: fixed)
    with pytest.raises(BackendError) as err:
        b.generate("default", "ES256")
    msg = str(err.value)
    assert msg.startswith("backend vault (vault-transit): generate:"), msg
    assert "already exists with type rsa-2048, not ecdsa-p256" in msg and "\n" not in msg
    # Untouched: still there, still RSA, still the one version.
    data = bao.ok("GET", f"transit/keys/{name}")["data"]
    assert data["type"] == "rsa-2048" and data["latest_version"] == 1

    # Same type but exportable (someone could export its private half): refused
    # too, and never offered for adoption by list_keys.
    fixed2 = "cd" * 16
    name2 = b.key_name("default", fixed2)
    bao.ok("POST", f"transit/keys/{name2}", {"type": "ecdsa-p256", "exportable": True})
    monkeypatch.setattr(vt, "_random_id", lambda *_: fixed2)
    with pytest.raises(BackendError, match="is exportable; refusing to use it"):
        b.generate("default", "ES256")
    assert transit_kid(bao, name2) not in b.list_keys("default")
    assert transit_kid(bao, name) in b.list_keys("default")  # wrong type: an orphan to destroy


def test_destroy_deletes_the_transit_key_and_is_idempotent(vault_env):
    bao = vault_env
    b = backend(bao)
    gen = b.generate("default", "ES384")
    names = [n for n in bao.transit_keys() if n.startswith(b.key_prefix)]
    assert len(names) == 1 and transit_kid(bao, names[0]) == gen.kid
    b.destroy("default", gen.kid)
    assert bao.api("GET", f"transit/keys/{names[0]}")[0] == 404
    b.destroy("default", gen.kid)  # again: fine
    backend(bao, b.key_prefix).destroy("default", gen.kid)  # from a fresh process: fine
    assert b.list_keys("default") == []
    with pytest.raises(BackendError, match=r"sign with .*: no transit key for default/"):
        b.signer("default", gen.kid, "ES384")


def test_check_and_connection_errors_are_one_line(vault_env):
    bao = vault_env
    backend(bao).check()
    b = backend(bao, url="http://127.0.0.1:9", retries=0)  # discard port: nothing listens
    with pytest.raises(BackendError) as err:
        b.check()
    msg = str(err.value)
    assert msg.startswith(
        "backend vault (vault-transit): check: cannot connect to http://127.0.0.1:9"
    )
    leaked = bao.token in msg
    assert "\n" not in msg and not leaked
    bad = backend(bao, mount="no-such-mount")
    with pytest.raises(BackendError, match=r"generate .*HTTP 404: no handler for route"):
        bad.generate("default", "ES256")
    with pytest.raises(BackendError, match=r"check: HTTP 404: no handler for route"):
        bad.check()


def test_check_is_one_small_request_whatever_the_mount_holds(vault_env, monkeypatch):
    """The daemon checks each backend on every heartbeat: one read of a name no
    key of keymgr's has, not a LIST of the mount (every key name), and it
    passes with nothing but the shipped least-privilege policy."""
    bao = vault_env
    b = backend(bao)
    for i in range(12):
        b.generate(f"ring{i}", "ES256")
    counter = RequestCounter(b.vault.session)
    b.check()
    assert len(counter.urls) == 1 and counter.urls[0].startswith("GET "), counter.urls
    assert counter.urls[0].endswith(f"/transit/keys/{b.key_prefix}readiness-check")
    monkeypatch.setenv("VAULT_TOKEN", _policy_token(bao, b.key_prefix, unique("kv/state-")))
    backend(bao, b.key_prefix).check()


# --------------------------------------------------------------------------- orphans


def test_orphans_adopted_or_destroyed_and_foreign_keys_survive(home, bao):
    vh = setup_home(home, bao, "ES256")
    p = vh.prefix
    foreign = [
        "foreign-" + uuid.uuid4().hex[:8],  # outside the prefix
        f"{p}default.not-a-keymgr-suffix",  # inside the prefix, not keymgr's naming
        f"{p}default.b.{'0' * 32}",  # ring "default.b", not ring "default"
    ]
    for name in foreign:
        bao.ok("POST", f"transit/keys/{name}", {"type": "ecdsa-p256"})
    # A real crash right after the backend created the key: SIGKILL.
    proc = vh.run("reconcile", "--at", ts(T0), env=vh.env(KEYMGR_CRASH_AT="generate.after_backend"))
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert vh.ring_keys() == []
    crashed = vh.ring_names()
    assert len(crashed) == 1
    crashed_kid = transit_kid(bao, crashed[0])
    # The crash left the write-ahead intent open; the key's name carries its nonce.
    nonce = json.loads((vh.home.dir / "state.json").read_text())["intents"]["default"]["nonce"]
    assert crashed[0].endswith(f".{nonce}" + crashed[0][-16:])
    # And an orphan of that intent of the wrong type: destroyed, not adopted.
    wrong = f"{p}default.{nonce}{'f' * 16}"
    bao.ok("POST", f"transit/keys/{wrong}", {"type": "rsa-2048"})
    wrong_kid = transit_kid(bao, wrong)

    evs = events_of(vh.ok("reconcile", "--at", ts(T0)))
    assert ("key.adopted", crashed_kid) in evs, evs
    assert ("key.orphan_destroyed", wrong_kid) in evs, evs
    assert ("key.promoted", crashed_kid) in evs, evs
    assert "key.generated" not in {e for e, _ in evs}, evs
    assert vh.ring_names() == crashed
    assert [k["kid"] for k in vh.ring_keys()] == [crashed_kid]
    shown = vh.ok("audit", "show", "--kid", wrong_kid, "--json")
    assert len(shown) == 1 and "key.orphan_destroyed" in shown[0], shown

    # A whole rotation later the adopted key is gone, the foreign ones are not.
    for at in (T0 + P - A, T0 + P, T0 + P + G, T0 + P + G + D):
        vh.ok("reconcile", "--at", ts(at))
    states = vh.states()
    assert states[crashed_kid] == "destroyed" and list(states.values()).count("active") == 1
    remaining = set(bao.transit_keys())
    assert set(foreign) <= remaining
    assert crashed[0] not in remaining and wrong not in remaining
    proc = vh.run("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # A key under keymgr's naming that no intent accounts for (made by a lost
    # state, or by someone else) is never destroyed: the next generate stops.
    stray = f"{p}default.{'a' * 32}"
    bao.ok("POST", f"transit/keys/{stray}", {"type": "ecdsa-p256"})
    proc = vh.run("reconcile", "--at", ts(T0 + 2 * P - A))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "keymgr adopt default" in proc.stderr and transit_kid(bao, stray) in proc.stderr
    assert stray in set(bao.transit_keys())


# --------------------------------------------------------------------------- faults


OUTAGE_TIMEOUT = TIMEOUT  # every request during the outage waits this long


def test_outage_mid_rotation_fails_fast_and_recovers(home, bao):
    """OpenBao hangs (SIGSTOP) between the steps of a rotation, then comes back.

    While it hangs: exit 1, one error line naming the backend and the
    operation, bounded by the request timeout; nothing promoted, lost or
    unpublished. After: the rotation completes, invariants hold, and
    ``keymgr audit verify`` passes (state in a file here, so the failure is
    the backend's; with the state in the same Vault the store fails first,
    see test_kv_store_errors_when_vault_hangs).
    """
    vh = setup_home(home, bao, "ES256", timeout=OUTAGE_TIMEOUT)
    vh.ok("reconcile", "--at", ts(T0))
    k1 = vh.ring_keys()[0]["kid"]
    tok1 = vh.sign(T0 + P - A - timedelta(minutes=1), G, "before-outage")
    jwks_before = home.jwks_path.read_bytes()

    failing = vh.fails

    # The successor is due, and OpenBao hangs (SIGSTOP: connections are
    # accepted by the kernel, never answered).
    with bao.outage():
        line, elapsed = failing("reconcile", "--at", ts(T0 + P - A))
        assert "backend vault" in line and "vault-transit" in line and "list keys" in line, line
        assert f"within {OUTAGE_TIMEOUT}s" in line, line
        # Bounded by the timeout (one request, no retry of a hung read) plus
        # interpreter start-up on a loaded machine.
        assert elapsed < OUTAGE_TIMEOUT + 8, elapsed
        line, _ = failing("sign", "default", "--claims", "{}")
        assert "backend vault (vault-transit): sign with" in line, line
        # Nothing promoted, nothing lost, nothing published; status needs no backend.
        assert vh.states() == {k1: "active"}
        status = vh.status_json()["rings"]["default"]
        assert [(k["kid"], k["state"]) for k in status["keys"]] == [(k1, "active")]
        assert status["next"]["action"] == "generate", status
        assert home.jwks_path.read_bytes() == jwks_before

    audit = vh.audit_text()
    assert '"event":"backend.failed"' in audit
    evs = events_of(vh.ok("reconcile", "--at", ts(T0 + P - A)))
    assert {"key.generated", "key.published"} <= {e for e, _ in evs}, evs
    k2 = next(kid for e, kid in evs if e == "key.generated")
    evs = events_of(vh.ok("reconcile", "--at", ts(T0 + P)))
    assert ("key.promoted", k2) in evs and ("key.retired", k1) in evs, evs
    verify_token(vh.jwks(), tok1, "ES256")  # the old key's token still verifies
    tok2 = vh.sign(T0 + P, timedelta(hours=1), "after")
    assert jwt.get_unverified_header(tok2)["kid"] == k2
    verify_token(vh.jwks(), tok2, "ES256")

    # Expiry needs no backend: it goes on during an outage. Destruction fails,
    # the key stays "expired" (and in transit), and is destroyed once back.
    with bao.outage():
        evs = events_of(vh.ok("reconcile", "--at", ts(T0 + P + G)))
        assert ("key.expired", k1) in evs, evs
        line, elapsed = failing("reconcile", "--at", ts(T0 + P + G + D))
        assert "backend vault (vault-transit): destroy" in line and k1 in line, line
        assert elapsed < OUTAGE_TIMEOUT + 8, elapsed
        assert vh.states() == {k1: "expired", k2: "active"}
    assert vh.transit_kids() == {k1, k2}
    evs = events_of(vh.ok("reconcile", "--at", ts(T0 + P + G + D)))
    assert ("key.destroyed", k1) in evs, evs
    assert vh.transit_kids() == {k2}
    assert vh.states() == {k1: "destroyed", k2: "active"}
    proc = vh.run("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert vh.audit_text().count('"event":"backend.failed"') >= 2
    vh.assert_no_secret_at_rest()


# --------------------------------------------------------------------------- KV state store
# CAS commit, lease and pass lock of the KV store are keymgr.docstore.SharedStore's,
# tested once by keymgr.testing.docstore.SharedStoreTests (tests/test_docstore_real.py
# runs them against this OpenBao, with the KV adapter's own messages and URL checks);
# here: the store under the real CLI.


def test_kv_store_concurrent_reconciles(home, bao):
    """Reconciles started at once, at every step of a rotation, against one KV store.

    Each burst starts N ``keymgr reconcile`` processes together. Invariants
    after each: exactly one active key, every live key in state is in
    transit and every transit key of the ring is in state (no lost key, no
    untracked orphan), and each transition was applied by exactly one process.
    """
    kv_path = unique("keymgr-state-")
    vh = setup_home(home, bao, "ES256", state_url=f"vault://secret/{kv_path}")
    home.set_ring(destroy_after="0s")
    n = 3
    cli = [sys.executable, "-m", "keymgr.cli", "--config", str(home.config)]

    def burst(at: datetime) -> list[tuple[str, str | None]]:
        procs = [
            subprocess.Popen(
                [*cli, "reconcile", "--at", ts(at)],
                cwd=home.dir,
                env=vh.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
        for out, err, rc in results:
            leaked = vh.token in out + err
            assert not leaked and "Traceback" not in err, "token leaked or traceback"
            assert rc == 0, (rc, out, err)
        applied = [ev for out, _, _ in results for ev in events_of(out.splitlines())]
        assert len(applied) == len(set(applied)), applied  # nothing done twice
        assert [e for e, _ in applied].count("key.generated") <= 1, applied
        return applied

    def check() -> dict[str, str]:
        states = vh.states()
        assert list(states.values()).count("active") == 1, states
        live = {kid for kid, s in states.items() if s != "destroyed"}
        assert vh.transit_kids() == live, states  # no lost key, no orphan left behind
        return states

    # D = 0: the retired key expires and is destroyed in one pass, so four
    # bursts cover a whole rotation.
    steps = [
        (T0, ["active"]),
        (T0 + P - A, ["active", "published"]),
        (T0 + P, ["active", "retired"]),
        (T0 + P + G, ["active", "destroyed"]),
    ]
    for at, expected in steps:
        applied = burst(at)
        assert applied, ts(at)
        assert sorted(check().values()) == expected, ts(at)
    tok = vh.sign(T0 + P + G, timedelta(hours=1), "after-race")
    verify_token(vh.jwks(), tok, "ES256")
    proc = vh.run("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (home.dir / "state.json").exists()  # the state really lives in Vault
    status, lock = bao.api("GET", f"secret/data/{kv_path}.lock")
    assert status == 200 and lock["data"]["data"] == {}  # released: the tombstone


# --------------------------------------------------------------------------- failure modes


def test_kv_store_errors_when_vault_hangs(home, bao):
    """State in the hung Vault: the pass stops at the store, one line, exit 1, nothing done."""
    kv_path = unique("keymgr-state-")
    vh = setup_home(home, bao, "ES256", state_url=f"vault://secret/{kv_path}?timeout=1")
    vh.ok("reconcile", "--at", ts(T0))
    before = vh.states()
    with bao.outage():
        line, elapsed = vh.fails("reconcile", "--at", ts(T0 + P - A))
    assert line == (
        f"keymgr: error: state vault://secret/{kv_path}: lock: no answer from {bao.addr} "
        "within 1s (timed out)"
    ), line
    assert elapsed < 1 + 8, elapsed
    assert vh.states() == before
    evs = events_of(vh.ok("reconcile", "--at", ts(T0 + P - A)))
    assert {"key.generated", "key.published"} <= {e for e, _ in evs}, evs


def test_sealed_throttled_and_denied_are_one_line_errors(home, bao, monkeypatch):
    """Sealed (503), throttled (429) and denied (403): exit 1, one line naming backend and op."""
    from keymgr.backends.vault.store import open_vault_store

    vh = setup_home(home, bao, "ES256")
    vh.ok("reconcile", "--at", ts(T0))
    (k1,) = vh.states()
    jwks_before = home.jwks_path.read_bytes()
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    b = backend(bao, vh.prefix)
    store = open_vault_store(f"vault://secret/{unique('keymgr-state-')}")

    with bao.sealed():
        line, _ = vh.fails("reconcile", "--at", ts(T0 + P - A))
        assert "backend vault (vault-transit): list keys: HTTP 503: Vault is sealed" in line, line
        with pytest.raises(BackendError) as err:
            b.signer("default", k1, "ES256")
        assert str(err.value) == (
            f"backend vault (vault-transit): sign with {k1}: HTTP 503: Vault is sealed"
        )
        with pytest.raises(StoreError, match=r"^state vault://secret/\S+: read: HTTP 503: Vault"):
            store.load()
        # The daemon's readiness check (one read of a name no key has, whose
        # 404 is the good answer) tells a sealed server from an absent key.
        with pytest.raises(BackendError) as err:
            b.check()
        assert str(err.value) == "backend vault (vault-transit): check: HTTP 503: Vault is sealed"
    b.check()
    assert vh.states() == {k1: "active"} and home.jwks_path.read_bytes() == jwks_before

    # Throttled: a rate-limit quota on this key's sign path.
    (name,) = vh.ring_names()
    quota = unique("q")
    bao.ok(
        "POST",
        f"sys/quotas/rate-limit/{quota}",
        {"path": f"transit/sign/{name}", "rate": 1, "interval": "60s"},
    )
    try:
        signer = b.signer("default", k1, "ES256")
        deadline = time.monotonic() + 5
        with pytest.raises(BackendError) as err:  # the first one or two may still pass
            while time.monotonic() < deadline:
                signer(signing_input("ES256"))
        msg = str(err.value)
        assert msg.startswith(f"backend vault (vault-transit): sign with {k1}: HTTP 429:"), msg
        assert "rate limit quota exceeded" in msg and "\n" not in msg
        line, _ = vh.fails("sign", "default", "--claims", "{}")
        assert f"sign with {k1}: HTTP 429" in line, line
    finally:
        bao.ok("DELETE", f"sys/quotas/rate-limit/{quota}")

    # Denied: a valid token without keymgr's policy.
    weak = bao.ok("POST", "auth/token/create", {"policies": ["default"], "ttl": "10m"})
    vh.secrets.append(weak["auth"]["client_token"])
    proc = vh.run(
        "reconcile", "--at", ts(T0 + P - A), env=vh.env(VAULT_TOKEN=weak["auth"]["client_token"])
    )
    assert proc.returncode == 1, proc
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("keymgr: error:")]
    assert "backend vault (vault-transit): list keys: HTTP 403: permission denied" in line, line
    assert vh.states() == {k1: "active"}

    # Nothing was promoted or lost; once reachable again the rotation goes on.
    evs = events_of(vh.ok("reconcile", "--at", ts(T0 + P - A)))
    assert {"key.generated", "key.published"} <= {e for e, _ in evs}, evs
    proc = vh.run("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert vh.audit_text().count('"event":"backend.failed"') >= 2  # sealed, denied


# --------------------------------------------------------------------------- policy and auth


def _policy(bao: Any, prefix: str, kv_path: str) -> str:
    """The shipped policy, for this test's key prefix and KV path; returns its name."""
    lines = []
    for line in POLICY_FILE.read_text().splitlines():
        if line.startswith("path "):
            line = line.replace("keymgr-*", f"{prefix}*").replace("keymgr/state", kv_path)
        lines.append(line)
    text = "\n".join(lines)
    # Keys and signing; every path of the state and the documents beside it.
    paths = [ln for ln in POLICY_FILE.read_text().splitlines() if ln.startswith("path ")]
    wanted = sum("keymgr/state" in ln for ln in paths)
    assert text.count(f"{prefix}*") == 2 and text.count(kv_path) == wanted >= 4, text
    name = unique("keymgr-policy-")
    bao.ok("PUT", f"sys/policies/acl/{name}", {"policy": text})
    return name


def _policy_token(bao: Any, prefix: str, kv_path: str) -> str:
    doc = bao.ok(
        "POST",
        "auth/token/create",
        {"policies": [_policy(bao, prefix, kv_path)], "no_default_policy": True, "ttl": "1h"},
    )
    return str(doc["auth"]["client_token"])


def test_least_privilege_policy_is_enough_and_no_more(home, bao, monkeypatch):
    kv_path = unique("keymgr-state-")
    vh = setup_home(home, bao, "RS256", state_url=f"vault://secret/{kv_path}")
    token = _policy_token(bao, vh.prefix, kv_path)
    vh.token = token
    vh.secrets.append(token)
    # A full rotation, through the CLI, with nothing but the shipped policy
    # (state, lock and audit anchor in KV; keys in transit).
    vh.ok("reconcile", "--at", ts(T0))
    for at in (T0 + P - A, T0 + P, T0 + P + G, T0 + P + G + D):
        vh.ok("reconcile", "--at", ts(at))
    states = sorted(vh.states().values())
    assert states == ["active", "destroyed"], states
    verify_token(vh.jwks(), vh.sign(T0 + P + G + D, timedelta(minutes=5), "p"), "RS256")
    # The daemon replicas' lease, with the same token.
    from keymgr.backends.vault.store import open_vault_store

    from keymgr.lease import Lease

    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", token)
    lease = Lease(open_vault_store(f"vault://secret/{kv_path}"), timedelta(seconds=30))
    assert lease.acquire(datetime.now(UTC))
    lease.release()
    # ... and what a stolen keymgr token still cannot do.
    name = vh.ring_names()[0]
    denied = [
        ("POST", f"transit/keys/{vh.prefix}x", {"type": "ecdsa-p256", "exportable": True}),
        ("POST", f"transit/keys/{name}/config", {"exportable": True}),
        ("POST", f"transit/keys/{name}/config", {"allow_plaintext_backup": True}),
        ("GET", f"transit/export/signing-key/{name}", None),
        ("GET", f"transit/backup/{name}", None),
        ("POST", "transit/keys/not-keymgr", {"type": "ecdsa-p256"}),
        ("GET", "secret/data/other", None),
    ]
    for method, path, body in denied:
        status, doc = bao.api(method, path, body, token=token)
        assert status == 403, (method, path, status, doc)


def test_approle_login_and_relogin_after_expiry(vault_env, tmp_path):
    bao = vault_env
    mount = unique("approle-")
    bao.ok("POST", f"sys/auth/{mount}", {"type": "approle"})
    prefix = unique("t") + "-"
    pol = _policy(bao, prefix, "unused")
    bao.ok(
        "POST",
        f"auth/{mount}/role/keymgr",
        {"token_policies": [pol], "token_ttl": "2s", "token_max_ttl": "2s"},
    )
    role_id = bao.ok("GET", f"auth/{mount}/role/keymgr/role-id")["data"]["role_id"]
    secret_id = bao.ok("POST", f"auth/{mount}/role/keymgr/secret-id")["data"]["secret_id"]
    sid = tmp_path / "secret-id"
    sid.write_text(secret_id + "\n")
    b = backend(
        bao,
        prefix,
        auth="approle",
        role_id=role_id,
        secret_id_file=str(sid),
        approle_mount=mount,
    )
    counter = RequestCounter(b.vault.session)
    gen = b.generate("default", "ES256")
    assert any(f"/auth/{mount}/login" in u for u in counter.urls), counter.urls
    signer = b.signer("default", gen.kid, "ES256")
    time.sleep(2.5)  # the token expires
    counter.reset()
    si = signing_input("ES256")
    sig = signer(si)
    verify_with_jwk(gen.public_jwk, si.decode() + "." + b64url(sig), "ES256")
    logins = [u for u in counter.urls if "/login" in u]
    signs = [u for u in counter.urls if "/sign/" in u]
    assert len(logins) == 1 and len(signs) == 2, counter.urls  # denied, re-login, signed
    # A wrong secret id: one line naming the login, never the secret.
    sid.write_text("00000000-0000-0000-0000-000000000000")
    bad = backend(
        bao, prefix, auth="approle", role_id=role_id, secret_id_file=str(sid), approle_mount=mount
    )
    with pytest.raises(BackendError) as err:
        bad.list_keys("default")
    msg = str(err.value)
    assert f"list keys: login (approle at auth/{mount}): HTTP 400" in msg, msg
    assert secret_id not in msg and "\n" not in msg


def test_token_file_is_reread_when_the_token_is_refused(vault_env, tmp_path):
    bao = vault_env

    def new_token() -> str:
        doc = bao.ok("POST", "auth/token/create", {"policies": ["root"], "ttl": "1h"})
        return str(doc["auth"]["client_token"])

    t1, t2 = new_token(), new_token()
    tf = tmp_path / "token"
    tf.write_text(t1 + "\n")
    b = backend(bao, token_file=str(tf))
    b.check()
    bao.ok("POST", "auth/token/revoke", {"token": t1})
    tf.write_text(t2)  # what Vault Agent does when it renews the sink
    b.check()
    bao.ok("POST", "auth/token/revoke", {"token": t2})
    with pytest.raises(BackendError) as err:
        b.check()
    msg = str(err.value)
    assert msg == "backend vault (vault-transit): check: HTTP 403: permission denied", msg


def test_a_token_file_replaced_by_a_fifo_is_refused_not_waited_on(vault_env, tmp_path):
    """The token file (a Vault Agent sink) replaced by a FIFO: reading it
    would wait for a writer, and every call of the daemon with it. The call
    fails at once, in one line naming the file."""
    tf = tmp_path / "token"
    os.mkfifo(tf)
    b = backend(vault_env, token_file=str(tf))
    done: list[BaseException] = []

    def call() -> None:
        try:
            b.check()
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the token file was waited on"
    assert len(done) == 1 and isinstance(done[0], BackendError), done
    msg = str(done[0])
    assert f"cannot read token file {tf} (is not a regular file" in msg and "\n" not in msg, msg


class _TokenReviewAPI(BaseHTTPRequestHandler):
    """The one Kubernetes API call OpenBao's kubernetes auth makes: a TokenReview.

    A real cluster is not available here, so this answers TokenReview like the
    API server does: authenticated for the one service-account token it knows.
    OpenBao, its kubernetes auth method and keymgr's login are all real.
    """

    known: dict[str, dict[str, Any]] = {}  # token -> the user the API server reports
    reviews: list[str] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        token = body["spec"]["token"]
        self.reviews.append(self.path)
        user = self.known.get(token)
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is not None:
            # The token's audiences that the review asked for (all of them).
            status["user"] = user
            status["audiences"] = body["spec"].get("audiences") or []
        out = json.dumps(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def _self_signed_ca() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-ca")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _service_account_jwt(namespace: str, name: str, uid: str) -> str:
    """A service-account token shaped like the kubelet's projected token."""
    from cryptography.hazmat.primitives.asymmetric import ec

    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "iat": int(time.time()),
        "exp": int(time.time()) + 3600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    }
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")


def test_kubernetes_auth_login(vault_env, tmp_path):
    """Login with the pod's service-account token at a real kubernetes auth mount.

    The service-account token file is read lazily (config check stays
    offline) and at each login, so a rotated projected token is picked up.
    """
    bao = vault_env
    jwt_file = tmp_path / "sa-token"
    prefix = unique("t") + "-"
    b = backend(bao, prefix, auth="kubernetes", role="keymgr", jwt_file=str(jwt_file))  # no I/O
    with pytest.raises(BackendError) as err:
        b.check()
    assert f"check: cannot read service account token file {jwt_file}" in str(err.value)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenReviewAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mount = unique("k8s-")
        bao.ok("POST", f"sys/auth/{mount}", {"type": "kubernetes"})
        bao.ok(
            "POST",
            f"auth/{mount}/config",
            {
                "kubernetes_host": f"http://127.0.0.1:{server.server_address[1]}",
                # Not in a pod: no local CA/JWT files. The CA is never used
                # (the API server here is plain HTTP) but must be given.
                "disable_local_ca_jwt": True,
                "kubernetes_ca_cert": _self_signed_ca(),
            },
        )
        bao.ok(
            "POST",
            f"auth/{mount}/role/keymgr",
            {
                "bound_service_account_names": ["keymgr"],
                "bound_service_account_namespaces": ["keymgr"],
                "token_policies": [_policy(bao, prefix, "unused")],
                "token_ttl": "10m",
            },
        )
        sa_token = _service_account_jwt("keymgr", "keymgr", "0d2c1b5e-1f0e-4d6a-9a55-5d5f0c0e0b01")
        _TokenReviewAPI.known[sa_token] = {
            "username": "system:serviceaccount:keymgr:keymgr",
            "uid": "0d2c1b5e-1f0e-4d6a-9a55-5d5f0c0e0b01",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:keymgr"],
        }
        jwt_file.write_text(sa_token + "\n")
        b = backend(
            bao,
            prefix,
            auth="kubernetes",
            role="keymgr",
            jwt_file=str(jwt_file),
            kubernetes_mount=mount,
        )
        counter = RequestCounter(b.vault.session)
        gen = b.generate("default", "ES256")
        login = [i for i, u in enumerate(counter.urls) if u.endswith(f"/v1/auth/{mount}/login")]
        assert len(login) == 1, counter.urls
        body = counter.bodies[login[0]]
        assert json.loads(body) == {"role": "keymgr", "jwt": sa_token}
        assert _TokenReviewAPI.reviews, "OpenBao never asked the API server"
        si = signing_input("ES256")
        verify_with_jwk(
            gen.public_jwk,
            si.decode() + "." + b64url(b.signer("default", gen.kid, "ES256")(si)),
            "ES256",
        )

        # A token the API server does not accept: one line, no token in it.
        other = _service_account_jwt("keymgr", "keymgr", "0d2c1b5e-1f0e-4d6a-9a55-5d5f0c0e0b01")
        jwt_file.write_text(other)
        bad = backend(
            bao,
            prefix,
            auth="kubernetes",
            role="keymgr",
            jwt_file=str(jwt_file),
            kubernetes_mount=mount,
        )
        with pytest.raises(BackendError) as err:
            bad.check()
        msg = str(err.value)
        assert msg.startswith(
            f"backend vault (vault-transit): check: login (kubernetes at auth/{mount}): HTTP 403"
        ), msg
        assert other not in msg and other.split(".")[2] not in msg and "\n" not in msg
    finally:
        server.shutdown()
        server.server_close()


def test_namespace(vault_env, monkeypatch):
    """Keys and state inside an OpenBao namespace: from the config field or VAULT_NAMESPACE."""
    from keymgr.backends.vault.store import open_vault_store

    bao = vault_env
    ns = unique("ns-")
    bao.ok("POST", f"sys/namespaces/{ns}", {})
    bao.ok("POST", f"{ns}/sys/mounts/transit", {"type": "transit"})
    bao.ok("POST", f"{ns}/sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    prefix = unique("t") + "-"
    b = backend(bao, prefix, namespace=ns)
    gen = b.generate("r", "EdDSA")
    si = signing_input("EdDSA")
    sig = b.signer("r", gen.kid, "EdDSA")(si)
    verify_with_jwk(gen.public_jwk, si.decode() + "." + b64url(sig), "EdDSA")
    in_ns = bao.transit_keys(f"{ns}/transit")
    assert [n for n in in_ns if n.startswith(prefix)] == [f"{prefix}r.{in_ns[0][-32:]}"]
    assert not [n for n in bao.transit_keys() if n.startswith(prefix)]  # not in the root
    assert backend(bao, prefix).list_keys("r") == []
    monkeypatch.setenv("VAULT_NAMESPACE", ns)  # like the vault CLI
    assert backend(bao, prefix).list_keys("r") == [gen.kid]
    store = open_vault_store("vault://secret/keymgr/state")
    with store.exclusive():
        assert store.commit(State(), None).number == 1
    assert bao.api("GET", f"{ns}/secret/data/keymgr/state")[0] == 200
    monkeypatch.delenv("VAULT_NAMESPACE")
    state, token = open_vault_store(f"vault://secret/keymgr/state?namespace={ns}").load()
    assert state == State() and token is not None and token.number == 1
    b.destroy("r", gen.kid)
    assert bao.transit_keys(f"{ns}/transit") == []


def test_tls_ca_bundle(tmp_path, monkeypatch):
    """A TLS server with its own CA: trusted through ca_cert or VAULT_CACERT, refused without."""
    from keymgr.backends.vault.store import open_vault_store

    from tests.servers_bao import start_bao

    for k in list(os.environ):
        if k.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(k)
    server = start_bao(tmp_path, tls=True)
    try:
        assert server.addr.startswith("https://") and server.ca_cert is not None
        monkeypatch.setenv("VAULT_TOKEN", server.token)
        ca = str(server.ca_cert)
        b = backend(server, ca_cert=ca)
        gen = b.generate("r", "ES256")
        si = signing_input("ES256")
        verify_with_jwk(
            gen.public_jwk, si.decode() + "." + b64url(b.signer("r", gen.kid, "ES256")(si)), "ES256"
        )

        with pytest.raises(BackendError) as err:
            backend(server, b.key_prefix).check()
        msg = str(err.value)
        assert msg == (
            f"backend vault (vault-transit): check: TLS error with {server.addr} "
            "(CERTIFICATE_VERIFY_FAILED)"
        ), msg
        backend(server, tls_verify=False).check()  # explicitly insecure: allowed
        monkeypatch.setenv("VAULT_CACERT", ca)  # like the vault CLI
        assert backend(server, b.key_prefix).list_keys("r") == [gen.kid]

        # The KV store, with the CA as a URL parameter and the address from VAULT_ADDR.
        monkeypatch.delenv("VAULT_CACERT")
        monkeypatch.setenv("VAULT_ADDR", server.addr)
        store = open_vault_store(f"vault://secret/keymgr/state?ca_cert={ca}")
        token = store.commit(State(), None)
        assert token.number == 1 and store.load() == (State(), token)
        with pytest.raises(StoreError, match="read: TLS error with https://"):
            open_vault_store("vault://secret/keymgr/state").load()
    finally:
        server.stop()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": 1}, "backends.vault.bogus: unknown option"),
        ({"token": "s.abc"}, "backends.vault.token: a literal token is refused"),
        ({"rsa_bits": 1024}, "backends.vault.rsa_bits: transit supports 2048, 3072, 4096"),
        ({"key_prefix": "-x"}, "backends.vault.key_prefix: expected"),
        ({"key_prefix": "a/b"}, "backends.vault.key_prefix: expected"),
        ({"mount": "a b"}, "backends.vault.mount: expected a mount path"),
        ({"timeout": 0}, "backends.vault.timeout: must be between 0.1 and 300, got 0"),
        ({"timeout": "2s"}, "backends.vault.timeout: expected a number, got '2s'"),
        ({"tls_verify": "no"}, "backends.vault.tls_verify: expected true or false"),
        ({"auth": "ldap"}, "backends.vault.auth: unknown auth method 'ldap'"),
        ({"auth": "approle"}, 'backends.vault.role_id: required with auth = "approle"'),
        ({"auth": "kubernetes"}, 'backends.vault.role: required with auth = "kubernetes"'),
        ({"role_id": "x"}, 'backends.vault.role_id: only used with auth = "approle"'),
        ({"url": "vault.example:8200"}, "backends.vault.url: expected http(s)://HOST[:PORT]"),
        ({"url": "https://u:p@vault.example"}, "backends.vault.url: must not carry credentials"),
    ],
)
def test_config_errors_name_the_field(options, message):
    opts = {"type": "vault-transit", "url": "http://127.0.0.1:1", **options}
    with pytest.raises(ConfigError) as err:
        VaultTransitBackend("vault", opts, "/etc/keymgr")
    assert str(err.value).startswith(message), str(err.value)


def test_environment_like_the_vault_cli(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("VAULT_"):
            monkeypatch.delenv(k)
    opts = {"type": "vault-transit"}
    with pytest.raises(ConfigError, match=r"backends.vault.url: required \(or set VAULT_ADDR\)"):
        VaultTransitBackend("vault", opts, str(tmp_path))
    monkeypatch.setenv("VAULT_ADDR", "https://vault.example:8200")
    monkeypatch.setenv("VAULT_NAMESPACE", "team-a")
    monkeypatch.setenv("VAULT_CACERT", "/etc/ssl/vault-ca.pem")
    s = VaultTransitBackend("vault", opts, str(tmp_path)).vault.settings
    assert (s.url, s.namespace, s.verify) == (
        "https://vault.example:8200",
        "team-a",
        "/etc/ssl/vault-ca.pem",
    )
    assert (s.timeout, s.auth, s.retries) == (10.0, "token", 2)
    # Config fields win over the environment; relative paths follow the config file.
    s = VaultTransitBackend(
        "vault",
        {
            **opts,
            "url": "https://other:8200",
            "namespace": "b",
            "ca_cert": "ca.pem",
            "token_file": "tok",
        },
        str(tmp_path),
    ).vault.settings
    assert (s.url, s.namespace, s.verify) == ("https://other:8200", "b", str(tmp_path / "ca.pem"))
    assert s.token_file == tmp_path / "tok"
    assert key_type_for("PS512", 4096) == "rsa-4096" and key_type_for("ES512", 0) == "ecdsa-p521"


def test_config_check_is_offline_and_names_file_and_field(home):
    text = home.config.read_text()
    text += (
        '\n[backends.vault]\ntype = "vault-transit"\nurl = "https://vault.invalid:8200"\n'
        'key_prefix = "keymgr-"\n'
    )
    home.config.write_text(text)
    home.set_ring(backend="vault")
    proc = home.run("config", "check")
    assert proc.returncode == 0, proc.stderr  # no network: vault.invalid never resolved
    home.config.write_text(home.config.read_text() + 'token = "s.literal"\n')
    proc = home.run("config", "check")
    assert proc.returncode == 2
    assert f"{home.config}: backends.vault.token: a literal token is refused" in proc.stderr
    assert "s.literal" not in proc.stderr
    # The vault:// state URL is checked offline too, with the file and the field.
    text = home.config.read_text().replace('token = "s.literal"\n', "")
    good = "vault://secret/keymgr/state?url=https://vault.invalid:8200&lock_ttl=30"
    home.config.write_text(with_state_url(text, good))
    proc = home.run("config", "check")
    assert proc.returncode == 0, proc.stderr
    bad = "vault://secret/keymgr/state?url=https://vault.invalid:8200&colour=blue"
    home.config.write_text(with_state_url(text, bad))
    proc = home.run("config", "check")
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        f"keymgr: error: {home.config}: daemon.state?colour: unknown option (known: "
    ), proc.stderr
