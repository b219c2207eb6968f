"""The fast paths added for performance (issue 6) give exactly what the slow ones did."""

from __future__ import annotations

import copy
import json
import pickle
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from keymgr.backends.local.store import FileStore

from keymgr import jose
from keymgr.manager import KeyManager
from keymgr.timefmt import format_time, parse_time

T0 = datetime(2031, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_ecdsa_signer_raw_signatures_verify(alg):
    # ~1 signature in 128 has a short r or s: 1500 of them cover those cases.
    key = jose.generate_private_key(alg)
    sign = jose.make_signer(key, alg)
    size = jose.ec_coordinate_size(jose.curve_for(alg))
    digest = jose.hash_for(alg)
    short = 0
    for i in range(1500):
        data = f"input {i}".encode()
        raw = sign(data)
        assert len(raw) == 2 * size
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        short += r.bit_length() <= 8 * size - 8 or s.bit_length() <= 8 * size - 8
        key.public_key().verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
    assert short > 0


def test_compact_json_is_json_dumps():
    samples = [
        {"sub": "alice", "iat": 1, "exp": 2},
        {"name": "Zoë ✓ \u2028", "nested": {"a": [1, 2.5, None, True, False]}, "e": {}},
        {"f": 1e100, "g": -0.0, "h": 12345678901234567890, 1: "int key", None: "null key"},
        [],
        "plain",
    ]
    for obj in samples:
        assert jose.compact_json(obj) == json.dumps(obj, separators=(",", ":"))
    with pytest.raises(TypeError):
        jose.compact_json({"when": datetime.now()})


def test_claims_json_reads_back_as_the_claims_and_refuses_what_json_refuses():
    """orjson on the hot path: same meaning as json.dumps (spacing and escapes
    may differ), the stdlib's answer for what orjson refuses, and no orjson
    renderings of non-JSON types (an ``exp`` datetime must not become a string)."""
    samples = [
        {"sub": "alice", "iat": 1, "exp": 2},
        {"name": "Zoë ✓ \u2028", "nested": {"a": [1, 2.5, None, True, False]}, "e": {}},
        {"f": 1e100, "g": -0.0, "big": 12345678901234567890123},
        {1: "int key"},
    ]
    for obj in samples:
        out = jose.claims_json(obj)
        compact = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        assert isinstance(out, bytes) and len(out) <= len(compact)
        assert json.loads(out) == json.loads(json.dumps(obj))
    for bad in ({"exp": datetime.now()}, {"when": T0}, {"o": object()}):
        with pytest.raises(TypeError):
            jose.claims_json(bad)


def test_b64url_bytes_is_b64url():
    for n in range(70):
        data = bytes(random.randrange(256) for _ in range(n))
        assert jose.b64url_bytes(data) == jose.b64url(data).encode()


def test_time_fast_paths_round_trip():
    rng = random.Random(7)
    base = datetime(1000, 1, 1, tzinfo=UTC)
    for _ in range(20000):
        dt = base + timedelta(seconds=rng.randrange(9000 * 365 * 86400))
        text = format_time(dt)
        assert text == dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        back = parse_time(text)
        assert back == dt and back.tzinfo is not None and back.utcoffset() == timedelta(0)
    # Not the canonical shape: the general path, same answers as before.
    assert parse_time("2031-01-01T000000.1Z") == datetime(2031, 1, 1, tzinfo=UTC)
    assert parse_time("2031-01-01T02:00:00+02:00") == datetime(2031, 1, 1, tzinfo=UTC)
    for bad in ("2031-02-30T00:00:00Z", "2031-01-01T24:00:00Z", "2031-01-01 00:00:00"):
        with pytest.raises(ValueError):
            parse_time(bad)
    odd = datetime(2031, 1, 1, 5, 0, 0, 999, tzinfo=UTC)
    assert format_time(odd) == "2031-01-01T05:00:00Z"


def test_time_memos_share_objects_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """stored_time gives one object per text and format_time one text per time,
    each the exact answer of the unmemoised function, through the memo's resets."""
    from keymgr import model, timefmt

    monkeypatch.setattr(model, "_TIMES_MAX", 64)
    monkeypatch.setattr(timefmt, "_FORMATTED_MAX", 64)
    rng = random.Random(11)
    texts = [format_time(T0 + timedelta(seconds=rng.randrange(10**9))) for _ in range(500)]
    for _ in range(3):
        for text in texts:
            assert text is not None
            dt = model.stored_time(text)
            assert dt == parse_time(text) and dt.tzinfo is UTC
            assert format_time(dt) == dt.strftime("%Y-%m-%dT%H:%M:%SZ") == text
            assert len(model._TIMES) <= 64 and len(timefmt._FORMATTED) <= 64
    first = model.stored_time(texts[0])
    assert model.stored_time(texts[0]) is first  # shared while in the memo
    for bad in ("2031-02-30T00:00:00Z", "yesterday"):
        with pytest.raises(ValueError):
            model.stored_time(bad)
        assert bad not in model._TIMES
    # The same instant in another zone is formatted as UTC, not taken from the memo.
    from datetime import timezone

    plus2 = first.astimezone(timezone(timedelta(hours=2)))
    assert format_time(plus2) == texts[0]


def _home(tmp_path: Path) -> Path:
    (tmp_path / "master.key").write_text("A" * 43 + "=\n")
    (tmp_path / "master.key").chmod(0o600)
    cfg = tmp_path / "keymgr.toml"
    cfg.write_text(
        """
[daemon]
state = "file:state.json"
[backends.local]
type = "file"
path = "keys"
master_key_file = "master.key"
[publishers.site]
type = "file"
path = "jwks.json"
[keyrings.api]
backend = "local"
algorithm = "ES256"
rotation_period = "30d"
publish_ahead = "1h"
retire_grace = "1d"
destroy_after = "7d"
publishers = ["site"]
"""
    )
    return cfg


def test_sign_follows_a_promotion_made_by_another_process(tmp_path):
    cfg = _home(tmp_path)
    signer = KeyManager.from_config(cfg)
    assert signer.reconcile(T0).ok
    kid1 = jwt.get_unverified_header(signer.sign("api", {"n": 1}))["kid"]
    other = KeyManager.from_config(cfg)  # its own store object, as another process has
    assert other.rotate("api", emergency=True, now=T0 + timedelta(hours=1)).ok
    kid2 = other.state().ring("api").active.kid
    assert kid2 != kid1
    deadline = time.monotonic() + 2
    seen = kid1
    while seen != kid2 and time.monotonic() < deadline:
        seen = jwt.get_unverified_header(signer.sign("api", {"n": 2}))["kid"]
    assert seen == kid2
    # The window is one fingerprint check (1 ms for the file store), not more.
    assert signer.store.fingerprint_window <= 0.001


def test_sign_sees_own_changes_at_once(tmp_path):
    cfg = _home(tmp_path)
    km = KeyManager.from_config(cfg)
    assert km.reconcile(T0).ok
    kid1 = jwt.get_unverified_header(km.sign("api", {}))["kid"]
    assert km.rotate("api", emergency=True, now=T0 + timedelta(hours=1)).ok
    kid2 = jwt.get_unverified_header(km.sign("api", {}))["kid"]  # no wait at all
    assert kid2 == km.state().ring("api").active.kid != kid1


def test_file_store_reparses_changed_bytes(tmp_path):
    cfg = _home(tmp_path)
    km = KeyManager.from_config(cfg)
    assert km.reconcile(T0).ok
    store = FileStore(tmp_path / "state.json")
    s1, v1 = store.load()
    s2, v2 = store.load()
    assert s2 is s1 and v2 == v1  # same bytes: the parse is reused
    assert KeyManager.from_config(cfg).rotate("api", now=T0 + timedelta(hours=1)).ok
    s3, v3 = store.load()
    assert v3 > v1 and s3 is not s1 and s3.ring("api").rotate_at is not None


def test_sign_counts_calls_and_latency_when_metrics_are_attached(tmp_path):
    from keymgr.metrics import Metrics

    cfg = _home(tmp_path)
    km = KeyManager.from_config(cfg)
    assert km.reconcile(T0).ok
    km.sign("api", {"n": 0})  # no registry attached: nothing to count
    km.metrics = m = Metrics()
    for i in range(3):
        km.sign("api", {"n": i})
    with pytest.raises(Exception, match="unknown ring"):
        km.sign("nope", {})
    get = m.registry.get_sample_value
    assert get("keymgr_sign_calls_total", {"ring": "api"}) == 3
    assert get("keymgr_sign_duration_seconds_count", {"ring": "api"}) == 3
    total = get("keymgr_sign_duration_seconds_sum", {"ring": "api"})
    assert 0 < total < 3  # seconds, not nanoseconds


@st.composite
def _coordinates(draw: st.DrawFn) -> tuple[int, str]:
    """A size and a base64url text of about that many bytes, sometimes with one
    character changed (alphabet, padding, unused trailing bits, non-ASCII)."""
    from keymgr import validate

    size = draw(st.sampled_from(sorted(validate._COORD_RE)))
    text = jose.b64url(draw(st.binary(min_size=size - 1, max_size=size + 1)))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from("ABQgw09_-+/=. \u00e9")) + text[i + 1 :]
    return size, text


