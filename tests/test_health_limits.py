"""keymgr.health under hostile clients, with real sockets: a slowloris is dropped
after the request timeout, idle connections cannot starve the probes, an
oversize head is answered 431, and at most ``max_workers`` requests are served
at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from prometheus_client import Gauge

from keymgr import health
from keymgr.health import HealthServer
from keymgr.metrics import Metrics

TIMEOUT = 1.0  # the tests' request timeout (the default is health.REQUEST_TIMEOUT)


def always(ok: bool = True) -> Callable[[], tuple[bool, dict[str, Any]]]:
    return lambda: (ok, {"probe": "test"})


@pytest.fixture
def make_server() -> Iterator[Callable[..., HealthServer]]:
    servers: list[HealthServer] = []

    def make(**kw: Any) -> HealthServer:
        kw.setdefault("request_timeout", TIMEOUT)
        alive = kw.pop("alive", always())
        ready = kw.pop("ready", always())
        metrics = kw.pop("metrics", None) or Metrics()
        s = HealthServer("127.0.0.1", 0, metrics, alive, ready, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def request(port: int, path: str = "/healthz", extra: bytes = b"") -> tuple[int, bytes]:
    with connect(port) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n")
        raw = read_all(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), raw[:200]
    return int(head.split()[1]), body


def test_defaults_are_bounded() -> None:
    assert 0 < health.REQUEST_TIMEOUT <= 5
    assert 0 < health.MAX_WORKERS <= 16
    assert 0 < health.MAX_HEAD <= 8192


def test_answers_probes_and_metrics(make_server: Callable[..., HealthServer]) -> None:
    srv = make_server(ready=always(False))
    code, body = request(srv.port, "/healthz")
    assert code == 200 and json.loads(body) == {"ok": True, "probe": "test"}
    assert request(srv.port, "/readyz")[0] == 503
    assert request(srv.port, "/metrics")[0] == 200
    assert request(srv.port, "/nope")[0] == 404


def test_slowloris_is_dropped_after_the_timeout(make_server: Callable[..., HealthServer]) -> None:
    """A client trickling a header byte every 0.2 s (never idle for a whole
    timeout) is still cut off once the timeout for the whole head has passed."""
    srv = make_server()
    with connect(srv.port) as s:
        s.settimeout(0.2)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        start = time.monotonic()
        closed_after = None
        while time.monotonic() - start < TIMEOUT * 5:
            try:
                s.sendall(b"a")
                data = s.recv(1024)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                data = b""
            assert data == b"", f"a request that never ended got an answer: {data!r}"
            closed_after = time.monotonic() - start
            break
    assert closed_after is not None, "the slow client was never dropped"
    assert TIMEOUT * 0.8 <= closed_after <= TIMEOUT * 3, closed_after
    assert request(srv.port)[0] == 200


def test_idle_connections_do_not_stop_the_probes(
    make_server: Callable[..., HealthServer],
) -> None:
    """Far more idle connections than request threads: /healthz answers at once.
    With one thread per connection (or a thread pool they could fill) it would wait."""
    srv = make_server(max_workers=4, max_pending=64, request_timeout=30)
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(srv.port)) for _ in range(40)]
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\n")  # a started but unfinished request too
        t0 = time.monotonic()
        assert request(srv.port)[0] == 200
        assert time.monotonic() - t0 < 2
        # More idle connections than may wait at all: the oldest make room.
        idle += [stack.enter_context(connect(srv.port)) for _ in range(100)]
        t0 = time.monotonic()
        assert request(srv.port)[0] == 200
        assert time.monotonic() - t0 < 2
        assert threading.active_count() < 20  # no thread per connection


@pytest.mark.parametrize("size", [9000, 200_000])
def test_oversize_head_gets_431(make_server: Callable[..., HealthServer], size: int) -> None:
    srv = make_server()
    code, body = request(srv.port, extra=b"X-Big: " + b"a" * size + b"\r\n")
    assert code == 431, body
    assert request(srv.port)[0] == 200


def test_head_just_under_the_limit_is_served(make_server: Callable[..., HealthServer]) -> None:
    srv = make_server()
    line = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    pad = health.MAX_HEAD - len(line) - len(b"X-Pad: \r\n\r\n")
    assert request(srv.port, extra=b"X-Pad: " + b"a" * pad + b"\r\n")[0] == 200
    assert request(srv.port, extra=b"X-Pad: " + b"a" * (pad + 1) + b"\r\n")[0] == 431


def test_many_headers_within_the_size_are_fine(make_server: Callable[..., HealthServer]) -> None:
    srv = make_server()
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(50))
    assert request(srv.port, extra=extra)[0] == 200


def test_concurrent_requests_are_bounded(make_server: Callable[..., HealthServer]) -> None:
    """With every request thread busy, one more request is answered 503 at once
    instead of starting another thread; once they finish, service resumes."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_ready() -> tuple[bool, dict[str, Any]]:
        entered.release()
        release.wait(30)
        return True, {}

    srv = make_server(max_workers=2, ready=slow_ready)
    results: list[int] = []
    workers = [threading.Thread(target=lambda: results.append(request(srv.port, "/readyz")[0]))
               for _ in range(2)]
    for w in workers:
        w.start()
    for _ in range(2):
        assert entered.acquire(timeout=10)
    t0 = time.monotonic()
    assert request(srv.port, "/healthz")[0] == 503
    assert time.monotonic() - t0 < 2
    release.set()
    for w in workers:
        w.join(10)
    assert results == [200, 200]
    assert request(srv.port, "/healthz")[0] == 200


def test_a_client_that_never_reads_frees_its_thread(
    make_server: Callable[..., HealthServer],
) -> None:
    """The answer is written with the same timeout: a client that asks for a
    large /metrics and never reads it cannot keep the only request thread."""
    metrics = Metrics()
    big = Gauge("padding", "makes /metrics larger than any socket buffer", ["i"],
                registry=metrics.base)
    for i in range(40_000):  # ~9 MB: more than the kernel buffers on both sides
        big.labels(f"{i:0200d}").set(i)
    srv = make_server(max_workers=1, metrics=metrics)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        time.sleep(0.5)  # the thread is now blocked writing to a client that never reads
        assert request(srv.port)[0] == 503
        deadline = time.monotonic() + TIMEOUT * 5
        while time.monotonic() < deadline:
            if request(srv.port)[0] == 200:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the only request thread stayed with a client that never reads")


def test_close_stops_the_thread_and_frees_the_port(
    make_server: Callable[..., HealthServer],
) -> None:
    srv = make_server()
    idle = connect(srv.port)
    srv.close()
    assert not srv.thread.is_alive()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", srv.port))
    idle.close()
