"""The PKCS#11 backend against a real SoftHSM2 token.

No mocks of the token: every test talks to the SoftHSM2 token of
``tests/servers_softhsm.py`` (one token directory per xdist worker; each test
uses its own ``label_prefix``, so tests sharing a token never see each
other's keys). What is on the token is looked at from a separate process with
python-pkcs11 directly (``SoftHSM.tool``), never through the backend; tokens
are verified by PyJWT *and* jwcrypto against the JWKS file as it is on disk.

The CLI runs in subprocesses that find the ``pkcs11`` backend type through an
entry point (a ``.dist-info`` on their ``PYTHONPATH``, see
``servers_softhsm.write_plugin_dist``); objects made in this process find it
through ``keymgr.plugins.BUILTIN``, patched for the test when keymgr's own
table does not list it yet (fixture ``registered``).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws

from keymgr import plugins
from keymgr.backend import Backend
from keymgr.errors import BackendError, ConfigError, KeyNotFoundError
from keymgr.testing.conformance import BackendTests
from tests.conftest import SHORT_POLICY, T0, A, P, read_state
from tests.servers_softhsm import ENTRY_POINT, SPARE, SoftHSM, softhsm_session

ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"]
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unique(tag: str) -> str:
    return f"{tag}{secrets.token_hex(5)}"


def b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    """The worker's SoftHSM2 tokens (tests/servers_softhsm.py)."""
    yield from softhsm_session(tmp_path_factory)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """``type = "pkcs11"`` resolves in this process, as it will once keymgr lists it."""
    table = plugins.BUILTIN[plugins.BACKENDS]
    if "pkcs11" not in table:
        monkeypatch.setitem(table, "pkcs11", ENTRY_POINT)


@pytest.fixture
def spare_logged_out(softhsm: SoftHSM) -> Any:
    """No session of this process on the spare token, before and after the test: a
    process logs in once, so a wrong PIN would otherwise not even be tried."""
    from keymgr.backends.pkcs11.token import token_session

    session = token_session(Path(softhsm.module), SPARE, None)
    session.drop()
    yield
    session.drop()


def make_backend(hsm: SoftHSM, tmp_path: Path, name: str = "hsm", **extra: Any) -> Backend:
    """A backend as ``[backends.NAME]`` makes it: the class by type name, then the table."""
    pin = tmp_path / "hsm.pin"
    if not pin.exists():
        hsm.pin_file(pin)
    options = {**hsm.options(pin, label_prefix=unique("t")), **extra}
    options = {k: v for k, v in options.items() if v is not None}
    cls = plugins.backend_class("pkcs11", f"backends.{name}.type (pkcs11)")
    return cls(name, options, str(tmp_path))


def kid_of_pem(pem: str) -> str:
    """The RFC 7638 thumbprint of a PEM public key, by jwcrypto (not keymgr)."""
    return str(jwc_jwk.JWK.from_pem(pem.encode()).thumbprint())


def pairs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """CKA_ID hex -> {"label", "kid", "private": the private object's record or None}."""
    out: dict[str, dict[str, Any]] = {}
    for o in objects:
        rec = out.setdefault(o["id"], {"label": o["label"], "kid": None, "private": None})
        if o["class"] == "public":
            rec["kid"] = kid_of_pem(o["pem"])
        else:
            rec["private"] = o
    return out


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


def signing_input(alg: str, claims: dict[str, Any] | None = None) -> bytes:
    header = {"alg": alg, "kid": "k", "typ": "JWT"}
    payload = claims if claims is not None else {"sub": "x"}
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}".encode()


def verify_with_jwk(public_jwk: dict[str, str], data: bytes, signature: bytes, alg: str) -> None:
    doc = {"keys": [{**public_jwk, "alg": alg, "use": "sig", "kid": "k"}]}
    Verifiers(doc).verify(f"{data.decode()}.{b64url(signature)}", alg)


# --------------------------------------------------------------------------- conformance


class TestPkcs11(BackendTests):
    """Every algorithm: SoftHSM 2.6 offers every mechanism keymgr needs, CKM_EDDSA included."""

    @pytest.fixture
    def backend(self, softhsm: SoftHSM, registered: None, tmp_path: Path) -> Backend:
        return make_backend(softhsm, tmp_path)


# --------------------------------------------------------------------------- CLI home


