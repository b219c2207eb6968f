"""Stateless replicas (issue 17): three real ``keymgr run`` processes on one
shared store, the audit chain in the store, no shared file and no local one.

The lease holder is SIGKILLed several times (a replacement started each
time, so three keep running); then ``keymgr audit verify`` checks the chain
in the store against the state's anchor, and the events read straight from
the store show every transition exactly once, with no gap and no fork.
On S3 (moto) here; the same test on OpenBao KV lives beside it when the
OpenBao fixtures are present.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from keymgr.audit import GENESIS, chain_hash
from tests.conftest import Home
from tests.servers_moto import (
    kms_options,
    s3_client,
    s3_publisher_options,
    s3_state_url,
    write_config,
)
from tests.test_daemon import (
    Launcher,
    Proc,
    check_transitions,
    set_daemon,
    wait_for,
)

pytestmark = pytest.mark.slow

BUCKET = "stateless"
KEY = "keymgr/state.json"
#: Seconds-scale rotation, so that every replica's term sees transitions.
FAST_POLICY = {
    "rotation_period": "6s",
    "publish_ahead": "2s",
    "retire_grace": "2s",
    "destroy_after": "1s",
}
KILLS = 2


def stateless_home(home: Home, state: str, backends: dict[str, Any],
                   publishers: dict[str, Any], backend: str) -> None:
    """A config with no local file besides itself: no audit_log (no mirror)."""
    write_config(
        home, state=state, backends=backends, publishers=publishers,
        rings={"default": {"backend": backend, "algorithm": "ES256", **FAST_POLICY}},
    )
    text = home.config.read_text().replace(
        'audit_log = "audit.jsonl"\n',
        'reconcile_interval = "1s"\nlease_ttl = "3s"\nlisten = "127.0.0.1:0"\n',
    )
    home.config.write_text(text)
    check = home.run("config", "check")
    assert check.returncode == 0, check.stderr


def chain_from_store(read: Any, events: list[dict[str, Any]] | None = None
                     ) -> list[dict[str, Any]]:
    """``events`` (read before) and every event ``read(seq)`` returns after
    them until the first absent one, each checked to chain to the one before
    (read without keymgr)."""
    events = list(events or [])
    prev = events[-1]["hash"] if events else GENESIS
    seq = len(events) + 1
    while (raw := read(seq)) is not None:
        ev = json.loads(raw)
        assert ev["seq"] == seq and ev["prev"] == prev, f"event {seq} does not chain"
        assert chain_hash(prev, ev) == ev["hash"], f"event {seq} hash"
        events.append(ev)
        prev, seq = ev["hash"], seq + 1
    return events


def kill_holders(home: Home, launcher: Launcher, holder_pid: Any, events: Any) -> list[Proc]:
    """Three replicas; SIGKILL the lease holder KILLS times, each time after it
    committed transitions, starting a replacement. Returns the survivors."""
    procs = [launcher.start(home, name=f"replica{i}") for i in range(3)]
    for p in procs:
        p.ready(timeout=30)
    for k in range(KILLS):
        def holder() -> Proc | None:
            pid = holder_pid()
            return next((p for p in procs if p.pid == pid and p.popen.poll() is None), None)

        victim = wait_for(holder, 20, "a lease holder")
        before = len(events())
        wait_for(lambda: len(events()) >= before + 3, 30, "transitions by the holder")
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(timeout=10)
        procs.remove(victim)
        procs.append(launcher.start(home, name=f"replica{3 + k}"))
        procs[-1].ready(timeout=30)
    last = wait_for(lambda: next((p for p in procs if p.pid == holder_pid()), None), 20,
                    "a last lease holder")
    before = len(events())
    wait_for(lambda: len(events()) >= before + 3, 30, "transitions after the last kill")
    assert last.popen.poll() is None
    return procs


def finish(home: Home, events: list[dict[str, Any]], state: dict[str, Any]) -> None:
    """The chain read from the store is the one the state anchors, ``audit
    verify`` agrees, every transition is there once, and nothing was written
    beside the config."""
    proc = home.run("audit", "verify")
    assert proc.returncode == 0, proc.stderr
    assert f"({len(events)} events, chain intact" in proc.stdout, proc.stdout
    check_transitions(events, state)
    assert state["audit"]["seq"] == len(events) and state["audit"]["hash"] == events[-1]["hash"]
    started = [e for e in events if e["event"] == "daemon.started"]
    assert len(started) == 3 + KILLS
    local = sorted(p.name for p in home.dir.iterdir())
    assert not [n for n in local if n.endswith((".jsonl", ".json", ".lease", ".lock"))], local


def test_three_s3_replicas_sigkilled_keep_one_chain_in_the_store(
    home: Home, moto: Any, launcher: Launcher
) -> None:
    s3 = s3_client(moto.url)
    for b in (BUCKET, "jwks"):
        s3.create_bucket(Bucket=b)
    stateless_home(
        home, s3_state_url(moto.url, BUCKET, KEY),
        {"kms": kms_options(moto.url)},
        {"cdn": {**s3_publisher_options(moto.url), "bucket": "jwks"}}, "kms",
    )

    def read(seq: int) -> bytes | None:
        try:
            body: bytes = s3.get_object(Bucket=BUCKET, Key=f"{KEY}.audit/{seq:012d}.json")[
                "Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        return body

    seen: list[dict[str, Any]] = []

    def events() -> list[dict[str, Any]]:
        seen[:] = chain_from_store(read, seen)
        return seen

    def holder_pid() -> int:
        try:
            doc = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{KEY}.lease")["Body"].read())
        except s3.exceptions.NoSuchKey:
            return 0
        return int(str(doc.get("holder") or "::").split(":")[1] or 0)

    t0 = time.monotonic()
    procs = kill_holders(home, launcher, holder_pid, events)
    for p in procs:  # SIGTERM: each records daemon.stopped, then exits 0
        rc, _ = p.stop()
        assert rc == 0, p.err.read_text()
    state = json.loads(s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
    finish(home, chain_from_store(read), state)
    assert time.monotonic() - t0 < 90


def test_three_openbao_replicas_sigkilled_keep_one_chain_in_kv(
    home: Home, bao: Any, launcher: Launcher
) -> None:
    """The same on a ``vault://`` KV v2 store (OpenBao dev server), keys in
    transit: each event a KV secret written with cas=0."""
    from tests.test_vault import kv_state, setup_home, unique

    kv = unique("stateless")
    vh = setup_home(home, bao, "ES256", state_url=f"vault://secret/{kv}?lock_ttl=5")
    home.config.write_text(home.config.read_text().replace('audit_log = "audit.jsonl"\n', ""))
    set_daemon(home, reconcile_interval="1s", lease_ttl="3s", listen="127.0.0.1:0")
    home.set_ring(**FAST_POLICY)
    assert vh.run("config", "check").returncode == 0

    def kv_read(name: str, field: str) -> bytes | None:
        status, doc = bao.api("GET", f"secret/data/{name}")
        if status == 404:
            return None
        assert status == 200, (status, doc)
        value = (doc["data"]["data"] or {}).get(field)
        return value.encode() if isinstance(value, str) else None

    def read(seq: int) -> bytes | None:
        leaf = f"audit/{seq:012d}.json"
        return kv_read(f"{kv}.{leaf}", leaf)

    seen: list[dict[str, Any]] = []

    def events() -> list[dict[str, Any]]:
        seen[:] = chain_from_store(read, seen)
        return seen

    def holder_pid() -> int:
        raw = kv_read(f"{kv}.lease", "lease")
        doc = json.loads(raw) if raw else {}
        return int(str(doc.get("holder") or "::").split(":")[1] or 0)

    class _Env(Launcher):
        """The replicas get the OpenBao address and token."""

        def start(self, home: Home, name: str = "daemon", env: dict[str, str] | None = None
                  ) -> Proc:
            return launcher.start(home, name, env=vh.env())

    t0 = time.monotonic()
    procs = kill_holders(home, _Env(), holder_pid, events)
    for p in procs:
        rc, _ = p.stop()
        assert rc == 0, p.err.read_text()
    state = kv_state(bao, kv)
    proc = vh.run("audit", "verify")
    assert proc.returncode == 0 and f"({len(chain_from_store(read))} events" in proc.stdout, (
        proc.stdout + proc.stderr)
    final = chain_from_store(read)
    check_transitions(final, state)
    assert state["audit"]["seq"] == len(final) and state["audit"]["hash"] == final[-1]["hash"]
    assert sum(e["event"] == "daemon.started" for e in final) == 3 + KILLS
    assert not (home.dir / "audit.jsonl").exists()
    assert time.monotonic() - t0 < 90
