"""An audit log you can prove (issue 11): forged history is refused, and signed
checkpoints let anyone holding the audit public keys verify every line.

- The hash chain has no secret: a log rewritten with a recomputed chain must be
  refused by the next command *before* anything commits (state and log left
  byte-identical), never re-anchored, and ``audit verify`` must keep failing.
- Events placed in the state's outbox are checked before they are appended:
  sealed, chained, ending at the anchor, and agreeing with the keys in state.
- With ``[audit]``, every commit signs its chain head with an audit key held in
  a backend. The signatures are checked here with PyJWT and jwcrypto, never
  with keymgr's own code; someone with write access to the log *and* the state
  but not to the backend can neither forge nor drop an event without
  ``audit verify --keys`` failing.

Everything runs through the real CLI (subprocesses), with ``--at`` for time.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwcrypto import jwk as jwc_jwk

from keymgr.audit import GENESIS, chain_hash
from tests.conftest import Home

RING = "default"
POLICY = {
    "algorithm": "ES256",
    "rotation_period": "10d",
    "publish_ahead": "1h",
    "retire_grace": "1d",
    "destroy_after": "1d",
}
T0 = "2030-01-01T00:00:00Z"  # bootstrap
T_REVOKE = "2030-01-02T00:00:00Z"  # the active key is revoked (and replaced)
T_ROTATE = "2030-01-03T00:00:00Z"  # `rotate` commits a request at once
T_NEXT = "2030-01-11T23:00:00Z"  # the replacement's successor is due
AUDIT_RING = "keymgr-audit"
DOMAIN = b"keymgr-audit-checkpoint-v1\n"  # written out here, not imported
CKPT = ("ckpt_kid", "ckpt_sig")


# --------------------------------------------------------------------------- helpers


class Proofs(Home):
    """A keymgr home driven through the CLI, with raw access to log and state."""

    @property
    def log(self) -> Path:
        return self.dir / "audit.jsonl"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args, env=self.env(**env))
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out, out
        assert "PRIVATE KEY" not in out and '"d":' not in out, out
        return proc

    def ok(self, *args: str) -> str:
        proc = self.cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        return proc.stdout

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_bytes().splitlines()]

    def write_events(self, events: list[dict[str, Any]]) -> None:
        self.log.write_bytes(
            b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)
        )

    def write_state(self, doc: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(doc, indent=1) + "\n")

    def add_audit(self, algorithm: str, rotation_period: str = "90d") -> None:
        with self.config.open("a") as f:
            f.write(
                f'\n[audit]\nbackend = "local"\nalgorithm = "{algorithm}"\n'
                f'rotation_period = "{rotation_period}"\n'
            )

    def pin(self) -> Path:
        """The audit keys as the backend holds them, pinned to a file."""
        path = self.dir.parent / f"{self.dir.name}-pinned.jwks"
        path.write_text(self.ok("audit", "keys"))
        return path


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("keymgr: error: "), lines[0]
    return lines[0]


def init_home(d: Path) -> Proofs:
    subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(d)],
        check=True,
        capture_output=True,
    )
    h = Proofs(d)
    h.set_ring(RING, **POLICY)
    return h


def build(d: Path, audit: str | None, rotation_period: str = "90d") -> Proofs:
    """Bootstrap at T0, then revoke the active key at T_REVOKE (replaced at once)."""
    h = init_home(d)
    if audit is not None:
        h.add_audit(audit, rotation_period)
    h.ok("reconcile", "--at", T0)
    h.ok("revoke", h.kid_in("active"), "--reason", "compromised", "--at", T_REVOKE)
    assert h.ok("audit", "verify")
    return h


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | None], Path]:
    """Per worker, one built home per [audit] algorithm (None: no [audit])."""
    built: dict[str | None, Path] = {}

    def get(audit: str | None) -> Path:
        if audit not in built:
            built[audit] = build(tmp_path_factory.mktemp(f"proofs-{audit}") / "home", audit).dir
        return built[audit]

    return get


def copy_of(templates: Callable[[str | None], Path], audit: str | None, dest: Path) -> Proofs:
    shutil.copytree(templates(audit), dest, symlinks=True)
    return Proofs(dest)


def rechain(events: list[dict[str, Any]], strip: bool = False) -> list[dict[str, Any]]:
    """Renumber and recompute the whole chain, as anyone can (it has no secret)."""
    prev = GENESIS
    for i, ev in enumerate(events, 1):
        if strip:
            for f in CKPT:
                ev.pop(f, None)
        ev["seq"], ev["prev"] = i, prev
        ev["hash"] = prev = chain_hash(prev, ev)
    return events


def reanchor(h: Proofs, events: list[dict[str, Any]]) -> None:
    """Make the state agree with a rewritten log: head and outbox (state write access)."""
    doc = h.state()
    n = len(doc["audit"]["outbox"])
    doc["audit"]["seq"], doc["audit"]["hash"] = events[-1]["seq"], events[-1]["hash"]
    doc["audit"]["outbox"] = events[-n:] if n else []
    h.write_state(doc)


def revoked_index(events: list[dict[str, Any]]) -> int:
    (i,) = [i for i, e in enumerate(events) if e["event"] == "key.revoked"]
    return i


def harmless(ev: dict[str, Any]) -> dict[str, Any]:
    """A harmless event in place of ``ev`` (its checkpoint fields, if any, kept)."""
    out = {"ts": ev["ts"], "event": "config.loaded", "actor": ev["actor"], "reason": "SIGHUP"}
    out.update({f: ev[f] for f in CKPT if f in ev})
    return out


def forge_revocation(h: Proofs, state_too: bool = False, strip: bool = False) -> int:
    """Turn the key.revoked line into a harmless one and recompute the chain.
    Returns its line number."""
    events = h.events()
    i = revoked_index(events)
    events[i] = harmless(events[i])
    h.write_events(rechain(events, strip))
    if state_too:
        reanchor(h, events)
    return i + 1


def append_chained(h: Proofs, state_too: bool = False) -> int:
    events = h.events()
    last = events[-1]
    ev = {
        "ts": last["ts"],
        "event": "key.revoked",
        "ring": RING,
        "kid": h.kid_in("active"),
        "actor": "cli:mallory@example",
        "reason": "forged",
        "seq": last["seq"] + 1,
        "prev": last["hash"],
    }
    ev["hash"] = chain_hash(last["hash"], ev)
    events.append(ev)
    h.write_events(events)
    if state_too:
        reanchor(h, events)
    return len(events)


def replace_last(h: Proofs, state_too: bool = False) -> int:
    events = h.events()
    events[-1] = harmless(events[-1])
    h.write_events(rechain(events))
    if state_too:
        reanchor(h, events)
    return len(events)


def drop_revocation(h: Proofs, state_too: bool = False) -> int:
    events = h.events()
    i = revoked_index(events)
    del events[i]
    h.write_events(rechain(events))
    if state_too:
        reanchor(h, events)
    return i + 1


def verify_independently(events: list[dict[str, Any]]) -> int:
    """Check every checkpoint with PyJWT (and each kid with jwcrypto); return how many.

    The first key vouches for itself; each later one must be introduced by a
    batch signed by the key before it. Every line must be covered.
    """
    keys: dict[str, tuple[str, Any]] = {}
    current: str | None = None
    introduced: list[str] = []
    covered = 0
    for ev in events:
        if ev["event"] == "audit.key":
            jwk = ev["public_jwk"]
            assert not {"d", "p", "q", "k"} & set(jwk)
            assert jwc_jwk.JWK(**jwk).thumbprint() == ev["kid"]
            alg = pyjwt.algorithms.get_default_algorithms()[ev["alg"]]
            keys[ev["kid"]] = (ev["alg"], alg.from_jwk(json.dumps(jwk)))
            introduced.append(ev["kid"])
        if "ckpt_sig" not in ev:
            continue
        kid = ev["ckpt_kid"]
        assert kid == (current or introduced[0]), (ev["seq"], kid, current)
        name, key = keys[kid]
        sig = base64.urlsafe_b64decode(ev["ckpt_sig"] + "=" * (-len(ev["ckpt_sig"]) % 4))
        data = DOMAIN + f"{ev['seq']}\n{ev['hash']}".encode()
        assert pyjwt.algorithms.get_default_algorithms()[name].verify(data, key, sig), ev["seq"]
        if introduced:
            current, introduced = introduced[-1], []
        covered = ev["seq"]
    assert covered == events[-1]["seq"], "lines after the last checkpoint"
    return sum("ckpt_sig" in ev for ev in events)


# --------------------------------------------------------------------------- the head check


FORGERIES = {
    "revoked-rewritten": forge_revocation,
    "revoked-dropped": drop_revocation,
    "last-line-replaced": replace_last,
    "chained-line-appended": append_chained,
}
COMMANDS = {
    "rotate": ("rotate", RING, "--at", T_ROTATE),
    "reconcile": ("reconcile", "--at", T_NEXT),
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_rechained_log_is_refused_before_anything_commits(
    templates: Callable[[str | None], Path], tmp_path: Path, forge: Any, command: tuple[str, ...]
) -> None:
    """The issue's forgery, and its cousins: never re-anchored, never half-committed."""
    h = copy_of(templates, None, tmp_path / "home")
    forge(h)
    before = h.files()
    for _ in range(2):  # refused the same way every time: nothing wedged
        line = error_line(h.cli(*command))
        assert str(h.log) in line and "seq" in line, line
        assert "audit verify" in line, line
        assert h.files() == before  # byte-identical: state, log, keys, JWKS
    proc = h.cli("audit", "verify")
    assert proc.returncode == 1, proc.stdout
    assert str(h.log) in error_line(proc)
    assert h.files() == before


