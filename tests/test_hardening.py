"""Issue 11, hardening: files written through random temp names opened
O_EXCL|O_NOFOLLOW, group/other-writable outputs and exposed master keys refused,
and no core dumps for commands that may hold decrypted keys.

Every test here plants what an attacker with write access to a directory (or a
careless chmod) would, and checks that nothing outside the intended file moved.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keymgr.backends.local.keys import FileBackend, master_key_exposure
from keymgr.backends.local.publisher import FilePublisher

from keymgr import fsutil
from keymgr.errors import BackendError, ConfigError
from keymgr.fsutil import atomic_write
from tests.conftest import Home

TMP_NAME = re.compile(r"\.jwks\.json\.[0-9a-f]{16}\.tmp")


@pytest.fixture(autouse=True)
def _no_env_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYMGR_MASTER_KEY", raising=False)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the target directory that no write may reach."""
    outside = tmp_path / "outside"
    outside.mkdir()
    v = outside / "victim"
    v.write_bytes(b"victim content\n")
    v.chmod(0o600)
    return v


@pytest.fixture
def target(tmp_path: Path) -> Path:
    d = tmp_path / "public"
    d.mkdir()
    return d / "jwks.json"


def unchanged(victim: Path) -> bool:
    st = victim.lstat()
    return victim.read_bytes() == b"victim content\n" and stat.S_IMODE(st.st_mode) == 0o600


