"""A static issuer: the OpenID Connect discovery document (docs/issuer.md).

The real CLI, time moved with ``--at``. The file publisher's directory is
served over HTTP on loopback, and tokens signed by ``keymgr sign`` (which
fills ``iss``) are verified the way a relying party does it: fetch
``ISSUER/.well-known/openid-configuration``, then its ``jwks_uri``, then check
the token's signature, ``alg`` against ``id_token_signing_alg_values_supported``
and ``iss`` against ``issuer``: by Authlib's OpenID Connect client (an
independent implementation; skipped where Authlib is not installed) and by
joserfc with a hand-rolled discovery fetch.

Also: the document's fields, bad configs (one line naming the field), the
write order across an algorithm migration (the document never advertises an
algorithm before its key is in the JWKS, nor drops one still there), drift
repair, a document that cannot be written, a crash between the two writes,
two issuers in one daemon, the S3 publisher's ``discovery_key`` on moto, and
both plug-ins' siblings through the publisher conformance suite.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from keymgr.discovery import Discovery
from keymgr.publishers import Publisher
from keymgr.testing.conformance import PublisherTests
from tests.conftest import SHORT_POLICY, T0, A, D, G, Home, P
from tests.servers_moto import (
    JWKS_KEY,
    s3_client,
    s3_publisher_options,
    sigv4_http_get,
    ts,
    write_config,
)

SEC = timedelta(seconds=1)
DAY = timedelta(days=1)
DOC = "public/.well-known/openid-configuration"
CLIENT = "app"


# --------------------------------------------------------------------------- helpers


class _Static(SimpleHTTPRequestHandler):
    """A static server like deploy/nginx: JSON for the well-known documents,
    and the Cache-Control keymgr's config says the server sends."""

    cache_control: str | None = None

    def end_headers(self) -> None:
        if self.cache_control is not None:
            self.send_header("Cache-Control", self.cache_control)
        super().end_headers()

    def guess_type(self, path: Any) -> str:
        return "application/json" if "/.well-known/" in str(path) else super().guess_type(path)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_server(root: Path, cache_control: str | None = None) -> Iterator[str]:
    """Serve ``root`` on a free loopback port; yields the base URL (the issuer)."""
    root.mkdir(parents=True, exist_ok=True)
    handler = type("Handler", (_Static,), {"cache_control": cache_control})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def publisher_lines(home: Home, table: str, *lines: str) -> None:
    """Add ``lines`` to ``[table]`` of the home's config (right after its header)."""
    out = []
    for line in home.config.read_text().splitlines():
        out.append(line)
        if line.strip() == f"[{table}]":
            out.extend(lines)
    assert len(out) > len(home.config.read_text().splitlines()), table
    home.config.write_text("\n".join(out) + "\n")


def make_issuer(home: Home, issuer: str, *, extra: str | None = None) -> None:
    """Give ``[publishers.site]`` an issuer and a discovery document."""
    lines = [
        f'issuer = "{issuer}"',
        f'jwks_uri = "{issuer}/.well-known/jwks.json"',
        f'discovery_path = "{DOC}"',
    ]
    if extra is not None:
        lines.append(f"discovery_extra = {extra}")
    publisher_lines(home, "publishers.site", *lines)


def discovery(home: Home, rel: str = DOC) -> dict[str, Any]:
    return json.loads((home.dir / rel).read_text())


def reconcile(home: Home, at: datetime) -> str:
    return home.run("reconcile", "--at", ts(at), check=True, inproc=True).stdout


def sign(home: Home, ring: str = "default", **claims: Any) -> str:
    """An ID token from ``keymgr sign`` (iss filled by keymgr), issued now:
    the relying parties below check iat and exp against their own clock."""
    body = {"sub": "alice", "aud": CLIENT, "nonce": "n-0", **claims}
    return home.run(
        "sign", ring, "--claims", json.dumps(body), "--ttl", "1h", check=True, inproc=True
    ).stdout.strip()


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def joserfc_rp(issuer: str, token: str) -> dict[str, Any]:
    """A relying party by hand: discovery, then its JWKS, then the checks."""
    meta = http_json(f"{issuer}/.well-known/openid-configuration")
    assert meta["issuer"] == issuer
    keys = KeySet.import_key_set(http_json(meta["jwks_uri"]))
    registry = JWSRegistry(algorithms=meta["id_token_signing_alg_values_supported"])
    tok = jose_jwt.decode(token, keys, registry=registry)
    claims_registry = jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": meta["issuer"]},
        aud={"essential": True, "value": CLIENT},
    )
    claims_registry.validate(tok.claims)
    return dict(tok.claims)


