"""Webhook notifications of audit events (``[notify]``), as CloudEvents.

Every audit event keymgr appends to its log is also offered, right after the
durable append (:meth:`keymgr.audit.AuditLog.flush`), to each configured
webhook whose ``events`` filter matches it. The audit log stays the record:
a notification is a copy, sent at most once per append, and nothing here can
fail, delay or change an audit event or a pass.

- **Format.** One CloudEvent 1.0 per event, JSON in structured mode
  (``Content-Type: application/cloudevents+json``): ``id`` is the event's
  audit hash (so a receiver de-duplicates retries), ``source`` the
  configured one (default ``keymgr://HOSTNAME``), ``type``
  ``io.keymgr.<event>``, ``time`` the event's ``ts``, ``subject`` ``RING/KID``
  (or ``RING``), and ``data`` the audit line's fields. The body of an event is
  fixed when it is queued: every retry sends the same bytes.
- **Signature.** ``X-Keymgr-Timestamp: <unix seconds>`` and
  ``X-Keymgr-Signature: sha256=<hex>``, HMAC-SHA256 with the webhook's secret
  over ``<timestamp> "." <body>``; the timestamp is that of the attempt.
- **Delivery.** One bounded queue per webhook (``queue_size``), drained in
  order by one background thread. An attempt that gets 5xx, 408, 429 or a
  connection error is retried after an exponential backoff with jitter (1 s,
  doubling, at most 60 s; ``Retry-After`` honoured up to that), up to
  ``max_attempts``; other answers fail the delivery at once. A webhook delivers
  its events in order: the next waits while one is being retried.
- **A full queue drops its oldest event** (the one being sent excepted):
  when a receiver has been down long enough to fill it, the newest events
  (a revocation now, a failure now) are the ones worth acting on, and the
  audit log still holds every event (``data.seq`` shows the gap).
- **Exit.** A process that stops (a CLI command, the daemon) waits at most
  ``flush_timeout`` for what it queued, then drops the rest (counted).

No secret is ever logged: failures name the webhook and its host, never its
URL, secret or the event's body.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import os
import random
import re
import socket
import stat
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keymgr.errors import ConfigError
from keymgr.fsutil import NotAFile, read_file
from keymgr.logs import get_logger
from keymgr.options import Options
from keymgr.timefmt import parse_duration

log = get_logger("keymgr.notify")

#: Every audit event keymgr records: an ``events`` pattern must match one.
KNOWN_EVENTS = (
    "key.generated",
    "key.adopted",
    "key.published",
    "key.promoted",
    "key.retired",
    "key.expired",
    "key.destroyed",
    "key.revoked",
    "key.orphan_destroyed",
    "key.forgotten",
    "key.tombstone_dropped",
    "rotate.requested",
    "jwks.published",
    "publish.failed",
    "backend.failed",
    "edge.updated",
    "edge.unreachable",
    "service.refused",
    "daemon.started",
    "daemon.stopped",
    "config.loaded",
    "config.rejected",
    "audit.key",
    "audit.imported",
    "state.sharded",
)
TYPE_PREFIX = "io.keymgr."
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
SIGNATURE_HEADER = "X-Keymgr-Signature"
TIMESTAMP_HEADER = "X-Keymgr-Timestamp"
NOTIFY_FIELDS = ("source", "queue_size", "flush_timeout", "webhooks")
WEBHOOK_FIELDS = (
    "url",
    "secret_file",
    "secret_env",
    "events",
    "timeout",
    "max_attempts",
    "ca_file",
)
#: Field names never copied into ``data`` (none is in an audit line; a guard).
_PRIVATE = frozenset(
    {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    | {"token", "jwt", "private_key", "master_key", "secret", "password", "credentials"}
)
MIN_SECRET = 16
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
RETRY_STATUSES = frozenset({408, 429})
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SOURCE_RE = re.compile(r"[!-~]{1,512}")  # printable ASCII, no space
#: At most this much of an answer is read (the status line is what counts).
_READ_LIMIT = 4096


# -- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    """One ``[notify.webhooks.NAME]``."""

    name: str
    url: str
    secret: bytes = field(repr=False)
    #: Glob patterns on event names (fnmatch); empty: every event.
    events: tuple[str, ...]
    timeout: float
    max_attempts: int
    ca_file: Path | None = None

    @property
    def host(self) -> str:
        """What a log line may say of the URL (its path or query may hold a token)."""
        return urlsplit(self.url).netloc

    def wants(self, event: str) -> bool:
        return not self.events or any(fnmatchcase(event, p) for p in self.events)


@dataclass(frozen=True)
class NotifySettings:
    """``[notify]``."""

    source: str
    webhooks: tuple[Webhook, ...]
    queue_size: int = 1000
    #: How long a stopping process (a CLI command, the daemon) waits for its events.
    flush_timeout: float = 5.0


def parse_notify(doc: Mapping[str, Any], config_dir: Path) -> NotifySettings | None:
    """``[notify]`` of a parsed config, or None when absent.

    Offline: reads the secret files (and checks their modes) and the
    environment, never the network. Raises ConfigError naming the field
    (``notify.webhooks.ops.url: ...``), without the config file's name (the
    caller adds it) and never with a secret in it.
    """
    if "notify" not in doc:
        return None
    tbl = doc["notify"]
    if not isinstance(tbl, dict):
        raise ConfigError("notify: must be a table")
    opts = Options(tbl, "notify", NOTIFY_FIELDS, config_dir=str(config_dir))
    source = opts.string("source") or f"keymgr://{socket.gethostname()}"
    if not _SOURCE_RE.fullmatch(source):
        raise opts.err("source", f"expected a URI reference without spaces, got {source!r}")
    queue_size = opts.integer("queue_size", 1000, 1, 100_000)
    flush = _duration(opts, "flush_timeout", "5s", 0, 60)
    hooks_tbl = tbl.get("webhooks")
    if hooks_tbl is None or hooks_tbl == {}:
        raise opts.err("webhooks", "at least one webhook is required ([notify.webhooks.NAME])")
    if not isinstance(hooks_tbl, dict):
        raise opts.err("webhooks", "must be a table of [notify.webhooks.NAME] tables")
    hooks = tuple(
        _webhook(name, h, config_dir) for name, h in hooks_tbl.items()
    )
    return NotifySettings(source=source, webhooks=hooks, queue_size=queue_size,
                          flush_timeout=flush)


def _duration(opts: Options, name: str, default: str, low: int, high: int) -> float:
    raw = opts.raw(name, default)
    if not isinstance(raw, str):
        raise opts.err(name, f"expected a duration like '5s', got {raw!r}")
    try:
        secs = parse_duration(raw).total_seconds()
    except ValueError as e:
        raise opts.err(name, str(e)) from None
    if not low <= secs <= high:
        raise opts.err(name, f"must be between {low}s and {high}s, got {raw!r}")
    return secs


def _webhook(name: str, tbl: Any, config_dir: Path) -> Webhook:
    where = f"notify.webhooks.{name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"{where}: bad name {name!r} (letters, digits, '_', '.', '-')")
    if not isinstance(tbl, dict):
        raise ConfigError(f"{where}: must be a table")
    opts = Options(tbl, where, WEBHOOK_FIELDS, config_dir=str(config_dir))
    url = _url(opts, opts.required("url", "e.g. https://hooks.example.com/keymgr"))
    events = _patterns(opts)
    timeout = _duration(opts, "timeout", "5s", 1, 60)
    attempts = opts.integer("max_attempts", 5, 1, 20)
    ca_file = opts.path("ca_file")
    if ca_file is not None and not ca_file.is_file():
        raise opts.err("ca_file", f"{ca_file} is not a readable file")
    if urlsplit(url).scheme != "https" and ca_file is not None:
        raise opts.err("ca_file", "only applies to an https:// url")
    return Webhook(
        name=name,
        url=url,
        secret=_secret(opts),
        events=events,
        timeout=timeout,
        max_attempts=attempts,
        ca_file=ca_file,
    )


def _url(opts: Options, url: str) -> str:
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise opts.err("url", f"not a valid URL ({e})") from None
    if u.scheme not in ("http", "https"):
        raise opts.err("url", f"must be an http:// or https:// URL, got scheme {u.scheme!r}")
    if "@" in u.netloc:
        # Never echo the URL: its user part is a credential.
        raise opts.err(
            "url", "must not hold credentials (user:password@); the webhook is "
            "authenticated by its signature (secret_file or secret_env)"
        )
    if not u.hostname:
        raise opts.err("url", "has no host")
    if port == 0:
        raise opts.err("url", "port 0 is not a port")
    if u.fragment or any(c.isspace() for c in url):
        raise opts.err("url", "must not have a fragment or spaces")
    return url


def _patterns(opts: Options) -> tuple[str, ...]:
    raw = opts.raw("events")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw or not all(isinstance(p, str) and p for p in raw):
        raise opts.err("events", "must be a non-empty list of event name patterns, e.g. ['key.*']")
    for p in raw:
        if not any(fnmatchcase(e, p) for e in KNOWN_EVENTS):
            raise opts.err(
                "events", f"{p!r} matches no keymgr event (events: {', '.join(KNOWN_EVENTS)})"
            )
    return tuple(raw)


def _secret(opts: Options) -> bytes:
    has_file, has_env = "secret_file" in opts, "secret_env" in opts
    if has_file == has_env:
        raise opts.err(
            "secret_file",
            "give exactly one of secret_file (a file holding the HMAC secret) or "
            "secret_env (the name of an environment variable holding it)",
        )
    if has_env:
        var = opts.string("secret_env")
        assert var is not None
        if not _ENV_RE.fullmatch(var):
            raise opts.err("secret_env", f"expected an environment variable name, got {var!r}")
        value = os.environ.get(var, "").strip().encode()
        if not value:
            raise opts.err("secret_env", f"${var} is not set or empty")
        if len(value) < MIN_SECRET:
            raise opts.err("secret_env", f"${var} is shorter than {MIN_SECRET} characters")
        return value
    path = opts.path("secret_file")
    assert path is not None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise opts.err("secret_file", f"{path} does not exist") from None
    except OSError as e:
        raise opts.err("secret_file", f"cannot check {path} ({e.strerror or e})") from None
    problem = secret_file_exposure(st, path)
    if problem is not None:
        raise opts.err("secret_file", f"{path}: {problem}")
    try:
        value = read_file(path).strip()
    except NotAFile as e:
        raise opts.err("secret_file", f"{path}: {e}") from None
    except OSError as e:
        raise opts.err("secret_file", f"cannot read {path} ({e.strerror or e})") from None
    if not value:
        raise opts.err("secret_file", f"{path} is empty")
    if len(value) < MIN_SECRET:
        raise opts.err(
            "secret_file",
            f"{path}: the secret is shorter than {MIN_SECRET} characters "
            "(e.g. 'openssl rand -hex 32')",
        )
    return value


def secret_file_exposure(st: os.stat_result, path: Path) -> str | None:
    """Why a secret file with this stat is unsafe, or None: the master key's rule.

    Group and others may neither read nor write it (``chmod 600``), except a
    file owned by root that only its group may read (``root:keymgr 0640``).
    """
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    exposed = mode & 0o077
    if not exposed or (st.st_uid == 0 and exposed == 0o040):
        return None
    who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if exposed & bits)
    return f"mode {mode:04o} lets {who} access it; fix: chmod 600 {path}"


# -- the CloudEvent ----------------------------------------------------------------


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if str(k).lower() not in _PRIVATE}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def cloudevent(event: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The CloudEvent (structured JSON) of one sealed audit event."""
    name = str(event["event"])
    ce: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(event["hash"]),
        "source": source,
        "type": TYPE_PREFIX + name,
        "datacontenttype": "application/json",
    }
    if isinstance(event.get("ts"), str):
        ce["time"] = event["ts"]
    ring, kid = event.get("ring"), event.get("kid")
    if isinstance(ring, str) and ring:
        ce["subject"] = f"{ring}/{kid}" if isinstance(kid, str) and kid else ring
    ce["data"] = _public(dict(event))
    return ce


