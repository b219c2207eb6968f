"""AWS KMS backend (``type = "aws-kms"``): private keys never leave KMS.

Each keymgr key is one asymmetric ``SIGN_VERIFY`` KMS key, created with the
tags ``keymgr:managed=true``, ``keymgr:ring=RING``, ``keymgr:prefix=PREFIX``
and ``keymgr:alg=ALG``; once its public key is known (so its kid, the RFC 7638
thumbprint) it also gets ``keymgr:kid=KID`` and the alias
``alias/PREFIX/RING/KID`` (a ``.`` in a ring name becomes ``/``: aliases
allow only ``[A-Za-z0-9/_-]``, and ring names cannot contain ``/``, so the
mapping stays one to one).

How keys are found again (``list_keys``): the aliases under ``alias/PREFIX/``,
plus every key in the account/region whose tags say it is keymgr's, for this
prefix and ring -- that second scan (``ListKeys``, then ``ListResourceTags``
once per key and process, skipping keys that already have an alias under the
prefix) is what finds a key whose ``generate`` was interrupted right after
``CreateKey`` (no kid tag, no alias yet); its kid is then computed from its
public key. Keys pending deletion or disabled are ignored, and a key without
``keymgr:managed=true`` and this prefix is never listed, signed with, or
destroyed, whatever alias points at it.

Requests: ``signer`` resolves the key once (``GetPublicKey`` by alias, which
also proves the alias still points at the key whose thumbprint is the kid) and
then every signature is exactly one ``Sign`` call. Public keys and key ids are
cached for the life of the process.

Every botocore failure becomes one line ``backend NAME (aws-kms): OPERATION:
reason`` (a :class:`BackendError`); retries (botocore "standard" mode) and
timeouts are explicit options.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from keymgr import jose
from keymgr.backend import Backend, GeneratedKey, Signer
from keymgr.errors import BackendError, KeyIntegrityError, KeyNotFoundError
from keymgr.faults import crashpoint
from keymgr.logs import get_logger
from keymgr.options import Options

from .client import (
    AWS_CONNECTION_OPTIONS,
    AWSConnection,
    aws_error_code,
    aws_reason,
    parse_connection,
)

log = get_logger("keymgr.backends.aws.kms")

TYPE_NAME = "aws-kms"

#: KMS accepts at most 4096 bytes with MessageType RAW; longer signing inputs
#: are hashed here and sent as DIGEST (not possible for Ed25519, see signer()).
RAW_MESSAGE_LIMIT = 4096

TAG_MANAGED = "keymgr:managed"
TAG_RING = "keymgr:ring"
TAG_PREFIX = "keymgr:prefix"
TAG_ALG = "keymgr:alg"
TAG_KID = "keymgr:kid"
#: The write-ahead intent nonce (see Backend.generate): marks crash orphans.
TAG_INTENT = "keymgr:intent"

RSA_KEY_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096")
_EC_KEY_SPECS: dict[str, str] = {
    "ES256": "ECC_NIST_P256",
    "ES384": "ECC_NIST_P384",
    "ES512": "ECC_NIST_P521",
    "EdDSA": "ECC_NIST_EDWARDS25519",
}
#: JWS alg -> KMS SigningAlgorithm. PS*: KMS uses a salt as long as the hash,
#: exactly what RFC 7518 3.5 requires.
SIGNING_ALGORITHMS: dict[str, str] = {
    "ES256": "ECDSA_SHA_256",
    "ES384": "ECDSA_SHA_384",
    "ES512": "ECDSA_SHA_512",
    "RS256": "RSASSA_PKCS1_V1_5_SHA_256",
    "RS384": "RSASSA_PKCS1_V1_5_SHA_384",
    "RS512": "RSASSA_PKCS1_V1_5_SHA_512",
    "PS256": "RSASSA_PSS_SHA_256",
    "PS384": "RSASSA_PSS_SHA_384",
    "PS512": "RSASSA_PSS_SHA_512",
    "EdDSA": "ED25519_SHA_512",
}
_PUBLIC_TYPES = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)
_HASHLIB: dict[str, str] = {"256": "sha256", "384": "sha384", "512": "sha512"}

_OPTIONS = frozenset(
    {"type", "alias_prefix", "deletion_window_days", "rsa_key_spec"} | AWS_CONNECTION_OPTIONS
)
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
_RING_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_PREFIX = 100
_MIN_WINDOW, _MAX_WINDOW = 7, 30
# KMS error codes that mean "no such key / alias" and "key not usable in its state".
_NOT_FOUND = frozenset({"NotFoundException"})
_INVALID_STATE = frozenset({"KMSInvalidStateException", "DisabledException"})


class AWSCallError(BackendError):
    """A failed KMS call; ``code`` is the AWS error code (None for transport errors)."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Key:
    """What this process knows about one keymgr key in KMS."""

    key_id: str
    jwk: dict[str, str] | None = None
    signing_algorithms: tuple[str, ...] = ()
    #: False for a key found by its tags only (generate stopped before CreateAlias).
    aliased: bool = True