def authlib_rp(issuer: str, token: str, nonce: str = "n-0") -> dict[str, Any]:
    """Authlib's OpenID Connect client: a fresh one per call (it caches the
    metadata and the JWKS), so each check fetches both documents again."""
    from authlib.integrations.base_client import BaseApp, OAuth2Mixin, OpenIDMixin
    from authlib.integrations.requests_client import OAuth2Session

    class RelyingParty(OAuth2Mixin, OpenIDMixin, BaseApp):  # type: ignore[misc]
        client_cls = OAuth2Session

    rp = RelyingParty(
        framework=None,
        name="rp",
        client_id=CLIENT,
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
    )
    return dict(rp.parse_id_token({"id_token": token}, nonce=nonce))


def snapshot_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes]]:
    """Every file a FilePublisher writes from now on (in this process), in order."""
    from keymgr.backends.local.publisher import FilePublisher

    seen: list[tuple[str, bytes]] = []
    inner = FilePublisher.write

    def write(self: FilePublisher, data: bytes) -> None:
        inner(self, data)
        seen.append((self.path.name, data))

    monkeypatch.setattr(FilePublisher, "write", write)
    return seen


def algs_of(jwks_doc: dict[str, Any]) -> list[str]:
    return sorted({k["alg"] for k in jwks_doc["keys"]})


# --------------------------------------------------------------------------- the document


def _jwks(*algs: str) -> bytes:
    keys = [{"kty": "EC", "kid": f"k{i}", "alg": a} for i, a in enumerate(algs)]
    return json.dumps({"keys": keys}).encode()


class _Nowhere(Publisher):
    type_name = "nowhere"

    def read(self) -> bytes | None:
        return None

    def write(self, data: bytes) -> None:
        raise AssertionError


def test_the_document_holds_the_computed_fields_the_defaults_and_the_extras() -> None:
    d = Discovery(
        publisher=_Nowhere("site", {}, "."),
        issuer="https://auth.example.com",
        jwks_uri="https://auth.example.com/.well-known/jwks.json",
        extra={
            "authorization_endpoint": "https://auth.example.com/authorize",
            "scopes_supported": ["openid"],
        },
        fallback_algs=("ES256",),
    )
    body = d.document(_jwks("RS256", "ES256", "RS256"))
    assert json.loads(body) == {
        "issuer": "https://auth.example.com",
        "jwks_uri": "https://auth.example.com/.well-known/jwks.json",
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "authorization_endpoint": "https://auth.example.com/authorize",
        "scopes_supported": ["openid"],
    }
    # Deterministic bytes, like the JWKS: the same keys never rewrite it.
    assert body == d.document(_jwks("ES256", "RS256")) and body.endswith(b"}\n")
    assert list(json.loads(body)) == sorted(json.loads(body))
    # Before any key (a JWKS with none), the rings' configured algorithms.
    assert json.loads(d.document(_jwks()))["id_token_signing_alg_values_supported"] == ["ES256"]
    # An extra may replace a default (a provider that also supports "code").
    d2 = Discovery(d.publisher, d.issuer, d.jwks_uri, {"response_types_supported": ["code"]})
    assert json.loads(d2.document(_jwks("ES256")))["response_types_supported"] == ["code"]