def encode(ce: Mapping[str, Any]) -> bytes:
    return json.dumps(ce, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Keymgr-Signature`` value: HMAC-SHA256 over ``timestamp "." body``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


# -- delivery ---------------------------------------------------------------------


@dataclass
class _Item:
    id: str
    event: str
    body: bytes
    attempts: int = 0


@dataclass
class _Queue:
    hook: Webhook
    items: deque[_Item] = field(default_factory=deque)
    #: The item being sent right now (the head), never dropped meanwhile.
    inflight: _Item | None = None
    #: Monotonic time before which the head is not tried again (backoff).
    next_at: float = 0.0
    full_logged: bool = False

    def waiting(self) -> int:
        return len(self.items) - (1 if self.inflight is not None else 0)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retry: bool
    status: int | None
    error: str | None
    retry_after: float | None = None


_live: weakref.WeakSet[Notifier] = weakref.WeakSet()
_atexit_registered = False
_rand = random.SystemRandom()


def _drain_at_exit() -> None:
    """A stopping process (a CLI command) waits for its events, within ``flush_timeout``."""
    live = list(_live)
    if not live:
        return
    deadline = time.monotonic() + max(n.settings.flush_timeout for n in live)
    for n in live:
        try:
            n.close(max(0.0, deadline - time.monotonic()))
        except Exception as e:  # the command's exit code stands, whatever happens here
            log.error("notify.failed", error=f"{type(e).__name__}: {e}")


class Notifier:
    """Queues audit events for the ``[notify]`` webhooks and sends them from one thread.

    :meth:`submit` never blocks on the network and never raises; the thread
    starts with the first event a webhook wants. ``metrics`` returns the
    daemon's :class:`keymgr.metrics.Metrics` (or None: counted nowhere).
    ``stderr`` prints one ``keymgr: warning:`` line per webhook whose events
    were not all delivered when the notifier closes (a CLI command).
    """

    def __init__(
        self,
        settings: NotifySettings,
        metrics: Callable[[], Any] | None = None,
        stderr: bool = False,
    ) -> None:
        self.settings = settings
        self._metrics = metrics or (lambda: None)
        self._stderr = stderr
        self._queues = [_Queue(h) for h in settings.webhooks]
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._give_up_at = float("inf")
        self._bound: Any = None
        self._rr = 0
        self._reported = False
        #: Per webhook: delivered, failed, dropped (for close's summary and tests).
        self.counts: dict[str, dict[str, int]] = {
            h.name: {"ok": 0, "failed": 0, "dropped": 0} for h in settings.webhooks
        }

    # -- feeding -------------------------------------------------------------

    def submit(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Queue the CloudEvents of freshly appended audit events. Never raises."""
        try:
            self._submit(events)
        except Exception as e:  # a notification never fails what recorded the event
            log.error("notify.failed", error=f"{type(e).__name__}: {e}")

    def _submit(self, events: Iterable[Mapping[str, Any]]) -> None:
        items: list[tuple[_Queue, _Item]] = []
        for ev in events:
            name = ev.get("event")
            if not isinstance(name, str) or not isinstance(ev.get("hash"), str):
                continue
            wanting = [q for q in self._queues if q.hook.wants(name)]
            if not wanting:
                continue
            body = encode(cloudevent(ev, self.settings.source))
            items.extend((q, _Item(str(ev["hash"]), name, body)) for q in wanting)
        if not items:
            return
        m = self._bind_metrics()
        with self._cond:
            for q, item in items:
                if self._closing:
                    self._drop(q, item, "closed", m)
                    continue
                if q.waiting() >= self.settings.queue_size:
                    # The oldest waiting event goes (not the one being sent).
                    victim = q.items[1] if q.inflight is not None else q.items[0]
                    q.items.remove(victim)
                    self._drop(q, victim, "queue_full", m)
                q.items.append(item)
            self._start()
            self._cond.notify_all()

    def _drop(self, q: _Queue, item: _Item, reason: str, m: Any, quiet: bool = False) -> None:
        self.counts[q.hook.name]["dropped"] += 1
        if m is not None:
            m.notify_dropped.labels(q.hook.name, reason).inc()
        # One line when a queue overflows (again after a delivery succeeds), not one per event.
        if not quiet and (reason != "queue_full" or not q.full_logged):
            q.full_logged = q.full_logged or reason == "queue_full"
            log.warning(
                "notify.dropped",
                webhook=q.hook.name,
                notify_event=item.event,
                id=item.id,
                reason=reason,
                queue_size=self.settings.queue_size,
            )

    def _bind_metrics(self) -> Any:
        """The metrics in use; the queue-depth gauge reads this notifier's queues."""
        m = self._metrics()
        if m is not None and m is not self._bound:
            self._bound = m
            for q in self._queues:
                m.notify_queue.labels(q.hook.name).set_function(lambda q=q: len(q.items))
        return m

    def _start(self) -> None:
        global _atexit_registered
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="keymgr-notify", daemon=True)
        self._thread.start()
        _live.add(self)
        if not _atexit_registered:
            atexit.register(_drain_at_exit)
            _atexit_registered = True

    # -- stopping ----------------------------------------------------------------

    def pending(self) -> int:
        with self._cond:
            return sum(len(q.items) for q in self._queues)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until every queued event was delivered or given up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(q.items for q in self._queues):
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def close(self, wait: float, grace: float | None = None) -> bool:
        """Accept no more events; go on delivering for ``grace`` s (default
        ``flush_timeout``), then drop what is left; block up to ``wait`` s.
        Returns whether everything queued was delivered or given up in time."""
        grace = self.settings.flush_timeout if grace is None else grace
        with self._cond:
            if not self._closing:
                self._closing = True
                self._give_up_at = time.monotonic() + grace
            self._cond.notify_all()
        done = self.drain(wait) if self._thread is not None else True
        _live.discard(self)
        if self._stderr and not self._reported:
            self._reported = True
            self._report()
        return done

    def _report(self) -> None:
        """One stderr line per webhook that did not get all of this process's events."""
        import sys

        with self._cond:
            left = {
                q.hook.name: len(q.items) + self.counts[q.hook.name]["failed"]
                + self.counts[q.hook.name]["dropped"]
                for q in self._queues
            }
        for name, n in left.items():
            if n:
                print(
                    f"keymgr: warning: notify.webhooks.{name}: {n} notification(s) not "
                    "delivered (the audit log holds every event)",
                    file=sys.stderr,
                )

    # -- the thread ----------------------------------------------------------------

    def _next(self) -> tuple[_Queue, _Item] | None:
        """The next head due, under the lock; None once closed and done."""
        while True:
            now = time.monotonic()
            if self._closing and now >= self._give_up_at:
                m = self._metrics()
                for q in self._queues:
                    if q.items:
                        log.warning("notify.undelivered", webhook=q.hook.name, events=len(q.items),
                                    reason="flush_timeout reached while stopping")
                    while q.items:
                        self._drop(q, q.items.popleft(), "closing", m, quiet=True)
                self._cond.notify_all()
                return None
            busy = [q for q in self._queues if q.items]
            if not busy:
                if self._closing:
                    return None
                self._cond.wait()
                continue
            n = len(self._queues)
            order = [self._queues[(self._rr + i) % n] for i in range(n)]
            for q in order:
                if q.items and q.next_at <= now:
                    self._rr = (self._queues.index(q) + 1) % n
                    q.inflight = q.items[0]
                    return q, q.inflight
            wake = min(q.next_at for q in busy)
            if self._closing:
                wake = min(wake, self._give_up_at)
            self._cond.wait(max(0.0, wake - now))

    def _run(self) -> None:
        while True:
            with self._cond:
                nxt = self._next()
            if nxt is None:
                return
            q, item = nxt
            try:
                outcome = post(q.hook, item.body)
            except Exception as e:  # a bug here must not kill the thread
                outcome = Outcome(False, False, None, f"{type(e).__name__}: {e}")
            with self._cond:
                q.inflight = None
                self._settle(q, item, outcome)
                self._cond.notify_all()

    def _settle(self, q: _Queue, item: _Item, out: Outcome) -> None:
        item.attempts += 1
        hook = q.hook
        m = self._metrics()
        still_queued = bool(q.items) and q.items[0] is item
        if out.ok:
            if still_queued:
                q.items.popleft()
            q.next_at = 0.0
            q.full_logged = False
            self.counts[hook.name]["ok"] += 1
            if m is not None:
                m.notify_sent.labels(hook.name, "ok").inc()
            return
        what = f"HTTP {out.status}" if out.status is not None else str(out.error)
        if out.retry and item.attempts < hook.max_attempts and still_queued:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (item.attempts - 1))
            delay = delay / 2 + _rand.uniform(0, delay / 2)
            if out.retry_after is not None:
                delay = max(delay, min(out.retry_after, BACKOFF_MAX))
            q.next_at = time.monotonic() + delay
            if m is not None:
                m.notify_retries.labels(hook.name).inc()
            log.info(
                "notify.retry", webhook=hook.name, host=hook.host, notify_event=item.event,
                id=item.id, attempt=item.attempts, error=what, retry_in=round(delay, 2),
            )
            return
        if still_queued:
            q.items.popleft()
        q.next_at = 0.0
        self.counts[hook.name]["failed"] += 1
        if m is not None:
            m.notify_sent.labels(hook.name, "failed").inc()
        log.error(
            "notify.failed", webhook=hook.name, host=hook.host, notify_event=item.event,
            id=item.id, attempts=item.attempts, error=what,
        )


