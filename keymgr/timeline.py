"""Timelines as pictures: each ring's keys as bars over time.

A pure function of (state, policies, plan, now), like the planner: no I/O and
no clock, so the same inputs always give the same bytes (tests compare the
structure, docs commit an example). Two renderings of one :class:`Timeline`:

- :func:`svg`: a self-contained SVG document (no external assets, no script,
  no CSS: presentation attributes only, so a page with a strict
  Content-Security-Policy can inline it), with ``<title>``/``<desc>`` and text
  labels, so that colour is never the only carrier of meaning;
- :func:`text`: the same in a terminal, with Unicode block characters.

What is drawn, per ring: one bar per key (destroyed keys left out), split into
the states it went through, coloured by state; the part after "now" is the
projection of the timing rules (docs/concepts.md#timing-rules) on the
optimistic path (every publish confirmed when due), drawn lighter. The ring's
publish-ahead window (the successor published, waiting A before it may sign)
and grace windows (a retired key kept in the JWKS for G) are marked, and so is
the ring's next transition from the plan. The picture is bounded: at most
``max_rings`` rings and ``max_keys`` keys per ring, with a note saying how
many were left out.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from xml.sax.saxutils import escape, quoteattr

from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    Key,
    Ring,
    State,
)
from keymgr.planner import Plan, Policy, successor_times
from keymgr.timefmt import format_duration, format_time

#: Rings drawn at most; the others are counted in a note.
MAX_RINGS = 20
#: Keys drawn per ring at most (newest first); a healthy ring has 2 to 4.
MAX_KEYS = 8

#: Fill colour of each state (Okabe-Ito, readable by colour-blind people;
#: every bar also carries its state as text).
COLOURS = {
    PENDING: "#cc79a7",
    PUBLISHED: "#56b4e9",
    ACTIVE: "#009e73",
    RETIRED: "#e69f00",
    EXPIRED: "#8c8c8c",
    REVOKED: "#d55e00",
}
#: The terminal's glyph for each state.
GLYPHS = {
    PENDING: "░",
    PUBLISHED: "▒",
    ACTIVE: "█",
    RETIRED: "▓",
    EXPIRED: "─",
    REVOKED: "!",
}
NOW_COLOUR = "#d00000"
WINDOW_KINDS = ("publish-ahead", "grace")
WINDOW_COLOURS = {"publish-ahead": "#56b4e9", "grace": "#e69f00"}
_LEGEND = (PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED, REVOKED)

#: (state entered, the key's time field that records it), in lifecycle order.
_STAGES = (
    (PENDING, "created_at"),
    (PUBLISHED, "published_at"),
    (ACTIVE, "activated_at"),
    (RETIRED, "retired_at"),
    (EXPIRED, "expired_at"),
)


# --- the model ----------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A key in one state from ``start`` to ``end``; ``projected``: after now."""

    state: str
    start: datetime
    end: datetime
    projected: bool


@dataclass(frozen=True)
class Window:
    """``publish-ahead`` (a successor published, waiting A before it signs) or
    ``grace`` (a retired key kept in the JWKS for G)."""

    kind: str
    kid: str | None
    start: datetime
    end: datetime
    length: timedelta


@dataclass(frozen=True)
class Next:
    """A next transition of a ring: due now (``due``), or at ``at`` (from the plan)."""

    action: str
    kid: str | None
    at: datetime
    due: bool


@dataclass(frozen=True)
class KeyBar:
    kid: str
    alg: str
    state: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class RingRow:
    name: str
    keys: tuple[KeyBar, ...]
    windows: tuple[Window, ...]
    #: What is due now (its first action), then the next transition not due yet.
    nexts: tuple[Next, ...]
    #: Keys not drawn: over ``max_keys``, plus the destroyed ones.
    hidden_keys: int
    #: The ring's policy (None: a ring in state that the config no longer has).
    policy: Policy | None


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    now: datetime
    rings: tuple[RingRow, ...]
    #: Rings in state or config that are not drawn (over ``max_rings``).
    hidden_rings: int

    @property
    def span(self) -> timedelta:
        return self.end - self.start


