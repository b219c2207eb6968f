"""The Cloud Storage publisher and ``gs://`` state store against a real emulator.

The emulator is fake-gcs-server (``tests/servers_gcs.py``: one process per
xdist worker, on a free loopback port), which enforces ``ifGenerationMatch``
on uploads, the one precondition keymgr's GCS code relies on (it ignores it
on deletes, which is why a released lock is a tombstone upload: see
``test_the_emulator_ignores_preconditions_on_delete``).

- Conformance: ``PublisherTests`` on the publisher loaded by type name,
  ``SharedStoreTests`` on the adapter (CAS between processes, pass lock,
  lease, lost answers), ``StoreTests`` on the store opened from its URL.
- The adapter's own: messages, the retried upload that landed on its first
  attempt, tombstones, the age on the server's clock.
- Through the real CLI (subprocesses): three concurrent reconciles on one
  store, two daemon replicas and a lease take-over after SIGKILL, the server
  stopped in the middle of a rotation, and a whole rotation with tokens
  verified by PyJWT and jwcrypto against the object as the emulator serves it.
- Configuration errors (one line naming ``daemon.state?param`` or
  ``publishers.NAME.field``), error reasons without credentials, no SDK import
  for ``config check``, and the least-privilege role of ``deploy/gcp/``.

Until pyproject.toml and ``keymgr.plugins.BUILTIN`` list ``gcs`` and ``gs``,
the fixtures register them (``tests.servers_gcs.register_gcp_plugins``; the
CLI subprocesses through ``tests.servers_gcs.BOOTSTRAP``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from keymgr.backends.gcp.client import (
    CallFailed,
    GCSConnection,
    gcs_reason,
    parse_connection,
)
from keymgr.backends.gcp.publisher import GCSPublisher
from keymgr.backends.gcp.store import DELETED, WRITE_ID, GCSAdapter, open_gcs_store

from keymgr.docstore import LEASE, LOCK, STATE, SharedStore, encode_state
from keymgr.errors import ConfigError, ConflictError, PublishError, StoreError
from keymgr.lease import Lease
from keymgr.model import State
from keymgr.options import Options
from keymgr.plugins import publisher_class
from keymgr.publishers import Publisher
from keymgr.stores import StateStore, open_store
from keymgr.testing.conformance import PublisherTests, StoreTests, sample_jwks
from keymgr.testing.docstore import DocHarness, SharedStoreTests, sample_state
from tests.conftest import T0, A, D, G, P
from tests.servers_common import STOP_DEAD_IMPORT
from tests.servers_gcs import (  # noqa: F401 - fixtures
    JWKS_OBJECT,
    OUTAGE,
    GCSServer,
    cli_command,
    cli_ok,
    gcs_fixture,
    gcs_publisher_options,
    gcs_server_fixture,
    gs_state_url,
    run_cli,
)
from tests.servers_moto import error_lines, ts, verify_token, write_config

REPO = Path(__file__).resolve().parent.parent
#: Several times the store's 1 s clock resolution plus a request's latency.
TTL = 2.5
STATE_OBJECT = "keymgr/state.json"


def connection(**options: Any) -> GCSConnection:
    return GCSConnection(**{"connect_timeout": 2.0, "read_timeout": 5.0, "max_attempts": 3,
                            **options})


@pytest.fixture
def bucket(gcs: GCSServer) -> str:
    return gcs.new_bucket()


def sdk(gcs: GCSServer) -> Any:
    """A plain google-cloud-storage client of the emulator (another writer, out of band)."""
    from google.cloud import storage

    client = storage.Client(project="test")
    client._bucket_metadata_cache = None
    return client


class Recorder:
    """Every request a client sends, as (method, path, query), from its session's hook."""

    def __init__(self, *components: Any) -> None:
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        for c in components:
            c.client._http.hooks["response"].append(self._hook)

    def _hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        parts = urlsplit(response.request.url)
        self.requests.append((response.request.method, unquote(parts.path), parse_qs(parts.query)))

    def uploads(self) -> list[dict[str, list[str]]]:
        return [q for m, p, q in self.requests if m == "POST" and p.startswith("/upload/")]


# --------------------------------------------------------------------------- conformance


class TestGCSPublisher(PublisherTests):
    @pytest.fixture(params=[None, "public, max-age=60, s-maxage=120"],
                    ids=["default-cache-control", "cache-control"])
    def publisher(self, request: pytest.FixtureRequest, bucket: str, tmp_path: Path) -> Publisher:
        options: dict[str, Any] = {"type": "gcs", **gcs_publisher_options(bucket)}
        if request.param is not None:
            options["cache_control"] = request.param
        cls = publisher_class("gcs", "publishers.conformance.type (gcs)")
        return cls("conformance", options, str(tmp_path))


class TestGCSAdapter(SharedStoreTests):
    @pytest.fixture
    def harness(self, bucket: str) -> DocHarness:
        conn = connection()
        return DocHarness(
            factory=lambda: GCSAdapter(bucket, STATE_OBJECT, conn), lock_ttl=TTL, resolution=1.0
        )


class TestGCSStoreFromURL(StoreTests):
    @pytest.fixture
    def store(self, bucket: str) -> StateStore:
        return open_store(gs_state_url(bucket, f"conformance/{uuid.uuid4().hex[:8]}/state"))


def test_the_emulator_ignores_preconditions_on_delete(gcs: GCSServer, bucket: str) -> None:
    """Why the adapter releases a lock with a conditional *upload* (a tombstone):
    fake-gcs-server deletes an object whatever ``ifGenerationMatch`` says, while it
    enforces it on uploads. Cloud Storage enforces both; with a tombstone, the
    tests prove the very requests production sends. If this test fails, the
    emulator has learnt conditional deletes (docs/configuration/gcp.md)."""
    from google.api_core.exceptions import PreconditionFailed

    blobs = sdk(gcs).bucket(bucket)
    blob = blobs.blob("x")
    blob.upload_from_string(b"1", if_generation_match=0, retry=None)
    with pytest.raises(PreconditionFailed):
        blobs.blob("x").upload_from_string(b"2", if_generation_match=blob.generation + 1,
                                           retry=None)
    blobs.blob("x").delete(if_generation_match=blob.generation + 1, retry=None)  # not refused
    assert gcs.metadata(bucket, "x") is None


# --------------------------------------------------------------------------- publisher


def publisher(bucket: str, **options: Any) -> GCSPublisher:
    return GCSPublisher("cdn", {**gcs_publisher_options(bucket), **options}, "/nonexistent")


