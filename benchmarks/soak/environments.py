"""Each backend's setup: its servers, config sections, state store, origin and pause."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .edge import FileOrigin, HttpOrigin, Origin
from .settings import REGION, REPO, Settings


class Env:
    """One backend's setup: config text, environment, origin, faults it supports."""

    name = "file"
    publisher = "site"

    def __init__(self, s: Settings, work: Path) -> None:
        self.s, self.work = s, work
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGR_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.jwks_path = work / "public" / ".well-known" / "jwks.json"

    @property
    def cache_control(self) -> str:
        return f"public, max-age={self.s.cache}"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def state_url(self) -> str:
        # KEYMGR_TEST_SHARDS=on runs the soak on sharded state (docs/scale.md).
        shards = os.environ.get("KEYMGR_TEST_SHARDS")
        return f"file:state.json?shards={shards}" if shards else "file:state.json"

    def backend_toml(self) -> str:
        return '[backends.local]\ntype = "file"\npath = "keys"\nmaster_key_file = "master.key"\n'

    def publisher_toml(self) -> str:
        return (
            f'[publishers.site]\ntype = "file"\npath = "public/.well-known/jwks.json"\n'
            f'cache_control = "{self.cache_control}"\n'
        )

    def backend_name(self) -> str:
        return "local"

    def origin(self) -> Origin:
        return FileOrigin(self.jwks_path, self.cache_control)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        raise NotImplementedError
        yield


class KmsEnv(Env):
    name = "aws-kms"
    publisher = "s3"
    BUCKET = "keymgr-soak"
    KEY = "soak/jwks.json"  # not .well-known/jwks.json: moto routes that to Cognito

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests import servers_moto

        self.mod = servers_moto
        for name in servers_moto._AWS_ENV_TO_CLEAR:
            self.env.pop(name, None)
        self.env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # moto's fake credentials
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
            AWS_CONFIG_FILE=str(self.work / "aws-config-absent"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.work / "aws-credentials-absent"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})
        for name in servers_moto._AWS_ENV_TO_CLEAR:
            os.environ.pop(name, None)
        self.server = servers_moto.start_moto(self.work)
        import boto3

        boto3.client("s3", endpoint_url=self.server.url, region_name=REGION).create_bucket(
            Bucket=self.BUCKET
        )

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def state_url(self) -> str:
        if not self.s.cloud_state:
            return super().state_url()
        return (
            f"s3://{self.BUCKET}/soak/state.json?endpoint_url={self.server.url}&region={REGION}"
            "&connect_timeout=1&read_timeout=2&max_attempts=2"
        )

    def _conn(self) -> str:
        return (
            f'endpoint_url = "{self.server.url}"\nregion = "{REGION}"\n'
            "connect_timeout = 1\nread_timeout = 2\nmax_attempts = 2\n"
        )

    def backend_toml(self) -> str:
        return f'[backends.kms]\ntype = "aws-kms"\nalias_prefix = "soak"\n{self._conn()}'

    def backend_name(self) -> str:
        return "kms"

    def publisher_toml(self) -> str:
        return (
            f'[publishers.s3]\ntype = "s3"\nbucket = "{self.BUCKET}"\nkey = "{self.KEY}"\n'
            f'cache_control = "{self.cache_control}"\n{self._conn()}'
        )

    def origin(self) -> Origin:
        return HttpOrigin(f"{self.server.url}/{self.BUCKET}/{self.KEY}")

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self.server.outage():
            yield


class VaultEnv(Env):
    name = "vault-transit"

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests import servers_bao

        if servers_bao.bao_binary() is None:
            raise RuntimeError("OpenBao (bao) not installed")
        for k in list(self.env):
            if k.startswith(("VAULT_", "BAO_")):
                del self.env[k]
        self.server = servers_bao.start_bao(self.work)
        self.env["VAULT_ADDR"] = self.server.addr
        self.env["VAULT_TOKEN"] = self.server.token
        os.environ["VAULT_ADDR"] = self.server.addr
        os.environ["VAULT_TOKEN"] = self.server.token

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def state_url(self) -> str:
        if not self.s.cloud_state:
            return super().state_url()
        return f"vault://secret/keymgr-soak-{self.work.name}?timeout=2"

    def backend_toml(self) -> str:
        return (
            f'[backends.vault]\ntype = "vault-transit"\nurl = "{self.server.addr}"\n'
            'mount = "transit"\nkey_prefix = "soak-"\ntimeout = 2\n'
        )

    def backend_name(self) -> str:
        return "vault"

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self.server.outage():
            yield


ENVS: dict[str, type[Env]] = {"file": Env, "aws-kms": KmsEnv, "vault-transit": VaultEnv}

# Providers in their own modules (they import Env from here).
from .env_azure import AzureEnv  # noqa: E402
from .env_gcs import GcsEnv  # noqa: E402
from .env_pkcs11 import Pkcs11Env  # noqa: E402

ENVS["azure"] = AzureEnv
ENVS["gcs"] = GcsEnv
ENVS["pkcs11"] = Pkcs11Env
