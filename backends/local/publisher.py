"""A JWKS file for nginx or any static server: publisher ``type = "file"``.

The file is replaced atomically (temp file, fsync, rename), so a verifier
never reads half a document, and read back before the write counts. With
``discovery_path`` it also writes the OpenID Connect discovery document
(:meth:`FilePublisher.sibling`), the same way.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import PublishError
from keymgr.fsutil import atomic_write
from keymgr.options import Options
from keymgr.publishers import Publisher, read_file


class FilePublisher(Publisher):
    """A JWKS file for nginx or any static server, replaced atomically."""

    type_name = "file"
    supports_documents: ClassVar[bool] = True
    document_options: ClassVar[Mapping[str, str]] = {"openid-configuration": "discovery_path"}

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        o = Options(
            options,
            f"publishers.{name}",
            ("type", "path", "mode", "cache_control", "discovery_path"),
        )
        # Relative to the config file, like every path in keymgr.
        self.path = Path(config_dir) / o.required("path", "a file path")
        discovery = o.string("discovery_path")
        #: Where the OpenID Connect discovery document goes (served at
        #: ISSUER/.well-known/openid-configuration by the static server).
        self.discovery_path = None if discovery is None else Path(config_dir) / discovery
        #: What a sibling holds, for errors (None: the JWKS).
        self._document: str | None = None
        mode = o.raw("mode", "0644")
        try:
            self.mode = int(mode, 8) if isinstance(mode, str) else -1
        except ValueError:
            self.mode = -1
        if not 0 <= self.mode <= 0o777:
            raise o.err("mode", f"expected an octal string like '0644', got {mode!r}")
        if self.mode & 0o022:
            # Whoever could rewrite the JWKS could publish a key of their own.
            raise o.err(
                "mode", f"{mode} lets group or others write the JWKS (use '0644' or '0640')"
            )
        cc = o.string("cache_control")
        #: Documented for the static server in front of the file (see deploy/nginx).
        self.cache_control = cc

    def headers(self) -> dict[str, str]:
        # The static server in front sets these from its own config; keymgr
        # counts the configured value as part of the document, so changing
        # cache_control restarts the continuous-publication clock.
        return {} if self.cache_control is None else {"Cache-Control": self.cache_control}

    def paths(self) -> dict[str, Path]:
        if self.discovery_path is None:
            return {"path": self.path}
        return {"path": self.path, "discovery_path": self.discovery_path}

    def sibling(self, document: str) -> FilePublisher | None:
        """The discovery document's file: same mode and Cache-Control, its own path."""
        if document != "openid-configuration" or self.discovery_path is None:
            return None
        other = copy.copy(self)
        other.path, other.discovery_path = self.discovery_path, None
        other._document = "discovery document"
        return other

    @property
    def where(self) -> str:
        what = self._document
        return f"publisher {self.name}" + ("" if what is None else f": {what} {self.path}")

    def read(self) -> bytes | None:
        # Not self.where: a sibling's names its path, which read_file's errors add.
        return read_file(f"publisher {self.name}", self.path)

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