def test_publish_sets_headers_confirms_and_skips_unchanged(gcs: GCSServer, bucket: str) -> None:
    pub = publisher(bucket, cache_control="public, max-age=60, s-maxage=120")
    rec = Recorder(pub)
    doc1 = sample_jwks(1)
    assert pub.publish(doc1) is True
    assert len(rec.uploads()) == 1
    meta = gcs.metadata(bucket, JWKS_OBJECT)
    assert meta is not None
    assert meta["contentType"] == "application/json"
    assert meta["cacheControl"] == "public, max-age=60, s-maxage=120"
    assert gcs.download(bucket, JWKS_OBJECT) == doc1  # what a plain HTTP client gets
    assert pub.fetch() is not None and pub.fetch().headers == {  # type: ignore[union-attr]
        "Content-Type": "application/json", "Cache-Control": "public, max-age=60, s-maxage=120"
    }

    assert pub.publish(doc1) is False  # unchanged: no upload
    assert len(rec.uploads()) == 1
    doc2 = sample_jwks(2, size=3)
    assert pub.publish(doc2) is True and pub.read() == doc2
    assert len(rec.uploads()) == 2

    # Same bytes, another Cache-Control configured: the headers are part of "unchanged".
    pub2 = publisher(bucket, cache_control="public, max-age=30")
    rec2 = Recorder(pub2)
    assert pub2.publish(doc2) is True and len(rec2.uploads()) == 1
    assert gcs.metadata(bucket, JWKS_OBJECT)["cacheControl"] == "public, max-age=30"  # type: ignore[index]
    assert pub2.publish(doc2) is False and len(rec2.uploads()) == 1
    # Changed out of band (content type, or deleted): written again.
    other = sdk(gcs).bucket(bucket).blob(JWKS_OBJECT)
    other.upload_from_string(doc2, content_type="text/plain")
    assert pub2.publish(doc2) is True and len(rec2.uploads()) == 2
    sdk(gcs).bucket(bucket).blob(JWKS_OBJECT).delete()
    assert pub2.read() is None and pub2.fetch() is None
    assert pub2.publish(doc2) is True and len(rec2.uploads()) == 3
    # The default Cache-Control, when none is configured.
    assert publisher(bucket).headers()["Cache-Control"] == "public, max-age=300"


def test_publish_counts_only_after_the_read_back_matches(gcs: GCSServer, bucket: str) -> None:
    pub = publisher(bucket)
    other = sdk(gcs).bucket(bucket)
    write = pub.write

    def write_then_tamper(data: bytes) -> None:  # another writer lands between write and read
        write(data)
        other.blob(JWKS_OBJECT).upload_from_string(b"tampered", content_type="application/json")

    pub.write = write_then_tamper  # type: ignore[method-assign]
    with pytest.raises(PublishError) as info:
        pub.publish(sample_jwks(1))
    assert str(info.value) == (
        f"publisher cdn: gs://{bucket}/{JWKS_OBJECT}: read-back: SHA-256 differs from what "
        "was written"
    )

    def write_then_recache(data: bytes) -> None:  # the bytes stay, the Cache-Control changes
        write(data)
        blob = other.blob(JWKS_OBJECT)
        blob.cache_control = "no-store"
        blob.upload_from_string(data, content_type="application/json")

    pub.write = write_then_recache  # type: ignore[method-assign]
    with pytest.raises(PublishError) as info:
        pub.publish(sample_jwks(2))
    assert str(info.value) == (
        f"publisher cdn: gs://{bucket}/{JWKS_OBJECT}: read-back: served with "
        "Cache-Control 'no-store'"
    )


