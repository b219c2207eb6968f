"""Start-up and footprint: ``keymgr --help``, ``keymgr status``, daemon RSS.

    .venv/bin/python benchmarks/bench_startup.py [--rings 100] [--instructions]
                                                 [--smoke] [--json FILE]

- ``--help`` and ``status`` (a bootstrapped one-ring home) are run as the
  console script, interleaved with a bare ``python -c pass`` (the interpreter's
  own start-up, the floor), best wall time of several runs each.
- With ``--instructions``, the same three commands once each under valgrind
  (``--tool=callgrind``): the instructions the whole process executes, a
  figure a loaded machine does not move (wall times do, by tens of ms).
- Which heavy modules a ``status`` process imports (structlog/asyncio,
  importlib.metadata, boto3, hvac, apscheduler, prometheus_client): none of
  them is needed to print the status of a local-backend home.
- The daemon: ``keymgr run`` on a home with ``--rings`` rings (local backend,
  bootstrapped), started, polled on ``/readyz`` until its first reconcile
  passed, then ``VmRSS`` / ``VmHWM`` from ``/proc/PID/status``; then SIGTERM.

Targets: ``--help`` < 150 ms, ``status`` < 400 ms, daemon RSS with 100 rings < 80 MB.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as c

HEAVY = ("structlog", "asyncio", "importlib.metadata", "boto3", "hvac", "apscheduler",
         "prometheus_client")


def best_wall(cmds: dict[str, list[str]], runs: int, **kw: Any) -> dict[str, float]:
    best = dict.fromkeys(cmds, float("inf"))
    for i in range(runs):
        names = list(cmds)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            best[name] = min(best[name], c.wall(cmds[name], **kw))
    return best


def instructions(cmd: list[str], **kw: Any) -> int | None:
    """Instructions (callgrind's Ir) of one run of ``cmd``; None without valgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    proc = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    return int(found.group(1)) if found else None


def status_imports(cfg: Path) -> list[str]:
    code = (
        "import sys, io, contextlib\n"
        "from keymgr.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['--config', {str(cfg)!r}, 'status'])\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=c.clean_env()).stdout.strip()
    return [m for m in out.split(",") if m]


def daemon_rss(home: Path, timeout: float = 120) -> dict[str, Any]:
    cfg = home / "keymgr.toml"
    port = c.free_port()
    cfg.write_text(re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"',
                          cfg.read_text()))
    return c.daemon_rss(cfg, c.clean_env(), timeout, stop_timeout=30)


def main() -> int:
    p = c.parser(__doc__)
    p.add_argument("--rings", type=int, default=100, help="rings of the daemon's home")
    p.add_argument("--instructions", action="store_true",
                   help="also count each command's instructions under valgrind (callgrind)")
    args = p.parse_args()
    c.quiet_logs()
    runs = 3 if args.smoke else 15
    rings = 5 if args.smoke else args.rings
    c.header("bench_startup: CLI start-up and daemon memory")
    tmp = Path(tempfile.mkdtemp(prefix="keymgr-bench-startup-"))
    try:
        small = c.scale_fixture(1, 0, None)
        home = c.copy_home(small, tmp, "one")
        shutil.rmtree(small, ignore_errors=True)
        cfg = home / "keymgr.toml"
        keymgr = c.venv_bin("keymgr")
        cmds = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "keymgr --help": [keymgr, "--help"],
            "keymgr status": [keymgr, "--config", str(cfg), "status"],
        }
        walls = best_wall(cmds, runs, env=c.clean_env())
        irs: dict[str, int | None] = {}
        if args.instructions:
            env = c.clean_env(PYTHONHASHSEED="0")
            irs = {name: instructions(cmd, env=env) for name, cmd in cmds.items()}
        heavy = status_imports(cfg)
        src = c.scale_fixture(rings, 0.1, None)
        dhome = c.copy_home(src, tmp, "daemon")
        shutil.rmtree(src, ignore_errors=True)
        mem = daemon_rss(dhome)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| measure | value | target |")
    print("| --- | ---: | --- |")
    print(f"| `python -c pass` (interpreter floor) | {walls['python -c pass'] * 1e3:.0f} ms | |")
    ok_help = walls["keymgr --help"] < 0.150
    ok_status = walls["keymgr status"] < 0.400
    ok_rss = mem["rss_mb"] < 80
    print(f"| `keymgr --help` | {walls['keymgr --help'] * 1e3:.0f} ms | < 150 ms: "
          f"{c.verdict(ok_help, args.smoke)} |")
    print(f"| `keymgr status` (1 ring) | {walls['keymgr status'] * 1e3:.0f} ms | < 400 ms: "
          f"{c.verdict(ok_status, args.smoke)} |")
    for name, ir in irs.items():
        value = f"{ir / 1e6:.1f} M" if ir is not None else "(no valgrind)"
        print(f"| `{name}`, instructions (callgrind) | {value} | |")
    print(f"| heavy modules imported by `status` | {', '.join(heavy) or 'none'} | none |")
    print(f"| daemon ready (first reconcile done), {rings} rings | {mem['ready_s']:.2f} s | |")
    print(f"| daemon VmRSS, {rings} rings | {mem['rss_mb']:.1f} MB | < 80 MB: "
          f"{c.verdict(ok_rss, args.smoke)} |")
    print(f"| daemon VmHWM (peak), {rings} rings | {mem['hwm_mb']:.1f} MB | |")
    print(f"\n(best wall time of {runs} interleaved runs each)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"startup": {**{k: v for k, v in walls.items()}, "heavy": heavy, **mem,
                         "instructions": irs}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
