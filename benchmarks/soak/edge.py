"""The JWKS origins (the file, the S3 object) and the caching edge in front of them."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .settings import REGION


class Origin(Protocol):
    #: How often the watcher polls it (s).
    poll: float

    def read(self) -> tuple[bytes | None, str | None]:
        """The served document and its Cache-Control; (None, None) when nothing
        is published yet. Raises when the origin does not answer."""
        ...


class FileOrigin:
    """The JWKS file the file publisher writes (what nginx would serve).

    While the "block" fault has moved the JWKS directory aside, ``fallback``
    names where the document now is: keymgr cannot write (nor read back) its
    target, but the static server keeps serving what is on disk, as it would
    from a read-only or full disk.
    """

    def __init__(self, path: Path, cache_control: str) -> None:
        self.path = path
        self.cache_control = cache_control
        self.fallback: Path | None = None
        self.poll = 0.05

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            return self.path.read_bytes(), self.cache_control
        except OSError:
            fallback = self.fallback
            if fallback is None:
                try:
                    self.path.stat()
                except FileNotFoundError:
                    return None, None  # nothing published yet
                raise
            return fallback.read_bytes(), self.cache_control


class HttpOrigin:
    """The S3 object in moto, read over plain HTTP with a short timeout.

    Each GET is SigV4-signed like a CDN's origin request (CloudFront origin
    access control): moto refuses anonymous reads of a private bucket.
    """

    def __init__(self, url: str) -> None:
        import boto3

        self.url = url
        self.poll = 0.1
        self.creds = boto3.session.Session().get_credentials()

    def read(self) -> tuple[bytes | None, str | None]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        req = AWSRequest(method="GET", url=self.url)
        SigV4Auth(self.creds, "s3", REGION).add_auth(req)
        r = urllib.request.Request(self.url, headers=dict(req.headers.items()))
        try:
            with urllib.request.urlopen(r, timeout=0.5) as resp:
                return resp.read(), resp.headers.get("Cache-Control")
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:
                return None, None
            raise


class Edge:
    """Serves the origin's JWKS on 127.0.0.1, its last good copy while the origin fails.

    Every request reads the origin. When that fails, the edge serves the copy
    it last got, like a CDN with ``stale-if-error``, for at most
    ``stale_if_error`` seconds after it got that copy; then it answers 503.
    The last good copy is refreshed by every request and by the watcher's
    polls (every 50-100 ms), so while the origin is down (moto SIGSTOPped) the
    edge serves what the origin held just before, like a CDN that revalidates
    often.

    ``cut()`` (the ``edge-stale`` fault) is a CDN that cannot reach its origin
    while keymgr still can: the edge's own origin reads fail and the watcher
    no longer refreshes its copy, so it serves what it last fetched itself.
    """

    def __init__(self, origin: Origin, stale_if_error: float) -> None:
        self.origin = origin
        self.stale_if_error = stale_if_error
        self.last: tuple[bytes, str | None] | None = None
        self.last_at = 0.0  # time.monotonic() of the last good copy
        self.down_until = 0.0
        self.cut_since: float | None = None
        self.requests = 0
        self.stale = 0
        self.refused = 0  # origin failing and no copy young enough: 503
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def get(self) -> tuple[bytes | None, str | None, bool]:
        """(body, Cache-Control, served stale or refused)."""
        with self.lock:
            self.requests += 1
            # Right after a failed origin read, do not make the client wait for
            # another timeout: serve the last copy (the watcher keeps probing).
            down = self.cut_since is not None or time.monotonic() < self.down_until
        if not down:
            try:
                body, cc = self.origin.read()
                if body is not None:
                    self.remember(body, cc)
                return body, cc, False
            except Exception:
                with self.lock:
                    self.down_until = time.monotonic() + 1.0
        with self.lock:
            if self.last is None or time.monotonic() - self.last_at > self.stale_if_error:
                self.refused += 1
                return None, None, True
            self.stale += 1
            return self.last[0], self.last[1], True

    def remember(self, body: bytes, cc: str | None, probe: bool = False) -> None:
        """A good copy, from the edge's own read or (``probe``) the watcher's."""
        with self.lock:
            if probe and self.cut_since is not None:
                return
            self.last = (body, cc)
            self.last_at = time.monotonic()
            if probe:
                self.down_until = 0.0

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """The edge cannot reach its origin inside the block."""
        with self.lock:
            self.cut_since = time.monotonic()
        try:
            yield
        finally:
            with self.lock:
                self.cut_since = None
                self.down_until = 0.0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(edge: Edge) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, cc, stale = edge.get()
            if body is None:
                self.send_response(503 if stale else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if cc:
                self.send_header("Cache-Control", cc)
            if stale:
                self.send_header("Warning", '110 - "Response is Stale"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
