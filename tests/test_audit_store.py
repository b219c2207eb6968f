"""The audit chain kept in the shared state store (keymgr.auditstore), issue 17.

Unit level over the in-memory adapter (keymgr.testing.docstore.MemoryAdapter),
through the real reconciler and KeyManager: one immutable object per event,
no fork when two replicas flush one outbox, tampering refused with one line,
the end found without listing, ``show --since`` in O(log n) reads, the mirror,
the one-time import of a file log. Then the same on a real moto S3 store
through the CLI (``audit verify``/``show``/``follow``/``import``), with S3
Object Lock on the audit objects, and a race of real processes appending
without the pass lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keymgr.audit import AuditLog, chain_hash, seal
from keymgr.auditquery import Query
from keymgr.auditstore import Mirror, StoreFollower, StoreMedium, leaf, query_store
from keymgr.config import load_config
from keymgr.docstore import SharedStore, encode_state
from keymgr.errors import AuditError
from keymgr.manager import KeyManager
from keymgr.model import AuditAnchor
from keymgr.reconciler import Reconciler
from keymgr.testing.docstore import MemoryAdapter
from tests.conftest import SHORT_POLICY, T0, A, D, G, Home, P, read_state, with_state_url

TIMES = (T0, T0 + P - A, T0 + P, T0 + P + G, T0 + P + G + D)


def store_manager(home: Home, adapter: MemoryAdapter, *, mirror: bool = False) -> KeyManager:
    """A KeyManager of ``home``'s config with its state in ``adapter`` and the
    audit chain in the store (``audit_log`` a mirror when ``mirror``)."""
    cfg = load_config(home.config)
    cfg = replace(cfg, daemon=replace(cfg.daemon, audit_log_set=mirror))
    m = KeyManager(cfg, actor="cli:test")
    m.store = SharedStore(adapter, lock_ttl=5)
    m.audit = AuditLog.for_config(cfg, m.store)
    m.reconciler = Reconciler(cfg, m.store, m.audit, m.actor)
    return m


def stored(adapter: MemoryAdapter) -> dict[int, bytes]:
    """Every audit object in the adapter, by seq (test-side listing)."""
    out = {}
    for name in list(adapter._docs):
        if name.startswith("audit/"):
            data = adapter.peek(name)
            assert data is not None
            out[int(name[6:18])] = data
    return out


def anchor_of(m: KeyManager) -> AuditAnchor:
    return m.store.load()[0].audit


@pytest.fixture
def rotated(home: Home) -> tuple[Home, MemoryAdapter, KeyManager]:
    home.set_ring(**SHORT_POLICY)
    adapter = MemoryAdapter()
    m = store_manager(home, adapter)
    for t in TIMES:
        m.reconcile(t)
    return home, adapter, m


def test_every_event_is_one_object_and_the_chain_verifies(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    home, adapter, m = rotated
    anchor = anchor_of(m)
    objs = stored(adapter)
    assert sorted(objs) == list(range(1, anchor.seq + 1))
    events = [json.loads(objs[s]) for s in sorted(objs)]
    prev = "0" * 64
    for ev in events:  # the file's exact line format, chained
        assert objs[ev["seq"]].endswith(b"\n") and objs[ev["seq"]].count(b"\n") == 1
        assert ev["prev"] == prev and chain_hash(prev, ev) == ev["hash"]
        prev = ev["hash"]
    assert prev == anchor.hash
    names = [e["event"] for e in events]
    for name in ("key.generated", "key.promoted", "key.retired", "key.destroyed"):
        assert name in names
    assert m.audit.check(anchor).events == anchor.seq
    assert not (home.dir / "audit.jsonl").exists(), "no local file without a mirror"
    assert m.audit.where == "audit store memory://keymgr/state.json.audit"


def test_head_is_found_without_listing_in_two_reads(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    _, adapter, m = rotated
    n = anchor_of(m).seq
    medium = StoreMedium(adapter)
    adapter.calls.clear()
    assert medium.last(n)["seq"] == n  # type: ignore[index]
    assert len(adapter.calls) == 2, adapter.calls
    for hint in (0, 1, n // 2, n - 1, n + 1, n + 7, 10 * n):
        got = medium.last(hint)
        assert got is not None and got["seq"] == n, hint
    assert StoreMedium(MemoryAdapter()).last(0) is None


def test_a_second_replica_flushing_the_same_outbox_does_not_fork(home: Home) -> None:
    """A commits, B (another replica) loads and appends A's outbox first; A's own
    append then finds identical objects: nothing duplicated, no error."""
    adapter = MemoryAdapter()
    a, b = store_manager(home, adapter), store_manager(home, adapter)
    a.reconcile(T0)
    state, token = a.store.load()
    new = a.audit.prepare(state, [{"event": "config.loaded", "ts": T0}], "daemon")
    a.store.commit(new, token)
    before = stored(adapter)
    b.reconciler.load()  # flushes A's outbox
    after_b = stored(adapter)
    assert len(after_b) == len(before) + 1
    a.audit.flush(new)  # A's append: create-if-absent finds its own bytes
    assert stored(adapter) == after_b
    assert b.audit.check(anchor_of(b)).events == len(after_b)


def test_an_object_keymgr_did_not_write_is_refused(home: Home) -> None:
    """Someone creates the next event first with other content (chained and
    hashed): the flush refuses in one line and leaves it there; the state still
    holds the event. Written at the same time as ours (between our read of
    the end and our create), the create-if-absent refuses it too."""
    adapter = MemoryAdapter()
    m = store_manager(home, adapter)
    m.reconcile(T0)
    state, token = m.store.load()
    new = m.audit.prepare(state, [{"event": "config.loaded", "ts": T0}], "daemon")
    m.store.commit(new, token)
    seq = new.audit.seq
    ev = {**new.audit.outbox[-1], "actor": "cli:someone-else"}
    ev["hash"] = chain_hash(ev["prev"], ev)
    forged = json.dumps(ev).encode() + b"\n"
    adapter.poke(leaf(seq), forged)
    with pytest.raises(AuditError) as info:
        m.audit.flush(new)
    msg = str(info.value)
    assert "\n" not in msg and f"seq {seq}" in msg and "rewritten" in msg, msg
    assert adapter.peek(leaf(seq)) == forged
    medium = StoreMedium(adapter)
    with pytest.raises(AuditError) as info:
        medium.put(seq, json.dumps(new.audit.outbox[-1]).encode() + b"\n")
    msg = str(info.value)
    assert "\n" not in msg and f"event {seq}" in msg and "not written by keymgr" in msg, msg
    assert medium.put(seq, forged) is False  # the same bytes: already written
    assert adapter.peek(leaf(seq)) == forged


def test_a_rewritten_head_is_refused_before_any_commit(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    """The whole store rechained after an edit (no gap, hashes recomputed): only
    the anchor tells, and the next pass refuses before committing anything."""
    _, adapter, m = rotated
    objs = stored(adapter)
    events = [json.loads(objs[s]) for s in sorted(objs)]
    events[0]["actor"] = "cli:someone-else"
    prev = "0" * 64
    for ev in events:
        ev["prev"] = prev
        ev["hash"] = prev = chain_hash(prev, ev)
        adapter.poke(leaf(ev["seq"]), json.dumps(ev, separators=(",", ":")).encode() + b"\n")
    doc = adapter.peek("state")
    with pytest.raises(AuditError) as info:
        m.rotate("default", now=TIMES[-1] + A)
    assert "rewritten" in str(info.value) and "audit store" in str(info.value)
    assert adapter.peek("state") == doc, "committed on top of a forged chain"
    with pytest.raises(AuditError, match="differs from the head anchored in state"):
        m.audit.check(anchor_of(m))


@pytest.mark.parametrize("damage", ["deleted", "edited", "extra"])
def test_verify_names_the_damaged_event(
    rotated: tuple[Home, MemoryAdapter, KeyManager], damage: str
) -> None:
    _, adapter, m = rotated
    anchor = anchor_of(m)
    if damage == "deleted":
        adapter.poke(leaf(3), None)
        want = "event 3: sequence"  # event 4 read where 3 was expected? no: the chain ends
    elif damage == "edited":
        ev = json.loads(adapter.peek(leaf(3)) or b"")
        ev["actor"] = "someone"
        adapter.poke(leaf(3), json.dumps(ev, separators=(",", ":")).encode() + b"\n")
        want = "event 3: hash mismatch"
    else:
        adapter.poke(leaf(anchor.seq + 1), adapter.peek(leaf(anchor.seq)))
        want = f"event {anchor.seq + 1}: sequence"
    with pytest.raises(AuditError) as info:
        m.audit.check(anchor)
    msg = str(info.value)
    if damage == "deleted":
        assert "event 3 missing" in msg and "truncated" in msg, msg
    else:
        assert want in msg, msg


def test_cli_verify_holds_the_lock_only_to_read_the_anchor(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    """``audit verify`` on the store (verify_store): the chain up to the anchor,
    read without the pass lock, then an object beyond the current head is
    refused; appends committed meanwhile are not an error."""
    from keymgr.auditstore import verify_store

    _, adapter, m = rotated
    anchor = anchor_of(m)
    seen_locked: list[bool] = []
    read = adapter.read

    def watching(name: str) -> Any:
        if name.startswith("audit/"):
            seen_locked.append(adapter.peek("lock") is not None)
        return read(name)

    adapter.read = watching  # type: ignore[method-assign]
    assert verify_store(m).events == anchor.seq
    assert seen_locked.count(False) >= anchor.seq, "the chain was read under the pass lock"
    adapter.poke(leaf(anchor.seq + 1), adapter.peek(leaf(anchor.seq)))
    with pytest.raises(AuditError, match=f"event {anchor.seq + 1}: beyond the head anchored"):
        verify_store(m)


def test_verify_reads_with_bounded_prefetch(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    _, adapter, m = rotated
    anchor = anchor_of(m)
    adapter.calls.clear()
    assert m.audit.check(anchor).events == anchor.seq
    reads = [c for c in adapter.calls if c[0] == "read"]
    # Every event once, plus at most the prefetch window past the end.
    assert anchor.seq + 1 <= len(reads) <= anchor.seq + 16, len(reads)


def test_operator_page_reads_and_verifies_the_store(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    """The daemon's page (keymgr.ui): its last events and its background chain
    check come from the store, up to the anchor read (later appends wait)."""
    from keymgr.ui import OperatorView

    _, adapter, m = rotated
    anchor = anchor_of(m)
    view = OperatorView()
    view.refresh_events(m.audit, lambda text: text)
    assert [e["seq"] for e in view.events][-1] == anchor.seq and view.events_error is None
    res = view.verify(m, lambda text: text)
    assert res is not None and res.ok and res.events == anchor.seq, res
    adapter.poke(leaf(2), None)
    view._next_verify = 0.0
    res = view.verify(m, lambda text: text)
    assert res is not None and not res.ok and "event 2 missing" in (res.error or ""), res


# --------------------------------------------------------------------------- show


def synthetic(adapter: MemoryAdapter, n: int, start: Any = T0, step: float = 3600.0) -> None:
    """``n`` chained events, one an hour, written straight into the adapter."""
    evs = [
        {"event": "config.loaded", "ts": start + timedelta(seconds=step * i), "reason": str(i)}
        for i in range(n)
    ]
    for ev in seal(evs, 0, "0" * 64, "daemon"):
        adapter.poke(leaf(ev["seq"]), json.dumps(ev, separators=(",", ":")).encode() + b"\n")


def test_show_since_bisects_over_sequence_numbers() -> None:
    adapter = MemoryAdapter()
    n = 5000
    synthetic(adapter, n)
    medium = StoreMedium(adapter)
    since = T0 + timedelta(hours=4320)  # event 4321 (an hour apart)
    adapter.calls.clear()
    hits = list(query_store(medium, n, Query(since=since, limit=5)))
    assert [h.event["seq"] for h in hits] == list(range(4321, 4326))
    # log2(5000) ~ 13 probes, the window before, a day of slack (24), the
    # hits, the prefetch in flight: far from 5000.
    assert len(adapter.calls) < 150, len(adapter.calls)
    until = T0 + timedelta(hours=10)
    got = [h.event["seq"] for h in query_store(medium, n, Query(until=until))]
    assert got == list(range(1, 12))
    rev = [h.event["seq"] for h in query_store(medium, n, Query(reverse=True, limit=3))]
    assert rev == [n, n - 1, n - 2]
    window = Query(since=T0 + timedelta(hours=100), until=T0 + timedelta(hours=102),
                   reverse=True)
    assert [h.event["seq"] for h in query_store(medium, n, window)] == [103, 102, 101]


def test_show_since_warns_when_times_go_back_and_reads_all() -> None:
    adapter = MemoryAdapter()
    synthetic(adapter, 300)  # T0 .. T0 + 299 h
    ev = json.loads(adapter.peek(leaf(250)) or b"")
    ev["ts"] = "2031-05-01T00:00:00Z"  # far in the future of its neighbours
    adapter.poke(leaf(250), json.dumps(ev, separators=(",", ":")).encode() + b"\n")
    warnings: list[str] = []
    got = list(query_store(StoreMedium(adapter), 300,
                           Query(since=T0 + timedelta(days=30)), warnings.append))
    assert [h.event["seq"] for h in got] == [250]
    assert len(warnings) == 1 and "go back" in warnings[0], warnings


# --------------------------------------------------------------------------- mirror, import


def test_mirror_holds_the_events_after_the_store(home: Home) -> None:
    home.set_ring(**SHORT_POLICY)
    adapter = MemoryAdapter()
    a = store_manager(home, adapter, mirror=True)
    for t in TIMES[:3]:
        a.reconcile(t)
    mirror = (home.dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
    objs = stored(adapter)
    assert mirror == [objs[s] for s in sorted(objs)]
    # A mirror that cannot be written is a warning, never a failed pass.
    (home.dir / "audit.jsonl").unlink()
    (home.dir / "audit.jsonl").mkdir()
    a.reconcile(TIMES[3])
    assert len(stored(adapter)) > len(objs)


def test_mirror_behind_the_store_is_filled_from_it(tmp_path: Path) -> None:
    adapter = MemoryAdapter()
    synthetic(adapter, 10)
    medium = StoreMedium(adapter)
    path = tmp_path / "mirror.jsonl"
    path.write_bytes(adapter.peek(leaf(1)) or b"")
    adapter.calls.clear()
    Mirror(path, medium)([json.loads(adapter.peek(leaf(s)) or b"") for s in (9, 10)])
    assert [c for c in adapter.calls if c[0] == "read"] == [("read", leaf(s)) for s in range(2, 9)]
    assert path.read_bytes() == b"".join(adapter.peek(leaf(s)) or b"" for s in range(1, 11))


def file_home_to_store(home: Home) -> tuple[MemoryAdapter, KeyManager]:
    """Passes with the file store (the log in audit.jsonl), then its state moved
    into a shared store, the log left where it was: an upgrade."""
    home.set_ring(**SHORT_POLICY)
    for t in TIMES[:3]:
        home.run("reconcile", "--at", t.strftime("%Y-%m-%dT%H:%M:%SZ"), check=True,
                 inproc=True)
    doc = read_state(home.dir / "state.json")
    version = doc.pop("version")
    from keymgr.model import State

    adapter = MemoryAdapter()
    adapter.poke("state", encode_state(State.from_dict(doc), version))
    return adapter, store_manager(home, adapter, mirror=True)


def test_a_file_log_is_imported_once_verified(home: Home) -> None:
    adapter, m = file_home_to_store(home)
    lines = (home.dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
    m.reconcile(TIMES[3])  # the first load imports, then the pass appends
    objs = stored(adapter)
    assert [objs[s] for s in range(1, len(lines) + 1)] == lines
    assert m.audit.check(anchor_of(m)).events == len(objs)
    # The file goes on as the mirror of the same chain.
    assert (home.dir / "audit.jsonl").read_bytes() == b"".join(objs[s] for s in sorted(objs))
    m.reconcile(TIMES[4])  # nothing imported twice
    assert m.audit.check(anchor_of(m)).events == len(stored(adapter))
    # The import is itself an audit event, committed by the pass that did it,
    # right after the imported chain, dated at the pass.
    after = [json.loads(objs[s]) for s in sorted(objs) if s > len(lines)]
    assert after[0]["event"] == "audit.imported", after[:2]
    assert after[0]["reason"] == f"{len(lines)} events from {home.dir / 'audit.jsonl'}"
    assert after[0]["ts"] == TIMES[3].strftime("%Y-%m-%dT%H:%M:%SZ")
    events = [json.loads(v)["event"] for v in stored(adapter).values()]
    assert events.count("audit.imported") == 1


def test_an_import_on_a_recorded_event_is_recorded_with_it(home: Home) -> None:
    """The daemon's first commit is often ``daemon.started`` (Reconciler.record),
    not a pass: the import's event goes into that commit, before it."""
    adapter, m = file_home_to_store(home)
    lines = (home.dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
    m.reconciler.record([{"ts": TIMES[3], "event": "daemon.started"}])
    objs = stored(adapter)
    after = [json.loads(objs[s])["event"] for s in sorted(objs) if s > len(lines)]
    assert after == ["audit.imported", "daemon.started"], after
    assert not m.audit.imported
    assert m.audit.check(anchor_of(m)).events == len(objs)


def test_an_import_interrupted_resumes(home: Home) -> None:
    adapter, m = file_home_to_store(home)
    lines = (home.dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
    for s in range(1, 4):  # a crash after three objects
        adapter.poke(leaf(s), lines[s - 1])
    m.reconcile(TIMES[3])
    assert m.audit.check(anchor_of(m)).events == len(stored(adapter)) > len(lines)


def test_a_forged_file_is_not_imported(home: Home) -> None:
    adapter, m = file_home_to_store(home)
    path = home.dir / "audit.jsonl"
    events = [json.loads(x) for x in path.read_text().splitlines()]
    events[0]["actor"] = "cli:someone-else"
    prev = "0" * 64
    for ev in events:
        ev["prev"] = prev
        ev["hash"] = prev = chain_hash(prev, ev)
    path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))
    doc = adapter.peek("state")
    with pytest.raises(AuditError, match=r"audit log .*: the log was rewritten"):
        m.reconcile(TIMES[3])
    assert stored(adapter) == {}, "a forged log was imported"
    assert adapter.peek("state") == doc


