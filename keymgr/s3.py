"""Amazon S3: a JWKS publisher (``type = "s3"``) and a state store (``s3://bucket/key``).

Both talk to S3 through the AWS SDK (botocore, boto3's client layer), imported
only when a configured publisher or store first needs a client, so ``keymgr
--help`` and ``config check`` never pay for it. The connection helpers at the
top (:class:`AWSConnection`, :func:`aws_reason`) are shared with
``backends.aws_kms``.

The state store is one JSON object written by compare-and-swap: a conditional
``PutObject`` with ``If-None-Match: *`` for the first write and ``If-Match:
ETAG`` after that, so two writers starting from the same version can never both
succeed (S3 answers 412 or 409 to the loser, which becomes
:class:`~keymgr.errors.ConflictError`). A pass also holds a *pass lock* (a
small object next to the state, taken and renewed by the same conditional
writes, expiring on S3's own clock) so that only one process at a time executes
backend side effects; the CAS alone keeps the document consistent, the lock
keeps processes from, for example, mistaking each other's fresh keys for
orphans. The daemon replicas' lease record is a third object, written by the
same CAS.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from keymgr.errors import ConfigError, ConflictError, PublishError, StoreError
from keymgr.faults import crashpoint
from keymgr.logs import get_logger
from keymgr.model import State
from keymgr.publishers import Publisher, Served
from keymgr.stores import StateStore

log = get_logger("keymgr.s3")

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


# --------------------------------------------------------------------------- state store


@dataclass(frozen=True)
class S3Token:
    """Version token of the S3 state store: the object's ETag and the document version."""

    etag: str
    version: int


def encode_state(state: State, version: int) -> bytes:
    """The state document, byte for byte as the file store writes it."""
    doc = {"version": version, **state.to_dict()}
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()


def decode_state(raw: bytes, where: str) -> tuple[State, int]:
    try:
        doc = json.loads(raw)
        version = int(doc.pop("version"))
        return State.from_dict(doc), version
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"state {where}: corrupt state document ({e})") from None


_STORE_PARAMS = frozenset(AWS_CONNECTION_OPTIONS | {"lock_ttl"})
_FLOAT_PARAMS = frozenset({"connect_timeout", "read_timeout", "lock_ttl"})
DEFAULT_LOCK_TTL = 30.0
_MIN_LOCK_TTL, _MAX_LOCK_TTL = 5, 3600
_LOCK_SUFFIX = ".lock"
_LEASE_SUFFIX = ".lease"


class _Lock:
    """A held pass lock: its ETag, renewed in the background until released."""

    def __init__(self, etag: str) -> None:
        self.etag = etag
        self.renewed = time.monotonic()
        self.lost: str | None = None
        #: Why the last renewal failed (for the message when the lock is lost).
        self.last_error: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


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