@dataclass
class HsmHome:
    """A ``home`` whose rings live on the SoftHSM token (backend ``hsm``)."""

    home: Any
    hsm: SoftHSM
    table: dict[str, Any]
    base: str
    secrets: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return str(self.table["label_prefix"])

    def write(self) -> None:
        lines = ["", "[backends.hsm]"]
        for k, v in self.table.items():
            lines.append(f"{k} = {json.dumps(v)}")
        self.home.config.write_text(self.base + "\n".join(lines) + "\n")

    def configure(self, **changes: Any) -> None:
        """Change ``[backends.hsm]`` (None removes an option) and rewrite the config."""
        for k, v in changes.items():
            if v is None:
                self.table.pop(k, None)
            else:
                self.table[k] = v
        self.write()

    def add_ring(self, ring: str, alg: str, policy: dict[str, str]) -> None:
        self.base += f'\n[keyrings.{ring}]\nbackend = "hsm"\nalgorithm = "{alg}"\n'
        self.base += "".join(f'{k} = "{v}"\n' for k, v in policy.items())
        self.base += 'publishers = ["site"]\n'
        self.write()

    def env(self, **extra: str) -> dict[str, str]:
        return self.hsm.env(self.home.env(), **extra)

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = self.home.run(*args, env=env or self.env(), timeout=timeout)
        out = proc.stdout + proc.stderr
        for secret in [self.hsm.pin, self.hsm.so_pin, *self.secrets]:
            leaked = secret in out  # never let pytest print the secret itself
            assert not leaked, f"a PIN leaked into the output of keymgr {args}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str) -> list[str]:
        proc = self.run(*args)
        assert proc.returncode == 0, f"keymgr {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return [line for line in proc.stdout.splitlines() if line.strip()]

    def fails(self, *args: str, code: int = 1) -> str:
        """Run a command that must fail with ``code`` and exactly one error line; that line."""
        proc = self.run(*args)
        assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("keymgr: error:")]
        assert len(errors) == 1, proc.stderr
        return errors[0]

    def state(self) -> dict[str, Any]:
        path = self.home.dir / "state.json"
        return read_state(path) if path.exists() else {"rings": {}}

    def states(self, ring: str = "default") -> dict[str, str]:
        r = self.state()["rings"].get(ring)
        return {k["kid"]: k["state"] for k in r["keys"]} if r else {}

    def on_token(self) -> dict[str, set[str]]:
        """ring -> kids of the complete key pairs under this home's prefix (read outside keymgr)."""
        out: dict[str, set[str]] = {}
        for rec in pairs(self.hsm.objects(self.prefix + "/")).values():
            if rec["kid"] is not None and rec["private"] is not None:
                out.setdefault(rec["label"].split("/", 1)[1], set()).add(rec["kid"])
        return out

    def sign(self, at: datetime, ttl: timedelta, jti: str, ring: str = "default") -> str:
        out = self.ok(
            "sign", ring, "--claims", json.dumps({"sub": "hsm-e2e", "jti": jti}),
            "--ttl", f"{int(ttl.total_seconds())}s", "--at", ts(at),
        )  # fmt: skip
        assert len(out) == 1, out
        return out[0]

    def assert_no_secret_at_rest(self) -> None:
        for path in sorted(self.home.dir.rglob("*")):
            if not path.is_file() or path.name == "hsm.pin" or path.suffix == ".pin":
                continue
            data = path.read_bytes()
            for secret in [self.hsm.pin, self.hsm.so_pin, *self.secrets]:
                leaked = secret.encode() in data
                assert not leaked, f"a PIN is stored in {path.name}"


def setup_home(home: Any, hsm: SoftHSM, alg: str = "ES256", **table: Any) -> HsmHome:
    hsm.pin_file(home.dir / "hsm.pin")
    home.set_ring(backend="local", algorithm=alg, **SHORT_POLICY)
    base = home.config.read_text().replace('backend = "local"', 'backend = "hsm"')
    options = {
        "type": "pkcs11",
        "module": hsm.module,
        "token_label": hsm.label,
        "pin_file": "hsm.pin",  # relative: to the config file's folder
        "label_prefix": unique("h"),
        "rsa_bits": 2048,
        **table,
    }
    hh = HsmHome(home, hsm, options, base)
    hh.write()
    return hh


