"""``keymgr status --json`` answered by the running daemon (keymgr.status_client,
``GET /v1/status`` of keymgr.service), through real daemons and real sockets.

What is shown: the answer is the command's own output byte for byte, and it
came from the daemon (the test's own ``status_parts`` is made to fail); a
config edited but not reloaded, a socket served by an untrusted uid, and a
daemon that answers nothing are each left for the direct read; an answer cut
after it started ends the command with one line and exit 1; a state rolled
back, lost, edited by hand or torn under the running daemon is refused by the
daemon and the command alike; who may read the status; and, in-process,
that a client gone or a render failing mid-answer leaves no complete-looking
document and does not hold the next request.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keymgr import cli, manager
from tests.conftest import Home, read_state
from tests.test_daemon import Launcher, audit_events, fast_home, set_daemon, wait_for
from tests.test_service import NOBODY, UnixHTTP, add_service, service_started


def served(home: Home, launcher: Launcher, sock: Path, **fields: Any) -> Any:
    """A ready daemon of ``home`` with a ``[service]`` on ``sock`` (no ring
    served). The default ring's periods (30 days): nothing changes while a
    test compares two answers."""
    set_daemon(home, listen="127.0.0.1:0")
    add_service(home, {}, socket=str(sock), **fields)
    d = launcher.start(home)
    d.ready()
    service_started(d)
    return d


def status(home: Home, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """``keymgr status --json [EXTRA]`` in a process of its own, as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "--config", str(home.config), "status", "--json",
         *extra],
        capture_output=True, cwd=home.dir, env=home.env(), timeout=60,
    )


