"""A real moto server (KMS and S3) for the AWS tests, as a pytest plugin.

``tests/conftest.py`` loads this module as a plugin when it exists. It gives:

- ``moto_server`` (session): one ``moto.server`` process per xdist (run by
  tests/moto_atomic.py: S3 conditional writes atomic, as on S3)
  worker, on a free loopback port, started once and stopped at the end. Each
  worker has its own server, so tests never see another worker's state.
- ``moto`` (function): resets the server (``POST /moto-api/reset``) and points
  the AWS SDK of this process *and of every CLI subprocess* at it through the
  environment: fake credentials, ``us-east-1``, no shared config files, no
  instance metadata lookups. It yields the :class:`MotoServer`.

Outages are simulated with ``MotoServer.outage()``: SIGSTOP the server, then
SIGCONT it. Why not stop and restart it: moto keeps everything in memory, so a
restart loses every key and object, which is not what an outage of KMS or S3
looks like (the keys are still there afterwards). Why not a TCP proxy: a stopped
process still has its listening socket, so the kernel completes new TCP
handshakes into the backlog and requests then hang until the client's read
timeout -- exactly the failure a blackholed network or an overloaded endpoint
gives, which is the slow, nasty case (a refused connection fails fast and is
the easy one). The state survives, so "server back" really means the same
server with the same keys.

Helpers for the AWS tests follow: config writers (``write_config``,
``kms_options``, ``s3_publisher_options``, ``s3_state_url``, with the FAST and
OUTAGE timeouts), a KMS inventory and ``assert_kms_keys`` (no key lost, none
untracked), and the independent token verification (``verify_token``: PyJWT
and jwcrypto must both accept).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws

from tests.conftest import SHORT_POLICY
from tests.servers_common import ServerProcess, launch

REGION = "us-east-1"
_START_TIMEOUT = 30.0




@dataclass
class MotoServer(ServerProcess):
    """A running ``moto.server`` process."""

    name = "moto server"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answers(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=timeout) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status





#: moto.server with S3's conditional writes made atomic, as they are on S3.
_ATOMIC = Path(__file__).resolve().parent / "moto_atomic.py"


def start_moto(log_dir: Path) -> MotoServer:
    def start(port: int) -> MotoServer:
        log_path = log_dir / f"moto-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(_ATOMIC), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MOTO_PORT": str(port)},
            )
        return MotoServer(proc, port, log_path)

    return launch(start, _START_TIMEOUT)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server per xdist worker (each worker is its own pytest session)."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


#: What the AWS SDK would otherwise pick up from the developer's machine.
_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture
def moto(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """A freshly reset moto server, and an environment that talks only to it."""
    if not moto_server.answers(timeout=5):
        pytest.fail(f"moto server {moto_server.url} is not answering")
    moto_server.reset()
    for name in _AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    # No shared config or credentials file from the machine running the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_server


# ------------------------------------------------------------- helpers for the AWS tests

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string for anything we write here


def add_table(home: Any, table: str, **fields: object) -> None:
    """Append ``[table]`` with ``fields`` to the home's config."""
    lines = [f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    home.config.write_text(home.config.read_text() + "\n" + "\n".join(lines) + "\n")


def set_fields(home: Any, table: str, **fields: object) -> None:
    """Rewrite existing fields of ``[table]`` in the home's config."""
    out, inside = [], False
    for line in home.config.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped == f"[{table}]"
        key = stripped.split("=", 1)[0].strip()
        if inside and key in fields:
            line = f"{key} = {toml_value(fields.pop(key))}"
        out.append(line)
    assert not fields, fields
    home.config.write_text("\n".join(out) + "\n")


#: Timeouts for the tests: shorter than the production defaults (5 s connect,
#: 10 s read, 5 attempts), long enough for moto making an RSA key on a busy machine.
FAST = {"connect_timeout": 2, "read_timeout": 5, "max_attempts": 3}
#: While a test's server is stopped: one attempt, a short read timeout, so each
#: request into the stopped server fails after about a second (FAST before and
#: after, where a slow answer on a busy machine must not fail a step).
OUTAGE = {"connect_timeout": 1, "read_timeout": 1, "max_attempts": 1}
JWKS_KEY = ".well-known/jwks.json"


def kms_options(url: str, **options: object) -> dict[str, object]:
    return {"type": "aws-kms", "endpoint_url": url, "region": REGION, **FAST, **options}


def s3_publisher_options(url: str, **options: object) -> dict[str, object]:
    return {"type": "s3", "key": JWKS_KEY, "endpoint_url": url, "region": REGION, **FAST,
            **options}


def s3_state_url(url: str, bucket: str, key: str = "keymgr/state.json", **params: object) -> str:
    from urllib.parse import urlencode

    query = {"endpoint_url": url, "region": REGION, **FAST, "lock_ttl": 5, **params}
    return f"s3://{bucket}/{key}?{urlencode(query)}"


def write_config(
    home: Any,
    *,
    backends: dict[str, dict[str, object]],
    publishers: dict[str, dict[str, object]],
    rings: dict[str, dict[str, object]],
    state: str = "file:state.json",
) -> None:
    """Replace the home's config: rings get SHORT_POLICY and every publisher unless they say."""
    lines = ["[daemon]", f"state = {toml_value(state)}", 'audit_log = "audit.jsonl"', ""]
    for kind, tables in (("backends", backends), ("publishers", publishers)):
        for name, fields in tables.items():
            lines += [f"[{kind}.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
            lines.append("")
    for name, fields in rings.items():
        merged = {**SHORT_POLICY, "publishers": sorted(publishers), **fields}
        lines += [f"[keyrings.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in merged.items()]
        lines.append("")
    home.config.write_text("\n".join(lines))


def use_kms(home: Any, url: str, alg: str, **options: object) -> None:
    """Add ``[backends.kms]`` (moto) and point ring ``default`` at it with SHORT_POLICY."""
    add_table(home, "backends.kms", **kms_options(url, **options))
    home.set_ring(backend="kms", algorithm=alg, **SHORT_POLICY)


def kms_client(url: str) -> Any:
    import boto3

    return boto3.client("kms", endpoint_url=url, region_name=REGION)


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name=REGION)


# ------------------------------------------------------------------- KMS inventory


def kms_inventory(kms: Any) -> dict[str, dict[str, Any]]:
    """Every key in moto: KeyId -> {"tags": {...}, "state": KeyState, "meta": ...}."""
    out: dict[str, dict[str, Any]] = {}
    for entry in kms.list_keys()["Keys"]:
        key_id = entry["KeyId"]
        meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
        if meta.get("KeyManager") == "AWS":
            continue
        tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]}
        out[key_id] = {"tags": tags, "state": meta["KeyState"], "meta": meta}
    return out


