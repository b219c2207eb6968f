"""Sharded state on a store with network latency: documents one at a time, or several in flight.

    .venv/bin/python benchmarks/bench_store_latency.py [--rings 10000]
        [--rtt-ms 0,10,40] [--smoke] [--json FILE]

A sharded state is thousands of documents (about one per 8 rings, plus a
manifest per 128 of those), and a replica that starts, or takes over the
lease, reads all of them. On a local moto server a request costs what moto
spends on it; on real S3 (or Vault, GCS, Azure) each one is also a network
round trip, which reading one document after another pays once per document.
``keymgr.docstore.DocumentAdapter.concurrency`` (16 for the network stores)
keeps that many requests in flight.

Here: a moto server, and in front of it a TCP proxy of this script that
holds every chunk for half the round-trip time in each direction (``tc
netem`` is not available on the benchmark VM). The state is
``keymgr.testing.docstore.sharded_state(N)`` (one active key a ring), written
through the real ``s3://`` store. Measured, wall clock, for each RTT and for
``concurrency`` 1 and 16: the first commit (the move to shards: every
document written) and a cold load (a new store object reading the head,
every manifest and every shard), checked equal to the state written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common as c

from keymgr.stores import open_store
from keymgr.testing.docstore import sharded_state


@contextlib.contextmanager
def delayed(target_port: int, rtt: float) -> Iterator[int]:
    """A loopback port that forwards to ``target_port``, each chunk held ``rtt / 2``."""
    from tests.servers_common import free_port

    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                await asyncio.sleep(rtt / 2)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    stopping: list[asyncio.Event] = []

    async def serve() -> None:
        stopping.append(asyncio.Event())
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await stopping[0].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stopping[0].set)
        thread.join(10)


def main() -> int:
    p = c.parser(__doc__)
    p.add_argument("--rings", type=int, default=10_000)
    p.add_argument("--rtt-ms", default="0,10,40")
    args = p.parse_args()
    rings = 200 if args.smoke else args.rings
    rtts = [0.0, 10.0] if args.smoke else [float(x) for x in args.rtt_ms.split(",")]
    c.header("bench_store_latency: sharded state on S3 (moto) behind an emulated round trip")

    import boto3
    from keymgr.backends.aws.store import S3Adapter

    from tests.servers_moto import REGION, s3_state_url, start_moto

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(k, v)
    state = sharded_state(rings)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        moto = start_moto(Path(tmp))
        try:
            s3 = boto3.client("s3", endpoint_url=moto.url, region_name=REGION)
            s3.create_bucket(Bucket="keymgr-latency")
            shipped = S3Adapter.concurrency
            for i, rtt in enumerate(rtts):
                ctx = delayed(moto.port, rtt / 1000) if rtt else contextlib.nullcontext(moto.port)
                with ctx as port:
                    for conc in (1, shipped):
                        S3Adapter.concurrency = conc
                        url = s3_state_url(
                            f"http://127.0.0.1:{port}", "keymgr-latency",
                            f"r{i}-c{conc}/state.json", shards="on", read_timeout=60,
                        )  # fmt: skip
                        t0 = time.perf_counter()
                        open_store(url).commit(state, None)
                        commit = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        loaded = open_store(url).load()[0]
                        load = time.perf_counter() - t0
                        assert loaded == state, "the state read back differs"
                        pages = s3.get_paginator("list_objects_v2").paginate(
                            Bucket="keymgr-latency", Prefix=f"r{i}-c{conc}/"
                        )
                        documents = sum(page.get("KeyCount", 0) for page in pages)
                        rows.append({"rings": rings, "rtt_ms": rtt, "concurrency": conc,
                                     "documents": documents,
                                     "first_commit_s": commit, "cold_load_s": load})  # fmt: skip
                        print(f"# rtt {rtt:g} ms, concurrency {conc}: commit {commit:.2f} s, "
                              f"load {load:.2f} s", flush=True)  # fmt: skip
            S3Adapter.concurrency = shipped
        finally:
            moto.stop()
    print()
    print("| rings | RTT | documents | concurrency | first commit (all documents) | cold load |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['rings']:,} | {r['rtt_ms']:g} ms | {r['documents']:,} | {r['concurrency']} | "
              f"{r['first_commit_s']:.2f} s | {r['cold_load_s']:.2f} s |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"store_latency": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
