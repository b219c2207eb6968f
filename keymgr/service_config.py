"""``[service]``: the local signing service's settings (keymgr.service).

Read with :class:`keymgr.options.Options`, like every other table, so a bad
value names its field (``service.rings.api.uids``). Reading is offline: user
and group names are resolved through the local user database (``pwd``,
``grp``), and no certificate file is opened here (``tls_context`` does that
when the daemon starts or reloads).

::

    [service]
    socket = "/run/keymgr/sign.sock"   # default; relative paths: the config's folder
    socket_mode = "0660"               # default
    socket_group = "issuers"           # optional: name or number
    listen = "127.0.0.1:9443"          # optional TCP listener: TLS 1.3, client certificates
    tls_cert = "service.crt"           # required with listen
    tls_key = "service.key"            # required with listen
    tls_client_ca = "clients-ca.pem"   # required with listen

    [service.rings.default]            # one table per ring served; other rings: 403
    users = ["api"]                    # Unix socket: the peer's uid (SO_PEERCRED) ...
    uids = [1001]
    groups = ["issuers"]               # ... or its gid or one of its supplementary groups
    gids = []
    cert_names = ["api.internal"]      # TCP: the client certificate's subject CN or a SAN

    [service.status]                   # optional: who else may read GET /v1/status
    groups = ["keymgr-ops"]            # (the daemon's own uid and root always may)
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keymgr.errors import ConfigError
from keymgr.options import Options

SERVICE_FIELDS = (
    "socket",
    "socket_mode",
    "socket_group",
    "listen",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "rings",
    "status",
)
RING_ACCESS_FIELDS = ("users", "uids", "groups", "gids", "cert_names")
DEFAULT_SOCKET = "/run/keymgr/sign.sock"
DEFAULT_MODE = "0660"
#: sun_path is 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107
_MODE_RE = re.compile(r"0?[0-7]{3}")
_LISTEN_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to chown: never an identity


@dataclass(frozen=True)
class RingAccess:
    """Who may use one ring: peer uids/gids on the socket, certificate names on TCP."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    cert_names: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Listeners:
    """What the service binds: a change of any of it restarts the listeners on reload."""

    socket: Path
    socket_mode: int
    socket_gid: int | None
    listen: tuple[str, int] | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None


@dataclass(frozen=True)
class ServiceSettings:
    listeners: Listeners
    #: Per ring served; a ring of ``[keyrings]`` that is not here refuses everyone.
    rings: Mapping[str, RingAccess]
    #: Who may read ``GET /v1/status`` besides the daemon's own uid and root
    #: (``[service.status]``; keymgr.service).
    status: RingAccess = RingAccess()


def parse_service(
    doc: Mapping[str, Any], config_dir: Path, rings: Mapping[str, Any]
) -> ServiceSettings:
    """``[service]`` of a parsed config document; ``rings`` are the configured keyrings."""
    tbl = doc.get("service")
    if not isinstance(tbl, dict):
        raise ConfigError("service: must be a table")
    o = Options(tbl, "service", SERVICE_FIELDS, config_dir=str(config_dir))
    sock = o.path("socket") or Path(DEFAULT_SOCKET)
    if len(os.fsencode(str(sock))) > MAX_SOCKET_PATH:
        raise o.err("socket", f"path longer than {MAX_SOCKET_PATH} bytes: {sock}")
    mode_text = o.string("socket_mode", DEFAULT_MODE)
    assert mode_text is not None
    if not _MODE_RE.fullmatch(mode_text):
        raise o.err("socket_mode", f"expected an octal string like '0660', got {mode_text!r}")
    mode = int(mode_text, 8)
    if mode & 0o002:
        raise o.err(
            "socket_mode",
            f"{mode_text} lets any local user write to the socket; use socket_group "
            "(every caller is still checked against [service.rings.*])",
        )
    group = o.raw("socket_group")
    gid = None if group is None else _gid(o, "socket_group", group)
    listen = _listen(o)
    tls = {k: o.path(k) for k in ("tls_cert", "tls_key", "tls_client_ca")}
    if listen is not None:
        for k, v in tls.items():
            if v is None:
                raise o.err(k, "is required with service.listen (TLS 1.3 with client certificates)")
    else:
        for k, v in tls.items():
            if v is not None:
                raise o.err(k, "only applies with service.listen")
    access: dict[str, RingAccess] = {}
    table = o.raw("rings", {})
    if not isinstance(table, dict):
        raise o.err("rings", "must be a table of [service.rings.RING] tables")
    for ring, spec in table.items():
        where = f"service.rings.{ring}"
        if ring not in rings:
            known = ", ".join(sorted(rings))
            raise ConfigError(f"{where}: unknown ring {ring!r} (configured: {known})")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a table")
        access[ring] = _ring_access(Options(spec, where, RING_ACCESS_FIELDS))
    status = o.raw("status", {})
    if not isinstance(status, dict):
        raise o.err("status", "must be a table like [service.rings.RING]")
    return ServiceSettings(
        listeners=Listeners(
            socket=sock,
            socket_mode=mode,
            socket_gid=gid,
            listen=listen,
            tls_cert=tls["tls_cert"],
            tls_key=tls["tls_key"],
            tls_client_ca=tls["tls_client_ca"],
        ),
        rings=access,
        status=_ring_access(Options(status, "service.status", RING_ACCESS_FIELDS)),
    )


