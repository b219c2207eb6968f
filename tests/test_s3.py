"""The S3 JWKS publisher and the S3 state store against a real moto server.

Unit-level tests drive :class:`S3Publisher` in this process against moto; the
state store's CAS commit, lease and pass lock are :class:`keymgr.docstore.SharedStore`'s,
tested once by ``keymgr.testing.docstore.SharedStoreTests`` (``tests/test_docstore_real.py``
runs them against moto, with the S3 adapter's own messages). Here the state store
is under the real CLI: the concurrency and outage tests run it in subprocesses,
several at once, with an AWS-only setup (KMS keys, S3 state, S3 and file JWKS).
Tokens are verified by PyJWT and jwcrypto (tests.servers_moto).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from keymgr.backends.aws.publisher import S3Publisher

from keymgr.errors import ConfigError, PublishError
from tests.conftest import T0, A, D, G, P
from tests.servers_common import STOP_DEAD_IMPORT
from tests.servers_moto import (
    JWKS_KEY,
    OUTAGE,
    REGION,
    assert_kms_keys,
    cli_ok,
    error_lines,
    kms_client,
    kms_options,
    s3_client,
    s3_publisher_options,
    s3_state_url,
    sigv4_http_get,
    ts,
    verify_token,
    write_config,
)

STATE_BUCKET = "keymgr-state"
STATE_KEY = "keymgr/state.json"
JWKS_BUCKET = "jwks"


@pytest.fixture
def buckets(moto: Any) -> Any:
    """The moto server with the state and JWKS buckets created; yields an S3 client."""
    s3 = s3_client(moto.url)
    for bucket in (STATE_BUCKET, JWKS_BUCKET):
        s3.create_bucket(Bucket=bucket)
    return s3


def publisher(url: str, **options: Any) -> S3Publisher:
    opts = {**s3_publisher_options(url), "bucket": JWKS_BUCKET, **options}
    return S3Publisher("cdn", opts, "/nonexistent")


def count_calls(client: Any, operation: str) -> list[dict[str, Any]]:
    """Parameters of every ``operation`` request ``client`` sends from now on."""
    seen: list[dict[str, Any]] = []
    client.meta.events.register(
        f"before-call.s3.{operation}", lambda params, **_: seen.append(dict(params))
    )
    return seen


# --------------------------------------------------------------------------- publisher


def test_publish_sets_headers_confirms_and_skips_unchanged(buckets: Any, moto: Any) -> None:
    pub = publisher(moto.url, cache_control="public, max-age=60, s-maxage=120", sse="AES256")
    puts = count_calls(pub.client, "PutObject")
    doc1 = b'{"keys":[]}'
    assert pub.publish(doc1) is True
    assert len(puts) == 1
    head = buckets.head_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)
    assert head["ContentType"] == "application/json"
    assert head["CacheControl"] == "public, max-age=60, s-maxage=120"
    assert head["ServerSideEncryption"] == "AES256"
    # What a plain HTTP client (a CDN origin fetch) gets.
    status, headers, body = sigv4_http_get(moto.url, JWKS_BUCKET, JWKS_KEY)
    assert (status, body) == (200, doc1)
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "public, max-age=60, s-maxage=120"

    assert pub.publish(doc1) is False  # unchanged: no upload
    assert len(puts) == 1
    doc2 = b'{"keys":[{"kid":"x"}]}'
    assert pub.publish(doc2) is True and pub.read() == doc2
    assert len(puts) == 2

    # Same bytes, changed configuration: the headers are part of "unchanged".
    pub2 = publisher(moto.url, cache_control="public, max-age=30")
    puts2 = count_calls(pub2.client, "PutObject")
    assert pub2.publish(doc2) is True and len(puts2) == 1
    assert buckets.head_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)["CacheControl"] == (
        "public, max-age=30"
    )
    assert pub2.publish(doc2) is False and len(puts2) == 1
    # Changed out of band (bytes or headers): written again.
    buckets.put_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY, Body=doc2, ContentType="text/plain")
    assert pub2.publish(doc2) is True and len(puts2) == 2
    buckets.delete_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)
    assert pub2.read() is None
    assert pub2.publish(doc2) is True and len(puts2) == 3


def test_publish_sse_kms(buckets: Any, moto: Any) -> None:
    key_id = kms_client(moto.url).create_key()["KeyMetadata"]["KeyId"]
    pub = publisher(moto.url, sse="aws:kms", sse_kms_key_id=key_id)
    assert pub.publish(b"{}") is True
    puts = count_calls(pub.client, "PutObject")
    assert pub.publish(b"{}") is False and not puts
    head = buckets.head_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert key_id in head["SSEKMSKeyId"]


def test_publish_counts_only_after_the_read_back_matches(buckets: Any, moto: Any) -> None:
    pub = publisher(moto.url)
    other = s3_client(moto.url)

    def overwrite(**_: Any) -> None:  # another writer lands between our PUT and GET
        other.put_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY, Body=b"tampered")

    pub.client.meta.events.register("after-call.s3.PutObject", overwrite)
    with pytest.raises(PublishError) as info:
        pub.publish(b'{"keys":[]}')
    assert str(info.value) == (
        f"publisher cdn: s3://{JWKS_BUCKET}/{JWKS_KEY}: read-back: SHA-256 differs from what "
        "was written"
    )


def test_publisher_errors_are_one_line(
    moto: Any, monkeypatch: pytest.MonkeyPatch, buckets: Any
) -> None:
    missing = publisher(moto.url, bucket="no-such-bucket")
    with pytest.raises(PublishError) as info:
        missing.publish(b"{}")
    msg = str(info.value)
    assert msg.startswith(
        f"publisher cdn: s3://no-such-bucket/{JWKS_KEY}: GetObject: NoSuchBucket"
    ), msg
    closed = publisher("http://127.0.0.1:9", max_attempts=1, connect_timeout=1)
    with pytest.raises(PublishError) as info:
        closed.read()
    msg = str(info.value)
    assert msg.startswith(f"publisher cdn: s3://{JWKS_BUCKET}/{JWKS_KEY}: GetObject: Could not")
    assert "\n" not in msg
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PublishError) as info:
        publisher(moto.url).publish(b"{}")
    assert str(info.value) == (
        f"publisher cdn: s3://{JWKS_BUCKET}/{JWKS_KEY}: GetObject: no AWS credentials found "
        "(environment, profile, or instance/container role)"
    )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bucket": None}, "bucket"),
        ({"bucket": "Upper_Case"}, "bucket"),
        ({"key": "/leading/slash.json"}, "key"),
        ({"key": ""}, "key"),
        ({"cache_control": "a\nb"}, "cache_control"),
        ({"sse": "DES"}, "sse"),
        ({"sse_kms_key_id": "alias/x"}, "sse_kms_key_id"),
        ({"region": "eu_west_1"}, "region"),
        ({"endpoint_url": "s3.example"}, "endpoint_url"),
        ({"read_timeout": -1}, "read_timeout"),
        ({"max_attempts": 100}, "max_attempts"),
        ({"acl": "public-read"}, "acl"),
    ],
)
def test_publisher_config_errors_name_the_field(options: dict[str, Any], field: str) -> None:
    opts: dict[str, Any] = {"type": "s3", "bucket": "jwks", "key": JWKS_KEY, **options}
    opts = {k: v for k, v in opts.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        S3Publisher("cdn", opts, "/nonexistent")
    assert str(info.value).startswith(f"publishers.cdn.{field}: "), info.value


# --------------------------------------------------------------------------- state store


def test_store_url_is_checked_at_config_load(home: Any, tmp_path: Path) -> None:
    from keymgr.config import load_config

    def config_error(url: str, cli: bool = False) -> str:
        text = home.config.read_text()
        lines = [f"state = {json.dumps(url)}" if ln.startswith("state =") else ln
                 for ln in text.splitlines()]
        home.config.write_text("\n".join(lines) + "\n")
        if cli:
            proc = home.run("config", "check")
            assert proc.returncode == 2, proc.stdout + proc.stderr
            (line,) = error_lines(proc.stderr)
        else:
            with pytest.raises(ConfigError) as info:
                load_config(home.config)
            line = str(info.value)
        assert str(home.config) in line and "daemon.state" in line, line
        return line

    assert "daemon.state?regoin: unknown option" in config_error(
        "s3://bucket/state.json?regoin=x", True
    )
    assert "lock_ttl" in config_error("s3://bucket/state.json?lock_ttl=1")
    assert "bucket" in config_error("s3://B_AD/state.json")
    assert "object key" in config_error("s3://bucket/")
    assert "endpoint_url" in config_error("s3://bucket/k?endpoint_url=ftp://x")
    url = "s3://bucket/k.json?region=eu-west-1&lock_ttl=60&endpoint_url=https%3A%2F%2Fs3.example"
    text = home.config.read_text().replace("s3://bucket/k?endpoint_url=ftp://x", url)
    home.config.write_text(text)
    assert load_config(home.config).daemon.state == url


# --------------------------------------------------------------------------- through the CLI


def aws_home(home: Any, url: str, conn: dict[str, Any] | None = None) -> None:
    """Everything on AWS: KMS keys, the state in S3, the JWKS in S3 and in a file."""
    conn = conn or {}
    write_config(
        home,
        state=s3_state_url(url, STATE_BUCKET, STATE_KEY, **conn),
        backends={"kms": kms_options(url, **conn)},
        publishers={
            "site": {"type": "file", "path": "public/.well-known/jwks.json"},
            "cdn": {**s3_publisher_options(url, **conn), "bucket": JWKS_BUCKET},
        },
        rings={"default": {"backend": "kms", "algorithm": "ES256"}},
    )


def s3_state(s3: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        s3.get_object(Bucket=STATE_BUCKET, Key=STATE_KEY)["Body"].read()
    )
    return doc


def ring_keys(s3: Any) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = s3_state(s3)["rings"].get("default", {}).get("keys", [])
    return keys


def kids(s3: Any, *states: str) -> list[str]:
    return [k["kid"] for k in ring_keys(s3) if k["state"] in states]


def s3_jwks(s3: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        s3.get_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)["Body"].read()
    )
    return doc


def check_invariants(home: Any, s3: Any, url: str, tmp_path: Path, ever: set[str]) -> None:
    """One signer; no key lost; KMS holds exactly the live keys; both JWKS agree."""
    keys = ring_keys(s3)
    assert len(kids(s3, "active")) == 1, keys
    in_state = {k["kid"] for k in keys}
    assert ever <= in_state, ever - in_state  # every kid ever seen is still recorded
    ever |= in_state
    live = {k["kid"] for k in keys if k["state"] != "destroyed"}
    dead = in_state - live
    assert_kms_keys(url, tmp_path, "default", live, dead)
    assert s3_jwks(s3) == json.loads(home.jwks_path.read_text())
    published = {k["kid"] for k in s3_jwks(s3)["keys"]}
    assert published == set(kids(s3, "published", "active", "retired")), (published, keys)


def test_concurrent_reconciles_share_one_s3_store(
    home: Any, moto: Any, buckets: Any, tmp_path: Path
) -> None:
    """Four `keymgr reconcile` processes at once, at each step of a rotation that makes or
    promotes a key (bootstrap, successor, promotion): one signer, no key lost or made
    twice, every transition applied once, an intact audit chain."""
    aws_home(home, moto.url)
    ever: set[str] = set()
    token = ""
    for at in (T0, T0 + P - A, T0 + P):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "keymgr.cli", "--config", str(home.config),
                 "reconcile", "--at", ts(at)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home.dir,
                env=home.env(),
            )
            for _ in range(4)
        ]
        outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        for rc, out, err in outs:
            assert rc == 0 and "Traceback" not in err, (at, rc, out, err)
        # Each transition was applied by exactly one of them.
        applied = [line for _, out, _ in outs for line in out.splitlines() if " key." in line]
        assert len(applied) == len(set(applied)), applied
        check_invariants(home, buckets, moto.url, tmp_path, ever)
        if at == T0:
            token = cli_ok(home, "sign", "default", "--claims", "{}", "--ttl", "1d",
                           "--at", ts(T0 + P - 2 * A))[0]
        verify_token(s3_jwks(buckets), token, "ES256")  # the first key's, live till T0+P+23h
    assert len(ever) == 2
    assert kids(buckets, "retired") and kids(buckets, "active")
    cli_ok(home, "audit", "verify")
    lines = (home.dir / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    for name in ("key.generated", "key.promoted", "key.retired", "key.expired",
                 "key.destroyed"):
        per_kid = [e["kid"] for e in events if e["event"] == name]
        assert len(per_kid) == len(set(per_kid)), (name, per_kid)
    assert not [e for e in events if e["event"] in ("key.adopted", "key.orphan_destroyed")]


#: Runs the real CLI, and SIGSTOPs moto the moment the S3 publisher is about to
#: upload the JWKS: an outage in the middle of a pass, at an exact request.
_STOP_AT_JWKS_UPLOAD = STOP_DEAD_IMPORT + """
import os, signal, sys
import keymgr.backends.aws.client as s3
_client = s3.AWSConnection.client
def client(self, service):
    c = _client(self, service)
    def hook(params, **_):
        if params.get("Key") == {key!r}:
            stop_dead({pid})
    c.meta.events.register("before-parameter-build.s3.PutObject", hook)
    return c
s3.AWSConnection.client = client
from keymgr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_outage_in_the_middle_of_a_rotation(
    home: Any, moto: Any, buckets: Any, tmp_path: Path
) -> None:
    """S3 and KMS stop answering mid-pass (successor made, JWKS upload under way):
    exit 1, one line naming the store and operation, no traceback, nothing
    promoted; after the outage the next passes finish the rotation intact."""
    aws_home(home, moto.url)
    ever: set[str] = set()
    cli_ok(home, "reconcile", "--at", ts(T0))
    (first,) = kids(buckets, "active")
    token = cli_ok(home, "sign", "default", "--claims", "{}", "--ttl", "1d",
                   "--at", ts(T0 + P - 2 * A))[0]
    jwks_before = s3_jwks(buckets)

    # Fail fast once stopped; 2 s still leaves the requests before the stop
    # (lock, state, KMS) room on a busy machine.
    aws_home(home, moto.url, {**OUTAGE, "read_timeout": 2})
    script = _STOP_AT_JWKS_UPLOAD.format(key=JWKS_KEY, pid=moto.proc.pid)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, "--config", str(home.config),
             "reconcile", "--at", ts(T0 + P - A)],
            capture_output=True, text=True, cwd=home.dir, env=home.env(), timeout=120,
        )
    finally:
        moto.resume()
    aws_home(home, moto.url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    # The publish failed (logged), then committing what did succeed failed: by
    # the PutObject timing out, or, when the outage outlasted the pass lock's
    # TTL first, by refusing to write without the lock; or, the audit chain
    # being kept in the store, by reading its head before the commit.
    assert line.startswith(f"keymgr: error: state s3://{STATE_BUCKET}/{STATE_KEY}: "), line
    head_read = f"GetObject {STATE_KEY}.audit/" in line
    assert "PutObject: " in line or "pass lock lost" in line or head_read, line
    assert "unreachable" in line or "timeout" in line.lower() or "not renewed" in line, line
    # The successor was made and recorded before the outage; it is not published.
    (second,) = kids(buckets, "pending")
    assert kids(buckets, "active") == [first]
    assert s3_jwks(buckets) == jwks_before

    # The failed pass could not delete its pass lock; requests queued in the
    # stopped server (a lock renewal among them) land after SIGCONT. This pass
    # waits until the lock is lock_ttl (5 s) old, takes it over, and goes on.
    resumed = T0 + P - A + timedelta(minutes=5)
    cli_ok(home, "reconcile", "--at", ts(resumed))
    assert kids(buckets, "published") == [second]
    check_invariants(home, buckets, moto.url, tmp_path, ever)
    for at in (resumed + A, resumed + A + G, resumed + A + G + D):
        cli_ok(home, "reconcile", "--at", ts(at))
        check_invariants(home, buckets, moto.url, tmp_path, ever)
        if at == resumed + A:
            assert kids(buckets, "active") == [second]
            verify_token(s3_jwks(buckets), token, "ES256")  # the old key's token
    assert kids(buckets, "destroyed") == [first]
    cli_ok(home, "audit", "verify")


def test_region_from_aws_region_env(moto: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_REGION wins over AWS_DEFAULT_REGION (as in the aws CLI v2); config wins over both."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", REGION)
    pub = S3Publisher("cdn", {"type": "s3", "bucket": JWKS_BUCKET, "key": JWKS_KEY}, "/x")
    assert pub.client.meta.region_name == REGION
    pub = S3Publisher(
        "cdn", {"type": "s3", "bucket": JWKS_BUCKET, "key": JWKS_KEY, "region": "ap-south-1"},
        "/x",
    )
    assert pub.client.meta.region_name == "ap-south-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    pub = S3Publisher(
        "cdn", {"type": "s3", "bucket": JWKS_BUCKET, "key": JWKS_KEY, "endpoint_url": moto.url},
        "/x",
    )
    assert pub.client.meta.endpoint_url == moto.url


def test_aws_reason_is_one_line_and_redacted() -> None:
    """Throttling after botocore's retries, and secrets a server might echo."""
    from botocore.exceptions import ClientError, ReadTimeoutError
    from keymgr.backends.aws.client import aws_reason

    throttled = ClientError(
        {
            "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
            "ResponseMetadata": {"HTTPStatusCode": 400, "RetryAttempts": 4},
        },
        "Sign",
    )
    assert aws_reason(throttled) == "ThrottlingException: Rate exceeded (after 5 attempts)"
    echoed = ClientError(
        {
            "Error": {
                "Code": "InvalidSignatureException",
                "Message": "bad\nsignature Credential=AKIAIOSFODNN7EXAMPLE/20310301/us-east-1 "
                "Signature=0123abcd X-Amz-Security-Token=FwoGZXIvYXdzEJr",
            }
        },
        "GetObject",
    )
    reason = aws_reason(echoed)
    assert "\n" not in reason and "AKIA" not in reason and "0123abcd" not in reason
    assert "FwoGZXIvYXdzEJr" not in reason, reason
    timeout = ReadTimeoutError(endpoint_url="http://127.0.0.1:1/")
    assert aws_reason(timeout).endswith("(service unreachable)")


def test_sigterm_does_not_wait_for_the_lock_of_another_replica(
    home: Any, buckets: Any, moto: Any, launcher: Any
) -> None:
    """``keymgr run`` on an S3 state whose pass lock another process holds
    (a replica killed mid-pass leaves it until ``lock_ttl`` has passed on
    S3's clock; here a live holder keeps renewing it): its pass waits for
    the lock, as it must, but a SIGTERM does not wait with it. The daemon
    exits 0 within the stop bound, not after the 30 s lock_ttl, and the
    other process's lock is left alone."""
    import threading

    from keymgr.stores import open_store
    from tests.test_daemon import STOP_BOUND, set_daemon

    url = s3_state_url(moto.url, STATE_BUCKET, STATE_KEY, lock_ttl=30)
    write_config(
        home, state=url, backends={"local": {"type": "file", "path": "keys",
                                             "master_key_file": "master.key"}},
        publishers={"site": {"type": "file", "path": "public/.well-known/jwks.json"}},
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )  # fmt: skip
    set_daemon(home, reconcile_interval="1s", lease_ttl="30s", listen="127.0.0.1:0")
    other = open_store(url)
    holding, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with other.exclusive():
            holding.set()
            leave.wait(60)

    d = launcher.start(home)
    d.ready(timeout=30)
    holder = threading.Thread(target=hold, daemon=True)
    holder.start()  # takes the lock between two of the daemon's passes
    try:
        assert holding.wait(20)
        time.sleep(2)  # the daemon's next pass is waiting for the lock by now
        rc, took = d.stop()
        assert rc == 0 and took < STOP_BOUND, (rc, took, d.err.read_text())
        lock = buckets.get_object(Bucket=STATE_BUCKET, Key=f"{STATE_KEY}.lock")["Body"].read()
        assert json.loads(lock)["holder"] == other.owner  # type: ignore[attr-defined]
    finally:
        leave.set()
        holder.join(10)
