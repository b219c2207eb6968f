"""``[notify]``: audit events as signed CloudEvents to HTTP webhooks (keymgr.notify).

Every receiver is a real HTTP server (``http.server`` in a thread, on a port
the kernel picks on 127.0.0.1) that checks the HMAC with its own code, and
every body is parsed by an independent CloudEvents library (``cloudevents``,
the CNCF SDK). keymgr runs as the real CLI in subprocesses, as a real
``keymgr run`` daemon, or as an in-process ``KeyManager`` on a home made by
``keymgr init``; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from keymgr.audit import AuditLog, chain_hash
from keymgr.manager import KeyManager
from keymgr.metrics import Metrics
from keymgr.notify import KNOWN_EVENTS, Notifier, NotifySettings, Webhook
from tests.conftest import SHORT_POLICY, T0, Home
from tests.test_daemon import Launcher, fast_home, metric, scrape, wait_for

A, P, G, D = timedelta(hours=1), timedelta(days=10), timedelta(days=2), timedelta(days=1)
SECRET = "s3cr3t-" + "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


# --------------------------------------------------------------------------- receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signed: bool
    at: float
    status: int


@dataclass
class Receiver:
    """A webhook endpoint: answers ``statuses`` in turn (then 200), or hangs on ``gate``."""

    secret: bytes
    statuses: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    hang: bool = False
    got: list[Received] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/keymgr?team=ops"

    def check(self, headers: dict[str, str], body: bytes) -> bool:
        """The signature, recomputed here: HMAC-SHA256 over ``timestamp "." body``."""
        ts = headers.get("x-keymgr-timestamp", "")
        sig = headers.get("x-keymgr-signature", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
            return False
        want = "sha256=" + hmac.new(self.secret, ts.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, sig)

    def start(self) -> Receiver:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                rx.arrived.set()
                if rx.hang:
                    rx.gate.wait(120)
                with rx.lock:
                    answer = rx.statuses.pop(0) if rx.statuses else 200
                    status, extra = answer if isinstance(answer, tuple) else (answer, {})
                    rx.got.append(Received(headers, body, rx.check(headers, body),
                                           time.monotonic(), status))
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_GET(self) -> None:
                self.send_error(405)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        srv.block_on_close = False
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.server = srv
        return self

    def stop(self) -> None:
        self.gate.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def delivered(self) -> list[dict[str, Any]]:
        """The CloudEvents answered 2xx, in arrival order, as parsed JSON."""
        with self.lock:
            return [json.loads(r.body) for r in self.got if 200 <= r.status < 300]

    def wait(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        return wait_for(lambda: len(d := self.delivered()) >= n and d, timeout,
                        f"{n} deliveries (have {len(self.delivered())})")


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.stop()


def receiver(made: list[Receiver], **kw: Any) -> Receiver:
    r = Receiver(SECRET.encode(), **kw).start()
    made.append(r)
    return r


# --------------------------------------------------------------------------- helpers


def write_secret(home: Home, name: str = "webhook.secret", mode: int = 0o600,
                 value: str = SECRET) -> Path:
    p = home.dir / name
    p.write_text(value + "\n")
    p.chmod(mode)
    return p


def add_notify(home: Home, hooks: dict[str, dict[str, Any]], **notify: Any) -> None:
    """Append ``[notify]`` and one ``[notify.webhooks.NAME]`` per hook to the config."""
    lines = ["", "[notify]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in notify.items()]
    for name, opts in hooks.items():
        key = name if name.replace("_", "").replace("-", "").isalnum() else json.dumps(name)
        lines.append(f"[notify.webhooks.{key}]")
        opts = {"secret_file": "webhook.secret", **opts}
        lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items() if v is not None]
    with home.config.open("a") as f:
        f.write("\n".join(lines) + "\n")


def short_home(home: Home) -> Home:
    home.set_ring(**SHORT_POLICY)
    write_secret(home)
    return home


def audit_lines(home: Home) -> list[dict[str, Any]]:
    path = home.dir / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def bootstrap_events(lines: list[dict[str, Any]]) -> list[str]:
    """The events of ``lines`` but the layout's (``state.sharded``: the first
    commit of a sharded state, under KEYMGR_TEST_SHARDS)."""
    return [x["event"] for x in lines if x["event"] != "state.sharded"]


def parse_ce(r: Received) -> CloudEvent:
    """The CNCF SDK's reading of a request: raises unless it is a valid CloudEvent 1.0."""
    ev = from_http(HTTPMessage(headers=r.headers, body=r.body), JSONFormat(), CloudEvent)
    assert isinstance(ev, CloudEvent)
    return ev


