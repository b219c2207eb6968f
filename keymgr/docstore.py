"""One shared-document store: CAS commit, pass lock and lease, written once over a tiny adapter.

A shared state store (S3, Vault KV v2, and later GCS, Azure Blob, ...) keeps
three small documents side by side:

- ``state``: the state document (the file store's JSON, with its version number);
- ``lock``: the *pass lock*, held for a whole reconcile pass (:meth:`SharedStore.exclusive`);
- ``lease``: the daemon replicas' lease record (:mod:`keymgr.lease`).

Everything keymgr decides about them -- the compare-and-swap commit, when a
lock is abandoned, renewal, release, the lease record's encoding -- lives in
:class:`SharedStore`, once. What differs between object stores is five
primitive operations, the :class:`DocumentAdapter`:

=============  ===============================  ============================  ==================
primitive      meaning                          S3                            Vault / OpenBao KV
=============  ===============================  ============================  ==================
``read``       bytes, version token, age        GetObject (ETag; Date minus   read (version;
                                                LastModified)                 Date minus
                                                                              created_time)
``create``     write if absent                  PutObject If-None-Match: *    write cas=0
``replace``    write if still at ``version``    PutObject If-Match: ETAG      write cas=N
``delete``     delete if still at ``version``   DeleteObject If-Match: ETAG   delete version N
``version``    the token alone (fingerprint)    HeadObject                    read metadata
=============  ===============================  ============================  ==================

GCS (``ifGenerationMatch=0`` / ``=G``) and Azure Blob (``If-None-Match: *`` /
``If-Match``) map the same way. An adapter does no keymgr logic; it only makes
each primitive exact (including its own retry subtleties: an S3 request that
botocore retried may have landed on the first attempt and lost to itself) and
turns every other failure into a one-line :class:`~keymgr.errors.StoreError`.

``keymgr.testing.docstore`` holds an in-memory adapter with fault knobs and the
conformance tests any adapter must pass.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import json
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

from keymgr.errors import ConflictError, StoreError
from keymgr.faults import crashpoint
from keymgr.logs import get_logger
from keymgr.model import State, gc_paused, gc_settled
from keymgr.shards import (
    FANOUT,
    OUTBOX_INLINE,
    Corrupt,
    Shard,
    Sharding,
    apply,
    assemble,
    bucket_of,
    buckets_for,
    changes,
    decode_head,
    decode_manifest,
    decode_outbox,
    decode_shard,
    encode_head,
    encode_manifest,
    encode_outbox,
    encode_shard,
    entity_count,
    is_manifest_name,
    is_outbox_name,
    is_shard_name,
    listed_shards,
    reassemble,
    split,
)
from keymgr.stores import SHARD_MODES, PassLock, StateStore
from keymgr.timefmt import format_time, parse_time

__all__ = [
    "LEASE",
    "LOCK",
    "MAX_PIECE_READ",
    "MAX_STATE_READ",
    "STATE",
    "Blob",
    "DocumentAdapter",
    "SharedStore",
    "StateLayout",
    "StateToken",
    "decode_state",
    "encode_state",
    "is_document_name",
    "read_limit",
]

log = get_logger("keymgr.docstore")

#: The three fixed document names an adapter maps to object keys / KV paths.
STATE, LOCK, LEASE = "state", "lock", "lease"
NAMES = (STATE, LOCK, LEASE)
#: Families of immutable documents written beside them, ``FAMILY/LEAF``: state
#: shards and manifests (``shards/<sha256>.json``) and audit events
#: (``audit/000000000123.json``). An adapter maps ``NAME`` to ``<state>.NAME``
#: like the fixed ones (``s3://b/keymgr/state.json.audit/000000000123.json``).
FAMILIES = ("shards", "audit")
_LEAF = re.compile(r"[0-9a-z][0-9a-z._-]{0,79}")
#: The longest suffix any document name adds to the state's address.
MAX_SUFFIX = 1 + len("shards/") + 80


def is_document_name(name: str) -> bool:
    """Whether ``name`` is one an adapter must accept: a fixed name or ``FAMILY/LEAF``."""
    if name in NAMES:
        return True
    family, sep, leaf = name.partition("/")
    return bool(sep) and family in FAMILIES and _LEAF.fullmatch(leaf) is not None

#: A lock's own ``ttl`` is trusted up to this (a damaged lock cannot block forever).
MAX_LOCK_TTL = 3600.0

#: The most keymgr reads of one document, never downloaded past: it writes no
#: larger one, so a larger one is something else (planted, or damaged), and
#: reading it whole could exhaust memory and crash-loop the daemon. The state
#: document: one of ``shards=off`` with 100,000 rings and two years of history
#: is 276 MiB (benchmarks/README.md); keymgr refuses to write one over this. ...
MAX_STATE_READ = 1 << 30
#: ... and every other document: a shard or manifest stays far below 256 KiB
#: by design (keymgr.shards), an outbox piece near 64 KiB, an audit event,
#: the lock and the lease a few hundred bytes.
MAX_PIECE_READ = 1 << 24


def read_limit(name: str) -> int:
    """The most keymgr reads of document ``name`` (:data:`MAX_STATE_READ`,
    :data:`MAX_PIECE_READ`)."""
    return MAX_STATE_READ if name == STATE else MAX_PIECE_READ


# --------------------------------------------------------------------------- adapter


def each(concurrency: int, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[fn(item) for item in items]``, up to ``concurrency`` calls at a time.

    The first failure (in ``items`` order) is raised once the calls under way
    have finished; calls not yet started are cancelled.
    """
    if concurrency <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(min(concurrency, len(items)), thread_name_prefix="keymgr-state")
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Blob:
    """One stored document as read."""

    data: bytes
    #: Opaque version token for :meth:`DocumentAdapter.replace` / ``delete``
    #: (an ETag, a KV version, a GCS generation). Compared only by the store.
    version: object
    #: Seconds since it was last written, on the *store's* clock (None: the
    #: store cannot tell). Never computed against this machine's clock.
    age: float | None = None


