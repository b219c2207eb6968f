"""Conformance suites for the three kinds of plug-in: pytest base classes.

A plug-in proves itself with the same tests as the built-ins, the way keyring
ships ``BackendBasicTests`` for its backends. Subclass a suite in a test
module (a class whose name starts with ``Test``), provide the one fixture it
asks for, and every test of the contract runs against your class:

- :class:`BackendTests`: fixture ``backend``, a configured
  :class:`~keymgr.backend.Backend`; the class attribute ``algorithms`` may
  narrow the algorithms tested (default: every one the backend declares);
- :class:`PublisherTests`: fixture ``publisher``, a
  :class:`~keymgr.publishers.Publisher` over an empty target;
- :class:`StoreTests`: fixture ``store``, a :class:`~keymgr.stores.StateStore`
  over an empty document.

For example:

    import pytest

    from keymgr.testing.conformance import BackendTests


    class TestMyBackend(BackendTests):
        algorithms = ("ES256", "RS256")  # optional

        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend("conformance", {"type": "mine", ...}, str(tmp_path))

The tests use the public interface only, and check what keymgr relies on, not
how a provider does it. :class:`BackendTests` verifies signatures with PyJWT
(``pip install 'PyJWT[crypto]'``), a verifier independent of keymgr's own
JOSE code; the kid is checked against an RFC 7638 thumbprint computed here.
The constructors are called with ``{"type": ..., "no_such_option": ...}``
alone: refuse unknown options before checking anything else (required ones
included), as the built-ins do.

:class:`keymgr.testing.docstore.SharedStoreTests` extends :class:`StoreTests`
for a :class:`~keymgr.docstore.DocumentAdapter` under
:class:`~keymgr.docstore.SharedStore` (pass lock, lease, several processes).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import itertools
import json
import re
import secrets
import threading
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from keymgr import jose, publishers
from keymgr.backend import Backend
from keymgr.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    KeyNotFoundError,
    PublishError,
    StoreError,
)
from keymgr.model import Intent, State
from keymgr.publishers import Publisher, Served
from keymgr.stores import StateStore

__all__ = [
    "WAIT",
    "BackendTests",
    "PublisherTests",
    "StoreTests",
    "sample_jwks",
    "sample_state",
    "thumbprint",
]

#: Bound of every wait for another thread in these tests (seconds).
WAIT = 15.0
T0 = datetime(2031, 3, 1, 8, 0, 0, tzinfo=UTC)

#: The members of a public JWK, per ``kty`` (RFC 7518 6.2.1, 6.3.1; RFC 8037 2).
_PUBLIC_MEMBERS: dict[str, frozenset[str]] = {
    "EC": frozenset({"kty", "crv", "x", "y"}),
    "RSA": frozenset({"kty", "n", "e"}),
    "OKP": frozenset({"kty", "crv", "x"}),
}
#: Private members of any JWK (RFC 7518 6.2.2, 6.3.2, 6.4; RFC 8037 2).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
#: The ``kty`` and ``crv`` each algorithm needs, and an EC coordinate's size in bytes.
_KEY_TYPE: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    **{f"{p}S{n}": ("RSA", None) for p in "RP" for n in (256, 384, 512)},
}
_COORDINATE_SIZE = {"P-256": 32, "P-384": 48, "P-521": 66, "Ed25519": 32}
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------- helpers


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: object) -> bytes:
    """Strict base64url without padding: anything else raises ValueError."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError(f"not unpadded base64url: {text!r}")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as e:
        raise ValueError(f"not base64url: {text!r} ({e})") from None


