"""Crash safety: a real SIGKILL at every crash point, then repair and carry on.

A ring with short periods is driven through one full rotation (bootstrap,
successor generated and published, promoted, old key expired, old key
destroyed) by ``keymgr reconcile --at T``, one step per due time. Each test is
one crash point NAME and one N: every step that reaches NAME at least N times
runs with ``KEYMGR_CRASH_AT=NAME:N`` and must die by SIGKILL; the same
``reconcile --at T`` without it is the repair, and the scenario goes on to the
end. After every step (repaired or not) the invariants are checked: exactly one
active key, the ring in the same states as a crash-free run, every live key has
its file and signs (verified by PyJWT), no orphan key file (an interrupted
generate is adopted or destroyed, with its audit event), one audit event per
key transition, the audit chain verifies and reaches the state's anchor, and
the JWKS holds exactly the expected public keys. At the end the same goes
through the real CLI: ``keymgr audit verify`` and ``keymgr sign``.

How often each step reaches each crash point is measured once per worker on a
crash-free run (the CLI under a wrapper that counts ``crashpoint()`` calls),
so every (step, N) that exists is crashed and none is guessed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from jwcrypto import jwk as jwc_jwk

from tests.conftest import REPO, Home, shard_state

RING = "default"
ALG = "ES256"
POLICY = {
    "rotation_period": "10d",
    "publish_ahead": "1h",
    "retire_grace": "1d",
    "destroy_after": "1d",
}
A, G, D = timedelta(hours=1), timedelta(days=1), timedelta(days=1)
PYCACHE = Path(tempfile.gettempdir()) / f"keymgr-tests-pycache-{os.getuid()}"


@dataclass(frozen=True)
class Step:
    at: str
    #: Key states in state order (creation order) once the step completed.
    shape: tuple[str, ...]


STEPS = (
    Step("2030-01-01T00:00:00Z", ("active",)),  # bootstrap: generate, publish, promote
    Step("2030-01-10T23:00:00Z", ("active", "published")),  # successor at P - A
    Step("2030-01-11T00:00:00Z", ("retired", "active")),  # promotion at P
    Step("2030-01-12T00:00:00Z", ("expired", "active")),  # + G: leaves the JWKS
    Step("2030-01-13T00:00:00Z", ("destroyed", "active")),  # + D: destroyed
)

#: Every crash point, with the highest N the scenario reaches in one step (measured
#: by ``golden``; the highest N listed here also covers any larger N that appears).
MAX_N = {
    "fs.before_rename": 5,
    "store.before_write": 4,
    "store.after_write": 4,
    "reconcile.after_commit": 4,
    "audit.mid_append": 4,
    "audit.before_flush": 4,
    "publish.after_write": 1,
    "publish.before_commit": 1,
    "generate.after_backend": 1,
    "destroy.after_backend": 1,
}
CASES = [(point, n) for point, top in MAX_N.items() for n in range(1, top + 1)]
#: Crash points only a sharded commit reaches (docs/scale.md): crashed, with
#: the store.* ones above, on sharded state by tests/test_shards.py.
SHARDED_ONLY = {"store.shards_written", "store.before_gc"}

IN_JWKS = {"pending", "published", "active", "retired"}
HAS_PRIVATE = IN_JWKS | {"expired", "revoked"}
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
#: Key-state time field -> the audit event that records reaching it.
TRANSITIONS = {
    "published_at": "key.published",
    "activated_at": "key.promoted",
    "retired_at": "key.retired",
    "expired_at": "key.expired",
    "destroyed_at": "key.destroyed",
    "revoked_at": "key.revoked",
}

# Runs the real CLI with crashpoint() replaced by a counter (patched before any
# module that uses it is imported, since they bind it by name).
_COUNTING_CLI = """
import sys
import keymgr.faults
hits = open(sys.argv.pop(1), "a")
def crashpoint(name):
    hits.write(name + "\\n")
    hits.flush()
