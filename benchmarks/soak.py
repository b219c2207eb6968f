#!/usr/bin/env python3
"""Rollover soak: no verifier ever rejects a valid token because of a rotation.

Runs the real daemon (``python -m keymgr.cli --config X run``) with periods of
seconds instead of days, and around it:

- an **issuer** thread minting tokens continuously through the Python API
  (``KeyManager.from_config(path).sign(ring, claims, ttl=..., now=...)``), each
  with its clock skewed by up to ``--skew`` seconds either way (the skewed
  ``now`` becomes ``iat``/``exp``), appending them to a queue file;
- an **edge** HTTP server on a free loopback port serving the published JWKS
  with the publisher's ``Cache-Control``: it reads the origin -- the JWKS file
  (like nginx), or the S3 object in moto (like a CDN, SigV4-signed) -- on every
  request, and while the origin does not answer (moto SIGSTOPped) serves the
  copy it last saw (refreshed every 50-100 ms), like ``stale-if-error``;
- **verifier processes** that know nothing of keymgr, fetch the JWKS over HTTP
  and cache it the way their library does: PyJWT ``PyJWKClient`` (lifespan +
  unknown-kid cooldown), jwcrypto ``JWKSet`` cached for the response's
  ``max-age`` (refreshed on an unknown kid after a cooldown), and Node ``jose``
  ``createRemoteJWKSet`` (cacheMaxAge + cooldownDuration). Every cache holds
  the JWKS up to ``--cache`` seconds even when a token names an unknown kid,
  and every verifier allows ``--skew`` seconds of clock skew (leeway /
  clockTolerance). Each token is verified when issued ("fresh") and again half
  a second before it expires ("late"), which needs its key to be still
  published.
- a **watcher** polling the origin, to time each key's publication and
  unpublication against its first and last use.

With ``--faults`` it also SIGKILLs the daemon at random times and restarts it,
makes the JWKS publish target unwritable for a while (the JWKS directory is
moved aside and replaced by a file, then restored; root ignores chmod; the
static server keeps serving the document that was there, as from a read-only
disk), and for the cloud backends SIGSTOPs the moto / OpenBao server for a few
seconds (``MotoServer.outage`` / ``BaoServer.outage`` from tests/). After each fault
it waits for the daemon to recover and checks: exactly one active key,
consistent states and timestamps (``keymgr status --json``), no key recorded in
state lost (still in state, still in the backend unless destroyed),
``keymgr audit verify``, the served JWKS matching state, and zero rejections.

Settings (seconds): ``--period`` P; ``--cache`` L, the longest JWKS cache
lifetime of any verifier (also the Cache-Control max-age); ``--skew`` S;
``--ttl`` T; ``--resolution`` R, an extra margin (default 0). By default
publish_ahead A = L + R and retire_grace G = T + S + R (+ 1 s with
``--cloud-state``: issuers on a shared store notice a promotion within 1 s):
the tightest settings the rules allow. keymgr records times in whole seconds,
rounding published_at and retired_at up, so R = 0 is safe (before that
rounding, a key could be promoted up to 1 s early: the soak found it).
``--misconfigure`` sets A shorter than the verifiers' cache lifetime and
must show rejections (the harness can fail).

Examples::

    .venv/bin/python benchmarks/soak.py                           # file backend, 10 rotations
    .venv/bin/python benchmarks/soak.py --faults --rotations 30
    .venv/bin/python benchmarks/soak.py --backend vault-transit --rotations 30 --faults
    .venv/bin/python benchmarks/soak.py --backend aws-kms --rotations 30 --faults
    .venv/bin/python benchmarks/soak.py --misconfigure           # must report rejections

Exit code 0 when the run proves its point (no rejection and every check
passed; with ``--misconfigure``: rejections were seen), 1 otherwise, 2 for
bad usage or a missing tool. ``--json PATH`` writes the whole report.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "benchmarks" / "soak"
PY = sys.executable
RING = "default"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
STATE_ORDER = ["pending", "published", "active", "retired", "expired", "destroyed"]
IN_JWKS = {"published", "active", "retired"}
HAS_PRIVATE = {"pending", "published", "active", "retired", "expired"}
#: The audit event of each transition, by the state timestamp it sets.
TRANSITION_EVENTS = {
    "published_at": "key.published",
    "activated_at": "key.promoted",
    "retired_at": "key.retired",
    "expired_at": "key.expired",
    "destroyed_at": "key.destroyed",
    "revoked_at": "key.revoked",
}
BACKENDS = ("file", "aws-kms", "vault-transit")
REGION = "us-east-1"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    backend: str = "file"
    rotations: int = 10
    period: int = 5  # P
    cache: int = 2  # L: longest verifier JWKS cache lifetime, and the Cache-Control max-age
    skew: int = 1  # S: issuer clocks off by up to +-S; every verifier's leeway
    ttl: int = 3  # T: token lifetime
    resolution: int = 0  # R: extra margin on A and G (s)
    publish_ahead: int = 0  # A (0: L + R)
    retire_grace: int = 0  # G (0: T + S + R)
    destroy_after: int = 1  # D
    rate: float = 20.0  # tokens per second
    late_margin: float = 0.5  # the late check runs this long before exp
    faults: bool = False
    fault_kinds: tuple[str, ...] = ()
    misconfigure: bool = False
    cloud_state: bool = False  # state in S3 (aws-kms) / Vault KV (vault-transit)
    node: bool = True
    seed: int = 0
    max_seconds: float = 0.0  # 0: derived from rotations and period
    workdir: str | None = None
    keep: bool = False

    def resolve(self) -> None:
        if self.misconfigure:
            # Caches longer than publish_ahead: the promise cannot hold.
            self.publish_ahead = self.publish_ahead or 1
            self.cache = max(self.cache, self.publish_ahead + 3)
            self.period = max(self.period, self.cache + 1)
        self.publish_ahead = self.publish_ahead or self.cache + self.resolution
        # Issuers on an S3 / Vault state store notice a promotion within 1 s
        # (KeyManager.sign trusts the store's fingerprint that long): the old
        # key may sign for up to 1 s after it retired.
        window = 1 if self.cloud_state else 0
        self.retire_grace = self.retire_grace or self.ttl + self.skew + self.resolution + window
        if not self.seed:
            self.seed = secrets.randbelow(2**31) + 1
        if not self.fault_kinds:
            self.fault_kinds = {
                "file": ("kill", "block"),
                "aws-kms": ("kill", "pause"),
                "vault-transit": ("kill", "block", "pause"),
            }[self.backend]
        if not self.max_seconds:
            self.max_seconds = 60 + self.rotations * self.period * (3 if self.faults else 2)

    def check(self) -> str | None:
        if self.backend not in BACKENDS:
            return f"--backend: one of {', '.join(BACKENDS)}"
        if self.publish_ahead > self.period:
            return "publish_ahead must not be longer than the period"
        if min(self.period, self.cache, self.ttl, self.rotations) < 1:
            return "--period, --cache, --ttl and --rotations must be at least 1"
        if self.late_margin >= self.ttl:
            return "--late-margin must be shorter than --ttl"
        able = {"file": {"kill", "block"}, "aws-kms": {"kill", "pause"}}.get(
            self.backend, {"kill", "block", "pause"}
        )
        if not set(self.fault_kinds) <= able:
            return f"--fault-kinds: {self.backend} supports {', '.join(sorted(able))}"
        return None


# --------------------------------------------------------------------------- small helpers


def now() -> float:
    return time.time()


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kids_of(doc: Any) -> set[str]:
    return {k.get("kid", "") for k in doc.get("keys", [])} if isinstance(doc, dict) else set()


def header_kid(token: str) -> str:
    import base64

    h = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))["kid"])


def parse_ts(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        if line.strip():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def short(kid: str | None) -> str:
    return (kid or "-")[:8]


def normalise_reason(reason: str) -> str:
    """Group rejection reasons: kids and numbers vary, the cause does not."""
    reason = re.sub(r"[A-Za-z0-9_-]{43}", "<kid>", reason)
    return re.sub(r"\d+", "N", reason)[:160]


# --------------------------------------------------------------------------- origin + edge


class FileOrigin:
    """The JWKS file the file publisher writes (what nginx would serve).

    While the "block" fault has moved the JWKS directory aside, ``fallback``
    names where the document now is: keymgr cannot write (nor read back) its
    target, but the static server keeps serving what is on disk, as it would
    from a read-only or full disk.
    """

    def __init__(self, path: Path, cache_control: str) -> None:
        self.path = path
        self.cache_control = cache_control
        self.fallback: Path | None = None
        self.poll = 0.05

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            return self.path.read_bytes(), self.cache_control
        except OSError:
            fallback = self.fallback
            if fallback is None:
                try:
                    self.path.stat()
                except FileNotFoundError:
                    return None, None  # nothing published yet
                raise
            return fallback.read_bytes(), self.cache_control


class HttpOrigin:
    """The S3 object in moto, read over plain HTTP with a short timeout.

    Each GET is SigV4-signed like a CDN's origin request (CloudFront origin
    access control): moto refuses anonymous reads of a private bucket.
    """

    def __init__(self, url: str) -> None:
        import boto3

        self.url = url
        self.poll = 0.1
        self.creds = boto3.session.Session().get_credentials()

    def read(self) -> tuple[bytes | None, str | None]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        req = AWSRequest(method="GET", url=self.url)
        SigV4Auth(self.creds, "s3", REGION).add_auth(req)
        r = urllib.request.Request(self.url, headers=dict(req.headers.items()))
        try:
            with urllib.request.urlopen(r, timeout=0.5) as resp:
                return resp.read(), resp.headers.get("Cache-Control")
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:
                return None, None
            raise


class Edge:
    """Serves the origin's JWKS on 127.0.0.1, last good copy while the origin fails.

    The last good copy is refreshed by every request and by the watcher's
    polls (every 50-100 ms), so while the origin is down (moto SIGSTOPped) the
    edge serves what the origin held just before, like a CDN with
    ``stale-if-error`` that revalidates often.
    """

    def __init__(self, origin: FileOrigin | HttpOrigin) -> None:
        self.origin = origin
        self.last: tuple[bytes, str | None] | None = None
        self.down_until = 0.0
        self.requests = 0
        self.stale = 0
        self.lock = threading.Lock()
        edge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, cc, stale = edge.get()
                if body is None:
                    self.send_response(503 if stale else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if cc:
                    self.send_header("Cache-Control", cc)
                if stale:
                    self.send_header("Warning", '110 - "Response is Stale"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def get(self) -> tuple[bytes | None, str | None, bool]:
        with self.lock:
            self.requests += 1
            # Right after a failed origin read, do not make the client wait for
            # another timeout: serve the last copy (the watcher keeps probing).
            down = time.monotonic() < self.down_until
        if not down:
            try:
                body, cc = self.origin.read()
                if body is not None:
                    self.remember(body, cc)
                return body, cc, False
            except Exception:
                with self.lock:
                    self.down_until = time.monotonic() + 1.0
        with self.lock:
            if self.last is None:
                return None, None, True
            self.stale += 1
            return self.last[0], self.last[1], True

    def remember(self, body: bytes, cc: str | None, probe: bool = False) -> None:
        with self.lock:
            self.last = (body, cc)
            if probe:
                self.down_until = 0.0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Watcher(threading.Thread):
    """Polls the origin: when each kid was first served, and when it stopped being served."""

    def __init__(self, origin: FileOrigin | HttpOrigin, edge: Edge) -> None:
        super().__init__(daemon=True)
        self.origin, self.edge = origin, edge
        self.first_seen: dict[str, float] = {}
        self.removed: dict[str, float] = {}
        self.reappeared: list[str] = []
        self.private_leaks: list[str] = []
        self.current: set[str] = set()
        self.errors = 0
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                body, cc = self.origin.read()
                doc = json.loads(body) if body else {"keys": []}
                if body:
                    self.edge.remember(body, cc, probe=True)
            except Exception:
                self.errors += 1
                self.stop_ev.wait(self.origin.poll)
                continue
            t = now()
            kids = kids_of(doc)
            for jwk in doc.get("keys", []):
                leaked = PRIVATE_MEMBERS & set(jwk)
                if leaked:
                    self.private_leaks.append(f"{short(jwk.get('kid'))}: {sorted(leaked)}")
            for k in kids:
                self.first_seen.setdefault(k, t)
                if k in self.removed and k not in self.reappeared:
                    self.reappeared.append(k)
            for k in self.current - kids:
                self.removed.setdefault(k, t)
            self.current = kids
            self.stop_ev.wait(self.origin.poll)


# --------------------------------------------------------------------------- issuer


@dataclass
class Issued:
    seq: int
    kid: str
    t: float  # real time of signing
    skew: float
    iat: int
    exp: int


class Issuer(threading.Thread):
    """Mints tokens through the Python API with skewed clocks; appends them to the queue."""

    def __init__(self, config: Path, queue: Path, s: Settings, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.config, self.queue, self.s, self.rng = config, queue, s, rng
        self.tokens: list[Issued] = []
        self.errors: Counter[str] = Counter()
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.first_use: dict[str, float] = {}
        self.last_use: dict[str, float] = {}
        self.last_exp: dict[str, int] = {}

    def kids_used(self) -> list[str]:
        with self.lock:
            return list(self.first_use)

    def run(self) -> None:
        from keymgr import KeyManager

        km = KeyManager.from_config(self.config, actor="soak-issuer")
        ttl = timedelta(seconds=self.s.ttl)
        gap = 1.0 / self.s.rate
        seq = 0
        with self.queue.open("a", encoding="utf-8") as q:
            nxt = time.monotonic()
            while not self.stop_ev.is_set():
                r = self.rng.random()
                sk = float(self.s.skew) * (
                    -1 if r < 1 / 3 else 1 if r < 2 / 3 else self.rng.uniform(-1, 1)
                )
                t = now()
                at = datetime.fromtimestamp(t + sk, UTC)
                try:
                    token = km.sign(RING, {"sub": "soak", "jti": str(seq)}, ttl=ttl, now=at)
                except Exception as e:  # no active key yet, backend paused, ...
                    self.errors[f"{type(e).__name__}: {normalise_reason(str(e))}"] += 1
                    self.stop_ev.wait(0.1)
                    nxt = time.monotonic()
                    continue
                done = now()
                kid = header_kid(token)
                iat = int(at.timestamp())
                rec = Issued(seq, kid, done, sk, iat, iat + self.s.ttl)
                with self.lock:
                    self.tokens.append(rec)
                    self.first_use.setdefault(kid, t)
                    self.last_use[kid] = done
                    self.last_exp[kid] = max(self.last_exp.get(kid, 0), rec.exp)
                line = {"seq": seq, "token": token, "kid": kid, "t": done, "exp": rec.exp}
                q.write(json.dumps(line, separators=(",", ":")) + "\n")
                q.flush()
                seq += 1
                nxt += gap
                self.stop_ev.wait(max(0.0, nxt - time.monotonic()))

    def end(self) -> None:
        self.stop_ev.set()
        self.join(timeout=30)
        with self.queue.open("a", encoding="utf-8") as q:
            q.write('{"end":true}\n')


# --------------------------------------------------------------------------- daemon


class Daemon:
    def __init__(self, config: Path, env: dict[str, str], log_path: Path) -> None:
        self.config, self.env, self.log_path = config, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.starts = 0
        self.kills = 0
        self.unexpected_exits: list[str] = []

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts + 1} at {now():.3f}\n".encode())
            out.flush()
            self.log_offset = out.tell()
            self.proc = subprocess.Popen(
                [PY, "-m", "keymgr.cli", "--config", str(self.config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.config.parent,
                start_new_session=True,
            )
        self.starts += 1

    def poll(self) -> None:
        """Record an exit we did not cause, and start it again."""
        if self.proc is not None and self.proc.poll() is not None:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
            self.unexpected_exits.append(
                f"exit code {self.proc.returncode} at {now():.1f}: {' | '.join(tail)[-600:]}"
            )
            log(f"daemon exited on its own (rc={self.proc.returncode}); restarting")
            self.start()

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.kills += 1

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None


# --------------------------------------------------------------------------- verifiers


@dataclass
class VerifierSpec:
    name: str
    library: str
    cmd: list[str]
    cache: str  # human description of its caching
    out: Path
    proc: subprocess.Popen[bytes] | None = None


def lib_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def node_tools() -> str | None:
    """None when node and npm exist, else why not."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def ensure_node_modules() -> str:
    """``npm ci`` into benchmarks/soak/node_modules at first use; the jose version."""
    pkg = HERE / "node_modules" / "jose" / "package.json"
    lock = HERE / "package-lock.json"
    marker = HERE / "node_modules" / ".package-lock.json"
    if not pkg.exists() or not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        log("npm ci (benchmarks/soak)")
        proc = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"npm ci failed in {HERE}:\n{proc.stderr[-2000:]}")
    return str(json.loads(pkg.read_text())["version"])


