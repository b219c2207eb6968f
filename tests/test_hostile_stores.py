"""Issue "The promise under hostile conditions", on the S3 and Vault KV state stores.

The reproductions of tests/test_hostile.py (file store), driven through the
CLI (``keymgr.cli.main`` in this process, ``--at`` for time) with the state
in a real ``s3://`` store (moto server: KMS keys, state and JWKS in S3, plus a
JWKS file) and in a real ``vault://`` KV v2 store (OpenBao dev server: transit
keys, a JWKS file):

1. drift: the published JWKS reverted, deleted, or (S3) its Cache-Control
   changed out of band shortly before promotion: the next pass re-publishes
   and does not promote; the successor is promoted A after that confirmation;
2. state loss: the state object / KV secret deleted, or the state URL
   mistyped: exit 1, one line; no key destroyed, the JWKS unchanged, nothing
   written at the lost or mistyped location;
3. injection: a key entry with a foreign public key (and a correct RFC 7638
   kid) written into the stored document by CAS, as the store encodes it:
   exit 1 naming the kid; the JWKS never gets it; the stored state unchanged;
4. a forged audit history: a line rewritten and the SHA-256 chain recomputed:
   the next ``reconcile`` / ``rotate`` refuses with one line and commits nothing.

What verifiers see is read straight from the servers (boto3, OpenBao's HTTP
API) and parsed with jwcrypto, never through keymgr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from jwcrypto import jwk as jw_jwk

from keymgr.audit import AuditLog, chain_hash
from keymgr.model import AuditAnchor
from tests.conftest import T0, A, Home, P
from tests.servers_moto import JWKS_KEY, kms_client, kms_inventory, s3_client
from tests.test_hostile import _foreign_key_entry
from tests.test_s3 import JWKS_BUCKET, STATE_BUCKET, STATE_KEY, aws_home, s3_state
from tests.test_vault import kv_state, setup_home, unique

SEC = timedelta(seconds=1)
RING = "default"
#: The S3 publisher's Cache-Control when the config sets none (keymgr.backends.aws.publisher).
DEFAULT_CC = "public, max-age=300"


def at(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def kids_of(document: bytes) -> set[str]:
    """The kids a verifier gets from a JWKS document, parsed by jwcrypto."""
    return {k["kid"] for k in jw_jwk.JWKSet.from_json(document)["keys"]}


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("keymgr: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- the two stores


@dataclass
class World:
    """A keymgr home whose state lives in a real store, and direct access to that store."""

    home: Home
    #: Secrets that must never appear in any output or assertion message.
    secrets: list[str] = field(default_factory=list)

    name: ClassVar[str] = "?"
    #: The publishers of ring "default".
    publishers: ClassVar[tuple[str, ...]] = ()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.home.run(*args, inproc=True)
        self.assert_no_secret(proc.stdout + proc.stderr, f"the output of keymgr {args[0]}")
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def assert_no_secret(self, text: str, where: str) -> None:
        # A plain bool: pytest's assertion rewriting would print both operands of
        # ``secret not in text``, the secret among them.
        leaked = any(secret in text for secret in self.secrets)
        assert not leaked, f"a credential leaked into {where}"

    def assert_no_secret_at_rest(self) -> None:
        """Not in the audit log, the config or the stored state."""
        for path in (self.home.dir / "audit.jsonl", self.home.config):
            if path.exists():
                self.assert_no_secret(path.read_text(), path.name)
        self.assert_no_secret(json.dumps(self.state()), "the stored state")

    def reconcile(self, t: datetime) -> str:
        proc = self.run("reconcile", "--at", at(t))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def refused(self, *args: str) -> str:
        """Run a command that must be refused: exit 1, one error line (returned)."""
        proc = self.run(*args)
        assert proc.returncode == 1, (args, proc.returncode, proc.stdout, proc.stderr)
        return one_error_line(proc.stderr)

    def keys(self, *states: str) -> list[dict[str, Any]]:
        ring = self.state().get("rings", {}).get(RING, {"keys": []})
        return [k for k in ring["keys"] if not states or k["state"] in states]

    def since(self, publisher: str, kid: str) -> str:
        return str(self.state()["publishers"][publisher]["since"][kid])

    # -- per store ---------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def raw_state(self) -> tuple[object, str]:
        """(the store's CAS token, the stored text): equal pairs mean nothing was written."""
        raise NotImplementedError

    def write_state(self, doc: dict[str, Any]) -> None:
        """Replace the document as someone with write access to the store would: by CAS,
        in the store's own encoding, with the version the store would give it."""
        raise NotImplementedError

    def lose_state(self, how: str) -> None:
        raise NotImplementedError

    def state_absent(self, how: str) -> bool:
        """Nothing was written where the state was lost or where the mistyped URL points."""
        raise NotImplementedError

    def backend_keys(self) -> dict[str, str]:
        """Every key of this home in its backend, with its state there."""
        raise NotImplementedError

    def served(self) -> dict[str, Any]:
        """What verifiers fetch from every publisher (bytes and, for S3, the headers)."""
        return {"site": self.home.jwks_path.read_bytes()}


@dataclass
class S3World(World):
    """aws_home of tests/test_s3.py: KMS keys, state in S3, JWKS in S3 ("cdn") and a file."""

    s3: Any = None
    kms: Any = None
    name: ClassVar[str] = "s3"
    publishers: ClassVar[tuple[str, ...]] = ("cdn", "site")

    def state(self) -> dict[str, Any]:
        return s3_state(self.s3)

    def raw_state(self) -> tuple[object, str]:
        obj = self.s3.get_object(Bucket=STATE_BUCKET, Key=STATE_KEY)
        return obj["ETag"], obj["Body"].read().decode()

    def write_state(self, doc: dict[str, Any]) -> None:
        etag, text = self.raw_state()
        current = json.loads(text)
        # keymgr.docstore.encode_state's format (checked on the current document).
        assert json.dumps(current, indent=1) + "\n" == text
        body = json.dumps({**doc, "version": current["version"] + 1}, indent=1) + "\n"
        self.s3.put_object(
            Bucket=STATE_BUCKET, Key=STATE_KEY, Body=body.encode(),
            ContentType="application/json", IfMatch=etag,
        )

    def lose_state(self, how: str) -> None:
        if how == "deleted":
            self.s3.delete_object(Bucket=STATE_BUCKET, Key=STATE_KEY)
        else:
            assert how == "mistyped", how
            text = self.home.config.read_text()
            assert f"/{STATE_KEY}?" in text
            self.home.config.write_text(text.replace(f"/{STATE_KEY}?", "/keymgr/stat.json?"))

    def state_absent(self, how: str) -> bool:
        key = STATE_KEY if how == "deleted" else "keymgr/stat.json"
        listed = self.s3.list_objects_v2(Bucket=STATE_BUCKET, Prefix=key)
        return not [o["Key"] for o in listed.get("Contents", []) if o["Key"] == key]

    def backend_keys(self) -> dict[str, str]:
        return {key_id: v["state"] for key_id, v in kms_inventory(self.kms).items()}

    def served(self) -> dict[str, Any]:
        obj = self.s3.get_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)
        cdn = (obj["Body"].read(), obj.get("ContentType"), obj.get("CacheControl"), obj["ETag"])
        return {**super().served(), "cdn": cdn}