# --------------------------------------------------------------------------- follow


def test_follow_prints_new_events_once_anchored(
    rotated: tuple[Home, MemoryAdapter, KeyManager],
) -> None:
    _, adapter, m = rotated
    got: list[int] = []
    notes: list[str] = []
    f = StoreFollower(m, from_start=False, emit=lambda ev, raw: got.append(ev["seq"]),
                      note=notes.append)
    f.start()
    head = anchor_of(m).seq
    assert got == [] and f"following from event {head}" in notes[0]
    m.rotate("default", now=TIMES[-1] + A)
    f.poll()
    assert got == list(range(head + 1, anchor_of(m).seq + 1)) and got
    # An event beyond the anchor is held back, and ends it when it stays.
    adapter.poke(leaf(anchor_of(m).seq + 1), json.dumps(
        {**json.loads(adapter.peek(leaf(anchor_of(m).seq)) or b""), "seq": 0}).encode() + b"\n")
    with pytest.raises(AuditError):
        f.poll()
    whole: list[int] = []
    g = StoreFollower(m, from_start=True, emit=lambda ev, raw: whole.append(ev["seq"]),
                      note=notes.append)
    adapter.poke(leaf(anchor_of(m).seq + 1), None)
    g.start()
    assert whole == list(range(1, anchor_of(m).seq + 1))