def direct(home: Home) -> bytes:
    """The store read by the command itself (``--direct``), which must succeed."""
    proc = status(home, "--direct")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_daemons_answer_is_the_commands_output_byte_for_byte(
    home: Home, launcher: Launcher, monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    sock = home.dir / "svc.sock"
    served(home, launcher, sock)
    want = direct(home)
    doc = json.loads(want)
    assert doc["rings"]["default"]["keys"][0]["state"] == "active"

    def not_here(self: Any) -> Any:
        raise AssertionError("status was computed in the command, not by the daemon")

    monkeypatch.setattr(manager.KeyManager, "status_parts", not_here)
    assert cli.main(["--config", str(home.config), "status", "--json"]) == 0
    out, err = capfdbinary.readouterr()
    assert out == want, err
    assert err == b""
    # The text form is the daemon's too, drawn from the same status; "(in
    # 29d...)" is counted from when each side drew it, so it is left out of
    # the comparison.
    from keymgr import render

    drawn: list[str] = []
    render.write_status_text(((s, v.items()) for s, v in json.loads(want).items()), drawn.append)
    text = "".join(drawn)
    assert text.startswith("ring default") and "(in 29d" in text
    assert cli.main(["--config", str(home.config), "status"]) == 0
    out, err = capfdbinary.readouterr()
    assert err == b"" and out.decode().endswith("\n")
    assert _at_any_time(out.decode()) == _at_any_time(text)
    # And through a real command in a process of its own.
    proc = status(home)
    assert proc.returncode == 0 and proc.stdout == want and proc.stderr == b""
    # A form the daemon does not draw: 400, named.
    c = UnixHTTP(sock)
    try:
        c.request("GET", "/v1/status?form=yaml")
        r = c.getresponse()
        assert r.status == 400 and b"form: json or text, got 'yaml'" in r.read()
    finally:
        c.close()


def test_a_config_not_reloaded_yet_is_read_directly(home: Home, launcher: Launcher) -> None:
    sock = home.dir / "svc.sock"
    served(home, launcher, sock)
    before = direct(home)
    old_identity = _identity(home)
    # A second ring in the file, no SIGHUP: the daemon still runs the old config.
    text = home.config.read_text()
    cut = text.index("\n[service]")
    start = text.index("[keyrings.default]")  # the default ring's table, as a second one
    ring = text[start:cut].replace("[keyrings.default]", "[keyrings.second]", 1)
    home.config.write_text(text[:cut] + "\n" + ring + text[cut:])
    proc = status(home)
    assert proc.returncode == 0, proc.stderr
    assert "second" in json.loads(proc.stdout)["rings"]
    assert "second" not in json.loads(before)["rings"]
    # What the daemon said to it: 409, naming why.
    code, body = _get(sock, {"X-Keymgr-Config": _identity(home)})
    assert code == 409 and json.loads(body)["error"]["code"] == "config_differs"
    code, body = _get(sock, {"X-Keymgr-Config": old_identity})
    assert code == 200 and body == before


def _identity(home: Home) -> str:
    from keymgr.config import load_config

    return load_config(home.config).identity


def _get(sock: Path, headers: dict[str, str]) -> tuple[int, bytes]:
    c = UnixHTTP(sock)
    try:
        c.request("GET", "/v1/status", headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# --------------------------------------------------------------------------- fake daemons


FAKE = textwrap.dedent("""
    import os, socket, sys
    path, mode = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            head += c.recv(4096)
        if mode == "close":
            c.close()
            continue
        if mode == "silent":  # a daemon that is stuck: connected, never answers
            held = c
            continue
        body = b'{"rings": {"forged": {}}}\\n' if mode == "forged" else b'{\\n  "rings": {'
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                  b"Transfer-Encoding: chunked\\r\\n\\r\\n"
                  + b"%x\\r\\n" % len(body) + body + b"\\r\\n")
        if mode == "forged":
            c.sendall(b"0\\r\\n\\r\\n")
        c.close()
""")


def fake_daemon(sock: Path, mode: str, user: int | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", FAKE, str(sock), mode]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n", p.stderr
    return p


@pytest.fixture
def fakes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def with_socket_only(home: Home, sock: Path) -> None:
    add_service(home, {}, socket=str(sock))
    home.run("reconcile", check=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to serve a socket as another uid")
def test_a_socket_served_by_an_untrusted_uid_is_not_asked(
    home: Home, fakes: list[subprocess.Popen[str]]
) -> None:
    """uid 65534 serves a forged status in a folder it may write but does not
    own (root's, mode 1777): the command warns in one line and reads the store."""
    folder = Path(tempfile.mkdtemp(prefix="keymgr-st-"))
    try:
        folder.chmod(0o1777)
        sock = folder / "svc.sock"
        with_socket_only(home, sock)
        want = direct(home)
        fakes.append(fake_daemon(sock, "forged", user=NOBODY))
        proc = status(home)
        assert proc.returncode == 0 and proc.stdout == want
        err = proc.stderr.decode().strip().splitlines()
        assert len(err) == 1 and "not asked, reading the store" in err[0] and str(sock) in err[0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_forged_answer_from_the_folders_owner_is_what_it_trusts(
    home: Home, fakes: list[subprocess.Popen[str]]
) -> None:
    """The other side of the rule: whoever owns the socket's folder (here this
    uid) is trusted to answer. This is what makes the check above a real one."""
    sock = home.dir / "svc.sock"
    with_socket_only(home, sock)
    fakes.append(fake_daemon(sock, "forged"))
    proc = status(home)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"rings": {"forged": {}}}
    # The text form, asked of a daemon that answers JSON to it (as one that
    # predates the text form would): not taken, the store is read.
    text = subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "--config", str(home.config), "status"],
        capture_output=True, cwd=home.dir, env=home.env(), timeout=60,
    )  # fmt: skip
    assert text.returncode == 0 and text.stderr == b""
    assert text.stdout.decode().startswith("ring default\n"), text.stdout


def test_no_answer_is_read_directly_and_a_cut_answer_fails_in_one_line(
    home: Home, fakes: list[subprocess.Popen[str]]
) -> None:
    sock = home.dir / "svc.sock"
    with_socket_only(home, sock)
    want = direct(home)
    # A socket left behind by a daemon that is gone: read directly, silently.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()
    proc = status(home)
    assert proc.returncode == 0 and proc.stdout == want and proc.stderr == b""
    sock.unlink()
    # A daemon that closes without a word: read directly, silently.
    fakes.append(fake_daemon(sock, "close"))
    proc = status(home)
    assert proc.returncode == 0 and proc.stdout == want and proc.stderr == b""
    fakes.pop().kill()
    sock.unlink()
    # An answer cut after its first chunk: one line, exit 1, no traceback.
    fakes.append(fake_daemon(sock, "cut"))
    proc = status(home)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and proc.stdout == b'{\n  "rings": {'
    assert len(err) == 1 and "was cut short" in err[0] and "Traceback" not in err[0], err


def test_a_daemon_that_does_not_answer_is_not_waited_for(
    home: Home, fakes: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    """Connected, then silence (a stopped daemon's socket still accepts):
    after ANSWER_TIMEOUT (15 s; 1 s here) the store is read, silently."""
    from keymgr import status_client

    sock = home.dir / "svc.sock"
    with_socket_only(home, sock)
    want = direct(home)
    fakes.append(fake_daemon(sock, "silent"))
    monkeypatch.setattr(status_client, "ANSWER_TIMEOUT", 1.0)
    t0 = time.monotonic()
    assert cli.main(["--config", str(home.config), "status", "--json"]) == 0
    took = time.monotonic() - t0
    out, err = capfdbinary.readouterr()
    assert out == want and err == b""
    assert 1.0 <= took < 10, took


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to ask as another uid")
def test_who_may_read_the_status(home: Home, launcher: Launcher) -> None:
    """uid 65534 reaches the socket (its group) but is refused (403, audited
    once, no ring named) until ``[service.status]`` names it and a SIGHUP
    applies that."""
    folder = Path(tempfile.mkdtemp(prefix="keymgr-st-"))
    try:
        folder.chmod(0o755)
        sock = folder / "svc.sock"
        d = served(home, launcher, sock, socket_group=NOBODY)
        ask = [sys.executable, "-c", textwrap.dedent("""
            import http.client, socket, sys
            class C(http.client.HTTPConnection):
                def connect(self):
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.connect(sys.argv[1])
            c = C("localhost", timeout=20)
            c.request("GET", "/v1/status")
            r = c.getresponse()
            print(r.status, r.read().decode())
        """), str(sock)]
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        out = subprocess.run([*as_nobody, *ask], capture_output=True, text=True, timeout=30)
        code, _, body = out.stdout.partition(" ")
        assert code == "403", out
        assert json.loads(body)["error"]["code"] == "forbidden"
        refused = wait_for(lambda: [e for e in audit_events(home)
                                    if e["event"] == "service.refused"], 20, "service.refused")
        assert refused[0]["caller"] == f"uid:{NOBODY}" and "ring" not in refused[0]
        assert "not allowed to read the status" in refused[0]["reason"]
        # This uid (root, the daemon's own) is allowed without being named.
        code2, body2 = _get(sock, {})
        assert code2 == 200 and json.loads(body2)["rings"]["default"]
        # Named in [service.status], after a reload.
        with home.config.open("a") as f:
            f.write(f"\n[service.status]\nuids = [{NOBODY}]\n")
        d.popen.send_signal(signal.SIGHUP)

        def allowed() -> bool:
            r = subprocess.run([*as_nobody, *ask], capture_output=True, text=True, timeout=30)
            return r.stdout.startswith("200 ")

        wait_for(allowed, 20, "uid 65534 allowed to read the status")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------ the server side, in-process


class _Host:
    """What keymgr.service needs of a daemon, around a real KeyManager."""

    def __init__(self, home: Home) -> None:
        from keymgr.config import load_config
        from keymgr.metrics import Metrics

        self.config = load_config(home.config)
        self.manager = manager.KeyManager(self.config, "daemon")
        self.metrics = Metrics()
        self.events: list[dict[str, Any]] = []

    def record(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_a_client_gone_or_a_render_failing_mid_answer(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status of 8 MB (rings made up by a patched ``status_parts``): a client
    that reads a little and leaves does not hold the next request; a render
    that fails after the answer started leaves the client a cut answer
    (``IncompleteRead``), never a short document that parses."""
    from keymgr import service

    sock = home.dir / "svc.sock"
    add_service(home, {}, socket=str(sock))
    home.run("reconcile", check=True)
    host = _Host(home)
    fail_at: list[int | None] = [None]

    def parts(self: Any) -> Iterator[tuple[str, Iterator[tuple[str, Any]]]]:
        def rings() -> Iterator[tuple[str, Any]]:
            for i in range(40_000):
                if i == fail_at[0]:
                    raise RuntimeError("made to fail")
                yield f"r{i:06d}", {"keys": [], "next": {"action": "x" * 150}}

        return iter([("rings", rings())])

    monkeypatch.setattr(manager.KeyManager, "status_parts", parts)
    assert host.config.service is not None
    svc = service.SigningService(host, host.config.service, service.bind(host.config.service))
    svc.start()
    closed = False
    try:
        # Gone after a few bytes.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.close()
        # The next one gets all of it.
        code, body = _get(sock, {})
        assert code == 200 and len(json.loads(body)["rings"]) == 40_000 and len(body) > 7e6
        # A render failing at ring 30,000: the answer is cut, not closed cleanly.
        fail_at[0] = 30_000
        c = UnixHTTP(sock)
        c.request("GET", "/v1/status")
        r = c.getresponse()
        assert r.status == 200
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            r.read()
        c.close()
        # And the service still answers.
        fail_at[0] = None
        done = threading.Event()
        result: list[int] = []

        def again() -> None:
            result.append(_get(sock, {})[0])
            done.set()

        threading.Thread(target=again, daemon=True).start()
        assert done.wait(30) and result == [200]
        # A client that stops reading, then the daemon stops: the service
        # closes in its grace, and the thread rendering for it ends too (a
        # pool thread waiting on a loop that stopped would hold the exit).
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(str(sock))
        stalled.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stalled.recv(100).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        svc.close()
        closed = True
        assert time.monotonic() - t0 < service.SHUTDOWN_GRACE + 5
        wait_for(lambda: not [t for t in threading.enumerate()
                              if t.name.startswith("service-sign") and t.is_alive()],
                 10, "the service's threads to end")
        stalled.close()
    finally:
        if not closed:
            svc.close()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('status = "ops"\n', "service.status: must be a table"),
        ('[service.status]\nuids = ["root"]\n', "service.status.uids: expected numeric"),
        ("[service.status]\nuserz = []\n", "service.status.userz: unknown option"),
        ('[service.status]\ngroups = ["no-such-group-here"]\n', "no such group"),
    ],
)
def test_bad_status_access_is_refused(home: Home, text: str, error: str) -> None:
    add_service(home, {})
    with home.config.open("a") as f:
        f.write(text)
    res = home.run("config", "check", inproc=True)
    assert res.returncode == 2 and error in res.stderr, res.stderr
    add_service(home, {})
    with home.config.open("a") as f:
        f.write('[service.status]\nusers = ["root"]\ngroups = ["root"]\ncert_names = ["ops"]\n')
    assert home.run("config", "check", inproc=True).returncode == 0


def test_answers_stay_whole_and_sound_while_the_daemon_rotates(
    home: Home, launcher: Launcher
) -> None:
    """Second-scale periods: the daemon generates, publishes, promotes and
    retires while status is asked of it again and again (its pass, its
    heartbeat and the status thread plan on one memo). Every answer is a
    whole document with one active key, and the answers follow the rotations."""
    from keymgr.status_client import from_daemon

    sock = home.dir / "svc.sock"
    fast_home(home, interval="1s")
    add_service(home, {}, socket=str(sock))
    d = launcher.start(home)
    d.ready()
    service_started(d)
    identity = _identity(home)
    actives: list[str] = []
    answers = 0
    deadline = time.monotonic() + 20
    # Until a promotion was seen and 20 answers more came after it.
    while time.monotonic() < deadline and not (len(actives) >= 2 and answers >= 20):
        got = bytearray()
        assert from_daemon(sock, identity, got.extend, pytest.fail)
        keys = json.loads(got)["rings"]["default"]["keys"]
        active = [k["kid"] for k in keys if k["state"] == "active"]
        assert len(active) == 1, keys
        assert {k["state"] for k in keys} <= {"pending", "published", "active", "retired",
                                                "expired", "destroyed"}, keys
        if not actives or actives[-1] != active[0]:
            actives.append(active[0])
            answers = 0
        answers += 1
        time.sleep(0.05)
    assert len(actives) >= 2, actives  # a promotion happened while it answered
    assert len(set(actives)) == len(actives), actives  # and never went back


def _at_any_time(text: str) -> str:
    """``text`` without the durations counted from the moment it was drawn."""
    return re.sub(r" \((in [0-9dhms]+|due now)\)", "", text)


def test_a_state_put_back_from_an_older_copy_is_refused_alike(
    home: Home, launcher: Launcher
) -> None:
    """With the daemon running, a state rolled back to an older copy (the
    audit log went on past its anchor) is refused by ``status --json``, ``status``
    and ``--direct`` alike: one line, exit 1, nothing on stdout. The daemon's
    own check refuses it (503), and the command's read words it as always."""
    sock = home.dir / "svc.sock"
    served(home, launcher, sock)
    state = home.dir / "state.json"
    old = {p: p.read_bytes() for p in home.dir.glob("state.json*") if p.is_file()}
    home.run("rotate", "default", check=True)
    for p in home.dir.glob("state.json*"):
        if p.is_file() and p not in old and p.suffix not in (".lock", ".lease"):
            p.unlink()
    for p, data in old.items():
        if p.suffix not in (".lock", ".lease"):
            p.write_bytes(data)
    assert state.exists()
    refused_alike(home, sock)


def refused_alike(home: Home, sock: Path) -> str:
    """The daemon answers 503, and ``status --json``, ``status`` and
    ``status --json --direct`` each fail with the same one line, exit 1 and
    nothing on stdout: that line."""
    code, _ = _get(sock, {})
    assert code == 503
    answers = [status(home), status(home, "--direct"),
               subprocess.run([sys.executable, "-m", "keymgr.cli", "--config", str(home.config),
                               "status"], capture_output=True, env=home.env(), timeout=60)]
    for proc in answers:
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode == 1 and proc.stdout == b"" and len(err) == 1, proc
    assert answers[0].stderr == answers[1].stderr == answers[2].stderr
    return answers[0].stderr.decode()


def _lose(state: Path) -> bytes | None:
    state.rename(state.with_name("state.json.bak"))
    return None


def _edit(state: Path) -> bytes:
    doc = read_state(state)
    doc["rings"]["default"]["keys"][0]["state"] = "sleeping"
    raw = json.dumps(doc).encode()
    state.write_bytes(raw)
    return raw


def _tear(state: Path) -> bytes:
    raw = state.read_bytes()[: state.stat().st_size // 2]
    state.write_bytes(raw)
    return raw


@pytest.mark.parametrize(
    ("damage", "words"),
    [(_lose, "state anchors none (a new or replaced state)"),
     (_edit, "unknown state"),
     (_tear, "corrupt state")],
    ids=["lost", "edited", "torn"],
)
def test_a_state_lost_or_damaged_under_the_daemon_is_refused_alike(
    home: Home, launcher: Launcher, damage: Any, words: str
) -> None:
    """With the daemon running and answering, the state is lost (moved
    away), edited by hand (a key in a state keymgr does not know) or torn
    (half a document). The daemon's read refuses it like the command's own:
    503, then the same one line from ``status --json``, ``status`` and
    ``--direct``, naming what is wrong; and nothing the daemon does meanwhile
    writes over what was found."""
    sock = home.dir / "svc.sock"
    d = served(home, launcher, sock)
    assert status(home).returncode == 0
    state = home.dir / "state.json"
    left = damage(state)
    line = refused_alike(home, sock)
    assert words in line, line
    d.popen.send_signal(signal.SIGHUP)  # a pass and a heartbeat on it
    time.sleep(1.5)
    assert refused_alike(home, sock) == line
    if left is None:
        assert not state.exists()
    else:
        assert state.read_bytes() == left


# --------------------------------------------------------------------------- asked before the parse


@pytest.mark.parametrize(
    ("table", "want"),
    [
        ('[service]\nsocket = "/run/x/sign.sock"\n', "/run/x/sign.sock"),
        ('[ service ]  # the daemon\n  socket="svc.sock"  # beside it\n', "{dir}/svc.sock"),
        ('[service]\r\nsocket = "/a.sock"\r\nsocket_mode = "0660"\r\n', "/a.sock"),
        ('[service]\nsocket_mode = "0660"\n', "/run/keymgr/sign.sock"),  # the default
        ('[service.status]\nuids = [0]\n[service]\nsocket = "/b.sock"\n', "/b.sock"),
        ('[service]\n[service.rings.default]\nsocket = "/not/this"\n', "/run/keymgr/sign.sock"),
        # Read by the parse only: a literal or escaped string, a quoted or
        # dotted key, no [service] header line, an array of tables.
        ("[service]\nsocket = '/c.sock'\n", None),
        ('[service]\nsocket = "/d\\u0041.sock"\n', None),
        ('[service]\n"socket" = "/e.sock"\n', None),
        ('service.socket = "/f.sock"\n', None),
        ('service = { socket = "/g.sock" }\n', None),
        ('[[service]]\nsocket = "/h.sock"\n', None),
        ('[service]\nsocket = ""\n', None),
    ],
)
def test_the_socket_is_read_from_the_configs_bytes(tmp_path: Path, table: str,
                                                   want: str | None) -> None:
    from keymgr.status_client import socket_hint

    config = tmp_path / "keymgr.toml"
    raw = ('[daemon]\nstate = "file:state.json"\n\n' + table).encode()
    got = socket_hint(raw, config)
    assert got == (None if want is None else Path(want.format(dir=tmp_path)))


def test_the_daemon_is_asked_before_the_config_is_parsed(
    home: Home, launcher: Launcher, monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    """The command asks the socket its config's bytes name and parses nothing
    when the daemon answers (the parse is 1.4 s of a 100,000-ring config);
    with the socket written in a form it does not read (a literal string), it
    parses the config and asks the socket that names: the answer still comes
    from the daemon. A config edited since the daemon loaded it is parsed and
    read directly (test_a_config_not_reloaded_yet_is_read_directly)."""
    from keymgr import config as config_module

    sock = home.dir / "svc.sock"
    d = served(home, launcher, sock)
    want = direct(home)

    def not_computed(self: Any) -> Any:
        raise AssertionError("status was computed in the command, not by the daemon")

    monkeypatch.setattr(manager.KeyManager, "status_parts", not_computed)
    parsed: list[Path] = []
    real_load = config_module.load_config

    def load(path: Any) -> Any:
        parsed.append(Path(path))
        return real_load(path)

    monkeypatch.setattr(config_module, "load_config", load)
    assert cli.main(["--config", str(home.config), "status", "--json"]) == 0
    out, err = capfdbinary.readouterr()
    assert out == want and err == b"" and parsed == []
    # The same bytes with the socket as a literal string: parsed, then asked.
    text = home.config.read_text()
    line = f"socket = {json.dumps(str(sock))}"
    assert line in text
    home.config.write_text(text.replace(line, f"socket = '{sock}'"))
    # The daemon must load these bytes to answer for them.
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: _get(sock, {"X-Keymgr-Config": _identity(home)})[0] == 200, 20,
             "the daemon to answer for the edited config")
    parsed.clear()
    assert cli.main(["--config", str(home.config), "status", "--json"]) == 0
    out, err = capfdbinary.readouterr()
    assert out == want and err == b"" and parsed == [home.config]
