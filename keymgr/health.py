"""``/healthz``, ``/readyz`` and ``/metrics`` on ``[daemon] listen`` (and, with
``[daemon] ui``, the read-only operator page of keymgr.ui).

Answers come from what the daemon already knows (its last checks and its last
state); a probe never blocks on a backend, so a slow KMS cannot make Kubernetes
kill a healthy pod.

Whoever can reach the port must not be able to starve the probes or the
process, so the listener is bounded:

- one thread (``health``) accepts connections and reads every request head,
  non-blocking: an idle or slow client costs a socket and a small buffer, never
  a thread. A client gets ``request_timeout`` seconds for its whole request line
  and headers (a slowloris trickling one byte at a time is dropped all the
  same), and at most ``max_pending`` connections wait for their head at once
  (past that, the oldest is dropped, so a new probe always gets its turn);
- a request line plus headers longer than ``max_head`` bytes is answered 431;
- a complete request is answered on a thread of its own, at most
  ``max_workers`` at once (past that: 503 at once); writing the whole answer
  has the same timeout, so a client that never reads cannot hold a thread either.
"""

from __future__ import annotations

import contextlib
import io
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST

from keymgr.metrics import Metrics

#: Requests answered at the same time; one more gets 503 at once.
MAX_WORKERS = 16
#: Seconds a client has to send its request head, and again to take the answer.
REQUEST_TIMEOUT = 5.0
#: Bytes of request line plus headers, blank line included; more gets 431.
MAX_HEAD = 8192
#: Connections still sending their request head; one more drops the oldest.
MAX_PENDING = 256
#: After a 431, how long and how much of the rest of the request is read and
#: thrown away before closing: closing with unread data would reset the
#: connection and could destroy the answer before the client reads it.
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 65536
_RECV = 4096
_REASONS = {431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _Pending:
    """A connection whose request head is not complete yet."""

    __slots__ = ("addr", "buf", "deadline", "drained", "draining", "sock")

    def __init__(self, sock: socket.socket, addr: Any, deadline: float) -> None:
        self.sock = sock
        self.addr = addr
        self.deadline = deadline
        self.buf = bytearray()
        self.draining = False
        self.drained = 0


def _head_end(buf: bytearray, start: int) -> int | None:
    """Offset just past the blank line that ends the head, if it has arrived."""
    ends = []
    for sep in (b"\n\r\n", b"\n\n"):
        i = buf.find(sep, start)
        if i >= 0:
            ends.append(i + len(sep))
    return min(ends) if ends else None


def _raw_response(code: int, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode() + body


#: The operator page (keymgr.ui): given a request path, its (body, headers),
#: or None when the path is not the page's (or the page is off).
UiRoute = Callable[[str], tuple[bytes, Mapping[str, str]] | None]


def _handler_class(
    metrics: Metrics,
    alive: Callable[[], tuple[bool, dict[str, Any]]],
    ready: Callable[[], tuple[bool, dict[str, Any]]],
    ui: UiRoute | None = None,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Answers one request whose head the listener already read."""

        def setup(self) -> None:
            sock, head = cast(tuple[socket.socket, bytes], self.request)
            self.connection = sock
            self.rfile = io.BytesIO(head)
            # The whole answer goes out in one sendall() in finish(): the
            # socket timeout then bounds the whole write, so a client reading
            # a little now and then cannot keep the thread either.
            self.wfile = io.BytesIO()

        def handle(self) -> None:
            self.handle_one_request()  # one request per connection

        def finish(self) -> None:
            self.connection.sendall(cast(io.BytesIO, self.wfile).getvalue())

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._stream(metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, info = (alive if path == "/healthz" else ready)()
                body = (json.dumps({"ok": ok, **info}, sort_keys=True) + "\n").encode()
                self._send(200 if ok else 503, body, "application/json")
            elif ui is not None and (page := self._ui(path)) is not None:
                self._send(page[0], page[1], "text/html; charset=utf-8", page[2])
            else:
                self._send(404, b"not found\n", "text/plain")

        def _ui(self, path: str) -> tuple[int, bytes, Mapping[str, str]] | None:
            assert ui is not None
            try:
                page = ui(path)
            except Exception:  # never a traceback (or a path in one) to the client
                return 500, b"operator page unavailable\n", {"Content-Type": "text/plain"}
            return None if page is None else (200, *page)

        def _send(
            self, code: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None
        ) -> None:
            extra = dict(headers or {})
            self.send_response(code)
            self.send_header("Content-Type", extra.pop("Content-Type", ctype))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, chunks: Iterator[bytes], ctype: str) -> None:
            """A body of unknown length, sent chunk by chunk as it is made, ended by
            closing the connection (HTTP/1.0 framing; one request per connection).

            The timeout bounds the whole answer, not each chunk: a client that
            reads a little now and then still loses the thread at the deadline.
            """
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            sock = self.connection
            deadline = time.monotonic() + (sock.gettimeout() or REQUEST_TIMEOUT)
            head = cast(io.BytesIO, self.wfile)
            pending = head.getvalue()
            head.seek(0)
            head.truncate()
            for chunk in chunks:
                pending += chunk
                if len(pending) < 65536:
                    continue
                self._send_by(sock, pending, deadline)
                pending = b""
            self._send_by(sock, pending, deadline)

        @staticmethod
        def _send_by(sock: socket.socket, data: bytes, deadline: float) -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("answer not taken in time")
            sock.settimeout(left)
            sock.sendall(data)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes every few seconds would drown the operational log

    return Handler


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        alive: Callable[[], tuple[bool, dict[str, Any]]],
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        max_workers: int = MAX_WORKERS,
        request_timeout: float = REQUEST_TIMEOUT,
        max_head: int = MAX_HEAD,
        max_pending: int = MAX_PENDING,
        ui: UiRoute | None = None,
    ) -> None:
        self._handler = _handler_class(metrics, alive, ready, ui)
        self._timeout = request_timeout
        self._max_head = max_head
        self._max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_workers)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port: int = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        #: In arrival order, so the first one is the oldest.
        self._pending: dict[socket.socket, _Pending] = {}
        self._closing = False
        self.thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self.thread.join(timeout=10)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    # -- the listener thread -------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._closing:
                for key, _ in self._sel.select(self._next_timeout()):
                    sock = cast(socket.socket, key.fileobj)
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        conn = self._pending.get(sock)
                        if conn is not None:
                            self._readable(conn)
                self._expire()
        finally:
            for conn in list(self._pending.values()):
                self._drop(conn)
            self._sel.close()

    def _next_timeout(self) -> float | None:
        if not self._pending:
            return None
        first = min(c.deadline for c in self._pending.values())
        return max(0.0, first - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._pending.values() if c.deadline <= now]:
            self._drop(conn)  # too slow: no answer, the thread was never theirs anyway

    def _accept(self) -> None:
        for _ in range(64):  # then let the others read: accepting is not all there is
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of file descriptors (or the like): free one, and never spin.
                if self._pending:
                    self._drop(next(iter(self._pending.values())))
                else:
                    time.sleep(0.05)
                return
            if len(self._pending) >= self._max_pending:
                self._drop(next(iter(self._pending.values())))
            sock.setblocking(False)
            conn = _Pending(sock, addr, time.monotonic() + self._timeout)
            self._pending[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ)

    def _readable(self, conn: _Pending) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if conn.draining:
            conn.drained += len(data)
            if conn.drained > _DRAIN_BYTES:
                self._drop(conn)
            return
        start = max(0, len(conn.buf) - 2)
        conn.buf += data
        end = _head_end(conn.buf, start)
        if end is not None and end <= self._max_head:
            self._forget(conn)
            self._dispatch(conn.sock, bytes(conn.buf[:end]), conn.addr)
        elif len(conn.buf) > self._max_head:
            self._reject_oversize(conn)

    def _reject_oversize(self, conn: _Pending) -> None:
        body = f"request line and headers over {self._max_head} bytes\n".encode()
        with contextlib.suppress(OSError):
            conn.sock.send(_raw_response(431, body))
            conn.sock.shutdown(socket.SHUT_WR)
        conn.buf = bytearray()
        conn.draining = True
        conn.deadline = time.monotonic() + _DRAIN_SECONDS

    def _dispatch(self, sock: socket.socket, head: bytes, addr: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                sock.send(_raw_response(503, b"busy\n"))
            sock.close()
            return
        try:
            threading.Thread(
                target=self._serve, args=(sock, head, addr), name="health-request", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had: busy, and the listener lives on
            self._slots.release()
            with contextlib.suppress(OSError):
                sock.send(_raw_response(503, b"busy\n"))
            sock.close()

    def _forget(self, conn: _Pending) -> None:
        self._pending.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)

    def _drop(self, conn: _Pending) -> None:
        self._forget(conn)
        conn.sock.close()

    # -- a request thread ----------------------------------------------------

    def _serve(self, sock: socket.socket, head: bytes, addr: Any) -> None:
        try:
            sock.settimeout(self._timeout)  # blocking again, but never for longer
            self._handler(cast(Any, (sock, head)), addr, cast(Any, self))
        except Exception:  # noqa: S110 - a client gone or too slow: nothing to tell anyone
            pass
        finally:
            sock.close()
            self._slots.release()