# --------------------------------------------------------------------------- config


def test_audit_setting_is_checked(home: Home) -> None:
    text = home.config.read_text()
    home.config.write_text(text.replace('audit_log = "audit.jsonl"',
                                        'audit_log = "audit.jsonl"\naudit = "store"'))
    proc = home.run("config", "check")
    assert proc.returncode == 2 and "daemon.audit" in proc.stderr, proc.stderr
    assert "shared state store" in proc.stderr
    home.config.write_text(text.replace('audit_log = "audit.jsonl"',
                                        'audit_log = "audit.jsonl"\naudit = "s3"'))
    proc = home.run("config", "check")
    assert proc.returncode == 2 and 'expected "store" or "file"' in proc.stderr, proc.stderr


def test_an_empty_state_read_before_another_first_commit_is_a_conflict() -> None:
    """Two writers without the pass lock both read the new, empty state; one
    commits the first event. The other's stale read is a conflict to read
    again, not a "replaced state"; a state that still anchors nothing while
    the store holds events is refused as before (a lost or replaced state)."""
    from keymgr.errors import ConflictError
    from keymgr.model import State

    adapter = MemoryAdapter()
    store = SharedStore(adapter)
    logs = []
    for _ in range(2):
        medium = StoreMedium(adapter)
        medium.anchored = lambda: store.load()[0].audit.seq
        logs.append(AuditLog(Path("/nonexistent"), None, medium))
    first, token = store.load()  # both read the empty state
    assert token is None and first.audit.seq == 0
    new = logs[0].prepare(first, [{"event": "test.append", "reason": "a"}], "a")
    store.commit(new, token)
    logs[0].flush(new)
    with pytest.raises(ConflictError, match="another replica committed"):
        logs[1].prepare(first, [{"event": "test.append", "reason": "b"}], "b")
    # The state lost (a new empty one in its place): the events are nobody's.
    lost = MemoryAdapter()
    event = adapter.peek(leaf(1))
    assert event is not None
    lost.poke(leaf(1), event)
    medium = StoreMedium(lost)
    medium.anchored = lambda: SharedStore(lost).load()[0].audit.seq
    with pytest.raises(AuditError, match="anchors none"):
        AuditLog(Path("/nonexistent"), None, medium).prepare(
            State(), [{"event": "test.append", "reason": "c"}], "c"
        )


