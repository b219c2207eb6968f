"""The keymgr home of a run: its config file and the ``keymgr`` CLI run against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from .environments import Env
from .settings import PY, REPO, RING, SOCKET_NAME, Settings

#: The ring's ``algorithm`` line (the config has only one).
_ALG_LINE = re.compile(r'^algorithm = "[^"]*"$', re.M)


class Home:
    def __init__(self, work: Path, env: Env) -> None:
        self.work, self.env = work, env
        self.config = work / "keymgr.toml"
        #: The signing service's socket (``--issuer service``).
        self.socket = work / SOCKET_NAME
        #: The ``keymgr: warning:`` lines of ``config check``.
        self.config_warnings: list[str] = []

    def write_config(self, s: Settings, verify_urls: tuple[str, ...] = ()) -> Path:
        """``keymgr init``, then this run's config; ``config check`` must accept it.

        ``verify_urls``: the edges keymgr probes before a promotion (``--verify-edge``).
        With ``--issuer service``, a ``[service]`` table: its Unix socket in the
        workdir, the ring served to this process's uid.
        """
        e = self.env
        if s.issuer == "service" and len(os.fsencode(str(self.socket))) > 107:
            raise RuntimeError(f"--issuer service: socket path too long (sun_path): {self.socket}")
        subprocess.run(
            [PY, "-m", "keymgr.cli", "init", "--dir", str(self.work)],
            check=True, capture_output=True, env=e.env, cwd=REPO,
        )  # fmt: skip
        # With a shared (cloud) state the audit chain is kept in the store
        # (keymgr.auditstore) and no local audit file is written at all: the
        # checks read it back through `keymgr audit verify` / `show`.
        audit_log = 'audit_log = "audit.jsonl"\n' if e.state_url().startswith("file:") else ""
        self.config.write_text(
            "# written by benchmarks/soak (python -m benchmarks.soak)\n"
            f'[daemon]\nstate = "{e.state_url()}"\n{audit_log}'
            'reconcile_interval = "1s"\nlisten = "127.0.0.1:0"\nlease_ttl = "3s"\n\n'
            f"{e.backend_toml()}\n{e.publisher_toml()}"
            + (f"verify_urls = {json.dumps(list(verify_urls))}\nprobe_timeout = 1\n"
               if verify_urls else "")
            + "\n"
            f'[keyrings.{RING}]\nbackend = "{e.backend_name()}"\n'
            f'algorithm = "{s.algorithms[0]}"\n'
            f'rotation_period = "{s.period}s"\npublish_ahead = "{s.publish_ahead}s"\n'
            f'retire_grace = "{s.retire_grace}s"\ndestroy_after = "{s.destroy_after}s"\n'
            f'publishers = ["{e.publisher}"]\n'
            + (f'\n[service]\nsocket = "{self.socket}"\n\n'
               f"[service.rings.{RING}]\nuids = [{os.getuid()}]\n"
               if s.issuer == "service" else "")
        )  # fmt: skip
        proc = self.cli("config", "check")
        if proc.returncode != 0:
            raise RuntimeError(f"config check failed: {proc.stderr.strip()}")
        self.config_warnings = [
            ln for ln in proc.stderr.splitlines() if ln.startswith("keymgr: warning:")
        ]
        return self.config

    def set_algorithm(self, alg: str) -> None:
        """Name ``alg`` as the ring's algorithm (the file replaced at once: the
        checks and CLI calls read it meanwhile). The daemon applies it on
        SIGHUP, or when it next starts."""
        from keymgr.config import load_config

        text, n = _ALG_LINE.subn(f'algorithm = "{alg}"', self.config.read_text())
        if n != 1:
            raise RuntimeError(f"{self.config}: {n} algorithm lines, want 1")
        tmp = self.config.with_name(self.config.name + ".new")
        tmp.write_text(text)
        load_config(tmp)  # what the reload will do first: a bad config stops here
        os.replace(tmp, self.config)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "keymgr.cli", "--config", str(self.config), *args],
            capture_output=True, text=True, env=self.env.env, cwd=self.work, timeout=timeout,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """``keymgr status --json``."""
        proc = self.cli("status", "--json")
        if proc.returncode != 0:
            raise RuntimeError(f"status --json exited {proc.returncode}: {proc.stderr.strip()}")
        return dict(json.loads(proc.stdout))
