"""JWKS publishing is skipped when the document is unchanged: no write, no upload.

    .venv/bin/python benchmarks/bench_jwks.py [--no-s3] [--smoke] [--json FILE]

A home with a few ES256 rings publishing to a JWKS file and (unless
``--no-s3``) to an S3 object on a moto server started here on loopback. The
daemon's own counter ``keymgr_jwks_publishes_total{publisher, result}``
(result = ``written`` or ``unchanged``) is fed with every pass, the JWKS file's
inode is watched (every write replaces it), and every S3 request of the
publisher's client is counted with a botocore event hook. Three phases:

1. ``steady``   passes with nothing due: no publish is even planned (the state
                records what each publisher confirmed); the file is untouched
                and S3 sees one GetObject per pass (the read-back that notices
                an out-of-band change) and no PutObject.
2. ``replay``   the state forgets what the publishers confirmed (as after a
                crash between the upload and the state commit): a publish is
                planned, the document is rebuilt, found identical on both
                targets, and not written: counter ``unchanged``, no PutObject.
3. ``rotate``   ``keymgr rotate`` adds a key: the document changes and is
                written once per publisher: counter ``written``, one PutObject.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c

BUCKET = "bench-jwks"


def main() -> int:
    p = c.parser(__doc__)
    p.add_argument("--no-s3", action="store_true", help="file publisher only (no moto server)")
    args = p.parse_args()
    from keymgr.manager import KeyManager
    from keymgr.metrics import Metrics

    c.quiet_logs()
    c.header("bench_jwks: unchanged JWKS documents are neither written nor uploaded")
    passes = 3 if args.smoke else 10
    tmp = Path(tempfile.mkdtemp(prefix="keymgr-bench-jwks-"))
    moto = None
    try:
        pubs = '"site"'
        extra = ""
        if not args.no_s3:
            moto = c.start_moto(tmp)
            c.aws_env(moto.url)
            import boto3

            boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=BUCKET)
            pubs = '"site", "cdn"'
            extra = (
                f'\n[publishers.cdn]\ntype = "s3"\nbucket = "{BUCKET}"\n'
                f'key = ".well-known/jwks.json"\nendpoint_url = "{moto.url}"\n'
                'region = "us-east-1"\ncache_control = "public, max-age=300"\n'
            )
        cfg = c.write_home(tmp / "home", {}, extra=extra + "".join(
            c.RING_TEMPLATE.format(name=f"r{i}", alg="ES256", backend="local", period="30d")
            .replace('publishers = ["site"]', f"publishers = [{pubs}]")
            for i in range(3)
        ))
        km = KeyManager.from_config(cfg, actor="bench")
        metrics = Metrics()
        requests: Counter[str] = Counter()
        if moto is not None:
            client: Any = getattr(km.config.publishers["cdn"], "client")  # noqa: B009
            client.meta.events.register(
                "before-call.s3.*", lambda model, **_: requests.update([model.name])
            )
        jwks_file = cfg.parent / "public" / ".well-known" / "jwks.json"

        def run(label: str, step: Any, times: int = 1) -> dict[str, Any]:
            before_inode = jwks_file.stat().st_ino if jwks_file.exists() else None
            before = dict(requests)
            counters0 = sample(metrics)
            planned = 0
            for _ in range(times):
                res = step()
                assert res.ok, res.failures
                metrics.observe_pass(res, km.config)
                planned += sum(1 for e in res.events if e["event"] == "jwks.published")
            counters = {k: v - counters0.get(k, 0) for k, v in sample(metrics).items()}
            return {
                "phase": label,
                "passes": times,
                "publishes_confirmed": planned,
                "counter": {k: v for k, v in counters.items() if v},
                "file_rewritten": jwks_file.stat().st_ino != before_inode,
                "s3": {k: v - before.get(k, 0) for k, v in requests.items()
                       if v - before.get(k, 0)},
            }

        rows = [run("bootstrap", lambda: km.reconcile(c.T0))]
        rows.append(run("steady (nothing due)", lambda: km.reconcile(c.at(days=1)), passes))
        # Forget the confirmations, as a crash between upload and commit would.
        state = cfg.parent / "state.json"
        doc = json.loads(state.read_text())
        doc["publishers"] = {}
        state.write_text(json.dumps(doc, indent=1) + "\n")
        rows.append(run("replay (same document)", lambda: km.reconcile(c.at(days=1, hours=1))))
        rows.append(run("keymgr rotate (new key)", lambda: km.rotate("r0", now=c.at(days=2))))
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("| phase | passes | publishes confirmed | keymgr_jwks_publishes_total (delta) "
          "| JWKS file rewritten | S3 requests |")
    print("| --- | ---: | ---: | --- | --- | --- |")
    for r in rows:
        counter = ", ".join(f"{k}={v:g}" for k, v in sorted(r["counter"].items())) or "-"
        s3 = ", ".join(f"{k}={v}" for k, v in sorted(r["s3"].items())) or "-"
        print(f"| {r['phase']} | {r['passes']} | {r['publishes_confirmed']} | {counter} | "
              f"{'yes' if r['file_rewritten'] else 'no'} | {s3} |")
    steady, replay = rows[1], rows[2]
    ok = (
        not steady["file_rewritten"]
        and "PutObject" not in steady["s3"]
        and not steady["counter"]
        and not replay["file_rewritten"]
        and "PutObject" not in replay["s3"]
        and all(k.endswith("unchanged") for k in replay["counter"])
        and replay["counter"]
    )
    print(f"\nunchanged document -> no write, no upload, counted as 'unchanged': "
          f"{c.verdict(ok, args.smoke)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"jwks": rows}, indent=2))
    return 0 if ok or args.smoke else 1


def sample(metrics: Any) -> dict[str, float]:
    out = {}
    for fam in metrics.registry.collect():
        if fam.name == "keymgr_jwks_publishes":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[f"{s.labels['publisher']}:{s.labels['result']}"] = s.value
    return out


if __name__ == "__main__":
    sys.exit(main())
