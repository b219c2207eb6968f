"""Small, pure checks of a state document before anything acts on it.

Nothing read from storage is trusted (docs/design.md#trust-boundaries): a state
document may have been edited by anyone with write access to the store. Each
check below is one rule, and each failure is one line naming the ring, the kid
and the field, raised as :class:`~keymgr.errors.StateError` so that the CLI
exits 1 without a traceback and nothing is changed.

What this cannot catch on its own: a well-formed entry for a key that the
backend does not hold (or holds with another public key). The reconciler checks
that against the backend before a key is published (``Reconciler._check_keys``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from keymgr import jose
from keymgr.errors import StateError
from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    Key,
    PublicJwk,
    Ring,
    State,
    Tombstone,
    jwk_members,
    jwk_shape,
)

#: Times each state needs recorded (besides created_at), per docs/design.md#states.
_REQUIRED: dict[str, tuple[str, ...]] = {
    PENDING: (),
    PUBLISHED: ("published_at",),
    ACTIVE: ("published_at", "activated_at"),
    RETIRED: ("published_at", "activated_at", "retired_at"),
    EXPIRED: ("retired_at", "expired_at"),
    DESTROYED: ("destroyed_at",),
    REVOKED: ("revoked_at",),
}
#: An RFC 7638 thumbprint (SHA-256, base64url without padding): every kid keymgr
#: records. A tombstone has no public key to hash, so only the form is checked.
_KID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
#: Lifecycle order of the recorded times: each present one is >= those before it.
_ORDER = ("created_at", "published_at", "activated_at", "retired_at", "expired_at")
#: Bytes of each JWK member, per curve (EC: x and y; OKP: x).
_CURVE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66, "Ed25519": 32}
_MEMBERS = {
    "EC": ("kty", "crv", "x", "y"),
    "RSA": ("kty", "n", "e"),
    "OKP": ("kty", "crv", "x"),
}


def check_state(
    state: State, where: str, checked: dict[str, Ring] | None = None
) -> None:
    """Raise StateError for the first rule ``state`` breaks; ``where`` names the store.

    ``checked`` (name -> Ring) holds rings already found sound: a store hands
    back the very same immutable Ring objects for what did not change (a
    sharded store reads only the changed shards), so only new rings have their
    keys checked one by one, and a pass after another replica's one-ring
    commit costs O(changed) here, plus the cross-ring kid check (a set). It is
    refilled with this state's rings when the whole state passed.
    """
    seen: dict[str, str] = {}
    sound = checked if checked is not None else {}
    for name, ring in state.rings.items():
        known = sound.get(name) is ring
        active = 0
        for key in ring.keys:
            if key.kid in seen:
                raise StateError(
                    f"{where}: ring {name}: key {key.kid}: recorded twice "
                    f"(also in ring {seen[key.kid]})"
                )
            seen[key.kid] = name
            if known:
                continue
            problem = key_problem(key)
            if problem is not None:
                raise StateError(f"{where}: ring {name}: key {key.kid}: {problem}")
            active += key.state == ACTIVE
        if active > 1:
            raise StateError(f"{where}: ring {name}: {active} active keys (at most one)")
        for tomb in ring.forgotten:
            at = f"{where}: ring {name}: forgotten key {tomb.kid}"
            if tomb.kid in seen:
                raise StateError(f"{at}: recorded twice (also in ring {seen[tomb.kid]})")
            seen[tomb.kid] = name
            if known:
                continue
            problem = tombstone_problem(tomb, state.clock)
            if problem is not None:
                raise StateError(f"{at}: {problem}")
    for ring_name, intent in state.intents.items():
        if not intent.nonce or not intent.backend:
            raise StateError(f"{where}: intents.{ring_name}: nonce and backend are required")
    for pub, urls in state.edges.items():
        for url, edge in urls.items():
            if not edge.kids.issuperset(edge.since):
                raise StateError(f"{where}: edges.{pub}: {url}: a time for a kid it does not show")
    if checked is not None:
        # Keyed by the state's own name strings: no key object of its own
        # (an id was a 32-byte int per ring, 3 MB at 100,000 rings).
        checked.clear()
        checked.update(state.rings)


def key_problem(key: Key) -> str | None:
    """What is wrong with one key entry, or None.

    Every key of a loaded state goes through this (400,000 at 100,000 rings),
    so the common sound case is kept to a few C calls per check.
    """
    if not isinstance(key.kid, str) or not isinstance(key.backend, str) or not key.backend:
        return "kid and backend must be non-empty strings"
    if not isinstance(key.alg, str) or key.alg not in jose.ALGORITHMS:
        return f"alg: {key.alg!r} is not a supported JWS algorithm"
    for f in _REQUIRED[key.state]:
        if getattr(key, f) is None:
            return f"{f}: required for a {key.state} key"
    recorded = [
        t
        for t in (key.created_at, key.published_at, key.activated_at, key.retired_at,
                  key.expired_at)
        if t is not None
    ]
    if recorded != sorted(recorded):  # the common case in C; the loop names the field
        last: tuple[str, datetime] | None = None
        for f in _ORDER:
            t = getattr(key, f)
            if t is None:
                continue
            if last is not None and t < last[1]:
                return f"{f} is before {last[0]}"
            last = (f, t)
    if type(key.public_jwk) is PublicJwk:
        kid = _held_kid(key.public_jwk, key.alg)
        if kid is not None:  # sound: only the kid is left to compare
            return None if kid == key.kid else "kid is not the RFC 7638 thumbprint of public_jwk"
    jwk = jwk_members(key.public_jwk)
    problem = _jwk_problem(jwk, key.alg)
    if problem is not None:
        return f"public_jwk: {problem}"
    try:
        kid = jose.thumbprint(jwk)
    except ValueError as e:
        return f"public_jwk: {e}"
    if kid != key.kid:
        return "kid is not the RFC 7638 thumbprint of public_jwk"
    return None


def tombstone_problem(tomb: Tombstone, clock: datetime | None) -> str | None:
    """What is wrong with one tombstone (``forgotten`` entry), or None.

    A destroyed_at later than the state's clock would keep the tombstone past
    its time (keymgr.planner drops it after destroyed_at): an edited entry.
    """
    if not isinstance(tomb.kid, str) or not _KID_RE.fullmatch(tomb.kid):
        return "kid is not an RFC 7638 thumbprint (43 base64url characters)"
    if not isinstance(tomb.backend, str) or not tomb.backend:
        return "backend must be a non-empty string"
    if tomb.alg not in jose.ALGORITHMS:
        return f"alg: {tomb.alg!r} is not a supported JWS algorithm"
    if clock is not None and tomb.destroyed_at > clock:
        return "destroyed_at is later than the state's clock"
    return None


#: A canonical unpadded base64url value of exactly N bytes (unused trailing
#: bits zero), per N: what jose.b64url_decode accepts at that length, checked
#: in one C call. A value it refuses goes the long way, for the message.
_COORD_RE = {
    32: re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]"),
    48: re.compile(r"[A-Za-z0-9_-]{64}"),
    66: re.compile(r"[A-Za-z0-9_-]{88}"),
}


#: The canonical-base64url check of one coordinate of N bytes, on bytes (what
#: _COORD_RE checks on text), for :func:`_held_kid`.
_COORD_BYTES_RE = {n: re.compile(p.pattern.encode()) for n, p in _COORD_RE.items()}
_UNSET: Any = object()
_HeldPlan = tuple[tuple[Callable[[bytes], Any], ...], bytes, tuple[int, ...] | None]
#: Per (shape byte, alg): how to check a held EC or OKP JWK of that shape in
#: one pass (coordinate checks, thumbprint input and the order of its
#: material), or None when it takes the long way (RSA, or a shape that
#: _jwk_problem refuses for that alg, whose message it words). Bounded: 256
#: shapes times the supported algorithms.
_HELD: dict[tuple[int, str], _HeldPlan | None] = {}


def _held_plan(index: int, alg: str) -> _HeldPlan | None:
    template, material = jwk_shape(index)
    size = _CURVE_BYTES.get(template.get("crv", ""))
    if template.get("kty") not in ("EC", "OKP") or size is None:
        return None  # RSA (its modulus is checked by size in bits), or no curve
    # Everything but the key material is the shape's: _jwk_problem's verdict on
    # the shape with sound stand-in coordinates holds for every key of it.
    sample = {**template, **{m: jose.b64url(bytes(size)) for m in material}}
    if _jwk_problem(sample, alg) is not None:
        return None
    check = _COORD_BYTES_RE[size].fullmatch
    # RFC 7638: the required members, sorted, no whitespace; the material as
    # %s (the fixed values are the known kty and crv: no % in them).
    members = {k: "%s" if k in material else v for k, v in template.items()}
    canonical = orjson.dumps(members, option=orjson.OPT_SORT_KEYS)
    order = tuple(material.index(k) for k in sorted(material))
    # None when the material is already in the thumbprint's order (EC: x, y).
    return tuple(check for _ in material), canonical, None if order == tuple(
        range(len(order))
    ) else order


def _held_kid(jwk: PublicJwk, alg: str) -> str | None:
    """The thumbprint of a held EC or OKP JWK that is sound for ``alg``, from
    its bytes in one pass; None when it must take the long way."""
    raw = bytes(jwk)
    plan = _HELD.get((raw[0], alg), _UNSET)
    if plan is _UNSET:
        plan = _HELD[(raw[0], alg)] = _held_plan(raw[0], alg)
    if plan is None:
        return None
    checks, canonical, order = plan
    parts = raw[1:].split(b".")
    for check, part in zip(checks, parts, strict=True):
        if check(part) is None:
            return None
    picked = tuple(parts) if order is None else tuple(parts[i] for i in order)
    return jose.thumbprint_of(canonical % picked)


def _jwk_problem(jwk: object, alg: str) -> str | None:
    if not isinstance(jwk, dict):
        return "must be an object of string members"
    for k, v in jwk.items():
        if not isinstance(k, str) or not isinstance(v, str):
            return "must be an object of string members"
    kty = jwk.get("kty")
    members = _MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        return f"kty {kty!r} is not EC, RSA or OKP"
    if jwk.keys() != jose.KEY_MEMBERS[str(kty)]:
        extra = sorted(set(jwk) - set(members))
        if extra:
            # Private members above all (invariant 5), but anything else too: a
            # stored public key is exactly its key members.
            return f"unexpected member(s) {', '.join(extra)}"
        return f"missing member(s) {', '.join(m for m in members if m not in jwk)}"
    family = jose.alg_family(alg)
    if kty != family:
        return f"a {kty} key cannot sign {alg}"
    try:
        if kty == "RSA":
            bits = int.from_bytes(jose.b64url_decode(jwk["n"]), "big").bit_length()
            if bits < jose.MIN_RSA_BITS:
                return f"RSA modulus of {bits} bits (at least {jose.MIN_RSA_BITS})"
            return None
        crv = jwk["crv"]
        if crv != ("Ed25519" if kty == "OKP" else jose.curve_for(alg)):
            return f"curve {crv} cannot sign {alg}"
        size = _CURVE_BYTES[crv]
        sound = _COORD_RE[size].fullmatch
        for c in ("x", "y") if kty == "EC" else ("x",):
            if not sound(jwk[c]) and len(jose.b64url_decode(jwk[c])) != size:
                return f"{c} is not {size} bytes"
    except (ValueError, KeyError):
        return "not valid base64url key members"
    return None
