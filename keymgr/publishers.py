"""Publishers write the public JWKS where verifiers fetch it.

A publish only counts once the target has been read back and compared byte for
byte: ``published_at`` (and so every promotion) hangs on that confirmation.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import ConfigError, PublishError
from keymgr.faults import crashpoint
from keymgr.fsutil import atomic_write


class Publisher(abc.ABC):
    type_name: ClassVar[str]

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        self.name = name

    def paths(self) -> dict[str, Path]:
        """Local files this publisher writes, by option name (for collision checks)."""
        return {}

    @abc.abstractmethod
    def read(self) -> bytes | None:
        """What the target serves now, or None when there is nothing yet."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Replace the served document atomically."""

    def publish(self, data: bytes) -> bool:
        """Make the target serve ``data`` and confirm it; True if it was written."""
        if self.read() == data:
            return False
        self.write(data)
        crashpoint("publish.after_write")
        if self.read() != data:
            raise PublishError(f"publisher {self.name}: read-back differs from what was written")
        return True


def _check_fields(name: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    for k in options:
        if k not in allowed:
            raise ConfigError(f"publishers.{name}.{k}: unknown field")


class FilePublisher(Publisher):
    """A JWKS file for nginx or any static server, replaced atomically."""

    type_name = "file"

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        _check_fields(name, options, {"type", "path", "mode", "cache_control"})
        raw = options.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"publishers.{name}.path: is required (a file path)")
        path = Path(raw)
        self.path = path if path.is_absolute() else Path(config_dir) / path
        mode = options.get("mode", "0644")
        try:
            self.mode = int(mode, 8) if isinstance(mode, str) else -1
        except ValueError:
            self.mode = -1
        if not 0 <= self.mode <= 0o777:
            raise ConfigError(f"publishers.{name}.mode: expected an octal string like '0644'")
        cc = options.get("cache_control")
        if cc is not None and not isinstance(cc, str):
            raise ConfigError(f"publishers.{name}.cache_control: must be a string")
        #: Documented for the static server in front of the file (see deploy/nginx).
        self.cache_control = cc

    def paths(self) -> dict[str, Path]:
        return {"path": self.path}

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise PublishError(
                f"publisher {self.name}: cannot read {self.path}: {e.strerror}"
            ) from None

    def write(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, self.mode)
        except OSError as e:
            raise PublishError(
                f"publisher {self.name}: cannot write {self.path}: {e.strerror}"
            ) from None

    def __repr__(self) -> str:
        return f"FilePublisher({self.name!r}, {os.fspath(self.path)!r})"


_PUBLISHERS: dict[str, str] = {
    "file": "keymgr.publishers:FilePublisher",
    "s3": "keymgr.s3:S3Publisher",
}


def publisher_class(type_name: str, where: str) -> type[Publisher]:
    target = _PUBLISHERS.get(type_name)
    if target is None:
        known = ", ".join(sorted(_PUBLISHERS))
        raise ConfigError(f"{where}: unknown publisher type {type_name!r} (known: {known})")
    import importlib

    mod, _, attr = target.partition(":")
    cls: type[Publisher] = getattr(importlib.import_module(mod), attr)
    return cls
