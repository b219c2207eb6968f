"""A real OpenBao dev server for the Vault tests, as a pytest plugin.

``tests/conftest.py`` loads this module as a plugin when it exists. It gives:

- ``bao_server`` (session): one ``bao server -dev`` per xdist worker on free
  loopback ports, with a random root token, transit enabled at ``transit/``
  (the dev server already has KV v2 at ``secret/``). Started once, stopped at
  the end by killing its process group. Skips when no ``bao`` binary exists.
- ``bao`` (function): the same server, checked to be answering (a test that
  failed inside ``outage()`` or ``sealed()`` cannot leave it stopped or sealed
  for the next one).

``start_bao(dir, tls=True)`` starts an extra ``-dev-tls`` server (its own CA in
``dir``) for the TLS tests; it is stopped by the test that started it.

Outages are simulated with ``BaoServer.outage()``: SIGSTOP the server, then
SIGCONT it. Why not stop and restart it: a dev server keeps everything in
memory, so a restart loses every transit key and KV secret (and gets a new
unseal key), which is not what an outage looks like -- after a real outage the
keys are still there. Why not a TCP proxy: a stopped process keeps its
listening socket, so the kernel still completes new TCP handshakes into the
backlog and requests hang until the client's read timeout -- the slow, nasty
failure of a blackholed network or a hung server (a refused connection fails
fast and is the easy case).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_START_TIMEOUT = 30.0


def bao_binary() -> str | None:
    found = shutil.which("bao")
    if found:
        return found
    candidate = Path(sys.executable).parent / "bao"
    return str(candidate) if candidate.exists() else None


def _port_pair() -> int:
    """A port P with P and P+1 free (the dev server's cluster listener takes P+1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no pair of free loopback ports")


@dataclass
class BaoServer:
    """A running ``bao server -dev`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    token: str
    log_path: Path
    #: The CA bundle of a ``-dev-tls`` server (None: plain HTTP).
    ca_cert: Path | None = None

    @property
    def addr(self) -> str:
        scheme = "https" if self.ca_cert is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _context(self) -> ssl.SSLContext | None:
        return None if self.ca_cert is None else ssl.create_default_context(cafile=self.ca_cert)

    def __iter__(self) -> Iterator[str]:  # ``addr, token = bao_server``
        return iter((self.addr, self.token))

    # -- raw API (urllib: independent of the code under test) ---------------

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.addr}/v1/{path.lstrip('/')}",
            data=data,
            method=method,
            headers={"X-Vault-Token": token or self.token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._context()) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, (json.loads(raw) if raw else {})

    def ok(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, doc = self.api(method, path, body)
        assert status in (200, 204), (method, path, status, doc)
        return doc

    def answers(self, timeout: float = 1.0) -> bool:
        try:
            url = f"{self.addr}/v1/sys/health"
            with urllib.request.urlopen(url, timeout=timeout, context=self._context()) as r:
                return bool(r.status == 200)
        except (OSError, ValueError):
            return False

    def transit_keys(self, mount: str = "transit") -> list[str]:
        status, doc = self.api("LIST", f"{mount}/keys")
        if status == 404:
            return []
        assert status == 200, (status, doc)
        return sorted(doc["data"]["keys"])

    # -- faults ---------------------------------------------------------------

    def pause(self) -> None:
        # The whole process group: also right if ``bao`` were a wrapper process.
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not self.answers():
            assert time.monotonic() < deadline, "OpenBao did not come back after SIGCONT"
            time.sleep(0.05)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server stops answering (SIGSTOP) inside the block, and comes back after."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def unseal_key(self) -> str:
        """The dev server's single unseal key, from the banner it prints at start."""
        m = re.search(r"^Unseal Key: (\S+)$", self.log_path.read_text(errors="replace"), re.M)
        assert m, "no unseal key in the dev server's banner"
        return m.group(1)

    def unseal(self) -> None:
        status, doc = self.api("PUT", "sys/unseal", {"key": self.unseal_key()})
        assert status == 200 and doc.get("sealed") is False, (status, doc)
        deadline = time.monotonic() + 10
        while not self.answers():
            assert time.monotonic() < deadline, "OpenBao did not become active after unseal"
            time.sleep(0.05)

    @contextlib.contextmanager
    def sealed(self) -> Iterator[None]:
        """The server is sealed inside the block (it answers 503), unsealed after.

        Unlike a restart, sealing keeps the in-memory storage, so every key and
        secret is there again after unsealing, as after a real seal.
        """
        self.unseal_key()  # fail before sealing if it could not be undone
        self.ok("PUT", "sys/seal")
        try:
            yield
        finally:
            self.unseal()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)  # in case a test died inside outage()
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_bao(log_dir: Path, *, tls: bool = False) -> BaoServer:
    binary = bao_binary()
    if binary is None:
        pytest.skip("OpenBao (bao) not installed")
    last = ""
    for _attempt in range(3):  # a probed port may be taken before bao binds it
        port = _port_pair()
        token = "root-" + secrets.token_hex(12)
        log_path = log_dir / f"bao-{port}.log"
        tls_args = [] if not tls else ["-dev-tls", f"-dev-tls-cert-dir={log_dir}"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    "server",
                    "-dev",
                    *tls_args,
                    f"-dev-root-token-id={token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                    "-dev-no-store-token",  # never write ~/.vault-token
                    # BAO_TEST_LOG_LEVEL=debug shows why OpenBao refused a request.
                    "-log-level=" + os.environ.get("BAO_TEST_LOG_LEVEL", "warn"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killpg at the end
                env={k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))},
            )
        server = BaoServer(proc, port, token, log_path)
        ca = log_dir / "vault-ca.pem"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if tls and server.ca_cert is None:
                if not ca.exists():
                    time.sleep(0.05)
                    continue
                server.ca_cert = ca
            if server.answers(timeout=0.5):
                server.ok("POST", "sys/mounts/transit", {"type": "transit"})
                return server
            time.sleep(0.05)
        server.stop()
        last = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"OpenBao dev server did not start:\n{last}")


@pytest.fixture(scope="session")
def bao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bao(bao_server: BaoServer) -> BaoServer:
    if not bao_server.answers(timeout=2):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bao_server.proc.pid, signal.SIGCONT)
        if bao_server.api("GET", "sys/seal-status")[1].get("sealed"):
            bao_server.unseal()
        assert bao_server.answers(timeout=5), "OpenBao dev server is not answering"
    return bao_server