BAD_CONFIGS = [
    ('issuer = "http://auth.example.com"', "publishers.site.issuer: 'http://auth.example.com': "
     "expected an https URL (http only for localhost)"),
    ('issuer = "https://auth.example.com/?tenant=1"', "publishers.site.issuer: "
     "'https://auth.example.com/?tenant=1': must not have a '?' query"),
    ('issuer = "https://auth.example.com#x"', "publishers.site.issuer: "
     "'https://auth.example.com#x': must not have a '#' fragment"),
    ("issuer = 7", "publishers.site.issuer: expected a non-empty string, got 7"),
    (f'discovery_path = "{DOC}"\njwks_uri = "https://a.example/jwks.json"',
     "publishers.site.issuer: is required with publishers.site.discovery_path"),
    (f'discovery_path = "{DOC}"\nissuer = "https://a.example"',
     "publishers.site.jwks_uri: is required with publishers.site.discovery_path"),
    ('issuer = "https://a.example"\njwks_uri = "https://a.example/jwks.json"',
     "publishers.site.jwks_uri: only used in the discovery document "
     "(set publishers.site.discovery_path too)"),
    ('jwks_uri = "ftp://a.example/jwks.json"',
     "publishers.site.jwks_uri: 'ftp://a.example/jwks.json': expected an https URL"),
    ('discovery_extra = { issuer = "https://b.example" }',
     "publishers.site.discovery_extra.issuer: computed by keymgr "
     "(it is publishers.site.issuer); remove it here"),
    ('discovery_extra = { id_token_signing_alg_values_supported = ["RS256"] }',
     "publishers.site.discovery_extra.id_token_signing_alg_values_supported: computed by "
     "keymgr (it is the algorithms of the keys in the JWKS); remove it here"),
    ('discovery_extra = { subject_types_supported = ["everyone"] }',
     "publishers.site.discovery_extra.subject_types_supported: expected 'public' and/or "
     "'pairwise', got ['everyone']"),
    ("discovery_extra = { response_types_supported = [] }",
     "publishers.site.discovery_extra.response_types_supported: expected a non-empty list "
     "of strings, got []"),
    ("discovery_extra = { since = 2031-01-01T00:00:00Z }",
     "publishers.site.discovery_extra.since: expected a string, number, boolean, array or "
     "table, got"),
    ('discovery_extra = "x"',
     "publishers.site.discovery_extra: must be a table of extra discovery fields"),
    ('discovery_path = "public/.well-known/jwks.json"\nissuer = "https://a.example"\n'
     'jwks_uri = "https://a.example/jwks.json"',
     "publishers.site.discovery_path: "),
]


@pytest.mark.parametrize(("lines", "error"), BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_a_bad_issuer_config_is_one_line_naming_the_field(
    home: Home, lines: str, error: str
) -> None:
    publisher_lines(home, "publishers.site", *lines.splitlines())
    before = home.files()
    proc = home.run("config", "check", inproc=True)
    assert proc.returncode == 2, proc
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"keymgr: error: {home.config}: {error}"), line
    assert home.run("reconcile", inproc=True).returncode == 2
    assert home.files() == before  # nothing changed


def test_a_ring_whose_publishers_disagree_on_the_issuer_is_refused(home: Home) -> None:
    publisher_lines(home, "publishers.site", 'issuer = "https://a.example"')
    home.config.write_text(
        home.config.read_text().replace('publishers = ["site"]', 'publishers = ["site", "cdn"]')
        + '\n[publishers.cdn]\ntype = "file"\npath = "cdn/jwks.json"\n'
        'issuer = "https://b.example"\n'
    )
    proc = home.run("config", "check")  # a real process: exit code 2
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"keymgr: error: {home.config}: keyrings.default.publishers: its publishers name "
        "different issuers (publishers.cdn.issuer 'https://b.example', publishers.site.issuer "
        "'https://a.example'); a ring's tokens carry one iss: give them one issuer, or split "
        "the ring"
    )
    # One issuer and a publisher with none agree: the ring's issuer is that one.
    home.config.write_text(home.config.read_text().replace('issuer = "https://b.example"\n', ""))
    assert home.run("config", "check", inproc=True).returncode == 0


# --------------------------------------------------------------------------- relying parties