#: Connections a network adapter's HTTP client keeps open for reuse: the
#: documents read at once (:attr:`DocumentAdapter.concurrency`, 16) plus the
#: lock renewal, the lease and a signing or publishing thread. The SDKs'
#: default of 10 made each wave of 16 reads open 6 new connections (a TCP and
#: TLS handshake each on a real endpoint) and drop them again.
HTTP_POOL = 32


def widen_pools(session: Any) -> None:
    """Make every adapter of a ``requests.Session`` keep :data:`HTTP_POOL`
    connections, keeping its other settings (TLS, retries, block size).

    For SDKs that make their own session (google-cloud-storage, azure-core);
    duck-typed, so the core imports no HTTP library. Call it before the
    session sends anything: the adapters' pools are made anew.
    """
    for adapter in session.adapters.values():
        if hasattr(adapter, "init_poolmanager") and hasattr(adapter, "_pool_block"):
            # requests.HTTPAdapter keeps these for pickling; set them like __init__ does.
            adapter._pool_connections = adapter._pool_maxsize = HTTP_POOL
            adapter.init_poolmanager(HTTP_POOL, HTTP_POOL, block=adapter._pool_block)


class DocumentAdapter(abc.ABC):
    """Five primitives over one object store; names are ``state``, ``lock``,
    ``lease`` and the immutable ``FAMILY/LEAF`` documents (:func:`is_document_name`).

    Contract (``keymgr.testing.docstore.SharedStoreTests`` checks it):

    - every method raises :class:`~keymgr.errors.StoreError` with one line
      naming :attr:`location` and the operation for anything it cannot do;
    - ``create`` and ``replace`` raise :class:`~keymgr.errors.ConflictError`
      when the condition fails, and only then: a write that landed must not be
      reported as a conflict (an adapter whose client retries requests checks
      whether the retried write was its own);
    - version tokens need not be unique across contents (S3's ETag is an MD5
      of the bytes): the store makes every lock and lease write unique itself.
    """

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The state document's address, for messages (``s3://bucket/key``)."""

    def describe(self, name: str) -> str:
        """The address of document ``name``, for messages (``s3://bucket/key.lock``)."""
        return self.location if name == STATE else f"{self.location}.{name}"

    @abc.abstractmethod
    def read(self, name: str) -> Blob | None:
        """The document, or None when there is none.

        An adapter that learns the size before the body (a header, object
        metadata, ``fstat``) calls :meth:`check_size` with it first, so a
        document larger than keymgr ever writes is refused, not downloaded."""

    def check_size(self, name: str, size: int | None) -> None:
        """StoreError, one line, when document ``name`` of ``size`` bytes is
        larger than keymgr ever writes there (:func:`read_limit`)."""
        limit = read_limit(name)
        if size is not None and size > limit:
            raise StoreError(
                f"state {self.describe(name)}: holds {size} bytes, more than the {limit} "
                "keymgr writes there at most; not reading it"
            )

    @abc.abstractmethod
    def create(self, name: str, data: bytes) -> object:
        """Write ``data`` if no document ``name`` exists; its new version token."""

    @abc.abstractmethod
    def replace(self, name: str, data: bytes, version: object) -> object:
        """Write ``data`` if the document is still at ``version``; its new version token."""

    @abc.abstractmethod
    def delete(self, name: str, version: object) -> None:
        """Delete the document if still at ``version``: ConflictError if not; absent: done."""

    @abc.abstractmethod
    def version(self, name: str) -> object | None:
        """The current version token alone (one cheap metadata request), None when absent."""

    #: The largest document the store accepts, when known (bytes; None: no
    #: known limit). ``shards=off`` refuses a larger state with one clear line
    #: instead of the store's own refusal.
    max_document: ClassVar[int | None] = None

    #: How many documents one load or commit of a sharded state reads or writes
    #: at once. 1 (one after the other) for a local disk, where reading is
    #: parsing; a network store sets more, as each document is a round trip:
    #: 16,000 documents one after the other on S3 (~20 ms each) would be five
    #: minutes of a replica's start at 100,000 rings. The adapter's client must
    #: then be safe to call from several threads, and keep at least
    #: :data:`HTTP_POOL` connections open (the SDKs keep 10 by default: the
    #: other reads opened, and closed, a connection each).
    concurrency: ClassVar[int] = 1

    def discard(self, name: str) -> None:
        """Delete the immutable document ``name``, whatever its version; absent: done.

        Only for garbage collection of ``shards/...`` documents, which are
        never rewritten (content-named), so the version read just before is
        the one deleted. A read, not :meth:`version`, which may need more
        rights. An adapter with a cheaper unconditional delete overrides it
        (Vault KV: metadata and every version).
        """
        blob = self.read(name)
        if blob is not None:
            with contextlib.suppress(ConflictError):
                self.delete(name, blob.version)

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        """Every ``FAMILY/LEAF`` document with its age on the store's clock
        (None when the listing does not tell: :meth:`age` is then asked for
        the documents the sweep would delete), or None when the adapter cannot
        list (then orphans of crashed commits stay until removed by hand: see
        docs/scale.md)."""
        return None

    def age(self, name: str) -> float | None:
        """Seconds since ``name`` was last written, on the store's clock; None
        when absent or unknown. By default from a read (:class:`Blob`'s age)."""
        blob = self.read(name)
        return None if blob is None else blob.age


# --------------------------------------------------------------------------- state encoding


def encode_state(state: State, version: int) -> bytes:
    """The state document, byte for byte as the file, S3 and Vault KV stores have written it."""
    doc = {"version": version, **state.to_dict()}
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()


def decode_state(raw: bytes, where: str) -> tuple[State, int]:
    """The state and its version number; StoreError (one line) for anything else."""
    try:
        with gc_paused():
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            if "version" not in doc:
                raise ValueError("no version number")
            version = doc.pop("version")
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"bad version {version!r}")
            return State.from_dict(doc), version
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        reason = " ".join(str(e).split())[:200]
        raise StoreError(f"state {where}: corrupt state document ({reason})") from None


