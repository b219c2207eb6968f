"""An in-memory :class:`~keymgr.docstore.DocumentAdapter` and the conformance tests of any adapter.

- :class:`MemoryAdapter`: the three documents in a dict, thread-safe, with a
  :class:`FakeClock` for each document's ``age`` and fault knobs.
- :class:`FaultyAdapter`: the same fault knobs around *any* adapter (a real
  S3 or Vault one), so the fault tests run against real servers too.
- :class:`SharedStoreTests`: the CAS, pass lock and lease tests of
  :class:`~keymgr.docstore.SharedStore`, written once. Subclass it and provide
  a ``harness`` fixture returning a :class:`DocHarness` for your adapter, as
  ``tests/test_docstore.py`` (memory) and ``tests/test_docstore_real.py`` (moto
  S3, OpenBao KV) do; a third-party adapter (GCS, Azure Blob) proves itself the
  same way. It extends :class:`keymgr.testing.conformance.StoreTests` (the
  contract of every state store, run on ``harness.store()``) with what needs
  several processes, the adapter's documents or its exact messages.

Fault knobs (:class:`FaultKnobs`, on both adapters). A *pattern* names an
operation (``read``, ``create``, ``replace``, ``delete``, ``version``), a
document (``state``, ``lock``, ``lease``), both (``replace:lock``) or ``*``:

- ``fail(pattern, times=None)``: the call raises StoreError, nothing happens;
- ``land_then_fail(pattern, times=None)``: a write lands, then the call raises
  StoreError (a request whose answer was lost: a timeout after the server
  acted, the S3 "retried request landed on the first attempt" case);
- ``hang(pattern)``: the call blocks until :meth:`FaultKnobs.unhang` (then
  goes through, like a stopped server that resumes) or ``hang_limit`` seconds
  (then StoreError); ``down = True``: every call fails;
- ``calls``: every ``(operation, name)`` asked, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from unittest.mock import patch

import pytest

from keymgr.docstore import (
    LEASE,
    LOCK,
    STATE,
    Blob,
    DocumentAdapter,
    SharedStore,
    StateToken,
    encode_state,
    is_document_name,
)
from keymgr.errors import ConflictError, StoreError
from keymgr.lease import Lease
from keymgr.model import State
from keymgr.testing.conformance import T0, WAIT, StoreTests, sample_state

__all__ = [
    "DocHarness",
    "FakeClock",
    "FaultKnobs",
    "FaultyAdapter",
    "MemoryAdapter",
    "PassThread",
    "SharedStoreTests",
    "bump",
    "sample_state",
    "sharded_state",
]

T = TypeVar("T")

OPERATIONS = ("read", "create", "replace", "delete", "version")
_WRITES = frozenset({"create", "replace", "delete"})


# --------------------------------------------------------------------------- clock


class FakeClock:
    """The store's clock: follows ``time.monotonic()`` plus jumps; can be frozen.

    ``advance(s)`` moves it (and so every document's age) ``s`` seconds on
    at once; ``freeze()`` stops it while real time goes on, which is how a
    test shows that nothing is judged on the local clock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = 0.0
        self._frozen: float | None = None

    def __call__(self) -> float:
        with self._lock:
            if self._frozen is not None:
                return self._frozen
            return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            if self._frozen is not None:
                self._frozen += seconds
            else:
                self._offset += seconds

    def freeze(self) -> None:
        now = self()
        with self._lock:
            self._frozen = now

    def thaw(self) -> None:
        with self._lock:
            if self._frozen is not None:
                self._offset = self._frozen - time.monotonic()
                self._frozen = None


# --------------------------------------------------------------------------- fault knobs


class FaultKnobs:
    """Fail, lose the answer of, or hang chosen calls (see the module docstring)."""

    #: Seconds a hung call waits for unhang() before it fails (no test blocks forever).
    hang_limit: float = 10.0

    def _init_knobs(self) -> None:
        self._knob_lock = threading.Lock()
        self._failing: dict[str, int | None] = {}
        self._landing: dict[str, int | None] = {}
        self._hanging: set[str] = set()
        self._resume = threading.Event()
        self.down = False
        self.calls: list[tuple[str, str]] = []

    @property
    def location(self) -> str:
        raise NotImplementedError

    def fail(self, pattern: str, times: int | None = None) -> None:
        with self._knob_lock:
            self._failing[pattern] = times

    def land_then_fail(self, pattern: str, times: int | None = None) -> None:
        with self._knob_lock:
            self._landing[pattern] = times

    def hang(self, pattern: str) -> None:
        with self._knob_lock:
            if not self._hanging:
                self._resume = threading.Event()
            self._hanging.add(pattern)

    def unhang(self) -> None:
        """Every hung call goes on (and lands, if it is a write)."""
        with self._knob_lock:
            self._hanging.clear()
            self._resume.set()

    def clear(self) -> None:
        """No more faults (hung calls go on)."""
        self.unhang()
        with self._knob_lock:
            self._failing.clear()
            self._landing.clear()
            self.down = False

    @staticmethod
    def _matches(pattern: str, op: str, name: str) -> bool:
        return pattern in ("*", op, name, f"{op}:{name}")

    def _take(self, armed: dict[str, int | None], op: str, name: str) -> bool:
        with self._knob_lock:
            for pattern, left in armed.items():
                if self._matches(pattern, op, name):
                    if left is not None:
                        if left <= 1:
                            del armed[pattern]
                        else:
                            armed[pattern] = left - 1
                    return True
        return False

    def _call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        where = f"state {self.location}: {op} {name}"
        with self._knob_lock:
            self.calls.append((op, name))
            hung = any(self._matches(p, op, name) for p in self._hanging)
            resume = self._resume
        if hung and not resume.wait(self.hang_limit):
            raise StoreError(f"{where}: no answer within {self.hang_limit:g}s (hung)")
        if self.down or self._take(self._failing, op, name):
            raise StoreError(f"{where}: injected failure")
        result = fn()
        if op in _WRITES and self._take(self._landing, op, name):
            raise StoreError(f"{where}: answer lost (the write landed)")
        return result


# --------------------------------------------------------------------------- adapters


@dataclass
class _Doc:
    data: bytes
    version: object
    written: float


class MemoryAdapter(FaultKnobs, DocumentAdapter):
    """The documents in memory; thread-safe; ages on a :class:`FakeClock`.

    ``content_tokens`` (default): a version token is a hash of the bytes, like
    an S3 ETag, so identical bytes give identical tokens (the store must make
    its lock and lease writes unique); False: a counter, like a KV version.
    ``ages=False``: a store that cannot tell a document's age.
    """

    def __init__(
        self,
        location: str = "memory://keymgr/state.json",
        *,
        clock: FakeClock | None = None,
        content_tokens: bool = True,
        ages: bool = True,
    ) -> None:
        self._location = location
        self.clock = clock or FakeClock()
        self.content_tokens = content_tokens
        self.ages = ages
        self._docs: dict[str, _Doc] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._init_knobs()

    @property
    def location(self) -> str:
        return self._location

    def _token(self, data: bytes) -> object:
        if self.content_tokens:
            return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        return next(self._counter)

    @staticmethod
    def _check(name: str) -> None:
        if not is_document_name(name):
            raise StoreError(f"unknown document {name!r}")

    def _store(self, name: str, data: bytes) -> object:
        token = self._token(bytes(data))
        self._docs[name] = _Doc(bytes(data), token, self.clock())
        return token

    def read(self, name: str) -> Blob | None:
        def op() -> Blob | None:
            self._check(name)
            with self._lock:
                doc = self._docs.get(name)
                if doc is None:
                    return None
                self.check_size(name, len(doc.data))
                age = self.clock() - doc.written if self.ages else None
                return Blob(doc.data, doc.version, age)

        return self._call("read", name, op)

    def create(self, name: str, data: bytes) -> object:
        def op() -> object:
            self._check(name)
            with self._lock:
                if name in self._docs:
                    raise ConflictError(f"state {self.location}: create {name}: exists")
                return self._store(name, data)

        return self._call("create", name, op)

    def replace(self, name: str, data: bytes, version: object) -> object:
        def op() -> object:
            self._check(name)
            with self._lock:
                doc = self._docs.get(name)
                if doc is None or doc.version != version:
                    raise ConflictError(f"state {self.location}: replace {name}: changed or gone")
                return self._store(name, data)

        return self._call("replace", name, op)

    def delete(self, name: str, version: object) -> None:
        def op() -> None:
            self._check(name)
            with self._lock:
                doc = self._docs.get(name)
                if doc is None:
                    return
                if doc.version != version:
                    raise ConflictError(f"state {self.location}: delete {name}: changed")
                del self._docs[name]

        self._call("delete", name, op)

    def version(self, name: str) -> object | None:
        def op() -> object | None:
            self._check(name)
            with self._lock:
                doc = self._docs.get(name)
                return None if doc is None else doc.version

        return self._call("version", name, op)

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        with self._lock:
            now = self.clock()
            return [
                (n, now - d.written if self.ages else None)
                for n, d in self._docs.items()
                if n.startswith(f"{family}/")
            ]

    # -- what a test looks at or does behind the store's back (no knobs, no calls) ----

    def peek(self, name: str) -> bytes | None:
        with self._lock:
            doc = self._docs.get(name)
            return None if doc is None else doc.data

    def poke(self, name: str, data: bytes | None) -> None:
        """Overwrite (or with None remove) a document out of band, like a hand edit."""
        with self._lock:
            if data is None:
                self._docs.pop(name, None)
            else:
                self._store(name, data)

    def __repr__(self) -> str:
        return f"MemoryAdapter({self.location!r})"


class FaultyAdapter(FaultKnobs, DocumentAdapter):
    """Any adapter, with the fault knobs in front of it (one process's view of a real store)."""

    def __init__(self, inner: DocumentAdapter) -> None:
        self.inner = inner
        self._init_knobs()

    @property
    def location(self) -> str:
        return self.inner.location

    def describe(self, name: str) -> str:
        return self.inner.describe(name)

    def read(self, name: str) -> Blob | None:
        return self._call("read", name, lambda: self.inner.read(name))

    def create(self, name: str, data: bytes) -> object:
        return self._call("create", name, lambda: self.inner.create(name, data))

    def replace(self, name: str, data: bytes, version: object) -> object:
        return self._call("replace", name, lambda: self.inner.replace(name, data, version))

    def delete(self, name: str, version: object) -> None:
        self._call("delete", name, lambda: self.inner.delete(name, version))

    def version(self, name: str) -> object | None:
        return self._call("version", name, lambda: self.inner.version(name))

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        return self.inner.names(family)

    # The inner adapter's own, never the defaults built on read and delete: a
    # store's age (Vault KV: its metadata) and its delete for good (Vault KV:
    # every version) are what the sweep runs against.
    def age(self, name: str) -> float | None:
        return self._call("age", name, lambda: self.inner.age(name))

    def discard(self, name: str) -> None:
        self._call("discard", name, lambda: self.inner.discard(name))

    def __repr__(self) -> str:
        return f"FaultyAdapter({self.inner!r})"


# --------------------------------------------------------------------------- harness


@dataclass
class DocHarness:
    """What the conformance tests need to know about one adapter.

    ``factory`` returns a new adapter over the *same* documents each call
    (another process's view; it may return one shared thread-safe object).
    ``elapse(s)`` lets ``s`` seconds pass on the store's clock (a fake clock
    jumps; a real store: ``time.sleep``); ``now()`` reads a clock that runs
    with the store's (the fake clock; ``time.monotonic`` for a real store);
    ``resolution``: how coarse the store's idea of a document's age is (1 s
    for HTTP ``Date`` headers). ``lock_ttl`` is the pass lock TTL the tests
    use: small, but several times ``resolution`` plus a request's latency.
    """

    factory: Callable[[], DocumentAdapter]
    lock_ttl: float
    elapse: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.monotonic
    resolution: float = 0.0

    def store(self, adapter: DocumentAdapter | None = None) -> SharedStore:
        """A store as one process would open it (no takeover grace: tests wait exactly)."""
        store = SharedStore(
            adapter if adapter is not None else self.factory(),
            lock_ttl=self.lock_ttl,
            takeover_grace=0.0,
        )
        store.release_wait = 0.2
        return store

    def faulty(self) -> FaultyAdapter:
        return FaultyAdapter(self.factory())


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class PassThread(threading.Thread):
    """``store.exclusive(timeout)`` in a thread of its own, held until ``leave`` is set."""

    def __init__(self, store: SharedStore, timeout: float, now: Callable[[], float]) -> None:
        super().__init__(daemon=True)
        self.store, self.timeout, self.now = store, timeout, now
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.entered_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.store.exclusive(timeout=self.timeout):
                self.entered_at = self.now()
                self.entered.set()
                self.leave.wait(WAIT)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self) -> None:
        self.leave.set()
        self.join(WAIT)
        assert not self.is_alive(), "the pass did not end"
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _one_line(exc: type[BaseException]) -> Iterator[Any]:
    with pytest.raises(exc) as info:
        yield info
    assert "\n" not in str(info.value), str(info.value)


