"""The soak's command line: ``python -m benchmarks.soak [options]`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .settings import BACKENDS, ISSUERS, REPO, Settings


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="keymgr rollover soak (see the benchmarks.soak package docstring)",
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
    p.add_argument(
        "--fault-kinds",
        default="",
        help="comma list of kill,block,pause,edge-stale (default: every one the backend "
        "supports but edge-stale)",
    )
    p.add_argument(
        "--stale-if-error",
        type=float,
        default=d.stale_if_error,
        help="how long (s) the edge serves its last good copy while its origin fails; "
        "then it answers 503",
    )
    p.add_argument(
        "--verify-edge",
        action="store_true",
        help="list the edge in the publisher's verify_urls: keymgr probes it and "
        "promotes a key only once the edge serves it",
    )
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
    p.add_argument(
        "--issuer",
        choices=ISSUERS,
        default=d.issuer,
        help="api: KeyManager.sign in this process; service: the daemon's signing service "
        "([service], Unix socket in the workdir)",
    )
    p.add_argument(
        "--migrate",
        default="",
        metavar="ALG,ALG[,...]",
        help="change the ring's algorithm during the run (e.g. RS256,ES256,EdDSA): start "
        "with the first, then the next (cycling) after every --migrate-every rotations, "
        "config rewritten and SIGHUP; verifiers allow them all",
    )
    p.add_argument(
        "--migrate-every",
        type=int,
        default=d.migrate_every,
        metavar="N",
        help="with --migrate: change the algorithm when the N-th, 2N-th, ... key is in use",
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
        stale_if_error=a.stale_if_error, verify_edge=a.verify_edge,
        misconfigure=a.misconfigure, issuer=a.issuer,
        migrate=tuple(x.strip() for x in a.migrate.split(",") if x.strip()),
        migrate_every=a.migrate_every, cloud_state=a.cloud_state, node=not a.no_node, seed=a.seed,
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
    from .verifiers import node_tools

    if s.node and node_tools() is not None:
        print(f"soak: error: {node_tools()} (use --no-node to run without jose)", file=sys.stderr)
        return 2
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from .render import render
    from .runner import Runner

    try:
        report = Runner(s).run()
    except RuntimeError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 1
    print(render(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