# --- building it ----------------------------------------------------------------


def build(
    state: State,
    policies: Mapping[str, Policy],
    plan: Plan | None,
    now: datetime,
    *,
    rings: Collection[str] | None = None,
    max_rings: int = MAX_RINGS,
    max_keys: int = MAX_KEYS,
) -> Timeline:
    """The timeline of ``rings`` (default: every ring of the config and the
    state, by name), at most ``max_rings`` of them."""
    names = sorted(set(policies) | set(state.rings))
    if rings is not None:
        wanted = set(rings)
        names = [n for n in names if n in wanted]
    shown, hidden = names[: max(0, max_rings)], max(0, len(names) - max(0, max_rings))
    rows = [
        _ring_row(state.ring(n), policies.get(n), plan, now, max_keys) for n in shown
    ]
    start, end = _axis(rows, now)
    return Timeline(
        start=start,
        end=end,
        now=now,
        rings=tuple(_clip_row(r, start, end) for r in rows),
        hidden_rings=hidden,
    )


def _ring_row(
    ring: Ring, pol: Policy | None, plan: Plan | None, now: datetime, max_keys: int
) -> RingRow:
    nxt = next_transitions(ring.name, plan)
    live = [k for k in ring.keys if k.state != DESTROYED]
    live.sort(key=lambda k: (k.created_at, k.kid), reverse=True)
    drawn = live[: max(0, max_keys)]
    drawn.reverse()  # oldest first, top to bottom
    succ = _successor(ring)
    promote_at = _promotion(ring, pol, nxt, succ, now)
    bars = tuple(
        KeyBar(k.kid, k.alg, k.state, tuple(_segments(k, pol, succ, promote_at, now)))
        for k in drawn
    )
    return RingRow(
        name=ring.name,
        keys=bars,
        windows=tuple(_windows(ring, pol, succ, promote_at)),
        nexts=nxt,
        hidden_keys=len(ring.keys) - len(drawn),
        policy=pol,
    )


def next_transitions(name: str, plan: Plan | None) -> tuple[Next, ...]:
    if plan is None:
        return ()
    out: list[Next] = []
    for a in plan.due:
        if getattr(a, "ring", None) == name:
            # A due action has no time of its own: it happens at the next pass.
            out.append(Next(a.name, getattr(a, "kid", None), _EPOCH, True))
            break
    u = plan.upcoming.get(name)
    if u is not None:
        out.append(Next(u.action, u.kid, u.at, False))
    return tuple(out)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _successor(ring: Ring) -> Key | None:
    """The newest pending or published key: the one the next promotion promotes."""
    succ = [k for k in ring.keys if k.state in (PENDING, PUBLISHED)]
    return max(succ, key=lambda k: (k.created_at, k.kid)) if succ else None


def _promotion(
    ring: Ring, pol: Policy | None, nxt: tuple[Next, ...], succ: Key | None, now: datetime
) -> datetime | None:
    """When the ring's successor is (projected to be) promoted: the planned
    promotion, else the earliest the rules allow (never before now)."""
    for n in nxt:
        if n.action == "promote" and not n.due:
            return n.at
    active = ring.active
    if pol is None or active is None or active.activated_at is None:
        return None
    _, at = successor_times(ring, pol, active)
    if succ is not None and succ.published_at is not None and not ring.emergency:
        at = max(at, succ.published_at + pol.publish_ahead)
    return max(at, now)


def _segments(
    k: Key, pol: Policy | None, succ: Key | None, promote_at: datetime | None, now: datetime
) -> list[Segment]:
    """The key's past states from its times, then its projected future."""
    points: list[tuple[str, datetime]] = []
    for st, attr in _STAGES:
        t = getattr(k, attr)
        if t is not None:
            points.append((st, t))
    if k.revoked_at is not None:
        points = [p for p in points if p[1] < k.revoked_at]
        points.append((REVOKED, k.revoked_at))
    points.sort(key=lambda p: p[1])
    out: list[Segment] = []
    for (st, t0), (_, t1) in itertools.pairwise(points):
        _add(out, st, t0, t1, now)
    if not points:
        return out
    state, since = points[-1]
    # The future, on the optimistic path: each remaining state for its length.
    # A transition already overdue (waiting on a publisher) is drawn at now.
    for st, until in _future(k, state, pol, succ, promote_at):
        if until is None:
            break
        end = max(until, now, since)
        _add(out, state, since, end, now)
        state, since = st, end
    _add(out, state, since, max(now, since), now)
    return out


