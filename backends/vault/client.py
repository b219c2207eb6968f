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

:mod:`keymgr.backends.vault.store` keeps keymgr's state in KV v2 secrets (an
adapter under :class:`keymgr.docstore.SharedStore`, written with KV's
check-and-set); this module is what it shares with the transit backend.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from keymgr.docstore import HTTP_POOL
from keymgr.fsutil import NotAFile, read_file
from keymgr.logs import get_logger
from keymgr.options import Options

if TYPE_CHECKING:  # pragma: no cover
    import requests

__all__ = [
    "CLIENT_OPTIONS",
    "VaultCallError",
    "VaultClient",
    "VaultSettings",
    "vault_client",
]

T = TypeVar("T")

log = get_logger("keymgr.backends.vault.client")

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


def _mount(o: Options, field: str, default: str) -> str:
    value = (o.string(field) or default).strip("/")
    if not _MOUNT_RE.fullmatch(value):
        raise o.err(field, f"not a valid mount path: {value!r}")
    return value


def parse_settings(o: Options) -> VaultSettings:
    """Validate the connection and auth options; errors name ``o.field(...)``.

    ``token`` must be among ``o``'s hidden options: it is refused here, with
    the reason, rather than as merely unknown.
    """
    if "token" in o:
        raise o.err(
            "token",
            "a literal token is refused (it would sit in the config file and in backups); "
            "use token_file or VAULT_TOKEN",
        )
    url = o.string("url", env="VAULT_ADDR")
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
        if field in o and auth != method:
            raise o.err(field, f'only used with auth = "{method}" (auth is "{auth}")')
    tls_verify = o.boolean("tls_verify", True)
    ca_cert = o.path("ca_cert", env="VAULT_CACERT") or o.path("ca_cert", env="VAULT_CAPATH")
    verify: bool | str = str(ca_cert) if (tls_verify and ca_cert is not None) else tls_verify
    role_id = o.string("role_id")
    if auth == "approle" and role_id is None:
        raise o.err("role_id", 'required with auth = "approle"')
    role = o.string("role")
    if auth == "kubernetes" and role is None:
        raise o.err("role", 'required with auth = "kubernetes"')
    return VaultSettings(
        url=url.rstrip("/"),
        namespace=o.string("namespace", env="VAULT_NAMESPACE"),
        verify=verify,
        timeout=o.number("timeout", DEFAULT_TIMEOUT, 0.1, _MAX_TIMEOUT),
        retries=o.integer("retries", DEFAULT_RETRIES, 0, _MAX_RETRIES),
        auth=auth,
        token_file=o.path("token_file"),
        role_id=role_id,
        secret_id_file=o.path("secret_id_file"),
        approle_mount=_mount(o, "approle_mount", "approle"),
        role=role,
        jwt_file=o.path("jwt_file") or Path(DEFAULT_JWT_FILE),
        kubernetes_mount=_mount(o, "kubernetes_mount", "kubernetes"),
    )


def vault_client(o: Options) -> VaultClient:
    """A lazy client for the options ``o`` (validated now, connected on first use)."""
    return VaultClient(parse_settings(o))


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
            value = read_file(path).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError, NotAFile) as e:
            # Never str() of a decode error: it quotes the token's bytes.
            reason = getattr(e, "strerror", None) or (
                str(e) if isinstance(e, NotAFile) else type(e).__name__
            )
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
    # A store reads 16 documents at once: keep their connections (keymgr.docstore.HTTP_POOL).
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=HTTP_POOL)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
