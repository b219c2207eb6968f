"""The runner: sets up one soak run, wires its pieces, runs it to its end, tears it down."""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .checks import Checker
from .daemon import Daemon
from .edge import Edge
from .environments import ENVS
from .faults import FaultScheduler
from .home import Home
from .issuer import Issuer
from .logs import log
from .migrate import Migrator
from .report import build_report
from .settings import RING, Settings
from .verifiers import Verifiers
from .watcher import Watcher


class Runner:
    """One run: environment and keymgr home, then daemon, edge, watcher, issuer,
    verifiers and (with ``--faults``) the fault scheduler, until the target
    number of rotations; then the final checks and the report."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.rng = random.Random(s.seed)
        self.t0 = time.time()
        self.failures: list[str] = []
        self.passed = False
        self.work = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="keymgr-soak-"))
        self.env = ENVS[s.backend](s, self.work)
        self.home = Home(self.work, self.env)
        self.verifiers = Verifiers(self.work)
        self._edge: Edge | None = None
        self._daemon: Daemon | None = None
        self.migrator: Migrator | None = None

    @property
    def edge(self) -> Edge:
        assert self._edge is not None
        return self._edge

    @property
    def daemon(self) -> Daemon:
        assert self._daemon is not None
        return self._daemon

    def rotations(self) -> int:
        return max(0, len(self.issuer.kids_used()) - 1)

    def run(self) -> dict[str, Any]:
        self.work.mkdir(parents=True, exist_ok=True)
        log(f"workdir {self.work} seed {self.s.seed}")
        try:
            self.env.start()
            self._set_up()
            self._soak()
            return self._finish()
        finally:
            self._tear_down()

    def _set_up(self) -> None:
        """Everything up to the first served key, then the verifiers."""
        s = self.s
        # The edge first: with --verify-edge the config names its URL.
        self.origin = self.env.origin()
        self._edge = Edge(self.origin, s.stale_if_error)
        self.edge.start()
        cfg = self.home.write_config(s, (self.edge.url,) if s.verify_edge else ())
        from keymgr import KeyManager
        from keymgr.config import load_config

        km = KeyManager(load_config(cfg), actor="soak-check")
        self.watcher = Watcher(self.origin, self.edge)
        self.watcher.start()
        queue = self.work / "tokens.jsonl"
        queue.touch()
        self._daemon = Daemon(cfg, self.env.env, self.work / "daemon.log")
        self.daemon.start()
        sock = self.home.socket if s.issuer == "service" else None
        self.issuer = Issuer(cfg, queue, s, self.rng, sock)
        self.issuer.start()
        if s.migrate:
            # From the first key on: the switch must land before its successor
            # is generated (P - A after its promotion).
            self.migrator = Migrator(s, self.t0, self.home, self.daemon, self.issuer,
                                     self.failures)  # fmt: skip
            self.migrator.start()
        backend = km.config.backends[self.env.backend_name()]
        self.checker = Checker(
            s, self.home, km, backend, self.origin, self.daemon, self.verifiers, self.watcher
        )
        self.scheduler = FaultScheduler(
            s, self.rng, self.t0, self.env, self.origin, self.edge, self.daemon, self.watcher,
            self.issuer, self.checker, self.failures,
        )  # fmt: skip
        # Verifiers start once the first key is served, like services deployed after it.
        deadline = time.monotonic() + 60
        while not self.watcher.current and time.monotonic() < deadline:
            self.daemon.poll()
            time.sleep(0.1)
        if not self.watcher.current:
            raise RuntimeError(f"no JWKS published within 60s; see {self.work}/daemon.log")
        self.verifiers.start(s, self.edge.url, queue, self.rng)
        names = ", ".join(v.name for v in self.verifiers)
        log(f"verifiers: {names}; target {s.rotations} rotations")

    def _soak(self) -> None:
        """Until the target number of rotations (faults injected meanwhile)."""
        s = self.s
        if s.faults:
            self.scheduler.start()
        deadline = time.monotonic() + s.max_seconds
        last = -1
        while self.rotations() < s.rotations and time.monotonic() < deadline:
            if not self.scheduler.is_alive():
                self.daemon.poll()
            self.verifiers.check_alive()
            if self.rotations() != last:
                last = self.rotations()
                log(f"rotations {last}/{s.rotations}, tokens {len(self.issuer.tokens)}, "
                    f"rejections {len(self.verifiers.rejections())}")  # fmt: skip
            time.sleep(0.2)
        if self.rotations() < s.rotations:
            self.failures.append(f"only {self.rotations()} rotations within {s.max_seconds:.0f}s")
        if self.migrator is not None:
            self.migrator.stop()
        self.scheduler.stop()

    def _finish(self) -> dict[str, Any]:
        """The issuer stops, verifiers drain the queue, final checks; the report."""
        self.issuer.end()
        self.failures += self.verifiers.finish(timeout=self.s.ttl + 30)
        self.checker.check_all("end (daemon running)")
        rc = self.daemon.stop()
        if rc != 0:
            self.failures.append(f"daemon stop (SIGTERM) exited {rc}")
        self.watcher.stop_ev.set()
        self.failures += self.checker.final_audit()
        if self.s.migrate:
            self.failures += self._migration_failures()
        report = build_report(self)
        self.passed = bool(report["passed"])
        return report

    def _migration_failures(self) -> list[str]:
        """Every algorithm signed tokens; each key signed with the algorithm
        state records for it; every reload was applied (none rejected)."""
        out = []
        used = self.issuer.by_alg
        out += [f"--migrate: no token signed with {a}" for a in self.s.migrate if not used[a]]
        recorded = {k["kid"]: k["alg"] for k in self.home.status()["rings"][RING]["keys"]}
        for kid, alg in self.issuer.alg_of.items():
            if recorded.get(kid) != alg:
                out.append(f"{kid[:8]}: tokens signed {alg}, state says {recorded.get(kid)}")
        rejected = self.checker.audit_counts["config.rejected"]
        if rejected:
            out.append(f"--migrate: {rejected} config.rejected audit event(s)")
        return out

    def _tear_down(self) -> None:
        if self.migrator is not None:
            self.migrator.stop()
        self.verifiers.kill()
        if self._daemon is not None:
            self._daemon.stop()
        if self._edge is not None:
            self._edge.stop()
        self.env.stop()
        if self.s.keep or self.s.workdir or not self.passed:
            log(f"workdir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
