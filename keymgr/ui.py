"""The read-only operator page: ``[daemon] ui`` on the daemon's listener.

One self-contained HTML page (no script, no external asset, the timeline
picture inlined as SVG, one inline style allowed by its hash in a strict
Content-Security-Policy) showing every ring and key with its state and next
transitions, the timeline (keymgr.timeline), the last audit events and the
result of verifying the audit chain.

A page load never blocks on the state store or a backend, and never reads the
audit log: it is built from what the daemon already holds -- the snapshot the
heartbeat and every pass refresh (``Metrics.snapshot``), the last events read
by the heartbeat (:meth:`OperatorView.refresh_events`, a read of the log's
last lines), and the last chain verification, run in the background
(:meth:`OperatorView.verify`, what ``keymgr audit verify`` runs, on a prefix of
the log that is consistent with the anchor) and cached with its time. A long
log is verified less often: never more than 1/``VERIFY_DUTY`` of the time.

It shows no secret and no path: no backend or publisher option is rendered,
every free text (an event's reason, an error) has the config's paths and any
other absolute path replaced, and the page has no action of any kind.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymgr import timeline
from keymgr.audit import AuditLog, FileMedium
from keymgr.errors import KeymgrError
from keymgr.model import DESTROYED, State
from keymgr.planner import Plan
from keymgr.timefmt import format_duration, format_time, utcnow

if TYPE_CHECKING:
    from keymgr.config import Config
    from keymgr.manager import KeyManager

#: Audit events shown, newest first.
AUDIT_EVENTS = 25
#: Rings listed in the table (the timeline draws keymgr.timeline.MAX_RINGS).
MAX_RINGS = 50
#: Bytes read from the end of the audit log for the last events, at most.
TAIL_BYTES = 1 << 20
#: A verification runs at most every VERIFY_MIN_GAP seconds, and at most
#: 1/VERIFY_DUTY of the time: a log that takes 30 s is verified every 10 min.
VERIFY_MIN_GAP = 10.0
VERIFY_DUTY = 20
#: How often the daemon asks whether a verification is due (seconds).
VERIFY_TICK = 5.0
#: The page reloads itself this often (seconds): a meta refresh, not a script.
REFRESH = 60

#: Event fields shown: nothing else of an event reaches the page.
EVENT_FIELDS = ("ts", "seq", "event", "ring", "kid", "publisher", "state", "actor", "reason")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header{background:#1f2933;color:#fff;padding:12px 20px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd2d9}
main{padding:8px 20px 24px}
section{margin:16px 0}
h2{font-size:17px;margin:12px 0 6px}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;min-width:60%}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #d9dee3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}
code{font:12px ui-monospace,monospace}
time,td.ts{white-space:nowrap}
#events{width:100%}
td.kid,td.reason,td.actor{overflow-wrap:anywhere}
.st{display:inline-block;border-radius:3px;padding:0 6px;color:#000;font-weight:600}
.st-pending{background:#cc79a7}.st-published{background:#56b4e9}.st-active{background:#009e73}
.st-retired{background:#e69f00}.st-expired{background:#8c8c8c}.st-revoked{background:#d55e00}
.st-destroyed{background:#ddd}
.ok{color:#05612f;font-weight:600}.bad{color:#b00020;font-weight:600}
.note{color:#52606d}
.timeline{overflow-x:auto;background:#fff;border:1px solid #d9dee3;padding:4px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0}
dt{font-weight:600}dd{margin:0}
footer{padding:8px 20px 16px;color:#52606d}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
#: No script, no connection, no frame, no form, no base: the inline style by
#: its hash, and data: images (the favicon) only.
CSP = (
    "default-src 'none'; "
    f"style-src 'sha256-{_STYLE_HASH}'; "
    "img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}

#: A URL (a bucket, a Vault or KMS address), or an absolute path (POSIX, or
#: C:\...), in free text.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s'\"(),;]*[^\s'\"(),;:.])?")
_ABS_PATH = re.compile(r"(?<![\w.:/])(?:/|[A-Za-z]:\\)(?:[^\s'\"(),;]*[^\s'\"(),;:.])?")


@dataclass(frozen=True)
class ChainCheck:
    """The last verification of the audit chain (what ``audit verify`` checks)."""

    ok: bool
    #: Lines verified (the log's length when the check began).
    events: int
    checkpoints: int
    at: datetime
    took: float
    #: Why it failed, one line, paths removed.
    error: str | None = None


class Redactor:
    """Removes the config's paths (and any other absolute path, and any URL)
    from free text."""

    def __init__(self, config: Config) -> None:
        found: set[str] = {str(config.path), str(config.daemon.audit_log)}
        with_dir = [config.dir]
        state = config.daemon.state
        if state.startswith("file:"):
            from keymgr.stores import file_state_path

            found.add(str(file_state_path(state)))
        found.add(state)
        for b in config.backends.values():
            found.update(str(path) for path in b.paths().values())
        for pub in config.publishers.values():
            found.update(str(path) for path in pub.paths().values())
        for d in with_dir:
            found.add(str(d))
            found.add(str(d.resolve()))
        # Longest first, so a file inside a directory goes as a whole.
        self._literals = sorted((s for s in found if len(s) > 1), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self._literals:
            text = text.replace(s, "[path]")
        return _ABS_PATH.sub("[path]", _URL.sub("[url]", text))


class OperatorView:
    """What the page shows beside the snapshot: the last audit events and the
    last chain verification, each refreshed in the background with its time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: tuple[dict[str, Any], ...] = ()
        self.events_error: str | None = None
        self.events_at: datetime | None = None
        self.chain: ChainCheck | None = None
        self._next_verify = 0.0
        self._verifying = False

    # -- background work (the daemon's threads) ------------------------------

    def refresh_events(self, audit: AuditLog, redact: Callable[[str], str]) -> None:
        """Read the last AUDIT_EVENTS events of the log (its end only)."""
        try:
            if audit.in_store:  # the chain in the shared store (keymgr.auditstore)
                from keymgr.auditstore import tail_events as store_tail

                events, error = store_tail(audit, AUDIT_EVENTS), None
            else:
                events, error = tail_events(audit.path, AUDIT_EVENTS), None
        except OSError as e:
            events, error = [], f"cannot read the audit log: {e.strerror}"
        with self._lock:
            if error is None:
                self.events = tuple(events)
            self.events_error = None if error is None else redact(error)
            self.events_at = utcnow()

    def verify_due(self) -> bool:
        return not self._verifying and time.monotonic() >= self._next_verify

    def verify(
        self,
        mgr: KeyManager,
        redact: Callable[[str], str],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> ChainCheck | None:
        """Verify the chain as ``keymgr audit verify`` does, on the log as it
        was, under the store's lock, at the anchor just read: the lock is held
        only to read the anchor and the log's length, never for the check.
        None when cancelled (the daemon stopping)."""
        if self._verifying:
            return None
        self._verifying = True
        t0 = time.monotonic()
        at = utcnow()
        try:
            try:
                with mgr.store.exclusive():  # not between a pass's commit and its append
                    anchor = mgr.state().audit
                    try:
                        size = 0 if mgr.audit.in_store else os.stat(mgr.audit.path).st_size
                    except FileNotFoundError:
                        size = 0
                if mgr.audit.in_store:  # the events up to the anchor read (appends go on)
                    from keymgr.auditstore import up_to

                    log: AuditLog = up_to(mgr.audit, anchor.seq)
                else:
                    log = _Prefix(mgr.audit, size, cancelled)
                r = log.check(anchor, require_signed=mgr.config.audit is not None)
                result = ChainCheck(
                    True, r.events, r.checkpoints, at, time.monotonic() - t0, None
                )
            except _Cancelled:
                return None
            except (KeymgrError, OSError, ValueError) as e:
                msg = str(e) if isinstance(e, KeymgrError) else f"{type(e).__name__}: {e}"
                result = ChainCheck(False, 0, 0, at, time.monotonic() - t0, redact(msg))
            with self._lock:
                self.chain = result
            self._next_verify = time.monotonic() + max(VERIFY_MIN_GAP, VERIFY_DUTY * result.took)
            return result
        finally:
            self._verifying = False

    # -- the page (a request thread: no I/O here) -----------------------------

    def page(
        self,
        config: Config,
        snapshot: tuple[State | None, Plan | None],
        ready: tuple[bool, Mapping[str, Any]],
        redact: Callable[[str], str],
        snapshot_at: datetime | None = None,
    ) -> tuple[bytes, Mapping[str, str]]:
        with self._lock:
            events, events_error, chain = self.events, self.events_error, self.chain
        body = render(
            config, snapshot, ready, events, events_error, chain, redact, utcnow(), snapshot_at
        )
        return body.encode(), HEADERS


class _Cancelled(Exception):
    pass


class _Prefix(AuditLog):
    """The audit log's first ``size`` bytes: the lines that existed when the
    anchor was read (later appends are the next verification's)."""

    def __init__(self, log: AuditLog, size: int, cancelled: Callable[[], bool]) -> None:
        super().__init__(log.path, log.checkpoints)
        self.size = size
        self.cancelled = cancelled

    def lines(self) -> Iterator[tuple[int, bytes]]:
        for n, line in FileMedium(self.path).lines(size=self.size):
            if n % 4096 == 0 and self.cancelled():
                raise _Cancelled
            yield n, line


def tail_events(path: Path, n: int, limit: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The last ``n`` complete lines of the log, parsed (a line that is not a
    JSON object is shown as such), oldest first; at most ``limit`` bytes read."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return []
    with f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        pos, data = size, b""
        block = 8192
        while pos > 0 and data.count(b"\n") <= n and size - pos < limit:
            step = min(block, pos, limit - (size - pos))
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
            block *= 2
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # an append in progress
    lines = data.split(b"\n")[:-1]
    if pos > 0:
        lines = lines[1:]  # the first may be partial
    out: list[dict[str, Any]] = []
    for raw in lines[-n:]:
        try:
            ev = json.loads(raw)
        except ValueError:
            ev = None
        out.append(ev if isinstance(ev, dict) else {"event": "(unreadable line)"})
    return out


# --- rendering ---------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "-"
    d = t - now
    secs = d.total_seconds()
    rel = f"in {timeline.approx(d)}" if secs > 0 else (
        "now" if secs == 0 else f"{timeline.approx(-d)} ago"
    )
    return f"<time datetime=\"{_e(format_time(t))}\">{_e(format_time(t))}</time> ({_e(rel)})"


def _state_badge(state: str) -> str:
    return f'<span class="st st-{_e(state)}">{_e(state)}</span>'


def render(
    config: Config,
    snapshot: tuple[State | None, Plan | None],
    ready: tuple[bool, Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    events_error: str | None,
    chain: ChainCheck | None,
    redact: Callable[[str], str],
    now: datetime,
    snapshot_at: datetime | None = None,
) -> str:
    state, plan = snapshot
    if state is not None and state.clock is not None and now < state.clock:
        now = state.clock
    parts = [
        "<!doctype html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        '<meta name="referrer" content="no-referrer">',
        "<title>keymgr operator view</title>",
        '<link rel="icon" href="data:,">',
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<header><h1>keymgr</h1>",
        f"<p>Read-only operator view, generated {_e(format_time(now))} (UTC); "
        f"reloads every {REFRESH} s.</p></header>",
        "<main>",
    ]
    parts.extend(_daemon_section(ready, snapshot_at, now, redact))
    if state is None:
        parts.append(
            '<section id="rings"><h2>Key rings</h2><p class="note">No state read yet: '
            "the daemon is starting (or cannot read its state store; see readiness).</p>"
            "</section>"
        )
    else:
        parts.extend(_rings_section(config, state, plan, now))
        parts.append('<section id="timeline"><h2>Timeline</h2><div class="timeline">')
        parts.append(timeline.svg(state, config.policies, plan, now))
        parts.append("</div></section>")
    parts.extend(_audit_section(events, events_error, chain, now, redact))
    parts.append("</main>")
    parts.append(
        "<footer>This page changes nothing: no action, no form, no script. Times are "
        "UTC. Private keys, key files and the config's options are never shown.</footer>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _daemon_section(
    ready: tuple[bool, Mapping[str, Any]],
    snapshot_at: datetime | None,
    now: datetime,
    redact: Callable[[str], str],
) -> list[str]:
    ok, info = ready
    out = ['<section id="daemon"><h2>Daemon</h2><dl>']
    verdict = '<span class="ok">ready</span>' if ok else '<span class="bad">not ready</span>'
    reason = info.get("reason")
    if reason:
        verdict += f" ({_e(redact(str(reason)))})"
    out.append(f"<dt>readiness</dt><dd id=\"ready\">{verdict}</dd>")
    out.append(f"<dt>lease</dt><dd>{'held' if info.get('lease_held') else 'not held'}</dd>")
    checks = info.get("checks") or {}
    for name in sorted(checks):
        good = checks[name] == "ok"
        cls, word = ("ok", "ok") if good else ("bad", "failing")
        out.append(f'<dt>{_e(name)}</dt><dd><span class="{cls}">{word}</span></dd>')
    out.append(f"<dt>state read</dt><dd>{_when(snapshot_at, now)}</dd>")
    out.append("</dl></section>")
    return out


def _rings_section(config: Config, state: State, plan: Plan | None, now: datetime) -> list[str]:
    names = sorted(set(config.policies) | set(state.rings))
    out = ['<section id="rings">', f"<h2>Key rings ({len(names)})</h2>"]
    for name in names[:MAX_RINGS]:
        ring = state.ring(name)
        pol = config.policies.get(name)
        nexts = timeline.next_transitions(name, plan)
        out.append(f'<table class="ring" data-ring="{_e(name)}">')
        rules = "not in the config any more"
        if pol is not None:
            rules = (
                f"{_e(pol.algorithm)}; rotation every {format_duration(pol.rotation_period)}, "
                f"published {format_duration(pol.publish_ahead)} ahead, retired keys kept "
                f"{format_duration(pol.retire_grace)}, destroyed "
                f"{format_duration(pol.destroy_after)} after, forgotten "
                f"{format_duration(pol.history)} after that"
            )
        out.append(f"<caption>ring <code>{_e(name)}</code>: {rules}</caption>")
        out.append(
            '<tr><th scope="col">key id</th><th scope="col">state</th><th scope="col">alg</th>'
            '<th scope="col">since</th></tr>'
        )
        keys = [k for k in ring.keys if k.state != DESTROYED]
        for k in sorted(keys, key=lambda k: (k.created_at, k.kid)):
            since = next(
                (getattr(k, f) for f in _SINCE if getattr(k, f) is not None), k.created_at
            )
            out.append(
                f'<tr class="key" data-kid="{_e(k.kid)}" data-state="{_e(k.state)}">'
                f"<td><code>{_e(k.kid)}</code></td><td>{_state_badge(k.state)}</td>"
                f"<td>{_e(k.alg)}</td><td>{_when(since, now)}</td></tr>"
            )
        if not keys:
            out.append('<tr><td colspan="4" class="note">no keys yet</td></tr>')
        gone = len(ring.keys) - len(keys)
        if gone:
            out.append(f'<tr><td colspan="4" class="note">{gone} destroyed key(s)</td></tr>')
        if ring.forgotten:  # past their history: kid, backend, alg and time only
            out.append(
                f'<tr><td colspan="4" class="note">{len(ring.forgotten)} tombstone(s) of '
                "destroyed keys past their history</td></tr>"
            )
        out.append("</table>")
        if not nexts:
            out.append('<p class="next" data-ring="' + _e(name) + '">next: nothing scheduled</p>')
        for n in nexts:
            kid = f" <code>{_e(n.kid)}</code>" if n.kid else ""
            when = "due now" if n.due or n.at <= now else f"at {_when(n.at, now)}"
            out.append(
                f'<p class="next" data-ring="{_e(name)}" data-action="{_e(n.action)}">'
                f"next: <strong>{_e(n.action)}</strong>{kid} {when}</p>"
            )
    if len(names) > MAX_RINGS:
        out.append(
            f'<p class="note">{len(names) - MAX_RINGS} more ring(s) not listed (the first '
            f"{MAX_RINGS} by name are); <code>keymgr status</code> lists every ring.</p>"
        )
    out.append("</section>")
    return out


#: The time a key entered its present state: the latest of these it has.
_SINCE = (
    "destroyed_at",
    "revoked_at",
    "expired_at",
    "retired_at",
    "activated_at",
    "published_at",
    "created_at",
)


def _audit_section(
    events: Sequence[Mapping[str, Any]],
    events_error: str | None,
    chain: ChainCheck | None,
    now: datetime,
    redact: Callable[[str], str],
) -> list[str]:
    out = ['<section id="audit"><h2>Audit log</h2>']
    if chain is None:
        out.append('<p id="chain" class="note">chain not verified yet (runs in the background)</p>')
    elif chain.ok:
        signed = f", {chain.checkpoints} signed checkpoint(s)" if chain.checkpoints else ""
        out.append(
            f'<p id="chain" class="ok" data-ok="true">chain verified: {chain.events} event(s), '
            f"hash chain intact, head anchored in state{signed}; checked "
            f"{_when(chain.at, now)} in {chain.took:.2f} s</p>"
        )
    else:
        out.append(
            f'<p id="chain" class="bad" data-ok="false">chain NOT verified: '
            f"{_e(chain.error)}; checked {_when(chain.at, now)}</p>"
        )
    newest = max((int(s) for ev in events if type(s := ev.get("seq")) is int), default=0)
    if chain is not None and chain.ok and newest > chain.events:
        out.append(
            f'<p class="note">{newest - chain.events} newer event(s) not covered yet: the '
            f"check runs again in the background (at most every {VERIFY_MIN_GAP:g} s, longer "
            "for a long log).</p>"
        )
    if events_error:
        out.append(f'<p class="bad">{_e(events_error)}</p>')
    out.append(f"<table id=\"events\"><caption>last {len(events)} event(s), newest first</caption>")
    out.append("<tr>" + "".join(f'<th scope="col">{f}</th>' for f in EVENT_FIELDS) + "</tr>")
    for ev in reversed(events):
        cells = []
        for f in EVENT_FIELDS:
            v = ev.get(f)
            if v is None or isinstance(v, dict | list):
                text = ""
            else:
                text = redact(str(v)) if f in ("reason", "actor") else str(v)
            cells.append(f'<td class="{f}">{_e(text)}</td>')
        row = "".join(cells)
        out.append(f'<tr class="event" data-event="{_e(ev.get("event"))}">{row}</tr>')
    out.append("</table></section>")
    return out
