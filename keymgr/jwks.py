"""The JWKS document: deterministic bytes, public members only.

The same key set always gives the same bytes (keys sorted by kid, members
sorted), so an unchanged ring means no write and no upload, and a read-back can
be compared byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from keymgr.jose import assert_public
from keymgr.model import Key, jwk_members


def jwk_for(key: Key) -> dict[str, str]:
    jwk = dict(jwk_members(key.public_jwk))
    assert_public(jwk)
    jwk["kid"] = key.kid
    jwk["alg"] = key.alg
    jwk["use"] = "sig"
    return jwk


def document(keys: Iterable[Key]) -> dict[str, Any]:
    return {"keys": [jwk_for(k) for k in sorted(keys, key=lambda k: k.kid)]}


def encode(doc: dict[str, Any]) -> bytes:
    for jwk in doc["keys"]:
        assert_public(jwk)
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("ascii")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served_keys(body: bytes | None) -> dict[str, dict[str, Any]]:
    """The JWKs a served document holds, by kid (empty when it is not a JWKS).

    Read from the target itself, never from state: what verifiers can
    already see there is the only thing a publish can expose without a check.
    """
    return (parse_keys(body) if body is not None else None) or {}


def parse_keys(body: bytes) -> dict[str, dict[str, Any]] | None:
    """The JWKs of a JWKS document by kid, or None when ``body`` is not a JWKS."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        return None
    return {
        k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)
    }