# --------------------------------------------------------------------------- real processes

#: One appender: commits K events by compare-and-swap *without* the pass lock
#: (so commits and appends of all appenders interleave), re-reading the state
#: on a lost race; prints each seq it committed.
_APPENDER = textwrap.dedent("""
    import json, sys
    from keymgr.audit import AuditLog
    from keymgr.auditstore import StoreMedium
    from keymgr.errors import ConflictError
    from keymgr.stores import open_store
    url, who, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_store(url)
    medium = StoreMedium(store.adapter)
    medium.anchored = lambda: store.load()[0].audit.seq
    log = AuditLog(__import__("pathlib").Path("/nonexistent"), None, medium)
    done = lost = 0
    while done < k:
        try:
            state, token = store.load()
            log.flush(state)  # another appender's outbox, perhaps
            new = log.prepare(state, [{"event": "test.append", "reason": f"{who}:{done}"}], who)
            store.commit(new, token)
        except ConflictError:  # the state changed since read: read it again
            lost += 1
            continue
        log.flush(new)  # perhaps appended already by another appender: never an error
        print(new.audit.seq, flush=True)
        done += 1
    print("lost", lost, flush=True)
""")


def race(url: str, n: int, k: int, cwd: Path, env: dict[str, str]) -> list[str]:
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, url, f"p{i}", str(k)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         env=env)
        for i in range(n)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and "Traceback" not in err, err
        outs.append(out)
    return outs


