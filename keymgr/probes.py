"""Edge probes: fetch the JWKS where verifiers fetch it, the way they do.

A publisher confirms what its *origin* serves (the file, the S3 object).
Verifiers rarely read the origin: they read a CDN, a reverse proxy cache or a
replica, which may keep an old document for longer than the ring's
``publish_ahead``. A publisher's ``verify_urls`` lists those public URLs; each
pass fetches every one of them, and a key counts as served at an edge only from
the first probe there that shows it. Promotion waits ``publish_ahead`` after
the *last* edge shows the key, and a key is destroyed only once every edge
shows a document without it (:mod:`keymgr.planner`).

A probe is a plain GET, as a verifier's JWKS client sends it: no cache-busting
query, no ``Cache-Control: no-cache`` request header, redirects followed, the
process's proxy and CA settings honoured. It has a deadline per attempt, a
bounded number of attempts with jittered backoff (on connection errors, 429
and 5xx; a 4xx other than 429 is an answer, not a hiccup), and a size limit.
An edge that cannot be probed is never skipped: it holds promotion.

The deadline covers the whole attempt (connect, TLS, headers, body,
redirects), not each socket operation: an edge that trickles its answer a
byte at a time, each within the socket timeout, would otherwise hold the
pass, and every rotation behind it, for hours. When it passes, the attempt's
connections are shut down (:class:`_Deadline`).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keymgr.jwks import parse_keys
from keymgr.options import Options

#: Publisher options that configure its edges (read by keymgr.config, not by
#: the publisher plug-in: every publisher may have edges).
EDGE_OPTIONS = frozenset({"verify_urls", "probe_timeout", "probe_attempts"})
#: Bytes read from an edge at most; a JWKS is a few KiB.
MAX_BODY = 1 << 20
_USER_AGENT = "keymgr-edge-probe/1"


@dataclass(frozen=True)
class EdgeSettings:
    """The edges of one publisher and how to probe them."""

    urls: tuple[str, ...] = ()
    timeout: float = 5.0
    attempts: int = 3


@dataclass(frozen=True)
class ProbeResult:
    """One probe: the kids the edge's document holds, or why there are none."""

    url: str
    kids: frozenset[str] | None
    error: str | None = None
    #: The ``Age`` header (seconds the edge has held this copy), when sent.
    age: float | None = None
    #: Wall-clock seconds the probe took, retries included.
    seconds: float = 0.0


def edge_settings(options: Mapping[str, object], where: str) -> EdgeSettings:
    """Read a publisher table's edge options (ConfigError naming ``where.FIELD``)."""
    o = Options({k: v for k, v in options.items() if k in EDGE_OPTIONS}, where, EDGE_OPTIONS)
    raw = o.raw("verify_urls", [])
    if not isinstance(raw, list) or not all(isinstance(u, str) for u in raw):
        raise o.err("verify_urls", f"expected a list of http(s) URLs, got {raw!r}")
    for url in raw:
        problem = _url_problem(url)
        if problem is not None:
            raise o.err("verify_urls", f"{url!r}: {problem}")
    if len(set(raw)) != len(raw):
        raise o.err("verify_urls", "lists a URL twice")
    return EdgeSettings(
        urls=tuple(raw),
        timeout=o.number("probe_timeout", 5.0, 0.1, 60.0),
        attempts=o.integer("probe_attempts", 3, 1, 10),
    )


def _url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http(s) URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    if parts.fragment:
        return "must not have a '#' fragment"
    return None


def kids_of(body: bytes) -> frozenset[str] | None:
    """The kids of a JWKS document, or None when ``body`` is not one."""
    keys = parse_keys(body)
    return None if keys is None else frozenset(keys)


class _Deadline:
    """The connections of one probe attempt, shut down when its time is up.

    Each connection registers a duplicate of its TCP socket as soon as it is
    connected (before any TLS handshake): shutting the duplicate down ends
    the connection, so a read blocked in the probe's thread returns at once,
    and the duplicate is this object's own descriptor, never one the system
    may have handed to something else since.
    """

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.deadline = None
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()

    def add(self, sock: socket.socket) -> None:
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            if self.expired:
                _shut(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                _shut(s)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        sock.shutdown(socket.SHUT_RDWR)


#: The attempt under way in this thread (probes run one at a time per thread).
_current = threading.local()


class _TCP(http.client.HTTPConnection):
    """An HTTP connection that registers its socket with the attempt's deadline."""

    def connect(self) -> None:
        super().connect()  # for _TLS: the TCP connection, before the handshake
        deadline: _Deadline | None = getattr(_current, "deadline", None)
        if deadline is not None:
            deadline.add(self.sock)


class _TLS(http.client.HTTPSConnection, _TCP):
    """HTTPSConnection.connect calls super().connect(): _TCP's, then the handshake."""


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TCP, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        # The arguments the stdlib's own https_open passes (check_hostname
        # only up to Python 3.11).
        args: dict[str, Any] = {"context": getattr(self, "_context", None)}
        if hasattr(self, "_check_hostname"):
            args["check_hostname"] = self._check_hostname
        return self.do_open(_TLS, req, **args)


#: urlopen's opener (proxies from the environment, redirects, the default CA
#: store), with connections that a deadline can cut.
_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def probe(
    url: str,
    settings: EdgeSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> ProbeResult:
    """Fetch ``url`` like a verifier; never raises."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
    start = time.monotonic()
    error = "not probed"
    for attempt in range(settings.attempts):
        if attempt:
            # Jittered exponential backoff: probes of many daemons, or many
            # edges behind one origin, do not retry in lockstep.
            sleep(min(0.25 * 2**attempt, 2.0) * (0.5 + rng.random()))
        request = urllib.request.Request(  # noqa: S310 - http(s) only, checked at config load
            url, headers={"Accept": "application/json", "User-Agent": _USER_AGENT}
        )
        deadline = _Deadline(settings.timeout)
        try:
            with deadline, _OPENER.open(request, timeout=settings.timeout) as resp:
                body = resp.read(MAX_BODY + 1)
                age_header = resp.headers.get("Age")
            if deadline.expired:  # cut short: what was read is not the document
                raise TimeoutError
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            e.close()
            if e.code != 429 and e.code < 500:
                break
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            # The socket's own timeout (the same seconds) may fire first.
            timed_out = isinstance(e, TimeoutError) or isinstance(
                getattr(e, "reason", None), TimeoutError
            )
            error = (
                f"no complete answer within {settings.timeout:g}s (probe_timeout)"
                if deadline.expired or timed_out
                else _reason(e)
            )
            continue
        if len(body) > MAX_BODY:
            error = f"document larger than {MAX_BODY} bytes"
            break
        kids = kids_of(body)
        if kids is None:
            error = "not a JWKS"
            break
        return ProbeResult(
            url, kids, age=_age(age_header), seconds=time.monotonic() - start
        )
    return ProbeResult(url, None, error=error, seconds=time.monotonic() - start)


def probe_all(
    edges: Mapping[str, EdgeSettings], only: Collection[str] | None = None
) -> dict[str, list[ProbeResult]]:
    """Probe every edge of every publisher (``only``: these publishers)."""
    return {
        name: [probe(url, s) for url in s.urls]
        for name, s in edges.items()
        if s.urls and (only is None or name in only)
    }


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    text = str(reason if reason is not None else e) or type(e).__name__
    return " ".join(text.split())[:160]


def _age(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
