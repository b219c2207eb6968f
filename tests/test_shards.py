"""Sharded state (docs/scale.md): encoding, the file store, migration, crashes, GC.

The conformance half (round trip, one-ring commits, CAS, a missing shard, GC
after the grace) is in ``keymgr.testing.docstore.SharedStoreTests`` and runs
on every real adapter; this module adds what needs the memory adapter's fault
knobs and clock, the file store's directory, or the real CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from keymgr.backends.local.store import FileStore

import keymgr.docstore as docstore
from keymgr.docstore import STATE, SharedStore, decode_state
from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.model import EdgeRecord, PublisherRecord
from keymgr.shards import (
    GROW_AT,
    TARGET,
    Corrupt,
    bucket_of,
    buckets_for,
    decode_shard,
    encode_shard,
    entity_count,
    ring_key,
    split,
)
from keymgr.stores import check_state_url, open_store, split_shards
from keymgr.testing.docstore import MemoryAdapter, bump, sharded_state
from tests.conftest import SHORT_POLICY, T0, Home

P, A = timedelta(days=10), timedelta(hours=1)


def ts(t: Any) -> str:
    return str(t.strftime("%Y-%m-%dT%H:%M:%SZ"))


def memory_store(adapter: MemoryAdapter | None = None, mode: str = "on") -> SharedStore:
    return SharedStore(adapter or MemoryAdapter(), shards=mode)


# --------------------------------------------------------------------------- encoding


def test_shards_are_deterministic_and_checked() -> None:
    state = sharded_state(64)
    b = buckets_for(66)
    shards = split(state, b, lambda _: None)
    assert b == 2 ** math.ceil(math.log2(66 / TARGET))
    assert sum(len(s.rings) for s in shards.values()) == 64
    one = next(iter(shards.values()))
    name, data = encode_shard(one, b, "7.abc")
    assert encode_shard(one, b, "7.abc") == (name, data)  # same entities and stamp: same bytes
    assert encode_shard(one, b, "8.abc")[0] != name  # another commit: another name
    back = decode_shard(name, data, one.bucket, b)
    assert back.rings == one.rings and back.parts == one.parts

    def refused(name: str, data: bytes, bucket: int = one.bucket) -> str:
        with pytest.raises(Corrupt) as info:
            decode_shard(name, data, bucket, b)
        return str(info.value)

    assert "do not hash to its name" in refused(name, data.replace(b"tenant", b"tenanT"))
    assert "manifest says" in refused(name, data, bucket=(one.bucket + 1) % b)
    # A validly named shard that holds a ring of another bucket.
    doc = json.loads(data)
    stray = next(n for n in state.rings if bucket_of(ring_key(n), b) != one.bucket)
    doc["rings"][stray] = state.rings[stray].to_dict()
    forged = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert "another bucket" in refused(docstore_name(forged), forged)


def test_manifests_and_the_head_list_digests_and_refuse_anything_else() -> None:
    """A manifest lists each bucket of its range by the base64url SHA-256 of its
    shard (null: empty); the head its manifests alike. Anything else is refused."""
    import base64
    import hashlib

    from keymgr.shards import Sharding, decode_manifest, encode_manifest

    def hexname(i: int, prefix: str = "") -> str:
        return f"shards/{prefix}{hashlib.sha256(bytes([i])).hexdigest()}.json"

    listed = {130: hexname(1), 200: hexname(2)}
    name, data = encode_manifest(1, 256, listed, "3.x")
    assert decode_manifest(name, data, 1, 256) == listed
    doc = json.loads(data)
    assert len(doc["shards"]) == 128 and doc["shards"].count(None) == 126
    token = base64.urlsafe_b64encode(hashlib.sha256(bytes([1])).digest()).rstrip(b"=").decode()
    assert doc["shards"][2] == token and len(token) == 43

    def refused(shards: Any) -> str:
        forged = _dumps_sorted({**doc, "shards": shards})
        with pytest.raises(Corrupt) as info:
            decode_manifest(docstore_name(forged).replace("shards/", "shards/m-"), forged, 1, 256)
        return str(info.value)

    assert "does not list the 128 buckets" in refused(doc["shards"][:-1])
    assert "does not list" in refused({"130": token})
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    assert last % 4 == 0  # 258 bits for 256: the last character's two low bits are unused
    bad_bits = token[:-1] + alphabet[last + 1]  # same digest, non-canonical text
    for bad in (hexname(1), token[:-1], token + "=", bad_bits, 7):
        assert "not a shard" in refused([bad, *doc["shards"][1:]])
    mname = hexname(3, "m-")
    head = Sharding(128, (mname,)).to_dict()
    assert head["manifests"] == [
        base64.urlsafe_b64encode(hashlib.sha256(bytes([3])).digest()).rstrip(b"=").decode()
    ]
    assert Sharding.from_dict(head).manifests == (mname,)
    with pytest.raises(ValueError, match="is not a manifest"):
        Sharding.from_dict({**head, "manifests": [mname]})


def _dumps_sorted(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def docstore_name(data: bytes) -> str:
    import hashlib

    return f"shards/{hashlib.sha256(data).hexdigest()}.json"


def test_buckets_grow_by_doubling_and_never_shrink() -> None:
    assert buckets_for(0) == 1 and buckets_for(TARGET) == 1 and buckets_for(TARGET + 1) == 2
    assert buckets_for(100_000) == 2 ** math.ceil(math.log2(100_000 / TARGET))
    assert buckets_for(8 * GROW_AT, 8) == 8 and buckets_for(8 * GROW_AT + 1, 8) == 16
    assert buckets_for(3, 64) == 64


def test_a_previous_release_refuses_a_sharded_head() -> None:
    adapter = MemoryAdapter()
    memory_store(adapter).commit(sharded_state(3), None)
    head = adapter.peek(STATE)
    assert head is not None
    with pytest.raises(StoreError, match="unsupported state format 2"):
        decode_state(head, "old reader")


# --------------------------------------------------------------------------- reading


def test_a_tampered_shard_or_head_is_one_line() -> None:
    adapter = MemoryAdapter()
    store = memory_store(adapter)
    store.commit(sharded_state(20), None)
    snap = store.layout._snap
    assert snap is not None
    # A shard holding a ring (some buckets hold only publisher parts).
    victim = next(
        n for n in snap.buckets.values() if b'"emergency":false' in (adapter.peek(n) or b"")
    )
    data = adapter.peek(victim)
    assert data is not None
    adapter.poke(victim, data.replace(b'"emergency":false', b'"emergency":true ', 1))
    for damage in ("shard", "head"):
        with pytest.raises(StoreError) as info:
            memory_store(adapter).load()
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 400
        if damage == "shard":
            assert victim in msg and "do not hash to its name" in msg
            adapter.poke(victim, data)
            head = adapter.peek(STATE)
            assert head is not None
            buckets = snap.sharding.buckets if snap.sharding else 0
            damaged = head.replace(f'"buckets": {buckets}'.encode(), b'"buckets": 3')
            assert damaged != head
            adapter.poke(STATE, damaged)
        else:
            assert "corrupt state head" in msg and "power of two" in msg


def test_a_reader_behind_a_collected_head_reads_the_head_again() -> None:
    """A reader that read head v while a writer moved on and collected v's
    shards (past the grace) re-reads the head instead of failing."""
    adapter = MemoryAdapter()
    writer = memory_store(adapter)
    now = [1_000_000.0]
    writer.layout.clock = lambda: now[0]
    t = writer.commit(sharded_state(20), None)
    reader = memory_store(adapter)
    stale = adapter.peek(STATE)
    assert stale is not None
    for ring in ("tenant-001", "tenant-002", "tenant-003"):
        now[0] += writer.layout.grace + 1
        s, t = writer.load()
        t = writer.commit(bump(s, ring), t)
    real_read = adapter.read
    served = []

    def read(name: str) -> Any:
        if name == STATE and not served:
            served.append(name)
            return docstore.Blob(stale, "stale-version")
        return real_read(name)

    adapter.read = read  # type: ignore[method-assign]
    assert reader.load()[0] == writer.load()[0]
    assert served == [STATE]


# --------------------------------------------------------------------------- writing


def test_no_change_writes_no_shard_and_growth_rebuckets() -> None:
    adapter = MemoryAdapter()
    store = memory_store(adapter)
    state = sharded_state(2 * GROW_AT - 4)  # and two publishers, of two parts each
    t = store.commit(state, None)
    snap = store.layout._snap
    assert snap is not None and snap.sharding is not None and snap.sharding.buckets == 4
    # Add rings until the average passes GROW_AT: the buckets double, all is rewritten.
    rings = dict(state.rings)
    extra = sharded_state(4 * GROW_AT + 10)
    for name in list(extra.rings)[len(rings):]:
        rings[name] = extra.rings[name]
    grown = dataclasses.replace(state, rings=rings)
    t = store.commit(grown, t)
    snap = store.layout._snap
    assert snap is not None and snap.sharding is not None and snap.sharding.buckets == 8
    assert {g[0] for g in snap.sharding.garbage} and memory_store(adapter).load()[0] == grown
    adapter.calls.clear()
    store.commit(grown, t)
    assert [c for c in adapter.calls if c[0] == "create"] == []


def test_a_publisher_of_every_ring_is_chunked_by_kid() -> None:
    """One JWKS serving 5,000 rings' keys: its record is split by kid, so no
    shard is large and a publish that adds one kid rewrites two small shards."""
    state = sharded_state(5000)
    kids = frozenset(k.kid for r in state.rings.values() for k in r.keys)
    t0 = state.clock
    assert t0 is not None
    record = PublisherRecord("cd" * 32, kids, t0, since=dict.fromkeys(kids, t0))
    edge = EdgeRecord(kids, dict.fromkeys(kids, t0), t0)
    state = dataclasses.replace(
        state,
        publishers={"site": record},
        edges={"site": {"https://cdn.example/jwks.json": edge}},
    )
    adapter = MemoryAdapter()
    store = memory_store(adapter)
    t = store.commit(state, None)
    assert max(len(adapter.peek(n) or b"") for n in adapter._docs) < 64 * 1024
    s, t = memory_store(adapter).load()
    assert s == state
    grown = dataclasses.replace(
        s,
        publishers={"site": dataclasses.replace(record, kids=kids | {"new-kid"})},
    )
    adapter.calls.clear()
    store.commit(grown, t)
    created = [n for op, n in adapter.calls if op == "create"]
    assert len([n for n in created if "/m-" not in n]) <= 2, created
    assert memory_store(adapter).load()[0] == grown


def test_orphans_of_a_crashed_commit_are_swept_after_the_grace_only() -> None:
    adapter = MemoryAdapter()
    store = memory_store(adapter)
    t = store.commit(sharded_state(40), None)
    s, t = store.load()
    first = set(adapter._docs)
    # Every document is now older than the grace; one old shard is replaced:
    # garbage whose readers may still need it, not an orphan.
    adapter.clock.advance(store.layout.grace + 1)
    t = store.commit(bump(s, "tenant-001"), t)
    s, t = store.load()
    # A commit that wrote its shards and died before the head.
    crashed = memory_store(adapter)
    crashed.load()
    crashed.layout.write(bump(s, "tenant-009"), t.number + 1, lambda: None)
    referenced = set(adapter._docs)
    assert store.sweep() == 0  # the orphans are younger than the grace: maybe in flight
    assert first <= set(adapter._docs)
    adapter.clock.advance(store.layout.grace + 1)
    assert store.sweep() == 2  # the crashed commit's shard and manifest
    assert first <= set(adapter._docs) and len(referenced - set(adapter._docs)) == 2
    assert memory_store(adapter).load()[0] == s


def test_auto_keeps_one_document_and_off_refuses_what_the_store_cannot_hold() -> None:
    adapter = MemoryAdapter()
    store = memory_store(adapter, "auto")
    small = sharded_state(5)
    assert store.layout_event(small, None) is None
    t = store.commit(small, None)
    assert b"tenant-001" in (adapter.peek(STATE) or b"")  # one document
    big = sharded_state(600)
    event = store.layout_event(big, t)
    assert event is not None and event["event"] == "state.sharded"
    assert event["buckets"] == buckets_for(entity_count(big))
    store.commit(big, t)
    assert b"tenant-001" not in (adapter.peek(STATE) or b"")
    # off over a sharded state: refused, never silently rewritten as one document.
    off = memory_store(adapter, "off")
    s, t = off.load()
    with pytest.raises(StoreError, match="shards=off cannot write it"):
        off.commit(s, t)
    limited = MemoryAdapter()
    limited.max_document = 10_000  # type: ignore[misc]
    with pytest.raises(StoreError, match="more than the 10000 the store accepts"):
        memory_store(limited, "off").commit(big, None)


def test_the_state_url_parameter() -> None:
    base = Path("/srv/keymgr")
    url = check_state_url("file:state.json?shards=on", base)
    assert url == "file:/srv/keymgr/state.json?shards=on"
    assert split_shards("s3://b/k?region=x&shards=off&lock_ttl=9") == (
        "s3://b/k?region=x&lock_ttl=9",
        "off",
    )
    for bad, why in (
        ("file:s.json?shards=yes", "expected one of"),
        ("file:s.json?x=1", "only parameter"),
    ):
        with pytest.raises(ConfigError, match=why):
            check_state_url(bad, base)
    store = open_store("file:/srv/keymgr/state.json?shards=off")
    assert isinstance(store, FileStore) and store.layout.mode == "off"


# --------------------------------------------------------------------------- the file store


def test_file_store_one_ring_commit_is_small(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStore(path, shards="on")
    state = sharded_state(800)
    t = store.commit(state, 0)
    folder = tmp_path / "state.json.shards"
    largest = max(p.stat().st_size for p in folder.iterdir())
    assert largest < 64 * 1024 and path.stat().st_size < 4096
    before = {p.name for p in folder.iterdir()}
    s, t = FileStore(path).load()
    assert s == state
    t = store.commit(bump(store.load()[0], "tenant-123"), t)
    new = [p for p in folder.iterdir() if p.name not in before]
    written = sum(p.stat().st_size for p in new) + path.stat().st_size
    assert len(new) == 2 and written < 16 * 1024, (len(new), written)
    # Another process's store sees it; a stale token conflicts.
    other = FileStore(path)
    assert other.load()[0] == bump(state, "tenant-123")
    with pytest.raises(ConflictError):
        other.commit(state, t - 1)


# --------------------------------------------------------------------------- through the CLI


def sharded_home(home: Home, mode: str = "on") -> Home:
    text = re.sub(
        r'state = "file:state\.json(\?shards=\w+)?"',
        f'state = "file:state.json?shards={mode}"',
        home.config.read_text(),
    )
    home.config.write_text(text)
    if mode != "off":
        home.set_ring("default", **SHORT_POLICY)
    return home


def test_auto_migration_is_audited(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    sharded_home(home, "auto")
    home.run("reconcile", "--at", ts(T0), check=True, inproc=True)
    assert "sharding" not in json.loads((home.dir / "state.json").read_text())
    monkeypatch.setattr(docstore, "AUTO_THRESHOLD", 500)
    home.run("reconcile", "--at", ts(T0 + P - A), check=True, inproc=True)
    head = json.loads((home.dir / "state.json").read_text())
    assert head["format"] == 2 and "rings" not in head
    events = [json.loads(line) for line in (home.dir / "audit.jsonl").read_text().splitlines()]
    moved = [e for e in events if e["event"] == "state.sharded"]
    assert len(moved) == 1 and "shards=auto" in moved[0]["reason"], moved
    assert [k["state"] for k in home.state()["rings"]["default"]["keys"]] == ["active", "published"]
    proc = home.run("audit", "verify", check=True)
    assert "chain intact" in proc.stdout
    # Never back: shards=off over it is refused with one line.
    sharded_home(home, "off")
    proc = home.run("reconcile", "--at", ts(T0 + P))
    assert proc.returncode != 0 and "shards=off cannot write it" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


CRASH_POINTS = (
    "store.before_write",
    "store.shards_written",
    "store.after_write",
    "store.before_gc",
)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_each_step_of_a_sharded_commit(home: Home, point: str) -> None:
    """SIGKILL before the shards, between the shards and the head, after the
    head and before garbage collection: the next run repairs, nothing is lost,
    the audit chain verifies, and no referenced document was deleted."""
    sharded_home(home)
    home.run("reconcile", "--at", ts(T0), check=True)
    # Backdate the head's garbage past the grace, so the next commit collects
    # (the head is plain JSON: its garbage dates are the only clock GC reads).
    path = home.dir / "state.json"
    head = json.loads(path.read_text())
    assert head["sharding"]["garbage"], head["sharding"]
    for g in head["sharding"]["garbage"]:
        g[1] = "2000-01-01T00:00:00Z"
    path.write_text(json.dumps(head, indent=1) + "\n")
    proc = home.run("reconcile", "--at", ts(T0 + P - A), env=home.env(KEYMGR_CRASH_AT=point))
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    home.run("reconcile", "--at", ts(T0 + P - A), check=True)
    assert [k["state"] for k in home.state()["rings"]["default"]["keys"]] == ["active", "published"]
    home.run("reconcile", "--at", ts(T0 + P), check=True)
    keys = home.state()["rings"]["default"]["keys"]
    assert [k["state"] for k in keys] == ["retired", "active"]
    assert "chain intact" in home.run("audit", "verify", check=True).stdout
    jwks = {k["kid"] for k in home.jwks()["keys"]}
    assert jwks == {k["kid"] for k in keys}
    signed = home.run("sign", "default", "--claims", '{"sub":"x"}', "--ttl", "5m", check=True)
    assert signed.stdout.count(".") == 2
    # Every document the head names is there (FileStore.load checked each one).
    assert FileStore(path).load()[0].rings["default"] is not None


def test_a_large_audit_outbox_leaves_the_head(tmp_path: Path) -> None:
    """A commit that records thousands of events keeps a small head: the
    outbox goes to pieces of its own, read back in order, collected like garbage."""
    store = FileStore(tmp_path / "state.json", shards="on")
    state = sharded_state(10)
    events = tuple(
        {"ts": "2031-03-01T08:00:00Z", "seq": i, "event": "key.published", "ring": "r",
         "kid": f"k{i}", "prev": "0" * 64, "hash": f"{i:064x}"}
        for i in range(1, 3001)
    )
    big = dataclasses.replace(state, audit=dataclasses.replace(state.audit, outbox=events))
    t = store.commit(big, 0)
    head = (tmp_path / "state.json").read_bytes()
    assert len(head) < 8 * 1024 and b"key.published" not in head
    pieces = json.loads(head)["sharding"]["outbox"]
    assert len(pieces) >= 4
    loaded = FileStore(tmp_path / "state.json").load()[0]
    assert loaded.audit.outbox == events
    assert list(loaded.audit.outbox[0]) == list(events[0])  # member order kept
    store.commit(state, t)  # the next commit's outbox is small: inline again
    head2 = json.loads((tmp_path / "state.json").read_bytes())
    assert "outbox" not in head2["sharding"]
    assert set(pieces) <= {g[0] for g in head2["sharding"]["garbage"]}


def test_frequent_commits_keep_the_head_small() -> None:
    """Commits faster than the grace fill the garbage list: past MAX_GARBAGE
    entries the oldest are collected early, but never younger than MIN_GRACE."""
    for step, expected in ((1.0, docstore.MAX_GARBAGE), (0.0, docstore.MAX_GARBAGE + 40)):
        adapter = MemoryAdapter()
        store = memory_store(adapter)
        now = [1_000_000.0]
        store.layout.clock = lambda now=now: now[0]  # type: ignore[misc]
        t = store.commit(sharded_state(20), None)
        assert store.layout._snap is not None and store.layout._snap.sharding is not None
        first = store.layout._snap.sharding.manifests[0]
        for i in range(docstore.MAX_GARBAGE + 40):
            s, t = store.load()
            t = store.commit(bump(s, f"tenant-{i % 20:03d}"), t)
            now[0] += step  # one commit a second (or all at once): within the grace
        garbage = json.loads(adapter.peek(STATE) or b"{}")["sharding"]["garbage"]
        assert len(garbage) == expected, step
        # Collected early (1 s apart: the oldest were minutes old), or all kept.
        assert (adapter.peek(first) is None) == (step > 0), step
        assert memory_store(adapter).load()[0] == store.load()[0]


# --------------------------------------------------------------------------- concurrency


class _SlowAdapter(MemoryAdapter):
    """A network-like store: each read or create takes a while, several at once allowed."""

    concurrency = 4

    def __init__(self) -> None:
        super().__init__()
        self.delay = 0.0
        self.in_flight = self.most = 0
        self.fail: str | None = None
        self._count = __import__("threading").Lock()

    def _timed(self, name: str, op: Any) -> Any:
        import time

        with self._count:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay if name != STATE else 0)
            if self.fail is not None and name == self.fail:
                raise StoreError(f"{name}: injected failure")
            return op()
        finally:
            with self._count:
                self.in_flight -= 1

    def read(self, name: str) -> Any:
        return self._timed(name, lambda: super(_SlowAdapter, self).read(name))

    def create(self, name: str, data: bytes) -> object:
        return self._timed(name, lambda: super(_SlowAdapter, self).create(name, data))


def test_a_network_store_reads_and_writes_shards_concurrently_with_the_same_result() -> None:
    """concurrency > 1: a load and a commit keep that many requests in flight (never
    more), and read back exactly what one-at-a-time reads give."""
    adapter = _SlowAdapter()
    adapter.delay = 0.01
    state = sharded_state(200)
    memory_store(adapter).commit(state, None)
    assert adapter.most == adapter.concurrency  # the commit's shard writes
    adapter.most = 0
    got = memory_store(adapter).load()
    assert adapter.most == adapter.concurrency
    sequential = MemoryAdapter()
    for name in adapter.names("shards") or []:
        data = adapter.peek(name[0])
        assert data is not None
        sequential.poke(name[0], data)
    head = adapter.peek(STATE)
    assert head is not None
    sequential.poke(STATE, head)
    assert got[0] == memory_store(sequential).load()[0] == state


def test_a_failed_concurrent_read_is_one_line_and_leaves_nothing_running() -> None:
    adapter = _SlowAdapter()
    memory_store(adapter).commit(sharded_state(200), None)
    snap_reader = memory_store(adapter)
    names = [n for n, _ in adapter.names("shards") or [] if "/m-" not in n]
    adapter.fail, adapter.delay = names[len(names) // 2], 0.005
    with pytest.raises(StoreError) as info:
        snap_reader.load()
    assert str(info.value).count("\n") == 0 and "injected failure" in str(info.value)
    assert adapter.in_flight == 0  # every started read finished before the error came back


def test_each_keeps_order_and_raises_the_first_failure_in_order() -> None:
    assert docstore.each(4, lambda x: x * x, list(range(50))) == [x * x for x in range(50)]
    assert docstore.each(1, lambda x: -x, [1, 2]) == [-1, -2]

    def boom(x: int) -> int:
        if x in (7, 30):
            raise ValueError(f"no {x}")
        return x

    with pytest.raises(ValueError, match="no 7"):
        docstore.each(4, boom, list(range(50)))


# --------------------------------------------------------------------------- collector

#: A whole read of a sharded state, then a read after one ring changed, in a
#: process of its own (the collector's generations are process-wide): whether
#: a ring each read decoded is in the oldest generation, and what is frozen.
_SETTLE_PROBE = r"""
import gc, sys
from keymgr import docstore
from keymgr.docstore import SharedStore
from keymgr.testing.docstore import MemoryAdapter, bump, sharded_state
docstore.SETTLE_BUCKETS = int(sys.argv[1])
if sys.argv[2] == "off":
    gc.disable()
