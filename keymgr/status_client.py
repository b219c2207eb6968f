"""``keymgr status --json`` answered by the running daemon (``GET /v1/status``).

A fresh process must read, validate and plan every ring before it can write a
status: 10 s at 100,000 rings (docs/scale.md). The daemon already holds all of
that, validated, and keeps it current by reading only what changed; so when
the config has a ``[service]`` and its daemon answers on the service's Unix
socket, the command asks it and copies the answer to stdout. The answer is
what the command would have written itself: the daemon runs the same code
(``KeyManager.status_parts``) on a state it has just brought up to date.

The daemon's answer is taken only when all of these hold, otherwise the
command reads the store itself, as it always did (and words any error the
same way):

- the socket's peer (``SO_PEERCRED``) is root, this process's own uid, or the
  owner of the socket's folder: whoever controls that folder controls what
  answers at the path anyway. Anyone else is not asked (one stderr line);
- the daemon runs the very config this process read (same absolute path and
  bytes: :attr:`keymgr.config.Config.identity`); a config edited but not
  reloaded yet gets ``409 config_differs``, and the store is read directly;
- the answer is ``200``. An error (a refused state, not allowed) is left to
  the direct read, which says it as the command always has.

Once the first bytes are written, an answer cut short (the daemon stopped, a
chunk never came) ends the command with one line and exit 1: the chunked
framing tells a whole answer from a cut one.

The command asks before it parses its config (1.4 s of 3.6 s at 100,000
rings): :func:`socket_hint` reads the socket's path from the config's bytes,
and the identity is those bytes' hash. No parse is needed to trust the
answer: a daemon answers 200 only to the identity of the config it loaded
and checked, these very bytes at this very path. A hint read wrong (a
``[service]`` inside a multi-line string, say) can only point at a socket
that refuses, answers 409 or is not trusted; the command then parses the
config and asks the socket it names, unless it is the one already asked.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from keymgr.errors import KeymgrError
from keymgr.peercred import peer_credentials

#: ``keymgr status --json`` from the daemon's own state (keymgr.service).
STATUS_PATH = "/v1/status"
#: Header naming the config a ``GET /v1/status`` caller read (keymgr.config.Config.identity).
CONFIG_HEADER = "X-Keymgr-Config"
#: ``GET /v1/status?form=text``: ``keymgr status``'s text instead of its
#: JSON; each form with the content type it is answered with (checked by the
#: command: a daemon that predates the text form answers JSON to it).
FORM_PARAM = "form"
STATUS_FORMS = {"json": "application/json", "text": "text/plain; charset=utf-8"}
#: Seconds to connect; to wait for the answer to start (the daemon reads what
#: changed and plans first: well under a second at 100,000 rings once it runs;
#: a daemon that is stuck or still starting is not waited for longer, the
#: store is read instead); and to wait for each further part of it.
CONNECT_TIMEOUT = 2.0
ANSWER_TIMEOUT = 15.0
READ_TIMEOUT = 60.0
_COPY = 1 << 20


#: What :func:`socket_hint` reads of a config: the ``[service]`` header line,
#: the next table header, and ``socket = "..."`` with a plain basic string.
_SERVICE = re.compile(rb"^[ \t]*\[[ \t]*service[ \t]*\][ \t]*(?:#[^\r\n]*)?\r?$", re.M)
_NEXT_TABLE = re.compile(rb"^[ \t]*\[", re.M)
_SOCKET = re.compile(
    rb'^[ \t]*socket[ \t]*=[ \t]*"([^"\\\r\n]*)"[ \t]*(?:#[^\r\n]*)?\r?$', re.M
)
_ANY_SOCKET = re.compile(rb"^[ \t]*[\"']?socket\b", re.M)


def socket_hint(raw: bytes, config: Path) -> Path | None:
    """The ``[service]`` socket of the config whose bytes are ``raw`` (read
    from ``config``), as :func:`keymgr.service_config.parse_service` resolves
    it; None when these bytes have no ``[service]`` header line, or give the
    socket in a form other than a plain basic string (the config is then
    parsed first). Only a hint: see the module."""
    from keymgr.service_config import DEFAULT_SOCKET

    head = _SERVICE.search(raw)
    if head is None:
        return None
    end = _NEXT_TABLE.search(raw, head.end())
    table = raw[head.end() : end.start() if end is not None else len(raw)]
    found = _SOCKET.search(table)
    if found is None:
        if _ANY_SOCKET.search(table):
            return None
        return Path(DEFAULT_SOCKET)
    try:
        value = found.group(1).decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else config.parent / path


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=CONNECT_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(str(self._path))
            s.settimeout(ANSWER_TIMEOUT)
        except BaseException:
            s.close()
            raise
        self.sock = s


def trusted_peer(sock: socket.socket, path: Path) -> int | None:
    """The peer's uid when it may answer for ``path``, else None (see the module)."""
    _, uid, _ = peer_credentials(sock)
    if uid in (0, os.geteuid()):
        return uid
    try:
        owner = os.stat(path.parent).st_uid
    except OSError:
        return None
    return uid if uid == owner else None


def from_daemon(
    socket_path: Path,
    identity: str,
    write: Callable[[bytes], object],
    warn: Callable[[str], object],
    form: str = "json",
) -> bool:
    """Copy the daemon's ``status --json`` (``form="text"``: ``status``) to
    ``write``; False (nothing written) when it is not to be asked or did not
    answer 200 in that form, so the caller reads the store itself.
    KeymgrError once something was written and the answer is cut."""
    try:
        st = os.stat(socket_path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    conn = _UnixConnection(socket_path)
    try:
        try:
            conn.connect()
        except OSError:
            return False  # no daemon (a socket left behind), or not allowed to connect
        sock = conn.sock
        assert sock is not None
        if trusted_peer(sock, socket_path) is None:
            warn(
                f"status: {socket_path}: served by a uid that is neither root, this user "
                "nor the folder's owner; not asked, reading the store"
            )
            return False
        try:
            path = STATUS_PATH if form == "json" else f"{STATUS_PATH}?{FORM_PARAM}={form}"
            conn.request("GET", path, headers={CONFIG_HEADER: identity})
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            return False
        if resp.status != 200 or not resp.chunked:
            return False  # only chunked framing tells a whole answer from a cut one
        if resp.getheader("Content-Type") != STATUS_FORMS[form]:
            return False  # a daemon older than the text form answers JSON
        sock.settimeout(READ_TIMEOUT)  # the response reads this socket, whoever holds it
        started = False
        try:
            while chunk := resp.read1(_COPY):
                write(chunk)
                started = True
        except (OSError, http.client.HTTPException) as e:
            if not started:
                return False
            raise KeymgrError(
                f"status: the daemon's answer on {socket_path} was cut short "
                f"({type(e).__name__}); run again, or read the store: keymgr status --direct"
            ) from None
        return True
    finally:
        conn.close()
