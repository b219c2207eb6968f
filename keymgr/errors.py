"""Error types that map one-to-one onto the CLI's exit codes.

Every error raised to the user carries a one-line message that names the thing at
fault (file, field, key id); the CLI prints ``str(err)`` and exits with
``err.exit_code``, never a traceback.
"""

from __future__ import annotations


class KeymgrError(Exception):
    """An operation failed (backend, publisher, store): exit code 1."""

    exit_code = 1


class ConfigError(KeymgrError):
    """Bad configuration or bad usage: exit code 2, and nothing was changed."""

    exit_code = 2


class UsageError(ConfigError):
    """Bad command-line usage (unknown ring, bad --at, ...): exit code 2."""


class BackendError(KeymgrError):
    """A key backend refused or failed an operation."""


class KeyNotFoundError(BackendError):
    """The backend holds no key of that ring and kid."""


class PublishError(KeymgrError):
    """A publisher could not write or confirm a JWKS document."""


class NotADocument(PublishError):
    """The target holds something keymgr never writes there: a symlink, a
    FIFO, a device or a directory at a file's name, or more than
    ``keymgr.publishers.MAX_DOCUMENT`` bytes. It is not read; a publish
    writes the document over it."""


class StoreError(KeymgrError):
    """The state store could not be read or written."""


class ConflictError(StoreError):
    """A compare-and-swap write lost the race: re-read and retry."""


class StateError(StoreError):
    """The stored state cannot be trusted or acted on as it is: a document that
    fails validation, a state lost while the backend still holds keymgr's keys,
    or keys in a backend that no record or intent accounts for. Nothing was
    changed; the message says what to restore or which command takes over."""


class AuditError(KeymgrError):
    """The audit log is damaged or does not match the anchor in state."""


class AuditIOError(AuditError):
    """The audit log could not be read or appended to (a full disk, a
    permission, an I/O error): no transition is made without its record, but
    it is not evidence that the log was tampered with, and is not counted as
    a failed audit check (``keymgr_audit_verify_failures_total``)."""


class KeyIntegrityError(BackendError):
    """A stored key failed authentication (tampered file or wrong master key)."""