def names_drawn(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> Iterator[str]:
    """Make the temp names' random part come from ``names`` (then fresh random)."""
    real = fsutil.secrets.token_hex
    queue = iter(names)

    def fake(n: int) -> str:
        return next(queue, None) or real(n)

    monkeypatch.setattr(fsutil.secrets, "token_hex", fake)
    return queue


# --------------------------------------------------------------------------- atomic_write


def test_temp_names_are_random_and_opened_exclusive_nofollow(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if kw.get("dir_fd") is not None:
            opened.append((os.fspath(path), flags))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    for i in range(3):
        atomic_write(target, b"doc %d\n" % i, 0o644)
    assert target.read_bytes() == b"doc 2\n"
    names = [n for n, _ in opened]
    assert len(names) == 3 and len(set(names)) == 3, names
    for name, flags in opened:
        assert TMP_NAME.fullmatch(name), name
        assert str(os.getpid()) not in name.split(".")[3:], "predictable pid-based name"
        for flag in ("O_CREAT", "O_EXCL", "O_NOFOLLOW", "O_CLOEXEC", "O_WRONLY"):
            assert flags & getattr(os, flag), f"{name} opened without {flag}"
        assert not flags & os.O_TRUNC
    assert sorted(p.name for p in target.parent.iterdir()) == ["jwks.json"]  # no leftovers
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_symlink_planted_at_the_temp_name_is_not_followed(
    target: Path, victim: Path, monkeypatch: pytest.MonkeyPatch, dangling: bool
) -> None:
    """Even an attacker who guessed the random part gets a refused open, and
    keymgr draws another name instead of writing (or chmodding) through the link."""
    guessed = "0123456789abcdef"
    planted = target.parent / f".jwks.json.{guessed}.tmp"
    pointee = victim.with_name("not-yet") if dangling else victim
    planted.symlink_to(pointee)
    names_drawn(monkeypatch, [guessed])

    atomic_write(target, b"the jwks\n", 0o644)

    assert target.read_bytes() == b"the jwks\n" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert unchanged(victim)
    assert not victim.with_name("not-yet").exists()
    assert planted.is_symlink() and os.readlink(planted) == str(pointee)  # left as found


def test_every_temp_name_taken_fails_without_writing_anywhere(
    target: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guessed = "fedcba9876543210"
    (target.parent / f".jwks.json.{guessed}.tmp").symlink_to(victim)
    monkeypatch.setattr(fsutil.secrets, "token_hex", lambda n: guessed)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"the jwks\n", 0o644)
    assert not target.exists()
    assert unchanged(victim)


def test_target_that_is_a_symlink_is_replaced_not_followed(target: Path, victim: Path) -> None:
    """rename() replaces the link itself: the file it pointed to keeps its content and mode."""
    target.symlink_to(victim)
    atomic_write(target, b"the jwks\n", 0o644)
    assert not target.is_symlink() and target.read_bytes() == b"the jwks\n"
    assert unchanged(victim)


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_exclusive_write_refuses_a_symlink_at_the_target(
    target: Path, victim: Path, dangling: bool
) -> None:
    pointee = victim.with_name("not-yet") if dangling else victim
    target.symlink_to(pointee)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"secret\n", 0o600, exclusive=True)
    assert target.is_symlink() and unchanged(victim)
    assert not victim.with_name("not-yet").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["jwks.json"]  # temp removed


def test_directory_swapped_for_a_symlink_mid_write_does_not_redirect_it(
    target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between writing the temp file and renaming it, the target's directory is
    replaced by a symlink to a directory the attacker controls: the rename still
    happens in the directory the temp file was created in."""
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    moved = tmp_path / "public-moved"

    def swap(name: str) -> None:
        if name == "fs.before_rename":
            target.parent.rename(moved)
            target.parent.symlink_to(attacker)

    monkeypatch.setattr(fsutil, "crashpoint", swap)
    atomic_write(target, b"the jwks\n", 0o644)
    assert list(attacker.iterdir()) == []
    assert (moved / "jwks.json").read_bytes() == b"the jwks\n"


# --------------------------------------------------------------------------- file backend


def make_backend(tmp_path: Path, mode: int = 0o600) -> FileBackend:
    key = tmp_path / "master.key"
    if not key.exists():
        key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(mode)
    options = {"type": "file", "path": "keys", "master_key_file": "master.key"}
    return FileBackend("local", options, str(tmp_path))


def test_key_files_go_through_random_temp_names_and_destroy_sweeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tmp_path)
    gen = backend.generate("api", "ES256")
    ring = tmp_path / "keys" / "api"
    assert sorted(p.name for p in ring.iterdir()) == [f"{gen.kid}.key"]
    # Crash leftovers of this key: the new random form and the old pid form.
    mine = [f".{gen.kid}.key.{'a' * 16}.tmp", f".{gen.kid}.key.4242.tmp"]
    # Not this key's: another key's temp file, and a name only a glob would match.
    others = [".Zother.key.0123456789abcdef.tmp", f".{gen.kid}.key.x.key.0123.tmp"]
    for name in mine + others:
        (ring / name).write_bytes(b"partial")
    backend.destroy("api", gen.kid)
    assert sorted(p.name for p in ring.iterdir()) == sorted(others)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o660, 0o622, 0o666], ids=oct)
def test_exposed_master_key_is_refused_when_loaded(tmp_path: Path, mode: int) -> None:
    backend = make_backend(tmp_path, mode)
    key_file = tmp_path / "master.key"
    if mode == 0o640 and key_file.stat().st_uid == 0:
        os.chown(key_file, 1000, 1000)  # group-readable is accepted only root-owned
    secret = key_file.read_text().strip()
    with pytest.raises(BackendError) as err:
        backend.generate("api", "ES256")
    line = str(err.value)
    assert "\n" not in line and str(key_file) in line and f"chmod 600 {key_file}" in line
    assert f"mode {mode:04o}" in line and secret not in line
    assert not list((tmp_path / "keys").rglob("*.key")) if (tmp_path / "keys").exists() else True


def test_private_master_key_is_accepted(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, 0o600)
    assert backend.generate("api", "ES256").kid
    backend = make_backend(tmp_path, 0o400)
    backend.check()


def _stat(mode: int, uid: int, kind: int = stat.S_IFREG) -> os.stat_result:
    return os.stat_result((kind | mode, 1, 1, 1, uid, uid, 45, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "ok"),
    [
        (0o600, 1000, True),
        (0o400, 1000, True),
        (0o700, 1000, True),
        (0o640, 0, True),  # root:keymgr 0640, the deploy/systemd layout
        (0o440, 0, True),
        (0o640, 1000, False),  # the owner reads it anyway: the group is a leak
        (0o644, 0, False),
        (0o650, 0, False),
        (0o660, 0, False),
        (0o604, 1000, False),
        (0o602, 1000, False),
        (0o620, 1000, False),
        (0o601, 1000, False),
    ],
)
def test_master_key_exposure_rule(mode: int, uid: int, ok: bool) -> None:
    path = Path("/etc/keymgr/master.key")
    problem = master_key_exposure(_stat(mode, uid), path)
    if ok:
        assert problem is None
    else:
        assert problem is not None and f"mode {mode:04o}" in problem
        assert f"chmod 600 {path}" in problem


def test_master_key_that_is_not_a_regular_file_is_refused() -> None:
    problem = master_key_exposure(_stat(0o600, 0, stat.S_IFIFO), Path("/x"))
    assert problem == "is not a regular file"


# --------------------------------------------------------------------------- CLI


def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    what = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode == code, what
    assert "Traceback" not in proc.stderr, what
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, what
    return lines[0]


def test_init_writes_the_master_key_0600_whatever_the_umask(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, sys
        os.umask(0)
        from keymgr.cli import main
        sys.exit(main(["init", "--dir", {str(tmp_path)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keymgr.toml").stat().st_mode) == 0o644


def test_init_refuses_a_symlink_planted_at_the_master_key(tmp_path: Path, victim: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "master.key").symlink_to(victim.with_name("planted"))  # dangling
    proc = subprocess.run([sys.executable, "-m", "keymgr.cli", "init", "--dir", str(home)],
                          capture_output=True, text=True)
    line = one_line(proc, 2)
    assert "master.key" in line and "already exists" in line
    assert not victim.with_name("planted").exists()


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o604], ids=oct)
def test_config_check_refuses_an_exposed_master_key(home: Home, mode: int) -> None:
    key = home.dir / "master.key"
    secret = key.read_text().strip()
    key.chmod(mode)
    line = one_line(home.run("config", "check"), 2)
    assert str(home.config) in line and "backends.local.master_key_file" in line, line
    assert f"chmod 600 {key}" in line and f"mode {mode:04o}" in line, line
    assert secret not in line
    key.chmod(0o600)
    proc = home.run("config", "check")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_reconcile_refuses_an_exposed_master_key(home: Home) -> None:
    key = home.dir / "master.key"
    key.chmod(0o644)
    line = one_line(home.run("reconcile"), 1)
    assert f"chmod 600 {key}" in line, line
    assert not (home.dir / "keys").exists() or not any((home.dir / "keys").rglob("*.key"))
    assert not home.jwks_path.exists()


def test_config_check_reports_a_missing_master_key(home: Home) -> None:
    """Issue 18: a referenced master key file that does not exist is an error
    (exit 2, one line naming the field and the file), as `nginx -t` would."""
    key = home.dir / "master.key"
    key.unlink()
    proc = home.run("config", "check")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("keymgr: error: ") and str(key) in line and "does not exist" in line
    assert "backends.local.master_key_file" in line
    assert "ok" not in proc.stdout
    assert not key.exists() and not (home.dir / "keys").exists()  # offline: nothing made


# --------------------------------------------------------------------------- publisher mode


@pytest.mark.parametrize("mode", ["0666", "0664", "0646", "0622", "0660", "0620", "0602"])
def test_group_or_other_writable_publisher_mode_is_refused(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError) as err:
        FilePublisher("site", {"type": "file", "path": "j.json", "mode": mode}, str(tmp_path))
    line = str(err.value)
    assert line.startswith("publishers.site.mode: ") and mode in line and "\n" not in line


@pytest.mark.parametrize("mode", ["0644", "0640", "0600", "0444", "0755"])
def test_publisher_modes_nobody_else_can_write_are_accepted(tmp_path: Path, mode: str) -> None:
    pub = FilePublisher("site", {"type": "file", "path": "j.json", "mode": mode}, str(tmp_path))
    pub.write(b"{}\n")
    assert stat.S_IMODE((tmp_path / "j.json").stat().st_mode) == int(mode, 8)


# --------------------------------------------------------------------------- core dumps

PROBE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
def show(tag):
    print(tag, libc.prctl(3, 0, 0, 0, 0), *resource.getrlimit(resource.RLIMIT_CORE))
"""


def probe(body: str, cwd: Path | None = None) -> list[list[str]]:
    code = PROBE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [ln.split() for ln in proc.stdout.splitlines() if ln.startswith(("before", "after"))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_no_core_dumps_sets_dumpable_0_and_core_limit_0() -> None:
    rows = probe("""
        import resource
        # Whatever the limits this process inherited (a worker that ran the CLI
        # in-process already has a hard limit of 0, and cannot raise it again).
        show("before")
        from keymgr.hardening import no_core_dumps
        no_core_dumps()
        no_core_dumps()  # twice: still no error
        show("after")
    """)
    assert rows[0][:2] == ["before", "1"], rows
    assert rows[1] == ["after", "0", "0", "0"], rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
@pytest.mark.parametrize(
    ("args", "hardened"),
    [(["jwks"], True), (["status"], True), (["config", "check"], False)],
)
def test_cli_hardens_commands_that_may_decrypt_keys(
    home: Home, args: list[str], hardened: bool
) -> None:
    rows = probe(f"""
        import contextlib, io
        from keymgr.cli import main
        show("before")
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["--config", {str(home.config)!r}, *{args!r}])
        assert code == 0, code
        show("after")
    """, cwd=home.dir)
    assert rows[0][:2] == ["before", "1"], rows
    if hardened:
        assert rows[1] == ["after", "0", "0", "0"], rows
    else:
        assert rows[1][1:] == rows[0][1:], rows  # left as it was


def test_help_does_not_import_the_hardening_module() -> None:
    code = ("import sys\nfrom keymgr.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('ctypes' in sys.modules, 'keymgr.hardening' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr.strip().splitlines()[-1] == "False False", proc.stderr
