"""Text rendering of ``status`` and ``plan`` for people."""

from __future__ import annotations

from typing import Any

from keymgr.model import State
from keymgr.timefmt import format_duration, parse_time, utcnow


def _when(at: str | None) -> str:
    if at is None:
        return "-"
    delta = parse_time(at) - utcnow()
    rel = "now" if delta.total_seconds() <= 0 else f"in {format_duration(delta)}"
    return f"{at} ({rel})"


def status_text(doc: dict[str, Any], state: State) -> str:
    out: list[str] = []
    for ring, info in doc["rings"].items():
        out.append(f"ring {ring}")
        out.append(f"  {'KID':<44} {'STATE':<10} {'ALG':<6} {'BACKEND':<10} SINCE")
        for k in info["keys"]:
            since = next(
                (
                    k[f]
                    for f in (
                        "revoked_at",
                        "destroyed_at",
                        "expired_at",
                        "retired_at",
                        "activated_at",
                        "published_at",
                        "created_at",
                    )
                    if k.get(f)
                ),
                "-",
            )
            out.append(
                f"  {k['kid']:<44} {k['state']:<10} {k['alg']:<6} {k['backend']:<10} {since}"
            )
        if not info["keys"]:
            out.append("  (no keys yet)")
        nxt = info["next"]
        if nxt:
            kid = f" {nxt['kid']}" if nxt.get("kid") else ""
            out.append(f"  next: {nxt['action']}{kid} at {_when(nxt['at'])}")
        else:
            out.append("  next: nothing scheduled")
    return "\n".join(out)


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
