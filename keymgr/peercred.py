"""Who is at the other end of a connected Unix socket, as the kernel says.

``SO_PEERCRED`` gives the pid, uid and gid the peer had at ``connect()``
(or at ``listen()`` for the side that listens): nothing the peer sends can
change it. The signing service reads its callers this way (keymgr.service),
and ``keymgr status`` the daemon it asks (keymgr.status_client).
"""

from __future__ import annotations

import socket
import struct

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of the connected Unix socket ``sock``."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid
