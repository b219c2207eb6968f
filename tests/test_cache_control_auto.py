"""``cache_control = "auto"``: a max-age derived from the rings' timing.

max-age = publish_ahead / 4 of the shortest publish_ahead among the rings a
publisher serves (capped at a day), ±10 % jitter chosen by a hash: per
publisher for a file (the static server sends one configured value), per
document for S3 (the header travels with each upload). The same document
always gets the same header, so the jitter never causes a rewrite, and a
header that changes only with the keys never breaks continuity
(docs/issuer.md#cache-control-auto).
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest

from keymgr.config import load_config
from keymgr.publishers import AutoCacheControl
from tests.conftest import SHORT_POLICY, T0, A, Home, P
from tests.servers_moto import (
    JWKS_KEY,
    s3_client,
    s3_publisher_options,
    sigv4_http_get,
    ts,
    write_config,
)

SEC = timedelta(seconds=1)
BUCKET = "auto-cc"
LOCAL = {"local": {"type": "file", "path": "keys", "master_key_file": "master.key"}}


def set_site(home: Home, *lines: str) -> None:
    out = []
    for line in home.config.read_text().splitlines():
        out.append(line)
        if line.strip() == "[publishers.site]":
            out.extend(lines)
    home.config.write_text("\n".join(out) + "\n")


def add_ring(home: Home, name: str, publish_ahead: str, publishers: str = '["site"]') -> None:
    home.config.write_text(
        home.config.read_text()
        + f'\n[keyrings.{name}]\nbackend = "local"\nalgorithm = "ES256"\n'
        f'rotation_period = "60d"\npublish_ahead = "{publish_ahead}"\nretire_grace = "1d"\n'
        f'destroy_after = "1d"\npublishers = {publishers}\n'
    )


def reconcile(home: Home, at: Any) -> str:
    return home.run("reconcile", "--at", ts(at), check=True, inproc=True).stdout


# --------------------------------------------------------------------------- the value


def test_the_value_is_deterministic_and_jittered_within_ten_percent() -> None:
    auto = AutoCacheControl(base=900, publish_ahead=timedelta(hours=1), rings=("default",))
    assert auto.bounds() == (810, 990)
    ages = [auto.max_age(f"doc {i}".encode()) for i in range(2000)]
    assert all(810 <= a < 990 for a in ages)
    # Spread over the whole range (verifiers of different documents do not
    # refetch in lockstep), and the same seed always gives the same value.
    assert min(ages) < 820 and max(ages) > 980 and len(set(ages)) > 150
    assert [auto.max_age(f"doc {i}".encode()) for i in range(2000)] == ages
    assert auto.value(b"doc 0") == f"public, max-age={ages[0]}"
    # Never above a quarter of A plus 10 %: far inside A.
    assert max(ages) <= 0.275 * 3600


def test_the_base_is_a_quarter_of_the_shortest_publish_ahead(home: Home) -> None:
    set_site(home, 'cache_control = "auto"')
    add_ring(home, "slow", "2h")
    add_ring(home, "fast", "20m")
    cfg = load_config(home.config)
    auto = cfg.auto_cache_control["site"]
    assert (auto.base, auto.publish_ahead, auto.rings) == (300, timedelta(minutes=20), ("fast",))
    assert cfg.publishers["site"].auto_cache_control is auto
    # The static server sends one value: jittered per publisher, not per document.
    pub = cfg.publishers["site"]
    value = auto.value(b"site")
    assert pub.headers_for(b'{"keys": []}') == pub.headers_for(b"other") == {
        "Cache-Control": value
    }


def test_capped_at_a_day_and_from_every_ring_when_none_uses_it(home: Home) -> None:
    home.set_ring(rotation_period="90d", publish_ahead="30d")
    set_site(home, 'cache_control = "auto"')
    assert load_config(home.config).auto_cache_control["site"].base == 86400
    # A publisher no ring uses (any more): the shortest publish_ahead of all rings.
    home.config.write_text(
        home.config.read_text()
        + '\n[publishers.old]\ntype = "file"\npath = "old/jwks.json"\ncache_control = "auto"\n'
    )
    add_ring(home, "other", "8h")
    auto = load_config(home.config).auto_cache_control["old"]
    assert (auto.base, auto.rings) == (7200, ("other",))


def test_config_check_explains_the_value_and_never_warns(home: Home) -> None:
    set_site(home, 'cache_control = "auto"')
    proc = home.run("config", "check", check=True)
    assert proc.stderr == ""  # max-age <= 0.275 A: the publish_ahead warning never fires
    value = AutoCacheControl(base=900, publish_ahead=A).value(b"site")
    info, ok = proc.stdout.splitlines()
    assert info == (
        f"keymgr: info: {home.config}: publishers.site.cache_control: auto = '{value}': 1/4 of "
        "publish_ahead 1h (the shortest of ring(s) default), ±10%, fixed per publisher; make "
        f"the static server send 'Cache-Control: {value}' with the documents"
    )
    assert ok.endswith("ok (1 key ring(s), 1 backend(s), 1 publisher(s))")


def test_file_header_is_stable_across_a_rotation_and_continuity_holds(home: Home) -> None:
    """The header counted in the confirmed document does not change when the
    keys do, and the successor is promoted exactly on schedule."""
    home.set_ring(**SHORT_POLICY)
    set_site(home, 'cache_control = "auto"')
    reconcile(home, T0)
    reconcile(home, T0 + P - A)
    successor = home.kid_in("published")
    assert reconcile(home, T0 + P - SEC) == ""  # nothing rewritten, nothing due
    assert "key.promoted" in reconcile(home, T0 + P)
    assert home.kid_in("active") == successor


# --------------------------------------------------------------------------- S3 on moto


@pytest.fixture
def bucket(moto: Any) -> Any:
    s3 = s3_client(moto.url)
    s3.create_bucket(Bucket=BUCKET)
    return s3


def s3_home(home: Home, moto: Any, **options: Any) -> None:
    write_config(
        home,
        backends=LOCAL,
        publishers={
            "cdn": s3_publisher_options(moto.url, bucket=BUCKET, cache_control="auto", **options)
        },
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )


def served(moto: Any, key: str = JWKS_KEY) -> tuple[int, bytes]:
    status, headers, body = sigv4_http_get(moto.url, BUCKET, key)
    assert status == 200
    m = re.fullmatch(r"public, max-age=(\d+)", headers["cache-control"])
    assert m is not None, headers["cache-control"]
    return int(m.group(1)), body


def expected(body: bytes, base: int = 900) -> int:
    return AutoCacheControl(base=base, publish_ahead=A).max_age(b"cdn\n" + body)


def test_s3_sends_a_per_document_value_stable_until_the_keys_change(
    home: Home, moto: Any, bucket: Any
) -> None:
    s3_home(home, moto)
    check = home.run("config", "check", check=True)
    assert (
        "publishers.cdn.cache_control: auto = 'public, max-age=N' with N from 810 to 990: 1/4 "
        "of publish_ahead 1h (the shortest of ring(s) default), ±10%, chosen per document by "
        "its content (unchanged while its keys are), sent with every upload"
    ) in check.stdout
    reconcile(home, T0)
    age, body = served(moto)
    assert 810 <= age < 990 and age == expected(body)
    etag = bucket.head_object(Bucket=BUCKET, Key=JWKS_KEY)["ETag"]
    # Later passes, in a new process too (a restart, another replica), compute
    # the same header: nothing is uploaded again, no drift is seen.
    assert home.run("reconcile", "--at", ts(T0 + SEC), check=True).stdout == ""
    assert reconcile(home, T0 + 2 * SEC) == ""
    assert bucket.head_object(Bucket=BUCKET, Key=JWKS_KEY)["ETag"] == etag
    # The successor: a new document, and its own header, within the bounds.
    reconcile(home, T0 + P - A)
    successor = home.kid_in("published")
    age2, body2 = served(moto)
    assert body2 != body and 810 <= age2 < 990 and age2 == expected(body2)
    # The header changed with the keys, in the same atomic upload: the
    # successor's continuity holds and it is promoted exactly on schedule.
    assert reconcile(home, T0 + P - SEC) == ""
    assert "key.promoted" in reconcile(home, T0 + P)
    assert home.kid_in("active") == successor


def test_s3_header_edited_out_of_band_is_repaired(home: Home, moto: Any, bucket: Any) -> None:
    s3_home(home, moto)
    reconcile(home, T0)
    age, body = served(moto)
    bucket.put_object(Bucket=BUCKET, Key=JWKS_KEY, Body=body, ContentType="application/json",
                      CacheControl="public, max-age=86400")  # fmt: skip
    assert "jwks.published publisher=cdn" in reconcile(home, T0 + SEC)
    assert served(moto) == (age, body)


def test_s3_changing_publish_ahead_changes_the_header(home: Home, moto: Any, bucket: Any) -> None:
    s3_home(home, moto)
    reconcile(home, T0)
    home.set_ring(publish_ahead="2h")
    assert "jwks.published publisher=cdn" in reconcile(home, T0 + SEC)
    age, body = served(moto)
    assert 1620 <= age < 1980 and age == expected(body, base=1800)


def test_s3_discovery_document_gets_its_own_auto_header(
    home: Home, moto: Any, bucket: Any
) -> None:
    doc_key = ".well-known/openid-configuration"
    s3_home(home, moto, discovery_key=doc_key, issuer="https://auth.example.com",
            jwks_uri=f"https://auth.example.com/{JWKS_KEY}")  # fmt: skip
    reconcile(home, T0)
    age, body = served(moto, doc_key)
    assert json.loads(body)["issuer"] == "https://auth.example.com"
    assert 810 <= age < 990 and age == expected(body)
    assert reconcile(home, T0 + SEC) == ""
