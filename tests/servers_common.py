"""What every real server the tests start shares: a free loopback port, and
a process that can be stopped dead (SIGSTOP) and brought back.

moto, fake-gcs-server and Azurite subclass :class:`ServerProcess` with how to
ask whether they answer; the outage, resume and stop logic is written once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server may still lose it: retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_dead(pid: int, *, group: bool = False, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` (its process group with ``group``) and return once every
    thread of it is stopped.

    ``kill`` returns when the signal is queued, not delivered: the kernel wakes
    one thread to start the group stop, and until that thread is scheduled the
    others keep running. On a busy two-core machine a server's network thread
    could still answer the next request in that window (seen once in CI: a
    "stopped" fake-gcs-server answered). Waiting for state ``T`` in
    ``/proc/PID/task/*/stat`` closes it.
    """
    if group:
        os.killpg(pid, signal.SIGSTOP)
    else:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = [
                (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                for task in Path(f"/proc/{pid}/task").iterdir()
            ]
        except (OSError, IndexError):
            return  # gone, or no /proc: nothing more to wait for
        if all(s in "tTXZ" for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"process {pid} not stopped {timeout:.0f}s after SIGSTOP: {states}"
            )
        time.sleep(0.001)


#: For a hook run inside a CLI subprocess (``python -c``): makes :func:`stop_dead`
#: importable there.
STOP_DEAD_IMPORT = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
    "from tests.servers_common import stop_dead"
)


@dataclass
class ServerProcess:
    """A server process on a loopback port, its log beside it."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    #: How the server is named in assertion messages.
    name = "server"

    def answers(self, timeout: float = 1.0) -> bool:
        raise NotImplementedError

    def owns_port(self) -> bool:
        """The socket listening on ``port`` is this process's.

        Two xdist workers can draw the same free port: the loser's server
        exits on bind, yet its readiness check is answered by the winner's
        server. Taking that for ours would SIGSTOP a dead process in an
        outage test while another worker's server keeps answering.
        """
        inodes: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except OSError:
                return True  # no /proc: nothing to check against
            for row in rows:
                f = row.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == self.port:
                    inodes.add(f"socket:[{f[9]}]")
        try:
            fds = {os.readlink(p) for p in Path(f"/proc/{self.proc.pid}/fd").iterdir()}
        except OSError:
            return False
        return bool(inodes & fds)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server stops answering (SIGSTOP) inside the block, and comes back after.

        Code inside the block may also be what stops it (a hook in a CLI run
        that sends SIGSTOP at an exact request): the server comes back anyway.
        """
        stop_dead(self.proc.pid)
        try:
            yield
        finally:
            self.resume()

    def resume(self) -> None:
        """SIGCONT, and wait until it answers again."""
        os.kill(self.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not self.answers():
            assert time.monotonic() < deadline, f"{self.name} did not come back after SIGCONT"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # In case a test failed inside outage() before its finally ran.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


S = TypeVar("S", bound=ServerProcess)


def launch(start: Callable[[int], S], timeout: float = 30.0, poll: float = 0.1) -> S:
    """``start(port)`` a server on a free port and wait until it answers from
    its own socket; a port taken between probe and bind gets another try."""
    last = ""
    for _attempt in range(3):
        server = start(free_port())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.proc.poll() is None:
            if server.answers(timeout=0.5) and server.owns_port():
                return server
            time.sleep(poll)
        server.stop()
        last = server.log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{server.name} did not start:\n{last}")