def test_publisher_errors_are_one_line(
    gcs: GCSServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PublishError) as info:  # no object (404) reads as None: then the upload
        publisher("no-such-bucket").publish(b"{}")
    assert str(info.value) == (
        f"publisher cdn: gs://no-such-bucket/{JWKS_OBJECT}: objects.insert: HTTP 404: Not Found"
    )
    closed = publisher(bucket, endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(PublishError) as info:
        closed.read()
    assert str(info.value) == (
        f"publisher cdn: gs://{bucket}/{JWKS_OBJECT}: objects.get: cannot connect to "
        "127.0.0.1:9 (Connection refused; service unreachable) (after 2 attempts)"
    )
    # No emulator and no Application Default Credentials on this machine.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    with pytest.raises(PublishError) as info:
        publisher(bucket, endpoint_url=gcs.url).publish(b"{}")
    assert str(info.value) == (
        f"publisher cdn: gs://{bucket}/{JWKS_OBJECT}: create client: no Google credentials "
        "found (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud auth "
        "application-default login, workload identity or the metadata server)"
    )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bucket": None}, "bucket"),
        ({"bucket": "Upper_Case"}, "bucket"),
        ({"bucket": "goog-jwks"}, "bucket"),
        ({"bucket": "ab"}, "bucket"),
        ({"object": None}, "object"),
        ({"object": "/leading/slash.json"}, "object"),
        ({"object": ""}, "object"),
        ({"object": "a\nb"}, "object"),
        ({"object": "x" * 1025}, "object"),
        ({"cache_control": "a\nb"}, "cache_control"),
        ({"cache_control": 300}, "cache_control"),
        ({"endpoint_url": "storage.googleapis.com"}, "endpoint_url"),
        ({"read_timeout": -1}, "read_timeout"),
        ({"connect_timeout": "fast"}, "connect_timeout"),
        ({"max_attempts": 100}, "max_attempts"),
        ({"key": JWKS_OBJECT}, "key"),  # the S3 publisher's word for it
        ({"project": "my-project"}, "project"),
        ({"predefined_acl": "publicRead"}, "predefined_acl"),
    ],
)
def test_publisher_config_errors_name_the_field(options: dict[str, Any], field: str) -> None:
    opts: dict[str, Any] = {"type": "gcs", "bucket": "jwks", "object": JWKS_OBJECT, **options}
    opts = {k: v for k, v in opts.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        GCSPublisher("cdn", opts, "/nonexistent")
    msg = str(info.value)
    assert msg.startswith(f"publishers.cdn.{field}: ") and "\n" not in msg, msg


def test_unknown_publisher_option_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        GCSPublisher("cdn", {"type": "gcs", "no_such_option": 1}, "/x")
    assert str(info.value) == (
        "publishers.cdn.no_such_option: unknown option (known: bucket, cache_control, "
        "connect_timeout, endpoint_url, max_attempts, object, read_timeout, type)"
    )


# --------------------------------------------------------------------------- state store


def adapter(bucket: str, **options: Any) -> GCSAdapter:
    return GCSAdapter(bucket, STATE_OBJECT, connection(**options))


def test_gcs_objects_and_messages(gcs: GCSServer, bucket: str) -> None:
    store = SharedStore(adapter(bucket), lock_ttl=TTL)
    t1 = store.commit(sample_state(1), None)
    store.write_lease({"holder": "a"}, None)
    with store.exclusive():
        lock = gcs.metadata(bucket, f"{STATE_OBJECT}.lock")
        assert lock is not None and lock["contentType"] == "application/json"
        assert json.loads(gcs.download(bucket, f"{STATE_OBJECT}.lock") or b"")["holder"] == (
            store.owner
        )
    state = gcs.metadata(bucket, STATE_OBJECT)
    assert state is not None and int(state["generation"]) == t1.version
    assert state["metadata"][WRITE_ID]  # every write carries its own id
    assert gcs.download(bucket, STATE_OBJECT) == encode_state(sample_state(1), 1)
    # Released: a tombstone (empty, marked deleted) that reads as absent.
    lock = gcs.metadata(bucket, f"{STATE_OBJECT}.lock")
    assert lock is not None and lock["metadata"][DELETED] == "true" and int(lock["size"]) == 0
    assert store.adapter.read(LOCK) is None and store.adapter.version(LOCK) is None
    with store.exclusive(timeout=0.1):  # created over the tombstone at once, still by CAS
        assert store.adapter.read(LOCK) is not None
    assert store.fingerprint() == t1.version

    # Unreachable: every operation one line, naming the document and the call.
    dead = open_gcs_store(gs_state_url(bucket, STATE_OBJECT, endpoint_url="http://127.0.0.1:9",
                                       max_attempts=1))

    def take_lock() -> None:
        with dead.exclusive():
            raise AssertionError("unreachable")

    calls = {
        "objects.get": dead.load,
        "objects.insert": lambda: dead.commit(State(), None),
        f"objects.get {STATE_OBJECT}.lease (lease)": dead.read_lease,
        f"objects.insert {STATE_OBJECT}.lease (lease)": lambda: dead.write_lease({}, None),
        f"objects.insert {STATE_OBJECT}.lock (lock)": take_lock,
    }
    for operation, call in calls.items():
        with pytest.raises(StoreError) as info:
            call()
        assert str(info.value) == (
            f"state gs://{bucket}/{STATE_OBJECT}: {operation}: cannot connect to 127.0.0.1:9 "
            "(Connection refused; service unreachable)"
        )
    assert dead.fingerprint() is None
    with pytest.raises(StoreError) as info:
        SharedStore(GCSAdapter("no-such-bucket", "k", connection())).commit(State(), None)
    assert str(info.value) == "state gs://no-such-bucket/k: objects.insert: HTTP 404: Not Found"


#: Cloud Storage's answer for an object in a bucket that does not exist (fake-gcs-server
#: says "Not Found" for a missing bucket and a missing object alike).
_NO_BUCKET = json.dumps({"error": {"code": 404, "message": "The specified bucket does not exist.",
                                   "errors": [{"message": "The specified bucket does not exist.",
                                               "domain": "global", "reason": "notFound"}]}})


def test_a_missing_bucket_is_an_error_not_an_absent_object(gcs: GCSServer) -> None:
    """A 404 about the bucket (Cloud Storage says which) is a failure: a mistyped
    bucket must not read as an empty state or an unpublished JWKS."""
    store = SharedStore(GCSAdapter("no-such-bucket", "k", connection()))
    pub = publisher("no-such-bucket")
    assert store.load() == (State(), None)  # the emulator cannot tell: absent

    def as_cloud_storage_says(response: Any, *args: Any, **kwargs: Any) -> None:
        if response.status_code == 404:
            response._content = _NO_BUCKET.encode()

    for component in (store.adapter, pub):
        component.client._http.hooks["response"].insert(0, as_cloud_storage_says)
    with pytest.raises(StoreError) as info:
        store.load()
    assert str(info.value) == (
        "state gs://no-such-bucket/k: objects.get: HTTP 404: The specified bucket does not exist."
    )
    assert store.fingerprint() is None
    with pytest.raises(PublishError) as pinfo:
        pub.read()
    assert str(pinfo.value) == (
        f"publisher cdn: gs://no-such-bucket/{JWKS_OBJECT}: objects.get: HTTP 404: "
        "The specified bucket does not exist."
    )


def test_a_lock_deleted_by_hand_reads_absent_and_tokens_are_generations(
    gcs: GCSServer, bucket: str
) -> None:
    store = SharedStore(adapter(bucket), lock_ttl=TTL, takeover_grace=0.0)
    with store.exclusive():
        pass
    sdk(gcs).bucket(bucket).blob(f"{STATE_OBJECT}.lock").delete()  # the tombstone, by hand
    assert store.adapter.read(LOCK) is None
    with store.exclusive(timeout=0.1):  # created again with ifGenerationMatch=0
        blob = store.adapter.read(LOCK)
        assert blob is not None and isinstance(blob.version, int)
    # A stale or foreign token is a conflict, never a request with a bogus precondition.
    t1 = store.commit(sample_state(1), None)
    for bad in ("1", None, 0, True, str(t1.version)):
        with pytest.raises(ConflictError):
            store.adapter.replace(STATE, b"{}", bad)
    # Deleting what is gone is done; deleting what changed is a conflict.
    store.adapter.delete(LEASE, 12345)
    store.write_lease({"holder": "a"}, None)
    with pytest.raises(ConflictError) as info:
        store.adapter.delete(LEASE, 12345)
    assert str(info.value) == (
        f"state gs://{bucket}/{STATE_OBJECT}: objects.insert {STATE_OBJECT}.lease (lease, "
        "tombstone): HTTP 412: precondition ifGenerationMatch=12345 failed"
    )


#: A bad GCS state URL and its message: a URL parameter is named ``daemon.state?NAME``
#: and worded like every other plug-in option (keymgr.options).
GS_URL_ERRORS = [
    (
        "gs://bucket/state.json?regoin=x",
        "daemon.state?regoin: unknown option (known: "
        "connect_timeout, endpoint_url, lock_ttl, max_attempts, read_timeout)",
    ),
    (
        "gs://bucket/state.json?lock_ttl=1",
        "daemon.state?lock_ttl: must be between 5 and 3600, got 1.0",
    ),
    ("gs://bucket/k?max_attempts=2.5", "daemon.state?max_attempts: expected an integer, got '2.5'"),
    ("gs://bucket/k?read_timeout=a&read_timeout=b", "daemon.state?read_timeout: given twice"),
    (
        "gs://bucket/k?connect_timeout=soon",
        "daemon.state?connect_timeout: expected a number, got 'soon'",
    ),
    (
        "gs://B_AD/state.json",
        "daemon.state: bucket of 'gs://B_AD/state.json': expected a Cloud Storage bucket name, "
        "got 'B_AD'",
    ),
    (
        "gs://bucket/",
        "daemon.state: object name of 'gs://bucket/': expected a non-empty object name, got ''",
    ),
    (
        "gs://bucket//state.json",
        "daemon.state: object name of 'gs://bucket//state.json': object names do not start "
        "with '/' (write 'state.json')",
    ),
    ("gs://bucket/" + "x" * 1020, f"daemon.state: object name of 'gs://bucket/{'x' * 1020}': "
     "object name too long"),
    ("gs:///state.json", "daemon.state: expected gs://BUCKET/OBJECT, got 'gs:///state.json'"),
    ("gs://bucket/k#frag", "daemon.state: 'gs://bucket/k#frag': unexpected '#' fragment"),
    (
        "gs://bucket/k?endpoint_url=ftp://x",
        "daemon.state?endpoint_url: expected an http(s) URL like "
        "'https://storage.googleapis.com', got 'ftp://x'",
    ),
    ("gs://bucket/k?project=p", "daemon.state?project: unknown option (known: connect_timeout, "
     "endpoint_url, lock_ttl, max_attempts, read_timeout)"),
]


def test_open_gcs_store_validates_the_url() -> None:
    url = "gs://bucket/k.json?lock_ttl=60&endpoint_url=https%3A%2F%2Fstorage.example&max_attempts=2"
    store = open_gcs_store(url)
    assert store.url == url and store.location == "gs://bucket/k.json" and store.lock_ttl == 60
    assert isinstance(store.adapter, GCSAdapter)
    assert store.adapter.connection == GCSConnection(
        endpoint_url="https://storage.example", max_attempts=2
    )
    assert open_gcs_store("gs://b.example.com/x").lock_ttl == 30
    for bad, message in GS_URL_ERRORS:
        with pytest.raises(ConfigError) as info:
            open_gcs_store(bad)
        assert str(info.value) == message


LOCAL = {"type": "file", "path": "keys", "master_key_file": "master.key"}
RINGS: dict[str, dict[str, object]] = {"default": {"backend": "local", "algorithm": "ES256"}}


def test_store_url_and_publisher_are_checked_by_config_check(home: Any) -> None:
    """``keymgr config check``: exit 2 and one line naming the file and the field."""
    def check(state: str, pub: dict[str, Any]) -> str:
        write_config(home, state=state, backends={"local": LOCAL},
                     publishers={"cdn": pub}, rings=RINGS)
        proc = run_cli(home, "config", "check")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = error_lines(proc.stderr)
        assert str(home.config) in line and "Traceback" not in proc.stderr, proc.stderr
        return line

    good_pub = gcs_publisher_options("jwks")
    line = check("gs://bucket/state.json?regoin=x", good_pub)
    assert "daemon.state?regoin: unknown option (known: connect_timeout" in line, line
    line = check("gs://B_AD/state.json", good_pub)
    assert "daemon.state: bucket of 'gs://B_AD/state.json'" in line, line
    line = check("gs://bucket/state.json", {**good_pub, "cache_control": "a\nb"})
    assert "publishers.cdn.cache_control: expected a Cache-Control header value" in line, line
    line = check("gs://bucket/state.json", {**good_pub, "object": "/x.json"})
    assert "publishers.cdn.object: object names do not start with '/'" in line, line
    write_config(home, state="gs://bucket/state.json?lock_ttl=60", backends={"local": LOCAL},
                 publishers={"cdn": good_pub}, rings=RINGS)
    proc = run_cli(home, "config", "check")
    assert proc.returncode == 0, proc.stderr


def test_a_retried_upload_that_landed_on_its_first_attempt_is_ours(
    gcs: GCSServer, bucket: str
) -> None:
    """The first attempt lands but its answer is lost (a read timeout); the retry
    then fails its precondition against that very write (412): ours, not a conflict."""
    import requests

    mine, other = adapter(bucket), adapter(bucket)
    session = mine.client._http
    send = session.request
    armed = {"uploads": 0}

    def land_then_time_out(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        response = send(method, url, *args, **kwargs)
        if method == "POST" and "/upload/" in url and armed["uploads"] > 0:
            armed["uploads"] -= 1
            raise requests.exceptions.ReadTimeout("read timed out (injected)")
        return response

    session.request = land_then_time_out
    store = SharedStore(mine, lock_ttl=TTL)
    armed["uploads"] = 1
    token = store.commit(sample_state(1), None)  # ifGenerationMatch=0 landed, the retry got 412
    assert armed["uploads"] == 0
    assert SharedStore(other).load() == (sample_state(1), token)
    armed["uploads"] = 1
    t2 = store.commit(sample_state(2), token)  # ifGenerationMatch=G: the same
    assert SharedStore(other).load() == (sample_state(2), t2)
    # A real conflict on a retried request stays a conflict.
    SharedStore(other).commit(sample_state(3), t2)
    armed["uploads"] = 1
    with pytest.raises(ConflictError):
        store.commit(sample_state(4), t2)
    # Out of attempts: an error naming how many, never a conflict.
    armed["uploads"] = 10
    with pytest.raises(StoreError) as info:
        store.commit(sample_state(5), SharedStore(other).load()[1])
    assert not isinstance(info.value, ConflictError)
    assert str(info.value).endswith(
        "objects.insert: no answer in time (read timeout; service unreachable) (after 3 attempts)"
    ), info.value


def test_the_age_of_a_document_is_on_the_server_clock(gcs: GCSServer, bucket: str) -> None:
    """The age is the response's Date minus the object's ``updated``: shift the Date
    the server sends and the age follows; this machine's clock plays no part."""
    a = adapter(bucket)
    a.create(LOCK, b'{"holder": "x"}')
    blob = a.read(LOCK)
    assert blob is not None and blob.age is not None and 0.0 <= blob.age < 2.0
    time.sleep(1.5)
    blob = a.read(LOCK)
    assert blob is not None and blob.age is not None and 0.4 <= blob.age < 3.5

    def shift_date(response: Any, *args: Any, **kwargs: Any) -> None:
        from email.utils import format_datetime, parsedate_to_datetime

        if "Date" in response.headers:
            later = parsedate_to_datetime(response.headers["Date"]) + timedelta(seconds=100)
            response.headers["Date"] = format_datetime(later, usegmt=True)

    a.client._http.hooks["response"].insert(0, shift_date)
    blob = a.read(LOCK)
    assert blob is not None and blob.age is not None and 100.0 <= blob.age < 104.0, blob.age


def test_calls_into_a_stopped_server_fail_in_one_line_and_recover(
    gcs: GCSServer, bucket: str
) -> None:
    pub = publisher(bucket, **OUTAGE)
    store = SharedStore(adapter(bucket, connect_timeout=1.0, read_timeout=1.0, max_attempts=1),
                        lock_ttl=TTL)
    token = store.commit(sample_state(1), None)
    assert pub.publish(sample_jwks(1)) is True
    with gcs.outage():
        start = time.monotonic()
        for call in (pub.read, lambda: pub.publish(sample_jwks(2)), store.load,
                     lambda: store.commit(sample_state(2), token), store.read_lease):
            with pytest.raises((PublishError, StoreError)) as info:
                call()
            msg = str(info.value)
            assert "\n" not in msg and msg.endswith(
                ": no answer in time (read timeout; service unreachable)"
            ), msg
            assert not isinstance(info.value, ConflictError)
        assert store.fingerprint() is None
        assert time.monotonic() - start < 20
    # The uploads sent into the stopped server were queued in its socket: they land
    # after SIGCONT, answer or no answer. The CAS still holds: whichever state is
    # there, the token from before the outage writes only if nothing landed.
    state, now = store.load()
    assert (state, now) == (sample_state(1), token) or (state, now.number if now else 0) == (
        sample_state(2), 2
    )
    assert pub.read() in (sample_jwks(1), sample_jwks(2))
    assert pub.publish(sample_jwks(3)) is True and pub.read() == sample_jwks(3)
    if now == token:
        assert store.commit(sample_state(3), token).number == 2
    else:
        with pytest.raises(ConflictError):
            store.commit(sample_state(3), token)
        assert store.commit(sample_state(3), now).number == 3


def test_lease_take_over_between_two_processes_on_real_time(gcs: GCSServer, bucket: str) -> None:
    """keymgr.lease.Lease on two stores (two replicas' views) with the wall clock:
    one holder; when it stops renewing, the other takes over after the TTL, and
    the old holder then knows it lost the lease."""
    ttl = timedelta(seconds=2)
    a = Lease(SharedStore(adapter(bucket)), ttl, holder="replica-a")
    b = Lease(SharedStore(adapter(bucket)), ttl, holder="replica-b")
    assert a.acquire(datetime.now(UTC)) is True
    assert b.acquire(datetime.now(UTC)) is False
    assert a.acquire(datetime.now(UTC)) is True  # renewed
    deadline = time.monotonic() + 10
    while not b.acquire(datetime.now(UTC)):  # a crashed: no more renewals
        assert time.monotonic() < deadline, "b never took the lease over"
        time.sleep(0.2)
    assert a.acquire(datetime.now(UTC)) is False
    doc, _ = SharedStore(adapter(bucket)).read_lease()
    assert doc is not None and doc["holder"] == "replica-b"
    b.release()
    assert a.acquire(datetime.now(UTC)) is True


# --------------------------------------------------------------------------- through the CLI



def gcs_home(home: Any, bucket: str, conn: dict[str, Any] | None = None,
             file_publisher: bool = True) -> None:
    """File keys; the state in GCS; the JWKS in GCS (and in a file)."""
    conn = conn or {}
    publishers: dict[str, dict[str, object]] = {
        "cdn": gcs_publisher_options(bucket, **conn),
    }
    if file_publisher:
        publishers["site"] = {"type": "file", "path": "public/.well-known/jwks.json"}
    write_config(
        home,
        state=gs_state_url(bucket, STATE_OBJECT, **conn),
        backends={"local": LOCAL},
        publishers=publishers,
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )


def gcs_state(gcs: GCSServer, bucket: str) -> dict[str, Any]:
    raw = gcs.download(bucket, STATE_OBJECT)
    assert raw is not None
    doc: dict[str, Any] = json.loads(raw)
    return doc


def kids(gcs: GCSServer, bucket: str, *states: str) -> list[str]:
    keys = gcs_state(gcs, bucket)["rings"].get("default", {}).get("keys", [])
    return [k["kid"] for k in keys if k["state"] in states]


def gcs_jwks(gcs: GCSServer, bucket: str) -> dict[str, Any]:
    """The JWKS as the emulator serves it to anyone (plain HTTP, not keymgr's code)."""
    raw = gcs.download(bucket, JWKS_OBJECT)
    assert raw is not None
    doc: dict[str, Any] = json.loads(raw)
    return doc


def check_invariants(home: Any, gcs: GCSServer, bucket: str, ever: set[str]) -> None:
    """One signer; no key lost; the file backend holds the live keys; both JWKS agree."""
    keys = gcs_state(gcs, bucket)["rings"]["default"]["keys"]
    assert len([k for k in keys if k["state"] == "active"]) == 1, keys
    in_state = {k["kid"] for k in keys}
    assert ever <= in_state, ever - in_state
    ever |= in_state
    assert gcs_jwks(gcs, bucket) == json.loads(home.jwks_path.read_text())
    published = {k["kid"] for k in gcs_jwks(gcs, bucket)["keys"]}
    assert published == set(kids(gcs, bucket, "published", "active", "retired")), (published, keys)
    meta = gcs.metadata(bucket, JWKS_OBJECT)
    assert meta is not None and meta["contentType"] == "application/json"
    assert meta["cacheControl"] == "public, max-age=300"


def test_three_concurrent_reconciles_share_one_gcs_store(
    home: Any, gcs: GCSServer, bucket: str
) -> None:
    """Three `keymgr reconcile` processes at once, at each step of a rotation that
    makes or promotes a key: one signer, no key made twice, every transition
    applied once (the generation-match CAS and the pass lock), an intact audit chain."""
    gcs_home(home, bucket)
    ever: set[str] = set()
    token = ""
    for at in (T0, T0 + P - A, T0 + P):
        procs = [
            subprocess.Popen(
                cli_command(home.config, "reconcile", "--at", ts(at)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home.dir,
                env=home.env(),
            )
            for _ in range(3)
        ]
        outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        for rc, out, err in outs:
            assert rc == 0 and "Traceback" not in err, (at, rc, out, err)
        applied = [line for _, out, _ in outs for line in out.splitlines() if " key." in line]
        assert applied and len(applied) == len(set(applied)), applied
        check_invariants(home, gcs, bucket, ever)
        if at == T0:
            token = cli_ok(home, "sign", "default", "--claims", "{}", "--ttl", "1d",
                           "--at", ts(T0 + P - 2 * A))[0]
        verify_token(gcs_jwks(gcs, bucket), token, "ES256")
    assert len(ever) == 2
    assert kids(gcs, bucket, "retired") and kids(gcs, bucket, "active")
    cli_ok(home, "audit", "verify")
    events = [json.loads(line) for line in (home.dir / "audit.jsonl").read_text().splitlines()
              if line.strip()]
    for name in ("key.generated", "key.promoted", "key.retired"):
        per_kid = [e["kid"] for e in events if e["event"] == name]
        assert len(per_kid) == len(set(per_kid)), (name, per_kid)
    assert not [e for e in events if e["event"] in ("key.adopted", "key.orphan_destroyed")]
    # The pass lock was released each time: a tombstone, read as absent.
    assert GCSAdapter(bucket, STATE_OBJECT, connection()).read(LOCK) is None


def test_rotation_end_to_end_through_the_cli(home: Any, gcs: GCSServer, bucket: str) -> None:
    """The gcs publisher and the gs:// store alone: config check, a whole rotation
    (publish, promote, retire, expire, destroy), tokens of both keys verified by
    PyJWT and jwcrypto against the object the emulator serves, at every step."""
    gcs_home(home, bucket, file_publisher=False)
    cli_ok(home, "config", "check")
    cli_ok(home, "reconcile", "--at", ts(T0))
    (first,) = kids(gcs, bucket, "active")
    old = cli_ok(home, "sign", "default", "--claims", '{"sub": "a"}', "--ttl", "1d",
                 "--at", ts(T0 + P - 2 * A))[0]
    assert verify_token(gcs_jwks(gcs, bucket), old, "ES256")["sub"] == "a"
    cli_ok(home, "reconcile", "--at", ts(T0 + P - A))
    (second,) = kids(gcs, bucket, "published")
    assert {k["kid"] for k in gcs_jwks(gcs, bucket)["keys"]} == {first, second}
    cli_ok(home, "reconcile", "--at", ts(T0 + P))
    assert kids(gcs, bucket, "active") == [second]
    new = cli_ok(home, "sign", "default", "--claims", '{"sub": "b"}', "--ttl", "1h",
                 "--at", ts(T0 + P + A))[0]
    jwks = gcs_jwks(gcs, bucket)
    assert verify_token(jwks, new, "ES256")["sub"] == "b"
    assert verify_token(jwks, old, "ES256")["sub"] == "a"  # the old key is still served
    for at in (T0 + P + G, T0 + P + G + D, T0 + P + G + D + A):
        cli_ok(home, "reconcile", "--at", ts(at))
    assert kids(gcs, bucket, "destroyed") == [first]
    assert {k["kid"] for k in gcs_jwks(gcs, bucket)["keys"]} == {second}
    status = run_cli(home, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout), status.stderr
    cli_ok(home, "audit", "verify")
    meta = gcs.metadata(bucket, JWKS_OBJECT)
    assert meta is not None
    assert (meta["contentType"], meta["cacheControl"]) == ("application/json",
                                                          "public, max-age=300")


#: Runs the real CLI, and SIGSTOPs the emulator the moment the GCS publisher is
#: about to upload the JWKS: an outage in the middle of a pass, at an exact request.
_STOP_AT_JWKS_UPLOAD = STOP_DEAD_IMPORT + """
import os, signal
import keymgr.backends.gcp.publisher as gcp_publisher
_write = gcp_publisher.GCSPublisher.write
def write(self, data):
    stop_dead({pid})
    return _write(self, data)
gcp_publisher.GCSPublisher.write = write
"""


def test_server_stopped_in_the_middle_of_a_rotation(
    home: Any, gcs: GCSServer, bucket: str
) -> None:
    """Cloud Storage stops answering mid-pass (successor made, JWKS upload under
    way): exit 1, one line naming the store and the call, no traceback, nothing
    promoted; once it answers again the next passes finish the rotation intact."""
    gcs_home(home, bucket)
    ever: set[str] = set()
    cli_ok(home, "reconcile", "--at", ts(T0))
    (first,) = kids(gcs, bucket, "active")
    token = cli_ok(home, "sign", "default", "--claims", "{}", "--ttl", "1d",
                   "--at", ts(T0 + P - 2 * A))[0]
    jwks_before = gcs_jwks(gcs, bucket)

    gcs_home(home, bucket, {**OUTAGE, "read_timeout": 2})
    try:
        proc = run_cli(home, "reconcile", "--at", ts(T0 + P - A),
                       extra=_STOP_AT_JWKS_UPLOAD.format(pid=gcs.proc.pid))
    finally:
        gcs.resume()
    gcs_home(home, bucket)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    # The publish failed (logged); then committing what did succeed failed: the
    # upload timing out, or, when the outage outlasted the pass lock's TTL, the
    # refusal to write without the lock.
    assert line.startswith(f"keymgr: error: state gs://{bucket}/{STATE_OBJECT}: "), line
    # Or, the audit chain being kept in the store, by reading its head first.
    head_read = f" {STATE_OBJECT}.audit/" in line
    assert "objects.insert: " in line or "pass lock lost" in line or head_read, line
    assert "service unreachable" in line or "not renewed" in line, line
    (second,) = kids(gcs, bucket, "pending")
    assert kids(gcs, bucket, "active") == [first]
    # The JWKS upload sent into the stopped server may land once it resumes (its
    # answer was lost): the old key stays served either way, and the successor
    # is not counted as published until a read-back confirms it.
    served = {k["kid"] for k in gcs_jwks(gcs, bucket)["keys"]}
    assert gcs_jwks(gcs, bucket) == jwks_before or served == {first, second}, served

    # The failed pass could not release its lock in time; the release it sent
    # may have landed after SIGCONT (a tombstone), or not: then this pass waits
    # until the lock is lock_ttl (5 s) old on the server's clock and takes it over.
    resumed = T0 + P - A + timedelta(minutes=5)
    proc = run_cli(home, "reconcile", "--at", ts(resumed))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert kids(gcs, bucket, "published") == [second]
    check_invariants(home, gcs, bucket, ever)
    for at in (resumed + A, resumed + A + G, resumed + A + G + D):
        cli_ok(home, "reconcile", "--at", ts(at))
        check_invariants(home, gcs, bucket, ever)
        if at == resumed + A:
            assert kids(gcs, bucket, "active") == [second]
            verify_token(gcs_jwks(gcs, bucket), token, "ES256")  # the old key's token
    assert kids(gcs, bucket, "destroyed") == [first]
    cli_ok(home, "audit", "verify")


@pytest.fixture
def replicas(home: Any) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_daemon_replicas_lease_take_over_after_sigkill(
    home: Any, gcs: GCSServer, bucket: str, replicas: list[subprocess.Popen[str]]
) -> None:
    """Two `keymgr run` replicas on one gs:// store: one holds the lease (the
    record in OBJECT.lease); SIGKILL it and the other takes the lease over
    within lease_ttl + a heartbeat + 1 s (+3 s for a busy machine); SIGTERM then
    hands the lease back (holder null)."""
    gcs_home(home, bucket)
    text = home.config.read_text().replace(
        'audit_log = "audit.jsonl"',
        'audit_log = "audit.jsonl"\nreconcile_interval = "1s"\nlease_ttl = "3s"\n'
        'listen = "127.0.0.1:0"',
    )
    home.config.write_text(text)
    cli_ok(home, "config", "check")
    lease = GCSAdapter(bucket, STATE_OBJECT, connection())
    for i in range(2):
        log = (home.dir / f"replica{i}.log").open("w")
        replicas.append(subprocess.Popen(cli_command(home.config, "run"), stdout=log,
                                         stderr=subprocess.STDOUT, text=True, cwd=home.dir,
                                         env=home.env(PYTHONUNBUFFERED="1")))
        log.close()

    def holder() -> subprocess.Popen[str] | None:
        blob = lease.read(LEASE)
        if blob is None:
            return None
        doc = json.loads(blob.data)
        pid = int(str(doc.get("holder") or "::").split(":")[1] or 0)
        return next((p for p in replicas if p.pid == pid and p.poll() is None), None)

    def wait_for(pred: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := pred()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)
        return value

    first = wait_for(holder, 30, "a lease holder")
    wait_for(lambda: kids(gcs, bucket, "active") if gcs.metadata(bucket, STATE_OBJECT) else None,
             30, "the first key")
    first.kill()
    killed = time.monotonic()
    first.wait(timeout=10)
    second = wait_for(lambda: (h := holder()) is not None and h is not first and h, 20,
                      "the other replica to take the lease")
    took = time.monotonic() - killed
    assert took <= 3 + 1 + 1 + 3, f"takeover took {took:.1f}s"
    # The killed replica may have died between a commit and its append, and
    # holding the store's pass lock: the new holder appends what it left in the
    # state's outbox once that lock may be taken over (lock_ttl, 5 s here, and
    # its grace). A replica stopped before then leaves it to the next pass
    # ('audit verify' says so), as a stopping daemon does not wait for a lock.
    wait_for(lambda: run_cli(home, "audit", "verify").returncode == 0, 30,
             "the new holder to append what the killed one left in the outbox")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=15) == 0
    blob = lease.read(LEASE)
    assert blob is not None and json.loads(blob.data)["holder"] is None
    assert len(kids(gcs, bucket, "active")) == 1
    cli_ok(home, "audit", "verify")


# --------------------------------------------------------------------------- client


def test_the_emulator_gives_anonymous_credentials_and_no_project(gcs: GCSServer) -> None:
    from google.auth.credentials import AnonymousCredentials

    client = GCSConnection().client()
    assert isinstance(client._credentials, AnonymousCredentials)
    assert client.project is None
    assert gcs.url == client._connection.API_BASE_URL
    assert client._bucket_metadata_cache is None  # no background storage.buckets.get


def test_endpoint_url_wins_over_the_environment(
    gcs: GCSServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    pub = publisher(bucket, endpoint_url=gcs.url)
    assert pub.publish(b"{}") is True and pub.read() == b"{}"
    assert gcs.url == pub.client._connection.API_BASE_URL


def _service_account_file(tmp_path: Path) -> tuple[Path, str]:
    """A service-account key file whose token endpoint is a closed loopback port."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "keymgr-test", "private_key_id": "0123abcd",
        "private_key": pem, "client_email": "keymgr@keymgr-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "http://127.0.0.1:9/token",
    }))
    return path, pem


def test_application_default_credentials_and_no_secret_in_errors(
    gcs: GCSServer, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the emulator the client takes Application Default Credentials
    (here a service-account file, whose token endpoint does not answer): the
    failure is one line naming the token service, with nothing of the key."""
    from google.oauth2 import service_account

    path, pem = _service_account_file(tmp_path)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    pub = publisher(bucket, endpoint_url=gcs.url, max_attempts=1)
    assert isinstance(pub.client._credentials, service_account.Credentials)
    with pytest.raises(PublishError) as info:
        pub.read()
    msg = str(info.value)
    assert msg.startswith(f"publisher cdn: gs://{bucket}/{JWKS_OBJECT}: objects.get: "), msg
    assert "\n" not in msg and "token" in msg, msg
    for secret in (pem.splitlines()[1][:20], "0123abcd", "PRIVATE KEY"):
        assert secret not in msg, msg


def test_gcs_reason_is_one_line_and_redacted() -> None:
    import requests
    from google.api_core.exceptions import Forbidden, TooManyRequests
    from google.auth.exceptions import RefreshError

    denied = Forbidden(
        "GET https://storage.googleapis.com/storage/v1/b/x/o/y: keymgr@p.iam.gserviceaccount"
        ".com does not have storage.objects.get access to the Google Cloud Storage object.\n"
        "Authorization: Bearer ya29.a0AfH6SMBx-secret-token"
    )
    reason = gcs_reason(denied)
    assert reason.startswith("HTTP 403: keymgr@p.iam.gserviceaccount.com does not have "
                             "storage.objects.get access"), reason
    assert "ya29" not in reason and "\n" not in reason
    assert gcs_reason(TooManyRequests("GET u: rate limit"), 5) == (
        "HTTP 429: rate limit (after 5 attempts)"
    )
    refresh = RefreshError(
        "invalid_grant: Invalid JWT Signature.",
        {"error": "invalid_grant", "assertion": "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJrIn0.c2ln",
         "access_token": "ya29.leaked"},
    )
    assert gcs_reason(refresh) == (
        "credentials refresh failed: invalid_grant: Invalid JWT Signature."
    )
    echoed = requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='oauth2.googleapis.com', port=443): Max retries exceeded "
        "(Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f>: "
        "Failed to establish a new connection: [Errno 111] Connection refused'))"
    )
    assert gcs_reason(echoed) == (
        "cannot connect to oauth2.googleapis.com:443 (Connection refused; service unreachable)"
    )
    leaky = ValueError('token: {"access_token": "ya29.abc", "refresh_token": "1//0gabcdefghij'
                       'klmnopqrstuvwxyz", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE"}')
    text = gcs_reason(leaky)
    for secret in ("ya29.abc", "1//0gabc", "MIIE", "BEGIN PRIVATE"):
        assert secret not in text, text
    failed = CallFailed(requests.exceptions.ReadTimeout("x"), 3)
    assert failed.reason() == (
        "no answer in time (read timeout; service unreachable) (after 3 attempts)"
    )
    assert len(gcs_reason(ValueError("x" * 1000))) <= 240


def test_without_the_sdk_installed_one_line(home: Any) -> None:
    """Without the ``gcp`` extra: config check passes (no SDK needed), a command
    that reaches Cloud Storage fails in one line saying what to install."""
    gcs_home(home, "jwks-bucket")
    hide = "import sys\nsys.modules['google.cloud.storage'] = None\n"
    assert run_cli(home, "config", "check", extra=hide).returncode == 0
    proc = run_cli(home, "status", extra=hide)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert error_lines(proc.stderr) == [
        f"keymgr: error: state gs://jwks-bucket/{STATE_OBJECT}: create client: "
        "google-cloud-storage is not installed (pip install 'keymgr[gcp]')"
    ], proc.stderr


def test_connection_options() -> None:
    o = Options({"endpoint_url": "https://storage.example", "connect_timeout": 1,
                 "read_timeout": 2.5, "max_attempts": 1}, "publishers.cdn",
                ("endpoint_url", "connect_timeout", "read_timeout", "max_attempts"))
    assert parse_connection(o) == GCSConnection("https://storage.example", 1.0, 2.5, 1)
    assert GCSConnection().timeout == (5.0, 10.0) and GCSConnection().max_attempts == 5


def test_config_check_never_imports_the_sdk(home: Any) -> None:
    """Constructors and URL factories do no I/O and import nothing of Google's:
    ``keymgr config check`` on a GCS config stays offline and fast."""
    gcs_home(home, "jwks-bucket")
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('SDK', sorted(m for m in sys.modules "
        "if m.startswith(('google', 'requests')))))\n"
    )
    proc = run_cli(home, "config", "check", extra=probe)
    assert proc.returncode == 0, proc.stderr
    assert "SDK []" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- least privilege

#: Each call of google-cloud-storage in backends/gcp/ and the permissions it needs.
#: ``upload_from_string``: objects.insert, which also needs storage.objects.delete
#: when an object of that name exists ("to replace an existing object, both
#: storage.objects.create and storage.objects.delete are required").
GCS_CALL_PERMISSIONS = {
    "reload": {"storage.objects.get"},  # Blob.reload: objects.get, metadata (projection=noAcl)
    "download_as_bytes": {"storage.objects.get"},
    "upload_from_string": {"storage.objects.create", "storage.objects.delete"},
    "list_blobs": {"storage.objects.list"},  # objects.list: the sweep of orphaned shards
    "delete": {"storage.objects.delete"},  # objects.delete: collected shards, for good
}
#: Calls of the library that would need more (the test fails if the code makes one).
_OTHER_CALLS = re.compile(
    r"\.(get_blob|exists|patch|update|rewrite|compose|get_bucket|lookup_bucket"
    r"|create_bucket|make_public|get_iam_policy|set_iam_policy|download_to_\w+|upload_from_"
    r"(?:file|filename)|open)\("
)


def _role() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "gcp" / "keymgr-role.yaml").read_text())
    return doc


