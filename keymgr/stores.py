"""State stores: one JSON document with a version (or a sharded head, see
docs/scale.md), written by compare-and-swap.

The store's own CAS is the only coordination between writers; there is no
home-made consensus. The file store adds an advisory lock held for a whole
reconcile pass, so two local processes do not even start the same work twice.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import ConfigError, StoreError
from keymgr.model import State
from keymgr.plugins import store_factory

Token = Any

#: ``?shards=`` of a state URL (docs/scale.md): ``auto`` (the default) keeps
#: one document until it would pass 128 KiB, then shards it for good; ``on``
#: shards from the first commit; ``off`` keeps one document.
SHARD_MODES = ("auto", "on", "off")


class PassLock:
    """The in-process half of a store's pass lock: re-entrant per *thread*.

    A pass is one thread. The outermost :meth:`hold` of a thread takes the
    store's own lock (a ``flock``, a lock document) once; a nested call in the
    same thread (a command that holds the lock and then reconciles) is part of
    that pass and goes through; another thread of the process (the daemon
    recording an event while a pass runs, a SIGHUP reload) queues behind it
    exactly as another process would. Written once for every store, so the
    rule cannot drift between them.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # nesting of hold() in the thread holding _lock

    @contextlib.contextmanager
    def hold(
        self,
        timeout: float,
        outer: Callable[[], contextlib.AbstractContextManager[object]],
        busy: Callable[[], Exception],
    ) -> Iterator[None]:
        """Hold the lock; ``outer()`` is entered by the outermost call only;
        ``busy()`` is raised when another thread keeps it past ``timeout``."""
        if not self._lock.acquire(timeout=timeout):
            raise busy()
        try:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with outer():
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
        finally:
            self._lock.release()


