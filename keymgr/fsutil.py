"""Atomic, durable file writes: temp file in the same directory, fsync, rename,
fsync the directory. A crash at any point leaves either the old or the new
file, never a torn one.

The temp file has a random name (``.NAME.RANDOM.tmp``) and is created with
``O_CREAT|O_EXCL|O_NOFOLLOW``: whoever can write to the directory cannot guess
the name ahead of time, and a symlink or file planted at it is refused instead
of followed, so the write (and its chmod) cannot be redirected elsewhere. The
directory is opened once and every step (create, rename or link, fsync) goes
through that descriptor, so swapping a path component mid-write cannot split
the write across two directories either. Replacing ``path`` when it is itself a
symlink replaces the link, never the file it points to.

Reads trust nothing at a name either (:func:`open_regular`, :func:`read_file`,
:func:`read_regular`, :func:`open_append`): what is not a regular file (a FIFO,
a device, a directory) is refused without being waited on or read, and a
``limit`` refuses a file larger than keymgr ever writes there, unread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path
from typing import BinaryIO

from keymgr.faults import crashpoint

TMP_SUFFIX = ".tmp"
#: Attempts at a fresh random temp name before giving up (each collision is
#: either 1 in 2**64 or something planted in the directory).
_TMP_ATTEMPTS = 16
_TMP_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_prefix(name: str) -> str:
    """What the temp files of a target named ``name`` start with."""
    return f".{name}."


def is_temp_of(candidate: str, name: str) -> bool:
    """True if ``candidate`` is (or may be, from an older keymgr writing
    ``.NAME.PID.tmp``) a temp file of the target named ``name``: a crash leftover."""
    return re.fullmatch(re.escape(temp_prefix(name)) + r"[^./]+" + re.escape(TMP_SUFFIX),
                        candidate) is not None


def _create_temp(dir_fd: int, name: str, mode: int) -> tuple[str, int]:
    for _ in range(_TMP_ATTEMPTS):
        tmp = f"{temp_prefix(name)}{secrets.token_hex(8)}{TMP_SUFFIX}"
        try:
            return tmp, os.open(tmp, _TMP_FLAGS, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue  # something sits at that name (planted?): never reuse it, draw again
    raise FileExistsError(f"no free temp file name for {name} after {_TMP_ATTEMPTS} attempts")


#: Opening a file to read what keymgr wrote there: never through a symlink
#: planted at its name, and never blocking on a FIFO planted there.
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


class NotAFile(ValueError):
    """What sits at a path keymgr reads back is not a regular file it could
    have written (a symlink, a FIFO, a device, a directory), or is larger
    than anything it writes there. The message says which."""


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file at ``path`` (None when there is none).

    For files keymgr wrote and reads back, in a directory others may write
    to (a JWKS directory): a symlink there is not followed (keymgr replaces
    its files, it never writes through a link), a FIFO is not waited on
    (reading one would hang the pass for good), and a file over ``limit``
    bytes is not read into memory. Each raises :class:`NotAFile`; other
    failures are the OSError they are.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotAFile("is a symbolic link") from None
        raise
    with os.fdopen(_regular(fd), "rb") as f:
        return _read_at_most(f, limit)


#: Opening a file keymgr keeps (its state, its audit log, a key file, its
#: config): never blocking on a FIFO planted there. Symlinks are followed.
_NO_WAIT = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _regular(fd: int) -> int:
    """``fd`` once it is known to be a regular file, in blocking mode again
    (which changes nothing for a regular file); closed and NotAFile if not."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"is not a regular file (mode {stat.filemode(st.st_mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path, *, update: bool = False) -> BinaryIO:
    """``open(path, "rb")`` (``"rb+"`` with ``update``) for a file keymgr
    keeps, refusing with :class:`NotAFile` what is not a regular file,
    without waiting on it.

    Nothing read from storage is trusted, what sits at a name included: a
    FIFO planted at the state, the audit log, a key file or the config would
    hang every pass for good (``open`` waits for a writer), and a link to
    ``/dev/zero`` would be read until memory runs out. Symlinks are followed,
    since a Kubernetes ConfigMap or Secret mounts its files as links; what
    they lead to must be a regular file too. FileNotFoundError and other
    failures are the OSError they are.
    """
    fd = _regular(os.open(path, (os.O_RDWR if update else os.O_RDONLY) | _NO_WAIT))
    return os.fdopen(fd, "rb+" if update else "rb")


def read_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (:func:`open_regular`);
    NotAFile, unread, when it holds more than ``limit`` bytes."""
    with open_regular(path) as f:
        return f.read() if limit is None else _read_at_most(f, limit)


def _read_at_most(f: BinaryIO, limit: int) -> bytes:
    size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise NotAFile(f"holds {size} bytes, more than the {limit} keymgr writes at most")
    data = f.read(limit + 1)
    if len(data) > limit:  # grew since the stat
        raise NotAFile(f"holds more than the {limit} bytes keymgr writes at most")
    return data


def open_append(path: Path, mode: int) -> int:
    """A descriptor appending to the regular file at ``path``, created with
    ``mode`` if missing; NotAFile for anything else, without waiting on it
    (opening a FIFO to write waits for a reader: with O_NONBLOCK it fails)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NO_WAIT, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise NotAFile("is not a regular file (a FIFO)") from None
        raise
    return _regular(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``. ``os.write`` may write less than it is
    given and say so only by its count: on a disk that fills up, the first
    call writes what fits and the next raises ENOSPC. Ignoring the count
    would leave a short file (or a torn audit line) behind a call that
    returned as if it had written everything."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(path: Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> None:
    """Replace ``path`` with ``data``; with ``exclusive``, never replace an existing file."""
    dir_fd = os.open(path.parent, _DIR_FLAGS)
    try:
        tmp, fd = _create_temp(dir_fd, path.name, mode)
        try:
            try:
                os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask masked off
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            crashpoint("fs.before_rename")
            if exclusive:
                # Fails with FileExistsError instead of replacing (a symlink included).
                os.link(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)
                os.unlink(tmp, dir_fd=dir_fd)
            else:
                os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a directory keymgr writes in, or None (offline).

    It exists and is a writable directory, or its nearest existing ancestor is
    a writable directory it can be created in. For ``config check``: a stat
    and an access check per level, nothing created.
    """
    if path.exists():
        if not path.is_dir():
            return "exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"directory not writable by this user (uid {os.getuid()})"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable by this user (uid {os.getuid()})"
    return None
