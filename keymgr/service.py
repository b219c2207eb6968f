"""The local signing service of ``keymgr run`` (``[service]``, docs/signing-service.md).

Issuers in any language get tokens over HTTP/JSON from the daemon::

    POST /v1/rings/{ring}/sign  {"claims": {...}, "ttl": "15m" | seconds}  ->  {"token": "..."}
    GET  /v1/rings/{ring}                        ->  {"ring", "kid", "alg", "next_promotion_at"}

Errors are ``{"error": {"code": ..., "message": ...}}`` with a stable ``code``
(:data:`STATUS`). Every token comes from :meth:`KeyManager.sign` of the
daemon's *current* manager (a SIGHUP swaps it), so the service follows each
promotion within the same freshness window as the Python API, and a ring with
no active key, or whose state cannot be read to confirm it, answers 503
``not_ready`` rather than a token from a key that may have stopped signing.
With KMS or Vault, one token is one backend request; no private material is
ever in this process's answers.

The server stack is aiohttp's low-level server (``aiohttp.web.Server``: no
router, no middleware) on its own asyncio loop in a thread of its own. It was
chosen over uvicorn + a raw ASGI app because the ASGI scope carries no
transport: neither the peer's credentials of a Unix socket (``SO_PEERCRED``)
nor the TLS client certificate reach the application there (uvicorn issue
#400, the TLS extension still a proposal), while aiohttp hands each request its
transport (``request.transport``, ``get_extra_info("peercert")``). Its HTTP
parser is C (llhttp), and it serves pre-bound sockets (``SockSite``), which
lets this module bind the Unix socket with its final mode and group before the
path appears, and keep listening across a reload without a gap.

Two listeners, one handler:

- a Unix socket (``service.socket``, mode ``socket_mode``, group
  ``socket_group``): the caller is the peer process's uid, gid and
  supplementary groups, from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``);
- optionally TCP (``service.listen``): TLS 1.3 only, a client certificate
  issued by ``tls_client_ca`` required (a wrong one fails the handshake); the
  caller is the certificate's subject CN and subjectAltName values.

Each ring is served to the callers its ``[service.rings.RING]`` table allows;
anyone else gets 403 ``forbidden``, counted, and recorded in the audit log as
``service.refused`` at most once per caller per minute, with the count of
refusals it stands for (:class:`RefusalLog`).
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import os
import pwd
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from keymgr import malloc
from keymgr.errors import BackendError, ConfigError, KeymgrError, UsageError
from keymgr.logs import get_logger
from keymgr.model import ACTIVE
from keymgr.peercred import peer_credentials
from keymgr.service_config import Listeners, RingAccess, ServiceSettings, tls_context
from keymgr.status_client import CONFIG_HEADER, FORM_PARAM, STATUS_FORMS, STATUS_PATH
from keymgr.timefmt import format_duration, format_time, parse_duration

if TYPE_CHECKING:
    import ssl

    from keymgr.config import Config
    from keymgr.manager import KeyManager
    from keymgr.metrics import Metrics

log = get_logger("keymgr.service")

#: HTTP status of each error code (the codes are the stable part of the API).
STATUS = {
    "bad_request": 400,
    "forbidden": 403,
    "not_found": 404,
    "unknown_ring": 404,
    "method_not_allowed": 405,
    "config_differs": 409,
    "payload_too_large": 413,
    "internal": 500,
    "not_ready": 503,
    "backend_unavailable": 503,
}
#: Bytes of a sign request's body.
MAX_BODY = 65536
#: Seconds between two ``service.refused`` audit events of one caller.
REFUSAL_WINDOW = 60.0
#: Callers whose refusals are tracked one by one; past that they share one entry.
MAX_TRACKED_CALLERS = 4096
#: Backends whose signer is local CPU work: signed on the service's loop.
#: Any other (KMS, Vault, PKCS#11, ...) signs in a worker thread.
INLINE_BACKENDS = frozenset({"file"})
#: Worker threads for backends that sign over the network.
SIGN_THREADS = 16
#: Idle keep-alive connections are closed after this many seconds.
KEEPALIVE = 60.0
#: A stopping service finishes the requests in flight for at most this long.
SHUTDOWN_GRACE = 3.0
_PREFIX = "/v1/rings/"
#: Bytes of status text per chunk sent, and chunks rendered ahead of the client.
STATUS_CHUNK = 1 << 20
STATUS_AHEAD = 4
#: Seconds a status client may take to accept one chunk before it is dropped.
STATUS_WRITE_TIMEOUT = 60.0
_LISTEN_FDS_START = 3  # sd_listen_fds(3)
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_SIGN_FIELDS = frozenset({"claims", "ttl"})
_HEADERS = {"Cache-Control": "no-store"}


class Host(Protocol):
    """What the service needs of the daemon (keymgr.daemon.Daemon)."""

    manager: KeyManager
    config: Config
    metrics: Metrics

    def record(self, event: dict[str, Any]) -> None: ...


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- callers


@dataclass
class Caller:
    """Who is asking, as the kernel (Unix socket) or the TLS handshake says."""

    #: Metrics label and audit key: ``uid:1000`` or ``cert:CN``.
    label: str
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    #: Certificate subject CN and subjectAltName values (TCP).
    names: tuple[str, ...] = ()
    sock: Any = None
    _groups: frozenset[int] | None = field(default=None, repr=False)

    def groups(self) -> frozenset[int]:
        """The peer's supplementary groups (``SO_PEERGROUPS``), asked only when needed."""
        if self._groups is None:
            self._groups = _peer_groups(self.sock)
        return self._groups

    def allowed(self, access: RingAccess | None) -> bool:
        if access is None:
            return False
        if self.uid is not None:
            if self.uid in access.uids or self.gid in access.gids:
                return True
            return bool(access.gids) and not access.gids.isdisjoint(self.groups())
        return not access.cert_names.isdisjoint(self.names)

    def describe(self) -> str:
        if self.uid is None:
            return f"client certificate {', '.join(self.names) or '(no names)'}"
        try:
            user = f" ({pwd.getpwuid(self.uid).pw_name})"
        except KeyError:
            user = ""
        return f"uid {self.uid}{user}, gid {self.gid}, pid {self.pid}"


def _peer_groups(sock: Any) -> frozenset[int]:
    if sock is None:
        return frozenset()
    size = 256
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * size)
        except OSError as e:
            if e.errno == 34 and size < 65536:  # ERANGE: more groups than room
                size *= 16
                continue
            return frozenset()  # not supported: the primary gid alone decides
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % groups.itemsize])
        return frozenset(groups)
    return frozenset()


def _unix_caller(sock: Any) -> Caller:
    pid, uid, gid = peer_credentials(sock)
    return Caller(label=f"uid:{uid}", uid=uid, gid=gid, pid=pid, sock=sock)


def _cert_caller(cert: Mapping[str, Any] | None) -> Caller:
    names: list[str] = []
    for rdn in (cert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.append(str(v))
    for _kind, v in (cert or {}).get("subjectAltName", ()):
        names.append(str(v))
    label = f"cert:{names[0]}" if names else "cert:"
    return Caller(label=label, names=tuple(dict.fromkeys(names)))


# --------------------------------------------------------------------------- audit


@dataclass
class _Tracked:
    until: float  # no event for this caller before this (time.monotonic)
    pending: int = 0
    rings: set[str] = field(default_factory=set)
    detail: str = ""


class RefusalLog:
    """``service.refused`` audit events: at most one per caller per ``window``.

    The first refusal of a caller is recorded at once (``count`` 1); further
    ones within the window are counted, and recorded as one event (with their
    ``count``) when the window ends, which opens the next window. Pending
    counts are recorded when the service stops. Recording commits through the
    state store (Daemon.record), so it happens on a thread of its own, never
    on the loop that answers requests.
    """

    def __init__(
        self, record: Callable[[dict[str, Any]], None], window: float = REFUSAL_WINDOW
    ) -> None:
        self._record = record
        self._window = window
        self._cond = threading.Condition()
        self._callers: dict[str, _Tracked] = {}
        self._out: list[dict[str, Any]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="service-audit", daemon=True)
        self._thread.start()

    def refused(self, caller: str, ring: str, detail: str) -> None:
        now = time.monotonic()
        with self._cond:
            if caller not in self._callers and len(self._callers) >= MAX_TRACKED_CALLERS:
                caller = "(others)"
            t = self._callers.get(caller)
            if t is None or (now >= t.until and t.pending == 0):
                self._callers[caller] = _Tracked(until=now + self._window)
                self._out.append(_event(caller, {ring}, detail, 1))
                self._cond.notify()
                return
            t.pending += 1
            t.rings.add(ring)
            t.detail = detail

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _due(self, now: float, everything: bool) -> tuple[list[dict[str, Any]], float | None]:
        out, self._out = self._out, []
        nxt: float | None = None
        for caller, t in list(self._callers.items()):
            if t.pending and (everything or now >= t.until):
                out.append(_event(caller, t.rings, t.detail, t.pending))
                self._callers[caller] = _Tracked(until=now + self._window)
            elif not t.pending and now >= t.until:
                del self._callers[caller]
                continue
            until = self._callers[caller].until
            nxt = until if nxt is None else min(nxt, until)
        return out, nxt

    def _run(self) -> None:
        while True:
            with self._cond:
                closing = self._closing
                out, nxt = self._due(time.monotonic(), closing)
                if not out and not closing:
                    timeout = None if nxt is None else max(0.0, nxt - time.monotonic())
                    self._cond.wait(timeout)
                    continue
            for ev in out:
                self._record(ev)
            if closing:
                return


def _event(caller: str, rings: set[str], detail: str, count: int) -> dict[str, Any]:
    """``rings``: the rings refused ("" stands for ``GET /v1/status``, no ring)."""
    ev: dict[str, Any] = {"event": "service.refused"}
    named = sorted(r for r in rings if r)
    if len(named) == 1:
        ev["ring"] = named[0]
    elif named:
        ev["rings"] = named
    ev.update(caller=caller, count=count, reason=detail)
    return ev


# --------------------------------------------------------------------------- sockets


@dataclass
class Bound:
    """Listening sockets, bound before the service starts (and before a reload is applied)."""

    unix: socket.socket
    #: (st_dev, st_ino) of the socket file: only that file is removed at close.
    #: None for a socket systemd passed (socket activation): systemd owns it.
    unix_id: tuple[int, int] | None
    tcp: socket.socket | None = None
    ssl: ssl.SSLContext | None = None
    tls_files: tuple[Any, ...] = ()

    def close(self) -> None:
        for s in (self.unix, self.tcp):
            if s is not None:
                s.close()


def _file_id(p: Path | None) -> Any:
    if p is None:
        return None
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _tls_files(li: Listeners) -> tuple[Any, ...]:
    return tuple(_file_id(p) for p in (li.tls_cert, li.tls_key, li.tls_client_ca))


def _check_stale(path: Path) -> None:
    """Refuse a path that is not a socket, or a socket someone still serves."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise KeymgrError(f"service.socket: {path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # left behind by a process that is gone: replaced below
    except OSError as e:
        raise KeymgrError(f"service.socket: {path}: cannot check it: {e.strerror}") from None
    finally:
        probe.close()
    raise KeymgrError(f"service.socket: {path} is in use by another process")


def _inherited(path: Path) -> socket.socket | None:
    """The listening socket systemd passed for ``path`` (socket activation:
    ``LISTEN_PID``, ``LISTEN_FDS``, descriptors from 3), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    want = os.path.abspath(path)
    for fd in range(_LISTEN_FDS_START, _LISTEN_FDS_START + n):
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (or closed since)
        if s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM and (
            s.getsockname() == want
        ):
            for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(k, None)
            s.setblocking(False)
            return s
        s.detach()  # someone else's descriptor: leave it open
    return None


def _bind_unix(li: Listeners) -> tuple[socket.socket, tuple[int, int] | None]:
    """Bind under a temporary name, set mode and group, then rename into place:
    the path never exists with other permissions than configured. A socket
    systemd passed for the path is used as it is (its unit sets mode and group)."""
    path = li.socket
    adopted = _inherited(path)
    if adopted is not None:
        return adopted, None
    if not path.parent.is_dir():
        raise KeymgrError(f"service.socket: folder {path.parent} does not exist")
    _check_stale(path)
    tmp = path.parent / f".k{secrets.token_hex(3)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(tmp))
        try:
            os.chmod(tmp, li.socket_mode)
            if li.socket_gid is not None:
                os.chown(tmp, -1, li.socket_gid)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        s.listen(512)
        s.setblocking(False)
        st = os.stat(path)
    except OSError as e:
        s.close()
        raise KeymgrError(f"service.socket: {path}: cannot listen: {e.strerror or e}") from None
    return s, (st.st_dev, st.st_ino)


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        s = socket.create_server((host, port), family=family, backlog=512)
    except OSError as e:
        raise KeymgrError(f"service.listen {host}:{port}: cannot listen: {e.strerror}") from None
    s.setblocking(False)
    return s


def bind(settings: ServiceSettings, old: SigningService | None = None) -> Bound:
    """The listeners of ``settings``; the ones ``old`` already has for the same
    path or address are shared with it (a duplicate descriptor), so a reload
    never closes a listening socket."""
    li = settings.listeners
    ssl_ctx = None
    if li.listen is not None:
        try:
            ssl_ctx = tls_context(li)
        except ConfigError as e:
            raise KeymgrError(str(e)) from None
    prev = old.bound if old is not None else None
    if old is not None and prev is not None and old.listeners.socket == li.socket:
        unix, unix_id = prev.unix.dup(), prev.unix_id
        try:
            if unix_id is not None:  # not when systemd owns the socket
                os.chmod(li.socket, li.socket_mode)
                if li.socket_gid is not None:
                    os.chown(li.socket, -1, li.socket_gid)
        except OSError as e:
            unix.close()
            raise KeymgrError(f"service.socket: {li.socket}: {e.strerror}") from None
    else:
        unix, unix_id = _bind_unix(li)
    tcp = None
    try:
        if li.listen is not None:
            if old is not None and prev is not None and prev.tcp is not None and (
                old.listeners.listen == li.listen
            ):
                tcp = prev.tcp.dup()
            else:
                tcp = _bind_tcp(*li.listen)
    except BaseException:
        if old is None or old.listeners.socket != li.socket:
            _unlink_if(li.socket, unix_id)
        unix.close()
        raise
    return Bound(unix, unix_id, tcp, ssl_ctx, _tls_files(li))


def _unlink_if(path: Path, ident: tuple[int, int] | None) -> None:
    if ident is None:
        return
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)


