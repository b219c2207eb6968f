"""The shared-document store (keymgr.docstore), its logic tested once, over an in-memory adapter.

:class:`TestMemory` runs the conformance suite of ``keymgr.testing.docstore``
(the same test functions ``tests/test_docstore_real.py`` runs against moto S3
and OpenBao KV). The tests below it need what only a fake clock can do
(freeze the store's clock while real time passes) or check the memory
adapter's own knobs. Everything waits with bounds; the file runs in seconds.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest

from keymgr.docstore import (
    LEASE,
    LOCK,
    STATE,
    DocumentAdapter,
    SharedStore,
    StateToken,
    decode_state,
    encode_state,
)
from keymgr.errors import ConflictError, StoreError
from keymgr.lease import supports_lease
from keymgr.model import State
from keymgr.testing.docstore import (
    DocHarness,
    FakeClock,
    FaultyAdapter,
    MemoryAdapter,
    PassThread,
    SharedStoreTests,
    sample_state,
)

TTL = 0.5


class TestMemory(SharedStoreTests):
    @pytest.fixture
    def harness(self) -> DocHarness:
        adapter = MemoryAdapter()
        return DocHarness(
            factory=lambda: adapter,
            lock_ttl=TTL,
            elapse=adapter.clock.advance,
            now=adapter.clock,
        )


def store(adapter: DocumentAdapter, ttl: float = TTL) -> SharedStore:
    s = SharedStore(adapter, lock_ttl=ttl, takeover_grace=0.0)
    s.release_wait = 0.2
    return s


# --------------------------------------------------------------------------- clock


def test_takeover_is_judged_on_the_store_clock_never_the_local_one() -> None:
    adapter = MemoryAdapter()
    faulty = FaultyAdapter(adapter)
    a, b = store(faulty), store(adapter)
    with a.exclusive():
        faulty.hang("replace:lock")  # a stops renewing
        adapter.clock.freeze()  # ... and the store's clock stops
        other = PassThread(b, 30.0, adapter.clock)
        other.start()
        # Far longer than the TTL on this machine's clock: no takeover.
        assert not other.entered.wait(TTL * 2)
        adapter.clock.advance(TTL + 0.01)  # the store says: not renewed for the TTL
        assert other.entered.wait(5)
        faulty.unhang()
    other.finish()


def test_a_store_that_cannot_tell_the_age_never_takes_a_lock_over() -> None:
    adapter = MemoryAdapter(ages=False)
    faulty = FaultyAdapter(adapter)
    a, b = store(faulty), store(adapter)
    with a.exclusive():
        faulty.hang("replace:lock")
        adapter.clock.advance(3600)
        with pytest.raises(StoreError, match="held by another keymgr process"), b.exclusive(0.1):
            raise AssertionError("took a lock of unknown age")
        faulty.unhang()


def test_the_holders_ttl_governs_takeover() -> None:
    """A lock says its holder's TTL: a holder with a longer one renews less often."""
    adapter = MemoryAdapter()
    adapter.clock.freeze()
    adapter.poke(LOCK, json.dumps({"holder": "slow:1:x", "ttl": 10 * TTL}).encode())
    s = store(adapter)
    adapter.clock.advance(3 * TTL)  # past our TTL, not past the holder's
    held = r"held by another keymgr process \(slow:1:x, lock "
    with pytest.raises(StoreError, match=held), s.exclusive(0.1):
        raise AssertionError("took a lock before its holder's TTL")
    adapter.clock.advance(8 * TTL)
    with s.exclusive(0.1):
        assert json.loads(adapter.peek(LOCK) or b"{}")["holder"] == s.owner
    # Garbage where the lock should be: our TTL, holder "unknown".
    adapter.poke(LOCK, b"\x00")
    unknown = r"\(unknown, lock memory://keymgr/state.json.lock\)"
    with pytest.raises(StoreError, match=unknown), s.exclusive(0.1):
        raise AssertionError("took a fresh garbage lock")
    adapter.clock.advance(TTL + 0.01)
    with s.exclusive(0.1):
        pass


