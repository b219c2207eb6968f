"""Vault / OpenBao access shared by the transit backend and the KV v2 state store.

:func:`vault_client` validates the connection and auth options of one config
table (or of a ``vault://`` state URL) and returns a :class:`VaultClient` that
does no I/O until its first call, so ``keymgr config check`` stays offline.
Like the ``vault``/``bao`` CLI it honours ``VAULT_ADDR``, ``VAULT_TOKEN``,
``VAULT_NAMESPACE`` and ``VAULT_CACERT`` (then ``VAULT_CAPATH``); a field set in
the config wins over the environment.

Every request has a timeout. Transport retries are few and safe: a request that
never reached the server (connection refused or reset while connecting) is
retried whatever its method, a 502/503/504 only for reads (GET/LIST). A write
that may have reached the server is never retried behind the caller's back: a
"lost" answer to a compare-and-swap commit must surface as a store error, not
turn into a conflict after a silent second attempt.

Auth is lazy (first call) and renewed once per call on 401/403: ``token``
re-reads ``token_file`` / ``VAULT_TOKEN`` (Vault Agent rotates the sink file),
``approle`` and ``kubernetes`` log in again. No token or secret id ever appears
in a message: reasons are built from the server's error list or the transport
error class, and scrubbed of every credential this client holds.

:class:`VaultKVStore` keeps keymgr's state as one field of a KV v2 secret and
uses KV's own check-and-set (``cas``) for every commit; a pass lock and the
replicas' lease are two small secrets beside it, written with ``cas`` too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

import structlog

from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.faults import crashpoint
from keymgr.model import State
from keymgr.stores import StateStore

if TYPE_CHECKING:  # pragma: no cover
    import requests

__all__ = [
    "CLIENT_OPTIONS",
    "VaultCallError",
    "VaultClient",
    "VaultKVStore",
    "VaultSettings",
    "vault_client",
]

T = TypeVar("T")

log = structlog.get_logger("keymgr.vault")

AUTH_METHODS = ("token", "approle", "kubernetes")
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2
DEFAULT_JWT_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_MAX_TIMEOUT = 300.0
_MAX_RETRIES = 10

#: The options every Vault-backed component accepts; backends add their own.
CLIENT_OPTIONS: frozenset[str] = frozenset(
    {
        "url",
        "namespace",
        "ca_cert",
        "tls_verify",
        "timeout",
        "retries",
        "auth",
        "token_file",
        "role_id",
        "secret_id_file",
        "approle_mount",
        "role",
        "jwt_file",
        "kubernetes_mount",
    }
)
# Options that only make sense for one auth method.
_AUTH_ONLY: dict[str, str] = {
    "token_file": "token",
    "role_id": "approle",
    "secret_id_file": "approle",
    "approle_mount": "approle",
    "role": "kubernetes",
    "jwt_file": "kubernetes",
    "kubernetes_mount": "kubernetes",
}
_MOUNT_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_STATUS_BY_NAME = {
    "InvalidRequest": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "InvalidPath": 404,
    "UnsupportedOperation": 405,
    "PreconditionFailed": 412,
    "RateLimitExceeded": 429,
    "InternalServerError": 500,
    "VaultNotInitialized": 501,
    "BadGateway": 502,
    "VaultDown": 503,
}
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\"()\]]+)")
_SSL_RE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_MAX_REASON = 300


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class VaultSettings:
    """Validated connection and auth settings (no credential values in here)."""

    url: str
    namespace: str | None
    verify: bool | str
    timeout: float
    retries: int
    auth: str
    token_file: Path | None
    role_id: str | None
    secret_id_file: Path | None
    approle_mount: str
    role: str | None
    jwt_file: Path
    kubernetes_mount: str


class _Opts:
    """Typed access to one options table; errors name ``WHERE<sep>FIELD``."""

    def __init__(
        self, options: Mapping[str, Any], where: str, sep: str, config_dir: str | None
    ) -> None:
        self.options = options
        self.where = where
        self.sep = sep
        self.config_dir = config_dir

    def err(self, field: str, what: str) -> ConfigError:
        return ConfigError(f"{self.where}{self.sep}{field}: {what}")

    def string(self, field: str, env: str | None = None) -> str | None:
        value = self.options.get(field)
        if value is None:
            if env is not None:
                from_env = os.environ.get(env, "").strip()
                return from_env or None
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.err(field, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def path(self, field: str, env: str | None = None) -> Path | None:
        value = self.string(field, env)
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and self.config_dir is not None and field in self.options:
            # Relative to the config file, like every other path in keymgr.
            p = Path(self.config_dir) / p
        return p

    def mount(self, field: str, default: str) -> str:
        value = self.string(field) or default
        value = value.strip("/")
        if not _MOUNT_RE.fullmatch(value):
            raise self.err(field, f"not a valid mount path: {value!r}")
        return value

    def number(self, field: str, default: float, low: float, high: float) -> float:
        value = self.options.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.err(field, f"expected a number of seconds, got {value!r}")
        if not math.isfinite(value) or not low < value <= high:
            raise self.err(field, f"must be more than {low:g} and at most {high:g}, got {value!r}")
        return float(value)

    def integer(self, field: str, default: int, low: int, high: int) -> int:
        value = self.options.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(field, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise self.err(field, f"must be between {low} and {high}, got {value}")
        return value

    def boolean(self, field: str, default: bool) -> bool:
        value = self.options.get(field, default)
        if not isinstance(value, bool):
            raise self.err(field, f"expected true or false, got {value!r}")
        return value


def parse_settings(
    options: Mapping[str, Any],
    where: str,
    config_dir: str | None = None,
    *,
    sep: str = ".",
) -> VaultSettings:
    """Validate the shared options; raise ConfigError naming ``WHERE.FIELD``."""
    o = _Opts(options, where, sep, config_dir)
    if "token" in options:
        raise o.err(
            "token",
            "a literal token is refused (it would sit in the config file and in backups); "
            "use token_file or VAULT_TOKEN",
        )
    url = o.string("url", "VAULT_ADDR")
    if url is None:
        raise o.err("url", "required (or set VAULT_ADDR)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise o.err("url", f"expected http(s)://HOST[:PORT], got {url!r}")
    if parts.username or parts.password:
        raise o.err("url", "must not carry credentials")
    auth = o.string("auth") or "token"
    if auth not in AUTH_METHODS:
        raise o.err("auth", f"unknown auth method {auth!r} (one of {', '.join(AUTH_METHODS)})")
    for field, method in _AUTH_ONLY.items():
        if field in options and auth != method:
            raise o.err(field, f'only used with auth = "{method}" (auth is "{auth}")')
    tls_verify = o.boolean("tls_verify", True)
    ca_cert = o.path("ca_cert", "VAULT_CACERT") or o.path("ca_cert", "VAULT_CAPATH")
    verify: bool | str = str(ca_cert) if (tls_verify and ca_cert is not None) else tls_verify
    role_id = o.string("role_id")
    if auth == "approle" and role_id is None:
        raise o.err("role_id", 'required with auth = "approle"')
    role = o.string("role")
    if auth == "kubernetes" and role is None:
        raise o.err("role", 'required with auth = "kubernetes"')
    return VaultSettings(
        url=url.rstrip("/"),
        namespace=o.string("namespace", "VAULT_NAMESPACE"),
        verify=verify,
        timeout=o.number("timeout", DEFAULT_TIMEOUT, 0.0, _MAX_TIMEOUT),
        retries=o.integer("retries", DEFAULT_RETRIES, 0, _MAX_RETRIES),
        auth=auth,
        token_file=o.path("token_file"),
        role_id=role_id,
        secret_id_file=o.path("secret_id_file"),
        approle_mount=o.mount("approle_mount", "approle"),
        role=role,
        jwt_file=o.path("jwt_file") or Path(DEFAULT_JWT_FILE),
        kubernetes_mount=o.mount("kubernetes_mount", "kubernetes"),
    )


def vault_client(
    options: Mapping[str, Any],
    where: str,
    config_dir: str | None = None,
    *,
    sep: str = ".",
) -> VaultClient:
    """A lazy client for ``options`` (validated now, connected on first use)."""
    return VaultClient(parse_settings(options, where, config_dir, sep=sep))


# --------------------------------------------------------------------------- client


class VaultCallError(Exception):
    """A failed Vault call, reduced to an HTTP status (None: transport) and a short reason."""

    def __init__(self, status: int | None, reason: str, errors: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.errors = errors

    def __str__(self) -> str:
        return self.reason


class VaultClient:
    """An ``hvac.Client`` built on first use, logged in lazily, re-logged in on 401/403."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._session: requests.Session | None = None
        self._hvac: Any = None
        self._token: str | None = None
        # Every credential value this client ever held, to scrub from messages.
        self._secrets: set[str] = set()
        # The Date header of the last answer, per thread (see last_server_time).
        self._seen = threading.local()

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def session(self) -> requests.Session:
        """The ``requests`` session every call goes through (with the retry policy)."""
        with self._lock:
            if self._session is None:
                self._session = _make_session(self.settings)
                self._session.hooks["response"].append(self._note_date)
            return self._session

    def _note_date(self, resp: Any, *args: Any, **kwargs: Any) -> None:
        self._seen.date = resp.headers.get("Date")

    def last_server_time(self) -> datetime | None:
        """The server's clock (HTTP ``Date``, 1 s resolution) at this thread's last answer.

        Lets the KV store judge a lock's age on the server's clock alone, so
        clock skew between replicas cannot make a live lock look expired.
        """
        text = getattr(self._seen, "date", None)
        if not text:
            return None
        try:
            return parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None

    # -- auth ---------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._hvac is None:
                import hvac

                s = self.settings
                self._hvac = hvac.Client(
                    url=s.url,
                    token="",  # never hvac's own fallback to VAULT_TOKEN / ~/.vault-token
                    verify=s.verify,
                    timeout=s.timeout,
                    session=self.session,
                    namespace=s.namespace,
                )
            if self._token is None:
                self._login()
            return self._hvac

    def _read_secret_file(self, path: Path, what: str) -> str:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise VaultCallError(None, f"cannot read {what} file {path} ({reason})") from None
        if not value:
            raise VaultCallError(None, f"{what} file {path} is empty")
        self._secrets.add(value)
        return value

    def _current_token(self) -> str:
        s = self.settings
        if s.token_file is not None:
            return self._read_secret_file(s.token_file, "token")
        token = os.environ.get("VAULT_TOKEN", "").strip()
        if not token:
            raise VaultCallError(None, "no Vault token: set VAULT_TOKEN or token_file")
        self._secrets.add(token)
        return token

    def _login(self) -> None:
        """Get a token (caller holds the lock and has built the hvac client)."""
        s = self.settings
        if s.auth == "token":
            token = self._current_token()
        else:
            if s.auth == "approle":
                where = f"login (approle at auth/{s.approle_mount})"
                secret_id = (
                    self._read_secret_file(s.secret_id_file, "secret_id")
                    if s.secret_id_file is not None
                    else None
                )

                def login(c: Any) -> Any:
                    return c.auth.approle.login(
                        role_id=s.role_id, secret_id=secret_id, mount_point=s.approle_mount
                    )

            else:
                where = f"login (kubernetes at auth/{s.kubernetes_mount})"
                jwt = self._read_secret_file(s.jwt_file, "service account token")

                def login(c: Any) -> Any:
                    return c.auth.kubernetes.login(
                        role=s.role, jwt=jwt, mount_point=s.kubernetes_mount
                    )

            self._hvac.token = ""
            try:
                resp = login(self._hvac)
                token = str(resp["auth"]["client_token"])
            except VaultCallError:
                raise
            except Exception as e:
                err = self._wrap(e)
                raise VaultCallError(err.status, f"{where}: {err.reason}", err.errors) from None
        self._secrets.add(token)
        self._hvac.token = token
        self._token = token

    # -- calls --------------------------------------------------------------

    def call(self, fn: Callable[[Any], T]) -> T:
        """``fn(hvac_client)``; any failure becomes a :class:`VaultCallError`.

        On 401/403 the credentials are renewed once (re-read token, or log in
        again) and ``fn`` runs a second time: a denied request did nothing.
        """
        from hvac import exceptions as hvac_exc

        renewed = False
        while True:
            used: str | None = None
            try:
                with self._lock:
                    client = self._client()
                    used = self._token
                return fn(client)
            except VaultCallError:
                raise
            except (hvac_exc.Forbidden, hvac_exc.Unauthorized) as e:
                if renewed or not self._renew(used):
                    raise self._wrap(e) from None
                renewed = True
            except Exception as e:
                raise self._wrap(e) from None

    def _renew(self, used: str | None) -> bool:
        """Drop the token that was refused; True when a retry may succeed."""
        with self._lock:
            if self._token != used:
                return True  # another thread already renewed it
            if self.settings.auth == "token":
                fresh = self._current_token()
                if fresh == used:
                    return False  # same token: retrying cannot help
                self._hvac.token = fresh
                self._token = fresh
                return True
            self._token = None  # the next _client() logs in again
            return True

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        text = " ".join(text.split())
        return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."

    def _wrap(self, e: BaseException) -> VaultCallError:
        import requests
        from hvac import exceptions as hvac_exc

        if isinstance(e, hvac_exc.VaultError):
            if isinstance(e, hvac_exc.ParamValidationError):
                return VaultCallError(None, self.scrub(str(e.args[0] if e.args else e)))
            status = _STATUS_BY_NAME.get(type(e).__name__)
            errors = tuple(_clean_error(str(x)) for x in (e.errors or ()))
            detail = "; ".join(errors)
            if not detail and isinstance(e.text, str) and not e.text.lstrip().startswith("{"):
                detail = e.text.strip()
            if not detail:
                detail = {404: "not found", 403: "permission denied"}.get(status or 0, "")
            head = f"HTTP {status}" if status else type(e).__name__
            reason = f"{head}: {detail}" if detail else head
            return VaultCallError(status, self.scrub(reason), errors)
        if isinstance(e, requests.exceptions.Timeout):
            return VaultCallError(
                None, f"no answer from {self.url} within {self.settings.timeout:g}s (timed out)"
            )
        if isinstance(e, requests.exceptions.SSLError):
            m = _SSL_RE.search(str(e))
            return VaultCallError(
                None, self.scrub(f"TLS error with {self.url} ({m.group(1) if m else 'handshake'})")
            )
        if isinstance(e, requests.exceptions.ConnectionError):
            if "timed out" in str(e):
                return VaultCallError(
                    None, f"no answer from {self.url} within {self.settings.timeout:g}s (timed out)"
                )
            m = _ERRNO_RE.search(str(e))
            detail = m.group(1).strip() if m else "connection failed"
            return VaultCallError(None, self.scrub(f"cannot connect to {self.url} ({detail})"))
        if isinstance(e, requests.exceptions.RequestException):
            return VaultCallError(None, f"request to {self.url} failed ({type(e).__name__})")
        if isinstance(e, KeyError | TypeError | ValueError):
            return VaultCallError(None, f"unexpected answer from {self.url} ({type(e).__name__})")
        raise e


