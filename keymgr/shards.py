"""Sharded state: the pure half (encoding, decoding, validation, diff). No I/O.

A large state is not one document but three kinds (docs/scale.md):

- **shards**, immutable: the rings and publisher records (with their edges)
  of one *bucket*, named by the SHA-256 of their bytes
  (``shards/<hex>.json``). An entity (``r:RING``, ``p:PUBLISHER``) lives in
  bucket ``sha256(key)[:8] mod B``; ``B`` is a power of two chosen so that a
  bucket holds about :data:`TARGET` entities, doubled when the average passes
  :data:`GROW_AT` (a re-bucketing rewrites everything once, amortised);
- **manifests**, immutable, content-named too (``shards/m-<hex>.json``): the
  shard of each bucket of a range of :data:`FANOUT` buckets, so that the head
  stays small at 10^5 rings;
- the **head**: the state document without rings, publishers and edges, plus
  ``"sharding": {"buckets", "manifests", "garbage"}``. It is the only
  document written by compare-and-swap.

Every document read is checked before it is believed: its bytes hash to its
name, its kind, format, bucket and bucket count are the ones the referrer
expects, and every entity it holds belongs to its bucket. Anything else is a
one-line :class:`~keymgr.errors.StoreError` naming the document.

Each shard and manifest carries a ``stamp`` unique to the commit attempt that
wrote it, so a name is never written by two commits: the only heads that ever
reference a document descend from the one commit that created it. That is what
makes garbage collection safe (a document no head references any more can
never be referenced again, see ``keymgr.docstore``); with the same entities
and stamp the bytes, hence the name, are identical (sorted keys, compact).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from keymgr.jose import b64url, b64url_decode
from keymgr.model import EdgeRecord, PublisherRecord, Ring, State, gc_paused

#: The head's ``format``: the state document's is 1 (``keymgr.model.FORMAT``),
#: so a reader of the previous release refuses a sharded head ("unsupported
#: state format 2") instead of reading it as a state without rings.
HEAD_FORMAT = 2
SHARD_KIND, MANIFEST_KIND, DOC_FORMAT = "keymgr.shard", "keymgr.manifest", 1
OUTBOX_KIND = "keymgr.outbox"
#: Buckets listed by one manifest.
FANOUT = 128
#: Entities per bucket aimed at when the bucket count is chosen ...
TARGET = 8
#: ... and the average above which it doubles.
GROW_AT = 16

_SHARD_NAME = re.compile(r"shards/[0-9a-f]{64}\.json")
_MANIFEST_NAME = re.compile(r"shards/m-[0-9a-f]{64}\.json")
_OUTBOX_NAME = re.compile(r"shards/o-[0-9a-f]{64}\.json")
_SINCE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def ring_key(name: str) -> str:
    return f"r:{name}"


def publisher_key(name: str) -> str:
    return f"p:{name}"


def bucket_of(key: str, buckets: int) -> int:
    """The bucket of entity ``key`` among ``buckets`` (a power of two)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & (buckets - 1)


def buckets_for(entities: int, current: int | None = None) -> int:
    """The bucket count for ``entities``: at first the smallest power of two
    giving at most :data:`TARGET` per bucket; then ``current``, doubled while
    the average passes :data:`GROW_AT`. Never shrinks: a shrinking state keeps
    its layout."""
    if current is not None:
        b = current
        while entities > b * GROW_AT:
            b *= 2
        return b
    b = 1
    while b * TARGET < entities:
        b *= 2
    return b


def is_shard_name(name: str) -> bool:
    return _SHARD_NAME.fullmatch(name) is not None


def is_manifest_name(name: str) -> bool:
    return _MANIFEST_NAME.fullmatch(name) is not None


def is_outbox_name(name: str) -> bool:
    return _OUTBOX_NAME.fullmatch(name) is not None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _token(name: str) -> str:
    """A shard or manifest name as a manifest or the head lists it: its SHA-256
    in unpadded base64url (43 characters against the 75 of the name). A
    one-ring commit rewrites a manifest of 128 such entries and the head of
    one per manifest: about 11 KB less each at 100,000 rings."""
    return b64url(bytes.fromhex(name.rsplit("/", 1)[-1].removesuffix(".json")[-64:]))