def test_role_grants_exactly_what_the_code_calls() -> None:
    """deploy/gcp/keymgr-role.yaml: what ``gcloud iam roles create --file`` takes,
    and exactly the permissions of the calls found in the source (a new call fails here)."""
    role = _role()
    assert set(role) == {"title", "description", "stage", "includedPermissions"}
    assert role["stage"] == "GA" and role["title"] and len(role["title"]) <= 100
    granted = role["includedPermissions"]
    assert granted == sorted(set(granted)) and all(
        re.fullmatch(r"storage\.objects\.[a-z]+", p) for p in granted
    ), granted
    source = "".join(
        (REPO / "backends" / "gcp" / name).read_text()
        for name in ("client.py", "publisher.py", "store.py")
    )
    calls = set(
        re.findall(r"\.(reload|download_as_bytes|upload_from_string|list_blobs|delete)\(", source)
    )
    assert calls == set(GCS_CALL_PERMISSIONS), calls
    assert not _OTHER_CALLS.findall(source), _OTHER_CALLS.findall(source)
    needed = set().union(*GCS_CALL_PERMISSIONS.values())
    assert set(granted) == needed, (set(granted) ^ needed)


def _permissions(method: str, path: str, query: dict[str, list[str]]) -> set[str]:
    """The IAM permissions of one JSON API request (the Cloud Storage IAM reference)."""
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/o/.+", path):
        # objects.get, metadata; without ACLs (projection=full would need getIamPolicy)
        assert query.get("projection") == ["noAcl"], query
        return {"storage.objects.get"}
    if method == "GET" and re.fullmatch(r"/download/storage/v1/b/[^/]+/o/.+", path):
        assert query.get("alt") == ["media"], query
        return {"storage.objects.get"}  # objects.get, media
    if method == "POST" and re.fullmatch(r"/upload/storage/v1/b/[^/]+/o", path):
        if query.get("ifGenerationMatch") == ["0"]:
            return {"storage.objects.create"}  # creates only: never replaces
        return {"storage.objects.create", "storage.objects.delete"}  # may replace
    if method == "DELETE" and re.fullmatch(r"/storage/v1/b/[^/]+/o/.+", path):
        assert "ifGenerationMatch" in query and ".shards/" in path, (path, query)
        return {"storage.objects.delete"}  # a collected shard, for good
    if method == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/o", path):
        assert query.get("prefix", [""])[0].endswith(".shards/"), query  # keymgr's own only
        return {"storage.objects.list"}
    raise AssertionError(f"a request no permission of the role covers: {method} {path} {query}")


