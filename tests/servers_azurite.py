"""A real Azurite blob server (the Azure Storage emulator) for the Azure tests.

Azurite comes from npm, pinned in ``tests/azurite/package.json`` and its
``package-lock.json``; :func:`ensure_azurite` runs ``npm ci`` there on first
use (under a file lock, so parallel xdist workers install it once), like the
soak's ``jose`` verifier (``benchmarks/soak``). Version 3.35.0: the last
release that runs on Node 20 (3.36 wants Node 21, 3.37 Node 22).

Fixtures (import them into a test module, or list this module in
``tests/conftest.py``'s ``pytest_plugins``):

- ``azurite_server`` (session): one ``azurite-blob`` process per xdist
  worker, on a free 127.0.0.1 port, with a temporary ``--location``, started
  once and stopped at the end. ``--disableTelemetry``: the emulator sends
  nothing anywhere; ``--skipApiVersionCheck``: the Python SDK may speak a newer
  REST API version than this Azurite knows; ``--silent``: no access log.
- ``azurite`` (function): the server, checked to answer, and an environment
  that talks only to it: ``AZURE_STORAGE_CONNECTION_STRING`` is the dev
  account's (``devstoreaccount1`` and its published key) and every other
  ``AZURE_*`` variable of the machine is removed. Tests isolate themselves by
  container (:meth:`AzuriteServer.new_container`): Azurite has no reset.

Outages are simulated with :meth:`AzuriteServer.outage`: SIGSTOP, then SIGCONT
(as ``tests/servers_moto.py`` explains: the listening socket stays, so requests
hang until the client's read timeout, the nasty case, and the data survives).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks._common import npm_ci
from tests.servers_common import ServerProcess, launch

REPO = Path(__file__).resolve().parent.parent
AZURITE_DIR = REPO / "tests" / "azurite"
ACCOUNT = "devstoreaccount1"
#: Azurite's well-known development account key, published by Microsoft
#: (https://learn.microsoft.com/azure/storage/common/storage-use-azurite).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_START_TIMEOUT = 60.0

#: Registers the azblob plug-ins in ``keymgr.plugins.BUILTIN`` when pyproject's
#: entry points (and so the table) do not have them yet, then runs the CLI.
#: A no-op once they are registered.
KEYMGR_BOOT = (
    "import sys, keymgr.plugins as p\n"
    "p.BUILTIN[p.PUBLISHERS].setdefault("
    "'azblob', 'keymgr.backends.azure.publisher:AzureBlobPublisher')\n"
    "p.BUILTIN[p.STORES].setdefault('azblob', 'keymgr.backends.azure.store:open_azblob_store')\n"
    "from keymgr.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def keymgr_command(*args: str) -> list[str]:
    """``python -m keymgr.cli ARGS`` with the azblob plug-ins registered (see KEYMGR_BOOT)."""
    return [sys.executable, "-c", KEYMGR_BOOT, *args]


def register_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The azblob publisher and store in ``keymgr.plugins.BUILTIN``, for this test.

    Until pyproject.toml's entry points (and so the table) list them; then
    this changes nothing.
    """
    from keymgr import plugins

    monkeypatch.setitem(
        plugins.BUILTIN[plugins.PUBLISHERS],
        "azblob",
        "keymgr.backends.azure.publisher:AzureBlobPublisher",
    )
    monkeypatch.setitem(
        plugins.BUILTIN[plugins.STORES], "azblob", "keymgr.backends.azure.store:open_azblob_store"
    )




def node_tools() -> str | None:
    """None when node and npm exist, else why not."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def ensure_azurite() -> Path:
    """``npm ci`` into tests/azurite/node_modules at first use; the azurite-blob script."""
    script = AZURITE_DIR / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
    npm_ci(AZURITE_DIR, script)
    return script


@dataclass
class AzuriteServer(ServerProcess):
    """A running ``azurite-blob`` process."""

    location: Path
    name = "azurite"

    @property
    def url(self) -> str:
        """The dev account's blob endpoint (path-style, as Azurite serves it)."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.url};"
        )

    def answers(self, timeout: float = 1.0) -> bool:
        """Any HTTP answer counts (an unsigned request gets 403)."""
        try:
            with urllib.request.urlopen(f"{self.url}?comp=list", timeout=timeout):
                return True
        except urllib.error.HTTPError as e:
            e.close()
            return True
        except OSError:
            return False

    def service(self) -> Any:
        """A BlobServiceClient with the dev account's key (the tests' own view)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def new_container(self, tag: str = "keymgr", public: bool = False) -> str:
        """A fresh, empty container (the tests' isolation: Azurite has no reset)."""
        name = f"{tag}-{secrets.token_hex(6)}"
        self.service().create_container(name, public_access="blob" if public else None)
        return name

    def sas_connection_string(self, container: str, permission: str = "rwd") -> str:
        """A connection string whose only credential is a container SAS with ``permission``."""
        from datetime import UTC, datetime, timedelta

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas(
            ACCOUNT,
            container,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions.from_string(permission),
            expiry=datetime.now(UTC) + timedelta(hours=2),
        )
        return f"BlobEndpoint={self.url};SharedAccessSignature={sas}"





def start_azurite(work: Path) -> AzuriteServer:
    """Start ``azurite-blob`` on a free loopback port with its data under ``work``."""
    if (why := node_tools()) is not None:
        raise RuntimeError(f"azurite needs Node.js: {why}")
    script = ensure_azurite()

    def start(port: int) -> AzuriteServer:
        location = work / f"azurite-{port}"
        location.mkdir(parents=True, exist_ok=True)
        log_path = work / f"azurite-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    "node", str(script),
                    "--blobHost", "127.0.0.1", "--blobPort", str(port),
                    "--location", str(location),
                    "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k != "AZURITE_DB"},
            )  # fmt: skip
        return AzuriteServer(proc, port, log_path, location)

    return launch(start, _START_TIMEOUT)


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """One Azurite per xdist worker (each worker is its own pytest session)."""
    if (why := node_tools()) is not None:
        pytest.skip(f"{why}: Azurite cannot run")
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azurite(azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> AzuriteServer:
    """The server, answering, and an environment that talks only to it."""
    if not azurite_server.answers(timeout=5):
        pytest.fail(f"azurite {azurite_server.url} is not answering")
    for name in list(os.environ):
        if name.startswith(("AZURE_", "MSI_", "IDENTITY_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_server.connection_string)
    return azurite_server
