"""A full disk, on a real filesystem: a tmpfs of 1 MiB holding the whole
embedded default (state, key files, audit log, JWKS), or only the audit log
(as ``/var/log`` on a partition of its own), filled up to a few pages from
the top while rings rotate; and ``keymgr init`` on a full disk.

Every write keymgr makes then fails wherever the disk runs out: a pass must
stop in one line (exit 1, no traceback), lose no key and leave no temp file,
``sign`` must go on with the active key (it writes nothing), and once space
is freed the passes must repair what the full disk interrupted (a key
generated but not recorded is adopted by its intent) and rotate on, with the
audit chain intact. tmpfs counts space in pages, so each free-page count
makes the disk run out at other writes.

Mounting needs root (CAP_SYS_ADMIN); CI runs as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from jwcrypto import jwk as jw_jwk
from jwcrypto import jwt as jw_jwt

from tests.conftest import T0, Home, shard_state
from tests.test_daemon import Launcher, fast_home, metric, scrape, set_daemon, wait_for
from tests.test_hostile import at, one_error_line

PAGE = 4096
#: Passes every 12 hours: the disk is full for the first FULL_PASSES (past the
#: first rotation's publish and promote), then freed for the rest (two more).
STEP, FULL_PASSES, PASSES = timedelta(hours=12), 64, 180


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at tmp_path/disk, unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave_pages: int) -> Path:
    """Fill ``disk`` up, then give back ``leave_pages`` pages."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(PAGE))
    except OSError as e:
        assert e.errno == 28, e  # ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave_pages * PAGE))
    return filler


def init_home(directory: Path) -> Home:
    """``keymgr init --dir DIRECTORY`` as a new user runs it (its state
    sharded when ``KEYMGR_TEST_SHARDS`` says so)."""
    proc = subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(directory)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    home = Home(directory)
    shard_state(home.config)
    return home


def rotate_through(home: Home, filler: Path, full_until: int) -> Iterator[tuple[int, str | None]]:
    """A pass every STEP, PASSES of them, the disk full until pass
    ``full_until`` (then ``filler`` goes): yields each pass's number and its
    one error line (None when it passed, exit 1 otherwise). No pass may fail
    once space is freed."""
    for i in range(1, PASSES + 1):
        if i == full_until:
            filler.unlink()
        proc = home.run("reconcile", "--at", at(T0 + i * STEP), inproc=True)
        line = None
        if proc.returncode != 0:
            assert i < full_until and proc.returncode == 1, f"pass {i}: {proc.stderr}"
            line = one_error_line(proc.stderr)
        yield i, line


def verify(home: Home, token: str) -> str:
    """The kid of ``token`` once jwcrypto verifies it against the JWKS file."""
    keys = jw_jwk.JWKSet.from_json(home.jwks_path.read_text())
    checked = jw_jwt.JWT(jwt=token, key=keys, algs=["ES256"])
    return str(json.loads(checked.header)["kid"])


