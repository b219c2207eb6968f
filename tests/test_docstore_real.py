"""The S3 and Vault KV document adapters, proven against real servers.

:class:`TestS3` and :class:`TestVaultKV` run the *same* conformance tests as
``tests/test_docstore.py`` (``keymgr.testing.docstore.SharedStoreTests``)
against a moto server and an OpenBao dev server (the session fixtures of
``tests/servers_moto.py`` and ``tests/servers_bao.py``), with real time and a
small ``lock_ttl``: both stores judge a lock's age by their own clock to the
second (HTTP ``Date``), so the TTL is a few seconds. The tests after each class
check what only that adapter has: its messages, the S3 retried request that
landed on its first attempt, the refusal of a deleted KV state, and the
objects, secrets and messages that the stores of the previous release wrote
and gave (so switching to these needed no migration).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from keymgr.backends.aws.client import AWSConnection
from keymgr.backends.aws.store import S3Adapter, open_s3_store
from keymgr.backends.vault.client import vault_client
from keymgr.backends.vault.store import VaultKVAdapter, open_vault_store

from keymgr.docstore import LOCK, SharedStore, encode_state
from keymgr.errors import ConfigError, ConflictError, StoreError
from keymgr.model import State
from keymgr.options import Options
from keymgr.testing.docstore import DocHarness, SharedStoreTests, sample_state
from tests.servers_moto import REGION, s3_client, s3_state_url

#: Several times the stores' 1 s clock resolution plus a request's latency.
TTL = 2.5
BUCKET = "keymgr-docstore"


def unique(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- S3 (moto)


def s3_connection(url: str, **options: Any) -> AWSConnection:
    return AWSConnection(
        **{"region": REGION, "endpoint_url": url, "connect_timeout": 2.0,
           "read_timeout": 5.0, "max_attempts": 3, **options}
    )


@pytest.fixture
def s3_key(moto: Any) -> str:
    s3_client(moto.url).create_bucket(Bucket=BUCKET)
    return f"{unique('keymgr/')}/state.json"


class TestS3(SharedStoreTests):
    @pytest.fixture
    def harness(self, moto: Any, s3_key: str) -> DocHarness:
        conn = s3_connection(moto.url)
        return DocHarness(
            factory=lambda: S3Adapter(BUCKET, s3_key, conn), lock_ttl=TTL, resolution=1.0
        )


def test_s3_objects_and_messages(moto: Any, s3_key: str) -> None:
    s3 = s3_client(moto.url)
    store = SharedStore(S3Adapter(BUCKET, s3_key, s3_connection(moto.url)), lock_ttl=TTL)
    store.commit(sample_state(1), None)
    store.write_lease({"holder": "a"}, None)
    with store.exclusive():
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=s3_key)["Contents"]
        assert {o["Key"] for o in listed} == {s3_key, f"{s3_key}.lock", f"{s3_key}.lease"}
        head = s3.head_object(Bucket=BUCKET, Key=f"{s3_key}.lock")
        assert head["ContentType"] == "application/json"
    stored = s3.get_object(Bucket=BUCKET, Key=s3_key)["Body"].read()
    assert stored == encode_state(sample_state(1), 1)

    # Unreachable: every operation one line, named as the previous release named it.
    dead = open_s3_store(s3_state_url("http://127.0.0.1:9", BUCKET, s3_key, max_attempts=1))

    def take_lock() -> None:
        with dead.exclusive():
            raise AssertionError("unreachable")

    calls = {
        "GetObject": dead.load,
        "PutObject": lambda: dead.commit(State(), None),
        f"GetObject {s3_key}.lease (lease)": dead.read_lease,
        f"PutObject {s3_key}.lease (lease)": lambda: dead.write_lease({}, None),
        f"PutObject {s3_key}.lock (lock)": take_lock,
    }
    for operation, call in calls.items():
        with pytest.raises(StoreError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"state s3://{BUCKET}/{s3_key}: {operation}: Could not connect"), msg
        assert "\n" not in msg
    assert dead.fingerprint() is None
    with pytest.raises(StoreError, match=r"^state s3://no-such-bucket/k: GetObject: NoSuchBucket"):
        SharedStore(S3Adapter("no-such-bucket", "k", s3_connection(moto.url))).load()


#: A bad S3 state URL and its message: a URL parameter is named ``daemon.state?NAME``
#: and worded like every other plug-in option (keymgr.options).
S3_URL_ERRORS = [
    (
        "s3://bucket/state.json?regoin=x",
        "daemon.state?regoin: unknown option (known: audit_lock, audit_retention, "
        "connect_timeout, endpoint_url, lock_ttl, max_attempts, profile, read_timeout, region)",
    ),
    (
        "s3://bucket/state.json?lock_ttl=1",
        "daemon.state?lock_ttl: must be between 5 and 3600, got 1.0",
    ),
    ("s3://bucket/k?max_attempts=2.5", "daemon.state?max_attempts: expected an integer, got '2.5'"),
    ("s3://bucket/k?region=a&region=b", "daemon.state?region: given twice"),
    (
        "s3://B_AD/state.json",
        "daemon.state: bucket of 's3://B_AD/state.json': expected an S3 bucket name, got 'B_AD'",
    ),
    (
        "s3://bucket/",
        "daemon.state: object key of 's3://bucket/': expected a non-empty object key, got ''",
    ),
    (
        "s3://bucket/k?endpoint_url=ftp://x",
        "daemon.state?endpoint_url: expected an "
        "http(s) URL like 'https://kms.eu-west-1.amazonaws.com', got 'ftp://x'",
    ),
]


def test_open_s3_store_validates_the_url() -> None:
    url = "s3://bucket/k.json?region=eu-west-1&lock_ttl=60&endpoint_url=https%3A%2F%2Fs3.example"
    store = open_s3_store(url)
    assert store.url == url and store.location == "s3://bucket/k.json" and store.lock_ttl == 60
    assert isinstance(store.adapter, S3Adapter)
    assert store.adapter.connection.endpoint_url == "https://s3.example"
    for bad, message in S3_URL_ERRORS:
        with pytest.raises(ConfigError) as info:
            open_s3_store(bad)
        assert str(info.value) == message


def test_s3_a_retried_request_that_landed_on_its_first_attempt_is_ours(
    moto: Any, s3_key: str
) -> None:
    """The first attempt lands but its answer times out; the retry then loses to it (412)."""
    from botocore.exceptions import ReadTimeoutError

    adapter = S3Adapter(BUCKET, s3_key, s3_connection(moto.url))
    other = S3Adapter(BUCKET, s3_key, s3_connection(moto.url))
    armed = {"PutObject": 1}

    def land_then_time_out(request: Any, **_: Any) -> None:
        if armed["PutObject"] <= 0:
            return None
        armed["PutObject"] -= 1
        raw = urllib.request.Request(
            request.url, data=request.body, headers=dict(request.headers), method=request.method
        )
        try:  # the first attempt reaches S3 ...
            urllib.request.urlopen(raw, timeout=5).close()
        except urllib.error.HTTPError as e:
            e.close()
        raise ReadTimeoutError(endpoint_url=request.url)  # ... and its answer is lost

    adapter.client.meta.events.register("before-send.s3.PutObject", land_then_time_out)
    store = SharedStore(adapter, lock_ttl=TTL)
    token = store.commit(sample_state(1), None)  # If-None-Match: * landed, the retry got 412
    assert armed["PutObject"] == 0
    assert SharedStore(other).load() == (sample_state(1), token)
    armed["PutObject"] = 1
    t2 = store.commit(sample_state(2), token)  # If-Match: the same
    assert SharedStore(other).load() == (sample_state(2), t2)
    # A real conflict on a retried request stays a conflict.
    armed["PutObject"] = 1
    SharedStore(other).commit(sample_state(3), t2)
    with pytest.raises(ConflictError):
        store.commit(sample_state(4), t2)


# --------------------------------------------------------------------------- Vault KV (OpenBao)


@pytest.fixture
def vault_env(bao: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k in list(os.environ):
        if k.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    return bao


def kv_adapter(path: str, mount: str = "secret") -> VaultKVAdapter:
    """A new client each time: another process's view."""
    return VaultKVAdapter(mount, path, vault_client(Options({}, "daemon.state", ())))


