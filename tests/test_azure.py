"""Azure Blob Storage: the ``azblob`` publisher and the ``azblob://`` state store, on Azurite.

Everything here runs against a real Azurite blob server (``tests/servers_azurite.py``:
one per xdist worker, on a free loopback port, installed from npm on first
use), with the development account ``devstoreaccount1`` and its published key.
Azurite enforces ``If-Match`` and ``If-None-Match: *`` on Put Blob and Delete
Blob, so the compare-and-swap is the server's, not a mock's.

- Conformance: ``PublisherTests`` for the publisher (loaded by its type name
  through ``keymgr.plugins``), ``SharedStoreTests`` for the adapter (CAS between
  "processes", the pass lock and its take-over on the store's clock, the lease),
  also with nothing but a container SAS granting exactly the custom role's data
  actions, and ``StoreTests`` for the store opened from its URL.
- The publisher's own rules: Cache-Control and Content-Type written, read
  back, served to an anonymous HTTP client, and rewritten when changed.
- The adapter's own rules: the blobs and their messages, a retried write that
  landed on its first attempt, a delete of an absent blob, ages from the
  service's clock.
- Through the real CLI: three ``keymgr reconcile`` processes at once at every
  step of a rotation; Azurite stopped in the middle of a pass (one line, exit
  1, recovery); two daemons and a lease take-over after SIGKILL; a whole
  rotation with tokens verified by PyJWT and jwcrypto against the blob as an
  anonymous verifier fetches it.
- Validation: every bad URL parameter or option is one line naming
  ``daemon.state?PARAM`` or ``publishers.NAME.FIELD``; no credential ever
  appears in an error, in the CLI's output, in the daemon's log or in the
  library logs (the account key and the SAS signature are grepped for).
- Least privilege: ``deploy/azure/keymgr-role.json`` grants exactly the data
  actions of the SDK calls the code makes (found in the source).

Until pyproject.toml registers the entry points, the autouse fixture below
adds ``azblob`` to ``keymgr.plugins.BUILTIN`` for each test, and CLI
subprocesses run through ``tests.servers_azurite.keymgr_command``, which does
the same in the child (both are no-ops once registered).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from keymgr.backends.azure.client import (
    AzureConnection,
    AzureSetupError,
    parse_connection_string,
)
from keymgr.backends.azure.publisher import AzureBlobPublisher
from keymgr.backends.azure.store import AzureBlobAdapter, open_azblob_store
from keymgr.backends.local.keys import FileBackend

from keymgr.docstore import LEASE, LOCK, STATE, SharedStore, encode_state
from keymgr.errors import ConfigError, ConflictError, PublishError, StoreError
from keymgr.model import State
from keymgr.plugins import publisher_class
from keymgr.publishers import Publisher, Served
from keymgr.stores import StateStore, check_state_url, open_store
from keymgr.testing.conformance import PublisherTests, StoreTests, sample_jwks
from keymgr.testing.docstore import DocHarness, SharedStoreTests, sample_state
from tests import servers_azurite
from tests.conftest import T0, A, D, G, P
from tests.servers_azurite import (
    ACCOUNT,
    ACCOUNT_KEY,
    AzuriteServer,
    keymgr_command,
    register_plugins,
)
from tests.servers_common import STOP_DEAD_IMPORT
from tests.servers_moto import error_lines, ts, verify_token, write_config

# The fixtures (until tests/conftest.py lists tests.servers_azurite in pytest_plugins).
azurite_server = servers_azurite.azurite_server
azurite = servers_azurite.azurite

REPO = Path(__file__).resolve().parent.parent
#: Several times the 1 s resolution of HTTP dates plus a request's latency.
TTL = 2.5
#: Test timeouts: shorter than the defaults (5 s, 10 s, 5 attempts).
FAST = {"connect_timeout": 2, "read_timeout": 5, "max_attempts": 3}
JWKS_BLOB = ".well-known/jwks.json"
STATE_BLOB = "keymgr/state.json"


@pytest.fixture(autouse=True)
def _azblob_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    register_plugins(monkeypatch)


def connection(**options: Any) -> AzureConnection:
    """The dev account through $AZURE_STORAGE_CONNECTION_STRING, with the test timeouts."""
    return AzureConnection(
        account=ACCOUNT, auth="connection_string",
        **{"connect_timeout": 2.0, "read_timeout": 5.0, "max_attempts": 3, **options},
    )  # fmt: skip


def state_url(container: str, blob: str = STATE_BLOB, **params: Any) -> str:
    from urllib.parse import urlencode

    query = {"auth": "connection_string", **FAST, "lock_ttl": 5, **params}
    return f"azblob://{ACCOUNT}/{container}/{blob}?{urlencode(query)}"


def publisher_options(container: str, **options: Any) -> dict[str, Any]:
    return {"type": "azblob", "container": container, "blob": JWKS_BLOB,
            "auth": "connection_string", **FAST, **options}  # fmt: skip


def make_publisher(options: dict[str, Any], config_dir: Path, name: str = "azure") -> Publisher:
    """As ``[publishers.NAME]`` makes it: the class by type name, then the table."""
    cls = publisher_class("azblob", f"publishers.{name}.type (azblob)")
    return cls(name, options, str(config_dir))


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    """An anonymous GET, as a verifier or a CDN fetches a public blob."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


#: The data actions of the custom role, and the container SAS permission of each.
ROLE = REPO / "deploy" / "azure" / "keymgr-role.json"
#: blobs/read covers Get Blob and List Blobs in Azure RBAC; a SAS has a letter for each.
_SAS_LETTER = {"read": "rl", "write": "w", "delete": "d", "add/action": "a", "create": "c"}


def role_sas_permission() -> str:
    """The container SAS permission letters matching the role's blob data actions."""
    prefix = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/"
    actions = json.loads(ROLE.read_text())["DataActions"]
    return "".join(_SAS_LETTER[a.removeprefix(prefix)] for a in actions)


# --------------------------------------------------------------------------- conformance


class TestAzureBlobPublisher(PublisherTests):
    """Connection string from the environment, and from a mode-0600 file."""

    @pytest.fixture(params=["env", "file"])
    def publisher(
        self, request: pytest.FixtureRequest, azurite: AzuriteServer, tmp_path: Path
    ) -> Publisher:
        options = publisher_options(azurite.new_container("pub"))
        if request.param == "file":
            write_secret(tmp_path / "azure.conn", azurite.connection_string)
            del options["auth"]  # implied by connection_string_file
            options["connection_string_file"] = "azure.conn"  # relative to the config
        return make_publisher(options, tmp_path)


class TestAzureBlobAdapter(SharedStoreTests):
    @pytest.fixture
    def harness(self, azurite: AzuriteServer) -> DocHarness:
        container = azurite.new_container("docs")
        conn = connection()
        return DocHarness(
            factory=lambda: AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, conn),
            lock_ttl=TTL, resolution=1.0,
        )  # fmt: skip