class KMSBackend(Backend):
    """Keys as asymmetric AWS KMS keys."""

    type_name: ClassVar[str] = TYPE_NAME
    #: Everything keymgr signs with; EdDSA needs KMS's ECC_NIST_EDWARDS25519 keys.
    algorithms: ClassVar[frozenset[str]] = jose.ALGORITHMS

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        o = Options(options, f"backends.{name}", _OPTIONS)
        self.connection: AWSConnection = parse_connection(o)
        prefix = o.raw("alias_prefix", "keymgr")
        if (
            not isinstance(prefix, str)
            or not _PREFIX_RE.fullmatch(prefix)
            or len(prefix) > _MAX_PREFIX
        ):
            raise o.err(
                "alias_prefix",
                f"expected letters, digits, '_', '-' and inner "
                f"'/' (at most {_MAX_PREFIX} characters), got {prefix!r}",
            )
        if prefix.lower() == "aws" or prefix.lower().startswith("aws/"):
            raise o.err("alias_prefix", "'aws' is reserved by AWS")
        self.alias_prefix: str = prefix
        #: The KMS pending window: AWS accepts 7 to 30 days.
        self.deletion_window_days: int = o.integer(
            "deletion_window_days", _MAX_WINDOW, _MIN_WINDOW, _MAX_WINDOW
        )
        self.rsa_key_spec: str = o.choice("rsa_key_spec", "RSA_3072", RSA_KEY_SPECS)
        self._lock = threading.RLock()
        self._client: Any = None
        self._keys: dict[tuple[str, str], _Key] = {}
        self._signers: dict[tuple[str, str, str], Signer] = {}
        # KeyId -> tags, for keys seen by a scan. Tags keymgr relies on are set
        # at CreateKey and never change, so one look per key per process is enough.
        self._tags: dict[str, dict[str, str] | None] = {}

    # -- plumbing -----------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 KMS client, created on first use (never in the constructor)."""
        with self._lock:
            if self._client is None:
                from botocore.exceptions import BotoCoreError

                try:
                    self._client = self.connection.client("kms")
                except BotoCoreError as e:
                    raise self._error("create client", e) from None
            return self._client

    def _error(self, operation: str, exc: BaseException) -> AWSCallError:
        return AWSCallError(
            f"backend {self.name} ({TYPE_NAME}): {operation}: {aws_reason(exc)}",
            aws_error_code(exc),
        )

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One KMS API call (botocore retries inside); every failure is an AWSCallError."""
        from botocore.exceptions import BotoCoreError, ClientError

        method: Callable[..., dict[str, Any]] = getattr(self.client, _snake(operation))
        try:
            return method(**params)
        except (BotoCoreError, ClientError) as e:
            raise self._error(operation, e) from None

    def _fail(self, operation: str, what: str) -> BackendError:
        return BackendError(f"backend {self.name} ({TYPE_NAME}): {operation}: {what}")

    def _check_ring(self, ring: str) -> None:
        if not isinstance(ring, str) or not _RING_RE.fullmatch(ring):
            raise self._fail("ring", f"invalid ring name {ring!r}")

    def _check_kid(self, kid: str) -> None:
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
            raise self._fail("key id", f"invalid kid {kid!r} (expected an RFC 7638 thumbprint)")

    def alias_name(self, ring: str, kid: str) -> str:
        """``alias/PREFIX/RING/KID``, with ``.`` in the ring name written as ``/``."""
        return f"{self._ring_alias_dir(ring)}{kid}"

    def _ring_alias_dir(self, ring: str) -> str:
        return f"alias/{self.alias_prefix}/{ring.replace('.', '/')}/"

    def key_spec(self, alg: str) -> str:
        """The KMS KeySpec a key for ``alg`` is created with."""
        if alg not in SIGNING_ALGORITHMS:
            raise self._fail("CreateKey", f"unsupported algorithm {alg!r}")
        family = jose.alg_family(alg)
        return self.rsa_key_spec if family == "RSA" else _EC_KEY_SPECS[alg]

    def _is_ours(self, tags: Mapping[str, str] | None, ring: str) -> bool:
        return (
            tags is not None
            and tags.get(TAG_MANAGED) == "true"
            and tags.get(TAG_PREFIX) == self.alias_prefix
            and tags.get(TAG_RING) == ring
        )

    def _tags_of(self, key_id: str) -> dict[str, str] | None:
        """A key's tags, or None when they cannot be read (not ours to touch then)."""
        with self._lock:
            if key_id in self._tags:
                return self._tags[key_id]
        tags: dict[str, str] | None = {}
        marker: str | None = None
        try:
            while True:
                page = self._call(
                    "ListResourceTags", KeyId=key_id, **({"Marker": marker} if marker else {})
                )
                for t in page.get("Tags", []):
                    assert tags is not None
                    tags[str(t["TagKey"])] = str(t.get("TagValue", ""))
                marker = page.get("NextMarker")
                if not page.get("Truncated") or not marker:
                    break
        except AWSCallError as e:
            # Denied (an IAM policy limited to keymgr's keys) or gone: not ours.
            if e.code not in _NOT_FOUND and e.code != "AccessDeniedException":
                raise
            tags = None
        with self._lock:
            self._tags[key_id] = tags
        return tags

    def _public(self, key_ref: str) -> tuple[str, dict[str, str], tuple[str, ...]]:
        """GetPublicKey by key id or alias: (KeyId, JWK, SigningAlgorithms)."""
        resp = self._call("GetPublicKey", KeyId=key_ref)
        try:
            public = load_der_public_key(resp["PublicKey"])
            if not isinstance(public, _PUBLIC_TYPES):
                raise ValueError(f"unsupported key type {type(public).__name__}")
            jwk = jose.public_jwk(public)
        except (ValueError, TypeError, KeyError) as e:
            raise KeyIntegrityError(
                f"backend {self.name} ({TYPE_NAME}): GetPublicKey: unusable public key "
                f"for {key_ref} ({e})"
            ) from None
        key_id = _bare_key_id(str(resp["KeyId"]))
        return key_id, jwk, tuple(resp.get("SigningAlgorithms") or ())

    # -- Backend ------------------------------------------------------------

    def generate(self, ring: str, alg: str, *, intent: str | None = None) -> GeneratedKey:
        self._check_ring(ring)
        spec = self.key_spec(alg)
        marks = [{"TagKey": TAG_INTENT, "TagValue": intent}] if intent is not None else []
        created = self._call(
            "CreateKey",
            KeyUsage="SIGN_VERIFY",
            KeySpec=spec,
            Description=f"keymgr signing key, ring {ring}, {alg}",
            Tags=[
                {"TagKey": TAG_MANAGED, "TagValue": "true"},
                {"TagKey": TAG_PREFIX, "TagValue": self.alias_prefix},
                {"TagKey": TAG_RING, "TagValue": ring},
                {"TagKey": TAG_ALG, "TagValue": alg},
                *marks,
            ],
        )
        key_id = str(created["KeyMetadata"]["KeyId"])
        crashpoint("aws_kms.after_create_key")
        # From here on a failure leaves a tagged key without alias: list_keys
        # finds it and the next generate adopts or destroys it.
        key_id, jwk, algs = self._public(key_id)
        if not _fits(jwk, alg):
            raise KeyIntegrityError(
                f"backend {self.name} ({TYPE_NAME}): CreateKey: KMS returned a {jwk.get('kty')} "
                f"key for {alg} (KeySpec {spec})"
            )
        kid = jose.thumbprint(jwk)
        self._call("TagResource", KeyId=key_id, Tags=[{"TagKey": TAG_KID, "TagValue": kid}])
        crashpoint("aws_kms.after_tag")
        self._call("CreateAlias", AliasName=self.alias_name(ring, kid), TargetKeyId=key_id)
        with self._lock:
            self._keys[(ring, kid)] = _Key(key_id, jwk, algs)
        return GeneratedKey(kid=kid, public_jwk=dict(jwk))

    def public_jwk(self, ring: str, kid: str) -> dict[str, str]:
        return dict(self._resolve(ring, kid, want_public=True).jwk or {})

    def intent_of(self, ring: str, kid: str) -> str | None:
        """The ``keymgr:intent`` tag set at CreateKey (None for older keys)."""
        key = self._resolve(ring, kid, want_public=False)
        tags = self._tags_of(key.key_id)
        return None if tags is None else tags.get(TAG_INTENT)

    def _resolve(self, ring: str, kid: str, *, want_public: bool) -> _Key:
        """The KMS key of ``ring``/``kid``; its public key verified against the kid."""
        self._check_ring(ring)
        self._check_kid(kid)
        with self._lock:
            known = self._keys.get((ring, kid))
        if known is not None and not known.aliased:
            self._finish(ring, kid, known.key_id)
            known.aliased = True
        if known is not None and (known.jwk is not None or not want_public):
            return known
        ref = known.key_id if known is not None else self.alias_name(ring, kid)
        try:
            key_id, jwk, algs = self._public(ref)
        except AWSCallError as e:
            if e.code not in _NOT_FOUND or known is not None:
                raise
            # No alias: a key whose generate was interrupted. Look it up by tags.
            self.list_keys(ring)
            with self._lock:
                known = self._keys.get((ring, kid))
            if known is None:
                raise KeyNotFoundError(
                    str(self._fail("GetPublicKey", f"key {ring}/{kid} not found"))
                ) from None
            if not known.aliased:
                self._finish(ring, kid, known.key_id)
                known.aliased = True
            key_id, jwk, algs = self._public(known.key_id)
        if jose.thumbprint(jwk) != kid:
            raise KeyIntegrityError(
                f"backend {self.name} ({TYPE_NAME}): key {ring}/{kid}: KMS key {key_id} has a "
                f"different public key (thumbprint {jose.thumbprint(jwk)}); refusing to use it"
            )
        if not self._is_ours(self._tags_of(key_id), ring):
            raise self._fail(
                "ListResourceTags",
                f"KMS key {key_id} behind {self.alias_name(ring, kid)} is not tagged "
                f"{TAG_MANAGED}=true for ring {ring}; refusing to use it",
            )
        entry = _Key(key_id, jwk, algs)
        with self._lock:
            self._keys[(ring, kid)] = entry
        return entry

    def _finish(self, ring: str, kid: str, key_id: str) -> None:
        """Complete an interrupted generate: the kid tag and the alias (best effort).

        Only for a key already proven keymgr's (managed, this prefix and ring) by
        its tags; without the alias every new process would have to scan.
        """
        if not self._is_ours(self._tags_of(key_id), ring):
            return
        try:
            self._call("TagResource", KeyId=key_id, Tags=[{"TagKey": TAG_KID, "TagValue": kid}])
            self._call("CreateAlias", AliasName=self.alias_name(ring, kid), TargetKeyId=key_id)
        except AWSCallError as e:
            if e.code != "AlreadyExistsException":
                log.warning("kms.finish_failed", ring=ring, kid=kid, error=str(e))

    def signer(self, ring: str, kid: str, alg: str) -> Signer:
        cache_key = (ring, kid, alg)
        with self._lock:
            cached = self._signers.get(cache_key)
        if cached is not None:
            return cached
        if alg not in SIGNING_ALGORITHMS:
            raise self._fail("Sign", f"unsupported algorithm {alg!r}")
        key = self._resolve(ring, kid, want_public=True)
        assert key.jwk is not None
        if not _fits(key.jwk, alg):
            raise self._fail(
                "Sign", f"key {ring}/{kid} is a {key.jwk.get('kty')} key, not usable for {alg}"
            )
        signing_algorithm = SIGNING_ALGORITHMS[alg]
        if key.signing_algorithms and signing_algorithm not in key.signing_algorithms:
            raise self._fail(
                "Sign", f"key {ring}/{kid} does not support {signing_algorithm} in KMS"
            )
        sign = self._make_signer(key.key_id, alg, signing_algorithm)
        with self._lock:
            self._signers[cache_key] = sign
        return sign

    def _make_signer(self, key_id: str, alg: str, signing_algorithm: str) -> Signer:
        """The per-token closure: exactly one Sign request, nothing else."""
        from botocore.exceptions import BotoCoreError, ClientError

        kms_sign: Callable[..., dict[str, Any]] = self.client.sign
        errors = (BotoCoreError, ClientError)
        family = jose.alg_family(alg)
        size = jose.ec_coordinate_size(jose.curve_for(alg)) if family == "EC" else 0
        digest_name = None if family == "OKP" else _HASHLIB[alg[2:]]
        where = f"backend {self.name} ({TYPE_NAME}): Sign"

        def sign(data: bytes) -> bytes:
            if len(data) <= RAW_MESSAGE_LIMIT:
                message, message_type = data, "RAW"
            elif digest_name is None:
                raise BackendError(
                    f"{where}: {alg} signing input is {len(data)} bytes; KMS signs at most "
                    f"{RAW_MESSAGE_LIMIT} bytes with Ed25519 (no digest mode for EdDSA)"
                )
            else:
                message, message_type = hashlib.new(digest_name, data).digest(), "DIGEST"
            try:
                resp = kms_sign(
                    KeyId=key_id,
                    Message=message,
                    MessageType=message_type,
                    SigningAlgorithm=signing_algorithm,
                )
            except errors as e:
                raise AWSCallError(f"{where}: {aws_reason(e)}", aws_error_code(e)) from None
            signature: bytes = resp["Signature"]
            if size:
                try:
                    return jose.der_to_raw_ecdsa(signature, size)
                except ValueError as e:
                    raise BackendError(f"{where}: malformed ECDSA signature ({e})") from None
            return signature

        return sign

    def destroy(self, ring: str, kid: str) -> None:
        self._check_ring(ring)
        self._check_kid(kid)
        alias = self.alias_name(ring, kid)
        key_id, state = self._key_id_for_destroy(ring, kid, alias)
        if key_id is not None:
            tags = self._tags_of(key_id)
            if not self._is_ours(tags, ring) or tags is None or tags.get(TAG_KID, kid) != kid:
                raise self._fail(
                    "DisableKey",
                    f"KMS key {key_id} for {ring}/{kid} is not a keymgr key of this ring; "
                    "refusing to destroy it",
                )
            if state is None:
                state = self._key_state(key_id)
            if state not in (None, "PendingDeletion"):
                if state != "Disabled":
                    try:
                        self._call("DisableKey", KeyId=key_id)
                    except AWSCallError as e:
                        if e.code not in _NOT_FOUND | _INVALID_STATE:
                            raise
                crashpoint("aws_kms.after_disable")
                try:
                    self._call(
                        "ScheduleKeyDeletion",
                        KeyId=key_id,
                        PendingWindowInDays=self.deletion_window_days,
                    )
                except AWSCallError as e:
                    # Scheduled in between (another process): already done.
                    if e.code not in _NOT_FOUND and not (
                        e.code in _INVALID_STATE
                        and self._key_state(key_id) in (None, "PendingDeletion")
                    ):
                        raise
        try:
            self._call("DeleteAlias", AliasName=alias)
        except AWSCallError as e:
            if e.code not in _NOT_FOUND:
                raise
        with self._lock:
            self._keys.pop((ring, kid), None)
            for k in [k for k in self._signers if k[:2] == (ring, kid)]:
                del self._signers[k]

    def _key_id_for_destroy(self, ring: str, kid: str, alias: str) -> tuple[str | None, str | None]:
        """(KeyId, KeyState if this lookup learnt it) of the key to destroy; (None, None)
        when there is none (already destroyed, or never created)."""
        with self._lock:
            known = self._keys.get((ring, kid))
        if known is not None:
            return known.key_id, None
        try:
            meta = self._call("DescribeKey", KeyId=alias)["KeyMetadata"]
            state = meta.get("KeyState")
            return _bare_key_id(str(meta["KeyId"])), None if state is None else str(state)
        except AWSCallError as e:
            if e.code not in _NOT_FOUND:
                raise
        # No alias: either already destroyed (alias deleted last), or a key
        # whose generate stopped before CreateAlias. Find the latter by tags.
        for key_id, tags in self._scan(ring):
            if tags.get(TAG_KID) == kid:
                return key_id, None
            if TAG_KID not in tags and self._usable(key_id):
                found_id, jwk, _ = self._public(key_id)
                if jose.thumbprint(jwk) == kid:
                    return found_id, None
        return None, None

    def _key_state(self, key_id: str) -> str | None:
        """KeyState from DescribeKey; None when the key does not exist (any more)."""
        try:
            meta = self._call("DescribeKey", KeyId=key_id)["KeyMetadata"]
        except AWSCallError as e:
            if e.code in _NOT_FOUND:
                return None
            raise
        return str(meta.get("KeyState"))

    def _usable(self, key_id: str) -> bool:
        try:
            meta = self._call("DescribeKey", KeyId=key_id)["KeyMetadata"]
        except AWSCallError as e:
            if e.code in _NOT_FOUND:
                return False
            raise
        return bool(
            meta.get("KeyState") == "Enabled"
            and meta.get("KeyUsage") == "SIGN_VERIFY"
            and meta.get("KeyManager", "CUSTOMER") == "CUSTOMER"
        )

    def _paginate(self, operation: str, field: str, **params: Any) -> Iterator[dict[str, Any]]:
        marker: str | None = None
        while True:
            page = self._call(operation, **params, **({"Marker": marker} if marker else {}))
            yield from page.get(field, [])
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                return

    def _aliases(self, ring: str) -> tuple[dict[str, str], set[str]]:
        """kid -> KeyId for this ring's aliases, and every KeyId with an alias of ours.

        The second set lets the tag scan skip keys that already have an
        alias under the prefix: only a key whose ``generate`` stopped before
        ``CreateAlias`` lacks one, and those are what the scan looks for.
        """
        head = self._ring_alias_dir(ring)
        root = f"alias/{self.alias_prefix}/"
        found: dict[str, str] = {}
        aliased: set[str] = set()
        for alias in self._paginate("ListAliases", "Aliases"):
            name = str(alias.get("AliasName", ""))
            target = alias.get("TargetKeyId")
            if not name.startswith(root) or not target:
                continue
            key_id = _bare_key_id(str(target))
            if _KID_RE.fullmatch(name.rsplit("/", 1)[-1]):
                aliased.add(key_id)
            kid = name[len(head) :]
            if name.startswith(head) and _KID_RE.fullmatch(kid):
                found[kid] = key_id
        return found, aliased

    def _scan(
        self, ring: str, skip: AbstractSet[str] = frozenset()
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """(KeyId, tags) of every key tagged as keymgr's for this prefix and ring.

        One ListResourceTags per key of the account and region (cached for the
        life of the process): KMS has no search by tag. Keys in ``skip`` are
        not looked at.
        """
        for entry in self._paginate("ListKeys", "Keys"):
            key_id = _bare_key_id(str(entry["KeyId"]))
            if key_id in skip:
                continue
            tags = self._tags_of(key_id)
            if tags is not None and self._is_ours(tags, ring):
                yield key_id, tags

    def list_keys(self, ring: str) -> list[str]:
        self._check_ring(ring)
        kids: dict[str, str] = {}
        by_alias, aliased = self._aliases(ring)
        for kid, key_id in by_alias.items():
            if self._is_ours(self._tags_of(key_id), ring) and self._usable(key_id):
                kids[kid] = key_id
        for key_id, tags in self._scan(ring, skip=aliased):
            if not self._usable(key_id):
                continue
            tagged = tags.get(TAG_KID)
            if tagged is not None and _KID_RE.fullmatch(tagged):
                kid = tagged
            else:
                # Interrupted right after CreateKey: the kid is the thumbprint.
                key_id, jwk, algs = self._public(key_id)
                kid = jose.thumbprint(jwk)
                with self._lock:
                    self._keys.setdefault((ring, kid), _Key(key_id, jwk, algs, aliased=False))
            kids.setdefault(kid, key_id)
        with self._lock:
            for kid, key_id in kids.items():
                self._keys.setdefault((ring, kid), _Key(key_id, aliased=key_id in aliased))
        return sorted(kids)

    def check(self) -> None:
        """Reachability and credentials: one cheap ListAliases call."""
        self._call("ListAliases", Limit=1)


def _fits(jwk: Mapping[str, str], alg: str) -> bool:
    family = jose.alg_family(alg)
    if jwk.get("kty") != family:
        return False
    if family == "EC":
        return jwk.get("crv") == jose.curve_for(alg)
    if family == "OKP":
        return jwk.get("crv") == "Ed25519"
    return len(jose.b64url_decode(jwk["n"])) * 8 >= jose.MIN_RSA_BITS


def _bare_key_id(key_id: str) -> str:
    """``arn:aws:kms:REGION:ACCOUNT:key/ID`` -> ``ID`` (a bare id is returned as is)."""
    return key_id.rsplit("key/", 1)[-1] if key_id.startswith("arn:") else key_id


_SNAKE_RE = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(operation: str) -> str:
    """``ListResourceTags`` -> ``list_resource_tags`` (boto3's method names)."""
    return _SNAKE_RE.sub("_", operation).lower()
