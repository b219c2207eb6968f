"""The key-ring state: plain immutable data, and its JSON form.

The state document is the single source of truth. Everything the planner
decides is derived from it (plus policy and ``now``), so it holds only facts:
which keys exist, in which state, since when, and what each publisher last
confirmed it serves.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import threading
from collections.abc import ItemsView, Iterator, KeysView, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self, cast

import orjson

from keymgr.timefmt import format_time, formatted_time, parse_time

FORMAT = 1

PENDING = "pending"
PUBLISHED = "published"
ACTIVE = "active"
RETIRED = "retired"
EXPIRED = "expired"
DESTROYED = "destroyed"
REVOKED = "revoked"

STATES = (PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED, DESTROYED, REVOKED)
#: States whose public key belongs in the JWKS (pending is added while it is
#: being published; it only becomes ``published`` once every publisher confirmed).
IN_JWKS = frozenset({PENDING, PUBLISHED, ACTIVE, RETIRED})
#: States in which the private key still exists in the backend.
HAS_PRIVATE = frozenset({PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED, REVOKED})

@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (restored after).

    Parsing a large document (a state or config of 10,000 rings) allocates
    hundreds of thousands of containers and no cycles; the collector would
    walk the growing heap again and again for nothing (~0.3 s at 10,000 rings).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def gc_settled() -> Iterator[None]:
    """:func:`gc_paused` for a whole state read, whose objects then live on:
    on success they go straight to the collector's oldest generation.

    Decoded under a pause, the millions of objects of a 100,000-ring state
    sat in the youngest generation when the collector came back, and the
    daemon's next pass walked them once per generation: 3 s of its first
    pass (benchmarks/bench_scale.py). ``gc.freeze()`` then ``gc.unfreeze()``
    moves every tracked object to the oldest generation without a walk
    (documented: unfreeze puts the frozen objects back there). Nothing stays
    frozen, so whatever becomes garbage later is collected as usual; the
    oldest generation is walked again only once it has grown by a quarter.
    Nothing when the collector is off (one-shot commands: keymgr.cli).
    """
    was_on = gc.isenabled()
    with gc_paused():
        yield
        if was_on:  # not after a failed read: its objects are garbage
            gc.freeze()
            gc.unfreeze()


#: Short strings that repeat in every key record (alg, backend, state), one
#: object each: json.loads makes a new string per occurrence, 50-60 bytes
#: each, several per key; at 100,000 rings that was over 100 MB
#: (benchmarks/bench_scale.py). Seeded with the states so the common case is
#: one dict lookup (:data:`_seen`).
_SHARED: dict[str, str] = {s: s for s in STATES}
_STATE_SET = frozenset(STATES)
_SHARED_MAX = 4096
_seen = _SHARED.get


def shared(value: Any) -> Any:
    """``value``, or the one equal short string already seen (anything else as is)."""
    if type(value) is not str or len(value) > 16:
        return value
    got = _SHARED.get(value)
    if got is not None:
        return got
    if len(_SHARED) < _SHARED_MAX:  # bounded: a hostile document cannot grow it
        _SHARED[value] = value
    return value


#: The members of a JWK that hold key material (RFC 7518 6.2.1 and 6.3.1,
#: RFC 8037 2): the values that differ from key to key. Every other member
#: (kty, crv, alg, use) repeats across a state's keys.
_MATERIAL = frozenset({"n", "e", "x", "y"})
#: The shapes of stored JWKs seen so far, by index: the members in order with
#: the fixed values (key material empty, to be filled in), and the names of the
#: key material. Index 0 is "no shape": the bytes are the JSON. At most 256
#: (the index is a byte).
_SHAPES: list[tuple[dict[str, str], tuple[str, ...]]] = [({}, ())]
#: By member names: how to take the fixed values and the key material out of
#: a JWK with those members, and the shape index for each fixed-values tuple.
_BY_NAMES: dict[tuple[str, ...], tuple[Any, Any, dict[tuple[str, ...], int]]] = {}


#: Held while a shape is added: the shards of a network store are decoded by
#: several threads at once (keymgr.docstore.DocumentAdapter.concurrency), and
#: an index must name the shape it was taken for.
_SHAPES_LOCK = threading.Lock()


def _shape_index(
    names: tuple[str, ...], fixed: tuple[str, ...], indexes: dict[tuple[str, ...], int]
) -> int | None:
    """The index of shape (member ``names``, ``fixed`` values), added to
    ``indexes`` (those of its member names) if new; None once 255 are taken or
    when a fixed value is not ASCII text."""
    if not all(type(v) is str and v.isascii() for v in fixed):
        return None
    with _SHAPES_LOCK:
        index = indexes.get(fixed)  # added by another thread meanwhile
        if index is None and len(_SHAPES) < 256:
            values = iter(fixed)
            template = {n: "" if n in _MATERIAL else next(values) for n in names}
            _SHAPES.append((template, tuple(n for n in names if n in _MATERIAL)))
            index = indexes[fixed] = len(_SHAPES) - 1
        return index


def _getter(names: list[str]) -> Any:
    """A function taking those members of a dict, as a tuple (one or none included)."""
    if not names:
        return lambda d: ()
    if len(names) == 1:
        one = operator.itemgetter(names[0])
        return lambda d: (one(d),)
    return operator.itemgetter(*names)


if TYPE_CHECKING:

    class _JwkBytes:
        """What type checkers see of :class:`PublicJwk`'s base: made from
        bytes, read back with ``bytes()``; its sequence API is not used."""

        __slots__ = ()

        def __new__(cls, data: bytes) -> Self: ...

        def __bytes__(self) -> bytes: ...

else:

    class _JwkBytes(bytes):
        __slots__ = ()


class PublicJwk(_JwkBytes, Mapping[str, str]):
    """A stored public JWK, held as compact bytes.

    Every key record of a loaded state has one (400,000 at 100,000 rings:
    benchmarks/bench_scale.py), and the public JWK is read only to validate,
    publish or rewrite a key or to compare it with the backend's. As a dict
    with its two coordinate strings an EC JWK takes ~370 bytes, as its JSON
    in an object ~210; this is the JSON without what every key of its shape
    repeats (member names, ``kty``, ``crv``): a byte naming the shape, then
    the key material joined by ``.`` (which base64url never holds), ~140
    bytes in one object. A JWK whose material is not plain ASCII text, or of
    a 256th shape, is kept as its JSON. It reads as the dict it was made
    from (same members, same order, equal to it), decoding on each read;
    :func:`jwk_members` gives the dict for one decode.
    """

    __slots__ = ()

    def __new__(cls, members: Mapping[str, str]) -> PublicJwk:
        held = _held(members if type(members) is dict else dict(members))
        if held is None:
            raise ValueError("a public JWK is an object of strings")
        return held

    def _members(self) -> dict[str, str]:
        text = str(cast(bytes, self), "latin-1")  # the shape's byte, then ASCII
        template, material = _SHAPES[ord(text[0])]
        if not material:  # no shape: JSON
            members: dict[str, str] = orjson.loads(bytes(self)[1:])
            return members
        members = template.copy()  # the members' order, then the material in place
        members.update(zip(material, text[1:].split("."), strict=True))
        return members

    def __getitem__(self, member: str) -> str:
        return self._members()[member]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members())

    def __len__(self) -> int:
        return len(self._members())

    def __contains__(self, member: object) -> bool:
        return member in self._members()

    def keys(self) -> KeysView[str]:
        return self._members().keys()

    def items(self) -> ItemsView[str, str]:
        return self._members().items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PublicJwk):
            return bytes(self) == bytes(other) or self._members() == other._members()
        if isinstance(other, Mapping):
            return self._members() == dict(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]  # equal to a dict, which has none

    def __reduce__(self) -> tuple[Any, ...]:
        return (PublicJwk, (self._members(),))

    def __repr__(self) -> str:
        return f"PublicJwk({self._members()!r})"


def jwk_shape(index: int) -> tuple[Mapping[str, str], tuple[str, ...]]:
    """Shape ``index`` of held JWKs (the first byte of a :class:`PublicJwk`'s
    bytes; the rest is its key material joined by ``.``): its members in
    order with their fixed values (the material ones empty), and the names
    of its key material in order. Shape 0 has neither: the rest is JSON."""
    return _SHAPES[index]


def jwk_members(jwk: Any) -> Any:
    """A key's public JWK as a new dict when it is a :class:`PublicJwk`
    (one parse), anything else as it is."""
    return jwk._members() if type(jwk) is PublicJwk else jwk


def _held(plain: dict[Any, Any]) -> PublicJwk | None:
    """``plain`` as a :class:`PublicJwk`; None unless it is an object of
    strings that JSON can hold (not a lone surrogate)."""
    # Written for speed (400,000 per load at 100,000 rings): the member names
    # pick two C-level getters, which pick the shape.
    names = tuple(plain)
    by = _BY_NAMES.get(names)
    if by is None and len(_BY_NAMES) < 256 and all(type(n) is str for n in names):
        # setdefault: every thread then uses the one entry that was stored.
        by = _BY_NAMES.setdefault(names, (
            _getter([n for n in names if n not in _MATERIAL]),
            _getter([n for n in names if n in _MATERIAL]),
            {},
        ))  # fmt: skip
    if by is not None:
        fixed = by[0](plain)
        try:
            index = by[2].get(fixed)  # a fixed value that is not a str matches no shape
        except TypeError:  # nor can one that is not hashable (a list)
            return None
        if index is None:
            index = _shape_index(names, fixed, by[2])
        if index is not None:
            material = by[1](plain)
            try:
                text = ".".join(material)
            except TypeError:  # a value that is not a str
                return None
            if text.isascii() and text.count(".") == len(material) - 1:
                return _JwkBytes.__new__(PublicJwk, (chr(index) + text).encode("latin-1"))
    for k, v in plain.items():
        if type(k) is not str or type(v) is not str:
            return None
    try:
        return _JwkBytes.__new__(PublicJwk, b"\0" + orjson.dumps(plain))
    except orjson.JSONEncodeError:
        return None


def _public_jwk(jwk: Any) -> Any:
    """A stored public JWK as a :class:`PublicJwk` when it is an object of
    strings; anything else as it is, for keymgr.validate to name."""
    if type(jwk) is dict:
        held = _held(jwk)
        if held is not None:
            return held
    return jwk


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    alg: str
    backend: str
    state: str
    #: A :class:`PublicJwk` once loaded; a new key's is the backend's dict.
    public_jwk: Mapping[str, str]
    created_at: datetime
    published_at: datetime | None = None
    activated_at: datetime | None = None
    retired_at: datetime | None = None
    expired_at: datetime | None = None
    destroyed_at: datetime | None = None
    revoked_at: datetime | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["reason"] = self.reason
        d["public_jwk"] = jwk_members(self.public_jwk)
        return d

    def summary(self) -> dict[str, Any]:
        """:meth:`to_dict` without ``reason`` and ``public_jwk``: a key as
        ``status --json`` shows it (400,000 of them at 100,000 rings, so
        each time's text is looked up in format_time's memo inline first)."""
        known = formatted_time
        return {
            "kid": self.kid,
            "alg": self.alg,
            "backend": self.backend,
            "state": self.state,
            "created_at": known(self.created_at) or format_time(self.created_at),
            "published_at": known(self.published_at) or format_time(self.published_at),
            "activated_at": known(self.activated_at) or format_time(self.activated_at),
            "retired_at": known(self.retired_at) or format_time(self.retired_at),
            "expired_at": known(self.expired_at) or format_time(self.expired_at),
            "destroyed_at": known(self.destroyed_at) or format_time(self.destroyed_at),
            "revoked_at": known(self.revoked_at) or format_time(self.revoked_at),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Key:
        # Written out field by field (no dict of times, no **, shared strings
        # and times looked up inline): a state of 100,000 rings builds this
        # 400,000 times per load. A value of the wrong type fails here
        # (TypeError, AttributeError) or in keymgr.validate, never silently.
        get = d.get
        created = get("created_at")
        if not created:
            raise ValueError(f"key {get('kid')}: created_at missing")
        state = d["state"]
        if type(state) is not str or state not in _STATE_SET:
            raise ValueError(f"key {get('kid')}: unknown state {state!r}")
        alg, backend = d["alg"], d["backend"]
        if type(alg) is str:  # anything else is left for keymgr.validate to name
            alg = _seen(alg) or shared(alg)
        if type(backend) is str:
            backend = _seen(backend) or shared(backend)
        times = _TIMES.get
        published, activated, retired, expired, destroyed, revoked = (
            get("published_at"),
            get("activated_at"),
            get("retired_at"),
            get("expired_at"),
            get("destroyed_at"),
            get("revoked_at"),
        )
        return cls(
            kid=d["kid"],
            alg=alg,
            backend=backend,
            state=_SHARED[state],
            public_jwk=_public_jwk(d["public_jwk"]),
            created_at=times(created) or stored_time(created),
            published_at=(times(published) or stored_time(published)) if published else None,
            activated_at=(times(activated) or stored_time(activated)) if activated else None,
            retired_at=(times(retired) or stored_time(retired)) if retired else None,
            expired_at=(times(expired) or stored_time(expired)) if expired else None,
            destroyed_at=(times(destroyed) or stored_time(destroyed)) if destroyed else None,
            revoked_at=(times(revoked) or stored_time(revoked)) if revoked else None,
            reason=get("reason"),
        )


#: Recorded times, one datetime object per distinct text. Every time in a state
#: is the ``now`` of the pass that recorded it (to the second), so a state holds
#: at most one distinct time per pass in its history window, whatever the ring
#: count: with 100,000 rings and a pass a minute over 120 days, at most ~173,000
#: distinct values among millions of fields (48 bytes each as separate objects:
#: 105 MB of the 100,000-ring state of benchmarks/bench_scale.py). Bounded: once
#: full it starts over, which only costs sharing.
_TIMES: dict[str, datetime] = {}
_TIMES_MAX = 1 << 18


def stored_time(text: str) -> datetime:
    """``parse_time(text)``, the same object for the same text (see :data:`_TIMES`)."""
    got = _TIMES.get(text)
    if got is None:
        got = parse_time(text)
        if len(_TIMES) >= _TIMES_MAX:
            _TIMES.clear()
        _TIMES[text] = got
    return got


def _time_or_none(value: Any) -> datetime | None:
    return stored_time(value) if value else None


_TOMBSTONE_ORDER = ("kid", "alg", "backend", "destroyed_at")
_TOMBSTONE_FIELDS = frozenset(_TOMBSTONE_ORDER)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What a ring keeps of a destroyed key once its ``history`` has passed.

    A destroyed key's full record (public JWK, every time) is only forensics
    once ``history`` is over, and the audit log keeps that for good; but its
    kid must still be recognised for a while: a backend may list the key
    during its pending-deletion window, a restored copy of a key directory or
    of a JWKS target may bring it back, and an operator must not take it over
    with ``keymgr adopt``. About 150 bytes instead of 500 (EC) to 900
    (RSA-3072): no public JWK. The planner drops it in turn
    (keymgr.planner.TOMBSTONE_KEEP).
    """

    kid: str
    alg: str
    backend: str
    destroyed_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "backend": self.backend,
            "destroyed_at": format_time(self.destroyed_at),
        }

    @classmethod
    def from_dict(cls, ring: str, d: Any) -> Tombstone:
        """One ``forgotten`` entry; ValueError names the ring and the kid."""
        if type(d) is dict and d.keys() == _TOMBSTONE_FIELDS:
            # The common case, a sound entry whose time was seen before, in
            # a few lookups (one per ring at 100,000 rings); anything else
            # goes through the checks below for its message.
            kid, alg, backend, text = d["kid"], d["alg"], d["backend"], d["destroyed_at"]
            if (
                type(text) is str
                and (destroyed := _TIMES.get(text)) is not None
                and type(kid) is str
                and kid
                and type(alg) is str
                and alg
                and type(backend) is str
                and backend
            ):
                return cls(
                    kid=kid,
                    alg=_seen(alg) or shared(alg),
                    backend=_seen(backend) or shared(backend),
                    destroyed_at=destroyed,
                )
        kid = d.get("kid") if isinstance(d, dict) else None
        at = f"ring {ring}: forgotten key {kid if isinstance(kid, str) else '?'}"
        if not isinstance(d, dict):
            raise ValueError(f"{at}: not an object")
        for f in _TOMBSTONE_ORDER:
            if not isinstance(d.get(f), str) or not d[f]:
                raise ValueError(f"{at}: {f} must be a non-empty string")
        extra = sorted(set(d) - _TOMBSTONE_FIELDS)
        if extra:
            raise ValueError(f"{at}: unexpected field(s) {', '.join(extra)}")
        try:
            destroyed = stored_time(d["destroyed_at"])
        except ValueError as e:
            raise ValueError(f"{at}: destroyed_at: {e}") from None
        return cls(
            kid=d["kid"], alg=shared(d["alg"]), backend=shared(d["backend"]), destroyed_at=destroyed
        )


