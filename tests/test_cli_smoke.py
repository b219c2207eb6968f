"""The quick start of README.md, as a test: init, reconcile, sign, verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
from jwcrypto import jwk as jwk_mod
from jwcrypto import jwt as jwcrypto_jwt


def test_quick_start_bootstraps_and_signs(home):
    out = home.run("reconcile", check=True).stdout
    assert "key.promoted" in out
    st = home.status()["rings"]["default"]
    assert [k["state"] for k in st["keys"]] == ["active"]
    token = home.run("sign", "default", "--claims", '{"sub":"alice"}', "--ttl", "5m",
                     check=True).stdout.strip()
    doc = home.jwks()
    kid = jwt.get_unverified_header(token)["kid"]
    assert kid == st["keys"][0]["kid"]
    key = jwt.PyJWKSet.from_dict(doc)[kid]
    assert jwt.decode(token, key.key, algorithms=["ES256"])["sub"] == "alice"
    ks = jwk_mod.JWKSet.from_json(json.dumps(doc))
    claims = json.loads(jwcrypto_jwt.JWT(jwt=token, key=ks).claims)
    assert claims["sub"] == "alice"
    assert home.run("audit", "verify").returncode == 0


def test_init_refuses_to_overwrite(home):
    before = home.config.read_bytes(), (home.dir / "master.key").read_bytes()
    proc = home.run("init", "--dir", str(home.dir))
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (home.config.read_bytes(), (home.dir / "master.key").read_bytes()) == before


def test_at_earlier_than_state_is_refused(home):
    home.run("reconcile", "--at", "2030-01-01T00:00:00Z", check=True)
    proc = home.run("reconcile", "--at", "2029-12-31T23:59:59Z")
    assert proc.returncode == 2
    assert "earlier than the newest time in state" in proc.stderr


DASH_KIDS = ["-53xYArZSSxAWgxSwQ5H43DgBcpINhRWaPWNTBjyUhY",
             "--3xYArZSSxAWgxSwQ5H43DgBcpINhRWaPWNTBjyUhY"]  # fmt: skip


@pytest.mark.parametrize("kid", DASH_KIDS)
def test_kids_starting_with_a_dash_are_arguments_not_options(kid: str) -> None:
    """A base64url thumbprint starts with "-" once in 64 keys (the e2e suite met
    one): ``revoke KID`` and ``--kid KID`` must take it as the kid."""
    from keymgr.cli import build_parser

    p = build_parser()
    args = p.parse_args(["revoke", kid, "--reason", "leaked"])
    assert (args.kid, args.reason) == (kid, "leaked")
    args = p.parse_args(["revoke", "--reason", "leaked", kid])
    assert args.kid == kid
    assert p.parse_args(["audit", "show", "--kid", kid]).kid == kid
    with pytest.raises(SystemExit):  # a real unknown option is still refused
        p.parse_args(["revoke", kid, "--nope"])


@pytest.mark.parametrize("kid", DASH_KIDS)
def test_dash_kids_in_every_position_and_spelling(kid: str) -> None:
    """The positions a kid takes (after the ring of ``adopt``, before or after
    options, after ``--config``) and argparse's own spellings (``-- KID``,
    ``--kid=KID``) all give the kid, and nothing else changes meaning."""
    from keymgr.cli import build_parser, kid_safe_argv

    p = build_parser()
    args = p.parse_args(["adopt", "api", kid, "--as", "active"])
    assert (args.ring, args.kid, args.as_state) == ("api", kid, "active")
    args = p.parse_args(["adopt", "--as", "retired", "api", kid])
    assert (args.ring, args.kid, args.as_state) == ("api", kid, "retired")
    args = p.parse_args(["--config", "k.toml", "revoke", kid, "--at", "2030-01-01T00:00:00Z"])
    assert (args.config, args.kid) == ("k.toml", kid)
    assert p.parse_args(["revoke", "--reason", "r", "--", kid]).kid == kid
    assert p.parse_args(["audit", "show", f"--kid={kid}", "--json"]).kid == kid
    args = p.parse_args(["audit", "show", "--json", "--kid", kid, "--ring", "api"])
    assert (args.kid, args.ring, args.json) == (kid, "api", True)
    for bad in (["revoke", kid, kid], ["adopt", kid, "--as", "active"], ["status", kid]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2
    argv = ["revoke", kid, "--reason", "r"]
    assert kid_safe_argv(argv) == ["revoke", "--reason", "r", "--", kid]
    assert kid_safe_argv(kid_safe_argv(argv)) == kid_safe_argv(argv)
    assert kid_safe_argv(["revoke", "KID"]) == ["revoke", "KID"]


def test_cli_parser_overrides_no_private_argparse_method() -> None:
    """Issue 12: no private-API tricks. The dash-kid fix rewrites argv with
    argparse's public syntax instead of overriding ``_parse_optional``."""
    from keymgr.cli import _Parser

    overridden = {n for n in vars(_Parser) if callable(getattr(_Parser, n))}
    assert all(not n.startswith("_") or n.startswith("__") for n in overridden), overridden


def test_private_api_tricks_are_gone() -> None:
    """Issue 12 (benchmarks/README.md, "Private APIs"): none of the three tricks
    was needed, so none may come back without a benchmark: no import hook,
    no private json encoder, no private argparse method."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("keymgr/*.py"), *root.glob("backends/*.py")]:
        text = path.read_text()
        for trick in ("sys.meta_path", "c_make_encoder", "_parse_optional"):
            assert trick not in text, f"{path.name}: {trick}"


def test_cli_logging_is_deferred_without_an_import_hook() -> None:
    """``configure(cli=True)`` imports nothing and hooks nothing; a keymgr
    logger's first use applies it: below critical nothing is written, and a
    critical line goes to stderr only."""
    code = (
        "import sys\n"
        "hooks = list(sys.meta_path)\n"
        "from keymgr.logs import configure, get_logger\n"
        "configure(cli=True)\n"
        "assert sys.meta_path == hooks, sys.meta_path\n"
        "assert 'structlog' not in sys.modules\n"
        "log = get_logger('keymgr.test')\n"
        "log.warning('quiet', token='t0ps3cret')\n"
        "log.critical('loud', token='t0ps3cret')\n"
        "assert 'structlog' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "loud" in lines[0] and "t0ps3cret" not in lines[0], lines


def test_status_json_streamed_equals_the_document(home):
    """``status --json`` is written ring by ring (keymgr.render.write_sections);
    it must be byte for byte the one-document rendering, for 0, 1 and 2 rings."""
    from keymgr.render import json_text, write_sections

    sections = [("rings", iter([])), ("edges", iter([("p", {"u": None})]))]
    out: list[str] = []
    write_sections(sections, out.append)
    assert "".join(out) == json_text({"rings": {}, "edges": {"p": {"u": None}}}) + "\n"
    home.run("reconcile", check=True)
    with home.config.open("a") as f:
        f.write(
            '\n[keyrings.second]\nbackend = "local"\nalgorithm = "RS256"\n'
            'rotation_period = "30d"\npublish_ahead = "1h"\nretire_grace = "1d"\n'
            'destroy_after = "7d"\npublishers = ["site"]\n'
        )
    home.run("reconcile", check=True)
    raw = home.run("status", "--json", check=True).stdout
    doc = json.loads(raw)
    assert sorted(doc["rings"]) == ["default", "second"]
    assert raw == json_text(doc) + "\n"
