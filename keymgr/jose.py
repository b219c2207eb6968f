"""Small JOSE helpers (JWS compact, JWK export, RFC 7638 thumbprints) on ``cryptography``.

Why hand-written rather than PyJWT/jwcrypto at run time: keymgr only ever needs
the signing half of JWS and the public half of JWK, both a few lines on top of
``cryptography`` (the project's only crypto dependency), and the signer is a hot
path. Correctness is proven in the tests against the RFC 7515/7638/8037 vectors
and against independent verifiers (PyJWT, jwcrypto), never against this module.

Two details here are easy to get wrong and each breaks interoperability only
occasionally, which is why they are spelled out:

* EC coordinates are fixed-length (RFC 7518 6.2.1.2): a minimal-length integer
  encoder emits a short ``x`` or ``y`` for about 1 key in 128 (P-256/P-384) and
  for half of all P-521 keys, and strict verifiers reject those keys.
* ECDSA JWS signatures are raw ``r || s``, each zero-padded to the coordinate
  size (RFC 7518 3.4), not the DER that ``cryptography`` produces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keymgr.backend import Signer

__all__ = [
    "ALGORITHMS",
    "KEY_MEMBERS",
    "MIN_RSA_BITS",
    "PRIVATE_MEMBERS",
    "PrivateKey",
    "PublicKey",
    "Signer",
    "alg_family",
    "assert_public",
    "b64url",
    "b64url_bytes",
    "b64url_decode",
    "check_key_matches_alg",
    "claims_json",
    "compact_json",
    "curve_for",
    "der_to_raw_ecdsa",
    "ec_coordinate_size",
    "encode_compact",
    "generate_private_key",
    "hash_for",
    "make_signer",
    "public_jwk",
    "signing_input",
    "thumbprint",
    "thumbprint_of",
]

#: JWS algorithms keymgr signs with. ``none`` and HMAC are deliberately absent:
#: a shared secret can never be published in a JWKS.
ALGORITHMS: frozenset[str] = frozenset(
    {
        "ES256",
        "ES384",
        "ES512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "EdDSA",
    }
)

#: Below this, RSA keys are considered breakable within a key's lifetime
#: (NIST SP 800-131A), and RFC 7518 3.3 requires at least 2048 bits.
MIN_RSA_BITS = 2048

#: JWK members that carry private or symmetric key material (RFC 7518 6.2.2,
#: 6.3.2, 6.4.1; RFC 8037 2). None may ever appear in a published document.
PRIVATE_MEMBERS: frozenset[str] = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

Family = Literal["EC", "RSA", "OKP"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_EC_CURVES: dict[str, tuple[str, ec.EllipticCurve, int]] = {
    # alg: (JWK crv, cryptography curve, coordinate size in bytes)
    "ES256": ("P-256", ec.SECP256R1(), 32),
    "ES384": ("P-384", ec.SECP384R1(), 48),
    "ES512": ("P-521", ec.SECP521R1(), 66),
}
_CRV_SIZE: dict[str, int] = {crv: size for crv, _, size in _EC_CURVES.values()}
# cryptography's curve.name -> JWK "crv"
_CURVE_NAME_TO_CRV: dict[str, str] = {curve.name: crv for crv, curve, _ in _EC_CURVES.values()}

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}

# Members RFC 7638 3.2 requires in the thumbprint input, per kty (already sorted).
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}

#: The members of a public JWK, per kty: exactly those its thumbprint hashes.
KEY_MEMBERS = {kty: frozenset(m) for kty, m in _THUMBPRINT_MEMBERS.items()}

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def _require_alg(alg: str) -> None:
    if alg not in ALGORITHMS:
        raise ValueError(
            f"unsupported JWS algorithm {alg!r} (supported: {', '.join(sorted(ALGORITHMS))})"
        )


def alg_family(alg: str) -> Family:
    """The JWK ``kty`` a key for ``alg`` has, so callers can pick a generator."""
    _require_alg(alg)
    if alg.startswith("ES"):
        return "EC"
    if alg.startswith(("RS", "PS")):
        return "RSA"
    return "OKP"


def curve_for(alg: str) -> str:
    """The JWK ``crv`` an ECDSA ``alg`` is bound to (RFC 7518 3.4 pins one curve each)."""
    _require_alg(alg)
    try:
        return _EC_CURVES[alg][0]
    except KeyError:
        raise ValueError(f"{alg} is not an ECDSA algorithm and has no curve") from None


def hash_for(alg: str) -> hashes.HashAlgorithm:
    """A fresh hash instance for ``alg``; EdDSA hashes internally and has none."""
    _require_alg(alg)
    if alg == "EdDSA":
        raise ValueError("EdDSA has no separate hash algorithm")
    return _HASHES[alg[2:]]()


def ec_coordinate_size(curve: str | ec.EllipticCurve) -> int:
    """Byte length of one coordinate (and of r and s): the fixed width JOSE requires.

    Accepts a JWK ``crv`` (``"P-256"``) or a ``cryptography`` curve object.
    """
    if isinstance(curve, ec.EllipticCurve):
        return (curve.key_size + 7) // 8
    try:
        return _CRV_SIZE[curve]
    except KeyError:
        raise ValueError(f"unsupported EC curve {curve!r}") from None


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 2), the encoding of every JOSE binary field."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64_TO_URL = bytes.maketrans(b"+/", b"-_")
_URL_TO_B64 = bytes.maketrans(b"-_", b"+/")


def b64url_bytes(
    data: bytes, _b2a: Callable[..., bytes] = binascii.b2a_base64, _t: bytes = _B64_TO_URL
) -> bytes:
    """:func:`b64url` as ASCII bytes, for the signing hot path (no str round trip)."""
    return _b2a(data, newline=False).translate(_t).rstrip(b"=")


def _json_default(obj: object) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


#: ``json.dumps(obj, separators=(",", ":"))``, same text. Off the signing hot
#: path: the JWS header is encoded once per key (``KeyManager`` caches it) and
#: claims go through orjson (:data:`claims_json`), which falls back here only
#: for what it refuses.
compact_json: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":")).encode


def _make_claims_json() -> Callable[[Any], bytes]:
    # orjson writes a small claims set in ~0.2 us against ~1.3 us for the C
    # encoder of the stdlib: a sixth of keymgr's own cost around an ES256
    # signature. Kept to plain JSON types: datetimes, dataclasses and
    # subclasses go to ``default`` (which refuses them, as json does) instead
    # of orjson's own renderings (an ``exp`` datetime would become a string
    # that verifiers reject). What orjson refuses (integers beyond 64 bits,
    # non-string keys) falls back to the stdlib, so the accepted input and
    # its errors stay those of ``json``.
    import orjson

    dumps = orjson.dumps
    opts = (
        orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )

    def claims_json(obj: Any) -> bytes:
        try:
            return dumps(obj, _json_default, opts)
        except TypeError:
            return compact_json(obj).encode()

    return claims_json


#: Compact UTF-8 JSON of a claims set, for the signing hot path.
claims_json: Callable[[Any], bytes] = _make_claims_json()


def b64url_decode(s: str) -> bytes:
    """Strict inverse of :func:`b64url`.

    The stdlib decoder silently skips characters outside the alphabet; here
    padding, whitespace, the standard alphabet's ``+``/``/`` and non-zero
    unused trailing bits are errors, so a damaged value fails loudly instead
    of decoding to something else (or to the same bytes as another string).
    """
    if not _B64URL_RE.fullmatch(s) or len(s) % 4 == 1:
        raise ValueError("invalid base64url value")
    # binascii directly, not base64.urlsafe_b64decode's three Python layers:
    # every key of a 100,000-ring state has its coordinates decoded at load.
    text = s.encode("ascii")
    try:
        data = binascii.a2b_base64(text.translate(_URL_TO_B64) + b"=" * (-len(s) % 4))
    except binascii.Error:  # pragma: no cover - excluded by the checks above
        raise ValueError("invalid base64url value") from None
    # Non-zero unused trailing bits would let two strings decode alike.
    if b64url_bytes(data) != text:
        raise ValueError("non-canonical base64url value")
    return data


def _uint(n: int) -> bytes:
    # RFC 7518 6.3.1: minimal big-endian octets (at least one), no sign byte.
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    """The JWK of a public key: ``kty`` and key members only.

    ``kid``, ``alg`` and ``use`` are left to the caller because they are policy,
    not key material, and must not enter the RFC 7638 thumbprint.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAME_TO_CRV.get(public_key.curve.name)
        if crv is None:
            raise ValueError(f"unsupported EC curve {public_key.curve.name!r}")
        size = _CRV_SIZE[crv]
        # The X9.62 uncompressed point is 04 || x || y with both coordinates
        # already at full width, which gives the padding JOSE needs for free.
        point = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url(point[1 : 1 + size]),
            "y": b64url(point[1 + size :]),
        }
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {"kty": "RSA", "n": b64url(_uint(numbers.n)), "e": b64url(_uint(numbers.e))}
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    raise ValueError(f"unsupported public key type {type(public_key).__name__}")


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: keymgr's ``kid``.

    Only the required members enter the hash, so adding ``kid``/``alg``/``use``
    to a JWK never changes its id, and any verifier can recompute it.
    """
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _THUMBPRINT_MEMBERS:
        raise ValueError(f"cannot compute a thumbprint for kty {kty!r}")
    required: Mapping[str, str]
    if type(jwk) is dict and jwk.keys() == KEY_MEMBERS[kty] and all(
        type(v) is str for v in jwk.values()
    ):
        required = jwk  # exactly the required members (a stored public JWK): no copy
    else:
        required = {}
        for member in _THUMBPRINT_MEMBERS[kty]:
            value = jwk.get(member)
            if not isinstance(value, str):
                raise ValueError(f"JWK of kty {kty} lacks string member {member!r}")
            required[member] = value
    # Sorted keys, no whitespace, UTF-8 (RFC 7638 3): what json.dumps(...,
    # separators=(",", ":"), sort_keys=True, ensure_ascii=False) writes, at a
    # fifth of the cost (every key's kid is checked when a state is loaded).
    try:
        canonical = orjson.dumps(required, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # a lone surrogate: not UTF-8 text
        raise ValueError("JWK members are not valid Unicode text") from None
    return thumbprint_of(canonical)


def thumbprint_of(canonical: bytes) -> str:
    """The thumbprint of a JWK's RFC 7638 canonical JSON (its required members,
    sorted, no whitespace, UTF-8): SHA-256, base64url without padding."""
    return b64url_bytes(hashlib.sha256(canonical).digest()).decode("ascii")


def der_to_raw_ecdsa(der: bytes, size: int) -> bytes:
    """DER ECDSA signature -> JOSE ``r || s``, each left-padded to ``size`` bytes."""
    r, s = decode_dss_signature(der)
    try:
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    except OverflowError:
        raise ValueError(f"ECDSA signature component larger than {size} bytes") from None


def generate_private_key(alg: str, rsa_bits: int = 3072) -> PrivateKey:
    """A fresh private key of the type ``alg`` requires.

    3072-bit RSA by default: 2048 is the floor, but 3072 keeps ~128-bit strength
    past 2030 (NIST SP 800-57) at a signing cost that is still small.
    """
    family = alg_family(alg)
    if family == "EC":
        return ec.generate_private_key(_EC_CURVES[alg][1])
    if family == "RSA":
        if isinstance(rsa_bits, bool) or not isinstance(rsa_bits, int):
            raise ValueError(f"rsa_bits must be an integer, got {rsa_bits!r}")
        if rsa_bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must be at least {MIN_RSA_BITS} bits, got {rsa_bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    return ed25519.Ed25519PrivateKey.generate()


def check_key_matches_alg(key: PrivateKey | PublicKey, alg: str) -> None:
    """Refuse a key that ``alg`` cannot or must not use.

    Catching this at generate/load time beats finding out from a verifier that
    rejects every token (e.g. a P-256 key labelled ES384, or a short RSA key).
    """
    family = alg_family(alg)
    if family == "EC":
        if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"{alg} needs an EC key, got {_describe(key)}")
        want = _EC_CURVES[alg][1].name
        if key.curve.name != want:
            raise ValueError(
                f"{alg} needs an EC key on {curve_for(alg)}, got one on "
                f"{_CURVE_NAME_TO_CRV.get(key.curve.name, key.curve.name)}"
            )
    elif family == "RSA":
        if not isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            raise ValueError(f"{alg} needs an RSA key, got {_describe(key)}")
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"{alg} needs an RSA key of at least {MIN_RSA_BITS} bits, got {key.key_size}"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"{alg} needs an Ed25519 key, got {_describe(key)}")


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC key on {_CURVE_NAME_TO_CRV.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"a {key.key_size}-bit RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__}"


def make_signer(private_key: PrivateKey, alg: str) -> Signer:
    """A closure turning a JWS signing input into the JWS signature bytes.

    Everything that does not depend on the message (padding, hash, bound
    method, sizes) is built once here, because the closure runs for every
    token issued; it stays within a few percent of a bare ``key.sign``.
    """
    check_key_matches_alg(private_key, alg)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        ec_sign = private_key.sign
        ecdsa = ec.ECDSA(hash_for(alg))
        size = _EC_CURVES[alg][2]
        if size > 48:  # P-521: the DER sequence needs a long-form length

            def sign_ec_long(data: bytes) -> bytes:
                return der_to_raw_ecdsa(ec_sign(data, ecdsa), size)

            return sign_ec_long

        def sign_ec(data: bytes) -> bytes:
            der = ec_sign(data, ecdsa)
            # P-256/P-384 DER from OpenSSL: 30 L 02 rl r 02 sl s, all lengths
            # short-form. Slicing r and s out costs a third of decoding them to
            # integers and back; anything not of exactly that shape takes the
            # general decoder. s ends the sequence, so when it is full length
            # (sl = size, or size + 1 with a sign byte) it is the last
            # ``size`` bytes.
            rl = der[3]
            if der[0] == 0x30 and der[2] == 2 and der[4 + rl] == 2 and der[1] + 2 == len(der):
                r = der[4 : 4 + rl][-size:]
                if len(r) < size:
                    r = r.rjust(size, b"\0")
                if der[5 + rl] >= size:
                    return r + der[-size:]
                return r + der[6 + rl :].rjust(size, b"\0")
            return der_to_raw_ecdsa(der, size)  # pragma: no cover - OpenSSL is DER

        return sign_ec
    if isinstance(private_key, rsa.RSAPrivateKey):
        rsa_sign = private_key.sign
        digest = hash_for(alg)
        pad: padding.AsymmetricPadding
        if alg.startswith("PS"):
            # RFC 7518 3.5: the salt is as long as the hash. PSS.MAX_LENGTH
            # would be accepted by lenient verifiers but rejected by strict ones.
            pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        else:
            pad = padding.PKCS1v15()

        def sign_rsa(data: bytes) -> bytes:
            return rsa_sign(data, pad, digest)

        return sign_rsa
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        # The bound method already has the exact Signer shape: no wrapper cost.
        return private_key.sign
    raise ValueError(f"{alg} signing needs a private key, got {type(private_key).__name__}")


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signing_input(header: Mapping[str, Any], payload: Mapping[str, Any]) -> bytes:
    """ASCII ``BASE64URL(header) '.' BASE64URL(payload)`` (RFC 7515 5.1)."""
    return f"{b64url(_json(header))}.{b64url(_json(payload))}".encode("ascii")


def encode_compact(header: Mapping[str, Any], payload: Mapping[str, Any], signer: Signer) -> str:
    """JWS compact serialization of JSON ``header`` and ``payload``.

    JSON is emitted compactly and key order is kept as given; verifiers hash
    the transmitted bytes, so no canonical form is needed.
    """
    data = signing_input(header, payload)
    return f"{data.decode('ascii')}.{b64url(signer(data))}"


def assert_public(jwk: Mapping[str, Any]) -> None:
    """Refuse a JWK carrying private or symmetric material (design invariant 5)."""
    leaked = sorted(PRIVATE_MEMBERS.intersection(jwk))
    if leaked:
        raise ValueError(
            f"JWK contains private member(s) {', '.join(repr(m) for m in leaked)}; "
            "refusing to publish it"
        )
