"""In-memory state store, key backend and JWKS publisher, with fault knobs.

For model-based tests that drive the real :class:`keymgr.reconciler.Reconciler`
over simulated time: everything lives in this process, nothing reads a clock,
and a test can make each part misbehave the way the real systems do.

These classes are deliberately dumb storage. They keep bytes and keys and
answer what they hold; they never decide anything keymgr decides (which key
belongs where, what a state may contain), so a test that uses them checks
keymgr, not a copy of it.

Knobs (plain attributes and methods a test sets or calls between passes):

- :class:`MemoryStore`: ``lose()`` deletes the document, ``tamper(fn)``
  rewrites its raw JSON, ``restore(raw)`` puts a saved copy back;
  ``history`` lists every committed document.
- :class:`MemoryBackend`: ``down`` makes every call raise ``BackendError``;
  ``before_destroy`` is called before a key is destroyed (a test's probe).
- :class:`MemoryPublisher`: ``down`` makes read and write raise
  ``PublishError``; ``revert()`` serves the document served before the last
  write (a stale deploy); ``lag = N`` makes a write visible only after N
  reads (an eventually consistent target); ``writes`` lists every write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from keymgr import jose
from keymgr.backend import Backend, GeneratedKey, Signer
from keymgr.errors import (
    BackendError,
    ConflictError,
    KeyNotFoundError,
    PublishError,
    StateError,
    StoreError,
)
from keymgr.model import State
from keymgr.options import Options
from keymgr.publishers import Publisher, check_size
from keymgr.stores import StateStore

__all__ = ["MemoryBackend", "MemoryPublisher", "MemoryStore"]

#: No options beyond ``type``: everything a test wants is a knob.
_OPTIONS = frozenset({"type"})


# --------------------------------------------------------------------------- store


class MemoryStore(StateStore):
    """The state document as JSON bytes in memory, with a version for CAS.

    The version is stored inside the document (as the file store does), so a
    test that tampers with the document may change it too. A missing document
    loads as an empty state with version 0, as every store does.
    """

    def __init__(self, url: str = "memory:state") -> None:
        self.url = url
        self._raw: bytes | None = None
        self._parsed: tuple[bytes, State, int] | None = None
        self._lock = threading.RLock()
        #: Bumped on every change of the stored bytes (commit, lose, tamper, restore).
        self._generation = 0
        #: Every document committed, in order (raw JSON bytes, version included).
        self.history: list[bytes] = []

    # -- StateStore ---------------------------------------------------------------

    def load(self) -> tuple[State, int]:
        raw = self._raw
        if raw is None:
            return State(), 0
        # As the file store: the same bytes give the same (immutable) State
        # object, which lets the reconciler skip validating it again.
        parsed = self._parsed
        if parsed is not None and parsed[0] is raw:
            return parsed[1], parsed[2]
        try:
            doc = json.loads(raw)
            version = int(doc.pop("version"))
            state = State.from_dict(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"state {self.url}: corrupt state document ({e})") from None
        self._parsed = (raw, state, version)
        return state, version

    def commit(self, state: State, token: int) -> int:
        with self._lock:
            current = self.version
            if current != token:
                raise ConflictError(
                    f"state {self.url}: changed by another writer (version {current}, "
                    f"expected {token})"
                )
            doc = {"version": token + 1, **state.to_dict()}
            self._set(json.dumps(doc).encode())
            self.history.append(self._raw or b"")
            return token + 1

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[None]:
        if not self._lock.acquire(timeout=timeout):  # pragma: no cover - one thread
            raise StoreError(f"state {self.url}: locked")
        try:
            yield
        finally:
            self._lock.release()

    def fingerprint(self) -> object:
        return self._generation

    # -- what a test looks at ------------------------------------------------------

    @property
    def version(self) -> int:
        """The stored version (0 when there is no document)."""
        if self._raw is None:
            return 0
        try:
            return int(json.loads(self._raw)["version"])
        except (ValueError, KeyError, TypeError):
            return -1  # tampered beyond reading: no token can match

    @property
    def raw(self) -> bytes | None:
        """The stored bytes, or None when there is no document."""
        return self._raw

    def document(self) -> dict[str, Any] | None:
        """The stored JSON document (a copy), or None."""
        return None if self._raw is None else dict(json.loads(self._raw))

    # -- knobs -----------------------------------------------------------------------

    def _set(self, raw: bytes | None) -> None:
        self._raw = raw
        self._generation += 1

    def lose(self) -> None:
        """The document is gone (deleted, a wiped volume, a new empty bucket)."""
        with self._lock:
            self._set(None)

    def tamper(self, fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Rewrite the raw JSON document: ``fn`` edits it in place or returns a new one."""
        with self._lock:
            if self._raw is None:
                raise ValueError(f"state {self.url}: no document to tamper with")
            doc = json.loads(self._raw)
            out = fn(doc)
            self._set(json.dumps(doc if out is None else out).encode())

    def restore(self, raw: bytes | None) -> None:
        """Put back a copy taken earlier (``raw``), as an operator restoring a backup."""
        with self._lock:
            self._set(raw)