@dataclass
class VaultWorld(World):
    """setup_home of tests/test_vault.py: transit keys, state in KV v2, JWKS in a file."""

    vh: Any = None
    kv_path: str = ""
    name: ClassVar[str] = "vault"
    publishers: ClassVar[tuple[str, ...]] = ("site",)

    @property
    def bao(self) -> Any:
        return self.vh.bao

    def state(self) -> dict[str, Any]:
        return kv_state(self.bao, self.kv_path)

    def raw_state(self) -> tuple[object, str]:
        data = self.bao.ok("GET", f"secret/data/{self.kv_path}")["data"]
        return data["metadata"]["version"], data["data"]["state"]

    def write_state(self, doc: dict[str, Any]) -> None:
        version, text = self.raw_state()
        current = json.loads(text)
        # keymgr.docstore.encode_state's format in the "state" field; "version" counts
        # the writes, one per KV version, so the two are equal.
        assert json.dumps(current, indent=1) + "\n" == text and current["version"] == version
        assert isinstance(version, int)
        body = json.dumps({**doc, "version": version + 1}, indent=1) + "\n"
        self.bao.ok(
            "POST", f"secret/data/{self.kv_path}",
            {"options": {"cas": version}, "data": {"state": body}},
        )

    def lose_state(self, how: str) -> None:
        if how == "deleted":  # every version and the metadata: really gone
            self.bao.ok("DELETE", f"secret/metadata/{self.kv_path}")
            assert self.bao.api("GET", f"secret/metadata/{self.kv_path}")[0] == 404
        elif how == "deleted-latest":  # `bao kv delete`: the latest version, soft
            self.bao.ok("DELETE", f"secret/data/{self.kv_path}")
        else:
            assert how == "mistyped", how
            text = self.home.config.read_text()
            url = f'"vault://secret/{self.kv_path}?'
            assert url in text
            self.home.config.write_text(text.replace(url, url[:-1] + '-x?'))

    def state_absent(self, how: str) -> bool:
        if how == "deleted-latest":
            # No new version: the deleted one is still the latest, still deleted.
            meta = self.bao.ok("GET", f"secret/metadata/{self.kv_path}")["data"]
            return bool(meta["versions"][str(meta["current_version"])]["deletion_time"])
        path = self.kv_path if how == "deleted" else f"{self.kv_path}-x"
        status: int = self.bao.api("GET", f"secret/metadata/{path}")[0]
        return status == 404

    def backend_keys(self) -> dict[str, str]:
        return {
            name: str(self.bao.ok("GET", f"transit/keys/{name}")["data"]["latest_version"])
            for name in self.bao.transit_keys()
            if name.startswith(self.vh.prefix)
        }


