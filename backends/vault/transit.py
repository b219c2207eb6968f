"""Vault / OpenBao transit backend: private keys that never leave the server.

One transit key per keymgr key, created non-exportable and without plaintext
backup, and used only through ``transit/sign``. Transit keys cannot be renamed
and the ``kid`` (RFC 7638 thumbprint) is only known once the key exists, so a
key is named ``{key_prefix}{ring}.{32 hex}`` at creation, and a per-ring index
kid -> transit name is built by listing the mount and reading the public key
of each name of the ring (cached; updated on generate and destroy). A ring
name may contain ``.``, but the random suffix never does and has a fixed
shape, so the last ``.`` splits a name unambiguously: ring ``a`` never claims
the keys of ring ``a.b``. A crash right after ``create_key`` leaves a key that
``list_keys`` still finds, and the reconciler adopts or destroys it.

keymgr only ever touches names that parse as its own (prefix, ring, suffix);
everything else in the mount is left alone.

Pitfalls handled (found against OpenBao 2.x, same in Vault):

- ``create_key`` on an existing name with another type answers 200 and
  changes nothing: the key is read back and its type and flags checked.
- RSA-PSS defaults to the longest salt, which JOSE verifiers reject:
  ``salt_length="hash"`` (RFC 7518 3.5).
- ``hash_algorithm`` defaults to SHA-256 even for P-384 / P-521 keys: it is
  always explicit (none for Ed25519, which signs the message itself).
- ``marshaling_algorithm="jws"`` gives ECDSA signatures as fixed-width r||s
  and every signature as base64url, exactly the JWS signature bytes.
- Signing always names ``key_version=1``: a transit key rotated by hand gets a
  new public key, which would no longer match the kid.
- Deleting needs ``deletion_allowed=true`` first.
"""

from __future__ import annotations

import base64
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keymgr import jose
from keymgr.backend import Backend, GeneratedKey, Signer
from keymgr.errors import BackendError, KeyNotFoundError
from keymgr.logs import get_logger
from keymgr.options import Options

from .client import CLIENT_OPTIONS, VaultCallError, VaultClient, vault_client

log = get_logger("keymgr.backends.vault.transit")

TYPE_NAME = "vault-transit"
#: Every key keymgr creates is used at this version only (see module docstring).
KEY_VERSION = 1
RSA_BITS = (2048, 3072, 4096)
#: Minimum timeout (seconds) of the create request only.
CREATE_TIMEOUT = 30.0
_OPTIONS = CLIENT_OPTIONS | {"type", "mount", "key_prefix", "rsa_bits"}
_EC_TYPES = {"ES256": "ecdsa-p256", "ES384": "ecdsa-p384", "ES512": "ecdsa-p521"}
_HASH = {"256": "sha2-256", "384": "sha2-384", "512": "sha2-512"}
_ID_RE = re.compile(r"[0-9a-f]{32}")
_INTENT_RE = re.compile(r"[0-9a-f]{16}")
_RING_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Transit key names must start with a word character.
_PREFIX_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MOUNT_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def _random_id(intent: str | None = None) -> str:
    """The id part of a new key name: 32 hex digits, never guessed, never reused.

    Transit keys carry no tags, so the write-ahead intent nonce (16 hex digits)
    is the name's first half, followed by 64 random bits; without an intent
    all 128 bits are random.
    """
    if intent is not None and _INTENT_RE.fullmatch(intent):
        return intent + secrets.token_hex(8)
    return secrets.token_hex(16)


def key_type_for(alg: str, rsa_bits: int) -> str:
    """The transit key type that ``alg`` needs."""
    family = jose.alg_family(alg)
    if family == "EC":
        return _EC_TYPES[alg]
    if family == "RSA":
        return f"rsa-{rsa_bits}"
    return "ed25519"


def _fits(key_type: str, alg: str) -> bool:
    family = jose.alg_family(alg)
    if family == "EC":
        return key_type == _EC_TYPES[alg]
    if family == "RSA":
        return key_type.startswith("rsa-")
    return key_type == "ed25519"


def sign_params(alg: str) -> dict[str, Any]:
    """The ``transit/sign`` parameters that make the answer a valid JWS signature."""
    jose.alg_family(alg)  # refuses unknown algorithms
    params: dict[str, Any] = {"marshaling_algorithm": "jws", "key_version": KEY_VERSION}
    if alg == "EdDSA":
        return params  # pure Ed25519 over the signing input; no prehash
    params["hash_algorithm"] = _HASH[alg[2:]]
    if alg.startswith("PS"):
        params["signature_algorithm"] = "pss"
        params["salt_length"] = "hash"
    elif alg.startswith("RS"):
        params["signature_algorithm"] = "pkcs1v15"
    return params


