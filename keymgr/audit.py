"""The audit log: hash-chained JSON lines, anchored in the state document.

Each line carries ``seq``, ``prev`` (the previous line's hash) and ``hash`` =
SHA-256 over ``prev`` and the line's canonical JSON (sorted keys, no ``hash``).
A chain alone cannot show that its tail was cut off, so every state commit also
records the chain head (seq, hash): ``verify`` then detects an edited, removed,
reordered *or truncated* line.

Transition events are committed inside the state document first (the anchor's
outbox) and appended to the log right after; on the next start any event that
did not reach the log is appended from the outbox. A crash therefore never
loses an event and never writes one twice (invariant 7).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from keymgr.errors import AuditError
from keymgr.faults import crashpoint
from keymgr.model import AuditAnchor, State
from keymgr.timefmt import format_time

GENESIS = "0" * 64
#: Fields written first, for people reading the JSON lines.
_ORDER = ("ts", "seq", "event", "ring", "kid", "backend", "actor", "reason")


def canonical(event: dict[str, Any]) -> bytes:
    body = {k: v for k, v in event.items() if k != "hash"}
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


@dataclass(frozen=True)
class Tail:
    seq: int
    hash: str


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    # -- reading ----------------------------------------------------------

    def tail(self, drop_torn: bool = False) -> Tail:
        """The last complete line's (seq, hash), read from the end of the file.

        ``drop_torn`` looks past an incomplete last line (an interrupted
        append) instead of refusing it, so that a repair can first check the
        rest of the log agrees with the state before it cuts anything.
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size == 0:
                    return Tail(0, GENESIS)
                block = 4096
                data = b""
                pos = size
                while True:
                    step = min(block, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
                    lines = data.rstrip(b"\n").split(b"\n")
                    if len(lines) > 1 or pos == 0:
                        break
                    block *= 2
        except FileNotFoundError:
            return Tail(0, GENESIS)
        except OSError as e:
            raise AuditError(f"audit log {self.path}: cannot read: {e.strerror}") from None
        if not data.endswith(b"\n") and drop_torn:
            lines = lines[:-1]
            if not lines:
                return Tail(0, GENESIS)
        elif not data.endswith(b"\n"):
            raise AuditError(
                f"audit log {self.path}: last line is incomplete (torn write); "
                "run 'keymgr audit verify'"
            )
        try:
            last = json.loads(lines[-1])
            return Tail(int(last["seq"]), str(last["hash"]))
        except (ValueError, KeyError, TypeError):
            raise AuditError(
                f"audit log {self.path}: last line is not an audit event; run 'keymgr audit verify'"
            ) from None

    def lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            with open(self.path, "rb") as f:
                yield from enumerate(f, 1)
        except FileNotFoundError:
            return
        except OSError as e:
            raise AuditError(f"audit log {self.path}: cannot read: {e.strerror}") from None

    def events(self) -> Iterator[dict[str, Any]]:
        for n, line in self.lines():
            try:
                yield json.loads(line)
            except ValueError:
                raise AuditError(f"audit log {self.path}: line {n} is not JSON") from None

    # -- writing ----------------------------------------------------------

    def _append(self, events: list[dict[str, Any]]) -> None:
        data = b"".join(
            json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            for ev in events
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                half = len(data) // 2
                os.write(fd, data[:half])
                crashpoint("audit.mid_append")
                os.write(fd, data[half:])
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise AuditError(f"audit log {self.path}: cannot append: {e.strerror}") from None

    def _repair_torn_tail(self) -> None:
        """Cut a final line without newline: only our own interrupted append makes one."""
        try:
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    cut = data.rfind(b"\n") + 1
                    f.truncate(cut)
                    f.flush()
                    os.fsync(f.fileno())
        except FileNotFoundError:
            return

    def prepare(self, state: State, events: list[dict[str, Any]], actor: str) -> State:
        """The state to commit: ``events`` sealed into its anchor's outbox."""
        t = self.tail()
        seq, prev = max((t.seq, t.hash), (state.audit.seq, state.audit.hash))
        sealed = seal(events, seq, prev, actor)
        if sealed:
            seq, prev = int(sealed[-1]["seq"]), str(sealed[-1]["hash"])
        return replace(state, audit=AuditAnchor(seq=seq, hash=prev, outbox=tuple(sealed)))

    def flush(self, state: State) -> None:
        """Append whatever of the anchor's outbox the log does not hold yet.

        Nothing is cut or appended unless the log, torn tail aside, agrees
        with the state: a truncated or replaced log is left as evidence.
        """
        outbox = list(state.audit.outbox)
        t = self.tail(drop_torn=True)
        if not outbox:
            if t.seq < state.audit.seq:
                raise self._mismatch(t, state.audit)
            self._repair_torn_tail()
            return
        if t.seq >= outbox[-1]["seq"]:
            self._repair_torn_tail()
            return
        missing = [ev for ev in outbox if ev["seq"] > t.seq]
        if missing[0]["seq"] != t.seq + 1 or missing[0]["prev"] != t.hash:
            raise self._mismatch(t, state.audit)
        self._repair_torn_tail()
        crashpoint("audit.before_flush")
        self._append(missing)

    def _mismatch(self, t: Tail, anchor: AuditAnchor) -> AuditError:
        return AuditError(
            f"audit log {self.path}: ends at seq {t.seq} but the state anchors seq "
            f"{anchor.seq}: the log was truncated or replaced, or another replica writes "
            "this state to another log; run 'keymgr audit verify'"
        )

    # -- verification -------------------------------------------------------

    def verify(self, anchor: AuditAnchor) -> int:
        """Check the whole chain and the anchor; return the number of events.

        Raises AuditError naming the first bad line.
        """
        prev = GENESIS
        seq = 0
        anchored = anchor.seq == 0
        pending = {int(ev["seq"]): ev for ev in anchor.outbox}
        for n, line in self.lines():
            where = f"audit log {self.path}: line {n}"
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
            prev = ev["hash"]
            seq += 1
            if seq == anchor.seq:
                if ev["hash"] != anchor.hash:
                    raise AuditError(f"{where}: differs from the head anchored in state")
                anchored = True
        if not anchored:
            gone = f"audit log {self.path}: line {seq + 1} missing: the log ends at seq {seq}"
            if seq + 1 in pending and pending[seq + 1]["prev"] == prev:
                # A crash between the state commit and the append, or lines
                # removed since: either way the state still holds them.
                raise AuditError(
                    f"{gone} but the state anchors seq {anchor.seq}; the missing events are "
                    "still in the state's outbox and 'keymgr reconcile' appends them"
                )
            raise AuditError(f"{gone} but the state anchors seq {anchor.seq}: truncated")
        return seq
