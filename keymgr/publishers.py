"""Publishers write the public JWKS where verifiers fetch it.

A publish only counts once the target has been read back and compared byte for
byte: ``published_at`` (and so every promotion) hangs on that confirmation.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import PublishError
from keymgr.faults import crashpoint


@dataclass(frozen=True)
class Served:
    """A document as a verifier receives it: the body and the headers keymgr
    sets on it (``Content-Type``, ``Cache-Control``, ...). Both are part of what
    a publisher confirms: a changed ``Cache-Control`` changes how long
    verifiers keep the keys, so it is a different document."""

    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 over the body and the sorted headers (the body alone when
        there are none, so a plain file's digest is its content's)."""
        h = hashlib.sha256(self.body)
        for k in sorted(self.headers):
            h.update(f"\n{k.lower()}: {self.headers[k]}".encode())
        return h.hexdigest()


class Publisher(abc.ABC):
    """Where verifiers fetch the JWKS: writes it and reads back what is served.

    Subclasses implement :meth:`read` and :meth:`write`; a target that serves
    headers keymgr sets (an object store) also overrides :meth:`headers` and
    :meth:`fetch`. A publish only counts once :meth:`fetch` returns exactly the
    document meant (body and headers): every promotion hangs on that.
    """

    type_name: ClassVar[str]

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        self.name = name

    def paths(self) -> dict[str, Path]:
        """Local files this publisher writes, by option name (for collision checks)."""
        return {}

    def headers(self) -> dict[str, str]:
        """The headers keymgr serves the document with (none by default)."""
        return {}

    @property
    def where(self) -> str:
        """How errors name this publisher (and its target, where that helps)."""
        return f"publisher {self.name}"

    @abc.abstractmethod
    def read(self) -> bytes | None:
        """What the target serves now, or None when there is nothing yet."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Replace the served document atomically."""

    def fetch(self) -> Served | None:
        """The served document with its headers, or None when there is none.

        The default pairs :meth:`read` with :meth:`headers`: right for a target
        whose headers come from configuration (a static file behind nginx),
        where a change of them still changes the confirmed digest.
        """
        body = self.read()
        return None if body is None else Served(body, self.headers())

    def publish(self, data: bytes, force: bool = False) -> bool:
        """Make the target serve ``data`` and confirm it; True if it was written.

        An unchanged target is not written again, unless ``force`` (an
        earlier write was never confirmed and may still land after this one).
        """
        want = Served(data, self.headers())
        if not force and self.fetch() == want:
            return False
        self.write(data)
        crashpoint("publish.after_write")
        got = self.fetch()
        if got is None:
            raise PublishError(f"{self.where}: read-back: object missing")
        if got.body != data:
            raise PublishError(f"{self.where}: read-back: SHA-256 differs from what was written")
        if dict(got.headers) != dict(want.headers):
            names = {*got.headers, *want.headers}
            wrong = sorted(k for k in names if got.headers.get(k) != want.headers.get(k))
            detail = ", ".join(f"{k} {got.headers.get(k)!r}" for k in wrong)
            raise PublishError(f"{self.where}: read-back: served with {detail}")
        return True
