"""Operational logs (structlog): JSON lines on stdout by default, readable
console output on a TTY. Separate from the audit log, which is evidence."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

# structlog is imported where it is used, not here: with its asyncio support it
# costs ~100 ms, most of the start-up budget of a CLI command that never logs
# (see configure() and get_logger()).

#: Keys that must never reach a log line, whatever a caller passes.
_SECRET_KEYS = frozenset(
    {
        "token",
        "jwt",
        "private_key",
        "master_key",
        "secret",
        "password",
        "credentials",
        "d",
        "p",
        "q",
        "dp",
        "dq",
        "qi",
        "k",
    }
)


def drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        if k.lower() in _SECRET_KEYS:
            event[k] = "[redacted]"
    return event


def configure(level: str = "info", cli: bool = False, json_logs: bool | None = None) -> None:
    """The daemon logs to stdout. CLI commands log only critical lines to stderr:
    a failed command reports itself in exactly one error line (its exit path),
    and a second copy from the log would break that contract.

    For the CLI, while nothing has imported structlog yet, the setup is only
    recorded, and applied when a :func:`get_logger` logger is first used:
    ``keymgr status`` never pays for structlog's import. Hence every keymgr
    module logs through :func:`get_logger`, never ``structlog.get_logger``
    (a logger of structlog's own would bypass the deferred setup)."""
    global _pending
    if cli and "structlog" not in sys.modules:
        _pending = (level, cli, json_logs)
        return
    _pending = None
    _configure(level, cli, json_logs)


def _configure(level: str, cli: bool, json_logs: bool | None) -> None:
    import structlog

    stream = sys.stderr if cli else sys.stdout
    if json_logs is None:
        json_logs = not stream.isatty()
    lvl = logging.CRITICAL if cli else getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            drop_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    if not cli:
        _bridge_stdlib(stream, lvl, renderer, stamp)


class _KeymgrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a reconfigure replaces it."""


def _bridge_stdlib(stream: Any, lvl: int, renderer: Any, stamp: Any) -> None:
    """Send the daemon's library loggers (APScheduler, boto, hvac) through the same
    renderer, so stdout stays one format (JSON lines) for journald or the kubelet.

    Only named library loggers get the handler, never the root logger: a
    process embedding keymgr keeps its own logging setup.
    """
    import structlog

    handler = _KeymgrHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                stamp,
                drop_secrets,
            ],
        )
    )
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for old in [h for h in lib.handlers if isinstance(h, _KeymgrHandler)]:
            lib.removeHandler(old)
        lib.addHandler(handler)
        lib.propagate = False
        # APScheduler logs every job run at INFO; its warnings are what matter.
        lib.setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))


#: Loggers of the libraries the daemon drives.
_LIBRARY_LOGGERS = ("apscheduler", "botocore", "boto3", "urllib3", "hvac", "azure", "google")


# -- deferred configuration ------------------------------------------------------

_pending: tuple[str, bool, bool | None] | None = None


def _apply_pending() -> None:
    global _pending
    if _pending is not None:
        args, _pending = _pending, None
        _configure(*args)


class _LazyLogger:
    """``structlog.get_logger(name)``, imported and configured on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import structlog

            _apply_pending()
            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attr)


def get_logger(name: str) -> Any:
    """A structlog logger that imports structlog only when it first logs."""
    return _LazyLogger(name)