def _future(
    k: Key, state: str, pol: Policy | None, succ: Key | None, promote_at: datetime | None
) -> Iterable[tuple[str, datetime | None]]:
    """(next state, when the current one ends) from ``state`` on; ``None``:
    not known (the current state lasts until now, and nothing is projected)."""
    if pol is None:
        return
    at: datetime | None = None
    if state == PUBLISHED and succ is not None and succ.kid == k.kid and promote_at is not None:
        yield ACTIVE, promote_at
        at = promote_at + pol.rotation_period
        yield RETIRED, at
    elif state == ACTIVE and promote_at is not None:
        at = promote_at
        yield RETIRED, at
    elif state == RETIRED and k.retired_at is not None:
        at = k.retired_at
    if at is not None:
        at += pol.retire_grace
        yield EXPIRED, at
    elif state == EXPIRED and k.expired_at is not None:
        at = k.expired_at
    if at is not None:
        yield DESTROYED, at + pol.destroy_after


def _add(out: list[Segment], state: str, start: datetime, end: datetime, now: datetime) -> None:
    """Append [start, end) in ``state``, split at now into past and projected."""
    if state == DESTROYED or end <= start:
        return
    if start < now < end:
        out.append(Segment(state, start, now, False))
        out.append(Segment(state, now, end, True))
    else:
        out.append(Segment(state, start, end, start >= now))


def _windows(
    ring: Ring, pol: Policy | None, succ: Key | None, promote_at: datetime | None
) -> list[Window]:
    """The ring's publish-ahead window (the successor's, or the next one's)
    and its grace windows (each retired key's, and the signer's to come)."""
    if pol is None:
        return []
    out: list[Window] = []
    active = ring.active
    if promote_at is not None:
        if succ is not None:
            start = succ.published_at or succ.created_at
            out.append(
                Window("publish-ahead", succ.kid, start, max(promote_at, start), pol.publish_ahead)
            )
        elif active is not None and active.activated_at is not None:
            gen_at, base = successor_times(ring, pol, active)
            out.append(Window("publish-ahead", None, gen_at, max(base, gen_at), pol.publish_ahead))
        if active is not None:
            # The signer's own grace, once its successor is promoted.
            out.append(
                Window(
                    "grace", active.kid, promote_at, promote_at + pol.retire_grace,
                    pol.retire_grace,
                )
            )
    for k in ring.keys:
        if k.state == RETIRED and k.retired_at is not None:
            out.append(
                Window(
                    "grace", k.kid, k.retired_at, k.retired_at + pol.retire_grace,
                    pol.retire_grace,
                )
            )
    out.sort(key=lambda w: (w.start, w.kind, w.kid or ""))
    return out


def _axis(rows: list[RingRow], now: datetime) -> tuple[datetime, datetime]:
    """The time axis: from when the oldest drawn key entered its present state
    (or the earliest window) to the latest next transition or window end;
    always around now, never more than two rotation periods either side."""
    lo = hi = now
    periods = [r.policy.rotation_period for r in rows if r.policy is not None]
    for r in rows:
        for kb in r.keys:
            current = [s for s in kb.segments if not s.projected]
            if current:
                lo = min(lo, current[-1].start)
        for w in r.windows:
            lo, hi = min(lo, w.start), max(hi, w.end)
        for n in r.nexts:
            if not n.due:
                hi = max(hi, n.at)
    reach = max(periods) * 2 if periods else max(hi - lo, timedelta(hours=1))
    lo, hi = max(lo, now - reach), min(hi, now + reach)
    span = hi - lo
    if span < timedelta(minutes=1):
        span = timedelta(minutes=1)
    pad = span / 20
    lo, hi = lo - pad, hi + pad
    # Whole seconds: the same picture from the same inputs, to the byte.
    return _floor_s(lo), _ceil_s(hi)


