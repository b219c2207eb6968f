"""A real caching edge for tests: Debian's varnish on loopback in front of a
static origin (a directory served over HTTP), like a CDN in front of the
JWKS file.

The edge caches for ``ttl`` seconds of wall-clock time, far longer than a
test runs, so what it serves changes only when the test says so
(:meth:`Edge.purge`, as a CDN purge would): the tests drive keymgr with
``--at`` simulated times and decide exactly when the edge catches up.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.servers_common import free_port


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def origin(root: Path) -> Iterator[str]:
    """Serve ``root`` on a free loopback port; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Edge:
    """varnishd caching one origin; ``url`` is its base URL."""

    def __init__(self, workdir: Path, origin_url: str, ttl: int = 3600) -> None:
        host, port = origin_url.removeprefix("http://").split(":")
        self.dir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        vcl = workdir / "edge.vcl"
        vcl.write_text(
            "vcl 4.1;\n"
            f'backend origin {{ .host = "{host}"; .port = "{port}"; }}\n'
            "sub vcl_backend_response {\n"
            f"  set beresp.ttl = {ttl}s;\n"
            "  set beresp.grace = 0s;\n"
            "}\n"
        )
        self.proc = subprocess.Popen(
            [
                "varnishd", "-F", "-j", "none", "-n", str(workdir / "n"),
                "-a", f"127.0.0.1:{self.port}", "-T", f"127.0.0.1:{free_port()}",
                "-f", str(vcl), "-s", "malloc,16m",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("varnishd did not start")
            time.sleep(0.1)

    def purge(self) -> None:
        """Drop everything cached (a CDN purge): the next request goes to the origin."""
        subprocess.run(
            ["varnishadm", "-n", str(self.dir / "n"), "ban", "req.url", "~", "."],
            check=True, capture_output=True, timeout=30,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Any]:
    """Start edges in front of origins; everything is stopped afterwards."""
    if shutil.which("varnishd") is None:
        pytest.skip("varnishd not installed (Debian package 'varnish'; .ci/run installs it)")
    started: list[Edge] = []
    stack = contextlib.ExitStack()

    def make(root: Path, ttl: int = 3600) -> Edge:
        base = stack.enter_context(origin(root))
        work = tmp_path / f"edge{len(started)}"
        work.mkdir()
        edge = Edge(work, base, ttl)
        started.append(edge)
        return edge

    with stack:
        yield make
        for e in started:
            e.stop()
