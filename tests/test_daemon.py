"""``keymgr run`` as a real process: scheduler, signals, probes, sd_notify, HA, logs.

Every test starts ``python -m keymgr.cli --config X run`` on a home made by
``keymgr init`` (local encrypted backend, JWKS file), with periods of a few
seconds so that real rotations happen inside the test. The health endpoint
listens on ``127.0.0.1:0`` and the test reads the bound port from the
``daemon.started`` log line: no port is guessed, so parallel runs never clash.

Nothing sleeps for a fixed time: every wait polls with a deadline. Every
process a test starts is killed in the fixture's teardown, whatever happens.
Tokens are checked by PyJWT and jwcrypto against the JWKS file as it is on
disk, never by keymgr's own code.
"""

from __future__ import annotations

import itertools
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws
from prometheus_client.parser import text_string_to_metric_families

from keymgr import KeyManager
from keymgr.errors import KeymgrError
from tests.conftest import Home, read_state

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
#: Audit events of key transitions: each must appear at most once per kid.
TRANSITIONS = (
    "key.generated",
    "key.adopted",
    "key.published",
    "key.promoted",
    "key.retired",
    "key.expired",
    "key.destroyed",
    "key.revoked",
)
#: The state timestamp each transition event stands for (invariant 7).
EVENT_FOR_FIELD = {
    "published_at": "key.published",
    "activated_at": "key.promoted",
    "retired_at": "key.retired",
    "expired_at": "key.expired",
    "destroyed_at": "key.destroyed",
}
STOP_BOUND = 10.0  # seconds a daemon may take to exit after SIGTERM/SIGINT