def _floor_s(t: datetime) -> datetime:
    return t.replace(microsecond=0)


def _ceil_s(t: datetime) -> datetime:
    return t if not t.microsecond else t.replace(microsecond=0) + timedelta(seconds=1)


def _clip_row(r: RingRow, lo: datetime, hi: datetime) -> RingRow:
    keys = tuple(
        KeyBar(
            kb.kid,
            kb.alg,
            kb.state,
            tuple(
                Segment(s.state, max(s.start, lo), min(s.end, hi), s.projected)
                for s in kb.segments
                if s.end > lo and s.start < hi
            ),
        )
        for kb in r.keys
    )
    windows = tuple(
        Window(w.kind, w.kid, max(w.start, lo), min(w.end, hi), w.length)
        for w in r.windows
        if w.end >= lo and w.start <= hi
    )
    return RingRow(r.name, keys, windows, r.nexts, r.hidden_keys, r.policy)


# --- words shared by both renderings -----------------------------------------


def short_kid(kid: str | None) -> str:
    return "" if not kid else kid[:8] + "…"


def _stamp(t: datetime) -> str:
    return format_time(t) or "-"


def next_text(nxts: Iterable[Next], now: datetime) -> str:
    """``promote 3Yx2bV0m… in 2h (2031-03-01T08:00:00Z)``, ``expire … due now``;
    several joined with "; then "."""
    return "; then ".join(_one_next(n, now) for n in nxts) or "nothing scheduled"


def _one_next(nxt: Next, now: datetime) -> str:
    kid = f" {short_kid(nxt.kid)}" if nxt.kid else ""
    if nxt.due or nxt.at <= now:
        return f"{nxt.action}{kid} due now"
    return f"{nxt.action}{kid} in {approx(nxt.at - now)} ({_stamp(nxt.at)})"


def _notes(tl: Timeline) -> list[str]:
    out = []
    if tl.hidden_rings:
        out.append(
            f"{tl.hidden_rings} more ring(s) not shown (the first {len(tl.rings)} by name); "
            "'keymgr status --json' lists every ring"
        )
    hidden = sum(r.hidden_keys for r in tl.rings)
    if hidden:
        out.append(f"{hidden} key(s) not drawn (destroyed, or older than the newest {MAX_KEYS})")
    return out


def summary(tl: Timeline) -> str:
    """A sentence per ring: the picture's text alternative."""
    parts = [
        f"Key timeline from {_stamp(tl.start)} to {_stamp(tl.end)}; now is {_stamp(tl.now)}."
    ]
    for r in tl.rings:
        keys = ", ".join(f"{short_kid(k.kid)} {k.state}" for k in r.keys) or "no keys"
        parts.append(f"Ring {r.name}: {keys}; next: {next_text(r.nexts, tl.now)}.")
    parts.extend(n + "." for n in _notes(tl))
    return " ".join(parts)


# --- SVG ------------------------------------------------------------------------

WIDTH = 960
_LABEL_W = 190
_RIGHT = 24
_TOP = 92
_HEADER_H = 30
_ROW_H = 18
_BAR_H = 12
_WIN_H = 14
_GAP = 10
_FONT = 'font-family="sans-serif"'


def svg(
    state: State,
    policies: Mapping[str, Policy],
    plan: Plan | None,
    now: datetime,
    *,
    rings: Collection[str] | None = None,
    max_rings: int = MAX_RINGS,
    max_keys: int = MAX_KEYS,
    id_prefix: str = "keymgr-timeline",
) -> str:
    """The timeline as a self-contained SVG document (text)."""
    tl = build(state, policies, plan, now, rings=rings, max_rings=max_rings, max_keys=max_keys)
    return render_svg(tl, id_prefix=id_prefix)


def _f(x: float) -> str:
    """Coordinates to one decimal: deterministic text."""
    return f"{x:.1f}"