def post(hook: Webhook, body: bytes) -> Outcome:
    """One signed POST of ``body`` to ``hook``: what came of it (never raises for I/O)."""
    import http.client
    import ssl

    u = urlsplit(hook.url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    ts = str(int(time.time()))
    headers = {
        "Content-Type": CONTENT_TYPE,
        "User-Agent": "keymgr-notify/1",
        TIMESTAMP_HEADER: ts,
        SIGNATURE_HEADER: signature(hook.secret, ts, body),
    }
    host = u.hostname or ""
    conn: http.client.HTTPConnection
    try:
        if u.scheme == "https":
            ctx = ssl.create_default_context(
                cafile=str(hook.ca_file) if hook.ca_file is not None else None
            )
            conn = http.client.HTTPSConnection(host, u.port, timeout=hook.timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, u.port, timeout=hook.timeout)
        try:
            conn.request("POST", target, body=body, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            retry_after = _retry_after(resp.getheader("Retry-After"))
            resp.read(_READ_LIMIT)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as e:
        return Outcome(False, True, None, _error_text(e))
    if 200 <= status < 300:
        return Outcome(True, False, status, None)
    retry = status >= 500 or status in RETRY_STATUSES
    return Outcome(False, retry, status, None, retry_after)


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def _error_text(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]
