"""A corpus of bad configurations, each refused as docs/design.md#config-errors promises.

"Every config error names the file, the field and what is wrong, exits with code
2, and changes nothing." Each ``tests/bad_configs/NN-name.toml`` starts with one
or more ``# expect: SUBSTRING`` lines (the field path the error must name). For
every case both ``config check`` and ``reconcile`` run as real subprocesses in a
fresh directory holding only the case (as ``keymgr.toml``) and a valid
``master.key``; both must exit 2 with exactly one line on stderr naming the
config file and the field, without a traceback, and leave the directory as it
was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CASES_DIR = Path(__file__).resolve().parent / "bad_configs"
CASES = sorted(CASES_DIR.glob("*.toml"))
EXPECT = "# expect:"
COMMANDS = {"config-check": ("config", "check"), "reconcile": ("reconcile",)}
#: What a successful run would create next to the config (see ``keymgr init``).
ARTIFACTS = ("state.json", "state.json.lock", "keys", "public", "audit.jsonl")


def expectations(case: Path) -> list[str]:
    """The ``# expect:`` lines at the top of a case (read as bytes: some are not UTF-8)."""
    found = []
    for raw in case.read_bytes().splitlines():
        line = raw.decode("utf-8", "replace").lstrip("\ufeff").strip()
        if not line.startswith(EXPECT):
            break
        found.append(line[len(EXPECT) :].strip())
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def keymgr(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "keymgr.cli", *args],
        capture_output=True,
        text=True,
        errors="replace",
        cwd=cwd,
        env=env or _env(),
        timeout=120,
    )


def snapshot(d: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``d`` with its mode and (for files) its content."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


def assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    what = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr, what
    assert proc.returncode == 2, what
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr must be exactly one line\n{what}"
    for needle in needles:
        assert needle in lines[0], f"stderr does not name {needle!r}\n{what}"
    assert proc.stdout == "", what


@pytest.fixture(scope="session")
def master_key(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("init")
    proc = keymgr("init", "--dir", str(d), cwd=d)
    assert proc.returncode == 0, proc.stderr
    return (d / "master.key").read_bytes()


def test_corpus_is_large_and_well_formed() -> None:
    assert len(CASES) >= 30
    for case in CASES:
        stem = case.stem
        assert stem[:2].isdigit() and stem[2] == "-", f"{case.name}: name it NN-short-name.toml"
        assert case.read_bytes().startswith(b"# expect: "), f"{case.name}: first line"
        assert all(expectations(case)), f"{case.name}: empty expectation"
    numbers = [c.stem[:2] for c in CASES]
    assert len(set(numbers)) == len(numbers), "two cases share a number"


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_bad_config_is_refused(case: Path, command: str, tmp_path: Path, master_key: bytes):
    # The home is one level down so that a write next to it (outside the config
    # directory) shows up in the snapshot of tmp_path too.
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / "keymgr.toml"
    shutil.copyfile(case, cfg)
    key = home / "master.key"
    key.write_bytes(master_key)
    key.chmod(0o600)
    before = snapshot(tmp_path)

    proc = keymgr("--config", str(cfg), *COMMANDS[command], cwd=home)

    assert_refused(proc, str(cfg), *expectations(case))
    for name in ARTIFACTS:
        assert not (home / name).exists(), f"{name} was created by a refused config"
    assert snapshot(tmp_path) == before, "a refused config changed the file system"


def test_default_config_from_init_passes_check(tmp_path: Path) -> None:
    proc = keymgr("init", "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = snapshot(tmp_path)
    cfg = tmp_path / "keymgr.toml"

    proc = keymgr("--config", str(cfg), "config", "check", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"{cfg}: ok"), proc.stdout
    assert snapshot(tmp_path) == before, "config check changed the directory"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_config_file(command: str, tmp_path: Path) -> None:
    cfg = tmp_path / "nowhere.toml"
    proc = keymgr("--config", str(cfg), *COMMANDS[command], cwd=tmp_path)
    assert_refused(proc, str(cfg), "not found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_default_config_file(command: str, tmp_path: Path) -> None:
    """Without --config or $KEYMGR_CONFIG, ./keymgr.toml is meant and named."""
    proc = keymgr(*COMMANDS[command], cwd=tmp_path)
    assert_refused(proc, "keymgr.toml", "not found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_config_file_from_environment(command: str, tmp_path: Path) -> None:
    cfg = tmp_path / "from-env.toml"
    env = {**_env(), "KEYMGR_CONFIG": str(cfg)}
    proc = keymgr(*COMMANDS[command], cwd=tmp_path, env=env)
    assert_refused(proc, str(cfg), "not found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_config_path_is_a_directory(command: str, tmp_path: Path) -> None:
    cfg = tmp_path / "keymgr.toml"
    cfg.mkdir()
    proc = keymgr("--config", str(cfg), *COMMANDS[command], cwd=tmp_path)
    assert_refused(proc, str(cfg))
    assert [p.name for p in tmp_path.iterdir()] == ["keymgr.toml"]
    assert list(cfg.iterdir()) == []
