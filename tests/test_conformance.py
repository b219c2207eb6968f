"""Every built-in plug-in runs the conformance suites of ``keymgr.testing.conformance``.

The same test functions a third-party plug-in runs (docs/extending.md), here
against the built-ins as a config would make them: each class is loaded by
its type name through ``keymgr.plugins`` and each store is opened from its
state URL. The AWS ones run on the moto server and the Vault ones on the
OpenBao dev server of ``tests/servers_moto.py`` and ``tests/servers_bao.py``
(one server per xdist worker, on free loopback ports). The in-memory
implementations of ``keymgr.testing`` run the suites too, which is how the
suites' "no lease" branch is exercised (``MemoryStore``).

``SharedStoreTests`` (tests/test_docstore.py, tests/test_docstore_real.py)
also runs ``StoreTests``, on stores built from an adapter by hand; here the
S3 and Vault KV stores are the ones their URL factories make.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any, ClassVar

import pytest

from keymgr.backend import Backend
from keymgr.docstore import SharedStore
from keymgr.plugins import backend_class, publisher_class
from keymgr.publishers import Publisher
from keymgr.stores import StateStore, check_state_url, open_store
from keymgr.testing.conformance import BackendTests, PublisherTests, StoreTests
from keymgr.testing.docstore import MemoryAdapter
from keymgr.testing.memory import MemoryBackend, MemoryPublisher, MemoryStore
from tests.servers_moto import kms_options, s3_client, s3_publisher_options, s3_state_url

BUCKET = "keymgr-conformance"


def unique(tag: str) -> str:
    return f"{tag}{secrets.token_hex(5)}"


def make_backend(type_name: str, options: dict[str, Any], config_dir: Path) -> Backend:
    """A backend as ``[backends.NAME]`` makes it: class by type name, then the table."""
    cls = backend_class(type_name, f"backends.conformance.type ({type_name})")
    return cls("conformance", {"type": type_name, **options}, str(config_dir))


def make_publisher(type_name: str, options: dict[str, Any], config_dir: Path) -> Publisher:
    cls = publisher_class(type_name, f"publishers.conformance.type ({type_name})")
    return cls("conformance", {"type": type_name, **options}, str(config_dir))


@pytest.fixture
def vault_env(bao: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """VAULT_ADDR / VAULT_TOKEN of the test server, as an operator's environment."""
    for k in list(os.environ):
        if k.startswith(("VAULT_", "BAO_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    return bao


@pytest.fixture
def bucket(moto: Any) -> str:
    s3_client(moto.url).create_bucket(Bucket=BUCKET)
    return BUCKET


# --------------------------------------------------------------------------- backends


class TestFileBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        master = tmp_path / "master.key"
        master.write_bytes(base64.b64encode(secrets.token_bytes(32)))
        master.chmod(0o600)
        options = {"path": "keys", "master_key_file": "master.key", "rsa_bits": 2048}
        return make_backend("file", options, tmp_path)


class TestKMSBackendOnMoto(BackendTests):
    # Narrowed for moto 5.2, which differs from AWS KMS here (see MOTO_NO_EDDSA and
    # MOTO_PSS_SALT in tests/test_aws_kms.py, where the exact requests for both
    # are checked against the KMS service model with botocore's Stubber):
    # - EdDSA: moto has no ECC_NIST_EDWARDS25519 key spec, so CreateKey fails;
    # - PS256/PS384/PS512: moto signs RSASSA_PSS_SHA_* with the maximum salt
    #   length, which PyJWT rejects (RFC 7518 3.5: the salt is as long as the
    #   hash, which is what AWS KMS uses).
    algorithms: ClassVar[tuple[str, ...]] = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512")

    @pytest.fixture
    def backend(self, moto: Any, tmp_path: Path) -> Backend:
        options = kms_options(moto.url, rsa_key_spec="RSA_2048")
        del options["type"]
        return make_backend("aws-kms", options, tmp_path)


class TestVaultTransitBackend(BackendTests):
    @pytest.fixture
    def backend(self, vault_env: Any, tmp_path: Path) -> Backend:
        # A prefix of its own: the OpenBao server is shared by the worker's tests.
        options = {"key_prefix": unique("conformance-") + "-", "rsa_bits": 2048, "timeout": 10}
        return make_backend("vault-transit", options, tmp_path)


class TestMemoryBackend(BackendTests):
    @pytest.fixture
    def backend(self) -> Backend:
        return MemoryBackend()


# --------------------------------------------------------------------------- publishers


class TestFilePublisher(PublisherTests):
    @pytest.fixture(params=[None, "public, max-age=300"], ids=["plain", "cache-control"])
    def publisher(self, request: pytest.FixtureRequest, tmp_path: Path) -> Publisher:
        options: dict[str, Any] = {"path": "public/.well-known/jwks.json"}
        if request.param is not None:
            options["cache_control"] = request.param
        return make_publisher("file", options, tmp_path)


class TestS3PublisherOnMoto(PublisherTests):
    @pytest.fixture
    def publisher(self, moto: Any, bucket: str, tmp_path: Path) -> Publisher:
        options = s3_publisher_options(moto.url, bucket=bucket)
        del options["type"]
        return make_publisher("s3", options, tmp_path)


class TestMemoryPublisher(PublisherTests):
    @pytest.fixture
    def publisher(self) -> Publisher:
        return MemoryPublisher(cache_control="public, max-age=60")


# --------------------------------------------------------------------------- stores


class TestFileStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> StateStore:
        return open_store(check_state_url("file:state/state.json", tmp_path))


class TestSharedStoreInMemory(StoreTests):
    @pytest.fixture(params=[True, False], ids=["etag-tokens", "counter-tokens"])
    def store(self, request: pytest.FixtureRequest) -> StateStore:
        # Version tokens as S3 makes them (a hash of the bytes) and as KV does (a counter).
        return SharedStore(MemoryAdapter(content_tokens=request.param))


class TestS3StoreOnMoto(StoreTests):
    @pytest.fixture
    def store(self, moto: Any, bucket: str) -> StateStore:
        return open_store(s3_state_url(moto.url, bucket, key=f"{unique('conformance/')}/state"))


class TestVaultKVStore(StoreTests):
    @pytest.fixture
    def store(self, vault_env: Any) -> StateStore:
        return open_store(f"vault://secret/{unique('keymgr-conformance-')}")


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self) -> StateStore:
        return MemoryStore()
