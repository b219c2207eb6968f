"""The key backend interface: where private keys live.

A backend never hands out private key material. The rest of keymgr asks it to
generate a key, to give the public half, to sign, and to destroy. Backends are
found by type name through the entry-point group ``keymgr.backends`` (see
:mod:`keymgr.plugins`), so a third party can ship one as its own distribution;
:class:`keymgr.testing.conformance.BackendTests` is the suite it should pass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

#: A function that turns a JWS signing input into the JWS signature bytes
#: (for ECDSA the raw fixed-length r||s, as RFC 7518 requires).
Signer = Callable[[bytes], bytes]


@dataclass(frozen=True)
class GeneratedKey:
    """What a backend returns after creating a key: never the private half."""

    kid: str
    public_jwk: dict[str, str]


class Backend(abc.ABC):
    """Base class every key backend derives from.

    ``name`` is the config table name (``[backends.NAME]``); ``options`` is that
    table. Constructors read it with :class:`keymgr.options.Options` (one
    wording for every bad option, naming ``backends.NAME.FIELD``); they must
    not do network I/O so that ``keymgr config check`` stays offline and fast.
    """

    type_name: ClassVar[str]
    algorithms: ClassVar[frozenset[str]]

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        self.name = name

    @abc.abstractmethod
    def generate(self, ring: str, alg: str, *, intent: str | None = None) -> GeneratedKey:
        """Create a new key for ``ring``; tagged/named so ``list_keys`` finds it.

        ``intent`` is the nonce of the write-ahead intent the reconciler
        committed before this call. The backend marks the key with it (a tag,
        a name or a label) and :meth:`intent_of` returns it, so that a key left
        behind by a crash between this call and the state commit is recognised
        as that intent's orphan, and any other key state does not know is not.
        """

    @abc.abstractmethod
    def public_jwk(self, ring: str, kid: str) -> dict[str, str]:
        """The public JWK members (kty and key members only) of a stored key."""

    @abc.abstractmethod
    def signer(self, ring: str, kid: str, alg: str) -> Signer:
        """A signing function for the key; may be cached by the backend."""

    @abc.abstractmethod
    def destroy(self, ring: str, kid: str) -> None:
        """Destroy the private key. Idempotent: an already absent key is fine."""

    @abc.abstractmethod
    def list_keys(self, ring: str) -> list[str]:
        """Kids of the keys this backend holds for ``ring`` (created by keymgr)."""

    def intent_of(self, ring: str, kid: str) -> str | None:
        """The intent nonce the key was marked with at :meth:`generate`, or None
        (a key made before intents existed, or by something else)."""
        return None

    def paths(self) -> dict[str, Path]:
        """Local files/dirs this backend owns, by option name (for collision checks)."""
        return {}

    def check(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Raise BackendError when the backend cannot be reached or used."""

    def offline_check(self) -> list[str]:
        """For ``keymgr config check``: look at local files only (no network, no
        key material): raise ConfigError naming the field for what cannot work,
        return warnings for what may not. None by default."""
        return []