_MULTI_RE = re.compile(r"^\s*\d+ errors? occurred:\s*")


def _clean_error(text: str) -> str:
    """One server error as one phrase.

    Vault wraps some errors in Go's multierror text ("1 error occurred:\\n\\t*
    permission denied\\n\\n"): the header and bullets are dropped.
    """
    m = _MULTI_RE.match(text)
    if m is None:
        return " ".join(text.split())
    items = [" ".join(p.split()) for p in text[m.end() :].split("\n\t* ")]
    return "; ".join(i.lstrip("* ").strip() for i in items if i.strip())


def _make_session(s: VaultSettings) -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=s.retries,
        connect=s.retries,
        # A request the server may have acted on is never replayed. False (not
        # 0) so a read timeout surfaces as itself, not as a "connection error".
        read=False,
        redirect=0,
        status=s.retries,
        other=0,
        backoff_factor=0.2,
        status_forcelist=frozenset({502, 503, 504}),
        allowed_methods=frozenset({"GET", "HEAD", "LIST", "OPTIONS"}),
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    session.verify = s.verify
    if s.verify is False and s.url.startswith("https:"):
        # Said once here, not by urllib3 on every request (a warning per
        # signature would bury everything else in the log).
        import warnings

        from urllib3.exceptions import InsecureRequestWarning

        host = urlsplit(s.url).hostname or ""
        warnings.filterwarnings(
            "ignore",
            message=f"Unverified HTTPS request is being made to host '{re.escape(host)}'",
            category=InsecureRequestWarning,
        )
        log.warning("vault.tls_verify_disabled", url=s.url)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --------------------------------------------------------------------------- KV v2 store