@pytest.mark.parametrize("free_pages", [0, 1, 2])
def test_a_full_disk_stops_passes_in_one_line_and_loses_nothing(
    small_disk: Path, free_pages: int
) -> None:
    home = init_home(small_disk / "keymgr")
    assert home.run("reconcile", "--at", at(T0), inproc=True).returncode == 0
    filler = fill(small_disk, free_pages)

    refused, signers = 0, set()
    for i, line in rotate_through(home, filler, FULL_PASSES):
        if line is not None:
            assert "No space left on device" in line, line
            refused += 1
        signed = home.run("sign", "default", "--claims", '{"sub": "a"}', inproc=True)
        assert signed.returncode == 0, f"pass {i}: {signed.stderr}"
        signers.add(verify(home, signed.stdout.strip()))
    if free_pages < 2:  # 2 pages hold every write of a pass
        assert refused > 0, "the disk never ran out: the test proved nothing"

    assert home.run("audit", "verify", inproc=True).returncode == 0
    assert home.run("status", inproc=True).returncode == 0
    leftovers = [p for p in home.dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    ring = home.state()["rings"]["default"]
    destroyed = [k["kid"] for k in ring["keys"] if k["state"] == "destroyed"]
    live = [k["kid"] for k in ring["keys"] if k["state"] != "destroyed"]
    assert len(signers) >= 3 and len(destroyed) >= 2, ring["keys"]  # rotations went on
    key_files = {p.stem for p in (home.dir / "keys").rglob("*.key")}
    assert set(live) <= key_files, "a key of the state lost its file"
    assert not key_files & set(destroyed), "a destroyed key kept its file"
    events = [json.loads(ln)["event"] for ln in (home.dir / "audit.jsonl").read_text().splitlines()]
    if free_pages == 1:
        # The successor's key file took the last page; recording it did not
        # fit. Once space was freed, the pass adopted it by its intent.
        assert "key.adopted" in events, events
    served = {k["kid"] for k in home.jwks()["keys"]}
    assert ring["keys"][-1]["kid"] in served


def test_a_full_audit_log_disk_stops_transitions_until_every_event_is_written(
    tmp_path: Path, small_disk: Path
) -> None:
    """Only the audit log's filesystem is full. An append that does not fit
    used to write what fit and return as if it had written everything (a
    torn line, exit 0, nobody told). Now the pass that cannot append fails
    in one line; its events stay in the state's outbox, and no pass makes
    a transition it cannot record until space is freed; then the next pass
    writes them, and the chain holds exactly one line per event."""
    home = init_home(tmp_path / "keymgr")
    log = small_disk / "audit.jsonl"
    text = home.config.read_text()
    assert 'audit_log = "audit.jsonl"' in text
    home.config.write_text(text.replace('audit_log = "audit.jsonl"', f'audit_log = "{log}"'))
    assert home.run("reconcile", "--at", at(T0), inproc=True).returncode == 0
    filler = fill(small_disk, 0)

    # The log's first page has room for the first rotation's events but not
    # for the destruction of the first key (day 38): full for 60 days.
    refused, state_then = 0, None
    for i, line in rotate_through(home, filler, 120):
        if line is not None:
            assert f"audit log {log}: cannot append: No space left on device" in line, line
            refused += 1
            if state_then is None:  # the commit whose events did not fit
                state_then = home.state()
            else:
                assert home.state() == state_then, f"pass {i} made a transition it cannot record"
        signed = home.run("sign", "default", "--claims", "{}", inproc=True)
        assert signed.returncode == 0, f"pass {i}: {signed.stderr}"
        verify(home, signed.stdout.strip())
    assert refused > 1, "the log's disk never ran out: the test proved nothing"

    assert home.run("audit", "verify", inproc=True).returncode == 0
    data = log.read_bytes()
    assert data.endswith(b"\n")
    seqs = [json.loads(ln)["seq"] for ln in data.splitlines()]
    assert seqs == list(range(1, home.state()["audit"]["seq"] + 1))
    ring = home.state()["rings"]["default"]
    assert len([k for k in ring["keys"] if k["state"] == "destroyed"]) >= 2


def test_init_on_a_full_disk_leaves_nothing_behind(small_disk: Path) -> None:
    """``keymgr init`` that cannot write its master key or config says so in
    one line, exit 1, and removes what it created (a short master key, which
    the next init would refuse to overwrite); once space is freed it works."""
    target = small_disk / "keymgr"
    target.mkdir()
    filler = fill(small_disk, 0)
    proc = subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(target)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc
    line = one_error_line(proc.stderr)
    assert line == f"keymgr: error: {target}: cannot write: No space left on device", line
    assert list(target.iterdir()) == []
    filler.unlink()
    home = init_home(target)
    assert home.run("reconcile", "--at", at(T0), inproc=True).returncode == 0


def test_a_daemon_whose_audit_log_fills_up_keeps_running_and_catches_up(
    home: Home, launcher: Launcher, small_disk: Path
) -> None:
    """``keymgr run`` rotating every 6 s while the audit log's filesystem
    fills up: every pass that cannot append fails in one log line, no
    transition happens without its record, and this is not counted as a
    failed audit check (no tampering alert: the pass failures alert). Once
    space is freed the daemon catches up by itself and the chain verifies."""
    fast_home(home)
    log = small_disk / "audit.jsonl"
    set_daemon(home, audit_log=str(log))
    d = launcher.start(home)
    d.ready()
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 10, "the first events")
    filler = fill(small_disk, 0)

    def append_failures() -> list[dict[str, object]]:
        return [ln for ln in d.events("reconcile.failed")
                if "cannot append: No space left on device" in str(ln.get("error"))]  # fmt: skip

    wait_for(lambda: d.alive_or_fail() and len(append_failures()) >= 3, 60,
             "passes refused for the full log")  # fmt: skip
    seq = home.state()["audit"]["seq"]
    wait_for(lambda: len(append_failures()) >= 6, 30, "more refused passes")
    assert home.state()["audit"]["seq"] == seq, "a transition was made without its record"
    m = scrape(d.port)
    assert ("keymgr_audit_verify_failures_total", ()) in m
    assert metric(m, "keymgr_audit_verify_failures_total") == 0
    assert metric(m, "keymgr_reconciles_total", result="failed") >= 6

    filler.unlink()
    wait_for(lambda: d.alive_or_fail() and home.state()["audit"]["seq"] > seq + 2, 30,
             "transitions again")  # fmt: skip
    rc, _ = d.stop()
    assert rc == 0
    assert home.run("audit", "verify", inproc=True).returncode == 0
    assert log.read_bytes().endswith(b"\n")
