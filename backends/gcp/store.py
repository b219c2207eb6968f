"""Cloud Storage as a :class:`~keymgr.docstore.DocumentAdapter`: ``gs://BUCKET/OBJECT`` state.

The three documents are ``OBJECT`` (state), ``OBJECT.lock`` and
``OBJECT.lease``. Every write is an upload (``objects.insert``) with an
``ifGenerationMatch`` precondition, and the version token is the object's
generation:

- ``create``: ``ifGenerationMatch=0`` (only if no live object has the name);
  over a *tombstone* (see ``delete``) ``ifGenerationMatch=`` its generation;
- ``replace``: ``ifGenerationMatch=G``;
- ``delete``: a tombstone -- an empty object marked ``keymgr-deleted: true``
  in its custom metadata, uploaded with ``ifGenerationMatch=G`` -- which
  ``read`` and ``version`` report as absent. Not ``objects.delete`` with
  ``ifGenerationMatch``, which Cloud Storage does honour, because the
  emulator the tests run on (fake-gcs-server) ignores preconditions on
  deletes: with a tombstone every conditional operation of this adapter is one
  mechanism, the conditional upload, that both honour, so the tests prove the
  requests production sends (docs/configuration/gcp.md, tests/test_gcs.py);
- ``read``: the object's metadata (``objects.get``), then its body pinned to
  that generation (``objects.get?alt=media&generation=G``), read again if it
  changed in between; ``version``: the metadata alone.

A document's age is measured on Google's clock: the ``Date`` header of the
metadata response minus the object's ``updated`` time. ``Date`` is whole
seconds, rounded down, and ``updated`` is exact, so the age is at most 1 s
short and never long: a live lock is never judged abandoned early, and an
abandoned one at most 1 s late. ``updated`` (not ``timeCreated``) also moves
when someone edits the object's metadata by hand, which again only delays a
takeover. No local clock is ever used.

Retries: each upload carries a unique ``keymgr-write`` id in its custom
metadata. When an upload that was sent more than once (see
:meth:`~keymgr.backends.gcp.client.LazyGCS.call`) fails its precondition,
the adapter reads the object's metadata: if it carries this write's id, the
first attempt landed and the write is ours, not a conflict.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from keymgr.docstore import MAX_SUFFIX, STATE, Blob, DocumentAdapter, SharedStore
from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.options import Options

from .client import (
    GCS_CONNECTION_OPTIONS,
    CallFailed,
    GCSConnection,
    LazyGCS,
    check_bucket,
    check_object,
    parse_connection,
)

__all__ = ["DELETED", "WRITE_ID", "GCSAdapter", "open_gcs_store"]

_STORE_PARAMS = frozenset(GCS_CONNECTION_OPTIONS | {"lock_ttl"})
DEFAULT_LOCK_TTL = 30.0
_MIN_LOCK_TTL, _MAX_LOCK_TTL = 5, 3600
#: Custom metadata: the unique id of the upload that wrote this generation.
WRITE_ID = "keymgr-write"
#: Custom metadata of a tombstone (a deleted document).
DELETED = "keymgr-deleted"
CONTENT_TYPE = "application/json"
#: How often read() tries metadata and body again when the object changes in between.
_READ_ROUNDS = 5
#: Longest suffix of a document's object name (".lease").
_SUFFIX_ROOM = MAX_SUFFIX


def _store_params(url: str) -> tuple[str, str, Options]:
    """Split and validate ``gs://BUCKET/OBJECT?params``: (bucket, object, options). No I/O.

    Raises ConfigError naming ``daemon.state`` (``daemon.state?NAME`` for a
    parameter) and the culprit.
    """
    where = "daemon.state"
    parts = urlsplit(url)
    if parts.scheme != "gs" or not parts.netloc:
        raise ConfigError(f"{where}: expected gs://BUCKET/OBJECT, got {url!r}")
    bucket = check_bucket(parts.netloc, f"{where}: bucket of {url!r}")
    name = check_object(parts.path[1:], f"{where}: object name of {url!r}", _SUFFIX_ROOM)
    if parts.fragment:
        raise ConfigError(f"{where}: {url!r}: unexpected '#' fragment")
    return bucket, name, Options.query(parts.query, where, _STORE_PARAMS)


class _PreconditionFailed(Exception):
    """An upload's ifGenerationMatch did not hold (and the write was not ours)."""


