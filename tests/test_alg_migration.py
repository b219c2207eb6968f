"""Changing a ring's algorithm, end to end: RS256 -> ES256 -> EdDSA.

The real CLI and the file backend, time moved with ``--at``. At every moment
the projected path names (and one second before each), the ring is reconciled,
a token is signed, and every token still valid is verified by two independent
verifiers (PyJWT and jwcrypto, each with an algorithm allowlist holding the
old and the new algorithm) against the JWKS file as it is on disk: there must
be no rejection. A verifier whose allowlist lacks the new algorithm must
reject once the new key signs: that is what the warning of ``config check``
and ``plan`` is for. The times they announce must be the times it happens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws

from tests.conftest import SHORT_POLICY, T0, A, D, G, Home, P

SEC = timedelta(seconds=1)
DAY = timedelta(days=1)


def ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Token:
    jws: str
    kid: str
    alg: str
    exp: int

    def live_at(self, now: datetime) -> bool:
        return now.timestamp() < self.exp


def sign(home: Home, at: datetime, n: int) -> Token:
    out = home.run(
        "sign", "default", "--claims", json.dumps({"jti": f"t{n}"}), "--ttl", "2d",
        "--at", ts(at), check=True, inproc=True,
    ).stdout.strip()  # fmt: skip
    header = jwt.get_unverified_header(out)
    claims = jwt.decode(out, options={"verify_signature": False})
    return Token(out, header["kid"], header["alg"], claims["exp"])


def verify_pyjwt(jwks: dict[str, Any], token: Token, allow: list[str]) -> None:
    key = jwt.PyJWKSet.from_dict(jwks)[token.kid]
    jwt.decode(
        token.jws, key.key, algorithms=allow,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )  # fmt: skip


def verify_jwcrypto(jwks: dict[str, Any], token: Token, allow: list[str]) -> None:
    obj = jwc_jws.JWS()
    obj.deserialize(token.jws)
    obj.allowed_algs = allow
    obj.verify(jwc_jwk.JWKSet.from_json(json.dumps(jwks)))


VERIFIERS = {"PyJWT": verify_pyjwt, "jwcrypto": verify_jwcrypto}


def rejections(jwks: dict[str, Any], tokens: list[Token], allow: list[str]) -> list[str]:
    out = []
    for token in tokens:
        for name, verify in VERIFIERS.items():
            try:
                verify(jwks, token, allow)
            except Exception as e:
                out.append(f"{name} rejects {token.alg} token of {token.kid}: {e!r}")
    return out


def active(home: Home) -> dict[str, Any]:
    [key] = [k for k in home.status()["rings"]["default"]["keys"] if k["state"] == "active"]
    return key


def plan_json(home: Home, until: datetime) -> dict[str, Any]:
    return json.loads(home.run("plan", "--at", ts(until), "--json", check=True).stdout)


_WARNING = re.compile(
    r"changing from (\S+) to (\S+): the first \S+ key (?:is|was) published at (\S+) and "
    r"(?:starts signing at|signs since) (\S+); the last \S+ key leaves the JWKS at (\S+)\."
)


def announced(stderr: str) -> tuple[str, ...]:
    """(old, new, published, active, old gone) from a migration warning line."""
    [line] = [x for x in stderr.splitlines() if "algorithm: changing from" in x]
    assert line.startswith("keymgr: warning: ")
    m = _WARNING.search(line)
    assert m is not None, line
    assert "every verifier must accept" in line
    return m.groups()


@dataclass
class Drill:
    home: Home
    tokens: list[Token]
    checks: int = 0
    #: The sets of algorithms verified together at one moment (live tokens).
    mixes: set[tuple[str, ...]] = field(default_factory=set)

    def step(self, at: datetime, allow: list[str]) -> Token:
        """Reconcile at ``at``, sign, and verify every live token by both verifiers."""
        self.home.run("reconcile", "--at", ts(at), check=True, inproc=True)
        token = sign(self.home, at, len(self.tokens))
        assert token.alg == active(self.home)["alg"]  # the header alg is the signer's
        self.tokens.append(token)
        jwks = self.home.jwks()
        live = [t for t in self.tokens if t.live_at(at)]
        assert token in live
        bad = rejections(jwks, live, allow)
        assert not bad, f"at {ts(at)}: " + "\n".join(bad)
        self.checks += len(live) * len(VERIFIERS)
        self.mixes.add(tuple(sorted({t.alg for t in live})))
        return token

    def through(self, until: datetime, allow: list[str]) -> dict[str, Any]:
        """Every moment of the projected path to ``until``, and the second before each."""
        doc = plan_json(self.home, until)
        start = parse(doc["from"])
        moments = {parse(s["at"]) for s in doc["path"]}
        times = sorted(moments | {t - SEC for t in moments if t - SEC > start} | {until})
        for t in times:
            self.step(t, allow)
        return doc


def change_algorithm(home: Home, alg: str) -> tuple[str, ...]:
    home.set_ring(algorithm=alg)
    check = home.run("config", "check", check=True)
    return announced(check.stderr)


def test_rs256_to_es256_to_eddsa_rejects_nothing(home: Home) -> None:
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    drill = Drill(home, [])
    first = drill.step(T0, ["RS256"])
    assert first.alg == "RS256"
    rs_kid = first.kid

    # --- RS256 -> ES256 ------------------------------------------------------------
    drill.step(T0 + 2 * DAY, ["RS256"])
    changed_at = T0 + 3 * DAY
    old, new, published, signs, gone = change_algorithm(home, "ES256")
    assert (old, new) == ("RS256", "ES256")
    assert (published, signs, gone) == (ts(T0 + P - A), ts(T0 + P), ts(T0 + P + G))
    # plan says the same, on stderr and in its JSON.
    proc = home.run("plan", "--at", ts(changed_at), "--json", check=True)
    assert announced(proc.stderr) == (old, new, published, signs, gone)
    [mig] = json.loads(proc.stdout)["migrations"]
    assert mig == {
        "ring": "default", "from": ["RS256"], "to": "ES256", "published_at": published,
        "active_at": signs, "old_unpublished_at": gone,
    }  # fmt: skip
    assert announced(home.run("plan", check=True).stderr) == announced(proc.stderr)

    # The drive: through the switch until the last RS256 key is destroyed.
    both = ["RS256", "ES256"]
    doc = drill.through(T0 + P + G + D + DAY, both)
    promoted = [s for s in doc["path"] if s["action"] == "promote"]
    assert promoted[0]["alg"] == "ES256" and promoted[0]["at"] == signs

    keys = {k["kid"]: k for k in home.status()["rings"]["default"]["keys"]}
    es_kid = active(home)["kid"]
    assert keys[es_kid]["alg"] == "ES256"
    assert (keys[es_kid]["published_at"], keys[es_kid]["activated_at"]) == (published, signs)
    assert keys[rs_kid]["expired_at"] == gone and keys[rs_kid]["state"] == "destroyed"

    rs_tokens = [t for t in drill.tokens if t.alg == "RS256"]
    es_tokens = [t for t in drill.tokens if t.alg == "ES256"]
    # Signed with RS256 until the switch, ES256 from it; none with ES256 before.
    assert rs_tokens and es_tokens
    assert max(t.exp for t in rs_tokens) <= parse(signs).timestamp() + G.total_seconds()
    assert min(t.exp for t in es_tokens) >= parse(signs).timestamp() + G.total_seconds()

    # --- ES256 -> EdDSA (RS256 is gone from the JWKS: verifiers may drop it) -------
    now = parse(json.loads(home.run("plan", "--json", check=True).stdout)["at"])
    old, new, published, signs, gone = change_algorithm(home, "EdDSA")
    assert (old, new) == ("ES256", "EdDSA")
    es_active_at = parse(keys[es_kid]["activated_at"])
    assert (published, signs, gone) == (
        ts(es_active_at + P - A), ts(es_active_at + P), ts(es_active_at + P + G),
    )
    assert parse(published) > now
    both = ["ES256", "EdDSA"]
    doc = drill.through(parse(gone) + D + DAY, both)
    promoted = [s for s in doc["path"] if s["action"] == "promote"]
    assert promoted[0]["alg"] == "EdDSA" and promoted[0]["at"] == signs
    ed = active(home)
    assert ed["alg"] == "EdDSA" and ed["activated_at"] == signs
    assert drill.tokens[-1].alg == "EdDSA"
    assert home.run("config", "check", check=True).stderr == ""  # migration over
    assert {j["alg"] for j in home.jwks()["keys"]} == {"EdDSA"}
    # Tokens of both algorithms were live, and verified, together in each change.
    assert {("ES256", "RS256"), ("ES256", "EdDSA")} <= drill.mixes, drill.mixes
    assert home.run("audit", "verify").returncode == 0


def test_mid_migration_the_jwks_holds_both_algorithms_and_the_old_key_still_signs(
    home: Home,
) -> None:
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    drill = Drill(home, [])
    drill.step(T0, ["RS256"])
    home.set_ring(algorithm="ES256")
    before = drill.step(T0 + P - A, ["RS256", "ES256"])
    assert before.alg == "RS256"  # the successor is published, the RS256 key signs
    assert sorted(j["alg"] for j in home.jwks()["keys"]) == ["ES256", "RS256"]
    after = drill.step(T0 + P, ["RS256", "ES256"])
    assert after.alg == "ES256"
    jwks = home.jwks()

    # A verifier whose allowlist lacks ES256 rejects the new key's tokens (and
    # only those): the warning's point.
    old_only = rejections(jwks, [before, after], ["RS256"])
    assert len(old_only) == len(VERIFIERS), old_only
    assert all("ES256 token" in r for r in old_only)
    # One that dropped RS256 at the switch rejects the old key's live tokens.
    assert before.live_at(T0 + P)
    new_only = rejections(jwks, [before, after], ["ES256"])
    assert len(new_only) == len(VERIFIERS) and all("RS256 token" in r for r in new_only)
    # With both allowed, nothing is rejected.
    assert rejections(jwks, [before, after], ["RS256", "ES256"]) == []


@pytest.mark.parametrize("when", ["before-successor", "successor-published"])
def test_emergency_rotation_during_migration_uses_the_new_algorithm(
    home: Home, when: str
) -> None:
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    drill = Drill(home, [])
    drill.step(T0, ["RS256"])
    home.set_ring(algorithm="ES256")
    t = T0 + DAY if when == "before-successor" else T0 + P - A
    drill.step(t, ["RS256", "ES256"])
    waiting = [k["kid"] for k in home.status()["rings"]["default"]["keys"]
               if k["state"] == "published"]  # fmt: skip
    t += 60 * SEC
    out = home.run("rotate", "default", "--emergency", "--at", ts(t), check=True).stdout
    assert "key.promoted" in out
    signer = active(home)
    assert signer["alg"] == "ES256" and signer["activated_at"] == ts(t)
    # A successor already published is the one promoted; else a new ES256 key.
    assert waiting == ([] if when == "before-successor" else [signer["kid"]])
    token = drill.step(t, ["RS256", "ES256"])  # every RS256 token still verifies
    assert token.alg == "ES256" and token.kid == signer["kid"]
    algs = sorted(k["alg"] for k in home.status()["rings"]["default"]["keys"])
    assert algs == ["ES256", "RS256"]


def test_emergency_rotation_promotes_an_old_algorithm_successor_already_published(
    home: Home,
) -> None:
    """The one case where the old algorithm signs once more: its successor was
    published before the config changed. Emergency promotes what verifiers
    already hold; the new algorithm comes with the next successor, as plan says."""
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    drill = Drill(home, [])
    drill.step(T0, ["RS256"])
    drill.step(T0 + P - A, ["RS256"])  # an RS256 successor is published
    home.set_ring(algorithm="ES256")
    t = T0 + P - A + 60 * SEC
    home.run("rotate", "default", "--emergency", "--at", ts(t), check=True)
    signer = active(home)
    assert signer["alg"] == "RS256" and signer["activated_at"] == ts(t)
    old, new, published, signs, _ = announced(home.run("plan", check=True).stderr)
    assert (old, new) == ("RS256", "ES256")
    assert (published, signs) == (ts(t + P - A), ts(t + P))
    drill.through(t + P + DAY, ["RS256", "ES256"])
    assert active(home)["alg"] == "ES256" and active(home)["activated_at"] == signs


def test_a_crash_after_generate_then_an_algorithm_change_does_not_stick_the_ring(
    home: Home,
) -> None:
    """SIGKILL between the backend creating the successor and the state
    recording it, then the algorithm changed before the next pass: the key
    left behind still carries the open intent's nonce, so it is that intent's
    orphan (destroyed, as it no longer fits), not an unknown key that stops
    every later pass."""
    home.set_ring(algorithm="RS256", **SHORT_POLICY)
    home.run("reconcile", "--at", ts(T0), check=True)
    due = T0 + P - A
    crashed = home.run(
        "reconcile", "--at", ts(due), env=home.env(KEYMGR_CRASH_AT="generate.after_backend")
    )
    assert crashed.returncode == -9, crashed.stderr
    left = sorted(p.name for p in (home.dir / "keys" / "default").iterdir())
    home.set_ring(algorithm="ES256")
    home.run("reconcile", "--at", ts(due + SEC), check=True)
    keys = home.state()["rings"]["default"]["keys"]
    assert sorted(k["alg"] for k in keys) == ["ES256", "RS256"]
    # The RS256 key the crash left is gone from the backend; the ES256 successor is there.
    now = sorted(p.name for p in (home.dir / "keys" / "default").iterdir())
    assert len(left) == 2 and len(now) == 2 and set(left) != set(now)
    home.run("reconcile", "--at", ts(T0 + P + SEC), check=True)
    assert active(home)["alg"] == "ES256"