@dataclass(frozen=True, slots=True)
class Ring:
    name: str
    keys: tuple[Key, ...] = ()
    #: ``keymgr rotate`` asked for a successor now (cleared on promotion).
    rotate_at: datetime | None = None
    #: ``rotate --emergency``: promote as soon as published, without waiting A.
    emergency: bool = False
    #: Destroyed keys past their ``history``: kid, backend, alg and
    #: destroyed_at only (keymgr.planner: Forget, then DropTombstone).
    forgotten: tuple[Tombstone, ...] = ()

    def key(self, kid: str) -> Key | None:
        for k in self.keys:
            if k.kid == kid:
                return k
        return None

    def tombstone(self, kid: str) -> Tombstone | None:
        for t in self.forgotten:
            if t.kid == kid:
                return t
        return None

    def known_kids(self) -> set[str]:
        """Every kid the ring recognises as its own: its keys and its tombstones."""
        kids = {k.kid for k in self.keys}
        kids.update(t.kid for t in self.forgotten)
        return kids

    def in_state(self, *states: str) -> list[Key]:
        return [k for k in self.keys if k.state in states]

    @property
    def active(self) -> Key | None:
        for k in self.keys:
            if k.state == ACTIVE:
                return k
        return None

    def with_key(self, key: Key) -> Ring:
        """This ring with ``key`` replacing the key of the same kid (or appended)."""
        keys = list(self.keys)
        for i, k in enumerate(keys):
            if k.kid == key.kid:
                keys[i] = key
                break
        else:
            keys.append(key)
        return replace(self, keys=tuple(keys))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "keys": [k.to_dict() for k in self.keys],
            "rotate_at": format_time(self.rotate_at),
            "emergency": self.emergency,
        }
        # Only when there is one: a ring that never forgot a key is written
        # byte for byte as before the field existed.
        if self.forgotten:
            d["forgotten"] = [t.to_dict() for t in self.forgotten]
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Ring:
        forgotten = d.get("forgotten")  # absent in documents written before it existed
        if forgotten is not None and not isinstance(forgotten, list):
            raise ValueError(f"ring {name}: forgotten must be a list")
        return cls(
            name=name,
            keys=tuple(Key.from_dict(k) for k in d.get("keys", [])),
            rotate_at=parse_time(d["rotate_at"]) if d.get("rotate_at") else None,
            emergency=bool(d.get("emergency", False)),
            forgotten=tuple(Tombstone.from_dict(name, t) for t in forgotten)
            if forgotten
            else (),
        )


