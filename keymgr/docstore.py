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
import json
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from keymgr.errors import ConflictError, StoreError
from keymgr.faults import crashpoint
from keymgr.logs import get_logger
from keymgr.model import State, gc_paused
from keymgr.stores import PassLock, StateStore

__all__ = [
    "LEASE",
    "LOCK",
    "STATE",
    "Blob",
    "DocumentAdapter",
    "SharedStore",
    "StateToken",
    "decode_state",
    "encode_state",
    "is_document_name",
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


# --------------------------------------------------------------------------- adapter


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
        """The document, or None when there is none."""

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
        # The last document parsed: its exact bytes, the State and its number.
        self._parsed: tuple[bytes, State, int] | None = None

    @property
    def location(self) -> str:
        return self.adapter.location

    # -- the state document ---------------------------------------------------------

    def load(self) -> tuple[State, StateToken | None]:
        """The state and its token; an empty state and None when there is no document."""
        blob = self.adapter.read(STATE)
        if blob is None:
            return State(), None
        # Parsing is the costly part (about 0.5 s for 10,000 rings): the same
        # bytes as last time give the same (immutable) State.
        parsed = self._parsed
        if parsed is not None and parsed[0] == blob.data:
            return parsed[1], StateToken(blob.version, parsed[2])
        state, number = decode_state(blob.data, self.location)
        self._parsed = (blob.data, state, number)
        return state, StateToken(blob.version, number)

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
        data = encode_state(state, number)
        crashpoint("store.before_write")
        try:
            if token is None:
                version = self.adapter.create(STATE, data)
            else:
                version = self.adapter.replace(STATE, data, token.version)
        except ConflictError:
            absent = ", absent" if token is None else ""
            raise ConflictError(
                f"state {self.location}: changed by another writer "
                f"(expected version {number - 1}{absent})"
            ) from None
        crashpoint("store.after_write")
        self._parsed = (data, state, number)
        return StateToken(version, number)

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