def test_exclusive_waits_lock_ttl_plus_grace_at_least() -> None:
    adapter = MemoryAdapter()
    adapter.clock.freeze()
    adapter.poke(LOCK, b'{"holder": "dead:1:x", "ttl": 0.3}')
    s = SharedStore(adapter, lock_ttl=0.3, takeover_grace=0.2)
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"for more than 0\.5s$"), s.exclusive(timeout=0.01):
        pass
    assert 0.45 < time.monotonic() - start < 3


def test_an_interrupted_store_stops_waiting_for_another_process_lock() -> None:
    """A daemon told to stop while its pass waits for the lock of a replica
    killed mid-pass (a lock not yet lock_ttl old on the store's clock): the
    waiting pass fails at once, naming the lock, instead of waiting lock_ttl
    (30 s by default, which a SIGTERM would wait for). A free lock is still
    taken: the daemon's last event is recorded."""
    adapter = MemoryAdapter()
    adapter.clock.freeze()
    adapter.poke(LOCK, b'{"holder": "dead:1:x", "ttl": 30}')
    s = SharedStore(adapter, lock_ttl=30.0)
    got: list[BaseException] = []

    def wait() -> None:
        try:
            with s.exclusive():
                pass
        except BaseException as e:
            got.append(e)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive() and not got  # it waits, as it should, until ...
    start = time.monotonic()
    s.interrupt()
    waiting.join(5)
    assert not waiting.is_alive() and time.monotonic() - start < 1
    assert len(got) == 1 and isinstance(got[0], StoreError), got
    assert "held by another keymgr process (dead:1:x" in str(got[0])
    assert "not waiting for it: keymgr is stopping" in str(got[0])
    adapter.poke(LOCK, None)
    with s.exclusive():  # free: taken at the first try
        assert json.loads(adapter.peek(LOCK))["holder"] == s.owner


# --------------------------------------------------------------------------- the store


def _stored(state: State, version: int) -> bytes:
    """The state document's bytes, as every keymgr release has stored them."""
    return (json.dumps({"version": version, **state.to_dict()}, indent=1) + "\n").encode()


def test_state_bytes_are_those_every_release_stored() -> None:
    state = sample_state(5)
    assert encode_state(state, 7) == _stored(state, 7)
    assert decode_state(_stored(state, 7), "x") == (state, 7)
    adapter = MemoryAdapter()
    adapter.poke(STATE, _stored(state, 41))  # written by an earlier release
    s = store(adapter)
    loaded, token = s.load()
    assert loaded == state and token is not None and token.number == 41
    assert s.commit(loaded, token).number == 42
    assert adapter.peek(STATE) == _stored(state, 42)


def test_load_parses_only_changed_bytes() -> None:
    adapter = MemoryAdapter()
    s = store(adapter)
    s.commit(sample_state(1), None)
    first, _ = s.load()
    again, _ = store(adapter).load()
    assert s.load()[0] is first  # same bytes: the same immutable State, no parse
    assert again == first and again is not first


def test_capabilities_and_lock_document() -> None:
    adapter = MemoryAdapter()
    s = store(adapter)
    assert supports_lease(s) and s.supports_lease and s.shared
    assert s.fingerprint_window == 1.0 and s.url == adapter.location
    assert repr(s) == "SharedStore('memory://keymgr/state.json')"
    with s.exclusive():
        doc = json.loads(adapter.peek(LOCK) or b"")
        assert set(doc) == {"holder", "ttl", "nonce"}
        assert doc["holder"] == s.owner and doc["ttl"] == TTL
    assert s.lock_lost() is None
    with pytest.raises(ValueError, match="lock_ttl"):
        SharedStore(adapter, lock_ttl=0)