def ring_events(lines: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(event, ring, kid) of each transition line printed by ``reconcile``."""
    out = []
    for line in lines:
        parts = line.split()
        ring = next((p[5:] for p in parts if p.startswith("ring=")), None)
        kid = next((p[4:] for p in parts if p.startswith("kid=")), None)
        out.append((parts[1], ring, kid))
    return out


def events_of(lines: list[str]) -> list[tuple[str, str | None]]:
    return [(ev, kid) for ev, _, kid in ring_events(lines)]


# --------------------------------------------------------------------------- rotations

# Three rotations in few passes: a retired key expires exactly when the next
# successor is generated (G = P - A) and is destroyed in the same pass (D = 0).
ROT_G = P - A
ROT_POLICY = {**SHORT_POLICY, "retire_grace": "239h", "destroy_after": "0s"}


def ring_name(alg: str) -> str:
    return "default" if alg == "ES256" else alg.lower()


@dataclass
class RingTrack:
    alg: str
    index: int
    alive: set[str] = field(default_factory=set)  # on the token
    in_jwks: set[str] = field(default_factory=set)
    active: str | None = None
    retired: list[str] = field(default_factory=list)
    tokens: list[tuple[str, str, int]] = field(default_factory=list)  # (jws, kid, exp)
    old_key_tokens: int = 0
    cli_tokens: int = 0


def test_three_rotations_every_algorithm(home, softhsm, registered):
    """Three full rotations of ten rings (one per algorithm) through the CLI, with ``--at``.

    After each ``keymgr reconcile``: the JWKS on disk holds exactly the keys
    that should be published, with no private member; the token holds exactly
    the keys not yet destroyed (read from another process); a token is signed
    with every ring's active key and every token still live verifies with
    PyJWT and jwcrypto against that JWKS. Each ring gets one token from
    ``keymgr sign`` and the rest from a ``KeyManager`` in this process (the
    daemon's signing path, on keys other processes generated).
    """
    from keymgr.manager import KeyManager

    hh = setup_home(home, softhsm, "ES256")
    home.set_ring(**ROT_POLICY)
    hh.base = home.config.read_text().split("\n[backends.hsm]")[0]
    for alg in ALGS[1:]:
        hh.add_ring(ring_name(alg), alg, ROT_POLICY)
    rings = {ring_name(alg): RingTrack(alg, i) for i, alg in enumerate(ALGS)}
    promotions = 0

    def step(at: datetime, expect: set[str]) -> dict[str, list[tuple[str, str | None]]]:
        nonlocal promotions
        lines = hh.ok("reconcile", "--at", ts(at))
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
        doc = home.jwks()
        published = {k["kid"]: k for k in doc["keys"]}
        on_token = hh.on_token()
        for name, r in rings.items():
            assert {k for k in published if k in r.alive} == r.in_jwks, (r.alg, ts(at))
            for kid in r.in_jwks:
                k = published[kid]
                assert k["alg"] == r.alg and k["use"] == "sig", k
                assert not PRIVATE_MEMBERS & set(k), k
                assert jwc_jwk.JWK(**k).thumbprint() == kid
            assert on_token.get(name, set()) == r.alive, (r.alg, ts(at))
        assert set(published) == set().union(*(r.in_jwks for r in rings.values()))
        promoted = "key.promoted" in expect
        km = KeyManager.from_config(home.config)
        for name, r in rings.items():
            jti = f"{r.alg}-{ts(at)}"
            if promoted and r.index % 4 == promotions:
                tok = hh.sign(at, ROT_G, jti, ring=name)
                r.cli_tokens += 1
            else:
                tok = km.sign(name, {"sub": "hsm-e2e", "jti": jti}, ROT_G, at)
            assert jwt.get_unverified_header(tok) == {"alg": r.alg, "kid": r.active, "typ": "JWT"}
            assert r.active is not None
            r.tokens.append((tok, r.active, int((at + ROT_G).timestamp())))
        promotions += promoted
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
            for name, evs in by_ring.items():
                last = before[name][-1]
                assert ("key.expired", last) in evs and ("key.destroyed", last) in evs, evs
        if i == 4:
            break
        olds = {n: r.active for n, r in rings.items()}
        by_ring = step(at, {"key.promoted", "key.retired"})
        for name, evs in by_ring.items():
            assert ("key.retired", olds[name]) in evs, evs

    status = json.loads("\n".join(hh.ok("status", "--json")))
    on_token = hh.on_token()
    for name, r in rings.items():
        assert r.cli_tokens == 1 and r.old_key_tokens == 3, (r.alg, r)
        keys = status["rings"][name]["keys"]
        assert [k["state"] for k in keys] == ["destroyed"] * 3 + ["active", "published"], keys
        assert [k["kid"] for k in keys[:3]] == r.retired[:3]
        assert all(k["alg"] == r.alg and k["backend"] == "hsm" for k in keys)
        # Destroyed means deleted from the token: only the signer and its successor are left.
        assert on_token[name] == {r.active, keys[-1]["kid"]}
    proc = hh.run("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hh.assert_no_secret_at_rest()


# --------------------------------------------------------------------------- the PIN


def test_the_pin_never_leaks(home, softhsm, registered, spare_logged_out, tmp_path):
    """A distinctive PIN, through the daemon, every command and every failure:
    never in stdout, stderr, logs, exceptions or any file keymgr writes."""
    hh = setup_home(home, softhsm, "ES256")
    wrong = "wrong-" + secrets.token_hex(8)
    hh.secrets.append(wrong)
    hh.ok("config", "check")
    # The daemon first (its clock is the real one, before the --at times below).
    daemon_out = run_daemon_briefly(hh)
    assert "daemon.started" in daemon_out, daemon_out
    assert "key.promoted" in (home.dir / "audit.jsonl").read_text()
    for secret in (softhsm.pin, softhsm.so_pin):
        leaked = secret in daemon_out
        assert not leaked, "the PIN leaked into the daemon's output"
    hh.ok("reconcile", "--at", ts(T0))
    hh.ok("status")
    hh.ok("status", "--json")
    hh.ok("plan", "--at", ts(T0 + P))
    hh.ok("jwks")
    hh.sign(T0, timedelta(minutes=5), "leak-1")
    hh.ok("reconcile", "--at", ts(T0 + P - A))
    hh.ok("audit", "verify")
    hh.ok("audit", "show")
    # The PIN from an environment variable instead of a file.
    hh.configure(pin_file=None, pin_env="HSM_TEST_PIN")
    with_pin = hh.env(HSM_TEST_PIN=softhsm.pin)
    for args in (("reconcile", "--at", ts(T0 + P)), ("sign", "default", "--claims", "{}")):
        proc = hh.run(*args, env=with_pin)
        assert proc.returncode == 0, proc.stderr
    line = hh.fails("sign", "default", "--claims", "{}")  # HSM_TEST_PIN unset
    assert "environment variable HSM_TEST_PIN is not set or empty" in line, line
    # Failures: a wrong PIN (on the spare token), a PIN file open to others, in the CLI ...
    hh.configure(pin_env=None, pin_file="wrong.pin", token_label=SPARE)
    softhsm.pin_file(home.dir / "wrong.pin", wrong)
    hh.fails("reconcile", "--at", ts(T0 + 2 * P - A))
    hh.fails("sign", "default", "--claims", "{}")
    (home.dir / "wrong.pin").chmod(0o644)
    hh.fails("reconcile", "--at", ts(T0 + 2 * P - A))
    hh.fails("config", "check", code=2)
    # ... and in this process's exceptions.
    texts = []
    (home.dir / "wrong.pin").chmod(0o600)
    b = make_backend(softhsm, tmp_path, token_label=SPARE, pin_file=str(home.dir / "wrong.pin"))
    for call in (lambda: b.list_keys("default"), b.check, b.check):
        with pytest.raises(BackendError) as err:
            call()
        texts.append(str(err.value))
    with pytest.raises(ConfigError) as cerr:
        make_backend(softhsm, tmp_path, pin=softhsm.pin)
    texts.append(str(cerr.value))
    with pytest.raises(ConfigError) as cerr:
        make_backend(softhsm, tmp_path, pin_file=None, pin_env=softhsm.pin)
    texts.append(str(cerr.value))
    for text in texts:
        for secret in (softhsm.pin, wrong):
            leaked = secret in text
            assert not leaked, "a PIN leaked into an exception"
        assert "\n" not in text
    assert "CKR_PIN_INCORRECT" in texts[0] and "not trying it again" in texts[1], texts
    hh.assert_no_secret_at_rest()


def run_daemon_briefly(hh: HsmHome, seconds: float = 4.0) -> str:
    """``keymgr run`` (a pass every second) for a few seconds, then SIGTERM; its output."""
    text = hh.base.replace('reconcile_interval = "60s"', 'reconcile_interval = "1s"')
    hh.base = text.replace('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:0"')
    hh.write()
    log = hh.home.dir / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keymgr.cli", "--config", str(hh.home.config), "run"],
            stdout=out, stderr=subprocess.STDOUT, env=hh.env(), cwd=hh.home.dir,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if "daemon.started" in log.read_text(errors="replace"):
                    time.sleep(seconds)
                    break
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    return log.read_text(errors="replace")


# --------------------------------------------------------------------------- the keys


def test_private_keys_cannot_be_read_or_exported(softhsm, registered, tmp_path):
    """Generated on the token as sensitive and never extractable: another process
    logged in with the PIN can read no private attribute, cannot make the key
    extractable or not sensitive, and cannot wrap it out."""
    b = make_backend(softhsm, tmp_path)
    for alg in ("ES256", "RS256", "EdDSA"):
        b.generate("default", alg, intent=secrets.token_hex(8))
    prefix = b.label_prefix + "/"
    objects = [o for o in softhsm.objects(prefix) if o["class"] == "private"]
    assert sorted(o["key_type"] for o in objects) == ["EC", "EC_EDWARDS", "RSA"]
    for o in objects:
        flags = {k: o[k] for k in ("sensitive", "always_sensitive", "private", "sign")}
        assert all(flags.values()), o
        flags = {k: o[k] for k in ("extractable", "decrypt", "unwrap", "derive")}
        assert not any(flags.values()) and o["never_extractable"], o
    attempts = softhsm.tool("extract", token=softhsm.label, pin=softhsm.pin, prefix=prefix)
    assert len(attempts) == 3
    for rec in attempts:
        revealed = [what for what, error in rec["refused"].items() if error is None]
        assert not revealed, rec
        secret = [k for k in rec["refused"] if not k.startswith(("set ", "wrap"))]
        assert secret and all(rec["refused"][k] == "AttributeSensitive" for k in secret), rec
        assert rec["refused"]["wrap"] in ("KeyUnextractable", "KeyNotWrappable"), rec
    # Still whole after all that: every key signs.
    for kid in b.list_keys("default"):
        jwk = b.public_jwk("default", kid)
        alg = {"EC": "ES256", "RSA": "RS256", "OKP": "EdDSA"}[jwk["kty"]]
        data = signing_input(alg)
        verify_with_jwk(jwk, data, b.signer("default", kid, alg)(data), alg)


def test_key_objects_labels_and_ids(softhsm, registered, tmp_path):
    """Both objects of a key pair carry ``PREFIX/RING`` and a 16-byte CKA_ID that
    starts with the intent nonce; the kid is the public key's thumbprint;
    destroy deletes both objects and may be repeated."""
    b = make_backend(softhsm, tmp_path)
    nonce = secrets.token_hex(8)
    gen = b.generate("api.v2", "ES384", intent=nonce)
    found = pairs(softhsm.objects(b.label_prefix + "/"))
    assert len(found) == 1
    ((key_id, rec),) = found.items()
    assert rec["label"] == f"{b.label_prefix}/api.v2" and rec["private"] is not None
    assert len(key_id) == 32 and key_id.startswith(nonce)
    assert rec["kid"] == gen.kid
    assert b.intent_of("api.v2", gen.kid) == nonce
    assert b.list_keys("api") == [] and b.list_keys("api.v2") == [gen.kid]
    b.destroy("api.v2", gen.kid)
    assert softhsm.objects(b.label_prefix + "/") == []
    b.destroy("api.v2", gen.kid)
    with pytest.raises(KeyNotFoundError):
        b.public_jwk("api.v2", gen.kid)


def test_an_interrupted_destroy_is_finished_by_the_next(
    softhsm, registered, tmp_path, monkeypatch
):
    """A crash between deleting the private and the public object leaves a public
    object alone: never listed, not a key (KeyNotFoundError), and deleted by
    the next destroy of that kid."""
    import keymgr.backends.pkcs11.keys as keys_module

    class Crash(Exception):
        pass

    def crashpoint(name: str) -> None:
        if name == "pkcs11.after_destroy_private":
            raise Crash(name)

    b = make_backend(softhsm, tmp_path)
    gen = b.generate("default", "ES256", intent=secrets.token_hex(8))
    with monkeypatch.context() as m, pytest.raises(Crash):
        m.setattr(keys_module, "crashpoint", crashpoint)
        b.destroy("default", gen.kid)
    left = softhsm.objects(b.label_prefix + "/")
    assert [o["class"] for o in left] == ["public"]
    fresh = make_backend(softhsm, tmp_path, label_prefix=b.label_prefix)
    assert fresh.list_keys("default") == []
    with pytest.raises(KeyNotFoundError):
        fresh.public_jwk("default", gen.kid)
    fresh.destroy("default", gen.kid)
    assert softhsm.objects(b.label_prefix + "/") == []
    fresh.destroy("default", gen.kid)


def test_one_session_reopened_after_a_token_error_and_thread_safe(softhsm, registered, tmp_path):
    """Backends of one process share one session (PKCS#11 logs in per process);
    a session killed under it is re-opened and the signature retried; many
    threads sign at once while another lists keys."""
    b = make_backend(softhsm, tmp_path)
    other = make_backend(softhsm, tmp_path, name="other", label_prefix=b.label_prefix)
    token = b._token()  # type: ignore[attr-defined]
    assert other._token() is token  # type: ignore[attr-defined]
    gens = {a: b.generate("default", a, intent=secrets.token_hex(8)) for a in ("ES256", "PS256")}
    signers = {alg: b.signer("default", g.kid, alg) for alg, g in gens.items()}
    before = token.generation
    token._session.close()  # the session dies behind the backend's back (C_CloseSession)
    data = signing_input("ES256")
    verify_with_jwk(gens["ES256"].public_jwk, data, signers["ES256"](data), "ES256")
    assert token.generation == before + 1
    errors: list[BaseException] = []
    stop = threading.Event()

    def signing(alg: str, n: int) -> None:
        try:
            for i in range(n):
                si = signing_input(alg, {"i": i, "t": threading.get_ident()})
                verify_with_jwk(gens[alg].public_jwk, si, signers[alg](si), alg)
        except BaseException as e:
            errors.append(e)

    def listing() -> None:
        try:
            while not stop.is_set():
                assert sorted(other.list_keys("default")) == sorted(g.kid for g in gens.values())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=signing, args=(alg, 25)) for alg in gens for _ in range(4)]
    lister = threading.Thread(target=listing)
    for t in [*threads, lister]:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    lister.join(60)
    assert not errors, errors


def test_a_missing_mechanism_is_refused_by_name_before_any_key(softhsm, registered, tmp_path,
                                                                monkeypatch):
    """A token without CKM_EDDSA (SoftHSM has it: the mechanism list is narrowed
    here, as such a token would report it): generate refuses EdDSA naming the
    mechanism, and nothing is made."""
    from keymgr.backends.pkcs11.token import TokenSession
    from pkcs11 import Mechanism

    b = make_backend(softhsm, tmp_path)
    ed = b.generate("default", "EdDSA", intent=secrets.token_hex(8))
    real = TokenSession.mechanisms

    def without_eddsa(self: TokenSession, where: str, op: str) -> frozenset[int]:
        return real(self, where, op) - {int(Mechanism.EDDSA)}

    monkeypatch.setattr(TokenSession, "mechanisms", without_eddsa)
    with pytest.raises(BackendError) as err:
        b.generate("other", "EdDSA", intent=secrets.token_hex(8))
    assert str(err.value) == (
        f"backend hsm (pkcs11): generate EdDSA key: token {softhsm.label!r} does not offer "
        "CKM_EDDSA, which EdDSA needs (use another algorithm for this ring, or another token)"
    )
    assert b.list_keys("other") == []
    with pytest.raises(BackendError, match="does not offer CKM_EDDSA"):
        b.signer("default", ed.kid, "EdDSA")


# --------------------------------------------------------------------------- orphans


def test_crash_orphan_adopted_wrong_orphan_destroyed_foreign_keys_untouched(home, softhsm,
                                                                             registered):
    hh = setup_home(home, softhsm, "ES256")
    p = hh.prefix
    tool = dict(token=softhsm.label, pin=softhsm.pin)
    # Keys keymgr must never touch: another prefix, a ring named alike, and
    # under its own label an extractable key, an imported one, a foreign CKA_ID.
    foreign = {
        "other prefix": dict(curve="P-256", label=f"x{p}/default", id="11" * 16),
        "other ring": dict(curve="P-256", label=f"{p}/default.b", id="22" * 16),
        "extractable": dict(curve="P-256", label=f"{p}/default", id="33" * 16, extractable=True),
        "imported": dict(curve="P-256", label=f"{p}/default", id="44" * 16, imported=True),
        "short id": dict(curve="P-256", label=f"{p}/default", id="55" * 4),
    }
    softhsm.tool("make", **tool, keys=list(foreign.values()))
    everything = pairs(softhsm.objects(""))
    assert {"11" * 16, "22" * 16, "33" * 16, "44" * 16, "55" * 4} <= set(everything)

    # A real crash right after C_GenerateKeyPair: SIGKILL.
    crashed = hh.run(
        "reconcile", "--at", ts(T0), env=hh.env(KEYMGR_CRASH_AT="pkcs11.after_generate")
    )
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr)
    nonce = hh.state()["intents"]["default"]["nonce"]
    new = {i: r for i, r in pairs(softhsm.objects(f"{p}/default")).items() if i not in everything}
    assert len(new) == 1
    ((orphan_id, orphan),) = new.items()
    assert orphan_id.startswith(nonce) and orphan["private"] is not None
    # And an orphan of that intent that cannot serve this ring's ES256.
    wrong_id = nonce + secrets.token_hex(8)
    softhsm.tool("make", **tool, keys=[dict(curve="P-384", label=f"{p}/default", id=wrong_id)])
    wrong_kid = pairs(softhsm.objects(f"{p}/default"))[wrong_id]["kid"]

    evs = events_of(hh.ok("reconcile", "--at", ts(T0)))
    assert ("key.adopted", orphan["kid"]) in evs, evs
    assert ("key.orphan_destroyed", wrong_kid) in evs, evs
    assert ("key.promoted", orphan["kid"]) in evs, evs
    assert "key.generated" not in {e for e, _ in evs}, evs
    after = pairs(softhsm.objects(""))
    assert wrong_id not in after and orphan_id in after
    for what, spec in foreign.items():
        assert after[spec["id"]] == everything[spec["id"]], what
    token = hh.sign(T0, timedelta(minutes=5), "adopted")
    Verifiers(home.jwks()).verify(token, "ES256")

    # A key under keymgr's label that no intent accounts for is never destroyed.
    stray_id = "66" * 16
    softhsm.tool("make", **tool, keys=[dict(curve="P-256", label=f"{p}/default", id=stray_id)])
    stray_kid = pairs(softhsm.objects(f"{p}/default"))[stray_id]["kid"]
    proc = hh.run("reconcile", "--at", ts(T0 + P - A))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "keymgr adopt default" in proc.stderr and stray_kid in proc.stderr
    assert stray_id in pairs(softhsm.objects(f"{p}/default"))
    hh.ok("audit", "verify")


# --------------------------------------------------------------------------- failures


def test_failures_are_one_line_naming_the_cause(home, softhsm, registered, tmp_path):
    """Wrong PIN, missing module, a file that is no PKCS#11 module, missing token,
    exposed PIN file, literal PIN: exit 1 (2 for config errors), one line each,
    nothing changed; once fixed, the rotation goes on."""
    hh = setup_home(home, softhsm, "ES256")
    hh.ok("reconcile", "--at", ts(T0))
    (k1,) = hh.states()
    jwks_before = home.jwks_path.read_bytes()
    due = ts(T0 + P - A)
    what = "backend hsm (pkcs11): "

    wrong = "wrong-" + secrets.token_hex(8)
    hh.secrets.append(wrong)
    softhsm.pin_file(home.dir / "wrong.pin", wrong)
    hh.configure(token_label=SPARE, pin_file="wrong.pin")
    line = hh.fails("reconcile", "--at", due)
    assert what in line, line
    assert f"login to token {SPARE!r}: the token refused the PIN from pin_file" in line, line
    assert "(CKR_PIN_INCORRECT)" in line, line
    line = hh.fails("sign", "default", "--claims", "{}")
    assert f"sign with {k1}" in line and "CKR_PIN_INCORRECT" in line, line

    hh.configure(token_label="no-such-token", pin_file="hsm.pin")
    line = hh.fails("reconcile", "--at", due)
    assert "no token labelled 'no-such-token' in" in line, line
    assert f"{SPARE!r}" in line and f"{softhsm.label!r}" in line, line

    missing = tmp_path / "no-such-pkcs11.so"
    hh.configure(token_label=softhsm.label, module=str(missing))
    line = hh.fails("reconcile", "--at", due)
    assert f"PKCS#11 module {missing} does not exist or is not a file" in line, line
    line = hh.fails("config", "check", code=2)
    assert f"backends.hsm.module: {missing} does not exist" in line, line

    junk = tmp_path / "not-a-module.so"
    junk.write_text("not a shared library\n")
    hh.configure(module=str(junk))
    hh.ok("config", "check")  # offline: stats the file, never loads it
    line = hh.fails("reconcile", "--at", due)
    assert f"cannot load PKCS#11 module {junk}" in line, line

    hh.configure(module=softhsm.module)
    (home.dir / "hsm.pin").chmod(0o644)
    line = hh.fails("reconcile", "--at", due)
    assert "pin_file" in line and "mode 0644 lets group and others access it" in line, line
    line = hh.fails("config", "check", code=2)
    assert "backends.hsm.pin_file:" in line and "chmod 600" in line, line
    (home.dir / "hsm.pin").chmod(0o600)

    hh.configure(pin=softhsm.pin)
    line = hh.fails("config", "check", code=2)
    assert "backends.hsm.pin: a literal PIN is refused" in line, line
    hh.configure(pin=None)

    assert hh.states() == {k1: "active"} and home.jwks_path.read_bytes() == jwks_before
    evs = events_of(hh.ok("reconcile", "--at", due))
    assert {"key.generated", "key.published"} <= {e for e, _ in evs}, evs
    assert hh.run("audit", "verify").returncode == 0
    audit = (home.dir / "audit.jsonl").read_text()
    assert audit.count('"event":"backend.failed"') >= 3


def test_a_refused_pin_is_not_tried_again_until_it_changes(
    softhsm, registered, spare_logged_out, tmp_path
):
    """HSMs lock the user PIN after a few failed logins: a daemon must not retry
    the same wrong PIN every pass. Correcting the file is enough."""
    pin = tmp_path / "spare.pin"
    softhsm.pin_file(pin, "wrong-" + secrets.token_hex(4))
    b = make_backend(softhsm, tmp_path, token_label=SPARE, pin_file=str(pin))
    refused = r"refused the PIN from pin_file .* \(CKR_PIN_INCORRECT\)$"
    with pytest.raises(BackendError, match=refused):
        b.list_keys("default")
    for _ in range(3):
        with pytest.raises(BackendError, match=r"refused this PIN before .* not trying it again"):
            b.check()
    softhsm.pin_file(pin)
    b.check()
    assert b.list_keys("default") == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": 1}, "backends.hsm.bogus: unknown option (known: label_prefix, module, "),
        ({"pin": "1234"}, "backends.hsm.pin: a literal PIN is refused"),
        ({"so_pin": "1234"}, "backends.hsm.so_pin: keymgr never needs the security officer's"),
        ({"pin_file": None}, "backends.hsm.pin_file: is required (or pin_env"),
        ({"pin_env": "PIN"}, "backends.hsm.pin_env: give pin_file or pin_env, not both"),
        ({"pin_file": None, "pin_env": "12345678"}, "backends.hsm.pin_env: expected the name of"),
        ({"pin_file": 1234}, "backends.hsm.pin_file: expected the path of a file"),
        ({"token_label": None}, "backends.hsm.token_label: is required (or slot)"),
        ({"slot": 3}, "backends.hsm.slot: give token_label or slot, not both"),
        ({"token_label": None, "slot": -1}, "backends.hsm.slot: must be between 0 and"),
        ({"token_label": "x" * 33}, "backends.hsm.token_label: a token label has at most 32"),
        ({"rsa_bits": 1024}, "backends.hsm.rsa_bits: must be between 2048 and 4096, got 1024"),
        ({"rsa_bits": 2500}, "backends.hsm.rsa_bits: expected one of 2048, 3072, 4096, got 2500"),
        ({"label_prefix": "a/b"}, "backends.hsm.label_prefix: expected 1 to 32 letters"),
        ({"label_prefix": ""}, "backends.hsm.label_prefix: expected 1 to 32 letters"),
        ({"module": None}, "backends.hsm.module: is required: the token's PKCS#11 library"),
    ],
)
def test_config_errors_name_the_field(options, message, monkeypatch):
    from keymgr.backends.pkcs11.keys import PKCS11Backend

    monkeypatch.delenv("PKCS11_MODULE", raising=False)
    opts: dict[str, Any] = {
        "type": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so",
        "token_label": "t", "pin_file": "pin",
    }  # fmt: skip
    for k, v in options.items():
        if v is None:
            opts.pop(k)
        else:
            opts[k] = v
    with pytest.raises(ConfigError) as err:
        PKCS11Backend("hsm", opts, "/etc/keymgr")
    text = str(err.value)
    assert text.startswith(message), text
    assert "1234" not in text and "12345678" not in text and "\n" not in text


def test_module_from_the_environment_and_paths_follow_the_config(monkeypatch, tmp_path):
    from keymgr.backends.pkcs11.keys import PKCS11Backend

    monkeypatch.setenv("PKCS11_MODULE", "/opt/hsm/lib/vendor.so")
    b = PKCS11Backend("hsm", {"type": "pkcs11", "slot": 0, "pin_file": "p"}, str(tmp_path))
    assert b.module == Path("/opt/hsm/lib/vendor.so") and b.slot == 0
    assert b.paths() == {"pin_file": tmp_path / "p"}
    b = PKCS11Backend(
        "hsm", {"type": "pkcs11", "module": "lib/p11.so", "token_label": "t", "pin_env": "X"},
        str(tmp_path),
    )  # fmt: skip
    assert b.module == tmp_path / "lib/p11.so" and b.pin_source == "pin_env X"
    assert b.label("api.v2") == "keymgr/api.v2"


def test_keymgr_plugins_resolves_the_type(registered):
    cls = plugins.backend_class("pkcs11", "backends.hsm.type")
    assert cls.__module__ == "keymgr.backends.pkcs11.keys" and cls.type_name == "pkcs11"


def test_the_subprocess_entry_point_resolves_the_type(softhsm):
    """What the CLI subprocesses rely on: the ``pkcs11`` type loads by entry point."""
    code = (
        "from keymgr.plugins import backend_class; "
        "print(backend_class('pkcs11', 'x').__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=softhsm.env(),
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "PKCS11Backend", proc.stderr


def test_two_backends_may_share_a_module_and_a_token(home, softhsm, registered):
    """Two tables on one token (two label prefixes) load, pass ``config check``
    and keep their keys apart."""
    hh = setup_home(home, softhsm, "ES256")
    # Its own PIN file: a file is one option's (keymgr refuses a path two options name).
    softhsm.pin_file(home.dir / "hsm2.pin")
    second = {**hh.table, "label_prefix": unique("s"), "pin_file": "hsm2.pin"}
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in second.items())
    hh.base += "\n[backends.hsm2]\n" + table
    hh.add_ring("other", "ES256", SHORT_POLICY)
    hh.base = hh.base.replace(
        '[keyrings.other]\nbackend = "hsm"', '[keyrings.other]\nbackend = "hsm2"'
    )
    hh.write()
    hh.ok("config", "check")
    hh.ok("reconcile", "--at", ts(T0))
    assert set(hh.on_token()) == {"default"}
    objects = softhsm.objects(second["label_prefix"] + "/")
    assert {o["label"] for o in objects} == {f"{second['label_prefix']}/other"}