adapter = MemoryAdapter()
writer = SharedStore(adapter, shards="on")
state = sharded_state(300)
token = writer.commit(state, None)
reader = SharedStore(adapter, shards="on")
got, _ = reader.load()
assert got == state
first = got.rings["tenant-002"]
old_first = any(o is first for o in gc.get_objects(generation=2))
writer.commit(bump(state, "tenant-001"), token)
got, _ = reader.load()
changed = got.rings["tenant-001"]
assert changed.emergency and got.rings["tenant-002"] is first
old_changed = any(o is changed for o in gc.get_objects(generation=2))
print(old_first, old_changed, gc.get_freeze_count(), gc.isenabled())
"""


_FAILED_READ_PROBE = r"""
import gc
from keymgr import docstore
from keymgr.docstore import SharedStore
from keymgr.errors import StoreError
from keymgr.testing.docstore import MemoryAdapter, sharded_state
docstore.SETTLE_BUCKETS = 1
adapter = MemoryAdapter()
state = sharded_state(300)
SharedStore(adapter, shards="on").commit(state, None)
shards = sorted(n for n, _ in adapter.names("shards") or [] if "/m-" not in n)
adapter.fail(f"read:{shards[len(shards) // 2]}", times=1)
reader = SharedStore(adapter, shards="on")
try:
    reader.load()
