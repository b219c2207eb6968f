"""PKCS#11 backend (``type = "pkcs11"``): keys generated on an HSM token, never extractable.

Each keymgr key is one key pair generated on the token by ``C_GenerateKeyPair``
(so it exists whole or not at all), both objects token objects
(``CKA_TOKEN=true``), the private one also ``CKA_PRIVATE``, ``CKA_SENSITIVE``
and not ``CKA_EXTRACTABLE``, able to sign only (no decrypt, unwrap, derive).
Both carry:

- ``CKA_LABEL = "{label_prefix}/{ring}"`` (``keymgr/api``): a PKCS#11 search
  matches a label exactly, so ring ``api`` never sees ring ``api.v2``'s keys,
  and nothing outside ``label_prefix`` is ever read, used or destroyed;
- ``CKA_ID``, 16 bytes: the 8 bytes of the write-ahead intent nonce, then 8
  random bytes. It pairs the two objects, tells keys of one ring apart, and
  marks a key made by a generate whose caller crashed before the state
  commit as that intent's orphan (:meth:`intent_of`).

The kid is the RFC 7638 thumbprint of the public key as the token gives it
(``CKA_EC_PARAMS``/``CKA_EC_POINT``, or ``CKA_MODULUS``/``CKA_PUBLIC_EXPONENT``),
computed whenever keymgr reads a key; it is not written to the token, so
nothing on the token can claim a kid its key does not have. Before a key's
first signature in a process, a probe is signed and verified against that
public key: a private object that does not match its public one is refused.

A key under keymgr's label whose private object is or ever was extractable
or not sensitive (``CKA_ALWAYS_SENSITIVE`` / ``CKA_NEVER_EXTRACTABLE`` false,
so imported or once exported), or whose ``CKA_ID`` is not keymgr's shape, is
never listed, adopted, signed with or destroyed: it is logged
(``pkcs11.key_ignored``) for the operator.

Signing, per algorithm (mechanisms the token must offer, checked before a
key is generated or a signer made):

- ES256/384/512: ``CKM_ECDSA`` over the SHA-2 digest computed here (SoftHSM
  and many HSMs lack ``CKM_ECDSA_SHA256``); PKCS#11 gives ``r||s`` at full
  width, what JWS needs (a DER answer from a non-conforming token is
  converted);
- RS256/384/512: ``CKM_SHA256_RSA_PKCS`` (…384, …512);
- PS256/384/512: ``CKM_SHA256_RSA_PKCS_PSS`` (…) with MGF1 of the same hash
  and a salt as long as the hash (RFC 7518 3.5);
- EdDSA: ``CKM_EDDSA`` (pure Ed25519), keys by ``CKM_EC_EDWARDS_KEY_PAIR_GEN``.

Destroy deletes the private object, then the public one; a public object
left alone by a crash in between is deleted by the next destroy of that
kid, and is never listed (a key without its private half cannot sign).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keymgr import jose
from keymgr.backend import Backend, GeneratedKey, Signer
from keymgr.errors import BackendError, ConfigError, KeyIntegrityError, KeyNotFoundError
from keymgr.faults import crashpoint
from keymgr.logs import get_logger
from keymgr.notify import secret_file_exposure
from keymgr.options import Options

from .token import TokenSession, describe, token_session

log = get_logger("keymgr.backends.pkcs11.keys")

T = TypeVar("T")

TYPE_NAME = "pkcs11"
#: Where the module path comes from when the config has no ``module``.
MODULE_ENV = "PKCS11_MODULE"
RSA_BITS = (2048, 3072, 4096)
#: CKA_ID of a keymgr key: the intent nonce (8 bytes), then 8 random bytes.
ID_SIZE = 16
DEFAULT_PREFIX = "keymgr"

_OPTIONS = frozenset(
    {"type", "module", "token_label", "slot", "pin_file", "pin_env", "label_prefix", "rsa_bits"}
)
#: Accepted only to be refused with the reason (never echoed).
_REFUSED = frozenset({"pin", "so_pin"})
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_RING_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_INTENT_RE = re.compile(r"[0-9a-f]{16}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_PIN_FILE = 4096
_MAX_SLOT = 2**63 - 1
#: PKCS#11 token labels are 32 bytes (space padded).
_MAX_TOKEN_LABEL = 32

#: DER ``CKA_EC_PARAMS`` (named-curve OID) of each ECDSA algorithm's curve.
EC_PARAMS: dict[str, bytes] = {
    "ES256": bytes.fromhex("06082a8648ce3d030107"),  # 1.2.840.10045.3.1.7 prime256v1
    "ES384": bytes.fromhex("06052b81040022"),  # 1.3.132.0.34 secp384r1
    "ES512": bytes.fromhex("06052b81040023"),  # 1.3.132.0.35 secp521r1
}
_CURVES: dict[bytes, tuple[ec.EllipticCurve, int]] = {
    EC_PARAMS["ES256"]: (ec.SECP256R1(), 32),
    EC_PARAMS["ES384"]: (ec.SECP384R1(), 48),
    EC_PARAMS["ES512"]: (ec.SECP521R1(), 66),
}
#: Ed25519 ``CKA_EC_PARAMS``: the RFC 8410 OID 1.3.101.112, or (PKCS#11 3.0
#: also allows it) the printable string "edwards25519". The OID is tried first.
ED25519_PARAMS: tuple[bytes, ...] = (
    bytes.fromhex("06032b6570"),
    bytes.fromhex("130c") + b"edwards25519",
)
_HASH = {"256": "sha256", "384": "sha384", "512": "sha512"}
#: python-pkcs11 exception names that mean "no such object (any more)".
_GONE = frozenset({"ObjectHandleInvalid", "KeyHandleInvalid"})


def mechanisms_for(alg: str) -> tuple[str, str]:
    """(key pair generation, signing) mechanism names ``alg`` needs, without ``CKM_``."""
    family = jose.alg_family(alg)
    if family == "EC":
        return "EC_KEY_PAIR_GEN", "ECDSA"
    if family == "OKP":
        return "EC_EDWARDS_KEY_PAIR_GEN", "EDDSA"
    scheme = "RSA_PKCS" if alg.startswith("RS") else "RSA_PKCS_PSS"
    return "RSA_PKCS_KEY_PAIR_GEN", f"SHA{alg[2:]}_{scheme}"


@dataclass
class _Key:
    """One key pair under keymgr's label, as read from the token (public data only)."""

    ring: str
    id: bytes
    kid: str
    jwk: dict[str, str]
    public_key: jose.PublicKey
    #: A private key object exists (False: a public object left by an interrupted destroy).
    private: bool
    #: Why keymgr must not list, use or destroy it (None: keymgr's own, fine).
    problem: str | None
    #: The private key object found in session ``generation`` (a pkcs11.PrivateKey).
    handle: Any = None
    generation: int = -1

    @property
    def intent(self) -> str | None:
        return self.id[:8].hex() if len(self.id) == ID_SIZE else None


