"""The JWKS as one Cloud Storage object, typically behind Cloud CDN: publisher ``type = "gcs"``.

Every upload carries ``Content-Type: application/json`` and the configured
``Cache-Control`` as the object's metadata; :meth:`GCSPublisher.fetch` reads
back the object's metadata and then the body *of that same generation*, so a
publish only counts once Cloud Storage holds exactly the document meant,
headers included.

Why the metadata and not the headers of a download: the object's
``contentType`` and ``cacheControl`` are what Cloud Storage serves to public
readers and to a CDN, while the headers of an authenticated JSON API download
are not guaranteed to repeat them. Body and metadata are tied together by the
generation: the body is downloaded with ``generation=G`` of the metadata read,
and if the object was replaced in between the pair is read again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from keymgr.errors import PublishError
from keymgr.options import Options
from keymgr.publishers import Publisher, Served, check_size

from .client import (
    GCS_CONNECTION_OPTIONS,
    CallFailed,
    LazyGCS,
    check_bucket,
    check_object,
    parse_connection,
)

__all__ = ["CONTENT_TYPE", "DEFAULT_CACHE_CONTROL", "GCSPublisher"]

_PUBLISHER_FIELDS = frozenset(
    {"type", "bucket", "object", "cache_control"} | GCS_CONNECTION_OPTIONS
)
DEFAULT_CACHE_CONTROL = "public, max-age=300"
CONTENT_TYPE = "application/json"
#: How often fetch() reads metadata and body again when the object changes in between.
_READ_ROUNDS = 3


class GCSPublisher(LazyGCS, Publisher):
    """The JWKS as one Cloud Storage object (typically behind Cloud CDN): ``type = "gcs"``."""

    #: Cache-Control is object metadata, set with each upload ("auto" per document).
    headers_per_document: ClassVar[bool] = True
    type_name: ClassVar[str] = "gcs"

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        o = Options(options, f"publishers.{name}", _PUBLISHER_FIELDS)
        self.bucket_name = check_bucket(o.required("bucket"), o.field("bucket"))
        self.object_name = check_object(
            o.required("object", "e.g. '.well-known/jwks.json'"), o.field("object")
        )
        cc = o.string("cache_control", DEFAULT_CACHE_CONTROL)
        if cc is None or "\n" in cc or "\r" in cc:
            raise o.err("cache_control", "expected a Cache-Control header value")
        #: Set as the object's Cache-Control with every upload; verifiers and CDNs
        #: cache the JWKS this long, so a ring's publish_ahead should cover its
        #: max-age (keymgr.config warns when it does not).
        self.cache_control: str = cc
        self._init_client(parse_connection(o))

    @property
    def url(self) -> str:
        return f"gs://{self.bucket_name}/{self.object_name}"

    @property
    def where(self) -> str:
        return f"publisher {self.name}: {self.url}"

    def _error(self, operation: str, failed: CallFailed) -> PublishError:
        return PublishError(f"{self.where}: {operation}: {failed.reason()}")

    def headers(self) -> dict[str, str]:
        return {"Content-Type": CONTENT_TYPE, "Cache-Control": self.cache_control}

    def _get(self) -> tuple[bytes, dict[str, str]] | None:
        """The object's body and the headers keymgr sets, or None when there is none."""
        bucket = self.bucket(self.bucket_name)
        timeout = self.connection.timeout
        for _ in range(_READ_ROUNDS):
            try:
                meta = self.metadata(self.bucket_name, self.object_name)
            except CallFailed as e:
                raise self._error("objects.get", e) from None
            if meta is None:
                return None
            check_size(self.where, meta.size)
            pinned = bucket.blob(self.object_name, generation=meta.generation)
            try:
                data: bytes = self.call(
                    lambda: pinned.download_as_bytes(timeout=timeout, retry=None)  # noqa: B023
                )
            except CallFailed as e:
                if e.status == 404:
                    continue  # replaced between the two requests: read the new one
                raise self._error("objects.get alt=media", e) from None
            served = {"Content-Type": meta.content_type, "Cache-Control": meta.cache_control}
            return data, {k: v for k, v in served.items() if v is not None}
        raise PublishError(
            f"{self.where}: read-back: the object changed during every one of "
            f"{_READ_ROUNDS} reads"
        )

    def read(self) -> bytes | None:
        got = self._get()
        return None if got is None else got[0]

    def fetch(self) -> Served | None:
        """The object and the headers keymgr sets, as Cloud Storage holds them.

        Unchanged body *and* headers: no upload. A changed ``cache_control``
        reaches the object even when the keys did not change, and an object
        whose metadata was edited out of band counts as a different document.
        """
        got = self._get()
        return None if got is None else Served(*got)

    def write(self, data: bytes) -> None:
        bucket = self.bucket(self.bucket_name)
        timeout = self.connection.timeout

        def upload() -> None:
            # A new Blob per attempt: an upload that failed half-way leaves
            # nothing behind in the object, and properties are set afresh.
            blob = bucket.blob(self.object_name)
            blob.cache_control = self.headers_for(data)["Cache-Control"]
            blob.upload_from_string(data, content_type=CONTENT_TYPE, timeout=timeout, retry=None)

        # Unconditional: publishing the same bytes twice is harmless, so a
        # retried upload needs no check of whose write landed.
        try:
            self.call(upload)
        except CallFailed as e:
            raise self._error("objects.insert", e) from None

    def __repr__(self) -> str:
        return f"GCSPublisher({self.name!r}, {self.url!r})"