class GCSAdapter(LazyGCS, DocumentAdapter):
    """``OBJECT``, ``OBJECT.lock``, ``OBJECT.lease`` in one bucket, by conditional uploads."""

    #: Shards read and written at once (a round trip each; the client is
    #: thread-safe): keymgr.docstore.DocumentAdapter.concurrency.
    concurrency = 16

    def __init__(
        self, bucket: str, name: str, connection: GCSConnection | None = None
    ) -> None:
        self.bucket_name, self.object_name = bucket, name
        self._init_client(connection or GCSConnection())

    @property
    def location(self) -> str:
        return f"gs://{self.bucket_name}/{self.object_name}"

    def _name(self, doc: str) -> str:
        return self.object_name if doc == STATE else f"{self.object_name}.{doc}"

    def _op(self, op: str, doc: str, note: str = "") -> str:
        """``objects.insert`` for the state, ``objects.insert OBJECT.lock (lock)`` for others."""
        if doc == STATE:
            return f"{op} ({note})" if note else op
        return f"{op} {self._name(doc)} ({doc}{', ' + note if note else ''})"

    def _error(self, operation: str, failed: CallFailed) -> StoreError:
        return StoreError(f"state {self.location}: {operation}: {failed.reason()}")

    # -- reading ------------------------------------------------------------------------

    def _meta(self, doc: str) -> tuple[Any | None, str | None]:
        """The object's metadata (None: no object) and the response's Date header."""
        try:
            meta = self.metadata(self.bucket_name, self._name(doc))
        except CallFailed as e:
            raise self._error(self._op("objects.get", doc), e) from None
        return meta, self.server_date()

    def read(self, name: str) -> Blob | None:
        bucket = self.bucket(self.bucket_name)
        timeout = self.connection.timeout
        for _ in range(_READ_ROUNDS):
            meta, date = self._meta(name)
            if meta is None or _is_tombstone(meta):
                return None
            self.check_size(name, meta.size)
            pinned = bucket.blob(self._name(name), generation=meta.generation)
            try:
                data: bytes = self.call(
                    lambda: pinned.download_as_bytes(timeout=timeout, retry=None)  # noqa: B023
                )
            except CallFailed as e:
                if e.status == 404:
                    continue  # replaced (or deleted) between the two requests: look again
                raise self._error(self._op("objects.get alt=media", name), e) from None
            return Blob(data, int(meta.generation), _age(date, meta.updated))
        raise StoreError(
            f"state {self.location}: {self._op('objects.get', name)}: the object changed "
            f"during every one of {_READ_ROUNDS} reads"
        )

    def version(self, name: str) -> object | None:
        meta, _ = self._meta(name)
        return None if meta is None or _is_tombstone(meta) else int(meta.generation)

    # -- writing ------------------------------------------------------------------------

    def _upload(
        self, doc: str, data: bytes, generation: int, op: str, *, tombstone: bool = False
    ) -> int:
        """Upload with ``ifGenerationMatch=generation``; the new generation.

        Raises _PreconditionFailed when the precondition failed and the object
        is not this very write (landed by an earlier attempt of a retried call).
        """
        bucket = self.bucket(self.bucket_name)
        timeout = self.connection.timeout
        write_id = uuid.uuid4().hex
        metadata = {WRITE_ID: write_id, **({DELETED: "true"} if tombstone else {})}

        def upload() -> int:
            blob = bucket.blob(self._name(doc))
            blob.metadata = metadata
            blob.upload_from_string(
                data,
                content_type=CONTENT_TYPE,
                if_generation_match=generation,
                timeout=timeout,
                retry=None,
            )
            return int(blob.generation)

        try:
            return self.call(upload)
        except CallFailed as e:
            if e.status != 412:
                raise self._error(op, e) from None
            # A retried upload may have landed on an earlier attempt and then
            # failed its own precondition: ours if the object carries our id.
            # A precondition failure on the first attempt is always real.
            mine = self._written_by(doc, write_id) if e.retried else None
            if mine is None:
                raise _PreconditionFailed(f"ifGenerationMatch={generation}") from None
            return mine

    def _written_by(self, doc: str, write_id: str) -> int | None:
        """The generation if the object is the write ``write_id``, else None.

        When the object cannot be read, whether the write landed is unknown:
        StoreError (the answer was lost), never a conflict.
        """
        meta, _ = self._meta(doc)
        if meta is None or (meta.metadata or {}).get(WRITE_ID) != write_id:
            return None
        return int(meta.generation)

    def _conflict(self, op: str, why: _PreconditionFailed) -> ConflictError:
        return ConflictError(f"state {self.location}: {op}: HTTP 412: precondition {why} failed")

    def create(self, name: str, data: bytes) -> object:
        op = self._op("objects.insert", name)
        expected = 0
        for _ in range(3):
            try:
                return self._upload(name, data, expected, op)
            except _PreconditionFailed as e:
                failed = e
            meta, _ = self._meta(name)
            if meta is None:
                expected = 0  # deleted by hand meanwhile: create it
            elif _is_tombstone(meta):
                expected = int(meta.generation)  # reads as absent: write over it
            else:
                break
        raise self._conflict(op, failed)

    def replace(self, name: str, data: bytes, version: object) -> object:
        op = self._op("objects.insert", name)
        try:
            return self._upload(name, data, _generation(version), op)
        except _PreconditionFailed as e:
            raise self._conflict(op, e) from None

    def delete(self, name: str, version: object) -> None:
        op = self._op("objects.insert", name, "tombstone")
        try:
            self._upload(name, b"", _generation(version), op, tombstone=True)
            return
        except _PreconditionFailed as e:
            failed = e
        meta, _ = self._meta(name)
        if meta is None or _is_tombstone(meta):
            return  # absent already: done
        raise self._conflict(op, failed)

    def discard(self, name: str) -> None:
        """Delete an immutable document (a shard, a manifest) for good, or a
        tombstone an earlier keymgr left in its place: objects.delete with
        ``ifGenerationMatch`` of the generation just read, so that listings do
        not grow with the garbage of past commits. A document written again
        meanwhile (HTTP 412) is left; absent: done."""
        op = self._op("objects.delete", name)
        meta, _ = self._meta(name)
        if meta is None:
            return
        blob = self.bucket(self.bucket_name).blob(self._name(name))
        generation, timeout = int(meta.generation), self.connection.timeout
        try:
            self.call(
                lambda: blob.delete(if_generation_match=generation, timeout=timeout, retry=None)
            )
        except CallFailed as e:
            if e.status in (404, 412):
                return
            raise self._error(op, e) from None

    # -- listing ------------------------------------------------------------------------

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        """``FAMILY/LEAF`` objects by objects.list on ``OBJECT.FAMILY/``, with
        their age on Google's clock (the listing's Date header minus each
        object's ``updated``); for the sweep of orphaned state shards
        (keymgr.docstore.StateLayout.sweep), which also takes the tombstones
        an earlier keymgr left. Needs storage.objects.list, which
        deploy/gcp/keymgr-role.yaml grants."""
        prefix = f"{self._name(family)}/"
        timeout = self.connection.timeout

        def listing() -> tuple[list[Any], str | None]:
            pages = self.client.list_blobs(
                self.bucket(self.bucket_name), prefix=prefix, timeout=timeout, retry=None
            )
            return list(pages), self.server_date()

        try:
            objects, date = self.call(listing)
        except CallFailed as e:
            raise self._error(f"objects.list {prefix}", e) from None
        return [(f"{family}/{o.name[len(prefix):]}", _age(date, o.updated)) for o in objects]

    def __repr__(self) -> str:
        return f"GCSAdapter({self.location!r})"


