"""The JWKS as one S3 object, typically behind a CDN: publisher ``type = "s3"``.

Every upload carries ``Content-Type`` and the configured ``Cache-Control`` (and
server-side encryption when asked); :meth:`S3Publisher.fetch` reads back the
body and those headers in one GET, so a publish only counts once S3 serves
exactly the document meant, headers included. With ``discovery_key`` it also
uploads the OpenID Connect discovery document (:meth:`S3Publisher.sibling`),
the same way, to the same bucket.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from keymgr.errors import PublishError
from keymgr.options import Options
from keymgr.publishers import Publisher, Served, check_size

from .client import (
    AWS_CONNECTION_OPTIONS,
    MISSING_CODES,
    LazyS3,
    aws_error_code,
    aws_errors,
    aws_reason,
    check_bucket,
    check_key,
    parse_connection,
    read_body,
)

_SSE_VALUES = ("AES256", "aws:kms")
_PUBLISHER_FIELDS = frozenset(
    {"type", "bucket", "key", "cache_control", "sse", "sse_kms_key_id", "discovery_key"}
    | AWS_CONNECTION_OPTIONS
)
DEFAULT_CACHE_CONTROL = "public, max-age=300"
CONTENT_TYPE = "application/json"


class S3Publisher(LazyS3, Publisher):
    """The JWKS as one S3 object (typically behind a CDN): ``type = "s3"``."""

    type_name: ClassVar[str] = "s3"
    supports_documents: ClassVar[bool] = True
    document_options: ClassVar[Mapping[str, str]] = {"openid-configuration": "discovery_key"}
    #: Cache-Control is object metadata, set with each upload.
    headers_per_document: ClassVar[bool] = True

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        o = Options(options, f"publishers.{name}", _PUBLISHER_FIELDS)
        self.bucket = check_bucket(o.required("bucket"), o.field("bucket"))
        self.key = check_key(o.required("key", "e.g. '.well-known/jwks.json'"), o.field("key"))
        discovery = o.string("discovery_key")
        if discovery is not None:
            discovery = check_key(discovery, o.field("discovery_key"))
            if discovery == self.key:
                raise o.err("discovery_key", "must differ from key (the JWKS)")
        #: Where the OpenID Connect discovery document goes, in the same bucket.
        self.discovery_key: str | None = discovery
        cc = o.string("cache_control", DEFAULT_CACHE_CONTROL)
        if cc is None or "\n" in cc or "\r" in cc:
            raise o.err("cache_control", "expected a Cache-Control header value")
        #: Sent as Cache-Control with every upload; verifiers and CDNs cache the
        #: JWKS this long, so a ring's publish_ahead should cover its max-age
        #: (keymgr.config warns when it does not).
        self.cache_control: str = cc
        sse = o.raw("sse")
        if sse is not None:
            sse = o.choice("sse", "", _SSE_VALUES)
        kms_key = o.string("sse_kms_key_id")
        if kms_key is not None and sse != "aws:kms":
            raise o.err("sse_kms_key_id", "only valid with sse = 'aws:kms'")
        self.sse: str | None = sse
        self.sse_kms_key_id: str | None = kms_key
        self.connection = parse_connection(o)
        self._lock = threading.Lock()
        self._client: Any = None

    def sibling(self, document: str) -> S3Publisher | None:
        """The discovery document's object: same bucket, headers and connection settings."""
        if document != "openid-configuration" or self.discovery_key is None:
            return None
        other = copy.copy(self)
        other.key, other.discovery_key = self.discovery_key, None
        return other

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def where(self) -> str:
        return f"publisher {self.name}: {self.url}"

    def _error(self, operation: str, exc: BaseException) -> PublishError:
        return PublishError(f"publisher {self.name}: {self.url}: {operation}: {aws_reason(exc)}")

    def _get(self) -> tuple[bytes, dict[str, str | None]] | None:
        """The served body and the headers keymgr sets, or None when there is no object."""
        client = self.client
        try:
            resp = client.get_object(Bucket=self.bucket, Key=self.key)
            data = read_body(resp, functools.partial(check_size, self.where))
        except aws_errors() as e:
            if aws_error_code(e) in MISSING_CODES:
                return None
            raise self._error("GetObject", e) from None
        headers = {
            "Content-Type": resp.get("ContentType"),
            "Cache-Control": resp.get("CacheControl"),
            "SSE": resp.get("ServerSideEncryption"),
        }
        return data, headers

    def _wrong_headers(self, headers: Mapping[str, str | None]) -> list[str]:
        """What differs from the configured headers, e.g. ``Cache-Control 'x'``."""
        want: dict[str, str | None] = {
            "Content-Type": CONTENT_TYPE,
            "Cache-Control": self.cache_control,
        }
        if self.sse is not None:
            want["SSE"] = self.sse
        return [f"{k} {headers.get(k)!r}" for k, v in want.items() if headers.get(k) != v]

    def headers(self) -> dict[str, str]:
        want = {"Content-Type": CONTENT_TYPE}
        if self.cache_control is not None:
            want["Cache-Control"] = self.cache_control
        if self.sse is not None:
            want["SSE"] = self.sse
        return want

    def read(self) -> bytes | None:
        got = self._get()
        return None if got is None else got[0]

    def fetch(self) -> Served | None:
        """The object and the headers keymgr sets, as S3 serves them (one GET).

        Unchanged body *and* headers: no upload. A changed ``cache_control``
        reaches the object even when the keys did not change, and an object
        whose headers were edited out of band counts as a different document.
        """
        got = self._get()
        if got is None:
            return None
        data, served = got
        names = set(self.headers()) | {"Content-Type", "Cache-Control"}
        return Served(data, {k: v for k in names if (v := served.get(k)) is not None})

    def write(self, data: bytes) -> None:
        client = self.client
        extra: dict[str, str] = {}
        if self.sse is not None:
            extra["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id is not None:
            extra["SSEKMSKeyId"] = self.sse_kms_key_id
        try:
            client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=data,
                ContentType=CONTENT_TYPE,
                CacheControl=self.headers_for(data)["Cache-Control"],
                **extra,
            )
        except aws_errors() as e:
            raise self._error("PutObject", e) from None

    def __repr__(self) -> str:
        return f"S3Publisher({self.name!r}, {self.url!r})"