@dataclass(frozen=True)
class PublisherRecord:
    """What a publisher last confirmed (read back and compared) it serves.

    ``since`` is, per kid, the time since which the publisher has served it
    *continuously*: every confirmation keeps a kid's time when the previous
    record was intact and held it, and an observation that the target no
    longer serves the confirmed document (reverted, deleted, edited, its
    headers changed, or unreadable) marks the record ``stale`` and forgets
    every time. Promotion waits for the latest of these across a ring's
    publishers plus A (docs/design.md#promotion).

    ``asked`` holds the kids of writes that were never confirmed: such a write
    may have put them on the target, so they block destruction like confirmed
    ones until a later confirmed document shows what is really served.
    """

    sha256: str
    kids: frozenset[str]
    confirmed_at: datetime | None
    #: The target no longer holds what was confirmed (or could not be read):
    #: the document must be written and confirmed again.
    stale: bool = False
    since: Mapping[str, datetime] = field(default_factory=dict)
    asked: frozenset[str] = frozenset()

    def served_since(self, kid: str) -> datetime | None:
        """Since when ``kid`` has been served without a break, or None."""
        if self.stale:
            return None
        return self.since.get(kid)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sha256": self.sha256,
            "kids": sorted(self.kids),
            "confirmed_at": format_time(self.confirmed_at),
            "since": {k: format_time(t) for k, t in sorted(self.since.items())},
        }
        if self.stale:
            d["stale"] = True
        if self.asked:
            d["asked"] = sorted(self.asked)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PublisherRecord:
        kids = frozenset(d.get("kids", []))
        confirmed = _time_or_none(d.get("confirmed_at"))
        raw_since = d.get("since")
        if raw_since is None:
            # A record written before continuity was tracked: count each kid
            # from the last confirmation, which is never earlier than the truth.
            since = {k: confirmed for k in kids} if confirmed is not None else {}
        else:
            since = {str(k): stored_time(v) for k, v in raw_since.items()}
        return cls(
            sha256=d["sha256"],
            kids=kids,
            confirmed_at=confirmed,
            stale=bool(d.get("stale", False)),
            since=since,
            asked=frozenset(d.get("asked", [])),
        )