def _is_tombstone(meta: Any) -> bool:
    return bool((meta.metadata or {}).get(DELETED) == "true")


def _generation(version: object) -> int:
    """A version token as a generation; anything else matches no object."""
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise _PreconditionFailed(f"ifGenerationMatch={version!r} (not a generation)")
    return version


def _age(date: str | None, updated: datetime | None) -> float | None:
    """Seconds since the object was written, on Google's clock (Date header vs ``updated``).

    Never more than the true age (``Date`` is rounded down to the second, so
    the result is up to 1 s short); None when either time is missing.
    """
    if date is None or updated is None:
        return None
    try:
        server_now = parsedate_to_datetime(date)
        return max(0.0, float((server_now - updated).total_seconds()))
    except (TypeError, ValueError):
        return None


def open_gcs_store(url: str) -> SharedStore:
    """``gs://BUCKET/OBJECT[?endpoint_url=..&lock_ttl=..&connect_timeout=..&...]``; no I/O.

    Validates the URL with :func:`_store_params` (ConfigError naming
    ``daemon.state`` and the culprit); registered as the ``gs`` store in :mod:`keymgr.plugins`.
    """
    bucket, name, o = _store_params(url)
    lock_ttl = o.number("lock_ttl", DEFAULT_LOCK_TTL, _MIN_LOCK_TTL, _MAX_LOCK_TTL)
    return SharedStore(GCSAdapter(bucket, name, parse_connection(o)), url=url, lock_ttl=lock_ttl)
