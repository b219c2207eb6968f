"""Edge probes (issue 13): a rollover is confirmed where verifiers look.

A real caching edge (varnish, tests/servers_edge.py) sits in front of the
JWKS file, with a cache lifetime far longer than ``publish_ahead``. Without
``verify_urls`` keymgr promotes a key the edge does not serve yet, and a
verifier reading the edge rejects the new key's tokens; with it, promotion
waits until the edge shows the key, then ``publish_ahead`` more, and a key
is destroyed only once the edge stops showing it.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from jwcrypto import jwk, jws

from keymgr.probes import EdgeSettings, probe
from keymgr.timefmt import format_time
from tests.conftest import SHORT_POLICY, T0, A, G, Home, P
from tests.servers_edge import edge_factory  # noqa: F401 - fixture

D = timedelta(days=1)
EDGE_PATH = "/.well-known/jwks.json"


def at(t: datetime) -> str:
    return format_time(t)


def add_edges(home: Home, *urls: str) -> None:
    text = home.config.read_text()
    listed = ", ".join(json.dumps(u) for u in urls)
    text = text.replace(
        "[publishers.site]\n",
        f"[publishers.site]\nverify_urls = [{listed}]\nprobe_timeout = 2\nprobe_attempts = 2\n",
    )
    home.config.write_text(text)


def reconcile(home: Home, t: datetime) -> None:
    home.run("reconcile", "--at", at(t), check=True)


def key_state(home: Home, kid: str) -> str:
    for k in home.state()["rings"]["default"]["keys"]:
        if k["kid"] == kid:
            return str(k["state"])
    return "absent"


def sign(home: Home) -> str:
    proc = home.run("sign", "default", "--claims", '{"sub": "alice"}', "--ttl", "1h", check=True)
    return proc.stdout.strip()


def verify_through(url: str, token: str) -> dict[str, Any]:
    """Two independent verifiers, each fetching the JWKS from ``url`` (the edge)."""
    client = jwt.PyJWKClient(url, cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["ES256"], options={"verify_exp": False})
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        keyset = jwk.JWKSet.from_json(resp.read())
    check = jws.JWS()
    check.deserialize(token)
    check.verify(keyset.get_key(jwt.get_unverified_header(token)["kid"]))
    return dict(claims)


@pytest.fixture
def drill(home: Home, edge_factory: Any) -> Iterator[tuple[Home, Any]]:  # noqa: F811
    home.set_ring(**SHORT_POLICY)
    (home.dir / "public" / ".well-known").mkdir(parents=True, exist_ok=True)
    edge = edge_factory(home.dir / "public")
    yield home, edge


def test_promotion_waits_for_the_edge_and_destruction_for_it_to_drop_the_key(drill) -> None:
    home, edge = drill
    edge_url = edge.url + EDGE_PATH
    add_edges(home, edge_url)
    reconcile(home, T0)
    assert home.status()["edges"]["site"][edge_url]["error"]  # nothing at the origin yet
    edge.purge()
    reconcile(home, T0 + timedelta(minutes=1))
    k1 = home.kid_in("active")
    assert home.status()["edges"]["site"][edge_url]["kids"] == [k1]

    # The successor reaches the origin; the edge keeps its copy without it.
    t1 = T0 + P - A
    reconcile(home, t1)
    k2 = home.kid_in("published")
    assert k2 in {k["kid"] for k in home.jwks()["keys"]}
    assert home.status()["edges"]["site"][edge_url]["kids"] == [k1]

    # Past publish_ahead at the origin: without the edge this would promote.
    reconcile(home, t1 + A + timedelta(minutes=5))
    assert key_state(home, k2) == "published" and key_state(home, k1) == "active"
    text = home.run("status", check=True).stdout
    assert f"edges of publisher site\n  {edge_url}  1 keys" in text

    # The edge catches up: the clock starts from the first probe showing k2.
    edge.purge()
    t_seen = t1 + A + timedelta(minutes=10)
    reconcile(home, t_seen)
    assert home.status()["edges"]["site"][edge_url]["since"][k2] == at(t_seen)
    reconcile(home, t_seen + A - timedelta(seconds=1))
    assert key_state(home, k2) == "published"
    reconcile(home, t_seen + A)
    assert key_state(home, k2) == "active"
    token = sign(home)
    assert jwt.get_unverified_header(token)["kid"] == k2
    assert verify_through(edge_url, token)["sub"] == "alice"

    # k1 retires, expires and leaves the origin's JWKS; the edge still shows
    # it (cached), so it is not destroyed however long that lasts.
    t_gone = t_seen + A + G + timedelta(minutes=1)
    reconcile(home, t_gone)
    assert k1 not in {k["kid"] for k in home.jwks()["keys"]}
    reconcile(home, t_gone + D + timedelta(days=3))
    assert key_state(home, k1) == "expired"
    edge.purge()
    reconcile(home, t_gone + D + timedelta(days=3, minutes=1))
    reconcile(home, t_gone + D + timedelta(days=3, minutes=2))
    assert key_state(home, k1) in ("destroyed", "absent")
    events = [json.loads(line)["event"] for line in
              (home.dir / "audit.jsonl").read_text().splitlines()]
    assert "edge.updated" in events and "edge.unreachable" in events


def test_without_probes_the_same_edge_makes_verifiers_reject(drill) -> None:
    """The control run: the origin alone is confirmed, the key is promoted on
    time, and a verifier reading the edge cannot find it."""
    home, edge = drill
    edge_url = edge.url + EDGE_PATH
    reconcile(home, T0)
    assert json.loads(__import__("urllib.request").request.urlopen(edge_url).read())["keys"]
    t1 = T0 + P - A
    reconcile(home, t1)
    reconcile(home, t1 + A + timedelta(minutes=5))
    k2 = home.kid_in("active")
    token = sign(home)
    assert jwt.get_unverified_header(token)["kid"] == k2
    with pytest.raises(jwt.PyJWKClientError, match="Unable to find a signing key"):
        verify_through(edge_url, token)


def test_one_of_two_edges_lagging_holds_promotion(drill, edge_factory) -> None:  # noqa: F811
    home, edge_a = drill
    edge_b = edge_factory(home.dir / "public")
    urls = [edge_a.url + EDGE_PATH, edge_b.url + EDGE_PATH]
    add_edges(home, *urls)
    reconcile(home, T0)
    edge_a.purge()
    edge_b.purge()
    reconcile(home, T0 + timedelta(minutes=1))
    t1 = T0 + P - A
    reconcile(home, t1)
    k2 = home.kid_in("published")
    edge_a.purge()  # edge A catches up; B lags
    reconcile(home, t1 + timedelta(minutes=1))
    reconcile(home, t1 + 3 * A)
    assert key_state(home, k2) == "published"
    edge_b.purge()
    t_b = t1 + 3 * A + timedelta(minutes=1)
    reconcile(home, t_b)
    reconcile(home, t_b + A)
    assert key_state(home, k2) == "active"


def test_an_edge_that_is_down_holds_promotion_and_shows_in_status(drill) -> None:
    home, edge = drill
    edge_url = edge.url + EDGE_PATH
    add_edges(home, edge_url)
    reconcile(home, T0)
    edge.purge()
    reconcile(home, T0 + timedelta(minutes=1))
    t1 = T0 + P - A
    reconcile(home, t1)
    k2 = home.kid_in("published")
    edge.purge()
    reconcile(home, t1 + timedelta(minutes=1))  # the edge shows k2 from here
    edge.stop()
    reconcile(home, t1 + 2 * A)
    assert key_state(home, k2) == "published"
    text = home.run("status", check=True).stdout
    assert f"{edge_url}  DOWN since" in text and "holds promotion" in text


# --------------------------------------------------------------------------- the probe itself


class _Scripted(BaseHTTPRequestHandler):
    """Answers from a script: a list of (status, body) per request, then the last."""

    script: list[tuple[int, bytes]] = []
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers))
        status, body = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if status == 0:
            time.sleep(3)  # hang past the probe's timeout
            status = 200
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Age", "42")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the probe gave up first (the timeout test)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def run(script: list[tuple[int, bytes]], **settings: Any) -> Any:
        _Scripted.script, _Scripted.seen = list(script), []
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        s = EdgeSettings(urls=(url,), **{"timeout": 1.0, "attempts": 3, **settings})
        return probe(url, s, sleep=lambda _s: None), _Scripted.seen

    yield run
    server.shutdown()
    server.server_close()


JWKS = b'{"keys": [{"kty": "OKP", "kid": "a"}, {"kty": "OKP", "kid": "b"}]}'


def test_probe_retries_5xx_then_reads_kids_and_age(scripted) -> None:
    result, seen = scripted([(503, b""), (500, b""), (200, JWKS)])
    assert result.kids == frozenset({"a", "b"}) and result.error is None and result.age == 42
    assert len(seen) == 3
    # A plain GET, as a verifier sends it: nothing that bypasses a cache.
    assert not {"Cache-Control", "Pragma"} & set(seen[0])


def test_probe_gives_up_after_its_attempts(scripted) -> None:
    result, seen = scripted([(502, b"")], attempts=2)
    assert result.kids is None and result.error == "HTTP 502" and len(seen) == 2


def test_probe_does_not_retry_a_4xx_and_refuses_what_is_not_a_jwks(scripted) -> None:
    result, seen = scripted([(404, b"")])
    assert result.error == "HTTP 404" and len(seen) == 1
    result, _ = scripted([(200, b"<html>maintenance</html>")])
    assert result.kids is None and result.error == "not a JWKS"


def test_probe_times_out(scripted) -> None:
    result, _ = scripted([(0, JWKS)], attempts=1, timeout=0.5)
    assert result.kids is None and result.error == "no complete answer within 0.5s (probe_timeout)"


class _Trickle:
    """A raw TCP server that answers a byte every 50 ms, forever: each byte
    well within the probe's socket timeout, the whole answer never. ``head``:
    trickle from the status line on; else the headers come at once (a body
    of 100 kB announced) and the body trickles."""

    def __init__(
        self, head: bool, tls: ssl.SSLContext | None = None, whole: bytes | None = None
    ) -> None:
        self.head, self.tls, self.whole = head, tls, whole
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()
        self.cut: list[float] = []  # when each connection was closed by the client
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}/jwks.json"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        if self.tls is not None and self.head:
            self._trickle_handshake(conn)
            return
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
        with conn:
            conn.recv(65536)
            if self.whole is not None:
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.whole)}\r\n\r\n"
                conn.sendall(head.encode() + self.whole)
                return
            if not self.head:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{")
            data = b"HTTP/1.1 200 OK\r\nX-Slow: " if self.head else b""
            try:
                for i in range(100_000):
                    conn.sendall(data[i : i + 1] or b"a")
                    if self.stop.wait(0.05):
                        return
            except OSError:
                self.cut.append(time.monotonic())

    def _trickle_handshake(self, conn: socket.socket) -> None:
        """TLS with ``head``: the server's handshake itself, a byte every
        50 ms (a ServerHello and certificate take a minute at that pace)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        assert self.tls is not None
        tls = self.tls.wrap_bio(incoming, outgoing, server_side=True)
        with conn:
            try:
                while True:
                    try:
                        tls.do_handshake()
                        return
                    except ssl.SSLWantReadError:
                        pending = outgoing.read()
                        for i in range(len(pending)):
                            conn.sendall(pending[i : i + 1])
                            if self.stop.wait(0.05):
                                return
                        data = conn.recv(65536)
                        if not data:
                            raise ConnectionResetError from None
                        incoming.write(data)
            except (OSError, ssl.SSLError):
                self.cut.append(time.monotonic())

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _probe_within(url: str, settings: EdgeSettings, seconds: float) -> Any:
    """``probe(url)`` in a thread of its own: a probe that waits for the whole
    of a trickled answer fails the test instead of hanging it."""
    done: list[Any] = []
    t = threading.Thread(
        target=lambda: done.append(probe(url, settings, sleep=lambda _s: None)), daemon=True
    )
    t.start()
    t.join(seconds)
    assert done, "the probe waited for the whole answer"
    return done[0]


