"""Azure Blob Storage as a :class:`~keymgr.docstore.DocumentAdapter`: ``azblob://`` state.

``azblob://ACCOUNT/CONTAINER/BLOB[?endpoint=URL&auth=..&lock_ttl=..&...]``

The three documents are the blobs ``BLOB`` (state), ``BLOB.lock`` and
``BLOB.lease`` in one container, each written by a conditional Put Blob:
``If-None-Match: *`` creates, ``If-Match: ETAG`` replaces, Delete Blob
``If-Match: ETAG`` deletes. The version token is the blob's ETag (Azure
changes it on every write, also when the bytes are the same).

The age of a document is the service's own clock: the ``Date`` header of the
Get Blob response minus the blob's ``Last-Modified``, both stamped by the
storage service (to the second, as HTTP dates are), never compared with this
machine's clock. That is what :class:`~keymgr.docstore.SharedStore` judges an
abandoned pass lock by, so clock skew between replicas cannot make a live
lock look abandoned.

Why the account name, not the endpoint, is the URL's host: the account is
the one name a state store has in every environment (like an S3 bucket),
while the endpoint differs by cloud and by emulator. Real Azure serves
``https://ACCOUNT.blob.core.windows.net`` (the default), a sovereign cloud or
a private endpoint another host, and Azurite serves the account as a path
(``http://127.0.0.1:10000/devstoreaccount1``): putting that in the URL would
make its path mean different things in different places. So one URL form
works for all of them, ``?endpoint=`` (or a connection string's
``BlobEndpoint``) says where the account is served, and an endpoint or a
connection string for another account is refused.
"""

from __future__ import annotations

import threading
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from keymgr.docstore import MAX_SUFFIX, STATE, Blob, DocumentAdapter, SharedStore
from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.options import Options

from .client import (
    CONNECTION_OPTIONS,
    REFUSED_LITERALS,
    Attempts,
    AzureConnection,
    BlobAccess,
    azure_errors,
    check_account,
    check_blob,
    check_container,
    error_code,
    parse_connection,
    sdk,
    status_code,
)

__all__ = ["AzureBlobAdapter", "open_azblob_store"]

_STORE_PARAMS = frozenset(CONNECTION_OPTIONS | {"endpoint", "lock_ttl"})
DEFAULT_LOCK_TTL = 30.0
_MIN_LOCK_TTL, _MAX_LOCK_TTL = 5, 3600
CONTENT_TYPE = "application/json"
#: The longest suffix a document adds to the state blob's name.
_SUFFIX_ROOM = MAX_SUFFIX

#: Error codes of a conditional write that lost: ``If-None-Match: *`` on a blob
#: that exists answers 409 BlobAlreadyExists (the SDK also renames a 412 so),
#: ``If-Match`` on a changed blob 412 ConditionNotMet.
CONFLICT_CODES = frozenset({"BlobAlreadyExists", "ConditionNotMet"})
#: The blob is absent. ContainerNotFound is *not* in here: a missing container
#: is a configuration error, never an empty state.
MISSING_CODES = frozenset({"BlobNotFound"})


def _store_params(url: str) -> tuple[str, str, str, Options]:
    """Split and validate ``azblob://ACCOUNT/CONTAINER/BLOB?params``. No I/O.

    Raises ConfigError naming ``daemon.state`` (``daemon.state?NAME`` for a
    parameter) and the culprit.
    """
    where = "daemon.state"
    parts = urlsplit(url)
    if parts.scheme != "azblob" or not parts.netloc:
        raise ConfigError(f"{where}: expected azblob://ACCOUNT/CONTAINER/BLOB, got {url!r}")
    if parts.fragment:
        raise ConfigError(f"{where}: {url!r}: unexpected '#' fragment")
    account = check_account(parts.netloc, f"{where}: account of {url!r}")
    container, _, blob = parts.path[1:].partition("/")
    container = check_container(container, f"{where}: container of {url!r}")
    blob = check_blob(blob, f"{where}: blob name of {url!r}", room=_SUFFIX_ROOM)
    o = Options.query(parts.query, where, _STORE_PARAMS, hidden=REFUSED_LITERALS)
    return account, container, blob, o


