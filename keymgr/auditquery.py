"""Reading the audit log: ``keymgr audit show`` (queries) and ``keymgr audit follow``.

``show`` filters the log without verifying it (``keymgr audit verify`` does
that) and without loading it: it streams, and with ``--since`` / ``--until``
it seeks by time. The log is append-only and its times almost never go back
(see :data:`SLACK`), so a bisection over byte offsets finds where a time
window begins: each probe reads the first whole line after a byte offset (one
4 KiB read), about 14 probes for a 400 MB log of a million lines. ``--reverse``
reads the file backwards from its end (or from where ``--until`` ends), so
``--reverse --limit N`` reads the last N matching lines and little else.

``follow`` tails the log like ``tail -F`` and verifies every line as it
arrives, from a verified point (the anchored head, or the whole existing log
checked first), printing only what it verified; the first line that fails
ends it, exit 1, naming the line.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from keymgr.audit import GENESIS, LineCheck, chain_hash
from keymgr.checkpoint import AuditKey
from keymgr.errors import AuditError, KeymgrError, UsageError
from keymgr.timefmt import format_duration, format_time, parse_duration, parse_time, utcnow

if TYPE_CHECKING:
    from keymgr.manager import KeyManager
    from keymgr.model import AuditAnchor

#: How far back in time a line may be from any line before it, as seeking
#: assumes. keymgr's own times never go back except in two cases: events the
#: daemon records itself (``daemon.started``, ``daemon.stopped``,
#: ``config.loaded``) carry the wall clock, not clamped to the newest time in
#: state; and failure and edge events do not move that time, so a wall clock
#: stepped back (NTP) can date the next event a little earlier. Both are
#: seconds in practice; only a drill (``--at`` in the future) on a state a
#: daemon then runs on makes more. A query that meets a larger step says so
#: on stderr; ``--scan`` reads every line whatever the order.
SLACK = timedelta(days=1)
#: Bisection stops when the window is this small and scans it.
_WINDOW = 64 * 1024
#: One probe: enough for a whole line of the log as keymgr writes it.
_PROBE = 4096
#: Streaming reads.
_CHUNK = 1 << 20

_TS = re.compile(rb'\{"ts":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)"[,}]')
_CANON = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_NOT_JSON = object()


class Reader(Protocol):
    """What a query reads the log through (an unbuffered binary file)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def read(self, size: int = -1, /) -> bytes | None: ...


