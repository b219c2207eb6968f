"""Operational logs (structlog): JSON lines on stdout by default, readable
console output on a TTY. Separate from the audit log, which is evidence."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

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
    """CLI commands log warnings and up to stderr; the daemon logs to stdout."""
    stream = sys.stderr if cli else sys.stdout
    if json_logs is None:
        json_logs = not stream.isatty()
    lvl = logging.WARNING if cli else getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
