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


def header_kid(token: str) -> str:
    h = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))["kid"])


def short(kid: str | None) -> str:
    return (kid or "-")[:8]