def test_state_without_anchor_refuses_a_non_empty_log(tmp_path: Path) -> None:
    """A new (or replaced) state must not adopt someone's log as its history."""
    other = init_home(tmp_path / "other")
    other.ok("reconcile", "--at", T0)
    h = init_home(tmp_path / "home")
    shutil.copy(other.log, h.log)
    before = h.files()
    line = error_line(h.cli("reconcile", "--at", T0))
    assert str(h.log) in line and "anchors none" in line, line
    assert h.files() == before


def test_the_head_is_checked_even_when_nothing_is_due(
    templates: Callable[[str | None], Path], tmp_path: Path
) -> None:
    h = copy_of(templates, None, tmp_path / "home")
    forge_revocation(h)
    before = h.files()
    error_line(h.cli("reconcile", "--at", T_ROTATE))
    assert h.files() == before


# --------------------------------------------------------------------------- the outbox


def _forge_outbox(h: Proofs, make: Callable[[Proofs, dict[str, Any]], dict[str, Any]]) -> None:
    """Put one forged event in the state's outbox, chained after the anchor, and
    anchor it: the log stays behind, so the next command would append it."""
    doc = h.state()
    anchor = doc["audit"]
    ev = make(h, doc)
    ev.setdefault("seq", anchor["seq"] + 1)
    ev.setdefault("prev", anchor["hash"])
    ev.setdefault("hash", chain_hash(ev["prev"], ev))
    anchor["outbox"] = [ev]
    anchor["seq"], anchor["hash"] = ev["seq"], ev["hash"]
    h.write_state(doc)