@dataclass(frozen=True)
class EdgeRecord:
    """What one edge of a publisher (a URL verifiers fetch the JWKS from: a
    CDN, a proxy cache, a replica) showed at its last probe.

    ``since`` is, per kid, the time since which probes have shown it without
    a break, counted like a publisher's. ``error`` says why the last probe got
    no JWKS (unreachable, an HTTP error, not a JWKS): the edge then counts as
    serving none of its kids since any time (promotion waits) and as maybe
    still serving every kid it last showed (destruction waits).
    """

    kids: frozenset[str]
    since: Mapping[str, datetime]
    #: When a probe first showed this (these kids, or this failure).
    at: datetime
    error: str | None = None

    def served_since(self, kid: str) -> datetime | None:
        """Since when probes have shown ``kid`` without a break, or None."""
        return None if self.error is not None else self.since.get(kid)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kids": sorted(self.kids),
            "since": {k: format_time(t) for k, t in sorted(self.since.items())},
            "at": format_time(self.at),
        }
        if self.error is not None:
            d["error"] = self.error
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EdgeRecord:
        error = d.get("error")
        return cls(
            kids=frozenset(str(k) for k in d.get("kids", [])),
            since={str(k): stored_time(v) for k, v in d.get("since", {}).items()},
            at=parse_time(d["at"]),
            error=None if error is None else str(error),
        )