def verifier_specs(s: Settings, url: str, queue: Path, work: Path) -> list[VerifierSpec]:
    common = [
        "--url", url, "--queue", str(queue), "--alg", "ES256",
        "--leeway", str(s.skew), "--late-margin", str(s.late_margin),
    ]  # fmt: skip
    L = str(s.cache)
    specs = [
        VerifierSpec(
            "pyjwt",
            f"PyJWT {lib_version('PyJWT')} PyJWKClient",
            [PY, str(HERE / "verify_py.py"), "--kind", "pyjwt", "--lifetime", L,
             "--cooldown", L, "--out", str(work / "v-pyjwt.jsonl"), *common],
            f"lifespan={L}s cooldown_duration={L}s",
            work / "v-pyjwt.jsonl",
        ),
        VerifierSpec(
            "jwcrypto",
            f"jwcrypto {lib_version('jwcrypto')} JWKSet",
            [PY, str(HERE / "verify_py.py"), "--kind", "jwcrypto", "--lifetime", L,
             "--cooldown", L, "--out", str(work / "v-jwcrypto.jsonl"), *common],
            f"Cache-Control max-age (={L}s), unknown-kid refresh after {L}s",
            work / "v-jwcrypto.jsonl",
        ),
    ]  # fmt: skip
    if s.node:
        jose = ensure_node_modules()
        specs.append(
            VerifierSpec(
                "jose",
                f"jose {jose} createRemoteJWKSet (node {node_version()})",
                ["node", str(HERE / "verify_node.mjs"), "--lifetime", L, "--cooldown", L,
                 "--out", str(work / "v-jose.jsonl"), *common],
                f"cacheMaxAge={L}s cooldownDuration={L}s",
                work / "v-jose.jsonl",
            )
        )  # fmt: skip
    return specs