def test_relying_parties_verify_tokens_through_discovery_across_an_algorithm_migration(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RS256 -> ES256, every moment of the switch: Authlib's OIDC client and a
    joserfc client fetch the discovery document and the JWKS over HTTP and
    accept every live token, each only through the algorithms the document
    advertises. Authlib's strict metadata check passes as long as RS256 (which
    OpenID Connect Discovery requires) is advertised."""
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # a loopback http issuer
    with static_server(home.dir / "public") as issuer:
        make_issuer(
            home, issuer,
            extra=f'{{ authorization_endpoint = "{issuer}/authorize", '
                  'grant_types_supported = ["implicit"] }',
        )  # fmt: skip
        steps = [
            (T0, ["RS256"], "RS256"),
            (T0 + P - A - SEC, ["RS256"], "RS256"),
            (T0 + P - A, ["ES256", "RS256"], "RS256"),  # ES256 key published, not signing
            (T0 + P - SEC, ["ES256", "RS256"], "RS256"),
            (T0 + P, ["ES256", "RS256"], "ES256"),  # promoted: ES256 signs
            (T0 + P + G - SEC, ["ES256", "RS256"], "ES256"),
            (T0 + P + G, ["ES256"], "ES256"),  # the RS256 key left the JWKS
            (T0 + P + G + D + SEC, ["ES256"], "ES256"),
        ]
        live: list[tuple[datetime, str]] = []
        checks = {"authlib": 0}
        changed = False
        for n, (at, advertised, signer) in enumerate(steps):
            if at >= T0 + P - A - SEC and not changed:
                home.set_ring(algorithm="ES256")
                changed = True
            reconcile(home, at)
            meta = http_json(f"{issuer}/.well-known/openid-configuration")
            assert meta["id_token_signing_alg_values_supported"] == advertised, ts(at)
            assert algs_of(http_json(meta["jwks_uri"])) == advertised
            token = sign(home, nonce=f"n-{n}")
            assert json.loads(_part(token, 0))["alg"] == signer
            assert json.loads(_part(token, 1))["iss"] == issuer
            # Tokens live for a day of simulated time (G is two).
            live = [(t, tok) for t, tok in live if at < t + DAY] + [(at, token)]
            for _, tok in live:
                assert joserfc_rp(issuer, tok)["sub"] == "alice"
                if _has_authlib():
                    nonce = json.loads(_part(tok, 1))["nonce"]
                    assert authlib_rp(issuer, tok, nonce)["iss"] == issuer
                    checks["authlib"] += 1
            if _has_authlib():
                from authlib.oidc.discovery import OpenIDProviderMetadata

                strict = OpenIDProviderMetadata(meta)
                if "RS256" in advertised:
                    strict.validate()
                else:
                    with pytest.raises(ValueError, match="RS256"):
                        strict.validate()
        assert checks["authlib"] >= len(steps) or not _has_authlib()


def _part(token: str, i: int) -> bytes:
    import base64

    s = token.split(".")[i]
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def test_relying_parties_reject_a_token_with_another_iss(home: Home) -> None:
    """The relying parties really check iss against the discovery document:
    a token of a valid key whose iss is another issuer's is rejected."""
    with static_server(home.dir / "public") as issuer:
        make_issuer(home, issuer)
        reconcile(home, T0)
        assert joserfc_rp(issuer, sign(home))["iss"] == issuer
        other = json.dumps({"sub": "alice", "aud": CLIENT, "nonce": "n-0",
                            "iss": "https://other.example"})  # fmt: skip
        forged = home.run(
            "sign", "default", "--claims", other, "--ttl", "1h", "--no-iss", check=True
        ).stdout.strip()
        with pytest.raises(Exception, match="iss"):
            joserfc_rp(issuer, forged)
        if _has_authlib():
            with pytest.raises(Exception, match="iss"):
                authlib_rp(issuer, forged)


# --------------------------------------------------------------------------- keymgr sign


def test_sign_fills_iss_from_the_ring_issuer(home: Home) -> None:
    publisher_lines(home, "publishers.site", 'issuer = "https://auth.example.com"')
    reconcile(home, T0)

    def claims(*args: str) -> dict[str, Any]:
        out = home.run("sign", "default", *args, check=True, inproc=True).stdout.strip()
        return json.loads(_part(out, 1))

    assert claims("--claims", '{"sub":"a"}') == {"sub": "a", "iss": "https://auth.example.com"}
    assert claims("--claims", '{"sub":"a"}', "--no-iss") == {"sub": "a"}
    same = '{"sub":"a","iss":"https://auth.example.com"}'
    assert claims("--claims", same)["iss"] == "https://auth.example.com"
    proc = home.run("sign", "default", "--claims", '{"iss":"https://evil.example"}')
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "keymgr: error: claims: iss 'https://evil.example' is not the issuer of ring 'default' "
        "('https://auth.example.com', from its publishers' issuer): verifiers of that issuer "
        "would reject the token"
    )
    # The Python API adds iss only when asked.
    from keymgr.manager import KeyManager

    km = KeyManager.from_config(home.config)
    assert km.issuer("default") == "https://auth.example.com"
    assert "iss" not in json.loads(_part(km.sign("default", {"sub": "a"}), 1))
    assert json.loads(_part(km.sign("default", {}, issuer=True), 1))["iss"] == (
        "https://auth.example.com"
    )