def _a(value: str) -> str:
    return quoteattr(value)


def _ticks(lo: datetime, hi: datetime, n: int = 8) -> tuple[list[datetime], timedelta]:
    span = (hi - lo).total_seconds()
    steps = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
        43200, 86400, 2 * 86400, 3 * 86400, 5 * 86400, 7 * 86400, 14 * 86400, 30 * 86400,
        90 * 86400, 180 * 86400, 365 * 86400,
    ]
    step = next((s for s in steps if span / s <= n), steps[-1])
    first = math.ceil(lo.timestamp() / step) * step
    out = []
    t = first
    while t <= hi.timestamp():
        out.append(datetime.fromtimestamp(t, UTC))
        t += step
    return out, timedelta(seconds=step)


def tick_label(t: datetime, step: timedelta, span: timedelta) -> str:
    if step >= timedelta(days=1):
        return t.strftime("%Y-%m-%d")
    if step >= timedelta(minutes=1):
        return t.strftime("%m-%d %H:%M") if span > timedelta(days=1) else t.strftime("%H:%M")
    return t.strftime("%H:%M:%S")


def render_svg(tl: Timeline, *, id_prefix: str = "keymgr-timeline") -> str:
    x0, x1 = float(_LABEL_W), float(WIDTH - _RIGHT)
    span = tl.span.total_seconds() or 1.0

    def x(t: datetime) -> float:
        return x0 + (x1 - x0) * ((t - tl.start).total_seconds() / span)

    body: list[str] = []
    y = float(_TOP)
    for r in tl.rings:
        body.extend(_svg_ring(r, tl, y, x))
        y += _HEADER_H + _ROW_H * max(1, len(r.keys)) + _WIN_H + _GAP
    notes = _notes(tl)
    if not tl.rings:
        notes.insert(0, "no key rings")
    for n in notes:
        y += 14
        body.append(f'<text class="note" x="8" y="{_f(y)}" font-size="11" {_FONT}>'
                    f"{escape(n)}</text>")
    height = y + 16
    title_id, desc_id = f"{id_prefix}-title", f"{id_prefix}-desc"
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{_f(height)}" '
        f'viewBox="0 0 {WIDTH} {_f(height)}" role="img" '
        f'aria-labelledby="{title_id} {desc_id}" class="keymgr-timeline">',
        f'<title id="{title_id}">keymgr key timeline at {escape(_stamp(tl.now))}</title>',
        f'<desc id="{desc_id}">{escape(summary(tl))}</desc>',
        f'<rect x="0" y="0" width="{WIDTH}" height="{_f(height)}" fill="#ffffff"/>',
        f'<text x="8" y="20" font-size="15" font-weight="bold" {_FONT}>Key timeline</text>',
        f'<text x="120" y="20" font-size="11" {_FONT} fill="#333333">'
        f"{escape(_stamp(tl.start))} to {escape(_stamp(tl.end))} (UTC); lighter: projected "
        "(every publish confirmed when due)</text>",
    ]
    head.extend(_svg_legend())
    ticks, step = _ticks(tl.start, tl.end)
    axis = ['<g class="axis">']
    bottom = y - 4
    for t in ticks:
        tx = x(t)
        if tx > WIDTH - 32:  # its label would leave the picture
            continue
        axis.append(
            f'<line x1="{_f(tx)}" y1="{_TOP - 16}" x2="{_f(tx)}" y2="{_f(bottom)}" '
            'stroke="#e0e0e0" stroke-width="1"/>'
        )
        axis.append(
            f'<text class="tick" x="{_f(tx)}" y="{_TOP - 20}" font-size="10" '
            f'text-anchor="middle" {_FONT} fill="#555555">'
            f"{escape(tick_label(t, step, tl.span))}</text>"
        )
    axis.append("</g>")
    nx = x(tl.now)
    now = [
        f'<g class="now" data-at="{_stamp(tl.now)}">',
        f'<line x1="{_f(nx)}" y1="{_TOP - 14}" x2="{_f(nx)}" y2="{_f(bottom)}" '
        f'stroke="{NOW_COLOUR}" stroke-width="1.5"/>',
        f'<text x="{_f(nx - 3 if nx > x1 - 160 else nx + 3)}" y="{_TOP - 6}" font-size="10" '
        f'font-weight="bold" text-anchor="{"end" if nx > x1 - 160 else "start"}" {_FONT} '
        f'fill="{NOW_COLOUR}">now {escape(_stamp(tl.now))}</text>',
        "</g>",
    ]
    return "\n".join([*head, *axis, *body, *now, "</svg>"]) + "\n"


