"""S3 as a :class:`~keymgr.docstore.DocumentAdapter`: ``s3://BUCKET/KEY`` state.

The three documents are ``KEY`` (state), ``KEY.lock`` and ``KEY.lease``, each
written by conditional PutObject: ``If-None-Match: *`` creates, ``If-Match:
ETAG`` replaces, DeleteObject ``If-Match: ETAG`` deletes. The age of a
document is S3's own clock: the response's ``Date`` header minus the
object's ``LastModified``. Messages and operation names are those the S3
store of the previous release gave; :func:`open_s3_store` puts this adapter
under :class:`keymgr.docstore.SharedStore`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from keymgr.docstore import STATE, Blob, DocumentAdapter, SharedStore
from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.options import Options

from .client import (
    AWS_CONNECTION_OPTIONS,
    CONFLICT_CODES,
    MISSING_CODES,
    AWSConnection,
    LazyS3,
    _retried,
    aws_error_code,
    aws_errors,
    aws_reason,
    check_bucket,
    check_key,
    parse_connection,
    read_body,
)

__all__ = ["S3Adapter", "open_s3_store"]

# --------------------------------------------------------------------------- the URL


_STORE_PARAMS = frozenset(AWS_CONNECTION_OPTIONS | {"lock_ttl", "audit_retention", "audit_lock"})
#: S3 Object Lock modes for the audit objects (``audit_lock``).
AUDIT_LOCK_MODES = ("governance", "compliance")
DEFAULT_LOCK_TTL = 30.0
_MIN_LOCK_TTL, _MAX_LOCK_TTL = 5, 3600


def _store_params(url: str) -> tuple[str, str, Options]:
    """Split and validate ``s3://BUCKET/KEY?params``: (bucket, key, options). No I/O.

    Raises ConfigError naming ``daemon.state`` (``daemon.state?NAME`` for a
    parameter) and the culprit.
    """
    where = "daemon.state"
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"{where}: expected s3://BUCKET/KEY, got {url!r}")
    bucket = check_bucket(parts.netloc, f"{where}: bucket of {url!r}")
    key = check_key(parts.path[1:], f"{where}: object key of {url!r}")
    if parts.fragment:
        raise ConfigError(f"{where}: {url!r}: unexpected '#' fragment")
    return bucket, key, Options.query(parts.query, where, _STORE_PARAMS)


class S3Adapter(LazyS3, DocumentAdapter):
    """``KEY``, ``KEY.lock``, ``KEY.lease`` in one bucket, by conditional requests."""

    #: Shards read and written at once (a round trip each; the client is
    #: thread-safe): keymgr.docstore.DocumentAdapter.concurrency.
    concurrency = 16

    def __init__(
        self,
        bucket: str,
        key: str,
        connection: AWSConnection | None = None,
        audit_lock: tuple[str, timedelta] | None = None,
    ) -> None:
        self.bucket, self.key = bucket, key
        self.connection = connection or AWSConnection()
        #: (mode, retention): S3 Object Lock on every audit event created
        #: (``audit/...``, keymgr.auditstore), so that not even keymgr's own
        #: credentials can delete or overwrite one before it expires.
        self.audit_lock = audit_lock
        self._lock = threading.Lock()
        self._client: Any = None

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _key(self, name: str) -> str:
        return self.key if name == STATE else f"{self.key}.{name}"

    def _op(self, op: str, name: str) -> str:
        """``PutObject`` for the state, ``PutObject KEY.lock (lock)`` for the others."""
        return op if name == STATE else f"{op} {self._key(name)} ({name})"

    def _error(self, operation: str, exc: BaseException) -> StoreError:
        return StoreError(f"state {self.location}: {operation}: {aws_reason(exc)}")

    def read(self, name: str) -> Blob | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            data = read_body(resp, functools.partial(self.check_size, name))
        except aws_errors() as e:
            if aws_error_code(e) in MISSING_CODES:
                return None
            raise self._error(self._op("GetObject", name), e) from None
        return Blob(data, str(resp["ETag"]), _age(resp))

    def create(self, name: str, data: bytes) -> object:
        extra: dict[str, Any] = {"IfNoneMatch": "*"}
        if self.audit_lock is not None and name.startswith("audit/"):
            mode, keep = self.audit_lock
            # Retention runs from this machine's clock: S3 only needs it in
            # the future, and a skew of minutes is nothing against days.
            extra["ObjectLockMode"] = mode.upper()
            extra["ObjectLockRetainUntilDate"] = datetime.now(UTC) + keep
            extra["ChecksumAlgorithm"] = "SHA256"  # S3 wants a checksum on locked PUTs
        return self._put(name, data, extra)

    def replace(self, name: str, data: bytes, version: object) -> object:
        return self._put(name, data, {"IfMatch": str(version)})

    def _put(self, name: str, data: bytes, condition: dict[str, Any]) -> str:
        try:
            resp = self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(name),
                Body=data,
                ContentType="application/json",
                **condition,
            )
        except aws_errors() as e:
            code = aws_error_code(e)
            if code not in CONFLICT_CODES and code not in MISSING_CODES:
                raise self._error(self._op("PutObject", name), e) from None
            # A request botocore retried after a timeout may have landed on
            # the first attempt and then lost to itself: if the object now
            # holds exactly our bytes (the store makes every write unique),
            # the write is ours. A conflict on the first attempt is always real.
            mine = self._current_if_equal(name, data) if _retried(e) else None
            if mine is None:
                raise ConflictError(
                    f"state {self.location}: {self._op('PutObject', name)}: {code}"
                ) from None
            return mine
        return str(resp["ETag"])

    def _current_if_equal(self, name: str, data: bytes) -> str | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            if resp["Body"].read() == data:
                return str(resp["ETag"])
        except aws_errors():
            pass
        return None

    def delete(self, name: str, version: object) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name), IfMatch=str(version))
        except aws_errors() as e:
            code = aws_error_code(e)
            if code in MISSING_CODES:
                return
            if code in CONFLICT_CODES:
                raise ConflictError(
                    f"state {self.location}: {self._op('DeleteObject', name)}: {code}"
                ) from None
            raise self._error(self._op("DeleteObject", name), e) from None

    def version(self, name: str) -> object | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except aws_errors() as e:
            if aws_error_code(e) in MISSING_CODES:
                return None
            raise self._error(self._op("HeadObject", name), e) from None
        return str(head["ETag"])

    def names(self, family: str) -> list[tuple[str, float | None]] | None:
        """``FAMILY/LEAF`` objects by ListObjectsV2 on ``KEY.FAMILY/``, with their
        age on S3's clock (each page's Date header minus LastModified); for the
        sweep of orphaned state shards (keymgr.docstore.StateLayout.sweep)."""
        prefix = f"{self.key}.{family}/"
        out: list[tuple[str, float | None]] = []
        token: str | None = None
        try:
            while True:
                more = {"ContinuationToken": token} if token else {}
                resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **more)
                for obj in resp.get("Contents", []):
                    leaf = str(obj["Key"])[len(prefix) :]
                    age = _age({**resp, "LastModified": obj["LastModified"]})
                    out.append((f"{family}/{leaf}", age))
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    return out
        except aws_errors() as e:
            raise self._error(f"ListObjectsV2 {prefix}", e) from None

    def __repr__(self) -> str:
        return f"S3Adapter({self.location!r})"


def _age(resp: Mapping[str, Any]) -> float | None:
    """Seconds since the object was written, on S3's clock (its Date header vs LastModified)."""
    try:
        server_now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
        return float((server_now - resp["LastModified"]).total_seconds())
    except (KeyError, TypeError, ValueError):
        return None