def kms_kid(kms: Any, key_id: str) -> str:
    from cryptography.hazmat.primitives import serialization

    from keymgr import jose

    der = kms.get_public_key(KeyId=key_id)["PublicKey"]
    public = serialization.load_der_public_key(der)
    return jose.thumbprint(jose.public_jwk(public))  # type: ignore[arg-type]


def aliases(kms: Any) -> dict[str, str]:
    return {
        a["AliasName"]: a.get("TargetKeyId", "")
        for a in kms.list_aliases()["Aliases"]
        if not a["AliasName"].startswith("alias/aws/")
    }


def backend_for(url: str, tmp_path: Path, **options: Any) -> Any:
    from keymgr.backends.aws.kms import KMSBackend

    opts: dict[str, Any] = {"type": "aws-kms", "endpoint_url": url, "region": REGION}
    opts.update(options)
    return KMSBackend("kms", opts, str(tmp_path))


def assert_kms_keys(
    url: str,
    tmp_path: Path,
    ring: str,
    live: set[str],
    dead: set[str],
    *,
    inventory: dict[str, dict[str, Any]] | None = None,
    backend: Any = None,
) -> None:
    """Every live kid has an enabled KMS key and every key of ours still enabled is live
    (none untracked); destroyed kids are pending deletion. ``inventory`` and
    ``backend`` may be shared by calls for several rings (each costs requests)."""
    backend = backend or backend_for(url, tmp_path)
    assert set(backend.list_keys(ring)) == live, (backend.list_keys(ring), live)
    kms = kms_client(url)
    states: dict[str, set[str]] = {}
    for key_id, v in (inventory if inventory is not None else kms_inventory(kms)).items():
        tags = v["tags"]
        ours = {"keymgr:managed": "true", "keymgr:prefix": "keymgr", "keymgr:ring": ring}
        if any(tags.get(k) != val for k, val in ours.items()):
            continue
        kid = tags.get("keymgr:kid") or kms_kid(kms, key_id)
        states.setdefault(kid, set()).add(v["state"])
    for kid, seen in states.items():
        assert seen == ({"Enabled"} if kid in live else {"PendingDeletion"}), (kid, seen)
    assert live | dead <= set(states), (live | dead) - set(states)