@dataclass(frozen=True)
class StateToken:
    """What :meth:`SharedStore.load` hands to :meth:`SharedStore.commit`."""

    #: The adapter's version token of the state document.
    version: object
    #: The document's own version number (``"version"`` in the JSON).
    number: int


# --------------------------------------------------------------------------- sharded state

#: ``shards=auto`` keeps one document until its encoding would pass this.
AUTO_THRESHOLD = 128 * 1024
#: Seconds an unreferenced shard or manifest is kept (longer than any load
#: takes, so a reader that just read an older head still finds what it names).
GC_GRACE = 900.0
#: Garbage entries kept in the head at most (about 100 bytes each), and the
#: least age at which the oldest go early when there are more.
MAX_GARBAGE, MIN_GRACE = 256, 60.0


class ShardGone(StoreError):
    """A document the head names is missing: the head may have moved on meanwhile."""


#: Buckets from which a whole read settles its objects (model.gc_settled):
#: about 10,000 rings (keymgr.shards sizes buckets to the ring count); below
#: that the collector's walks cost less than 0.3 s.
SETTLE_BUCKETS = 1024


def _settles(doc: dict[str, Any], snap: _Snapshot | None) -> bool:
    """Whether reading the sharded head ``doc`` is a whole read of a large
    state: the first, or after a single document, of at least SETTLE_BUCKETS."""
    if snap is not None and snap.sharding is not None:
        return False  # only the shards that changed are read
    sharding = doc.get("sharding")
    buckets = sharding.get("buckets") if isinstance(sharding, dict) else None
    return type(buckets) is int and buckets >= SETTLE_BUCKETS


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """One version of the state as loaded or committed, with what it was made of."""

    raw: bytes
    state: State
    number: int
    sharding: Sharding | None = None
    #: bucket -> shard name (sharded only).
    buckets: dict[int, str] = field(default_factory=dict)
    #: Manifest name -> its bucket -> shard name, for the manifests the head lists.
    manifests: dict[str, dict[int, str]] = field(default_factory=dict)
    #: Shard name -> its parsed entities, for the shards the manifests list.
    shards: dict[str, Shard] = field(default_factory=dict)


@dataclass(eq=False)
class PendingCommit:
    """A commit whose shards are written: the head to write, then what to collect."""

    head: bytes
    snapshot: _Snapshot
    #: Garbage manifests whose grace is over: collected once the head landed.
    collect: tuple[str, ...] = ()
    #: time.monotonic() when the first shard was written (None: none written).
    started: float | None = None
    written: int = 0