class TestVaultKV(SharedStoreTests):
    @pytest.fixture
    def harness(self, vault_env: Any) -> DocHarness:
        path = unique("keymgr-docstore-")
        return DocHarness(factory=lambda: kv_adapter(path), lock_ttl=TTL, resolution=1.0)


class TestVaultKVLeastPrivilege(SharedStoreTests):
    """The same, with nothing but the shipped ``deploy/vault/keymgr-policy.hcl``.

    It grants the lock and lease data paths (create, read, update) and the
    state's metadata, nothing else: releasing a lock is a CAS write, not a
    KV delete.
    """

    @pytest.fixture
    def harness(self, vault_env: Any, monkeypatch: pytest.MonkeyPatch) -> DocHarness:
        from tests.test_vault import _policy_token

        path = unique("keymgr-docstore-")
        monkeypatch.setenv("VAULT_TOKEN", _policy_token(vault_env, "keymgr-unused-", path))
        return DocHarness(factory=lambda: kv_adapter(path), lock_ttl=TTL, resolution=1.0)


def test_vault_secrets_and_messages(
    vault_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bao = vault_env
    path = unique("keymgr-docstore-")
    url = f"vault://secret/{path}"
    store = SharedStore(kv_adapter(path), lock_ttl=TTL)
    assert store.commit(sample_state(1), None).version == 1
    raw = bao.ok("GET", f"secret/data/{path}")["data"]
    assert raw["data"] == {"state": encode_state(sample_state(1), 1).decode()}
    store.write_lease({"holder": "a"}, None)
    assert set(json.loads(bao.ok("GET", f"secret/data/{path}.lease")["data"]["data"]["lease"])) == {
        "holder", "nonce"
    }
    with store.exclusive():
        lock = json.loads(bao.ok("GET", f"secret/data/{path}.lock")["data"]["data"]["lock"])
        assert lock["holder"] == store.owner and lock["ttl"] == TTL
    # Released: a tombstone ({}) written with cas, which reads as absent.
    assert bao.ok("GET", f"secret/data/{path}.lock")["data"]["data"] == {}
    assert kv_adapter(path).read(LOCK) is None
    assert store.fingerprint() == 1

    monkeypatch.setenv("VAULT_TOKEN", "not-a-valid-token")
    denied = SharedStore(kv_adapter("keymgr-state-x"))
    with pytest.raises(StoreError) as err:
        denied.load()
    where = "state vault://secret/keymgr-state-x"
    assert str(err.value) == f"{where}: read: HTTP 403: permission denied"
    with pytest.raises(StoreError, match=rf"^{where}: lock: HTTP 403"), denied.exclusive():
        raise AssertionError("unreachable")
    assert denied.fingerprint() is None
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    with pytest.raises(StoreError, match=r"^state vault://nomount/x: commit: HTTP 404: no handler"):
        SharedStore(kv_adapter("x", mount="nomount")).commit(State(), None)
    assert url == store.location


def test_vault_a_deleted_or_destroyed_state_is_refused_not_emptied(vault_env: Any) -> None:
    bao = vault_env
    path = unique("keymgr-docstore-")
    url = f"vault://secret/{path}"
    store = SharedStore(kv_adapter(path), lock_ttl=TTL)
    token = store.commit(sample_state(1), None)
    store.commit(sample_state(2), token)
    bao.ok("DELETE", f"secret/data/{path}")
    for _ in range(2):
        with pytest.raises(StoreError) as err:
            store.load()
        msg = str(err.value)
        assert msg == (
            f"state {url}: read: the latest version (2) is deleted or destroyed; restore it "
            f"(bao kv undelete -mount=secret -versions=2 {path}) or delete the secret's "
            "metadata to start from an empty state"
        )
        with pytest.raises(ConflictError):  # nor written over as if absent
            store.commit(sample_state(3), None)
        bao.ok("PUT", f"secret/destroy/{path}", {"versions": [2]})
    bao.ok("DELETE", f"secret/metadata/{path}")
    assert store.load() == (State(), None)


#: A bad Vault state URL and its message, worded like the S3 store's (keymgr.options).
VAULT_URL_ERRORS = [
    ("vault://secret", "daemon.state: 'vault://secret': expected vault://MOUNT/PATH"),
    (
        "vault://secret/x?token=abc",
        "daemon.state?token: a literal token is refused (it would sit in the config file and "
        "in backups); use token_file or VAULT_TOKEN",
    ),
    (
        "vault://secret/x?colour=blue",
        "daemon.state?colour: unknown option (known: approle_mount, auth, ca_cert, "
        "jwt_file, kubernetes_mount, lock_ttl, namespace, retries, role, role_id, "
        "secret_id_file, timeout, tls_verify, token_file, url)",
    ),
    ("vault://secret/x?timeout=soon", "daemon.state?timeout: expected a number, got 'soon'"),
    (
        "vault://secret/x?tls_verify=maybe",
        "daemon.state?tls_verify: expected true or false, got 'maybe'",
    ),
    ("vault://secret/x?lock_ttl=1", "daemon.state?lock_ttl: must be between 2 and 3600, got 1.0"),
    ("vault://secret/x?auth=approle", 'daemon.state?role_id: required with auth = "approle"'),
]


def test_open_vault_store_validates_the_url(vault_env: Any) -> None:
    store = open_vault_store("vault://secret/x?timeout=3&retries=0&namespace=team&lock_ttl=45")
    assert store.lock_ttl == 45 and store.url == "vault://secret/x"
    assert isinstance(store.adapter, VaultKVAdapter)
    settings = store.adapter.vault.settings
    assert settings.timeout == 3 and settings.retries == 0 and settings.namespace == "team"
    for bad, message in VAULT_URL_ERRORS:
        with pytest.raises(ConfigError) as info:
            open_vault_store(bad)
        assert str(info.value) == message


def test_vault_a_lock_deleted_or_destroyed_by_hand_reads_absent(vault_env: Any) -> None:
    bao = vault_env
    path = unique("keymgr-docstore-")
    store = SharedStore(kv_adapter(path), lock_ttl=TTL, takeover_grace=0.0)
    with store.exclusive():
        pass
    for how in ("DELETE", "destroy"):
        with store.exclusive(timeout=0.1):
            version = bao.ok("GET", f"secret/data/{path}.lock")["data"]["metadata"]["version"]
        if how == "DELETE":
            bao.ok("DELETE", f"secret/data/{path}.lock")
        else:
            bao.ok("PUT", f"secret/destroy/{path}.lock", {"versions": [version + 1]})
        assert kv_adapter(path).read(LOCK) is None
        with store.exclusive(timeout=0.1):  # re-created over it at once, still by cas
            assert kv_adapter(path).read(LOCK) is not None