def _name(token: object, prefix: str = "") -> str | None:
    """The document name of a listed token (``prefix`` "m-" for a manifest); None if not one.

    The strict decoder refuses non-zero unused bits: two tokens would name one document.
    """
    if not isinstance(token, str) or len(token) != 43:
        return None
    try:
        return f"shards/{prefix}{b64url_decode(token).hex()}.json"
    except ValueError:
        return None


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- entities

#: Kids per publisher chunk aimed at, and the average above which the chunk
#: count of a publisher doubles (see :func:`publisher_parts`).
KIDS_PER_CHUNK, CHUNK_GROW_AT = 64, 128
_PART_KEY = re.compile(r"p:(.+)|k:(\d+):(.+)", re.S)


def chunks_for(kids: int, current: int | None = None) -> int:
    """A publisher's chunk count for ``kids`` kids: like :func:`buckets_for`."""
    if current is not None:
        c = current
        while kids > c * CHUNK_GROW_AT:
            c *= 2
        return c
    c = 1
    while c * KIDS_PER_CHUNK < kids:
        c *= 2
    return c


def publisher_parts(
    name: str,
    record: PublisherRecord | None,
    edges: Mapping[str, EdgeRecord],
    chunks: int,
) -> dict[str, dict[str, Any]]:
    """A publisher's record and edge records as entities: ``p:NAME`` (what is
    not per kid, and the chunk count) and ``k:J:NAME``, chunk J of what is per
    kid (kids, since, asked; per edge kids and since), for the kids whose hash
    falls in J.

    One JWKS may serve every ring's keys: as one entity the record of 10^5
    rings would be megabytes, rewritten by every publish. In chunks, a publish
    that adds or drops a kid changes the chunk of that kid (and ``p:NAME``).
    """
    head: dict[str, Any] = {"chunks": chunks, "record": None, "edges": {}}
    per: dict[int, dict[str, Any]] = {}

    def chunk(kid: str) -> dict[str, Any]:
        j = bucket_of(kid, chunks)
        c = per.get(j)
        if c is None:
            c = per[j] = {"kids": [], "since": {}, "asked": [], "edges": {}}
        return c

    if record is not None:
        d = record.to_dict()
        head["record"] = {k: v for k, v in d.items() if k not in ("kids", "since", "asked")}
        for kid in d["kids"]:
            chunk(kid)["kids"].append(kid)
        for kid, t in d["since"].items():
            chunk(kid)["since"][kid] = t
        for kid in d.get("asked", []):
            chunk(kid)["asked"].append(kid)
    for url, e in sorted(edges.items()):
        d = e.to_dict()
        head["edges"][url] = {k: v for k, v in d.items() if k not in ("kids", "since")}
        for kid in d["kids"]:
            chunk(kid)["edges"].setdefault(url, {"kids": [], "since": {}})["kids"].append(kid)
        for kid, t in d["since"].items():
            chunk(kid)["edges"].setdefault(url, {"kids": [], "since": {}})["since"][kid] = t
    parts = {publisher_key(name): head}
    for j, c in sorted(per.items()):
        parts[f"k:{j}:{name}"] = c
    return parts


def _kid_count(record: PublisherRecord | None, edges: Mapping[str, EdgeRecord]) -> int:
    kids = set(record.kids | set(record.since) | record.asked) if record is not None else set()
    for e in edges.values():
        kids |= e.kids
    return len(kids)


def part_owner(key: str) -> str:
    """The publisher a part key (``p:NAME``, ``k:J:NAME``) belongs to; ValueError if none."""
    m = _PART_KEY.fullmatch(key)
    if m is None:
        raise ValueError(f"not a publisher part: {key[:80]!r}")
    return m.group(1) if m.group(1) is not None else m.group(3)


def build_publisher(
    name: str, head: Mapping[str, Any], chunks: Iterable[Mapping[str, Any]]
) -> tuple[PublisherRecord | None, dict[str, EdgeRecord]]:
    """A publisher's record and edge records from its parts (:func:`publisher_parts`)."""
    chunks = list(chunks)
    record = None
    if head.get("record") is not None:
        kids: list[str] = []
        since: dict[str, Any] = {}
        asked: list[str] = []
        for c in chunks:
            kids += c.get("kids", [])
            since.update(c.get("since", {}))
            asked += c.get("asked", [])
        record = PublisherRecord.from_dict({**head["record"], "kids": kids, "since": since,
                                            "asked": asked})
    edges: dict[str, EdgeRecord] = {}
    for url, e in head.get("edges", {}).items():
        ekids: list[str] = []
        esince: dict[str, Any] = {}
        for c in chunks:
            part = c.get("edges", {}).get(url)
            if part:
                ekids += part.get("kids", [])
                esince.update(part.get("since", {}))
        edges[str(url)] = EdgeRecord.from_dict({**e, "kids": ekids, "since": esince})
    return record, edges


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True, eq=False)
class Shard:
    """One bucket's entities: rings (parsed), publisher parts (as JSON values)."""

    bucket: int
    rings: dict[str, Ring] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.rings or self.parts)

    def owners(self) -> set[str]:
        """The publishers this shard holds parts of."""
        return {part_owner(k) for k in self.parts}