class StateLayout:
    """How a state is laid out over an adapter's documents: one document, or a
    sharded head with immutable shards and manifests (keymgr.shards, docs/scale.md).

    Shared by :class:`SharedStore` and the file store, which each write the
    head their own way (a CAS request; a rename under ``flock``) between
    :meth:`write` (shards and manifests, create-if-absent) and
    :meth:`committed` (garbage collection). Everything read is checked
    (keymgr.shards); a parsed shard or manifest is kept by name while the
    current head references it, so a load reads only what changed, and
    unchanged rings stay the same objects.

    ``mode``: ``auto`` (one document until it would pass :data:`AUTO_THRESHOLD`,
    then sharded for good), ``on``, ``off``. ``grace``: seconds an unreferenced
    document is kept; ``clock``: the wall clock garbage is dated with.
    """

    def __init__(
        self,
        adapter: DocumentAdapter,
        where: str,
        *,
        mode: str = "auto",
        grace: float = GC_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in SHARD_MODES:
            raise ValueError(f"shards: expected one of {', '.join(SHARD_MODES)}, got {mode!r}")
        self.adapter, self.where, self.mode = adapter, where, mode
        self.grace, self.clock = grace, clock
        self._snap: _Snapshot | None = None
        #: The version from which layout_event() announced the move to shards.
        self._migrate_from: int | None = None
        #: time.monotonic() of the last orphan sweep (None: not yet in this process).
        self._swept: float | None = None
        self._mutex = threading.Lock()

    @property
    def sharded(self) -> bool:
        """Whether the last state loaded or committed is sharded."""
        snap = self._snap
        return snap is not None and snap.sharding is not None

    # -- reading ------------------------------------------------------------------

    def decode(self, raw: bytes) -> tuple[State, int]:
        """The state of a head (or single document) as read; StoreError, one line.

        ShardGone when a document it names is missing (the caller re-reads the
        head: it may have moved on and the document been collected).
        """
        snap = self._snap
        if snap is not None and snap.raw == raw:
            return snap.state, snap.number
        try:
            with gc_paused():
                doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or "sharding" not in doc:
            state, number = decode_state(raw, self.where)
            new = _Snapshot(raw, state, number)
        else:
            # One pause for the whole read, not one per shard: re-enabled
            # between shards, the collector walked the growing heap of decoded
            # rings each time (2.7 s of a 100,000-ring load). A whole read of
            # a large state then takes its objects out of the collector's
            # walks (gc_settled).
            with gc_settled() if _settles(doc, snap) else gc_paused():
                new = self._decode_sharded(raw, doc, snap)
        with self._mutex:
            self._snap = new
        return new.state, new.number

    def _decode_sharded(self, raw: bytes, doc: dict[str, Any], old: _Snapshot | None) -> _Snapshot:
        try:
            head, number, sharding = decode_head(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise StoreError(f"state {self.where}: corrupt state head ({reason})") from None
        b = sharding.buckets
        known_m = old.manifests if old is not None else {}
        known_s = old.shards if old is not None else {}
        n = self.adapter.concurrency
        missing = [(j, name) for j, name in enumerate(sharding.manifests) if name not in known_m]
        got_m = each(n, lambda m: self._fetch(
            m[1], functools.partial(decode_manifest, index=m[0], buckets=b)), missing)  # fmt: skip
        fetched = {name: mapping for (_, name), mapping in zip(missing, got_m, strict=True)}
        manifests: dict[str, dict[int, str]] = {}
        buckets: dict[int, str] = {}
        for name in sharding.manifests:
            mapping = known_m[name] if name in known_m else fetched[name]
            manifests[name] = mapping
            buckets.update(mapping)
        wanted = sorted(buckets.items())
        todo = [
            (bucket, name) for bucket, name in wanted
            if (s := known_s.get(name)) is None or s.bucket != bucket
        ]  # fmt: skip
        got = each(n, lambda t: self._fetch(
            t[1], functools.partial(decode_shard, bucket=t[0], buckets=b)), todo)  # fmt: skip
        new_shards = dict(zip(todo, got, strict=True))
        shards: dict[str, Shard] = {}
        for bucket, name in wanted:
            key = (bucket, name)
            shards[name] = new_shards[key] if key in new_shards else known_s[name]
        try:
            with gc_paused():
                if old is not None and old.sharding is not None:
                    state = reassemble(head, old.state, old.shards, shards)
                else:
                    state = assemble(head, shards.values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise StoreError(f"state {self.where}: corrupt publisher records ({reason})") from None
        if sharding.outbox:
            events: list[dict[str, Any]] = []
            for i, name in enumerate(sharding.outbox):
                events += self._fetch(name, functools.partial(decode_outbox, piece=i))
            state = replace(state, audit=replace(state.audit, outbox=tuple(events)))
        return _Snapshot(raw, state, number, sharding, buckets, manifests, shards)

    def _fetch(self, name: str, parse: Callable[[str, bytes], Any]) -> Any:
        blob = self.adapter.read(name)
        where = self.adapter.describe(name)
        if blob is None:
            raise ShardGone(f"state {self.where}: {where}: missing (named by the state head)")
        try:
            return parse(name, blob.data)
        except Corrupt as e:
            raise StoreError(f"state {self.where}: {where}: {e}; not trusting it") from None

    # -- the layout of the next commit ----------------------------------------------

    def layout_event(self, state: State, base: int) -> dict[str, Any] | None:
        """The audit event of the commit of ``state`` over version ``base`` when
        that commit is the one that moves the state to shards; else None."""
        self._migrate_from = None
        snap = self._snap
        if self.mode == "off" or (snap is not None and snap.sharding is not None):
            return None
        if self.mode == "on":
            reason = "shards=on"
        else:
            if snap is not None and snap.number == base and len(snap.raw) > AUTO_THRESHOLD:
                size = len(snap.raw)
            else:
                size = len(encode_state(state, base + 1))
                if size <= AUTO_THRESHOLD:
                    return None
            reason = f"state document of {size} bytes, more than {AUTO_THRESHOLD} (shards=auto)"
        self._migrate_from = base
        b = buckets_for(entity_count(state))
        count = len(split(state, b, lambda _: None))
        return {
            "event": "state.sharded",
            "ts": state.clock or datetime.now(UTC).replace(microsecond=0),
            "buckets": b,
            "shards": count,
            "reason": reason,
        }

    def _shard_next(self, snap: _Snapshot | None, base: int) -> bool:
        if snap is not None and snap.sharding is not None:
            if self.mode == "off":
                raise StoreError(
                    f"state {self.where}: the state is sharded; shards=off cannot write it "
                    "back as one document (use shards=auto)"
                )
            return True
        return self.mode == "on" or (self.mode == "auto" and self._migrate_from == base)

    # -- writing ------------------------------------------------------------------

    def write(
        self, state: State, number: int, read_head: Callable[[], bytes | None]
    ) -> PendingCommit:
        """Write the shards and manifests of ``state`` as version ``number``
        (over ``number - 1``) and return the head to write; nothing else written.

        Only the buckets whose entities changed (by identity, then value, from
        the version it replaces) are written, and their manifests. When the
        snapshot is of another version, the head is read (``read_head``)
        first; ConflictError when the store is not at ``number - 1``.
        """
        base = number - 1
        snap = self._snap
        if base == 0:
            snap = None
        elif snap is None or snap.number != base:
            raw = read_head()
            current = self.decode(raw)[1] if raw is not None else 0
            if current != base:
                raise ConflictError(
                    f"state {self.where}: changed by another writer (version {current}, "
                    f"expected {base})"
                )
            snap = self._snap
        if not self._shard_next(snap, base):
            data = encode_state(state, number)
            limit = self.adapter.max_document
            if limit is not None and len(data) > limit:
                raise StoreError(
                    f"state {self.where}: the state document would be {len(data)} bytes, more "
                    f"than the {limit} the store accepts; use shards=auto (docs/scale.md)"
                )
            if len(data) > MAX_STATE_READ:
                raise StoreError(
                    f"state {self.where}: the state document would be {len(data)} bytes, more "
                    f"than the {MAX_STATE_READ} keymgr reads back; use shards=auto "
                    "(docs/scale.md)"
                )
            return PendingCommit(data, _Snapshot(data, state, number))
        return self._write_sharded(state, number, snap)

    def _write_sharded(self, state: State, number: int, snap: _Snapshot | None) -> PendingCommit:
        stamp = f"{number}.{uuid.uuid4().hex[:16]}"
        old = snap if snap is not None and snap.sharding is not None else None
        b = buckets_for(entity_count(state), old.sharding.buckets if old and old.sharding else None)
        writes: list[tuple[str, bytes]] = []
        shards = dict(old.shards) if old else {}
        manifests = dict(old.manifests) if old else {}
        dropped: list[str] = []  # manifests this commit stops referencing

        def old_part(key: str) -> dict[str, Any] | None:
            """A publisher part as the snapshot being replaced holds it."""
            if old is None or old.sharding is None:
                return None
            shard = old.shards.get(old.buckets.get(bucket_of(key, old.sharding.buckets), ""))
            return shard.parts.get(key) if shard is not None else None

        def old_chunks(publisher: str) -> int | None:
            head = old_part(f"p:{publisher}")
            c = head.get("chunks") if head else None
            return c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else None

        if old is not None and old.sharding is not None and old.sharding.buckets == b:
            buckets = dict(old.buckets)
            heads = list(old.sharding.manifests)
            by_bucket: dict[int, dict[str, Any]] = {}
            for key, value in changes(old.state, state, old_part).items():
                by_bucket.setdefault(bucket_of(key, b), {})[key] = value
            for bucket, changed in sorted(by_bucket.items()):
                previous = buckets.get(bucket)
                shard = apply(shards.get(previous) if previous else None, bucket, changed)
                if previous is not None:
                    shards.pop(previous, None)
                if shard:
                    name, data = encode_shard(shard, b, stamp)
                    writes.append((name, data))
                    shards[name], buckets[bucket] = shard, name
                else:
                    buckets.pop(bucket, None)
            for j in sorted({bucket // FANOUT for bucket in by_bucket}):
                mapping = dict(manifests.pop(heads[j], {}))
                for bucket in by_bucket:
                    if bucket // FANOUT == j:
                        if bucket in buckets:
                            mapping[bucket] = buckets[bucket]
                        else:
                            mapping.pop(bucket, None)
                name, data = encode_manifest(j, b, mapping, stamp)
                writes.append((name, data))
                dropped.append(heads[j])
                heads[j], manifests[name] = name, mapping
        else:
            # Everything, once: the move to shards, or a doubled bucket count.
            if old is not None and old.sharding is not None:
                dropped = list(old.sharding.manifests)
            shards, manifests, buckets, heads = {}, {}, {}, []
            for bucket, shard in split(state, b, old_chunks).items():
                name, data = encode_shard(shard, b, stamp)
                writes.append((name, data))
                shards[name], buckets[bucket] = shard, name
            for j in range((b + FANOUT - 1) // FANOUT):
                mapping = {k: v for k, v in buckets.items() if k // FANOUT == j}
                name, data = encode_manifest(j, b, mapping, stamp)
                writes.append((name, data))
                heads.append(name)
                manifests[name] = mapping
        # A large audit outbox (a pass that moved thousands of rings) goes to
        # pieces of its own, so the head stays small whatever a commit records.
        outbox: tuple[str, ...] = ()
        if len(_dumps_events(state.audit.outbox)) > OUTBOX_INLINE:
            pieces = encode_outbox(state.audit.outbox, stamp)
            writes += pieces
            outbox = tuple(name for name, _ in pieces)
        if old is not None and old.sharding is not None:
            dropped += old.sharding.outbox
        now = self.clock()
        since = format_time(datetime.fromtimestamp(now, UTC).replace(microsecond=0)) or ""
        keep: list[tuple[str, str]] = []
        collect: list[str] = []
        for name, when in old.sharding.garbage if old and old.sharding else ():
            if now - parse_time(when).timestamp() > self.grace:
                collect.append(name)
            else:
                keep.append((name, when))
        # The head must stay small however often commits come: past
        # MAX_GARBAGE entries the oldest go early, though never before
        # MIN_GRACE (far longer than any load takes).
        excess = len(keep) + len(dropped) - MAX_GARBAGE
        while excess > 0 and keep and now - parse_time(keep[0][1]).timestamp() > MIN_GRACE:
            collect.append(keep.pop(0)[0])
            excess -= 1
        keep += [(name, since) for name in dropped]
        sharding = Sharding(b, tuple(heads), tuple(keep), outbox)
        head = encode_head(state, number, sharding)
        started = time.monotonic()
        each(self.adapter.concurrency, lambda w: self._create(*w), writes)
        crashpoint("store.shards_written")
        new = _Snapshot(head, state, number, sharding, buckets, manifests, shards)
        return PendingCommit(head, new, tuple(collect), started, sum(len(d) for _, d in writes))

    def _create(self, name: str, data: bytes) -> None:
        """Create-if-absent; an existing document with exactly these bytes is fine
        (a retried request that landed: names are content hashes)."""
        try:
            self.adapter.create(name, data)
        except ConflictError:
            blob = self.adapter.read(name)
            if blob is None or blob.data != data:
                raise StoreError(
                    f"state {self.where}: {self.adapter.describe(name)}: exists with other "
                    "content; not trusting it"
                ) from None

    def committed(self, pending: PendingCommit) -> None:
        """The head of ``pending`` landed: remember it, then collect expired garbage.

        A garbage manifest's shards that the new head no longer lists are
        deleted with it: a shard stops being referenced only in a commit that
        replaces its manifest, so the last manifest naming it is garbage too.
        Failures are logged, not raised (the commit landed; what is left is an
        orphan, see :meth:`sweep`).
        """
        with self._mutex:
            self._snap = pending.snapshot
            self._migrate_from = None
        if pending.snapshot.sharding is not None and (
            self._swept is None or time.monotonic() - self._swept > self.grace
        ):
            # Orphans of crashed commits: once per process and grace (a listing).
            self._swept = time.monotonic()
            self.sweep()
        if not pending.collect:
            return
        crashpoint("store.before_gc")
        live = set(pending.snapshot.buckets.values())
        for manifest in pending.collect:
            try:
                blob = self.adapter.read(manifest) if is_manifest_name(manifest) else None
                if blob is not None:
                    for shard in listed_shards(manifest, blob.data):
                        if shard not in live:
                            self.adapter.discard(shard)
                self.adapter.discard(manifest)
            except (StoreError, Corrupt) as e:
                where = self.adapter.describe(manifest)
                log.warning("shards.gc_failed", document=where, error=str(e))

    # -- orphans of crashed commits -------------------------------------------------------

    def sweep(self) -> int:
        """Delete shards and manifests no head references that are older than the
        grace on the store's clock (left by a commit that crashed or lost its
        CAS); how many. Nothing when the adapter cannot list or the state is
        not sharded. Garbage still listed in the head is left to :meth:`committed`.

        The snapshot must be the current head (just committed or loaded): a
        later head only references documents its predecessors referenced or
        that its commit wrote less than the grace ago, never ones that were
        unreferenced (names are never reused), so none of those is deleted.
        """
        snap = self._snap
        if snap is None or snap.sharding is None:
            return 0
        try:
            listed = self.adapter.names("shards")
        except StoreError as e:
            log.warning("shards.sweep_failed", state=self.where, error=str(e))
            return 0
        if listed is None:
            return 0
        referenced = set(snap.buckets.values()) | set(snap.sharding.manifests)
        referenced |= set(snap.sharding.outbox)
        # Garbage is still within its grace, and so is every shard its
        # manifests list (a reader of an older head may need them): an old
        # shard replaced a moment ago is not an orphan, however old the file.
        sure = True
        for name, _ in snap.sharding.garbage:
            referenced.add(name)
            if not is_manifest_name(name):
                continue
            try:
                blob = self.adapter.read(name)
                if blob is None:
                    sure = False
                else:
                    referenced.update(listed_shards(name, blob.data))
            except (StoreError, Corrupt):
                sure = False
        gone = 0
        for name, age in listed:
            if name in referenced:
                continue
            if not (
                is_manifest_name(name) or is_outbox_name(name) or (sure and is_shard_name(name))
            ):
                continue
            try:
                if age is None:  # a listing without times (Vault KV): ask the orphans only
                    age = self.adapter.age(name)
                if age is None or age <= self.grace:
                    continue
                self.adapter.discard(name)
                gone += 1
            except StoreError as e:
                where = self.adapter.describe(name)
                log.warning("shards.sweep_failed", document=where, error=str(e))
        return gone




# --------------------------------------------------------------------------- the store


@dataclass(eq=False)
class _HeldLock:
    """The pass lock this store holds: its version, renewed in the background until released."""

    version: object
    #: time.monotonic() when the last successful renewal was *sent* (it landed at
    #: or after that, so the store's age of the lock is at most now - renewed).
    renewed: float = field(default_factory=time.monotonic)
    lost: str | None = None
    #: Another process replaced it (so it is not ours to delete).
    taken: bool = False
    #: Why the last renewal failed (for the message when the lock is lost).
    last_error: str | None = None
    #: Bodies of renewals whose answer never came (they may have landed), and when sent.
    unsure: dict[bytes, float] = field(default_factory=dict)
    released: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    mutex: threading.Lock = field(default_factory=threading.Lock)


class SharedStore(StateStore):
    """A :class:`StateStore` over a :class:`DocumentAdapter`: state, pass lock and lease.

    ``lock_ttl``: seconds after its last renewal that an abandoned pass lock
    may be taken over; the holder renews every ``lock_ttl / 3`` and refuses
    to commit once it has not renewed for ``lock_ttl``. ``takeover_grace``:
    :meth:`exclusive` waits at least ``lock_ttl + takeover_grace`` so that a
    pass started right after a crash outlasts the dead holder's lock (the
    default covers the 1 s resolution of HTTP dates and slow requests).
    """

    #: ``KeyManager.sign`` asks for a fingerprint (one metadata request) at
    #: most once a second: a request before every signature would double a busy
    #: signer's requests. A promotion by another replica is seen within that
    #: second, which the timing rules allow (see ``KeyManager._check_fresh``).
    fingerprint_window: ClassVar[float] = 1.0
    #: Capability flags (for the lead's StateStore capability API).
    supports_lease: ClassVar[bool] = True
    shared: ClassVar[bool] = True

    def __init__(
        self,
        adapter: DocumentAdapter,
        *,
        url: str | None = None,
        lock_ttl: float = 30.0,
        takeover_grace: float = 5.0,
        owner: str | None = None,
        shards: str = "auto",
    ) -> None:
        if not math.isfinite(lock_ttl) or lock_ttl <= 0:
            raise ValueError(f"lock_ttl: expected a positive number of seconds, got {lock_ttl!r}")
        self.adapter = adapter
        self.url = url or adapter.location
        self.lock_ttl = float(lock_ttl)
        self.takeover_grace = float(takeover_grace)
        #: Seconds releasing waits for a renewal in flight.
        self.release_wait = 1.0
        #: Who holds the pass lock, as written into it (host:pid:random).
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # The pass lock within this process: re-entrant per thread (see exclusive()).
        self._pass = PassLock()
        self._held: _HeldLock | None = None
        self._holder: int | None = None  # threading.get_ident() of the holding thread
        self._interrupted = threading.Event()  # interrupt(): wait for no lock
        #: One document or a sharded head (keymgr.shards); keeps the last state
        #: loaded or committed, so equal bytes give the same State object.
        self.layout = StateLayout(adapter, adapter.location, mode=shards)

    def set_shards(self, mode: str) -> None:
        """``?shards=auto|on|off`` of the state URL (keymgr.stores.open_store)."""
        self.layout = StateLayout(self.adapter, self.adapter.location, mode=mode)

    @property
    def location(self) -> str:
        return self.adapter.location

    # -- the state document ---------------------------------------------------------

    def load(self) -> tuple[State, StateToken | None]:
        """The state and its token; an empty state and None when there is no document.

        Parsing is the costly part (about 0.5 s for 10,000 rings in one
        document): the same bytes as last time give the same (immutable)
        State, and a sharded head reads only the shards that changed. A shard
        missing behind a head that has moved on meanwhile (collected after the
        newer head) is a reason to read the head again, not an error.
        """
        for attempt in range(3):
            blob = self.adapter.read(STATE)
            if blob is None:
                return State(), None
            try:
                state, number = self.layout.decode(blob.data)
            except ShardGone:
                if attempt < 2 and self.adapter.version(STATE) != blob.version:
                    continue
                raise
            return state, StateToken(blob.version, number)
        raise AssertionError("unreachable")  # pragma: no cover

    def layout_event(self, state: State, token: StateToken | None) -> dict[str, Any] | None:
        """The ``state.sharded`` audit event when committing ``state`` over
        ``token`` moves the state to shards (see :class:`StateLayout`)."""
        return self.layout.layout_event(state, 0 if token is None else token.number)

    def commit(self, state: State, token: StateToken | None) -> StateToken:
        """Write ``state`` if the document is still at ``token`` (None: still absent).

        Refused (StoreError) when this thread holds the pass lock and lost it
        or could not renew it for ``lock_ttl``: another process may hold it now
        and act on the same keys; the write itself would be safe (CAS) but the
        side effects before it were not coordinated, so the pass stops and the
        next one re-plans.
        """
        lost = self.lock_lost()
        if lost is not None:
            raise StoreError(f"state {self.location}: pass lock lost ({lost}); not writing")
        number = 1 if token is None else token.number + 1
        absent = ", absent" if token is None else ""
        crashpoint("store.before_write")

        def head() -> bytes | None:
            blob = self.adapter.read(STATE)
            return None if blob is None else blob.data

        try:
            pending = self.layout.write(state, number, head)
        except ConflictError:
            raise ConflictError(
                f"state {self.location}: changed by another writer "
                f"(expected version {number - 1}{absent})"
            ) from None
        started = pending.started
        if started is not None and time.monotonic() - started > self.layout.grace / 2:
            # The orphan sweep may take shards this old for a crashed commit's.
            raise StoreError(f"state {self.location}: commit took too long; not writing the head")
        data = pending.head
        try:
            if token is None:
                version = self.adapter.create(STATE, data)
            else:
                version = self.adapter.replace(STATE, data, token.version)
        except ConflictError:
            raise ConflictError(
                f"state {self.location}: changed by another writer "
                f"(expected version {number - 1}{absent})"
            ) from None
        crashpoint("store.after_write")
        self.layout.committed(pending)
        return StateToken(version, number)

    def sweep(self) -> int:
        """Delete shards left by crashed commits (:meth:`StateLayout.sweep`); how many.

        Against the head as it is now: a head loaded long ago would not name
        the shards of the commits since, and they are older than the grace.
        """
        self.load()
        return self.layout.sweep()

    def fingerprint(self) -> object:
        """The state document's version token (one metadata request), None when unknown.

        None makes the caller re-read the state, which then reports the real
        failure; callers limit how often they ask (:attr:`fingerprint_window`).
        """
        try:
            return self.adapter.version(STATE)
        except StoreError:
            return None

    # -- the replicas' lease (keymgr.lease) ---------------------------------------------

    def read_lease(self) -> tuple[dict[str, Any] | None, object]:
        """The lease record and its token; (None, None) when there is none yet.

        A record that is not a JSON object (a hand edit, a truncated upload)
        reads as ``{}``: :class:`~keymgr.lease.Lease` treats that as expired
        and replaces it, still by CAS, instead of every replica failing forever.
        """
        blob = self.adapter.read(LEASE)
        if blob is None:
            return None, None
        try:
            doc = json.loads(blob.data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            log.warning("lease.unreadable", lease=self.adapter.describe(LEASE))
            doc = {}
        doc.pop("nonce", None)
        return doc, blob.version

    def write_lease(self, doc: dict[str, Any], token: object) -> object:
        """Create (``token`` None) or compare-and-swap the lease record.

        A ``nonce`` makes every write's bytes unique: an S3 ETag is the MD5 of
        the content, and two writes of identical bytes would otherwise let a
        stale token match again.
        """
        body = json.dumps({**doc, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()
        try:
            if token is None:
                return self.adapter.create(LEASE, body)
            return self.adapter.replace(LEASE, body, token)
        except ConflictError:
            raise ConflictError(
                f"lease {self.adapter.describe(LEASE)}: changed by another replica"
            ) from None

    # -- the pass lock ------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the pass lock for a whole pass; re-entrant per *thread*.

        CAS alone keeps the document consistent, but not the side effects
        around it: two concurrent passes would each create a backend key for
        the same rotation, and one would see the other's fresh, not yet
        committed key as an orphan. The lock is one document created if
        absent, renewed by compare-and-swap every ``lock_ttl / 3`` while the
        pass runs, deleted (if still ours) at the end; one left behind by a
        crashed process is taken over once the *store's* clock says it was not
        renewed for its ``ttl`` -- never this machine's clock, so clock skew
        between replicas cannot make a live lock look abandoned. We wait at
        least ``lock_ttl + takeover_grace`` so a pass started right after a
        crash does not fail.

        Re-entrant per thread, like every store's (:class:`keymgr.stores.PassLock`):
        a mark per object would let another thread walk past the lock the pass
        holds, which is why the daemon once needed its own lock around such calls.
        """
        wait = max(timeout, self.lock_ttl + self.takeover_grace)

        def busy() -> StoreError:
            return StoreError(
                f"state {self.location}: another pass of this process has held the lock "
                f"for more than {wait:g}s"
            )

        with self._pass.hold(wait, lambda: self._store_lock(wait), busy):
            yield

    def interrupt(self) -> None:
        self._interrupted.set()

    @contextlib.contextmanager
    def _store_lock(self, wait: float) -> Iterator[None]:
        """The lock document, for the outermost :meth:`exclusive` of a thread."""
        held = self._acquire(wait)
        self._held, self._holder = held, threading.get_ident()
        try:
            yield
        finally:
            self._held, self._holder = None, None
            self._release(held)

    def lock_lost(self) -> str | None:
        """Why the pass lock this thread holds is lost, or None (also when not holding it).

        Lost: taken over by another process, or not renewed for ``lock_ttl``
        (measured on this machine's monotonic clock from when the last
        successful renewal was sent, which is what the store's age of the lock
        can at most be).
        """
        held = self._held
        if held is None or self._holder != threading.get_ident():
            return None
        with held.mutex:
            if held.lost is None and time.monotonic() - held.renewed > self.lock_ttl:
                why = f": {held.last_error}" if held.last_error else ""
                held.lost = f"not renewed for {self.lock_ttl:g}s{why}"
            return held.lost

    def _lock_body(self) -> bytes:
        # The nonce makes every write unique (see write_lease): a renewal must
        # change the version token, and takeover decisions rest on its age.
        # "holder" (not "owner") because the Vault KV store wrote it so: a
        # process of the previous release reads this lock as held.
        body = {"holder": self.owner, "ttl": self.lock_ttl, "nonce": uuid.uuid4().hex}
        return json.dumps(body, sort_keys=True).encode()

    def _lock_info(self, blob: Blob) -> tuple[str | None, float]:
        """(holder, ttl) of a lock as read; holder None: released (marked free).

        The ttl is the one the holder wrote (its renewal cadence; a holder
        with a longer ttl than ours renews less often than we would), within
        (0, MAX_LOCK_TTL]; ours when the lock does not say.
        """
        try:
            doc = json.loads(blob.data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            return "unknown", self.lock_ttl
        if "holder" in doc and doc["holder"] is None:
            return None, self.lock_ttl  # the previous Vault KV store released so
        holder = doc.get("holder") or doc.get("owner") or "unknown"
        return str(holder)[:200], _seconds(doc.get("ttl")) or self.lock_ttl

    def _acquire(self, wait: float) -> _HeldLock:
        deadline = time.monotonic() + wait
        holder = "unknown"
        while True:
            try:
                return self._start(self.adapter.create(LOCK, self._lock_body()))
            except ConflictError:
                pass
            blob = self.adapter.read(LOCK)
            if blob is None:
                if time.monotonic() < deadline:
                    # Released in between: try again (almost) at once.
                    time.sleep(random.uniform(0.0, 0.02))  # noqa: S311 - jitter, not crypto
                    continue
            else:
                who, ttl = self._lock_info(blob)
                abandoned = blob.age is not None and blob.age > ttl
                if who is None or abandoned:
                    try:
                        version = self.adapter.replace(LOCK, self._lock_body(), blob.version)
                    except ConflictError:
                        pass  # another process was quicker: look again
                    else:
                        if who is not None:
                            log.warning(
                                "lock.taken_over",
                                lock=self.adapter.describe(LOCK),
                                holder=who,
                                age=blob.age,
                            )
                        return self._start(version)
                holder = who or "unknown"
            if self._interrupted.is_set():
                raise StoreError(
                    f"state {self.location}: held by another keymgr process ({holder}, lock "
                    f"{self.adapter.describe(LOCK)}); not waiting for it: keymgr is stopping"
                )
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"state {self.location}: held by another keymgr process ({holder}, lock "
                    f"{self.adapter.describe(LOCK)}) for more than {wait:g}s"
                )
            time.sleep(random.uniform(0.05, 0.25))  # noqa: S311 - jitter, not crypto

    def _start(self, version: object) -> _HeldLock:
        held = _HeldLock(version)
        thread = threading.Thread(
            target=self._renew_loop, args=(held,), name="keymgr-pass-lock", daemon=True
        )
        held.thread = thread
        thread.start()
        return held

    def _renew_loop(self, held: _HeldLock) -> None:
        while not held.stop.wait(self.lock_ttl / 3):
            body = self._lock_body()
            sent = time.monotonic()
            with held.mutex:
                version = held.version
            try:
                new = self.adapter.replace(LOCK, body, version)
            except ConflictError:
                if held.unsure and self._landed(held):
                    continue
                with held.mutex:
                    held.taken = True
                    held.lost = held.lost or "taken over by another process"
                return
            except StoreError as e:
                # The answer is lost, not necessarily the write: remember the
                # body, so a later conflict can tell our own write from a takeover.
                reason = str(e).removeprefix(f"state {self.location}: ")
                with held.mutex:
                    held.unsure[body] = sent
                    held.last_error = reason
                continue
            with held.mutex:
                held.version, held.renewed = new, sent
                held.unsure.clear()
                held.last_error = None
                late = held.released
            if late:
                # Landed after _release() deleted the lock with the older version.
                self._delete_lock(new)
                return

    def _landed(self, held: _HeldLock) -> bool:
        """Whether a renewal whose answer was lost is the lock as stored now (then adopt it)."""
        try:
            blob = self.adapter.read(LOCK)
        except StoreError:
            return False
        if blob is None:
            return False
        with held.mutex:
            sent = held.unsure.get(blob.data)
            if sent is None:
                return False
            held.version, held.renewed = blob.version, sent
            held.unsure.clear()
            return True

    def _release(self, held: _HeldLock) -> None:
        held.stop.set()
        if held.thread is not None:
            # Not waiting out a renewal stuck in an outage: if it lands after
            # the delete below, the renewal thread deletes it again (released).
            held.thread.join(timeout=self.release_wait)
        with held.mutex:
            held.released = True
            version, taken = held.version, held.taken
        if taken:
            return  # not ours: never delete over the new holder
        # Also after "not renewed": the delete is conditional on our version,
        # so it removes the lock only if nobody took it over meanwhile.
        self._delete_lock(version)

    def _delete_lock(self, version: object) -> None:
        try:
            self.adapter.delete(LOCK, version)
        except StoreError as e:  # ConflictError included: taken over; else it expires
            log.warning("lock.release_failed", lock=self.adapter.describe(LOCK), error=str(e))

    def __repr__(self) -> str:
        return f"SharedStore({self.location!r})"


def _seconds(value: object) -> float | None:
    """A TTL as written into a lock: a positive finite number (capped), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return min(float(value), MAX_LOCK_TTL)


def _dumps_events(events: tuple[dict[str, Any], ...]) -> bytes:
    """The outbox as the head would hold it (its size decides where it goes)."""
    return json.dumps(list(events), separators=(",", ":"), default=str).encode()
