"""The state as one local file: ``state = "file:PATH"`` (the default).

A commit is a compare-and-swap on the file's version (a counter inside the
document), written by temp file + fsync + rename; an advisory ``flock`` on a
lock file beside it is held for a whole reconcile pass, so two processes on
one host never start the same work twice. The lease for replicas is a second
small file beside the state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import ConflictError, StoreError
from keymgr.faults import crashpoint
from keymgr.fsutil import atomic_write
from keymgr.model import State, gc_paused
from keymgr.stores import PassLock, StateStore


class FileStore(StateStore):
    """``file:PATH``: lock file + atomic rename + fsync."""

    fingerprint_window: ClassVar[float] = 0.001
    supports_lease: ClassVar[bool] = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"file:{path}"
        self.lock_path = path.with_name(path.name + ".lock")
        # The last document parsed: its exact bytes, the State and the version.
        self._parsed: tuple[bytes, State, int] | None = None
        self._pass = PassLock()

    def _read(self) -> tuple[State, int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return State(), 0
        except OSError as e:
            raise StoreError(f"state {self.path}: cannot read: {e.strerror}") from None
        # Reading is cheap, parsing is not (about 0.5 s for 10,000 rings): when
        # the bytes are exactly those parsed last time, so is the result. State
        # is immutable data (every change makes a new object), so sharing it
        # between loads is safe. No stat-based shortcut: equal bytes or a parse.
        parsed = self._parsed
        if parsed is not None and parsed[0] == raw:
            return parsed[1], parsed[2]
        try:
            with gc_paused():
                doc = json.loads(raw)
                version = int(doc.pop("version"))
                state = State.from_dict(doc)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"state {self.path}: corrupt state document ({e})") from None
        self._parsed = (raw, state, version)
        return state, version

    def load(self) -> tuple[State, int]:
        return self._read()

    @contextlib.contextmanager
    def _flock(self, timeout: float) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"state {self.path}: cannot open lock file: {e.strerror}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"state {self.path}: locked by another keymgr process"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[None]:
        """Held across processes (flock) and threads (an RLock), re-entrant per thread.

        The in-process lock matters: flock is per open file, so two threads of
        one daemon (a pass and a SIGHUP reload) would otherwise both "hold" it.
        """
        def busy() -> StoreError:
            return StoreError(f"state {self.path}: locked by another thread of this process")

        with self._pass.hold(timeout, lambda: self._flock(timeout), busy):
            yield

    def commit(self, state: State, token: int) -> int:
        with self.exclusive():
            _, current = self._read()
            if current != token:
                raise ConflictError(
                    f"state {self.path}: changed by another writer (version {current}, "
                    f"expected {token})"
                )
            doc = {"version": token + 1, **state.to_dict()}
            data = (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()
            crashpoint("store.before_write")
            try:
                atomic_write(self.path, data, 0o600)
            except OSError as e:
                raise StoreError(f"state {self.path}: cannot write: {e.strerror}") from None
            crashpoint("store.after_write")
            return token + 1

    # -- lease: its own small file and lock, so renewing never waits for a pass --

    @property
    def _lease_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lease")

    def read_lease(self) -> tuple[dict[str, Any] | None, int]:
        try:
            doc = json.loads(self._lease_path.read_bytes())
            return doc, int(doc["version"])
        except FileNotFoundError:
            return None, 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"lease {self._lease_path}: unreadable ({e})") from None

    def write_lease(self, doc: dict[str, Any], token: int) -> int:
        lock = FileStore(self._lease_path)
        with lock._flock(timeout=5.0):
            _, current = self.read_lease()
            if current != token:
                raise ConflictError(f"lease {self._lease_path}: changed by another replica")
            data = json.dumps({**doc, "version": token + 1}).encode()
            try:
                atomic_write(self._lease_path, data, 0o600)
            except OSError as e:
                raise StoreError(f"lease {self._lease_path}: cannot write: {e.strerror}") from None
            return token + 1

    def fingerprint(self) -> object:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


def open_file_store(url: str) -> FileStore:
    """``file:PATH`` (made absolute by ``keymgr.stores.check_state_url``)."""
    return FileStore(Path(url.removeprefix("file:")))