def check_race(outs: list[str], n: int, k: int, events: list[dict[str, Any]]) -> None:
    committed = [int(ln) for out in outs for ln in out.splitlines() if ln.isdigit()]
    lines = [ln for out in outs for ln in out.splitlines() if ln.startswith("lost")]
    assert len(committed) == n * k == len(set(committed)), committed
    assert sum(int(ln.split()[1]) for ln in lines) > 0, "no race happened: the test proves nothing"
    reasons = sorted(e["reason"] for e in events)
    assert reasons == sorted(f"p{i}:{j}" for i in range(n) for j in range(k))
    assert [e["seq"] for e in events] == list(range(1, n * k + 1))


def test_processes_racing_to_append_never_fork_or_lose(tmp_path: Path, moto: Any) -> None:
    """N processes commit and append at once to one S3 store with no pass lock:
    each seq is won by exactly one commit, the losers re-read and go on, every
    event is in the store once, and the chain verifies against the anchor."""
    from keymgr.stores import open_store
    from tests.servers_moto import s3_client, s3_state_url

    s3_client(moto.url).create_bucket(Bucket="race")
    url = s3_state_url(moto.url, "race")
    n, k = 4, 6
    t0 = time.monotonic()
    outs = race(url, n, k, tmp_path, dict(__import__("os").environ))
    store = open_store(url)
    anchor = store.load()[0].audit
    log = AuditLog(tmp_path / "none", None, StoreMedium(store.adapter))  # type: ignore[attr-defined]
    assert log.check(anchor).events == n * k
    check_race(outs, n, k, list(log.events()))
    assert time.monotonic() - t0 < 120