# --------------------------------------------------------------------------- the service


def _json(status: int, doc: Any) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(doc), content_type="application/json", headers=_HEADERS
    )


class SigningService:
    """The HTTP server on the listeners of ``bound``, on its own loop and thread."""

    def __init__(self, host: Host, settings: ServiceSettings, bound: Bound) -> None:
        self.host = host
        self.listeners = settings.listeners
        self.bound = bound
        self.refusals = RefusalLog(host.record)
        self._pool = ThreadPoolExecutor(SIGN_THREADS, thread_name_prefix="service-sign")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.ServerRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        #: Per (ring, caller): the metric children, looked up once.
        self._children: dict[tuple[str, str], Any] = {}
        #: One ``GET /v1/status`` rendered at a time (created on the loop).
        self._status_slot: asyncio.Semaphore | None = None
        self.tcp_port: int | None = bound.tcp.getsockname()[1] if bound.tcp is not None else None

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="service", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None or not self._started.is_set():
            # The caller closes it: it knows whether the socket path is shared.
            raise KeymgrError(f"service: cannot start: {self._error or 'timed out'}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:
            self._error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            if self._runner is not None:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _setup(self) -> None:
        server = web.Server(
            self._handle,
            access_log=None,
            keepalive_timeout=KEEPALIVE,
            auto_decompress=False,
            max_field_size=4096,
            max_line_size=4096,
        )
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        self._runner = runner
        b = self.bound
        await web.SockSite(runner, b.unix).start()
        if b.tcp is not None:
            await web.SockSite(runner, b.tcp, ssl_context=b.ssl).start()

    def close(self, keep_socket: bool = False) -> None:
        """Stop: finish the requests in flight (at most :data:`SHUTDOWN_GRACE`), close
        the listeners (removing the socket file unless ``keep_socket``: a reload
        that goes on serving the same path), record pending refusals."""
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=SHUTDOWN_GRACE + 10)
        if not keep_socket:
            _unlink_if(self.listeners.socket, self.bound.unix_id)
        self.bound.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.refusals.close()

    def address(self) -> dict[str, Any]:
        out: dict[str, Any] = {"socket": str(self.listeners.socket)}
        if self.bound.unix_id is None:
            out["socket_activated"] = True
        if self.listeners.listen is not None:
            host, port = self.listeners.listen[0], self.tcp_port
            out["listen"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return out

    # -- requests ------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        ring = ""
        try:
            path = request.path
            if path == STATUS_PATH:
                return await self._status(request)
            if not path.startswith(_PREFIX):
                raise _Refused("not_found", f"no such endpoint {path!r}")
            ring, _, action = path[len(_PREFIX) :].partition("/")
            if action == "sign":
                if request.method != "POST":
                    raise _Refused("method_not_allowed", "use POST")
            elif action == "":
                if request.method not in ("GET", "HEAD"):
                    raise _Refused("method_not_allowed", "use GET")
            else:
                raise _Refused("not_found", f"no such endpoint {path!r}")
            host = self.host
            config = host.config
            if ring not in config.policies:
                raise _Refused("unknown_ring", f"unknown ring {ring!r}")
            caller = self._caller(request)
            settings = config.service
            access = settings.rings.get(ring) if settings is not None else None
            if not caller.allowed(access):
                self.refusals.refused(
                    caller.label, ring, f"{caller.describe()}: not allowed to use ring {ring!r}"
                )
                raise _Refused("forbidden", f"not allowed to use ring {ring!r}")
            if action == "sign":
                token = await self._sign(request, host, config, ring)
                self._observe(ring, caller.label, t0)
                return _json(200, {"token": token})
            return _json(200, await self._info(host, ring))
        except _Refused as r:
            return self._refuse(r.code, r.message, ring)
        except Exception as e:  # never a traceback to the caller, nor a secret
            log.error("service.failed", ring=ring, error=f"{type(e).__name__}: {e}")
            return self._refuse("internal", "internal error", ring)

    def _caller(self, request: web.BaseRequest) -> Caller:
        sock = request.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            return _unix_caller(sock)
        return _cert_caller(request.get_extra_info("peercert"))

    def _refuse(self, code: str, message: str, ring: str) -> web.Response:
        label = ring if ring in self.host.config.policies else ""
        self.host.metrics.service_refusals.labels(label, code).inc()
        return _json(STATUS[code], {"error": {"code": code, "message": message}})

    def _observe(self, ring: str, caller: str, t0: int | float) -> None:
        children = self._children.get((ring, caller))
        m = self.host.metrics
        if children is None or children[0] is not m:
            children = (m, m.service_tokens.labels(ring, caller), m.service_latency.labels(ring))
            self._children[(ring, caller)] = children
        children[1].inc()
        children[2].observe(time.perf_counter() - t0)

    async def _sign(self, request: web.BaseRequest, host: Host, config: Config, ring: str) -> str:
        claims, ttl = await _sign_request(request, config.policies[ring].retire_grace)
        manager = host.manager  # the current one: a reload swaps it
        pol = manager.config.policies.get(ring)
        if pol is None:
            raise _Refused("unknown_ring", f"unknown ring {ring!r}")
        call = partial(manager.sign, ring, claims, ttl, issuer=True)
        try:
            if manager.config.backends[pol.backend].type_name in INLINE_BACKENDS:
                return call()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, call)
        except UsageError as e:
            raise _Refused("bad_request", str(e)) from None
        except BackendError as e:
            raise _Refused("backend_unavailable", f"ring {ring!r}: {e}") from None
        except KeymgrError as e:  # no active key, or the state cannot be read to confirm it
            raise _Refused("not_ready", f"ring {ring!r} is not ready: {e}") from None
        except (TypeError, ValueError) as e:
            raise _Refused("bad_request", f"claims: {e}") from None

    async def _info(self, host: Host, ring: str) -> dict[str, Any]:
        manager = host.manager
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(self._pool, manager.current_state)
        except KeymgrError as e:
            raise _Refused("not_ready", f"ring {ring!r} is not ready: {e}") from None
        key = state.ring(ring).active
        if key is None or key.state != ACTIVE or key.activated_at is None:
            raise _Refused("not_ready", f"ring {ring!r} has no active key yet")
        pol = manager.config.policies[ring]
        nxt = key.activated_at + pol.rotation_period
        plan = host.metrics.snapshot[1]
        upcoming = plan.upcoming.get(ring) if plan is not None else None
        if upcoming is not None and upcoming.action == "promote" and upcoming.at > nxt:
            nxt = upcoming.at
        return {
            "ring": ring,
            "kid": key.kid,
            "alg": key.alg,
            "activated_at": format_time(key.activated_at),
            "next_promotion_at": format_time(nxt),
        }

    async def _status(self, request: web.BaseRequest) -> web.StreamResponse:
        """``keymgr status --json`` byte for byte (``?form=text``: ``keymgr
        status``), from the daemon's state: what the command computes (read,
        validated, checked against the audit log, planned at the wall clock;
        only what changed is read again), streamed as it is rendered. The
        daemon's own uid and root may read it (both can read the state
        anyway), and whoever ``[service.status]`` names."""
        if request.method != "GET":
            raise _Refused("method_not_allowed", "use GET")
        form = request.query.get(FORM_PARAM, "json")
        if form not in STATUS_FORMS:
            raise _Refused("bad_request", f"{FORM_PARAM}: json or text, got {form!r}")
        host = self.host
        caller = self._caller(request)
        settings = host.config.service
        if not (caller.uid is not None and caller.uid in (0, os.geteuid())) and not (
            caller.allowed(settings.status if settings is not None else None)
        ):
            self.refusals.refused(
                caller.label, "", f"{caller.describe()}: not allowed to read the status"
            )
            raise _Refused("forbidden", "not allowed to read the status")
        want = request.headers.get(CONFIG_HEADER)
        if want is not None and want != host.config.identity:
            raise _Refused(
                "config_differs",
                "the daemon runs another config than the caller's (not reloaded yet, or "
                "another file): reload it (SIGHUP) or read the store (keymgr status --direct)",
            )
        if self._status_slot is None:
            self._status_slot = asyncio.Semaphore(1)
        async with self._status_slot:
            return await self._stream_status(request, host.manager, form)

    async def _stream_status(
        self, request: web.BaseRequest, manager: KeyManager, form: str
    ) -> web.StreamResponse:
        from keymgr.render import write_sections, write_status_text

        writer = write_status_text if form == "text" else write_sections

        loop = asyncio.get_running_loop()
        try:
            # Read, checked and planned before the answer starts: a refused
            # state is an error answer, never half a document.
            parts = await loop.run_in_executor(self._pool, manager.status_parts)
        except KeymgrError as e:
            raise _Refused("not_ready", f"status: {e}") from None
        chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(STATUS_AHEAD)
        stop = threading.Event()

        def put(item: bytes | BaseException | None) -> None:
            """Hand one chunk to the loop, waiting while the client is behind;
            _Gone once the answer stopped or the service is closing (a loop
            that stopped would never take it: the thread must not wait on)."""
            try:
                fut = asyncio.run_coroutine_threadsafe(chunks.put(item), loop)
            except RuntimeError:  # the loop is closed
                raise _Gone from None
            while not stop.is_set() and loop.is_running():
                try:
                    fut.result(timeout=0.5)
                    return
                except concurrent.futures.TimeoutError:
                    continue
            fut.cancel()
            raise _Gone

        def render() -> None:
            buf: list[str] = []
            size = 0

            def write(text: str) -> None:
                nonlocal size
                buf.append(text)
                size += len(text)
                if size >= STATUS_CHUNK:
                    put("".join(buf).encode())
                    buf.clear()
                    size = 0

            try:
                writer(parts, write)
                put("".join(buf).encode())
                put(None)
            except _Gone:
                return
            except BaseException as e:  # ends the answer short: the client sees it cut
                with contextlib.suppress(_Gone):
                    put(e)
            finally:
                # As after a pass: what the rings' documents took goes back
                # to the system now, not at the next heartbeat (18 MB at
                # 100,000 rings, on top of the daemon's 390).
                malloc.release()

        resp = web.StreamResponse(
            status=200, headers={**_HEADERS, "Content-Type": STATUS_FORMS[form]}
        )
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
        except (OSError, ConnectionError):  # the client left while the state was read
            return resp
        producer = loop.run_in_executor(self._pool, render)
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    log.error("service.status_failed", error=f"{type(item).__name__}: {item}")
                    raise _Gone
                await asyncio.wait_for(resp.write(item), STATUS_WRITE_TIMEOUT)
            await resp.write_eof()
        except (_Gone, OSError, TimeoutError, ConnectionError):
            # No last chunk: the client sees the answer cut, never a short
            # document that parses.
            if request.transport is not None:
                request.transport.abort()
        finally:
            stop.set()
            while not chunks.empty():  # a producer blocked on a full queue goes on
                chunks.get_nowait()
            await producer
        return resp


