"""The signing service of ``keymgr run`` (``[service]``), through real daemons and clients.

Tokens are asked for by a real Node client (tests/service_client: npm
``undici`` over the Unix socket or over TLS with a client certificate) and
verified by npm ``jose`` against the JWKS file as it is on disk, across
several promotions of a daemon with second-long periods (as in
tests/test_daemon.py). Access control is shown from both sides: a caller with
another uid (``setpriv``, we are root in CI) stopped by the socket's file
permissions, then, once the socket's group lets it connect, refused by keymgr
itself (403, audited); a client certificate from another CA (the TLS
handshake fails) and one from the right CA with another name (403).
"""

from __future__ import annotations

import datetime as dt
import functools
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks._common import npm_ci
from tests.conftest import Home
from tests.test_daemon import (
    Launcher,
    Proc,
    audit_events,
    fast_home,
    get,
    metric,
    scrape,
    wait_for,
)

CLIENT = Path(__file__).resolve().parent / "service_client"
NOBODY = 65534


# --------------------------------------------------------------------------- helpers


def node_client() -> Path:
    """``npm ci`` into tests/service_client at first use (once across xdist workers)."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed")
    npm_ci(CLIENT, CLIENT / "node_modules" / "jose" / "package.json", timeout=300)
    return CLIENT / "client.mjs"


def run_client(*args: str, user: int | None = None, script: Path | None = None,
               timeout: float = 90) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the Node client to the end: (its request lines, its summary line)."""
    cmd = ["node", str(script or node_client()), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=(script or CLIENT).parent)
    assert proc.returncode == 0, f"client exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and lines[-1]["ev"] == "done", proc.stdout[-2000:]
    return lines[:-1], lines[-1]