def _revoke_active(h: Proofs, doc: dict[str, Any]) -> dict[str, Any]:
    return {"ts": T_ROTATE, "event": "key.revoked", "ring": RING, "kid": h.kid_in("active"),
            "backend": "local", "actor": "cli:mallory@example", "reason": "forged"}


def _promote_unknown(h: Proofs, doc: dict[str, Any]) -> dict[str, Any]:
    return {"ts": T_ROTATE, "event": "key.promoted", "ring": RING, "kid": "A" * 43,
            "actor": "cli:mallory@example"}


def _wrong_backend(h: Proofs, doc: dict[str, Any]) -> dict[str, Any]:
    return {"ts": T_ROTATE, "event": "key.published", "ring": RING, "kid": h.kid_in("active"),
            "backend": "elsewhere", "actor": "cli:mallory@example"}


def _bad_hash(h: Proofs, doc: dict[str, Any]) -> dict[str, Any]:
    return {"ts": T_ROTATE, "event": "daemon.started", "actor": "daemon", "hash": "f" * 64}


def _gap(h: Proofs, doc: dict[str, Any]) -> dict[str, Any]:
    ev = {"ts": T_ROTATE, "event": "daemon.started", "actor": "daemon",
          "seq": doc["audit"]["seq"] + 2, "prev": doc["audit"]["hash"]}
    ev["hash"] = chain_hash(ev["prev"], ev)
    return ev