except StoreError as e:
    print("refused" if "injected failure" in str(e) else e)
print(gc.isenabled(), gc.get_freeze_count())
got, _ = reader.load()
assert got == state
ring = got.rings["tenant-002"]
print(any(o is ring for o in gc.get_objects(generation=2)), gc.isenabled(), gc.get_freeze_count())
"""


def test_an_outage_in_the_middle_of_a_whole_read_leaves_the_collector_as_it_was() -> None:
    """A whole read that fails half-way (one shard read refused: an outage)
    raises the store's one line; the collector is back on and nothing is
    frozen, so what the failed read decoded is ordinary garbage. The next
    read, the outage over, reads the whole state and settles it as usual."""
    proc = subprocess.run(
        [sys.executable, "-c", _FAILED_READ_PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused", "True", "0", "True", "True", "0"]


@pytest.mark.parametrize(
    ("settle_from", "collector", "settled"),
    [("1", "on", True), ("1000000000", "on", False), ("1", "off", False)],
)
def test_a_whole_read_of_a_large_state_goes_to_the_oldest_generation(
    settle_from: str, collector: str, settled: bool
) -> None:
    """keymgr.model.gc_settled: the first read of a state of at least
    SETTLE_BUCKETS buckets puts what it decoded in the collector's oldest
    generation (the daemon's first pass then does not walk it once per
    generation); a smaller state, a read of the changed shards only, or one
    with the collector off, does not (their objects are still young: the
    read of 300 rings is followed by too few allocations for two
    collections); nothing stays frozen and the collector ends as it was."""
    proc = subprocess.run(
        [sys.executable, "-c", _SETTLE_PROBE, settle_from, collector],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(settled), "False", "0", str(collector == "on")]
