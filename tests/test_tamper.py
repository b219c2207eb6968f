"""Tampering: the audit log, key files, the master key and the state file.

Every detected problem must end the command with a non-zero exit and exactly
one line on stderr that names the damaged file (and, for the audit log, the
first bad line), never a traceback, and must leave every file as it was. No
output ever holds the master key or PEM.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Home

RING = "default"
POLICY = {
    "algorithm": "ES256",
    "rotation_period": "10d",
    "publish_ahead": "1h",
    "retire_grace": "1d",
    "destroy_after": "1d",
}
T0 = "2030-01-01T00:00:00Z"  # bootstrap
T3 = "2030-01-12T00:00:00Z"  # after: K1 expired, K2 active; 11 audit lines
T4 = "2030-01-13T00:00:00Z"  # destroy K1 is due
T5 = "2030-01-20T23:00:00Z"  # the next successor is due (generate)
STEPS = (T0, "2030-01-10T23:00:00Z", "2030-01-11T00:00:00Z", T3)
PYCACHE = Path(tempfile.gettempdir()) / f"keymgr-tests-pycache-{os.getuid()}"

#: Audit lines (and the seq anchored in state) after STEPS.
LINES = 11


# --------------------------------------------------------------------------- helpers


class Tampered(Home):
    """A Home whose every CLI run is checked for leaked secrets and tracebacks."""

    #: Master keys this home ever had (a test may replace the file).
    secrets: list[str]

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.jsonl"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def key_path(self, kid: str) -> Path:
        return self.dir / "keys" / RING / f"{kid}.key"

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        e = self.env(PYTHONPYCACHEPREFIX=str(PYCACHE), **env)
        e.pop("PYTHONDONTWRITEBYTECODE", None)
        proc = self.run(*args, env=e)
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out, out
        assert "-----BEGIN" not in out and "PRIVATE KEY" not in out, out
        for secret in self.secrets:
            raw = base64.b64decode(secret)
            for form in (secret, base64.urlsafe_b64encode(raw).decode().rstrip("="), raw.hex()):
                leaked = form in out  # never let pytest print the key itself
                assert not leaked, f"master key leaked in output of {args}"
        return proc

    def snapshot(self) -> dict[str, bytes]:
        return self.files()


def without_audit(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """A snapshot minus what a failed pass may add: its failure event, appended
    to the log and anchored in state, and the write-ahead intent of a generate
    that failed (kept open for the retry, with the time it was opened). Keys,
    key records and every other file stay."""
    out = {p: b for p, b in snapshot.items() if p != "audit.jsonl"}
    if "state.json" in out:
        doc = json.loads(out["state.json"])
        doc.pop("audit", None)
        doc.pop("version", None)  # the store's CAS counter
        doc.pop("intents", None)
        doc.pop("clock", None)
        out["state.json"] = json.dumps(doc, sort_keys=True).encode()
    return out


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line on stderr of a failed command."""
    assert proc.returncode != 0, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("keymgr: error: "), lines[0]
    return lines[0]


def first_line_number(message: str) -> int:
    m = re.search(r"\bline (\d+)\b", message)
    assert m, f"no line number in: {message}"
    return int(m.group(1))