def _holder(adapter: DocumentAdapter) -> Any:
    blob = adapter.read(LOCK)
    return None if blob is None else json.loads(blob.data).get("holder")


# --------------------------------------------------------------------------- the tests


class SharedStoreTests(StoreTests):
    """CAS commit, pass lock and lease of :class:`SharedStore`, over any adapter.

    Subclass as ``TestMyAdapter(SharedStoreTests)`` and define a ``harness``
    fixture returning a :class:`DocHarness` over fresh, empty documents. The
    tests of :class:`~keymgr.testing.conformance.StoreTests` run too, on
    ``harness.store()``; the ones here add what only a shared store has:
    several processes on one document, the lock and lease documents, the
    adapter's faults and the exact messages.
    """

    @pytest.fixture
    def store(self, harness: DocHarness) -> SharedStore:
        """The :class:`StoreTests` fixture: one process's store over the harness."""
        return harness.store()

    # -- the state document --------------------------------------------------------

    def test_first_commit_creates_if_absent(self, harness: DocHarness) -> None:
        a, b = harness.store(), harness.store()
        state, token = a.load()
        assert state == State() and token is None and a.fingerprint() is None
        t1 = a.commit(sample_state(1), None)
        assert t1.number == 1
        with _one_line(ConflictError) as info:  # created meanwhile: create-if-absent fails
            b.commit(sample_state(2), None)
        assert str(info.value) == (
            f"state {a.location}: changed by another writer (expected version 0, absent)"
        )
        blob = harness.factory().read(STATE)
        assert blob is not None and blob.data == encode_state(sample_state(1), 1)
        assert b.load() == (sample_state(1), t1)

    def test_immutable_family_documents(self, harness: DocHarness) -> None:
        """``FAMILY/LEAF`` documents (shards, audit events): create-if-absent has
        one winner, they read back exactly, and they are apart from the state."""
        a, b = harness.factory(), harness.factory()
        names = ["audit/000000000001.json", "shards/" + "ab" * 32 + ".json"]
        for name in names:
            assert is_document_name(name)
            assert a.read(name) is None
            a.create(name, b'{"n":1}')
            with _one_line(ConflictError):
                b.create(name, b'{"n":2}')
            blob = b.read(name)
            assert blob is not None and blob.data == b'{"n":1}'
        assert a.read(STATE) is None
        assert not is_document_name("audit/../state") and not is_document_name("other/x")

    def test_compare_and_swap_has_one_winner(self, harness: DocHarness) -> None:
        a, b, c = harness.store(), harness.store(), harness.store()
        a.commit(sample_state(1), None)
        (_, tb), (_, tc) = b.load(), c.load()
        assert tb == tc and tb is not None
        t2 = b.commit(sample_state(2), tb)
        assert t2.number == 2 and t2 != tb
        with _one_line(ConflictError) as info:
            c.commit(sample_state(3), tc)
        assert str(info.value) == (
            f"state {a.location}: changed by another writer (expected version 1)"
        )
        assert a.load() == (sample_state(2), t2)
        # Many writers from the same version at once: exactly one wins.
        results: list[object] = []

        def write(n: int) -> None:
            try:
                results.append(harness.store().commit(sample_state(10 + n), t2))
            except ConflictError as e:
                results.append(e)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert len(results) == 6, results
        won = [r for r in results if isinstance(r, StateToken)]
        assert len(won) == 1, results
        state, token = a.load()
        assert token == won[0] and token.number == 3 and state.clock is not None

    def test_fingerprint_changes_on_commit(self, harness: DocHarness) -> None:
        a, b = harness.store(), harness.store()
        assert a.fingerprint() is None
        a.commit(sample_state(1), None)
        f1 = a.fingerprint()
        assert f1 is not None and b.fingerprint() == f1 == a.fingerprint()
        state, token = b.load()
        b.commit(state, token)  # the same state again: still a new document version
        f2 = a.fingerprint()
        assert f2 is not None and f2 != f1

    def test_a_document_that_is_not_a_state_is_one_line(self, harness: DocHarness) -> None:
        writer, store = harness.factory(), harness.store()
        where = f"state {store.location}: corrupt state document ("
        for raw in (
            b"\x00garbage",
            b"[1, 2]",
            b'{"format": 1}',
            b'{"version": "one", "format": 1}',
            b'{"version": 1, "format": "nope"}',
            b'{"version": 1, "format": 1, "rings": {"r": 7}}',
            b"[" * 50_000 + b"]" * 50_000,
        ):
            blob = writer.read(STATE)
            if blob is None:
                writer.create(STATE, raw)
            else:
                writer.replace(STATE, raw, blob.version)
            with _one_line(StoreError) as info:
                store.load()
            assert not isinstance(info.value, ConflictError)
            assert str(info.value).startswith(where), (raw[:40], str(info.value))
            assert len(str(info.value)) < 400

    def test_a_document_larger_than_keymgr_writes_is_refused(self, harness: DocHarness) -> None:
        """A state document or a shard larger than keymgr ever writes there
        (docstore.read_limit; made small here) is refused in one line naming
        it, before its body is read: the adapter calls ``check_size`` with
        the size the store reports."""
        from keymgr import docstore

        writer, store = harness.factory(), harness.store()
        store.set_shards("on")
        store.commit(sharded_state(4), None)
        head = writer.read(STATE)
        assert head is not None
        with patch.object(docstore, "MAX_PIECE_READ", 64), _one_line(StoreError) as info:
            harness.store().load()
        message = str(info.value)
        assert "more than the 64 keymgr writes there at most" in message, message
        assert f"state {store.location}.shards/" in message, message
        big = head.data + b" " * (4096 - len(head.data))
        writer.replace(STATE, big, head.version)
        with patch.object(docstore, "MAX_STATE_READ", 4095), _one_line(StoreError) as info:
            harness.store().load()
        message = str(info.value)
        assert f"state {store.location}: holds 4096 bytes, more than the 4095" in message, message
        assert harness.store().load()[0] == sharded_state(4)  # the limits as they are

    def test_commit_whose_answer_was_lost(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a = harness.store(faulty)
        t1 = a.commit(sample_state(1), None)
        # Failed before reaching the store: an error, nothing written.
        faulty.fail("replace:state", times=1)
        with _one_line(StoreError) as info:
            a.commit(sample_state(2), t1)
        assert not isinstance(info.value, ConflictError)
        assert a.load() == (sample_state(1), t1)
        # Landed, answer lost: an error, and the stale token cannot write again.
        faulty.land_then_fail("replace:state", times=1)
        with _one_line(StoreError) as info:
            a.commit(sample_state(2), t1)
        assert not isinstance(info.value, ConflictError)
        state, t2 = a.load()
        assert state == sample_state(2) and t2 is not None and t2.number == 2
        with pytest.raises(ConflictError):
            a.commit(sample_state(3), t1)

    def test_store_errors_are_one_line(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a = harness.store(faulty)
        a.commit(sample_state(1), None)
        faulty.fail("read")
        for call in (a.load, a.read_lease):
            with _one_line(StoreError) as info:
                call()
            assert not isinstance(info.value, ConflictError)
            assert str(info.value).startswith(f"state {a.location}: read ")
        faulty.fail("version")
        assert a.fingerprint() is None
        faulty.fail("create:lock")
        with _one_line(StoreError) as info, a.exclusive(timeout=0.1):
            raise AssertionError("unreachable")
        assert str(info.value).startswith(f"state {a.location}: create lock")
        faulty.clear()
        assert a.load()[0] == sample_state(1)

    # -- the lease record ------------------------------------------------------------

    def test_lease_compare_and_swap_and_unique_tokens(self, harness: DocHarness) -> None:
        a, b = harness.store(), harness.store()
        assert a.read_lease() == (None, None)
        doc = {"holder": "a", "expires": "2031-03-01T08:00:30Z", "renewed": "2031-03-01T08:00:00Z"}
        t1 = a.write_lease(doc, None)
        with _one_line(ConflictError) as info:  # both saw "no lease": one creates it
            b.write_lease({**doc, "holder": "b"}, None)
        assert str(info.value) == (
            f"lease {a.adapter.describe(LEASE)}: changed by another replica"
        )
        assert b.read_lease() == (doc, t1)
        t2 = a.write_lease(doc, t1)  # the same record again: a new token all the same
        assert t2 != t1
        with pytest.raises(ConflictError):  # a stale token never matches again
            b.write_lease(doc, t1)
        results: list[object] = []

        def write(who: str) -> None:
            try:
                results.append(harness.store().write_lease({**doc, "holder": who}, t2))
            except ConflictError as e:
                results.append(e)

        threads = [threading.Thread(target=write, args=(f"r{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert len(results) == 6 and sum(not isinstance(r, ConflictError) for r in results) == 1
        assert harness.factory().read(STATE) is None  # beside the state, never in it

        # keymgr.lease.Lease on top: one holder at a time, takeover after expiry.
        ttl = timedelta(seconds=30)
        la, lb = Lease(a, ttl, holder="a"), Lease(b, ttl, holder="b")
        assert la.acquire(T0 + 2 * ttl) is True
        assert lb.acquire(T0 + 2 * ttl) is False
        assert la.acquire(T0 + 2.5 * ttl) is True  # renewed
        assert lb.acquire(T0 + 3 * ttl) is False
        assert lb.acquire(T0 + 3.5 * ttl + timedelta(seconds=1)) is True  # a stopped renewing
        assert la.acquire(T0 + 4 * ttl) is False
        lb.release()
        assert la.acquire(T0 + 4 * ttl) is True

        # A damaged record reads as {} (expired) and is replaced, still by CAS.
        writer = harness.factory()
        blob = writer.read(LEASE)
        assert blob is not None
        writer.replace(LEASE, b"\x00garbage", blob.version)
        assert a.read_lease()[0] == {}
        assert lb.acquire(T0 + 4 * ttl) is True

    # -- the pass lock ----------------------------------------------------------------

    def test_pass_lock_serialises_processes(self, harness: DocHarness) -> None:
        a, b = harness.store(), harness.store()
        reader = harness.factory()
        with a.exclusive():
            assert _holder(reader) == a.owner
            other = PassThread(b, 30.0, harness.now)
            other.start()
            assert not other.entered.wait(0.2)  # b waits for a's pass
        assert other.entered.wait(WAIT)
        assert _holder(reader) == b.owner
        other.finish()
        assert reader.read(LOCK) is None  # released: deleted

    def test_pass_lock_is_reentrant_per_thread(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a = harness.store(faulty)
        with a.exclusive():
            with a.exclusive():  # the same thread nests (a command that reconciles)
                t1 = a.commit(sample_state(1), None)
            assert _holder(faulty.inner) == a.owner  # still held after the inner exit
            # Another thread of the same process (a daemon event, a reload) queues.
            other = PassThread(a, 30.0, harness.now)
            other.start()
            assert not other.entered.wait(0.2)
            a.commit(sample_state(2), t1)
        assert other.entered.wait(WAIT)
        other.finish()
        assert faulty.calls.count(("create", LOCK)) == 2
        assert faulty.inner.read(LOCK) is None
        with pytest.raises(RuntimeError), a.exclusive():  # released on an error too
            raise RuntimeError("boom")
        assert faulty.inner.read(LOCK) is None

    def test_a_live_lock_is_renewed_and_never_taken_over(self, harness: DocHarness) -> None:
        a, b = harness.store(), harness.store()
        reader = harness.factory()
        ttl = harness.lock_ttl
        with a.exclusive():
            first = reader.read(LOCK)
            assert first is not None
            start = time.monotonic()
            with _one_line(StoreError) as info, b.exclusive(timeout=0.1):
                raise AssertionError("took a live lock")
            waited = time.monotonic() - start
            assert ttl * 0.9 <= waited < ttl + 5, waited  # waits lock_ttl + grace (0 here)
            assert str(info.value) == (
                f"state {a.location}: held by another keymgr process ({a.owner}, lock "
                f"{a.adapter.describe(LOCK)}) for more than {ttl:g}s"
            )
            now = reader.read(LOCK)
            assert now is not None and now.version != first.version  # renewed meanwhile
            assert now.age is None or now.age <= ttl
            assert a.lock_lost() is None
            a.commit(sample_state(1), None)

    def test_an_unrenewed_lock_refuses_to_commit(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a = harness.store(faulty)
        with a.exclusive():
            faulty.hang("replace:lock")  # renewals stall (a partitioned process)
            time.sleep(harness.lock_ttl * 1.3)
            with _one_line(StoreError) as info:
                a.commit(sample_state(1), None)
            assert str(info.value) == (
                f"state {a.location}: pass lock lost (not renewed for "
                f"{harness.lock_ttl:g}s); not writing"
            )
            faulty.unhang()
        assert a.load() == (State(), None)

    def test_takeover_only_after_lock_ttl_on_the_store_clock(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a, b = harness.store(faulty), harness.store()
        reader = harness.factory()
        ttl = harness.lock_ttl
        with a.exclusive():
            acquired = harness.now()
            faulty.hang("replace:lock")  # a stops renewing, as a crashed process
            other = PassThread(b, 4 * ttl + 10, harness.now)
            other.start()
            assert not other.entered.wait(min(0.3, ttl / 3))  # still fresh
            harness.elapse(ttl + harness.resolution + 0.2)
            assert other.entered.wait(WAIT)
            assert other.entered_at is not None
            assert other.entered_at - acquired >= ttl - harness.resolution
            assert _holder(reader) == b.owner
            # a's stalled renewal comes back, fails, and a knows it lost the lock.
            faulty.unhang()
            _wait_for(lambda: a.lock_lost() is not None, "a to notice")
            with _one_line(StoreError) as info:
                a.commit(sample_state(1), None)
            assert str(info.value).startswith(f"state {a.location}: pass lock lost (")
            assert str(info.value).endswith("); not writing")
        assert _holder(reader) == b.owner  # a's release left b's lock alone
        other.finish()
        assert reader.read(LOCK) is None
        assert b.commit(sample_state(2), None).number == 1

    def test_release_deletes_only_its_own_lock(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a = harness.store(faulty)
        thief = harness.factory()
        stolen = b'{"holder": "thief", "nonce": "1", "ttl": 600}'
        with a.exclusive():
            faulty.hang("replace:lock")  # a does not notice what happens next
            blob = thief.read(LOCK)
            assert blob is not None
            thief.replace(LOCK, stolen, blob.version)
        # a's release was a delete of *its* version: the thief's lock stays.
        now = thief.read(LOCK)
        assert now is not None and now.data == stolen
        faulty.unhang()
        thief.delete(LOCK, now.version)
        assert thief.read(LOCK) is None

    def test_a_renewal_whose_answer_was_lost_keeps_the_lock(self, harness: DocHarness) -> None:
        faulty = harness.faulty()
        a = harness.store(faulty)
        with a.exclusive():
            # The renewal lands but its answer is lost; the next one then conflicts
            # with our own write, which must not read as a takeover.
            faulty.land_then_fail("replace:lock", times=1)
            time.sleep(harness.lock_ttl * 1.2)
            assert a.lock_lost() is None
            a.commit(sample_state(1), None)
        assert faulty.inner.read(LOCK) is None  # released with the adopted version

    def test_a_lock_marked_free_is_taken_at_once(self, harness: DocHarness) -> None:
        # How the Vault KV store of the previous release let go of its lock.
        harness.factory().create(LOCK, b'{"holder": null, "ttl": 20.0}')
        a = harness.store()
        start = time.monotonic()
        with a.exclusive(timeout=0.1):
            assert time.monotonic() - start < harness.lock_ttl
            assert _holder(harness.factory()) == a.owner
        assert harness.factory().read(LOCK) is None

    # -- sharded state (keymgr.shards, docs/scale.md) -----------------------------------

    def test_sharded_round_trip_writes_only_what_changed(self, harness: DocHarness) -> None:
        """A one-ring change writes one shard, one manifest and the head; a
        reader fetches just those and keeps every other ring object."""
        faulty = harness.faulty()
        a, b = harness.store(faulty), harness.store()
        a.set_shards("on")
        b.set_shards("on")
        state = sharded_state(120)
        t1 = a.commit(state, None)
        assert b.load() == (state, t1)
        # The head is small and names no ring; everything is in shards.
        head = harness.factory().read(STATE)
        assert head is not None and b"tenant-" not in head.data and len(head.data) < 4096
        loaded = b.load()[0]
        assert b.load()[0] is loaded  # unchanged store: the same object
        changed = bump(loaded, "tenant-007")
        faulty.calls.clear()
        t2 = a.commit(changed, t1)
        writes = [(op, name) for op, name in faulty.calls if op in ("create", "replace")]
        kinds = sorted(("manifest" if "/m-" in n else "shard") if op == "create" else n
                       for op, n in writes)
        assert kinds == ["manifest", "shard", "state"], writes
        reader = harness.faulty()
        b.adapter = reader
        b.layout.adapter = reader
        again, t = b.load()
        assert (again, t) == (changed, t2)
        reads = [n for op, n in reader.calls if op == "read"]
        assert len(reads) == 3, reads  # the head, one manifest, one shard
        assert again.rings["tenant-008"] is loaded.rings["tenant-008"]
        # Nothing changed: the head alone is written (a new version), no shard.
        faulty.calls.clear()
        a.commit(again, t2)
        assert [c for c in faulty.calls if c[0] == "create"] == []

    def test_sharded_compare_and_swap_and_a_missing_shard(self, harness: DocHarness) -> None:
        a, b = harness.store(), harness.store()
        a.set_shards("on")
        b.set_shards("on")
        t1 = a.commit(sharded_state(40), None)
        (sa, ta), (sb, tb) = a.load(), b.load()
        a.commit(bump(sa, "tenant-001"), ta)
        with _one_line(ConflictError):
            b.commit(bump(sb, "tenant-002"), tb)
        assert b.load()[0] == bump(sa, "tenant-001")
        assert t1.number == 1
        # A shard the head names that is gone (deleted by hand): one line naming it.
        a.load()
        layout = a.layout._snap
        assert layout is not None
        victim = layout.buckets[sorted(layout.buckets)[0]]
        harness.factory().discard(victim)
        fresh = harness.store()
        with _one_line(StoreError) as info:
            fresh.load()
        assert victim in str(info.value) and "missing" in str(info.value)

    def test_sharded_garbage_is_collected_after_the_grace_only(self, harness: DocHarness) -> None:
        a = harness.store()
        a.set_shards("on")
        now = [1_000_000.0]
        a.layout.clock = lambda: now[0]
        a.layout.grace = 60.0
        t: StateToken | None = a.commit(sharded_state(30), None)
        s1, t = a.load()
        snap = a.layout._snap
        assert snap is not None and snap.sharding is not None
        old_manifest = snap.sharding.manifests[0]
        old_shards = set(snap.buckets.values())
        # A reader that read this head and is still fetching its shards ...
        reader_head = harness.factory().read(STATE)
        assert reader_head is not None
        t = a.commit(bump(s1, "tenant-003"), t)
        s2, t = a.load()
        now[0] += 30  # within the grace: nothing is deleted
        t = a.commit(bump(s2, "tenant-004"), t)
        docs = harness.factory()
        assert all(docs.read(n) is not None for n in old_shards | {old_manifest})
        slow = harness.store()
        assert slow.layout.decode(reader_head.data)[0] == s1  # still complete
        now[0] += 61  # past the grace: the first manifest and its replaced shard go
        s3, t = a.load()
        a.commit(bump(s3, "tenant-005"), t)
        assert docs.read(old_manifest) is None
        live = set(a.layout._snap.buckets.values()) if a.layout._snap else set()
        gone = {n for n in old_shards if docs.read(n) is None}
        assert gone and not gone & live
        listed = docs.names("shards")
        if listed is not None:  # collected for good: no tombstone left to list again
            assert not gone & {n for n, _ in listed}, gone
        assert harness.store().load()[0] == a.load()[0]

    def test_sharded_orphans_are_swept_by_listing(self, harness: DocHarness) -> None:
        """Shards of a commit that died before its head, listed by ``names``:
        kept while younger than the grace (a commit may be in flight), then
        deleted; nothing a head references is touched."""
        a = harness.store()
        s, orphans = _orphans_of_a_crashed_commit(harness, a)
        if orphans is None:
            # An adapter that cannot list never sweeps: the orphans stay
            # (docs/scale.md), and nothing the head references is touched.
            a.layout.grace = 0.0
            harness.elapse(1.0 + harness.resolution)
            assert a.sweep() == 0
            assert harness.store().load()[0] == s
            return
        listed = harness.factory().names("shards")
        assert listed is not None and len(listed) >= 4
        assert all(age is None or age >= -1 - harness.resolution for _, age in listed)
        a.layout.grace = 1.0 + 2 * harness.resolution
        assert a.sweep() == 0
        harness.elapse(a.layout.grace + harness.resolution + 0.5)
        assert a.sweep() == 2
        assert harness.store().load()[0] == s

    def test_a_sweep_goes_on_past_an_orphan_it_cannot_delete(self, harness: DocHarness) -> None:
        """An outage on one orphan (its age or its delete refused) is logged
        and the sweep goes on to the next; the orphan is deleted by a later
        sweep, and nothing a head references is touched meanwhile."""
        if harness.factory().names("shards") is None:
            return  # cannot list: nothing is swept (test_sharded_orphans_are_swept_by_listing)
        faulty = harness.faulty()
        a = harness.store(faulty)
        s, left = _orphans_of_a_crashed_commit(harness, a)
        assert left is not None
        orphans = sorted(left)
        assert len(orphans) == 2, orphans

        def listed() -> set[str]:
            got = harness.factory().names("shards")
            assert got is not None
            return {n for n, _ in got}

        before = listed() - left
        # Whichever the store asks: its age (a listing without times), its delete.
        faulty.fail(f"age:{orphans[0]}", times=1)
        faulty.fail(f"discard:{orphans[0]}", times=1)
        a.layout.grace = 1.0 + 2 * harness.resolution
        harness.elapse(a.layout.grace + harness.resolution + 0.5)
        assert a.sweep() == 1
        assert listed() - before == {orphans[0]}
        assert harness.store().load()[0] == s
        swept = [a.sweep() for _ in range(2)]
        assert sorted(swept) == [0, 1], swept
        assert listed() == before
        assert harness.store().load()[0] == s

    def test_a_whole_read_keeps_its_connections(self, harness: DocHarness) -> None:
        """A cold load of a sharded state reads ``concurrency`` documents at a
        time, and its HTTP client keeps as many connections: none is dropped
        and the load opens no more than that. With an SDK's default pool of
        10, the connections of 6 of the 16 reads were dropped as they came
        back, to be opened again (a TCP and TLS handshake each on a real
        endpoint). Read from urllib3's log, which every SDK keymgr uses goes
        through; an adapter without HTTP opens none."""
        a = harness.store()
        a.set_shards("on")
        state = sharded_state(300)  # 64 buckets: 64 shards, 16 read at a time
        a.commit(state, None)
        opened: list[str] = []
        dropped: list[str] = []

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if str(record.msg).startswith("Starting new HTTP"):
                    opened.append(record.getMessage())
                elif str(record.msg).startswith("Connection pool is full"):
                    dropped.append(record.getMessage())

        logger = logging.getLogger("urllib3.connectionpool")
        handler, level = Watch(), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            reader = harness.store()
            assert reader.load()[0] == state
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        assert dropped == [], dropped
        assert len(opened) <= reader.adapter.concurrency + 2, opened  # + head, manifest

    def test_what_a_deleted_shard_leaves_is_swept(self, harness: DocHarness) -> None:
        """Whatever a store keeps of a deleted document (a KV tombstone version,
        a GCS tombstone object: how an earlier keymgr collected shards) is swept
        like an orphan once past the grace, so listings do not grow with the
        garbage of past commits; the state is untouched."""
        if harness.factory().names("shards") is None:
            return  # cannot list: nothing is swept (test_sharded_orphans_are_swept_by_listing)
        a = harness.store()
        a.set_shards("on")
        a.commit(sharded_state(20), None)
        s, _ = a.load()
        docs = harness.factory()
        name = "shards/" + "ab" * 32 + ".json"
        docs.delete(name, docs.create(name, b"{}"))
        assert docs.read(name) is None
        a.layout.grace = 1.0 + 2 * harness.resolution
        harness.elapse(a.layout.grace + harness.resolution + 0.5)
        a.sweep()
        listed = harness.factory().names("shards")
        assert listed is not None and name not in {n for n, _ in listed}, listed
        assert harness.store().load()[0] == s


def _orphans_of_a_crashed_commit(
    harness: DocHarness, store: SharedStore
) -> tuple[State, set[str] | None]:
    """A sharded state committed through ``store``, then a commit from another
    process that wrote its documents and died before its head: the state, and
    the names of what that commit left (None when the adapter cannot list)."""
    store.set_shards("on")
    store.commit(sharded_state(20), None)
    s, t = store.load()
    assert t is not None
    before = harness.factory().names("shards")
    crashed = harness.store()
    crashed.set_shards("on")
    crashed.load()
    crashed.layout.write(bump(s, "tenant-003"), t.number + 1, lambda: None)
    after = harness.factory().names("shards")
    if before is None or after is None:
        return s, None
    return s, {n for n, _ in after} - {n for n, _ in before}


def sharded_state(rings: int) -> State:
    """A state of ``rings`` rings (one active key each), two publishers and an edge."""
    from datetime import UTC, datetime

    from keymgr.model import ACTIVE, EdgeRecord, Key, PublisherRecord, Ring

    t = datetime(2031, 3, 1, 8, 0, tzinfo=UTC)
    jwk = {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "B" * 43}
    ring_map = {}
    for i in range(rings):
        name = f"tenant-{i:03d}"
        kid = hashlib.sha256(name.encode()).hexdigest()[:43]
        ring_map[name] = Ring(name, (Key(kid, "ES256", "local", ACTIVE, jwk, t, t, t),))
    pubs = {
        p: PublisherRecord("ab" * 32, frozenset({"k1"}), t, since={"k1": t})
        for p in ("site", "cdn")
    }
    edges = {"cdn": {"https://cdn.example/jwks.json": EdgeRecord(frozenset({"k1"}), {"k1": t}, t)}}
    return State(rings=ring_map, publishers=pubs, edges=edges, clock=t)


def bump(state: State, ring: str) -> State:
    """``state`` with ring ``ring`` changed (its emergency flag flipped), all else kept."""
    from dataclasses import replace

    r = state.rings[ring]
    return state.with_ring(replace(r, emergency=not r.emergency))