def node_version() -> str:
    try:
        return subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        return "?"


# --------------------------------------------------------------------------- environments


class Env:
    """One backend's setup: config text, environment, origin, faults it supports."""

    name = "file"
    publisher = "site"

    def __init__(self, s: Settings, work: Path) -> None:
        self.s, self.work = s, work
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYMGR_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.jwks_path = work / "public" / ".well-known" / "jwks.json"

    @property
    def cache_control(self) -> str:
        return f"public, max-age={self.s.cache}"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def state_url(self) -> str:
        return "file:state.json"

    def backend_toml(self) -> str:
        return '[backends.local]\ntype = "file"\npath = "keys"\nmaster_key_file = "master.key"\n'

    def publisher_toml(self) -> str:
        return (
            f'[publishers.site]\ntype = "file"\npath = "public/.well-known/jwks.json"\n'
            f'cache_control = "{self.cache_control}"\n'
        )

    def backend_name(self) -> str:
        return "local"

    def origin(self) -> FileOrigin | HttpOrigin:
        return FileOrigin(self.jwks_path, self.cache_control)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        raise NotImplementedError
        yield


class KmsEnv(Env):
    name = "aws-kms"
    publisher = "s3"
    BUCKET = "keymgr-soak"
    KEY = "soak/jwks.json"  # not .well-known/jwks.json: moto routes that to Cognito

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests import servers_moto

        self.mod = servers_moto
        for name in servers_moto._AWS_ENV_TO_CLEAR:
            self.env.pop(name, None)
        self.env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # moto's fake credentials
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
            AWS_CONFIG_FILE=str(self.work / "aws-config-absent"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.work / "aws-credentials-absent"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})
        for name in servers_moto._AWS_ENV_TO_CLEAR:
            os.environ.pop(name, None)
        self.server = servers_moto.start_moto(self.work)
        import boto3

        boto3.client("s3", endpoint_url=self.server.url, region_name=REGION).create_bucket(
            Bucket=self.BUCKET
        )

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def state_url(self) -> str:
        if not self.s.cloud_state:
            return super().state_url()
        return (
            f"s3://{self.BUCKET}/soak/state.json?endpoint_url={self.server.url}&region={REGION}"
            "&connect_timeout=1&read_timeout=2&max_attempts=2"
        )

    def _conn(self) -> str:
        return (
            f'endpoint_url = "{self.server.url}"\nregion = "{REGION}"\n'
            "connect_timeout = 1\nread_timeout = 2\nmax_attempts = 2\n"
        )

    def backend_toml(self) -> str:
        return f'[backends.kms]\ntype = "aws-kms"\nalias_prefix = "soak"\n{self._conn()}'

    def backend_name(self) -> str:
        return "kms"

    def publisher_toml(self) -> str:
        return (
            f'[publishers.s3]\ntype = "s3"\nbucket = "{self.BUCKET}"\nkey = "{self.KEY}"\n'
            f'cache_control = "{self.cache_control}"\n{self._conn()}'
        )

    def origin(self) -> FileOrigin | HttpOrigin:
        return HttpOrigin(f"{self.server.url}/{self.BUCKET}/{self.KEY}")

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self.server.outage():
            yield