# --------------------------------------------------------------------------- times


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``--since`` / ``--until``: an RFC 3339 time, or a duration back from now
    (``7d``: now minus 7 days). ValueError otherwise."""
    try:
        return parse_time(text)
    except ValueError:
        pass
    try:
        back = parse_duration(text)
    except ValueError:
        raise ValueError(
            f"bad time {text!r}: an RFC 3339 time (e.g. 2026-01-31T12:00:00Z) or a duration "
            "back from now (e.g. 7d, 12h, 30m)"
        ) from None
    return (now or utcnow()) - back


def _canonical_ts(value: Any) -> str | None:
    """A ``ts`` as keymgr writes it (``2026-01-31T12:00:00Z``, which sorts as
    it counts), or None when it is no time."""
    if not isinstance(value, str):
        return None
    if _CANON.fullmatch(value):
        return value
    try:
        return _stamp(parse_time(value))
    except ValueError:
        return None


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            return json.loads(line)  # what orjson refuses and JSON allows (huge integers)
        except ValueError:
            return _NOT_JSON


def line_ts(line: bytes) -> str | None:
    """The ``ts`` of a raw line: read off its start when keymgr wrote it (``ts``
    first, once), else from the parsed line; None when it has none."""
    m = _TS.match(line)
    if m is not None and line.find(b'"ts":', 7) < 0:
        return m.group(1).decode()
    ev = _loads(line)
    return _canonical_ts(ev.get("ts")) if isinstance(ev, dict) else None


def _stamp(dt: datetime) -> str:
    text = format_time(dt)
    assert text is not None
    return text


def _seconds_between(later: str, earlier: str) -> float:
    return (parse_time(later) - parse_time(earlier)).total_seconds()


# --------------------------------------------------------------------------- reading


def _read_at(f: Reader, pos: int, n: int) -> bytes:
    f.seek(pos)
    out = b""
    while len(out) < n:
        more = f.read(n - len(out))
        if not more:
            break
        out += more
    return out


def _line_at_or_after(f: Reader, pos: int, limit: int) -> tuple[int, bytes] | None:
    """The first whole line that starts at or after ``pos`` and before
    ``limit``: (its offset, its bytes without the newline)."""
    if pos >= limit:
        return None
    base = pos - 1 if pos > 0 else 0
    start = 0 if pos == 0 else -1
    buf = b""
    while True:
        chunk = _read_at(f, base + len(buf), _PROBE)
        if not chunk:
            return None  # no newline: a last line still being written
        buf += chunk
        if start < 0:
            i = buf.find(b"\n")
            if i < 0:
                base += len(buf)
                buf = b""
                if base >= limit:
                    return None
                continue
            start = base + i + 1
            if start >= limit:
                return None
            buf = buf[i + 1 :]
            base = start
        j = buf.find(b"\n")
        if j >= 0:
            return start, buf[:j]


def _bisect(f: Reader, lo: int, hi: int, before: Callable[[str], bool]) -> tuple[int, int]:
    """Narrow [lo, hi) by probing the first dated line after its middle.

    Keeps: ``lo`` is where it was or a line whose time is ``before``; ``hi``
    is where it was or a line whose time is not. Lines without a time are
    stepped over; when the window holds none, it stops there (the caller
    scans the window, so that costs time, never a line).
    """
    while hi - lo > _WINDOW:
        mid = (lo + hi) // 2
        probe = mid
        hit: tuple[int, str] | None = None
        while True:
            got = _line_at_or_after(f, probe, hi)
            if got is None:
                break
            start, line = got
            ts = line_ts(line)
            if ts is not None:
                hit = (start, ts)
                break
            probe = start + len(line) + 1
        if hit is None:
            break
        if before(hit[1]):
            lo = hit[0]
        else:
            hi = hit[0]
    return lo, hi


def _complete_end(f: Reader, end: int) -> int:
    """Just after the last newline at or before ``end`` (0 if none): a last
    line without its newline is still being written, or torn."""
    pos = end
    while pos > 0:
        step = min(_PROBE, pos)
        pos -= step
        i = _read_at(f, pos, step).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def _candidates(body: bytes, base: int, needle: bytes) -> list[tuple[int, bytes]]:
    """The lines of ``body`` (whole lines, ``base`` its offset) that hold
    ``needle`` or a backslash (whose escapes may spell it otherwise), found
    with ``bytes.find``: a rare needle costs a pass at C speed, not a Python
    step per line."""
    spans: set[tuple[int, int]] = set()
    for pat in (needle, b"\\"):
        i = body.find(pat)
        while i >= 0:
            start = body.rfind(b"\n", 0, i) + 1
            end = body.find(b"\n", i)
            if end < 0:
                end = len(body)
            spans.add((start, end))
            i = body.find(pat, end)
    return [(base + a, body[a:b]) for a, b in sorted(spans)]


def _forward(
    f: Reader, start: int, end: int, needle: bytes | None = None
) -> Iterator[tuple[int, bytes]]:
    """Whole lines from ``start`` (a line's offset) to ``end``, oldest first
    (only those that may hold ``needle``, when given)."""
    pos = start
    rest = b""
    while pos < end:
        chunk = _read_at(f, pos, min(_CHUNK, end - pos))
        if not chunk:
            break
        pos += len(chunk)
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        off = pos - len(data)
        body, rest = data[:cut], data[cut + 1 :]
        if needle is not None:
            yield from _candidates(body, off, needle)
            continue
        for line in body.split(b"\n"):
            yield off, line
            off += len(line) + 1
    # ``rest``: a last line without its newline is not an event yet.


def _backward(
    f: Reader, stop: int, needle: bytes | None = None
) -> Iterator[tuple[int, bytes]]:
    """Whole lines before ``stop`` (0, or just after a newline), newest first
    (only those that may hold ``needle``, when given)."""
    pos = stop
    rest = b""
    first = True
    size = _WINDOW  # doubled up to _CHUNK: a short tail costs a short read
    while pos > 0:
        step = min(size, pos)
        size = min(2 * size, _CHUNK)
        pos -= step
        data = _read_at(f, pos, step) + rest
        parts = data.split(b"\n")
        if first:
            parts.pop()  # empty: the data ends with the newline before ``stop``
            first = False
        if pos > 0:
            rest = parts[0]
            body = parts[1:]
            off = pos + len(rest) + 1
        else:
            rest = b""
            body = parts
            off = 0
        if needle is not None:
            yield from reversed(_candidates(b"\n".join(body), off, needle))
            continue
        offsets = []
        for line in body:
            offsets.append(off)
            off += len(line) + 1
        for i in range(len(body) - 1, -1, -1):
            yield offsets[i], body[i]


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    """What ``keymgr audit show`` selects; every field narrows it."""

    since: datetime | None = None
    until: datetime | None = None
    #: Event names or globs (``key.*``): any of them.
    events: tuple[str, ...] = ()
    #: An actor or a glob (``cli:*``).
    actor: str | None = None
    ring: str | None = None
    kid: str | None = None
    limit: int | None = None
    #: Newest first.
    reverse: bool = False
    #: Read every line instead of seeking by time.
    scan: bool = False


@dataclass(frozen=True)
class Hit:
    offset: int
    #: The line as stored, without its newline.
    raw: bytes
    event: dict[str, Any]


def _literal(pattern: str) -> bytes:
    """What the JSON string of any value ``pattern`` (a glob) matches holds:
    the whole string when it has no wildcard, else its quote and the literal
    part before the first one."""
    for i, ch in enumerate(pattern):
        if ch in "*?[":
            return json.dumps(pattern[:i], ensure_ascii=False).encode()[:-1]
    return json.dumps(pattern, ensure_ascii=False).encode()


class _Match:
    """Everything but time: events, actor, ring, kid."""

    def __init__(self, q: Query, where: str) -> None:
        self.where = where
        self.events = q.events
        self.actor = q.actor
        self.ring = q.ring
        self.kid = q.kid
        # A line holding none of these bytes cannot match: a string value is
        # written as json.dumps writes it, unless the line uses escapes.
        self.needles = [
            json.dumps(v, ensure_ascii=False).encode() for v in (q.ring, q.kid) if v is not None
        ]
        # Every matching line holds each of these (escapes aside): the longest
        # lets a scan skip to the lines holding it.
        hints = list(self.needles)
        if len(q.events) == 1:
            hints.append(_literal(q.events[0]))
        if q.actor is not None:
            hints.append(_literal(q.actor))
        self.hint = max(hints, key=len) if hints and len(max(hints, key=len)) >= 6 else None

    def __call__(self, off: int, line: bytes) -> dict[str, Any] | None:
        if self.needles and b"\\" not in line:
            for needle in self.needles:
                if needle not in line:
                    return None
        ev = _loads(line)
        if not isinstance(ev, dict):
            raise AuditError(
                f"{self.where}: the line at byte {off} is not an audit event (JSON object); "
                "'keymgr audit show' does not verify the log: run 'keymgr audit verify'"
            )
        if self.ring is not None and ev.get("ring") != self.ring:
            return None
        if self.kid is not None and ev.get("kid") != self.kid:
            return None
        if self.events:
            name = ev.get("event")
            if not isinstance(name, str) or not any(
                fnmatch.fnmatchcase(name, p) for p in self.events
            ):
                return None
        if self.actor is not None:
            actor = ev.get("actor")
            if not isinstance(actor, str) or not fnmatch.fnmatchcase(actor, self.actor):
                return None
        return ev


def _any_dated(
    f: Reader, start: int, end: int, pred: Callable[[str], bool]
) -> int | None:
    """The offset of a whole line starting in [start, end) whose time meets
    ``pred``, or None."""
    got = _line_at_or_after(f, start, end)
    if got is None:
        return None
    for off, line in _forward(f, got[0], end):
        ts = line_ts(line)
        if ts is not None and pred(ts):
            return off
    return None


def query_file(
    f: Reader,
    size: int,
    q: Query,
    where: str = "audit log",
    warn: Callable[[str], None] | None = None,
) -> Iterator[Hit]:
    """The lines of the log in ``f`` (``size`` bytes) that ``q`` selects, in
    log order (newest first with ``q.reverse``), read as they are yielded.

    With ``since``, a bisection finds a line dated before ``since - SLACK``,
    and the scan starts there: every line before it is then older than
    ``since``, as no line is more than SLACK older than one before it. The
    ``_WINDOW`` bytes before that line are read too: a line there dated
    ``since`` or later shows the times do go back further, and the whole log
    is read instead (with a warning). The scan ends past the first line dated
    after ``until + SLACK``, and past one more window, where a line in range
    again shows disorder (the scan then goes on to the end). Backwards, the
    same with the roles swapped. A larger step seen anywhere in what is read
    is reported; one hidden where nothing is read cannot be: ``q.scan`` reads
    every line. Nothing is verified.
    """
    since = _stamp(q.since) if q.since is not None else None
    until = _stamp(q.until) if q.until is not None else None
    timed = since is not None or until is not None
    seek = timed and not q.scan
    slack = SLACK.total_seconds()
    match = _Match(q, where)
    report = warn if seek and warn is not None else None
    stop: str | None = None  # a line beyond this ends the scan, one window later
    if q.reverse:
        end = size
        if seek and until is not None and q.until is not None:
            ceiling = _stamp(q.until + SLACK)
            _, end = _bisect(f, 0, size, lambda ts: ts <= ceiling)
            bad = _any_dated(f, end, min(size, end + _WINDOW), lambda ts: ts <= until)
            if end < size and bad is not None:
                _disorder(report, where, bad, "reading the whole log")
                end = size
                report = None
        if seek and q.since is not None:
            stop = _stamp(q.since - SLACK)
        lines = _backward(f, _complete_end(f, end), None if timed else match.hint)
    else:
        start = 0
        if seek and since is not None and q.since is not None:
            floor = _stamp(q.since - SLACK)
            start, _ = _bisect(f, 0, size, lambda ts: ts < floor)
            bad = _any_dated(f, max(0, start - _WINDOW), start, lambda ts: ts >= since)
            if start > 0 and bad is not None:
                _disorder(report, where, bad, "reading the whole log")
                start = 0
                report = None
        if seek and q.until is not None:
            stop = _stamp(q.until + SLACK)
        lines = _forward(f, start, size, None if timed else match.hint)
    n = 0
    edge: str | None = None  # the newest time seen (the oldest, backwards)
    stop_at: int | None = None  # where the window past the stop line ends
    for off, line in lines:
        if timed:
            ts = line_ts(line)
            if ts is None:
                continue
            if stop_at is not None and (off < stop_at if q.reverse else off > stop_at):
                return
            if stop is not None and stop_at is None and (ts < stop if q.reverse else ts > stop):
                stop_at = off - _WINDOW if q.reverse else off + _WINDOW
            if edge is not None and (ts > edge if q.reverse else ts < edge):
                later, earlier = (ts, edge) if q.reverse else (edge, ts)
                if report is not None and _seconds_between(later, earlier) > slack:
                    then = "results may miss events; --scan reads every line"
                    _disorder(report, where, off, then)
                    report = None
            else:
                edge = ts
            if (since is not None and ts < since) or (until is not None and ts > until):
                continue
            if stop_at is not None:
                # In range past the stop line: the times go back further than SLACK.
                _disorder(report, where, off, "reading on to the end")
                report = None
                stop = None
                stop_at = None
        ev = match(off, line)
        if ev is None:
            continue
        yield Hit(off, line, ev)
        n += 1
        if q.limit is not None and n >= q.limit:
            return


def _disorder(warn: Callable[[str], None] | None, where: str, off: int, then: str) -> None:
    if warn is not None:
        warn(
            f"{where}: event times go back by more than {format_duration(SLACK)} near byte "
            f"{off}, which --since/--until assume they do not: {then}"
        )


def query(
    path: Path, q: Query, warn: Callable[[str], None] | None = None
) -> Iterator[Hit]:
    """:func:`query_file` on the log at ``path`` (nothing for a missing log)."""
    where = f"audit log {path}"
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed below, when the caller stops
    except FileNotFoundError:
        return
    except OSError as e:
        raise AuditError(f"{where}: cannot read: {e.strerror}") from None
    with f:
        try:
            yield from query_file(f, os.fstat(f.fileno()).st_size, q, where, warn)
        except OSError as e:
            raise AuditError(f"{where}: cannot read: {e.strerror}") from None


# --------------------------------------------------------------------------- output

COLUMNS = ("SEQ", "TIME", "EVENT", "RING", "KID", "ACTOR", "DETAILS")
#: Widths when rows are printed as they come (``follow``): a kid is 43.
FOLLOW_WIDTHS = (6, 20, 18, 12, 43, 20)
_DETAILS = ("publisher", "action", "state", "reason")


def _clean(text: str) -> str:
    """One printable line: control characters (a newline in a reason, a
    terminal escape) are shown escaped, never acted on."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def row(ev: dict[str, Any]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        return _clean(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))

    details = " ".join(f"{k}={cell(ev[k])}" for k in _DETAILS if ev.get(k) is not None)
    return [
        cell(ev.get("seq")),
        cell(ev.get("ts")),
        cell(ev.get("event")),
        cell(ev.get("ring")),
        cell(ev.get("kid")),
        cell(ev.get("actor")),
        details,
    ]


class Table:
    """An aligned table, streamed: the first ``buffer`` rows set the widths
    (all of them when fewer), later rows keep those widths; a longer cell
    pushes the rest of its row, never truncated."""

    def __init__(
        self,
        write: Callable[[str], None],
        buffer: int = 500,
        widths: tuple[int, ...] | None = None,
    ) -> None:
        self.write = write
        self.buffer = buffer
        self.rows: list[list[str]] = []
        self.widths: list[int] | None = list(widths) if widths is not None else None
        if self.widths is not None:
            self._line(list(COLUMNS))

    def add(self, ev: dict[str, Any]) -> None:
        r = row(ev)
        if self.widths is not None:
            self._line(r)
            return
        self.rows.append(r)
        if len(self.rows) >= self.buffer:
            self._fix()

    def close(self) -> None:
        if self.widths is None and self.rows:
            self._fix()

    def _fix(self) -> None:
        rows, self.rows = self.rows, []
        self.widths = [
            max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(COLUMNS[:-1])
        ]
        self._line(list(COLUMNS))
        for r in rows:
            self._line(r)

    def _line(self, r: list[str]) -> None:
        assert self.widths is not None
        cells = [v.ljust(w) for v, w in zip(r, self.widths, strict=False)] + r[len(self.widths) :]
        self.write("  ".join(cells).rstrip() + "\n")


# --------------------------------------------------------------------------- syslog

IDENT = "keymgr-audit"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
DEV_LOG = "/dev/log"
_LOG_AUTH = 4
_WARNING, _NOTICE, _INFO = 4, 5, 6
_LOUD = frozenset({"publish.failed", "backend.failed", "edge.unreachable", "key.orphan_destroyed"})
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_FIELD = re.compile(r"[^A-Z0-9_]")
_FIRST = ("ts", "seq", "event", "ring", "kid", "backend", "actor", "reason")


def _priority(ev: dict[str, Any]) -> int:
    name = ev.get("event")
    if name in _LOUD:
        return _WARNING
    if name in ("key.revoked", "audit.key"):
        return _NOTICE
    return _INFO


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def _ordered(ev: dict[str, Any]) -> list[tuple[str, Any]]:
    first = [(k, ev[k]) for k in _FIRST if ev.get(k) is not None]
    return first + [(k, v) for k, v in ev.items() if k not in _FIRST and v is not None]


def logfmt(ev: dict[str, Any]) -> str:
    """``key=value`` pairs, a value quoted (JSON) when it needs to be."""
    out = []
    for k, v in _ordered(ev):
        text = _text(v)
        if not text or not text.isprintable() or any(c in text for c in ' "=\\'):
            text = json.dumps(text, ensure_ascii=False)
        out.append(f"{k}={text}")
    return " ".join(out)


def journal_fields(ev: dict[str, Any], raw: bytes) -> list[tuple[str, str]]:
    """The journald fields of one event: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER,
    and each field of the event as ``KEYMGR_<NAME>``, plus the line as stored
    (``KEYMGR_JSON``)."""
    summary = " ".join(
        f"{k}={_clean(_text(ev[k]))}"
        for k in ("seq", "ring", "kid", "actor", "reason")
        if ev.get(k) is not None
    )
    fields = [
        ("MESSAGE", f"{_clean(_text(ev.get('event')))} {summary}".strip()),
        ("PRIORITY", str(_priority(ev))),
        ("SYSLOG_FACILITY", str(_LOG_AUTH)),
        ("SYSLOG_IDENTIFIER", IDENT),
    ]
    for k, v in _ordered(ev):
        fields.append((("KEYMGR_" + _FIELD.sub("_", str(k).upper()))[:64], _text(v)))
    fields.append(("KEYMGR_JSON", raw.decode("utf-8", "replace")))
    return fields


def journal_datagram(fields: list[tuple[str, str]]) -> bytes:
    """journald's native protocol: ``NAME=value`` lines; a value holding a
    newline as ``NAME``, newline, 64-bit little-endian length, value."""
    out = bytearray()
    for name, value in fields:
        b = value.encode()
        if b"\n" in b:
            out += name.encode() + b"\n" + struct.pack("<Q", len(b)) + b + b"\n"
        else:
            out += name.encode() + b"=" + b + b"\n"
    return bytes(out)


def syslog_datagram(ev: dict[str, Any], now: time.struct_time | None = None) -> bytes:
    """A BSD syslog line (RFC 3164, what ``/dev/log`` readers parse):
    ``<PRI>Mmm dd hh:mm:ss keymgr-audit[PID]: key=value ...``."""
    t = now or time.localtime()
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    pri = _LOG_AUTH * 8 + _priority(ev)
    return f"<{pri}>{stamp} {IDENT}[{os.getpid()}]: {logfmt(ev)}".encode()


class SyslogSink:
    """Sends each verified event to a local datagram socket: journald's own
    (structured fields) or a syslog one (``/dev/log``)."""

    def __init__(self, path: str, journal: bool, retry_for: float = 5.0) -> None:
        self.path = path
        self.journal = journal
        self.retry_for = retry_for
        self.sock: socket.socket | None = None

    @classmethod
    def local(cls) -> SyslogSink:
        """journald when it runs here, else ``/dev/log``."""
        if os.path.exists(JOURNAL_SOCKET):
            return cls(JOURNAL_SOCKET, journal=True)
        return cls(DEV_LOG, journal=False)

    def describe(self) -> str:
        return f"{'journald' if self.journal else 'syslog'} at {self.path}"

    def send(self, ev: dict[str, Any], raw: bytes) -> None:
        data = journal_datagram(journal_fields(ev, raw)) if self.journal else syslog_datagram(ev)
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                if self.sock is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    try:
                        s.connect(self.path)
                    except OSError:
                        s.close()
                        raise
                    self.sock = s
                self.sock.send(data)
                return
            except OSError as e:
                self.close()
                # A restarting journald comes back; a datagram too big never fits.
                if e.errno == errno.EMSGSIZE or time.monotonic() >= deadline:
                    raise KeymgrError(
                        f"cannot send audit event seq {ev.get('seq')} to {self.describe()}: "
                        f"{e.strerror or e}"
                    ) from None
                time.sleep(0.2)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# --------------------------------------------------------------------------- follow


class Following:
    """What ``keymgr audit follow`` does the same over a file (:class:`Follower`)
    and over a store (keymgr.auditstore.StoreFollower): the options, the poll
    loop, the audit key at the head, and when an event must be signed."""

    def __init__(
        self,
        m: KeyManager,
        *,
        where: str,
        from_start: bool,
        emit: Callable[[dict[str, Any], bytes], None],
        note: Callable[[str], None],
        interval: float,
        stuck_after: float,
    ) -> None:
        self.m = m
        self.where = where
        self.from_start = from_start
        self.emit = emit
        self.note = note
        self.interval = interval
        self.stuck_after = stuck_after
        self.check = LineCheck(m.audit.path, where=where)

    def run(self) -> None:
        self.start()
        while True:
            time.sleep(self.interval)
            self.poll()

    def start(self) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        raise NotImplementedError

    def _at(self, n: int) -> str:
        """Event ``n``, for messages."""
        raise NotImplementedError

    def _state_key(self, anchor: AuditAnchor) -> AuditKey | None:
        """The audit key in use at the head, its public key read from its backend."""
        if anchor.key_kid is None:
            return None
        cp = self.m.audit.checkpoints
        if cp is None:
            raise UsageError(
                f"{self.where}: the state names audit key {anchor.key_kid} but "
                f"{self.m.config.path} has no [audit] table to read its public key from: use "
                "the daemon's config, or --from-start (keys from the log, as 'audit verify')"
            )
        assert anchor.key_alg is not None and anchor.key_backend is not None
        public = cp.public(anchor.key_backend, anchor.key_kid, anchor.key_alg)
        return AuditKey(anchor.key_kid, anchor.key_alg, public)

    def _require_signed(self, anchor: AuditAnchor, s: int) -> None:
        """At the anchored head: with an audit key in use, it must be signed."""
        if not self._signing(anchor):
            return
        if anchor.key_kid is not None and anchor.key_kid not in self.check.known_keys:
            raise AuditError(
                f"{self.where}: the state names audit key {anchor.key_kid}, but no audit.key "
                "line introduces it"
            )
        if self.check.signed_through < s:
            raise AuditError(
                f"{self._at(self.check.signed_through + 1)}: not covered by a signed "
                "checkpoint: written without the audit key"
            )

    def _signing(self, anchor: AuditAnchor) -> bool:
        return anchor.key_kid is not None or (
            self.m.config.audit is not None and bool(self.check.known_keys)
        )


class Follower(Following):
    """``keymgr audit follow``: the log as it grows, every line verified.

    It starts from a verified point, taken under the store's lock (not
    between a commit and its append): by default the anchored head (the log's
    last line is the head the state anchors, hashes to it, and with
    ``[audit]`` carries a checkpoint the audit key's public key, read from its
    backend, verifies); with ``from_start`` the whole existing log, checked as
    ``audit verify`` checks it and then printed.

    Each new line must chain (``seq``, ``prev``, ``hash``) and carry a valid
    checkpoint if it has one; it is printed once the state's anchor confirms
    it (the head the state anchors, or the outbox of a commit not appended
    yet, continues it) and, when checkpoints are in use, once a checkpoint
    covers it. A line beyond the anchor, a head the state does not anchor, an
    unsigned head where a signed one is due, a log cut shorter, rewritten in
    place or replaced by a file without the lines already verified: each
    ends it with an AuditError naming the line (exit 1).

    A log renamed away is drained and waited for; a file that comes back at
    the path must hold every line already verified (its chain is checked up
    to them) and is followed from there.
    """

    def __init__(
        self,
        m: KeyManager,
        *,
        from_start: bool,
        emit: Callable[[dict[str, Any], bytes], None],
        note: Callable[[str], None],
        interval: float = 0.2,
        stuck_after: float = 30.0,
    ) -> None:
        self.path: Path = m.audit.path
        super().__init__(
            m,
            where=f"audit log {self.path}",
            from_start=from_start,
            emit=emit,
            note=note,
            interval=interval,
            stuck_after=stuck_after,
        )
        self.f: Any = None
        self.ident: tuple[int, int] | None = None
        self.offset = 0
        #: The last line checked, with its newline (an in-place rewrite check).
        self.last_raw = b""
        self.size_seen = -1
        #: Lines checked but not yet confirmed by the anchor (or a checkpoint).
        self.pending: list[tuple[int, dict[str, Any], bytes]] = []
        self.confirmed = 0
        self.stuck: tuple[tuple[int, int], float] | None = None
        self.gone = False

    # -- start ----------------------------------------------------------------

    def _open(self) -> bool:
        try:
            f = open(self.path, "rb", buffering=0)  # noqa: SIM115 -- kept open while followed
        except FileNotFoundError:
            return False
        except OSError as e:
            raise AuditError(f"{self.where}: cannot read: {e.strerror}") from None
        if self.f is not None:
            self.f.close()
        st = os.fstat(f.fileno())
        self.f, self.ident = f, (st.st_dev, st.st_ino)
        return True

    def _size(self) -> int:
        return os.fstat(self.f.fileno()).st_size if self.f is not None else 0

    def start(self) -> None:
        m = self.m
        self._open()
        with m.store.exclusive():  # not between a pass's commit and its append
            anchor = m.store.load()[0].audit
            size = self._size()
            last_raw = self._last_line(size)
        if self.from_start:
            self._verify_existing(anchor, size)
            self.note(
                f"{self.where}: {anchor.seq} existing line(s) verified, anchored in state"
                f"{self._signed_note()}; following"
            )
            return
        last = None
        if last_raw:
            last = _loads(last_raw)
            if not isinstance(last, dict) or type(last.get("seq")) is not int:
                raise AuditError(
                    f"{self.where}: last line is not an audit event; run 'keymgr audit verify'"
                )
        m.audit.check_head(anchor, last)
        key = self._state_key(anchor)
        self.check = LineCheck(self.path, anchor.seq, anchor.hash if anchor.seq else GENESIS, key)
        self.offset, self.last_raw, self.size_seen = size, last_raw, size
        self.confirmed = anchor.seq
        signed = f", signed by audit key {key.kid}" if key is not None else ""
        self.note(
            f"{self.where}: following from line {anchor.seq} (the head anchored in state"
            f"{signed})"
        )

    def _signed_note(self) -> str:
        n = self.check.signed_through
        return f", signed through line {n}" if n else ""

    def _at(self, n: int) -> str:
        return f"{self.where}: line {n}"

    def _last_line(self, size: int) -> bytes:
        """The last line of the first ``size`` bytes, with its newline (b"" if none)."""
        if size == 0 or self.f is None:
            return b""
        end = _complete_end(self.f, size)
        if end != size:
            raise AuditError(
                f"{self.where}: last line is incomplete (torn write); run 'keymgr audit verify'"
            )
        for _, line in _backward(self.f, end):
            return line + b"\n"
        return b""

    def _verify_existing(self, anchor: AuditAnchor, size: int) -> None:
        """``--from-start``: check the first ``size`` bytes as ``audit verify``
        does, then print them, each line's bytes compared with what was
        checked (a digest per line: 16 MB for a million lines)."""
        if self.f is None:
            if anchor.seq:
                raise AuditError(
                    f"{self.where}: missing, but the state anchors seq {anchor.seq}; "
                    "run 'keymgr audit verify'"
                )
            return
        digests = bytearray()
        for line in self._lines(0, size):
            self.check.line(line)
            digests += hashlib.blake2b(line, digest_size=16).digest()
            if self.check.seq > anchor.seq:
                raise AuditError(
                    f"{self.where}: line {self.check.seq}: beyond the head anchored in state "
                    f"(seq {anchor.seq}): not written by keymgr"
                )
        s = self.check.seq
        if s < anchor.seq:
            raise AuditError(
                f"{self.where}: line {s + 1} missing: the log ends at seq {s} but the state "
                f"anchors seq {anchor.seq}; run 'keymgr audit verify'"
            )
        if s and self.check.prev != anchor.hash:
            raise AuditError(f"{self.where}: line {s}: differs from the head anchored in state")
        self._require_signed(anchor, s)
        for n, line in enumerate(self._lines(0, size)):
            if hashlib.blake2b(line, digest_size=16).digest() != digests[16 * n : 16 * n + 16]:
                raise AuditError(
                    f"{self.where}: line {n + 1}: changed while it was being printed, after "
                    "it was verified"
                )
            self.emit(_loads(line), line[:-1])
            self.last_raw = line
        self.offset, self.size_seen = size, size
        self.confirmed = s

    def _lines(self, start: int, end: int) -> Iterator[bytes]:
        for _, line in _forward(self.f, start, end):
            yield line + b"\n"

    # -- follow ---------------------------------------------------------------

    def poll(self) -> None:
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self.f is not None and (st is None or (st.st_dev, st.st_ino) != self.ident):
            self._read(self._size())  # what the old file still holds
            self._settle()
            if st is None:
                if not self.gone:
                    self.note(f"{self.where}: gone (renamed or removed); waiting for it")
                    self.gone = True
                return
            self._replaced()
        elif self.f is None and st is not None:
            self._replaced()
        if self.f is None:
            return
        self.gone = False
        size = self._size()
        if size < self.offset:
            raise AuditError(
                f"{self.where}: truncated to {size} bytes while followed: line "
                f"{self.check.seq} (verified) ended at byte {self.offset}; an append-only "
                "audit log was cut"
            )
        if size != self.size_seen:
            self._same_last_line()
            self.size_seen = size
        self._read(size)
        self._settle()

    def _same_last_line(self) -> None:
        if not self.last_raw:
            return
        n = len(self.last_raw)
        if _read_at(self.f, self.offset - n, n) != self.last_raw:
            raise AuditError(
                f"{self.where}: line {self.check.seq}: changed after it was verified "
                "(the log was rewritten in place)"
            )

    def _read(self, size: int) -> None:
        """Check every whole line between the offset and ``size``."""
        while self.offset < size:
            chunk = _read_at(self.f, self.offset, min(_CHUNK, size - self.offset))
            end = chunk.rfind(b"\n")
            if end < 0:
                if len(chunk) >= _CHUNK:
                    raise AuditError(
                        f"{self.where}: line {self.check.seq + 1}: longer than "
                        f"{_CHUNK} bytes: not an audit event"
                    )
                return  # a line still being written
            for line in chunk[:end].split(b"\n"):
                try:
                    ev = self.check.line(line + b"\n")
                except AuditError:
                    self._print_before_failing()
                    raise
                self.pending.append((self.check.seq, ev, line))
                self.offset += len(line) + 1
                self.last_raw = line + b"\n"
            if len(self.pending) >= 1000:
                self._settle()

    def _print_before_failing(self) -> None:
        """The lines before a bad one that the state confirms are still printed."""
        with contextlib.suppress(AuditError):
            self._settle()

    def _replaced(self) -> None:
        """A file (again) at the path: it must hold the lines verified so far,
        chained as they were; it is followed from the end of the last one."""
        s, head = self.check.seq, self.check.prev
        if not self._open():
            return
        prev, n, offset, last = GENESIS, 0, 0, b""
        if s:
            for off, line in _forward(self.f, 0, self._size()):
                ev = _loads(line)
                if (
                    not isinstance(ev, dict)
                    or ev.get("seq") != n + 1
                    or ev.get("prev") != prev
                    or chain_hash(prev, ev) != ev.get("hash")
                ):
                    break
                n, prev = n + 1, str(ev["hash"])
                if n == s:
                    offset, last = off + len(line) + 1, line + b"\n"
                    break
            if n < s:
                raise AuditError(
                    f"{self.where}: replaced by a file that ends, or stops chaining, at line "
                    f"{n + 1}, before line {s} already verified: history was cut or rewritten"
                )
            if prev != head:
                raise AuditError(
                    f"{self.where}: replaced by a file whose line {s} differs from the one "
                    "verified: history was rewritten"
                )
        self.offset, self.last_raw, self.size_seen = offset, last, -1
        if s:
            self.note(f"{self.where}: a file is back at the path, holding lines 1-{s}; following")
        else:
            self.note(f"{self.where}: created; following")

    def _settle(self) -> None:
        """Confirm pending lines against the state's anchor; print what is proven."""
        if not self.pending:
            self.stuck = None
            return
        a = self.m.store.load()[0].audit
        s, head = self.check.seq, self.check.prev
        if a.seq < s:
            bad = max(a.seq + 1, self.pending[0][0])
            raise AuditError(
                f"{self.where}: line {bad}: beyond the head anchored in state (seq {a.seq}): "
                "not written by keymgr"
            )
        if a.seq == s:
            if a.hash != head:
                raise AuditError(f"{self.where}: line {s}: differs from the head anchored in state")
            self.confirmed = s
            self._require_signed(a, s)
        else:
            outbox = {ev.get("seq"): ev for ev in a.outbox if isinstance(ev, dict)}
            if s in outbox:
                if outbox[s].get("hash") != head:
                    raise AuditError(
                        f"{self.where}: line {s}: differs from the event the state committed"
                    )
                self.confirmed = s
            elif s + 1 in outbox:
                if outbox[s + 1].get("prev") != head:
                    raise AuditError(
                        f"{self.where}: line {s}: the events the state committed after it do "
                        "not chain to it"
                    )
                self.confirmed = s
        limit = self.confirmed
        if self._signing(a):
            limit = min(limit, self.check.signed_through)
        keep = []
        for n, ev, raw in self.pending:
            if n <= limit:
                self.emit(ev, raw)
            else:
                keep.append((n, ev, raw))
        self.pending = keep
        if not keep:
            self.stuck = None
            return
        state = (s, a.seq)
        now = time.monotonic()
        if self.stuck is None or self.stuck[0] != state:
            self.stuck = (state, now)
        elif now - self.stuck[1] > self.stuck_after:
            raise AuditError(
                f"{self.where}: line {keep[0][0]}: not anchored in state: the state anchors "
                f"seq {a.seq}, and neither it nor its outbox continues line {s}; "
                "run 'keymgr audit verify'"
            )


def exit_on_sigterm() -> None:
    """SIGTERM ends ``follow`` like Ctrl-C, with exit 0 (a service stopping it)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