def test_sign_without_an_issuer_leaves_the_claims_alone(home: Home) -> None:
    reconcile(home, T0)
    out = home.run("sign", "default", "--claims", '{"sub":"a"}', check=True).stdout.strip()
    assert json.loads(_part(out, 1)) == {"sub": "a"}


# --------------------------------------------------------------------------- consistency


def test_the_document_never_runs_ahead_of_nor_lags_behind_the_jwks(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across RS256 -> ES256 -> EdDSA, after every single file write: the
    document advertises no algorithm that no key in the JWKS on disk has had
    yet; every document write advertises exactly the JWKS's algorithms (so an
    algorithm is dropped only once its last key left); a JWKS write that
    changes the algorithms is followed at once by the document's; and an
    algorithm is advertised at least A before its first key signs."""
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    make_issuer(home, "https://auth.example.com")
    writes = snapshot_writes(monkeypatch)
    clock: dict[str, datetime] = {}
    first_advertised: dict[str, datetime] = {}
    in_jwks_ever: set[str] = set()
    jwks_algs: list[str] = []
    advertised: list[str] = []
    checked = 0

    def after_pass(at: datetime) -> None:
        nonlocal jwks_algs, advertised, checked
        pending_change = False
        for name, data in writes[checked:]:
            if name == "jwks.json":
                new = algs_of(json.loads(data))
                pending_change = new != jwks_algs
                jwks_algs = new
                in_jwks_ever.update(new)
            else:
                assert name == "openid-configuration", name
                new = json.loads(data)["id_token_signing_alg_values_supported"]
                assert new == jwks_algs, (ts(at), new, jwks_algs)
                for alg in new:
                    first_advertised.setdefault(alg, at)
                advertised = new
                pending_change = False
            # Never ahead: only algorithms whose key has been in the JWKS.
            assert set(advertised) <= in_jwks_ever, (ts(at), advertised)
        assert not pending_change, f"{ts(at)}: JWKS changed algorithms, document not written"
        checked = len(writes)
        assert advertised == jwks_algs == algs_of(home.jwks()) == (
            discovery(home)["id_token_signing_alg_values_supported"]
        )
        clock["at"] = at

    def drive(until: datetime) -> None:
        doc = json.loads(home.run("plan", "--at", ts(until), "--json", check=True).stdout)
        moments = sorted({datetime.fromisoformat(s["at"].replace("Z", "+00:00"))
                          for s in doc["path"]} | {until})  # fmt: skip
        for t in moments:
            if t > clock["at"]:
                reconcile(home, t)
                after_pass(t)

    reconcile(home, T0)
    after_pass(T0)
    home.set_ring(algorithm="ES256")
    drive(T0 + P + G + D + DAY)
    home.set_ring(algorithm="EdDSA")
    drive(T0 + 3 * P + G + D)
    assert advertised == ["EdDSA"]
    assert first_advertised.keys() == {"RS256", "ES256", "EdDSA"}
    for key in home.status()["rings"]["default"]["keys"]:
        if key["activated_at"] is not None and key["alg"] != "RS256":
            signs = datetime.fromisoformat(key["activated_at"].replace("Z", "+00:00"))
            assert signs - first_advertised[key["alg"]] >= A, key
    assert sum(1 for n, _ in writes if n == "openid-configuration") >= 4


# --------------------------------------------------------------------------- drift, failures


def _published_successor(home: Home) -> str:
    reconcile(home, T0)
    reconcile(home, T0 + P - A)
    return home.kid_in("published")


def test_drift_of_the_document_is_repaired_and_restarts_the_wait(home: Home) -> None:
    home.set_ring(**SHORT_POLICY)
    make_issuer(home, "https://auth.example.com")
    successor = _published_successor(home)
    want = (home.dir / DOC).read_bytes()
    # Edited out of band halfway through the wait: a verifier may have read it.
    (home.dir / DOC).write_text('{"issuer": "https://evil.example"}\n')
    t = T0 + P - A / 2
    out = reconcile(home, t)
    assert "jwks.published publisher=site" in out
    assert (home.dir / DOC).read_bytes() == want
    # Promotion waits A from the repaired confirmation, not from the first one.
    reconcile(home, T0 + P)
    assert home.kid_in("published") == successor
    reconcile(home, t + A)
    assert home.kid_in("active") == successor
    # Deleted: written again. Unchanged: not written at all.
    (home.dir / DOC).unlink()
    assert "jwks.published" in reconcile(home, t + A + SEC)
    assert (home.dir / DOC).exists()
    assert reconcile(home, t + A + 2 * SEC) == ""


def test_a_config_change_reaches_the_document(home: Home) -> None:
    make_issuer(home, "https://auth.example.com", extra='{ scopes_supported = ["openid"] }')
    reconcile(home, T0)
    home.config.write_text(home.config.read_text().replace('["openid"]', '["openid", "email"]'))
    assert "jwks.published" in reconcile(home, T0 + SEC)
    assert discovery(home)["scopes_supported"] == ["openid", "email"]
    assert reconcile(home, T0 + 2 * SEC) == ""


def test_a_document_that_cannot_be_written_holds_promotion(home: Home) -> None:
    """The JWKS is written, the discovery document is not (its directory is a
    file): the publish fails, so the bootstrap key is not promoted; once the
    target is fixed the next pass writes both and promotes."""
    publisher_lines(
        home, "publishers.site", 'issuer = "https://auth.example.com"',
        'jwks_uri = "https://auth.example.com/jwks.json"', 'discovery_path = "blocked/oidc"',
    )  # fmt: skip
    (home.dir / "blocked").write_text("not a directory\n")
    proc = home.run("reconcile", "--at", ts(T0), inproc=True)
    assert proc.returncode == 1
    # Read (to skip an unchanged write) fails first here; a write would too.
    assert f"publisher site: cannot read {home.dir / 'blocked' / 'oidc'}" in proc.stderr
    assert "key.promoted" not in proc.stdout
    assert home.jwks_path.exists()  # written first, and confirmed
    assert [k["state"] for k in home.status()["rings"]["default"]["keys"]] == ["pending"]
    (home.dir / "blocked").unlink()
    assert "key.promoted" in reconcile(home, T0 + SEC)
    assert json.loads((home.dir / "blocked" / "oidc").read_text())["issuer"]


def test_a_crash_between_the_jwks_and_the_document_is_repaired(home: Home) -> None:
    """SIGKILL after the JWKS with a new algorithm's key was written (the
    pass's first write), before the document: it then lacks the new algorithm
    (never the reverse); the next pass writes it, and the successor waits A
    from there."""
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    make_issuer(home, "https://auth.example.com")
    reconcile(home, T0)
    home.set_ring(algorithm="ES256")
    crashed = home.run(
        "reconcile", "--at", ts(T0 + P - A),
        env=home.env(KEYMGR_CRASH_AT="publish.after_write:1"),
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert algs_of(home.jwks()) == ["ES256", "RS256"]
    assert discovery(home)["id_token_signing_alg_values_supported"] == ["RS256"]
    t = T0 + P - A + 10 * SEC
    reconcile(home, t)
    assert discovery(home)["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    successor = home.kid_in("published")
    reconcile(home, t + A - SEC)
    assert home.kid_in("published") == successor
    reconcile(home, t + A)
    assert home.kid_in("active") == successor


# --------------------------------------------------------------------------- several issuers


def test_one_daemon_serves_two_issuers(home: Home) -> None:
    """Two publishers, each with its rings and issuer, one ``keymgr run``:
    each issuer's relying party accepts its own tokens and no other's."""
    (home.dir / "b").mkdir()
    with static_server(home.dir / "public") as iss_a, static_server(home.dir / "b") as iss_b:
        home.config.write_text(
            f"""