OUTBOX_FORGERIES = {
    "revokes-an-active-key": (_revoke_active, "revoked"),
    "promotes-an-unknown-key": (_promote_unknown, "does not hold"),
    "names-another-backend": (_wrong_backend, "backend"),
    "wrong-hash": (_bad_hash, "hash"),
    "sequence-gap": (_gap, "seq"),
}


@pytest.mark.parametrize(
    ("make", "says"), OUTBOX_FORGERIES.values(), ids=OUTBOX_FORGERIES.keys()
)
def test_forged_outbox_event_is_refused_before_append(
    templates: Callable[[str | None], Path], tmp_path: Path, make: Any, says: str
) -> None:
    h = copy_of(templates, None, tmp_path / "home")
    _forge_outbox(h, make)
    before = h.files()
    line = error_line(h.cli("reconcile", "--at", T_NEXT))
    assert "outbox" in line and says in line, line
    assert h.files() == before  # nothing appended, nothing committed


def test_unsigned_outbox_is_refused_with_audit(
    templates: Callable[[str | None], Path], tmp_path: Path
) -> None:
    """With [audit], even a harmless-looking event needs the audit key's signature."""
    h = copy_of(templates, "ES256", tmp_path / "home")
    _forge_outbox(
        h, lambda h, doc: {"ts": T_ROTATE, "event": "config.loaded", "actor": "daemon"}
    )
    before = h.files()
    line = error_line(h.cli("reconcile", "--at", T_NEXT))
    assert "outbox" in line and "checkpoint" in line, line
    assert h.files() == before


def test_outbox_is_appended_after_a_crash_with_audit(tmp_path: Path) -> None:
    """A crash between the commit and the append: the next run checks the outbox's
    signature and appends it; the log then verifies against the pinned keys."""
    h = init_home(tmp_path / "home")
    h.add_audit("ES256")
    proc = h.cli("reconcile", "--at", T0, KEYMGR_CRASH_AT="audit.before_flush")
    assert proc.returncode == -9, proc.stderr
    assert h.state()["audit"]["seq"] > (len(h.events()) if h.log.exists() else 0)
    h.ok("reconcile", "--at", T0)
    assert h.state()["audit"]["seq"] == len(h.events())
    assert "every line signed" in h.ok("audit", "verify", "--keys", str(h.pin()))
    verify_independently(h.events())


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_checkpoints_verify_with_independent_libraries(
    templates: Callable[[str | None], Path], tmp_path: Path, alg: str
) -> None:
    h = copy_of(templates, alg, tmp_path / "home")
    events = h.events()
    (intro,) = [e for e in events if e["event"] == "audit.key"]
    assert events[0] == intro  # the first batch opens with it
    assert intro["alg"] == alg and intro["backend"] == "local"
    n = verify_independently(events)
    assert n >= 3  # one per commit
    # The audit key lives in the backend under its reserved ring, as the state says.
    assert (h.dir / "keys" / AUDIT_RING / f"{intro['kid']}.key").exists()
    anchor = h.state()["audit"]
    assert anchor["key"]["kid"] == intro["kid"] and anchor["key"]["alg"] == alg
    # The chain hash leaves the checkpoint out: verifiable without any key.
    for ev in events:
        body = {k: v for k, v in ev.items() if k not in ("hash", *CKPT)}
        assert chain_hash(ev["prev"], body) == ev["hash"]
    out = h.ok("audit", "verify")
    assert f"{n} checkpoint(s) verified" in out and "every line signed" in out, out
    pinned = h.pin()
    assert [k["kid"] for k in json.loads(pinned.read_text())["keys"]] == [intro["kid"]]
    out = h.ok("audit", "verify", "--keys", str(pinned))
    assert "against the pinned keys" in out, out


