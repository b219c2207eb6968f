"""The state as one local file: ``state = "file:PATH"`` (the default).

A commit is a compare-and-swap on the file's version (a counter inside the
document), written by temp file + fsync + rename. A large state is sharded like
every store's (``file:PATH?shards=auto|on|off``, docs/scale.md): the file is
then the head, and the shards live in ``PATH.shards/``. An advisory ``flock`` on a
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

from keymgr.docstore import (
    LEASE,
    STATE,
    Blob,
    DocumentAdapter,
    ShardGone,
    StateLayout,
    is_document_name,
    read_limit,
)
from keymgr.errors import ConflictError, StoreError
from keymgr.faults import crashpoint
from keymgr.fsutil import NotAFile, atomic_write, fsync_dir, is_temp_of, open_regular, read_file
from keymgr.model import State
from keymgr.stores import PassLock, StateStore


class FileDocuments(DocumentAdapter):
    """The immutable ``FAMILY/LEAF`` documents beside a state file
    (``state.json.shards/<leaf>``), so the file store shares the sharded layout
    of :class:`keymgr.docstore.StateLayout` with the shared stores.

    Each is created by temp file + fsync + link (never replacing one that
    exists) + directory fsync (``keymgr.fsutil.atomic_write``); the head and
    the lease stay with :class:`FileStore`, which writes them under its lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def location(self) -> str:
        return str(self.path)

    def _file(self, name: str) -> Path:
        if name == STATE or not is_document_name(name) or "/" not in name:
            raise StoreError(f"state {self.path}: {name}: not a document of this adapter")
        family, leaf = name.split("/", 1)
        return self.path.with_name(f"{self.path.name}.{family}") / leaf

    def _error(self, op: str, name: str, e: OSError) -> StoreError:
        return StoreError(f"state {self.path}: {op} {self.describe(name)}: {e.strerror}")

    def read(self, name: str) -> Blob | None:
        path = self._file(name)
        try:
            with open_regular(path) as f:
                st = os.fstat(f.fileno())
                self.check_size(name, st.st_size)
                data = f.read()
        except FileNotFoundError:
            return None
        except NotAFile as e:
            raise StoreError(f"state {self.path}: read {self.describe(name)}: {e}") from None
        except OSError as e:
            raise self._error("read", name, e) from None
        return Blob(data, (st.st_ino, st.st_mtime_ns), max(0.0, time.time() - st.st_mtime))

    def create(self, name: str, data: bytes) -> object:
        path = self._file(name)
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(mode=0o700, exist_ok=True)
                fsync_dir(path.parent.parent)
            atomic_write(path, data, 0o600, exclusive=True)
        except FileExistsError:
            raise ConflictError(
                f"state {self.path}: create {self.describe(name)}: exists"
            ) from None
        except OSError as e:
            raise self._error("create", name, e) from None
        return self.version(name)

    def replace(self, name: str, data: bytes, version: object) -> object:
        raise StoreError(f"state {self.path}: {self.describe(name)}: immutable")

    def delete(self, name: str, version: object) -> None:
        self.discard(name)

    def discard(self, name: str) -> None:
        try:
            os.unlink(self._file(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._error("delete", name, e) from None

    def version(self, name: str) -> object | None:
        try:
            st = os.stat(self._file(name))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._error("stat", name, e) from None
        return (st.st_ino, st.st_mtime_ns)

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        folder = self.path.with_name(f"{self.path.name}.{family}")
        now = time.time()
        out: list[tuple[str, float | None]] = []
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"state {self.path}: list {folder}: {e.strerror}") from None
        for entry in entries:
            with contextlib.suppress(OSError):
                age = max(0.0, now - entry.stat(follow_symlinks=False).st_mtime)
                if entry.name.startswith("."):
                    # A crashed create's temp file (.LEAF.RANDOM.tmp): old ones go too.
                    leaf = entry.name[1:].split(".tmp")[0].rsplit(".", 1)[0]
                    if is_temp_of(entry.name, leaf) and age > 3600:
                        os.unlink(entry.path)
                    continue
                out.append((f"{family}/{entry.name}", age))
        return out


class FileStore(StateStore):
    """``file:PATH``: lock file + atomic rename + fsync; ``?shards=`` as every store."""

    fingerprint_window: ClassVar[float] = 0.001
    supports_lease: ClassVar[bool] = True

    def __init__(self, path: Path, shards: str = "auto") -> None:
        self.path = path
        self.url = f"file:{path}"
        self.lock_path = path.with_name(path.name + ".lock")
        self.documents = FileDocuments(path)
        #: One document or a sharded head (keymgr.docstore.StateLayout); keeps
        #: the last state read or written, so equal bytes give the same State.
        self.layout = StateLayout(self.documents, str(path), mode=shards)
        self._pass = PassLock()

    def set_shards(self, mode: str) -> None:
        self.layout = StateLayout(self.documents, str(self.path), mode=mode)

    def _raw(self) -> bytes | None:
        try:
            return read_file(self.path, read_limit(STATE))
        except FileNotFoundError:
            return None
        except NotAFile as e:
            raise StoreError(f"state {self.path}: cannot read: {e}") from None
        except OSError as e:
            raise StoreError(f"state {self.path}: cannot read: {e.strerror}") from None

    def _read(self) -> tuple[State, int]:
        # Reading is cheap, parsing is not (about 0.5 s for 10,000 rings in
        # one document): when the bytes are exactly those parsed last time, so
        # is the result (StateLayout.decode); a sharded head reads only the
        # shards it names that changed. No stat-based shortcut.
        for attempt in range(3):
            raw = self._raw()
            if raw is None:
                return State(), 0
            try:
                return self.layout.decode(raw)
            except ShardGone:
                # Collected after a newer head was written meanwhile: read it again.
                if attempt == 2 or self._raw() == raw:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def load(self) -> tuple[State, int]:
        return self._read()

    def layout_event(self, state: State, token: int) -> dict[str, Any] | None:
        return self.layout.layout_event(state, token)

    def sweep(self) -> int:
        """Delete shards left by crashed commits (keymgr.docstore.StateLayout.sweep)."""
        with self.exclusive():
            self._read()  # the head as it is now (see StateLayout.sweep)
            return self.layout.sweep()

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
            crashpoint("store.before_write")
            pending = self.layout.write(state, token + 1, self._raw)
            try:
                atomic_write(self.path, pending.head, 0o600)
            except OSError as e:
                raise StoreError(f"state {self.path}: cannot write: {e.strerror}") from None
            crashpoint("store.after_write")
            self.layout.committed(pending)
            return token + 1

    # -- lease: its own small file and lock, so renewing never waits for a pass --

    @property
    def _lease_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lease")

    def read_lease(self) -> tuple[dict[str, Any] | None, int]:
        try:
            doc = json.loads(read_file(self._lease_path, read_limit(LEASE)))
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
    """``file:PATH`` (made absolute by ``keymgr.stores.check_state_url``; its
    ``?shards=`` is applied by ``keymgr.stores.open_store``)."""
    return FileStore(Path(url.removeprefix("file:")))