class VaultEnv(Env):
    name = "vault-transit"

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests import servers_bao

        if servers_bao.bao_binary() is None:
            raise RuntimeError("OpenBao (bao) not installed")
        for k in list(self.env):
            if k.startswith(("VAULT_", "BAO_")):
                del self.env[k]
        self.server = servers_bao.start_bao(self.work)
        self.env["VAULT_ADDR"] = self.server.addr
        self.env["VAULT_TOKEN"] = self.server.token
        os.environ["VAULT_ADDR"] = self.server.addr
        os.environ["VAULT_TOKEN"] = self.server.token

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def state_url(self) -> str:
        if not self.s.cloud_state:
            return super().state_url()
        return f"vault://secret/keymgr-soak-{self.work.name}?timeout=2"

    def backend_toml(self) -> str:
        return (
            f'[backends.vault]\ntype = "vault-transit"\nurl = "{self.server.addr}"\n'
            'mount = "transit"\nkey_prefix = "soak-"\ntimeout = 2\n'
        )

    def backend_name(self) -> str:
        return "vault"

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self.server.outage():
            yield


ENVS: dict[str, type[Env]] = {"file": Env, "aws-kms": KmsEnv, "vault-transit": VaultEnv}


# --------------------------------------------------------------------------- the soak


@dataclass
class CheckResult:
    label: str
    t: float
    ok: bool
    problems: list[str] = field(default_factory=list)
    recovered_in: float | None = None
    rejections_so_far: int = 0
    keys: int = 0