[daemon]
state = "file:state.json"
audit_log = "audit.jsonl"
listen = "127.0.0.1:0"
reconcile_interval = "1s"

[backends.local]
type = "file"
path = "keys"
master_key_file = "master.key"

[publishers.a]
type = "file"
path = "public/.well-known/jwks.json"
discovery_path = "{DOC}"
issuer = "{iss_a}"
jwks_uri = "{iss_a}/.well-known/jwks.json"

[publishers.b]
type = "file"
path = "b/.well-known/jwks.json"
discovery_path = "b/.well-known/openid-configuration"
issuer = "{iss_b}"
jwks_uri = "{iss_b}/.well-known/jwks.json"

[keyrings.api]
backend = "local"
algorithm = "ES256"
rotation_period = "30d"
publish_ahead = "1h"
retire_grace = "1d"
destroy_after = "7d"
publishers = ["a"]

[keyrings.web]
backend = "local"
algorithm = "RS256"
rotation_period = "30d"
publish_ahead = "1h"
retire_grace = "1d"
destroy_after = "7d"
publishers = ["b"]
"""
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "keymgr.cli", "--config", str(home.config), "run"],
            cwd=home.dir, env=home.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not all(
                (home.dir / d / ".well-known" / "openid-configuration").exists()
                for d in ("public", "b")
            ) or len(_active(home)) < 2:
                assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                assert time.monotonic() < deadline, "the daemon did not publish both issuers"
                time.sleep(0.1)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
        a, b = http_json(f"{iss_a}/.well-known/openid-configuration"), http_json(
            f"{iss_b}/.well-known/openid-configuration"
        )
        assert (a["issuer"], a["id_token_signing_alg_values_supported"]) == (iss_a, ["ES256"])
        assert (b["issuer"], b["id_token_signing_alg_values_supported"]) == (iss_b, ["RS256"])
        tok_a, tok_b = sign(home, "api"), sign(home, "web")
        assert joserfc_rp(iss_a, tok_a)["iss"] == iss_a
        assert joserfc_rp(iss_b, tok_b)["iss"] == iss_b
        if _has_authlib():
            assert authlib_rp(iss_a, tok_a)["iss"] == iss_a
            assert authlib_rp(iss_b, tok_b)["iss"] == iss_b
        # Each issuer's relying party rejects the other's token: an algorithm
        # it does not advertise, a key it does not serve, another iss.
        for issuer, token in ((iss_a, tok_b), (iss_b, tok_a)):
            with pytest.raises(Exception):
                joserfc_rp(issuer, token)
            if _has_authlib():
                with pytest.raises(Exception):
                    authlib_rp(issuer, token)


def _active(home: Home) -> list[str]:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return [k["kid"] for r in home.state()["rings"].values() for k in r["keys"]
                if k["state"] == "active"]  # fmt: skip
    return []


def _has_authlib() -> bool:
    try:
        import authlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- S3 on moto


BUCKET = "issuer"
S3_DOC = ".well-known/openid-configuration"


@pytest.fixture
def bucket(moto: Any) -> Any:
    s3 = s3_client(moto.url)
    s3.create_bucket(Bucket=BUCKET)
    return s3


def test_s3_discovery_document_is_uploaded_confirmed_and_repaired(
    home: Home, moto: Any, bucket: Any
) -> None:
    issuer = "https://auth.example.com"
    write_config(
        home,
        backends={"local": {"type": "file", "path": "keys", "master_key_file": "master.key"}},
        publishers={"cdn": s3_publisher_options(
            moto.url, bucket=BUCKET, discovery_key=S3_DOC, issuer=issuer,
            jwks_uri=f"{issuer}/{JWKS_KEY}", cache_control="public, max-age=60",
        )},
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )  # fmt: skip
    assert home.run("config", "check", inproc=True).returncode == 0
    reconcile(home, T0)
    status, headers, body = sigv4_http_get(moto.url, BUCKET, S3_DOC)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "public, max-age=60"
    meta = json.loads(body)
    assert meta["issuer"] == issuer and meta["id_token_signing_alg_values_supported"] == ["ES256"]
    jwks = json.loads(sigv4_http_get(moto.url, BUCKET, JWKS_KEY)[2])
    # The token verifies against what S3 serves, through the document's algorithms.
    token = sign(home)
    registry = JWSRegistry(algorithms=meta["id_token_signing_alg_values_supported"])
    claims = jose_jwt.decode(token, KeySet.import_key_set(jwks), registry=registry).claims
    assert claims["iss"] == issuer
    # Nothing changed: nothing uploaded.
    assert reconcile(home, T0 + SEC) == ""
    # Edited out of band (the headers too): written again by the next pass.
    bucket.put_object(Bucket=BUCKET, Key=S3_DOC, Body=b"{}", ContentType="text/plain")
    assert "jwks.published publisher=cdn" in reconcile(home, T0 + 2 * SEC)
    assert sigv4_http_get(moto.url, BUCKET, S3_DOC)[2] == body
    bucket.delete_object(Bucket=BUCKET, Key=S3_DOC)
    assert "jwks.published publisher=cdn" in reconcile(home, T0 + 3 * SEC)
    assert sigv4_http_get(moto.url, BUCKET, S3_DOC)[2] == body


def test_s3_discovery_key_must_differ_from_key(home: Home, moto: Any) -> None:
    write_config(
        home,
        backends={"local": {"type": "file", "path": "keys", "master_key_file": "master.key"}},
        publishers={"cdn": s3_publisher_options(moto.url, bucket=BUCKET, discovery_key=JWKS_KEY)},
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )
    proc = home.run("config", "check", inproc=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"keymgr: error: {home.config}: publishers.cdn.discovery_key: must differ from key "
        "(the JWKS)"
    )


# --------------------------------------------------------------------------- conformance


class TestFileDiscoverySibling(PublisherTests):
    """The file publisher's discovery document keeps the publisher contract."""

    @pytest.fixture(params=[None, "public, max-age=60"])
    def publisher(self, request: pytest.FixtureRequest, tmp_path: Path) -> Publisher:
        from keymgr.backends.local.publisher import FilePublisher

        opts: dict[str, Any] = {"type": "file", "path": "site/jwks.json",
                                "discovery_path": "site/openid-configuration"}  # fmt: skip
        if request.param is not None:
            opts["cache_control"] = request.param
        sib = FilePublisher("conformance", opts, str(tmp_path)).sibling("openid-configuration")
        assert sib is not None and sib.path == tmp_path / "site" / "openid-configuration"
        return sib