def encode_shard(shard: Shard, buckets: int, stamp: str) -> tuple[str, bytes]:
    """(name, bytes) of a shard: compact JSON, sorted keys, named by its hash."""
    doc = {
        "kind": SHARD_KIND,
        "format": DOC_FORMAT,
        "bucket": shard.bucket,
        "buckets": buckets,
        "stamp": stamp,
        "rings": {n: r.to_dict() for n, r in shard.rings.items()},
        "parts": shard.parts,
    }
    data = _dumps(doc)
    return f"shards/{_digest(data)}.json", data


class Corrupt(ValueError):
    """A shard or manifest that is not what its referrer says (message: why)."""


def _checked(name: str, data: bytes, kind: str, buckets: int | None) -> dict[str, Any]:
    """The document's JSON once its hash, kind, format and bucket count are right."""
    leaf = name.rsplit("/", 1)[-1].removesuffix(".json")
    leaf = leaf[2:] if leaf[:2] in ("m-", "o-") else leaf
    if _digest(data) != leaf:
        raise Corrupt("its bytes do not hash to its name (changed or damaged)")
    try:
        with gc_paused():
            # orjson: about twice as fast as json here, and it shares the
            # strings of repeated keys; 16,000 of these at 100,000 rings.
            doc = orjson.loads(data)
    except (ValueError, RecursionError) as e:
        raise Corrupt(f"not JSON ({' '.join(str(e).split())[:100]})") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise Corrupt(f"not a {kind} document")
    if doc.get("format") != DOC_FORMAT:
        raise Corrupt(f"unsupported format {doc.get('format')!r}")
    if buckets is not None and doc.get("buckets") != buckets:
        raise Corrupt(f"written for {doc.get('buckets')!r} buckets, the head says {buckets}")
    return doc


