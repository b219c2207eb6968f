"""Signed checkpoints of the audit log (``[audit]``).

The hash chain alone has no secret: whoever can write the log and the state
can rewrite both and recompute every hash. With ``[audit]`` configured, every
commit that adds events also signs the new chain head, ``(seq, hash)``, with
an *audit key* held in a backend (KMS, Vault transit or the local store), under
the reserved ring :data:`~keymgr.config.AUDIT_RING`. The signature rides on
the batch's last line as ``ckpt_kid`` and ``ckpt_sig`` (base64url of the JWS
signature bytes), two fields the chain hash leaves out, so the chain verifies
with or without the key.

The audit key's public JWK is written into the log itself, as an
``audit.key`` event in the first batch it is used for. The key is replaced
after ``rotation_period`` (or when ``[audit]`` names another backend or
algorithm): the batch that introduces the new key is still signed by the old
one, so every key change is authenticated by its predecessor. A signature
covers its line and, through the chain, every line before it.

Signatures are checked with ``cryptography`` and the public keys alone (from
the log, a pinned JWKS, or read once from the backend): never by asking the
backend whether a signature is good.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keymgr import jose
from keymgr.errors import AuditError, KeymgrError, UsageError
from keymgr.model import AuditAnchor
from keymgr.timefmt import format_duration, format_time

if TYPE_CHECKING:
    from keymgr.backend import Backend, Signer
    from keymgr.config import AuditSettings

#: Domain separation: an audit key signs nothing but this prefix and a head.
DOMAIN = b"keymgr-audit-checkpoint-v1\n"
#: Fields of a line outside its chain hash (keymgr.audit.canonical drops them).
CKPT_FIELDS = ("ckpt_kid", "ckpt_sig")
KEY_EVENT = "audit.key"

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


def payload(seq: int, head: str) -> bytes:
    """The bytes an audit key signs for the chain head ``(seq, hash)``."""
    return DOMAIN + f"{seq}\n{head}".encode("ascii")


# --------------------------------------------------------------------------- keys


def public_key(jwk: Mapping[str, Any], alg: str) -> jose.PublicKey:
    """The public key of ``jwk``, which must fit ``alg``; ValueError otherwise."""
    if not isinstance(jwk, Mapping):
        raise ValueError("public_jwk is not an object")
    jose.assert_public(jwk)
    family = jose.alg_family(alg)
    if jwk.get("kty") != family:
        raise ValueError(f"a {jwk.get('kty')!r} key cannot sign {alg}")
    try:
        if family == "EC":
            crv = jose.curve_for(alg)
            if jwk.get("crv") != crv:
                raise ValueError(f"{alg} needs curve {crv}, not {jwk.get('crv')!r}")
            size = jose.ec_coordinate_size(crv)
            x, y = jose.b64url_decode(jwk["x"]), jose.b64url_decode(jwk["y"])
            if len(x) != size or len(y) != size:
                raise ValueError("EC coordinates of the wrong length")
            return ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[crv], b"\4" + x + y)
        if family == "RSA":
            n = int.from_bytes(jose.b64url_decode(jwk["n"]), "big")
            e = int.from_bytes(jose.b64url_decode(jwk["e"]), "big")
            if n.bit_length() < jose.MIN_RSA_BITS:
                raise ValueError(f"RSA key shorter than {jose.MIN_RSA_BITS} bits")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if jwk.get("crv") != "Ed25519":
            raise ValueError(f"EdDSA needs curve Ed25519, not {jwk.get('crv')!r}")
        return ed25519.Ed25519PublicKey.from_public_bytes(jose.b64url_decode(jwk["x"]))
    except (KeyError, TypeError):
        raise ValueError("public_jwk lacks a key member") from None


def verify_signature(key: jose.PublicKey, alg: str, data: bytes, sig: bytes) -> bool:
    """Whether ``sig`` (JWS encoding: raw ``r || s`` for ECDSA) signs ``data``."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            size = jose.ec_coordinate_size(key.curve)
            if len(sig) != 2 * size:
                return False
            r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(jose.hash_for(alg)))
        elif isinstance(key, rsa.RSAPublicKey):
            digest = jose.hash_for(alg)
            pad: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
                if alg.startswith("PS")
                else padding.PKCS1v15()
            )
            key.verify(sig, data, pad, digest)
        else:
            key.verify(sig, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class AuditKey:
    """A public audit key as recorded by an ``audit.key`` event (or pinned)."""

    kid: str
    alg: str
    key: jose.PublicKey


def parse_key_event(ev: Mapping[str, Any]) -> AuditKey:
    """The key an ``audit.key`` event introduces; ValueError naming what is wrong."""
    kid, alg, jwk = ev.get("kid"), ev.get("alg"), ev.get("public_jwk")
    if not isinstance(kid, str) or not isinstance(alg, str) or alg not in jose.ALGORITHMS:
        raise ValueError("needs a kid and a supported alg")
    if not isinstance(jwk, dict):
        raise ValueError("needs a public_jwk object")
    key = public_key(jwk, alg)
    if jose.thumbprint(jwk) != kid:
        raise ValueError(f"kid {kid} is not the RFC 7638 thumbprint of its public_jwk")
    return AuditKey(kid, alg, key)


def load_pinned(path: str | Path) -> dict[str, dict[str, Any]]:
    """A JWKS file of audit public keys the operator pinned: kid (thumbprint) -> JWK.

    A bad file is a usage error (exit 2), one line naming it.
    """
    where = f"--keys {path}"
    try:
        doc = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise UsageError(f"{where}: cannot read: {e.strerror}") from None
    except ValueError:
        raise UsageError(f"{where}: not JSON") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        raise UsageError(f'{where}: expected a JWKS, {{"keys": [...]}} with at least one key')
    out: dict[str, dict[str, Any]] = {}
    for i, jwk in enumerate(keys):
        try:
            if not isinstance(jwk, dict):
                raise ValueError("not an object")
            jose.assert_public(jwk)
            kid = jose.thumbprint(jwk)
        except ValueError as e:
            raise UsageError(f"{where}: keys[{i}]: {e}") from None
        if "kid" in jwk and jwk["kid"] != kid:
            raise UsageError(f"{where}: keys[{i}]: kid is not the key's RFC 7638 thumbprint")
        out[kid] = jwk
    return out


# --------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class Batch:
    """How one commit is signed: events to put first, the signing key, the new anchor."""

    intro: list[dict[str, Any]]
    kid: str
    alg: str
    backend: str
    #: The anchor's audit-key fields after this commit (seq, hash, outbox unset).
    anchor: AuditAnchor


class Checkpointer:
    """Signs chain heads with the audit key of ``[audit]``; checks signed heads.

    Constructing it does no I/O (``keymgr config check`` stays offline); the
    backend is asked for a public key once per key and process, and to sign
    once per commit.
    """

    def __init__(self, settings: AuditSettings, backends: Mapping[str, Backend]) -> None:
        from keymgr.config import AUDIT_RING

        self.settings = settings
        self.backends = backends
        self.ring = AUDIT_RING
        self._public: dict[tuple[str, str, str], jose.PublicKey] = {}
        self._signers: dict[tuple[str, str, str], Signer] = {}
        #: (kid, seq, hash, sig) already verified: a pure result, safe to keep.
        self._verified: set[tuple[str, int, str, str]] = set()

    def _backend(self, name: str, kid: str | None = None) -> Backend:
        b = self.backends.get(name)
        if b is None:
            what = f"audit key {kid}" if kid else "the audit key"
            raise AuditError(
                f"{what} lives in backend {name!r}, which is not configured: keep "
                f"[backends.{name}] until a commit has introduced the new audit key"
            )
        return b

    def public(self, backend: str, kid: str, alg: str) -> jose.PublicKey:
        """The audit key's public key as the backend returns it (cached)."""
        cache = (backend, kid, alg)
        key = self._public.get(cache)
        if key is None:
            try:
                jwk = self._backend(backend, kid).public_jwk(self.ring, kid)
            except AuditError:
                raise
            except KeymgrError as e:
                raise AuditError(f"audit key {kid} in backend {backend}: {e}") from None
            try:
                key = public_key(jwk, alg)
                if jose.thumbprint(jwk) != kid:
                    raise ValueError("its public key does not hash to the kid")
            except ValueError as e:
                raise AuditError(f"audit key {kid} in backend {backend}: {e}") from None
            self._public[cache] = key
        return key

    def _signer(self, backend: str, kid: str, alg: str) -> Signer:
        cache = (backend, kid, alg)
        signer = self._signers.get(cache)
        if signer is None:
            try:
                signer = self._backend(backend, kid).signer(self.ring, kid, alg)
            except AuditError:
                raise
            except KeymgrError as e:
                raise AuditError(
                    f"audit key {kid} in backend {backend} cannot sign: {e}; nothing was committed"
                ) from None
            self._signers[cache] = signer
        return signer

    def check_signed(self, ev: Mapping[str, Any], anchor: AuditAnchor, where: str) -> None:
        """Raise AuditError unless ``ev`` (the chain head) carries a checkpoint
        signed by the anchor's audit key (or, right after a key change, the key
        it replaced), checked against the public key the backend holds."""
        seq, head = ev.get("seq"), ev.get("hash")
        kid, sig = ev.get("ckpt_kid"), ev.get("ckpt_sig")
        fix = "restore the log and state, or run 'keymgr audit verify'"
        if kid is None and sig is None:
            raise AuditError(
                f"{where}: the line at seq {seq} carries no checkpoint signature, but the "
                f"state names audit key {anchor.key_kid}: written without the audit key; "
                f"refusing to append; {fix}"
            )
        signers = {anchor.key_kid: (anchor.key_alg, anchor.key_backend)}
        if anchor.prev_kid is not None:
            signers[anchor.prev_kid] = (anchor.prev_alg, anchor.prev_backend)
        if not isinstance(kid, str) or kid not in signers:
            raise AuditError(
                f"{where}: the line at seq {seq} is signed by {kid!r}, not by the audit key "
                f"the state names ({anchor.key_kid}); refusing to append; {fix}"
            )
        alg, backend = signers[kid]
        assert alg is not None and backend is not None
        if not (isinstance(sig, str) and isinstance(seq, int) and isinstance(head, str)):
            raise AuditError(f"{where}: the line at seq {seq}: malformed checkpoint; {fix}")
        if (kid, seq, head, sig) in self._verified:
            return
        try:
            raw = jose.b64url_decode(sig)
        except ValueError:
            raw = b""
        try:
            key = self.public(backend, kid, alg)
        except AuditError as e:
            raise AuditError(f"{where}: the line at seq {seq}: {e}; {fix}") from None
        if not verify_signature(key, alg, payload(seq, head), raw):
            raise AuditError(
                f"{where}: the checkpoint signature at seq {seq} (audit key {kid}) does not "
                f"verify: the log was rewritten; refusing to append; {fix}"
            )
        self._verified.add((kid, seq, head, sig))

    def begin(self, anchor: AuditAnchor, now: datetime) -> Batch:
        """Pick (and when due, create) the key signing this commit.

        A new key is made when there is none, when ``[audit]`` names another
        backend or algorithm, or when ``rotation_period`` has passed since the
        current key was made. Its ``audit.key`` event opens the batch, and the
        batch is signed by the key it replaces (by itself only when it is the
        first), so the change of key is authenticated.
        """
        s = self.settings
        cur = anchor.key_kid
        now = now.replace(microsecond=0)
        reason: str | None
        if cur is None:
            reason = "first audit key"
        elif anchor.key_backend != s.backend:
            reason = f"[audit] backend changed from {anchor.key_backend} to {s.backend}"
        elif anchor.key_alg != s.algorithm:
            reason = f"[audit] algorithm changed from {anchor.key_alg} to {s.algorithm}"
        elif anchor.key_since is None or now >= anchor.key_since + s.rotation_period:
            reason = (
                f"rotation_period {format_duration(s.rotation_period)} passed since "
                f"{format_time(anchor.key_since)}"
            )
        else:
            reason = None
        kept = replace(anchor, prev_kid=None, prev_alg=None, prev_backend=None)
        if reason is None:
            assert cur is not None and anchor.key_alg and anchor.key_backend
            return Batch([], cur, anchor.key_alg, anchor.key_backend, kept)
        if cur is not None:
            # The old key signs the change: make sure it can before a new key
            # is made (a failing commit would otherwise leave one per attempt).
            assert anchor.key_alg and anchor.key_backend
            self._signer(anchor.key_backend, cur, anchor.key_alg)
        backend = self._backend(s.backend)
        try:
            gen = backend.generate(self.ring, s.algorithm)
        except KeymgrError as e:
            raise AuditError(f"cannot create the audit key in backend {s.backend}: {e}") from None
        jwk = dict(gen.public_jwk)
        try:
            public_key(jwk, s.algorithm)
            if jose.thumbprint(jwk) != gen.kid:
                raise ValueError("its public key does not hash to its kid")
        except ValueError as e:
            raise AuditError(f"new audit key {gen.kid} in backend {s.backend}: {e}") from None
        intro = {
            "event": KEY_EVENT,
            "ts": now,
            "kid": gen.kid,
            "alg": s.algorithm,
            "backend": s.backend,
            "reason": reason,
            "public_jwk": jwk,
            "since": format_time(now),
            "replaces": cur,
        }
        new = replace(
            kept,
            key_kid=gen.kid,
            key_alg=s.algorithm,
            key_backend=s.backend,
            key_since=now,
            prev_kid=cur,
            prev_alg=anchor.key_alg if cur else None,
            prev_backend=anchor.key_backend if cur else None,
        )
        if cur is None:
            return Batch([intro], gen.kid, s.algorithm, s.backend, new)
        assert anchor.key_alg and anchor.key_backend
        return Batch([intro], cur, anchor.key_alg, anchor.key_backend, new)

    def sign(self, batch: Batch, seq: int, head: str) -> dict[str, str]:
        """The checkpoint fields for head ``(seq, head)``, signed by the batch's key.

        The signature is checked against the backend's public key before it
        is used: a backend that signs wrongly fails this commit, not a later
        ``audit verify``.
        """
        signer = self._signer(batch.backend, batch.kid, batch.alg)
        try:
            sig = signer(payload(seq, head))
        except KeymgrError as e:
            raise AuditError(
                f"cannot sign the audit checkpoint with audit key {batch.kid} in backend "
                f"{batch.backend}: {e}; nothing was committed"
            ) from None
        key = self.public(batch.backend, batch.kid, batch.alg)
        if not verify_signature(key, batch.alg, payload(seq, head), sig):
            raise AuditError(
                f"backend {batch.backend}: the checkpoint signature of audit key {batch.kid} "
                "does not verify with its public key; nothing was committed"
            )
        encoded = jose.b64url(sig)
        self._verified.add((batch.kid, seq, head, encoded))
        return {"ckpt_kid": batch.kid, "ckpt_sig": encoded}

    def public_jwks(self, anchor: AuditAnchor) -> dict[str, Any]:
        """Every audit key the backends hold, as a JWKS to pin (``audit verify --keys``)."""
        names = [self.settings.backend]
        for n in (anchor.key_backend, anchor.prev_backend):
            if n is not None and n not in names and n in self.backends:
                names.append(n)
        keys: dict[str, dict[str, Any]] = {}
        for name in names:
            backend = self._backend(name)
            try:
                for kid in backend.list_keys(self.ring):
                    jwk = dict(backend.public_jwk(self.ring, kid))
                    jose.assert_public(jwk)
                    if jose.thumbprint(jwk) != kid:
                        raise ValueError(f"key {kid}: public key does not hash to its kid")
                    keys[kid] = {**jwk, "kid": kid, "use": "sig"}
            except (KeymgrError, ValueError) as e:
                raise AuditError(f"audit keys in backend {name}: {e}") from None
        return {"keys": [keys[k] for k in sorted(keys)]}