class TestAzureBlobAdapterLeastPrivilege(SharedStoreTests):
    """The same, authenticated by nothing but a container SAS granting exactly the
    permissions of ``deploy/azure/keymgr-role.json``'s data actions (read and
    list, write, delete): Azurite enforces SAS permissions, so a call needing
    more fails here."""

    @pytest.fixture
    def harness(self, azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> DocHarness:
        container = azurite.new_container("sas")
        sas = azurite.sas_connection_string(container, role_sas_permission())
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", sas)
        conn = connection()
        return DocHarness(
            factory=lambda: AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, conn),
            lock_ttl=TTL, resolution=1.0,
        )  # fmt: skip


def test_azurite_enforces_sas_permissions(
    azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes the least-privilege run above mean something: a SAS without ``d``
    cannot release the pass lock, one without ``w`` cannot write at all."""
    container = azurite.new_container("perm")
    adapter = AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, connection())
    version = adapter.create(LOCK, b"{}")
    where = f"state {adapter.location}"
    for permission, call, operation in [
        ("rw", lambda a: a.delete(LOCK, version), f"DeleteBlob {STATE_BLOB}.lock (lock)"),
        ("r", lambda a: a.create(STATE, b"{}"), "PutBlob"),
    ]:
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING", azurite.sas_connection_string(container, permission)
        )
        limited = AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, connection())
        with pytest.raises(StoreError) as info:
            call(limited)
        assert not isinstance(info.value, ConflictError)
        assert str(info.value).startswith(f"{where}: {operation}: HTTP 403 "), str(info.value)
    assert adapter.read(LOCK) is not None


class TestAzureBlobStoreFromURL(StoreTests):
    @pytest.fixture
    def store(self, azurite: AzuriteServer, tmp_path: Path) -> StateStore:
        url = state_url(azurite.new_container("url"))
        return open_store(check_state_url(url, tmp_path))


# --------------------------------------------------------------------------- publisher


def test_publisher_writes_headers_and_reads_them_back(
    azurite: AzuriteServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = azurite.new_container("jwks", public=True)
    pub = make_publisher(publisher_options(container, cache_control="public, max-age=60"),
                         tmp_path)
    assert pub.where == f"publisher azure: azblob:{container}/{JWKS_BLOB}"
    doc = sample_jwks(1)
    assert pub.publish(doc) is True
    want = {"Content-Type": "application/json", "Cache-Control": "public, max-age=60"}
    assert pub.fetch() == Served(doc, want)
    # Stored as the blob's properties ...
    props = azurite.service().get_blob_client(container, JWKS_BLOB).get_blob_properties()
    assert props.content_settings.content_type == "application/json"
    assert props.content_settings.cache_control == "public, max-age=60"
    # ... and served as headers to an anonymous client (a verifier, a CDN's origin fetch).
    status, headers, body = http_get(f"{azurite.url}/{container}/{JWKS_BLOB}")
    assert (status, body) == (200, doc)
    assert headers["cache-control"] == "public, max-age=60"
    assert headers["content-type"] == "application/json"

    # Unchanged: no upload.
    uploads: list[int] = []
    write = pub.write
    monkeypatch.setattr(pub, "write", lambda data: (uploads.append(1), write(data))[1])
    assert pub.publish(doc) is False and uploads == []
    # A changed cache_control reaches the blob although the keys did not change.
    pub2 = make_publisher(publisher_options(container, cache_control="public, max-age=30"),
                          tmp_path)
    assert pub2.publish(doc) is True
    assert http_get(f"{azurite.url}/{container}/{JWKS_BLOB}")[1]["cache-control"] == (
        "public, max-age=30"
    )
    # Properties edited out of band (a portal click): a different document, rewritten.
    from azure.storage.blob import ContentSettings

    azurite.service().get_blob_client(container, JWKS_BLOB).set_http_headers(
        ContentSettings(content_type="text/plain", cache_control="no-store")
    )
    got = pub2.fetch()
    assert got is not None and got.body == doc
    assert got.headers == {"Content-Type": "text/plain", "Cache-Control": "no-store"}
    assert pub2.publish(doc) is True
    assert pub2.fetch() == Served(doc, pub2.headers())


def test_publish_counts_only_what_is_read_back(
    azurite: AzuriteServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload that did not land, or landed with other headers, is not a publish."""
    container = azurite.new_container("jwks")
    pub = make_publisher(publisher_options(container), tmp_path)
    assert isinstance(pub, AzureBlobPublisher)
    where = f"publisher azure: azblob:{container}/{JWKS_BLOB}"
    monkeypatch.setattr(pub, "write", lambda data: None)  # "succeeded", wrote nothing
    with pytest.raises(PublishError) as info:
        pub.publish(sample_jwks(1))
    assert str(info.value) == f"{where}: read-back: object missing"
    monkeypatch.undo()
    register_plugins(monkeypatch)

    from azure.storage.blob import ContentSettings

    def wrong_headers(data: bytes) -> None:  # a proxy that strips Cache-Control
        pub.access.handle(JWKS_BLOB).upload_blob(
            data, overwrite=True, content_settings=ContentSettings(content_type="application/json")
        )

    monkeypatch.setattr(pub, "write", wrong_headers)
    with pytest.raises(PublishError) as info:
        pub.publish(sample_jwks(2))
    assert str(info.value) == f"{where}: read-back: served with Cache-Control None"


def test_publisher_picks_up_a_rotated_credential(azurite: AzuriteServer, tmp_path: Path) -> None:
    """A 403 drops the client: the next call reads the connection string file again."""
    container = azurite.new_container("jwks")
    wrong = azurite.connection_string.replace(ACCOUNT_KEY, "A" * 86 + "==")
    conn_file = write_secret(tmp_path / "azure.conn", wrong)
    options = publisher_options(container, connection_string_file=str(conn_file))
    del options["auth"]
    pub = make_publisher(options, tmp_path)
    with pytest.raises(PublishError) as info:
        pub.publish(sample_jwks(1))
    msg = str(info.value)
    where = f"publisher azure: azblob:{container}/{JWKS_BLOB}"
    assert msg.startswith(f"{where}: GetBlob: HTTP 403 "), msg
    assert "\n" not in msg and "A" * 20 not in msg
    write_secret(conn_file, azurite.connection_string)  # the operator fixes the file
    assert pub.publish(sample_jwks(1)) is True


# --------------------------------------------------------------------------- store adapter


def test_store_blobs_and_messages(azurite: AzuriteServer) -> None:
    container = azurite.new_container("state")
    store = SharedStore(AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, connection()),
                        lock_ttl=TTL)
    store.commit(sample_state(1), None)
    store.write_lease({"holder": "a"}, None)
    svc = azurite.service()
    with store.exclusive():
        names = {b.name for b in svc.get_container_client(container).list_blobs()}
        assert names == {STATE_BLOB, f"{STATE_BLOB}.lock", f"{STATE_BLOB}.lease"}
        props = svc.get_blob_client(container, f"{STATE_BLOB}.lock").get_blob_properties()
        assert props.content_settings.content_type == "application/json"
    assert svc.get_blob_client(container, STATE_BLOB).download_blob().readall() == (
        encode_state(sample_state(1), 1)
    )
    assert svc.get_blob_client(container, f"{STATE_BLOB}.lock").exists() is False  # released

    # Unreachable: every operation one line, named by the blob service's operation.
    dead = open_azblob_store(
        f"azblob://{ACCOUNT}/{container}/{STATE_BLOB}?endpoint=http://127.0.0.1:9/{ACCOUNT}"
        "&auth=connection_string&max_attempts=1"
    )

    def take_lock() -> None:
        with dead.exclusive():
            raise AssertionError("unreachable")

    calls = {
        "GetBlob": dead.load,
        "PutBlob": lambda: dead.commit(State(), None),
        f"GetBlob {STATE_BLOB}.lease (lease)": dead.read_lease,
        f"PutBlob {STATE_BLOB}.lease (lease)": lambda: dead.write_lease({}, None),
        f"PutBlob {STATE_BLOB}.lock (lock)": take_lock,
    }
    where = f"state azblob://{ACCOUNT}/{container}/{STATE_BLOB}"
    for operation, call in calls.items():
        with pytest.raises(StoreError) as info:
            call()
        assert str(info.value) == (
            f"{where}: {operation}: cannot connect to http://127.0.0.1:9/{ACCOUNT} "
            "(Connection refused)"
        )
    assert dead.fingerprint() is None
    # A missing container is an error, never an empty state.
    gone = SharedStore(AzureBlobAdapter(ACCOUNT, "no-such-container", "k", connection()))
    with pytest.raises(StoreError) as info:
        gone.load()
    assert str(info.value) == (
        f"state azblob://{ACCOUNT}/no-such-container/k: GetBlob: HTTP 404 ContainerNotFound: "
        "The specified container does not exist."
    )


