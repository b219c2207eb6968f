"""The AWS KMS backend against a real moto server, driven through the real CLI.

Tokens are verified by PyJWT and jwcrypto against the JWKS as published (the
file and the S3 object), never by keymgr's own code. Where moto behaves
differently from AWS KMS, the test says so in its skip reason and the exact
request keymgr sends is checked with botocore's ``Stubber`` on a real client
(it validates the request against the KMS service model and compares the
parameters; it replaces the server, not keymgr).

moto differences found (moto 5.2):

- RSASSA_PSS_SHA_*: moto signs with the maximum salt length; KMS uses a salt
  as long as the hash, which RFC 7518 3.5 requires and PyJWT/jwcrypto enforce.
- ECC_NIST_EDWARDS25519 (EdDSA) is not a key spec moto knows.
- moto signs with a disabled key (KMS answers DisabledException) and accepts
  DisableKey / ScheduleKeyDeletion on a key already pending deletion (KMS
  answers KMSInvalidStateException; keymgr treats both as "already done").
- moto accepts any PendingWindowInDays (KMS: 7 to 30).
- MessageType DIGEST is ignored by moto's Sign (it hashes the digest again).
- GetPublicKey omits ``KeySpec`` (only the deprecated ``CustomerMasterKeySpec``),
  and ListAliases ignores ``Limit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.session
import jwt
import pytest
from botocore.stub import ANY, Stubber
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from keymgr.backends.aws.kms import (
    SIGNING_ALGORITHMS,
    TAG_ALG,
    TAG_INTENT,
    TAG_KID,
    TAG_MANAGED,
    TAG_PREFIX,
    TAG_RING,
    KMSBackend,
)

from keymgr import jose
from keymgr.errors import BackendError, ConfigError
from tests.conftest import T0, A, G, P
from tests.servers_moto import (
    FAST,
    JWKS_KEY,
    OUTAGE,
    REGION,
    StrictPSSRejected,
    aliases,
    assert_kms_keys,
    backend_for,
    check_jwks,
    cli_ok,
    error_lines,
    kms_client,
    kms_inventory,
    kms_kid,
    kms_options,
    s3_client,
    s3_publisher_options,
    set_fields,
    ts,
    use_kms,
    verify_token,
    write_config,
)

ALGS = ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"]
KEY_SPECS = {
    "ES256": "ECC_NIST_P256",
    "ES384": "ECC_NIST_P384",
    "ES512": "ECC_NIST_P521",
    "EdDSA": "ECC_NIST_EDWARDS25519",
}
MOTO_NO_EDDSA = (
    "moto has no ECC_NIST_EDWARDS25519 key spec (AWS KMS does): EdDSA cannot rotate against "
    "moto; the exact CreateKey/Sign requests are checked with Stubber in "
    "test_generate_request_shape[EdDSA] and test_sign_request_shape[EdDSA]"
)
MOTO_PSS_SALT = (
    "moto signs RSASSA_PSS_SHA_* with the maximum salt length; AWS KMS uses a salt as long as "
    "the hash (RFC 7518 3.5), which PyJWT and jwcrypto require. PS* rings rotate three times "
    "in test_three_rotations_every_algorithm with a PSS check accepting any salt; the strict "
    "check of KMS-style signatures is test_sign_request_shape[PS*]"
)
MOTO_SIGNS_DISABLED = (
    "moto signs with a disabled KMS key; AWS KMS answers DisabledException (its mapping to a "
    "one-line BackendError is test_kms_errors_are_one_line)"
)
MOTO_ANY_WINDOW = (
    "moto schedules deletion with any PendingWindowInDays; AWS KMS refuses values outside "
    "7-30 (keymgr refuses them at config load; the exact request is test_destroy_request_shape)"
)
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"


# --------------------------------------------------------------------------- helpers


def state_keys(home: Any, ring: str = "default") -> list[dict[str, Any]]:
    doc = home.state()
    keys: list[dict[str, Any]] = doc["rings"].get(ring, {}).get("keys", [])
    return keys


def kids_in(home: Any, *states: str, ring: str = "default") -> list[str]:
    return [k["kid"] for k in state_keys(home, ring) if k["state"] in states]


def assert_kms_matches_state(home: Any, url: str, tmp_path: Path, ring: str = "default") -> None:
    """No key lost, none unknown: the backend holds exactly the live keys of state."""
    keys = state_keys(home, ring)
    live = {k["kid"] for k in keys if k["state"] != "destroyed"}
    dead = {k["kid"] for k in keys if k["state"] == "destroyed"}
    assert_kms_keys(url, tmp_path, ring, live, dead)


def audit_events(home: Any) -> list[dict[str, Any]]:
    """The audit log's events (the tests also run ``keymgr audit verify`` on it)."""
    lines = (home.dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def sign_in_process(home: Any, at: datetime, ring: str = "default") -> str:
    """What ``keymgr sign RING --ttl 1d --at AT`` does, without starting a process."""
    from keymgr.manager import KeyManager

    manager = KeyManager.from_config(home.config)
    return manager.sign(ring, {"sub": "aws-test"}, ttl=timedelta(days=1), now=at)


# --------------------------------------------------------------------------- rotations


MOTO_ALGS = [a for a in ALGS if a != "EdDSA"]


def test_three_rotations_every_algorithm(home: Any, moto: Any, tmp_path: Path) -> None:
    """One ring per algorithm moto supports, all rotated three times through the CLI.

    One home with nine rings rather than nine homes: the CLI runs (each starts
    Python and botocore) are what costs, and one pass rotates every ring. For
    the same reason ``destroy_after`` is ``P - A - G`` here, so a key is
    destroyed by the very pass that generates the next successor (three CLI
    runs per rotation instead of four). Each ring publishes to the JWKS file
    and to an S3 object; every live token is verified by PyJWT and jwcrypto
    against both documents as published, after every step. Tokens are signed
    through ``KeyManager.sign``, which is all ``keymgr sign`` does (the CLI
    command itself signs with KMS keys in test_s3.py), in this process: one
    start instead of 45. PS*: moto's PSS
    salt differs from KMS's (see MOTO_PSS_SALT); such tokens are checked with
    a salt-agnostic PSS verification here, and the strict check is
    ``test_strict_verification_against_moto``.
    """
    from keymgr.manager import KeyManager

    d = P - A - G
    s3 = s3_client(moto.url)
    s3.create_bucket(Bucket="jwks")
    rings = {alg.lower(): alg for alg in MOTO_ALGS}
    write_config(
        home,
        # RSA_2048 keeps moto's key generation fast (the default, RSA_3072, is
        # test_generate_request_shape[RS256]).
        backends={"kms": {**kms_options(moto.url), "rsa_key_spec": "RSA_2048"}},
        publishers={
            "site": {"type": "file", "path": "public/.well-known/jwks.json"},
            "cdn": {**s3_publisher_options(moto.url), "bucket": "jwks"},
        },
        rings={
            ring: {"backend": "kms", "algorithm": alg, "destroy_after": f"{d.days}d23h"}
            for ring, alg in rings.items()
        },
    )
    assert d == timedelta(days=7, hours=23)
    tokens: list[tuple[str, str, int]] = []  # (ring, token, exp)
    lenient: set[str] = set()
    manager = KeyManager.from_config(home.config)

    def published() -> dict[str, Any]:
        """The JWKS as published: the file and the S3 object, byte for byte the same."""
        body = s3.get_object(Bucket="jwks", Key=JWKS_KEY)["Body"].read()
        assert body == home.jwks_path.read_bytes()
        doc: dict[str, Any] = json.loads(body)
        kids = [k["kid"] for k in doc["keys"]]
        assert kids == sorted(kids) and len(set(kids)) == len(kids), kids
        for alg in MOTO_ALGS:
            check_jwks({"keys": [k for k in doc["keys"] if k["alg"] == alg]}, alg)
        return doc

    def verify_live(now: datetime) -> set[str]:
        doc = published()
        for ring, token, exp in tokens:
            if now.timestamp() < exp:
                try:
                    verify_token(doc, token, rings[ring])
                except StrictPSSRejected:
                    lenient.add(ring)
        return {k["kid"] for k in doc["keys"]}

    def issue(at: datetime, expect: dict[str, str]) -> None:
        for ring in sorted(rings):
            claims = {"sub": "aws-test", "jti": f"{ring}-{len(tokens)}"}
            token = manager.sign(ring, claims, ttl=timedelta(days=1), now=at)
            assert jwt.get_unverified_header(token)["kid"] == expect[ring]
            tokens.append((ring, token, int(at.timestamp()) + 86400))

    def by_state(*states: str) -> dict[str, str]:
        """ring -> the one kid in ``states`` (asserting there is exactly one)."""
        out = {}
        for ring in rings:
            (out[ring],) = kids_in(home, *states, ring=ring)
        return out

    def destroyed() -> dict[str, set[str]]:
        return {ring: set(kids_in(home, "destroyed", ring=ring)) for ring in rings}

    cli_ok(home, "reconcile", "--at", ts(T0))
    current = by_state("active")
    issue(T0, current)
    verify_live(T0)
    head = s3.head_object(Bucket="jwks", Key=JWKS_KEY)
    assert head["ContentType"] == "application/json"
    assert head["CacheControl"] == "public, max-age=300"
    t, previous = T0, None
    for _ in range(3):
        cli_ok(home, "reconcile", "--at", ts(t + P - A))
        successor = by_state("published")
        if previous is not None:  # expired at t - P + P + G, destroyed D later: now
            assert all(previous[r] in dead for r, dead in destroyed().items())
        issue(t + P - A, current)  # the current keys still sign; live past the promotion
        assert set(current.values()) | set(successor.values()) <= verify_live(t + P - A)

        cli_ok(home, "reconcile", "--at", ts(t + P))
        assert by_state("active") == successor
        assert by_state("retired") == current
        verify_live(t + P)  # tokens the now retired keys signed an hour ago

        cli_ok(home, "reconcile", "--at", ts(t + P + G))
        assert by_state("expired") == current
        assert not set(current.values()) & verify_live(t + P + G)
        previous, current, t = current, successor, t + P
    cli_ok(home, "reconcile", "--at", ts(t + G + d))
    assert all(len(dead) == 3 and previous[r] in dead for r, dead in destroyed().items())
    issue(t + G + d, current)  # the third successors sign
    verify_live(t + G + d)
    cli_ok(home, "audit", "verify")
    inventory = kms_inventory(kms_client(moto.url))
    backend = backend_for(moto.url, tmp_path)
    for ring in rings:
        keys = state_keys(home, ring)
        live = {k["kid"] for k in keys if k["state"] != "destroyed"}
        dead = {k["kid"] for k in keys if k["state"] == "destroyed"}
        assert len(live) == 2 and len(dead) == 3  # that last pass made a 4th successor
        assert_kms_keys(
            moto.url, tmp_path, ring, live, dead, inventory=inventory, backend=backend
        )
    # moto's PSS salt is the only reason a strict verifier rejected anything.
    assert lenient <= {"ps256", "ps384", "ps512"}, lenient


def _moto_key(moto: Any, tmp_path: Path, alg: str) -> tuple[KMSBackend, str]:
    backend = backend_for(moto.url, tmp_path, rsa_key_spec="RSA_2048")
    try:
        return backend, backend.generate("default", alg).kid
    except BackendError as e:
        if alg == "EdDSA" and "ECC_NIST_EDWARDS25519" in str(e):
            pytest.skip(MOTO_NO_EDDSA)
        raise


@pytest.mark.parametrize("alg", ["PS256", "PS384", "PS512", "EdDSA"])
def test_strict_verification_against_moto(moto: Any, tmp_path: Path, alg: str) -> None:
    """The algorithms where moto and KMS differ, against moto: skipped while they do."""
    backend, kid = _moto_key(moto, tmp_path, alg)
    jwk = backend.public_jwk("default", kid)
    doc = {"keys": [{**jwk, "kid": kid, "alg": alg, "use": "sig"}]}
    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    payload = {"sub": "strict", "jti": alg}
    token = jose.encode_compact(header, payload, backend.signer("default", kid, alg))
    try:
        assert verify_token(doc, token, alg) == payload
    except StrictPSSRejected:
        pytest.skip(MOTO_PSS_SALT)


# ------------------------------------------------------------ request shapes (Stubber)


def _stubbed(backend: KMSBackend) -> Stubber:
    """A real botocore KMS client with a Stubber: it checks each request's parameters."""
    client = botocore.session.get_session().create_client(
        "kms", region_name=REGION, aws_access_key_id="AKIDSTUB", aws_secret_access_key="stub"
    )
    backend._client = client  # the test seam: the backend uses whatever client it holds
    stubber = Stubber(client)
    stubber.activate()
    return stubber


def _local_key(alg: str, bits: int = 2048) -> jose.PrivateKey:
    return jose.generate_private_key(alg, rsa_bits=bits)


def _der(key: jose.PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kms_style_signature(key: jose.PrivateKey, alg: str, message: bytes, digest: bool) -> bytes:
    """What AWS KMS returns: DER for ECDSA, PSS salt = hash length, raw Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    h = jose.hash_for(alg)
    algo: Any = utils.Prehashed(h) if digest else h
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(algo))
    assert isinstance(key, rsa.RSAPrivateKey)
    if alg.startswith("PS"):
        pad: Any = padding.PSS(mgf=padding.MGF1(jose.hash_for(alg)), salt_length=h.digest_size)
    else:
        pad = padding.PKCS1v15()
    return key.sign(message, pad, algo)


KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ARN = f"arn:aws:kms:{REGION}:123456789012:key/{KEY_ID}"


def _our_tags(ring: str, alg: str, kid: str | None = None) -> list[dict[str, str]]:
    tags = [
        {"TagKey": TAG_MANAGED, "TagValue": "true"},
        {"TagKey": TAG_PREFIX, "TagValue": "keymgr"},
        {"TagKey": TAG_RING, "TagValue": ring},
        {"TagKey": TAG_ALG, "TagValue": alg},
    ]
    if kid is not None:
        tags.append({"TagKey": TAG_KID, "TagValue": kid})
    return tags


@pytest.mark.parametrize("alg", ALGS)
def test_generate_request_shape(alg: str, tmp_path: Path) -> None:
    ring = "api.v2"  # a '.' becomes '/' in the alias
    options = {"rsa_key_spec": "RSA_2048"} if alg != "RS256" else {}
    backend = KMSBackend("kms", {"type": "aws-kms", "region": REGION, **options}, str(tmp_path))
    key = _local_key(alg)
    jwk = jose.public_jwk(key.public_key())
    kid = jose.thumbprint(jwk)
    spec = KEY_SPECS.get(alg, "RSA_3072" if alg == "RS256" else "RSA_2048")
    stub = _stubbed(backend)
    stub.add_response(
        "create_key",
        {"KeyMetadata": {"KeyId": KEY_ID, "Arn": KEY_ARN}},
        {
            "KeyUsage": "SIGN_VERIFY",
            "KeySpec": spec,
            "Description": ANY,
            "Tags": _our_tags(ring, alg),
        },
    )
    stub.add_response(
        "get_public_key",
        {
            "KeyId": KEY_ARN,
            "PublicKey": _der(key),
            "KeySpec": spec,
            "KeyUsage": "SIGN_VERIFY",
            "SigningAlgorithms": [SIGNING_ALGORITHMS[alg]],
        },
        {"KeyId": KEY_ID},
    )
    stub.add_response(
        "tag_resource", {}, {"KeyId": KEY_ID, "Tags": [{"TagKey": TAG_KID, "TagValue": kid}]}
    )
    stub.add_response(
        "create_alias", {}, {"AliasName": f"alias/keymgr/api/v2/{kid}", "TargetKeyId": KEY_ID}
    )
    generated = backend.generate(ring, alg)
    stub.assert_no_pending_responses()
    assert generated.kid == kid and generated.public_jwk == jwk


def _stub_resolution(stub: Stubber, key: jose.PrivateKey, alg: str, kid: str) -> None:
    stub.add_response(
        "get_public_key",
        {
            "KeyId": KEY_ARN,
            "PublicKey": _der(key),
            "KeyUsage": "SIGN_VERIFY",
            "SigningAlgorithms": [SIGNING_ALGORITHMS[alg]],
        },
        {"KeyId": f"alias/keymgr/default/{kid}"},
    )
    stub.add_response(
        "list_resource_tags",
        {"Tags": _our_tags("default", alg, kid), "Truncated": False},
        {"KeyId": KEY_ID},
    )


def _jwks_for(key: jose.PrivateKey, alg: str) -> tuple[str, dict[str, Any]]:
    jwk = jose.public_jwk(key.public_key())
    kid = jose.thumbprint(jwk)
    return kid, {"keys": [{**jwk, "kid": kid, "alg": alg, "use": "sig"}]}


@pytest.mark.parametrize("alg", ALGS)
def test_sign_request_shape(alg: str, tmp_path: Path) -> None:
    """One Sign request: KeyId, MessageType RAW, the KMS SigningAlgorithm for alg.

    The stub answers what AWS KMS would (DER ECDSA, PSS salt = hash length),
    and PyJWT and jwcrypto must accept the resulting token.
    """
    backend = KMSBackend("kms", {"type": "aws-kms", "region": REGION}, str(tmp_path))
    key = _local_key(alg)
    kid, doc = _jwks_for(key, alg)
    stub = _stubbed(backend)
    _stub_resolution(stub, key, alg, kid)
    signer = backend.signer("default", kid, alg)
    stub.assert_no_pending_responses()

    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    payload = {"sub": "stub", "jti": alg}
    data = jose.signing_input(header, payload)
    stub.add_response(
        "sign",
        {
            "KeyId": KEY_ARN,
            "Signature": _kms_style_signature(key, alg, data, digest=False),
            "SigningAlgorithm": SIGNING_ALGORITHMS[alg],
        },
        {
            "KeyId": KEY_ID,
            "Message": data,
            "MessageType": "RAW",
            "SigningAlgorithm": SIGNING_ALGORITHMS[alg],
        },
    )
    token = jose.encode_compact(header, payload, signer)
    stub.assert_no_pending_responses()
    assert verify_token(doc, token, alg) == payload


@pytest.mark.parametrize("alg", ["ES256", "ES512", "RS384", "PS512"])
def test_long_signing_input_goes_as_digest(alg: str, tmp_path: Path) -> None:
    backend = KMSBackend("kms", {"type": "aws-kms", "region": REGION}, str(tmp_path))
    key = _local_key(alg)
    kid, doc = _jwks_for(key, alg)
    stub = _stubbed(backend)
    _stub_resolution(stub, key, alg, kid)
    signer = backend.signer("default", kid, alg)
    hash_name = {"256": "sha256", "384": "sha384", "512": "sha512"}[alg[2:]]

    def expect(message: bytes, message_type: str, signed: bytes, digest: bool) -> None:
        stub.add_response(
            "sign",
            {
                "KeyId": KEY_ARN,
                "Signature": _kms_style_signature(key, alg, signed, digest),
                "SigningAlgorithm": SIGNING_ALGORITHMS[alg],
            },
            {
                "KeyId": KEY_ID,
                "Message": message,
                "MessageType": message_type,
                "SigningAlgorithm": SIGNING_ALGORITHMS[alg],
            },
        )

    exact = b"x" * 4096
    expect(exact, "RAW", exact, digest=False)
    signer(exact)
    over = b"x" * 4097
    over_digest = hashlib.new(hash_name, over).digest()
    expect(over_digest, "DIGEST", over_digest, digest=True)
    signer(over)

    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    payload = {"sub": "big", "blob": "y" * 6000}
    data = jose.signing_input(header, payload)
    digest = hashlib.new(hash_name, data).digest()
    expect(digest, "DIGEST", digest, digest=True)
    token = jose.encode_compact(header, payload, signer)
    stub.assert_no_pending_responses()
    assert verify_token(doc, token, alg) == payload


def test_eddsa_refuses_long_input_without_a_request(tmp_path: Path) -> None:
    backend = KMSBackend("kms", {"type": "aws-kms", "region": REGION}, str(tmp_path))
    key = _local_key("EdDSA")
    kid, _ = _jwks_for(key, "EdDSA")
    stub = _stubbed(backend)
    _stub_resolution(stub, key, "EdDSA", kid)
    signer = backend.signer("default", kid, "EdDSA")
    with pytest.raises(BackendError) as info:
        signer(b"z" * 4097)
    msg = str(info.value)
    assert msg.startswith("backend kms (aws-kms): Sign: EdDSA signing input is 4097 bytes")
    assert "4096" in msg and "\n" not in msg
    stub.assert_no_pending_responses()  # and no Sign was queued: none was sent


def test_kms_errors_are_one_line(tmp_path: Path) -> None:
    backend = KMSBackend("kms", {"type": "aws-kms", "region": REGION}, str(tmp_path))
    key = _local_key("ES256")
    kid, _ = _jwks_for(key, "ES256")
    stub = _stubbed(backend)
    _stub_resolution(stub, key, "ES256", kid)
    signer = backend.signer("default", kid, "ES256")
    stub.add_client_error(
        "sign", "DisabledException", f"{KEY_ARN} is disabled.\nsecond line", http_status_code=400
    )
    with pytest.raises(BackendError) as info:
        signer(b"abc")
    assert str(info.value) == (
        f"backend kms (aws-kms): Sign: DisabledException: {KEY_ARN} is disabled. second line"
    )
    stub.add_client_error(
        "list_aliases",
        "AccessDeniedException",
        "User: arn:aws:iam::123456789012:user/ops with key AKIAIOSFODNN7EXAMPLE is not "
        "authorized to perform: kms:ListAliases Credential=AKIAIOSFODNN7EXAMPLE/2031/x",
        http_status_code=400,
    )
    with pytest.raises(BackendError) as info:
        backend.check()
    msg = str(info.value)
    assert msg.startswith("backend kms (aws-kms): ListAliases: AccessDeniedException: User:")
    assert "AKIAIOSFODNN7EXAMPLE" not in msg and "\n" not in msg, msg


# ------------------------------------------------------------ requests, orphans, destroy


def test_exactly_one_kms_request_per_signature(home: Any, moto: Any) -> None:
    from keymgr.manager import KeyManager

    use_kms(home, moto.url, "ES256")
    cli_ok(home, "reconcile", "--at", ts(T0))
    manager = KeyManager.from_config(home.config)
    backend = manager.config.backends["kms"]
    assert isinstance(backend, KMSBackend)
    calls: list[str] = []
    sends: list[str] = []
    events = backend.client.meta.events
    events.register("before-call.kms", lambda model, **_: calls.append(model.name))
    events.register("before-send.kms", lambda request, **_: sends.append(request.url))

    manager.sign("default", {"sub": "warm-up"}, ttl=timedelta(hours=1), now=T0)
    # The first signature also resolves the key (alias -> key id, tags), once.
    assert calls == ["GetPublicKey", "ListResourceTags", "Sign"], calls
    calls.clear()
    sends.clear()
    doc = json.loads(home.jwks_path.read_text())
    for i in range(10):
        token = manager.sign("default", {"sub": "n", "jti": str(i)}, ttl=timedelta(hours=1), now=T0)
        assert verify_token(doc, token, "ES256")["jti"] == str(i)
    assert calls == ["Sign"] * 10, calls
    assert len(sends) == 10, sends  # one HTTP request each: no retry, no extra lookups


def _create_raw_key(kms: Any, spec: str, tags: dict[str, str]) -> str:
    resp = kms.create_key(
        KeyUsage="SIGN_VERIFY",
        KeySpec=spec,
        Tags=[{"TagKey": k, "TagValue": v} for k, v in tags.items()],
    )
    return str(resp["KeyMetadata"]["KeyId"])


def test_orphans_adopted_or_destroyed_and_foreign_keys_never_touched(
    home: Any, moto: Any, tmp_path: Path
) -> None:
    use_kms(home, moto.url, "ES256")
    kms = kms_client(moto.url)
    # Keys keymgr must never touch, whatever their tags or aliases say.
    foreign = {
        "untagged": _create_raw_key(kms, "ECC_NIST_P256", {}),
        "ring tag, not managed": _create_raw_key(
            kms, "ECC_NIST_P256", {TAG_RING: "default", TAG_PREFIX: "keymgr"}
        ),
        "managed=false": _create_raw_key(
            kms, "ECC_NIST_P256", {TAG_MANAGED: "false", TAG_RING: "default"}
        ),
        "other prefix": _create_raw_key(
            kms, "ECC_NIST_P256", {TAG_MANAGED: "true", TAG_PREFIX: "other", TAG_RING: "default"}
        ),
        "other ring": _create_raw_key(
            kms, "ECC_NIST_P256", {TAG_MANAGED: "true", TAG_PREFIX: "keymgr", TAG_RING: "web"}
        ),
    }
    # An alias in keymgr's namespace pointing at a foreign key.
    impostor = foreign["untagged"]
    kms.create_alias(
        AliasName=f"alias/keymgr/default/{kms_kid(kms, impostor)}", TargetKeyId=impostor
    )
    before = kms_inventory(kms)

    # A real crash right after CreateKey: the key has its ring tags, no kid, no alias.
    crashed = home.run(
        "reconcile", "--at", ts(T0), env=home.env(KEYMGR_CRASH_AT="aws_kms.after_create_key")
    )
    assert crashed.returncode == -9, crashed.stderr
    new = [k for k in kms_inventory(kms) if k not in before]
    assert len(new) == 1
    orphan = new[0]
    tags = kms_inventory(kms)[orphan]["tags"]
    assert tags[TAG_MANAGED] == "true" and tags[TAG_RING] == "default" and TAG_KID not in tags
    assert orphan not in aliases(kms).values()
    orphan_kid = kms_kid(kms, orphan)
    # The crash left the write-ahead intent open, and the key carries its nonce.
    nonce = json.loads((home.dir / "state.json").read_text())["intents"]["default"]["nonce"]
    assert tags[TAG_INTENT] == nonce
    # And an orphan of that intent that cannot serve this ring's ES256 policy.
    wrong = _create_raw_key(
        kms,
        "ECC_NIST_P384",
        {
            TAG_MANAGED: "true",
            TAG_PREFIX: "keymgr",
            TAG_RING: "default",
            TAG_ALG: "ES384",
            TAG_INTENT: nonce,
        },
    )
    wrong_kid = kms_kid(kms, wrong)

    out = cli_ok(home, "reconcile", "--at", ts(T0))
    assert any("key.adopted" in line and orphan_kid in line for line in out), out
    assert any("key.orphan_destroyed" in line and wrong_kid in line for line in out), out
    assert kids_in(home, "active") == [orphan_kid]
    events = audit_events(home)
    assert [e["kid"] for e in events if e["event"] == "key.adopted"] == [orphan_kid]
    assert [e["kid"] for e in events if e["event"] == "key.orphan_destroyed"] == [wrong_kid]
    inventory = kms_inventory(kms)
    assert inventory[wrong]["state"] == "PendingDeletion"
    assert inventory[orphan]["state"] == "Enabled"

    # The adopted key signs, and its interrupted setup (kid tag, alias) is completed.
    token = sign_in_process(home, T0)
    verify_token(json.loads(home.jwks_path.read_text()), token, "ES256")
    assert aliases(kms).get(f"alias/keymgr/default/{orphan_kid}") == orphan
    assert kms_inventory(kms)[orphan]["tags"][TAG_KID] == orphan_kid

    # A whole rotation later (generate, promote, expire, destroy), foreign keys are intact.
    # destroy_after 0s: expiry and destruction in one pass, one CLI run fewer.
    set_fields(home, "keyrings.default", destroy_after="0s")
    for at in (T0 + P - A, T0 + P, T0 + P + G):
        cli_ok(home, "reconcile", "--at", ts(at))
    assert orphan_kid in kids_in(home, "destroyed")
    after = kms_inventory(kms)
    for what, key_id in foreign.items():
        assert after[key_id]["state"] == "Enabled", what
        assert after[key_id]["tags"] == before[key_id]["tags"], what
    assert aliases(kms)[f"alias/keymgr/default/{kms_kid(kms, impostor)}"] == impostor
    assert_kms_matches_state(home, moto.url, tmp_path)

    # A key tagged as keymgr's for this ring that no intent accounts for (made
    # by a lost state, or by someone else) is never destroyed: generate stops.
    stray = _create_raw_key(
        kms, "ECC_NIST_P256", {TAG_MANAGED: "true", TAG_PREFIX: "keymgr", TAG_RING: "default"}
    )
    proc = home.run("reconcile", "--at", ts(T0 + 2 * P - A))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "keymgr adopt default" in proc.stderr and kms_kid(kms, stray) in proc.stderr
    assert kms_inventory(kms)[stray]["state"] == "Enabled"
    cli_ok(home, "audit", "verify")


def test_keymgr_refuses_a_foreign_key_behind_its_alias(moto: Any, tmp_path: Path) -> None:
    kms = kms_client(moto.url)
    foreign = _create_raw_key(kms, "ECC_NIST_P256", {})
    kid = kms_kid(kms, foreign)
    kms.create_alias(AliasName=f"alias/keymgr/default/{kid}", TargetKeyId=foreign)
    backend = backend_for(moto.url, tmp_path)
    assert backend.list_keys("default") == []
    for attempt in (
        lambda: backend.signer("default", kid, "ES256"),
        lambda: backend.destroy("default", kid),
    ):
        with pytest.raises(BackendError, match=r"not (tagged|a keymgr key)"):
            attempt()
    assert kms.describe_key(KeyId=foreign)["KeyMetadata"]["KeyState"] == "Enabled"


def test_destroy_schedules_deletion_with_the_window(moto: Any, tmp_path: Path) -> None:
    kms = kms_client(moto.url)
    for window in (7, None):
        options = {} if window is None else {"deletion_window_days": window}
        backend = backend_for(moto.url, tmp_path, **options)
        gen = backend.generate("default", "ES256")
        signer = backend.signer("default", gen.kid, "ES256")
        signer(b"still usable")
        key_id = aliases(kms)[f"alias/keymgr/default/{gen.kid}"]
        backend.destroy("default", gen.kid)
        meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
        assert meta["KeyState"] == "PendingDeletion" and not meta["Enabled"]
        expected = datetime.now(UTC) + timedelta(days=window or 30)
        assert abs(meta["DeletionDate"] - expected) < timedelta(minutes=10), meta
        assert f"alias/keymgr/default/{gen.kid}" not in aliases(kms)
        # Idempotent, in this process and in a fresh one; never used again.
        backend.destroy("default", gen.kid)
        backend_for(moto.url, tmp_path).destroy("default", gen.kid)
        assert backend.list_keys("default") == []
        for b in (backend, backend_for(moto.url, tmp_path)):
            with pytest.raises(BackendError, match="not found"):
                b.signer("default", gen.kid, "ES256")
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["DeletionDate"] == meta["DeletionDate"]


def test_destroy_request_shape(tmp_path: Path) -> None:
    """DisableKey, then ScheduleKeyDeletion with the configured window, then DeleteAlias;
    only after the key's tags prove it is keymgr's key of this ring and kid."""
    backend = KMSBackend(
        "kms", {"type": "aws-kms", "region": REGION, "deletion_window_days": 9}, str(tmp_path)
    )
    kid = jose.thumbprint(jose.public_jwk(_local_key("ES256").public_key()))
    alias = f"alias/keymgr/default/{kid}"
    stub = _stubbed(backend)
    stub.add_response(
        "describe_key", {"KeyMetadata": {"KeyId": KEY_ID, "KeyState": "Enabled"}},
        {"KeyId": alias},
    )
    stub.add_response(
        "list_resource_tags",
        {"Tags": _our_tags("default", "ES256", kid), "Truncated": False},
        {"KeyId": KEY_ID},
    )
    stub.add_response("disable_key", {}, {"KeyId": KEY_ID})
    stub.add_response(
        "schedule_key_deletion",
        {"KeyId": KEY_ARN, "KeyState": "PendingDeletion", "PendingWindowInDays": 9},
        {"KeyId": KEY_ID, "PendingWindowInDays": 9},
    )
    stub.add_response("delete_alias", {}, {"AliasName": alias})
    backend.destroy("default", kid)
    stub.assert_no_pending_responses()


def test_kms_refuses_an_out_of_range_window(moto: Any, tmp_path: Path) -> None:
    """Config load refuses a window outside 7-30 days (test_invalid_options_are_config_errors);
    were one to reach KMS anyway, its refusal must be a one-line error and lose nothing."""
    backend = backend_for(moto.url, tmp_path)
    gen = backend.generate("default", "ES256")
    backend.deletion_window_days = 3  # past the config validation, on purpose
    try:
        backend.destroy("default", gen.kid)
    except BackendError as e:
        assert str(e).startswith("backend kms (aws-kms): ScheduleKeyDeletion: "), e
        assert "\n" not in str(e)
        return
    pytest.skip(MOTO_ANY_WINDOW)


def test_disabled_key_cannot_sign(moto: Any, tmp_path: Path) -> None:
    backend = backend_for(moto.url, tmp_path)
    gen = backend.generate("default", "ES256")
    signer = backend.signer("default", gen.kid, "ES256")
    kms = kms_client(moto.url)
    kms.disable_key(KeyId=aliases(kms)[f"alias/keymgr/default/{gen.kid}"])
    try:
        signer(b"payload")
    except BackendError as e:
        assert str(e).startswith("backend kms (aws-kms): Sign: DisabledException"), e
        return
    pytest.skip(MOTO_SIGNS_DISABLED)


# --------------------------------------------------------------------------- options and errors


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deletion_window_days", 6),
        ("deletion_window_days", 31),
        ("deletion_window_days", "30"),
        ("deletion_window_days", True),
        ("rsa_key_spec", "RSA_1024"),
        ("alias_prefix", "aws"),
        ("alias_prefix", "a//b"),
        ("alias_prefix", "x/"),
        ("alias_prefix", "has space"),
        ("region", "EU WEST"),
        ("endpoint_url", "ftp://example"),
        ("connect_timeout", 0),
        ("read_timeout", "10s"),
        ("max_attempts", 0),
        ("max_attempts", 2.5),
        ("profile", ""),
        ("regoin", "eu-west-1"),
    ],
)
def test_invalid_options_are_config_errors(field: str, value: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        KMSBackend("kms", {"type": "aws-kms", field: value}, str(tmp_path))
    assert str(info.value).startswith(f"backends.kms.{field}: "), info.value


def test_config_check_names_the_field_and_stays_offline(home: Any, moto: Any) -> None:
    use_kms(home, "http://127.0.0.1:9", "ES256", deletion_window_days=3)  # port 9: nothing
    proc = home.run("config", "check")
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(home.config) in line and "backends.kms.deletion_window_days" in line, line
    # A valid config checks without touching the (unreachable) endpoint or importing boto3.
    text = home.config.read_text().replace("deletion_window_days = 3", "deletion_window_days = 7")
    home.config.write_text(text)
    code = (
        "import sys; from keymgr.config import load_config; "
        f"load_config({str(home.config)!r}); "
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=home.dir, env=home.env())
    cli_ok(home, "config", "check")


def test_transport_and_credential_errors_are_one_line(
    moto: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    backend_for(moto.url, tmp_path).check()  # reachable, credentials accepted
    closed = backend_for("http://127.0.0.1:9", tmp_path, max_attempts=1, connect_timeout=1)
    with pytest.raises(BackendError) as info:
        closed.check()
    msg = str(info.value)
    assert msg.startswith("backend kms (aws-kms): ListAliases: Could not connect"), msg
    assert SECRET not in msg and "\n" not in msg
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(BackendError) as info:
        backend_for(moto.url, tmp_path).check()
    assert str(info.value) == (
        "backend kms (aws-kms): ListAliases: no AWS credentials found "
        "(environment, profile, or instance/container role)"
    )


# --------------------------------------------------------------------------- outage


def test_kms_outage_mid_rotation(home: Any, moto: Any, tmp_path: Path) -> None:
    """KMS unreachable when the successor is due, and again when the old key is due for
    destruction: exit 1 with one line naming backend and operation, nothing promoted,
    nothing lost; once KMS is back the rotation completes."""
    use_kms(home, moto.url, "ES256")
    cli_ok(home, "reconcile", "--at", ts(T0))
    (first,) = kids_in(home, "active")
    token = sign_in_process(home, T0 + P - 2 * A)  # still live after the rotation below
    jwks_before = home.jwks_path.read_bytes()

    def failing(*args: str) -> str:
        proc = home.run(*args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        (line,) = error_lines(proc.stderr)
        assert "unreachable" in line or "timeout" in line.lower(), line
        return line

    @contextlib.contextmanager
    def outage() -> Iterator[None]:
        set_fields(home, "backends.kms", **OUTAGE)
        with moto.outage():
            yield
        set_fields(home, "backends.kms", **FAST)

    with outage():
        line = failing("reconcile", "--at", ts(T0 + P - A))  # no successor can be made
        assert "backend kms (aws-kms): ListAliases: " in line, line
        assert [(k["kid"], k["state"]) for k in state_keys(home)] == [(first, "active")]
        assert home.jwks_path.read_bytes() == jwks_before
        line = failing("sign", "default", "--claims", "{}", "--at", ts(T0 + P))
        assert "backend kms (aws-kms): GetPublicKey: " in line, line

    resumed = T0 + P + timedelta(minutes=5)
    cli_ok(home, "reconcile", "--at", ts(resumed))
    (second,) = kids_in(home, "published")
    cli_ok(home, "reconcile", "--at", ts(resumed + A))
    assert kids_in(home, "active") == [second] and kids_in(home, "retired") == [first]
    verify_token(json.loads(home.jwks_path.read_text()), token, "ES256")

    # destroy_after 0s: the pass that expires the old key also destroys it, or fails to.
    set_fields(home, "keyrings.default", destroy_after="0s")
    with outage():
        line = failing("reconcile", "--at", ts(resumed + A + G))
        assert "backend kms (aws-kms): DescribeKey: " in line, line
        assert kids_in(home, "expired") == [first]  # expired (no KMS needed), not destroyed
    cli_ok(home, "reconcile", "--at", ts(resumed + A + G + timedelta(minutes=1)))
    assert kids_in(home, "destroyed") == [first]
    failures = [e for e in audit_events(home) if e["event"] == "backend.failed"]
    assert len(failures) == 2, failures
    cli_ok(home, "audit", "verify")
    assert_kms_matches_state(home, moto.url, tmp_path)


def test_client_config_retries_and_timeouts(tmp_path: Path) -> None:
    """botocore "standard" retries and explicit timeouts, from the options (no I/O)."""
    backend = KMSBackend(
        "kms",
        {"type": "aws-kms", "region": REGION, "connect_timeout": 2.5, "read_timeout": 7,
         "max_attempts": 4},
        str(tmp_path),
    )
    config = backend.client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert (config.connect_timeout, config.read_timeout) == (2.5, 7.0)
    default = KMSBackend("kms", {"type": "aws-kms", "region": REGION}, str(tmp_path))
    config = default.client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert (config.connect_timeout, config.read_timeout) == (5.0, 10.0)


# --------------------------------------------------------------------------- IAM policy


def test_iam_policy_is_valid_and_covers_every_call() -> None:
    """deploy/aws/iam-policy.json: valid JSON, no wildcard actions, and an Allow for every
    KMS and S3 operation the code calls (found in the source, so a new call fails here)."""
    import re

    repo = Path(__file__).resolve().parent.parent
    policy = json.loads((repo / "deploy" / "aws" / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    allowed: set[str] = set()
    sids = []
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and st.get("Sid"), st
        sids.append(st["Sid"])
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert all(re.fullmatch(r"(kms|s3):[A-Za-z]+", a) for a in actions), actions
        allowed.update(actions)
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if resources == ["*"]:  # unscoped only where IAM allows nothing narrower
            assert set(actions) <= {"kms:CreateKey", "kms:TagResource", "kms:ListKeys",
                                    "kms:ListAliases"}, st
    assert len(sids) == len(set(sids))
    kms_source = (repo / "backends" / "aws" / "kms.py").read_text()
    kms_ops = set(re.findall(r'_(?:call|paginate)\(\s*"([A-Za-z]+)"', kms_source)) | {"Sign"}
    assert {"CreateKey", "ScheduleKeyDeletion", "ListResourceTags", "ListKeys"} <= kms_ops
    # The S3 publisher and the S3 state store's adapter together.
    s3_source = "".join(
        (repo / "backends" / "aws" / name).read_text() for name in ("publisher.py", "store.py")
    )
    s3_calls = set(re.findall(r"\.([a-z_]+_object)\(", s3_source))
    s3_actions = {"get_object": "s3:GetObject", "head_object": "s3:GetObject",
                  "put_object": "s3:PutObject", "delete_object": "s3:DeleteObject"}
    assert s3_calls == set(s3_actions), s3_calls
    needed = {f"kms:{op}" for op in kms_ops} | set(s3_actions.values()) | {"s3:ListBucket"}
    assert needed <= allowed, needed - allowed


def test_iam_policy_tag_permissions_cannot_relabel_keys() -> None:
    """Tags are access here (every use of a key hangs on aws:ResourceTag), so:
    no UntagResource at all; TagResource on ``*`` only for CreateKey's own tags
    (keymgr's request tags and tag keys, and never on a key already keymgr's);
    anywhere else only the kid tag, only on keys that already carry keymgr's tags.
    The tags the code sets must all be allowed (a new one fails here first)."""
    import re

    repo = Path(__file__).resolve().parent.parent
    policy = json.loads((repo / "deploy" / "aws" / "iam-policy.json").read_text())
    source = (repo / "backends" / "aws" / "kms.py").read_text()
    code_tags = dict(re.findall(r'^(TAG_[A-Z]+) = "([^"]+)"', source, re.M))
    kid_tag = code_tags.pop("TAG_KID")
    creation_tags = set(code_tags.values())
    assert {"keymgr:managed", "keymgr:prefix", "keymgr:ring"} <= creation_tags
    owned = {"aws:ResourceTag/keymgr:managed": "true", "aws:ResourceTag/keymgr:prefix": "keymgr"}

    tagging = []
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert not {"kms:UntagResource", "kms:Tag*", "kms:*", "*"} & set(actions), st
        if "kms:CreateKey" in actions:
            keys = st["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]
            assert creation_tags <= set(keys), creation_tags - set(keys)
        if "kms:TagResource" not in actions:
            continue
        assert actions == ["kms:TagResource"], st
        tagging.append(st["Sid"])
        cond = st["Condition"]
        resource_conds = {k for op in cond.values() for k in op if k.startswith("aws:ResourceTag/")}
        assert resource_conds, f"{st['Sid']}: TagResource without an aws:ResourceTag condition"
        keys = set(cond["ForAllValues:StringEquals"]["aws:TagKeys"])
        assert all(k.startswith("keymgr:") for k in keys), keys
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if "*" in resources:
            assert resources == ["*"], st
            assert cond["StringEquals"] == {
                "aws:RequestTag/keymgr:managed": "true", "aws:RequestTag/keymgr:prefix": "keymgr"
            }, st
            assert creation_tags <= keys and kid_tag not in keys, keys
            # Not a key that already is keymgr's: no re-labelling of ring, prefix or alg.
            assert cond["Null"] == {"aws:ResourceTag/keymgr:managed": "true"}, st
            assert set(cond) == {"StringEquals", "ForAllValues:StringEquals", "Null"}, st
        else:
            assert all(r.startswith("arn:aws:kms:") and ":key/" in r for r in resources), st
            assert cond["StringEquals"] == owned, st
            assert keys == {kid_tag}, keys
    assert len(tagging) == 2, tagging
    doc = (repo / "deploy" / "aws" / "iam-policy.md").read_text()
    for sid in tagging:
        assert sid in doc, f"iam-policy.md does not say what guards {sid}"