def _svg_legend() -> list[str]:
    out = ['<g class="legend">']
    lx = 8.0
    for st in _LEGEND:
        out.append(
            f'<rect class="swatch" data-state="{st}" x="{_f(lx)}" y="32" width="12" height="12" '
            f'fill="{COLOURS[st]}"/>'
        )
        out.append(f'<text x="{_f(lx + 16)}" y="42" font-size="11" {_FONT}>{st}</text>')
        lx += 28 + 7 * len(st)
    for kind in WINDOW_KINDS:
        out.append(
            f'<rect class="swatch" data-window="{kind}" x="{_f(lx)}" y="32" width="12" '
            f'height="12" fill="{WINDOW_COLOURS[kind]}" fill-opacity="0.25" '
            f'stroke="{WINDOW_COLOURS[kind]}" stroke-dasharray="3 2"/>'
        )
        label = f"{kind} window"
        out.append(f'<text x="{_f(lx + 16)}" y="42" font-size="11" {_FONT}>{label}</text>')
        lx += 28 + 6.5 * len(label)
    out.append(
        f'<polygon points="{_f(lx + 6)},32 {_f(lx + 12)},38 {_f(lx + 6)},44 {_f(lx)},38" '
        'fill="#222222"/>'
    )
    out.append(f'<text x="{_f(lx + 16)}" y="42" font-size="11" {_FONT}>next transition</text>')
    out.append("</g>")
    return out