def test_delete_is_conditional_and_absent_is_done(azurite: AzuriteServer) -> None:
    """Azurite answers If-Match on an absent blob with 412 (RFC 9110), S3 with 404:
    the adapter makes both "absent: done", and a changed blob a ConflictError."""
    adapter = AzureBlobAdapter(ACCOUNT, azurite.new_container("del"), STATE_BLOB, connection())
    v1 = adapter.create(LOCK, b'{"n": 1}')
    v2 = adapter.replace(LOCK, b'{"n": 2}', v1)
    assert v2 != v1
    with pytest.raises(ConflictError) as info:
        adapter.delete(LOCK, v1)
    assert str(info.value) == (
        f"state {adapter.location}: DeleteBlob {STATE_BLOB}.lock (lock): ConditionNotMet"
    )
    adapter.delete(LOCK, v2)
    assert adapter.read(LOCK) is None and adapter.version(LOCK) is None
    adapter.delete(LOCK, v2)  # absent: done
    with pytest.raises(ConflictError):  # replace of an absent blob
        adapter.replace(LOCK, b"{}", v2)
    with pytest.raises(ConflictError) as info:  # create over an existing one
        adapter.create(STATE, b"{}")
        adapter.create(STATE, b"{}")
    assert str(info.value) == f"state {adapter.location}: PutBlob: BlobAlreadyExists"


def test_same_bytes_get_a_new_etag(azurite: AzuriteServer) -> None:
    """The version token changes with every write, also of identical bytes (Azure's
    ETag is not a content hash); the store does not rely on it, but may."""
    adapter = AzureBlobAdapter(ACCOUNT, azurite.new_container("etag"), STATE_BLOB, connection())
    v1 = adapter.create(LEASE, b"same")
    v2 = adapter.replace(LEASE, b"same", v1)
    assert v1 != v2 and adapter.version(LEASE) == v2


