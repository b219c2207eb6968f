"""Reading kids out of JWKS documents and JWS headers."""

from __future__ import annotations

import base64
import json
from typing import Any

#: JWK members that hold private material; none may ever be published.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def kids_of(doc: Any) -> set[str]:
    return {k.get("kid", "") for k in doc.get("keys", [])} if isinstance(doc, dict) else set()


def kids_in(body: bytes | None) -> set[str]:
    """The kids of a served JWKS body (none when nothing is served)."""
    return kids_of(json.loads(body)) if body else set()


def _part(token: str, i: int) -> dict[str, Any]:
    p = token.split(".")[i]
    return dict(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))))


def header_kid(token: str) -> str:
    return str(_part(token, 0)["kid"])


def header_of(token: str) -> dict[str, Any]:
    """A compact JWS's protected header (not verified)."""
    return _part(token, 0)


def claims_of(token: str) -> dict[str, Any]:
    """A compact JWS's claims (not verified)."""
    return _part(token, 1)


def algs_of(doc: Any) -> tuple[str, ...]:
    """The algorithms of a JWKS document's keys, sorted, each once."""
    if not isinstance(doc, dict):
        return ()
    return tuple(sorted({str(k.get("alg", "?")) for k in doc.get("keys", [])}))


def short(kid: str | None) -> str:
    return (kid or "-")[:8]