def test_commit_outside_the_pass_lock_is_not_checked_against_it() -> None:
    """The loss of a pass lock refuses the holding thread's commits, no other thread's."""
    adapter = MemoryAdapter()
    faulty = FaultyAdapter(adapter)
    s = store(faulty)
    result: list[object] = []
    with s.exclusive():
        faulty.hang("replace:lock")
        time.sleep(TTL * 1.3)
        assert s.lock_lost() is not None

        def other() -> None:
            assert s.lock_lost() is None  # not this thread's lock
            result.append(s.commit(sample_state(1), None))

        t = threading.Thread(target=other)
        t.start()
        t.join(5)
        faulty.unhang()
    assert len(result) == 1 and isinstance(result[0], StateToken)


def test_a_renewal_landing_after_release_is_deleted() -> None:
    """A renewal stuck in flight at release time lands later: the lock is removed anyway."""
    adapter = MemoryAdapter(content_tokens=False)  # like KV: a write over a deleted version lands
    faulty = FaultyAdapter(adapter)
    s = store(faulty)
    with s.exclusive():
        faulty.hang("replace:lock")
        assert faulty.calls.count(("replace", LOCK)) == 0
        deadline = time.monotonic() + 5
        while ("replace", LOCK) not in faulty.calls:  # the renewal is in flight, hung
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert adapter.peek(LOCK) is None  # released with the version it knew
    # The hung renewal now lands on a missing lock: a conflict (nothing revived).
    faulty.unhang()
    time.sleep(0.1)
    assert adapter.peek(LOCK) is None


# --------------------------------------------------------------------------- the adapter


def test_memory_adapter_primitives_and_tokens() -> None:
    a = MemoryAdapter()
    assert a.read(STATE) is None and a.version(STATE) is None
    t1 = a.create(STATE, b"x")
    with pytest.raises(ConflictError):
        a.create(STATE, b"y")
    t2 = a.replace(STATE, b"y", t1)
    assert a.replace(STATE, b"x", t2) == t1  # content tokens: identical bytes, identical token
    with pytest.raises(ConflictError):
        a.replace(STATE, b"z", t2)
    with pytest.raises(ConflictError):
        a.replace(LEASE, b"z", t1)  # gone
    with pytest.raises(ConflictError):
        a.delete(STATE, t2)
    a.delete(STATE, t1)
    a.delete(STATE, t1)  # absent: done
    with pytest.raises(StoreError, match="unknown document"):
        a.read("other")
    k = MemoryAdapter(content_tokens=False)
    v1 = k.create(LOCK, b"x")
    assert k.replace(LOCK, b"x", v1) != v1
    a.clock.freeze()
    a.create(LOCK, b"l")
    a.clock.advance(7)
    blob = a.read(LOCK)
    assert blob is not None and blob.age == 7 and blob.data == b"l"


def test_memory_adapter_knobs() -> None:
    a = MemoryAdapter()
    a.down = True
    injected = r"^state memory://keymgr/state.json: read state: injected"
    with pytest.raises(StoreError, match=injected):
        a.read(STATE)
    a.down = False
    a.fail("create", times=2)
    for _ in range(2):
        with pytest.raises(StoreError):
            a.create(STATE, b"x")
    token = a.create(STATE, b"x")
    a.land_then_fail("lease")
    with pytest.raises(StoreError, match="answer lost"):
        a.create(LEASE, b"l")
    assert a.peek(LEASE) == b"l"  # it landed
    a.clear()
    a.hang("read:state")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(a.read(STATE)))
    t.start()
    assert a.version(STATE) == token  # only the matching call hangs
    time.sleep(0.1)
    assert not got
    a.unhang()
    t.join(5)
    assert len(got) == 1
    a.hang_limit = 0.05
    a.hang("*")
    with pytest.raises(StoreError, match="hung"):
        a.read(STATE)
    a.clear()
    assert ("read", STATE) in a.calls and ("create", LEASE) in a.calls


def test_fake_clock() -> None:
    c = FakeClock()
    t = c()
    c.advance(100)
    assert c() - t >= 100
    c.freeze()
    frozen = c()
    time.sleep(0.02)
    assert c() == frozen
    c.advance(timedelta(seconds=5).total_seconds())
    assert c() == frozen + 5
    c.thaw()
    assert c() >= frozen + 5