class StateStore(abc.ABC):
    """Where the state document lives, written by compare-and-swap.

    Implementations: ``keymgr.backends.local.store.FileStore`` (one host) and
    :class:`keymgr.docstore.SharedStore` (S3, Vault KV, any object store with
    conditional writes, over a small adapter). Stores are found by URL scheme
    through :mod:`keymgr.plugins`. Capabilities are declared, never guessed from overrides:

    - ``supports_lease``: :meth:`read_lease`/:meth:`write_lease` work, so
      daemon replicas can elect one holder (keymgr.lease).
    - ``shared``: several hosts may use it at once (so a pass lock in
      :meth:`exclusive` and a lease are what keep them apart).
    """

    url: str
    supports_lease: ClassVar[bool] = False
    shared: ClassVar[bool] = False
    #: Seconds ``KeyManager.sign`` may trust a :meth:`fingerprint` before asking
    #: again (see ``KeyManager._check_fresh`` for why a short window is safe).
    fingerprint_window: ClassVar[float] = 0.0

    @abc.abstractmethod
    def load(self) -> tuple[State, Token]:
        """The current state and an opaque version token for :meth:`commit`."""

    @abc.abstractmethod
    def commit(self, state: State, token: Token) -> Token:
        """Write ``state`` if the stored version is still ``token``, else ConflictError."""

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the store for a whole pass: a lock other processes and the other
        threads of this process respect (see :class:`PassLock`). None by default."""
        yield

    def interrupt(self) -> None:
        """Stop waiting for a pass lock another process holds: a pass waiting
        for one fails at once (StoreError), and later ones try once without
        waiting. For a daemon that is stopping: a replica killed mid-pass
        leaves its lock until ``lock_ttl`` passes, and a SIGTERM must not wait
        that long. Nothing to do for a store whose lock dies with its holder
        (the file store's ``flock``)."""
        return None

    def fingerprint(self) -> object:
        """Cheap value that changes whenever the document may have changed."""
        return None

    def layout_event(self, state: State, token: Token) -> dict[str, Any] | None:
        """An audit event the commit of ``state`` over ``token`` must carry
        because it changes how the state is stored (the move to shards:
        ``state.sharded``), or None. ``Reconciler.commit`` adds it before
        sealing, so the change of layout is in the audit chain."""
        return None

    def set_shards(self, mode: str) -> None:
        """Apply ``?shards=MODE`` (:data:`SHARD_MODES`); a store without shards
        accepts only ``off``, the layout it always has."""
        if mode != "off":
            raise StoreError(f"state {self.url}: this store does not support shards={mode}")

    def read_lease(self) -> tuple[dict[str, Any] | None, Token]:
        """The replicas' lease record (a small document beside the state) and its token."""
        raise StoreError(f"state {self.url}: this store does not support leases")

    def write_lease(self, doc: dict[str, Any], token: Token) -> Token:
        """Compare-and-swap the lease record; ConflictError when another replica wrote it."""
        raise StoreError(f"state {self.url}: this store does not support leases")


def split_shards(url: str) -> tuple[str, str | None]:
    """``(url without ?shards=, mode or None)``; ValueError for a bad or repeated one.

    Taken off the URL before a store's factory sees it, so every store gets
    the parameter without each one parsing it (docs/scale.md).
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    mode: str | None = None
    rest = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name != "shards":
            rest.append(part)
            continue
        if mode is not None:
            raise ValueError(f"{url!r}: shards given twice")
        if value not in SHARD_MODES:
            raise ValueError(f"expected one of {', '.join(SHARD_MODES)}, got {value!r}")
        mode = value
    return (f"{base}?{'&'.join(rest)}" if rest else base), mode


def file_state_path(url: str) -> Path:
    """The state file of a ``file:`` URL that :func:`check_state_url` accepted."""
    return Path(split_shards(url)[0].removeprefix("file:"))


def _file_path(url: str, base: Path) -> Path:
    if "?" in url:
        raise ValueError(f"{url!r}: the only parameter of a file state is shards=auto|on|off")
    if url.startswith("file://"):
        rest = url[len("file://") :]
        if not rest.startswith("/") or rest.endswith("/"):
            raise ValueError(f"{url!r}: use file:///absolute/path or file:relative/path")
        return Path(rest)
    rest = url[len("file:") :] if url.startswith("file:") else url
    if not rest or rest.endswith("/"):
        raise ValueError(f"{url!r}: expected a file path, e.g. file:state.json")
    p = Path(rest)
    return p if p.is_absolute() else base / p


def _scheme(url: str) -> str:
    return url.split(":", 1)[0] if "://" in url or url.startswith("file:") else "file"


def check_state_url(url: str, base: Path) -> str:
    """Validate a ``[daemon] state`` URL and make a relative file path absolute.

    A store's factory validates its URL offline (bucket, parameters; no I/O),
    so ``config check`` reports a bad one with the file and field like any
    other error: ConfigError naming ``daemon.state`` (``daemon.state?NAME`` for
    a URL parameter).
    """
    scheme = _scheme(url)
    try:
        bare, mode = split_shards(url)
    except ValueError as e:
        raise ConfigError(f"daemon.state?shards: {e}") from None
    query = "" if mode is None else f"?shards={mode}"
    if scheme == "file":
        try:
            return f"file:{_file_path(bare, base)}{query}"
        except ValueError as e:
            raise ConfigError(f"daemon.state: {e}") from None
    store = store_factory(scheme, "daemon.state")(bare)
    if mode is not None:
        try:
            store.set_shards(mode)
        except StoreError as e:
            raise ConfigError(f"daemon.state?shards: {e}") from None
    return url


def open_store(url: str) -> StateStore:
    """The store for a URL that :func:`check_state_url` accepted (no I/O yet)."""
    try:
        bare, mode = split_shards(url)
        store = store_factory(_scheme(url), "daemon.state")(bare)
        if mode is not None:
            store.set_shards(mode)
        return store
    except (ConfigError, ValueError) as e:
        raise StoreError(str(e)) from None
