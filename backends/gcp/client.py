# google-cloud-storage ships no type information (no py.typed); its objects are Any here.
# mypy: disable-error-code="import-untyped"
"""Cloud Storage plumbing shared by the GCS publisher and the ``gs://`` state store.

The Google Cloud SDK (google-cloud-storage, google-auth, requests) is imported
only when a configured component first needs a client, so ``keymgr --help``
and ``config check`` never pay for it. Here: where and how to reach Cloud
Storage (:class:`GCSConnection`), the lazily created client with keymgr's own
retries (:class:`LazyGCS`), one-line failure reasons with credentials scrubbed
(:func:`gcs_reason`), and bucket and object names.

Credentials are always Application Default Credentials (``google.auth.default``:
``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``,
workload identity, the metadata server); keymgr has no option to put a secret in
its config. With ``STORAGE_EMULATOR_HOST`` set, the library talks to that
emulator with anonymous credentials and no project, as it documents.

Retries are keymgr's, not the library's: every call is made with ``retry=None``
and retried here on transient failures (connection errors, timeouts, HTTP 408,
429, 5xx) up to ``max_attempts`` with jittered exponential backoff, so a caller
knows whether a conditional write was sent more than once (the state store
then tells its own landed write from another writer's, see ``store.py``).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from keymgr.docstore import widen_pools
from keymgr.errors import ConfigError
from keymgr.options import Options

T = TypeVar("T")

# --------------------------------------------------------------------------- connection

#: Options every Cloud Storage component accepts (the publisher and the state store).
GCS_CONNECTION_OPTIONS = frozenset(
    {"endpoint_url", "connect_timeout", "read_timeout", "max_attempts"}
)

_MAX_TIMEOUT = 300.0
_MAX_ATTEMPTS = 20
#: HTTP statuses worth another attempt (Google's retry guidance for Cloud Storage).
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Backoff between attempts: ``uniform(0, min(cap, base * 2**n))`` (full jitter).
_BACKOFF_BASE, _BACKOFF_CAP = 0.25, 4.0
_REASON_MAX = 240


@dataclass(frozen=True)
class GCSConnection:
    """Where and how to reach Cloud Storage; creates clients lazily.

    ``endpoint_url`` None: the library's own choice (``STORAGE_EMULATOR_HOST``,
    then ``API_ENDPOINT_OVERRIDE``, then ``https://storage.googleapis.com``); a
    value set in keymgr's config wins over the environment (a Private Service
    Connect endpoint, say). Timeouts are per request; ``max_attempts`` counts
    the first try.
    """

    endpoint_url: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_attempts: int = 5

    @property
    def timeout(self) -> tuple[float, float]:
        """``(connect, read)`` as the library (requests) takes it."""
        return (self.connect_timeout, self.read_timeout)

    def client(self) -> Any:
        """A new ``google.cloud.storage.Client``; credential errors propagate.

        ``project=None``: object operations need no project, and naming none
        spares the library a lookup (and the metadata server a request) at
        start-up. The library's bucket-metadata cache is switched off: since
        google-cloud-storage 3.x it fetches each bucket's metadata in a
        background thread on first use (``storage.buckets.get``), a permission
        keymgr's role does not grant and a request keymgr does not need.
        """
        try:
            from google.api_core import client_info
            from google.cloud import storage
        except ImportError:
            raise SDKMissing(
                "google-cloud-storage is not installed (pip install 'keymgr[gcp]')"
            ) from None

        options = {"api_endpoint": self.endpoint_url} if self.endpoint_url else None
        make_info: Any = client_info.ClientInfo  # untyped constructor
        client = storage.Client(
            project=None, client_options=options, client_info=make_info(user_agent="keymgr")
        )
        client._bucket_metadata_cache = None
        # The library's AuthorizedSession, made now with its defaults (10
        # connections): a store reads 16 documents at once.
        widen_pools(client._http)
        return client


def parse_connection(o: Options) -> GCSConnection:
    """Validate the connection options (errors name ``o.field(...)``). No I/O."""
    endpoint = o.string("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise o.err(
                "endpoint_url",
                f"expected an http(s) URL like 'https://storage.googleapis.com', got {endpoint!r}",
            )
    return GCSConnection(
        endpoint_url=endpoint,
        connect_timeout=o.number("connect_timeout", 5, 0.1, _MAX_TIMEOUT),
        read_timeout=o.number("read_timeout", 10, 0.1, _MAX_TIMEOUT),
        max_attempts=o.integer("max_attempts", 5, 1, _MAX_ATTEMPTS),
    )


# --------------------------------------------------------------------------- errors


class SDKMissing(Exception):
    """google-cloud-storage (the ``gcp`` extra) is not installed."""


class CallFailed(Exception):
    """A Cloud Storage call that failed for good: the last exception, and how many tries."""

    def __init__(self, exc: BaseException, attempts: int) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.attempts = attempts

    @property
    def status(self) -> int | None:
        """The HTTP status of the answer (None: no answer at all)."""
        return http_status(self.exc)

    @property
    def retried(self) -> bool:
        return self.attempts > 1

    def reason(self) -> str:
        return gcs_reason(self.exc, self.attempts)


def gcs_errors() -> tuple[type[BaseException], ...]:
    """What a Cloud Storage call can fail with, other than a bug of ours."""
    import requests
    from google.api_core.exceptions import GoogleAPICallError
    from google.auth.exceptions import GoogleAuthError
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    return (
        GoogleAPICallError,
        GoogleAuthError,
        requests.RequestException,
        DataCorruption,
        InvalidResponse,
        ConnectionError,
        TimeoutError,
    )


def http_status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def transient(exc: BaseException) -> bool:
    """Worth another attempt: no answer, a timeout, a throttle or a server error."""
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUSES
    # No answer at all (refused, reset, timed out, a cut download, a token
    # fetch that failed) is worth another try; a credential that is missing or
    # was rejected gives the same answer next time.
    return type(exc).__name__ not in (
        "DefaultCredentialsError", "RefreshError", "MutualTLSChannelError"
    )


#: Secrets a server, a proxy or a library might echo into a message.
_SECRETS = [
    (re.compile(r"-----BEGIN [A-Z ]+-----.*?(?:-----END [A-Z ]+-----|$)", re.S), "[redacted]"),
    (
        re.compile(
            r"(?i)\b(access_token|refresh_token|id_token|client_secret|private_key(?:_id)?"
            r"|assertion|x-goog-signature|x-goog-credential|signature)"
            r"(['\"]?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,&'\"}]+)"
        ),
        r"\1\2[redacted]",
    ),
    (re.compile(r"ya29\.[A-Za-z0-9._~+/=-]+"), "[redacted]"),  # OAuth 2.0 access tokens
    (re.compile(r"1//[A-Za-z0-9._~+/=-]{20,}"), "[redacted]"),  # refresh tokens
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[redacted]"),  # JWTs
]
_HOST_PORT_RE = re.compile(r"host='([^']+)', port=(\d+)")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_API_PREFIX_RE = re.compile(r"^(?:GET|POST|PUT|PATCH|DELETE|HEAD) \S+: ")
_NO_ADC = (
    "no Google credentials found (Application Default Credentials: "
    "GOOGLE_APPLICATION_CREDENTIALS, gcloud auth application-default login, "
    "workload identity or the metadata server)"
)


def scrub(text: str) -> str:
    """``text`` on one line, without anything that looks like a credential, shortened."""
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    text = " ".join(text.split())
    if len(text) > _REASON_MAX:
        text = text[: _REASON_MAX - 1] + "…"
    return text


def gcs_reason(exc: BaseException, attempts: int = 1) -> str:
    """A short, single-line reason for a failed Cloud Storage call, without secrets.

    An HTTP error: ``HTTP 403: <the service's message>``; no answer: what
    happened (``cannot connect to HOST:PORT (Connection refused)``, ``no answer
    within 10s (read timeout)``); credentials: what to set up. Anything that
    looks like a token, a key or a signature is redacted in every case.
    """
    status = http_status(exc)
    name = type(exc).__name__
    if status is not None:
        text = f"HTTP {status}: {_api_message(exc)}"
    elif isinstance(exc, SDKMissing):
        text = str(exc)
    elif name == "DefaultCredentialsError":
        raw = str(exc)
        text = _NO_ADC if "credentials were not found" in raw else f"credentials: {raw}"
    elif name == "RefreshError":
        text = f"credentials refresh failed: {_first_arg(exc)}"
    elif name in ("ReadTimeout", "Timeout") or isinstance(exc, TimeoutError):
        text = "no answer in time (read timeout; service unreachable)"
    elif name in ("ConnectTimeout", "ConnectTimeoutError"):
        text = f"cannot connect{_where(exc)} in time (connect timeout; service unreachable)"
    elif name == "ConnectionError" or isinstance(exc, ConnectionError):
        raw = str(exc)
        errno = _ERRNO_RE.search(raw)
        why = errno.group(1).strip() if errno else _connection_why(raw)
        text = f"cannot connect{_where(exc)} ({why}; service unreachable)"
    elif name == "TransportError":
        text = f"credentials: cannot reach the token service ({_first_arg(exc)})"
    else:
        text = f"{name}: {_first_arg(exc)}" if str(exc) else name
    if attempts > 1:
        text += f" (after {attempts} attempts)"
    return scrub(text)


def _api_message(exc: BaseException) -> str:
    """The service's own message of an HTTP error, without the request line."""
    response = getattr(exc, "response", None)
    try:
        error = response.json().get("error", {})  # type: ignore[union-attr]
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str) and message.strip():
            return message
    except Exception:  # noqa: S110 - no JSON body: fall back to the exception's text
        pass
    message = str(getattr(exc, "message", "") or "")
    message = _API_PREFIX_RE.sub("", message.split("\n", 1)[0]).strip()
    return message or type(exc).__name__