@dataclass(frozen=True)
class Intent:
    """A write-ahead record that a key is about to be generated for a ring.

    Committed before the backend call; the backend marks the new key with
    ``nonce``. After a crash between the backend call and the state commit,
    the key that carries the nonce is this intent's orphan; a keymgr key that
    matches no intent and no record was not made by this state's history.
    """

    nonce: str
    backend: str
    alg: str
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "backend": self.backend,
            "alg": self.alg,
            "at": format_time(self.at),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intent:
        return cls(
            nonce=str(d["nonce"]),
            backend=str(d["backend"]),
            alg=str(d["alg"]),
            at=parse_time(d["at"]),
        )


@dataclass(frozen=True)
class AuditAnchor:
    """Head of the audit hash chain, plus the events of the last commit.

    The events are committed with the state (an outbox) and appended to the log
    afterwards, so a crash between the two neither loses nor repeats an event.
    """

    seq: int = 0
    hash: str = ""
    outbox: tuple[dict[str, Any], ...] = ()
    #: The audit key that signs checkpoints (``[audit]``, keymgr.checkpoint):
    #: its kid, algorithm, backend and creation time; None without one. Only
    #: pointers: public keys are read from the backend and recorded in the log,
    #: never trusted from here.
    key_kid: str | None = None
    key_alg: str | None = None
    key_backend: str | None = None
    key_since: datetime | None = None
    #: The key it replaced, set by the commit that introduced it (that commit
    #: is signed by the replaced key) and cleared by the next one.
    prev_kid: str | None = None
    prev_alg: str | None = None
    prev_backend: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seq": self.seq, "hash": self.hash, "outbox": list(self.outbox)}
        if self.key_kid is not None:
            key: dict[str, Any] = {
                "kid": self.key_kid,
                "alg": self.key_alg,
                "backend": self.key_backend,
                "since": format_time(self.key_since),
            }
            if self.prev_kid is not None:
                key["prev"] = {
                    "kid": self.prev_kid,
                    "alg": self.prev_alg,
                    "backend": self.prev_backend,
                }
            d["key"] = key
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditAnchor:
        seq, hash_, outbox = int(d["seq"]), str(d["hash"]), tuple(d.get("outbox", []))
        key = d.get("key")  # absent in documents written before [audit] existed
        if key is None:
            return cls(seq=seq, hash=hash_, outbox=outbox)
        prev = key.get("prev") if isinstance(key, dict) else None
        if not cls._strings(key, ("kid", "alg", "backend", "since")) or (
            prev is not None and not cls._strings(prev, ("kid", "alg", "backend"))
        ):
            raise ValueError("audit.key: expected kid, alg, backend, since (and prev) strings")
        return cls(
            seq=seq,
            hash=hash_,
            outbox=outbox,
            key_kid=key["kid"],
            key_alg=key["alg"],
            key_backend=key["backend"],
            key_since=parse_time(key["since"]),
            prev_kid=prev["kid"] if prev else None,
            prev_alg=prev["alg"] if prev else None,
            prev_backend=prev["backend"] if prev else None,
        )

    @staticmethod
    def _strings(d: Any, fields: tuple[str, ...]) -> bool:
        return isinstance(d, dict) and all(isinstance(d.get(f), str) for f in fields)