class PKCS11Backend(Backend):
    """Keys on a PKCS#11 token (``type = "pkcs11"``)."""

    type_name: ClassVar[str] = TYPE_NAME
    #: Every algorithm keymgr signs with; each needs its mechanisms on the token
    #: (EdDSA: CKM_EDDSA, which SoftHSM 2.6 has and not every HSM does).
    algorithms: ClassVar[frozenset[str]] = jose.ALGORITHMS

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        o = Options(options, f"backends.{name}", _OPTIONS, config_dir=config_dir, hidden=_REFUSED)
        if "pin" in o:
            raise o.err(
                "pin",
                "a literal PIN is refused (it would sit in the config file and in backups); "
                "use pin_file or pin_env",
            )
        if "so_pin" in o:
            raise o.err("so_pin", "keymgr never needs the security officer's PIN; remove it")
        module = o.path("module", env=MODULE_ENV)
        if module is None:
            raise o.err(
                "module",
                "is required: the token's PKCS#11 library, e.g. "
                f"/usr/lib/softhsm/libsofthsm2.so (or set {MODULE_ENV})",
            )
        self.module: Path = module
        if "token_label" in o and "slot" in o:
            raise o.err("slot", "give token_label or slot, not both")
        self.token_label: str | None = o.string("token_label")
        self.slot: int | None = None
        if "slot" in o:
            self.slot = o.integer("slot", 0, 0, _MAX_SLOT)
        elif self.token_label is None:
            raise o.err("token_label", "is required (or slot): the token that holds the keys")
        if self.token_label is not None and len(self.token_label.encode()) > _MAX_TOKEN_LABEL:
            raise o.err("token_label", f"a token label has at most {_MAX_TOKEN_LABEL} bytes")
        # Neither PIN option is ever echoed: a PIN put there by mistake must not reach a log.
        if "pin_file" in o and "pin_env" in o:
            raise o.err("pin_env", "give pin_file or pin_env, not both")
        raw_file = o.raw("pin_file")
        if raw_file is not None and (not isinstance(raw_file, str) or not raw_file.strip()):
            raise o.err("pin_file", "expected the path of a file that holds the PIN")
        self.pin_file: Path | None = o.path("pin_file")
        pin_env = o.raw("pin_env")
        if pin_env is not None and (
            not isinstance(pin_env, str) or not _ENV_NAME_RE.fullmatch(pin_env)
        ):
            raise o.err(
                "pin_env",
                "expected the name of an environment variable that holds the PIN "
                "(letters, digits and '_', not starting with a digit), not the PIN itself",
            )
        self.pin_env: str | None = pin_env
        if self.pin_file is None and self.pin_env is None:
            raise o.err(
                "pin_file",
                "is required (or pin_env, the name of an environment variable that holds the PIN)",
            )
        prefix = o.raw("label_prefix", DEFAULT_PREFIX)
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise o.err(
                "label_prefix",
                f"expected 1 to 32 letters, digits, '_', '.' or '-', got {prefix!r}",
            )
        self.label_prefix: str = prefix
        bits = o.integer("rsa_bits", 3072, jose.MIN_RSA_BITS, max(RSA_BITS))
        if bits not in RSA_BITS:
            raise o.err("rsa_bits", f"expected one of {', '.join(map(str, RSA_BITS))}, got {bits}")
        self.rsa_bits: int = bits
        self._what = f"backend {name} ({TYPE_NAME})"
        self._lock = threading.RLock()
        self._session: TokenSession | None = None
        # ring -> kid -> key, from the last scan (or generate) of the ring.
        self._index: dict[str, dict[str, _Key]] = {}
        # (ring, CKA_ID) -> (public key, JWK, kid): objects are never changed, only deleted.
        self._parsed: dict[tuple[str, bytes], tuple[jose.PublicKey, dict[str, str], str]] = {}
        self._signers: dict[tuple[str, str, str], Signer] = {}

    # -- plumbing -------------------------------------------------------------

    @property
    def pin_source(self) -> str:
        """How messages name where the PIN comes from (never the PIN)."""
        if self.pin_file is not None:
            return f"pin_file {self.pin_file}"
        return f"pin_env {self.pin_env}"

    def label(self, ring: str) -> str:
        """``CKA_LABEL`` of ``ring``'s key objects."""
        return f"{self.label_prefix}/{ring}"

    def paths(self) -> dict[str, Path]:
        """The PIN file (no file may also be the JWKS, the state, ...). Not the
        module: it is not keymgr's, and several backends may share it."""
        return {} if self.pin_file is None else {"pin_file": self.pin_file}

    def _token(self) -> TokenSession:
        with self._lock:
            if self._session is None:
                self._session = token_session(self.module, self.token_label, self.slot)
            return self._session

    def _fail(self, op: str, what: str) -> BackendError:
        return BackendError(f"{self._what}: {op}: {what}")

    def _call(self, op: str, fn: Callable[[Any], T], *, retry: bool = True) -> T:
        """``fn(session)`` on the token's session; failures are one-line BackendErrors."""
        return self._token().run(self._what, op, fn, self._read_pin, self.pin_source, retry=retry)

    def _read_pin(self) -> str:
        """The PIN, read now from its source (never cached, never in a message)."""
        if self.pin_file is not None:
            path = self.pin_file
            where = f"{self._what}: pin_file {path}"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise BackendError(f"{where}: cannot read ({e.strerror or e})") from None
            with os.fdopen(fd, "rb") as f:
                # The mode of the file actually opened, checked before reading it.
                problem = secret_file_exposure(os.fstat(f.fileno()), path)
                if problem is not None:
                    raise BackendError(f"{where}: {problem}")
                try:
                    raw = f.read(_MAX_PIN_FILE + 1)
                except OSError as e:
                    raise BackendError(f"{where}: cannot read ({e.strerror or e})") from None
            if len(raw) > _MAX_PIN_FILE:
                raise BackendError(f"{where}: larger than {_MAX_PIN_FILE} bytes; not a PIN file")
            try:
                pin = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise BackendError(f"{where}: not UTF-8 text") from None
            if not pin:
                raise BackendError(f"{where}: is empty")
            return pin
        assert self.pin_env is not None
        pin = os.environ.get(self.pin_env, "").strip()
        if not pin:
            raise BackendError(
                f"{self._what}: pin_env: environment variable {self.pin_env} is not set or empty"
            )
        return pin

    def _check_ring(self, ring: str) -> None:
        if not isinstance(ring, str) or not _RING_RE.fullmatch(ring):
            raise BackendError(f"{self._what}: invalid ring name {ring!r}")

    def _check_kid(self, kid: str) -> None:
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
            raise BackendError(
                f"{self._what}: invalid kid {kid!r} (expected an RFC 7638 thumbprint)"
            )

    def _require(self, alg: str, op: str, *, generate: bool) -> None:
        """Refuse, naming it, a mechanism ``alg`` needs that the token does not offer."""
        import pkcs11

        if alg not in self.algorithms:
            raise self._fail(
                op,
                f"unsupported algorithm {alg!r} (supported: {', '.join(sorted(self.algorithms))})",
            )
        offered = self._token().mechanisms(self._what, op)
        gen, sign = mechanisms_for(alg)
        needed = [gen, sign] if generate else [sign]
        missing = [m for m in needed if int(pkcs11.Mechanism[m]) not in offered]
        if missing:
            names = " and ".join(f"CKM_{m}" for m in missing)
            raise self._fail(
                op,
                f"{self._token().what} does not offer {names}, which {alg} needs "
                "(use another algorithm for this ring, or another token)",
            )
        if generate and gen == "RSA_PKCS_KEY_PAIR_GEN":
            low, high = self._token().key_sizes(self._what, op, int(pkcs11.Mechanism[gen]))
            if (low and self.rsa_bits < low) or (high and self.rsa_bits > high):
                raise self._fail(
                    op,
                    f"{self._token().what} makes RSA keys of {low} to {high} bits, "
                    f"not rsa_bits = {self.rsa_bits}",
                )

    # -- reading keys -----------------------------------------------------------

    def _scan(self, ring: str, op: str) -> dict[str, _Key]:
        """Every key pair under the ring's label, read from the token now."""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        label = self.label(ring)
        private_attrs = [
            Attribute.ID,
            Attribute.KEY_TYPE,
            Attribute.SIGN,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.NEVER_EXTRACTABLE,
        ]

        def read(session: Any) -> tuple[dict[bytes, list[dict[Any, Any]]], list[tuple[bytes, Any]]]:
            base = {Attribute.TOKEN: True, Attribute.LABEL: label}
            # Searches run to their end before any other call on the session.
            privs = list(session.get_objects({**base, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            pubs = list(session.get_objects({**base, Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
            private: dict[bytes, list[dict[Any, Any]]] = {}
            for obj in privs:
                attrs = obj.get_attributes(private_attrs)
                private.setdefault(bytes(attrs.get(Attribute.ID, b"")), []).append(attrs)
            public: list[tuple[bytes, Any]] = []
            for obj in pubs:
                key_id = bytes(obj[Attribute.ID])
                if (ring, key_id) in self._parsed:
                    public.append((key_id, None))
                    continue
                try:
                    public.append((key_id, _public_key(obj)))
                except (ValueError, pkcs11.AttributeTypeInvalid) as e:
                    log.warning("pkcs11.key_ignored", ring=ring, id=key_id.hex(), problem=str(e))
            return private, public

        private, public = self._call(op, read)
        index: dict[str, _Key] = {}
        for key_id, loaded in public:
            with self._lock:
                parsed = self._parsed.get((ring, key_id))
                if parsed is None:
                    if loaded is None:
                        continue  # destroyed by another thread since the search
                    jwk = jose.public_jwk(loaded)
                    parsed = self._parsed[(ring, key_id)] = (loaded, jwk, jose.thumbprint(jwk))
            public_key, jwk, kid = parsed
            privs = private.pop(key_id, [])
            problem = _problem(key_id, privs, public_key)
            if kid in index:
                raise self._fail(
                    op,
                    f"two public key objects labelled {label!r} hold the same key "
                    f"(CKA_ID {index[kid].id.hex()} and {key_id.hex()})",
                )
            index[kid] = _Key(ring, key_id, kid, jwk, public_key, bool(privs), problem)
        for key_id in private:
            log.warning(
                "pkcs11.key_ignored",
                ring=ring,
                id=key_id.hex(),
                problem="a private key without its public key object",
            )
        with self._lock:
            old = self._index.get(ring, {})
            for kid, key in index.items():  # keep the handles already found
                if kid in old and old[kid].id == key.id:
                    key.handle, key.generation = old[kid].handle, old[kid].generation
            self._index[ring] = index
        return index

    def _find(self, ring: str, kid: str, op: str) -> _Key | None:
        """The ring's key ``kid`` (from the index, else a fresh scan), or None."""
        self._check_ring(ring)
        self._check_kid(kid)
        with self._lock:
            key = self._index.get(ring, {}).get(kid)
        if key is None:
            key = self._scan(ring, op).get(kid)
        return key

    def _lookup(self, ring: str, kid: str, op: str) -> _Key:
        key = self._find(ring, kid, op)
        if key is None or not key.private:
            raise KeyNotFoundError(
                str(
                    self._fail(
                        op,
                        f"no key {ring}/{kid} on {self._token().what} "
                        f"(label {self.label(ring)!r})",
                    )
                )
            )
        return key

    def _private(self, session: Any, key: _Key) -> Any:
        """The key's private object in this session (looked up again after a re-open)."""
        from pkcs11 import Attribute, ObjectClass

        generation = self._token().generation
        if key.handle is not None and key.generation == generation:
            return key.handle
        found = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.TOKEN: True,
                    Attribute.LABEL: self.label(key.ring),
                    Attribute.ID: key.id,
                }
            )
        )
        if not found:
            raise KeyNotFoundError(
                f"{self._what}: key {key.ring}/{key.kid}: its private key object is gone"
            )
        if len(found) > 1:
            raise BackendError(
                f"{self._what}: key {key.ring}/{key.kid}: {len(found)} private key objects "
                f"have CKA_ID {key.id.hex()}; refusing to guess"
            )
        key.handle, key.generation = found[0], generation
        return found[0]

    # -- Backend API --------------------------------------------------------------

    def generate(self, ring: str, alg: str, *, intent: str | None = None) -> GeneratedKey:
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag

        self._check_ring(ring)
        op = f"generate {alg} key"
        self._require(alg, op, generate=True)
        first = bytes.fromhex(intent) if intent and _INTENT_RE.fullmatch(intent) else None
        key_id = (first or secrets.token_bytes(8)) + secrets.token_bytes(8)
        label = self.label(ring)
        family = jose.alg_family(alg)
        gen_mechanism = Mechanism[mechanisms_for(alg)[0]]
        public_template: dict[Any, Any] = {Attribute.TOKEN: True, Attribute.PRIVATE: False}
        private_template: dict[Any, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        }
        if family == "EC":
            key_type, key_length, params = KeyType.EC, None, [EC_PARAMS[alg]]
        elif family == "OKP":
            key_type, key_length, params = KeyType.EC_EDWARDS, None, list(ED25519_PARAMS)
        else:
            key_type, key_length, params = KeyType.RSA, self.rsa_bits, [b""]

        def make(session: Any) -> tuple[jose.PublicKey, dict[Any, Any]]:
            for i, ec_params in enumerate(params):
                template = dict(public_template)
                if ec_params:
                    template[Attribute.EC_PARAMS] = ec_params
                try:
                    public, private = session.generate_keypair(
                        key_type,
                        key_length,
                        id=key_id,
                        label=label,
                        store=True,
                        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                        mechanism=gen_mechanism,
                        public_template=template,
                        private_template=private_template,
                    )
                    break
                except pkcs11.PKCS11Error as e:
                    # A token that wants Ed25519 named the other way (a failed
                    # C_GenerateKeyPair makes nothing): try the next encoding.
                    if i + 1 < len(params) and type(e).__name__ in (
                        "DomainParamsInvalid",
                        "AttributeValueInvalid",
                        "TemplateInconsistent",
                        "PKCS11Error",
                    ):
                        continue
                    raise
            crashpoint("pkcs11.after_generate")
            # From here on a failure leaves a complete key pair under the ring's
            # label with the intent in its CKA_ID: the next generate adopts it.
            attrs = private.get_attributes(
                [
                    Attribute.ID,
                    Attribute.KEY_TYPE,
                    Attribute.SIGN,
                    Attribute.SENSITIVE,
                    Attribute.EXTRACTABLE,
                    Attribute.ALWAYS_SENSITIVE,
                    Attribute.NEVER_EXTRACTABLE,
                ]
            )
            try:
                loaded = _public_key(public)
            except ValueError as e:
                _destroy_quietly(public, private)
                raise self._fail(op, f"the token returned an unusable public key ({e})") from None
            problem = _problem(key_id, [attrs], loaded)
            if problem is None:
                try:
                    jose.check_key_matches_alg(loaded, alg)
                except ValueError as e:
                    problem = f"does not fit {alg} ({e})"
            if problem is not None:
                _destroy_quietly(public, private)
                raise self._fail(op, f"the token made a key that {problem}; deleted it")
            return loaded, attrs

        public_key, _ = self._call(op, make, retry=False)
        jwk = jose.public_jwk(public_key)
        kid = jose.thumbprint(jwk)
        with self._lock:
            self._parsed[(ring, key_id)] = (public_key, jwk, kid)
            self._index.setdefault(ring, {})[kid] = _Key(
                ring, key_id, kid, jwk, public_key, True, None
            )
        log.debug("pkcs11.key_created", ring=ring, kid=kid, id=key_id.hex(), alg=alg)
        return GeneratedKey(kid=kid, public_jwk=dict(jwk))

    def public_jwk(self, ring: str, kid: str) -> dict[str, str]:
        return dict(self._lookup(ring, kid, "read public key").jwk)

    def intent_of(self, ring: str, kid: str) -> str | None:
        """The intent nonce in the key's ``CKA_ID`` (its first 8 bytes, as hex).

        A key made without an intent has 8 random bytes there, which match an
        open intent only by a 1-in-2^64 chance.
        """
        return self._lookup(ring, kid, "intent").intent

    def list_keys(self, ring: str) -> list[str]:
        """Kids of the ring's complete, sound key pairs (a fresh search: finds
        other processes' keys and crash orphans). Keys with a problem are
        logged, never listed."""
        self._check_ring(ring)
        kids = []
        for kid, key in self._scan(ring, "list keys").items():
            if key.problem is not None:
                log.warning("pkcs11.key_ignored", ring=ring, id=key.id.hex(), problem=key.problem)
            elif key.private:
                kids.append(kid)
        return sorted(kids)

    def signer(self, ring: str, kid: str, alg: str) -> Signer:
        cache_key = (ring, kid, alg)
        with self._lock:
            cached = self._signers.get(cache_key)
        if cached is not None:
            return cached
        op = f"sign with {kid}"
        key = self._lookup(ring, kid, op)
        if key.problem is not None:
            raise self._fail(op, f"key {ring}/{kid} {key.problem}; refusing to sign with it")
        if alg not in self.algorithms:
            raise self._fail(op, f"unsupported algorithm {alg!r}")
        try:
            jose.check_key_matches_alg(key.public_key, alg)
        except ValueError as e:
            raise self._fail(op, f"key {ring}/{kid}: {e}") from None
        self._require(alg, op, generate=False)
        sign = self._make_signer(key, alg, op)
        # The private object must be the public key's other half: a probe, once.
        probe = b"keymgr pkcs11 key check " + secrets.token_bytes(16)
        if not _verifies(key.public_key, alg, probe, sign(probe)):
            raise KeyIntegrityError(
                f"{self._what}: {op}: the private key object with CKA_ID {key.id.hex()} does not "
                f"match its public key (thumbprint {kid}); refusing to sign with it"
            )
        with self._lock:
            self._signers[cache_key] = sign
        return sign

    def _make_signer(self, key: _Key, alg: str, op: str) -> Signer:
        """The per-token closure: one C_SignInit + C_Sign on the shared session."""
        import pkcs11
        from pkcs11 import MGF, Mechanism

        mechanism = Mechanism[mechanisms_for(alg)[1]]
        family = jose.alg_family(alg)
        param: tuple[Any, ...] | None = None
        digest_name: str | None = None
        if family == "EC":
            digest_name = _HASH[alg[2:]]
            size = jose.ec_coordinate_size(jose.curve_for(alg))
            length = 2 * size
        elif family == "RSA":
            assert isinstance(key.public_key, rsa.RSAPublicKey)
            length = (key.public_key.key_size + 7) // 8
            if alg.startswith("PS"):
                bits = alg[2:]
                digest_size = int(bits) // 8
                param = (Mechanism[f"SHA{bits}"], MGF[f"SHA{bits}"], digest_size)
        else:
            length = 64
        call, private_of = self._call, self._private

        def sign(data: bytes) -> bytes:
            message = hashlib.new(digest_name, data).digest() if digest_name else data

            def run(session: Any) -> bytes:
                private = private_of(session, key)
                try:
                    return bytes(private.sign(message, mechanism=mechanism, mechanism_param=param))
                except pkcs11.PKCS11Error as e:
                    if type(e).__name__ not in _GONE:
                        raise
                # A stale handle (the token reloaded its objects): look the key up again.
                key.handle = None
                private = private_of(session, key)
                return bytes(private.sign(message, mechanism=mechanism, mechanism_param=param))

            signature = call(op, run)
            if family == "EC" and len(signature) != length and signature[:1] == b"\x30":
                try:  # a token that answers DER, against PKCS#11
                    signature = jose.der_to_raw_ecdsa(signature, length // 2)
                except ValueError as e:
                    raise BackendError(f"{self._what}: {op}: malformed signature ({e})") from None
            if len(signature) != length:
                raise BackendError(
                    f"{self._what}: {op}: {len(signature)}-byte signature, expected {length}"
                )
            return signature

        return sign

    def destroy(self, ring: str, kid: str) -> None:
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        op = f"destroy {kid}"
        key = self._find(ring, kid, op)
        if key is None:
            return  # already gone (or never made): destroy is idempotent
        if key.problem is not None:
            raise self._fail(
                op, f"key {ring}/{kid} {key.problem}; not keymgr's to destroy, left alone"
            )
        label = self.label(ring)

        def delete(session: Any) -> None:
            # The private half first: once it is gone, the key cannot sign.
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                found = session.get_objects(
                    {
                        Attribute.CLASS: cls,
                        Attribute.TOKEN: True,
                        Attribute.LABEL: label,
                        Attribute.ID: key.id,
                    }
                )
                for obj in list(found):
                    try:
                        obj.destroy()
                    except pkcs11.PKCS11Error as e:
                        if type(e).__name__ not in _GONE:  # deleted meanwhile: fine
                            raise
                if cls == ObjectClass.PRIVATE_KEY:
                    crashpoint("pkcs11.after_destroy_private")

        self._call(op, delete)
        with self._lock:
            self._index.get(ring, {}).pop(kid, None)
            self._parsed.pop((ring, key.id), None)
            for k in [k for k in self._signers if k[:2] == (ring, kid)]:
                del self._signers[k]
        log.debug("pkcs11.key_deleted", ring=ring, kid=kid, id=key.id.hex())

    def check(self) -> None:
        """Module, token, session and login (PIN): one search that finds nothing."""
        from pkcs11 import Attribute

        label = f"{self.label_prefix}/"  # no ring has an empty name: matches no object
        self._call("check", lambda session: list(session.get_objects({Attribute.LABEL: label})))

    def offline_check(self) -> list[str]:
        """For ``keymgr config check``: stats only; the module is not loaded (a
        network HSM's module connects when loaded) and the PIN not read.

        The module must be a readable regular file; the PIN file must exist, be
        readable, not be empty and not be open to group or others (``chmod
        600``, or ``root:keymgr 0640``); a ``pin_env`` variable must be set.
        """
        field = f"backends.{self.name}"
        self._check_file(f"{field}.module", self.module, secret=False)
        if self.pin_file is not None:
            self._check_file(f"{field}.pin_file", self.pin_file, secret=True)
        elif not os.environ.get(self.pin_env or "", "").strip():
            raise ConfigError(
                f"{field}.pin_env: environment variable {self.pin_env} is not set or empty: "
                "no key can be generated or used"
            )
        return []

    @staticmethod
    def _check_file(field: str, path: Path, *, secret: bool) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            what = "" if secret else " (the token's PKCS#11 library: installed?)"
            raise ConfigError(f"{field}: {path} does not exist{what}") from None
        except OSError as e:
            raise ConfigError(f"{field}: cannot check {path} ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{field}: {path} is not a regular file")
        if secret:
            problem = secret_file_exposure(st, path)
            if problem is not None:
                raise ConfigError(f"{field}: {path}: {problem}")
            if st.st_size == 0:
                raise ConfigError(f"{field}: {path} is empty")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{field}: {path} is not readable by this user (uid {os.getuid()})")


# -- helpers ------------------------------------------------------------------------


def _public_key(obj: Any) -> jose.PublicKey:
    """The public key of a PKCS#11 public key object, as ``cryptography`` loads it."""
    from pkcs11 import Attribute, KeyType

    key_type = obj[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        attrs = obj.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        n = int.from_bytes(bytes(attrs[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(attrs[Attribute.PUBLIC_EXPONENT]), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if key_type in (KeyType.EC, KeyType.EC_EDWARDS):
        attrs = obj.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
        params, point = bytes(attrs[Attribute.EC_PARAMS]), bytes(attrs[Attribute.EC_POINT])
        if key_type == KeyType.EC_EDWARDS:
            if params not in ED25519_PARAMS:
                raise ValueError(
                    f"an Edwards curve other than Ed25519 (CKA_EC_PARAMS {params.hex()})"
                )
            return ed25519.Ed25519PublicKey.from_public_bytes(_octets(point, 32))
        curve = _CURVES.get(params)
        if curve is None:
            raise ValueError(f"a curve keymgr does not sign with (CKA_EC_PARAMS {params.hex()})")
        return ec.EllipticCurvePublicKey.from_encoded_point(
            curve[0], _octets(point, 1 + 2 * curve[1])
        )
    raise ValueError(f"key type {key_type!r} is not one keymgr signs with")


def _octets(value: bytes, size: int) -> bytes:
    """A ``CKA_EC_POINT``: DER OCTET STRING (as PKCS#11 says) or raw (as some tokens give)."""
    if len(value) == size:
        return value
    if value[:1] == b"\x04" and len(value) > 2:
        length, body = value[1], value[2:]
        if length == 0x81 and len(value) > 3:
            length, body = value[2], value[3:]
        if length == len(body) == size:
            return body
    raise ValueError(f"CKA_EC_POINT of {len(value)} bytes is not a {size}-byte point")


def _problem(key_id: bytes, privs: list[dict[Any, Any]], public: jose.PublicKey) -> str | None:
    """Why a key pair under keymgr's label is not keymgr's to use (None: it is)."""
    from pkcs11 import Attribute, KeyType

    if len(key_id) != ID_SIZE:
        return f"has a CKA_ID of {len(key_id)} bytes, not keymgr's {ID_SIZE}"
    if not privs:
        return None  # a public object left by an interrupted destroy
    if len(privs) > 1:
        return f"has {len(privs)} private key objects with one CKA_ID"
    attrs = privs[0]
    want = {
        Attribute.SIGN: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.NEVER_EXTRACTABLE: True,
    }
    for attribute, value in want.items():
        if attrs.get(attribute) is not value:
            name = "CKA_" + attribute.name
            return f"has a private key with {name}={str(attrs.get(attribute)).lower()}"
    kinds: dict[Any, type] = {
        KeyType.RSA: rsa.RSAPublicKey,
        KeyType.EC: ec.EllipticCurvePublicKey,
        KeyType.EC_EDWARDS: ed25519.Ed25519PublicKey,
    }
    kind = kinds.get(attrs.get(Attribute.KEY_TYPE))
    if kind is None or not isinstance(public, kind):
        return "has a private key of another key type than its public key"
    return None


def _verifies(public: jose.PublicKey, alg: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (JWS form) over ``data`` verifies under ``public``."""
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            half = len(signature) // 2
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            public.verify(der, data, ec.ECDSA(jose.hash_for(alg)))
        elif isinstance(public, rsa.RSAPublicKey):
            digest = jose.hash_for(alg)
            pad: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
                if alg.startswith("PS")
                else padding.PKCS1v15()
            )
            public.verify(signature, data, pad, digest)
        else:
            public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _destroy_quietly(*objects: Any) -> None:
    """Delete objects keymgr just made and will not use (best effort)."""
    import pkcs11

    for obj in objects:
        try:
            obj.destroy()
        except pkcs11.PKCS11Error as e:
            log.warning("pkcs11.cleanup_failed", problem=describe(e))
