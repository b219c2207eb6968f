"""The daemon under test: ``keymgr run`` as a process the soak starts, kills and restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from .logs import log
from .settings import PY


class Daemon:
    def __init__(self, config: Path, env: dict[str, str], log_path: Path) -> None:
        self.config, self.env, self.log_path = config, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.starts = 0
        self.kills = 0
        self.unexpected_exits: list[str] = []
        self.hups = 0
        #: Held across a fault's kill and restart, and while a SIGHUP is sent.
        self.lock = threading.RLock()

    def start(self) -> None:
        with self.lock, self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.log_offset = out.tell()
            self.proc = subprocess.Popen(
                [PY, "-m", "keymgr.cli", "--config", str(self.config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.config.parent,
                start_new_session=True,
            )
            self.starts += 1

    def poll(self) -> None:
        """Record an exit we did not cause, and start it again."""
        with self.lock:
            self._poll()

    def _poll(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
            self.unexpected_exits.append(
                f"exit code {self.proc.returncode} at {time.time():.1f}: {' | '.join(tail)[-600:]}"
            )
            log(f"daemon exited on its own (rc={self.proc.returncode}); restarting")
            self.start()

    def kill(self) -> None:
        with self.lock:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.kills += 1

    def running(self) -> bool:
        """Up, with its signal handlers installed: ``daemon.started`` is in its
        log since this start (a SIGHUP before that would kill it)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return b'"daemon.started"' in f.read()

    def hup(self, timeout: float = 30.0) -> int | None:
        """SIGHUP (reload the config) once the daemon runs: the size of its log
        when sent (see :meth:`reload_result`), or None if it did not run within
        ``timeout``. A daemon restarted meanwhile read the new config at its
        start: the SIGHUP is then redundant, and harmless."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.running():
                    assert self.proc is not None
                    pos = self.log_path.stat().st_size
                    os.kill(self.proc.pid, signal.SIGHUP)
                    self.hups += 1
                    return pos
            time.sleep(0.05)
        return None

    def reload_result(self, pos: int, timeout: float = 15.0) -> str | None:
        """``config.loaded`` or ``config.rejected``, whichever the daemon logs
        first after ``pos``; None if neither within ``timeout`` (killed meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(pos)
                text = f.read()
            hits = [(text.find(m), m) for m in (b'"config.loaded"', b'"config.rejected"')]
            found = sorted((i, m) for i, m in hits if i >= 0)
            if found:
                return found[0][1].decode().strip('"')
            time.sleep(0.05)
        return None

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None
