"""Issue "The promise under hostile conditions", reproduced through the CLI on
the embedded default (file store, file backend, file publisher), as a new user
would: drift of the published document, a publisher added mid-rotation, a
changed Cache-Control, a lost or mistyped state, a key injected into the state,
a malformed state, and a ring moved between backends.

Each test drives ``keymgr`` with ``--at`` and checks what verifiers would see
(the JWKS file, checked with jwcrypto, not keymgr's own code) and what is left
on disk. The S3 and Vault KV stores are driven the same way in
tests/test_hostile_stores.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from jwcrypto import jwk as jw_jwk
from jwcrypto import jwt as jw_jwt
from keymgr.backends.local.store import FileStore

from keymgr import docstore
from keymgr.audit import FileMedium
from keymgr.errors import AuditError, StoreError
from keymgr.model import Ring, State
from tests.conftest import T0, Home

P, A = timedelta(days=30), timedelta(hours=1)
SEC = timedelta(seconds=1)
RING = "default"


def at(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(home: Home, t: datetime, ok: bool = True) -> str:
    proc = home.run("reconcile", "--at", at(t), inproc=True)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def keys(home: Home, state: str | None = None) -> list[dict[str, Any]]:
    return [
        k
        for k in home.state()["rings"][RING]["keys"]
        if state is None or k["state"] == state
    ]


def served_kids(path: Path) -> set[str]:
    """The kids a verifier gets from the document, parsed by jwcrypto."""
    ks = jw_jwk.JWKSet.from_json(path.read_text())
    return {k["kid"] for k in ks["keys"]}


def key_files(home: Home) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((home.dir / "keys").rglob("*.key"))}


def one_error_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert "Traceback" not in out
    return lines[0]


@pytest.fixture
def rotating(home: Home) -> Home:
    """Bootstrapped at T0; at P - A the successor is generated and published."""
    reconcile(home, T0)
    home.before = home.jwks_path.read_bytes()  # type: ignore[attr-defined]
    out = reconcile(home, T0 + P - A)
    assert "key.published" in out and "key.promoted" not in out, out
    assert len(keys(home, "published")) == 1
    return home


# --------------------------------------------------------------------------- 1. drift


def test_reverted_jwks_is_republished_and_promotion_waits_A_again(rotating: Home) -> None:
    home = rotating
    successor = keys(home, "published")[0]["kid"]
    # Ten minutes before promotion a stale deploy puts the previous document back.
    home.jwks_path.write_bytes(home.before)  # type: ignore[attr-defined]
    assert successor not in served_kids(home.jwks_path)

    out = reconcile(home, T0 + P + SEC)
    assert "jwks.published" in out
    assert "key.promoted" not in out, "promoted in the pass that re-published"
    assert successor in served_kids(home.jwks_path)

    # A verifier that fetched the reverted document may cache it for A: the
    # successor signs only once the repaired document was served for A.
    out = reconcile(home, T0 + P + A)
    assert "key.promoted" not in out, out
    out = reconcile(home, T0 + P + SEC + A)
    assert f"key.promoted ring={RING} kid={successor}" in out, out


def test_deleted_jwks_also_restarts_the_wait(rotating: Home) -> None:
    home = rotating
    home.jwks_path.unlink()
    out = reconcile(home, T0 + P + SEC)
    assert "jwks.published" in out and "key.promoted" not in out
    assert "key.promoted" in reconcile(home, T0 + P + SEC + A)


@pytest.mark.parametrize("plant", ["fifo", "symlink", "device"])
def test_a_fifo_or_link_planted_at_the_jwks_is_replaced_never_read(
    rotating: Home, plant: str, tmp_path: Path
) -> None:
    """Whoever can write to the JWKS directory plants a FIFO at the JWKS
    name (reading it would hang the pass, and every pass after it), a
    symlink to a file elsewhere, or one to a device that never ends
    (/dev/zero). The pass reads none of them: the target counts as
    unreadable, the document is written over it (a regular file again) and
    the successor waits A from that confirmation, as after a revert."""
    home = rotating
    successor = keys(home, "published")[0]["kid"]
    home.jwks_path.unlink()
    if plant == "fifo":
        os.mkfifo(home.jwks_path)
    elif plant == "symlink":
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_bytes(home.before)  # type: ignore[attr-defined]
        home.jwks_path.symlink_to(elsewhere)
    else:
        home.jwks_path.symlink_to("/dev/zero")

    # A real process with a deadline: a pass that blocks fails the test.
    proc = home.run("reconcile", "--at", at(T0 + P + SEC), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "jwks.published" in proc.stdout and "key.promoted" not in proc.stdout, proc.stdout
    assert stat.S_ISREG(home.jwks_path.lstat().st_mode)
    assert successor in served_kids(home.jwks_path)
    if plant == "symlink":
        assert elsewhere.read_bytes() == home.before, "written through the link"  # type: ignore[attr-defined]
    assert "key.promoted" not in reconcile(home, T0 + P + A)
    assert f"key.promoted ring={RING} kid={successor}" in reconcile(home, T0 + P + SEC + A)


def test_publisher_added_mid_rotation_waits_A_from_its_first_confirmation(
    rotating: Home,
) -> None:
    home = rotating
    text = home.config.read_text()
    text = text.replace('publishers = ["site"]', 'publishers = ["site", "edge"]')
    text += '\n[publishers.edge]\ntype = "file"\npath = "edge/jwks.json"\n'
    home.config.write_text(text)

    out = reconcile(home, T0 + P + SEC)
    assert "publisher=edge" in out and "key.promoted" not in out, out
    edge = home.dir / "edge" / "jwks.json"
    assert keys(home, "published")[0]["kid"] in served_kids(edge)
    assert "key.promoted" not in reconcile(home, T0 + P + A)
    assert "key.promoted" in reconcile(home, T0 + P + SEC + A)


def test_cache_control_change_is_pushed_and_counts_as_a_new_document(rotating: Home) -> None:
    home = rotating
    rec = home.state()["publishers"]["site"]
    text = home.config.read_text().replace(
        'path = "public/.well-known/jwks.json"',
        'path = "public/.well-known/jwks.json"\ncache_control = "public, max-age=600"',
    )
    home.config.write_text(text)
    out = reconcile(home, T0 + P + SEC)
    assert "jwks.published" in out and "publisher=site" in out, out
    assert "key.promoted" not in out
    assert home.state()["publishers"]["site"]["sha256"] != rec["sha256"]
    assert "key.promoted" in reconcile(home, T0 + P + SEC + A)


def test_unchanged_world_promotes_on_schedule(rotating: Home) -> None:
    """The control: without drift, promotion is at activated + P exactly."""
    out = reconcile(rotating, T0 + P)
    assert "key.promoted" in out, out


# --------------------------------------------------------------------------- 2. state loss


#: The read-only views of the state, and ``sign``, which reads the active key
#: from it: each refuses a state the audit log contradicts.
_VIEWS = (("status",), ("status", "--json"), ("status", "--timeline", "-"), ("plan",),
          ("plan", "--at", at(T0 + 3 * P)), ("sign", RING, "--claims", "{}"))


def _rotated_twice(home: Home) -> None:
    reconcile(home, T0)
    for n in (1, 2):
        reconcile(home, T0 + n * P - A)
        reconcile(home, T0 + n * P)
    assert len(keys(home, "active")) == 1 and len(keys(home, "retired")) >= 1


@pytest.mark.parametrize("how", ["moved", "mistyped"])
def test_lost_state_is_refused_and_nothing_is_destroyed(home: Home, how: str) -> None:
    _rotated_twice(home)
    signer = keys(home, "active")[0]["kid"]
    files, jwks_before = key_files(home), home.jwks_path.read_bytes()
    if how == "moved":
        shutil.move(home.dir / "state.json", home.dir / "state.json.bak")
    else:
        # The state line with or without ?shards= (KEYMGR_TEST_SHARDS).
        text = home.config.read_text()
        assert '"file:state.json' in text
        home.config.write_text(text.replace('"file:state.json', '"file:stat.json', 1))

    proc = home.run("reconcile", "--at", at(T0 + 2 * P + SEC), inproc=True)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "state" in line
    for view in _VIEWS:  # no ring shown as keyless: the log holds their events
        proc = home.run(*view, inproc=True)
        assert proc.returncode == 1 and proc.stdout == "", (view, proc.stdout)
        line = one_error_line(proc.stderr)
        assert "state anchors none (a new or replaced state)" in line, (view, line)
    assert key_files(home) == files, "a key was destroyed or added"
    assert home.jwks_path.read_bytes() == jwks_before, "the JWKS lost the signer"
    assert signer in served_kids(home.jwks_path)
    assert not (home.dir / "state.json").exists() or how == "mistyped"
    assert not (home.dir / "stat.json").exists()


def test_a_state_put_back_from_an_older_copy_is_refused_by_every_view(home: Home) -> None:
    """An older state document put back (a restored backup) reads as a sound
    state, its old key still active; ``reconcile`` refuses it because the
    audit log went on past its anchor, and so do ``status`` and ``plan``,
    in the same one line, instead of showing the old keys as the truth.
    They write nothing: the state, the log and the JWKS are left as evidence."""
    reconcile(home, T0)
    reconcile(home, T0 + P - A)
    older = (home.dir / "state.json").read_bytes()
    for view in _VIEWS:
        assert home.run(*view, inproc=True).returncode == 0, view
    out = reconcile(home, T0 + P)
    assert "key.promoted" in out, out
    (home.dir / "state.json").write_bytes(older)
    log = home.dir / "audit.jsonl"
    kept = (older, log.read_bytes(), home.jwks_path.read_bytes(), key_files(home))

    for view in _VIEWS:
        proc = home.run(*view, inproc=True)
        assert proc.returncode == 1, (view, proc.stdout)
        line = one_error_line(proc.stderr)
        assert str(log) in line and "state anchors seq" in line, line
        assert proc.stdout == "", (view, "printed the rolled-back state")
    line = one_error_line(reconcile(home, T0 + P + SEC, ok=False))
    assert "state anchors seq" in line, line
    now = ((home.dir / "state.json").read_bytes(), log.read_bytes(),
           home.jwks_path.read_bytes(), key_files(home))  # fmt: skip
    assert now == kept, "a view or the refused pass wrote something"


def test_a_state_read_just_before_another_process_commits_is_not_refused(home: Home) -> None:
    """``sign``, ``status`` and the daemon's heartbeat read the state, then
    the log's end, without the pass lock: a pass of another process may
    commit and append in between, leaving the log ahead of the state just
    read. That is no rollback (the store anchors those events now), and no
    refusal; a state put back is still refused, as the store anchors less."""
    from keymgr.errors import AuditError
    from keymgr.manager import KeyManager

    reconcile(home, T0)
    older = (home.dir / "state.json").read_bytes()
    m = KeyManager.from_config(home.config)
    read_before = m.state()
    assert "key.published" in reconcile(home, T0 + P - A)  # another process
    m.audit.check_current(read_before)
    m.audit.check_agrees(read_before)
    (home.dir / "state.json").write_bytes(older)
    with pytest.raises(AuditError, match="state anchors seq"):
        m.audit.check_current(m.state())
    with pytest.raises(AuditError, match="state anchors seq"):
        m.audit.check_agrees(m.state())


def test_views_show_a_state_whose_events_the_log_does_not_hold_yet(home: Home) -> None:
    """The other side: a crash between the state commit and the log append
    leaves the log behind the anchor, with the missing events in the state's
    outbox. That is no contradiction: the views show the state and append
    nothing (the next pass does)."""
    reconcile(home, T0)
    out = reconcile(home, T0 + P - A)
    assert "key.published" in out, out
    log = home.dir / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    outbox = home.state()["audit"]["outbox"]
    assert outbox and len(lines) > len(outbox)
    cut = b"".join(lines[: len(lines) - len(outbox)])
    log.write_bytes(cut)

    for view in _VIEWS:
        proc = home.run(*view, inproc=True)
        assert proc.returncode == 0, (view, proc.stderr)
        assert log.read_bytes() == cut, (view, "a view appended to the log")
    assert home.run("audit", "verify", inproc=True).returncode != 0
    reconcile(home, T0 + P - A + SEC)
    assert log.read_bytes().startswith(b"".join(lines))
    assert home.run("audit", "verify", inproc=True).returncode == 0


@pytest.mark.parametrize("damage", ["deleted", "truncated", "edited", "garbage"])
def test_sign_goes_on_when_only_the_log_is_lost_or_damaged(home: Home, damage: str) -> None:
    """The other side of sign's check: a log that is missing, cut short or
    damaged is no sign that the state is stale (events past its anchor are).
    The state is right, so tokens go on, signed by the active key (checked by
    jwcrypto against the JWKS), while the pass and ``status`` refuse to go on
    with that log; nothing is written."""
    _rotated_twice(home)
    active = keys(home, "active")[0]["kid"]
    log = home.dir / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    if damage == "deleted":
        log.unlink()
    elif damage == "truncated":  # more than the state's outbox holds (that is repaired)
        log.write_bytes(b"".join(lines[: -len(home.state()["audit"]["outbox"]) - 2]))
    elif damage == "edited":
        last = json.loads(lines[-1])
        last["ts"] = "2001-01-01T00:00:00Z"
        log.write_bytes(b"".join(lines[:-1]) + json.dumps(last).encode() + b"\n")
    else:
        log.write_bytes(b"".join(lines) + b"not an event\n")
    files = sorted(p for p in home.dir.rglob("*") if p.is_file())
    kept = {p: p.read_bytes() for p in files}

    proc = home.run("sign", RING, "--claims", '{"sub": "a"}', inproc=True)
    assert proc.returncode == 0, proc.stderr
    token = jw_jwt.JWT(jwt=proc.stdout.strip(), key=jw_jwk.JWKSet.from_json(
        home.jwks_path.read_text()), algs=["ES256"])  # fmt: skip
    assert json.loads(token.header)["kid"] == active
    assert json.loads(token.claims) == {"sub": "a"}
    line = one_error_line(reconcile(home, T0 + 2 * P + SEC, ok=False))
    assert str(log) in line, line
    assert home.run("status", inproc=True).returncode == 1
    assert sorted(p for p in home.dir.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == data for p, data in kept.items()), "something was written"


def test_lost_state_with_no_audit_log_names_ring_count_and_adopt(home: Home) -> None:
    """With the old log moved aside too (a fresh start), the backend check is
    what refuses: it names the ring, the count of unknown keys and the fix;
    ``keymgr adopt`` then takes the keys over, audited, and the ring goes on
    signing with its old signer (no verifier rejects anything)."""
    _rotated_twice(home)
    signer = keys(home, "active")[0]["kid"]
    retired = [k["kid"] for k in keys(home) if k["state"] == "retired"]
    expired = [k["kid"] for k in keys(home) if k["state"] == "expired"]
    others = retired + expired
    files = key_files(home)
    shutil.move(home.dir / "state.json", home.dir / "state.json.bak")
    shutil.move(home.dir / "audit.jsonl", home.dir / "audit.jsonl.old")

    proc = home.run("reconcile", "--at", at(T0 + 2 * P + SEC), inproc=True)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert f"ring {RING}" in line and f"{len(files)} keymgr key(s)" in line, line
    assert "keymgr adopt" in line
    assert key_files(home) == files

    t = T0 + 2 * P + 2 * SEC
    proc = home.run("adopt", RING, signer, "--as", "active", "--at", at(t), inproc=True)
    assert proc.returncode == 0, proc.stderr
    # Until every key the backend holds is adopted, a pass still refuses.
    if others:
        proc = home.run("reconcile", "--at", at(t), inproc=True)
        assert proc.returncode == 1 and "keymgr adopt" in proc.stderr, proc.stderr
    for kid, as_state in [*((k, "retired") for k in retired), *((k, "expired") for k in expired)]:
        proc = home.run("adopt", RING, kid, "--as", as_state, "--at", at(t), inproc=True)
        assert proc.returncode == 0, proc.stderr
    assert keys(home, "active")[0]["kid"] == signer
    reconcile(home, t)
    assert served_kids(home.jwks_path) >= {signer, *retired}
    events = [json.loads(ln) for ln in (home.dir / "audit.jsonl").read_text().splitlines()]
    adopted = [e for e in events if e["event"] == "key.adopted"]
    assert {e["kid"] for e in adopted} == {signer, *others}
    assert all(e["actor"].startswith("cli:") for e in adopted)
    assert home.run("audit", "verify", inproc=True).returncode == 0


def test_adopt_refuses_a_key_the_backend_does_not_hold(home: Home) -> None:
    reconcile(home, T0)
    proc = home.run("adopt", RING, "A" * 43, "--as", "retired", inproc=True)
    assert proc.returncode == 2
    assert "holds no keymgr key" in one_error_line(proc.stderr)


def test_crash_orphan_matching_the_intent_is_still_adopted(home: Home) -> None:
    """The write-ahead intent distinguishes a crash orphan from an unknown key:
    a key generated after the intent commit but never recorded is adopted."""
    from keymgr.manager import KeyManager

    reconcile(home, T0)
    m = KeyManager.from_config(home.config)
    state = m.state()
    intent = state.intents.get(RING)
    assert intent is None, "intents are closed once the key is recorded"
    # Simulate the crash: an intent committed, a key made with it, no record.
    from keymgr import transitions

    with m.store.exclusive():
        st, token = m.reconciler.load()
        st = transitions.open_intent(st, RING, "0123456789abcdef", "local", "ES256", T0 + P - A)
        m.reconciler.commit(st, [], token)
    orphan = m.config.backends["local"].generate(RING, "ES256", intent="0123456789abcdef")
    out = reconcile(home, T0 + P - A)
    assert f"key.adopted ring={RING} kid={orphan.kid}" in out, out
    assert RING not in home.state().get("intents", {})


# --------------------------------------------------------------------------- 3. injection


def _foreign_key_entry(state: str) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from keymgr import jose

    pub = jose.public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    return {
        "kid": jose.thumbprint(pub),
        "alg": "ES256",
        "backend": "local",
        "state": state,
        "created_at": "2031-03-01T08:00:00Z",
        "published_at": "2031-03-01T08:00:00Z" if state != "pending" else None,
        "activated_at": None,
        "retired_at": None,
        "expired_at": None,
        "destroyed_at": None,
        "revoked_at": None,
        "reason": None,
        "public_jwk": pub,
    }


@pytest.mark.parametrize("state", ["pending", "published"])
def test_injected_key_is_never_published(home: Home, state: str) -> None:
    reconcile(home, T0)
    doc = home.state()
    entry = _foreign_key_entry(state)
    doc["rings"][RING]["keys"].append(entry)
    raw = json.dumps(doc, indent=1).encode()
    (home.dir / "state.json").write_bytes(raw)
    jwks_before = home.jwks_path.read_bytes()

    proc = home.run("reconcile", "--at", at(T0 + timedelta(hours=2)), inproc=True)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert entry["kid"] in line and "does not hold this key" in line, line
    assert entry["kid"] not in served_kids(home.jwks_path)
    assert home.jwks_path.read_bytes() == jwks_before
    assert (home.dir / "state.json").read_bytes() == raw, "refused, yet committed"


def test_deleted_retired_entry_is_refused_while_the_jwks_cannot_be_read(rotating: Home) -> None:
    """A state without the entry of a retired key, while the JWKS target cannot
    be read: the publisher's record still says it serves that kid, so the
    publish is refused as when the kid is seen served, before anything is
    written (found by the model test with a publisher down; the CLI refuses
    such an edit earlier, through the audit outbox, while it is still there)."""
    from dataclasses import replace

    from keymgr.errors import StateError
    from keymgr.manager import KeyManager
    from keymgr.planner import Publish

    home = rotating
    out = reconcile(home, T0 + P + SEC)
    assert "key.promoted" in out, out
    retired = keys(home, "retired")[0]["kid"]
    m = KeyManager.from_config(home.config)
    state = m.state()
    ring = state.rings[RING]
    edited = replace(
        state,
        rings={**state.rings, RING: replace(ring, keys=tuple(k for k in ring.keys
                                                            if k.kid != retired))},
    )
    (publisher,) = m.config.policies[RING].publishers
    assert retired in edited.publishers[publisher].kids
    served = home.jwks_path.read_bytes()
    home.jwks_path.unlink()
    home.jwks_path.mkdir()  # a target that cannot be read
    with pytest.raises(StateError) as info:
        m.reconciler.vet(edited, [Publish(publisher)])
    assert retired in str(info.value) and "does not record" in str(info.value)
    home.jwks_path.rmdir()
    home.jwks_path.write_bytes(served)
    with pytest.raises(StateError) as info:  # readable: the kid is seen served
        m.reconciler.vet(edited, [Publish(publisher)])
    assert retired in str(info.value)
    m.close()


def test_key_entry_with_a_foreign_public_key_under_our_kid_is_refused(home: Home) -> None:
    """The kid is checked against public_jwk (schema) before anything else."""
    reconcile(home, T0)
    doc = home.state()
    doc["rings"][RING]["keys"][0]["public_jwk"] = _foreign_key_entry("active")["public_jwk"]
    (home.dir / "state.json").write_text(json.dumps(doc))
    proc = home.run("status", inproc=True)
    assert proc.returncode == 1
    assert "thumbprint" in one_error_line(proc.stderr)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda k: k.update(created_at="yesterday"), "corrupt state"),
        (lambda k: k.update(state="sleeping"), "unknown state"),
        (lambda k: k.update(activated_at=None), "activated_at: required"),
        (lambda k: k.update(published_at="2020-01-01T00:00:00Z"), "published_at is before"),
        (lambda k: k.update(alg="HS256"), "HS256"),
        (lambda k: k["public_jwk"].update(d="c2VjcmV0"), "unexpected member(s) d"),
        # Wrong types and shapes take the loader's and validator's fast paths
        # for sound entries; each still gets its own message.
        (lambda k: k.update(alg=["ES256"]), "is not a supported JWS algorithm"),
        (lambda k: k.update(backend=7), "kid and backend must be non-empty strings"),
        (lambda k: k.update(state=["active"]), "unknown state"),
        (lambda k: k["public_jwk"].pop("y"), "missing member(s) y"),
        (lambda k: k["public_jwk"].update(y=3), "must be an object of string members"),
        (lambda k: k["public_jwk"].update(x=k["public_jwk"]["x"] + "AAAA"), "x is not 32 bytes"),
        # 32 bytes take 43 characters whose last carries 2 unused bits: "B" sets one.
        (lambda k: k["public_jwk"].update(x=k["public_jwk"]["x"][:-1] + "B"), "not valid base64"),
    ],
)
def test_malformed_state_is_one_line_and_exit_1(home: Home, edit: Any, words: str) -> None:
    reconcile(home, T0)
    doc = home.state()
    edit(doc["rings"][RING]["keys"][0])
    raw = json.dumps(doc).encode()
    (home.dir / "state.json").write_bytes(raw)
    for cmd in (("reconcile", "--at", at(T0 + SEC)), ("status",), ("sign", RING, "--claims", "{}")):
        proc = home.run(*cmd, inproc=True)
        assert proc.returncode == 1, (cmd, proc.stdout, proc.stderr)
        assert words in one_error_line(proc.stderr), proc.stderr
    assert (home.dir / "state.json").read_bytes() == raw


#: What each command does when something is planted at one of keymgr's own
#: files: the exit code, and the words of its one line (None: it goes on,
#: because it does not need that file, or, for sign and the audit log, on
#: purpose: a damaged log stops the passes, not token issuance).
_PLANTED: dict[str, dict[str, tuple[int, str | None]]] = {
    "state": {c: (1, "state.json: cannot read: is not a regular file")
              for c in ("reconcile", "status", "sign")},
    "audit log": {
        "reconcile": (1, "audit.jsonl: is not a regular file"),
        "status": (1, "audit.jsonl: is not a regular file"),
        "sign": (0, None),
    },
    "key file": {
        "reconcile": (0, None),
        "status": (0, None),
        "sign": (1, "is not a regular file"),
    },
    "config": {c: (2, "keymgr.toml: cannot read config: is not a regular file")
               for c in ("reconcile", "status", "sign")},
}


@pytest.mark.parametrize("plant", ["fifo", "device", "directory"])
@pytest.mark.parametrize("target", list(_PLANTED))
def test_what_is_planted_at_keymgrs_own_files_is_refused_never_waited_on(
    home: Home, target: str, plant: str
) -> None:
    """Whoever can write to keymgr's directories replaces its state, its
    audit log, a key file or its config by a FIFO (opening one to read waits
    for a writer: every pass, and the daemon with it, would hang for good),
    a link to a device that never ends (/dev/zero, read until memory runs
    out) or a directory. Each command that needs the file refuses it in one
    line, at once, naming it; nothing is written; with the file put back,
    everything works as before."""
    reconcile(home, T0)
    path = {
        "state": home.dir / "state.json",
        "audit log": home.dir / "audit.jsonl",
        "key file": next((home.dir / "keys").rglob("*.key")),
        "config": home.config,
    }[target]
    kept = path.read_bytes()
    before = home.files()
    path.unlink()
    if plant == "fifo":
        os.mkfifo(path)
    elif plant == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    commands = {
        "reconcile": ("reconcile", "--at", at(T0 + SEC)),
        "status": ("status",),
        "sign": ("sign", RING, "--claims", "{}"),
    }
    for name, (code, words) in _PLANTED[target].items():
        # A real process with a deadline: one that waits fails the test.
        proc = home.run(*commands[name], timeout=30)
        assert proc.returncode == code, (name, proc.stdout, proc.stderr)
        if words is not None:
            line = one_error_line(proc.stderr)
            assert words in line and path.name in line, (name, line)
    if plant == "directory":
        path.rmdir()
    else:
        path.unlink()
    path.write_bytes(kept)
    assert home.files() == before, "something was written while the file was planted"
    assert home.run("status", inproc=True).returncode == 0
    token = home.run("sign", RING, "--claims", "{}", inproc=True, check=True).stdout.strip()
    jw_jwt.JWT(jwt=token, key=jw_jwk.JWKSet.from_json(home.jwks_path.read_text()))
    assert reconcile(home, T0 + P - A).count("key.published") == 1


def test_a_daemon_whose_state_becomes_a_fifo_keeps_running_and_recovers(
    home: Home, launcher: Any
) -> None:
    """``keymgr run`` while a FIFO replaces its state: before, the next pass
    opened it and waited for a writer, for good (no pass, no heartbeat, no
    alert but silence). Now each pass fails in one log line naming the
    state, /readyz says why while /healthz stays up (restarting would not
    help), and once the state is put back the daemon goes on by itself."""
    from tests.test_daemon import fast_home, get, wait_for

    fast_home(home)
    d = launcher.start(home)
    d.ready()
    state = home.dir / "state.json"
    kept = state.read_bytes()
    state.unlink()
    os.mkfifo(state)

    words = "state.json: cannot read: is not a regular file"

    def refused() -> list[dict[str, Any]]:
        return [ln for ln in d.events("reconcile.failed") if words in str(ln.get("error"))]

    wait_for(lambda: d.alive_or_fail() and len(refused()) >= 2, 30, "passes refusing the FIFO")
    code, body = get(d.port, "/readyz")
    assert code == 503 and "is not a regular file" in body, body
    assert get(d.port, "/healthz")[0] == 200
    state.unlink()
    state.write_bytes(kept)
    d.ready(timeout=30)
    rc, _ = d.stop()
    assert rc == 0
    assert home.run("audit", "verify", inproc=True).returncode == 0


def test_a_fifo_at_the_lease_or_a_shard_is_refused_not_waited_on(tmp_path: Path) -> None:
    """The daemon's lease file and the shards of a sharded file state, each
    replaced by a FIFO: the read fails at once, in one line naming it."""
    path = tmp_path / "state.json"
    store = FileStore(path, shards="on")
    os.mkfifo(path.with_name("state.json.lease"))
    store.commit(State(rings={RING: Ring(RING)}), 0)
    shard = next(p for p in path.with_name("state.json.shards").iterdir()
                 if not p.name.startswith("m-"))  # fmt: skip
    shard.unlink()
    os.mkfifo(shard)
    pool = ThreadPoolExecutor(2)  # a call that waits fails the test instead of hanging it
    try:
        for call, words in ((store.read_lease, "state.json.lease: unreadable (is not a regular"),
                            (FileStore(path).load, f"{shard.name}: is not a regular file")):
            with pytest.raises(StoreError) as err:
                pool.submit(call).result(timeout=20)
            assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_an_audit_log_ending_in_gigabytes_without_a_newline_is_refused_unread(
    home: Home,
) -> None:
    """Whoever can write the audit log appends 4 GiB of zeros (a sparse file:
    no disk used) with no newline. Every pass reads the log's end: before,
    it doubled its read until it held a whole line, that is all 4 GiB.
    Now a pass, ``status`` and ``audit verify`` stop at
    ``keymgr.audit.MAX_LINE`` and refuse it in one line."""
    reconcile(home, T0)
    log = home.dir / "audit.jsonl"
    size = log.stat().st_size
    os.truncate(log, size + (4 << 30))
    for cmd, words in (
        (("reconcile", "--at", at(T0 + SEC)), "last lines are longer than 16777216 bytes"),
        (("status",), "last lines are longer than 16777216 bytes"),
        (("audit", "verify"), "longer than 16777216 bytes: not an audit event"),
    ):
        proc = home.run(*cmd, timeout=60)
        assert proc.returncode == 1, (cmd, proc.stdout, proc.stderr)
        assert words in one_error_line(proc.stderr), proc.stderr
    # Nor is it cut as if it were our own torn append (which once read the
    # whole file to find the last newline).
    with pytest.raises(AuditError, match="not an interrupted append of keymgr"):
        FileMedium(log).repair()
    assert log.stat().st_size == size + (4 << 30)
    os.truncate(log, size)
    assert home.run("audit", "verify", inproc=True).returncode == 0


def test_a_state_or_shard_larger_than_keymgr_writes_is_refused_unread(tmp_path: Path) -> None:
    """The file store: a state document or a shard larger than keymgr ever
    writes there (the limits made small here) is refused in one line before
    it is read, and keymgr refuses to write a state document it would not
    read back."""
    state = State(rings={RING: Ring(RING)})
    path = tmp_path / "state.json"
    FileStore(path, shards="off").commit(state, 0)
    size = path.stat().st_size
    with patch.object(docstore, "MAX_STATE_READ", size - 1):
        with pytest.raises(StoreError) as err:
            FileStore(path).load()
        assert f"holds {size} bytes, more than the {size - 1}" in str(err.value), err.value
        fresh = tmp_path / "fresh.json"
        with pytest.raises(StoreError, match=r"more than the \d+ keymgr reads back"):
            FileStore(fresh, shards="off").commit(state, 0)
        assert not fresh.exists()
    assert FileStore(path).load()[0] == state

    sharded = tmp_path / "sharded.json"
    FileStore(sharded, shards="on").commit(state, 0)
    with patch.object(docstore, "MAX_PIECE_READ", 64), pytest.raises(StoreError) as err:
        FileStore(sharded).load()
    assert "sharded.json.shards/" in str(err.value), err.value
    assert "keymgr writes there at most; not reading it" in str(err.value), err.value
    assert FileStore(sharded).load()[0] == state


def test_a_giant_state_or_key_file_is_refused_unread(home: Home) -> None:
    """The state file and a key file grown to 2 GiB (sparse: no disk used):
    each is refused in one line before it is read, instead of being read
    whole into memory by every command."""
    reconcile(home, T0)
    giant = 2 << 30
    for path, cmd, limit in (
        (home.dir / "state.json", ("status",), docstore.MAX_STATE_READ),
        (next((home.dir / "keys").rglob("*.key")), ("sign", RING, "--claims", "{}"), 1 << 20),
    ):
        size = path.stat().st_size
        os.truncate(path, giant)
        proc = home.run(*cmd, timeout=60)
        assert proc.returncode == 1, (cmd, proc.stdout, proc.stderr)
        line = one_error_line(proc.stderr)
        assert path.name in line and f"holds {giant} bytes, more than the {limit}" in line, line
        os.truncate(path, size)
    assert home.run("sign", RING, "--claims", "{}", inproc=True).returncode == 0


# --------------------------------------------------------------------------- 5. backends


def test_ring_moved_to_another_backend_keeps_old_keys_where_they_are(home: Home) -> None:
    reconcile(home, T0)
    old = keys(home, "active")[0]["kid"]
    text = home.config.read_text()
    text = text.replace('backend = "local"', 'backend = "second"')
    text += '\n[backends.second]\ntype = "file"\npath = "keys2"\nmaster_key_file = "master2.key"\n'
    home.config.write_text(text)
    second = home.dir / "master2.key"
    second.write_bytes((home.dir / "master.key").read_bytes().swapcase())
    second.chmod(0o600)
    reconcile(home, T0 + P - A)
    new = keys(home, "published")[0]
    assert new["backend"] == "second" and keys(home, "active")[0]["backend"] == "local"
    reconcile(home, T0 + P)
    assert keys(home, "active")[0]["kid"] == new["kid"]
    assert {old, new["kid"]} <= served_kids(home.jwks_path)

    # Removing the old backend while its key still lives is named, not a traceback.
    text = home.config.read_text()
    start = text.index("[backends.local]")
    end = text.index("[", start + 1)
    home.config.write_text(text[:start] + text[end:])
    for cmd in (("reconcile", "--at", at(T0 + P + SEC)), ("config", "check")):
        proc = home.run(*cmd, inproc=True)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        line = one_error_line(proc.stderr)
        assert "backends.local" in line and old in line, line


def test_sign_with_a_removed_backend_is_one_line(home: Home) -> None:
    reconcile(home, T0)
    text = home.config.read_text().replace('backend = "local"', 'backend = "second"')
    text = text.replace("[backends.local]", "[backends.second]")
    home.config.write_text(text)
    proc = home.run("sign", RING, "--claims", "{}", inproc=True)
    assert proc.returncode != 0
    assert "backend" in one_error_line(proc.stderr) and "local" in proc.stderr