class Soak:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.rng = random.Random(s.seed)
        self.checks: list[CheckResult] = []
        self.faults: list[dict[str, Any]] = []
        self.known: dict[str, str] = {}  # kid -> last state seen
        self.config_warnings: list[str] = []
        self.failures: list[str] = []
        self.passed = False
        self.t0 = now()

    # -- setup -------------------------------------------------------------

    def write_config(self) -> Path:
        s, e = self.s, self.env
        subprocess.run(
            [PY, "-m", "keymgr.cli", "init", "--dir", str(self.work)],
            check=True, capture_output=True, env=e.env, cwd=REPO,
        )  # fmt: skip
        cfg = self.work / "keymgr.toml"
        cfg.write_text(
            "# written by benchmarks/soak.py\n"
            f'[daemon]\nstate = "{e.state_url()}"\naudit_log = "audit.jsonl"\n'
            'reconcile_interval = "1s"\nlisten = "127.0.0.1:0"\nlease_ttl = "3s"\n\n'
            f"{e.backend_toml()}\n{e.publisher_toml()}\n"
            f'[keyrings.{RING}]\nbackend = "{e.backend_name()}"\nalgorithm = "ES256"\n'
            f'rotation_period = "{s.period}s"\npublish_ahead = "{s.publish_ahead}s"\n'
            f'retire_grace = "{s.retire_grace}s"\ndestroy_after = "{s.destroy_after}s"\n'
            f'publishers = ["{e.publisher}"]\n'
        )
        proc = self.cli("config", "check")
        if proc.returncode != 0:
            raise RuntimeError(f"config check failed: {proc.stderr.strip()}")
        self.config_warnings = [
            ln for ln in proc.stderr.splitlines() if ln.startswith("keymgr: warning:")
        ]
        return cfg

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "keymgr.cli", "--config", str(self.work / "keymgr.toml"), *args],
            capture_output=True, text=True, env=self.env.env, cwd=self.work, timeout=timeout,
        )  # fmt: skip

    # -- observation ----------------------------------------------------------

    def rotations(self) -> int:
        return max(0, len(self.issuer.kids_used()) - 1)

    def rejections(self) -> list[dict[str, Any]]:
        out = []
        for v in self.verifiers:
            out += [
                {**r, "verifier": v.name}
                for r in read_jsonl(v.out)
                if r.get("ev") == "check" and not r.get("ok")
            ]
        return out

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        if proc.returncode != 0:
            raise RuntimeError(f"status --json exited {proc.returncode}: {proc.stderr.strip()}")
        return dict(json.loads(proc.stdout))

    def wait_recovered(self, timeout: float = 30) -> tuple[float | None, str]:
        """Until the daemon has re-published: publisher record fresh, served JWKS == state."""
        km = self.checker
        t0 = time.monotonic()
        why = ""
        while time.monotonic() - t0 < timeout:
            self.daemon.poll()
            try:
                st = km.state()
                ring = st.ring(RING)
                rec = st.publishers.get(self.env.publisher)
                want = {k.kid for k in ring.keys if k.state in IN_JWKS}
                body, _ = self.origin.read()
                served = kids_of(json.loads(body)) if body else set()
                if ring.active is None:
                    why = "no active key"
                elif rec is None or rec.stale:
                    why = "publisher record stale"
                elif served != want:
                    why = f"served {sorted(map(short, served))} != state {sorted(map(short, want))}"
                else:
                    return time.monotonic() - t0, ""
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        return None, why

    def check_all(self, label: str) -> CheckResult:
        """The invariants, after a fault (or at the end)."""
        res = CheckResult(label, now(), True)
        rec_t, why = self.wait_recovered()
        res.recovered_in = rec_t
        if rec_t is None:
            res.problems.append(f"not recovered within 30s: {why}")
        try:
            self._check_state(res)
        except Exception as e:
            res.problems.append(f"state check failed: {type(e).__name__}: {e}")
        self._check_audit(res)
        rej = self.rejections()
        res.rejections_so_far = len(rej)
        if rej and not self.s.misconfigure:
            res.problems.append(f"{len(rej)} rejection(s) of valid tokens so far")
        if self.watcher.private_leaks:
            res.problems.append(f"private members published: {self.watcher.private_leaks[:3]}")
        res.ok = not res.problems
        self.checks.append(res)
        log(
            f"check {label}: {'ok' if res.ok else 'FAILED'}"
            + (f" (recovered in {rec_t:.1f}s)" if rec_t is not None else "")
            + "".join(f"\n    - {p}" for p in res.problems)
        )
        return res

    def _check_state(self, res: CheckResult) -> None:
        s = self.s
        doc = self.status()
        ring = doc["rings"].get(RING)
        if ring is None:
            res.problems.append(f"ring {RING} missing from status")
            return
        keys = ring["keys"]
        res.keys = len(keys)
        by_kid = {k["kid"]: k for k in keys}
        active = [k for k in keys if k["state"] == "active"]
        if len(active) != 1:
            res.problems.append(f"{len(active)} active keys (want exactly 1)")
        first = min(keys, key=lambda k: k["created_at"])["kid"] if keys else None
        for k in keys:
            st, kid = k["state"], short(k["kid"])
            if st not in STATE_ORDER and st != "revoked":
                res.problems.append(f"{kid}: unknown state {st}")
                continue
            times = [parse_ts(k.get(f)) for f in
                     ("created_at", "published_at", "activated_at", "retired_at", "expired_at",
                      "destroyed_at")]  # fmt: skip
            present = [t for t in times if t is not None]
            if present != sorted(present):
                res.problems.append(f"{kid}: timestamps out of order {times}")
            need = STATE_ORDER.index(st) if st in STATE_ORDER else 0
            missing = [f for f, t in zip(STATE_ORDER[1:], times[1:], strict=True)
                       if STATE_ORDER.index(f) <= need and t is None]  # fmt: skip
            if missing:
                res.problems.append(f"{kid}: state {st} but no time for {missing}")
            pub, act, ret, exp, des = times[1:]
            if (
                act is not None
                and pub is not None
                and k["kid"] != first
                and act - pub < s.publish_ahead
            ):
                res.problems.append(
                    f"{kid}: promoted {act - pub:.0f}s after publication (< A={s.publish_ahead}s)"
                )
            if ret is not None and exp is not None and exp - ret < s.retire_grace:
                res.problems.append(f"{kid}: unpublished {exp - ret:.0f}s after retiring (< G)")
            if exp is not None and des is not None and des - exp < s.destroy_after:
                res.problems.append(f"{kid}: destroyed {des - exp:.0f}s after expiring (< D)")
        # Nothing recorded is ever lost, and states only move forward.
        for kid, old in self.known.items():
            k = by_kid.get(kid)
            if k is None:
                res.problems.append(
                    f"{short(kid)}: recorded earlier ({old}), now missing from state"
                )
            elif (
                k["state"] in STATE_ORDER
                and old in STATE_ORDER
                and (STATE_ORDER.index(k["state"]) < STATE_ORDER.index(old))
            ):
                res.problems.append(f"{short(kid)}: state went back from {old} to {k['state']}")
        for k in keys:
            self.known[k["kid"]] = k["state"]
        # Private material and the served JWKS agree with state. The daemon keeps
        # working meanwhile, so look at a few snapshots before calling it a fault.
        for _ in range(10):
            problems = self._consistency()
            if not problems:
                break
            time.sleep(0.3)
        res.problems += problems

    def _consistency(self) -> list[str]:
        """Backend keys and served JWKS against one ``status`` (listings taken around it)."""
        problems = []
        listed_before = set(self.backend.list_keys(RING))
        # In-process KeyManager.status() (what `status --json` prints): milliseconds,
        # so the two reads of the served JWKS bracket it tightly.
        served_before = self._served()
        keys = self.checker.status()["rings"][RING]["keys"]
        served_after = self._served()
        listed_after = set(self.backend.list_keys(RING))
        for k in keys:
            kid, st = k["kid"], k["state"]
            if st in HAS_PRIVATE and kid not in listed_before | listed_after:
                problems.append(f"{short(kid)}: {st} in state but gone from backend")
            if st == "destroyed" and kid in listed_after:
                problems.append(f"{short(kid)}: destroyed but still in backend")
        want = {k["kid"] for k in keys if k["state"] in IN_JWKS}
        pending = {k["kid"] for k in keys if k["state"] == "pending"}
        for served in (served_before, served_after):
            if not want <= served or served - want - pending:
                problems.append(
                    f"served JWKS {sorted(map(short, served))} != state {sorted(map(short, want))}"
                )
                break
        return problems

    def _served(self) -> set[str]:
        body, _ = self.origin.read()
        return kids_of(json.loads(body)) if body else set()

    def _check_audit(self, res: CheckResult) -> None:
        for attempt in range(3):
            proc = self.cli("audit", "verify")
            if proc.returncode == 0:
                return
            # The daemon may be appending at this very moment: a torn last
            # line that is gone a moment later is not damage.
            if "incomplete last line" not in proc.stderr or attempt == 2:
                res.problems.append(f"audit verify: {proc.stderr.strip()}")
                return
            time.sleep(0.5)

    # -- faults ----------------------------------------------------------------

    def fault_loop(self) -> None:
        kinds = list(self.s.fault_kinds)
        i = 0
        while not self.stop_faults.is_set():
            if self.stop_faults.wait(self.rng.uniform(0.5, 1.5) * self.s.period):
                break
            kind = kinds[i % len(kinds)]
            i += 1
            try:
                self.fault(kind)
            except Exception as e:
                self.failures.append(f"fault {kind}: {type(e).__name__}: {e}")
                log(traceback.format_exc())

    def fault(self, kind: str) -> None:
        t0 = now()
        info: dict[str, Any] = {"kind": kind, "at": round(t0 - self.t0, 2)}
        if kind == "kill":
            self.daemon.kill()
            down = self.rng.uniform(0.2, 1.5)
            time.sleep(down)
            self.daemon.start()
            info["detail"] = f"SIGKILL, restarted after {down:.1f}s"
        elif kind == "block":
            d = self.env.jwks_path.parent
            hidden = d.with_name(d.name + ".soak-hidden")
            hold = self.rng.uniform(0.6, 1.2) * self.s.period
            origin = self.origin
            assert isinstance(origin, FileOrigin)
            origin.fallback = hidden / self.env.jwks_path.name
            d.rename(hidden)
            d.write_text("publish target made unwritable by benchmarks/soak.py\n")
            try:
                time.sleep(hold)
            finally:
                d.unlink()
                try:
                    hidden.rename(d)
                except OSError:  # the daemon made a fresh directory in between: keep it
                    shutil.rmtree(hidden)
                origin.fallback = None
            info["detail"] = f"JWKS directory replaced by a file for {hold:.1f}s"
        elif kind == "pause":
            hold = self.rng.uniform(2.0, 4.0)
            with self.env.pause():
                time.sleep(hold)
            info["detail"] = f"{self.env.name} server SIGSTOPped for {hold:.1f}s"
        else:
            raise ValueError(kind)
        log(f"fault {kind}: {info['detail']}")
        res = self.check_all(f"after {kind}")
        info.update(
            ok=res.ok,
            recovered_in=None if res.recovered_in is None else round(res.recovered_in, 2),
            problems=res.problems,
        )
        self.faults.append(info)

    # -- run -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.s
        self.work = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="keymgr-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        log(f"workdir {self.work} seed {s.seed}")
        self.env = ENVS[s.backend](s, self.work)
        self.verifiers: list[VerifierSpec] = []
        self.daemon: Daemon | None = None  # type: ignore[assignment]
        edge: Edge | None = None
        try:
            self.env.start()
            cfg = self.write_config()
            from keymgr import KeyManager
            from keymgr.config import load_config

            self.checker = KeyManager(load_config(cfg), actor="soak-check")
            self.backend = self.checker.config.backends[self.env.backend_name()]
            self.origin = self.env.origin()
            edge = Edge(self.origin)
            edge.start()
            self.watcher = Watcher(self.origin, edge)
            self.watcher.start()
            queue = self.work / "tokens.jsonl"
            queue.touch()
            self.daemon = Daemon(cfg, self.env.env, self.work / "daemon.log")
            self.daemon.start()
            self.issuer = Issuer(cfg, queue, s, self.rng)
            self.issuer.start()
            # Verifiers start once the first key is served, like services deployed after it.
            deadline = time.monotonic() + 60
            while not self.watcher.current and time.monotonic() < deadline:
                self.daemon.poll()
                time.sleep(0.1)
            if not self.watcher.current:
                raise RuntimeError(f"no JWKS published within 60s; see {self.work}/daemon.log")
            self.verifiers = verifier_specs(s, edge.url, queue, self.work)
            for i, v in enumerate(self.verifiers):
                if i:
                    # Staggered, so their cache refreshes fall at different
                    # moments of the rotation cycle.
                    time.sleep(s.cache / len(self.verifiers) * self.rng.uniform(0.5, 1.5))
                v.proc = subprocess.Popen(
                    v.cmd, cwd=HERE, stderr=(self.work / f"v-{v.name}.err").open("wb")
                )
            names = ", ".join(v.name for v in self.verifiers)
            log(f"verifiers: {names}; target {s.rotations} rotations")

            self.stop_faults = threading.Event()
            fault_thread = threading.Thread(target=self.fault_loop, daemon=True)
            if s.faults:
                fault_thread.start()
            deadline = time.monotonic() + s.max_seconds
            last = -1
            while self.rotations() < s.rotations and time.monotonic() < deadline:
                if not fault_thread.is_alive():
                    self.daemon.poll()
                for v in self.verifiers:
                    if v.proc is not None and v.proc.poll() is not None:
                        raise RuntimeError(
                            f"verifier {v.name} exited {v.proc.returncode}: "
                            f"{(self.work / f'v-{v.name}.err').read_text()[-1500:]}"
                        )
                if self.rotations() != last:
                    last = self.rotations()
                    log(f"rotations {last}/{s.rotations}, tokens {len(self.issuer.tokens)}, "
                        f"rejections {len(self.rejections())}")  # fmt: skip
                time.sleep(0.2)
            if self.rotations() < s.rotations:
                self.failures.append(
                    f"only {self.rotations()} rotations within {s.max_seconds:.0f}s"
                )
            self.stop_faults.set()
            if fault_thread.is_alive():
                fault_thread.join(timeout=120)
            self.issuer.end()
            for v in self.verifiers:
                assert v.proc is not None
                try:
                    rc = v.proc.wait(timeout=s.ttl + 30)
                except subprocess.TimeoutExpired:
                    v.proc.kill()
                    rc = v.proc.wait()
                    self.failures.append(f"verifier {v.name} did not finish")
                if rc != 0:
                    err = (self.work / f"v-{v.name}.err").read_text()[-1500:]
                    self.failures.append(f"verifier {v.name} exited {rc}: {err}")
            self.check_all("end (daemon running)")
            rc = self.daemon.stop()
            if rc != 0:
                self.failures.append(f"daemon stop (SIGTERM) exited {rc}")
            self.watcher.stop_ev.set()
            self._final_audit()
            report = self.report(edge)
            self.passed = bool(report["passed"])
            return report
        finally:
            for v in self.verifiers:
                if v.proc is not None and v.proc.poll() is None:
                    v.proc.kill()
                    v.proc.wait()
            if self.daemon is not None:
                self.daemon.stop()
            if edge is not None:
                edge.stop()
            self.env.stop()
            if s.keep or s.workdir or not self.passed:
                log(f"workdir kept: {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)

    def _final_audit(self) -> None:
        proc = self.cli("audit", "verify")
        if proc.returncode != 0:
            self.failures.append(f"final audit verify: {proc.stderr.strip()}")
        events = [json.loads(x) for x in self.cli("audit", "show", "--json").stdout.splitlines()]
        self.audit_counts = Counter(e["event"] for e in events)
        # Invariant 7, across every SIGKILL: each transition recorded in state
        # has exactly one audit event.
        per_key = Counter((e["event"], e.get("kid")) for e in events)
        for k in self.status()["rings"][RING]["keys"]:
            kid = k["kid"]
            made = per_key[("key.generated", kid)] + per_key[("key.adopted", kid)]
            if made != 1:
                self.failures.append(f"{short(kid)}: {made} creation events (want 1)")
            for f, ev in TRANSITION_EVENTS.items():
                want = 1 if k.get(f) else 0
                if per_key[(ev, kid)] != want:
                    self.failures.append(
                        f"{short(kid)}: {per_key[(ev, kid)]} {ev} events, want {want}"
                    )

    # -- report ----------------------------------------------------------------

    def report(self, edge: Edge) -> dict[str, Any]:
        s = self.s
        tokens = self.issuer.tokens
        first_use, last_exp = self.issuer.first_use, self.issuer.last_exp
        used = sorted(first_use, key=lambda k: first_use[k])
        seen = self.watcher.first_seen
        removed = self.watcher.removed
        # Publication -> first use, per rotated key (the first key was bootstrapped).
        pub_gaps = {k: first_use[k] - seen[k] for k in used[1:] if k in seen}
        # Last valid moment of any token of a key -> the key leaves the JWKS.
        ret_margins = {k: removed[k] - last_exp[k] for k in used if k in removed}
        verifiers = []
        for v in self.verifiers:
            recs = read_jsonl(v.out)
            checks = [r for r in recs if r.get("ev") == "check"]
            rej = [r for r in checks if not r.get("ok")]
            fetches = [r for r in recs if r.get("ev") == "fetch"]
            first_fetch: dict[str, float] = {}
            for f in fetches:
                for k in f.get("kids", []):
                    first_fetch.setdefault(k, f["t"])
            gaps = [first_use[k] - first_fetch[k] for k in used[1:] if k in first_fetch]
            verifiers.append(
                {
                    "name": v.name,
                    "library": v.library,
                    "cache": v.cache,
                    "checked": len(checks),
                    "fresh": sum(1 for r in checks if r.get("phase") == "fresh"),
                    "late": sum(1 for r in checks if r.get("phase") == "late"),
                    "skipped": sum(1 for r in recs if r.get("ev") == "skip"),
                    "rejected": len(rej),
                    "reasons": dict(Counter(
                        f"{r.get('phase')}: {normalise_reason(r.get('reason', ''))}" for r in rej
                    ).most_common()),
                    "kids_seen": len({r.get("kid") for r in checks}),
                    "fetches": len(fetches),
                    "pub_to_use_gap_max": round(max(gaps), 3) if gaps else None,
                    "pub_to_use_gap_min": round(min(gaps), 3) if gaps else None,
                    "done": any(r.get("ev") == "done" for r in recs),
                }
            )  # fmt: skip
        rejected = sum(v["rejected"] for v in verifiers)
        checks_ok = all(c.ok for c in self.checks)
        if s.misconfigure:
            passed = rejected > 0
        else:
            passed = (
                rejected == 0
                and checks_ok
                and not self.failures
                and not self.daemon.unexpected_exits
                and all(v["done"] for v in verifiers)
            )
        return {
            "passed": passed,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": asdict(s),
            "keymgr_settings": {
                "rotation_period": s.period,
                "publish_ahead": s.publish_ahead,
                "retire_grace": s.retire_grace,
                "destroy_after": s.destroy_after,
                "verifier_cache_max": s.cache,
                "cache_control": self.env.cache_control,
                "clock_skew": s.skew,
                "token_ttl": s.ttl,
                "state_store": self.env.state_url().split(":", 1)[0],
            },
            "config_warnings": self.config_warnings,
            "wall_seconds": round(now() - self.t0, 1),
            "rotations": self.rotations(),
            "tokens_issued": len(tokens),
            "issuer_errors": dict(self.issuer.errors.most_common()),
            "rejections": rejected,
            "verifiers": verifiers,
            "publication_to_first_use": {
                "min": round(min(pub_gaps.values()), 3) if pub_gaps else None,
                "max": round(max(pub_gaps.values()), 3) if pub_gaps else None,
                "keys": len(pub_gaps),
            },
            "last_expiry_to_unpublication": {
                "min": round(min(ret_margins.values()), 3) if ret_margins else None,
                "keys": len(ret_margins),
            },
            "keys": [
                {
                    "kid": k,
                    "served_at": round(seen[k] - self.t0, 3) if k in seen else None,
                    "first_use": round(first_use[k] - self.t0, 3),
                    "publication_to_first_use": round(pub_gaps[k], 3) if k in pub_gaps else None,
                    "unserved_at": round(removed[k] - self.t0, 3) if k in removed else None,
                    "last_expiry_to_unpublication": (
                        round(ret_margins[k], 3) if k in ret_margins else None
                    ),
                }
                for k in used
            ],
            "keys_republished_after_removal": len(self.watcher.reappeared),
            "private_members_published": self.watcher.private_leaks,
            "edge": {"requests": edge.requests, "stale_served": edge.stale},
            "daemon": {
                "starts": self.daemon.starts,
                "sigkills": self.daemon.kills,
                "unexpected_exits": self.daemon.unexpected_exits,
            },
            "faults": self.faults,
            "checks": [asdict(c) for c in self.checks],
            "audit_events": dict(getattr(self, "audit_counts", {})),
            "failures": self.failures,
        }


def render(r: dict[str, Any]) -> str:
    k = r["keymgr_settings"]
    s = r["settings"]
    lines = [
        f"keymgr rollover soak — backend {s['backend']}"
        + (" — MISCONFIGURED (publish_ahead < verifier cache)" if s["misconfigure"] else "")
        + f" — {r['date']}",
        f"settings: P={k['rotation_period']}s A={k['publish_ahead']}s G={k['retire_grace']}s "
        f"D={k['destroy_after']}s; verifier cache <= {k['verifier_cache_max']}s "
        f"(Cache-Control: {k['cache_control']}); clock skew +-{k['clock_skew']}s; "
        f"token ttl {k['token_ttl']}s; state store {k['state_store']}; "
        f"faults {'on' if s['faults'] else 'off'}; seed {s['seed']}",
    ]
    for w in r["config_warnings"]:
        lines.append(f"config check: {w}")
    p, m = r["publication_to_first_use"], r["last_expiry_to_unpublication"]
    lines += [
        f"rotations {r['rotations']}, tokens issued {r['tokens_issued']}, "
        f"wall {r['wall_seconds']}s, rejections {r['rejections']}",
        f"publication -> first use: min {p['min']}s max {p['max']}s over {p['keys']} keys "
        f"(A = {k['publish_ahead']}s)",
        f"last token expiry -> key unpublished: min margin {m['min']}s over {m['keys']} keys",
        "",
        f"{'verifier':9} {'checked':>7} {'fresh':>6} {'late':>6} {'skip':>4} {'rejected':>8} "
        f"{'kids':>4} {'fetches':>7} {'pub->use gap min/max':>21}  library / cache",
    ]
    for v in r["verifiers"]:
        gap = f"{v['pub_to_use_gap_min']}/{v['pub_to_use_gap_max']}"
        lines.append(
            f"{v['name']:9} {v['checked']:>7} {v['fresh']:>6} {v['late']:>6} {v['skipped']:>4} "
            f"{v['rejected']:>8} {v['kids_seen']:>4} {v['fetches']:>7} {gap:>21}  "
            f"{v['library']}; {v['cache']}"
        )
        for reason, n in v["reasons"].items():
            lines.append(f"    {n} x {reason}")
    if r["issuer_errors"]:
        lines.append("issuer errors (not rejections): " + "; ".join(
            f"{n} x {e}" for e, n in r["issuer_errors"].items()))  # fmt: skip
    if r["faults"]:
        lines.append("")
        lines.append(f"faults ({len(r['faults'])}):")
        for f in r["faults"]:
            verdict = "ok" if f["ok"] else "FAILED: " + "; ".join(f["problems"])
            lines.append(
                f"  t+{f['at']:>6}s {f['kind']:5} {f['detail']}; recovered in "
                f"{f['recovered_in']}s; checks {verdict}"
            )
    d = r["daemon"]
    lines.append(
        f"daemon: {d['starts']} starts, {d['sigkills']} SIGKILLs, "
        f"unexpected exits {d['unexpected_exits'] or 'none'}; edge served stale "
        f"{r['edge']['stale_served']}/{r['edge']['requests']} requests"
    )
    end = [c for c in r["checks"] if c["label"].startswith("end")]
    if end:
        lines.append(
            "final checks: "
            + ("ok" if end[-1]["ok"] else "FAILED: " + "; ".join(end[-1]["problems"]))
        )
    for f in r["failures"]:
        lines.append(f"FAILURE: {f}")
    note = " (rejections seen, as they must be)" if s["misconfigure"] and r["passed"] else ""
    lines.append("RESULT: " + ("PASS" if r["passed"] else "FAIL") + note)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description="keymgr rollover soak (see the module docstring)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Settings()
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--rotations", type=int, default=d.rotations)
    p.add_argument("--period", type=int, default=d.period, help="rotation_period P (s)")
    p.add_argument(
        "--cache",
        type=int,
        default=d.cache,
        help="longest verifier JWKS cache lifetime L (s), also the max-age",
    )
    p.add_argument("--skew", type=int, default=d.skew, help="clock skew allowance S (s)")
    p.add_argument("--ttl", type=int, default=d.ttl, help="token lifetime T (s)")
    p.add_argument(
        "--resolution",
        type=int,
        default=d.resolution,
        help="extra margin R added to A and G (s)",
    )
    p.add_argument("--publish-ahead", type=int, default=0, help="A (s); default L + R")
    p.add_argument(
        "--retire-grace", type=int, default=0, help="G (s); default T + S + R (+1 cloud state)"
    )
    p.add_argument("--destroy-after", type=int, default=d.destroy_after)
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="tokens per second (default 20; 10 for cloud backends)",
    )
    p.add_argument("--faults", action="store_true", help="inject faults (see docstring)")
    p.add_argument("--fault-kinds", default="", help="comma list of kill,block,pause")
    p.add_argument(
        "--misconfigure",
        action="store_true",
        help="publish_ahead shorter than the verifiers' cache: must show rejections",
    )
    p.add_argument(
        "--cloud-state",
        action="store_true",
        help="keep state in S3 (aws-kms) or Vault KV (vault-transit) instead of a file",
    )
    p.add_argument("--no-node", action="store_true", help="without the Node jose verifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=0.0)
    p.add_argument("--workdir", help="keep everything here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    a = p.parse_args(argv)  # fmt: skip
    s = Settings(
        backend=a.backend, rotations=a.rotations, period=a.period, cache=a.cache, skew=a.skew,
        ttl=a.ttl, resolution=a.resolution, publish_ahead=a.publish_ahead,
        retire_grace=a.retire_grace, destroy_after=a.destroy_after,
        rate=a.rate or (20.0 if a.backend == "file" else 10.0), faults=a.faults,
        fault_kinds=tuple(x for x in a.fault_kinds.split(",") if x),
        misconfigure=a.misconfigure, cloud_state=a.cloud_state, node=not a.no_node, seed=a.seed,
        max_seconds=a.max_seconds, workdir=a.workdir, keep=a.keep,
    )  # fmt: skip
    return s, a


def main(argv: list[str] | None = None) -> int:
    s, a = parse_args(argv)
    s.resolve()
    err = s.check()
    if err:
        print(f"soak: error: {err}", file=sys.stderr)
        return 2
    if s.node and node_tools() is not None:
        print(f"soak: error: {node_tools()} (use --no-node to run without jose)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    try:
        report = Soak(s).run()
    except RuntimeError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 1
    print(render(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