def start_client(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["node", str(node_client()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=CLIENT)


def finish_client(p: subprocess.Popen[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"client exited {p.returncode}:\n{err[-3000:]}"
    lines = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    assert lines and lines[-1]["ev"] == "done", out[-2000:]
    return lines[:-1], lines[-1]


def toml_value(v: Any) -> str:
    return json.dumps(v)  # strings, integers and lists of them read the same in TOML


def add_service(home: Home, rings: dict[str, dict[str, Any]], **fields: Any) -> None:
    """Append a ``[service]`` table (replacing one that is there)."""
    text = home.config.read_text()
    if "\n[service]" in text:
        text = text[: text.index("\n[service]")] + "\n"
    lines = ["", "[service]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    for ring, access in rings.items():
        lines += ["", f"[service.rings.{ring}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in access.items()]
    home.config.write_text(text + "\n".join(lines) + "\n")


def replace_state(path: Path, data: bytes) -> None:
    """Put ``data`` at the state by rename, as another process would, then
    let the file store's fingerprint window pass (1 ms, KeyManager._check_fresh):
    within it a sign may still use the key it had, by design, and a request
    sent right after the rename can fall inside it (it did once in CI)."""
    tmp = path.with_name(path.name + ".put")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    time.sleep(0.01)


def serve_default(home: Home, launcher: Launcher, sock: Path) -> Proc:
    """``keymgr run`` serving ring ``default`` to this uid on ``sock``, ready."""
    add_service(home, {"default": {"uids": [os.getuid()]}}, socket=str(sock))
    d = launcher.start(home)
    d.ready()
    service_started(d)
    return d


def service_started(d: Proc, n: int = 1) -> dict[str, Any]:
    lines = wait_for(lambda: d.alive_or_fail() and len(d.events("service.started")) >= n and
                     d.events("service.started"), 20, f"service.started line #{n}")
    return lines[n - 1]  # type: ignore[no-any-return]


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def call(path: Path, method: str, url: str, body: Any = None,
         raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    c = UnixHTTP(path)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        c.request(method, url, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.getheader("Cache-Control") == "no-store"
        return r.status, json.loads(r.read())
    finally:
        c.close()


# --------------------------------------------------------------------------- a small PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False,
          sans: list[x509.GeneralName] | None = None, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject))
         .issuer_name(issuer[0] if issuer else _name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else \
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(d: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[str, str]:
    c, k = d / f"{name}.crt", d / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


def make_pki(d: Path) -> dict[str, Any]:
    """A CA, a server certificate for 127.0.0.1, client certificates: ``issuer-a``
    (allowed), ``intruder`` (same CA, not allowed), and ``issuer-a`` again from
    another CA."""
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = _cert("keymgr test CA", ca_key, None, ca=True)
    other = _cert("some other CA", other_key, None, ca=True)
    out["ca"] = _write(d, "ca", ca, ca_key)[0]
    issuer = (ca.subject, ca_key)
    k = ec.generate_private_key(ec.SECP256R1())
    out["server"] = _write(d, "server", _cert(
        "keymgr", k, issuer, server=True,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), k)
    for name, cn, by in (("good", "issuer-a", issuer), ("intruder", "intruder", issuer),
                         ("foreign", "issuer-a", (other.subject, other_key))):
        k = ec.generate_private_key(ec.SECP256R1())
        out[name] = _write(d, name, _cert(cn, k, by), k)
    return out


def tls_args(url: str, pki: dict[str, Any], who: str) -> list[str]:
    return ["--url", url, "--ca", pki["ca"], "--cert", pki[who][0], "--key", pki[who][1]]


# --------------------------------------------------------------------------- 1. end to end


def test_node_clients_get_verified_tokens_across_promotions(
    home: Home, launcher: Launcher, tmp_path: Path
) -> None:
    """Two Node issuers, one on the Unix socket and one over mutual TLS, get a
    token every 0.1 s while the daemon promotes a new key every 6 s: every token
    verifies with jose against the JWKS on disk when it arrives, and every
    token still inside its lifetime verifies again at each later step, whichever
    key signed it. Then the TLS refusals: another CA fails the handshake; the
    right CA with a name the ring does not list gets 403, audited."""
    fast_home(home, interval="1m")
    pki = make_pki(tmp_path / "pki")
    sock = tmp_path / "sign.sock"
    add_service(
        home,
        {"default": {"uids": [os.getuid()], "cert_names": ["issuer-a"]}},
        socket=str(sock), listen="127.0.0.1:0",
        tls_cert=pki["server"][0], tls_key=pki["server"][1], tls_client_ca=pki["ca"],
    )
    node_client()
    d = launcher.start(home)
    d.ready()
    started = service_started(d)
    url = f"https://{started['listen']}"
    common = ["--ring", "default", "--ttl", "2s", "--jwks", str(home.jwks_path),
              "--until-kids", "3", "--duration", "45", "--interval", "100"]
    unix_p = start_client("--socket", str(sock), "--info", *common)
    tls_p = start_client(*tls_args(url, pki, "good"), *common)
    results = {"unix": finish_client(unix_p), "tls": finish_client(tls_p)}

    state = home.state()["rings"]["default"]["keys"]
    by_kid = {k["kid"]: k for k in state}
    jwks = {k["kid"]: k for k in home.jwks()["keys"]}
    for via, (lines, done) in results.items():
        assert done["failures"] == 0, (via, [ln for ln in lines if ln.get("verified") is False
                                             or ln["ev"] == "late-failure"][:3])
        assert len(done["kids"]) >= 3, (via, done)  # two promotions seen, at least
        signs = [ln for ln in lines if ln["ev"] == "sign"]
        assert all(ln["status"] == 200 for ln in signs), [ln for ln in signs
                                                           if ln["status"] != 200][:3]
        assert all(ln["verified"] for ln in signs) and done["late_checks"] > 0
        for ln in signs:
            header = jwt.get_unverified_header(ln["token"])
            assert header == {"alg": "ES256", "kid": ln["kid"], "typ": "JWT"}
            assert ln["kid"] in by_kid
            if ln["kid"] in jwks:
                claims = jwt.decode(ln["token"], jwt.PyJWK(jwks[ln["kid"]]).key,
                                    algorithms=["ES256"], options={"verify_exp": False})
                assert claims["exp"] - claims["iat"] == 2 and claims["sub"] == "node-client"
    # The ring's info follows the promotions too.
    infos = [ln for ln in results["unix"][0] if ln["ev"] == "info"]
    assert all(i["status"] == 200 for i in infos)
    assert len({i["doc"]["kid"] for i in infos}) >= 2
    assert {i["doc"]["alg"] for i in infos} == {"ES256"}
    status, info = call(sock, "GET", "/v1/rings/default")
    assert status == 200 and info["kid"] == home.kid_in("active")

    # TLS: a certificate from another CA never gets an HTTP answer.
    lines, done = run_client(*tls_args(url, pki, "foreign"), "--count", "1")
    assert lines[0]["status"] == 0 and lines[0]["error"], lines
    # Nor a client without a certificate, or one stuck at TLS 1.2.
    ctx = ssl.create_default_context(cafile=pki["ca"])
    host, port = started["listen"].rsplit(":", 1)
    with pytest.raises((ssl.SSLError, ConnectionError)), \
            socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET /v1/rings/default HTTP/1.1\r\nHost: x\r\n\r\n")
        if not s.recv(100):
            raise ConnectionError("closed")
    ctx12 = ssl.create_default_context(cafile=pki["ca"])
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx12.load_cert_chain(*pki["good"])
    with pytest.raises(ssl.SSLError), \
            socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx12.wrap_socket(raw, server_hostname="localhost"):
        pass
    # The right CA, a name the ring does not list: keymgr refuses it, and says so.
    lines, done = run_client(*tls_args(url, pki, "intruder"), "--count", "2")
    assert [(ln["status"], ln["code"]) for ln in lines] == [(403, "forbidden")] * 2

    m = scrape(d.port)
    signed = {via: sum(ln["ev"] == "sign" and ln["status"] == 200 for ln in r[0])
              for via, r in results.items()}
    assert metric(m, "keymgr_service_tokens_total", ring="default",
                  caller=f"uid:{os.getuid()}") == signed["unix"]
    assert metric(m, "keymgr_service_tokens_total", ring="default",
                  caller="cert:issuer-a") == signed["tls"]
    assert metric(m, "keymgr_service_sign_duration_seconds_count",
                  ring="default") == sum(signed.values())
    assert metric(m, "keymgr_service_refusals_total", ring="default", code="forbidden") == 2
    refused = wait_for(lambda: [e for e in audit_events(home) if e["event"] == "service.refused"],
                       10, "service.refused in the audit log")
    assert refused[0]["caller"] == "cert:intruder" and refused[0]["count"] == 1
    assert "client certificate intruder" in refused[0]["reason"]
    rc, _ = d.stop()
    assert rc == 0 and not sock.exists()
    ev = [e for e in audit_events(home) if e["event"] == "service.refused"]
    assert sum(e["count"] for e in ev) == 2 and len(ev) == 2  # the second at stop
    home.run("audit", "verify", check=True)


# --------------------------------------------------------------------------- 2. another uid


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run a client as another user")
def test_other_uid_refused_by_permissions_then_by_keymgr(
    home: Home, launcher: Launcher
) -> None:
    """uid 65534 runs the same Node client. With the socket at mode 0660,
    root:root, the kernel refuses its connect (EACCES: file permissions). Once
    the socket's group is 65534 (a SIGHUP) it connects, and keymgr refuses it
    (403 ``forbidden``: its uid is not in the ring's list); root still gets
    tokens. Five refusals make one audit event at once (count 1) and one at
    stop with the other four: at most one per caller per minute."""
    node_client()
    work = Path(tempfile.mkdtemp(prefix="keymgr-svc-", dir="/tmp"))
    try:
        work.chmod(0o755)  # traversable by uid 65534: only the socket's mode decides
        # The client and its modules where uid 65534 can read them.
        shutil.copytree(CLIENT, work / "client")
        script = work / "client" / "client.mjs"
        sock = work / "sign.sock"
        fast_home(home, rotation_period="1h", publish_ahead="10m")
        add_service(home, {"default": {"uids": [0]}}, socket=str(sock))
        d = launcher.start(home)
        d.ready()
        service_started(d)
        st = sock.stat()
        assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == 0

        lines, _ = run_client("--socket", str(sock), "--count", "2", user=NOBODY, script=script)
        assert [ln["status"] for ln in lines] == [0, 0]
        assert all(ln["error"].startswith("EACCES") for ln in lines), lines
        assert not [e for e in audit_events(home) if e["event"] == "service.refused"]

        add_service(home, {"default": {"uids": [0]}}, socket=str(sock), socket_group=NOBODY)
        d.popen.send_signal(signal.SIGHUP)
        service_started(d, 2)
        assert sock.stat().st_gid == NOBODY

        lines, _ = run_client("--socket", str(sock), "--count", "5", "--interval", "10",
                              user=NOBODY, script=script)
        assert [(ln["status"], ln["code"]) for ln in lines] == [(403, "forbidden")] * 5
        first = wait_for(lambda: [e for e in audit_events(home)
                                  if e["event"] == "service.refused"], 10, "service.refused")
        assert first[0]["caller"] == f"uid:{NOBODY}" and first[0]["count"] == 1
        assert first[0]["ring"] == "default" and "uid 65534 (nobody)" in first[0]["reason"]
        lines, done = run_client("--socket", str(sock), "--count", "3", "--ttl", "2",
                                 "--jwks", str(home.jwks_path), script=script)
        assert [ln["status"] for ln in lines] == [200] * 3 and done["failures"] == 0
        m = scrape(d.port)
        assert metric(m, "keymgr_service_refusals_total", ring="default", code="forbidden") == 5
        assert metric(m, "keymgr_service_tokens_total", ring="default", caller="uid:0") == 3

        rc, _ = d.stop()
        assert rc == 0 and not sock.exists()
        refused = [e for e in audit_events(home) if e["event"] == "service.refused"]
        assert [e["count"] for e in refused] == [1, 4]
        home.run("audit", "verify", check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- 3. answers


def test_errors_not_ready_and_the_socket_in_use(
    home: Home, launcher: Launcher, tmp_path: Path
) -> None:
    """Every error has its stable code; a state that cannot be read to confirm the
    signer answers 503 (never a token from the cached key), and signing resumes
    once it can; a second daemon cannot take a socket that is being served."""
    fast_home(home, rotation_period="1h", publish_ahead="10m")
    text = home.config.read_text()
    other = text[text.index("[keyrings.default]"):].replace("[keyrings.default]",
                                                             "[keyrings.other]")
    home.config.write_text(text + "\n" + other)
    sock = tmp_path / "s.sock"
    d = serve_default(home, launcher, sock)

    ok = {"claims": {"sub": "a"}, "ttl": "2s"}
    status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
    assert status == 200 and doc["token"].count(".") == 2
    status, doc = call(sock, "POST", "/v1/rings/default/sign", {"claims": {"sub": "a"},
                                                                 "ttl": 3})
    assert status == 200
    # The state can no longer be read: 503, then tokens again once it can.
    state_file = home.dir / "state.json"
    saved = state_file.read_bytes()
    replace_state(state_file, b"{not json")
    try:
        status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
        assert (status, doc["error"]["code"]) == (503, "not_ready"), doc
        status, doc = call(sock, "GET", "/v1/rings/default")
        assert (status, doc["error"]["code"]) == (503, "not_ready"), doc
    finally:
        replace_state(state_file, saved)
    status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
    assert status == 200, doc

    def code(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, str]:
        s, d = call(sock, method, url, body, raw)
        return s, d["error"]["code"]

    assert code("POST", "/v1/rings/default/sign", {"claims": {}, "ttl": "1h"}) == (
        400, "bad_request")  # longer than retire_grace (3 s)
    assert code("POST", "/v1/rings/default/sign", {"claims": {"exp": 4102444800}}) == (
        400, "bad_request")
    assert code("POST", "/v1/rings/default/sign", {"claims": []}) == (400, "bad_request")
    assert code("POST", "/v1/rings/default/sign", {"claims": {}, "ttl": "soon"}) == (
        400, "bad_request")
    assert code("POST", "/v1/rings/default/sign", {"claims": {}, "kid": "x"}) == (
        400, "bad_request")
    assert code("POST", "/v1/rings/default/sign", raw=b"{nope") == (400, "bad_request")
    assert code("POST", "/v1/rings/default/sign", raw=b"x" * 70000) == (
        413, "payload_too_large")
    assert code("POST", "/v1/rings/nope/sign", ok) == (404, "unknown_ring")
    assert code("GET", "/v1/rings/default/sign") == (405, "method_not_allowed")
    assert code("GET", "/v2/anything") == (404, "not_found")
    assert code("POST", "/v1/rings/other/sign", ok) == (403, "forbidden")

    second = launcher.start(home, name="second")
    assert second.popen.wait(timeout=30) == 1
    assert "in use by another process" in second.err.read_text() + second.out.read_text()
    status, _ = call(sock, "POST", "/v1/rings/default/sign", ok)
    assert status == 200, "the first daemon still serves its socket"
    m = scrape(d.port)
    assert metric(m, "keymgr_service_refusals_total", ring="default", code="not_ready") == 2
    assert metric(m, "keymgr_service_refusals_total", ring="", code="unknown_ring") == 1
    assert metric(m, "keymgr_service_refusals_total", ring="other", code="forbidden") == 1
    rc, _ = d.stop()
    assert rc == 0 and not sock.exists()


def test_a_state_put_back_from_an_older_copy_signs_nothing(
    home: Home, launcher: Launcher, tmp_path: Path
) -> None:
    """A state put back from an older copy names as active a key that was
    retired since: its tokens would be rejected once that key leaves the JWKS.
    The audit log, which went on past that copy's anchor, tells: sign and the
    ring's info answer 503 ``not_ready`` with the log's line, /readyz stops
    answering 200, and the newer state put back ends it. No token is signed
    by the old key meanwhile."""
    fast_home(home, rotation_period="1h", publish_ahead="10m")
    sock = tmp_path / "s.sock"
    d = serve_default(home, launcher, sock)
    ok = {"claims": {"sub": "a"}, "ttl": "2s"}
    status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
    assert status == 200, doc
    old_kid = jwt.get_unverified_header(doc["token"])["kid"]
    state_file = home.dir / "state.json"
    older = state_file.read_bytes()
    rotated = home.run("rotate", "default", "--emergency")
    assert rotated.returncode == 0, rotated.stderr
    status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
    new_kid = jwt.get_unverified_header(doc["token"])["kid"]
    assert status == 200 and new_kid != old_kid, doc
    newer = state_file.read_bytes()

    put = functools.partial(replace_state, state_file)
    put(older)
    try:
        status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
        assert (status, doc["error"]["code"]) == (503, "not_ready"), doc
        assert "state anchors seq" in doc["error"]["message"], doc
        status, doc = call(sock, "GET", "/v1/rings/default")
        assert (status, doc["error"]["code"]) == (503, "not_ready"), doc
        wait_for(lambda: get(d.port, "/readyz")[0] == 503, 10, "/readyz to refuse")
        assert "state anchors seq" in get(d.port, "/readyz")[1]
        assert state_file.read_bytes() == older, "the daemon wrote over the put-back state"
    finally:
        put(newer)
    status, doc = call(sock, "POST", "/v1/rings/default/sign", ok)
    assert status == 200 and jwt.get_unverified_header(doc["token"])["kid"] == new_kid, doc
    d.ready()
    assert state_file.read_bytes() == newer


# --------------------------------------------------------------------------- 4. config


@pytest.mark.parametrize(
    ("fields", "rings", "error"),
    [
        ({"sockett": "x"}, {}, "service.sockett: unknown option"),
        ({"socket_mode": "0666"}, {}, "service.socket_mode: 0666 lets any local user"),
        ({"socket_mode": "rw"}, {}, "service.socket_mode: expected an octal"),
        ({"listen": "127.0.0.1:9443"}, {}, "service.tls_cert: is required with service.listen"),
        ({"tls_cert": "a.crt"}, {}, "service.tls_cert: only applies with service.listen"),
        ({"socket": "/tmp/" + "x" * 120}, {}, "service.socket: path longer than 107"),
        ({}, {"nope": {"uids": [1]}}, "service.rings.nope: unknown ring 'nope'"),
        ({}, {"default": {"users": ["no-such-user-here"]}}, "no such user 'no-such-user-here'"),
        ({}, {"default": {"uids": ["root"]}}, "service.rings.default.uids: expected numeric"),
        ({}, {"default": {"certnames": ["a"]}}, "service.rings.default.certnames: unknown"),
        ({"socket_group": "no-such-group-here"}, {}, "no such group 'no-such-group-here'"),
    ],
)
def test_bad_service_config_is_refused(
    home: Home, fields: dict[str, Any], rings: dict[str, Any], error: str
) -> None:
    add_service(home, rings, **fields)
    res = home.run("config", "check", inproc=True)
    assert res.returncode == 2, res.stdout
    assert error in res.stderr, res.stderr


def test_good_service_config_checks(home: Home) -> None:
    add_service(home, {"default": {"users": ["root"], "groups": ["root"], "gids": [0],
                                   "cert_names": ["a"]}},
                socket="run/sign.sock", socket_group="root", listen="[::1]:9443",
                tls_cert="c.crt", tls_key="c.key", tls_client_ca="ca.crt")
    res = home.run("config", "check", inproc=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- deploy examples


def test_kubernetes_sidecar_example_validates_and_its_config_checks(tmp_path: Path) -> None:
    """deploy/kubernetes/sidecar/: strict schema validation, and its keymgr.toml
    passes ``keymgr config check`` offline; the issuer's uid is the one the
    ring allows, and the pod's supplemental group lets it reach the socket."""
    import sys
    import tomllib

    import kubernetes_validate
    import yaml

    path = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "sidecar" / \
        "issuer-with-keymgr.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    text = cm["data"]["keymgr.toml"]
    cfg = tomllib.loads(text)
    spec = dep["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in spec["containers"]}
    issuer_uid = by_name["issuer"]["securityContext"]["runAsUser"]
    keymgr_gid = by_name["keymgr"]["securityContext"]["runAsGroup"]
    assert cfg["service"]["rings"]["api"]["uids"] == [issuer_uid]
    assert keymgr_gid in spec["securityContext"]["supplementalGroups"]
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
              for c in spec["containers"]}
    sock_dir = str(Path(cfg["service"]["socket"]).parent)
    assert mounts["issuer"]["keymgr-socket"] == mounts["keymgr"]["keymgr-socket"] == sock_dir
    (tmp_path / "keymgr.toml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYMGR_", "AWS_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.run([sys.executable, "-m", "keymgr.cli", "--config",
                           str(tmp_path / "keymgr.toml"), "config", "check"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- socket activation


def test_socket_passed_by_systemd_is_used_as_it_is(
    home: Home, launcher: Launcher, tmp_path: Path
) -> None:
    """Socket activation (deploy/systemd/keymgr-sign.socket): a listening socket
    passed as descriptor 3 with LISTEN_PID/LISTEN_FDS, for the configured path,
    is served as it is: its mode stays what its creator set, and it is left in
    place at stop (systemd owns it)."""
    import sys

    sock_path = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    sock_path.chmod(0o600)
    listener.listen(16)
    fast_home(home, rotation_period="1h", publish_ahead="10m")
    add_service(home, {"default": {"uids": [os.getuid()]}}, socket=str(sock_path))
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'keymgr.cli', *sys.argv[2:]])"
    )
    out, err = home.dir / "act.out", home.dir / "act.err"
    env = home.env(PYTHONUNBUFFERED="1")
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(listener.fileno()), "--config",
             str(home.config), "run"],
            stdout=fo, stderr=fe, cwd=home.dir, env=env, pass_fds=(listener.fileno(),),
        )
    d = Proc(popen, out, err)
    launcher.procs.append(d)
    listener.close()  # the daemon holds it now
    d.ready()
    started = service_started(d)
    assert started.get("socket_activated") is True, started
    status, doc = call(sock_path, "POST", "/v1/rings/default/sign",
                       {"claims": {"sub": "a"}, "ttl": "2s"})
    assert status == 200, doc
    assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
    rc, _ = d.stop()
    assert rc == 0 and sock_path.exists(), "a socket systemd passed is systemd's to remove"