@settings(max_examples=2000, deadline=None)
@given(_coordinates())
def test_coordinate_shape_check_accepts_what_the_strict_decoder_decodes_to_its_size(
    case: tuple[int, str],
) -> None:
    """keymgr.validate checks EC/OKP coordinates with one regex per size; it
    must accept exactly the texts jose.b64url_decode turns into that many bytes."""
    from keymgr import validate

    size, text = case
    try:
        decoded = len(jose.b64url_decode(text)) == size
    except ValueError:
        decoded = False
    assert (validate._COORD_RE[size].fullmatch(text) is not None) == decoded


_CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_KEYS = {
    **{crv: ec.generate_private_key(curve) for crv, curve in _CURVES.items()},
    "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    "RSA": rsa.generate_private_key(65537, 2048),
}


@st.composite
def _stored_keys(draw: st.DrawFn) -> Any:
    """A key record as a state holds it: a real public JWK, often damaged (a
    coordinate changed or cut, a member added, removed or renamed, crv or kty
    changed, members reordered), an alg that may not fit, a kid that may not
    be its thumbprint."""
    from keymgr.model import Key, _public_jwk

    jwk = dict(jose.public_jwk(_KEYS[draw(st.sampled_from(sorted(_KEYS)))].public_key()))
    kid = jose.thumbprint(jwk)
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.sampled_from(["char", "cut", "add", "drop", "crv", "kty", "order"]))
        name = draw(st.sampled_from(sorted(jwk))) if jwk else "x"
        if how == "char" and name in jwk:
            text = jwk[name]
            i = draw(st.integers(0, max(0, len(text) - 1)))
            jwk[name] = text[:i] + draw(st.sampled_from("ABQgw09_-+/=.%\u00e9")) + text[i + 1 :]
        elif how == "cut" and name in jwk:
            jwk[name] = jwk[name][: draw(st.integers(0, len(jwk[name])))]
        elif how == "add":
            jwk[draw(st.sampled_from(["d", "alg", "use", "y", "n"]))] = "AQAB"
        elif how == "drop":
            jwk.pop(name, None)
        elif how == "crv":
            jwk["crv"] = draw(st.sampled_from(["P-256", "P-384", "P-521", "Ed25519", "X25519"]))
        elif how == "kty":
            jwk["kty"] = draw(st.sampled_from(["EC", "OKP", "RSA", "oct"]))
        else:
            jwk = dict(reversed(list(jwk.items())))
    if draw(st.booleans()):
        kid = jose.thumbprint(jwk) if jwk.get("kty") in ("EC", "OKP", "RSA") and all(
            m in jwk for m in jose.KEY_MEMBERS[jwk["kty"]]) else kid
    alg = draw(st.sampled_from(sorted(jose.ALGORITHMS)))
    t = datetime(2031, 1, 1, tzinfo=UTC)
    return Key(kid, alg, "local", "active", _public_jwk(jwk), t, t, t)


