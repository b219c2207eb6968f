"""Amazon S3: a JWKS publisher (``type = "s3"``) and the AWS plumbing of the S3 state store.

Both talk to S3 through the AWS SDK (botocore, boto3's client layer), imported
only when a configured publisher or store first needs a client, so ``keymgr
--help`` and ``config check`` never pay for it. The connection helpers at the
top (:class:`AWSConnection`, :func:`aws_reason`) are shared with
``backends.aws_kms``.

The state store (``s3://bucket/key``) itself is :mod:`keymgr.docstore_s3`: an
S3 adapter under :class:`keymgr.docstore.SharedStore`, which holds the CAS
commit, the pass lock and the lease once for every shared store. This module
keeps what that adapter shares with the publisher: the lazy client, the error
codes, and the validation of the store URL (:func:`_store_params`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from keymgr.errors import ConfigError, PublishError
from keymgr.publishers import Publisher, Served

# --------------------------------------------------------------------------- AWS connection

#: Options every AWS-backed component accepts (KMS backend, S3 publisher, S3 store).
AWS_CONNECTION_OPTIONS = frozenset(
    {"region", "endpoint_url", "profile", "connect_timeout", "read_timeout", "max_attempts"}
)

_REGION_RE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)+")
_MAX_TIMEOUT = 300.0
_MAX_ATTEMPTS = 20
_ACCESS_KEY_RE = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")
_CREDENTIAL_RE = re.compile(r"(Credential|Signature|X-Amz-Security-Token|SessionToken)=[^\s,&\"']+")
_REASON_MAX = 240

#: Error codes that mean "the conditional write lost": 412 and 409 (S3 answers
#: 409 ConditionalRequestConflict when a concurrent write wins mid-request).
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


#: The botocore data loader shared by every client of this process (see AWSConnection.client).
_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


@dataclass(frozen=True)
class AWSConnection:
    """Where and how to reach one AWS service; creates clients lazily.

    ``region`` / ``endpoint_url`` / ``profile`` left as None fall through to
    the SDK's own chain, like the aws CLI v2: ``AWS_REGION``, then
    ``AWS_DEFAULT_REGION``; ``AWS_ENDPOINT_URL_<SERVICE>`` then
    ``AWS_ENDPOINT_URL``; ``AWS_PROFILE``; then the shared config files. A value
    set in keymgr's config always wins over the environment. Credentials always
    come from the SDK chain (environment, profile, web identity, container or
    instance role); keymgr has no option to put a secret in its config.
    """

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_attempts: int = 5

    def client(self, service: str) -> Any:
        """A new low-level client; botocore errors (bad profile, no region) propagate.

        boto3's clients are botocore clients, so they are made with botocore
        directly: that skips importing boto3's resource layer (s3transfer),
        about 0.1 s of every CLI start. Each client gets its own session, so
        credentials and region resolve through the SDK chain at that moment,
        but every session of the process shares one data loader: parsing the
        service models and endpoint rules is most of what creating a client
        costs, and one CLI run may create three (KMS, S3 publisher, S3 store).
        """
        import botocore.session
        from botocore.config import Config

        global _LOADER
        config = Config(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # total_max_attempts counts the first try, like AWS_MAX_ATTEMPTS; botocore's
            # "max_attempts" key would count retries only (one more request than asked).
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            user_agent_extra="keymgr",
        )
        # botocore reads only AWS_DEFAULT_REGION; the aws CLI v2 and the other
        # SDKs let AWS_REGION win over it, and many runtimes set only that one.
        region = self.region or os.environ.get("AWS_REGION") or None
        with _LOADER_LOCK:  # the loader's cache is not meant for concurrent fills
            session = botocore.session.Session(profile=self.profile)
            if _LOADER is None:
                _LOADER = session.get_component("data_loader")
            else:
                session.register_component("data_loader", _LOADER)
            return session.create_client(
                service, region_name=region, endpoint_url=self.endpoint_url, config=config
            )


def _number(value: Any, field: str, *, low: float, high: float, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number of seconds"
        raise ConfigError(f"{field}: expected {kind}, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{field}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{field}: must be between {low:g} and {high:g}, got {value!r}")
    return value


def parse_connection(options: Mapping[str, Any], prefix: str) -> AWSConnection:
    """Validate the connection options; ``prefix`` + field names the culprit. No I/O.

    ``prefix`` is e.g. ``"backends.kms."`` so errors read ``backends.kms.region: ...``.
    """
    region = options.get("region")
    if region is not None and (not isinstance(region, str) or not _REGION_RE.fullmatch(region)):
        raise ConfigError(
            f"{prefix}region: expected an AWS region like 'eu-west-1', got {region!r}"
        )
    endpoint = options.get("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"{prefix}endpoint_url: expected an http(s) URL like "
                f"'https://kms.eu-west-1.amazonaws.com', got {endpoint!r}"
            )
    profile = options.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile.strip()):
        raise ConfigError(f"{prefix}profile: expected a non-empty profile name, got {profile!r}")
    connect = _number(
        options.get("connect_timeout", 5),
        f"{prefix}connect_timeout",
        low=0.1,
        high=_MAX_TIMEOUT,
        integer=False,
    )
    read = _number(
        options.get("read_timeout", 10),
        f"{prefix}read_timeout",
        low=0.1,
        high=_MAX_TIMEOUT,
        integer=False,
    )
    attempts = _number(
        options.get("max_attempts", 5),
        f"{prefix}max_attempts",
        low=1,
        high=_MAX_ATTEMPTS,
        integer=True,
    )
    return AWSConnection(
        region=region,
        endpoint_url=endpoint,
        profile=profile,
        connect_timeout=float(connect),
        read_timeout=float(read),
        max_attempts=int(attempts),
    )


def aws_error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError`` (None for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else None


def aws_reason(exc: BaseException) -> str:
    """A short, single-line reason for a boto3/botocore exception, without secrets.

    ClientError: ``Code: message`` (plus the retry count when botocore
    retried); transport errors: botocore's own one-line text (which names the
    endpoint, never a credential). Access key ids and signing material are
    redacted anyway, in case a server echoes them.
    """
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response.get("Error", {})
        code = aws_error_code(exc) or "Error"
        message = str(err.get("Message") or "").strip()
        text = f"{code}: {message}" if message else code
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
        if isinstance(retries, int) and retries > 0:
            text += f" (after {retries + 1} attempts)"
    else:
        name = type(exc).__name__
        text = str(exc).strip() or name
        if name == "NoCredentialsError":
            text = "no AWS credentials found (environment, profile, or instance/container role)"
        elif name in ("ConnectTimeoutError", "ReadTimeoutError", "EndpointConnectionError"):
            text = f"{text} (service unreachable)"
    text = " ".join(text.split())
    text = _ACCESS_KEY_RE.sub("[redacted]", text)
    text = _CREDENTIAL_RE.sub(r"\1=[redacted]", text)
    if len(text) > _REASON_MAX:
        text = text[: _REASON_MAX - 1] + "…"
    return text


def _retried(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    attempts = response.get("ResponseMetadata", {}).get("RetryAttempts")
    return isinstance(attempts, int) and attempts > 0


def _aws_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --------------------------------------------------------------------------- names

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _check_bucket(bucket: Any, field: str) -> str:
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{field}: expected an S3 bucket name, got {bucket!r}")
    return bucket


def _check_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{field}: expected a non-empty object key, got {key!r}")
    if key.startswith("/"):
        raise ConfigError(f"{field}: object keys do not start with '/' (write {key.lstrip('/')!r})")
    if len(key.encode("utf-8")) > 1000:
        raise ConfigError(f"{field}: object key too long")
    return key


# --------------------------------------------------------------------------- publisher

_SSE_VALUES = ("AES256", "aws:kms")
_PUBLISHER_FIELDS = frozenset(
    {"type", "bucket", "key", "cache_control", "sse", "sse_kms_key_id"} | AWS_CONNECTION_OPTIONS
)
DEFAULT_CACHE_CONTROL = "public, max-age=300"
CONTENT_TYPE = "application/json"


class _LazyS3:
    """The boto3 S3 client of a publisher or store, created on first use.

    Not at construction: ``config check`` and ``--help`` must never import
    boto3 nor touch the network; a client creation failure (bad profile) is
    then reported like any other request failure of that component.
    """

    connection: AWSConnection
    _lock: Any
    _client: Any

    def _error(self, operation: str, exc: BaseException) -> Exception:
        raise NotImplementedError

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self.connection.client("s3")
                except _aws_errors() as e:
                    raise self._error("create client", e) from None
            return self._client


class S3Publisher(_LazyS3, Publisher):
    """The JWKS as one S3 object (typically behind a CDN): ``type = "s3"``."""

    type_name: ClassVar[str] = "s3"

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        where = f"publishers.{name}"
        for k in options:
            if k not in _PUBLISHER_FIELDS:
                raise ConfigError(
                    f"{where}.{k}: unknown field (known: {', '.join(sorted(_PUBLISHER_FIELDS))})"
                )
        if "bucket" not in options:
            raise ConfigError(f"{where}.bucket: is required")
        if "key" not in options:
            raise ConfigError(f"{where}.key: is required (e.g. '.well-known/jwks.json')")
        self.bucket = _check_bucket(options["bucket"], f"{where}.bucket")
        self.key = _check_key(options["key"], f"{where}.key")
        cc = options.get("cache_control", DEFAULT_CACHE_CONTROL)
        if not isinstance(cc, str) or not cc.strip() or "\n" in cc or "\r" in cc:
            raise ConfigError(f"{where}.cache_control: expected a Cache-Control header value")
        #: Sent as Cache-Control with every upload; verifiers and CDNs cache the
        #: JWKS this long, so a ring's publish_ahead should cover its max-age
        #: (keymgr.config warns when it does not).
        self.cache_control: str = cc
        sse = options.get("sse")
        if sse is not None and sse not in _SSE_VALUES:
            raise ConfigError(f"{where}.sse: expected 'AES256' or 'aws:kms', got {sse!r}")
        kms_key = options.get("sse_kms_key_id")
        if kms_key is not None:
            if sse != "aws:kms":
                raise ConfigError(f"{where}.sse_kms_key_id: only valid with sse = 'aws:kms'")
            if not isinstance(kms_key, str) or not kms_key.strip():
                raise ConfigError(f"{where}.sse_kms_key_id: expected a KMS key id, ARN or alias")
        self.sse: str | None = sse
        self.sse_kms_key_id: str | None = kms_key
        self.connection = parse_connection(options, f"{where}.")
        self._lock = threading.Lock()
        self._client: Any = None

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
            data: bytes = resp["Body"].read()
        except _aws_errors() as e:
            if aws_error_code(e) in _MISSING_CODES:
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
                CacheControl=self.cache_control,
                **extra,
            )
        except _aws_errors() as e:
            raise self._error("PutObject", e) from None

    def __repr__(self) -> str:
        return f"S3Publisher({self.name!r}, {self.url!r})"


# ------------------------------------------------------------- state store URL (keymgr.docstore_s3)


_STORE_PARAMS = frozenset(AWS_CONNECTION_OPTIONS | {"lock_ttl"})
_FLOAT_PARAMS = frozenset({"connect_timeout", "read_timeout", "lock_ttl"})
DEFAULT_LOCK_TTL = 30.0
_MIN_LOCK_TTL, _MAX_LOCK_TTL = 5, 3600


def _store_params(url: str) -> tuple[str, str, dict[str, Any]]:
    """Split and validate ``s3://BUCKET/KEY?params``: (bucket, key, params). No I/O.

    Raises ConfigError naming ``daemon.state`` and the culprit.
    """
    where = "daemon.state"
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"{where}: expected s3://BUCKET/KEY, got {url!r}")
    bucket = _check_bucket(parts.netloc, f"{where}: bucket of {url!r}")
    key = _check_key(parts.path[1:], f"{where}: object key of {url!r}")
    if parts.fragment:
        raise ConfigError(f"{where}: {url!r}: unexpected '#' fragment")
    params: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in _STORE_PARAMS:
            raise ConfigError(
                f"{where}: {url!r}: unknown parameter {name!r} "
                f"(known: {', '.join(sorted(_STORE_PARAMS))})"
            )
        if name in params:
            raise ConfigError(f"{where}: {url!r}: parameter {name!r} given twice")
        if name in _FLOAT_PARAMS or name == "max_attempts":
            try:
                params[name] = int(value) if name == "max_attempts" else float(value)
            except ValueError:
                raise ConfigError(
                    f"{where}: {url!r}: parameter {name!r} must be a number, got {value!r}"
                ) from None
        else:
            params[name] = value
    return bucket, key, params
