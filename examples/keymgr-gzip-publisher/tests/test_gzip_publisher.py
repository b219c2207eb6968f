"""The gzip-file publisher: keymgr's conformance suite, its own rules, and a real CLI run.

Needs the distribution installed next to keymgr (its entry point is how keymgr
finds it): ``pip install -e examples/keymgr-gzip-publisher``.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from keymgr_gzip_publisher import GzipFilePublisher

from keymgr.errors import ConfigError
from keymgr.plugins import PUBLISHERS, names, publisher_class
from keymgr.testing.conformance import PublisherTests, sample_jwks

JWKS = "public/.well-known/jwks.json"


class TestGzipFilePublisher(PublisherTests):
    @pytest.fixture(params=[None, "public, max-age=300"], ids=["plain", "cache-control"])
    def publisher(self, request: pytest.FixtureRequest, tmp_path: Path) -> GzipFilePublisher:
        options = {"type": "gzip-file", "path": JWKS}
        if request.param is not None:
            options["cache_control"] = request.param
        return GzipFilePublisher("site", options, str(tmp_path))


@pytest.fixture
def publisher(tmp_path: Path) -> GzipFilePublisher:
    return GzipFilePublisher("site", {"type": "gzip-file", "path": JWKS}, str(tmp_path))


def test_writes_the_body_and_a_deterministic_gzip(publisher: GzipFilePublisher) -> None:
    """nginx serves the .gz as is: it must hold exactly the body, and the same
    document must always give the same bytes (no timestamp in the header)."""
    data = sample_jwks(1, size=20)
    assert publisher.publish(data) is True
    packed = publisher.gz.read_bytes()
    assert publisher.path.read_bytes() == data and gzip.decompress(packed) == data
    assert packed[4:8] == b"\0\0\0\0"  # gzip MTIME (RFC 1952 2.3)
    assert publisher.paths() == {"path": publisher.path, "path.gz": publisher.gz}
    assert oct(publisher.gz.stat().st_mode & 0o777) == oct(0o644)
    publisher.write(data)
    assert publisher.gz.read_bytes() == packed


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda gz: gz.unlink(), id="missing"),
        pytest.param(lambda gz: gz.write_bytes(b"not gzip"), id="corrupt"),
        pytest.param(lambda gz: gz.write_bytes(gzip.compress(sample_jwks(2))), id="stale"),
        pytest.param(lambda gz: gz.write_bytes(gzip.compress(sample_jwks(1))[:-4]), id="cut"),
    ],
)
def test_a_gz_that_is_not_the_body_is_not_served(
    publisher: GzipFilePublisher, damage: Callable[[Path], object]
) -> None:
    """Clients that accept gzip get the .gz: when it is not the body, the pair
    serves two documents (or none), which must not count as publishing one;
    the next publish writes both again."""
    data = sample_jwks(1)
    publisher.publish(data)
    damage(publisher.gz)
    assert publisher.read() is None and publisher.fetch() is None
    assert publisher.publish(data) is True
    assert gzip.decompress(publisher.gz.read_bytes()) == data


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "publishers.site.path: is required (a file path)"),
        ({"path": ""}, "publishers.site.path: expected a non-empty string, got ''"),
        ({"path": JWKS, "mode": "0666"}, "publishers.site.mode: expected an octal string"),
        ({"path": JWKS, "mode": 420}, "publishers.site.mode: expected an octal string"),
        ({"path": JWKS, "mode": "rw"}, "publishers.site.mode: expected an octal string"),
        ({"path": JWKS, "cache_control": 300}, "publishers.site.cache_control: expected a"),
        ({"path": JWKS, "gzip": True}, "publishers.site.gzip: unknown option (known: "),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        GzipFilePublisher("site", {"type": "gzip-file", **options}, str(tmp_path))
    assert str(info.value).startswith(message), str(info.value)


def test_keymgr_loads_it_by_name() -> None:
    """The entry point in pyproject.toml, as keymgr's loader sees it installed."""
    assert "gzip-file" in names(PUBLISHERS)
    assert publisher_class("gzip-file", "keymgr.toml: publishers.site.type") is GzipFilePublisher


def _keymgr(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "--config", str(home / "keymgr.toml"), *args],
        capture_output=True, text=True, cwd=home, env=env, timeout=120,
    )
    assert proc.returncode == 0, f"keymgr {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def test_end_to_end_through_the_cli(tmp_path: Path) -> None:
    """A config names the plug-in like a built-in; the real CLI rotates a key
    into both files, and a token verifies against the JWKS nginx would send
    compressed (PyJWT and jwcrypto, not keymgr)."""
    import jwt
    from jwcrypto import jwk as jwc_jwk  # type: ignore[import-untyped]
    from jwcrypto import jwt as jwc_jwt

    init = subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert init.returncode == 0, init.stderr
    config = tmp_path / "keymgr.toml"
    text = config.read_text()
    file_publisher = '[publishers.site]\ntype = "file"'
    assert file_publisher in text
    config.write_text(text.replace(file_publisher, '[publishers.site]\ntype = "gzip-file"'))

    _keymgr(tmp_path, "config", "check")
    assert "key.promoted" in _keymgr(tmp_path, "reconcile")
    token = _keymgr(tmp_path, "sign", "default", "--claims", '{"sub":"alice"}', "--ttl", "5m")

    body = (tmp_path / JWKS).read_bytes()
    served = gzip.decompress((tmp_path / (JWKS + ".gz")).read_bytes())
    assert served == body
    doc = json.loads(served)
    kid = jwt.get_unverified_header(token.strip())["kid"]
    assert [k["kid"] for k in doc["keys"]] == [kid]
    key = jwt.PyJWKSet.from_dict(doc)[kid]
    assert jwt.decode(token.strip(), key.key, algorithms=["ES256"])["sub"] == "alice"
    keys = jwc_jwk.JWKSet.from_json(served.decode())
    assert json.loads(jwc_jwt.JWT(jwt=token.strip(), key=keys).claims)["sub"] == "alice"
    # Nothing to change: the next pass leaves both files as they are.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / JWKS, tmp_path / (JWKS + ".gz"))}
    _keymgr(tmp_path, "reconcile")
    assert {p: p.stat().st_mtime_ns for p in before} == before
