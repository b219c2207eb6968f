"""Issue 18, papercuts found trying keymgr as a new user, each through the CLI
in real subprocesses on the embedded default, with no daemon running."""

from __future__ import annotations

import json
import subprocess
import sys

import jwt
import pytest

from tests.conftest import Home

RING = "default"


def active_kid(home: Home) -> str:
    keys = home.status()["rings"][RING]["keys"]
    (kid,) = [k["kid"] for k in keys if k["state"] == "active"]
    return kid


def signed_kid(home: Home) -> str:
    token = home.run("sign", RING, "--claims", '{"sub": "x"}', check=True).stdout.strip()
    header = jwt.get_unverified_header(token)
    jwks = json.loads(home.jwks_path.read_text())
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    jwt.decode(token, jwt.PyJWK(key).key, algorithms=[key["alg"]])  # an independent check
    return str(header["kid"])


# --------------------------------------------------------------------------- 1


def test_rotate_emergency_returns_with_the_new_key_signing(home: Home) -> None:
    home.run("reconcile", check=True)  # the wall clock: sub-second times
    old = active_kid(home)
    proc = home.run("rotate", RING, "--emergency", check=True)
    assert "key.promoted" in proc.stdout, proc.stdout
    new = active_kid(home)
    assert new != old
    assert signed_kid(home) == new
    plan = json.loads(home.run("plan", "--json", check=True).stdout)
    assert not [a for a in plan["due"] if a["action"] == "promote"], plan


def test_revoking_the_signer_returns_with_a_replacement_signing(home: Home) -> None:
    home.run("reconcile", check=True)
    old = active_kid(home)
    home.run("revoke", old, "--reason", "drill", check=True)
    new = active_kid(home)
    assert new != old
    assert signed_kid(home) == new
    assert old not in {k["kid"] for k in json.loads(home.jwks_path.read_text())["keys"]}


def test_scheduled_rotate_still_waits_publish_ahead(home: Home) -> None:
    """The rounding that keeps scheduled promotions from being early is untouched."""
    home.run("reconcile", check=True)
    old = active_kid(home)
    proc = home.run("rotate", RING, check=True)
    assert "key.published" in proc.stdout and "key.promoted" not in proc.stdout
    assert active_kid(home) == old


# --------------------------------------------------------------------------- 2


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_config_check_refuses_a_master_key_file_that_does_not_exist(home: Home) -> None:
    home.config.write_text(
        home.config.read_text().replace('master_key_file = "master.key"',
                                        'master_key_file = "nope.key"')
    )
    line = one_error(home.run("config", "check"))
    assert "backends.local.master_key_file" in line and "nope.key" in line
    assert "does not exist" in line


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        ("publishers.site.path", 'path = "public/.well-known/jwks.json"',
         'path = "keymgr.toml/jwks.json"'),
        ("daemon.audit_log", 'audit_log = "audit.jsonl"', 'audit_log = "master.key/audit.jsonl"'),
        ("backends.local.path", 'path = "keys"', 'path = "keymgr.toml/keys"'),
    ],
)
def test_config_check_refuses_directories_that_cannot_be_created(
    home: Home, field: str, old: str, new: str
) -> None:
    home.config.write_text(home.config.read_text().replace(old, new))
    line = one_error(home.run("config", "check"))
    assert field in line and "not a directory" in line, line


def test_config_check_refuses_a_master_key_others_can_read(home: Home) -> None:
    (home.dir / "master.key").chmod(0o644)
    line = one_error(home.run("config", "check"))
    assert "chmod 600" in line


def test_config_check_of_the_default_is_ok_and_offline(home: Home) -> None:
    before = sorted(p.name for p in home.dir.iterdir())
    proc = home.run("config", "check", check=True)
    assert proc.stdout.startswith(f"{home.config}: ok")
    assert sorted(p.name for p in home.dir.iterdir()) == before


# --------------------------------------------------------------------------- 3

COMMANDS = [
    ["init"], ["reconcile"], ["plan"], ["status"], ["rotate"], ["revoke"], ["adopt"],
    ["jwks"], ["sign"], ["audit"], ["audit", "verify"], ["audit", "show"], ["audit", "keys"],
    ["config"], ["config", "check"], ["run"],
]


def help_of(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "keymgr.cli", *args, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_help_has_a_description_formats_and_an_example(args: list[str]) -> None:
    text = help_of(*args)
    lines = text.splitlines()
    assert lines[0].startswith("usage: keymgr")
    description = text.split("\n\n", 1)[1].splitlines()[0]
    assert len(description) > 20, "a one-line description after the usage"
    assert ("example" in text and f"keymgr {args[0]}" in text.split("example", 1)[1]) or (
        "keymgr --config" in text.split("example", 1)[1]
    ), text
    if "--at" in text:
        assert "RFC 3339" in text
    if "--ttl" in text:
        assert "15m" in text and "duration" in text
    if " kid" in lines[0]:
        assert "RFC 7638 thumbprint" in text


def test_top_level_help_lists_commands_examples_and_exit_codes() -> None:
    text = help_of()
    for cmd in ("init", "reconcile", "rotate", "revoke", "adopt", "sign", "audit", "run"):
        assert f"\n    {cmd} " in text, cmd
    assert "examples:" in text and "Exit codes" in text