# --------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class _StoredKey:
    alg: str
    private: jose.PrivateKey
    public_jwk: dict[str, str]
    intent: str | None


class MemoryBackend(Backend):
    """Real private keys (``cryptography``) held in a dict; never handed out."""

    type_name: ClassVar[str] = "memory"
    algorithms: ClassVar[frozenset[str]] = jose.ALGORITHMS

    def __init__(
        self,
        name: str = "memory",
        options: Mapping[str, Any] | None = None,
        config_dir: str = "",
        *,
        rsa_bits: int = 2048,
        seed: bytes | None = None,
    ) -> None:
        options = options or {}
        super().__init__(name, options, config_dir)
        Options(options, f"backends.{name}", _OPTIONS)
        self.rsa_bits = rsa_bits
        #: With a seed, EC and Ed25519 keys are derived from it (the n-th key is
        #: always the same), so a test that sorts or picks keys by kid replays
        #: exactly; without one (and for RSA always) keys are random.
        self.seed = seed
        self._keys: dict[tuple[str, str], _StoredKey] = {}
        #: While True, every call raises BackendError.
        self.down = False
        #: Called with (ring, kid) before a key that exists is destroyed.
        self.before_destroy: Callable[[str, str], None] | None = None
        #: (ring, kid) of every key ever created, in order.
        self.created: list[tuple[str, str]] = []
        #: The public JWK of every key ever created (kept after it is destroyed).
        self.made: dict[tuple[str, str], dict[str, str]] = {}
        #: (ring, kid) of every key destroyed, in order.
        self.destroyed: list[tuple[str, str]] = []

    def _up(self, what: str) -> None:
        if self.down:
            raise BackendError(f"backend {self.name}: {what}: unavailable")

    def _get(self, ring: str, kid: str) -> _StoredKey:
        try:
            return self._keys[(ring, kid)]
        except KeyError:
            raise KeyNotFoundError(f"backend {self.name}: ring {ring}: no key {kid}") from None

    # -- Backend --------------------------------------------------------------------

    def generate(self, ring: str, alg: str, *, intent: str | None = None) -> GeneratedKey:
        self._up("generate")
        if alg not in self.algorithms:
            raise BackendError(f"backend {self.name}: unsupported algorithm {alg}")
        private = self._new_key(alg)
        jwk = jose.public_jwk(private.public_key())
        kid = jose.thumbprint(jwk)
        self._keys[(ring, kid)] = _StoredKey(alg, private, jwk, intent)
        self.created.append((ring, kid))
        self.made[(ring, kid)] = dict(jwk)
        return GeneratedKey(kid=kid, public_jwk=dict(jwk))

    def _new_key(self, alg: str) -> jose.PrivateKey:
        if self.seed is None or jose.alg_family(alg) == "RSA":
            return jose.generate_private_key(alg, rsa_bits=self.rsa_bits)
        return derive_private_key(alg, self.seed + len(self.created).to_bytes(8, "big"))

    def intent_of(self, ring: str, kid: str) -> str | None:
        self._up("intent")
        return self._get(ring, kid).intent

    def public_jwk(self, ring: str, kid: str) -> dict[str, str]:
        self._up("public key")
        return dict(self._get(ring, kid).public_jwk)

    def signer(self, ring: str, kid: str, alg: str) -> Signer:
        self._up("sign")
        key = self._get(ring, kid)
        if key.alg != alg:
            raise BackendError(f"backend {self.name}: key {kid} is {key.alg}, not {alg}")
        sign = jose.make_signer(key.private, alg)

        def signer(data: bytes) -> bytes:
            self._up("sign")
            if (ring, kid) not in self._keys:
                raise KeyNotFoundError(f"backend {self.name}: ring {ring}: no key {kid}")
            return sign(data)

        return signer

    def destroy(self, ring: str, kid: str) -> None:
        self._up("destroy")
        if (ring, kid) not in self._keys:
            return
        if self.before_destroy is not None:
            self.before_destroy(ring, kid)
        del self._keys[(ring, kid)]
        self.destroyed.append((ring, kid))

    def list_keys(self, ring: str) -> list[str]:
        self._up("list keys")
        return sorted(kid for (r, kid) in self._keys if r == ring)

    def check(self) -> None:
        self._up("check")

    # -- what a test looks at (works while down) ----------------------------------------

    def holds(self, ring: str, kid: str) -> bool:
        return (ring, kid) in self._keys

    def held(self) -> list[tuple[str, str]]:
        """(ring, kid) of every key held now."""
        return sorted(self._keys)

    def peek_public_jwk(self, ring: str, kid: str) -> dict[str, str] | None:
        key = self._keys.get((ring, kid))
        return None if key is None else dict(key.public_jwk)

    def __repr__(self) -> str:
        return f"MemoryBackend({self.name!r}, keys={len(self._keys)})"


