"""Durations ("30d", "1h30m") and RFC 3339 timestamps.

All times inside keymgr are timezone-aware UTC datetimes truncated to whole
seconds, so that state documents, audit events and ``--at`` round-trip exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

#: Ten years: longer periods are typos, and would overflow datetime arithmetic.
MAX_DURATION_SECONDS = 3650 * 86400
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([wdhms])")


_DURATIONS: dict[str, timedelta] = {}


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``15m``, ``1h30m``, ``30d``, ``2w``; ValueError otherwise.

    Valid texts are remembered: a config of 10,000 rings repeats the same few
    durations 40,000 times.

    A bare number is refused on purpose: ``"300"`` is ambiguous between seconds
    and minutes for the operator reading the config.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string like '30d', got {text!r}")
    known = _DURATIONS.get(text)
    if known is not None:
        return known
    td = _parse_duration(text)
    if len(_DURATIONS) < 1024:
        _DURATIONS[text] = td
    return td


def _parse_duration(text: str) -> timedelta:
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0
    seen: set[str] = set()
    for m in _PART.finditer(s):
        if m.start() != pos or m.group(2) in seen:
            raise ValueError(f"bad duration {text!r} (use e.g. 90s, 15m, 1h30m, 30d)")
        seen.add(m.group(2))
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"bad duration {text!r} (use e.g. 90s, 15m, 1h30m, 30d)")
    if total > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {text!r} is longer than 3650d")
    return timedelta(seconds=total)


def format_duration(td: timedelta) -> str:
    """Compact human form, the inverse of :func:`parse_duration` (``-`` if negative)."""
    secs = int(td.total_seconds())
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    if secs == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return sign + "".join(parts)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset; returns UTC.

    A naive timestamp is refused: guessing the zone is how drills go wrong.
    """
    if (
        isinstance(text, str)
        and len(text) == 20
        and text[19] == "Z"
        and text[10] == "T"
        and text[13] == ":"
        and text[16] == ":"
    ):
        # What format_time writes (every time in a state document): same
        # result as below at a third of the cost, which matters when a state
        # of 10,000 rings is loaded. Anything else takes the general path.
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"bad time {text!r} (RFC 3339, e.g. 2026-01-31T12:00:00Z)") from None
    if dt.tzinfo is None or "T" not in s.upper():
        raise ValueError(f"bad time {text!r} (RFC 3339 with a zone, e.g. 2026-01-31T12:00:00Z)")
    return dt.astimezone(UTC).replace(microsecond=0)


#: Text of recently formatted times. A state's times are the ``now`` of the
#: passes that recorded them (keymgr.model.stored_time), few distinct values
#: among millions of fields: ``status --json`` of 100,000 rings formats 2.3
#: million of them. Bounded: once full it starts over.
_FORMATTED: dict[datetime, str] = {}
_FORMATTED_MAX = 1 << 16
#: The memo's text for a time already formatted, else None (also for None):
#: ``formatted_time(t) or format_time(t)`` skips a call in the common case.
formatted_time: Callable[[datetime | None], str | None] = _FORMATTED.get  # type: ignore[assignment]


def format_time(dt: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z`` suffix, or None."""
    if dt is None:
        return None
    if dt.tzinfo is UTC and not dt.microsecond and dt.year >= 1000:
        text = _FORMATTED.get(dt)
        if text is None:
            text = dt.isoformat()[:19] + "Z"  # same text as below, several times cheaper
            if len(_FORMATTED) >= _FORMATTED_MAX:
                _FORMATTED.clear()
            _FORMATTED[dt] = text
        return text
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> datetime:
    """The only clock read in keymgr's shell (the planner never reads a clock)."""
    return datetime.now(UTC).replace(microsecond=0)