@dataclass(frozen=True)
class _TransitKey:
    name: str
    ring: str
    key_type: str
    jwk: dict[str, str]
    kid: str
    public_key: jose.PublicKey
    #: Why the key must not be adopted or used to sign (None: fine).
    problem: str | None

    @property
    def signature_size(self) -> int:
        k = self.public_key
        if isinstance(k, ec.EllipticCurvePublicKey):
            return 2 * jose.ec_coordinate_size(k.curve)
        if isinstance(k, rsa.RSAPublicKey):
            return (k.key_size + 7) // 8
        return 64


class VaultTransitBackend(Backend):
    """Keys in a Vault / OpenBao transit mount (``type = "vault-transit"``)."""

    type_name: ClassVar[str] = TYPE_NAME
    algorithms: ClassVar[frozenset[str]] = jose.ALGORITHMS

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        # "token" is accepted here, to be refused with the reason by vault_client().
        o = Options(options, f"backends.{name}", _OPTIONS, config_dir=config_dir, hidden={"token"})
        mount = o.raw("mount", "transit")
        if not isinstance(mount, str) or not _MOUNT_RE.fullmatch(mount.strip("/")):
            raise o.err("mount", f"expected a mount path like 'transit', got {mount!r}")
        prefix = o.raw("key_prefix", "keymgr-")
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise o.err(
                "key_prefix",
                f"expected letters, digits, '_', '.', '-' starting with a "
                f"letter, digit or '_', got {prefix!r}",
            )
        rsa_bits = o.raw("rsa_bits", 3072)
        if isinstance(rsa_bits, bool) or rsa_bits not in RSA_BITS:
            raise o.err(
                "rsa_bits", f"transit supports {', '.join(map(str, RSA_BITS))}, got {rsa_bits!r}"
            )
        self.mount: str = mount.strip("/")
        self.key_prefix: str = prefix
        self.rsa_bits: int = int(rsa_bits)
        self.vault: VaultClient = vault_client(o)
        self._what = f"backend {name} ({TYPE_NAME})"
        self._lock = threading.RLock()
        # transit name -> key (public data only); ring -> kid -> key.
        self._by_name: dict[str, _TransitKey] = {}
        self._index: dict[str, dict[str, _TransitKey]] = {}

    # -- helpers ------------------------------------------------------------

    def _error(self, op: str, e: VaultCallError | str) -> BackendError:
        reason = e.reason if isinstance(e, VaultCallError) else e
        return BackendError(f"{self._what}: {op}: {reason}")

    def _check_ring(self, ring: str) -> None:
        if not isinstance(ring, str) or not _RING_RE.fullmatch(ring):
            raise BackendError(f"{self._what}: invalid ring name {ring!r}")

    def key_name(self, ring: str, key_id: str) -> str:
        return f"{self.key_prefix}{ring}.{key_id}"

    def ring_of(self, name: str) -> str | None:
        """The ring a transit key name belongs to, or None when it is not keymgr's."""
        if not name.startswith(self.key_prefix):
            return None
        ring, dot, key_id = name[len(self.key_prefix) :].rpartition(".")
        if not dot or not _RING_RE.fullmatch(ring) or not _ID_RE.fullmatch(key_id):
            return None
        return ring

    def _list_names(self, op: str) -> list[str]:
        mount = self.mount
        try:
            resp = self.vault.call(lambda c: c.secrets.transit.list_keys(mount_point=mount))
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return []  # an empty mount answers 404
            raise self._error(op, e) from None
        try:
            return [str(n) for n in resp["data"]["keys"]]
        except (KeyError, TypeError):
            raise self._error(op, "unexpected answer to LIST keys") from None

    def _read(self, name: str, ring: str, op: str) -> _TransitKey | None:
        """Read one transit key's public half and flags; None when it does not exist."""
        cached = self._by_name.get(name)
        if cached is not None:
            return cached
        mount = self.mount
        try:
            resp = self.vault.call(lambda c: c.secrets.transit.read_key(name, mount_point=mount))
        except VaultCallError as e:
            if e.status == 404:
                return None
            raise self._error(op, e) from None
        try:
            key = _parse_key(name, ring, resp["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise _Unusable(f"transit key {name}: no usable public key ({e})") from None
        with self._lock:
            self._by_name[name] = key
        return key

    def _refresh(self, ring: str, op: str) -> dict[str, _TransitKey]:
        """Rebuild the ring's index from the server: one LIST, reads for new names only."""
        names = [n for n in self._list_names(op) if self.ring_of(n) == ring]
        index: dict[str, _TransitKey] = {}
        for name in sorted(names):
            try:
                key = self._read(name, ring, op)
            except _Unusable as e:
                # Not a signing key (or version 1 trimmed): never adopted,
                # never deleted; the operator decides.
                log.warning("vault.key_ignored", ring=ring, key=name, problem=str(e))
                continue
            if key is None:
                continue  # deleted between LIST and read
            other = index.get(key.kid)
            if other is not None:
                raise self._error(
                    op, f"transit keys {other.name} and {name} hold the same public key"
                )
            index[key.kid] = key
        with self._lock:
            for gone in set(self._by_name) - set(names):
                if self._by_name[gone].ring == ring:
                    del self._by_name[gone]
            self._index[ring] = index
        return index

    def _lookup(self, ring: str, kid: str, op: str) -> _TransitKey:
        self._check_ring(ring)
        key = self._index.get(ring, {}).get(kid)
        if key is None:
            key = self._refresh(ring, op).get(kid)
        if key is None:
            raise KeyNotFoundError(
                str(
                    self._error(
                        op,
                        f"no transit key for {ring}/{kid} in mount {self.mount} "
                        f"(names {self.key_prefix}{ring}.*)",
                    )
                )
            )
        return key

    # -- Backend API ----------------------------------------------------------

    def generate(self, ring: str, alg: str, *, intent: str | None = None) -> GeneratedKey:
        self._check_ring(ring)
        key_type = key_type_for(alg, self.rsa_bits)
        name = self.key_name(ring, _random_id(intent))
        params = {"type": key_type, "exportable": False, "allow_plaintext_backup": False}
        path = f"/v1/{self.mount}/keys/{name}"
        # Key generation (RSA-4096 above all) can take seconds on a busy
        # server: a longer timeout for this one call. A create that times out
        # but completes later leaves an orphan, which the next generate adopts.
        timeout = max(self.vault.settings.timeout, CREATE_TIMEOUT)
        try:
            self.vault.call(lambda c: c.adapter.post(path, json=params, timeout=timeout))
        except VaultCallError as e:
            raise self._error(f"generate ({key_type} key {name})", e) from None
        # create_key on an existing name answers 200 whatever its type or
        # flags: read the key back and refuse anything but what we asked for.
        with self._lock:
            self._by_name.pop(name, None)
        try:
            key = self._read(name, ring, f"generate ({key_type} key {name})")
        except _Unusable as e:
            raise self._error("generate", f"{e}; refusing to use it") from None
        if key is None:
            raise self._error("generate", f"transit key {name} vanished right after creation")
        if key.key_type != key_type:
            raise self._error(
                "generate",
                f"transit key {name} already exists with type {key.key_type}, not {key_type}; "
                "refusing to use it",
            )
        if key.problem is not None:
            raise self._error("generate", f"transit key {name} {key.problem}; refusing to use it")
        try:
            jose.check_key_matches_alg(key.public_key, alg)
        except ValueError as e:
            raise self._error("generate", str(e)) from None
        with self._lock:
            self._index.setdefault(ring, {})[key.kid] = key
        log.debug("vault.key_created", ring=ring, kid=key.kid, name=name, type=key_type)
        return GeneratedKey(kid=key.kid, public_jwk=dict(key.jwk))

    def public_jwk(self, ring: str, kid: str) -> dict[str, str]:
        return dict(self._lookup(ring, kid, "read public key").jwk)

    def signer(self, ring: str, kid: str, alg: str) -> Signer:
        op = f"sign with {kid}"
        key = self._lookup(ring, kid, op)
        if key.problem is not None:
            raise self._error(
                op, f"transit key {key.name} {key.problem}; refusing to sign (revoke the key)"
            )
        if not _fits(key.key_type, alg):
            raise self._error(op, f"transit key {key.name} is {key.key_type}, unusable for {alg}")
        try:
            jose.check_key_matches_alg(key.public_key, alg)
        except ValueError as e:
            raise self._error(op, str(e)) from None
        # Everything but the message is fixed here; the closure makes exactly
        # one request per signature and never reads a key.
        params = sign_params(alg)
        call = self.vault.call
        name, mount, size = key.name, self.mount, key.signature_size
        expected_prefix = f"vault:v{KEY_VERSION}:"
        error = self._error

        def sign(data: bytes) -> bytes:
            hash_input = base64.b64encode(data).decode("ascii")
            try:
                resp = call(
                    lambda c: c.secrets.transit.sign_data(
                        name, hash_input=hash_input, mount_point=mount, **params
                    )
                )
                text = resp["data"]["signature"]
            except VaultCallError as e:
                raise error(op, e) from None
            except (KeyError, TypeError):
                raise error(op, "unexpected answer (no signature)") from None
            if not isinstance(text, str) or not text.startswith(expected_prefix):
                raise error(op, f"unexpected signature format (want {expected_prefix}...)")
            try:
                sig = jose.b64url_decode(text[len(expected_prefix) :])
            except ValueError:
                raise error(op, "signature is not base64url (marshaling_algorithm=jws?)") from None
            if len(sig) != size:
                raise error(op, f"signature is {len(sig)} bytes, expected {size}")
            return sig

        return sign

    def destroy(self, ring: str, kid: str) -> None:
        self._check_ring(ring)
        op = f"destroy {kid}"
        key = self._index.get(ring, {}).get(kid)
        if key is None:
            key = self._refresh(ring, op).get(kid)
        if key is None:
            return  # already gone: destroy is idempotent
        name, mount = key.name, self.mount
        try:
            self.vault.call(
                lambda c: c.secrets.transit.update_key_configuration(
                    name, deletion_allowed=True, mount_point=mount
                )
            )
            self.vault.call(lambda c: c.secrets.transit.delete_key(name, mount_point=mount))
        except VaultCallError as e:
            if not _is_missing(e):
                raise self._error(op, e) from None
        with self._lock:
            self._index.get(ring, {}).pop(kid, None)
            self._by_name.pop(name, None)
        log.debug("vault.key_deleted", ring=ring, kid=kid, name=name)

    def intent_of(self, ring: str, kid: str) -> str | None:
        """The intent nonce in the key's name (its first 16 hex digits).

        A key named before intents has 32 random digits there, which match an
        open intent only by a 1-in-2^64 chance.
        """
        key = self._lookup(ring, kid, "intent")
        return key.name.rpartition(".")[2][:16]

    def list_keys(self, ring: str) -> list[str]:
        """Kids of this ring's usable transit keys (fresh LIST: finds other processes' orphans).

        A key with a problem (exportable, plaintext backup allowed, version 1
        gone) is left out, so it is never adopted; it is logged instead.
        """
        self._check_ring(ring)
        kids = []
        for kid, key in self._refresh(ring, "list keys").items():
            if key.problem is None:
                kids.append(kid)
            else:
                log.warning("vault.key_ignored", ring=ring, key=key.name, problem=key.problem)
        return sorted(kids)

    def check(self) -> None:
        """One authenticated read under keymgr's prefix, of a name no key of
        keymgr's has (no ``.ID`` suffix): proves address, TLS, auth, the mount
        and the policy with one small answer (404, no such key). Not a LIST of
        the mount, which the daemon's heartbeat would repeat every few seconds:
        at 100,000 rings that answer holds some 200,000 names."""
        mount, name = self.mount, f"{self.key_prefix}readiness-check"
        try:
            self.vault.call(lambda c: c.secrets.transit.read_key(name, mount_point=mount))
        except VaultCallError as e:
            if e.status == 404 and not e.errors:
                return  # the key is absent, as expected (a missing mount says why)
            raise self._error("check", e) from None


class _Unusable(Exception):
    """A transit key under keymgr's names that has no usable public key."""


def _is_missing(e: VaultCallError) -> bool:
    if e.status == 404:
        return True
    text = " ".join(e.errors).lower()
    return e.status == 400 and ("not found" in text or "could not be found" in text)


def _parse_key(name: str, ring: str, data: Mapping[str, Any]) -> _TransitKey:
    key_type = str(data["type"])
    version = data["keys"].get(str(KEY_VERSION))
    problem: str | None = None
    if data.get("exportable"):
        problem = "is exportable"
    elif data.get("allow_plaintext_backup"):
        problem = "allows plaintext backup"
    if not isinstance(version, dict) or not version.get("public_key"):
        # Trimmed, or a key type without a public half (e.g. aes256-gcm96).
        raise ValueError(f"type {key_type} has no public key at version {KEY_VERSION}")
    public = _load_public(key_type, str(version["public_key"]))
    jwk = jose.public_jwk(public)
    return _TransitKey(
        name=name,
        ring=ring,
        key_type=key_type,
        jwk=jwk,
        kid=jose.thumbprint(jwk),
        public_key=public,
        problem=problem,
    )


def _load_public(key_type: str, text: str) -> jose.PublicKey:
    if key_type == "ed25519":
        # Transit gives the raw 32-byte Ed25519 public key in standard base64.
        return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    key = serialization.load_pem_public_key(text.encode("ascii"))
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError(f"unsupported public key {type(key).__name__}")
    return key
