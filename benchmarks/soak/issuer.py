"""The issuer: mints tokens through keymgr's Python API with skewed clocks."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .jwks import header_kid
from .logs import normalise_reason
from .settings import RING, Settings


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

    def first_used(self, kid: str) -> float | None:
        with self.lock:
            return self.first_use.get(kid)

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
                t = time.time()
                at = datetime.fromtimestamp(t + sk, UTC)
                try:
                    token = km.sign(RING, {"sub": "soak", "jti": str(seq)}, ttl=ttl, now=at)
                except Exception as e:  # no active key yet, backend paused, ...
                    self.errors[f"{type(e).__name__}: {normalise_reason(str(e))}"] += 1
                    self.stop_ev.wait(0.1)
                    nxt = time.monotonic()
                    continue
                done = time.time()
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