#: Store-only URL parameters (the rest are the client options above).
STORE_OPTIONS: frozenset[str] = frozenset({"lock_ttl"})
DEFAULT_LOCK_TTL = 20.0
_LOCK_TTL_RANGE = (2.0, 3600.0)
LOCK_SUFFIX = ".lock"
LEASE_SUFFIX = ".lease"


def _query_options(url: str, query: str) -> dict[str, Any]:
    where = f"state {url} parameter"
    pairs = parse_qsl(query, keep_blank_values=True)
    seen: dict[str, Any] = {}
    known = CLIENT_OPTIONS | STORE_OPTIONS
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"{where} {key}: given twice")
        if key == "token":
            raise ConfigError(
                f"{where} token: a token never goes in the state URL; use token_file or VAULT_TOKEN"
            )
        if key not in known:
            raise ConfigError(f"{where} {key}: unknown (known: {', '.join(sorted(known))})")
        conv: Any = value
        try:
            if key in ("timeout", "lock_ttl"):
                conv = float(value)
            elif key == "retries":
                conv = int(value)
            elif key == "tls_verify":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                conv = value.lower() in ("true", "1")
        except ValueError:
            raise ConfigError(f"{where} {key}: bad value {value!r}") from None
        seen[key] = conv
    return seen


def _kv_time(text: Any) -> datetime | None:
    """A KV ``created_time`` (RFC 3339, nanoseconds) as an aware datetime, or None."""
    if not isinstance(text, str) or not text:
        return None
    m = _KV_TIME_RE.fullmatch(text)
    if m is None:
        return None
    try:
        return datetime.fromisoformat(f"{m.group(1)}{(m.group(2) or '')[:7]}+00:00")
    except ValueError:
        return None