# --------------------------------------------------------------------------- moto, through the CLI

BUCKET = "audit-store"
KEY = "keymgr/state.json"


def s3_home(home: Home, moto: Any, *, mirror: bool = False, **params: object) -> Any:
    """KMS keys, the state and the audit chain in S3 (moto); returns an S3 client."""
    from tests.servers_moto import kms_options, s3_client, s3_state_url, write_config

    s3 = s3_client(moto.url)
    if not [b for b in s3.list_buckets()["Buckets"] if b["Name"] == BUCKET]:
        s3.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    write_config(
        home, state=s3_state_url(moto.url, BUCKET, KEY, **params),
        backends={"kms": kms_options(moto.url)},
        publishers={"site": {"type": "file", "path": "public/.well-known/jwks.json"}},
        rings={"default": {"backend": "kms", "algorithm": "ES256"}},
    )
    if not mirror:
        home.config.write_text(home.config.read_text().replace('audit_log = "audit.jsonl"\n', ""))
    return s3


def s3_objects(s3: Any) -> dict[int, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                               Prefix=f"{KEY}.audit/"):
        for o in page.get("Contents", []):
            out[int(o["Key"].rsplit("/", 1)[1][:12])] = s3.get_object(
                Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def at(t: Any) -> str:
    return str(t.strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_cli_verify_show_follow_read_the_s3_store(home: Home, moto: Any) -> None:
    s3 = s3_home(home, moto)
    follow = subprocess.Popen(
        [sys.executable, "-m", "keymgr.cli", "--config", str(home.config), "audit", "follow",
         "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=home.dir,
        env=home.env(),
    )
    out: list[str] = []
    err: list[str] = []

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            (out if line.startswith("{") else err).append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not err and time.monotonic() < deadline:
            time.sleep(0.05)
        assert err and "following from event 0" in err[0], err
        for t in TIMES[:4]:
            home.run("reconcile", "--at", at(t), check=True, inproc=True)
        objs = s3_objects(s3)
        assert sorted(objs) == list(range(1, len(objs) + 1)) and len(objs) >= 8
        proc = home.run("audit", "verify", check=True, inproc=True)
        assert proc.stdout.startswith(f"s3://{BUCKET}/{KEY}.audit: ok ({len(objs)} events"), (
            proc.stdout)
        shown = home.run("audit", "show", "--json", check=True, inproc=True).stdout
        assert shown.encode() == b"".join(objs[s] for s in sorted(objs))
        since = home.run("audit", "show", "--json", "--since", at(TIMES[3]), check=True,
                         inproc=True).stdout.splitlines()
        assert since and all(json.loads(x)["ts"] >= at(TIMES[3]) for x in since)
        assert since == shown.splitlines()[-len(since):]
        last = home.run("audit", "show", "--json", "--reverse", "--limit", "1", check=True,
                        inproc=True).stdout
        assert last.encode() == objs[len(objs)]
        deadline = time.monotonic() + 30
        while len(out) < len(objs) and time.monotonic() < deadline and follow.poll() is None:
            time.sleep(0.1)
        # Started at an empty store: every event, each verified, in order.
        assert [json.loads(x)["seq"] for x in out] == sorted(objs), (out, err)
    finally:
        follow.kill()
        follow.wait(timeout=10)
        reader.join(timeout=10)
    assert not (home.dir / "audit.jsonl").exists()


def test_cli_refuses_a_rewritten_s3_head_with_one_line(home: Home, moto: Any) -> None:
    s3 = s3_home(home, moto)
    for t in TIMES[:2]:
        home.run("reconcile", "--at", at(t), check=True, inproc=True)
    objs = s3_objects(s3)
    n = max(objs)
    ev = json.loads(objs[n])
    ev["actor"] = "cli:someone-else"
    ev["hash"] = chain_hash(ev["prev"], ev)
    s3.put_object(Bucket=BUCKET, Key=f"{KEY}.audit/{n:012d}.json",
                  Body=json.dumps(ev).encode() + b"\n")
    state = s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
    proc = home.run("rotate", "default", "--at", at(TIMES[1] + A), inproc=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"audit store s3://{BUCKET}/{KEY}.audit" in lines[0] and "rewritten" in lines[0]
    assert s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == state
    proc = home.run("audit", "verify", inproc=True)
    assert proc.returncode == 1 and f"event {n}: differs from the head" in proc.stderr, (
        proc.stderr)


def test_cli_imports_a_file_log_into_s3(home: Home, moto: Any) -> None:
    """An upgrade: the state and its log kept in files, then the state moved to
    S3. ``audit import`` copies the log, verified; a second run writes nothing."""
    home.set_ring(**SHORT_POLICY)
    for t in TIMES[:3]:
        home.run("reconcile", "--at", at(t), check=True, inproc=True)
    lines = (home.dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
    from tests.servers_moto import s3_client, s3_state_url

    s3 = s3_client(moto.url)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=(home.dir / "state.json").read_bytes())
    shards = home.dir / "state.json.shards"  # a sharded state (KEYMGR_TEST_SHARDS): the same names
    for doc in sorted(shards.iterdir()) if shards.is_dir() else []:
        s3.put_object(Bucket=BUCKET, Key=f"{KEY}.shards/{doc.name}", Body=doc.read_bytes())
    text = with_state_url(home.config.read_text(), s3_state_url(moto.url, BUCKET, KEY))
    home.config.write_text(text)
    proc = home.run("audit", "verify", inproc=True)
    assert proc.returncode == 1 and "run 'keymgr audit import'" in proc.stderr, proc.stderr
    proc = home.run("audit", "import", inproc=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(lines)} events imported" in proc.stdout, proc.stdout
    objs = s3_objects(s3)
    assert [objs[s] for s in range(1, len(lines) + 1)] == lines
    assert json.loads(objs[len(lines) + 1])["event"] == "audit.imported"
    again = home.run("audit", "import", inproc=True)
    assert again.returncode == 0 and f"{len(lines) + 1} events imported" in again.stdout
    home.run("audit", "verify", check=True, inproc=True)
    # The file goes on as the mirror of the same chain.
    assert (home.dir / "audit.jsonl").read_bytes() == b"".join(objs[s] for s in sorted(objs)) + (
        s3_objects(s3)[max(s3_objects(s3))])


def test_s3_object_lock_keeps_every_audit_event(home: Home, moto: Any) -> None:
    """``audit_retention`` / ``audit_lock`` on the s3:// URL: each audit object
    is created with Object Lock (moto enforces the retention of a version):
    its version cannot be deleted, and an overwrite (a newer version) leaves
    it as it was, so verify names the event and removing the newer version
    restores the chain. The state, lock and lease objects are not locked."""
    s3 = s3_home(home, moto, audit_retention="2d", audit_lock="compliance")
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    for t in TIMES[:2]:
        home.run("reconcile", "--at", at(t), check=True, inproc=True)
    key = f"{KEY}.audit/{1:012d}.json"
    head = s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    days = (head["ObjectLockRetainUntilDate"] - datetime.now(UTC)).total_seconds() / 86400
    assert 1.9 < days <= 2.0, days
    assert "ObjectLockMode" not in s3.head_object(Bucket=BUCKET, Key=KEY)
    version = head["VersionId"]
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with pytest.raises(s3.exceptions.ClientError) as info:
        s3.delete_object(Bucket=BUCKET, Key=key, VersionId=version)
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    forged = s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"seq":1}\n')["VersionId"]
    assert s3.get_object(Bucket=BUCKET, Key=key, VersionId=version)["Body"].read() == original
    proc = home.run("audit", "verify", inproc=True)
    assert proc.returncode == 1 and "event 1" in proc.stderr, proc.stderr
    s3.delete_object(Bucket=BUCKET, Key=key, VersionId=forged)  # not locked: removable
    home.run("audit", "verify", check=True, inproc=True)


@pytest.mark.parametrize(("query", "message"), [
    ("audit_retention=soon", "daemon.state?audit_retention: expected a duration"),
    ("audit_retention=2h", "daemon.state?audit_retention: must be between 1d"),
    ("audit_lock=compliance", "daemon.state?audit_lock: needs audit_retention"),
    ("audit_retention=400d&audit_lock=legal", "daemon.state?audit_lock: expected one of"),
])
def test_object_lock_parameters_are_checked(home: Home, query: str, message: str) -> None:
    text = with_state_url(home.config.read_text(), f"s3://bucket/state.json?{query}")
    home.config.write_text(text)
    proc = home.run("config", "check", inproc=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("point", ["audit.before_flush", "audit.mid_append"])
def test_sigkill_between_commit_and_store_append_is_repaired(
    home: Home, moto: Any, point: str
) -> None:
    """A real SIGKILL at each point between the state commit and the last audit
    object (KEYMGR_CRASH_AT): the store lags the anchor; ``audit verify`` says
    the events are in the outbox; the next run creates exactly the missing
    objects, and every event is in the store once."""
    s3 = s3_home(home, moto)
    home.set_ring(**SHORT_POLICY)
    for t in TIMES[:2]:
        home.run("reconcile", "--at", at(t), check=True, inproc=True)
    # TIMES[2]: the promotion and the retirement, one commit of several events.
    proc = home.run("reconcile", "--at", at(TIMES[2]), env=home.env(KEYMGR_CRASH_AT=point))
    assert proc.returncode == -9, proc.stdout + proc.stderr
    state = json.loads(s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
    objs = s3_objects(s3)
    assert len(objs) < state["audit"]["seq"], (point, sorted(objs))
    proc = home.run("audit", "verify", inproc=True)
    assert proc.returncode == 1 and "still in the state's outbox" in proc.stderr, proc.stderr
    home.run("reconcile", "--at", at(TIMES[2]), check=True, inproc=True)
    objs = s3_objects(s3)
    state = json.loads(s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
    assert sorted(objs) == list(range(1, state["audit"]["seq"] + 1))
    events = [json.loads(objs[s]) for s in sorted(objs)]
    assert len({(e["event"], e.get("kid")) for e in events if e["event"].startswith("key.")}) == (
        len([e for e in events if e["event"].startswith("key.")]))
    home.run("audit", "verify", check=True, inproc=True)