def check_delivery(r: Received, line: dict[str, Any], source: str) -> None:
    """One request against the audit line it stands for: signature, CloudEvent, data."""
    assert r.signed, "signature does not verify"
    assert r.headers["content-type"].startswith("application/cloudevents+json")
    assert not any(k.startswith("ce-") for k in r.headers), "structured mode only"
    ce = parse_ce(r)
    assert ce.get_specversion() == "1.0"
    assert ce.get_id() == line["hash"]
    assert ce.get_source() == source
    assert ce.get_type() == "io.keymgr." + line["event"]
    assert ce.get_time().strftime("%Y-%m-%dT%H:%M:%SZ") == line["ts"]
    if line.get("kid") and line.get("ring"):
        assert ce.get_subject() == f"{line['ring']}/{line['kid']}"
    data = ce.get_data()
    assert data == line, "data is the audit line, field for field"
    # A receiver can check it against the chain: the hash covers the line.
    assert chain_hash(data["prev"], data) == data["hash"]
    assert not PRIVATE_MEMBERS & set(data) and SECRET not in r.body.decode()


def shut(m: KeyManager) -> None:
    """Stop the manager's notifier now, dropping what is left (no background retries)."""
    if m.notifier is not None:
        m.notifier.close(0, grace=0)


def make_manager(home: Home) -> KeyManager:
    m = KeyManager.from_config(home.config)
    m.metrics = Metrics()
    return m


def sample(m: KeyManager, name: str, **labels: str) -> float:
    v = m.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else float(v)


# --------------------------------------------------------------------------- config


def _valid_hook() -> dict[str, Any]:
    return {"url": "https://hooks.invalid/keymgr", "secret_file": "webhook.secret"}


BAD = [
    ({"ops": {**_valid_hook(), "url": "https://alice:hunter2-pw@hooks.invalid/x"}}, {},
     "notify.webhooks.ops.url", "credentials"),
    ({"ops": {**_valid_hook(), "url": "ftp://hooks.invalid/x"}}, {},
     "notify.webhooks.ops.url", "http:// or https://"),
    ({"ops": {**_valid_hook(), "url": "https://:8443/x"}}, {},
     "notify.webhooks.ops.url", "no host"),
    ({"ops": {"secret_file": "webhook.secret"}}, {},
     "notify.webhooks.ops.url", "is required"),
    ({"ops": {**_valid_hook(), "secret_file": "nope.secret"}}, {},
     "notify.webhooks.ops.secret_file", "does not exist"),
    ({"ops": {**_valid_hook(), "secret_file": "open.secret"}}, {},
     "notify.webhooks.ops.secret_file", "mode 0644"),
    ({"ops": {**_valid_hook(), "secret_file": "short.secret"}}, {},
     "notify.webhooks.ops.secret_file", "shorter than 16"),
    ({"ops": {**_valid_hook(), "secret_env": "KM_HOOK_SECRET"}}, {},
     "notify.webhooks.ops.secret_file", "exactly one of"),
    ({"ops": {**_valid_hook(), "secret_file": None, "secret_env": "KM_UNSET_SECRET"}}, {},
     "notify.webhooks.ops.secret_env", "$KM_UNSET_SECRET is not set"),
    ({"ops": {**_valid_hook(), "events": ["pass.failed"]}}, {},
     "notify.webhooks.ops.events", "matches no keymgr event"),
    ({"ops": {**_valid_hook(), "events": []}}, {},
     "notify.webhooks.ops.events", "non-empty list"),
    ({"ops": {**_valid_hook(), "retries": 3}}, {},
     "notify.webhooks.ops.retries", "unknown option"),
    ({"ops": {**_valid_hook(), "timeout": "2m"}}, {},
     "notify.webhooks.ops.timeout", "between 1s and 60s"),
    ({"ops": {**_valid_hook(), "timeout": "5"}}, {},
     "notify.webhooks.ops.timeout", "bad duration"),
    ({"ops": {**_valid_hook(), "max_attempts": 0}}, {},
     "notify.webhooks.ops.max_attempts", "between 1 and 20"),
    ({"ops": {**_valid_hook(), "ca_file": "ca.pem"}}, {},
     "notify.webhooks.ops.ca_file", "not a readable file"),
    ({"bad name!": _valid_hook()}, {}, "notify.webhooks.bad name!", "bad name"),
    ({}, {"source": "keymgr://x"}, "notify.webhooks", "at least one webhook"),
    ({"ops": _valid_hook()}, {"queue_size": 0}, "notify.queue_size", "between 1 and 100000"),
    ({"ops": _valid_hook()}, {"source": "not a uri"}, "notify.source", "without spaces"),
    ({"ops": _valid_hook()}, {"flush": "5s"}, "notify.flush", "unknown option"),
]