def _svg_ring(r: RingRow, tl: Timeline, y: float, x: Callable[[datetime], float]) -> list[str]:
    out = [f'<g class="ring" data-ring={_a(r.name)}>']
    rules = ""
    if r.policy is not None:
        p = r.policy
        rules = (
            f" P {format_duration(p.rotation_period)}, A {format_duration(p.publish_ahead)},"
            f" G {format_duration(p.retire_grace)}, D {format_duration(p.destroy_after)}."
        )
    out.append(
        f'<text x="8" y="{_f(y + 13)}" font-size="11" {_FONT} fill="#222222">'
        f'<tspan class="ring-name" font-size="12" font-weight="bold">ring {escape(r.name)}'
        f"</tspan>{escape(rules)} "
        f'<tspan class="next-label">next: {escape(next_text(r.nexts, tl.now))}</tspan></text>'
    )
    rows_top = y + _HEADER_H
    rows_h = _ROW_H * max(1, len(r.keys))
    # Windows: a band behind the key bars, and a labelled strip under them.
    win_y = rows_top + rows_h
    for w in r.windows:
        wx0, wx1 = x(w.start), x(w.end)
        colour = WINDOW_COLOURS[w.kind]
        kid_attr = f" data-kid={_a(w.kid)}" if w.kid else ""
        letter = "A" if w.kind == "publish-ahead" else "G"
        text = f"{letter} {format_duration(w.length)}"
        out.append(
            f'<g class="window window-{w.kind}" data-window="{w.kind}"{kid_attr} '
            f'data-start="{_stamp(w.start)}" data-end="{_stamp(w.end)}">'
        )
        out.append(
            f"<title>{escape(w.kind)} window {escape(text)}: {escape(_stamp(w.start))} to "
            f"{escape(_stamp(w.end))}{escape(' (key ' + short_kid(w.kid) + ')' if w.kid else '')}"
            "</title>"
        )
        out.append(
            f'<rect class="band" x="{_f(wx0)}" y="{_f(rows_top)}" width="{_f(max(wx1 - wx0, 1))}" '
            f'height="{_f(rows_h)}" fill="{colour}" fill-opacity="0.10"/>'
        )
        out.append(
            f'<rect class="strip" x="{_f(wx0)}" y="{_f(win_y + 2)}" '
            f'width="{_f(max(wx1 - wx0, 1))}" height="{_WIN_H - 4}" fill="{colour}" '
            f'fill-opacity="0.25" stroke="{colour}" stroke-dasharray="3 2"/>'
        )
        if wx1 - wx0 >= 5.5 * len(text) + 4:  # else the <title> says it
            out.append(
                f'<text x="{_f(wx0 + 2)}" y="{_f(win_y + _WIN_H - 3)}" font-size="9" {_FONT} '
                f'fill="#222222">{escape(text)}</text>'
            )
        out.append("</g>")
    out.append(
        f'<text x="18" y="{_f(win_y + _WIN_H - 3)}" font-size="10" {_FONT} fill="#555555">'
        "windows</text>"
    )
    if not r.keys:
        out.append(
            f'<text x="18" y="{_f(rows_top + 13)}" font-size="11" {_FONT} fill="#555555">'
            "(no keys yet)</text>"
        )
    for i, kb in enumerate(r.keys):
        ky = rows_top + i * _ROW_H
        out.append(
            f'<g class="key" data-kid={_a(kb.kid)} data-state="{kb.state}" '
            f'data-alg={_a(kb.alg)}>'
        )
        out.append(
            f'<text class="kid" x="18" y="{_f(ky + 12)}" font-size="11" {_FONT}>'
            f"{escape(short_kid(kb.kid))} {escape(kb.alg)} {kb.state}</text>"
        )
        for s in kb.segments:
            sx0, sx1 = x(s.start), x(s.end)
            bw = max(sx1 - sx0, 1.0)
            proj = "true" if s.projected else "false"
            out.append(
                f'<rect class="seg seg-{s.state}" data-state="{s.state}" data-projected="{proj}" '
                f'data-start="{_stamp(s.start)}" data-end="{_stamp(s.end)}" x="{_f(sx0)}" '
                f'y="{_f(ky + 3)}" width="{_f(bw)}" height="{_BAR_H}" fill="{COLOURS[s.state]}"'
                + (' fill-opacity="0.45"' if s.projected else "")
                + "><title>"
                + escape(
                    f"{kb.kid} {s.state} {_stamp(s.start)} to {_stamp(s.end)}"
                    + (" (projected)" if s.projected else "")
                )
                + "</title></rect>"
            )
            if bw >= 8 * len(s.state):
                out.append(
                    f'<text x="{_f(sx0 + 3)}" y="{_f(ky + 12)}" font-size="9" {_FONT} '
                    f'fill="#000000">{s.state}</text>'
                )
        out.append("</g>")
    for n in r.nexts:
        at = tl.now if n.due or n.at <= tl.now else n.at
        if tl.start <= at <= tl.end:
            mx = x(at)
            my = y + _HEADER_H - 7
            kid_attr = f" data-kid={_a(n.kid)}" if n.kid else ""
            out.append(
                f'<g class="next" data-action={_a(n.action)}{kid_attr} '
                f'data-at="{_stamp(at)}" data-due="{"true" if n.due else "false"}">'
            )
            out.append(f"<title>next: {escape(_one_next(n, tl.now))}</title>")
            out.append(
                f'<polygon points="{_f(mx)},{_f(my - 5)} {_f(mx + 5)},{_f(my)} {_f(mx)},'
                f'{_f(my + 5)} {_f(mx - 5)},{_f(my)}" fill="#222222"/>'
            )
            out.append(
                f'<line x1="{_f(mx)}" y1="{_f(my)}" x2="{_f(mx)}" y2="{_f(win_y + _WIN_H)}" '
                'stroke="#222222" stroke-width="1" stroke-dasharray="2 2"/>'
            )
            out.append("</g>")
    out.append("</g>")
    return out


# --- the terminal ------------------------------------------------------------------

_TERM_LABEL = 12


