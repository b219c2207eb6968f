"""The watcher: polls the origin, to time each key's publication and unpublication."""

from __future__ import annotations

import json
import threading
import time

from .edge import Edge, Origin
from .jwks import PRIVATE_MEMBERS, algs_of, kids_of, short


class Watcher(threading.Thread):
    """Polls the origin: when each kid was first served, and when it stopped being served.

    Every good read also refreshes the edge's last good copy (see ``Edge``).
    """

    def __init__(self, origin: Origin, edge: Edge) -> None:
        super().__init__(daemon=True)
        self.origin, self.edge = origin, edge
        self.first_seen: dict[str, float] = {}
        self.removed: dict[str, float] = {}
        self.reappeared: list[str] = []
        self.private_leaks: list[str] = []
        self.current: set[str] = set()
        #: Each set of algorithms the origin's JWKS held, with when it was first
        #: seen and how long it was served in all (an algorithm migration
        #: shows two at once).
        self.alg_sets: dict[tuple[str, ...], dict[str, float]] = {}
        self._last_alg_t: tuple[tuple[str, ...], float] | None = None
        self.errors = 0
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                body, cc = self.origin.read()
                doc = json.loads(body) if body else {"keys": []}
                if body:
                    self.edge.remember(body, cc, probe=True)
            except Exception:
                self.errors += 1
                self.stop_ev.wait(self.origin.poll)
                continue
            t = time.time()
            kids = kids_of(doc)
            for jwk in doc.get("keys", []):
                leaked = PRIVATE_MEMBERS & set(jwk)
                if leaked:
                    self.private_leaks.append(f"{short(jwk.get('kid'))}: {sorted(leaked)}")
            for k in kids:
                self.first_seen.setdefault(k, t)
                if k in self.removed and k not in self.reappeared:
                    self.reappeared.append(k)
            for k in self.current - kids:
                self.removed.setdefault(k, t)
            self.current = kids
            self._note_algs(algs_of(doc), t)
            self.stop_ev.wait(self.origin.poll)

    def _note_algs(self, algs: tuple[str, ...], t: float) -> None:
        if self._last_alg_t is not None:
            prev, since = self._last_alg_t
            self.alg_sets[prev]["seconds"] += t - since
        if algs:
            self.alg_sets.setdefault(algs, {"first_seen": t, "seconds": 0.0})
        self._last_alg_t = (algs, t) if algs else None