def _listen(o: Options) -> tuple[str, int] | None:
    raw = o.string("listen")
    if raw is None:
        return None
    m = _LISTEN_RE.fullmatch(raw)
    if m is None or int(m.group(2)) > 65535:
        raise o.err("listen", f"expected HOST:PORT, got {raw!r}")
    return m.group(1).strip("[]"), int(m.group(2))


def _list(o: Options, name: str) -> list[Any]:
    v = o.raw(name, [])
    if not isinstance(v, list):
        raise o.err(name, f"expected a list, got {v!r}")
    return v


def _ring_access(o: Options) -> RingAccess:
    uids: set[int] = set()
    for u in _list(o, "uids"):
        uids.add(_number(o, "uids", u))
    for name in _list(o, "users"):
        if not isinstance(name, str) or not name:
            raise o.err("users", f"expected user names, got {name!r}")
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise o.err("users", f"no such user {name!r} (or give its number in uids)") from None
    gids = {_number(o, "gids", g) for g in _list(o, "gids")}
    for name in _list(o, "groups"):
        if not isinstance(name, str) or not name:
            raise o.err("groups", f"expected group names, got {name!r}")
        gids.add(_gid(o, "groups", name))
    names: set[str] = set()
    for n in _list(o, "cert_names"):
        if not isinstance(n, str) or not n.strip():
            raise o.err("cert_names", f"expected non-empty strings, got {n!r}")
        names.add(n.strip())
    return RingAccess(frozenset(uids), frozenset(gids), frozenset(names))


def _number(o: Options, field: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _ID_MAX:
        raise o.err(field, f"expected numeric ids, got {v!r}")
    return v


def _gid(o: Options, field: str, v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return _number(o, field, v)
    if not isinstance(v, str) or not v:
        raise o.err(field, f"expected a group name or number, got {v!r}")
    if v.isdigit():
        return _number(o, field, int(v))
    try:
        return grp.getgrnam(v).gr_gid
    except KeyError:
        raise o.err(field, f"no such group {v!r}") from None


def tls_context(li: Listeners) -> ssl.SSLContext:
    """The TCP listener's context: TLS 1.3 only, a client certificate from
    ``tls_client_ca`` required. Reads the files; ConfigError names the field."""
    assert li.tls_cert is not None and li.tls_key is not None and li.tls_client_ca is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(li.tls_cert, li.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"service.tls_cert/tls_key: cannot load {li.tls_cert} with {li.tls_key}: {_why(e)}"
        ) from None
    try:
        ctx.load_verify_locations(cafile=li.tls_client_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"service.tls_client_ca: cannot load {li.tls_client_ca}: {_why(e)}"
        ) from None
    return ctx


def _why(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(getattr(e, "reason", None) or e)