@settings(max_examples=1500, deadline=None)
@given(_stored_keys())
def test_the_held_jwk_check_gives_the_long_ways_verdict(key: Any) -> None:
    """keymgr.validate checks a held EC or OKP JWK in one pass over its bytes
    (keymgr.model.PublicJwk); for every key, sound or damaged, it must give
    exactly what the member-by-member checks and jose.thumbprint give."""
    from keymgr import validate

    fast = validate.key_problem(key)
    real = validate._held_kid
    try:
        validate._held_kid = lambda jwk, alg: None  # type: ignore[assignment]
        slow = validate.key_problem(key)
    finally:
        validate._held_kid = real
    assert fast == slow


def test_tombstone_and_key_fast_paths_read_what_the_checks_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sound tombstone or key is read alike whether its time is in the memo
    (the fast path) or not, and shares its short strings either way."""
    from keymgr import model

    tomb = {"kid": "k" * 43, "alg": "ES256", "backend": "local", "destroyed_at": format_time(T0)}
    monkeypatch.setattr(model, "_TIMES", {})  # the first read takes the checked path
    cold = model.Tombstone.from_dict("r", json.loads(json.dumps(tomb)))
    assert model._TIMES  # its time is now known: the second read takes the fast one
    warm = model.Tombstone.from_dict("r", json.loads(json.dumps(tomb)))
    assert cold == warm and warm.destroyed_at is cold.destroyed_at
    assert warm.alg is cold.alg and warm.backend is cold.backend
    for bad, words in (({**tomb, "alg": 5}, "alg must be"), ({**tomb, "x": "y"}, "unexpected")):
        with pytest.raises(ValueError, match=words):
            model.Tombstone.from_dict("r", bad)
    priv = ec.generate_private_key(ec.SECP256R1())
    jwk = jose.public_jwk(priv.public_key())
    entry = {
        "kid": jose.thumbprint(jwk),
        "alg": "ES256",
        "backend": "local",
        "state": "active",
        "public_jwk": jwk,
        "created_at": format_time(T0),
        "published_at": format_time(T0),
        "activated_at": format_time(T0),
    }
    a = model.Key.from_dict(json.loads(json.dumps(entry)))
    b = model.Key.from_dict(json.loads(json.dumps(entry)))
    assert a == b and a.public_jwk == jwk and a.public_jwk is not b.public_jwk
    assert type(a.public_jwk) is model.PublicJwk and a.state is b.state is model.ACTIVE
    assert a.to_dict() == {**entry, **{f: None for f in ("retired_at", "expired_at",
                                                         "destroyed_at", "revoked_at",
                                                         "reason")}}


def test_a_policy_holds_no_string_of_the_parsed_toml(tmp_path: Path) -> None:
    """Each ring's name is a copy, and its backend, algorithm and publishers are
    the strings of their own tables (keymgr.config._detached): a parsed config
    of 100,000 rings is freed whole instead of pinning 100 MB of heap."""
    from keymgr.config import parse_config, parse_toml

    text = _home(tmp_path).read_text()
    doc = parse_toml(text)
    cfg = parse_config(doc, tmp_path / "keymgr.toml")
    [(name, pol)] = cfg.policies.items()
    [toml_name] = doc["keyrings"]
    toml_ring = doc["keyrings"][toml_name]
    assert name == toml_name == pol.ring and pol.ring is not toml_name
    assert pol.backend == toml_ring["backend"] and pol.backend is not toml_ring["backend"]
    assert pol.backend is next(iter(doc["backends"]))
    assert pol.algorithm == "ES256" and pol.algorithm is not toml_ring["algorithm"]
    assert pol.publishers == ("site",) and pol.publishers[0] is next(iter(doc["publishers"]))
    assert pol.publishers[0] is not toml_ring["publishers"][0]


def test_one_shot_commands_run_without_the_cyclic_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """keymgr.cli.main pauses the cyclic GC for one-shot commands (and turns it
    back on after, for a caller in the same process), never for the daemon or
    ``audit follow``."""
    import gc

    from keymgr import cli

    seen: dict[str, bool] = {}

    def dispatch(args: Any) -> int:
        seen[args.command if args.command != "audit" else args.audit_command] = gc.isenabled()
        return 0

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    monkeypatch.setattr("keymgr.hardening.no_core_dumps", lambda: None)
    assert gc.isenabled()
    for argv in (["status", "--json"], ["run"], ["audit", "follow"], ["plan"]):
        assert cli.main(argv) == 0
        assert gc.isenabled()
    assert seen == {"status": False, "run": True, "follow": True, "plan": False}


def test_a_stored_public_jwk_reads_as_the_dict_it_was_made_from() -> None:
    """keymgr.model.PublicJwk (a loaded key's public JWK, kept as its JSON):
    same members in the same order, equal to the dict both ways, written back
    as that dict; what is not an object of strings is kept as it is for
    keymgr.validate to name."""
    from keymgr import model

    priv = ec.generate_private_key(ec.SECP384R1())
    jwk = jose.public_jwk(priv.public_key())
    held = model.PublicJwk(jwk)
    assert list(held) == list(jwk) == ["kty", "crv", "x", "y"] and len(held) == 4
    assert dict(held) == jwk and held == jwk and jwk == held
    assert (held != jwk) is False and (jwk != held) is False
    assert held["x"] == jwk["x"] and held.get("d") is None and "y" in held
    assert list(held.items()) == list(jwk.items()) and held == model.PublicJwk(dict(jwk))
    assert held != {**jwk, "x": jwk["y"]} and held != model.PublicJwk({**jwk, "kty": "RSA"})
    assert held != "EC" and model.jwk_members(held) == jwk
    with pytest.raises(TypeError):
        hash(held)
    assert jose.thumbprint(held) == jose.thumbprint(jwk)
    assert repr(held).startswith("PublicJwk({'kty': 'EC'")
    # Kept as they are: not an object, a non-string member, a lone surrogate,
    # a list where a string goes (unhashable), a non-string member name.
    for odd in ([["kty", "EC"]], {**jwk, "y": 3}, {**jwk, "x": "\ud800"}, "EC",
                {**jwk, "kty": ["EC"]}, {**jwk, "crv": 7}, {**jwk, 1: "a"}):
        assert model._public_jwk(odd) is odd
    assert pickle.loads(pickle.dumps(held)) == held and copy.deepcopy(held) == held


@pytest.mark.parametrize("make", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP521R1()),
    lambda: rsa.generate_private_key(65537, 2048),
    lambda: ed25519.Ed25519PrivateKey.generate(),
], ids=["P-256", "P-521", "RSA-2048", "Ed25519"])
def test_a_stored_public_jwk_keeps_only_its_key_material(make: Any) -> None:
    """What a shape repeats (member names, kty, crv) is held once per process:
    a stored JWK is a byte naming its shape plus its key material, smaller
    than its JSON, and reads back as the same dict in the same order."""
    from keymgr import model

    jwk = jose.public_jwk(make().public_key())
    held = model.PublicJwk(jwk)
    material = [v for k, v in jwk.items() if k in {"n", "e", "x", "y"}]
    assert bytes(held)[1:] == ".".join(material).encode()
    assert len(bytes(held)) < len(json.dumps(jwk, separators=(",", ":")))
    assert list(held.items()) == list(jwk.items())
    for extra in ({"alg": "ES256", "use": "sig"}, {"use": "sig", "z": "a.b"}):
        more = model.PublicJwk({**jwk, **extra})
        assert dict(more) == {**jwk, **extra} and more != held


def test_odd_public_jwks_are_held_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key material that is not plain ASCII text without a dot, and any shape
    past the 255th, fall back to the JSON form: same reading, only larger."""
    from keymgr import model, validate

    monkeypatch.setattr(model, "_SHAPES", [({}, ())])
    monkeypatch.setattr(model, "_BY_NAMES", {})
    monkeypatch.setattr(validate, "_HELD", {})  # its plans are per shape index
    base = {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "B" * 43}
    for odd in ({**base, "x": "a.b"}, {**base, "y": "é"}, {"kty": "EC"}):
        held = model.PublicJwk(odd)
        assert bytes(held)[0] == 0 and bytes(held)[1:] == json.dumps(odd, separators=(",", ":"),
                                                                     ensure_ascii=False).encode()
        assert dict(held) == odd and list(held) == list(odd)
    free = 256 - len(model._SHAPES)  # the shapes above took some
    shaped = [model.PublicJwk({**base, "alg": f"A{i}"}) for i in range(300)]
    assert len(model._SHAPES) == 256  # 255 shapes and "no shape"
    assert [bytes(h)[0] == 0 for h in shaped] == [False] * free + [True] * (300 - free)
    assert [dict(h) for h in shaped] == [{**base, "alg": f"A{i}"} for i in range(300)]


def test_shapes_added_by_many_threads_at_once_read_back_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A network store decodes shards in several threads: each new shape's
    index must name that shape, whichever thread adds another meanwhile."""
    import sys
    import threading

    from keymgr import model, validate

    class SlowList(list):  # type: ignore[type-arg]
        """Lets another thread run right after each append: where an index
        taken apart from its append would name another thread's shape."""

        def append(self, item: Any) -> None:
            super().append(item)
            time.sleep(0.001)

    monkeypatch.setattr(model, "_SHAPES", SlowList([({}, ())]))
    monkeypatch.setattr(model, "_BY_NAMES", {})
    monkeypatch.setattr(validate, "_HELD", {})
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        base = {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "B" * 43}
        wrong: list[tuple[dict[str, str], dict[str, str]]] = []
        start = threading.Barrier(8)

        def work(t: int) -> None:
            start.wait()
            for i in range(30):
                jwk = {**base, "alg": f"T{t}-{i}", "x": f"{t:02d}{i:02d}" + "A" * 39}
                got = dict(model.PublicJwk(jwk))
                if got != jwk:
                    wrong.append((jwk, got))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, wrong[:3]
    assert len(model._SHAPES) == 241  # 240 shapes, each added once