def bucket_missing(exc: BaseException) -> bool:
    """A 404 that is about the bucket ("The specified bucket does not exist.")."""
    return http_status(exc) == 404 and "bucket does not exist" in _api_message(exc).lower()


def _first_arg(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    first = args[0] if args else exc
    return str(first).split("\n", 1)[0]


def _where(exc: BaseException) -> str:
    found = _HOST_PORT_RE.search(str(exc))
    return f" to {found.group(1)}:{found.group(2)}" if found else ""


def _connection_why(raw: str) -> str:
    for known in ("Connection refused", "Connection reset", "Connection aborted",
                  "Name or service not known", "Remote end closed connection"):
        if known.lower() in raw.lower():
            return known
    return "connection failed"


# --------------------------------------------------------------------------- names

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_IPV4_RE = re.compile(r"\d+\.\d+\.\d+\.\d+")


def check_bucket(bucket: Any, field: str) -> str:
    """A Cloud Storage bucket name (3-63 characters, or up to 222 with dots)."""
    what = f"{field}: expected a Cloud Storage bucket name, got {bucket!r}"
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket):
        raise ConfigError(what)
    parts = bucket.split(".")
    too_long = len(bucket) > (222 if len(parts) > 1 else 63)
    if len(bucket) < 3 or too_long or any(not p or len(p) > 63 for p in parts):
        raise ConfigError(what)
    if bucket.startswith("goog") or "google" in bucket or _IPV4_RE.fullmatch(bucket):
        raise ConfigError(what)
    return bucket