def open_s3_store(url: str) -> SharedStore:
    """``s3://BUCKET/KEY[?region=..&endpoint_url=..&profile=..&lock_ttl=..&...]``; no I/O.

    Validates the URL with :func:`_store_params` (ConfigError naming
    ``daemon.state`` and the culprit); registered as the ``s3`` store in :mod:`keymgr.plugins`.
    """
    bucket, key, o = _store_params(url)
    lock_ttl = o.number("lock_ttl", DEFAULT_LOCK_TTL, _MIN_LOCK_TTL, _MAX_LOCK_TTL)
    adapter = S3Adapter(bucket, key, parse_connection(o), _audit_lock(o))
    return SharedStore(adapter, url=url, lock_ttl=lock_ttl)


def _audit_lock(o: Options) -> tuple[str, timedelta] | None:
    """``audit_retention=400d[&audit_lock=governance|compliance]``: Object Lock
    on the audit objects (docs/audit.md#object-lock); None without it."""
    from keymgr.timefmt import parse_duration

    text = o.string("audit_retention")
    mode = o.choice("audit_lock", "governance", AUDIT_LOCK_MODES)
    if text is None:
        if "audit_lock" in o:
            raise o.err("audit_lock", "needs audit_retention (e.g. audit_retention=400d)")
        return None
    try:
        keep = parse_duration(text)
    except ValueError:
        raise o.err("audit_retention", f"expected a duration such as 400d, got {text!r}") from None
    if not timedelta(days=1) <= keep <= timedelta(days=36500):
        raise o.err("audit_retention", f"must be between 1d and 36500d, got {text!r}")
    return mode, keep