class AzureBlobAdapter(DocumentAdapter):
    """``BLOB``, ``BLOB.lock``, ``BLOB.lease`` in one container, by conditional requests."""

    #: Shards read and written at once (a round trip each; the client is
    #: thread-safe): keymgr.docstore.DocumentAdapter.concurrency.
    concurrency = 16

    def __init__(
        self, account: str, container: str, blob: str, connection: AzureConnection | None = None
    ) -> None:
        self.account, self.container, self.blob = account, container, blob
        self.connection = connection or AzureConnection(account=account)
        self.access = BlobAccess(self.connection, container)

    @property
    def location(self) -> str:
        return f"azblob://{self.account}/{self.container}/{self.blob}"

    def _name(self, name: str) -> str:
        return self.blob if name == STATE else f"{self.blob}.{name}"

    def _op(self, op: str, name: str) -> str:
        """``PutBlob`` for the state, ``PutBlob BLOB.lock (lock)`` for the others."""
        return op if name == STATE else f"{op} {self._name(name)} ({name})"

    def _error(self, operation: str, exc: BaseException, attempts: int = 1) -> StoreError:
        self.access.failed(exc)
        return StoreError(
            f"state {self.location}: {operation}: {self.access.reason(exc, attempts)}"
        )

    def read(self, name: str) -> Blob | None:
        attempts, seen = Attempts(), _ServerDate()
        try:
            download = self.access.handle(self._name(name)).download_blob(
                retry_hook=attempts, raw_response_hook=seen
            )
            # The first request brought at most the client's max_single_get_size
            # (32 MiB); the rest is fetched by readall() only if the size is sane.
            self.check_size(name, download.properties.size)
            data: bytes = download.readall()
        except azure_errors() as e:
            if error_code(e) in MISSING_CODES:
                return None
            raise self._error(self._op("GetBlob", name), e, attempts.count) from None
        props = download.properties
        return Blob(data, str(props.etag), _age(seen.date, props.last_modified))

    def create(self, name: str, data: bytes) -> object:
        return self._put(name, data, None)

    def replace(self, name: str, data: bytes, version: object) -> object:
        return self._put(name, data, str(version))

    def _put(self, name: str, data: bytes, etag: str | None) -> str:
        """Put Blob ``If-None-Match: *`` (``etag`` None) or ``If-Match: etag``."""
        attempts = Attempts()
        try:
            condition: dict[str, Any] = {"overwrite": False}  # the SDK sends If-None-Match: *
            if etag is not None:
                from azure.core import MatchConditions

                condition = {
                    "overwrite": True,
                    "etag": etag,
                    "match_condition": MatchConditions.IfNotModified,  # If-Match: ETAG
                }
            settings = sdk().ContentSettings(content_type=CONTENT_TYPE)
            resp = self.access.handle(self._name(name)).upload_blob(
                data, content_settings=settings, retry_hook=attempts, **condition
            )
        except azure_errors() as e:
            code = error_code(e)
            # If-Match on a blob deleted meanwhile: Azure may say BlobNotFound.
            lost = code in CONFLICT_CODES or status_code(e) == 412 or (
                code in MISSING_CODES and etag is not None
            )
            if not lost:
                raise self._error(self._op("PutBlob", name), e, attempts.count) from None
            # A request the SDK retried after a timeout may have landed on the
            # first attempt and then lost to itself: if the blob now holds
            # exactly our bytes (the store makes every write unique), the write
            # is ours. A conflict on the first attempt is always real.
            mine = self._current_if_equal(name, data) if attempts.count > 1 else None
            if mine is None:
                raise ConflictError(
                    f"state {self.location}: {self._op('PutBlob', name)}: {code or 'HTTP 412'}"
                ) from None
            return mine
        return str(resp["etag"])

    def _current_if_equal(self, name: str, data: bytes) -> str | None:
        try:
            download = self.access.handle(self._name(name)).download_blob()
            if download.readall() == data:
                return str(download.properties.etag)
        except azure_errors():
            pass
        return None

    def delete(self, name: str, version: object) -> None:
        attempts = Attempts()
        try:
            from azure.core import MatchConditions

            self.access.handle(self._name(name)).delete_blob(
                etag=str(version),
                match_condition=MatchConditions.IfNotModified,
                retry_hook=attempts,
            )
        except azure_errors() as e:
            code = error_code(e)
            if code in MISSING_CODES:
                return
            if code in CONFLICT_CODES or status_code(e) == 412:
                # Azurite (and RFC 9110) answer If-Match on an absent blob with
                # 412, S3 with 404: absent is done, whoever deleted it.
                if self.version(name) is None:
                    return
                raise ConflictError(
                    f"state {self.location}: {self._op('DeleteBlob', name)}: {code or 'HTTP 412'}"
                ) from None
            raise self._error(self._op("DeleteBlob", name), e, attempts.count) from None

    def version(self, name: str) -> object | None:
        attempts = Attempts()
        try:
            props = self.access.handle(self._name(name)).get_blob_properties(retry_hook=attempts)
        except azure_errors() as e:
            if error_code(e) in MISSING_CODES or (
                status_code(e) == 404 and error_code(e) is None  # a HEAD has no error body
            ):
                return None
            raise self._error(self._op("GetBlobProperties", name), e, attempts.count) from None
        return str(props.etag)

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        """``FAMILY/LEAF`` blobs by List Blobs on ``BLOB.FAMILY/``, with their
        age on the service's clock (the listing's Date header minus each
        blob's Last-Modified); for the sweep of orphaned state shards
        (keymgr.docstore.StateLayout.sweep). Listing is the ``blobs/read``
        data action, which deploy/azure/keymgr-role.json grants."""
        prefix = f"{self._name(family)}/"
        attempts, seen = Attempts(), _ServerDate()
        try:
            listed = [
                (str(b.name), b.last_modified)
                for b in self.access.client().list_blobs(
                    name_starts_with=prefix, retry_hook=attempts, raw_response_hook=seen
                )
            ]
        except azure_errors() as e:
            raise self._error(f"ListBlobs {prefix}", e, attempts.count) from None
        return [(f"{family}/{n[len(prefix):]}", _age(seen.date, t)) for n, t in listed]

    def __repr__(self) -> str:
        return f"AzureBlobAdapter({self.location!r})"