def decode_shard(name: str, data: bytes, bucket: int, buckets: int) -> Shard:
    """The shard named ``name`` that the manifest says holds ``bucket``; Corrupt if not."""
    doc = _checked(name, data, SHARD_KIND, buckets)
    if doc.get("bucket") != bucket:
        raise Corrupt(f"holds bucket {doc.get('bucket')!r}, the manifest says {bucket}")
    try:
        with gc_paused():
            rings = {str(n): Ring.from_dict(str(n), r) for n, r in doc["rings"].items()}
            parts = dict(doc["parts"])
            for key, value in parts.items():
                part_owner(key)
                if not isinstance(value, dict):
                    raise ValueError(f"part {key[:80]!r} is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        reason = " ".join(str(e).split())[:100]
        raise Corrupt(f"bad entity ({type(e).__name__}: {reason})") from None
    for key in [*map(ring_key, rings), *parts]:
        if bucket_of(key, buckets) != bucket:
            raise Corrupt(f"holds {key[:80]}, which belongs to another bucket")
    return Shard(bucket, rings, parts)


# --------------------------------------------------------------------------- manifests


def encode_manifest(
    index: int, buckets: int, shards: Mapping[int, str], stamp: str
) -> tuple[str, bytes]:
    """(name, bytes) of manifest ``index``: the shard of each bucket of its range,
    in bucket order (null: an empty bucket), each as its :func:`_token`."""
    first, last = index * FANOUT, min(buckets, (index + 1) * FANOUT)
    doc = {
        "kind": MANIFEST_KIND,
        "format": DOC_FORMAT,
        "index": index,
        "buckets": buckets,
        "stamp": stamp,
        "shards": [_token(shards[b]) if b in shards else None for b in range(first, last)],
    }
    data = _dumps(doc)
    return f"shards/m-{_digest(data)}.json", data


def decode_manifest(name: str, data: bytes, index: int, buckets: int) -> dict[int, str]:
    """Bucket -> shard name of manifest ``index``; Corrupt if it is not that manifest."""
    doc = _checked(name, data, MANIFEST_KIND, buckets)
    if doc.get("index") != index:
        raise Corrupt(f"is manifest {doc.get('index')!r}, the head lists it as {index}")
    shards = doc.get("shards")
    first, last = index * FANOUT, min(buckets, (index + 1) * FANOUT)
    if not isinstance(shards, list) or len(shards) != last - first:
        raise Corrupt(f"does not list the {last - first} buckets {first}..{last - 1}")
    out: dict[int, str] = {}
    for b, token in enumerate(shards, first):
        if token is None:
            continue
        shard = _name(token)
        if shard is None:
            raise Corrupt(f"lists {str(token)[:80]!r} for bucket {b}, not a shard")
        out[b] = shard
    return out


def listed_shards(name: str, data: bytes) -> list[str]:
    """The shard names a manifest lists, for garbage collection (which knows
    neither its index nor its bucket count); Corrupt if it is not a manifest."""
    shards = _checked(name, data, MANIFEST_KIND, None).get("shards")
    if not isinstance(shards, list):
        raise Corrupt("lists no shards")
    return [n for n in map(_name, shards) if n is not None]


def manifest_count(buckets: int) -> int:
    return (buckets + FANOUT - 1) // FANOUT


# --------------------------------------------------------------------------- the outbox

#: The audit outbox (the events sealed with a commit) stays in the head up to
#: this size; a larger one (a pass that moved thousands of rings) goes to
#: immutable documents of about :data:`OUTBOX_PIECE` bytes each, so the head
#: stays small whatever one commit records.
OUTBOX_INLINE, OUTBOX_PIECE = 16 * 1024, 64 * 1024


def encode_outbox(events: Iterable[dict[str, Any]], stamp: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each piece of an outbox, in order (``shards/o-<sha256>.json``)."""
    pieces: list[list[dict[str, Any]]] = [[]]
    size = 0
    for ev in events:
        n = len(_dumps(ev))
        if pieces[-1] and size + n > OUTBOX_PIECE:
            pieces.append([])
            size = 0
        pieces[-1].append(ev)
        size += n
    out = []
    for i, piece in enumerate(pieces):
        doc = {"kind": OUTBOX_KIND, "format": DOC_FORMAT, "piece": i, "stamp": stamp,
               "events": piece}
        # Not sorted: an event keeps the order of its members, as in the log.
        data = json.dumps(doc, separators=(",", ":")).encode()
        out.append((f"shards/o-{_digest(data)}.json", data))
    return out


def decode_outbox(name: str, data: bytes, piece: int) -> list[dict[str, Any]]:
    """The events of outbox piece ``piece``; Corrupt if it is not that piece.
    (The events themselves are checked by keymgr.audit against the chain.)"""
    doc = _checked(name, data, OUTBOX_KIND, None)
    events = doc.get("events")
    if doc.get("piece") != piece or not isinstance(events, list):
        raise Corrupt(f"is not piece {piece} of an outbox")
    if not all(isinstance(ev, dict) for ev in events):
        raise Corrupt("holds an event that is not an object")
    return events


# --------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class Sharding:
    """The head's ``sharding`` member."""

    buckets: int
    manifests: tuple[str, ...]
    #: Manifests and outbox pieces no head references any more, with when (ISO
    #: time on the writer's clock) they stopped being referenced: see
    #: keymgr.docstore's GC.
    garbage: tuple[tuple[str, str], ...] = ()
    #: The pieces of the audit outbox when it is not in the head (:data:`OUTBOX_INLINE`).
    outbox: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "buckets": self.buckets,
            "manifests": [_token(m) for m in self.manifests],
            "garbage": [list(g) for g in self.garbage],
            **({"outbox": list(self.outbox)} if self.outbox else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Sharding:
        if not isinstance(d, dict):
            raise ValueError("sharding: not an object")
        b = d.get("buckets")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1):
            raise ValueError(f"sharding.buckets: not a power of two: {b!r}")
        manifests = d.get("manifests")
        if not isinstance(manifests, list) or len(manifests) != manifest_count(b):
            raise ValueError(f"sharding.manifests: expected {manifest_count(b)} names")
        names = [_name(m, "m-") for m in manifests]
        for m, n in zip(manifests, names, strict=True):
            if n is None:
                raise ValueError(f"sharding.manifests: {str(m)[:80]!r} is not a manifest")
        garbage = d.get("garbage", [])
        if not isinstance(garbage, list):
            raise ValueError("sharding.garbage: not a list")
        for g in garbage:
            if not (
                isinstance(g, list)
                and len(g) == 2
                and isinstance(g[0], str)
                and (is_manifest_name(g[0]) or is_outbox_name(g[0]))
                and isinstance(g[1], str)
                and _SINCE.fullmatch(g[1])
            ):
                raise ValueError(f"sharding.garbage: bad entry {str(g)[:100]}")
        outbox = d.get("outbox", [])
        if not isinstance(outbox, list) or not all(
            isinstance(o, str) and is_outbox_name(o) for o in outbox
        ):
            raise ValueError("sharding.outbox: expected outbox piece names")
        garbage_t = tuple((g[0], g[1]) for g in garbage)
        return cls(b, tuple(n for n in names if n is not None), garbage_t, tuple(outbox))


def encode_head(state: State, version: int, sharding: Sharding) -> bytes:
    """The head: the state document's own members (no entities), ``format`` 2, ``sharding``."""
    rest = replace(state, rings={}, publishers={}, edges={}).to_dict()
    del rest["rings"], rest["publishers"]
    if sharding.outbox:
        rest["audit"]["outbox"] = []  # in the pieces the sharding member names
    doc = {"version": version, **rest, "format": HEAD_FORMAT, "sharding": sharding.to_dict()}
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode_head(doc: dict[str, Any]) -> tuple[State, int, Sharding]:
    """(state without entities, version, sharding) of a parsed head; ValueError if malformed."""
    if doc.get("format") != HEAD_FORMAT:
        raise ValueError(f"unsupported head format {doc.get('format')!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"bad version {version!r}")
    for member in ("rings", "publishers", "edges"):
        if member in doc:
            raise ValueError(f"a sharded head holds no {member}")
    sharding = Sharding.from_dict(doc.get("sharding"))
    rest = {k: v for k, v in doc.items() if k not in ("version", "sharding")}
    rest["format"] = 1
    return State.from_dict(rest), version, sharding


# --------------------------------------------------------------------------- diff


def _all_parts(state: State, chunks: Callable[[str], int | None]) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {}
    for n in sorted(set(state.publishers) | set(state.edges)):
        rec, edges = state.publishers.get(n), state.edges.get(n, {})
        parts.update(publisher_parts(n, rec, edges, chunks_for(_kid_count(rec, edges), chunks(n))))
    return parts


def entity_count(state: State) -> int:
    """About how many entities ``state`` makes (rings, publisher parts): for the bucket count."""
    n = len(state.rings)
    for p in set(state.publishers) | set(state.edges):
        n += 1 + chunks_for(_kid_count(state.publishers.get(p), state.edges.get(p, {})))
    return n


def changes(
    old: State,
    new: State,
    old_part: Callable[[str], dict[str, Any] | None],
) -> dict[str, Any]:
    """Entity key -> new value (a Ring, a part; None: gone) for every entity
    that differs between ``old`` (whose parts ``old_part`` looks up) and ``new``.

    Compared by identity first (State is immutable: an untouched ring is the
    same object), by value only when the objects differ, so an unchanged
    state of 10^5 rings costs a pass over two dicts and nothing more.
    """
    out: dict[str, Any] = {}
    if new.rings is not old.rings:
        for n in _differ(old.rings, new.rings):
            out[ring_key(n)] = new.rings.get(n)
    if new.publishers is not old.publishers or new.edges is not old.edges:
        for n in _differ(old.publishers, new.publishers) | _differ(old.edges, new.edges):
            head = old_part(publisher_key(n))
            value = head.get("chunks") if head else None
            current = value if isinstance(value, int) and value > 0 else None
            old_keys = {publisher_key(n)} if head else set()
            if current is not None:
                old_keys |= {f"k:{j}:{n}" for j in range(current)}
            rec, edges = new.publishers.get(n), new.edges.get(n, {})
            parts: dict[str, dict[str, Any]] = {}
            if rec is not None or edges:
                c = chunks_for(_kid_count(rec, edges), current)
                parts = publisher_parts(n, rec, edges, c)
            for key in old_keys | set(parts):
                value = parts.get(key)
                if value != old_part(key):
                    out[key] = value
    return out


def _differ(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[str]:
    out = {n for n, v in new.items() if (o := old.get(n)) is not v and o != v}
    out.update(n for n in old if n not in new)
    return out


def split(state: State, buckets: int, chunks: Callable[[str], int | None]) -> dict[int, Shard]:
    """Every entity of the state grouped into shards: bucket -> Shard (non-empty
    ones); ``chunks(publisher)``: its chunk count so far, if any."""
    out: dict[int, Shard] = {}

    def shard(key: str) -> Shard:
        b = bucket_of(key, buckets)
        s = out.get(b)
        if s is None:
            s = out[b] = Shard(b)
        return s

    for n, r in sorted(state.rings.items()):
        shard(ring_key(n)).rings[n] = r
    for key, value in _all_parts(state, chunks).items():
        shard(key).parts[key] = value
    return out


def apply(old: Shard | None, bucket: int, changed: Mapping[str, Any]) -> Shard:
    """Shard ``bucket`` after ``changed`` (entity key -> new value or None, all in it)."""
    rings = dict(old.rings) if old else {}
    parts = dict(old.parts) if old else {}
    for key, value in changed.items():
        if key.startswith("r:"):
            _put(rings, key[2:], value)
        else:
            _put(parts, key, value)
    return Shard(bucket, dict(sorted(rings.items())), dict(sorted(parts.items())))


def _put(d: dict[str, Any], name: str, value: Any) -> None:
    if value is None:
        d.pop(name, None)
    else:
        d[name] = value


def _publishers(
    shards: Iterable[Shard], names: set[str] | None = None
) -> tuple[dict[str, PublisherRecord], dict[str, Mapping[str, EdgeRecord]]]:
    """The publishers (all, or ``names``) rebuilt from the parts in ``shards``."""
    heads: dict[str, dict[str, Any]] = {}
    chunks: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for s in shards:
        for key, value in s.parts.items():
            owner = part_owner(key)
            if names is not None and owner not in names:
                continue
            if key.startswith("p:"):
                heads[owner] = value
            else:
                chunks.setdefault(owner, []).append((int(key.split(":", 2)[1]), value))
    pubs: dict[str, PublisherRecord] = {}
    edges: dict[str, Mapping[str, EdgeRecord]] = {}
    for owner in sorted(set(heads) | set(chunks)):
        if owner not in heads:
            raise ValueError(f"chunks of publisher {owner!r} without its record")
        parts = [c for _, c in sorted(chunks.get(owner, []), key=lambda jc: jc[0])]
        record, urls = build_publisher(owner, heads[owner], parts)
        if record is not None:
            pubs[owner] = record
        if urls:
            edges[owner] = urls
    return pubs, edges


def reassemble(
    head: State, old: State, before: Mapping[str, Shard], after: Mapping[str, Shard]
) -> State:
    """The whole state after a change from the shards ``before`` (name -> Shard,
    making up ``old``) to ``after``: ``old``'s entities, minus those of the
    shards that went, plus those of the shards that came; the publishers they
    hold parts of are rebuilt. Work proportional to the change (and one copy of
    the dicts), where :func:`assemble` sorts all. ValueError if inconsistent."""
    gone = [s for n, s in before.items() if n not in after]
    came = [s for n, s in after.items() if n not in before]
    rings = dict(old.rings)
    for s in gone:
        for n in s.rings:
            rings.pop(n, None)
    touched: set[str] = set()
    for s in (*gone, *came):
        touched |= s.owners()
    for s in came:
        rings.update(s.rings)
    pubs, edges = dict(old.publishers), dict(old.edges)
    if touched:
        for n in touched:
            pubs.pop(n, None)
            edges.pop(n, None)
        new_pubs, new_edges = _publishers(after.values(), touched)
        pubs.update(new_pubs)
        edges.update(new_edges)
    return replace(head, rings=rings, publishers=pubs, edges=edges)


def assemble(head: State, shards: Iterable[Shard]) -> State:
    """The whole state: the head's members plus every shard's entities, in name
    order; ValueError if the publisher parts do not fit together."""
    shards = list(shards)
    rings: dict[str, Ring] = {}
    for s in shards:
        rings.update(s.rings)
    pubs, edges = _publishers(shards)
    return replace(head, rings=dict(sorted(rings.items())), publishers=pubs, edges=edges)