@pytest.mark.parametrize("head", [True, False], ids=["headers", "body"])
def test_an_edge_that_trickles_its_answer_is_given_up_at_the_deadline(head: bool) -> None:
    """An edge sending a byte every 50 ms never trips a 1 s socket timeout:
    before, the probe (and the pass, and every rotation behind it) waited
    for the whole answer, 100,000 bytes at that pace: over an hour. Now each
    attempt ends at probe_timeout, its connection is shut down, and the edge
    counts as down (it holds promotion, as an edge that cannot be probed)."""
    server = _Trickle(head)
    try:
        settings = EdgeSettings(urls=(server.url,), timeout=1.0, attempts=2)
        start = time.monotonic()
        result = _probe_within(server.url, settings, 30)
        took = time.monotonic() - start
        assert result.kids is None, result
        assert result.error == "no complete answer within 1s (probe_timeout)", result
        assert 2.0 <= took < 5.0, took  # two attempts of 1 s each
        deadline = time.monotonic() + 5
        while len(server.cut) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.cut) == 2, "the connections were left open"
    finally:
        server.close()


def test_a_probe_over_tls_reads_the_edge_and_cuts_a_trickling_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS edges (the CDN's), with the CA from SSL_CERT_FILE as verifiers'
    clients take it: a whole answer is read; one that trickles its body after
    the handshake is cut at probe_timeout like a plain-HTTP one. A trickled
    handshake ends there too (Python's ssl already bounds the whole handshake
    by the socket timeout; the deadline also holds the TCP socket from before
    it), with the same error."""
    from tests.test_deploy import _self_signed

    crt, key = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(crt))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    for head, whole in ((False, JWKS), (False, None), (True, None)):
        server = _Trickle(head, tls=ctx, whole=whole)
        try:
            settings = EdgeSettings(urls=(server.url,), timeout=1.0, attempts=1)
            start = time.monotonic()
            result = _probe_within(server.url, settings, 30)
            if whole is not None:
                assert result.kids == frozenset({"a", "b"}) and result.error is None, result
            else:
                assert result.error == "no complete answer within 1s (probe_timeout)", result
                assert time.monotonic() - start < 3
                until = time.monotonic() + 5
                while not server.cut and time.monotonic() < until:
                    time.sleep(0.05)
                assert server.cut, "the connection was left open"
        finally:
            server.close()


def test_probe_of_a_closed_port_is_an_error_not_an_exception() -> None:
    from tests.servers_common import free_port

    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    result = probe(url, EdgeSettings(urls=(url,), timeout=1, attempts=1))
    assert result.kids is None and result.error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"https://cdn/jwks.json"', "verify_urls: expected a list of http(s) URLs"),
        ('["ftp://cdn/jwks.json"]', "verify_urls: 'ftp://cdn/jwks.json': expected an http(s) URL"),
        ('["https://u:p@cdn/jwks.json"]', "must not carry credentials"),
        ('["https://a/j", "https://a/j"]', "verify_urls: lists a URL twice"),
    ],
)
def test_bad_verify_urls_are_one_line(home: Home, value: str, message: str) -> None:
    text = home.config.read_text().replace(
        "[publishers.site]\n", f"[publishers.site]\nverify_urls = {value}\n"
    )
    home.config.write_text(text)
    proc = home.run("config", "check")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(message) or message in proc.stderr, proc.stderr
    assert "publishers.site.verify_urls" in proc.stderr and proc.stderr.count("\n") == 1


# --------------------------------------------------------------------------- the pure rules


def test_edge_observed_keeps_times_while_shown_and_forgets_them_on_failure() -> None:
    from keymgr import transitions
    from keymgr.model import State

    t = T0
    s, evs = transitions.edge_observed(State(), "site", "https://e", frozenset({"a"}), t)
    assert s.edge("site", "https://e").since == {"a": t}
    assert [e["event"] for e in evs] == ["edge.updated"] and evs[0]["added"] == ["a"]
    # The same document again: nothing to record.
    same, evs = transitions.edge_observed(s, "site", "https://e", frozenset({"a"}), t + A)
    assert same is s and evs == []
    s, evs = transitions.edge_observed(s, "site", "https://e", frozenset({"a", "b"}), t + A)
    assert s.edge("site", "https://e").since == {"a": t, "b": t + A}
    assert evs[0]["added"] == ["b"] and "removed" not in evs[0]
    # A failed probe: no time survives (promotion waits), the kids stay (no destroy).
    s, evs = transitions.edge_observed(s, "site", "https://e", None, t + 2 * A, "HTTP 503")
    edge = s.edge("site", "https://e")
    assert edge.since == {} and edge.kids == {"a", "b"} and edge.error == "HTTP 503"
    assert evs[0]["event"] == "edge.unreachable" and evs[0]["reason"] == "HTTP 503"
    assert transitions.edge_observed(s, "site", "https://e", None, t + 3 * A, "x")[1] == []
    s, _ = transitions.edge_observed(s, "site", "https://e", frozenset({"b"}), t + 4 * A)
    assert s.edge("site", "https://e").since == {"b": t + 4 * A}
    # Round trip through the state document.
    assert State.from_dict(s.to_dict()) == s
    assert transitions.edges_configured(s, {"site": ()}).edges == {}