def s3_world(request: pytest.FixtureRequest, home: Home) -> S3World:
    moto = request.getfixturevalue("moto")
    s3 = s3_client(moto.url)
    for bucket in (STATE_BUCKET, JWKS_BUCKET):
        s3.create_bucket(Bucket=bucket)
    aws_home(home, moto.url)
    return S3World(home, s3=s3, kms=kms_client(moto.url))


def vault_world(
    request: pytest.FixtureRequest, home: Home, monkeypatch: pytest.MonkeyPatch
) -> VaultWorld:
    bao = request.getfixturevalue("bao")
    # In-process runs read the token and the state's server from this environment.
    for name in [k for k in os.environ if k.startswith(("VAULT_", "BAO_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VAULT_ADDR", bao.addr)
    monkeypatch.setenv("VAULT_TOKEN", bao.token)
    kv_path = unique("keymgr-hostile-")
    # One document, as for S3 (aws_home): these worlds read and tamper with the
    # stored state as a whole; tampered shards and heads are tests/test_shards.py.
    vh = setup_home(home, bao, "ES256", state_url=f"vault://secret/{kv_path}?shards=off")
    return VaultWorld(home, [bao.token], vh=vh, kv_path=kv_path)


@pytest.fixture(params=["s3", "vault"])
def world(
    request: pytest.FixtureRequest, home: Home, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    if request.param == "s3":
        yield s3_world(request, home)
        return
    w = vault_world(request, home, monkeypatch)
    yield w
    w.assert_no_secret_at_rest()


@pytest.fixture
def s3w(request: pytest.FixtureRequest, home: Home) -> S3World:
    return s3_world(request, home)


@pytest.fixture
def vaultw(
    request: pytest.FixtureRequest, home: Home, monkeypatch: pytest.MonkeyPatch
) -> Iterator[VaultWorld]:
    w = vault_world(request, home, monkeypatch)
    yield w
    w.assert_no_secret_at_rest()


def start_rotation(w: World) -> tuple[str, dict[str, Any]]:
    """Bootstrapped at T0; at P - A the successor is generated and published.

    Returns the successor's kid and what each publisher served before it.
    """
    w.reconcile(T0)
    before = w.served()
    out = w.reconcile(T0 + P - A)
    assert "key.published" in out and "key.promoted" not in out, out
    (successor,) = [k["kid"] for k in w.keys("published")]
    for name in w.publishers:
        assert w.since(name, successor) == at(T0 + P - A)
    return successor, before


def promotion_waits_for(w: World, successor: str, drifted: str, republished: datetime) -> None:
    """After a drift of ``drifted`` re-published at ``republished``: the successor is not
    promoted before ``republished + A``, and is at that instant."""
    state = w.state()
    assert [k["kid"] for k in w.keys("published")] == [successor]
    for name in w.publishers:
        since = state["publishers"][name]["since"][successor]
        # The drifted target restarts the count; any other one kept serving it.
        expected = republished if name == drifted else T0 + P - A
        assert since == at(expected), (name, since)
    out = w.reconcile(republished + A - SEC)
    assert "key.promoted" not in out, out
    out = w.reconcile(republished + A)
    assert f"key.promoted ring={RING} kid={successor}" in out, out
    assert [k["kid"] for k in w.keys("active")] == [successor]


# --------------------------------------------------------------------------- 1. drift


def test_file_jwks_reverted_is_republished_and_restarts_the_wait(world: World) -> None:
    """A stale deploy puts the previous JWKS file (publisher "site") back ten minutes
    before promotion; with S3 the "cdn" object keeps serving the successor."""
    w = world
    successor, before = start_rotation(w)
    w.home.jwks_path.write_bytes(before["site"])
    assert successor not in kids_of(w.home.jwks_path.read_bytes())

    out = w.reconcile(T0 + P + SEC)
    assert "jwks.published publisher=site" in out, out
    assert "key.promoted" not in out, "promoted in the pass that re-published"
    assert successor in kids_of(w.home.jwks_path.read_bytes())
    promotion_waits_for(w, successor, "site", T0 + P + SEC)


def _revert_cdn(w: S3World, before: dict[str, Any]) -> None:
    """A stale deploy: the previous document, with exactly the headers keymgr sets."""
    body = before["cdn"][0]
    w.s3.put_object(
        Bucket=JWKS_BUCKET, Key=JWKS_KEY, Body=body, ContentType="application/json",
        CacheControl=DEFAULT_CC,
    )
    assert len(kids_of(w.served()["cdn"][0])) == 1


def _recache_cdn(w: S3World, before: dict[str, Any]) -> None:
    """Same bytes, a day-long Cache-Control set by hand (e.g. a CDN console)."""
    w.s3.copy_object(
        Bucket=JWKS_BUCKET, Key=JWKS_KEY, CopySource={"Bucket": JWKS_BUCKET, "Key": JWKS_KEY},
        MetadataDirective="REPLACE", ContentType="application/json",
        CacheControl="public, max-age=86400",
    )
    assert w.served()["cdn"][2] == "public, max-age=86400"


def _delete_cdn(w: S3World, before: dict[str, Any]) -> None:
    w.s3.delete_object(Bucket=JWKS_BUCKET, Key=JWKS_KEY)


def _configure_cc(w: S3World, before: dict[str, Any]) -> None:
    text = w.home.config.read_text()
    assert text.count("[publishers.cdn]\n") == 1
    cc = 'cache_control = "public, max-age=600"\n'
    w.home.config.write_text(text.replace("[publishers.cdn]\n", "[publishers.cdn]\n" + cc))


@pytest.mark.parametrize(
    ("drift", "cache_control"),
    [
        (_revert_cdn, DEFAULT_CC),
        (_recache_cdn, DEFAULT_CC),
        (_delete_cdn, DEFAULT_CC),
        (_configure_cc, "public, max-age=600"),
    ],
    ids=["reverted", "cache-control-out-of-band", "deleted", "cache-control-configured"],
)
def test_s3_jwks_drift_is_republished_and_restarts_the_wait(
    s3w: S3World, drift: Any, cache_control: str
) -> None:
    """The S3 JWKS object (publisher "cdn") changes shortly before promotion: body or
    headers; the file publisher keeps serving the successor all along."""
    w = s3w
    successor, before = start_rotation(w)
    served = w.served()["cdn"]
    assert served[1:3] == ("application/json", DEFAULT_CC)
    drift(w, before)

    out = w.reconcile(T0 + P + SEC)
    assert "jwks.published publisher=cdn" in out, out
    assert "key.promoted" not in out, "promoted in the pass that re-published"
    body, content_type, cc, _ = w.served()["cdn"]
    assert successor in kids_of(body)
    assert (content_type, cc) == ("application/json", cache_control)
    assert w.served()["site"] == w.home.jwks_path.read_bytes()
    promotion_waits_for(w, successor, "cdn", T0 + P + SEC)


def test_unchanged_world_promotes_on_schedule(world: World) -> None:
    """The control: without drift, the successor is promoted at activated + P exactly."""
    successor, _ = start_rotation(world)
    out = world.reconcile(T0 + P - SEC)
    assert "key.promoted" not in out and "jwks.published" not in out, out
    out = world.reconcile(T0 + P)
    assert f"key.promoted ring={RING} kid={successor}" in out, out


# --------------------------------------------------------------------------- 2. state loss


def rotated(w: World) -> str:
    """One full rotation: an active key and a retired one, both published."""
    w.reconcile(T0)
    w.reconcile(T0 + P - A)
    w.reconcile(T0 + P)
    (signer,) = [str(k["kid"]) for k in w.keys("active")]
    assert len(w.keys("retired")) == 1
    return signer


def lost_state_is_refused(w: World, how: str) -> str:
    """Lose the state after a rotation; the next pass: exit 1, one line (returned),
    no backend key destroyed or added, the JWKS unchanged, nothing written."""
    signer = rotated(w)
    backend, served = w.backend_keys(), w.served()
    assert len(backend) == 2
    w.lose_state(how)

    line = w.refused("reconcile", "--at", at(T0 + P + SEC))
    assert w.backend_keys() == backend, "a backend key was destroyed or added"
    assert w.served() == served, "the JWKS changed"
    assert signer in kids_of(w.home.jwks_path.read_bytes())
    assert w.state_absent(how), "a state was written where the old one was lost"
    proc = w.run("sign", RING, "--claims", "{}")  # nothing to sign with, and it says so
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    assert w.backend_keys() == backend and w.served() == served
    return line


@pytest.mark.parametrize("how", ["deleted", "mistyped"])
def test_lost_state_is_refused_and_nothing_is_destroyed(world: World, how: str) -> None:
    line = lost_state_is_refused(world, how)
    # Whichever guard speaks first: the audit log holds events an empty state does
    # not anchor, or the backend holds keys the state does not record.
    assert "but the state anchors none" in line or "keymgr adopt" in line, line


def test_soft_deleted_kv_state_is_refused_by_the_store(vaultw: VaultWorld) -> None:
    """``bao kv delete`` (the latest version only): the KV store refuses by itself."""
    line = lost_state_is_refused(vaultw, "deleted-latest")
    assert "is deleted or destroyed" in line and "undelete" in line, line


def test_lost_state_and_log_names_ring_count_and_adopt(world: World) -> None:
    """A fresh start (state deleted, the old audit log moved aside): the backend check
    refuses, naming the ring, the number of unknown keys and ``keymgr adopt``."""
    w = world
    rotated(w)
    backend, served = w.backend_keys(), w.served()
    w.lose_state("deleted")
    shutil.move(w.home.dir / "audit.jsonl", w.home.dir / "audit.jsonl.old")

    line = w.refused("reconcile", "--at", at(T0 + P + SEC))
    assert f"ring {RING}" in line and "2 keymgr key(s)" in line, line
    assert f"keymgr adopt {RING} KID --as active|retired|expired" in line, line
    assert w.backend_keys() == backend and w.served() == served
    assert w.state_absent("deleted")


# --------------------------------------------------------------------------- 3. injection


@pytest.mark.parametrize("state", ["pending", "published"])
def test_injected_key_is_never_published(world: World, state: str) -> None:
    w = world
    w.reconcile(T0)
    doc = w.state()
    backend_name = doc["rings"][RING]["keys"][0]["backend"]
    entry = {**_foreign_key_entry(state), "backend": backend_name}
    doc["rings"][RING]["keys"].append(entry)
    w.write_state(doc)
    stored, served, backend = w.raw_state(), w.served(), w.backend_keys()
    assert entry["kid"] in stored[1]

    line = w.refused("reconcile", "--at", at(T0 + 2 * A))
    assert entry["kid"] in line and "does not hold this key" in line, line
    assert w.served() == served, "the JWKS changed"
    for name, got in served.items():
        body = got if isinstance(got, bytes) else got[0]
        assert entry["kid"] not in kids_of(body), name
    assert w.raw_state() == stored, "refused, yet committed"
    assert w.backend_keys() == backend


# --------------------------------------------------------------------------- 4. forged audit


def forge(log: Path) -> None:
    """Rewrite the first event (who generated the first key) and recompute the chain."""
    events = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert events[0]["event"] == "key.generated", events[0]
    events[0]["actor"] = "cli:someone-else@elsewhere"
    prev = "0" * 64
    for ev in events:
        ev["prev"] = prev
        ev["hash"] = prev = chain_hash(prev, ev)
    log.write_text(
        "".join(json.dumps(ev, ensure_ascii=False, separators=(",", ":")) + "\n" for ev in events)
    )
    # A chain without a break: only the anchor in the state can tell.
    head = AuditAnchor(seq=events[-1]["seq"], hash=prev)
    assert AuditLog(log, checkpoints=None).verify(head) == len(events)


@pytest.mark.parametrize(
    "cmd", [("reconcile", "--at", at(T0 + P - A)), ("rotate", RING)], ids=["reconcile", "rotate"]
)
def test_rechained_audit_log_is_refused_before_any_commit(
    world: World, cmd: tuple[str, ...]
) -> None:
    w = world
    # The file as the record ([daemon] audit = "file"); the store as the
    # record is forged in tests/test_audit_store.py.
    cfg = w.home.config.read_text()
    assert 'audit_log = "audit.jsonl"\n' in cfg
    w.home.config.write_text(
        cfg.replace('audit_log = "audit.jsonl"\n', 'audit_log = "audit.jsonl"\naudit = "file"\n')
    )
    w.reconcile(T0)
    log = w.home.dir / "audit.jsonl"
    forge(log)
    forged = log.read_bytes()
    stored, served, backend = w.raw_state(), w.served(), w.backend_keys()

    line = w.refused(*cmd)
    assert str(log) in line and "rewritten" in line, line
    assert w.raw_state() == stored, "committed on top of a forged log"
    assert w.backend_keys() == backend, "a key was generated"
    assert w.served() == served
    assert log.read_bytes() == forged, "appended to a forged log"
    proc = w.run("audit", "verify")
    assert proc.returncode != 0 and "differs from the head anchored in state" in proc.stderr


# --------------------------------------------------------------------------- sharded rollback


def _head(w: World) -> str:
    """The stored head of a sharded state, as the store holds it."""
    return w.raw_state()[1]


def _put_head(w: World, text: str) -> None:
    """Put back a head as someone with write access would (a restored backup,
    an earlier object version): unconditionally on S3, by CAS on Vault KV."""
    if isinstance(w, S3World):
        w.s3.put_object(Bucket=STATE_BUCKET, Key=STATE_KEY, Body=text.encode())
    else:
        assert isinstance(w, VaultWorld)
        version = w.raw_state()[0]
        w.bao.ok("POST", f"secret/data/{w.kv_path}",
                 {"options": {"cas": version}, "data": {"state": text}})


@pytest.mark.parametrize("store", ["s3", "vault"])
def test_a_sharded_state_rolled_back_to_an_earlier_head_is_refused(
    request: pytest.FixtureRequest, home: Home, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """An earlier head of a sharded state put back (its shards are still there,
    so it reads as a sound, older state: before the promotion) is refused in
    one line, because the audit log holds events it does not anchor, by the
    pass, by ``status`` and ``plan``, and by ``sign``; no key is destroyed or added,
    the JWKS are unchanged and the head is left as it was."""
    w = s3_world(request, home) if store == "s3" else vault_world(request, home, monkeypatch)
    text = home.config.read_text()
    if store == "s3":
        assert f"/{STATE_KEY}?" in text
        home.config.write_text(text.replace(f"/{STATE_KEY}?", f"/{STATE_KEY}?shards=on&", 1))
    else:
        assert "shards=off" in text
        home.config.write_text(text.replace("shards=off", "shards=on", 1))
    w.reconcile(T0)
    w.reconcile(T0 + P - A)
    earlier = _head(w)
    assert json.loads(earlier)["sharding"], "not a sharded head"
    out = w.reconcile(T0 + P)
    assert "key.promoted" in out, out
    backend, served = w.backend_keys(), w.served()

    _put_head(w, earlier)
    restored = w.raw_state()
    line = w.refused("reconcile", "--at", at(T0 + P + SEC))
    assert "audit" in line and "anchor" in line, line
    assert w.backend_keys() == backend, "a backend key was destroyed or added"
    assert w.served() == served, "the JWKS changed"
    assert w.raw_state() == restored, "the rolled-back head was written over"
    line = w.refused("rotate", RING)
    assert "audit" in line and "anchor" in line, line
    # Shown as the truth, or signed with the old active key: refused too.
    for view in (("status", "--json"), ("plan",), ("sign", RING, "--claims", "{}")):
        line = w.refused(*view)
        assert "state anchors seq" in line, (view, line)
    assert w.raw_state() == restored and w.backend_keys() == backend
