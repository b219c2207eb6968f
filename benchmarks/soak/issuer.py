"""The issuer: mints tokens with skewed clocks, through keymgr's Python API or
the daemon's signing service (``--issuer service``).

- ``api`` (the default): ``KeyManager.from_config(path).sign(ring, claims,
  ttl=T, now=skewed)`` in the soak's own process; the skewed ``now`` becomes
  ``iat``/``exp``.
- ``service``: ``POST /v1/rings/{ring}/sign`` on the daemon's Unix socket
  (``[service]``), over one keep-alive connection (stdlib ``http.client`` on an
  ``AF_UNIX`` socket). The service cannot be given a clock: with ``ttl`` it
  sets ``iat`` and ``exp`` from the daemon's own. So the issuer applies its skew
  the way a client with a wrong clock that stamps its own tokens does: it sends
  ``{"claims": {..., "iat": skewed now, "exp": iat + T}}`` without ``ttl``,
  which the service accepts when ``exp`` is within ``retire_grace`` of its
  clock (at most T + S away, and G >= T + S). With ``--skew 0`` it sends
  ``"ttl": T`` instead: the daemon's clock stamps the token, the ordinary
  client form.

Either way a failure to obtain a token (no active key yet, a backend paused,
the socket gone while the daemon is SIGKILLed and restarted, a 503
``not_ready``) is counted as an issuer error, never as a rejection, and the
issuer retries 0.1 s later.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .jwks import claims_of, header_of
from .logs import normalise_reason
from .settings import RING, Settings


@dataclass
class Issued:
    seq: int
    kid: str
    alg: str
    t: float  # real time of signing
    skew: float
    iat: int
    exp: int


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (what docs/signing-service.md shows)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        super().__init__("keymgr", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ServiceError(Exception):
    """A non-200 answer of the signing service: its status and error code."""


class ServiceClient:
    """One keep-alive connection to the signing service, reopened after any failure."""

    def __init__(self, path: Path) -> None:
        self.conn = UnixHTTPConnection(path)
        self.requests = 0
        self.connects = 0

    def sign(self, ring: str, body: dict[str, Any]) -> str:
        try:
            if self.conn.sock is None:
                self.connects += 1
            self.requests += 1
            self.conn.request(
                "POST", f"/v1/rings/{ring}/sign", json.dumps(body),
                {"Content-Type": "application/json"},
            )  # fmt: skip
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            # The daemon was killed (socket refused, missing, reset): a new
            # connection next time.
            self.conn.close()
            raise
        if resp.will_close:
            self.conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ServiceError(f"{resp.status}: not JSON: {raw[:200]!r}") from None
        if resp.status != 200:
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            raise ServiceError(f"{resp.status} {err.get('code')}: {err.get('message')}")
        return str(doc["token"])

    def close(self) -> None:
        self.conn.close()


class Issuer(threading.Thread):
    """Mints tokens with skewed clocks (see the module docstring); appends them to the queue."""

    def __init__(
        self, config: Path, queue: Path, s: Settings, rng: random.Random,
        socket_path: Path | None = None,
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.config, self.queue, self.s, self.rng = config, queue, s, rng
        self.socket_path = socket_path
        self.tokens: list[Issued] = []
        self.errors: Counter[str] = Counter()
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.first_use: dict[str, float] = {}
        self.last_use: dict[str, float] = {}
        self.last_exp: dict[str, int] = {}
        #: The algorithm of each key used (from the tokens' headers), and tokens per algorithm.
        self.alg_of: dict[str, str] = {}
        self.by_alg: Counter[str] = Counter()
        self.client: ServiceClient | None = None

    def kids_used(self) -> list[str]:
        with self.lock:
            return list(self.first_use)

    def first_used(self, kid: str) -> float | None:
        with self.lock:
            return self.first_use.get(kid)

    def _signer(self) -> Callable[[dict[str, Any], float], str]:
        """sign(claims, skewed now) -> token, by ``s.issuer``."""
        ttl = self.s.ttl
        if self.s.issuer == "service":
            assert self.socket_path is not None
            client = self.client = ServiceClient(self.socket_path)

            def via_service(claims: dict[str, Any], at: float) -> str:
                if self.s.skew:
                    iat = int(at)
                    return client.sign(RING, {"claims": {**claims, "iat": iat, "exp": iat + ttl}})
                return client.sign(RING, {"claims": claims, "ttl": ttl})

            return via_service
        from keymgr import KeyManager

        km = KeyManager.from_config(self.config, actor="soak-issuer")
        delta = timedelta(seconds=ttl)

        def via_api(claims: dict[str, Any], at: float) -> str:
            return km.sign(RING, claims, ttl=delta, now=datetime.fromtimestamp(at, UTC))

        return via_api

    def run(self) -> None:
        sign = self._signer()
        gap = 1.0 / self.s.rate
        seq = 0
        with self.queue.open("a", encoding="utf-8") as q:
            nxt = time.monotonic()
            while not self.stop_ev.is_set():
                r = self.rng.random()
                sk = float(self.s.skew) * (
                    -1 if r < 1 / 3 else 1 if r < 2 / 3 else self.rng.uniform(-1, 1)
                )
                t = time.time()
                try:
                    token = sign({"sub": "soak", "jti": str(seq)}, t + sk)
                except Exception as e:  # no active key yet, backend paused, socket gone, ...
                    self.errors[f"{type(e).__name__}: {normalise_reason(str(e))}"] += 1
                    self.stop_ev.wait(0.1)
                    nxt = time.monotonic()
                    continue
                done = time.time()
                header, claims = header_of(token), claims_of(token)
                kid, alg = str(header["kid"]), str(header["alg"])
                rec = Issued(seq, kid, alg, done, sk, int(claims["iat"]), int(claims["exp"]))
                with self.lock:
                    self.tokens.append(rec)
                    self.first_use.setdefault(kid, t)
                    self.last_use[kid] = done
                    self.last_exp[kid] = max(self.last_exp.get(kid, 0), rec.exp)
                    self.alg_of[kid] = alg
                    self.by_alg[alg] += 1
                line = {"seq": seq, "token": token, "kid": kid, "alg": alg, "t": done,
                        "exp": rec.exp}  # fmt: skip
                q.write(json.dumps(line, separators=(",", ":")) + "\n")
                q.flush()
                seq += 1
                nxt += gap
                self.stop_ev.wait(max(0.0, nxt - time.monotonic()))
        if self.client is not None:
            self.client.close()

    def end(self) -> None:
        self.stop_ev.set()
        self.join(timeout=30)
        with self.queue.open("a", encoding="utf-8") as q:
            q.write('{"end":true}\n')
