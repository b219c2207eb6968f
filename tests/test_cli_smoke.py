"""The quick start of README.md, as a test: init, reconcile, sign, verify."""

from __future__ import annotations

import json

import jwt
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