def _own_key_history(h: Proofs) -> int:
    """Replace the audit key everywhere with one the attacker holds, re-sign every
    checkpoint with it, and fix the state: consistent, but not the pinned key."""
    mine = ed25519.Ed25519PrivateKey.generate()
    raw = mine.public_key().public_bytes_raw()
    jwk = {"kty": "OKP", "crv": "Ed25519",
           "x": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    kid = jwc_jwk.JWK(**jwk).thumbprint()
    events = h.events()
    i = revoked_index(events)
    events[i] = harmless(events[i])
    for ev in events:
        if ev["event"] == "audit.key":
            ev.update(kid=kid, alg="EdDSA", public_jwk=jwk)
    rechain(events)
    for ev in events:
        if "ckpt_sig" in ev:
            sig = mine.sign(DOMAIN + f"{ev['seq']}\n{ev['hash']}".encode())
            ev["ckpt_kid"] = kid
            ev["ckpt_sig"] = base64.urlsafe_b64encode(sig).decode().rstrip("=")
    h.write_events(events)
    reanchor(h, events)
    doc = h.state()
    doc["audit"]["key"].update(kid=kid, alg="EdDSA")
    h.write_state(doc)
    return next(n for n, e in enumerate(events, 1) if e["event"] == "audit.key")


def _first_checkpoint_from(line: int) -> Callable[[Proofs], int]:
    def expect(h: Proofs) -> int:
        return next(e["seq"] for e in h.events() if e["seq"] >= line and "ckpt_sig" in e)

    return expect


ATTACKS: dict[str, tuple[Callable[[Proofs], int], str]] = {
    # Rewrite a line, recompute the chain, fix the state; the old signatures stay.
    "revoked-rewritten": (lambda h: forge_revocation(h, state_too=True), "does not verify"),
    "revoked-dropped": (lambda h: drop_revocation(h, state_too=True), "does not verify"),
    "last-line-replaced": (lambda h: replace_last(h, state_too=True), "does not verify"),
    # Same, with every signature removed.
    "rewritten-unsigned": (
        lambda h: forge_revocation(h, state_too=True, strip=True),
        "no signed checkpoint",
    ),
    # A new event after the last signed head, anchored in state.
    "chained-line-appended": (lambda h: append_chained(h, state_too=True), "not covered"),
    # A whole history under the attacker's own audit key.
    "own-audit-key": (_own_key_history, "not among the pinned keys"),
}


@pytest.mark.parametrize(("attack", "says"), ATTACKS.values(), ids=ATTACKS.keys())
def test_forgery_without_the_backend_fails_verify_keys(
    templates: Callable[[str | None], Path], tmp_path: Path, attack: Any, says: str
) -> None:
    """Write access to the log and the state, none to the audit key's backend."""
    h = copy_of(templates, "ES256", tmp_path / "home")
    pinned = h.pin()
    edited = attack(h)
    proc = h.cli("audit", "verify", "--keys", str(pinned))
    line = error_line(proc)
    assert str(h.log) in line and says in line, line
    n = int(line.split(" line ")[1].split(":")[0])
    if says == "does not verify":
        assert n == _first_checkpoint_from(edited)(h), line
    elif says == "not among the pinned keys":
        assert n == edited, line
    # The next commit refuses it too, before anything commits.
    before = h.files()
    line = error_line(h.cli("rotate", RING, "--at", T_ROTATE))
    assert str(h.log) in line, line
    assert h.files() == before


def test_without_pins_an_unauthenticated_key_change_fails(
    templates: Callable[[str | None], Path], tmp_path: Path
) -> None:
    """A second audit key that vouches for itself (not signed by the first) fails
    even without --keys."""
    h = copy_of(templates, "ES256", tmp_path / "home")
    mine = ed25519.Ed25519PrivateKey.generate()
    raw = mine.public_key().public_bytes_raw()
    jwk = {"kty": "OKP", "crv": "Ed25519",
           "x": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    kid = jwc_jwk.JWK(**jwk).thumbprint()
    events = h.events()
    last = events[-1]
    intro = {"ts": last["ts"], "event": "audit.key", "kid": kid, "alg": "EdDSA",
             "public_jwk": jwk, "actor": "cli:mallory@example"}
    forged = {"ts": last["ts"], "event": "config.loaded", "actor": "cli:mallory@example"}
    events += [intro, forged]
    rechain(events)
    forged["ckpt_kid"] = kid
    forged["ckpt_sig"] = base64.urlsafe_b64encode(
        mine.sign(DOMAIN + f"{forged['seq']}\n{forged['hash']}".encode())
    ).decode().rstrip("=")
    h.write_events(events)
    reanchor(h, events)
    line = error_line(h.cli("audit", "verify"))
    assert f"line {forged['seq']}" in line and "signs its own introduction" in line, line


def test_state_stripped_of_its_audit_key_is_refused(
    templates: Callable[[str | None], Path], tmp_path: Path
) -> None:
    """Removing the audit key from the state (so that keymgr would start a new one
    and sign over a forged head) is refused before anything commits: no new
    audit key is made."""
    h = copy_of(templates, "ES256", tmp_path / "home")
    events = h.events()
    forged = harmless(events[-1])
    forged.update({"seq": events[-1]["seq"] + 1, "prev": events[-1]["hash"]})
    forged["hash"] = chain_hash(forged["prev"], forged)
    h.write_events([*events, forged])
    doc = h.state()
    doc["audit"].update(seq=forged["seq"], hash=forged["hash"], outbox=[])
    del doc["audit"]["key"]
    h.write_state(doc)
    before = h.files()
    line = error_line(h.cli("rotate", RING, "--at", T_ROTATE))
    assert "names no audit key" in line, line
    assert h.files() == before  # no new audit key file either


def test_rollback_to_an_earlier_signed_head_needs_a_copy(
    templates: Callable[[str | None], Path], tmp_path: Path
) -> None:
    """The documented limit: log and state both cut back to a signed head verify.
    Only a head recorded elsewhere (docs/audit.md) shows the loss."""
    h = copy_of(templates, "ES256", tmp_path / "home")
    pinned = h.pin()
    events = h.events()
    held = (events[-1]["seq"], events[-1]["hash"])  # the copy an operator keeps
    cut = max(e["seq"] for e in events[:-1] if "ckpt_sig" in e)
    h.write_events(events[:cut])
    reanchor(h, events[:cut])
    doc = h.state()
    doc["audit"]["outbox"] = []
    h.write_state(doc)
    assert "every line signed" in h.ok("audit", "verify", "--keys", str(pinned))
    kept = {(e["seq"], e["hash"]) for e in h.events()}
    assert held not in kept


def test_audit_key_rotates_and_each_change_is_signed_by_its_predecessor(
    tmp_path: Path,
) -> None:
    h = init_home(tmp_path / "home")
    h.add_audit("EdDSA", rotation_period="5d")
    steps = [T0, "2030-01-10T23:00:00Z", "2030-01-11T00:00:00Z", "2030-01-12T00:00:00Z",
             "2030-01-13T00:00:00Z", "2030-01-20T23:00:00Z", "2030-01-21T00:00:00Z"]
    for t in steps:
        h.ok("reconcile", "--at", t)
    events = h.events()
    intros = [e for e in events if e["event"] == "audit.key"]
    assert len(intros) >= 3, [e["since"] for e in intros]
    for prev, new in itertools.pairwise(intros):
        assert new["replaces"] == prev["kid"]
        # The batch introducing the new key is signed by the one it replaces.
        signer = next(e for e in events if e["seq"] >= new["seq"] and "ckpt_sig" in e)
        assert signer["ckpt_kid"] == prev["kid"], (new["seq"], signer["seq"])
    verify_independently(events)
    anchor = h.state()["audit"]
    assert anchor["key"]["kid"] == intros[-1]["kid"]
    assert anchor["key"]["since"] == intros[-1]["since"]
    pinned = h.pin()
    assert {k["kid"] for k in json.loads(pinned.read_text())["keys"]} == {
        e["kid"] for e in intros
    }
    out = h.ok("audit", "verify", "--keys", str(pinned))
    assert "every line signed" in out, out
    # A pin holding only the newest key is not enough: the older ones are in the log.
    newest = tmp_path / "newest.jwks"
    keys = json.loads(pinned.read_text())["keys"]
    newest.write_text(json.dumps({"keys": [k for k in keys if k["kid"] == intros[-1]["kid"]]}))
    line = error_line(h.cli("audit", "verify", "--keys", str(newest)))
    assert "not among the pinned keys" in line and f"line {intros[0]['seq']}" in line, line


def test_audit_enabled_later_covers_the_earlier_lines(tmp_path: Path) -> None:
    h = init_home(tmp_path / "home")
    h.ok("reconcile", "--at", T0)
    unsigned = len(h.events())
    h.add_audit("ES256")
    h.ok("audit", "verify")  # configured, nothing signed yet: not a failure
    h.ok("revoke", h.kid_in("active"), "--at", T_REVOKE)
    events = h.events()
    assert events[unsigned]["event"] == "audit.key"
    verify_independently(events)
    assert "every line signed" in h.ok("audit", "verify", "--keys", str(h.pin()))


# --------------------------------------------------------------------------- config


BAD_AUDIT = {
    "unknown-backend": ('[audit]\nbackend = "nope"\n', "audit.backend", "unknown backend"),
    "unknown-field": ('[audit]\nbackend = "local"\ncolour = "red"\n', "audit.colour", "unknown"),
    "bad-duration": (
        '[audit]\nbackend = "local"\nrotation_period = "90 fortnights"\n',
        "audit.rotation_period",
        "",
    ),
    "zero-duration": (
        '[audit]\nbackend = "local"\nrotation_period = "0s"\n',
        "audit.rotation_period",
        "longer than zero",
    ),
    "hmac": ('[audit]\nbackend = "local"\nalgorithm = "HS256"\n', "audit.algorithm", "HS256"),
    "no-backend": ('[audit]\nalgorithm = "ES256"\n', "audit.backend", "required"),
    "not-a-table": ('audit = "local"\n', "audit", "table"),
}


@pytest.mark.parametrize(("toml", "field", "says"), BAD_AUDIT.values(), ids=BAD_AUDIT.keys())
@pytest.mark.parametrize("command", [("config", "check"), ("reconcile", "--at", T0)])
def test_bad_audit_config_is_one_line_exit_2(
    tmp_path: Path, toml: str, field: str, says: str, command: tuple[str, ...]
) -> None:
    h = init_home(tmp_path / "home")
    text = h.config.read_text()
    h.config.write_text(toml + "\n" + text if not toml.startswith("[") else text + "\n" + toml)
    before = h.files()
    proc = h.cli(*command)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"keymgr: error: {h.config}: {field}:"), lines[0]
    assert says in lines[0], lines[0]
    assert h.files() == before


def test_the_audit_ring_name_is_reserved(tmp_path: Path) -> None:
    h = init_home(tmp_path / "home")
    text = h.config.read_text().replace("[keyrings.default]", f"[keyrings.{AUDIT_RING}]")
    h.config.write_text(text)
    proc = h.cli("config", "check")
    assert proc.returncode == 2
    assert f"keyrings.{AUDIT_RING}: reserved" in proc.stderr, proc.stderr


def test_audit_keys_without_audit_config_is_a_usage_error(tmp_path: Path) -> None:
    h = init_home(tmp_path / "home")
    proc = h.cli("audit", "keys")
    assert proc.returncode == 2 and "[audit]" in proc.stderr, proc.stderr


def test_bad_pinned_keys_file_is_one_line_exit_2(
    templates: Callable[[str | None], Path], tmp_path: Path
) -> None:
    h = copy_of(templates, "ES256", tmp_path / "home")
    bad = tmp_path / "bad.jwks"
    for content in ("not json", '{"keys": []}', '{"keys": [{"kty": "OKP", "crv": "Ed25519"}]}'):
        bad.write_text(content)
        proc = h.cli("audit", "verify", "--keys", str(bad))
        assert proc.returncode == 2, proc
        assert len(proc.stderr.splitlines()) == 1 and str(bad) in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- units


def test_anchor_round_trip_and_old_documents() -> None:
    from datetime import UTC, datetime

    from keymgr.model import AuditAnchor

    old = {"seq": 3, "hash": "a" * 64, "outbox": []}
    assert AuditAnchor.from_dict(old).to_dict() == old  # unchanged bytes without [audit]
    a = AuditAnchor(
        seq=3,
        hash="a" * 64,
        key_kid="k2",
        key_alg="ES256",
        key_backend="local",
        key_since=datetime(2030, 1, 1, tzinfo=UTC),
        prev_kid="k1",
        prev_alg="EdDSA",
        prev_backend="kms",
    )
    assert AuditAnchor.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(ValueError):
        AuditAnchor.from_dict({**old, "key": {"kid": 1}})


@pytest.mark.parametrize(
    ("have", "recorded", "ok"),
    [
        ("active", "published", True),
        ("active", "retired", False),
        ("pending", "pending", True),
        ("destroyed", "revoked", True),
        ("revoked", "revoked", True),
        ("active", "revoked", False),
        ("revoked", "active", True),
        ("revoked", "destroyed", False),
        ("expired", "destroyed", False),
    ],
)
def test_key_event_order(have: str, recorded: str, ok: bool) -> None:
    from keymgr.audit import at_or_past

    assert at_or_past(have, recorded) is ok