class S3Store(_LazyS3, StateStore):
    """``s3://BUCKET/KEY[?region=..&endpoint_url=..&profile=..&lock_ttl=..&...]``.

    Three objects: ``KEY`` (the state document, CAS on its ETag), ``KEY.lock``
    (the pass lock behind :meth:`exclusive`) and ``KEY.lease`` (the daemon
    replicas' lease record, :meth:`read_lease` / :meth:`write_lease`).

    Without parameters the SDK chain applies (``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
    ``AWS_PROFILE``, roles); parameters in the URL win over the environment.
    """

    #: ``KeyManager.sign`` asks for a fingerprint (one HEAD) at most once a
    #: second: a HEAD before every signature would double a busy signer's
    #: requests. A promotion by another replica is seen within that second,
    #: which the timing rules allow (see ``KeyManager._check_fresh``).
    fingerprint_window: ClassVar[float] = 1.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, self.key, params = _store_params(url)
        where = f"daemon.state: {url!r}: parameter "
        lock_ttl = _number(
            params.pop("lock_ttl", DEFAULT_LOCK_TTL),
            f"{where}lock_ttl",
            low=_MIN_LOCK_TTL,
            high=_MAX_LOCK_TTL,
            integer=False,
        )
        #: Seconds after its last renewal that an abandoned pass lock may be taken over.
        self.lock_ttl = float(lock_ttl)
        self.connection = parse_connection(params, where)
        self.lock_key = self.key + _LOCK_SUFFIX
        self.lease_key = self.key + _LEASE_SUFFIX
        self._lock = threading.RLock()
        self._client: Any = None
        self._held: _Lock | None = None
        self._pass = threading.RLock()
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- plumbing ---------------------------------------------------------------

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _error(self, operation: str, exc: BaseException) -> StoreError:
        return StoreError(f"state {self.location}: {operation}: {aws_reason(exc)}")

    # -- StateStore -------------------------------------------------------------

    def load(self) -> tuple[State, S3Token | None]:
        client = self.client
        try:
            resp = client.get_object(Bucket=self.bucket, Key=self.key)
            raw: bytes = resp["Body"].read()
        except _aws_errors() as e:
            if aws_error_code(e) in _MISSING_CODES:
                return State(), None
            raise self._error("GetObject", e) from None
        state, version = decode_state(raw, self.location)
        return state, S3Token(str(resp["ETag"]), version)

    def commit(self, state: State, token: S3Token | None) -> S3Token:
        held = self._held
        if held is not None:
            if held.lost is None and time.monotonic() - held.renewed > self.lock_ttl:
                why = f": {held.last_error}" if held.last_error else ""
                held.lost = f"not renewed for {self.lock_ttl:g}s{why}"
            if held.lost is not None:
                # Another process may hold it now and act on the same state:
                # writing would be safe (CAS) but the side effects before it
                # were not coordinated, so stop and let the next pass re-plan.
                raise StoreError(
                    f"state {self.location}: pass lock lost ({held.lost}); not writing"
                )
        version = 1 if token is None else token.version + 1
        data = encode_state(state, version)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token.etag}
        crashpoint("store.before_write")
        client = self.client
        try:
            resp = client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=data,
                ContentType="application/json",
                **condition,
            )
        except _aws_errors() as e:
            code = aws_error_code(e)
            if code not in _CONFLICT_CODES and code not in _MISSING_CODES:
                raise self._error("PutObject", e) from None
            # A request that botocore retried after a timeout may have landed
            # on the first attempt and then lost to itself: if the object now
            # holds exactly our bytes (the version number makes them unique),
            # the write is ours. A conflict on the first attempt is always real.
            mine = self._current_if_equal(self.key, data) if _retried(e) else None
            if mine is None:
                expected = "absent" if token is None else f"ETag {token.etag}"
                raise ConflictError(
                    f"state {self.location}: changed by another writer "
                    f"(expected version {version - 1}, {expected})"
                ) from None
            etag = mine
        else:
            etag = str(resp["ETag"])
        crashpoint("store.after_write")
        return S3Token(etag, version)

    def _current_if_equal(self, key: str, data: bytes) -> str | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            if resp["Body"].read() == data:
                return str(resp["ETag"])
        except _aws_errors():
            pass
        return None

    def fingerprint(self) -> object:
        """The state object's ETag (one HEAD), None when it cannot be had.

        None makes the caller re-read the state, which then reports the real
        failure; callers limit how often they ask (:attr:`fingerprint_window`).
        """
        errors: tuple[type[BaseException], ...] = (*_aws_errors(), StoreError)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except errors:
            return None
        return str(head["ETag"])

    # -- lease record (daemon replicas, keymgr.lease) --------------------------------

    def read_lease(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease record and its ETag; (None, None) when there is none yet.

        A record that is not a JSON object (a hand edit, a truncated upload)
        reads as ``{}``: :class:`~keymgr.lease.Lease` treats that as expired
        and replaces it, still by CAS on its ETag, instead of every replica
        failing forever.
        """
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.lease_key)
            raw: bytes = resp["Body"].read()
        except _aws_errors() as e:
            if aws_error_code(e) in _MISSING_CODES:
                return None, None
            raise self._error(f"GetObject {self.lease_key} (lease)", e) from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            doc = None
        if not isinstance(doc, dict):
            log.warning("lease.unreadable", lease=f"s3://{self.bucket}/{self.lease_key}")
            doc = {}
        return doc, str(resp["ETag"])

    def write_lease(self, doc: dict[str, Any], token: str | None) -> str:
        """Conditional PutObject of the lease record: create when ``token`` is None.

        A ``nonce`` makes every write's bytes (so its ETag) unique: S3's ETag
        is the MD5 of the content, and two writes of identical bytes would
        otherwise let a stale token match again.
        """
        body = json.dumps({**doc, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            resp = self.client.put_object(
                Bucket=self.bucket,
                Key=self.lease_key,
                Body=body,
                ContentType="application/json",
                **condition,
            )
        except _aws_errors() as e:
            code = aws_error_code(e)
            if code not in _CONFLICT_CODES and code not in _MISSING_CODES:
                raise self._error(f"PutObject {self.lease_key} (lease)", e) from None
            mine = self._current_if_equal(self.lease_key, body) if _retried(e) else None
            if mine is None:
                raise ConflictError(
                    f"lease s3://{self.bucket}/{self.lease_key}: changed by another replica"
                ) from None
            return mine
        return str(resp["ETag"])

    # -- pass lock (exclusive) ----------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the pass lock ``KEY.lock`` for a whole pass (re-entrant within this object).

        CAS alone keeps the document consistent, but not the side effects
        around it: two concurrent passes would each create a KMS key for the
        same rotation, and one would see the other's fresh, not yet committed
        key as an orphan, adopt it, and lose it again when the other pass
        discards its keys after losing the commit race. The lock is one
        object created with ``If-None-Match: *``, renewed by ``If-Match`` while
        the pass runs, deleted at the end; one left behind by a crashed process
        is taken over once S3's own clock says it was not renewed for
        ``lock_ttl`` seconds. We wait at least that long, so a pass started
        right after a crash does not fail.
        """
        wait = max(timeout, self.lock_ttl + 5)
        # Threads of this process queue here (re-entry by the holding thread
        # passes); only the outermost pass takes the lock object.
        if not self._pass.acquire(timeout=wait):
            raise StoreError(
                f"state {self.location}: another pass of this process has held the lock "
                f"for more than {wait:g}s"
            )
        try:
            if self._held is not None:
                yield
                return
            held = self._acquire(wait)
            self._held = held
            try:
                yield
            finally:
                self._held = None
                self._release(held)
        finally:
            self._pass.release()

    def _lock_body(self) -> dict[str, Any]:
        # The nonce makes every write unique (see write_lease): takeover
        # decisions rest on LastModified, so a renewal must change the ETag.
        body = {"owner": self._owner, "ttl": self.lock_ttl, "nonce": uuid.uuid4().hex}
        return {
            "Bucket": self.bucket,
            "Key": self.lock_key,
            "Body": json.dumps(body).encode(),
            "ContentType": "application/json",
            "Metadata": {"owner": self._owner},
        }

    def _acquire(self, timeout: float) -> _Lock:
        client = self.client
        deadline = time.monotonic() + timeout
        holder = "unknown"
        what = f"{self.lock_key} (lock)"
        while True:
            try:
                resp = client.put_object(IfNoneMatch="*", **self._lock_body())
                return self._start(str(resp["ETag"]))
            except _aws_errors() as e:
                if aws_error_code(e) not in _CONFLICT_CODES:
                    raise self._error(f"PutObject {what}", e) from None
            try:
                head = client.head_object(Bucket=self.bucket, Key=self.lock_key)
            except _aws_errors() as e:
                if aws_error_code(e) in _MISSING_CODES:
                    continue  # released in between: try again at once
                raise self._error(f"HeadObject {what}", e) from None
            holder = head.get("Metadata", {}).get("owner", "unknown")
            if self._expired(head):
                # Take over an abandoned lock, still by CAS on its ETag.
                try:
                    resp = client.put_object(IfMatch=head["ETag"], **self._lock_body())
                    log.warning("lock.taken_over", lock=self.lock_key, holder=holder)
                    return self._start(str(resp["ETag"]))
                except _aws_errors() as e:
                    if aws_error_code(e) not in _CONFLICT_CODES | _MISSING_CODES:
                        raise self._error(f"PutObject {what}", e) from None
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"state {self.location}: held by another keymgr process ({holder}, lock "
                    f"s3://{self.bucket}/{self.lock_key}) for more than {timeout:g}s"
                )
            time.sleep(random.uniform(0.05, 0.25))  # noqa: S311 - jitter, not crypto

    def _expired(self, head: Mapping[str, Any]) -> bool:
        """Judged on S3's clock (its Date header vs LastModified), never on ours."""
        try:
            date = head["ResponseMetadata"]["HTTPHeaders"]["date"]
            server_now = parsedate_to_datetime(date)
            age = float((server_now - head["LastModified"]).total_seconds())
        except (KeyError, TypeError, ValueError):
            return False
        return age > self.lock_ttl

    def _start(self, etag: str) -> _Lock:
        held = _Lock(etag)
        thread = threading.Thread(
            target=self._renew_loop, args=(held,), name="keymgr-s3-lock", daemon=True
        )
        held.thread = thread
        thread.start()
        return held

    def _renew_loop(self, held: _Lock) -> None:
        interval = self.lock_ttl / 3
        while not held.stop.wait(interval):
            try:
                resp = self.client.put_object(IfMatch=held.etag, **self._lock_body())
            except _aws_errors() as e:
                if aws_error_code(e) in _CONFLICT_CODES | _MISSING_CODES:
                    held.lost = "taken over by another process"
                    return
                held.last_error = aws_reason(e)
                if time.monotonic() - held.renewed > self.lock_ttl:
                    held.lost = f"not renewed for {self.lock_ttl:g}s: {held.last_error}"
                    return
                continue
            held.etag = str(resp["ETag"])
            held.renewed = time.monotonic()

    def _release(self, held: _Lock) -> None:
        held.stop.set()
        if held.thread is not None:
            # Not waiting out a renewal stuck in an outage: a renewal landing
            # after the delete fails (If-Match on a missing object), so it can
            # never bring the lock back, and a failed delete only means the
            # lock expires on its own.
            held.thread.join(timeout=1.0)
        if held.lost is not None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.lock_key, IfMatch=held.etag)
        except _aws_errors() as e:  # it expires on its own
            log.warning("lock.release_failed", lock=self.lock_key, error=aws_reason(e))

    def __repr__(self) -> str:
        return f"S3Store({self.location!r})"
