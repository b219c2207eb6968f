"""A keymgr publisher for nginx ``gzip_static``: ``type = "gzip-file"``.

Writes the JWKS to ``path`` and a deterministic gzip of it (mtime 0) to
``path + ".gz"``, each atomically. A ``.gz`` that is missing or does not
decompress to the body reads as "not served": the next publish writes both.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import PublishError
from keymgr.fsutil import atomic_write
from keymgr.options import Options
from keymgr.publishers import Publisher, read_file

OPTIONS = ("cache_control", "mode", "path", "type")


class GzipFilePublisher(Publisher):
    """The JWKS as ``path`` and ``path.gz`` (for nginx ``gzip_static on``)."""

    type_name: ClassVar[str] = "gzip-file"

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        # keymgr's options reader: unknown options first, one error wording; no I/O,
        # so `keymgr config check` stays offline.
        o = Options(options, f"publishers.{name}", OPTIONS)
        self.path = Path(config_dir) / o.required("path", "a file path")  # absolute stays
        self.gz = self.path.with_name(self.path.name + ".gz")
        mode = o.raw("mode", "0644")
        try:
            self.mode = int(mode, 8)
        except (TypeError, ValueError):
            self.mode = -1
        if not 0 <= self.mode <= 0o777 or self.mode & 0o022:
            raise o.err("mode", f"expected an octal string like '0644' that "
                                f"group and others cannot write, got {mode!r}")
        cc = o.string("cache_control")
        if cc is not None and "\n" in cc:
            raise o.err("cache_control", f"expected a header value, got {cc!r}")
        self.cache_control: str | None = cc

    @property
    def where(self) -> str:
        return f"publisher {self.name} ({self.path})"

    def headers(self) -> dict[str, str]:
        # Set by nginx from its own config; part of the document keymgr confirms.
        return {} if self.cache_control is None else {"Cache-Control": self.cache_control}

    def paths(self) -> dict[str, Path]:
        return {"path": self.path, "path.gz": self.gz}

    def read(self) -> bytes | None:
        # keymgr's reader: a symlink, FIFO or oversized file planted at
        # either name is a one-line PublishError, never followed or waited on.
        body, packed = read_file(self.where, self.path), read_file(self.where, self.gz)
        if body is None or packed is None:
            return None
        # At most one byte more than the body: a .gz that inflates further
        # (a gzip bomb) is not the body, and is never inflated whole.
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            plain = inflate.decompress(packed, len(body) + 1)
        except zlib.error:  # not gzip at all
            return None
        return body if plain == body and inflate.eof else None

    def write(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.gz, gzip.compress(data, compresslevel=9, mtime=0), self.mode)
            atomic_write(self.path, data, self.mode)
        except OSError as e:
            raise PublishError(f"{self.where}: cannot write: {e.strerror}") from None
