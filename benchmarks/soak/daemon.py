"""The daemon under test: ``keymgr run`` as a process the soak starts, kills and restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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

    def start(self) -> None:
        with self.log_path.open("ab") as out:
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
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.kills += 1

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