def cli_ok(home: Any, *args: str) -> list[str]:
    proc = home.run(*args)
    assert proc.returncode == 0, (
        f"keymgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


def error_lines(stderr: str) -> list[str]:
    """The user-facing error lines (structlog JSON lines are logs, not errors)."""
    return [line for line in stderr.splitlines() if line.startswith("keymgr: error:")]


def check_jwks(doc: dict[str, Any], alg: str) -> None:
    kids = [k["kid"] for k in doc["keys"]]
    assert kids == sorted(kids) and len(set(kids)) == len(kids), kids
    for j in doc["keys"]:
        assert not PRIVATE_MEMBERS & set(j), j
        assert j["alg"] == alg and j["use"] == "sig", j
        assert jwc_jwk.JWK(**j).thumbprint() == j["kid"], j


class StrictPSSRejected(Exception):
    """Strict verifiers reject a PS* token only because of its PSS salt length."""


def verify_token(doc: dict[str, Any], token: str, alg: str) -> dict[str, Any]:
    """Verify with PyJWT and with jwcrypto (both must agree); return the claims.

    For PS*, when both reject, the signature is checked once more with any salt
    length (``cryptography``, PSS.AUTO): if that passes, :class:`StrictPSSRejected`
    tells the caller it is moto's salt (the maximum), not keymgr, at fault.
    """
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg and header["typ"] == "JWT", header
    opts = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
    pyjwt_set, jwcrypto_set = _key_sets(json.dumps(doc, sort_keys=True))
    try:
        key = pyjwt_set[header["kid"]]
        c1 = jwt.decode(token, key.key, algorithms=[alg], options=opts)
        obj = jwc_jws.JWS()
        obj.deserialize(token)
        obj.allowed_algs = [alg]
        obj.verify(jwcrypto_set)
        c2 = json.loads(obj.payload)
    except (jwt.InvalidSignatureError, jwc_jws.InvalidJWSSignature):
        if alg.startswith("PS") and _pss_any_salt(doc, token, alg):
            raise StrictPSSRejected(header["kid"]) from None
        raise
    assert c1 == c2, (c1, c2)
    return c1


@functools.lru_cache(maxsize=8)
def _key_sets(doc_json: str) -> tuple[Any, Any]:
    """Each library's parsed key set of one JWKS document (parsed once per document)."""
    return jwt.PyJWKSet.from_json(doc_json), jwc_jwk.JWKSet.from_json(doc_json)


def _pss_any_salt(doc: dict[str, Any], token: str, alg: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in doc["keys"] if k["kid"] == kid)
    public = jwt.PyJWK(jwk).key
    head, payload, sig = token.split(".")
    digest = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}[alg[2:]]()
    try:
        public.verify(
            jose_b64decode(sig),
            f"{head}.{payload}".encode(),
            padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO),
            digest,
        )
    except InvalidSignature:
        return False
    return True


def jose_b64decode(s: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def sigv4_http_get(url: str, bucket: str, key: str) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP GET of an object, SigV4-signed by hand (no boto3 client).

    Signed because moto routes an *anonymous* GET of ``*/.well-known/jwks.json``
    to its Cognito emulation (a user pool's JWKS), not to S3.
    """
    import boto3
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    target = f"{url}/{bucket}/{key}"
    req = AWSRequest(method="GET", url=target)
    creds = boto3.session.Session().get_credentials()
    SigV4Auth(creds, "s3", REGION).add_auth(req)
    r = urllib.request.Request(target, headers=dict(req.headers.items()))
    with urllib.request.urlopen(r, timeout=10) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
