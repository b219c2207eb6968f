"""A real OpenBao dev server for the Vault tests, as a pytest plugin.

``tests/conftest.py`` loads this module as a plugin when it exists. It gives:

- ``bao_server`` (session): one ``bao server -dev`` per xdist worker on free
  loopback ports, with a random root token, transit enabled at ``transit/``
  (the dev server already has KV v2 at ``secret/``). Started once, stopped at
  the end by killing its process group. Skips when no ``bao`` binary exists.
- ``bao`` (function): the same server, checked to be answering (a test that
  failed inside ``outage()`` or ``sealed()`` cannot leave it stopped or sealed
  for the next one).

- ``bao_raft`` (session): one ``bao server -config=...`` per xdist worker on
  integrated (raft) storage in a temporary directory -- the production setup,
  which refuses any KV entry over 1 MiB where the in-memory dev server takes
  anything -- initialised with ``bao operator init`` (one key share),
  unsealed with ``bao operator unseal``, KV v2 mounted at ``secret/``. Its
  root token is for the tests only (never printed). ``start_bao_raft(dir)``
  starts one for a benchmark.

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
import pty
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers_common import ServerProcess, free_port, launch, stop_dead

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
        stop_dead(self.proc.pid, group=True)

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


# --------------------------------------------------------------------------- raft storage

#: KV entries above this are refused by raft storage (OpenBao's default
#: ``max_entry_size``); the dev server keeps everything in memory and has no limit.
RAFT_MAX_ENTRY = 1024 * 1024


@dataclass
class BaoRaftServer(ServerProcess):
    """A ``bao server`` on integrated (raft) storage: initialised, unsealed, KV v2 at ``secret/``.

    The production setup, unlike ``-dev`` (in-memory, no entry size limit):
    ``bao server -config=...`` with ``storage "raft"`` in a temporary
    directory, then ``bao operator init`` (one key share) and ``bao operator
    unseal``. The root token and the unseal key stay in this object; nothing
    prints them (``repr`` hides them too).
    """

    name = "OpenBao raft server"
    token: str = field(default="", repr=False)
    unseal_key: str = field(default="", repr=False)
    data_dir: Path | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __iter__(self) -> Iterator[str]:  # ``addr, token = bao_raft``
        return iter((self.addr, self.token))

    def _context(self) -> ssl.SSLContext | None:
        return None

    # The dev server's raw API helpers (urllib), on this server.
    api = BaoServer.api
    ok = BaoServer.ok

    def status(self, timeout: float = 1.0) -> int | None:
        """The HTTP status of ``sys/health`` (200 active, 501 not initialised,
        503 sealed, 429 standby), None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (OSError, ValueError):
            return None

    def answers(self, timeout: float = 1.0) -> bool:
        # Any answer of sys/health is the server up (before init it says 501);
        # launch() also checks that the listening socket is this process's.
        return self.status(timeout) is not None

    def active(self, timeout: float = 1.0) -> bool:
        return self.status(timeout) == 200

    def cli(self, *args: str, tty_input: str | None = None) -> str:
        """``bao ARGS`` against this server; its stdout (never echoed: it may hold secrets).

        ``tty_input`` is typed at a prompt: bao reads a secret (an unseal
        key) only from a terminal, so stdin is then a pseudo-terminal.
        """
        binary = bao_binary()
        assert binary is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["BAO_ADDR"] = self.addr
        stdin: int = subprocess.DEVNULL
        master = slave = -1
        if tty_input is not None:
            master, slave = pty.openpty()
            os.write(master, tty_input.encode() + b"\n")
            stdin = slave
        try:
            proc = subprocess.run(
                [binary, *args],
                stdin=stdin,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
        finally:
            for fd in (master, slave):
                if fd >= 0:
                    os.close(fd)
        if proc.returncode != 0:
            # stderr only: bao reports errors there, never the keys it printed on stdout.
            raise RuntimeError(f"bao {args[0]} {args[1]} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def initialise(self, timeout: float = _START_TIMEOUT) -> None:
        """``operator init`` (1 share), ``operator unseal``, wait until active, mount KV v2."""
        out = self.cli(
            "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"
        )
        doc = json.loads(out)
        self.token = doc["root_token"]
        self.unseal_key = (doc.get("unseal_keys_b64") or doc["keys_base64"])[0]
        self.unseal()
        deadline = time.monotonic() + timeout
        while not self.active():
            # One node: raft elects itself leader a moment after the unseal.
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not become active:\n{self.log_tail()}")
            time.sleep(0.1)
        self.ok("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        # A new KV v2 mount answers "upgrading" for a moment: wait until it writes.
        probe = {"data": {"probe": "1"}}
        while True:
            status, _ = self.api("POST", "secret/data/.fixture-probe", probe)
            if status in (200, 204):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: KV v2 at secret/ not writable ({status})")
            time.sleep(0.1)
        self.ok("DELETE", "secret/metadata/.fixture-probe")

    def unseal(self) -> None:
        # Typed at bao's prompt, never on a command line (visible to ps).
        self.cli("operator", "unseal", "-format=json", tty_input=self.unseal_key)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        # ``bao`` replaces the Python wrapper (execv), but kill its whole
        # process group anyway (start_new_session): nothing may outlive the tests.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


_RAFT_CONFIG = """\
ui = false
disable_mlock = true
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster}"
log_level = "{log_level}"

storage "raft" {{
  path = "{data}"
  node_id = "keymgr-test-{port}"
}}

listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = true
}}
"""


def start_bao_raft(log_dir: Path) -> BaoRaftServer:
    """A ``bao server`` on raft storage in ``log_dir``: initialised, unsealed, KV v2 at ``secret/``.

    Stopped by whoever started it (``.stop()``); its data goes with ``log_dir``.
    """
    binary = bao_binary()
    if binary is None:
        pytest.skip("OpenBao (bao) not installed")

    def start(port: int) -> BaoRaftServer:
        cluster = free_port()
        while cluster == port:
            cluster = free_port()
        data = Path(tempfile.mkdtemp(prefix=f"raft-{port}-", dir=log_dir))  # mode 0700
        config = log_dir / f"bao-raft-{port}.hcl"
        config.write_text(
            _RAFT_CONFIG.format(
                port=port,
                cluster=cluster,
                data=data,
                log_level=os.environ.get("BAO_TEST_LOG_LEVEL", "warn"),
            )
        )
        log_path = log_dir / f"bao-raft-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, "server", f"-config={config}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killpg at the end
                env={k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))},
            )
        return BaoRaftServer(proc, port, log_path, data_dir=data)

    server = launch(start, _START_TIMEOUT)
    try:
        server.initialise()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def bao_raft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoRaftServer]:
    """One OpenBao on raft storage per xdist worker (each worker is its own session)."""
    server = start_bao_raft(tmp_path_factory.mktemp("bao-raft"))
    try:
        yield server
    finally:
        server.stop()