def test_age_is_measured_on_the_service_clock(
    azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Date`` minus ``Last-Modified``, both from the blob service: this machine's
    clock moved a day does not change it."""
    adapter = AzureBlobAdapter(ACCOUNT, azurite.new_container("age"), STATE_BLOB, connection())
    adapter.create(LOCK, b"{}")
    blob = adapter.read(LOCK)
    assert blob is not None and blob.age is not None and 0 <= blob.age <= 1.5
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86400)
    time.sleep(2.1)
    blob = adapter.read(LOCK)
    assert blob is not None and blob.age is not None and 1 <= blob.age <= 4, blob.age


def test_a_retried_request_that_landed_on_its_first_attempt_is_ours(
    azurite: AzuriteServer,
) -> None:
    """The first attempt lands but its answer is lost; the SDK's retry then loses to
    it (409 / 412): the adapter sees its own bytes and reports success."""
    from azure.core.exceptions import ServiceResponseError

    container = azurite.new_container("retry")
    adapter = AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, connection())
    other = AzureBlobAdapter(ACCOUNT, container, STATE_BLOB, connection())
    adapter.access.handle(STATE_BLOB)  # the client exists: wrap its transport
    transport = adapter.access._client._pipeline._transport
    send = transport.send
    armed = {"PUT": 0}

    def land_then_lose(request: Any, **kwargs: Any) -> Any:
        response = send(request, **kwargs)
        if request.method == "PUT" and armed["PUT"] > 0:
            armed["PUT"] -= 1
            raise ServiceResponseError("injected: the answer was lost")
        return response

    transport.send = land_then_lose
    store = SharedStore(adapter, lock_ttl=TTL)
    armed["PUT"] = 1
    token = store.commit(sample_state(1), None)  # If-None-Match: * landed, the retry got 409
    assert armed["PUT"] == 0
    assert SharedStore(other).load() == (sample_state(1), token)
    armed["PUT"] = 1
    t2 = store.commit(sample_state(2), token)  # If-Match: the same (412 on the retry)
    assert SharedStore(other).load() == (sample_state(2), t2)
    # A real conflict on a retried request stays a conflict.
    SharedStore(other).commit(sample_state(3), t2)
    armed["PUT"] = 1
    with pytest.raises(ConflictError):
        store.commit(sample_state(4), t2)


def test_outage_errors_are_one_line_and_recover(
    azurite: AzuriteServer, tmp_path: Path
) -> None:
    """Azurite SIGSTOPped: the store and the publisher fail within their timeouts, one
    line each; SIGCONT: the same objects work again."""
    container = azurite.new_container("outage")
    quick = {"connect_timeout": 1, "read_timeout": 1, "max_attempts": 2}
    store = open_azblob_store(state_url(container, **quick))
    pub = make_publisher(publisher_options(container, **quick), tmp_path)
    token = store.commit(sample_state(1), None)
    assert pub.publish(sample_jwks(1)) is True
    where = f"state azblob://{ACCOUNT}/{container}/{STATE_BLOB}"
    timed_out = f"no answer from {azurite.url} within 1s (timed out) (after 2 attempts)"
    with azurite.outage():
        start = time.monotonic()
        with pytest.raises(StoreError) as info:
            store.load()
        assert str(info.value) == f"{where}: GetBlob: {timed_out}"
        with pytest.raises(StoreError) as info:
            store.commit(sample_state(2), token)
        assert str(info.value) == f"{where}: PutBlob: {timed_out}"
        assert not isinstance(info.value, ConflictError)
        with pytest.raises(PublishError) as info:
            pub.publish(sample_jwks(2))
        assert str(info.value) == (
            f"publisher azure: azblob:{container}/{JWKS_BLOB}: GetBlob: {timed_out}"
        )
        assert store.fingerprint() is None
        assert time.monotonic() - start < 40
    # The requests queued in the stopped server are served after SIGCONT, so the
    # commit whose answer was lost may land, even after a read: a later commit
    # then conflicts, re-reads and goes on from what is stored, as a pass does.
    for _ in range(10):
        state, now = store.load()
        assert state in (sample_state(1), sample_state(2)) and now is not None
        try:
            store.commit(sample_state(3), now)
            break
        except ConflictError:
            time.sleep(0.5)
    assert store.load()[0] == sample_state(3)
    assert pub.publish(sample_jwks(2)) is True


# --------------------------------------------------------------------------- validation


#: A bad state URL and its message: one line naming daemon.state (?PARAM for a parameter).
URL_ERRORS = [
    ("azblob://", "daemon.state: expected azblob://ACCOUNT/CONTAINER/BLOB, got 'azblob://'"),
    (
        "azblob://Bad_Account/c0n/state.json",
        "daemon.state: account of 'azblob://Bad_Account/c0n/state.json': expected a storage "
        "account name (3-24 lower-case letters and digits), got 'Bad_Account'",
    ),
    (
        "azblob://acct/Jwks/state.json",
        "daemon.state: container of 'azblob://acct/Jwks/state.json': expected a container name "
        "(3-63 lower-case letters, digits and single hyphens), got 'Jwks'",
    ),
    (
        "azblob://acct/a--b/state.json",
        "daemon.state: container of 'azblob://acct/a--b/state.json': expected a container name "
        "(3-63 lower-case letters, digits and single hyphens), got 'a--b'",
    ),
    (
        "azblob://acct/keymgr",
        "daemon.state: blob name of 'azblob://acct/keymgr': expected a non-empty blob name, got ''",
    ),
    (
        "azblob://acct/keymgr/state/",
        "daemon.state: blob name of 'azblob://acct/keymgr/state/': a blob name must not end "
        "with '.' or '/', got 'state/'",
    ),
    (
        "azblob://acct/keymgr/s.json?regoin=x",
        "daemon.state?regoin: unknown option (known: auth, connect_timeout, "
        "connection_string_env, connection_string_file, endpoint, lock_ttl, max_attempts, "
        "read_timeout)",
    ),
    (
        "azblob://acct/keymgr/s.json?lock_ttl=1",
        "daemon.state?lock_ttl: must be between 5 and 3600, got 1.0",
    ),
    (
        "azblob://acct/keymgr/s.json?max_attempts=2.5",
        "daemon.state?max_attempts: expected an integer, got '2.5'",
    ),
    ("azblob://acct/keymgr/s.json?auth=a&auth=b", "daemon.state?auth: given twice"),
    (
        "azblob://acct/keymgr/s.json?auth=password",
        "daemon.state?auth: expected one of connection_string, default, got 'password'",
    ),
    (
        "azblob://acct/keymgr/s.json?endpoint=ftp://x",
        "daemon.state?endpoint: expected an http(s) URL like "
        "'https://ACCOUNT.blob.core.windows.net', got 'ftp://x'",
    ),
    (
        "azblob://acct/keymgr/s.json?endpoint=https%3A%2F%2Fother.blob.core.windows.net",
        "daemon.state?endpoint: is for account 'other', not 'acct'",
    ),
    (
        "azblob://acct/keymgr/s.json?endpoint=https%3A%2F%2Facct.blob.core.windows.net%3Fsv%3D1",
        "daemon.state?endpoint: must not carry a query or user info (a SAS token there would "
        "sit in the config file); use auth = 'connection_string' with a SharedAccessSignature",
    ),
    (
        "azblob://acct/keymgr/s.json?connection_string=DefaultEndpointsProtocol%3Dhttps",
        "daemon.state?connection_string: a literal credential is refused (it would sit in the "
        "config file and in backups); use connection_string_file or "
        "$AZURE_STORAGE_CONNECTION_STRING",
    ),
    (
        "azblob://acct/keymgr/s.json?account_key=c2VjcmV0",
        "daemon.state?account_key: a literal credential is refused (it would sit in the "
        "config file and in backups); use connection_string_file or "
        "$AZURE_STORAGE_CONNECTION_STRING",
    ),
    (
        "azblob://acct/keymgr/s.json?auth=default&connection_string_env=X",
        "daemon.state?connection_string_env: only with auth = 'connection_string'",
    ),
    (
        "azblob://acct/keymgr/s.json?connection_string_env=X&connection_string_file=/f",
        "daemon.state?connection_string_file: give connection_string_file or "
        "connection_string_env, not both",
    ),
    (
        "azblob://acct/keymgr/s.json?connection_string_file=rel/conn",
        "daemon.state?connection_string_file: must be an absolute path, got 'rel/conn'",
    ),
    (
        "azblob://acct/keymgr/s.json?connection_string_env=1BAD",
        "daemon.state?connection_string_env: expected an environment variable name, got '1BAD'",
    ),
    ("azblob://acct/keymgr/s.json#frag", "daemon.state: 'azblob://acct/keymgr/s.json#frag': "
     "unexpected '#' fragment"),
]


def test_open_azblob_store_validates_the_url() -> None:
    url = (
        "azblob://acct/keymgr/dir/state.json?lock_ttl=60&read_timeout=3"
        "&endpoint=https%3A%2F%2Facct.blob.core.windows.net%2F"
    )
    store = open_azblob_store(url)
    assert store.url == url and store.location == "azblob://acct/keymgr/dir/state.json"
    assert store.lock_ttl == 60
    adapter = store.adapter
    assert isinstance(adapter, AzureBlobAdapter) and adapter.blob == "dir/state.json"
    conn = adapter.connection
    assert conn.auth == "default" and conn.endpoint == "https://acct.blob.core.windows.net"
    assert conn.read_timeout == 3 and conn.max_attempts == 5
    implied = open_azblob_store("azblob://acct/c0n/s?connection_string_file=/etc/k/az.conn")
    assert isinstance(implied.adapter, AzureBlobAdapter)
    assert implied.adapter.connection.auth == "connection_string"
    for bad, message in URL_ERRORS:
        with pytest.raises(ConfigError) as info:
            open_azblob_store(bad)
        assert str(info.value) == message, bad


#: A bad publisher table and its message: one line naming publishers.NAME.FIELD.
PUBLISHER_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"colour": "blue"}, "publishers.cdn.colour: unknown option (known: account_url, auth, blob, "
     "cache_control, connect_timeout, connection_string_env, connection_string_file, container, "
     "max_attempts, read_timeout, type)"),
    ({"container": None}, "publishers.cdn.container: is required"),
    ({"container": "JWKS"}, "publishers.cdn.container: expected a container name (3-63 "
     "lower-case letters, digits and single hyphens), got 'JWKS'"),
    ({"blob": "/jwks.json"}, "publishers.cdn.blob: blob names do not start with '/' "
     "(write 'jwks.json')"),
    ({"blob": None}, "publishers.cdn.blob: is required (e.g. '.well-known/jwks.json')"),
    ({"cache_control": "a\nb"}, "publishers.cdn.cache_control: expected a Cache-Control header "
     "value"),
    ({"auth": None, "account_url": None}, "publishers.cdn.account_url: is required with auth = "
     "'default' (e.g. 'https://ACCOUNT.blob.core.windows.net')"),
    ({"account_url": "https://acct.blob.core.windows.net/?sv=2020&sig=abc"},
     "publishers.cdn.account_url: must not carry a query or user info (a SAS token there would "
     "sit in the config file); use auth = 'connection_string' with a SharedAccessSignature"),
    ({"connection_string": "AccountName=a;AccountKey=c2VjcmV0"},
     "publishers.cdn.connection_string: a literal credential is refused (it would sit in the "
     "config file and in backups); use connection_string_file or "
     "$AZURE_STORAGE_CONNECTION_STRING"),
    ({"sas_token": "sv=1&sig=x"}, "publishers.cdn.sas_token: a literal credential is refused "
     "(it would sit in the config file and in backups); use connection_string_file or "
     "$AZURE_STORAGE_CONNECTION_STRING"),
    ({"read_timeout": 0}, "publishers.cdn.read_timeout: must be between 0.1 and 300, got 0"),
    ({"max_attempts": 50}, "publishers.cdn.max_attempts: must be between 1 and 20, got 50"),
]


def test_publisher_options_are_validated(tmp_path: Path) -> None:
    base = {"type": "azblob", "container": "jwks", "blob": JWKS_BLOB, "auth": "connection_string"}
    pub = AzureBlobPublisher("cdn", base, str(tmp_path))
    assert pub.cache_control == "public, max-age=300"
    assert pub.headers() == {"Content-Type": "application/json",
                             "Cache-Control": "public, max-age=300"}
    pub = AzureBlobPublisher(
        "cdn", {**base, "auth": "default", "account_url": "https://acct.blob.core.windows.net"},
        str(tmp_path),
    )
    assert pub.where == f"publisher cdn: azblob://acct/jwks/{JWKS_BLOB}"
    for change, message in PUBLISHER_ERRORS:
        options = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(ConfigError) as info:
            AzureBlobPublisher("cdn", options, str(tmp_path))
        assert str(info.value) == message, change


def test_config_check_names_the_field_and_stays_offline(
    home: Any, azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keymgr config check``: a bad URL parameter or option is one line naming the
    file and the field; a good config passes with no credential and no server."""
    container = azurite.new_container("cfg")
    write_config(
        home, state=state_url(container),
        backends={"local": {"type": "file", "path": "keys", "master_key_file": "master.key"}},
        publishers={"cdn": publisher_options(container)},
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )  # fmt: skip
    env = {k: v for k, v in home.env().items() if not k.startswith("AZURE_")}
    env["AZURE_STORAGE_CONNECTION_STRING"] = ""
    proc = run(home, "config", "check", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    good = home.config.read_text()
    for old, new, field in [
        ("lock_ttl=5", "lock_ttl=1", "daemon.state?lock_ttl"),
        ("auth=connection_string", "auth=connection_string&account_key=abc",
         "daemon.state?account_key"),
        ("\nblob = ", "\nblb = ", "publishers.cdn.blb"),
    ]:
        home.config.write_text(good.replace(old, new, 1))
        proc = run(home, "config", "check", env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = error_lines(proc.stderr)
        assert str(home.config) in line and f"{field}:" in line, line


def test_connection_string_parsing_never_echoes_a_value() -> None:
    src = "connection string $X"
    cs = parse_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={ACCOUNT_KEY};"
        "EndpointSuffix=core.chinacloudapi.cn", src,
    )
    assert cs.endpoint == "https://acct.blob.core.chinacloudapi.cn" and cs.key == ACCOUNT_KEY
    assert ACCOUNT_KEY not in repr(cs)
    cs = parse_connection_string("BlobEndpoint=http://127.0.0.1:1/a;SharedAccessSignature=?sv=1"
                                 "&sig=s3cr3t", src)
    assert cs.sas == "sv=1&sig=s3cr3t" and cs.account is None
    dev = parse_connection_string("UseDevelopmentStorage=true", src)
    assert (dev.account, dev.key, dev.endpoint) == (
        ACCOUNT, ACCOUNT_KEY, "http://127.0.0.1:10000/devstoreaccount1"
    )
    for text, message in [
        ("AccountName=acct;garbage", f"{src}: part 2 is not Name=Value"),
        (f"AccountName=acct;{ACCOUNT_KEY}", f"{src}: part 2 is not Name=Value"),
        (f"AccountKey={ACCOUNT_KEY}", f"{src}: names neither BlobEndpoint nor AccountName"),
        (f"BlobEndpoint=http://x/a;AccountKey={ACCOUNT_KEY}",
         f"{src}: has an AccountKey but no AccountName"),
        ("AccountName=acct", f"{src}: has neither AccountKey nor SharedAccessSignature"),
        ("BlobEndpoint=http://x/a?sig=s3cr3t;SharedAccessSignature=sig=1",
         f"{src}: BlobEndpoint is not an http(s) URL without a query"),
    ]:
        with pytest.raises(AzureSetupError) as info:
            parse_connection_string(text, src)
        assert str(info.value) == message


def test_credential_sources_fail_in_one_line_without_the_secret(
    azurite: AzuriteServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = azurite.new_container("creds")
    where = f"state azblob://{ACCOUNT}/{container}/{STATE_BLOB}: GetBlob: "

    def load_error(url: str) -> str:
        with pytest.raises(StoreError) as info:
            open_azblob_store(url).load()
        msg = str(info.value)
        assert "\n" not in msg and ACCOUNT_KEY not in msg and ACCOUNT_KEY[:16] not in msg, msg
        return msg

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    assert load_error(state_url(container)) == (
        f"{where}no connection string: $AZURE_STORAGE_CONNECTION_STRING is not set or empty "
        "(or set connection_string_file)"
    )
    exposed = write_secret(tmp_path / "exposed.conn", azurite.connection_string, 0o644)
    url = state_url(container, auth="connection_string", connection_string_file=str(exposed))
    assert load_error(url) == (
        f"{where}connection string file {exposed}: mode 0644 lets group and others read it; "
        f"fix: chmod 600 {exposed} (or 640, if keymgr reads it as its group)"
        if os.getuid() == 0 else
        f"{where}connection string file {exposed}: mode 0644 lets group and others read it; "
        f"fix: chmod 600 {exposed}"
    )
    missing = tmp_path / "missing.conn"
    assert load_error(state_url(container, connection_string_file=str(missing))) == (
        f"{where}connection string file {missing}: cannot read (No such file or directory)"
    )
    monkeypatch.setenv("OTHER_ACCOUNT", azurite.connection_string.replace(
        f"AccountName={ACCOUNT}", "AccountName=someoneelse").replace(
        f"/{ACCOUNT};", "/someoneelse;"))
    assert load_error(state_url(container, connection_string_env="OTHER_ACCOUNT")) == (
        f"{where}connection string $OTHER_ACCOUNT: is for account 'someoneelse', not '{ACCOUNT}'"
    )
    monkeypatch.setenv("BROKEN", azurite.connection_string.replace("AccountKey=", "AccountKey;"))
    assert load_error(state_url(container, connection_string_env="BROKEN")) == (
        f"{where}connection string $BROKEN: part 3 is not Name=Value"
    )
    wrong_key = "B" * 86 + "=="
    monkeypatch.setenv("WRONG", azurite.connection_string.replace(ACCOUNT_KEY, wrong_key))
    msg = load_error(state_url(container, connection_string_env="WRONG"))
    assert msg.startswith(f"{where}HTTP 403 "), msg
    assert wrong_key[:16] not in msg
    monkeypatch.setenv("NOT_BASE64", azurite.connection_string.replace(
        ACCOUNT_KEY, ACCOUNT_KEY[::-1]))
    msg = load_error(state_url(container, connection_string_env="NOT_BASE64"))
    assert msg.startswith(
        f"{where}cannot authenticate (connection string $NOT_BASE64): Incorrect padding."
    ), msg
    assert ACCOUNT_KEY[::-1][:16] not in msg


# --------------------------------------------------------------------------- secrets


def test_no_credential_in_any_error_or_log(
    home: Any, azurite: AzuriteServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The account key, the connection string and a SAS signature appear nowhere:
    not in errors, not in the CLI's output, not in the daemon's log, not in any
    library log at DEBUG (urllib3 logs request URLs, where a SAS sits)."""
    caplog.set_level(logging.DEBUG)
    container = azurite.new_container("leak")
    sas = azurite.sas_connection_string(container, "rwd")
    sig = re.search(r"sig=([^&;]+)", sas)
    assert sig is not None
    secrets_ = [ACCOUNT_KEY, ACCOUNT_KEY[:20], azurite.connection_string, sig.group(1)]
    seen: list[str] = []

    # In this process: good and failing calls, with the key and with a SAS.
    conn_file = write_secret(tmp_path / "sas.conn", sas)
    for url in (state_url(container), state_url(container, connection_string_file=str(conn_file))):
        store = open_azblob_store(url)
        with store.exclusive():
            store.commit(sample_state(1), store.load()[1])
        store.write_lease({"holder": "x"}, store.read_lease()[1])
        for bad in (state_url("no-such-container"),
                    state_url(container, endpoint=f"http://127.0.0.1:9/{ACCOUNT}",
                              max_attempts=1)):
            with pytest.raises(StoreError) as info:
                open_azblob_store(bad).load()
            seen.append(str(info.value))
    pub = make_publisher(publisher_options(container, connection_string_file=str(conn_file),
                                           auth="connection_string"), tmp_path)
    assert pub.publish(sample_jwks(1)) is True
    seen.append(caplog.text)

    # Through the CLI: a pass, then failing ones; and the daemon, failing for a while.
    write_config(
        home, state=state_url(container, blob="cli/state.json"),
        backends={"local": {"type": "file", "path": "keys", "master_key_file": "master.key"}},
        publishers={"cdn": publisher_options(azurite.new_container("leak-cli"))},
        rings={"default": {"backend": "local", "algorithm": "ES256"}},
    )  # fmt: skip
    for args in (("reconcile", "--at", ts(T0)), ("status",), ("jwks",), ("config", "check")):
        proc = run(home, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seen += [proc.stdout, proc.stderr]
    wrong = azurite.connection_string.replace(ACCOUNT_KEY, "B" * 86 + "==")
    for env in ({"AZURE_STORAGE_CONNECTION_STRING": wrong},
                {"AZURE_STORAGE_CONNECTION_STRING": sas.replace("sig=", "sig=X")}):
        proc = run(home, "reconcile", "--at", ts(T0 + P), env=home.env(**env))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (line,) = error_lines(proc.stderr)
        assert "HTTP 403" in line, line
        seen += [proc.stdout, proc.stderr]
        secrets_.append(env["AZURE_STORAGE_CONNECTION_STRING"])
    text = home.config.read_text().replace('reconcile_interval = "60s"', "")
    home.config.write_text(text.replace("[daemon]", '[daemon]\nreconcile_interval = "1s"\n'
                                        'listen = "127.0.0.1:0"\nlease_ttl = "3s"'))
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as out:
        daemon = subprocess.Popen(
            keymgr_command("--config", str(home.config), "run"), stdout=out,
            stderr=subprocess.STDOUT, cwd=home.dir,
            env=home.env(AZURE_STORAGE_CONNECTION_STRING=wrong),
        )
    try:
        deadline = time.monotonic() + 30
        while "HTTP 403" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    log_text = log_path.read_text()
    assert "HTTP 403" in log_text, log_text[-2000:]
    seen.append(log_text)
    for text in seen:
        for secret in secrets_:
            assert secret not in text, (secret[:8], text[-500:])


# --------------------------------------------------------------------------- the CLI


def run(home: Any, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``keymgr --config CONFIG ARGS`` in a subprocess, with azblob registered."""
    return subprocess.run(
        keymgr_command("--config", str(home.config), *args), capture_output=True, text=True,
        cwd=home.dir, env=env or home.env(), timeout=timeout,
    )  # fmt: skip


def ok(home: Any, *args: str) -> list[str]:
    proc = run(home, *args)
    assert proc.returncode == 0, (
        f"keymgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


class AzureHome:
    """A keymgr home on Azure: file keys, the state and the JWKS as blobs."""

    def __init__(self, home: Any, azurite: AzuriteServer, **conn: Any) -> None:
        self.home, self.azurite = home, azurite
        self.state_container = azurite.new_container("state")
        self.jwks_container = azurite.new_container("jwks", public=True)
        self.configure(**conn)

    def configure(self, **conn: Any) -> None:
        write_config(
            self.home,
            state=state_url(self.state_container, **conn),
            backends={"local": {"type": "file", "path": "keys", "master_key_file": "master.key"}},
            publishers={"cdn": publisher_options(self.jwks_container, **conn)},
            rings={"default": {"backend": "local", "algorithm": "ES256"}},
        )

    def state(self) -> dict[str, Any]:
        blob = self.azurite.service().get_blob_client(self.state_container, STATE_BLOB)
        doc: dict[str, Any] = json.loads(blob.download_blob().readall())
        return doc

    def kids(self, *states: str) -> list[str]:
        keys = self.state()["rings"].get("default", {}).get("keys", [])
        return [k["kid"] for k in keys if k["state"] in states]

    def jwks(self) -> dict[str, Any]:
        """The JWKS as an anonymous verifier fetches it, with its Cache-Control checked."""
        status, headers, body = http_get(f"{self.azurite.url}/{self.jwks_container}/{JWKS_BLOB}")
        assert status == 200 and headers["cache-control"] == "public, max-age=300", headers
        doc: dict[str, Any] = json.loads(body)
        return doc

    def check(self, ever: set[str]) -> None:
        """One signer; no key lost; the keys on disk are the live ones; the JWKS agrees."""
        keys = self.state()["rings"]["default"]["keys"]
        assert [k["state"] for k in keys].count("active") == 1, keys
        in_state = {k["kid"] for k in keys}
        assert ever <= in_state, ever - in_state
        ever |= in_state
        live = {k["kid"] for k in keys if k["state"] != "destroyed"}
        backend = FileBackend(
            "local", {"type": "file", "path": "keys", "master_key_file": "master.key"},
            str(self.home.dir),
        )
        assert set(backend.list_keys("default")) == live, (backend.list_keys("default"), keys)
        published = {k["kid"] for k in self.jwks()["keys"]}
        assert published == set(self.kids("published", "active", "retired")), (published, keys)


def test_end_to_end_rotation_through_the_cli(home: Any, azurite: AzuriteServer) -> None:
    """init, config check, reconcile through a whole rotation, sign: every token
    verifies with PyJWT and jwcrypto against the blob as served; the state lives
    in the container only; the audit chain is intact."""
    az = AzureHome(home, azurite)
    ok(home, "config", "check")
    ever: set[str] = set()
    ok(home, "reconcile", "--at", ts(T0))
    (first,) = az.kids("active")
    az.check(ever)
    token1 = ok(home, "sign", "default", "--claims", '{"sub": "a"}', "--ttl", "1d",
                "--at", ts(T0 + P - 2 * A))[0]
    assert verify_token(az.jwks(), token1, "ES256")["sub"] == "a"
    for at in (T0 + P - A, T0 + P, T0 + P + G, T0 + P + G + D):
        ok(home, "reconcile", "--at", ts(at))
        az.check(ever)
        if at == T0 + P - A:
            (second,) = az.kids("published")
        if at == T0 + P:
            assert az.kids("active") == [second] and az.kids("retired") == [first]
            verify_token(az.jwks(), token1, "ES256")  # the retired key still verifies
    assert az.kids("destroyed") == [first]
    token2 = ok(home, "sign", "default", "--claims", '{"sub": "b"}', "--ttl", "1h",
                "--at", ts(T0 + P + G + D))[0]
    assert verify_token(az.jwks(), token2, "ES256")["sub"] == "b"
    assert first not in {k["kid"] for k in az.jwks()["keys"]}
    assert json.loads("\n".join(ok(home, "jwks"))) == az.jwks()
    ok(home, "audit", "verify")
    assert not (home.dir / "state.json").exists()  # the state really lives in the container
    assert not azurite.service().get_blob_client(
        az.state_container, f"{STATE_BLOB}.lock").exists()  # the pass lock was released


def test_three_concurrent_reconciles_share_one_store(home: Any, azurite: AzuriteServer) -> None:
    """Three ``keymgr reconcile`` processes at once at every step of a rotation: the
    ETag compare-and-swap and the pass lock leave one signer, no key lost or made
    twice, every transition applied once, an intact audit chain."""
    az = AzureHome(home, azurite)
    home.set_ring(destroy_after="0s")
    ever: set[str] = set()
    token = ""
    for at in (T0, T0 + P - A, T0 + P, T0 + P + G):
        procs = [
            subprocess.Popen(
                keymgr_command("--config", str(home.config), "reconcile", "--at", ts(at)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home.dir,
                env=home.env(),
            )
            for _ in range(3)
        ]
        outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        for rc, out, err in outs:
            assert rc == 0 and "Traceback" not in err, (ts(at), rc, out, err)
        applied = [line for _, out, _ in outs for line in out.splitlines() if " key." in line]
        assert applied, ts(at)
        assert len(applied) == len(set(applied)), applied  # nothing done twice
        assert sum(" key.generated " in line for line in applied) <= 1, applied
        az.check(ever)
        if at == T0:
            token = ok(home, "sign", "default", "--claims", "{}", "--ttl", "1d",
                       "--at", ts(T0 + P - 2 * A))[0]
        if at < T0 + P + G:
            verify_token(az.jwks(), token, "ES256")
    assert len(ever) == 2 and az.kids("destroyed") and az.kids("active")
    ok(home, "audit", "verify")
    events = [json.loads(line) for line in (home.dir / "audit.jsonl").read_text().splitlines()
              if line.strip()]
    for name in ("key.generated", "key.promoted", "key.retired", "key.destroyed"):
        per_kid = [e["kid"] for e in events if e["event"] == name]
        assert len(per_kid) == len(set(per_kid)), (name, per_kid)


#: Runs the real CLI, and SIGSTOPs Azurite the moment the publisher is about to
#: upload the JWKS: an outage in the middle of a pass, at an exact request.
_STOP_AT_JWKS_UPLOAD = STOP_DEAD_IMPORT + """
import os, signal, sys
import keymgr.plugins as p
p.BUILTIN[p.PUBLISHERS].setdefault("azblob", "keymgr.backends.azure.publisher:AzureBlobPublisher")
p.BUILTIN[p.STORES].setdefault("azblob", "keymgr.backends.azure.store:open_azblob_store")
from keymgr.backends.azure.publisher import AzureBlobPublisher
_write = AzureBlobPublisher.write
def write(self, data):
    stop_dead({pid})
    return _write(self, data)
AzureBlobPublisher.write = write
from keymgr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_azurite_stopped_in_the_middle_of_a_rotation(home: Any, azurite: AzuriteServer) -> None:
    """Azurite stops answering mid-pass (successor made, JWKS upload under way):
    exit 1, one line naming the store or publisher and the operation, no
    traceback, nothing promoted; after SIGCONT the next passes finish the
    rotation intact (the dead pass's lock is taken over after lock_ttl)."""
    az = AzureHome(home, azurite)
    ever: set[str] = set()
    ok(home, "reconcile", "--at", ts(T0))
    (first,) = az.kids("active")
    token = ok(home, "sign", "default", "--claims", "{}", "--ttl", "1d",
               "--at", ts(T0 + P - 2 * A))[0]
    jwks_before = az.jwks()

    az.configure(connect_timeout=1, read_timeout=2, max_attempts=1)
    script = _STOP_AT_JWKS_UPLOAD.format(pid=azurite.proc.pid)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, "--config", str(home.config),
             "reconcile", "--at", ts(T0 + P - A)],
            capture_output=True, text=True, cwd=home.dir, env=home.env(), timeout=120,
        )  # fmt: skip
    finally:
        azurite.resume()
    az.configure()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    # The publish failed (logged), then committing what did succeed failed: by the
    # Put Blob timing out, or, when the outage outlasted the pass lock's TTL, by
    # refusing to write without the lock.
    where = f"keymgr: error: state azblob://{ACCOUNT}/{az.state_container}/{STATE_BLOB}: "
    assert line.startswith(where), line
    # Or, the audit chain being kept in the store, by reading its head first.
    head_read = f"GetBlob {STATE_BLOB}.audit/" in line
    assert "PutBlob: no answer from" in line or "pass lock lost" in line or head_read, line
    assert ACCOUNT_KEY not in proc.stdout + proc.stderr
    (second,) = az.kids("pending")
    assert az.kids("active") == [first]
    # The upload queued in the stopped server may be served after SIGCONT: the
    # successor can be served early (harmless: it is not confirmed, so nothing is
    # promoted), the old key is served all along.
    served = {k["kid"] for k in az.jwks()["keys"]}
    before = {k["kid"] for k in jwks_before["keys"]}
    assert served in (before, before | {second}), (served, before, second)
    verify_token(az.jwks(), token, "ES256")

    resumed = T0 + P - A + timedelta(minutes=5)
    ok(home, "reconcile", "--at", ts(resumed))
    assert az.kids("published") == [second]
    az.check(ever)
    for at in (resumed + A, resumed + A + G, resumed + A + G + D):
        ok(home, "reconcile", "--at", ts(at))
        az.check(ever)
        if at == resumed + A:
            assert az.kids("active") == [second]
            verify_token(az.jwks(), token, "ES256")
    assert az.kids("destroyed") == [first]
    ok(home, "audit", "verify")


def test_two_daemons_lease_take_over(home: Any, azurite: AzuriteServer, tmp_path: Path) -> None:
    """Two ``keymgr run`` replicas on one azblob store: one holds the lease blob and
    acts; SIGKILL it and the other takes the lease over within lease_ttl + one
    heartbeat (+1 s of timestamps, +3 s for a loaded machine) and goes on rotating;
    a graceful stop hands the lease over at once (holder null)."""
    az = AzureHome(home, azurite)
    text = home.config.read_text()
    home.config.write_text(text.replace(
        "[daemon]", '[daemon]\nreconcile_interval = "1s"\nlisten = "127.0.0.1:0"\n'
        'lease_ttl = "3s"', 1))
    home.set_ring(rotation_period="6s", publish_ahead="2s", retire_grace="3s",
                  destroy_after="1s")
    ok(home, "config", "check")
    lease_blob = azurite.service().get_blob_client(az.state_container, f"{STATE_BLOB}.lease")

    def holder_pid() -> int | None:
        with contextlib.suppress(Exception):
            doc = json.loads(lease_blob.download_blob().readall())
            return int(str(doc.get("holder") or "::").split(":")[1] or 0) or None
        return None

    procs: dict[int, subprocess.Popen[bytes]] = {}
    logs = []
    for i in range(2):
        log = (tmp_path / f"replica{i}.log").open("wb")
        logs.append(log)
        p = subprocess.Popen(keymgr_command("--config", str(home.config), "run"), stdout=log,
                             stderr=subprocess.STDOUT, cwd=home.dir,
                             env=home.env(PYTHONUNBUFFERED="1"))
        procs[p.pid] = p
    try:
        first = wait_for(lambda: (pid := holder_pid()) in procs and pid, 20, "a lease holder")
        wait_for(lambda: az.kids("active"), 20, "a first key")
        procs[first].kill()
        killed = time.monotonic()
        procs[first].wait(timeout=10)
        second = wait_for(lambda: (pid := holder_pid()) in procs and pid != first and pid, 20,
                          "the other replica to take the lease")
        took = time.monotonic() - killed
        assert took <= 3 + 1 + 1 + 3, f"take-over took {took:.1f}s"
        active = az.kids("active")
        wait_for(lambda: az.kids("active") != active, 30, "a rotation by the new holder")
        procs[second].send_signal(signal.SIGTERM)
        assert procs[second].wait(timeout=15) == 0
        assert json.loads(lease_blob.download_blob().readall())["holder"] is None
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()
    ok(home, "audit", "verify")
    keys = az.state()["rings"]["default"]["keys"]
    assert [k["state"] for k in keys].count("active") == 1, keys


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- offline & privilege


def test_modules_import_no_sdk_and_config_check_reads_no_credential() -> None:
    """Building the publisher and the store (what ``config check`` does) imports no
    Azure SDK module and reads no credential."""
    code = (
        "import sys\n"
        "from keymgr.backends.azure.publisher import AzureBlobPublisher\n"
        "from keymgr.backends.azure.store import open_azblob_store\n"
        "open_azblob_store('azblob://acct/keymgr/s.json?connection_string_file=/nonexistent')\n"
        "AzureBlobPublisher('p', {'type': 'azblob', 'container': 'jwks', 'blob': 'j.json',"
        " 'account_url': 'https://acct.blob.core.windows.net'}, '/')\n"
        "print(sorted(m for m in sys.modules if m.startswith('azure')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


#: Every SDK call the code makes on a container or blob client, and the data
#: action it needs (None: no request, a local object).
SDK_DATA_ACTIONS: dict[str, str | None] = {
    "download_blob": "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read",
    "get_blob_properties": "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read",
    "upload_blob": "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write",
    "delete_blob": "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete",
    # List Blobs (the sweep of orphaned state shards): blobs/read in Azure RBAC.
    "list_blobs": "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read",
    "get_blob_client": None,
}


def test_custom_role_grants_exactly_the_data_actions_the_code_uses() -> None:
    """deploy/azure/keymgr-role.json: a custom role with no control-plane action and
    exactly the blob data actions of the SDK calls in backends/azure (found in the
    source, so a new call fails here until the role and this table cover it)."""
    role = json.loads(ROLE.read_text())
    assert role["IsCustom"] is True and role["Name"] and role["Description"]
    assert role["Actions"] == [] and role["NotActions"] == [] and role["NotDataActions"] == []
    assert role["AssignableScopes"] and all(s.startswith("/subscriptions/")
                                            for s in role["AssignableScopes"])
    allowed = role["DataActions"]
    assert len(allowed) == len(set(allowed)) and not any("*" in a for a in allowed), allowed
    source = "".join(p.read_text() for p in sorted((REPO / "backends" / "azure").glob("*.py")))
    # Calls on the SDK's clients: every method whose name mentions a blob or a container.
    calls = set(re.findall(r"\.([a-z_]*(?:blob|container)[a-z_]*)\(", source))
    assert calls == set(SDK_DATA_ACTIONS), calls
    needed = {a for a in SDK_DATA_ACTIONS.values() if a is not None}
    assert set(allowed) == needed, (set(allowed) - needed, needed - set(allowed))
    assert role_sas_permission() == "rlwd"
