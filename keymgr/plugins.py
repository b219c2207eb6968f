"""One loader for the three kinds of plug-in: key backends, publishers, state stores.

Each kind is an entry-point group, the way APScheduler finds its job stores
and keyring its backends, so a third party ships one as its own distribution:

- ``keymgr.backends``: a :class:`keymgr.backend.Backend` subclass, named by
  ``[backends.NAME] type``;
- ``keymgr.publishers``: a :class:`keymgr.publishers.Publisher` subclass,
  named by ``[publishers.NAME] type``;
- ``keymgr.stores``: a factory ``(url) -> StateStore``, named by the scheme
  of ``[daemon] state`` (``s3`` for ``s3://...``). It validates the URL and
  does no I/O, so ``keymgr config check`` can call it offline.

The built-ins are looked up in :data:`BUILTIN` first, without scanning the
installed distributions' entry points: that scan costs more than all the rest
of a CLI command's start-up. ``tests/test_plugins.py`` checks that this table
and the entry points in ``pyproject.toml`` agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keymgr.errors import ConfigError

if TYPE_CHECKING:
    from keymgr.backend import Backend
    from keymgr.publishers import Publisher
    from keymgr.stores import StateStore

BACKENDS = "keymgr.backends"
PUBLISHERS = "keymgr.publishers"
STORES = "keymgr.stores"

#: The plug-ins shipped with keymgr, by group and name, as registered in
#: pyproject.toml's entry points.
BUILTIN: dict[str, dict[str, str]] = {
    BACKENDS: {
        "file": "keymgr.backends.local.keys:FileBackend",
        "aws-kms": "keymgr.backends.aws.kms:KMSBackend",
        "vault-transit": "keymgr.backends.vault.transit:VaultTransitBackend",
        "pkcs11": "keymgr.backends.pkcs11.keys:PKCS11Backend",
    },
    PUBLISHERS: {
        "file": "keymgr.backends.local.publisher:FilePublisher",
        "s3": "keymgr.backends.aws.publisher:S3Publisher",
        "gcs": "keymgr.backends.gcp.publisher:GCSPublisher",
        "azblob": "keymgr.backends.azure.publisher:AzureBlobPublisher",
    },
    STORES: {
        "file": "keymgr.backends.local.store:open_file_store",
        "s3": "keymgr.backends.aws.store:open_s3_store",
        "vault": "keymgr.backends.vault.store:open_vault_store",
        "gs": "keymgr.backends.gcp.store:open_gcs_store",
        "azblob": "keymgr.backends.azure.store:open_azblob_store",
    },
}

#: How errors name each kind.
_KIND = {BACKENDS: "backend type", PUBLISHERS: "publisher type", STORES: "state store"}


def names(group: str) -> list[str]:
    """Every name registered in ``group``: the built-ins and installed plug-ins."""
    from importlib.metadata import entry_points

    return sorted({*BUILTIN[group], *(ep.name for ep in entry_points(group=group))})


def load(group: str, name: str, where: str) -> Any:
    """The object registered as ``name`` in ``group``, imported on demand.

    ``where`` names the config field for the one-line error, e.g.
    ``keymgr.toml: backends.kms.type``.
    """
    target = BUILTIN[group].get(name)
    if target is not None:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    from importlib.metadata import entry_points

    for ep in entry_points(group=group, name=name):
        try:
            return ep.load()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{where}: plug-in {name!r} ({ep.value}) cannot load: {e}") from None
    raise ConfigError(
        f"{where}: unknown {_KIND[group]} {name!r} (known: {', '.join(names(group)) or 'none'})"
    )


def backend_class(type_name: str, where: str) -> type[Backend]:
    """The :class:`~keymgr.backend.Backend` subclass registered as ``type_name``."""
    from keymgr.backend import Backend

    cls = load(BACKENDS, type_name, where)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"{where}: entry point {type_name!r} is not a keymgr backend")
    return cls


def publisher_class(type_name: str, where: str) -> type[Publisher]:
    """The :class:`~keymgr.publishers.Publisher` subclass registered as ``type_name``."""
    from keymgr.publishers import Publisher

    cls = load(PUBLISHERS, type_name, where)
    if not (isinstance(cls, type) and issubclass(cls, Publisher)):
        raise ConfigError(f"{where}: entry point {type_name!r} is not a keymgr publisher")
    return cls


def store_factory(scheme: str, where: str) -> Callable[[str], StateStore]:
    """The factory registered for URLs ``scheme:...``: it takes the URL, does no I/O."""
    factory = load(STORES, scheme, where)
    if not callable(factory):
        raise ConfigError(f"{where}: entry point {scheme!r} is not a keymgr state store")
    return factory  # type: ignore[no-any-return]