# --------------------------------------------------------------------------- helpers


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``pred`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def set_daemon(home: Home, **fields: str) -> None:
    """Set fields of ``[daemon]`` (string values), adding the ones not there yet."""
    out: list[str] = []
    in_daemon = False
    for line in home.config.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_daemon = stripped == "[daemon]"
            out.append(line)
            continue
        key = stripped.split("=", 1)[0].strip()
        if in_daemon and key in fields:
            line = f'{key} = "{fields.pop(key)}"'
        out.append(line)
    idx = out.index("[daemon]") + 1
    for k, v in fields.items():
        out.insert(idx, f'{k} = "{v}"')
    home.config.write_text("\n".join(out) + "\n")


def fast_home(home: Home, interval: str = "1s", lease_ttl: str = "30s", **ring: str) -> Home:
    """Second-scale periods; the health endpoint on a port the kernel picks."""
    set_daemon(home, reconcile_interval=interval, listen="127.0.0.1:0", lease_ttl=lease_ttl)
    policy = {
        "rotation_period": "6s",
        "publish_ahead": "2s",
        "retire_grace": "3s",
        "destroy_after": "1s",
    }
    policy.update(ring)
    home.set_ring(**policy)
    check = home.run("config", "check")
    assert check.returncode == 0, check.stderr
    return home


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus-client."""
    text = get(port, "/metrics")[1]
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def audit_events(home: Home) -> list[dict[str, Any]]:
    path = home.dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Proc:
    """One ``keymgr run`` process; stdout/stderr go to files (a pipe could fill up)."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    _port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def logs(self) -> list[dict[str, Any]]:
        """Complete stdout lines, each parsed as JSON (a non-JSON line fails the test)."""
        text = self.out.read_text()
        lines = text.split("\n")[:-1]  # the last element is a partial line or ""
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"stdout line is not JSON: {line!r}") from None
        return parsed

    def events(self, name: str) -> list[dict[str, Any]]:
        return [ln for ln in self.logs() if ln.get("event") == name]

    @property
    def port(self) -> int:
        if self._port is None:
            started = wait_for(
                lambda: self.alive_or_fail() and self.events("daemon.started"),
                20,
                "the daemon.started log line",
            )
            self._port = int(started[0]["listen"].rsplit(":", 1)[1])
        return self._port

    def alive_or_fail(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(
                f"daemon exited {self.popen.returncode}\nstdout:\n{self.out.read_text()}\n"
                f"stderr:\n{self.err.read_text()}"
            )
        return True

    def ready(self, timeout: float = 20) -> None:
        wait_for(lambda: self.alive_or_fail() and get(self.port, "/readyz")[0] == 200, timeout,
                 "/readyz to answer 200")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``sig``; return (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.popen.send_signal(sig)
        rc = self.popen.wait(timeout=STOP_BOUND + 20)
        return rc, time.monotonic() - t0


@dataclass
class Launcher:
    procs: list[Proc] = field(default_factory=list)

    def start(self, home: Home, name: str = "daemon", env: dict[str, str] | None = None) -> Proc:
        out, err = home.dir / f"{name}.out", home.dir / f"{name}.err"
        e = home.env(PYTHONUNBUFFERED="1")
        e.pop("NOTIFY_SOCKET", None)
        e.pop("WATCHDOG_USEC", None)
        e.pop("WATCHDOG_PID", None)
        e.update(env or {})
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                [sys.executable, "-m", "keymgr.cli", "--config", str(home.config), "run"],
                stdout=fo, stderr=fe, cwd=home.dir, env=e,
            )
        p = Proc(popen, out, err)
        self.procs.append(p)
        return p


class Verifier:
    """Checks tokens with PyJWT and jwcrypto against the JWKS file on disk."""

    def __init__(self, jwks_path: Path) -> None:
        self.path = jwks_path

    def read(self) -> tuple[str, dict[str, Any]]:
        text = self.path.read_text()
        doc = json.loads(text)
        for k in doc["keys"]:
            assert not PRIVATE_MEMBERS & set(k), f"private member in published JWK {k['kid']}"
        return text, doc

    @staticmethod
    def verify(token: str, text: str, doc: dict[str, Any]) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        by_kid = {k["kid"]: k for k in doc["keys"]}
        assert header["kid"] in by_kid, f"kid {header['kid']} not in the JWKS on disk"
        # PyJWT: exp is checked by the caller against the wall clock it read
        # before the JWKS, so the library's own clock read cannot race it.
        key = jwt.PyJWK(by_kid[header["kid"]])
        claims: dict[str, Any] = jwt.decode(
            token, key=key.key, algorithms=[header["alg"]], options={"verify_exp": False}
        )
        # jwcrypto, from the whole key set as a verifier would load it.
        keyset = jwc_jwk.JWKSet.from_json(text)
        obj = jwc_jws.JWS()
        obj.deserialize(token)
        obj.verify(keyset.get_key(header["kid"]), alg=header["alg"])
        assert json.loads(obj.payload) == claims
        return claims


def check_transitions(events: list[dict[str, Any]], state: dict[str, Any]) -> None:
    """Exactly one audit event per transition the state records (invariant 7)."""
    seen = Counter((e["event"], e.get("kid")) for e in events if e["event"] in TRANSITIONS)
    dup = {k: n for k, n in seen.items() if n > 1}
    assert not dup, f"transitions recorded more than once: {dup}"
    for ring in state["rings"].values():
        for key in ring["keys"]:
            born = seen[("key.generated", key["kid"])] + seen[("key.adopted", key["kid"])]
            assert born == 1, f"{key['kid']}: {born} generated/adopted events"
            for f, ev in EVENT_FOR_FIELD.items():
                n = seen[(ev, key["kid"])]
                assert n == (1 if key.get(f) else 0), f"{key['kid']}: {ev} recorded {n} times"


def check_audit_matches_state(home: Home) -> list[dict[str, Any]]:
    """:func:`check_transitions` on the home's log and state, then ``audit verify``."""
    events = audit_events(home)
    check_transitions(events, home.state())
    home.run("audit", "verify", check=True)
    return events


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- 1. scheduler


def test_rotates_on_schedule_and_tokens_verify_throughout(home: Home, launcher: Launcher) -> None:
    """Rotations happen on their own at the planned instants, not at the next poll.

    The reconcile interval is a minute, so the two rotations seen within ~15 s
    can only come from the date job at the next due transition. Meanwhile a
    token is signed every 0.2 s (the Python API, as an application would) and
    every token still inside its lifetime is verified against the JWKS on
    disk by two independent libraries at every step: the promise that no
    valid token is ever rejected because of a rotation. The token TTL (2 s)
    is below retire_grace (3 s), as the README requires.
    """
    fast_home(home, interval="1m")
    d = launcher.start(home)
    d.ready()
    km = KeyManager.from_config(home.config)
    ver = Verifier(home.jwks_path)
    tokens: list[tuple[str, int]] = []
    signers: list[str] = []
    n = 0
    deadline = time.monotonic() + 40

    while len(signers) < 3 or not any(e["event"] == "key.destroyed" for e in audit_events(home)):
        assert time.monotonic() < deadline, "fewer than two rotations and a destroy in 40 s"
        d.alive_or_fail()
        n += 1
        token = km.sign("default", {"sub": "alice", "jti": str(n)}, ttl=timedelta(seconds=2))
        text, doc = ver.read()
        now = time.time()
        claims = ver.verify(token, text, doc)  # a fresh token verifies at once
        tokens.append((token, claims["exp"]))
        kid = jwt.get_unverified_header(token)["kid"]
        if not signers or signers[-1] != kid:
            signers.append(kid)
        for t, exp in tokens:
            if now < exp:  # still valid: must verify against what is served now
                ver.verify(t, text, doc)
        time.sleep(0.2)

    rc, took = d.stop()
    assert rc == 0 and took < STOP_BOUND
    assert len(signers) >= 3, f"tokens were signed by {signers}"

    check_audit_matches_state(home)
    keys = home.state()["rings"]["default"]["keys"]
    assert sum(k["state"] == "active" for k in keys) == 1
    by_kid = {k["kid"]: k for k in keys}
    # Timing rules, from the timestamps in state (whole seconds, so +-1 s).
    for k in keys:
        if k["activated_at"] and k["published_at"] and k["kid"] != keys[0]["kid"]:
            assert parse_ts(k["activated_at"]) - parse_ts(k["published_at"]) >= timedelta(seconds=2)
        if k["expired_at"]:
            gap = parse_ts(k["expired_at"]) - parse_ts(k["retired_at"])
            assert timedelta(seconds=3) <= gap <= timedelta(seconds=5)
    promoted = sorted(
        (parse_ts(k["activated_at"]), k["kid"]) for k in keys if k["activated_at"]
    )
    for (t1, _), (t2, _) in itertools.pairwise(promoted):
        assert timedelta(seconds=5) <= t2 - t1 <= timedelta(seconds=9), promoted
    assert by_kid[signers[0]]["activated_at"] is not None

    # 6. Logs: JSON lines on stdout (Proc.logs fails on any other line); every
    # key transition line carries its ring and kid. The audit log is a
    # separate file with its own hash chain, and never on stdout.
    lines = d.logs()
    key_lines = [ln for ln in lines if str(ln.get("event", "")).startswith("key.")]
    assert len(key_lines) >= 10
    for ln in key_lines:
        assert ln["ring"] == "default" and ln["kid"] in by_kid, ln
        assert ln["level"] and ln["timestamp"]
    assert not any("hash" in ln for ln in lines), "audit events leaked into stdout"
    assert d.err.read_text() == ""


# --------------------------------------------------------------------------- 2. signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signals_exit_zero_promptly(home: Home, launcher: Launcher, sig: int) -> None:
    """SIGTERM (systemd, kubelet) and SIGINT (Ctrl-C) finish the pass, release the
    lease and exit 0 well within TimeoutStopSec / terminationGracePeriodSeconds."""
    fast_home(home)
    d = launcher.start(home)
    d.ready()
    rc, took = d.stop(sig)
    assert rc == 0, d.err.read_text()
    assert took < STOP_BOUND
    assert d.events("daemon.stopped")
    lease = json.loads((home.dir / "state.json.lease").read_text())
    assert lease["holder"] is None, "a graceful stop must hand the lease over at once"
    assert audit_events(home)[-1]["event"] == "daemon.stopped"
    home.run("audit", "verify", check=True)


def test_sighup_rejects_bad_config_and_applies_good_one(home: Home, launcher: Launcher) -> None:
    """A bad config on SIGHUP is refused (log and audit ``config.rejected``) and the
    daemon keeps running on the old one; a good one is applied whole: here a
    one-hour rotation period becomes 6 s, so a rotation follows within seconds."""
    fast_home(home, rotation_period="1h")
    d = launcher.start(home)
    d.ready()
    first = home.state()["rings"]["default"]["keys"][0]["kid"]
    good = home.config.read_text()

    home.config.write_text(good.replace('rotation_period = "1h"', 'rotation_period = "0s"'))
    d.popen.send_signal(signal.SIGHUP)
    rejected = wait_for(lambda: d.alive_or_fail() and d.events("config.rejected"), 10,
                        "config.rejected in the log")
    assert "keyrings.default.rotation_period" in rejected[0]["error"]
    assert get(d.port, "/healthz")[0] == 200 and get(d.port, "/readyz")[0] == 200
    assert any(e["event"] == "config.rejected" for e in audit_events(home))

    home.config.write_text("not toml at all [")
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: len(d.events("config.rejected")) == 2, 10, "a second config.rejected")
    assert d.alive_or_fail() and get(d.port, "/readyz")[0] == 200

    home.config.write_text(good.replace('rotation_period = "1h"', 'rotation_period = "6s"'))
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: d.events("config.loaded"), 10, "config.loaded in the log")
    promoted = wait_for(
        lambda: [e for e in audit_events(home) if e["event"] == "key.promoted"
                 and e["kid"] != first],
        15,
        "a rotation under the reloaded 6 s period",
    )
    assert promoted[0]["reason"] == "scheduled"
    rc, _ = d.stop()
    assert rc == 0
    check_audit_matches_state(home)


# --------------------------------------------------------------------------- 3. probes, metrics


def test_metrics_and_probes_follow_daemon_state(home: Home, launcher: Launcher) -> None:
    """/metrics, /healthz and /readyz report what the daemon sees, and change with it.

    Publishing is broken by putting a directory where the JWKS file goes
    (chmod would not stop root, and tests may run as root); the backend is
    made unusable by putting a file where its key directory goes. Both are
    undone and the daemon must recover on its own.
    """
    fast_home(home, rotation_period="1h", publish_ahead="10m")
    d = launcher.start(home)
    d.ready()
    port = d.port
    assert get(port, "/healthz") == (200, get(port, "/healthz")[1])
    m1 = scrape(port)
    assert metric(m1, "keymgr_keys", ring="default", state="active") == 1
    for st in ("pending", "published", "retired", "expired", "destroyed", "revoked"):
        assert metric(m1, "keymgr_keys", ring="default", state=st) == 0
    assert metric(m1, "keymgr_lease_held") == 1 and metric(m1, "keymgr_ready") == 1
    nxt = metric(m1, "keymgr_next_transition_timestamp_seconds", ring="default",
                 action="generate")
    assert time.time() + 40 * 60 < nxt <= time.time() + 50 * 60 + 1  # P - A = 50 min
    assert metric(m1, "keymgr_transitions_total", event="key.promoted") == 1
    ok1 = metric(m1, "keymgr_reconciles_total", result="ok")
    age1 = metric(m1, "keymgr_active_key_age_seconds", ring="default")

    def scraped(pred: Callable[[dict[Any, float]], bool], what: str, t: float = 15) -> Any:
        return wait_for(lambda: (m := scrape(port)) and pred(m) and m, t, what, every=0.2)

    m2 = scraped(lambda m: metric(m, "keymgr_reconciles_total", result="ok") >= ok1 + 2,
                 "more successful passes")
    assert metric(m2, "keymgr_active_key_age_seconds", ring="default") > age1
    assert metric(m2, "keymgr_last_reconcile_success_timestamp_seconds") > time.time() - 10

    # Publishing fails: the failure counters climb, the document comes back after.
    home.jwks_path.unlink()
    home.jwks_path.mkdir()
    m3 = scraped(lambda m: metric(m, "keymgr_publish_failures_total", publisher="site") >= 2,
                 "publish failures to be counted")
    assert metric(m3, "keymgr_reconciles_total", result="failed") >= 2
    assert any(ln.get("event") == "publish.failed" and ln.get("error") for ln in d.logs())
    written = metric(m3, "keymgr_jwks_publishes_total", publisher="site", result="written")
    home.jwks_path.rmdir()
    scraped(lambda m: metric(m, "keymgr_jwks_publishes_total", publisher="site",
                             result="written") > written, "the JWKS to be written again")
    assert len(home.jwks()["keys"]) == 1

    # The backend becomes unusable: /readyz fails (liveness does not), then recovers.
    keys = home.dir / "keys"
    keys.rename(home.dir / "keys.moved")
    keys.write_text("not a directory\n")
    wait_for(lambda: get(port, "/readyz")[0] == 503, 10, "/readyz to fail")
    body = json.loads(get(port, "/readyz")[1])
    assert body["ok"] is False and "backend:local" in body["reason"]
    assert get(port, "/healthz")[0] == 200, "a dead backend is no reason to restart the daemon"
    assert metric(scrape(port), "keymgr_ready") == 0
    keys.unlink()
    (home.dir / "keys.moved").rename(keys)
    wait_for(lambda: get(port, "/readyz")[0] == 200, 10, "/readyz to recover")
    assert get(port, "/nope")[0] == 404
    rc, _ = d.stop()
    assert rc == 0
    check_audit_matches_state(home)


# --------------------------------------------------------------------------- 4. sd_notify


def test_sd_notify_ready_watchdog_reloading_stopping(home: Home, launcher: Launcher) -> None:
    """The systemd notify protocol, received on a real AF_UNIX datagram socket.

    The socket is in the abstract namespace (``@name``), as systemd's own often
    is. WATCHDOG_USEC of 2 s means a ping every second (half, as
    sd_watchdog_enabled recommends), and systemd would kill the service after
    2 s without one; READY before any WATCHDOG, and STOPPING last, is what
    Type=notify units rely on.
    """
    fast_home(home)
    name = f"keymgr-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(0.2)
    got: list[tuple[float, str]] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            for msg in data.decode().split("\n"):
                got.append((time.monotonic(), msg))

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    try:
        d = launcher.start(home, env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
        wait_for(lambda: sum(m == "WATCHDOG=1" for _, m in got) >= 3, 15, "three WATCHDOG=1")
        msgs = [m for _, m in got]
        assert "READY=1" in msgs and msgs.index("READY=1") < msgs.index("WATCHDOG=1")
        pings = [at for at, m in got if m == "WATCHDOG=1"]
        assert max(b - a for a, b in itertools.pairwise(pings)) < 2.0
        d.ready()
        d.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: any(m == "RELOADING=1" for _, m in got), 10, "RELOADING=1")
        reload_at = next(i for i, (_, m) in enumerate(got) if m == "RELOADING=1")
        assert got[reload_at + 1][1].startswith("MONOTONIC_USEC=")
        wait_for(lambda: any(m == "READY=1" for _, m in got[reload_at:]), 10, "READY=1 again")
        rc, took = d.stop()
        assert rc == 0 and took < STOP_BOUND
        wait_for(lambda: any(m == "STOPPING=1" for _, m in got), 5, "STOPPING=1")
        stop_at = max(i for i, (_, m) in enumerate(got) if m == "STOPPING=1")
        assert not any(m == "WATCHDOG=1" for _, m in got[stop_at:])
    finally:
        done.set()
        t.join(timeout=5)
        sock.close()


# --------------------------------------------------------------------------- 5. HA


def test_three_replicas_one_holder_and_failover(home: Home, launcher: Launcher) -> None:
    """Three replicas on one state file: only the lease holder acts; SIGKILL it and
    another takes over within the lease period; the invariants and the audit
    chain survive.

    lease_ttl is 3 s, the minimum, so standbys check every second. The bound
    checked for the takeover is lease_ttl + one heartbeat + 1 s of timestamp
    granularity, plus 3 s for a loaded test machine. A watcher thread reads the
    state document 20 times a second throughout and records every key state it
    ever sees: never two active keys in the ring.
    """
    fast_home(home, lease_ttl="3s", retire_grace="2s")
    lease_path = home.dir / "state.json.lease"
    procs = [launcher.start(home, name=f"replica{i}") for i in range(3)]
    for p in procs:
        p.ready()

    max_active = 0
    seen_kids: set[str] = set()
    stop_watch = threading.Event()

    def watch() -> None:
        nonlocal max_active
        while not stop_watch.is_set():
            try:
                st = read_state(home.dir / "state.json")
            except (OSError, ValueError, KeymgrError):
                continue
            for ring in st["rings"].values():
                max_active = max(max_active, sum(k["state"] == "active" for k in ring["keys"]))
                seen_kids.update(k["kid"] for k in ring["keys"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        def holder() -> Proc | None:
            try:
                doc = json.loads(lease_path.read_text())
            except (OSError, ValueError):
                return None
            pid = int(str(doc.get("holder") or "::").split(":")[1] or 0)
            return next((p for p in procs if p.pid == pid and p.popen.poll() is None), None)

        def gauge_says_held(p: Proc) -> bool:
            # The lease document is written inside acquire(); the gauge is set
            # just after it returns, so a scrape may briefly lag the file.
            return metric(scrape(p.port), "keymgr_lease_held") == 1

        first = wait_for(holder, 10, "a lease holder")
        wait_for(lambda: gauge_says_held(first), 3, "the holder's lease gauge")
        # Only the holder acts: a standby never ran a pass.
        for p in procs:
            m = scrape(p.port)
            assert metric(m, "keymgr_lease_held") == (1 if p is first else 0)
            if p is not first:
                assert metric(m, "keymgr_reconciles_total", result="ok") == 0
                assert metric(m, "keymgr_reconciles_total", result="failed") == 0
                assert get(p.port, "/readyz")[0] == 200, "a standby is ready to take over"
        wait_for(lambda: any(e["event"] == "key.promoted" and e.get("reason") == "scheduled"
                             for e in audit_events(home)), 15, "a scheduled rotation")

        first.popen.kill()
        killed_at = time.monotonic()
        first.popen.wait(timeout=10)
        second = wait_for(lambda: (h := holder()) is not None and h is not first and h, 15,
                          "another replica to take the lease")
        took = time.monotonic() - killed_at
        assert took <= 3 + 1 + 1 + 3, f"takeover took {took:.1f}s"
        wait_for(lambda: gauge_says_held(second), 3, "the new holder's lease gauge")
        promoted_before = sum(e["event"] == "key.promoted" for e in audit_events(home))
        wait_for(lambda: sum(e["event"] == "key.promoted" for e in audit_events(home))
                 > promoted_before, 15, "a rotation by the new holder")
        third = next(p for p in procs if p is not first and p is not second)
        assert metric(scrape(third.port), "keymgr_reconciles_total", result="ok") == 0
        # From each replica's own log: who acted, and before or after the kill.
        acted = {p.pid: [ln for ln in p.logs() if str(ln.get("event")).startswith("key.")]
                 for p in procs}
        assert acted[first.pid] and acted[second.pid] and not acted[third.pid]
    finally:
        stop_watch.set()
        watcher.join(timeout=5)
    for p in procs:
        if p is not first:
            rc, took = p.stop()
            assert rc == 0 and took < STOP_BOUND
    assert max_active == 1, f"saw {max_active} active keys at once"
    events = check_audit_matches_state(home)
    state_kids = {k["kid"] for r in home.state()["rings"].values() for k in r["keys"]}
    assert seen_kids <= state_kids, "a key seen in state vanished from it"
    generated = Counter(e["kid"] for e in events if e["event"] == "key.generated")
    assert max(generated.values()) == 1
    assert sum(e["event"] == "daemon.started" for e in events) == 3
    assert all(e["actor"] == "daemon" for e in events)