class _Gone(Exception):
    """The status answer stopped (client gone, too slow, or rendering failed)."""


async def _sign_request(
    request: web.BaseRequest, grace: timedelta
) -> tuple[dict[str, Any], timedelta | None]:
    """The body of a sign request: ``claims`` (an object) and ``ttl`` (at most
    the ring's ``retire_grace``: a longer-lived token could outlive its key's
    publication and be rejected after a rotation)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _Refused("payload_too_large", f"body over {MAX_BODY} bytes")
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > MAX_BODY:
            raise _Refused("payload_too_large", f"body over {MAX_BODY} bytes")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise _Refused("bad_request", f"body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _Refused("bad_request", 'body must be an object {"claims": {...}, "ttl": ...}')
    extra = set(doc) - _SIGN_FIELDS
    if extra:
        raise _Refused("bad_request", f"unknown field {sorted(extra)[0]!r} (known: claims, ttl)")
    claims = doc.get("claims")
    if not isinstance(claims, dict):
        raise _Refused("bad_request", "claims: must be an object")
    raw = doc.get("ttl")
    ttl: timedelta | None = None
    if isinstance(raw, str):
        try:
            ttl = parse_duration(raw)
        except ValueError as e:
            raise _Refused("bad_request", f"ttl: {e}") from None
    elif isinstance(raw, int) and not isinstance(raw, bool):
        ttl = timedelta(seconds=raw)
    elif raw is not None:
        raise _Refused("bad_request", f"ttl: expected a duration like '15m' or seconds: {raw!r}")
    if ttl is not None:
        if ttl < timedelta(seconds=1):
            raise _Refused("bad_request", "ttl: must be at least 1s")
        if ttl > grace:
            raise _Refused(
                "bad_request",
                f"ttl: {format_duration(ttl)} is longer than the ring's retire_grace "
                f"({format_duration(grace)}): the token could outlive its key in the JWKS",
            )
    else:
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            limit = datetime.now(UTC).timestamp() + grace.total_seconds()
            if exp > limit:
                raise _Refused(
                    "bad_request",
                    f"claims: exp is more than the ring's retire_grace "
                    f"({format_duration(grace)}) away: the token could outlive its key",
                )
    return claims, ttl


# --------------------------------------------------------------------------- the daemon's hooks


def start_service(host: Host) -> SigningService | None:
    """At ``keymgr run``: the service of ``[service]``, listening; None when off."""
    settings = host.config.service
    if settings is None:
        return None
    svc = SigningService(host, settings, bind(settings))
    try:
        svc.start()
    except KeymgrError:
        svc.close()
        raise
    log.info("service.started", **svc.address(), rings=sorted(settings.rings))
    return svc


@dataclass
class Reload:
    """A reload's service change, prepared (listeners bound) before the config is
    swapped, applied after: a socket that cannot be bound rejects the config."""

    old: SigningService | None
    settings: ServiceSettings | None
    bound: Bound | None = None

    def apply(self, host: Host) -> SigningService | None:
        if self.settings is None:
            if self.old is not None:
                self.old.close()
                log.info("service.stopped", reason="no [service] in the config")
            return None
        if self.bound is None:
            return self.old  # same listeners: the running service reads the new rings
        path = self.settings.listeners.socket
        shared = self.old is not None and self.old.listeners.socket == path
        svc = SigningService(host, self.settings, self.bound)
        try:
            svc.start()  # on the new (or shared) listeners, before the old one stops
        except KeymgrError as e:
            svc.close(keep_socket=shared)
            if self.old is None:
                raise
            log.error("service.failed", error=str(e), keeping="the previous service")
            return self.old
        if self.old is not None:
            self.old.close(keep_socket=shared)
        log.info("service.started", **svc.address(), rings=sorted(self.settings.rings))
        return svc


def prepare_reload(old: SigningService | None, config: Config) -> Reload:
    """Bind what the new config's ``[service]`` needs (KeymgrError: reject the config).

    Listeners unchanged, certificate files unchanged: the running service goes
    on (it reads the allowed callers of the current config at each request).
    Anything else starts a new service on new or shared listeners."""
    settings = config.service
    if settings is None:
        return Reload(old, None)
    if (
        old is not None
        and old.listeners == settings.listeners
        and old.bound.tls_files == _tls_files(settings.listeners)
    ):
        return Reload(old, settings)
    return Reload(old, settings, bind(settings, old))
