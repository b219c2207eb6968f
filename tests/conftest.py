"""Shared fixtures: a keymgr home in a temp dir, driven through the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# Real servers (moto for KMS and S3, OpenBao dev server), started on free
# loopback ports by session fixtures; each module is skipped when absent.
#: The drill policy of the rotation tests (every backend): short enough that
#: three rotations fit in a few simulated weeks, with every transition at a
#: distinct instant. Time moves with ``--at`` from T0.
T0 = datetime(2031, 3, 1, 8, 0, 0, tzinfo=UTC)
P, A, G, D = timedelta(days=10), timedelta(hours=1), timedelta(days=2), timedelta(days=1)
SHORT_POLICY = {
    "rotation_period": "10d",
    "publish_ahead": "1h",
    "retire_grace": "2d",
    "destroy_after": "1d",
}

pytest_plugins = [p for p in ("tests.servers_moto", "tests.servers_bao")
                  if (REPO / "tests" / (p.split(".")[1] + ".py")).exists()]


@dataclass
class Home:
    """A directory made by ``keymgr init``, plus helpers to run the CLI in it."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "keymgr.toml"

    @property
    def jwks_path(self) -> Path:
        return self.dir / "public" / ".well-known" / "jwks.json"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGR_")}
        env.update(extra)
        return env

    def run(self, *args: str, check: bool = False, env: dict[str, str] | None = None,
            timeout: float = 120, inproc: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``keymgr --config CONFIG ARGS``.

        ``inproc`` calls ``keymgr.cli.main`` in this process instead of a new
        interpreter: the same argument parsing, dispatch, output and exit code,
        without ~0.3 s of start-up per call. Long simulated-time drives use it;
        every command is also exercised in real subprocesses elsewhere.
        """
        argv = ["--config", str(self.config), *args]
        if inproc:
            assert env is None, "in-process runs share this process's environment"
            proc = _run_inproc(argv)
        else:
            proc = subprocess.run(
                [sys.executable, "-m", "keymgr.cli", *argv],
                capture_output=True, text=True, cwd=self.dir, env=env or self.env(),
                timeout=timeout,
            )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"keymgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def status(self) -> dict[str, Any]:
        return json.loads(self.run("status", "--json", check=True).stdout)

    def state(self) -> dict[str, Any]:
        """The state document; a sharded one (docs/scale.md) as the whole state
        it stands for, so tests read either layout the same way."""
        return read_state(self.dir / "state.json")

    def jwks(self) -> dict[str, Any]:
        return json.loads(self.jwks_path.read_text())

    def kid_in(self, state: str, ring: str = "default") -> str:
        """The one kid of ``ring`` in ``state`` (read from the state file)."""
        kids = [k["kid"] for k in self.state()["rings"][ring]["keys"] if k["state"] == state]
        assert len(kids) == 1, kids
        return kids[0]

    def files(self) -> dict[str, bytes]:
        """Every file of the home (not the lock file), by relative path."""
        return {
            str(p.relative_to(self.dir)): p.read_bytes()
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != "state.json.lock"
        }

    def set_ring(self, ring: str = "default", **fields: str) -> None:
        """Rewrite fields of ``[keyrings.RING]`` in the config (string values)."""
        lines = self.config.read_text().splitlines()
        out, in_ring = [], False
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("["):
                in_ring = stripped == f"[keyrings.{ring}]"
            key = stripped.split("=", 1)[0].strip()
            if in_ring and key in fields:
                line = f'{key} = "{fields.pop(key)}"'
            out.append(line)
        assert not fields, f"fields not found in [keyrings.{ring}]: {fields}"
        self.config.write_text("\n".join(out) + "\n")


def _run_inproc(argv: list[str]) -> subprocess.CompletedProcess[str]:
    from keymgr.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["keymgr", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = Home(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    shard_state(h.config)
    return h


#: ``KEYMGR_TEST_SHARDS=on|auto|off``: the homes of the tests (``home``
#: fixture, the soak) keep their state as ``file:state.json?shards=MODE``
#: (docs/scale.md), to run the same end-to-end tests on sharded state.
TEST_SHARDS = os.environ.get("KEYMGR_TEST_SHARDS")


def read_state(path: Path) -> dict[str, Any]:
    """The file store's state document at ``path``; a sharded head
    (docs/scale.md) as the whole state it stands for, so tests read either
    layout the same way (``KEYMGR_TEST_SHARDS``)."""
    doc: dict[str, Any] = json.loads(path.read_text())
    if "sharding" not in doc:
        return doc
    from keymgr.backends.local.store import FileStore

    state, version = FileStore(path).load()
    return {"version": version, **state.to_dict()}


def shard_state(config: Path) -> None:
    """Point a home's ``state = "file:state.json"`` at ``?shards=`` (``KEYMGR_TEST_SHARDS``)."""
    if TEST_SHARDS:
        config.write_text(with_state_url(config.read_text(), "file:state.json"))


_STATE_LINE = re.compile(r'^state = "file:state\.json(\?shards=\w+)?"', re.M)


def with_state_url(config_text: str, url: str) -> str:
    """``config_text`` with its ``state = "file:state.json[?shards=..]"`` line
    pointing at ``url``, which gets ``shards=`` too under ``KEYMGR_TEST_SHARDS``."""
    assert _STATE_LINE.search(config_text), "keymgr init wrote another state line"
    if TEST_SHARDS and "shards=" not in url:
        url += ("&" if "?" in url else "?") + f"shards={TEST_SHARDS}"
    return _STATE_LINE.sub(lambda _: f'state = "{url}"', config_text, count=1)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers per core (at most 8). Most of the suite waits:
    on the CLI's start-up in a subprocess, on moto, OpenBao, Azurite,
    fake-gcs-server and varnish, on daemons' timers; one worker per core
    leaves the cores idle through those waits."""
    return min(8, 2 * (os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests (``@pytest.mark.slow``: the soaks, a minute each) first, so
    that under xdist they run beside the rest instead of alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def launcher() -> Iterator[Any]:
    """Starts real ``keymgr run`` daemons (tests.test_daemon.Launcher); every
    one still running at the end of the test is killed."""
    from tests.test_daemon import Launcher

    lx = Launcher()
    try:
        yield lx
    finally:
        for p in lx.procs:
            if p.popen.poll() is None:
                p.popen.kill()
            p.popen.wait(timeout=10)
