"""Text rendering of ``status`` and ``plan`` for people."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from keymgr.jose import claims_json
from keymgr.timefmt import format_duration, parse_time, utcnow


def _when(at: str | None) -> str:
    if at is None:
        return "-"
    delta = parse_time(at) - utcnow()
    rel = "due now" if delta.total_seconds() <= 0 else f"in {format_duration(delta)}"
    return f"{at} ({rel})"


_STAGES = (
    ("created_at", "generated"),
    ("published_at", "published"),
    ("activated_at", "active"),
    ("retired_at", "retired"),
    ("expired_at", "expired"),
    ("destroyed_at", "destroyed"),
    ("revoked_at", "REVOKED"),
)


def _short(at: str) -> str:
    return at.replace("T", " ").rstrip("Z")


def timeline(key: dict[str, Any]) -> str:
    """One key's life as text: each stage it reached, oldest first."""
    steps = sorted((key[f], i, label) for i, (f, label) in enumerate(_STAGES) if key.get(f))
    return " -> ".join(f"{label} {_short(at)}" for at, _, label in steps)


def write_status_text(
    sections: Iterable[tuple[str, Iterable[tuple[str, Any]]]], write: Callable[[str], object]
) -> None:
    """``keymgr status`` as text, written ring by ring from the sections of
    ``KeyManager.status_parts`` (or of a status document), so that 100,000
    rings are streamed as ``status --json`` is, never held whole; every line
    ends with a newline (a status of nothing is one empty line). Each
    section is consumed before the next, as status_parts requires."""
    wrote = False
    for section, items in sections:
        draw = _SECTIONS.get(section)
        for name, value in items:
            if draw is not None:
                write("\n".join(draw(name, value)) + "\n")
                wrote = True
    if not wrote:
        write("\n")


def _ring_lines(ring: str, info: dict[str, Any]) -> list[str]:
    out = [f"ring {ring}"]
    if not info["keys"]:
        out.append("  (no keys yet)")
    else:
        out.append(f"  {'KID':<44} {'STATE':<10} {'ALG':<6} {'BACKEND':<10} SINCE")
        for k in info["keys"]:
            since = next((k[f] for f, _ in reversed(_STAGES) if k.get(f)), "-")
            out.append(
                f"  {k['kid']:<44} {k['state']:<10} {k['alg']:<6} {k['backend']:<10} {since}"
            )
        out.append("  timeline:")
        for k in info["keys"]:
            out.append(f"    {k['kid'][:10]}  {timeline(k)}")
    nxt = info["next"]
    if nxt:
        kid = f" {nxt['kid']}" if nxt.get("kid") else ""
        out.append(f"  next: {nxt['action']}{kid} at {_when(nxt['at'])}")
    else:
        out.append("  next: nothing scheduled")
    return out


def _edge_lines(pub: str, urls: dict[str, Any]) -> list[str]:
    out = [f"edges of publisher {pub}"]
    for url, e in urls.items():
        if e is None:
            what = "not probed yet (holds promotion)"
        elif e.get("error"):
            what = f"DOWN since {_when(e['at'])}: {e['error']} (holds promotion)"
        else:
            what = f"{len(e['kids'])} keys, unchanged since {_when(e['at'])}"
        out.append(f"  {url}  {what}")
    return out


#: The sections of a status that its text shows, and how; any other is skipped.
_SECTIONS: dict[str, Callable[[str, Any], list[str]]] = {
    "rings": _ring_lines,
    "edges": _edge_lines,
}


def plan_text(doc: dict[str, Any]) -> str:
    out = [f"plan at {doc['at']}"]
    if doc["due"]:
        out.append("due now:")
        for a in doc["due"]:
            extra = " ".join(f"{k}={v}" for k, v in a.items() if k != "action")
            out.append(f"  {a['action']} {extra}")
    else:
        out.append("due now: nothing")
    out.append("upcoming:")
    for ring, u in doc["upcoming"].items():
        if u is None:
            out.append(f"  {ring}: nothing scheduled")
        else:
            kid = f" {u['kid']}" if u.get("kid") else ""
            out.append(f"  {ring}: {u['action']}{kid} at {u['at']}")
    return "\n".join(out)


def _compact(value: Any) -> str:
    """Compact JSON of ``value`` (no whitespace), by orjson with json's rules
    (keymgr.jose.claims_json): ``status --json`` of 100,000 rings writes 170 MB
    through this, about seven times faster than the C encoder of the stdlib."""
    return claims_json(value).decode()


def write_sections(
    sections: Iterable[tuple[str, Iterable[tuple[str, Any]]]], write: Callable[[str], object]
) -> None:
    """Write ``{section: {name: value}}`` exactly as :func:`json_text` with depth 2
    would, one entry at a time, so a large status is streamed, never held whole."""
    write("{")
    for i, (section, items) in enumerate(sections):
        write(f"{',' if i else ''}\n  {_compact(section)}: ")
        empty = True
        for name, value in items:
            write(f"{'{' if empty else ','}\n    {_compact(name)}: {_compact(value)}")
            empty = False
        write("{}" if empty else "\n  }")
    write("\n}\n")


def json_text(doc: Any, depth: int = 2, _level: int = 0) -> str:
    """JSON with the outer ``depth`` levels indented and everything deeper on one line.

    For ``status --json``: one ring per line, which stays greppable, each
    written by :func:`_compact` (``json.dumps(indent=...)`` runs the pure
    Python encoder: a quarter of a second for 10,000 rings).
    """
    if depth <= 0 or not isinstance(doc, dict | list) or not doc:
        return _compact(doc)
    pad = "  " * (_level + 1)
    if isinstance(doc, dict):
        items = [
            f"{pad}{_compact(str(k))}: {json_text(v, depth - 1, _level + 1)}"
            for k, v in doc.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + "  " * _level + "}"
    items = [f"{pad}{json_text(v, depth - 1, _level + 1)}" for v in doc]
    return "[\n" + ",\n".join(items) + "\n" + "  " * _level + "]"
