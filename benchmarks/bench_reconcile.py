"""Reconcile and status at scale: 100, 1,000 and 10,000 rings on the local backend.

    .venv/bin/python benchmarks/bench_reconcile.py [--sizes 100,1000,10000] [--profile]
                                                  [--smoke] [--json FILE]

Fixture: a config with N ES256 rings sharing one file backend and one JWKS
file, bootstrapped once through the real code path (``KeyManager.reconcile``)
and cached under ``$KEYMGR_BENCH_CACHE`` (default ``/tmp/keymgr-bench``); every
measurement runs on a fresh copy. One ring in ten has a 2-day rotation period,
the others 30 days. Measured, wall clock, best of several runs:

- ``config``   ``load_config`` (TOML parse and validation of N rings);
- ``steady``   a pass at T0 + 1 day, nothing due: ``cold`` is the first pass of
               a new ``KeyManager`` (parses the state document), ``warm`` a
               following one (what the daemon does every interval);
- ``rotate``   a pass at T0 + 2 days, 10% of the rings due: generate, publish
               (one JWKS write) and mark published, all fsynced; then
               ``promote``, a pass one publish_ahead later (promote + retire);
- ``status``   ``keymgr status --json`` as a subprocess, whole command.

Targets: steady pass over 10,000 rings < 1 s (cold), ``status --json`` over
10,000 rings < 2 s, and linear growth (per-ring cost flat from 1,000 up).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c


def best_of(n: int, f: Any) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int, cache: Path, repeat: int, profile: bool) -> dict[str, Any]:
    from keymgr.config import load_config
    from keymgr.manager import KeyManager

    src = c.scale_fixture(n, 0.1, cache)
    out: dict[str, Any] = {"rings": n}
    tmp = Path(tempfile.mkdtemp(prefix=f"keymgr-bench-rec-{n}-"))
    try:
        home = c.copy_home(src, tmp)
        cfg = home / "keymgr.toml"
        out["config_s"] = best_of(repeat, lambda: load_config(cfg))
        steady = c.at(days=1)
        colds, warms = [], []
        for _ in range(repeat):
            km = KeyManager.from_config(cfg, actor="bench")
            t0 = time.perf_counter()
            res = km.reconcile(steady)
            colds.append(time.perf_counter() - t0)
            assert res.ok and not res.events, (res.failures, res.events[:2])
            for _ in range(2):
                t0 = time.perf_counter()
                res = km.reconcile(steady)
                warms.append(time.perf_counter() - t0)
                assert res.ok and not res.events
        out["steady_cold_s"] = min(colds)
        out["steady_warm_s"] = min(warms)
        if profile:
            import cProfile
            import pstats

            km = KeyManager.from_config(cfg, actor="bench")
            prof = cProfile.Profile()
            prof.runcall(km.reconcile, steady)
            print(f"\n## cProfile: cold steady-state pass over {n} rings")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)

        status_cmd = [c.venv_bin("keymgr"), "--config", str(cfg), "status", "--json"]
        doc = json.loads(subprocess.run(status_cmd, check=True, capture_output=True).stdout)
        assert len(doc["rings"]) == n
        out["status_s"] = min(c.wall(status_cmd, env=c.clean_env()) for _ in range(repeat))

        rot, prom = [], []
        due = sum(1 for i in range(n) if i % 10 == 0)
        for i in range(max(1, repeat - 1)):
            copy = c.copy_home(src, tmp, f"rot{i}")
            km = KeyManager.from_config(copy / "keymgr.toml", actor="bench")
            km.reconcile(steady)  # warm: the pass below is not a first load
            t0 = time.perf_counter()
            res = km.reconcile(c.at(days=2))
            rot.append(time.perf_counter() - t0)
            gen = sum(1 for e in res.events if e["event"] == "key.generated")
            assert res.ok and gen == due, (res.failures[:2], gen, due)
            t0 = time.perf_counter()
            res = km.reconcile(c.at(days=2, hours=1))
            prom.append(time.perf_counter() - t0)
            promoted = sum(1 for e in res.events if e["event"] == "key.promoted")
            assert res.ok and promoted == due, (res.failures[:2], promoted, due)
            shutil.rmtree(copy)
        out["rotate_s"] = min(rot)
        out["promote_s"] = min(prom)
        out["rotating_rings"] = due
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    p = c.parser(__doc__)
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--profile", action="store_true", help="cProfile the largest steady pass")
    args = p.parse_args()
    c.quiet_logs()
    sizes = [20, 60] if args.smoke else [int(x) for x in args.sizes.split(",")]
    repeat = 2 if args.smoke else 3
    if args.smoke:
        cache = Path(tempfile.mkdtemp(prefix="keymgr-bench-cache-"))
    else:
        cache = c.default_cache()
    c.header("bench_reconcile: reconcile passes and status --json over many rings")
    results = []
    for n in sizes:
        t0 = time.perf_counter()
        c.scale_fixture(n, 0.1, cache)
        built = time.perf_counter() - t0
        if built > 1:
            print(f"# fixture of {n} rings built in {built:.1f} s (cached in {cache})")
        results.append(measure(n, cache, repeat, args.profile and n == max(sizes)))
    if args.smoke:
        shutil.rmtree(cache, ignore_errors=True)
    print()
    print(
        "| rings | config load | steady pass cold | steady pass warm | 10% rotating: "
        "generate+publish | promote | status --json |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['rings']:,} | {r['config_s'] * 1e3:.0f} ms | {r['steady_cold_s'] * 1e3:.0f} ms "
            f"| {r['steady_warm_s'] * 1e3:.0f} ms | {r['rotate_s'] * 1e3:.0f} ms "
            f"({r['rotating_rings']} keys) | {r['promote_s'] * 1e3:.0f} ms "
            f"| {r['status_s'] * 1e3:.0f} ms |"
        )
    print()
    print("per ring (linear growth = flat columns):")
    print("| rings | steady cold | steady warm | rotating (per rotating ring) | status |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        n = r["rings"]
        print(
            f"| {n:,} | {r['steady_cold_s'] / n * 1e6:.0f} us | "
            f"{r['steady_warm_s'] / n * 1e6:.0f} us | "
            f"{r['rotate_s'] / r['rotating_rings'] * 1e3:.2f} ms | "
            f"{r['status_s'] / n * 1e6:.0f} us |"
        )
    big = max(results, key=lambda r: r["rings"])
    if big["rings"] >= 10000:
        print()
        print(f"steady pass over {big['rings']:,} rings (cold) < 1 s: "
              f"{c.verdict(big['steady_cold_s'] < 1.0, args.smoke)} "
              f"({big['steady_cold_s']:.2f} s)")
        print(f"status --json over {big['rings']:,} rings < 2 s: "
              f"{c.verdict(big['status_s'] < 2.0, args.smoke)} ({big['status_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"reconcile": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
