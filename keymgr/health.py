"""``/healthz``, ``/readyz`` and ``/metrics`` on ``[daemon] listen``.

Answers come from what the daemon already knows (its last checks and its last
state); a probe never blocks on a backend, so a slow KMS cannot make Kubernetes
kill a healthy pod.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keymgr.metrics import Metrics


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can
        # wait on DNS for 0.0.0.0 in a pod; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _ServerV6(_Server):
    """For an IPv6 literal (``listen = "[::1]:9464"``)."""

    address_family = socket.AF_INET6


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        alive: Callable[[], tuple[bool, dict[str, Any]]],
        ready: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that never finishes its request frees its thread

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(metrics.registry)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, info = (alive if path == "/healthz" else ready)()
                    body = (json.dumps({"ok": ok, **info}, sort_keys=True) + "\n").encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would drown the operational log

        self.httpd = (_ServerV6 if ":" in host else _Server)((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