@pytest.mark.parametrize(("hooks", "notify", "field_", "what"), BAD,
                         ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_notify_config_is_one_line_naming_the_field(
    home: Home, hooks: dict[str, Any], notify: dict[str, Any], field_: str, what: str
) -> None:
    write_secret(home)
    write_secret(home, "open.secret", 0o644)
    write_secret(home, "short.secret", value="too-short")
    add_notify(home, hooks, **notify)
    before = sorted(p.name for p in home.dir.iterdir())
    proc = home.run("config", "check", env=home.env(KM_HOOK_SECRET=SECRET))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"{home.config}: {field_}: " in proc.stderr and what in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr and SECRET not in proc.stderr + proc.stdout
    assert sorted(p.name for p in home.dir.iterdir()) == before


def test_valid_notify_config_checks_offline(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """``config check`` passes without reaching the (unresolvable) hosts; the secret
    may come from the environment instead of a file; defaults as documented."""
    write_secret(home)
    add_notify(home, {
        "ops": {"url": "https://hooks.invalid:8443/keymgr?channel=ops", "events": ["key.*"],
                "timeout": "3s", "max_attempts": 3},
        "siem": {"url": "http://[::1]:9/ingest", "secret_file": None,
                 "secret_env": "KM_HOOK_SECRET"},
    }, source="keymgr://prod-eu", queue_size=50, flush_timeout="2s")
    proc = home.run("config", "check", env=home.env(KM_HOOK_SECRET=SECRET))
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr

    from keymgr.config import load_config

    monkeypatch.setenv("KM_HOOK_SECRET", SECRET + "-env")
    n = load_config(home.config).notify
    assert n is not None
    assert (n.source, n.queue_size, n.flush_timeout) == ("keymgr://prod-eu", 50, 2.0)
    ops, siem = n.webhooks
    assert (ops.name, ops.events, ops.timeout, ops.max_attempts) == ("ops", ("key.*",), 3, 3)
    assert ops.secret == SECRET.encode() and siem.secret == (SECRET + "-env").encode()
    assert (siem.events, siem.timeout, siem.max_attempts) == ((), 5.0, 5)
    assert SECRET not in repr(n), "the secret is left out of reprs (and so of tracebacks)"
    assert ops.wants("key.promoted") and not ops.wants("jwks.published")


def test_known_events_cover_every_audit_event_name() -> None:
    """A filter is checked against KNOWN_EVENTS: it must name every event keymgr records."""
    from keymgr.audit import KEY_EVENT_STATES, ORPHAN_EVENTS
    from keymgr.checkpoint import KEY_EVENT
    from keymgr.reconciler import FAILURE_EVENTS

    assert set(KEY_EVENT_STATES) | ORPHAN_EVENTS | FAILURE_EVENTS | {KEY_EVENT} <= set(
        KNOWN_EVENTS
    )
    assert len(set(KNOWN_EVENTS)) == len(KNOWN_EVENTS)


# --------------------------------------------------------------------------- delivery


def test_retries_with_backoff_until_accepted_every_event_once_in_order(
    home: Home, receivers: list[Receiver]
) -> None:
    """500, then 429 with Retry-After, then 200: the first event is sent three
    times (same body, same id, each signed), after a backoff each time; then
    every event of the pass arrives once, in audit order. Counted in metrics."""
    import socket

    short_home(home)
    rx = receiver(receivers, statuses=[500, (429, {"Retry-After": "2"})])
    add_notify(home, {"ops": {"url": rx.url}})
    m = make_manager(home)
    try:
        res = m.reconcile(T0)
        assert res.ok
        assert m.notifier is not None and m.notifier.drain(60)
    finally:
        shut(m)
    lines = audit_lines(home)
    # bootstrap: generated, jwks.published, published, promoted
    assert len(bootstrap_events(lines)) == 4, lines
    got = rx.got
    assert [r.status for r in got[:3]] == [500, 429, 200]
    assert got[0].body == got[1].body == got[2].body, "a retry resends the same bytes"
    assert got[1].at - got[0].at >= 0.5, "backoff after the first failure"
    assert got[2].at - got[1].at >= 1.9, "Retry-After is honoured"
    assert len(got) == len(lines) + 2
    source = f"keymgr://{socket.gethostname()}"
    for r, line in zip(got[2:], lines, strict=True):
        check_delivery(r, line, source)
    for r in got[:2]:
        assert r.signed
    assert sample(m, "keymgr_notify_sent_total", webhook="ops", result="ok") == len(lines)
    assert sample(m, "keymgr_notify_retries_total", webhook="ops") == 2
    assert sample(m, "keymgr_notify_sent_total", webhook="ops", result="failed") == 0
    assert sample(m, "keymgr_notify_queue_depth", webhook="ops") == 0


def test_client_errors_are_not_retried_and_attempts_are_bounded(
    home: Home, receivers: list[Receiver]
) -> None:
    """A 4xx fails the delivery at once; a 5xx that never ends stops after
    ``max_attempts``. Neither touches the pass or the audit log."""
    short_home(home)
    bad = receiver(receivers, statuses=[400] * 100)
    down = receiver(receivers, statuses=[503] * 100)
    add_notify(home, {
        "bad": {"url": bad.url, "events": ["key.generated"]},
        "down": {"url": down.url, "events": ["key.generated"], "max_attempts": 2},
    })
    m = make_manager(home)
    try:
        assert m.reconcile(T0).ok
        assert m.notifier is not None and m.notifier.drain(60)
    finally:
        shut(m)
    assert [r.status for r in bad.got] == [400]
    assert [r.status for r in down.got] == [503, 503]
    assert sample(m, "keymgr_notify_sent_total", webhook="bad", result="failed") == 1
    assert sample(m, "keymgr_notify_sent_total", webhook="down", result="failed") == 1
    assert sample(m, "keymgr_notify_retries_total", webhook="down") == 1
    assert home.run("audit", "verify").returncode == 0


def test_event_filter_sends_only_matching_events(home: Home, receivers: list[Receiver]) -> None:
    """``events`` globs select by event name; a webhook without it gets everything."""
    from fnmatch import fnmatchcase

    short_home(home)
    some = receiver(receivers)
    every = receiver(receivers)
    patterns = ["key.promoted", "key.retired", "rotate.*"]
    add_notify(home, {"some": {"url": some.url, "events": patterns},
                      "every": {"url": every.url}}, source="keymgr://test")
    m = make_manager(home)
    try:
        assert m.reconcile(T0).ok
        assert m.rotate("default", now=T0 + timedelta(days=1)).ok
        assert m.reconcile(T0 + timedelta(days=1) + A).ok
        assert m.notifier is not None and m.notifier.drain(30)
    finally:
        shut(m)
    lines = audit_lines(home)
    wanted = [x for x in lines if any(fnmatchcase(x["event"], p) for p in patterns)]
    assert [x["event"] for x in wanted] == [
        "key.promoted", "rotate.requested", "key.promoted", "key.retired"
    ]
    assert [c["id"] for c in some.delivered()] == [x["hash"] for x in wanted]
    assert [c["id"] for c in every.delivered()] == [x["hash"] for x in lines]
    for r, line in zip(some.got, wanted, strict=True):
        check_delivery(r, line, "keymgr://test")


def test_a_hung_webhook_never_blocks_a_pass(home: Home, receivers: list[Receiver]) -> None:
    """A receiver that accepts the connection and never answers: a whole rotation
    through the KeyManager (the daemon's path) runs as if it were not there.
    The webhook's own timeout (60 s) would make any blocking obvious."""
    short_home(home)
    rx = receiver(receivers, hang=True)
    add_notify(home, {"ops": {"url": rx.url, "timeout": "60s"}})
    m = make_manager(home)
    t0 = time.monotonic()
    try:
        for at in (T0, T0 + P - A, T0 + P, T0 + P + G, T0 + P + G + D):
            assert m.reconcile(at).ok
        kid = m.state().ring("default").active.kid
        assert m.revoke(kid, reason="drill", now=T0 + P + G + D).ok
        took = time.monotonic() - t0
        assert rx.arrived.wait(10), "the first notification reached the hung receiver"
        assert took < 30, f"passes took {took:.1f}s with a hung webhook"
        assert m.notifier is not None and m.notifier.pending() >= 10
    finally:
        shut(m)
    assert home.run("audit", "verify").returncode == 0
    names = [x["event"] for x in audit_lines(home)]
    assert names.count("key.promoted") == 3 and "key.revoked" in names


def test_cli_with_a_hung_webhook_exits_within_flush_timeout(
    home: Home, receivers: list[Receiver]
) -> None:
    """The real CLI: the command does its work, then waits at most flush_timeout
    for its notifications, warns in one line, and exits 0."""
    short_home(home)
    rx = receiver(receivers, hang=True)
    add_notify(home, {"ops": {"url": rx.url, "timeout": "60s"}}, flush_timeout="2s")
    t0 = time.monotonic()
    proc = home.run("reconcile", "--at", "2031-03-01T08:00:00Z")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "key.promoted" in proc.stdout
    assert took < 30, f"the CLI took {took:.1f}s"
    assert rx.arrived.is_set()
    warn = [ln for ln in proc.stderr.splitlines() if ln]
    assert len(warn) == 1 and warn[0].startswith("keymgr: warning: notify.webhooks.ops: ")
    assert "not delivered" in warn[0] and SECRET not in proc.stderr
    assert home.run("audit", "verify").returncode == 0


def test_full_queue_drops_the_oldest_waiting_event_and_counts_it(
    home: Home, receivers: list[Receiver]
) -> None:
    """queue_size 2 behind a receiver that holds the first request: every later
    event but the newest two is dropped (the one being sent is kept), counted
    in ``keymgr_notify_dropped_total``; released, the survivors arrive in order."""
    short_home(home)
    home.run("reconcile", "--at", "2031-03-01T08:00:00Z", check=True)
    home.run("rotate", "default", "--emergency", "--at", "2031-03-02T08:00:00Z", check=True)
    lines = audit_lines(home)
    assert len(lines) >= 8
    rx = receiver(receivers, hang=True)
    metrics = Metrics()
    hook = Webhook(name="ops", url=rx.url, secret=SECRET.encode(), events=(), timeout=30,
                   max_attempts=1)
    n = Notifier(NotifySettings(source="keymgr://q", webhooks=(hook,), queue_size=2),
                 metrics=lambda: metrics)
    try:
        n.submit(lines[:1])
        assert rx.arrived.wait(10)
        for line in lines[1:]:  # one by one, as appends come
            n.submit([line])
        reg = metrics.registry
        dropped = reg.get_sample_value("keymgr_notify_dropped_total",
                                       {"webhook": "ops", "reason": "queue_full"})
        assert dropped == len(lines) - 3
        assert reg.get_sample_value("keymgr_notify_queue_depth", {"webhook": "ops"}) == 3
        assert n.counts["ops"]["dropped"] == len(lines) - 3
        rx.hang = False
        rx.gate.set()
        assert n.drain(30)
    finally:
        n.close(0, grace=0)
    ids = [c["id"] for c in rx.delivered()]
    assert ids == [lines[0]["hash"], lines[-2]["hash"], lines[-1]["hash"]]
    assert metrics.registry.get_sample_value("keymgr_notify_queue_depth",
                                             {"webhook": "ops"}) == 0


def test_a_failing_hook_never_fails_the_audit_append(home: Home) -> None:
    """The guard in AuditLog.flush: whatever the hook does, the append stands."""
    short_home(home)
    m = KeyManager.from_config(home.config)

    def boom(events: list[dict[str, Any]]) -> None:
        raise RuntimeError("hook exploded")

    m.audit.on_append = boom
    assert m.reconcile(T0).ok
    assert home.run("audit", "verify").returncode == 0
    assert len(bootstrap_events(audit_lines(home))) == 4


def test_the_hook_sees_exactly_what_was_appended_after_it_is_durable(home: Home) -> None:
    """Called once per append, after it: each batch is already in the file, and
    all batches together are the log, in order, unchanged."""
    short_home(home)
    log = AuditLog(home.dir / "audit.jsonl")
    m = KeyManager.from_config(home.config)
    batches: list[list[dict[str, Any]]] = []

    def hook(events: list[dict[str, Any]]) -> None:
        on_disk = audit_lines(home)
        assert on_disk[-len(events):] == events, "called before the append was durable"
        batches.append(json.loads(json.dumps(events)))

    m.audit.on_append = hook
    assert m.reconcile(T0).ok
    assert m.rotate("default", emergency=True, now=T0 + timedelta(hours=5)).ok
    assert [e for b in batches for e in b] == audit_lines(home) == list(log.events())


# --------------------------------------------------------------------------- end to end


def test_cli_rotation_end_to_end_delivers_every_event_in_order(
    home: Home, receivers: list[Receiver]
) -> None:
    """The real ``keymgr`` CLI drives a whole rotation, then a revocation and an
    emergency rotation, with ``--at`` times. Each command delivers its own
    events before it exits: after every command the receiver holds exactly the
    audit log, in order, each a valid signed CloudEvent whose data is the line."""
    short_home(home)
    rx = receiver(receivers)
    add_notify(home, {"ops": {"url": rx.url}}, source="keymgr://prod-eu")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    steps: list[tuple[str, ...]] = [
        ("reconcile", "--at", T0.strftime(fmt)),
        ("reconcile", "--at", (T0 + P - A).strftime(fmt)),
        ("reconcile", "--at", (T0 + P).strftime(fmt)),
        ("reconcile", "--at", (T0 + P + G).strftime(fmt)),
        ("reconcile", "--at", (T0 + P + G + D).strftime(fmt)),
    ]
    seen_types: list[str] = []
    for step in steps:
        proc = home.run(*step, check=True)
        assert proc.stderr == "", proc.stderr
        lines = audit_lines(home)
        assert [c["id"] for c in rx.delivered()] == [x["hash"] for x in lines], step
    kid = home.kid_in("active")
    home.run("revoke", kid, "--reason", "drill", "--at",
             (T0 + P + G + D + timedelta(hours=1)).strftime(fmt), check=True)
    home.run("rotate", "default", "--emergency", "--at",
             (T0 + P + G + D + timedelta(hours=2)).strftime(fmt), check=True)
    lines = audit_lines(home)
    assert [c["id"] for c in rx.delivered()] == [x["hash"] for x in lines]
    assert len(rx.got) == len(lines), "nothing sent twice"
    for r, line in zip(rx.got, lines, strict=True):
        check_delivery(r, line, "keymgr://prod-eu")
        seen_types.append(line["event"])
    # The lifecycle of the first key, in order, among everything else.
    first = next(x["kid"] for x in lines if x["event"] == "key.generated")
    of_first = [x["event"] for x in lines
                if x.get("kid") == first and x["event"].startswith("key.")]
    assert of_first == ["key.generated", "key.published", "key.promoted", "key.retired",
                        "key.expired", "key.destroyed"]
    assert {"key.revoked", "rotate.requested", "jwks.published"} <= set(seen_types)
    emergency = [c for c in rx.delivered() if c["type"] == "io.keymgr.rotate.requested"]
    assert emergency[-1]["data"]["emergency"] is True
    assert [c["data"]["seq"] for c in rx.delivered()] == list(range(1, len(lines) + 1))


def test_daemon_notifies_logs_failures_without_secrets_and_counts_them(
    home: Home, receivers: list[Receiver]
) -> None:
    """``keymgr run``: one webhook accepts, one refuses (400). The accepted one
    gets the daemon's events in order, ``daemon.stopped`` included (delivered at
    stop, within flush_timeout); the refusals are one log line each, naming the
    webhook and its host but never the URL's path, query or the secret; and
    /metrics counts both."""
    write_secret(home)
    fast_home(home, rotation_period="1h", publish_ahead="10m")
    ok = receiver(receivers)
    bad = receiver(receivers, statuses=[400] * 1000)
    add_notify(home, {"good": {"url": ok.url},
                      "bad": {"url": bad.url, "events": ["key.*"]}})
    lx = Launcher()
    try:
        d = lx.start(home)
        d.ready()
        ok.wait(5)
        m = wait_for(lambda: (s := scrape(d.port)) and metric(
            s, "keymgr_notify_sent_total", webhook="bad", result="failed") >= 3 and s,
            20, "failed deliveries to be counted")
        assert metric(m, "keymgr_notify_sent_total", webhook="good", result="ok") >= 5
        assert ("keymgr_notify_queue_depth", (("webhook", "good"),)) in m
        # SIGHUP: the new config's notifier takes over (the old one is closed).
        wait_for(lambda: len(ok.delivered()) == len(audit_lines(home)), 20,
                 "every event so far delivered")
        sent = metric(scrape(d.port), "keymgr_notify_sent_total", webhook="good", result="ok")
        d.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: any(c["type"] == "io.keymgr.config.loaded" for c in ok.delivered()),
                 20, "config.loaded to be delivered")
        wait_for(lambda: metric(scrape(d.port), "keymgr_notify_sent_total", webhook="good",
                                result="ok") > sent, 20, "the new notifier to count")
        rc, took = d.stop(signal.SIGTERM)
        assert rc == 0 and took < 20
        out = d.out.read_text() + d.err.read_text()
    finally:
        for p in lx.procs:
            if p.popen.poll() is None:
                p.popen.kill()
            p.popen.wait(timeout=10)
    lines = audit_lines(home)
    assert lines[-1]["event"] == "daemon.stopped"
    assert [c["id"] for c in ok.delivered()] == [x["hash"] for x in lines]
    for r, line in zip(ok.got, lines, strict=True):
        check_delivery(r, line, f"keymgr://{os.uname().nodename}")
    failed = [json.loads(x) for x in out.splitlines()
              if x.startswith("{") and json.loads(x).get("event") == "notify.failed"]
    assert len(failed) == len([x for x in lines if x["event"].startswith("key.")])
    assert all(f["webhook"] == "bad" and f["error"] == "HTTP 400" for f in failed)
    assert failed[0]["host"] == bad.url.split("/")[2]
    assert SECRET not in out and "/hooks/keymgr" not in out and "team=ops" not in out


def test_known_events_name_every_event_the_code_records() -> None:
    """An ``events`` filter is checked against KNOWN_EVENTS: an event the code
    records but the list lacks could never be selected by name."""
    import re

    from keymgr.notify import KNOWN_EVENTS
    from tests.conftest import REPO

    source = "".join(p.read_text() for p in (REPO / "keymgr").rglob("*.py"))
    recorded = set(re.findall(r'_event\(\s*"([a-z_]+\.[a-z_.]+)"', source))
    recorded |= set(re.findall(r'"event": "([a-z_]+\.[a-z_.]+)"', source))
    assert recorded and recorded <= set(KNOWN_EVENTS), recorded - set(KNOWN_EVENTS)
