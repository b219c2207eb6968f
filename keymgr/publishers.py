"""Publishers write the public JWKS where verifiers fetch it.

A publish only counts once the target has been read back and compared byte for
byte: ``published_at`` (and so every promotion) hangs on that confirmation.

Two capabilities beyond the JWKS (docs/issuer.md):

- **Documents beside the JWKS.** A plug-in that sets ``supports_documents``
  returns from :meth:`Publisher.sibling` a publisher of another document on
  the same target (the OpenID Connect discovery document), written and
  confirmed exactly like the JWKS.
- **``cache_control = "auto"``.** keymgr.config derives the ``max-age`` from
  the rings' ``publish_ahead`` (:class:`AutoCacheControl`);
  :meth:`Publisher.headers_for` resolves it for each document.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import NotADocument, PublishError
from keymgr.faults import crashpoint
from keymgr.fsutil import NotAFile, read_regular


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


#: The ``cache_control`` value that asks keymgr to derive the header (AutoCacheControl).
AUTO = "auto"

#: The largest document keymgr writes to a target, and so the most it reads
#: back from one: a target holding more (planted there, or a runaway object)
#: is refused unread, not loaded into memory every pass. 256 MiB is far over
#: any JWKS (100,000 rings of three RSA-3072 keys on one publisher: ~180 MB);
#: a document over it is refused before it is written.
MAX_DOCUMENT = 256 << 20


def check_size(where: str, size: int | None) -> None:
    """NotADocument (a PublishError) when a target holds more than
    :data:`MAX_DOCUMENT` bytes (``size`` as the target reports it, before
    its body is read)."""
    if size is not None and size > MAX_DOCUMENT:
        raise NotADocument(
            f"{where}: the target holds {size} bytes, more than the {MAX_DOCUMENT} keymgr "
            "writes at most: not read (replaced by the next publish)"
        )


def read_file(where: str, path: Path) -> bytes | None:
    """A file publisher's :meth:`Publisher.read` of ``path``: its bytes, None
    when missing; PublishError, one line, when it cannot be read, and
    NotADocument when it is not a regular file of at most
    :data:`MAX_DOCUMENT` bytes (keymgr.fsutil.read_regular).
    Such a target counts as unreadable: continuity restarts, and the next
    publish replaces it (atomically: a planted symlink or FIFO is replaced,
    never written through)."""
    try:
        return read_regular(path, MAX_DOCUMENT)
    except NotAFile as e:
        raise NotADocument(f"{where}: {path} {e}") from None
    except OSError as e:
        raise PublishError(f"{where}: cannot read {path}: {e.strerror}") from None


@dataclass(frozen=True)
class AutoCacheControl:
    """``cache_control = "auto"``: a ``max-age`` derived from the rings' timing.

    ``base`` is a quarter of the shortest ``publish_ahead`` (A) of the rings
    the publisher serves, capped at a day; each document gets ``base`` ±
    ``jitter`` (10 %), chosen by a hash of ``seed`` (:meth:`value`): the
    same seed always gives the same header, so a document that did not change
    is never rewritten for its header, and every replica computes the same
    value. Why a quarter, and what the seed is per target: docs/issuer.md.
    """

    #: The max-age before jitter, in whole seconds.
    base: int
    #: The shortest publish_ahead it was derived from, and the rings that have it.
    publish_ahead: timedelta
    rings: tuple[str, ...] = ()
    #: The relative spread: the max-age is in ``[base*(1-j), base*(1+j))``.
    jitter: float = 0.1

    def max_age(self, seed: bytes) -> int:
        """The max-age for ``seed``: deterministic, within the jitter bounds."""
        u = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big") / 2**64  # [0, 1)
        return int(self.base * (1 - self.jitter + 2 * self.jitter * u))

    def bounds(self) -> tuple[int, int]:
        """The smallest and largest max-age any seed can get."""
        return int(self.base * (1 - self.jitter)), int(self.base * (1 + self.jitter))

    def value(self, seed: bytes) -> str:
        """The ``Cache-Control`` header value for ``seed``."""
        return f"public, max-age={self.max_age(seed)}"


class Publisher(abc.ABC):
    """Where verifiers fetch the JWKS: writes it and reads back what is served.

    Subclasses implement :meth:`read` and :meth:`write`; a target that serves
    headers keymgr sets (an object store) also overrides :meth:`headers` and
    :meth:`fetch`. A publish only counts once :meth:`fetch` returns exactly the
    document meant (body and headers): every promotion hangs on that.
    """

    type_name: ClassVar[str]
    #: True when :meth:`sibling` can serve other documents beside the JWKS
    #: (the OpenID Connect discovery document, ``"openid-configuration"``).
    supports_documents: ClassVar[bool] = False
    #: For each document :meth:`sibling` serves, the plug-in option that says
    #: where it goes (named in config errors), e.g.
    #: ``{"openid-configuration": "discovery_path"}``.
    document_options: ClassVar[Mapping[str, str]] = {}
    #: True when the target stores the headers keymgr sets with each document
    #: (an object store's metadata), so they can differ per document; False
    #: when a static server sends them from its own configuration. The jitter
    #: of ``cache_control = "auto"`` varies per document only when True.
    headers_per_document: ClassVar[bool] = False
    #: Set by keymgr.config when the ``cache_control`` option is ``"auto"``.
    auto_cache_control: AutoCacheControl | None = None

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        self.name = name

    def paths(self) -> dict[str, Path]:
        """Local files this publisher writes, by option name (for collision checks)."""
        return {}

    def headers(self) -> dict[str, str]:
        """The headers keymgr serves the document with (none by default)."""
        return {}

    def headers_for(self, data: bytes) -> dict[str, str]:
        """The headers ``data`` is served with: :meth:`headers`, with a
        ``Cache-Control`` of ``"auto"`` resolved by :attr:`auto_cache_control`.

        The jitter's seed is the publisher's name, plus the document itself
        when :attr:`headers_per_document`: stable while the document does not
        change. A plug-in that sends ``Cache-Control`` itself (an object
        store) must send this value, not its raw option.
        """
        headers = dict(self.headers())
        auto = self.auto_cache_control
        if auto is not None and headers.get("Cache-Control") == AUTO:
            seed = self.name.encode()
            if self.headers_per_document:
                seed += b"\n" + data
            headers["Cache-Control"] = auto.value(seed)
        return headers

    def sibling(self, document: str) -> Publisher | None:
        """A publisher of another ``document`` served beside the JWKS, or None
        when the plug-in was not told where it goes (or cannot serve it).

        ``document`` names what it holds; today only ``"openid-configuration"``
        (the OpenID Connect discovery document). The plug-in decides where it
        goes from an option of its own (:attr:`document_options`). The sibling
        is an ordinary publisher of the same target and settings (mode,
        headers, credentials): :meth:`publish` writes it atomically and
        confirms it by read-back like the JWKS. A plug-in that supports it sets
        :attr:`supports_documents`; the default serves no other document.
        """
        return None

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
        return None if body is None else Served(body, self.headers_for(body))

    def publish(self, data: bytes, force: bool = False) -> bool:
        """Make the target serve ``data`` and confirm it; True if it was written.

        An unchanged target is not written again, unless ``force`` (an
        earlier write was never confirmed and may still land after this one).
        """
        if len(data) > MAX_DOCUMENT:
            raise PublishError(
                f"{self.where}: the document would be {len(data)} bytes, more than the "
                f"{MAX_DOCUMENT} keymgr writes at most: spread the rings over more publishers"
            )
        want = Served(data, self.headers_for(data))
        if not force:
            try:
                served = self.fetch()
            except NotADocument:
                # Not a document keymgr wrote (a planted FIFO or symlink, an
                # oversized object): written over, then read back. Any other
                # failure to read is raised as it is.
                served = None
            if served == want:
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
