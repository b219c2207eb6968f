"""The quick start of README.md, as a test: init, reconcile, sign, verify."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("kid", ["-53xYArZSSxAWgxSwQ5H43DgBcpINhRWaPWNTBjyUhY",
                                 "--3xYArZSSxAWgxSwQ5H43DgBcpINhRWaPWNTBjyUhY"])  # fmt: skip
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
