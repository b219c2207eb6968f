"""The audit log: hash-chained JSON lines, anchored in the state document.

The lines live in a :class:`Medium`: the JSON-lines file (:class:`FileMedium`,
``[daemon] audit_log``), or, with a shared state store, one immutable object
per event in the store (``keymgr.auditstore.StoreMedium``). Everything below
-- the chain, the anchor, the outbox, the checkpoints -- is written once here
for both; a medium only reads its end, reads in order and appends.

Each line carries ``seq``, ``prev`` (the previous line's hash) and ``hash`` =
SHA-256 over ``prev`` and the line's canonical JSON (sorted keys, no ``hash``
and no checkpoint fields). A chain alone cannot show that its tail was cut off,
so every state commit also records the chain head (seq, hash): ``verify`` then
detects an edited, removed, reordered *or truncated* line.

Transition events are committed inside the state document first (the anchor's
outbox) and appended to the log right after; on the next start any event that
did not reach the log is appended from the outbox. A crash therefore never
loses an event and never writes one twice (invariant 7).

Nothing is appended, and no new head is sealed, unless the log's last line is
exactly the anchored head (docs/design.md#trust-boundaries): a log rewritten with
a recomputed chain is refused before anything commits, never re-anchored. The
outbox itself is checked before it is appended: it must chain, end at the
anchor, and every key event in it must agree with the state it was committed
with.

The chain has no secret. With ``[audit]`` configured, each commit also signs
its new head with an audit key held in a backend (keymgr.checkpoint), and
``verify`` checks those signatures with the public keys found in the log or
pinned by the operator.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keymgr import checkpoint
from keymgr.checkpoint import CKPT_FIELDS, KEY_EVENT, AuditKey, Checkpointer
from keymgr.errors import AuditError, AuditIOError, ConflictError, StateError
from keymgr.faults import crashpoint
from keymgr.fsutil import NotAFile, open_append, open_regular, write_all
from keymgr.jose import b64url_decode
from keymgr.logs import get_logger
from keymgr.model import (
    ACTIVE,
    DESTROYED,
    EXPIRED,
    PENDING,
    PUBLISHED,
    RETIRED,
    REVOKED,
    STATES,
    AuditAnchor,
    State,
)
from keymgr.timefmt import format_time, parse_time, utcnow

if TYPE_CHECKING:
    from keymgr.config import Config
    from keymgr.stores import StateStore

GENESIS = "0" * 64
#: Fields written first, for people reading the JSON lines.
_ORDER = ("ts", "seq", "event", "ring", "kid", "backend", "actor", "reason")
#: Fields outside the chain hash: the hash itself, and the checkpoint
#: signature over it (so the chain verifies without the audit key).
_UNHASHED = frozenset({"hash", *CKPT_FIELDS})
_HASH_RE = re.compile(r"[0-9a-f]{64}")
#: The longest line an audit log may hold. keymgr's events are a few hundred
#: bytes (an ``audit.key`` event with an RSA-4096 JWK about 1 KB); a longer
#: "line" is something else, and is refused before it is read whole: a log
#: whose end is gigabytes without a newline would otherwise be read into
#: memory by every pass.
MAX_LINE = 1 << 24

#: The key state each key event records; a key in state must be at or past it.
KEY_EVENT_STATES = {
    "key.generated": PENDING,
    "key.adopted": PENDING,  # or the ``state`` it was adopted as
    "key.published": PUBLISHED,
    "key.promoted": ACTIVE,
    "key.retired": RETIRED,
    "key.expired": EXPIRED,
    "key.destroyed": DESTROYED,
    "key.forgotten": DESTROYED,  # the full record replaced by its tombstone
    "key.revoked": REVOKED,
}
#: Key events about keys the state does not record (or records as destroyed).
ORPHAN_EVENTS = frozenset({"key.orphan_destroyed"})
#: Key events after which the state holds nothing of the key (its tombstone dropped).
GONE_EVENTS = frozenset({"key.tombstone_dropped"})
_LIFECYCLE = (PENDING, PUBLISHED, ACTIVE, RETIRED, EXPIRED, DESTROYED)
_FIX = (
    "refusing to append; restore the log (or the state) from a copy, "
    "or run 'keymgr audit verify'"
)


def canonical(event: dict[str, Any]) -> bytes:
    body = {k: v for k, v in event.items() if k not in _UNHASHED}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev: str, event: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + canonical(event)).hexdigest()


def _plain(v: Any) -> Any:
    return format_time(v) if isinstance(v, datetime) else v


def seal(events: Iterable[dict[str, Any]], seq: int, prev: str, actor: str) -> list[dict[str, Any]]:
    """Number and chain ``events`` after (seq, prev)."""
    out = []
    for ev in events:
        seq += 1
        body = {k: _plain(v) for k, v in ev.items() if v is not None}
        body.setdefault("actor", actor)
        body["seq"] = seq
        body["prev"] = prev
        ordered = {k: body[k] for k in _ORDER if k in body}
        ordered.update({k: v for k, v in body.items() if k not in ordered})
        ordered["hash"] = prev = chain_hash(prev, ordered)
        out.append(ordered)
    return out


def at_or_past(have: str, recorded: str) -> bool:
    """Whether a key now in state ``have`` can have gone through ``recorded``.

    pending < published < active < retired < expired < destroyed; any state
    may turn revoked, and a revoked key is destroyed.
    """
    if recorded == REVOKED:
        return have in (REVOKED, DESTROYED)
    if have == DESTROYED:
        return True
    if have == REVOKED:
        return recorded in _LIFECYCLE and recorded != DESTROYED
    return (
        have in _LIFECYCLE
        and recorded in _LIFECYCLE
        and _LIFECYCLE.index(have) >= _LIFECYCLE.index(recorded)
    )


def _batch_time(state: State, events: list[dict[str, Any]]) -> datetime:
    """The newest time a commit records (``--at`` in drills): when its audit key is due."""
    times = [state.clock] if state.clock is not None else []
    for ev in events:
        ts = ev.get("ts")
        if isinstance(ts, datetime):
            times.append(ts)
        elif isinstance(ts, str):
            try:
                times.append(parse_time(ts))
            except ValueError:
                continue
    return max(times) if times else utcnow()


class OutboxError(StateError, AuditError):
    """The state's outbox is not what keymgr committed: malformed, not chained,
    not ending at the anchor, or recording a transition the state contradicts.
    A state that cannot be trusted (StateError) and an audit refusal at once."""


@dataclass(frozen=True)
class Tail:
    seq: int
    hash: str


@dataclass(frozen=True)
class Verified:
    """What ``AuditLog.check`` proved."""

    events: int
    #: Checkpoint signatures verified.
    checkpoints: int
    #: Audit keys the log introduces.
    keys: int
    #: The last line covered by a verified checkpoint (0: none).
    signed_through: int
    #: Every checkpoint key was among the pinned ones.
    pinned: bool = False


class Medium(abc.ABC):
    """Where the chain's events live: a JSON-lines file, or one immutable
    object per sequence number in the shared state store (keymgr.auditstore).

    Only storage: the chain, the anchor, the outbox and the checkpoints are
    :class:`AuditLog`'s, written once for every medium. Lines are the exact
    bytes keymgr wrote, newline included; nothing read is trusted (the callers
    check every field they use).
    """

    #: For messages: ``audit log PATH`` or ``audit store URL.audit``.
    where: str
    #: Reads the seq the stored state anchors now (``anchored_now``), when
    #: the log was opened for a state store (AuditLog.for_config).
    anchored: Callable[[], int] | None = None

    def at(self, n: int) -> str:
        """Where event ``n`` is, for messages."""
        return f"{self.where}: line {n}"

    @abc.abstractmethod
    def last(self, hint: int = 0, drop_torn: bool = False) -> dict[str, Any] | None:
        """The last event, parsed (None: none). ``hint``: the seq the state
        anchors, where a medium that cannot read its end starts looking;
        ``drop_torn``: look past an interrupted append instead of refusing it."""

    @abc.abstractmethod
    def lines(self, start: int = 1) -> Iterator[tuple[int, bytes]]:
        """(position, raw line) from event ``start`` on, in order."""

    @abc.abstractmethod
    def append(self, events: list[dict[str, Any]]) -> None:
        """Append ``events``, sealed, in order; durable when it returns."""

    def anchored_now(self) -> int | None:
        """The seq the state *now* anchors, read again from where the state is
        (None: not known to the medium). A store shared by replicas that
        commit without waiting for each other (a lost pass lock) can hold
        events beyond the state read a moment ago, and so can any log read
        without the pass lock (``sign``, ``status``, a heartbeat) while a
        pass commits and appends: this tells a stale read from events nobody
        committed."""
        return self.anchored() if self.anchored is not None else None

    def repair(self) -> None:
        """Remove what an interrupted append of ours left (a file's torn last line).
        A store's creates are whole or absent: nothing to do by default."""
        return None


def encode_line(ev: dict[str, Any]) -> bytes:
    """One event as keymgr writes it: compact JSON and a newline."""
    return json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def parse_event(line: bytes, where: str) -> dict[str, Any]:
    """A line that must be an audit event (an object with an int ``seq`` and a
    str ``hash``); AuditError, one line, otherwise."""
    try:
        ev = json.loads(line)
        if isinstance(ev, dict) and type(ev.get("seq")) is int and isinstance(ev.get("hash"), str):
            return ev
    except (ValueError, RecursionError):
        pass
    raise AuditError(f"{where} is not an audit event; run 'keymgr audit verify'")


class FileMedium(Medium):
    """The JSON-lines file: appended with O_APPEND and fsync; its end read backwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"audit log {path}"

    def last(self, hint: int = 0, drop_torn: bool = False) -> dict[str, Any] | None:
        """The last complete line, parsed (None for an empty or missing log).

        Only the end of the file is read (a block, doubled until it holds a
        whole line): checking the head before every commit stays cheap
        however long the log grows.
        """
        try:
            with open_regular(self.path) as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size == 0:
                    return None
                block = 4096
                data = b""
                pos = size
                while True:
                    step = min(block, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
                    lines = data.rstrip(b"\n").split(b"\n")
                    # Three pieces: a torn last line can be dropped and a
                    # whole line still precede it.
                    if len(lines) > 2 or pos == 0:
                        break
                    if len(data) > 2 * MAX_LINE + 2:  # one of the last two is longer
                        raise AuditError(
                            f"{self.where}: its last lines are longer than {MAX_LINE} bytes: "
                            "not audit events; run 'keymgr audit verify'"
                        )
                    block *= 2
        except FileNotFoundError:
            return None
        except NotAFile as e:
            raise self._not_a_file(e) from None
        except OSError as e:
            raise AuditIOError(f"{self.where}: cannot read: {e.strerror}") from None
        if not data.endswith(b"\n") and drop_torn:
            lines = lines[:-1]
            if not lines:
                return None
        elif not data.endswith(b"\n"):
            raise AuditError(
                f"{self.where}: last line is incomplete (torn write); "
                "run 'keymgr audit verify'"
            )
        # Whole from its start: the block began at the file's start, or lines[0]
        # (perhaps partial) is not the last of at least two kept lines.
        return parse_event(lines[-1], f"{self.where}: last line")

    def lines(self, start: int = 1, size: int | None = None) -> Iterator[tuple[int, bytes]]:
        """The lines from ``start`` on; with ``size``, only the file's first
        ``size`` bytes (the lines that existed when it was measured)."""
        try:
            with open_regular(self.path) as f:
                n = 0
                while size is None or size > 0:
                    line = f.readline(MAX_LINE + 1 if size is None else min(size, MAX_LINE + 1))
                    if not line:
                        return
                    if size is not None:
                        size -= len(line)
                    n += 1
                    if len(line) > MAX_LINE:
                        raise AuditError(
                            f"{self.at(n)}: longer than {MAX_LINE} bytes: not an audit event"
                        )
                    if n >= start:
                        yield n, line
        except FileNotFoundError:
            return
        except NotAFile as e:
            raise self._not_a_file(e) from None
        except OSError as e:
            raise AuditIOError(f"{self.where}: cannot read: {e.strerror}") from None

    def append(self, events: list[dict[str, Any]]) -> None:
        data = b"".join(encode_line(ev) for ev in events)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = open_append(self.path, 0o640)
            try:
                half = len(data) // 2
                write_all(fd, data[:half])
                crashpoint("audit.mid_append")
                write_all(fd, data[half:])
                os.fsync(fd)
            finally:
                os.close(fd)
        except NotAFile as e:
            raise self._not_a_file(e) from None
        except OSError as e:
            raise AuditIOError(f"{self.where}: cannot append: {e.strerror}") from None

    def _not_a_file(self, e: NotAFile) -> AuditError:
        """Something planted at the log's name (a FIFO, a device, a directory):
        an AuditError, which the daemon counts as possible tampering, not an
        AuditIOError (a disk that is full or unreadable)."""
        return AuditError(f"{self.where}: {e}; keymgr only ever appends to a regular file")

    def repair(self) -> None:
        """Cut a final line without newline: only our own interrupted append
        makes one, at most :data:`MAX_LINE` long; only the file's end is read."""
        try:
            with open_regular(self.path, update=True) as f:
                end = f.seek(0, os.SEEK_END)
                start = max(0, end - MAX_LINE - 1)
                f.seek(start)
                tail = f.read(end - start)
                if tail and not tail.endswith(b"\n"):
                    newline = tail.rfind(b"\n")
                    if newline < 0 and start > 0:
                        raise AuditError(
                            f"{self.where}: its last line is longer than {MAX_LINE} bytes: "
                            "not an interrupted append of keymgr; run 'keymgr audit verify'"
                        )
                    f.truncate(start + newline + 1)
                    f.flush()
                    os.fsync(f.fileno())
        except FileNotFoundError:
            return
        except NotAFile as e:
            raise self._not_a_file(e) from None


class AuditLog:
    def __init__(
        self,
        path: Path,
        checkpoints: Checkpointer | None = None,
        medium: Medium | None = None,
    ) -> None:
        """``checkpoints`` signs each commit's chain head (``[audit]``); see
        :meth:`for_config` for the log a config describes. ``medium``: where
        the events live (default: the file at ``path``); with a store medium
        ``path`` is the ``[daemon] audit_log`` setting, a mirror at most
        (``mirror``)."""
        self.path = path
        self.checkpoints = checkpoints
        self.medium: Medium = medium if medium is not None else FileMedium(path)
        #: A best-effort copy of what this process appends (store medium only).
        self.mirror: Callable[[list[dict[str, Any]]], None] | None = None
        #: Called with the events of each durable append, right after it
        #: (keymgr.notify); never before, and its failure never fails the append.
        self.on_append: Callable[[list[dict[str, Any]]], None] | None = None
        #: The seq the last state seen anchors: where a store medium looks for its end.
        self._hint = 0
        #: ``audit.imported`` events of automatic imports (:meth:`flush`) that the
        #: reconciler has yet to commit (keymgr.reconciler.Reconciler.run, record).
        self.imported: list[dict[str, Any]] = []

    @property
    def where(self) -> str:
        """``audit log PATH`` or ``audit store URL.audit``, for messages."""
        return self.medium.where

    @property
    def in_store(self) -> bool:
        """Whether the record is the shared store (not the file at ``path``)."""
        return not isinstance(self.medium, FileMedium)

    @classmethod
    def for_config(cls, config: Config, store: StateStore | None = None) -> AuditLog:
        """The audit log ``config`` describes, signing with its ``[audit]``: the
        shared state store's (``store``) when it is the record
        (keymgr.auditstore.record_in_store), else the ``[daemon] audit_log`` file."""
        cp = (
            Checkpointer(config.audit, config.backends)
            if config.audit is not None
            else None
        )
        if store is None:
            return cls(config.daemon.audit_log, cp)
        from keymgr.auditstore import record_in_store, store_log

        kept = record_in_store(config, store)
        log_ = store_log(config, store, cp) if kept else cls(config.daemon.audit_log, cp)
        # Either medium: a log read without the pass lock (or by a replica)
        # can be ahead of a state read a moment before; the store says whether
        # it anchors those events now (Medium.anchored_now).
        log_.medium.anchored = lambda: int(store.load()[0].audit.seq)
        return log_

    # -- reading ----------------------------------------------------------

    def tail(self, drop_torn: bool = False) -> Tail:
        """The last complete line's (seq, hash), read from the end of the log.

        ``drop_torn`` looks past an incomplete last line (an interrupted
        append) instead of refusing it, so that a repair can first check the
        rest of the log agrees with the state before it cuts anything.
        """
        last = self._last(drop_torn)
        return Tail(0, GENESIS) if last is None else Tail(last["seq"], last["hash"])

    def _last(self, drop_torn: bool = False) -> dict[str, Any] | None:
        return self.medium.last(self._hint, drop_torn)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        return self.medium.lines()

    def events(self) -> Iterator[dict[str, Any]]:
        for n, line in self.lines():
            try:
                yield json.loads(line)
            except ValueError:
                raise AuditError(f"{self.medium.at(n)} is not JSON") from None

    # -- writing ----------------------------------------------------------

    def _append(self, events: list[dict[str, Any]]) -> None:
        self.medium.append(events)

    def _repair_torn_tail(self) -> None:
        self.medium.repair()

    def _check_head(
        self, anchor: AuditAnchor, last: dict[str, Any] | None, *, signed: bool
    ) -> None:
        """Refuse unless the log ends exactly at the anchored head.

        Its last line must have the anchored seq, carry the anchored hash, and
        hash to it; with ``signed`` (before a commit that adds events, with
        ``[audit]`` configured and the state naming an audit key) it must also
        carry a checkpoint that the audit key's public key, read from its
        backend, verifies. Only that line
        is read. A log rewritten and rechained by someone without the audit
        key fails here, whatever they did to the state.
        """
        where = self.where
        if last is not None and (last["seq"] > anchor.seq or not anchor.seq):
            self._check_past(anchor, last)
        if anchor.seq == 0:
            return
        if last is None or last["seq"] < anchor.seq:
            raise self._mismatch(Tail(0 if last is None else last["seq"], ""), anchor)
        seq = anchor.seq
        if last["hash"] != anchor.hash:
            raise AuditError(
                f"{where}: the line at seq {seq} has hash {str(last['hash'])[:16]}... but the "
                f"state anchors {anchor.hash[:16]}...: the log was rewritten; {_FIX}"
            )
        if chain_hash(str(last.get("prev")), last) != last["hash"]:
            raise AuditError(
                f"{where}: the line at seq {seq} does not hash to its recorded hash: edited; "
                f"{_FIX}"
            )
        if not signed or self.checkpoints is None:
            return
        if anchor.key_kid is not None:
            self.checkpoints.check_signed(last, anchor, where)
        elif last.get("ckpt_kid") is not None:
            # keymgr clears the state's audit key only in a commit that writes
            # an unsigned line: a signed head with no key in state means the
            # state was replaced or edited (to make keymgr start a new key).
            raise AuditError(
                f"{where}: the line at seq {seq} is signed by audit key "
                f"{last.get('ckpt_kid')}, but the state names no audit key: the state was "
                f"replaced or edited; {_FIX}"
            )

    def prepare(self, state: State, events: list[dict[str, Any]], actor: str) -> State:
        """The state to commit: ``events`` sealed into its anchor's outbox.

        Called before the state commit, so a refusal changes nothing: the
        log must end exactly at the anchored head (``_check_head``; only the
        last line is read, so this stays cheap). With ``[audit]`` the new head
        is signed (keymgr.checkpoint), opening the batch with an
        ``audit.key`` event when a new audit key is due.
        """
        anchor = state.audit
        cp = self.checkpoints
        self._hint = anchor.seq
        # A commit without events leaves the head as it is: the next one that
        # adds events checks its signature (no audit backend call before).
        self._check_head(anchor, self._last(), signed=bool(events))
        if not events:
            return replace(state, audit=replace(anchor, outbox=()))
        batch = cp.begin(anchor, _batch_time(state, events)) if cp is not None else None
        if batch is not None:
            base, evs = batch.anchor, [*batch.intro, *events]
        else:
            # Without [audit] the state names no audit key: turning it on
            # again starts a new one (which only a pinned JWKS then vouches for).
            base, evs = AuditAnchor(seq=anchor.seq, hash=anchor.hash), events
        sealed = seal(evs, anchor.seq, anchor.hash if anchor.seq else GENESIS, actor)
        seq, head = int(sealed[-1]["seq"]), str(sealed[-1]["hash"])
        if batch is not None:
            assert cp is not None
            sealed[-1].update(cp.sign(batch, seq, head))
        return replace(state, audit=replace(base, seq=seq, hash=head, outbox=tuple(sealed)))

    def flush(self, state: State) -> None:
        """Append whatever of the anchor's outbox the log does not hold yet.

        Nothing is cut or appended unless the outbox is sound (sealed events
        that chain, end at the anchored head, agree with the keys of the state
        they were committed with, and carry the checkpoint when an audit key
        is in use) and the log, torn tail aside, is exactly where the outbox
        continues it: a truncated, replaced or rewritten log is left as
        evidence.
        """
        missing = self._missing(state, writing=True)
        if missing is None:
            return  # a newer state anchors what the log holds
        self._repair_torn_tail()
        if not missing:
            return
        crashpoint("audit.before_flush")
        self._append(missing)
        if self.mirror is not None:
            self.mirror(missing)  # best effort, never raises: the record is written
        if self.on_append is not None:
            try:
                self.on_append(missing)
            except Exception as e:  # the events are in the log: that is what counts
                get_logger("keymgr.audit").error("notify.failed", error=f"{type(e).__name__}: {e}")

    def check_agrees(self, state: State) -> None:
        """Raise AuditError when the log contradicts ``state``, writing nothing.

        The refusals a pass would give before its first write (:meth:`flush`),
        for the read-only views (``status``, ``plan``): a state put back from
        an older copy, whose anchor the log has gone past, is refused instead
        of shown as the truth. A log that merely lacks the outbox's events (a
        crash between the state commit and the append) agrees; a log still
        to be imported into the store is left to the next pass, and so is the
        checkpoint on such an outbox (it needs the audit key's backend, which
        a view does not). A state that anchors nothing (new, or lost) while
        the log holds events is refused, as the pass's first commit would.
        """
        self._missing(state, writing=False)

    def check_current(self, state: State) -> None:
        """Raise AuditError when the log holds events past ``state``'s anchor
        that the store does not anchor now: the state is older than the log
        (put back from an older copy, or replaced), so the key it names as
        active may have been retired since. Only that: a log that is missing,
        behind the state, damaged or rewritten at the anchor is no sign that
        the state is stale, and is left to the next pass (which refuses to
        commit on it) and to ``keymgr audit verify``.

        For ``sign`` and the daemon's readiness, where refusing on a damaged
        log would stop token issuance while the state is right. Reads the
        log's last line (on a store medium, from the anchor on), and the
        store's anchor only when the log is ahead; writes nothing.
        """
        anchor = state.audit
        try:
            last = self.medium.last(anchor.seq, True)
        except AuditError:  # unreadable or damaged: not evidence of a stale state
            return
        if last is None or last["seq"] <= anchor.seq:  # an event: its seq is an int
            return
        try:
            self._check_past(anchor, last)
        except ConflictError:
            return  # another replica committed since: the state was current when read

    def _missing(self, state: State, *, writing: bool) -> list[dict[str, Any]] | None:
        """The outbox events the log lacks ([] if none), once every check a
        write needs has passed; None when a newer state anchors the log's
        head (another replica committed since ``state`` was read).
        ``writing``: a file log kept before the store was the record is
        imported first, and a checkpoint on the outbox is verified; without
        it, nothing is written and such a state is not judged, and a state
        that anchors nothing is checked against the log here (a writer's is
        refused by :meth:`prepare`)."""
        anchor = state.audit
        outbox = list(anchor.outbox)
        if outbox:
            self._check_outbox(state)
        self._hint = anchor.seq
        last = self._last(drop_torn=True)
        if self.in_store and (last is None or last["seq"] < anchor.seq):
            from keymgr.auditstore import import_file, import_needed

            # A file log kept before the store was the record: imported once.
            if import_needed(self, anchor, last):
                if not writing:
                    return []
                n = import_file(self, state)
                self.imported.append({
                    "ts": utcnow(), "event": "audit.imported",
                    "reason": f"{n} events from {self.path}",
                })  # fmt: skip
                last = self._last()
        t = Tail(0, GENESIS) if last is None else Tail(last["seq"], last["hash"])
        if t.seq >= anchor.seq:
            # Nothing to append. No signature check here: a pass that commits
            # nothing does not need the audit key's backend. A state without
            # an anchor (new, or lost) is refused by prepare, before its first
            # commit, so that the store's own refusals of a lost state come
            # first; a view has none of those, and refuses it here.
            if anchor.seq or not writing:
                try:
                    self._check_head(anchor, last, signed=False)
                except ConflictError:
                    return None  # a newer state anchors these events (and the ones after)
            return []
        if not outbox or outbox[0]["seq"] > t.seq + 1:
            raise self._mismatch(t, anchor)
        missing = [ev for ev in outbox if ev["seq"] > t.seq]
        if missing[0]["prev"] != t.hash:
            raise self._mismatch(t, anchor)
        if last is not None and chain_hash(str(last.get("prev")), last) != t.hash:
            raise AuditError(
                f"{self.where}: the line at seq {t.seq} does not hash to its "
                f"recorded hash: edited; {_FIX}"
            )
        cp = self.checkpoints
        if writing and cp is not None and anchor.key_kid is not None:
            cp.check_signed(outbox[-1], anchor, f"{self.where}: the state's outbox")
        return missing

    def _check_outbox(self, state: State) -> None:
        """The outbox must be sealed events that chain, end at the anchor, and
        record transitions the state agrees with. Raises AuditError, one line."""
        anchor = state.audit
        where = f"{self.where}: the state's outbox"
        fix = "refusing to append it; restore the state, or run 'keymgr audit verify'"
        prev: dict[str, Any] | None = None
        for i, ev in enumerate(anchor.outbox, 1):
            if not (
                isinstance(ev, dict)
                and isinstance(ev.get("event"), str)
                and type(ev.get("seq")) is int
                and isinstance(ev.get("prev"), str)
                and isinstance(ev.get("hash"), str)
                and _HASH_RE.fullmatch(ev["prev"])
                and _HASH_RE.fullmatch(ev["hash"])
            ):
                raise OutboxError(f"{where}: event {i} is not a sealed audit event; {fix}")
            seq = ev["seq"]
            if prev is not None and (seq != prev["seq"] + 1 or ev["prev"] != prev["hash"]):
                raise OutboxError(f"{where}: seq {seq} does not follow seq {prev['seq']}; {fix}")
            if chain_hash(ev["prev"], ev) != ev["hash"]:
                raise OutboxError(f"{where}: seq {seq} does not hash to its recorded hash; {fix}")
            problem = self._transition_problem(state, ev)
            if problem:
                raise OutboxError(f"{where}: seq {seq} {ev['event']}: {problem}; {fix}")
            prev = ev
        assert prev is not None
        if prev["seq"] != anchor.seq or prev["hash"] != anchor.hash:
            raise OutboxError(
                f"{where}: ends at seq {prev['seq']}, not at the head the state anchors "
                f"(seq {anchor.seq}); {fix}"
            )

    @staticmethod
    def _transition_problem(state: State, ev: Mapping[str, Any]) -> str | None:
        """What is wrong with a ``key.*`` event against the state it was committed with."""
        name = ev["event"]
        if not name.startswith("key."):
            return None
        ring, kid = ev.get("ring"), ev.get("kid")
        if not isinstance(ring, str) or not isinstance(kid, str):
            return "names no ring and key"
        r = state.rings.get(ring)
        key = r.key(kid) if r is not None else None
        # A destroyed key past its history: only its tombstone is left.
        tomb = r.tombstone(kid) if r is not None and key is None else None
        if name in ORPHAN_EVENTS:
            if key is not None and key.state != DESTROYED:
                return f"key {kid} of ring {ring} is recorded in state as {key.state}"
            return None
        if name in GONE_EVENTS:
            if key is not None or tomb is not None:
                return f"key {kid} of ring {ring} is still recorded in state"
            return None
        if name == "key.forgotten" and key is not None:
            return f"key {kid} of ring {ring} is still recorded in full, as {key.state}"
        held = key if key is not None else tomb
        if held is None:
            return f"names key {kid} of ring {ring}, which the state does not hold"
        have = key.state if key is not None else DESTROYED
        recorded = KEY_EVENT_STATES.get(name)
        if name == "key.adopted" and ev.get("state") in STATES:
            recorded = ev["state"]
        if recorded is not None and not at_or_past(have, recorded):
            return f"records key {kid} as {recorded}, but the state holds it as {have}"
        for f in ("backend", "alg"):
            if f in ev and ev[f] != getattr(held, f):
                return f"{f} {ev[f]!r} differs from the state's {getattr(held, f)!r} for key {kid}"
        return None

    def _check_past(self, anchor: AuditAnchor, last: dict[str, Any]) -> None:
        """``last``, the log's last line, is past the anchor: ConflictError when
        the store anchors it now (another replica committed since the state was
        read: read it again), else AuditError (the state is older than the log:
        put back from an older copy, replaced, or lines were added)."""
        where, seq = self.where, anchor.seq
        now = self.medium.anchored_now()
        if now is not None and now >= last["seq"]:
            read = f"at seq {seq}" if seq else "with none"
            raise ConflictError(
                f"{where}: holds events up to seq {last['seq']}, committed after the state "
                f"was read ({read}): another replica committed; read it again"
            )
        if not seq:
            raise AuditError(
                f"{where}: holds events up to seq {last['seq']} but the state anchors none "
                f"(a new or replaced state); {_FIX}"
            )
        raise AuditError(
            f"{where}: ends at seq {last['seq']} but the state anchors seq {seq}: the state "
            "is older than the log (put back from an older copy?), or the lines after it "
            f"were not committed by keymgr; {_FIX}"
        )

    def _mismatch(self, t: Tail, anchor: AuditAnchor) -> AuditError:
        return AuditError(
            f"{self.where}: ends at seq {t.seq} but the state anchors seq "
            f"{anchor.seq}: the log was truncated or replaced, or another replica writes "
            "this state to another log; run 'keymgr audit verify'"
        )

    # -- verification -------------------------------------------------------

    def check_head(self, anchor: AuditAnchor, last: dict[str, Any] | None) -> None:
        """Raise AuditError unless ``last`` (the log's last line, parsed) is
        exactly the anchored head: its seq, its hash, hashing to it, and with
        ``[audit]`` a checkpoint the audit key's public key from its backend
        verifies -- the check before every commit, and where ``keymgr audit
        follow`` starts."""
        self._check_head(anchor, last, signed=True)

    def verify(self, anchor: AuditAnchor) -> int:
        """Check the whole chain, the anchor and any checkpoints; return the
        number of events. Raises AuditError naming the first bad line."""
        return self.check(anchor).events

    def check(
        self,
        anchor: AuditAnchor,
        pinned: Mapping[str, Mapping[str, Any]] | None = None,
        require_signed: bool = False,
    ) -> Verified:
        """Check the whole chain, the anchor and every checkpoint signature.

        Signatures are checked against the public keys the log's own
        ``audit.key`` lines introduce: the first key vouches for itself, each
        later one must be introduced in a batch signed by the key in use
        before it. ``pinned`` (kid -> JWK) is the operator's copy of the audit
        keys: every key in the log must then be among them, and every line
        must be covered by a checkpoint -- a proof against anyone who can
        write the log and the state but cannot use the audit key. With
        ``require_signed`` (``[audit]`` configured), every line after the first
        ``audit.key`` must be covered by a checkpoint.

        Raises AuditError naming the first bad line.
        """
        prev = GENESIS
        seq = 0
        anchored = anchor.seq == 0
        pending = {int(ev["seq"]): ev for ev in anchor.outbox}
        sig = _Signatures(self.where, pinned)
        for n, line in self.lines():
            where = self.medium.at(n)
            if not line.endswith(b"\n"):
                raise AuditError(f"{where}: incomplete last line (torn write)")
            try:
                ev = json.loads(line)
            except ValueError:
                raise AuditError(f"{where}: not JSON (edited?)") from None
            if not isinstance(ev, dict) or "hash" not in ev or "seq" not in ev:
                raise AuditError(f"{where}: not an audit event (edited?)")
            if ev.get("seq") != seq + 1:
                raise AuditError(
                    f"{where}: sequence {ev.get('seq')} where {seq + 1} was expected "
                    "(line removed or reordered)"
                )
            if ev.get("prev") != prev:
                raise AuditError(
                    f"{where}: does not chain to the line before (removed or reordered)"
                )
            if chain_hash(prev, ev) != ev["hash"]:
                raise AuditError(f"{where}: hash mismatch (line edited)")
            if seq + 1 > anchor.seq:
                raise AuditError(
                    f"{where}: beyond the head anchored in state (seq {anchor.seq}): "
                    "not written by keymgr"
                )
            sig.line(n, ev, where)
            prev = ev["hash"]
            seq += 1
            if seq == anchor.seq:
                if ev["hash"] != anchor.hash:
                    raise AuditError(f"{where}: differs from the head anchored in state")
                anchored = True
        if not anchored:
            gone = f"{self.medium.at(seq + 1)} missing: the log ends at seq {seq}"
            if seq + 1 in pending and pending[seq + 1]["prev"] == prev:
                # A crash between the state commit and the append, or lines
                # removed since: either way the state still holds them.
                raise AuditError(
                    f"{gone} but the state anchors seq {anchor.seq}; the missing events are "
                    "still in the state's outbox and 'keymgr reconcile' appends them"
                )
            raise AuditError(f"{gone} but the state anchors seq {anchor.seq}: truncated")
        return sig.finish(seq, anchor, require_signed)


class _Signatures:
    """The checkpoint half of ``AuditLog.check``, fed one verified line at a time."""

    def __init__(self, where: str, pinned: Mapping[str, Mapping[str, Any]] | None) -> None:
        self.where = where
        self.pinned = pinned
        #: The key signing checkpoints now, once a checkpoint confirmed it.
        self.current: AuditKey | None = None
        #: Keys introduced since the last checkpoint, with their line.
        self.intro: dict[str, tuple[AuditKey, int]] = {}
        self.known: set[str] = set()
        self.first_key_line = 0
        self.count = 0
        self.signed_through = 0

    def line(self, n: int, ev: dict[str, Any], where: str) -> None:
        if ev.get("event") == KEY_EVENT:
            try:
                key = checkpoint.parse_key_event(ev)
            except ValueError as e:
                raise AuditError(f"{where}: malformed audit.key event ({e})") from None
            if self.pinned is not None and key.kid not in self.pinned:
                raise AuditError(
                    f"{where}: audit key {key.kid} is not among the pinned keys (--keys): "
                    "introduced by someone else, or not pinned yet"
                )
            self.intro[key.kid] = (key, n)
            self.known.add(key.kid)
            self.first_key_line = self.first_key_line or n
        kid, sig = ev.get("ckpt_kid"), ev.get("ckpt_sig")
        if kid is None and sig is None:
            return
        if not isinstance(kid, str) or not isinstance(sig, str):
            raise AuditError(f"{where}: malformed checkpoint (ckpt_kid, ckpt_sig)")
        cur = self.current
        if cur is not None and kid == cur.kid:
            key = cur
        elif kid in self.intro:
            key, at = self.intro[kid]
            if cur is not None and self.pinned is None:
                raise AuditError(
                    f"{where}: audit key {kid} signs its own introduction (line {at}): the "
                    f"change from audit key {cur.kid} is not signed by it"
                )
        elif kid in self.known:
            assert cur is not None
            raise AuditError(
                f"{where}: checkpoint signed by audit key {kid}, replaced by {cur.kid} before"
            )
        else:
            raise AuditError(
                f"{where}: checkpoint signed by {kid}, which no audit.key line before it "
                "introduces"
            )
        try:
            raw = b64url_decode(sig)
        except ValueError:
            raw = b""
        if not checkpoint.verify_signature(
            key.key, key.alg, checkpoint.payload(ev["seq"], ev["hash"]), raw
        ):
            raise AuditError(
                f"{where}: checkpoint signature (audit key {kid}) does not verify: this line "
                "or one before it changed after it was signed"
            )
        self.count += 1
        self.signed_through = n
        if self.intro:
            # The newest key introduced signs from now on.
            self.current = max(self.intro.values(), key=lambda v: v[1])[0]
            self.intro = {}

    def finish(self, seq: int, anchor: AuditAnchor, require_signed: bool) -> Verified:
        where = self.where
        if anchor.key_kid is not None and anchor.key_kid not in self.known:
            raise AuditError(
                f"{where}: the state names audit key {anchor.key_kid}, but no audit.key line "
                "introduces it"
            )
        must = self.pinned is not None or (require_signed and self.first_key_line > 0)
        if must and seq > self.signed_through:
            n = self.signed_through + 1
            if self.count == 0:
                raise AuditError(
                    f"{where}: line {n}: no signed checkpoint covers it (the log has none): "
                    "nothing here is proven by an audit key"
                )
            raise AuditError(
                f"{where}: line {n}: not covered by a signed checkpoint (the last one is at "
                f"line {self.signed_through}): written without the audit key"
            )
        return Verified(
            events=seq,
            checkpoints=self.count,
            keys=len(self.known),
            signed_through=self.signed_through,
            pinned=self.pinned is not None,
        )


class LineCheck:
    """:meth:`AuditLog.check`, one line at a time, from a verified point:
    what ``keymgr audit follow`` runs on each line as it arrives.

    It starts at the genesis (``seq`` 0), or at a head already proven (the
    anchored head, its checkpoint checked against the audit key's backend):
    then ``key`` is the audit key in use there, which signs the next
    checkpoints and vouches for the next key it introduces. Lines carry their
    position in ``seq``: a chained line ``n`` has ``seq`` n, so errors name
    the line as ``audit verify`` does. Each line is checked for the chain
    (``seq``, ``prev``, ``hash``) and for any checkpoint it carries; whether
    the lines are anchored in state, and covered by a checkpoint when one is
    required, is for the caller to ask at its own pace (``signed_through``).
    """

    def __init__(
        self,
        path: Path,
        seq: int = 0,
        prev: str = GENESIS,
        key: AuditKey | None = None,
        where: str | None = None,
    ) -> None:
        self.path = path
        #: ``audit log PATH`` (or the store's ``where``), for messages.
        self.where = where or f"audit log {path}"
        self.seq = seq
        self.prev = prev
        self._sig = _Signatures(self.where, None)
        if key is not None:
            self._sig.current = key
            self._sig.known.add(key.kid)
            self._sig.signed_through = seq

    @property
    def signed_through(self) -> int:
        """The last line covered by a verified checkpoint (0: none)."""
        return self._sig.signed_through

    @property
    def known_keys(self) -> frozenset[str]:
        """Audit keys introduced by the lines checked (and the starting key)."""
        return frozenset(self._sig.known)

    def line(self, raw: bytes) -> dict[str, Any]:
        """Check the next line (with its newline); return it parsed, or raise
        AuditError naming it."""
        n = self.seq + 1
        where = f"{self.where}: line {n}"
        if not raw.endswith(b"\n"):
            raise AuditError(f"{where}: incomplete line (torn write)")
        try:
            ev = json.loads(raw)
        except ValueError:
            raise AuditError(f"{where}: not JSON (edited?)") from None
        if not isinstance(ev, dict) or "hash" not in ev or "seq" not in ev:
            raise AuditError(f"{where}: not an audit event (edited?)")
        if ev.get("seq") != n:
            raise AuditError(
                f"{where}: sequence {ev.get('seq')} where {n} was expected "
                "(line removed or reordered)"
            )
        if ev.get("prev") != self.prev:
            raise AuditError(f"{where}: does not chain to the line before (removed or reordered)")
        if chain_hash(self.prev, ev) != ev["hash"]:
            raise AuditError(f"{where}: hash mismatch (line edited)")
        self._sig.line(n, ev, where)
        self.seq, self.prev = n, str(ev["hash"])
        return ev