def derive_private_key(alg: str, seed: bytes) -> jose.PrivateKey:
    """An EC or Ed25519 key for ``alg`` derived from ``seed`` (tests only: a
    reproducible key is a known key)."""
    digest = hashlib.sha512(b"keymgr-testing-key\0" + seed).digest()
    family = jose.alg_family(alg)
    if family == "OKP":
        return ed25519.Ed25519PrivateKey.from_private_bytes(digest[:32])
    if family == "EC":
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        # One byte shorter than the curve: below the group order, never zero.
        size = (curve.key_size + 7) // 8 - 1
        stream = digest + hashlib.sha512(digest).digest()
        return ec.derive_private_key(int.from_bytes(stream[:size], "big") | 1, curve)
    raise ValueError(f"cannot derive a {family} key; RSA keys are generated at random")


# --------------------------------------------------------------------------- publisher


@dataclass
class _Waiting:
    """A write not visible yet, and how many more reads serve the old document."""

    data: bytes
    reads_left: int


class MemoryPublisher(Publisher):
    """A JWKS target that serves bytes from memory.

    ``lag``: a write becomes visible only after that many further reads (each
    read before that serves the previous document); writing the bytes already
    waiting does not restart the count, as re-uploading the same object to an
    eventually consistent target does not. A newer write replaces the waiting one.
    """

    type_name: ClassVar[str] = "memory"

    def __init__(
        self,
        name: str = "memory",
        options: Mapping[str, Any] | None = None,
        config_dir: str = "",
        *,
        cache_control: str | None = None,
    ) -> None:
        options = options or {}
        super().__init__(name, options, config_dir)
        Options(options, f"publishers.{name}", _OPTIONS | {"cache_control"})
        cc = options.get("cache_control", cache_control)
        #: Served with the document (read by config.cache_control, like the S3 publisher's).
        self.cache_control: str | None = cc if isinstance(cc, str) else None
        self._body: bytes | None = None
        self._previous: bytes | None = None
        self._waiting: _Waiting | None = None
        #: While True, read, write and headers raise PublishError.
        self.down = False
        #: Reads a write stays invisible for (0: visible at once).
        self.lag = 0
        #: Every document written (accepted by write(), visible or not yet).
        self.writes: list[bytes] = []
        #: Number of reads served (including reads while a write was waiting).
        self.reads = 0

    def _up(self, what: str) -> None:
        if self.down:
            raise PublishError(f"publisher {self.name}: {what}: unavailable")

    def _show(self, data: bytes | None) -> None:
        self._previous = self._body
        self._body = data

    # -- Publisher ------------------------------------------------------------------

    def read(self) -> bytes | None:
        self._up("read")
        self.reads += 1
        waiting = self._waiting
        if waiting is not None:
            if waiting.reads_left <= 0:
                self._waiting = None
                self._show(waiting.data)
            else:
                waiting.reads_left -= 1
        if self._body is not None:
            check_size(self.where, len(self._body))  # as a store reports its object's size
        return self._body

    def write(self, data: bytes) -> None:
        self._up("write")
        self.writes.append(data)
        if self.lag <= 0:
            self._waiting = None
            self._show(data)
        elif self._waiting is None or self._waiting.data != data:
            self._waiting = _Waiting(data, self.lag)

    def headers(self) -> dict[str, str]:
        self._up("headers")
        out = {"Content-Type": "application/json"}
        if self.cache_control is not None:
            out["Cache-Control"] = self.cache_control
        return out

    # -- knobs and what a test looks at ---------------------------------------------------

    def revert(self) -> None:
        """Serve again the document served before the last visible write (a stale
        deploy, a restored bucket); a write still waiting is dropped."""
        self._waiting = None
        self._body = self._previous

    def peek(self) -> bytes | None:
        """What the target serves now, without counting as a read (works while down)."""
        return self._body

    @property
    def waiting(self) -> bytes | None:
        """A written document not visible yet (lag), or None."""
        return None if self._waiting is None else self._waiting.data

    def __repr__(self) -> str:
        return f"MemoryPublisher({self.name!r})"