class TestS3DiscoverySibling(PublisherTests):
    """The S3 publisher's discovery document keeps the publisher contract."""

    @pytest.fixture
    def publisher(self, moto: Any) -> Publisher:
        from keymgr.backends.aws.publisher import S3Publisher

        s3_client(moto.url).create_bucket(Bucket=BUCKET)
        opts = s3_publisher_options(moto.url, bucket=BUCKET, discovery_key=S3_DOC)
        sib = S3Publisher("conformance", opts, "/nonexistent").sibling("openid-configuration")
        assert sib is not None and sib.key == S3_DOC
        return sib


def test_plugins_declare_the_capability() -> None:
    from keymgr.backends.aws.publisher import S3Publisher
    from keymgr.backends.local.publisher import FilePublisher

    from keymgr.testing.memory import MemoryPublisher

    assert FilePublisher.supports_documents and S3Publisher.supports_documents
    assert FilePublisher.document_options == {"openid-configuration": "discovery_path"}
    assert S3Publisher.document_options == {"openid-configuration": "discovery_key"}
    assert not MemoryPublisher.supports_documents
    pub = FilePublisher("site", {"type": "file", "path": "j.json"}, "/nonexistent")
    assert pub.sibling("openid-configuration") is None  # not configured
    pub = FilePublisher(
        "site", {"type": "file", "path": "j.json", "discovery_path": "d.json"}, "/nonexistent"
    )
    assert pub.sibling("something-else") is None
    sib = pub.sibling("openid-configuration")
    assert sib is not None and sib.sibling("openid-configuration") is None
    assert sib.where == "publisher site: discovery document /nonexistent/d.json"
    assert pub.where == "publisher site"