def check_object(name: Any, field: str, reserve: int = 0) -> str:
    """A Cloud Storage object name; ``reserve`` bytes are kept free for suffixes."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{field}: expected a non-empty object name, got {name!r}")
    if name.startswith("/"):
        raise ConfigError(
            f"{field}: object names do not start with '/' (write {name.lstrip('/')!r})"
        )
    if "\r" in name or "\n" in name or name in (".", ".."):
        raise ConfigError(f"{field}: not a valid Cloud Storage object name: {name!r}")
    if len(name.encode("utf-8")) + reserve > 1024:
        raise ConfigError(f"{field}: object name too long")
    return name


# --------------------------------------------------------------------------- the client


class LazyGCS:
    """The Cloud Storage client of a publisher or store, created on first use.

    Not at construction: ``config check`` and ``--help`` must never import the
    SDK nor touch the network (``google.auth.default`` may ask the metadata
    server); a failure to create it (no credentials) is then reported like any
    other request failure of that component. One client serves every thread:
    the library's HTTP session pools connections across threads. Each thread's
    last response ``Date`` header is kept for :meth:`server_date` (the store
    measures a document's age on the server's clock).
    """

    connection: GCSConnection
    _lock: threading.Lock
    _client: Any
    _seen: threading.local

    def _init_client(self, connection: GCSConnection) -> None:
        self.connection = connection
        self._lock = threading.Lock()
        self._client = None
        self._seen = threading.local()

    def _error(self, operation: str, failed: CallFailed) -> Exception:
        raise NotImplementedError

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    client = self.connection.client()
                    client._http.hooks["response"].append(self._on_response)
                except SDKMissing as e:  # before gcs_errors(), which imports the SDK
                    raise self._error("create client", CallFailed(e, 1)) from None
                except gcs_errors() as e:
                    raise self._error("create client", CallFailed(e, 1)) from None
                self._client = client
            return self._client

    def _on_response(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self._seen.date = response.headers.get("Date")

    def server_date(self) -> str | None:
        """The ``Date`` header of this thread's last response (None: none, or no header)."""
        return getattr(self._seen, "date", None)

    def bucket(self, name: str) -> Any:
        """A ``Bucket`` handle (no request)."""
        return self.client.bucket(name)

    def metadata(self, bucket: str, name: str) -> Any | None:
        """The object's metadata (``objects.get``) as a ``Blob``; None: no such object.

        Raises :class:`CallFailed`, also for a missing *bucket*: Cloud Storage
        answers 404 for both, and says which in its message, so a mistyped
        bucket is an error rather than an empty state or an unpublished JWKS.
        """
        blob = self.bucket(bucket).blob(name)
        timeout = self.connection.timeout
        try:
            self.call(lambda: blob.reload(timeout=timeout, retry=None))
        except CallFailed as e:
            if e.status == 404 and not bucket_missing(e.exc):
                return None
            raise
        return blob

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, tried up to ``max_attempts`` times while it fails transiently.

        Raises :class:`CallFailed` with the last exception and the number of
        attempts; the caller decides what a status means (404, 412, ...).
        """
        errors = gcs_errors()
        attempt = 1
        while True:
            self._seen.date = None
            try:
                return fn()
            except errors as e:
                if attempt >= self.connection.max_attempts or not transient(e):
                    raise CallFailed(e, attempt) from None
            cap = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (attempt - 1))
            time.sleep(random.uniform(0.0, cap))  # noqa: S311 - jitter, not crypto
            attempt += 1
