"""Azure Blob Storage plumbing shared by the ``azblob`` publisher and the ``azblob://`` store.

The Azure SDK (``azure-storage-blob``, and ``azure-identity`` for
``DefaultAzureCredential``) is imported only when a configured component
first needs a client, so ``keymgr --help`` and ``config check`` never pay for
it, and a deployment that authenticates by connection string never imports
``azure-identity`` at all.

Credentials (``auth``), never from keymgr's config literally:

- ``default``: ``azure.identity.DefaultAzureCredential`` (environment,
  workload identity, managed identity, Azure CLI, ...), with the endpoint
  given (``account_url`` / ``?endpoint=``) or ``https://ACCOUNT.blob.core.windows.net``;
- ``connection_string``: a storage connection string read, at client
  creation, from an environment variable (``AZURE_STORAGE_CONNECTION_STRING``
  unless ``connection_string_env`` names another) or from
  ``connection_string_file``, whose mode is checked like the file backend's
  master key (group and others may neither read nor write it).

A literal ``connection_string``, ``account_key`` or ``sas_token`` option is
refused. No message carries a credential: every reason is built from the
service's error code and the first line of its message, or from the transport
error's class, and scrubbed of every secret the client holds (the connection
string, its key, its SAS) and of any ``sig=`` it may echo. A 401 or 403
drops the client, so the next call reads the credential again (a rotated key
or a renewed SAS in the file is picked up without a restart).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keymgr.docstore import widen_pools
from keymgr.errors import ConfigError
from keymgr.options import Options

__all__ = [
    "CONNECTION_OPTIONS",
    "DEFAULT_CONNECTION_STRING_ENV",
    "REFUSED_LITERALS",
    "Attempts",
    "AzureConnection",
    "AzureSetupError",
    "BlobAccess",
    "azure_errors",
    "check_account",
    "check_blob",
    "check_container",
    "check_endpoint",
    "endpoint_account",
    "error_code",
    "parse_connection",
    "parse_connection_string",
    "sdk",
    "status_code",
]

#: Options every Azure Blob component accepts (the publisher's table, the store's URL).
CONNECTION_OPTIONS = frozenset(
    {
        "auth",
        "connection_string_env",
        "connection_string_file",
        "connect_timeout",
        "read_timeout",
        "max_attempts",
    }
)
#: Options that would put a credential into the config: refused with their own message.
REFUSED_LITERALS = ("connection_string", "account_key", "sas_token")
AUTH_METHODS = ("default", "connection_string")
DEFAULT_CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
DEFAULT_ENDPOINT_SUFFIX = "core.windows.net"

#: Azurite's development account (published in Azure's documentation), for
#: ``UseDevelopmentStorage=true`` connection strings.
DEV_ACCOUNT = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
DEV_BLOB_ENDPOINT = f"http://127.0.0.1:10000/{DEV_ACCOUNT}"

_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")
# 3-63 characters: lower-case letters, digits and single hyphens between them.
_CONTAINER_RE = re.compile(r"[a-z0-9](?:-?[a-z0-9])+")
_PART_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_ACCOUNT_RE = re.compile(r"([a-z0-9]{3,24})\.blob\.", re.IGNORECASE)
_MAX_BLOB_NAME = 1024
_MAX_TIMEOUT = 300.0
_MAX_ATTEMPTS = 20
_REASON_MAX = 240
_SIG_RE = re.compile(r"(?i)\b(sig|accountkey|sharedaccesssignature)=[^\s;&\"'<>]+")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\"()\]]+)")


class AzureSetupError(Exception):
    """A client cannot be made (credential source, connection string, SDK): a one-line reason."""


# --------------------------------------------------------------------------- names


def check_account(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _ACCOUNT_RE.fullmatch(value):
        raise ConfigError(
            f"{field}: expected a storage account name (3-24 lower-case letters and digits), "
            f"got {value!r}"
        )
    return value


def check_container(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 3 <= len(value) <= 63 or not _CONTAINER_RE.fullmatch(
        value
    ):
        raise ConfigError(
            f"{field}: expected a container name (3-63 lower-case letters, digits and single "
            f"hyphens), got {value!r}"
        )
    return value


def check_blob(value: Any, field: str, *, room: int = 0) -> str:
    """A blob name; ``room``: characters a suffix (``.lease``) will add."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: expected a non-empty blob name, got {value!r}")
    if value.startswith("/"):
        fixed = value.lstrip("/")
        raise ConfigError(f"{field}: blob names do not start with '/' (write {fixed!r})")
    if value.endswith((".", "/")):
        raise ConfigError(f"{field}: a blob name must not end with '.' or '/', got {value!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigError(f"{field}: control characters in blob name {value!r}")
    if len(value) + room > _MAX_BLOB_NAME:
        most = _MAX_BLOB_NAME - room
        raise ConfigError(f"{field}: blob name too long (at most {most} characters)")
    return value


def check_endpoint(value: str, field: str) -> str:
    """An http(s) blob service URL without credentials in it; trailing '/' dropped."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{field}: expected an http(s) URL like 'https://ACCOUNT.blob.core.windows.net', "
            f"got {value!r}"
        )
    if parts.query or parts.username or parts.password:
        # Not echoed: a SAS token or a password would be a secret in the config.
        raise ConfigError(
            f"{field}: must not carry a query or user info (a SAS token there would sit in the "
            "config file); use auth = 'connection_string' with a SharedAccessSignature"
        )
    if parts.fragment:
        raise ConfigError(f"{field}: unexpected '#' fragment in {value!r}")
    return value.rstrip("/")


def endpoint_account(endpoint: str) -> str | None:
    """The account an endpoint serves: ``ACCOUNT.blob.…``, or the first path segment
    of a path-style URL (Azurite, an IP address); None when it cannot tell (a custom domain)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    m = _HOST_ACCOUNT_RE.match(host)
    if m is not None:
        return m.group(1).lower()
    first = parts.path.strip("/").split("/", 1)[0]
    return first if _ACCOUNT_RE.fullmatch(first) else None


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class AzureConnection:
    """Where one Azure Blob component connects and how it authenticates (no secret in here)."""

    #: The blob service URL; None: from the connection string, else the account's default.
    endpoint: str | None = None
    #: The account messages name and a connection string must be for (None: unknown).
    account: str | None = None
    auth: str = "default"
    connection_string_env: str = DEFAULT_CONNECTION_STRING_ENV
    connection_string_file: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_attempts: int = 5

    @property
    def credential_source(self) -> str:
        """Where the credential comes from, for messages (never the credential)."""
        if self.auth == "default":
            return "DefaultAzureCredential"
        if self.connection_string_file is not None:
            return f"connection string file {self.connection_string_file}"
        return f"connection string ${self.connection_string_env}"


def parse_connection(
    o: Options, *, endpoint_option: str, account: str | None, absolute_paths: bool = False
) -> AzureConnection:
    """Validate the connection options (errors name ``o.field(...)``). No I/O.

    ``endpoint_option``: ``account_url`` (publisher) or ``endpoint`` (store URL).
    ``account``: the account the component names (the store URL's), or None.
    ``absolute_paths``: a relative ``connection_string_file`` is refused (a
    state URL has no config folder to be relative to).
    """
    for name in REFUSED_LITERALS:
        if name in o:
            raise o.err(
                name,
                "a literal credential is refused (it would sit in the config file and in "
                f"backups); use connection_string_file or ${DEFAULT_CONNECTION_STRING_ENV}",
            )
    endpoint = o.string(endpoint_option)
    if endpoint is not None:
        endpoint = check_endpoint(endpoint, o.field(endpoint_option))
        served = endpoint_account(endpoint)
        if account is not None and served is not None and served != account:
            raise o.err(endpoint_option, f"is for account {served!r}, not {account!r}")
        account = account or served
    env = o.string("connection_string_env")
    file = o.path("connection_string_file")
    if env is not None and not _ENV_NAME_RE.fullmatch(env):
        raise o.err("connection_string_env", f"expected an environment variable name, got {env!r}")
    if file is not None and absolute_paths and not file.is_absolute():
        raise o.err("connection_string_file", f"must be an absolute path, got {str(file)!r}")
    implied = "connection_string" if env is not None or file is not None else "default"
    auth = o.choice("auth", implied, AUTH_METHODS)
    if auth == "default":
        for name in ("connection_string_env", "connection_string_file"):
            if name in o:
                raise o.err(name, "only with auth = 'connection_string'")
        if endpoint is None and account is None:
            raise o.err(
                endpoint_option,
                "is required with auth = 'default' (e.g. 'https://ACCOUNT.blob.core.windows.net')",
            )
    if env is not None and file is not None:
        raise o.err(
            "connection_string_file",
            "give connection_string_file or connection_string_env, not both",
        )
    return AzureConnection(
        endpoint=endpoint,
        account=account,
        auth=auth,
        connection_string_env=env or DEFAULT_CONNECTION_STRING_ENV,
        connection_string_file=file,
        connect_timeout=o.number("connect_timeout", 5, 0.1, _MAX_TIMEOUT),
        read_timeout=o.number("read_timeout", 10, 0.1, _MAX_TIMEOUT),
        max_attempts=o.integer("max_attempts", 5, 1, _MAX_ATTEMPTS),
    )


@dataclass(frozen=True)
class ConnectionString:
    """A parsed storage connection string (``repr`` shows no secret)."""

    endpoint: str
    account: str | None
    key: str | None
    sas: str | None

    @property
    def secrets(self) -> set[str]:
        return {s for s in (self.key, self.sas) if s}

    def __repr__(self) -> str:
        return f"ConnectionString(endpoint={self.endpoint!r}, account={self.account!r})"


def parse_connection_string(text: str, source: str) -> ConnectionString:
    """``Name=Value;...`` as the Azure portal gives it; AzureSetupError naming ``source``.

    Messages name the parts by name and position, never a value.
    """
    parts: dict[str, str] = {}
    for i, part in enumerate((p for p in text.split(";") if p.strip()), 1):
        name, sep, value = part.partition("=")
        if not sep or not _PART_NAME_RE.fullmatch(name.strip()):
            raise AzureSetupError(f"{source}: part {i} is not Name=Value")
        parts[name.strip().lower()] = value.strip()
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return ConnectionString(DEV_BLOB_ENDPOINT, DEV_ACCOUNT, DEV_ACCOUNT_KEY, None)
    account = parts.get("accountname") or None
    key = parts.get("accountkey") or None
    sas = (parts.get("sharedaccesssignature") or "").lstrip("?") or None
    endpoint = parts.get("blobendpoint") or None
    if endpoint is not None:
        p = urlsplit(endpoint)
        if p.scheme not in ("http", "https") or not p.hostname or p.query or p.username:
            raise AzureSetupError(f"{source}: BlobEndpoint is not an http(s) URL without a query")
        endpoint = endpoint.rstrip("/")
    elif account is not None:
        if not _ACCOUNT_RE.fullmatch(account):
            raise AzureSetupError(f"{source}: AccountName is not a storage account name")
        protocol = parts.get("defaultendpointsprotocol", "https").lower()
        if protocol not in ("http", "https"):
            raise AzureSetupError(f"{source}: DefaultEndpointsProtocol is neither http nor https")
        suffix = parts.get("endpointsuffix") or DEFAULT_ENDPOINT_SUFFIX
        endpoint = f"{protocol}://{account}.blob.{suffix}"
    else:
        raise AzureSetupError(f"{source}: names neither BlobEndpoint nor AccountName")
    if key is not None and account is None:
        raise AzureSetupError(f"{source}: has an AccountKey but no AccountName")
    if key is None and sas is None:
        raise AzureSetupError(f"{source}: has neither AccountKey nor SharedAccessSignature")
    return ConnectionString(endpoint, account, key, sas)


# --------------------------------------------------------------------------- errors


def error_code(exc: BaseException) -> str | None:
    """The storage service's error code (``BlobNotFound``, ``ConditionNotMet``, ...)."""
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    if code:
        return str(code)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        value = headers.get("x-ms-error-code")
        if value:
            return str(value)
    return None


def status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(text: object) -> str:
    for line in str(text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


class Attempts:
    """Counts the attempts of one SDK call (the storage retry policy's ``retry_hook``)."""

    def __init__(self) -> None:
        self.count = 1

    def __call__(self, **_: Any) -> None:
        self.count += 1


# --------------------------------------------------------------------------- the client


class BlobAccess:
    """One container's SDK client, made on first use, and one-line reasons for its errors.

    Not at construction: ``config check`` and ``--help`` never import the SDK
    nor read a credential. A failure to make the client (no connection string,
    a file others may read, no SDK) is an :class:`AzureSetupError`, reported
    by the publisher or store like any failed request.
    """

    def __init__(self, connection: AzureConnection, container: str) -> None:
        self.connection = connection
        self.container = container
        #: The endpoint requests go to (known once a client exists), for messages.
        self.endpoint: str | None = connection.endpoint or (
            f"https://{connection.account}.blob.{DEFAULT_ENDPOINT_SUFFIX}"
            if connection.account and connection.auth == "default"
            else None
        )
        self._lock = threading.Lock()
        self._client: Any = None
        self._blobs: dict[str, Any] = {}
        self._secrets: set[str] = set()

    def handle(self, name: str) -> Any:
        """The SDK's BlobClient for ``name`` (AzureSetupError when no client can be made)."""
        container = self.client()
        with self._lock:
            blob = self._blobs.get(name)
            if blob is None:
                blob = self._blobs[name] = container.get_blob_client(name)
            return blob

    def client(self) -> Any:
        """The SDK's ContainerClient (AzureSetupError when none can be made)."""
        with self._lock:
            if self._client is None:
                self._client = self._make()
                self._blobs.clear()
            return self._client

    def reset(self) -> None:
        """Drop the client: the next call reads the credential again."""
        with self._lock:
            self._client = None
            self._blobs.clear()

    def failed(self, exc: BaseException) -> None:
        """Note a failed call: on 401/403 the credential is read again next time."""
        if status_code(exc) in (401, 403):
            self.reset()

    # -- making the client -----------------------------------------------------------

    def _make(self) -> Any:
        blob_sdk = sdk()
        from azure.core.pipeline.transport import RequestsTransport  # azure-storage-blob's
        from azure.storage.blob._shared.constants import DATA_BLOCK_SIZE
        _redact_transport_logs()
        c = self.connection
        credential: Any
        if c.auth == "connection_string":
            text, source = self._read_connection_string()
            self._secrets.add(text)
            cs = parse_connection_string(text, source)
            self._secrets.update(cs.secrets)
            endpoint = c.endpoint or cs.endpoint
            account = cs.account or endpoint_account(cs.endpoint)
            if c.account is not None and account is not None and account != c.account:
                raise AzureSetupError(f"{source}: is for account {account!r}, not {c.account!r}")
            if cs.key is not None:
                from azure.core.credentials import AzureNamedKeyCredential

                credential = AzureNamedKeyCredential(cs.account or "", cs.key)
            else:
                from azure.core.credentials import AzureSasCredential

                credential = AzureSasCredential(cs.sas or "")
        else:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError:
                raise AzureSetupError(
                    "auth = 'default' needs the azure-identity package "
                    "(pip install 'keymgr[azure]')"
                ) from None
            endpoint = c.endpoint or f"https://{c.account}.blob.{DEFAULT_ENDPOINT_SUFFIX}"
            credential = DefaultAzureCredential()
        self.endpoint = endpoint
        retry = blob_sdk.ExponentialRetry(retry_total=c.max_attempts - 1)
        # The SDK's exponential policy waits initial + base**n (15 s, 18 s, ...
        # by default): a pass would stall for a minute on one lost packet.
        # Capped exponential with jitter, as botocore's standard mode does.
        retry.get_backoff_time = _backoff
        # The transport the SDK would make (its timeouts and block size are
        # the transport's, not the client's), made and opened here so that its
        # session keeps as many connections as a store reads documents at once
        # (its default: 10).
        transport = RequestsTransport(
            connection_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            connection_data_block_size=DATA_BLOCK_SIZE,
        )
        transport.open()
        widen_pools(transport.session)
        try:
            return blob_sdk.ContainerClient(
                endpoint,
                self.container,
                credential=credential,
                retry_policy=retry,
                user_agent="keymgr",
                transport=transport,
            )
        except ValueError as e:
            reason = self.scrub(str(e))
            raise AzureSetupError(f"cannot make a client for {endpoint}: {reason}") from None

    def _read_connection_string(self) -> tuple[str, str]:
        """The connection string and how messages name its source (never its content)."""
        c = self.connection
        path = c.connection_string_file
        if path is None:
            source = f"${c.connection_string_env}"
            text = os.environ.get(c.connection_string_env, "").strip()
            if not text:
                raise AzureSetupError(
                    f"no connection string: ${c.connection_string_env} is not set or empty "
                    "(or set connection_string_file)"
                )
            return text, f"connection string {source}"
        from ..local.keys import master_key_exposure

        source = f"connection string file {path}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise AzureSetupError(f"{source}: cannot read ({e.strerror or e})") from None
        with os.fdopen(fd, "rb") as f:
            # The mode of the file actually opened, checked before reading it.
            problem = master_key_exposure(os.fstat(f.fileno()), path)
            if problem is not None:
                raise AzureSetupError(f"{source}: {problem}")
            try:
                raw = f.read()
            except OSError as e:
                raise AzureSetupError(f"{source}: cannot read ({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise AzureSetupError(f"{source}: is not UTF-8 text") from None
        if not text:
            raise AzureSetupError(f"{source}: is empty")
        return text, source

    # -- messages ------------------------------------------------------------------------

    def scrub(self, text: str, limit: int = _REASON_MAX) -> str:
        """One line, every secret this client holds and any ``sig=`` redacted, at most ``limit``."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        text = _SIG_RE.sub(r"\1=[redacted]", text)
        text = " ".join(text.split())
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def reason(self, exc: BaseException, attempts: int = 1) -> str:
        """A one-line reason for an SDK or setup error, without secrets.

        The service's text is cut at 240 characters; keymgr's own (a setup
        error naming a file) is not.
        """
        if isinstance(exc, AzureSetupError):
            return self.scrub(str(exc), limit=2000)
        text = self._describe(exc)
        if attempts > 1:
            text += f" (after {attempts} attempts)"
        return self.scrub(text)

    def _describe(self, exc: BaseException) -> str:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            ServiceRequestError,
            ServiceResponseError,
        )

        status = status_code(exc)
        where = self.endpoint or "the blob service"
        if status is not None:
            code = error_code(exc)
            message = getattr(exc, "message", None) or getattr(exc, "reason", None)
            first = _first_line(message)
            head = f"HTTP {status}" + (f" {code}" if code else "")
            return f"{head}: {first}" if first else head
        if isinstance(exc, ClientAuthenticationError):
            first = _first_line(getattr(exc, "message", None) or str(exc))
            return f"cannot authenticate ({self.connection.credential_source}): {first}"
        text = str(exc)
        if isinstance(exc, ServiceResponseError) or "timed out" in text.lower():
            if "timed out" in text.lower():
                return (
                    f"no answer from {where} within {self.connection.read_timeout:g}s (timed out)"
                )
            m = _ERRNO_RE.search(text)
            detail = m.group(1).strip() if m else "connection lost"
            return f"connection to {where} lost ({detail})"
        if isinstance(exc, ServiceRequestError):
            m = _ERRNO_RE.search(text)
            if m is not None:
                return f"cannot connect to {where} ({m.group(1).strip()})"
            first = _first_line(text)
            return f"cannot send to {where} ({first or type(exc).__name__})"
        first = _first_line(getattr(exc, "message", None) or text)
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _RedactSignatures(logging.Filter):
    """Redacts ``sig=...`` (a SAS signature) from urllib3's DEBUG request lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(Exception):
            text = record.getMessage()
            if "sig=" in text.lower():
                record.msg, record.args = _SIG_RE.sub(r"\1=[redacted]", text), None
        return True


_LOG_FILTER = _RedactSignatures()


def _redact_transport_logs() -> None:
    """urllib3 logs every request's path and query at DEBUG, where a SAS sits."""
    logger = logging.getLogger("urllib3.connectionpool")
    if _LOG_FILTER not in logger.filters:
        logger.addFilter(_LOG_FILTER)


def _backoff(settings: dict[str, Any]) -> float:
    """Seconds before retry ``n`` (1, 2, ...): 0.25, 0.5, 1, 2, ... up to 8, +-25 %."""
    n = max(1, int(settings.get("count", 1)))
    return min(0.25 * 2.0 ** (n - 1), 8.0) * random.uniform(0.75, 1.25)  # noqa: S311 - jitter


def azure_errors() -> tuple[type[BaseException], ...]:
    """What an SDK call may raise (imported on first use; without the SDK, only setup errors)."""
    try:
        from azure.core.exceptions import AzureError
    except ImportError:
        return (AzureSetupError,)
    return (AzureError, AzureSetupError, ValueError)


def sdk() -> Any:
    """The ``azure.storage.blob`` module (AzureSetupError when it is not installed)."""
    try:
        import azure.storage.blob as blob
    except ImportError:
        raise AzureSetupError(
            "the Azure SDK is not installed (pip install 'keymgr[azure]': azure-storage-blob)"
        ) from None
    return blob
