"""AWS plumbing shared by the KMS backend, the S3 publisher and the S3 store.

The AWS SDK (botocore, boto3's client layer) is imported only when a configured
component first needs a client, so ``keymgr --help`` and ``config check`` never
pay for it. Here: where and how to reach AWS (:class:`AWSConnection`, honouring
the SDK's standard environment), error codes and reasons with credentials
scrubbed (:func:`aws_reason`), S3 names, and the lazily created S3 client.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keymgr.docstore import HTTP_POOL
from keymgr.errors import ConfigError
from keymgr.options import Options

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
CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


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
            max_pool_connections=HTTP_POOL,  # a store reads 16 documents at once
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


def parse_connection(o: Options) -> AWSConnection:
    """Validate the connection options (errors name ``o.field(...)``). No I/O."""
    region = o.string("region")
    if region is not None and not _REGION_RE.fullmatch(region):
        raise o.err("region", f"expected an AWS region like 'eu-west-1', got {region!r}")
    endpoint = o.string("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise o.err(
                "endpoint_url",
                f"expected an http(s) URL like 'https://kms.eu-west-1.amazonaws.com', "
                f"got {endpoint!r}",
            )
    return AWSConnection(
        region=region,
        endpoint_url=endpoint,
        profile=o.string("profile"),
        connect_timeout=o.number("connect_timeout", 5, 0.1, _MAX_TIMEOUT),
        read_timeout=o.number("read_timeout", 10, 0.1, _MAX_TIMEOUT),
        max_attempts=o.integer("max_attempts", 5, 1, _MAX_ATTEMPTS),
    )


def read_body(resp: Any, check: Callable[[int | None], None]) -> bytes:
    """The body of a GetObject answer once ``check`` (a size check that
    raises) accepts its ``Content-Length``; closed unread when it does not."""
    try:
        check(resp.get("ContentLength"))
    except BaseException:
        resp["Body"].close()
        raise
    body: bytes = resp["Body"].read()
    return body


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


def aws_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --------------------------------------------------------------------------- names

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_bucket(bucket: Any, field: str) -> str:
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{field}: expected an S3 bucket name, got {bucket!r}")
    return bucket


def check_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{field}: expected a non-empty object key, got {key!r}")
    if key.startswith("/"):
        raise ConfigError(f"{field}: object keys do not start with '/' (write {key.lstrip('/')!r})")
    if len(key.encode("utf-8")) > 1000:
        raise ConfigError(f"{field}: object key too long")
    return key


# --------------------------------------------------------------------------- S3 client


class LazyS3:
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
                except aws_errors() as e:
                    raise self._error("create client", e) from None
            return self._client
