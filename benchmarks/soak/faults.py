"""The fault scheduler: which fault when, how each is done and undone, and the check after it."""

from __future__ import annotations

import random
import shutil
import threading
import time
import traceback
from typing import Any

from .checks import Checker
from .daemon import Daemon
from .edge import Edge, FileOrigin, Origin
from .environments import Env
from .issuer import Issuer
from .jwks import short
from .logs import log
from .settings import RING, Settings
from .watcher import Watcher

#: The edge-stale fault cuts the edge from its origin this long before the
#: successor's publication is due (a little ahead, so no edge fetch falls
#: between the write and the cut).
EDGE_STALE_LEAD = 0.5


class FaultScheduler:
    """Injects ``s.fault_kinds`` in turn, each after 0.5-1.5 P (``edge-stale``
    then waits for the next publication of a successor), and checks every
    invariant after each."""

    def __init__(
        self, s: Settings, rng: random.Random, t0: float, env: Env, origin: Origin, edge: Edge,
        daemon: Daemon, watcher: Watcher, issuer: Issuer, checker: Checker, failures: list[str],
    ) -> None:  # fmt: skip
        self.s, self.rng, self.t0, self.env, self.origin, self.edge = s, rng, t0, env, origin, edge
        self.daemon, self.watcher, self.issuer, self.checker = daemon, watcher, issuer, checker
        self.failures = failures
        self.faults: list[dict[str, Any]] = []
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def run(self) -> None:
        kinds = list(self.s.fault_kinds)
        i = 0
        while not self.stop_ev.is_set():
            if self.stop_ev.wait(self.rng.uniform(0.5, 1.5) * self.s.period):
                break
            kind = kinds[i % len(kinds)]
            i += 1
            try:
                self.fault(kind)
            except Exception as e:
                self.failures.append(f"fault {kind}: {type(e).__name__}: {e}")
                log(traceback.format_exc())

    def stop(self) -> None:
        self.stop_ev.set()
        if self.thread.is_alive():
            self.thread.join(timeout=120)

    def fault(self, kind: str) -> None:
        t0 = time.time()
        before = len(self.checker.verifiers.rejections())
        info: dict[str, Any] = {"kind": kind, "at": round(t0 - self.t0, 2)}
        do = {
            "kill": self.kill,
            "block": self.block,
            "pause": self.pause,
            "edge-stale": self.edge_stale,
        }[kind]
        info.update(do())
        log(f"fault {kind}: {info['detail']}")
        res = self.checker.check_all(f"after {kind}")
        info.update(
            ok=res.ok,
            recovered_in=None if res.recovered_in is None else round(res.recovered_in, 2),
            problems=res.problems,
            notes=res.notes,
            rejections=res.rejections_so_far - before,
        )
        self.faults.append(info)

    def kill(self) -> dict[str, Any]:
        down = self.rng.uniform(0.2, 1.5)
        with self.daemon.lock:  # no SIGHUP (--migrate) to a daemon starting up
            self.daemon.kill()
            time.sleep(down)
            self.daemon.start()
        return {"detail": f"SIGKILL, restarted after {down:.1f}s"}

    def block(self) -> dict[str, Any]:
        d = self.env.jwks_path.parent
        hidden = d.with_name(d.name + ".soak-hidden")
        hold = self.rng.uniform(0.6, 1.2) * self.s.period
        origin = self.origin
        assert isinstance(origin, FileOrigin)
        origin.fallback = hidden / self.env.jwks_path.name
        d.rename(hidden)
        d.write_text("publish target made unwritable by benchmarks/soak\n")
        try:
            time.sleep(hold)
        finally:
            d.unlink()
            try:
                hidden.rename(d)
            except OSError:  # the daemon made a fresh directory in between: keep it
                shutil.rmtree(hidden)
            origin.fallback = None
        return {"detail": f"JWKS directory replaced by a file for {hold:.1f}s"}

    def pause(self) -> dict[str, Any]:
        hold = self.rng.uniform(2.0, 4.0)
        with self.env.pause():
            time.sleep(hold)
        return {"detail": f"{self.env.name} server SIGSTOPped for {hold:.1f}s"}

    def edge_stale(self) -> dict[str, Any]:
        """Issue 20: a stale-if-error edge over a successor's publication.

        From just before the successor's publication is due, the edge cannot
        reach its origin (keymgr's publisher still can: it writes and reads
        back the file / S3 object itself). The edge's last good copy is the
        document before the write. keymgr confirms the successor at the
        origin and promotes it A later; the edge keeps serving the old
        document until the successor has been used for L + 0.5 s, so every
        verifier refetches at least once (its cooldown passed) and gets no
        successor.
        """
        s = self.s
        due = self._next_publication_due()
        time.sleep(max(0.0, due - EDGE_STALE_LEAD - time.time()))
        seen_before = set(self.watcher.first_seen)
        stale_before = self.edge.stale
        t_cut = time.time()
        kid, used = None, None
        with self.edge.cut():
            deadline = t_cut + s.period + 10
            while kid is None and time.time() < deadline:
                kid = next((k for k in list(self.watcher.first_seen) if k not in seen_before), None)
                time.sleep(0.05)
            if kid is not None:
                t_pub = self.watcher.first_seen[kid]
                deadline = t_pub + s.period + s.publish_ahead + 5
                while (used := self.issuer.first_used(kid)) is None and time.time() < deadline:
                    time.sleep(0.05)
                if used is not None:
                    time.sleep(max(0.0, used + s.cache + 0.5 - time.time()))
            t_end = time.time()
        info: dict[str, Any] = {"kid": kid, "cut_for": round(t_end - t_cut, 2)}
        if kid is None:
            info["detail"] = (
                f"edge cut from its origin for {t_end - t_cut:.1f}s; no successor published"
            )
            return info
        info["published_at"] = round(t_pub - self.t0, 2)
        #: How long the edge stayed cut after the successor reached the origin.
        info["cut_after_publication"] = round(t_end - t_pub, 2)
        info["first_use"] = None if used is None else round(used - self.t0, 2)
        info["detail"] = (
            f"edge cut from its origin {t_pub - t_cut:.1f}s before {short(kid)} was served at the "
            f"origin, for {t_end - t_cut:.1f}s; "
            + (f"first used {used - t_pub:.1f}s after publication" if used is not None
               else "not used while cut")
            + f"; {self.edge.stale - stale_before} stale responses "
            f"(stale-if-error {s.stale_if_error:g}s)"
        )  # fmt: skip
        return info

    def _next_publication_due(self) -> float:
        """When the daemon will publish the next successor (activated_at + P - A),
        at least EDGE_STALE_LEAD from now; while a successor is already out,
        the one after it."""
        s = self.s
        deadline = time.time() + 4 * s.period + 30
        while time.time() < deadline:
            try:
                ring = self.checker.km.state().ring(RING)
            except Exception:  # a paused store: try again
                time.sleep(0.2)
                continue
            active = ring.active
            waiting = any(k.state in ("pending", "published") for k in ring.keys)
            if active is not None and active.activated_at is not None and not waiting:
                due = float(active.activated_at.timestamp()) + s.period - s.publish_ahead
                if due - EDGE_STALE_LEAD > time.time() + 0.1:
                    return due
            time.sleep(0.1)
        raise RuntimeError("no successor publication to align the edge-stale fault with")