keymgr.faults.crashpoint = crashpoint
from keymgr.cli import main
sys.exit(main())
"""


# --------------------------------------------------------------------------- helpers


def cli_env(home: Home, **extra: str) -> dict[str, str]:
    """The CLI's environment, with bytecode cached outside the tree (start-up cost)."""
    env = home.env(PYTHONPYCACHEPREFIX=str(PYCACHE), **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run(home: Home, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = home.run(*args, env=cli_env(home, **env))
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert "-----BEGIN" not in out, out
    assert master_key_text(home) not in out
    return proc


def reconcile(home: Home, at: str, **env: str) -> subprocess.CompletedProcess:
    return run(home, "reconcile", "--at", at, **env)


def master_key_text(home: Home) -> str:
    return (home.dir / "master.key").read_text().strip()


def parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def audit_events(home: Home) -> list[dict[str, Any]]:
    path = home.dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def key_files(home: Home) -> set[str]:
    ring_dir = home.dir / "keys" / RING
    if not ring_dir.is_dir():
        return set()
    return {p.name[: -len(".key")] for p in ring_dir.glob("*.key")}


def copy_home(src: Path, dst: Path) -> Home:
    shutil.copytree(src, dst, symlinks=True)
    return Home(dst)


# --------------------------------------------------------------------------- golden run


@dataclass
class Golden:
    #: The home made by ``keymgr init`` with the short policy, before any reconcile.
    fresh: Path
    #: hits[i][name]: how often step i reaches crash point ``name``.
    hits: list[Counter[str]]


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    """Per worker: a fresh home, and a crash-free run that counts crash point hits."""
    base = tmp_path_factory.mktemp("golden")
    fresh = base / "fresh"
    subprocess.run(
        [sys.executable, "-m", "keymgr.cli", "init", "--dir", str(fresh)],
        check=True,
        capture_output=True,
    )
    Home(fresh).set_ring(RING, algorithm=ALG, **POLICY)
    shard_state(Home(fresh).config)  # KEYMGR_TEST_SHARDS=on: the same on sharded state
    home = copy_home(fresh, base / "counted")
    hits = []
    for i, step in enumerate(STEPS):
        count_file = base / f"hits-{i}"
        args = ["--config", str(home.config), "reconcile", "--at", step.at]
        proc = subprocess.run(
            [sys.executable, "-c", _COUNTING_CLI, str(count_file), *args],
            capture_output=True,
            text=True,
            cwd=home.dir,
            env=cli_env(home),
        )
        assert proc.returncode == 0, proc.stderr
        hits.append(Counter(count_file.read_text().split()) if count_file.exists() else Counter())
    return Golden(fresh, hits)


# --------------------------------------------------------------------------- invariants


def check_files_parse(home: Home) -> None:
    """Right after a crash: atomic writes left whole documents, never torn ones."""
    state = home.dir / "state.json"
    if state.exists():
        json.loads(state.read_text())
    if home.jwks_path.exists():
        json.loads(home.jwks_path.read_text())


def check_invariants(home: Home, step: int, crashed_at: str | None, cli: bool) -> None:
    """Everything that must hold once step ``step`` completed (after any repair)."""
    state = home.state()
    keys = state["rings"][RING]["keys"]
    by_kid = {k["kid"]: k for k in keys}

    # The ring went exactly where the crash-free run goes.
    assert tuple(k["state"] for k in keys) == STEPS[step].shape, keys
    # Invariant 1: exactly one active key once bootstrapped.
    active = [k for k in keys if k["state"] == "active"]
    assert len(active) == 1, keys

    # Timing invariants 2-4, on the recorded times.
    for i, k in enumerate(keys):
        if k["activated_at"] and i > 0:
            assert parse_time(k["activated_at"]) >= parse_time(k["published_at"]) + A, k
        if k["expired_at"]:
            assert parse_time(k["expired_at"]) >= parse_time(k["retired_at"]) + G, k
        if k["destroyed_at"]:
            assert parse_time(k["destroyed_at"]) >= parse_time(k["expired_at"]) + D, k

    # Key files: exactly the keys state says still exist (no orphan, none lost).
    live = {k["kid"] for k in keys if k["state"] in HAS_PRIVATE}
    assert key_files(home) == live, (key_files(home), live)

    # JWKS: valid JSON, exactly the keys that belong in it, public members only.
    doc = home.jwks()
    jwks_kids = [j["kid"] for j in doc["keys"]]
    assert sorted(jwks_kids) == jwks_kids
    assert set(jwks_kids) == {k["kid"] for k in keys if k["state"] in IN_JWKS}
    assert set(state["publishers"]["site"]["kids"]) == set(jwks_kids)
    for j in doc["keys"]:
        assert not PRIVATE_MEMBERS & set(j), j
        assert set(j) == {"kty", "crv", "x", "y", "kid", "alg", "use"}, j
        assert (j["kty"], j["crv"], j["alg"], j["use"]) == ("EC", "P-256", ALG, "sig")
        assert jwc_jwk.JWK(**j).thumbprint() == j["kid"]
        assert {m: j[m] for m in ("kty", "crv", "x", "y")} == by_kid[j["kid"]]["public_jwk"]

    # Every live key can still sign, verified by PyJWT against its published key.
    backend = _backend(home)
    published = {j["kid"]: j for j in doc["keys"]}
    for kid in sorted(live):
        header = b64url(json.dumps({"alg": ALG, "kid": kid, "typ": "JWT"}).encode())
        payload = b64url(json.dumps({"sub": kid}).encode())
        signing_input = f"{header}.{payload}".encode()
        token = f"{header}.{payload}.{b64url(backend.signer(RING, kid, ALG)(signing_input))}"
        jwk = published.get(kid) or {**by_kid[kid]["public_jwk"], "kid": kid, "alg": ALG}
        key = pyjwt.PyJWK.from_dict(jwk).key
        assert pyjwt.decode(token, key, algorithms=[ALG])["sub"] == kid

    # Audit: the log holds every committed event (outbox flushed) ...
    events = audit_events(home)
    assert events, "empty audit log"
    assert events[-1]["seq"] == state["audit"]["seq"] == len(events)
    assert events[-1]["hash"] == state["audit"]["hash"]
    # ... and exactly one event per key transition recorded in state (invariant 7).
    per_kid: dict[str, Counter[str]] = {}
    for ev in events:
        if ev["event"].startswith("key.") and ev["event"] != "key.orphan_destroyed":
            per_kid.setdefault(ev.get("kid"), Counter())[ev["event"]] += 1
            k = by_kid.get(ev.get("kid"))
            assert k is not None, f"event for a key state does not record: {ev}"
            field = {v: f for f, v in TRANSITIONS.items()}.get(ev["event"], "created_at")
            assert ev["ts"] == k[field], (ev, k)
    for k in keys:
        want = Counter({TRANSITIONS[f]: 1 for f in TRANSITIONS if k[f]})
        got = per_kid.get(k["kid"], Counter())
        created = got.pop("key.generated", 0) + got.pop("key.adopted", 0)
        assert created == 1, (k["kid"], per_kid.get(k["kid"]))
        assert got == want, (k["kid"], got, want)
    orphans_destroyed = {ev["kid"] for ev in events if ev["event"] == "key.orphan_destroyed"}
    assert not orphans_destroyed & set(by_kid)
    if crashed_at == "generate.after_backend":
        assert any(ev["event"] in ("key.adopted", "key.orphan_destroyed") for ev in events)

    if not cli:
        from keymgr.audit import AuditLog
        from keymgr.model import AuditAnchor

        assert AuditLog(home.dir / "audit.jsonl").verify(AuditAnchor.from_dict(state["audit"]))
        return

    # Through the real CLI: audit verify, and sign with the ring's active key.
    proc = run(home, "audit", "verify")
    assert proc.returncode == 0, proc.stderr
    proc = run(home, "sign", RING, "--claims", '{"sub":"after-crash"}', "--ttl", "5m")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    kid = pyjwt.get_unverified_header(token)["kid"]
    assert kid == active[0]["kid"]
    key = pyjwt.PyJWKSet.from_dict(doc)[kid].key
    assert pyjwt.decode(token, key, algorithms=[ALG])["sub"] == "after-crash"


def _backend(home: Home) -> Any:
    from keymgr.config import load_config

    return load_config(home.config).backends["local"]


# --------------------------------------------------------------------------- tests


def test_every_crash_point_is_covered() -> None:
    """A crash point added to the core or the local adapters (key files, JWKS
    file, state file) must be added to MAX_N.

    (Crash points of other providers, e.g. ``aws_kms.*``, belong to their own tests.)
    """
    found: set[str] = set()
    for path in [*(REPO / "keymgr").rglob("*.py"), *(REPO / "backends" / "local").glob("*.py")]:
        found |= set(re.findall(r"""crashpoint\(\s*["']([^"']+)["']""", path.read_text()))
    assert found == set(MAX_N) | SHARDED_ONLY


def test_every_crash_point_is_reached(golden: Golden) -> None:
    reached = {name for hits in golden.hits for name in hits} - SHARDED_ONLY
    assert reached == set(MAX_N), f"never reached: {set(MAX_N) - reached}"
    for name, top in MAX_N.items():
        assert max(h[name] for h in golden.hits) >= top, (name, [h[name] for h in golden.hits])


def test_scenario_without_crash(golden: Golden, tmp_path: Path) -> None:
    home = copy_home(golden.fresh, tmp_path / "home")
    for i, step in enumerate(STEPS):
        proc = reconcile(home, step.at)
        assert proc.returncode == 0, proc.stderr
        check_invariants(home, i, None, cli=i == len(STEPS) - 1)
    # Nothing left to do at the last step: a second pass is a no-op.
    before = (home.dir / "state.json").read_bytes(), (home.dir / "audit.jsonl").read_bytes()
    assert reconcile(home, STEPS[-1].at).stdout == ""
    assert ((home.dir / "state.json").read_bytes(), (home.dir / "audit.jsonl").read_bytes()) == (
        before
    )


@pytest.mark.parametrize(("point", "n"), CASES, ids=[f"{p}:{n}" for p, n in CASES])
def test_crash_then_repair(golden: Golden, tmp_path: Path, point: str, n: int) -> None:
    """The scenario with ``KEYMGR_CRASH_AT=point:n`` on every step that reaches it n times.

    Each such step must die by SIGKILL; the same ``reconcile --at`` without the
    crash is the repair, and the invariants are checked before the next step.
    (The highest n of a point also runs any larger n the scenario reaches.)
    """
    highest = max(h[point] for h in golden.hits)
    ns = range(n, max(highest, n) + 1) if n == MAX_N[point] else range(n, n + 1)
    ns = [m for m in ns if m <= highest]
    if not ns:
        pytest.skip(f"{point} is reached fewer than {n} times in every step")
    for m in ns:
        home = copy_home(golden.fresh, tmp_path / f"n{m}")
        crashed_at: str | None = None
        for i, step in enumerate(STEPS):
            where = f"{point}:{m} in step {i} (reconcile --at {step.at})"
            if golden.hits[i][point] >= m:
                proc = reconcile(home, step.at, KEYMGR_CRASH_AT=f"{point}:{m}")
                assert proc.returncode == -signal.SIGKILL, (where, proc.returncode, proc.stderr)
                check_files_parse(home)
                crashed_at = point
                proc = reconcile(home, step.at)
                assert proc.returncode == 0, (where, "repair", proc.stderr)
                if point == "generate.after_backend":
                    # The key the killed run made was found and adopted (or destroyed).
                    assert any(
                        ev["event"] in ("key.adopted", "key.orphan_destroyed")
                        and ev["ts"] == step.at
                        for ev in audit_events(home)
                    ), where
            else:
                proc = reconcile(home, step.at)
                assert proc.returncode == 0, (where, proc.stderr)
            check_invariants(home, i, crashed_at, cli=i == len(STEPS) - 1)
