"""The JWKS as one Azure blob, typically behind Azure Front Door or a CDN: ``type = "azblob"``.

Every upload (Put Blob) carries ``Content-Type: application/json`` and the
configured ``Cache-Control`` (stored as the blob's properties, which the blob
service then serves as those headers); :meth:`AzureBlobPublisher.fetch` reads
back the body and both headers in one Get Blob, so a publish only counts once
the blob service serves exactly the document meant, headers included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from keymgr.errors import PublishError
from keymgr.options import Options
from keymgr.publishers import Publisher, Served, check_size

from .client import (
    CONNECTION_OPTIONS,
    REFUSED_LITERALS,
    Attempts,
    BlobAccess,
    azure_errors,
    check_blob,
    check_container,
    error_code,
    parse_connection,
    sdk,
)

_PUBLISHER_FIELDS = frozenset(
    {"type", "account_url", "container", "blob", "cache_control"} | CONNECTION_OPTIONS
)
DEFAULT_CACHE_CONTROL = "public, max-age=300"
CONTENT_TYPE = "application/json"


class AzureBlobPublisher(Publisher):
    """The JWKS as one blob in an Azure Storage container: ``type = "azblob"``."""

    #: Cache-Control is object metadata, set with each upload ("auto" per document).
    headers_per_document: ClassVar[bool] = True
    type_name: ClassVar[str] = "azblob"

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        o = Options(
            options, f"publishers.{name}", _PUBLISHER_FIELDS, config_dir=config_dir,
            hidden=REFUSED_LITERALS,
        )  # fmt: skip
        self.container = check_container(o.required("container"), o.field("container"))
        self.blob = check_blob(
            o.required("blob", "e.g. '.well-known/jwks.json'"), o.field("blob")
        )
        cc = o.string("cache_control", DEFAULT_CACHE_CONTROL)
        if cc is None or "\n" in cc or "\r" in cc:
            raise o.err("cache_control", "expected a Cache-Control header value")
        #: Stored as the blob's Cache-Control with every upload; verifiers and
        #: CDNs cache the JWKS this long, so a ring's publish_ahead should cover
        #: its max-age (keymgr.config warns when it does not).
        self.cache_control: str = cc
        self.connection = parse_connection(o, endpoint_option="account_url", account=None)
        self.access = BlobAccess(self.connection, self.container)

    @property
    def url(self) -> str:
        """``azblob://ACCOUNT/CONTAINER/BLOB``; ``azblob:CONTAINER/BLOB`` while the
        account is known only to the connection string (not read before first use)."""
        account = self.connection.account
        if account is None:
            return f"azblob:{self.container}/{self.blob}"
        return f"azblob://{account}/{self.container}/{self.blob}"

    @property
    def where(self) -> str:
        return f"publisher {self.name}: {self.url}"

    def _error(self, operation: str, exc: BaseException, attempts: int = 1) -> PublishError:
        self.access.failed(exc)
        return PublishError(f"{self.where}: {operation}: {self.access.reason(exc, attempts)}")

    def headers(self) -> dict[str, str]:
        return {"Content-Type": CONTENT_TYPE, "Cache-Control": self.cache_control}

    def _get(self) -> tuple[bytes, dict[str, str]] | None:
        """The served body and the headers keymgr sets, or None when there is no blob."""
        attempts = Attempts()
        try:
            download = self.access.handle(self.blob).download_blob(retry_hook=attempts)
            check_size(self.where, download.properties.size)
            data: bytes = download.readall()
        except azure_errors() as e:
            if error_code(e) == "BlobNotFound":
                return None
            raise self._error("GetBlob", e, attempts.count) from None
        settings = download.properties.content_settings
        served = {"Content-Type": settings.content_type, "Cache-Control": settings.cache_control}
        return data, {k: v for k, v in served.items() if v is not None}

    def read(self) -> bytes | None:
        got = self._get()
        return None if got is None else got[0]

    def fetch(self) -> Served | None:
        """The blob and the headers keymgr sets, as the blob service serves them (one GET).

        Unchanged body *and* headers: no upload. A changed ``cache_control``
        reaches the blob even when the keys did not change, and a blob whose
        properties were edited out of band counts as a different document.
        """
        got = self._get()
        return None if got is None else Served(*got)

    def write(self, data: bytes) -> None:
        attempts = Attempts()
        try:
            settings = sdk().ContentSettings(
                content_type=CONTENT_TYPE, cache_control=self.headers_for(data)["Cache-Control"]
            )
            self.access.handle(self.blob).upload_blob(
                data, overwrite=True, content_settings=settings, retry_hook=attempts
            )
        except azure_errors() as e:
            raise self._error("PutBlob", e, attempts.count) from None

    def __repr__(self) -> str:
        return f"AzureBlobPublisher({self.name!r}, {self.url!r})"