def text(
    state: State,
    policies: Mapping[str, Policy],
    plan: Plan | None,
    now: datetime,
    *,
    width: int = 80,
    rings: Collection[str] | None = None,
    max_rings: int = MAX_RINGS,
    max_keys: int = MAX_KEYS,
) -> str:
    """The timeline for a terminal ``width`` columns wide (at least 40)."""
    tl = build(state, policies, plan, now, rings=rings, max_rings=max_rings, max_keys=max_keys)
    return render_text(tl, width=width)


def approx(td: timedelta) -> str:
    """A duration to its two largest units: ``12h35m``, ``3d4h``, ``40s``."""
    secs = max(1, round(td.total_seconds()))
    for size, unit in ((86400, 3600), (3600, 60)):
        if secs >= size:
            secs = round(secs / unit) * unit
            break
    return format_duration(timedelta(seconds=secs))


def _safe(s: str) -> str:
    """No control characters from a name into the terminal."""
    return "".join(c if c.isprintable() else "?" for c in s)


def render_text(tl: Timeline, *, width: int = 80) -> str:
    width = max(40, width)
    cols = width - _TERM_LABEL - 3
    span = tl.span.total_seconds() or 1.0
    per_col = span / cols

    def col(t: datetime) -> int:
        return min(cols - 1, max(0, int((t - tl.start).total_seconds() / per_col)))

    def at(c: int) -> datetime:
        return tl.start + timedelta(seconds=(c + 0.5) * per_col)

    now_c = col(tl.now)
    half = timedelta(seconds=per_col / 2)

    def wrap(line: str) -> list[str]:
        return textwrap.wrap(line, width, subsequent_indent="    ", break_on_hyphens=False)

    out = [
        *wrap(
            f"key timeline at {_stamp(tl.now)} (UTC), 1 column = "
            f"{approx(timedelta(seconds=per_col))}"
        ),
        *wrap(f"from {_stamp(tl.start)} to {_stamp(tl.end)}"),
    ]
    legend = [f"{GLYPHS[s]} {s}" for s in _LEGEND]
    legend += ["│ now", "A publish-ahead", "G grace", "◆ next"]
    line = ""
    for item in legend:
        if line and len(line) + 2 + len(item) > width:
            out.append(line)
            line = ""
        line = f"{line}  {item}" if line else item
    out.append(line)
    pad = " " * (_TERM_LABEL + 3)
    out.append(pad + " " * now_c + "▼ now")
    for r in tl.rings:
        out.extend(wrap(_safe(f"ring {r.name}  next: {next_text(r.nexts, tl.now)}")))
        if not r.keys:
            out.append("  (no keys yet)")
        for kb in r.keys:
            cells = []
            for c in range(cols):
                # The state that fills most of the column (a later one on a tie).
                c0, c1 = at(c) - half, at(c) + half
                g, most = " ", timedelta(0)
                for s in kb.segments:
                    overlap = min(s.end, c1) - max(s.start, c0)
                    if overlap > timedelta(0) and overlap >= most:
                        g, most = GLYPHS[s.state], overlap
                cells.append(g)
            cells[now_c] = "│"
            label = kb.kid[:8] + " " + kb.state[:3]
            out.append(f"  {_safe(label):<{_TERM_LABEL}} " + "".join(cells).rstrip())
        wcells = [" "] * cols
        for kind, letter in (("grace", "G"), ("publish-ahead", "A")):
            for w in r.windows:
                if w.kind != kind:
                    continue
                for c in range(col(w.start), col(w.end) + 1):
                    wcells[c] = letter
        for n in r.nexts:
            nat = tl.now if n.due or n.at <= tl.now else n.at
            if tl.start <= nat <= tl.end:
                wcells[col(nat)] = "◆"
        if wcells[now_c] == " ":
            wcells[now_c] = "│"
        out.append(f"  {'windows':<{_TERM_LABEL}} " + "".join(wcells).rstrip())
    if not tl.rings:
        out.append("no key rings")
    for note in _notes(tl):
        out.extend(wrap(note))
    return "\n".join(out)
