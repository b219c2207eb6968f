"""Key backends: where private keys live.

A backend never hands out private key material. The rest of keymgr asks it to
generate a key, to give the public half, to sign, and to destroy. Backends are
discovered through the entry-point group ``keymgr.backends`` (the way APScheduler
discovers job stores), so a third party can ship one as its own distribution.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from keymgr.errors import ConfigError

ENTRY_POINT_GROUP = "keymgr.backends"

#: The backends shipped with keymgr, as registered in pyproject.toml's entry
#: points. Looked up directly: scanning every installed distribution's entry
#: points costs more than all the rest of a CLI command's start-up.
BUILTIN = {
    "file": "backends.file:FileBackend",
    "aws-kms": "backends.aws_kms:KMSBackend",
    "vault-transit": "backends.vault_transit:VaultTransitBackend",
}

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
    table. Constructors validate options and raise :class:`ConfigError` naming
    ``backends.NAME.FIELD``; they must not do network I/O so that
    ``keymgr config check`` stays offline and fast.
    """

    type_name: ClassVar[str]
    algorithms: ClassVar[frozenset[str]]

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        self.name = name

    def _refuse_unknown(
        self, options: Mapping[str, Any], known: Collection[str], also: Collection[str] = ()
    ) -> None:
        """A misspelt option is an error, not a silent default. ``also``: accepted
        here but left out of the list shown (options refused later with a message
        of their own)."""
        unknown = sorted(set(options) - set(known) - set(also))
        if unknown:
            raise ConfigError(
                f"backends.{self.name}.{unknown[0]}: unknown option "
                f"(known: {', '.join(sorted(known))})"
            )

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


def backend_class(type_name: str, where: str) -> type[Backend]:
    """Find the backend class registered under ``type_name``.

    ``where`` names the config field (e.g. ``keymgr.toml: backends.kms.type``)
    for the error message.
    """
    target = BUILTIN.get(type_name)
    if target is not None:
        import importlib

        mod, _, attr = target.partition(":")
        builtin: type[Backend] = getattr(importlib.import_module(mod), attr)
        return builtin
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == type_name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise ConfigError(f"{where}: entry point {type_name!r} is not a keymgr backend")
            return cls
    known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
    raise ConfigError(
        f"{where}: unknown backend type {type_name!r} (known: {', '.join(known) or 'none'})"
    )