@dataclass(frozen=True)
class State:
    rings: dict[str, Ring] = field(default_factory=dict)
    publishers: dict[str, PublisherRecord] = field(default_factory=dict)
    audit: AuditAnchor = field(default_factory=AuditAnchor)
    #: Newest time ever recorded; ``--at`` earlier than this is refused.
    clock: datetime | None = None
    #: Open write-ahead intents, by ring (at most one generate per ring at a time).
    intents: Mapping[str, Intent] = field(default_factory=dict)
    #: What each probed edge showed, by publisher, then URL.
    edges: Mapping[str, Mapping[str, EdgeRecord]] = field(default_factory=dict)

    def edge(self, publisher: str, url: str) -> EdgeRecord | None:
        return self.edges.get(publisher, {}).get(url)

    def ring(self, name: str) -> Ring:
        return self.rings.get(name) or Ring(name=name)

    def with_ring(self, ring: Ring) -> State:
        rings = dict(self.rings)
        rings[ring.name] = ring
        return replace(self, rings=rings)

    def find(self, kid: str) -> tuple[Ring, Key] | None:
        for ring in self.rings.values():
            k = ring.key(kid)
            if k is not None:
                return ring, k
        return None

    def find_forgotten(self, kid: str) -> tuple[Ring, Tombstone] | None:
        """The ring and tombstone of a destroyed key whose full record was forgotten."""
        for ring in self.rings.values():
            if ring.forgotten:
                t = ring.tombstone(kid)
                if t is not None:
                    return ring, t
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "clock": format_time(self.clock),
            "rings": {n: r.to_dict() for n, r in sorted(self.rings.items())},
            "publishers": {n: p.to_dict() for n, p in sorted(self.publishers.items())},
            "audit": self.audit.to_dict(),
            "intents": {n: i.to_dict() for n, i in sorted(self.intents.items())},
            **(
                {
                    "edges": {
                        p: {u: e.to_dict() for u, e in sorted(urls.items())}
                        for p, urls in sorted(self.edges.items())
                    }
                }
                if self.edges
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported state format {d.get('format')!r}")
        return cls(
            rings={n: Ring.from_dict(n, r) for n, r in d.get("rings", {}).items()},
            publishers={
                n: PublisherRecord.from_dict(p) for n, p in d.get("publishers", {}).items()
            },
            audit=AuditAnchor.from_dict(d.get("audit", {"seq": 0, "hash": ""})),
            clock=parse_time(d["clock"]) if d.get("clock") else None,
            intents={n: Intent.from_dict(i) for n, i in d.get("intents", {}).items()},
            edges={
                p: {u: EdgeRecord.from_dict(e) for u, e in urls.items()}
                for p, urls in d.get("edges", {}).items()
            },
        )