class _ServerDate:
    """``raw_response_hook``: the ``Date`` header of the last response (the service's clock)."""

    def __init__(self) -> None:
        self.date: str | None = None
        self._lock = threading.Lock()

    def __call__(self, response: Any) -> None:
        value = response.http_response.headers.get("Date")
        if value:
            with self._lock:
                self.date = str(value)


def _age(date: str | None, last_modified: datetime | None) -> float | None:
    """Seconds since the blob was written, on the service's clock (Date vs Last-Modified)."""
    if date is None or last_modified is None:
        return None
    try:
        return float((parsedate_to_datetime(date) - last_modified).total_seconds())
    except (TypeError, ValueError):
        return None


def open_azblob_store(url: str) -> SharedStore:
    """``azblob://ACCOUNT/CONTAINER/BLOB[?endpoint=..&auth=..&lock_ttl=..&...]``; no I/O.

    Validates the URL (ConfigError naming ``daemon.state`` and the culprit);
    registered as the ``azblob`` store in :mod:`keymgr.plugins`.
    """
    account, container, blob, o = _store_params(url)
    connection = parse_connection(o, endpoint_option="endpoint", account=account,
                                  absolute_paths=True)
    lock_ttl = o.number("lock_ttl", DEFAULT_LOCK_TTL, _MIN_LOCK_TTL, _MAX_LOCK_TTL)
    adapter = AzureBlobAdapter(account, container, blob, connection)
    return SharedStore(adapter, url=url, lock_ttl=lock_ttl)
