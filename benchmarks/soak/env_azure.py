"""The Azure soak environment: file keys, the JWKS as a blob in Azurite, the state too.

``--backend azure``: keys in the file backend (there is no Azure key backend:
no local Key Vault server can be installed here), the JWKS published by the
``azblob`` publisher into a public-read container of an Azurite started for
the run (``tests/servers_azurite.py``: npm, pinned, installed on first use),
and with ``--cloud-state`` the state in an ``azblob://`` store beside it (as
``--cloud-state`` puts it in S3 or Vault KV for the other cloud backends; the
1 s fingerprint window is then in G). The origin the edge and the watcher read
is the blob over plain anonymous HTTP, like a CDN in front of a public
container. ``pause`` SIGSTOPs Azurite (``AzuriteServer.outage``): the
publisher, the store and the origin all stop answering at once.

Until pyproject.toml registers the ``azblob`` entry points, :meth:`AzureEnv.start`
adds them to ``keymgr.plugins.BUILTIN`` of this process (the soak's issuer
and checks); the daemon, a subprocess, needs the registration.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

from .edge import Origin
from .environments import Env
from .settings import REPO

#: Short timeouts: a request into a stopped Azurite fails within seconds.
_CONN = {"connect_timeout": 1, "read_timeout": 2, "max_attempts": 2}


class AzureOrigin:
    """The JWKS blob, read anonymously over HTTP with a short timeout (a CDN's origin fetch)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.poll = 0.1

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with urllib.request.urlopen(self.url, timeout=0.5) as resp:
                return resp.read(), resp.headers.get("Cache-Control")
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:
                return None, None
            raise


class AzureEnv(Env):
    name = "azure"
    publisher = "azblob"
    BLOB = ".well-known/jwks.json"

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from keymgr import plugins
        from tests import servers_azurite

        why = servers_azurite.node_tools()
        if why is not None:
            raise RuntimeError(f"Azurite needs Node.js: {why}")
        plugins.BUILTIN[plugins.PUBLISHERS].setdefault(
            "azblob", "keymgr.backends.azure.publisher:AzureBlobPublisher"
        )
        plugins.BUILTIN[plugins.STORES].setdefault(
            "azblob", "keymgr.backends.azure.store:open_azblob_store"
        )
        self.account = servers_azurite.ACCOUNT
        for name in [k for k in self.env if k.startswith("AZURE_")]:
            del self.env[name]
        self.server = servers_azurite.start_azurite(self.work)
        self.state_container = self.server.new_container("soak-state")
        self.jwks_container = self.server.new_container("soak-jwks", public=True)
        # The daemon's environment and this process's (the issuer's KeyManager).
        self.env["AZURE_STORAGE_CONNECTION_STRING"] = self.server.connection_string
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = self.server.connection_string

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def _conn(self) -> str:
        return "".join(f"{k} = {v}\n" for k, v in _CONN.items())

    def state_url(self) -> str:
        if not self.s.cloud_state:
            return super().state_url()
        query = "&".join(f"{k}={v}" for k, v in _CONN.items())
        return (
            f"azblob://{self.account}/{self.state_container}/soak/state.json"
            f"?auth=connection_string&{query}"
        )

    def publisher_toml(self) -> str:
        return (
            f'[publishers.{self.publisher}]\ntype = "azblob"\n'
            f'container = "{self.jwks_container}"\nblob = "{self.BLOB}"\n'
            f'cache_control = "{self.cache_control}"\nauth = "connection_string"\n{self._conn()}'
        )

    def origin(self) -> Origin:
        return AzureOrigin(f"{self.server.url}/{self.jwks_container}/{self.BLOB}")

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self.server.outage():
            yield
