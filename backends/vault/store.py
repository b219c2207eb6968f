"""Vault / OpenBao KV v2 as a :class:`~keymgr.docstore.DocumentAdapter`: ``vault://`` state.

``vault://MOUNT/PATH``: the three documents are the secrets ``PATH`` (state),
``PATH.lock`` and ``PATH.lease``, each holding its bytes as text in one field
named like the document (``state``, ``lock``, ``lease``: the fields
the Vault KV store of the previous release wrote, so existing secrets load). The KV
version is the version token and KV's own check-and-set the condition:

- ``create``: write with ``cas=0``; for a lock or lease that is absent but
  whose secret exists (a released lock: see ``delete``; a version deleted by
  hand), ``cas=`` the version that reads as absent;
- ``replace``: write with ``cas=N``;
- ``delete``: write an empty secret (``{}``, a tombstone that reads as absent)
  with ``cas=N``: a real delete-if-version, where KV has no conditional
  delete. It needs nothing beyond what ``deploy/vault/keymgr-policy.hcl``
  grants on ``PATH.lock`` (create, read, update on its data; no metadata, no
  ``delete/``), and the Vault KV store of the previous release reads it as a
  free lock, as this one reads that one's ``{"holder": null}``;
- ``read``: the latest version with its metadata; its age is the server's
  ``Date`` header minus the version's ``created_time`` (the secret's
  ``updated_time`` for the latest version), both the server's clock.

A state whose latest version is deleted or destroyed is refused with the
message the previous release gave (starting over would forget every key it records),
never read as an empty store. The client never replays a write that may
have reached the server, so a lost answer surfaces as a StoreError.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from keymgr.docstore import LEASE, LOCK, STATE, Blob, DocumentAdapter, SharedStore
from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.options import Options

from .client import (
    _MOUNT_RE,
    CLIENT_OPTIONS,
    VaultCallError,
    VaultClient,
    vault_client,
)

__all__ = ["VaultKVAdapter", "open_vault_store"]

#: Operation names in messages, as the previous release wrote them.
_OPS = {
    ("read", STATE): "read",
    ("write", STATE): "commit",
    ("version", STATE): "read metadata",
    ("read", LEASE): "read lease",
    ("write", LEASE): "write lease",
    ("read", LOCK): "lock",
    ("write", LOCK): "lock",
    ("delete", LOCK): "unlock",
}


# --------------------------------------------------------------------------- the URL

#: Store-only URL parameters (the rest are the client options above).
STORE_OPTIONS: frozenset[str] = frozenset({"lock_ttl"})
DEFAULT_LOCK_TTL = 20.0
_LOCK_TTL_RANGE = (2.0, 3600.0)


def _kv_time(text: Any) -> datetime | None:
    """A KV ``created_time`` (RFC 3339, nanoseconds) as an aware datetime, or None."""
    if not isinstance(text, str) or not text:
        return None
    m = _KV_TIME_RE.fullmatch(text)
    if m is None:
        return None
    try:
        return datetime.fromisoformat(f"{m.group(1)}{(m.group(2) or '')[:7]}+00:00")
    except ValueError:
        return None


_KV_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


def _is_cas_failure(e: VaultCallError) -> bool:
    return e.status == 400 and any("check-and-set" in x for x in e.errors)


def _op(kind: str, name: str) -> str:
    return _OPS.get((kind, name), f"{kind} {name}")


class VaultKVAdapter(DocumentAdapter):
    """``PATH``, ``PATH.lock``, ``PATH.lease`` in one KV v2 mount, written with ``cas``."""

    #: Shards read and written at once (a round trip each; the client is
    #: thread-safe): keymgr.docstore.DocumentAdapter.concurrency.
    concurrency = 16

    #: Raft storage refuses entries over 1 MiB, Consul over 512 KiB; the state
    #: is stored as a JSON string (escaped, so larger): ``shards=off`` refuses
    #: more than the lower limit (docs/scale.md).
    max_document = 512 * 1024

    def __init__(self, mount: str, path: str, client: VaultClient) -> None:
        self.mount, self.path = mount, path
        #: The client (its ``session`` lets tests count requests).
        self.vault = client

    @property
    def location(self) -> str:
        return f"vault://{self.mount}/{self.path}"

    def _path(self, name: str) -> str:
        return self.path if name == STATE else f"{self.path}.{name}"

    def _error(self, op: str, e: VaultCallError) -> StoreError:
        return StoreError(f"state {self.location}: {op}: {e.reason}")

    def _token(self, version: object, op: str) -> int:
        if isinstance(version, bool) or not isinstance(version, int):
            raise StoreError(f"state {self.location}: {op}: not a KV version: {version!r}")
        return version

    # -- reads ----------------------------------------------------------------------

    def _read(self, name: str, op: str) -> _Latest | None:
        """The latest version as read; None when there is none (404: no secret, or destroyed)."""
        mount, path = self.mount, self._path(name)
        try:
            resp = self.vault.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=False
                )
            )
            server_now = self.vault.last_server_time()
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return None
            raise self._error(op, e) from None
        try:
            data = resp["data"]
            meta = data["metadata"]
            version = int(meta["version"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(
                f"state {self.location}: {op}: unexpected answer ({type(e).__name__})"
            ) from None
        fields = data.get("data")
        deleted = bool(meta.get("deletion_time") or meta.get("destroyed"))
        if deleted or not isinstance(fields, dict):
            fields = {}
        created = _kv_time(meta.get("created_time"))
        age = (server_now - created).total_seconds() if server_now and created else None
        return _Latest(fields, version, deleted, age)

    def read(self, name: str) -> Blob | None:
        op = _op("read", name)
        got = self._read(name, op)
        if got is None:
            if name == STATE:
                self._refuse_deleted(op)
            return None
        if got.deleted and name == STATE:
            raise self._deleted(got.version)
        if not got.fields and name != STATE:
            return None  # a released lock (the tombstone), or deleted by hand
        text = got.fields.get(name)
        # Another shape (a hand edit) reads as empty bytes: the store reports a
        # corrupt state, and treats a lease or lock it cannot read as such.
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else b""
        # Known only once read: Vault bounds an entry itself (1 MiB on raft).
        self.check_size(name, len(raw))
        return Blob(raw, got.version, got.age)

    def _kv(self, op: str, call: Callable[[Any], Any]) -> Any | None:
        """``call(client)``, a KV v2 request; None when Vault answers a plain 404
        (no such secret or folder; a 404 with errors, such as a missing mount,
        is an error)."""
        try:
            return self.vault.call(call)
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return None
            raise self._error(op, e) from None

    def _metadata(self, name: str, op: str) -> dict[str, Any] | None:
        mount, path = self.mount, self._path(name)
        resp = self._kv(
            op, lambda c: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
        )
        if resp is None:
            return None
        data = resp.get("data") if isinstance(resp, dict) else None
        return data if isinstance(data, dict) else {}

    def _refuse_deleted(self, op: str) -> None:
        meta = self._metadata(STATE, op)
        current = _current(meta)
        if current:
            raise self._deleted(current)

    def _deleted(self, current: int) -> StoreError:
        # Starting over would forget every key the state records (and the
        # orphan logic would then destroy them): refuse, and say how to fix it.
        return StoreError(
            f"state {self.location}: read: the latest version ({current}) is deleted or "
            f"destroyed; restore it (bao kv undelete -mount={self.mount} -versions={current} "
            f"{self.path}) or delete the secret's metadata to start from an empty state"
        )

    def version(self, name: str) -> object | None:
        return _current(self._metadata(name, _op("version", name))) or None

    # -- writes ---------------------------------------------------------------------

    def _write(self, name: str, data: bytes | None, cas: int, op: str) -> int:
        """Write ``{name: data}`` (None: the tombstone ``{}``) with ``cas``; the new version."""
        secret: dict[str, str] = {}
        if data is not None:
            try:
                secret[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise StoreError(f"state {self.location}: {op}: not UTF-8 text") from None
        mount, path = self.mount, self._path(name)
        try:
            resp = self.vault.call(
                lambda c: c.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=secret, cas=cas, mount_point=mount
                )
            )
        except VaultCallError as e:
            if _is_cas_failure(e):
                raise ConflictError(
                    f"state {self.location}: {op}: changed by another writer "
                    f"(expected version {cas})"
                ) from None
            raise self._error(op, e) from None
        try:
            return int(resp["data"]["version"])
        except (KeyError, TypeError, ValueError):
            return cas + 1  # KV numbers versions one by one

    def create(self, name: str, data: bytes) -> object:
        op = _op("write", name)
        try:
            return self._write(name, data, 0, op)
        except ConflictError:
            if name == STATE:
                raise  # a deleted state is refused by read(), never written over
            absent = self._absent_version(name, op)
            if absent is None:
                raise
        # The secret exists but reads as absent (a released lock): KV's cas=0
        # means "no secret at all", so the condition is that version.
        return self._write(name, data, absent, op)

    def _absent_version(self, name: str, op: str) -> int | None:
        """The latest version if it reads as absent (tombstone, deleted, destroyed)."""
        got = self._read(name, op)
        if got is not None:
            return None if got.fields else got.version
        # Destroyed by hand: only the metadata knows its number (a policy
        # without metadata access then reports the lock as held until fixed).
        try:
            current = _current(self._metadata(name, op))
        except StoreError:
            return None
        return current or None

    def replace(self, name: str, data: bytes, version: object) -> object:
        op = _op("write", name)
        return self._write(name, data, self._token(version, op), op)

    def delete(self, name: str, version: object) -> None:
        op = _op("delete", name)
        self._write(name, None, self._token(version, op), op)

    # -- immutable documents: listing and garbage collection -----------------------

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        """``FAMILY/LEAF`` secrets by LIST on ``PATH.FAMILY/`` (KV metadata), without
        times: :meth:`age` reads the few the sweep of orphaned shards would delete
        (keymgr.docstore.StateLayout.sweep). deploy/vault/keymgr-policy.hcl grants
        ``list`` there."""
        mount, path = self.mount, self._path(family)
        resp = self._kv(
            f"list {path}/",
            lambda c: c.secrets.kv.v2.list_secrets(path=path, mount_point=mount),
        )
        if resp is None:
            return []  # nothing under it yet
        keys = resp.get("data", {}).get("keys") if isinstance(resp, dict) else None
        if not isinstance(keys, list):
            raise StoreError(f"state {self.location}: list {path}/: unexpected answer")
        return [(f"{family}/{k}", None) for k in keys if isinstance(k, str) and "/" not in k]

    def age(self, name: str) -> float | None:
        """Seconds since the latest version of ``name`` was written (Vault's Date
        header minus its ``created_time``), also when that version is deleted or
        the tombstone of an earlier garbage collection: such a leftover then goes
        as any orphan does. None when there is no secret."""
        got = self._read(name, _op("read", name))
        return None if got is None else got.age

    def discard(self, name: str) -> None:
        """Delete an immutable document (a shard, a manifest) for good: its KV
        metadata and every version, so that no tombstone is left to list and
        read again. Absent: done. deploy/vault/keymgr-policy.hcl grants
        ``delete`` on the metadata of ``PATH.shards/`` only."""
        mount, path = self.mount, self._path(name)
        self._kv(
            f"delete metadata {path}",
            lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=mount
            ),
        )  # absent (None): done

    def __repr__(self) -> str:
        return f"VaultKVAdapter({self.location!r})"


@dataclass(frozen=True)
class _Latest:
    """The latest version of a secret as read."""

    fields: dict[str, Any]  # {} when deleted, destroyed, or the tombstone
    version: int
    deleted: bool
    age: float | None  # the server's Date minus created_time


def _current(meta: dict[str, Any] | None) -> int:
    try:
        return int((meta or {}).get("current_version") or 0)
    except (TypeError, ValueError):
        return 0


def open_vault_store(url: str) -> SharedStore:
    """``vault://MOUNT/PATH[?auth=..&lock_ttl=..&...]``; validated, no I/O.

    A bad URL is a ConfigError naming ``daemon.state`` (or the state and the
    parameter) and the culprit; registered as the ``vault`` store in :mod:`keymgr.plugins`.
    """
    parts = urlsplit(url)
    mount = parts.netloc
    path = parts.path.strip("/")
    if parts.scheme != "vault" or not mount or not path or "@" in mount:
        raise ConfigError(f"daemon.state: {url!r}: expected vault://MOUNT/PATH")
    if not _MOUNT_RE.fullmatch(mount) or not _MOUNT_RE.fullmatch(path):
        raise ConfigError(f"daemon.state: {url!r}: bad mount or path")
    if parts.fragment:
        raise ConfigError(f"daemon.state: {url!r}: unexpected '#' fragment")
    canonical = f"vault://{mount}/{path}"
    # A token in the URL is refused with the reason by vault_client().
    o = Options.query(parts.query, "daemon.state", CLIENT_OPTIONS | STORE_OPTIONS, hidden={"token"})
    lock_ttl = o.number("lock_ttl", DEFAULT_LOCK_TTL, *_LOCK_TTL_RANGE)
    client = vault_client(o)
    return SharedStore(VaultKVAdapter(mount, path, client), url=canonical, lock_ttl=lock_ttl)