def new_master_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def flip_ciphertext_byte(path: Path) -> None:
    doc = json.loads(path.read_text())
    ct = bytearray(
        base64.urlsafe_b64decode(doc["ciphertext"] + "=" * (-len(doc["ciphertext"]) % 4))
    )
    ct[len(ct) // 2] ^= 0x01
    doc["ciphertext"] = base64.urlsafe_b64encode(bytes(ct)).decode().rstrip("=")
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


@pytest.fixture(scope="session")
def rotated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per worker: a home taken through one rotation (STEPS); copied by each test."""
    d = tmp_path_factory.mktemp("rotated") / "home"
    subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(d)],
        check=True,
        capture_output=True,
    )
    h = Tampered(d)
    h.secrets = [(d / "master.key").read_text().strip()]
    h.set_ring(RING, **POLICY)
    for t in STEPS:
        proc = h.cli("reconcile", "--at", t)
        assert proc.returncode == 0, proc.stderr
    assert h.state()["audit"]["seq"] == LINES == len(h.audit_path.read_text().splitlines())
    assert h.cli("audit", "verify").returncode == 0
    return d


@pytest.fixture
def rotated(rotated_dir: Path, tmp_path: Path) -> Tampered:
    d = tmp_path / "home"
    shutil.copytree(rotated_dir, d, symlinks=True)
    h = Tampered(d)
    h.secrets = [(d / "master.key").read_text().strip()]
    return h


@pytest.fixture
def fresh(home: Home) -> Tampered:
    h = Tampered(home.dir)
    h.secrets = [(h.dir / "master.key").read_text().strip()]
    h.set_ring(RING, **POLICY)
    return h


# --------------------------------------------------------------------------- audit log


def _lines(h: Tampered) -> list[bytes]:
    return h.audit_path.read_bytes().splitlines(keepends=True)


def _write(h: Tampered, lines: list[bytes]) -> None:
    h.audit_path.write_bytes(b"".join(lines))


def edit_field(lineno: int) -> Callable[[Tampered], int]:
    def tamper(h: Tampered) -> int:
        lines = _lines(h)
        ev = json.loads(lines[lineno - 1])
        ev["ts"] = "2029-12-31T23:59:59Z"
        lines[lineno - 1] = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
        _write(h, lines)
        return lineno

    return tamper


def edit_hash(lineno: int) -> Callable[[Tampered], int]:
    def tamper(h: Tampered) -> int:
        lines = _lines(h)
        ev = json.loads(lines[lineno - 1])
        ev["hash"] = "f" * 64
        lines[lineno - 1] = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
        _write(h, lines)
        return lineno

    return tamper


def garble(lineno: int) -> Callable[[Tampered], int]:
    def tamper(h: Tampered) -> int:
        lines = _lines(h)
        lines[lineno - 1] = lines[lineno - 1][:20] + lines[lineno - 1][21:]
        _write(h, lines)
        return lineno

    return tamper


def delete(lineno: int) -> Callable[[Tampered], int]:
    def tamper(h: Tampered) -> int:
        lines = _lines(h)
        del lines[lineno - 1]
        _write(h, lines)
        return lineno

    return tamper


def swap(lineno: int) -> Callable[[Tampered], int]:
    def tamper(h: Tampered) -> int:
        lines = _lines(h)
        lines[lineno - 1], lines[lineno] = lines[lineno], lines[lineno - 1]
        _write(h, lines)
        return lineno

    return tamper


def truncate(count: int) -> Callable[[Tampered], int]:
    """Remove the last ``count`` whole lines: what is left still chains perfectly."""

    def tamper(h: Tampered) -> int:
        lines = _lines(h)
        _write(h, lines[: len(lines) - count])
        return len(lines) - count + 1  # the first line that is missing

    return tamper


def torn_last_line(h: Tampered) -> int:
    data = h.audit_path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    h.audit_path.write_bytes(data[: last + (len(data) - last) // 2])
    return LINES


def truncate_mid_line(h: Tampered) -> int:
    """Cut the file in the middle of line 9: lines 10-11 gone, line 9 torn."""
    lines = _lines(h)
    head = b"".join(lines[:8])
    h.audit_path.write_bytes(head + lines[8][:40])
    return 9


def append_copy(h: Tampered) -> int:
    """A forged line made by copying the last one and changing the event."""
    lines = _lines(h)
    ev = json.loads(lines[-1])
    ev["event"] = "key.revoked"
    _write(h, [*lines, json.dumps(ev, separators=(",", ":")).encode() + b"\n"])
    return len(lines) + 1


def append_chained(h: Tampered) -> int:
    """A forged line with a correct seq, prev and hash (the chain has no secret)."""
    from keymgr.audit import chain_hash

    lines = _lines(h)
    last = json.loads(lines[-1])
    ev = {
        "ts": last["ts"],
        "seq": last["seq"] + 1,
        "event": "key.revoked",
        "ring": RING,
        "kid": h.kid_in("active"),
        "actor": "cli:mallory@example",
        "reason": "forged",
        "prev": last["hash"],
    }
    ev["hash"] = chain_hash(last["hash"], ev)
    _write(h, [*lines, json.dumps(ev, separators=(",", ":")).encode() + b"\n"])
    return len(lines) + 1


AUDIT_TAMPERS = {
    "edit-first": edit_field(1),
    "edit-middle": edit_field(6),
    "edit-last": edit_field(LINES),
    "edit-hash-middle": edit_hash(6),
    "garble-middle": garble(4),
    "delete-first": delete(1),
    "delete-middle": delete(5),
    "delete-second-to-last": delete(LINES - 1),
    "swap-first": swap(1),
    "swap-middle": swap(5),
    "swap-last-two": swap(LINES - 1),
    "truncate-last-line": truncate(1),
    "truncate-last-3-lines": truncate(3),
    "truncate-all": truncate(LINES),
    "truncate-mid-line": truncate_mid_line,
    "torn-last-line": torn_last_line,
    "append-copied-line": append_copy,
    "append-chained-forgery": append_chained,
}


@pytest.mark.parametrize("tamper", AUDIT_TAMPERS.values(), ids=AUDIT_TAMPERS.keys())
def test_audit_verify_names_first_bad_line(rotated: Tampered, tamper) -> None:
    bad_line = tamper(rotated)
    before = rotated.snapshot()
    proc = rotated.cli("audit", "verify")
    assert proc.returncode == 1, f"tampered log passed verification: {proc.stdout}"
    assert proc.stdout == ""
    line = error_line(proc)
    assert str(rotated.audit_path) in line, line
    assert first_line_number(line) == bad_line, line
    assert rotated.snapshot() == before  # verify only reads


@pytest.mark.parametrize(
    "tamper",
    [truncate(3), truncate(LINES), truncate_mid_line],
    ids=["last-3-lines", "all-lines", "mid-line"],
)
def test_reconcile_refuses_truncated_log(rotated: Tampered, tamper) -> None:
    tamper(rotated)
    before = rotated.snapshot()
    proc = rotated.cli("reconcile", "--at", T4)  # destroying K1 is due
    assert proc.returncode == 1
    # Nothing rewritten or extended: not the log, not the state, no key destroyed.
    assert rotated.snapshot() == before
    line = error_line(proc)
    assert str(rotated.audit_path) in line and "truncated" in line, line


def test_removed_failure_event_is_detected(rotated: Tampered) -> None:
    """A failure event (publish.failed) is evidence too: removing it must show."""
    jwks = rotated.jwks_path
    saved = jwks.read_bytes()
    jwks.unlink()
    jwks.mkdir()  # the publisher can neither read nor replace it
    proc = rotated.cli("reconcile", "--at", T3)  # nothing else is due at T3
    assert proc.returncode == 1
    jwks.rmdir()
    jwks.write_bytes(saved)
    events = [json.loads(x) for x in _lines(rotated)]
    assert [e["event"] for e in events[LINES:]] == ["publish.failed"]
    assert rotated.cli("audit", "verify").returncode == 0

    bad_line = truncate(1)(rotated)
    proc = rotated.cli("audit", "verify")
    assert proc.returncode == 1, f"log without its failure event passed: {proc.stdout}"
    line = error_line(proc)
    assert str(rotated.audit_path) in line
    assert first_line_number(line) == bad_line, line


# --------------------------------------------------------------------------- key files


def test_tampered_key_file_fails_sign(rotated: Tampered) -> None:
    key = rotated.key_path(rotated.kid_in("active"))
    flip_ciphertext_byte(key)
    before = rotated.snapshot()
    proc = rotated.cli("sign", RING, "--claims", '{"sub":"x"}')
    assert proc.returncode == 1 and proc.stdout == ""
    assert rotated.snapshot() == before
    line = error_line(proc)
    assert str(key) in line, line


def test_tampered_orphan_fails_reconcile(fresh: Tampered) -> None:
    """The key a killed run left behind fails authentication: not adopted, kept."""
    proc = fresh.cli("reconcile", "--at", T0, KEYMGR_CRASH_AT="generate.after_backend")
    assert proc.returncode == -9
    (orphan,) = (fresh.dir / "keys" / RING).glob("*.key")
    flip_ciphertext_byte(orphan)
    key_bytes = orphan.read_bytes()
    proc = fresh.cli("reconcile", "--at", T0)
    assert proc.returncode == 1
    assert orphan.read_bytes() == key_bytes
    assert not fresh.state_path.exists() or not fresh.state()["rings"].get(RING, {}).get("keys")
    assert not fresh.jwks_path.exists()
    line = error_line(proc)
    assert str(orphan) in line, line


def _replace_master_key(h: Tampered) -> str:
    other = new_master_key()
    (h.dir / "master.key").write_text(other + "\n")
    h.secrets.append(other)
    return other


def test_wrong_master_key_fails_sign(rotated: Tampered) -> None:
    _replace_master_key(rotated)
    before = rotated.snapshot()
    proc = rotated.cli("sign", RING, "--claims", '{"sub":"x"}')
    assert proc.returncode == 1 and proc.stdout == ""
    assert rotated.snapshot() == before  # master.key, key files, state: untouched
    line = error_line(proc)
    assert str(rotated.key_path(rotated.kid_in("active"))) in line, line


def test_wrong_master_key_fails_reconcile(rotated: Tampered) -> None:
    """With the wrong master key, no key may be made that the right one cannot open."""
    assert rotated.cli("reconcile", "--at", T4).returncode == 0  # K1 destroyed
    _replace_master_key(rotated)
    before = rotated.snapshot()
    before_kids = [k["kid"] for k in rotated.state()["rings"][RING]["keys"]]
    proc = rotated.cli("reconcile", "--at", T5)  # the successor is due
    assert proc.returncode == 1, f"reconcile went ahead: {proc.stdout}"
    assert without_audit(rotated.snapshot()) == without_audit(before)
    line = error_line(proc)
    # Names a key file of the ring that failed authentication (any one is fine).
    names = re.findall(re.escape(str(rotated.dir / "keys" / RING)) + r"/([^/\s]+)\.key", line)
    assert names and set(names) <= set(before_kids), line


@pytest.mark.parametrize("command", ["sign", "reconcile"])
def test_missing_master_key_file(rotated: Tampered, command: str) -> None:
    master = rotated.dir / "master.key"
    if command == "reconcile":
        assert rotated.cli("reconcile", "--at", T4).returncode == 0  # K1 destroyed
    master.unlink()
    before = rotated.snapshot()
    if command == "sign":
        proc = rotated.cli("sign", RING, "--claims", '{"sub":"x"}')
    else:
        proc = rotated.cli("reconcile", "--at", T5)  # generating needs the master key
    assert proc.returncode == 1
    assert without_audit(rotated.snapshot()) == without_audit(before)
    assert not master.exists()
    line = error_line(proc)
    assert str(master) in line, line


# --------------------------------------------------------------------------- state file


@pytest.mark.parametrize(
    "args",
    [
        ("reconcile", "--at", T4),
        ("sign", RING, "--claims", "{}"),
        ("status",),
        ("plan", "--at", T4),
        ("audit", "verify"),
        ("rotate", RING, "--at", T4),
    ],
    ids=lambda a: a[0] if a[0] != "audit" else "audit-verify",
)
def test_corrupt_state_file(rotated: Tampered, args: tuple[str, ...]) -> None:
    data = rotated.state_path.read_bytes()
    rotated.state_path.write_bytes(data[: len(data) // 2])
    before = rotated.snapshot()
    proc = rotated.cli(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert rotated.snapshot() == before
    line = error_line(proc)
    assert str(rotated.state_path) in line, line