def test_every_request_maps_to_a_permission_of_the_role(gcs: GCSServer, bucket: str) -> None:
    """Every request the publisher and the store send in a full round (publish,
    read back, commit, lock and release, lease, fingerprint) maps to the role's
    permissions, and each permission of the role is used: none too few, none too many.
    No bucket-level request at all (the library's bucket-metadata lookup is off)."""
    pub, store = publisher(bucket), SharedStore(adapter(bucket), lock_ttl=TTL)
    rec = Recorder(pub, store.adapter)
    pub.publish(sample_jwks(1))
    pub.publish(sample_jwks(2))
    with store.exclusive():
        t1 = store.commit(sample_state(1), None)
        store.commit(sample_state(2), t1)
    with store.exclusive():
        store.load()
    _, token = store.read_lease()
    token = store.write_lease({"holder": "a"}, token)
    store.write_lease({"holder": "a"}, token)
    store.fingerprint()
    assert store.adapter.names("shards") == []  # the orphan sweep's listing
    time.sleep(0.5)  # anything a background thread of the library would send
    used = set().union(*(_permissions(*r) for r in rec.requests))
    assert used == set(_role()["includedPermissions"]), used
    assert not [r for r in rec.requests if re.fullmatch(r"/storage/v1/b/[^/]+", r[1])]
    # The server saw nothing else either (no request outside this client's session).
    logged = [line for line in gcs.requests_logged() if f"/b/{bucket}" in line]
    assert len(logged) == len(rec.requests), (logged, rec.requests)