_KV_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


@dataclass
class _Doc:
    """One small KV v2 secret as read: its JSON field, KV version and server-side age."""

    doc: dict[str, Any] | None
    version: int
    #: Seconds since this version was written, on the server's clock (None: unknown).
    age: float | None


class _PassLock:
    """The pass lock this process holds: its KV version, renewed in the background."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.renewed = time.monotonic()
        self.lost: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


class VaultKVStore(StateStore):
    """``vault://MOUNT/PATH``: the state document in a KV v2 secret, written with ``cas``.

    The document is one field (``state``) holding the same JSON as the file
    store (``{"version": N, ...}``); N is the KV version the write creates, and
    the KV version is the compare-and-swap token: ``cas=0`` creates, ``cas=N``
    updates, and Vault refuses the loser of a race, which becomes
    :class:`ConflictError` so the caller re-reads. Connection and auth come
    from ``VAULT_*`` environment variables and optional query parameters with
    the backend's option names (``?auth=approle&role_id=...&secret_id_file=...``).

    Two small secrets live beside it, both written with ``cas`` too:

    - ``PATH.lock``: held for a whole pass (:meth:`exclusive`). CAS alone keeps
      the document consistent, but a pass has side effects before its commit:
      without the lock, two processes generating at once each see the other's
      fresh, not yet recorded transit key as an orphan and adopt or destroy it
      while the other is about to record it. The lock expires on the server's
      clock (a holder that died frees it after ``lock_ttl``), and is renewed in
      the background while held; a pass that lost it refuses to commit.
    - ``PATH.lease``: the daemon replicas' lease record (:mod:`keymgr.lease`).
    """

    FIELD = "state"
    #: ``KeyManager.sign`` asks for :meth:`fingerprint` (one metadata read) at
    #: most once a second, not before every signature: a read per signature
    #: would double the Vault requests of a busy signer, whose transit backend
    #: makes exactly one. Why a one-second window is safe: ``KeyManager._check_fresh``.
    fingerprint_window: ClassVar[float] = 1.0

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        mount = parts.netloc
        path = parts.path.strip("/")
        if parts.scheme != "vault" or not mount or not path or "@" in mount:
            raise ConfigError(f"daemon.state: {url!r}: expected vault://MOUNT/PATH")
        if not _MOUNT_RE.fullmatch(mount) or not _MOUNT_RE.fullmatch(path):
            raise ConfigError(f"daemon.state: {url!r}: bad mount or path")
        if parts.fragment:
            raise ConfigError(f"daemon.state: {url!r}: unexpected '#' fragment")
        self.mount = mount
        self.path = path
        self.url = f"vault://{mount}/{path}"
        options = _query_options(self.url, parts.query)
        lock_ttl = options.pop("lock_ttl", DEFAULT_LOCK_TTL)
        low, high = _LOCK_TTL_RANGE
        if not math.isfinite(lock_ttl) or not low <= lock_ttl <= high:
            raise ConfigError(
                f"state {self.url} parameter lock_ttl: must be between {low:g} and {high:g} "
                f"seconds, got {lock_ttl:g}"
            )
        self.lock_ttl: float = lock_ttl
        self._vault = vault_client(options, f"state {self.url}", None, sep=" parameter ")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lock = threading.RLock()
        self._held: _PassLock | None = None
        self._depth = 0

    def _error(self, op: str, e: VaultCallError) -> StoreError:
        return StoreError(f"state {self.url}: {op}: {e.reason}")

    # -- the state document ---------------------------------------------------

    def load(self) -> tuple[State, int]:
        mount, path = self.mount, self.path
        try:
            resp = self._vault.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
            )
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return self._absent()
            raise self._error("read", e) from None
        try:
            data = resp["data"]
            version = int(data["metadata"]["version"])
            doc = json.loads(data["data"][self.FIELD])
            doc.pop("version")
            state = State.from_dict(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(
                f"state {self.url}: read: corrupt state document ({type(e).__name__}: {e})"
            ) from None
        return state, version

    def _absent(self) -> tuple[State, int]:
        """No readable latest version: a fresh store, unless it was deleted."""
        meta = self._metadata("read")
        if meta is None:
            return State(), 0
        current = int(meta.get("current_version") or 0)
        if current == 0:
            return State(), 0
        # Starting over would forget every key the state records (and the
        # orphan logic would then destroy them): refuse, and say how to fix it.
        raise StoreError(
            f"state {self.url}: read: the latest version ({current}) is deleted or destroyed; "
            f"restore it (bao kv undelete -mount={self.mount} -versions={current} {self.path}) "
            "or delete the secret's metadata to start from an empty state"
        )

    def _metadata(self, op: str) -> dict[str, Any] | None:
        mount, path = self.mount, self.path
        try:
            resp = self._vault.call(
                lambda c: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
            )
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return None
            raise self._error(op, e) from None
        data = resp.get("data") if isinstance(resp, dict) else None
        return data if isinstance(data, dict) else {}

    def commit(self, state: State, token: int) -> int:
        held = self._held
        if held is not None and held.lost is not None:
            # Another process may be acting on the same keys now: do not
            # record anything this pass did (its keys become orphans).
            raise StoreError(f"state {self.url}: commit: pass lock lost ({held.lost}); not writing")
        version = int(token)
        doc = {"version": version + 1, **state.to_dict()}
        text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
        crashpoint("store.before_write")
        try:
            new = self._write(self.path, {self.FIELD: text}, version)
        except VaultCallError as e:
            if _is_cas_failure(e):
                raise ConflictError(
                    f"state {self.url}: commit: changed by another writer "
                    f"(expected version {version})"
                ) from None
            raise self._error("commit", e) from None
        crashpoint("store.after_write")
        return new or version + 1

    def fingerprint(self) -> object:
        """The current KV version (one metadata read; see :attr:`fingerprint_window`).

        Any error, or no document yet, gives None: the caller re-reads the
        state, which reports the real failure.
        """
        try:
            meta = self._metadata("read metadata")
        except StoreError:
            return None
        version = int((meta or {}).get("current_version") or 0)
        return version or None

    # -- small CAS documents (lock, lease) -------------------------------------

    def _write(self, path: str, data: dict[str, Any], cas: int) -> int | None:
        """One KV v2 write with ``cas``; the new KV version (None if the answer lacks it)."""
        mount = self.mount
        resp = self._vault.call(
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=path, secret=data, cas=cas, mount_point=mount
            )
        )
        try:
            return int(resp["data"]["version"])
        except (KeyError, TypeError, ValueError):
            return None

    def _read_doc(self, suffix: str, field: str, op: str) -> _Doc:
        """Read ``PATH<suffix>``; a missing or deleted secret is ``doc=None`` with its version."""
        mount, path = self.mount, self.path + suffix
        try:
            resp = self._vault.call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=False
                )
            )
            server_now = self._vault.last_server_time()
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return _Doc(None, 0, None)
            raise self._error(op, e) from None
        try:
            data = resp["data"]
            meta = data["metadata"]
            version = int(meta["version"])
            if meta.get("deletion_time") or not data.get("data"):
                return _Doc(None, version, None)
            doc = json.loads(data["data"][field])
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(
                f"state {self.url}: {op}: unreadable {path} ({type(e).__name__}: {e})"
            ) from None
        created = _kv_time(meta.get("created_time"))
        age = (server_now - created).total_seconds() if server_now and created else None
        return _Doc(doc, version, age)

    def _write_doc(self, suffix: str, field: str, doc: dict[str, Any], cas: int, op: str) -> int:
        try:
            new = self._write(self.path + suffix, {field: json.dumps(doc)}, cas)
        except VaultCallError as e:
            if _is_cas_failure(e):
                raise ConflictError(
                    f"state {self.url}: {op}: changed by another process (expected version {cas})"
                ) from None
            raise self._error(op, e) from None
        return new or cas + 1

    # -- the replicas' lease (keymgr.lease) ---------------------------------------

    def read_lease(self) -> tuple[dict[str, Any] | None, int]:
        d = self._read_doc(LEASE_SUFFIX, "lease", "read lease")
        return d.doc, d.version

    def write_lease(self, doc: dict[str, Any], token: int) -> int:
        return self._write_doc(LEASE_SUFFIX, "lease", doc, int(token), "write lease")

    # -- the pass lock -----------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold ``PATH.lock`` for a pass (re-entrant within this object).

        Waits up to ``timeout`` seconds for another process's pass to end; a
        lock left by a process that died is taken over once it is older than
        its TTL (20 s by default, below the callers' 30 s timeout).
        """
        with self._lock:
            nested = self._depth > 0
            if nested:
                self._depth += 1
        if nested:
            try:
                yield
            finally:
                with self._lock:
                    self._depth -= 1
            return
        held = self._acquire(timeout)
        with self._lock:
            self._held, self._depth = held, 1
        try:
            yield
        finally:
            with self._lock:
                self._held, self._depth = None, 0
            self._release(held)

    def _lock_doc(self) -> dict[str, Any]:
        return {"holder": self.owner, "ttl": self.lock_ttl}

    def _acquire(self, timeout: float) -> _PassLock:
        start = time.monotonic()
        deadline = start + timeout
        # (version, first seen): a lock whose version has not moved for its
        # TTL on our own clock is dead too, even if the server sent no Date.
        seen: tuple[int, float] | None = None
        while True:
            cur = self._read_doc(LOCK_SUFFIX, "lock", "lock")
            now = time.monotonic()
            holder = None if cur.doc is None else cur.doc.get("holder")
            free = holder is None
            if not free:
                ttl = _ttl_of(cur.doc, self.lock_ttl)
                if seen is None or seen[0] != cur.version:
                    seen = (cur.version, now)
                stale = now - seen[1] > ttl
                free = stale or (cur.age is not None and cur.age > ttl)
            if free:
                try:
                    version = self._write_doc(
                        LOCK_SUFFIX, "lock", self._lock_doc(), cur.version, "lock"
                    )
                except ConflictError:
                    seen = None  # someone else took it: look again
                else:
                    if holder is not None:
                        log.warning("lock.taken_over", state=self.url, holder=holder)
                    return self._start(version)
            if now >= deadline:
                raise StoreError(
                    f"state {self.url}: lock: held by another keymgr process ({holder}) "
                    f"for more than {now - start:.0f}s"
                )
            time.sleep(random.uniform(0.05, 0.25))  # noqa: S311 - jitter, not crypto

    def _start(self, version: int) -> _PassLock:
        held = _PassLock(version)
        thread = threading.Thread(
            target=self._renew_loop, args=(held,), name="keymgr-vault-lock", daemon=True
        )
        held.thread = thread
        thread.start()
        return held

    def _renew_loop(self, held: _PassLock) -> None:
        while not held.stop.wait(self.lock_ttl / 3):
            try:
                held.version = self._write_doc(
                    LOCK_SUFFIX, "lock", self._lock_doc(), held.version, "renew lock"
                )
            except ConflictError:
                held.lost = "taken over by another process"
                return
            except StoreError as e:
                if time.monotonic() - held.renewed > self.lock_ttl:
                    held.lost = f"not renewed for {self.lock_ttl:g}s: {e}"
                    return
                continue
            held.renewed = time.monotonic()

    def _release(self, held: _PassLock) -> None:
        held.stop.set()
        if held.thread is not None:
            held.thread.join(timeout=self._vault.settings.timeout * 2)
        if held.lost is not None:
            return
        free = {"holder": None, "ttl": self.lock_ttl}
        try:
            self._write_doc(LOCK_SUFFIX, "lock", free, held.version, "unlock")
        except StoreError as e:  # it expires on its own
            log.warning("lock.release_failed", state=self.url, error=str(e))

    def __repr__(self) -> str:
        return f"VaultKVStore({self.url!r})"


def _ttl_of(doc: Mapping[str, Any] | None, default: float) -> float:
    """The TTL the holder wrote into its lock (its renewal cadence), else ours."""
    value = None if doc is None else doc.get("ttl")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def _is_cas_failure(e: VaultCallError) -> bool:
    return e.status == 400 and any("check-and-set" in x for x in e.errors)
