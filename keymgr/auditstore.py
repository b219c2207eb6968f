"""The audit chain kept in the shared state store: one immutable object per event.

With a shared state store (S3, Vault / OpenBao KV, GCS, Azure Blob) the audit
log's record is the store itself, not a file: event ``N`` is the document
``audit/%012d.json`` (``s3://b/keymgr/state.json.audit/000000000123.json``),
its bytes exactly the JSON line the file would hold, written with the
adapter's create-if-absent (``If-None-Match: *``, KV ``cas=0``, GCS
``ifGenerationMatch=0``). No replica needs a shared volume.

Why it cannot fork: sequence numbers are decided by the state commit (events
are sealed into the anchor's outbox *before* the compare-and-swap), so two
replicas can only ever write the *same* event N -- one from its own commit,
one flushing the other's outbox after a crash. The first create wins; the
second finds the object and compares bytes: identical is "already written"
(fine), different is an object keymgr did not write (tampering, or two states
sharing one audit prefix) and is refused with one line. The chain, the anchor,
the outbox checks and the signed checkpoints are :class:`keymgr.audit.AuditLog`'s,
the same for the file and the store; this module is only the medium
(:class:`StoreMedium`), the optional local mirror (:class:`Mirror`), the
one-time import of a file log (:func:`import_file`), ``audit show`` over the
store (:func:`query_store`) and ``audit follow`` (:class:`StoreFollower`).

No listing: the store's end is found by probing from the seq the state anchors
(two reads in the steady state; galloping when it lags or leads), ``--since``
by bisecting on sequence numbers over the events' times (about 20 reads for a
million events), ``verify`` reads in order with a bounded number of reads in
flight. The adapters need no list operation, and a prefix of 10^6 objects is
never enumerated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymgr.audit import (
    GENESIS,
    AuditLog,
    FileMedium,
    LineCheck,
    Medium,
    Verified,
    encode_line,
    parse_event,
)
from keymgr.auditquery import Following
from keymgr.checkpoint import Checkpointer
from keymgr.errors import AuditError, ConflictError, UsageError
from keymgr.faults import crashpoint
from keymgr.logs import get_logger

if TYPE_CHECKING:
    from keymgr.auditquery import Hit, Query
    from keymgr.config import Config
    from keymgr.docstore import DocumentAdapter
    from keymgr.manager import KeyManager
    from keymgr.model import AuditAnchor, State

log = get_logger("keymgr.audit")

#: Reads in flight while ``verify`` / ``show`` stream the chain: enough to hide
#: a store's latency (tens of ms) behind hashing, few enough to stay polite.
PREFETCH = 16
#: A mirror behind the store (events another replica wrote) is filled from the
#: store up to this many events per append; further behind, it skips ahead.
MIRROR_CATCHUP = 1000
#: The events ``audit show --since`` reads before where it seeks to, and past
#: where ``--until`` ends, to notice times that go back (as the file's window).
WINDOW = 64


def leaf(seq: int) -> str:
    """The document name of event ``seq``."""
    return f"audit/{seq:012d}.json"


def record_in_store(config: Config, store: object) -> bool:
    """Whether the audit record is ``store``'s objects: a shared document
    store (:class:`~keymgr.docstore.SharedStore`), unless ``[daemon] audit = "file"``."""
    # Duck-typed (a SharedStore's flag and adapter): a file store never
    # imports the document-store machinery.
    shared = getattr(store, "shared", False) is True and hasattr(store, "adapter")
    if config.daemon.audit == "store" and not shared:
        raise AuditError(
            f'{config.path}: daemon.audit = "store", but the state store {config.daemon.state} '
            "cannot hold audit events (a shared document store is needed)"
        )
    return shared and config.daemon.audit != "file"


def store_log(config: Config, store: Any, checkpoints: Checkpointer | None) -> AuditLog:
    """The audit log of ``config`` kept in ``store`` (a SharedStore), with its
    ``audit_log`` as a mirror when set, and as the file a first start imports."""
    medium = StoreMedium(store.adapter)
    log_ = AuditLog(config.daemon.audit_log, checkpoints, medium)
    if config.daemon.audit_log_set:
        log_.mirror = Mirror(config.daemon.audit_log, medium)
    return log_


# --------------------------------------------------------------------------- the medium


class StoreMedium(Medium):
    """Events as immutable documents ``audit/<seq>.json`` of a DocumentAdapter."""

    def __init__(
        self, adapter: DocumentAdapter, prefetch: int = PREFETCH, stop: int | None = None
    ) -> None:
        self.adapter = adapter
        self.prefetch = max(1, prefetch)
        #: Read no event beyond this one (``bounded``).
        self.stop = stop
        self.where = f"audit store {adapter.describe('audit')}"

    def bounded(self, seq: int) -> StoreMedium:
        """This medium read up to event ``seq`` only: a check at an anchor read
        earlier, without the lock, while replicas keep appending (the page's)."""
        return StoreMedium(self.adapter, self.prefetch, seq)

    def at(self, n: int) -> str:
        return f"{self.where}: event {n}"

    def read(self, seq: int) -> bytes | None:
        """Event ``seq``'s bytes as stored (None: absent). The adapter's
        StoreError passes unchanged: it names the object, and an outage is a
        store failure, not a broken chain."""
        blob = self.adapter.read(leaf(seq))
        return None if blob is None else blob.data

    def event(self, seq: int, data: bytes | None = None) -> dict[str, Any] | None:
        """Event ``seq`` parsed (``data``: its bytes, already read); AuditError
        when it is not one, or not event ``seq``."""
        if data is None:
            data = self.read(seq)
        if data is None:
            return None
        ev = parse_event(data, self.at(seq))
        if ev["seq"] != seq:
            raise AuditError(
                f"{self.at(seq)} holds seq {ev['seq']}: not written by keymgr; "
                "run 'keymgr audit verify'"
            )
        return ev

    def last(self, hint: int = 0, drop_torn: bool = False) -> dict[str, Any] | None:
        """The last event, found without listing: from ``hint`` (the anchored
        seq), probe ``hint + 1`` and ``hint`` (the steady state: two reads);
        else gallop up (the store leads: events beyond the anchor, which the
        caller refuses) or down (it lags: a crash before the append), doubling
        the step, then bisect. It assumes the events present are a prefix; a
        hole is found by ``verify``, and anything it makes this return fails
        the caller's check against the anchor."""
        cache: dict[int, bytes | None] = {}

        def present(s: int) -> bool:
            if s <= 0:
                return True
            if s not in cache:
                cache[s] = self.read(s)
            return cache[s] is not None

        hint = max(0, hint)
        if present(hint + 1):
            lo, step = hint + 1, 1
            while present(lo + step):
                lo, step = lo + step, step * 2
            hi = lo + step
        elif present(hint):
            lo = hi = hint
        else:
            hi, step = hint, 1
            lo = max(0, hi - step)
            while not present(lo):
                hi, step = lo, step * 2
                lo = max(0, hi - step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if present(mid):
                lo = mid
            else:
                hi = mid
        return None if lo == 0 else self.event(lo, cache[lo])

    def fetch(self, seqs: Iterable[int]) -> Iterator[tuple[int, bytes | None]]:
        """(seq, bytes or None) for ``seqs`` in their order, with up to
        ``prefetch`` reads in flight; the caller may stop at any time (at most
        ``prefetch`` reads are then wasted)."""
        it = iter(seqs)
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="keymgr-audit") as pool:
            window: list[tuple[int, Future[bytes | None]]] = []
            try:
                for s in it:
                    window.append((s, pool.submit(self.read, s)))
                    if len(window) >= self.prefetch:
                        break
                while window:
                    s, fut = window.pop(0)
                    data = fut.result()  # done before the next is sent: never more in flight
                    nxt = next(it, None)
                    if nxt is not None:
                        window.append((nxt, pool.submit(self.read, nxt)))
                    yield s, data
            finally:
                for _, fut in window:
                    fut.cancel()

    def lines(self, start: int = 1, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Events ``start``.. in order, until the first absent one (or ``stop``)."""
        if self.stop is not None:
            stop = self.stop if stop is None else min(stop, self.stop)
        seqs: Iterable[int] = (
            range(start, stop + 1) if stop is not None else _count(start)
        )
        for s, data in self.fetch(seqs):
            if data is None:
                return
            yield s, data

    def append(self, events: list[dict[str, Any]]) -> None:
        """Create each event's document, in order (never in parallel: a crash
        must leave a prefix, which the next flush continues from the outbox)."""
        for i, ev in enumerate(events):
            if i:
                crashpoint("audit.mid_append")
            self.put(int(ev["seq"]), encode_line(ev))

    def put(self, seq: int, data: bytes) -> bool:
        """Create event ``seq`` with ``data``; False when it already held those
        exact bytes (another replica, or our own retried write, was first)."""
        name = leaf(seq)
        try:
            self.adapter.create(name, data)
            return True
        except ConflictError:
            pass
        have = self.read(seq)
        if have == data:
            return False
        raise AuditError(
            f"{self.at(seq)} ({self.adapter.describe(name)}) exists with other content than "
            "the state's outbox committed: not written by keymgr (tampering, or another "
            "state uses this audit prefix); run 'keymgr audit verify'"
        )


def _count(start: int) -> Iterator[int]:
    n = start
    while True:
        yield n
        n += 1


def up_to(audit: AuditLog, seq: int) -> AuditLog:
    """``audit`` read up to event ``seq`` only: a check at an anchor read a
    moment ago, without the lock, while replicas go on appending (the
    operator page's background verification)."""
    medium = audit.medium
    assert isinstance(medium, StoreMedium)
    return AuditLog(audit.path, audit.checkpoints, medium.bounded(seq))


def verify_store(m: KeyManager, pinned: Any = None) -> Verified:
    """``keymgr audit verify`` on the store, without holding the pass lock
    for the whole chain (a million reads would stop the daemon's passes for
    minutes): the anchor is read under the lock, events 1..anchor are checked
    (chain, anchored head, checkpoints) while replicas go on appending, then,
    under the lock again, the event after the head the state anchors *now*
    must be absent -- an object beyond it was not committed by keymgr."""
    medium = m.audit.medium
    assert isinstance(medium, StoreMedium)
    with m.store.exclusive():  # not between a pass's commit and its append
        anchor = m.state().audit
    if anchor.seq and medium.read(1) is None and m.audit.path.exists():
        raise AuditError(
            f"{medium.where}: holds no events but the state anchors seq {anchor.seq}, and the "
            f"file log {m.audit.path} was not imported yet: run 'keymgr audit import'"
        )
    r = up_to(m.audit, anchor.seq).check(
        anchor, pinned=pinned, require_signed=m.config.audit is not None
    )
    with m.store.exclusive():
        now = m.store.load()[0].audit
        extra = medium.read(now.seq + 1)
    if extra is not None:
        raise AuditError(
            f"{medium.at(now.seq + 1)}: beyond the head anchored in state (seq {now.seq}): "
            "not written by keymgr"
        )
    return r


def tail_events(audit: AuditLog, n: int) -> list[dict[str, Any]]:
    """The last ``n`` events of the store, parsed, oldest first (the operator
    page): the end found from the last anchor this process saw, then ``n``
    reads; an object that is not an event is shown as such."""
    medium = audit.medium
    assert isinstance(medium, StoreMedium)
    last = medium.last(audit._hint)
    end = 0 if last is None else int(last["seq"])
    out: list[dict[str, Any]] = []
    for _, data in medium.fetch(range(max(1, end - n + 1), end + 1)):
        try:
            ev = json.loads(data) if data is not None else None
        except ValueError:
            ev = None
        out.append(ev if isinstance(ev, dict) else {"event": "(unreadable event)"})
    return out


# --------------------------------------------------------------------------- mirror


class Mirror:
    """``[daemon] audit_log`` with the store as the record: a local copy for
    tools that tail files (a sidecar shipping to a SIEM).

    Written after the store, best effort: a failure is logged, never raised,
    and the mirror is never checked against anything -- it is not the record.
    It receives the events this process appends; when it is behind (events
    another replica appended), the gap is filled from the store first, up to
    MIRROR_CATCHUP events, so a pod's mirror is whole as long as it runs. A
    new (empty) mirror starts at the events appended now, not at seq 1.
    """

    def __init__(self, path: Path, source: StoreMedium) -> None:
        self.file = FileMedium(path)
        self.source = source

    def __call__(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        try:
            self.file.repair()
            last = self.file.last(drop_torn=True)
            have = 0 if last is None else int(last["seq"])
            todo = [ev for ev in events if ev["seq"] > have]
            if not todo:
                return
            first = int(todo[0]["seq"])
            if have and first > have + 1:
                if first - have - 1 <= MIRROR_CATCHUP:
                    fill = list(self.source.lines(have + 1, first - 1))
                    self.file.append([json.loads(line) for _, line in fill])
                else:
                    log.warning("audit.mirror_gap", mirror=str(self.file.path), after=have,
                                resumes=first)
            self.file.append(todo)
        except (AuditError, OSError, ValueError) as e:
            log.warning("audit.mirror_failed", mirror=str(self.file.path), error=str(e))


# --------------------------------------------------------------------------- import


def import_needed(audit: AuditLog, anchor: AuditAnchor, last: dict[str, Any] | None) -> bool:
    """Whether the store lags the anchor and the file log at ``audit.path``
    holds more: a deployment that kept its log in a file before the store
    was the record (or an import a crash interrupted)."""
    if not audit.in_store or anchor.seq == 0:
        return False
    have = 0 if last is None else int(last["seq"])
    outbox = anchor.outbox
    if outbox and int(outbox[0]["seq"]) <= have + 1:
        return False  # the outbox bridges the gap: a crash before the append
    try:
        fl = FileMedium(audit.path).last(drop_torn=True)
    except AuditError:
        return True  # import_file says what is wrong with it
    return fl is not None and int(fl["seq"]) > have


def import_file(audit: AuditLog, state: State, path: Path | None = None) -> int:
    """Copy the file log at ``path`` (default ``audit.path``) into the store,
    once; return the number of events the store holds then.

    The file is first brought to the state's anchor as the file store would
    (its outbox appended after a crash) and verified whole -- the chain, the
    anchored head and, with ``[audit]``, every checkpoint signature -- so a
    file that is not the anchored chain is refused before anything is
    written. Events are then created in order, create-if-absent: an event the
    store already holds with the same bytes is skipped (a second run, or a run
    a crash interrupted, resumes), with other bytes it is refused. The store
    is verified against the anchor at the end.
    """
    src_path = path or audit.path
    if not audit.in_store:
        raise UsageError("the audit log is not kept in the state store: nothing to import")
    medium = audit.medium
    assert isinstance(medium, StoreMedium)
    anchor = state.audit
    src = AuditLog(src_path, audit.checkpoints)
    src.flush(state)
    require = audit.checkpoints is not None
    r = src.check(anchor, require_signed=require)
    written = 0
    for n, line in src.lines():
        if n > anchor.seq:
            break
        written += medium.put(n, line)
    v = audit.check(anchor, require_signed=require)
    log.warning(
        "audit.imported", source=str(src_path), store=medium.where, events=r.events,
        written=written,
    )
    return v.events


# --------------------------------------------------------------------------- show


def query_store(
    medium: StoreMedium, anchored: int, q: Query, warn: Callable[[str], None] | None = None
) -> Iterator[Hit]:
    """The events ``q`` selects, in order (newest first with ``q.reverse``),
    read from the store as they are yielded; ``anchored`` is the seq the
    state anchors (where the end is looked for). Nothing is verified.

    Seeking by time is a bisection on sequence numbers over the events' own
    ``ts``: events are numbered in commit order and their times do not go
    back by more than :data:`keymgr.auditquery.SLACK`, as in the file, so the
    first event dated ``since - SLACK`` or later is found in log2(n) reads
    (20 for a million events) with no listing and no index to keep
    consistent. The ``WINDOW`` events before it are read too: one dated
    ``since`` or later shows the times go back further, and everything is
    read (with a warning). The scan ends ``WINDOW`` events past the first
    one dated after ``until + SLACK``. Backwards the same, mirrored.
    """
    from keymgr.auditquery import SLACK, Hit, _disorder, _Match, _stamp, line_ts

    last = medium.last(anchored)
    end = 0 if last is None else int(last["seq"])
    since = _stamp(q.since) if q.since is not None else None
    until = _stamp(q.until) if q.until is not None else None
    timed = since is not None or until is not None
    seek = timed and not q.scan
    match = _Match(q, medium.where)
    report = warn if seek else None

    def ts_of(s: int) -> str | None:
        for t in range(s, min(end, s + 8) + 1):  # an undated event: the next dated one
            data = medium.read(t)
            stamp = line_ts(data) if data is not None else None
            if stamp is not None:
                return stamp
        return None

    def first_not(before: Callable[[str], bool]) -> int:
        """The first seq in 1..end+1 whose time does not satisfy ``before``."""
        lo, hi = 0, end + 1  # before(lo) holds (sentinel), before(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            stamp = ts_of(mid)
            if stamp is not None and before(stamp):
                lo = mid
            else:
                hi = mid
        return hi

    def any_dated(seqs: Iterable[int], pred: Callable[[str], bool]) -> int | None:
        for s, data in medium.fetch(seqs):
            stamp = line_ts(data) if data is not None else None
            if stamp is not None and pred(stamp):
                return s
        return None

    def disorder(s: int, then: str) -> None:
        if report is not None:
            _disorder(report, medium.where, s, then)

    stop: str | None = None
    if q.reverse:
        hi = end
        if seek and until is not None and q.until is not None:
            ceiling = _stamp(q.until + SLACK)
            hi = first_not(lambda ts: ts <= ceiling) - 1
            after = range(hi + 1, min(end, hi + WINDOW) + 1)
            if hi < end and any_dated(after, lambda ts: ts <= until) is not None:
                disorder(hi + 1, "reading every event")
                hi, report = end, None
        if seek and q.since is not None:
            stop = _stamp(q.since - SLACK)
        order: Iterable[int] = range(hi, 0, -1)
    else:
        lo = 1
        if seek and since is not None and q.since is not None:
            floor = _stamp(q.since - SLACK)
            lo = first_not(lambda ts: ts < floor)
            before = range(max(1, lo - WINDOW), lo)
            if lo > 1 and any_dated(before, lambda ts: ts >= since) is not None:
                disorder(lo - 1, "reading every event")
                lo, report = 1, None
        if seek and q.until is not None:
            stop = _stamp(q.until + SLACK)
        order = range(lo, end + 1)
    n = 0
    stop_at: int | None = None
    for s, data in medium.fetch(order):
        if data is None:
            continue  # a hole: 'audit verify' reports it; show does not verify
        line = data.rstrip(b"\n")
        if timed:
            stamp = line_ts(line)
            if stamp is None:
                continue
            if stop_at is not None and (s < stop_at if q.reverse else s > stop_at):
                return
            if stop is not None and stop_at is None and (
                stamp < stop if q.reverse else stamp > stop
            ):
                stop_at = s - WINDOW if q.reverse else s + WINDOW
            if (since is not None and stamp < since) or (until is not None and stamp > until):
                continue
            if stop_at is not None:
                disorder(s, "reading on to the end")
                report, stop, stop_at = None, None, None
        try:
            ev = match(s, line)
        except AuditError:
            raise AuditError(
                f"{medium.at(s)} is not an audit event (JSON object); 'keymgr audit show' "
                "does not verify the log: run 'keymgr audit verify'"
            ) from None
        if ev is None:
            continue
        yield Hit(s, line, ev)
        n += 1
        if q.limit is not None and n >= q.limit:
            return


# --------------------------------------------------------------------------- follow


class StoreFollower(Following):
    """``keymgr audit follow`` on the store: new events, each verified first.

    It starts from a verified point read under the store's lock: the anchored
    head (its event's hash, and with ``[audit]`` its checkpoint, checked as
    before a commit), or with ``from_start`` the whole chain, verified and
    then printed (each event's bytes compared with what was verified). Then
    it polls the next sequence number: each event must chain (``seq``,
    ``prev``, ``hash``, any checkpoint it carries) and is printed once the
    state's anchor has reached it with the same hash at the anchored seq
    and, when checkpoints are in use, once a checkpoint covers it. An event
    beyond the anchor for ``stuck_after`` seconds, or an anchored head that
    is not the chain followed, ends it with an AuditError (exit 1).
    """

    def __init__(
        self,
        m: KeyManager,
        *,
        from_start: bool,
        emit: Callable[[dict[str, Any], bytes], None],
        note: Callable[[str], None],
        interval: float = 1.0,
        stuck_after: float = 30.0,
    ) -> None:
        medium = m.audit.medium
        assert isinstance(medium, StoreMedium)
        self.medium = medium
        super().__init__(
            m,
            where=medium.where,
            from_start=from_start,
            emit=emit,
            note=note,
            interval=interval,
            stuck_after=stuck_after,
        )
        #: Events checked but not confirmed by the anchor yet.
        self.pending: list[tuple[dict[str, Any], bytes]] = []
        self.beyond_since: float | None = None

    def _at(self, n: int) -> str:
        return self.medium.at(n)

    def start(self) -> None:
        m = self.m
        with m.store.exclusive():  # not between a pass's commit and its append
            anchor = m.store.load()[0].audit
        if self.from_start:
            self._verify_existing(anchor)
            self.note(f"{self.where}: {anchor.seq} existing event(s) verified, anchored in "
                      f"state; following")
            return
        last = self.medium.event(anchor.seq) if anchor.seq else None
        if anchor.seq and last is None:
            raise AuditError(
                f"{self.medium.at(anchor.seq)} missing, but the state anchors it; "
                "run 'keymgr audit verify'"
            )
        m.audit.check_head(anchor, last)
        key = self._state_key(anchor)
        self.check = LineCheck(
            m.audit.path, anchor.seq, anchor.hash if anchor.seq else GENESIS, key,
            where=self.where,
        )
        signed = f", signed by audit key {key.kid}" if key is not None else ""
        self.note(f"{self.where}: following from event {anchor.seq} (the head anchored in "
                  f"state{signed})")

    def _verify_existing(self, anchor: AuditAnchor) -> None:
        digests = bytearray()
        for _, line in self.medium.lines(1, anchor.seq):
            self.check.line(line)
            digests += hashlib.blake2b(line, digest_size=16).digest()
        s = self.check.seq
        if s < anchor.seq:
            raise AuditError(f"{self.medium.at(s + 1)} missing: the store ends at seq {s} but "
                             f"the state anchors seq {anchor.seq}; run 'keymgr audit verify'")
        if s and self.check.prev != anchor.hash:
            raise AuditError(f"{self.medium.at(s)}: differs from the head anchored in state")
        self._require_signed(anchor, s)
        for n, line in self.medium.lines(1, s):
            i = 16 * (n - 1)
            if hashlib.blake2b(line, digest_size=16).digest() != digests[i : i + 16]:
                raise AuditError(f"{self.medium.at(n)}: changed while it was being printed, "
                                 "after it was verified")
            self.emit(json.loads(line), line.rstrip(b"\n"))

    def poll(self) -> None:
        # The anchor first: an event read after it and beyond it may be a
        # commit that landed in between (confirmed at the next poll).
        anchor = self.m.store.load()[0].audit
        while True:
            data = self.medium.read(self.check.seq + 1)
            if data is None:
                break
            ev = self.check.line(data)
            self.pending.append((ev, data.rstrip(b"\n")))
        confirmed = anchor.seq
        if self._signing(anchor):
            confirmed = min(confirmed, self.check.signed_through)
        for ev, _ in self.pending:
            if ev["seq"] == anchor.seq and ev["hash"] != anchor.hash:
                raise AuditError(
                    f"{self.medium.at(anchor.seq)}: differs from the head anchored in state"
                )
        while self.pending and self.pending[0][0]["seq"] <= confirmed:
            ev, raw = self.pending.pop(0)
            self.emit(ev, raw)
        if self.pending and self.pending[0][0]["seq"] > anchor.seq:
            now = time.monotonic()
            self.beyond_since = self.beyond_since or now
            if now - self.beyond_since > self.stuck_after:
                raise AuditError(
                    f"{self.medium.at(self.pending[0][0]['seq'])}: beyond the head anchored in "
                    f"state (seq {anchor.seq}) for {self.stuck_after:g}s: not written by keymgr"
                )
        else:
            self.beyond_since = None