def thumbprint(jwk: Mapping[str, str]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, computed here (not by keymgr.jose)."""
    required = sorted(_PUBLIC_MEMBERS[jwk["kty"]])
    canonical = json.dumps({m: jwk[m] for m in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def sample_state(n: int) -> State:
    """A distinct, valid state per ``n`` (its clock)."""
    return dataclasses.replace(State(), clock=T0 + timedelta(minutes=n))


def sample_jwks(n: int, size: int = 1) -> bytes:
    """A distinct JWKS document per ``n``, with ``size`` keys (not real ones: a
    publisher serves bytes and never parses them)."""
    keys = [
        {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(hashlib.sha256(f"x{n}.{i}".encode()).digest()),
            "y": b64url(hashlib.sha256(f"y{n}.{i}".encode()).digest()),
            "kid": b64url(hashlib.sha256(f"kid{n}.{i}".encode()).digest()),
            "alg": "ES256",
            "use": "sig",
        }
        for i in range(size)
    ]
    return (json.dumps({"keys": keys}, indent=1, sort_keys=True) + "\n").encode()


def _ring() -> str:
    """A ring name no other test uses (servers are shared between tests)."""
    return f"conformance-{secrets.token_hex(4)}"


def _intent() -> str:
    """An intent nonce as the reconciler makes them (16 hex digits)."""
    return secrets.token_hex(8)


def _absent_kid() -> str:
    """A well-formed kid (a SHA-256 thumbprint's shape) of no key anywhere."""
    return b64url(hashlib.sha256(secrets.token_bytes(32)).digest())


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, f"not a one-line message: {text!r}"
    return text


def _key_problems(jwk: Mapping[str, Any], alg: str) -> list[str]:
    """What is wrong with ``jwk`` as the public key for ``alg`` (empty: nothing).

    Checked independently of keymgr: the members of its ``kty`` and nothing
    else (no private member, no ``alg``/``kid``/``use``: those are policy), the
    curve the algorithm pins, unpadded base64url, full-width EC coordinates and
    minimal RSA integers (RFC 7518 6.2.1.2, 6.3.1.1).
    """
    kty, crv = _KEY_TYPE[alg]
    problems = []
    private = _PRIVATE_MEMBERS & set(jwk)
    if private:
        problems.append(f"private members {sorted(private)}")
    if jwk.get("kty") != kty:
        return [*problems, f"kty {jwk.get('kty')!r}, expected {kty!r}"]
    if set(jwk) != _PUBLIC_MEMBERS[kty]:
        problems.append(f"members {sorted(jwk)}, expected exactly {sorted(_PUBLIC_MEMBERS[kty])}")
    if crv is not None and jwk.get("crv") != crv:
        problems.append(f"crv {jwk.get('crv')!r}, expected {crv!r}")
    for member in sorted(_PUBLIC_MEMBERS[kty] - {"kty", "crv"}):
        try:
            raw = b64url_decode(jwk.get(member))
        except ValueError as e:
            problems.append(f"{member}: {e}")
            continue
        if crv is not None and len(raw) != _COORDINATE_SIZE[crv]:
            problems.append(f"{member} is {len(raw)} bytes, expected {_COORDINATE_SIZE[crv]}")
        if crv is None and raw[:1] == b"\x00":
            problems.append(f"{member} has a leading zero byte (not minimal)")
    return problems


def _token(signer: Callable[[bytes], bytes], alg: str, kid: str) -> tuple[str, bytes]:
    """A compact JWS made here (not by keymgr.jose) with ``signer``; and the signature."""
    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    claims = {"sub": "keymgr-conformance", "jti": secrets.token_hex(8)}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = signer(signing_input.encode("ascii"))
    assert isinstance(signature, bytes), f"the signer returned {type(signature).__name__}"
    return f"{signing_input}.{b64url(signature)}", signature


def _verify(token: str, jwk: Mapping[str, str], alg: str) -> dict[str, Any]:
    """PyJWT's verdict on ``token`` under ``jwk`` (raises when it rejects it)."""
    import jwt

    key = jwt.PyJWK(dict(jwk), algorithm=alg)
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=[alg])
    return claims


# --------------------------------------------------------------------------- backends

#: The claims of a forged token (a signature must not verify over them).
_FORGED_CLAIMS = b64url(b'{"sub":"mallory"}')


class BackendTests:
    """The :class:`~keymgr.backend.Backend` contract, through its public methods.

    Provide a ``backend`` fixture: a configured backend, ready to use (a
    server, a directory), whose rings hold no key yet. Set ``algorithms`` to
    test fewer algorithms than the backend declares, with a comment saying
    why (an emulator that lacks one); never more.

    Needs PyJWT with its ``crypto`` extra: signatures are verified by it.
    """

    #: The algorithms tested (None: all of ``backend.algorithms``).
    algorithms: ClassVar[Collection[str] | None] = None

    def chosen_algorithms(self, backend: Backend) -> list[str]:
        """The algorithms this run tests, sorted."""
        return sorted(backend.algorithms if self.algorithms is None else self.algorithms)

    def one_algorithm(self, backend: Backend) -> str:
        """The algorithm of the tests that need one key: ES256 if tested (fast), else the first."""
        algs = self.chosen_algorithms(backend)
        return "ES256" if "ES256" in algs else algs[0]

    def test_declares_its_type_and_algorithms(self, backend: Backend) -> None:
        """Config validation reads ``type_name`` and ``algorithms`` off the class: a
        ring whose algorithm the backend does not declare is refused before any
        key is made, so the declaration must name only algorithms keymgr knows,
        and the suite may only narrow it."""
        assert isinstance(type(backend).type_name, str) and type(backend).type_name
        declared = set(type(backend).algorithms)
        assert declared, "a backend declares at least one algorithm"
        assert declared <= jose.ALGORITHMS, f"unknown: {sorted(declared - jose.ALGORITHMS)}"
        chosen = set(self.chosen_algorithms(backend))
        assert chosen, "the suite tests at least one algorithm"
        assert chosen <= declared, f"algorithms not declared: {sorted(chosen - declared)}"

    def test_generate_gives_the_thumbprint_kid_and_the_public_key_only(
        self, backend: Backend
    ) -> None:
        """The kid is what verifiers and the state use to name a key: it must be
        the RFC 7638 thumbprint of the public key, so anyone can recompute it.
        ``generate`` must never hand out private material."""
        ring, alg = _ring(), self.one_algorithm(backend)
        gen = backend.generate(ring, alg, intent=_intent())
        try:
            assert isinstance(gen.kid, str) and isinstance(gen.public_jwk, dict)
            assert not _key_problems(gen.public_jwk, alg), _key_problems(gen.public_jwk, alg)
            assert gen.kid == thumbprint(gen.public_jwk)
        finally:
            backend.destroy(ring, gen.kid)

    def test_every_algorithm_signs_for_an_independent_verifier(self, backend: Backend) -> None:
        """What keymgr promises verifiers: a token signed through ``signer`` verifies
        with PyJWT against the published JWK, for every algorithm (ECDSA as the
        raw fixed-width r||s of RFC 7518 3.4, not DER), and a changed payload
        does not. Every algorithm is tried; the failures are reported together."""
        import jwt

        failures: list[str] = []
        ring = _ring()
        made: list[str] = []
        try:
            for alg in self.chosen_algorithms(backend):
                try:
                    gen = backend.generate(ring, alg, intent=_intent())
                    made.append(gen.kid)
                    jwk = backend.public_jwk(ring, gen.kid)
                    problems = _key_problems(jwk, alg)
                    if problems or gen.kid != thumbprint(jwk):
                        failures.append(f"{alg}: key {jwk}: {problems or 'kid is no thumbprint'}")
                        continue
                    sign = backend.signer(ring, gen.kid, alg)
                    for _ in range(2):  # a signer is reused for many tokens
                        token, sig = _token(sign, alg, gen.kid)
                        crv = _KEY_TYPE[alg][1]
                        if alg.startswith("ES") and crv is not None:
                            want = 2 * _COORDINATE_SIZE[crv]
                            assert len(sig) == want, f"{len(sig)}-byte signature, not r||s ({want})"
                        assert _verify(token, jwk, alg)["sub"] == "keymgr-conformance"
                        head, _payload, signature = token.split(".")
                        forged = f"{head}.{_FORGED_CLAIMS}.{signature}"
                        try:
                            _verify(forged, jwk, alg)
                        except jwt.InvalidSignatureError:
                            pass
                        else:
                            raise AssertionError("a token with a changed payload verified")
                except Exception as e:  # each algorithm is reported on its own
                    failures.append(f"{alg}: {type(e).__name__}: {e}")
        finally:
            for kid in made:
                backend.destroy(ring, kid)
        assert not failures, "\n".join(failures)

    def test_public_jwk_round_trips(self, backend: Backend) -> None:
        """The JWKS is built from ``public_jwk`` long after ``generate`` (by another
        process, after a restart): it must give exactly the key generated, in a
        form an independent library parses back to the same numbers."""
        import jwt

        ring, alg = _ring(), self.one_algorithm(backend)
        gen = backend.generate(ring, alg, intent=_intent())
        try:
            jwk = backend.public_jwk(ring, gen.kid)
            assert jwk == gen.public_jwk
            assert backend.public_jwk(ring, gen.kid) == jwk  # asked again (a cache)
            parsed = jwt.PyJWK(dict(jwk), algorithm=alg)
            again = parsed.Algorithm.to_jwk(parsed.key, as_dict=True)
            for member in sorted(set(jwk) - {"x", "y"}):  # coordinates: see _key_problems
                assert again[member] == jwk[member], member
        finally:
            backend.destroy(ring, gen.kid)

    def test_list_keys_and_intent_of(self, backend: Backend) -> None:
        """After a crash between ``generate`` and the state commit, keymgr finds the
        key with ``list_keys`` and recognises it as its intent's orphan with
        ``intent_of``: both must answer for every key generated, each key with
        its own intent. A ring with no key lists nothing."""
        ring, alg = _ring(), self.one_algorithm(backend)
        assert backend.list_keys(ring) == []
        nonces = [_intent(), _intent()]
        kids = [backend.generate(ring, alg, intent=n).kid for n in nonces]
        try:
            assert kids[0] != kids[1]
            listed = backend.list_keys(ring)
            assert sorted(listed) == sorted(kids), listed
            assert [backend.intent_of(ring, kid) for kid in kids] == nonces
        finally:
            for kid in kids:
                backend.destroy(ring, kid)

    def test_destroy_removes_the_key_and_is_idempotent(self, backend: Backend) -> None:
        """``destroy`` is retried after a crash or a lost answer, so a second call
        must succeed; it removes that key only, and the key is then unknown."""
        ring, alg = _ring(), self.one_algorithm(backend)
        gone = backend.generate(ring, alg, intent=_intent())
        kept = backend.generate(ring, alg, intent=_intent())
        try:
            backend.destroy(ring, gone.kid)
            assert backend.list_keys(ring) == [kept.kid]
            backend.destroy(ring, gone.kid)  # again: already absent is fine
            assert backend.list_keys(ring) == [kept.kid]
            with pytest.raises(KeyNotFoundError) as info:
                backend.public_jwk(ring, gone.kid)
            _one_line(info.value)
            assert backend.public_jwk(ring, kept.kid) == kept.public_jwk
        finally:
            backend.destroy(ring, kept.kid)
        assert backend.list_keys(ring) == []

    def test_an_unknown_kid_is_key_not_found(self, backend: Backend) -> None:
        """keymgr tells "this key is gone" (KeyNotFoundError: a state to repair)
        from "the backend failed" (any other BackendError: retry later); and
        destroying a key that never existed is as fine as destroying it twice."""
        ring, kid = _ring(), _absent_kid()
        with pytest.raises(KeyNotFoundError) as info:
            backend.public_jwk(ring, kid)
        _one_line(info.value)
        backend.destroy(ring, kid)
        assert backend.list_keys(ring) == []

    def test_rings_are_separate(self, backend: Backend) -> None:
        """Each ring's keys are its own: listing, reading or destroying under
        another ring never reaches them, also when one ring's name is a prefix
        of the other's (``api`` and ``api.v2``, ``api-b``)."""
        ring, alg = _ring(), self.one_algorithm(backend)
        rings = [ring, f"{ring}.v2", f"{ring}-b"]
        kids = {r: backend.generate(r, alg, intent=_intent()).kid for r in rings}
        try:
            for r in [*rings, _ring()]:
                assert backend.list_keys(r) == ([kids[r]] if r in kids else []), r
                for owner, kid in kids.items():
                    if owner == r:
                        continue
                    with pytest.raises(KeyNotFoundError):
                        backend.public_jwk(r, kid)
                    backend.destroy(r, kid)  # not its ring: nothing happens
            for r, kid in kids.items():
                assert backend.list_keys(r) == [kid], r
                assert thumbprint(backend.public_jwk(r, kid)) == kid
        finally:
            for r, kid in kids.items():
                backend.destroy(r, kid)

    def test_signer_refuses_an_algorithm_of_another_key_type(self, backend: Backend) -> None:
        """A key signs only algorithms of its own key type: an ECDSA key asked for
        RS256 (or an RSA key for ES256) must raise BackendError, when the signer
        is made or when it is called, never return a signature verifiers reject."""
        ring, alg = _ring(), self.one_algorithm(backend)
        other = "ES256" if _KEY_TYPE[alg][0] != "EC" else "RS256"
        gen = backend.generate(ring, alg, intent=_intent())
        try:
            with pytest.raises(BackendError) as info:
                backend.signer(ring, gen.kid, other)(b"header.payload")
            _one_line(info.value)
        finally:
            backend.destroy(ring, gen.kid)

    def test_an_unknown_option_is_a_config_error_naming_it(
        self, backend: Backend, tmp_path: Path
    ) -> None:
        """A misspelt option must not fall back to a default silently: the
        constructor refuses it with one line starting ``backends.NAME.OPTION``,
        which ``keymgr config check`` prints after the file name."""
        with pytest.raises(ConfigError) as info:
            type(backend)(
                "conformance", {"type": type(backend).type_name, "no_such_option": 1}, str(tmp_path)
            )
        assert _one_line(info.value).startswith("backends.conformance.no_such_option"), info.value


# --------------------------------------------------------------------------- publishers


class _Writes:
    """Counts calls of a publisher's ``write`` (wrapped on the instance)."""

    def __init__(self, publisher: Publisher, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        inner = publisher.write

        def write(data: bytes) -> None:
            self.count += 1
            inner(data)

        monkeypatch.setattr(publisher, "write", write)


class PublisherTests:
    """The :class:`~keymgr.publishers.Publisher` contract, through its public methods.

    Provide a ``publisher`` fixture: a configured publisher over a target
    that serves nothing yet (a fresh directory, bucket or key).
    """

    def test_nothing_is_served_before_the_first_publish(self, publisher: Publisher) -> None:
        """An empty target reads as None (not empty bytes, not an error): the
        first publish must write, and ``status`` must say nothing is served."""
        assert publisher.read() is None
        assert publisher.fetch() is None

    def test_publish_writes_and_confirms_the_document(self, publisher: Publisher) -> None:
        """A publish counts only once read back: after it, ``fetch`` returns
        exactly the document meant, body and headers, and ``read`` the body."""
        data = sample_jwks(1)
        assert publisher.publish(data) is True
        assert publisher.fetch() == Served(data, publisher.headers())
        assert publisher.read() == data

    def test_the_same_document_is_not_written_again(
        self, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every pass publishes; an unchanged target must not be rewritten (a
        CDN invalidation, a new object version, a file's mtime each time)."""
        data = sample_jwks(2)
        assert publisher.publish(data) is True
        writes = _Writes(publisher, monkeypatch)
        assert publisher.publish(data) is False
        assert writes.count == 0
        assert publisher.fetch() == Served(data, publisher.headers())

    def test_force_writes_again(
        self, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a write that was never confirmed (it may still land), keymgr
        publishes with ``force``: the document is written even though it is
        already served, and confirmed again."""
        data = sample_jwks(3)
        publisher.publish(data)
        writes = _Writes(publisher, monkeypatch)
        assert publisher.publish(data, force=True) is True
        assert writes.count == 1
        assert publisher.fetch() == Served(data, publisher.headers())

    def test_a_changed_document_replaces_the_old_one(self, publisher: Publisher) -> None:
        """Each rotation publishes a new JWKS over the old: verifiers must get
        the new bytes, exactly, also when the document grows large (many rings)."""
        first, second, large = sample_jwks(4), sample_jwks(5, size=2), sample_jwks(6, size=500)
        for data in (first, second, large, first):
            assert publisher.publish(data) is True
            assert publisher.fetch() == Served(data, publisher.headers())

    def test_a_change_made_out_of_band_is_seen(self, publisher: Publisher) -> None:
        """A document replaced behind keymgr's back (a stale deploy, a restored
        backup) must be seen by ``fetch``, so continuity is marked broken and the
        next publish writes the right document again."""
        meant, other = sample_jwks(7), sample_jwks(8)
        publisher.publish(meant)
        publisher.write(other)
        got = publisher.fetch()
        assert got is not None and got.body == other
        assert publisher.publish(meant) is True
        assert publisher.fetch() == Served(meant, publisher.headers())

    def test_a_target_larger_than_any_document_is_refused_unread(
        self, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A target holding more than keymgr ever writes there (planted, or a
        runaway object) must not be loaded into memory at every pass: ``read``
        and ``fetch`` raise PublishError (NotADocument), one line naming the
        publisher, before reading the body (``keymgr.publishers.check_size`` with the
        size the target reports, or ``read_file`` for a local file). The next
        publish writes the document over it. :data:`~keymgr.publishers.MAX_DOCUMENT`
        is lowered here; read it when called, not at import."""
        big, small = sample_jwks(9, size=20), sample_jwks(10)
        publisher.write(big)
        monkeypatch.setattr(publishers, "MAX_DOCUMENT", len(big) - 1)
        for call in (publisher.read, publisher.fetch):
            with pytest.raises(PublishError) as info:
                call()
            message = str(info.value)
            assert publisher.name in message and "\n" not in message, message
        assert publisher.publish(small) is True
        assert publisher.fetch() == Served(small, publisher.headers_for(small))

    def test_where_names_the_publisher(self, publisher: Publisher) -> None:
        """Every publish error starts with ``where``: it must name the config table
        (``[publishers.NAME]``), on one line."""
        where = publisher.where
        assert isinstance(where, str) and publisher.name in where and "\n" not in where

    def test_an_unknown_option_is_a_config_error_naming_it(
        self, publisher: Publisher, tmp_path: Path
    ) -> None:
        """A misspelt option must not fall back to a default silently: the
        constructor refuses it with one line starting ``publishers.NAME.OPTION``,
        which ``keymgr config check`` prints after the file name."""
        with pytest.raises(ConfigError) as info:
            type(publisher)(
                "conformance",
                {"type": type(publisher).type_name, "no_such_option": 1},
                str(tmp_path),
            )
        assert _one_line(info.value).startswith("publishers.conformance.no_such_option"), (
            info.value
        )


# --------------------------------------------------------------------------- stores


def _rich_state(n: int) -> State:
    """A state with more in it than a clock (an open intent per ring)."""
    intents = {
        f"ring-{i}": Intent(nonce=f"{n:08x}{i:08x}", backend="b", alg="ES256", at=T0)
        for i in range(3)
    }
    return dataclasses.replace(sample_state(n), intents=intents)


class StoreTests:
    """The :class:`~keymgr.stores.StateStore` contract, through its public methods.

    Provide a ``store`` fixture: a store over a document that does not exist
    yet (a fresh path, bucket key or secret).
    """

    def test_declares_its_url_and_capabilities(self, store: StateStore) -> None:
        """Messages and ``status`` name the store by ``url``; the daemon picks the
        lease and the pass lock by the declared flags, never by probing."""
        assert isinstance(store.url, str) and store.url
        assert isinstance(store.supports_lease, bool) and isinstance(store.shared, bool)
        assert store.fingerprint_window >= 0

    def test_an_empty_store_loads_an_empty_state(self, store: StateStore) -> None:
        """A new deployment starts from nothing: no document is an empty state
        and a token to create the first one, not an error."""
        state, _token = store.load()
        assert state == State()

    def test_commit_then_load_round_trips(self, store: StateStore) -> None:
        """What is committed is what the next pass (or another process) loads,
        and each commit's token is good for the next commit."""
        _, token = store.load()
        token = store.commit(_rich_state(1), token)
        assert store.load()[0] == _rich_state(1)
        token = store.commit(sample_state(2), token)
        state, loaded = store.load()
        assert state == sample_state(2)
        store.commit(_rich_state(3), loaded)
        assert store.load()[0] == _rich_state(3)

    def test_a_stale_token_is_a_conflict_and_overwrites_nothing(self, store: StateStore) -> None:
        """The compare-and-swap is the only coordination between writers: a
        commit from a token another commit already used must raise
        ConflictError and leave the stored state as it was, also for the very
        first commit (two processes both saw no document)."""
        _, empty = store.load()
        first = store.commit(sample_state(1), empty)
        with pytest.raises(ConflictError) as info:
            store.commit(sample_state(2), empty)
        _one_line(info.value)
        assert store.load()[0] == sample_state(1)
        store.commit(sample_state(3), first)
        with pytest.raises(ConflictError):
            store.commit(sample_state(4), first)
        assert store.load()[0] == sample_state(3)

    def test_exclusive_nests_in_the_same_thread(self, store: StateStore) -> None:
        """A command holds the store for its pass and then reconciles, which
        takes it again in the same thread: that must go through, commits
        inside included, and the store is free again after the outer block."""
        with store.exclusive(), store.exclusive():
            _, token = store.load()
            token = store.commit(sample_state(1), token)
        with store.exclusive():
            store.commit(sample_state(2), token)
        assert store.load()[0] == sample_state(2)

    def test_exclusive_holds_off_other_threads_and_is_released(self, store: StateStore) -> None:
        """A pass is one thread: another thread of the process (the daemon
        recording an event, a SIGHUP reload) waits until the pass ends, also
        when it ends with an exception."""
        entered = threading.Event()
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with store.exclusive(timeout=WAIT):
                    entered.set()
            except BaseException as e:  # reported below
                errors.append(e)

        with pytest.raises(RuntimeError), store.exclusive():
            # A daemon thread: a store that never lets it in fails this test, not the run.
            thread = threading.Thread(target=other, daemon=True)
            thread.start()
            assert not entered.wait(0.3), "another thread entered a held store"
            raise RuntimeError("the pass fails")
        thread.join(WAIT)
        assert not errors and entered.is_set(), errors

    def test_fingerprint_changes_with_every_commit(self, store: StateStore) -> None:
        """``KeyManager.sign`` re-reads the state only when the fingerprint
        changed: after a commit it must differ (None, "unknown", is always
        allowed), also when the same state is committed again."""
        seen = [store.fingerprint()]
        _, token = store.load()
        for _ in range(2):
            token = store.commit(sample_state(1), token)
            seen.append(store.fingerprint())
        for before, after in itertools.pairwise(seen):
            assert after is None or after != before, seen

    def test_lease_compare_and_swap(self, store: StateStore) -> None:
        """Daemon replicas elect one holder through the lease record: it must be
        written by compare-and-swap like the state (a stale token is a
        ConflictError), read back with what was written, and kept beside the
        state, never in it. A store without leases says so with a StoreError."""
        record = {"holder": "a", "expires": "2031-03-01T08:00:30Z"}
        if not store.supports_lease:
            for call in (store.read_lease, lambda: store.write_lease(record, None)):
                with pytest.raises(StoreError) as info:
                    call()
                assert not isinstance(info.value, ConflictError)
                _one_line(info.value)
            return
        doc, absent = store.read_lease()
        assert doc is None
        store.write_lease(record, absent)
        with pytest.raises(ConflictError) as info:  # both saw "no lease": one creates it
            store.write_lease({**record, "holder": "b"}, absent)
        _one_line(info.value)
        doc, token = store.read_lease()
        assert doc is not None and doc.items() >= record.items(), doc
        store.write_lease({**record, "holder": "b"}, token)
        with pytest.raises(ConflictError):
            store.write_lease({**record, "holder": "c"}, token)
        doc, _ = store.read_lease()
        assert doc is not None and doc["holder"] == "b", doc
        state, token = store.load()
        assert state == State()
        store.commit(sample_state(1), token)  # the lease writes did not move the state
