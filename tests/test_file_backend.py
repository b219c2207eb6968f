"""keymgr.backends.local.keys.FileBackend with real files and real crypto.

Signatures are verified by PyJWT and jwcrypto, and the file format is checked
by decrypting it here with AESGCM directly, not through the backend.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jwt as jwc_jwt
from keymgr.backends.local.keys import FileBackend

from keymgr import jose
from keymgr.backend import GeneratedKey
from keymgr.errors import BackendError, ConfigError, KeyIntegrityError
from keymgr.plugins import backend_class

ALL_ALGS = sorted(jose.ALGORITHMS)
RING = "api"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_env_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYMGR_MASTER_KEY", raising=False)


@pytest.fixture
def master_key(tmp_path: Path) -> bytes:
    key = os.urandom(32)
    (tmp_path / "master.key").write_text(base64.b64encode(key).decode() + "\n")
    (tmp_path / "master.key").chmod(0o600)  # the backend refuses a key others can read
    return key


def make_backend(tmp_path: Path, **extra: Any) -> FileBackend:
    options: dict[str, Any] = {
        "type": "file",
        "path": "keys",  # relative: resolved against the config dir
        "master_key_file": "master.key",
        "rsa_bits": 2048,  # keeps RSA generation fast; the floor is still enforced
    }
    options.update(extra)
    return FileBackend("local", options, str(tmp_path))


@pytest.fixture
def backend(tmp_path: Path, master_key: bytes) -> FileBackend:
    return make_backend(tmp_path)


@pytest.fixture
def es_key(backend: FileBackend) -> GeneratedKey:
    return backend.generate(RING, "ES256")


def key_file(tmp_path: Path, kid: str, ring: str = RING) -> Path:
    return tmp_path / "keys" / ring / f"{kid}.key"


def claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "https://issuer.example", "sub": "u1", "iat": now, "exp": now + 300}


def sign_token(backend: FileBackend, kid: str, alg: str, payload: dict[str, Any]) -> str:
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    return jose.encode_compact(header, payload, backend.signer(RING, kid, alg))


def verify_both(token: str, public_jwk: dict[str, str], kid: str, alg: str) -> dict[str, Any]:
    published = {**public_jwk, "kid": kid, "alg": alg, "use": "sig"}
    a: dict[str, Any] = pyjwt.decode(token, key=pyjwt.PyJWK(published), algorithms=[alg])
    checked = jwc_jwt.JWT(jwt=token, key=jwc_jwk.JWK(**published), algs=[alg])
    b: dict[str, Any] = json.loads(checked.claims)
    assert a == b
    return a


def decrypt_independently(path: Path, master: bytes) -> bytes:
    doc = json.loads(path.read_bytes())
    aad = b"\0".join(
        [b"keymgr-file-v1", doc["ring"].encode(), doc["kid"].encode(), doc["alg"].encode()]
    )
    return AESGCM(master).decrypt(
        jose.b64url_decode(doc["nonce"]), jose.b64url_decode(doc["ciphertext"]), aad
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def zero_umask() -> Iterator[None]:
    # The permissions must come from the code, not from a friendly umask.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_generate_sign_verify_every_alg(
    tmp_path: Path, master_key: bytes, backend: FileBackend, alg: str, zero_umask: None
) -> None:
    gen = backend.generate(RING, alg)

    # kid is the RFC 7638 thumbprint, as computed by jwcrypto.
    assert gen.kid == jose.thumbprint(gen.public_jwk)
    assert gen.kid == jwc_jwk.JWK(**gen.public_jwk).thumbprint()
    assert backend.public_jwk(RING, gen.kid) == gen.public_jwk
    jose.assert_public(gen.public_jwk)
    assert set(gen.public_jwk) <= {"kty", "crv", "x", "y", "n", "e"}

    payload = claims()
    token = sign_token(backend, gen.kid, alg, payload)
    assert verify_both(token, gen.public_jwk, gen.kid, alg) == payload

    path = key_file(tmp_path, gen.kid)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert mode(tmp_path / "keys") == 0o700

    # The file holds exactly the PKCS#8 DER of the key, encrypted under the
    # master key with ring/kid/alg bound as associated data...
    raw = path.read_bytes()
    doc = json.loads(raw)
    assert set(doc) == {"v", "ring", "kid", "alg", "nonce", "ciphertext"}
    assert (doc["v"], doc["ring"], doc["kid"], doc["alg"]) == (1, RING, gen.kid, alg)
    assert len(jose.b64url_decode(doc["nonce"])) == 12
    der = decrypt_independently(path, master_key)
    private = serialization.load_der_private_key(der, password=None)
    assert jose.thumbprint(jose.public_jwk(private.public_key())) == gen.kid  # type: ignore[arg-type]

    # ...and none of it in clear, in any encoding.
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for needle in (der, der[-32:], pem, b"PRIVATE KEY", jose.b64url(der).encode()):
        assert needle not in raw
    assert base64.b64encode(der[-24:])[:16] not in raw
    assert base64.b64encode(master_key) not in raw


def test_new_instance_signs_with_existing_key(
    tmp_path: Path, backend: FileBackend, es_key: GeneratedKey
) -> None:
    fresh = make_backend(tmp_path)
    assert fresh.list_keys(RING) == [es_key.kid]
    assert fresh.public_jwk(RING, es_key.kid) == es_key.public_jwk
    token = sign_token(fresh, es_key.kid, "ES256", claims())
    verify_both(token, es_key.public_jwk, es_key.kid, "ES256")


def test_rsa_key_size_follows_option(tmp_path: Path, master_key: bytes) -> None:
    gen = make_backend(tmp_path, rsa_bits=2048).generate(RING, "PS384")
    n = jose.b64url_decode(gen.public_jwk["n"])
    assert len(n) * 8 == 2048


def test_default_rsa_bits_is_3072(tmp_path: Path, master_key: bytes) -> None:
    options = {"type": "file", "path": "keys", "master_key_file": "master.key"}
    gen = FileBackend("local", options, str(tmp_path)).generate(RING, "RS256")
    assert len(jose.b64url_decode(gen.public_jwk["n"])) * 8 == 3072


def test_signer_is_cached(backend: FileBackend, es_key: GeneratedKey) -> None:
    assert backend.signer(RING, es_key.kid, "ES256") is backend.signer(RING, es_key.kid, "ES256")


def test_signer_refuses_incompatible_alg(backend: FileBackend, es_key: GeneratedKey) -> None:
    for alg in ("ES384", "RS256", "EdDSA", "HS256"):
        with pytest.raises(BackendError, match=f"cannot sign {alg}"):
            backend.signer(RING, es_key.kid, alg)


def test_generate_refuses_unsupported_alg(tmp_path: Path, backend: FileBackend) -> None:
    for alg in ("HS256", "none", "ES256K"):
        with pytest.raises(BackendError, match="unsupported algorithm"):
            backend.generate(RING, alg)
    assert not (tmp_path / "keys").exists()


def test_registered_as_entry_point() -> None:
    assert backend_class("file", "test: backends.x.type") is FileBackend
    assert FileBackend.type_name == "file"
    assert FileBackend.algorithms == jose.ALGORITHMS


# --------------------------------------------------------------------------- integrity


def _rewrite(path: Path, **changes: Any) -> None:
    doc = json.loads(path.read_bytes())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_flipped_ciphertext_byte_is_detected(
    tmp_path: Path, backend: FileBackend, es_key: GeneratedKey
) -> None:
    path = key_file(tmp_path, es_key.kid)
    ciphertext = bytearray(jose.b64url_decode(json.loads(path.read_bytes())["ciphertext"]))
    ciphertext[5] ^= 0x01
    _rewrite(path, ciphertext=jose.b64url(bytes(ciphertext)))

    fresh = make_backend(tmp_path)  # the generating instance still has it cached
    expected = f"key file {path}: authentication failed (wrong master key or tampered file)"
    with pytest.raises(KeyIntegrityError) as err:
        fresh.signer(RING, es_key.kid, "ES256")
    assert str(err.value) == expected
    with pytest.raises(KeyIntegrityError, match="authentication failed"):
        fresh.public_jwk(RING, es_key.kid)


@pytest.mark.parametrize("field", ["nonce", "alg"])
def test_tampered_metadata_fails_authentication(
    tmp_path: Path, backend: FileBackend, es_key: GeneratedKey, field: str
) -> None:
    path = key_file(tmp_path, es_key.kid)
    replacement = jose.b64url(os.urandom(12)) if field == "nonce" else "ES384"
    _rewrite(path, **{field: replacement})
    with pytest.raises(KeyIntegrityError, match="authentication failed") as err:
        make_backend(tmp_path).public_jwk(RING, es_key.kid)
    assert str(path) in str(err.value)


def test_every_single_byte_flip_in_the_file_is_detected(
    tmp_path: Path, backend: FileBackend
) -> None:
    kid = backend.generate(RING, "EdDSA").kid
    path = key_file(tmp_path, kid)
    original = path.read_bytes()
    for i in range(0, len(original), 3):
        damaged = bytearray(original)
        damaged[i] ^= 0x20 if i % 2 else 0x01
        path.write_bytes(bytes(damaged))
        try:
            make_backend(tmp_path).signer(RING, kid, "EdDSA")
        except KeyIntegrityError as err:
            assert str(err).startswith(f"key file {path}: ")
            assert "\n" not in str(err)
        else:
            pytest.fail(f"flipped byte {i} not detected: {bytes(damaged)!r}")
    path.write_bytes(original)
    make_backend(tmp_path).signer(RING, kid, "EdDSA")


def test_wrong_master_key(tmp_path: Path, backend: FileBackend, es_key: GeneratedKey) -> None:
    path = key_file(tmp_path, es_key.kid)
    before = path.read_bytes()
    other = tmp_path / "other.key"
    other.write_text(base64.b64encode(os.urandom(32)).decode())
    other.chmod(0o600)
    wrong = make_backend(tmp_path, master_key_file=str(other))  # absolute path this time

    for call in (
        lambda: wrong.public_jwk(RING, es_key.kid),
        lambda: wrong.signer(RING, es_key.kid, "ES256"),
        wrong.check,
    ):
        with pytest.raises(KeyIntegrityError) as err:
            call()
        assert str(err.value) == (
            f"key file {path}: authentication failed (wrong master key or tampered file)"
        )
    assert path.read_bytes() == before
    assert wrong.list_keys(RING) == [es_key.kid]  # listing needs no decryption


def test_check_proves_the_master_key_past_rings_without_keys(
    tmp_path: Path, backend: FileBackend, es_key: GeneratedKey
) -> None:
    """The readiness check trial-decrypts the first key it finds, in directory
    order and without sorting every ring: empty ring directories, stray files
    and names that are no ring come before it and are passed over."""
    keys = tmp_path / "keys"
    for i in range(40):
        (keys / f"empty-{i:02d}").mkdir()
    (keys / "zz-not-a-dir").write_text("x")
    (keys / ".hidden").mkdir()
    backend.check()
    other = tmp_path / "other.key"
    other.write_text(base64.b64encode(os.urandom(32)).decode())
    other.chmod(0o600)
    with pytest.raises(KeyIntegrityError):
        make_backend(tmp_path, master_key_file=str(other)).check()
    key_file(tmp_path, es_key.kid).unlink()
    make_backend(tmp_path, master_key_file=str(other)).check()  # no key: nothing to prove


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"v": 2}', "unsupported format version 2"),
        (b'{"v": 1, "ring": "api"}', "'kid'"),
    ],
)
def test_malformed_file_names_the_file(
    tmp_path: Path, backend: FileBackend, es_key: GeneratedKey, content: bytes, message: str
) -> None:
    path = key_file(tmp_path, es_key.kid)
    path.write_bytes(content)
    with pytest.raises(KeyIntegrityError, match=message) as err:
        make_backend(tmp_path).public_jwk(RING, es_key.kid)
    assert str(err.value).startswith(f"key file {path}: malformed") or "version" in str(err.value)


def test_file_moved_to_other_ring_or_kid_is_refused(
    tmp_path: Path, backend: FileBackend, es_key: GeneratedKey
) -> None:
    src = key_file(tmp_path, es_key.kid)
    # Same content under another ring: the recorded ring does not match.
    moved = key_file(tmp_path, es_key.kid, ring="other")
    moved.parent.mkdir(mode=0o700)
    moved.write_bytes(src.read_bytes())
    with pytest.raises(KeyIntegrityError, match="its path says") as err:
        make_backend(tmp_path).signer("other", es_key.kid, "ES256")
    assert str(moved) in str(err.value)
    # Rewritten to claim the new ring: the associated data no longer matches.
    _rewrite(moved, ring="other")
    with pytest.raises(KeyIntegrityError, match="authentication failed"):
        make_backend(tmp_path).signer("other", es_key.kid, "ES256")


def test_kid_must_match_thumbprint(tmp_path: Path, master_key: bytes) -> None:
    # A correctly encrypted file whose kid is not the key's thumbprint (e.g.
    # written by a buggy tool) is refused after decryption.
    backend = make_backend(tmp_path)
    key = jose.generate_private_key("ES256")
    backend._write_new(RING, "not-the-thumbprint", "ES256", key)
    with pytest.raises(KeyIntegrityError, match="thumbprint does not match"):
        make_backend(tmp_path).public_jwk(RING, "not-the-thumbprint")


# --------------------------------------------------------------------------- master key


def test_missing_master_key_names_the_variable(tmp_path: Path) -> None:
    backend = FileBackend("local", {"type": "file", "path": "keys"}, str(tmp_path))
    with pytest.raises(BackendError, match="KEYMGR_MASTER_KEY") as err:
        backend.generate(RING, "ES256")
    assert not isinstance(err.value, KeyIntegrityError)
    with pytest.raises(BackendError, match="KEYMGR_MASTER_KEY"):
        backend.check()


def test_missing_master_key_file_names_the_file(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, master_key_file="absent.key")
    with pytest.raises(BackendError) as err:
        backend.generate(RING, "ES256")
    assert str(tmp_path / "absent.key") in str(err.value)
    assert "\n" not in str(err.value)


def test_master_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master = os.urandom(32)
    monkeypatch.setenv("KEYMGR_MASTER_KEY", base64.b64encode(master).decode())
    backend = FileBackend("local", {"type": "file", "path": "keys"}, str(tmp_path))
    gen = backend.generate(RING, "ES256")
    decrypt_independently(key_file(tmp_path, gen.kid), master)
    backend.check()


def test_master_key_file_wins_over_environment(
    tmp_path: Path, master_key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYMGR_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    gen = make_backend(tmp_path).generate(RING, "ES256")
    decrypt_independently(key_file(tmp_path, gen.kid), master_key)


def test_raw_32_byte_master_key_file(tmp_path: Path) -> None:
    master = os.urandom(32)
    while all(chr(b).isalnum() or chr(b) in "+/=_-" for b in master):  # pragma: no cover
        master = os.urandom(32)
    (tmp_path / "raw.key").write_bytes(master)
    (tmp_path / "raw.key").chmod(0o600)
    gen = make_backend(tmp_path, master_key_file="raw.key").generate(RING, "EdDSA")
    decrypt_independently(key_file(tmp_path, gen.kid), master)


@pytest.mark.parametrize("size", [16, 31, 33, 64])
def test_wrong_length_master_key_is_refused_without_echoing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    text = base64.b64encode(os.urandom(size)).decode()
    (tmp_path / "short.key").write_text(text)
    (tmp_path / "short.key").chmod(0o600)
    with pytest.raises(BackendError) as err:
        make_backend(tmp_path, master_key_file="short.key").check()
    assert "short.key" in str(err.value) and text not in str(err.value)
    assert text[:8] not in str(err.value)

    monkeypatch.setenv("KEYMGR_MASTER_KEY", text)
    env_backend = FileBackend("local", {"type": "file", "path": "keys"}, str(tmp_path))
    with pytest.raises(BackendError, match="KEYMGR_MASTER_KEY") as err:
        env_backend.check()
    assert text[:8] not in str(err.value)


def test_garbage_master_key_env_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYMGR_MASTER_KEY", "not base64 at all!!")
    backend = FileBackend("local", {"type": "file", "path": "keys"}, str(tmp_path))
    with pytest.raises(BackendError, match="KEYMGR_MASTER_KEY") as err:
        backend.generate(RING, "ES256")
    assert "not base64" not in str(err.value)


# --------------------------------------------------------------------------- files & dirs


def test_generate_never_overwrites(
    tmp_path: Path, backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = jose.generate_private_key("ES256")
    monkeypatch.setattr(
        "keymgr.backends.local.keys.jose.generate_private_key", lambda alg, bits: fixed
    )
    first = backend.generate(RING, "ES256")
    path = key_file(tmp_path, first.kid)
    before = path.read_bytes()
    with pytest.raises(BackendError, match="already exists") as err:
        backend.generate(RING, "ES256")
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_existing_wide_ring_dir_is_tightened(tmp_path: Path, backend: FileBackend) -> None:
    ring_dir = tmp_path / "keys" / RING
    ring_dir.mkdir(parents=True)
    os.chmod(ring_dir, 0o755)
    backend.generate(RING, "ES256")
    assert mode(ring_dir) == 0o700


def test_list_keys_and_destroy_are_idempotent(tmp_path: Path, backend: FileBackend) -> None:
    assert backend.list_keys(RING) == []
    kids = sorted(backend.generate(RING, alg).kid for alg in ("ES256", "EdDSA", "ES384"))
    other = backend.generate("other", "ES256").kid
    ring_dir = tmp_path / "keys" / RING
    # Noise that is not a key: temp files, other suffixes, directories.
    (ring_dir / f".{kids[0]}.key.abc.tmp").write_bytes(b"partial")
    (ring_dir / "README").write_text("x")
    (ring_dir / "sub.key.bak").write_text("x")
    assert backend.list_keys(RING) == kids
    assert backend.list_keys("other") == [other]
    assert backend.list_keys("never-used") == []

    backend.destroy(RING, kids[0])
    backend.destroy(RING, kids[0])  # already gone: fine
    backend.destroy("never-used", kids[0])  # no ring dir: fine
    assert backend.list_keys(RING) == kids[1:]
    assert not key_file(tmp_path, kids[0]).exists()
    assert not (ring_dir / f".{kids[0]}.key.abc.tmp").exists()  # crash leftover removed too
    assert backend.list_keys("other") == [other]

    # Destroyed means gone from this instance's cache as well.
    with pytest.raises(BackendError, match="not found"):
        backend.signer(RING, kids[0], "ES256")
    with pytest.raises(BackendError, match="not found"):
        backend.public_jwk(RING, kids[0])


def test_destroy_drops_cached_signer(tmp_path: Path, backend: FileBackend) -> None:
    kid = backend.generate(RING, "ES256").kid
    backend.signer(RING, kid, "ES256")
    backend.destroy(RING, kid)
    assert not backend._keys and not backend._signers


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "", "a b", "x\0y", "é", "/abs"])
def test_unsafe_names_are_refused(backend: FileBackend, tmp_path: Path, bad: str) -> None:
    calls = [
        lambda: backend.generate(bad, "ES256"),
        lambda: backend.list_keys(bad),
        lambda: backend.destroy(bad, "kid"),
        lambda: backend.destroy(RING, bad),
        lambda: backend.public_jwk(RING, bad),
        lambda: backend.signer(bad, "kid", "ES256"),
    ]
    for call in calls:
        with pytest.raises(BackendError, match="invalid"):
            call()
    assert not (tmp_path / "keys").exists()


def test_check_creates_directory_and_loads_master_key(
    tmp_path: Path, backend: FileBackend, zero_umask: None
) -> None:
    backend.check()
    assert mode(tmp_path / "keys") == 0o700
    assert list((tmp_path / "keys").iterdir()) == []
    backend.generate(RING, "ES256")
    make_backend(tmp_path).check()


# --------------------------------------------------------------------------- config


def test_constructor_does_no_io(tmp_path: Path) -> None:
    options = {"type": "file", "path": "deep/keys", "master_key_file": "missing.key"}
    FileBackend("local", options, str(tmp_path))
    FileBackend("local", {"type": "file", "path": "keys"}, str(tmp_path))  # no env var either
    assert list(tmp_path.iterdir()) == []


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, master_key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    gen = make_backend(tmp_path).generate(RING, "ES256")
    assert key_file(tmp_path, gen.kid).exists()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"path": "k", "pth": "x"}, "backends.local.pth"),
        ({"path": "k", "master_key": "x"}, "backends.local.master_key"),
        ({}, "backends.local.path"),
        ({"path": ""}, "backends.local.path"),
        ({"path": 3}, "backends.local.path"),
        ({"path": "k", "master_key_file": ["a"]}, "backends.local.master_key_file"),
        ({"path": "k", "rsa_bits": 1024}, "backends.local.rsa_bits"),
        ({"path": "k", "rsa_bits": "3072"}, "backends.local.rsa_bits"),
        ({"path": "k", "rsa_bits": True}, "backends.local.rsa_bits"),
        ({"path": "k", "rsa_bits": 1 << 20}, "backends.local.rsa_bits"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        FileBackend("local", {"type": "file", **options}, str(tmp_path))
    assert str(err.value).startswith(f"{field}: ")
    assert "\n" not in str(err.value)
