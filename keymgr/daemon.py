"""``keymgr run``: the long-running daemon.

APScheduler 3.x drives the work. Its defaults would drop a date job missed while
the process was down (1 s misfire grace), so every job runs with
``coalesce=True``, ``max_instances=1`` and a misfire grace of a day, and the
schedule is rebuilt from stored state at start and after every pass: one job on
the fixed interval, one date job exactly at the next due transition.

Several replicas may share one state store: a tick first takes or renews the
lease, and only the holder reconciles. Every replica keeps checking its store
and backends, so a standby is ready to take over within one lease period.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from keymgr import sdnotify
from keymgr.config import Config, load_config
from keymgr.errors import KeymgrError
from keymgr.lease import Lease
from keymgr.manager import KeyManager
from keymgr.metrics import Metrics
from keymgr.timefmt import format_time, utcnow

log = structlog.get_logger("keymgr.daemon")

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 86400}


class Daemon:
    def __init__(self, config: Config) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.config = config
        self.manager = KeyManager(config, actor="daemon")
        self.metrics = Metrics()
        self.manager.metrics = self.metrics
        self.lease = Lease(self.manager.store, config.daemon.lease_ttl)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.tick_lock = threading.Lock()
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults=JOB_DEFAULTS)
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.checks: dict[str, str] = {}
        self.health: Any = None

    # -- the tick: checks, lease, reconcile ---------------------------------

    def tick(self) -> None:
        if not self.tick_lock.acquire(blocking=False):
            return  # a pass is running; the interval job will come back
        try:
            self._tick()
        finally:
            self.tick_lock.release()

    def _tick(self) -> None:
        mgr = self.manager
        self.checks = self.run_checks(mgr)
        try:
            held = self.lease.acquire(utcnow())
        except KeymgrError as e:
            held = False
            self.checks["lease"] = str(e)
        self.metrics.lease_held.set(1 if held else 0)
        if not held:
            self.metrics.snapshot = (self._state_or_none(mgr), None)
            return
        try:
            res = mgr.reconcile()
        except KeymgrError as e:
            self.last_error = str(e)
            self.metrics.reconciles.labels("failed").inc()
            log.error("reconcile.failed", error=str(e))
            return
        self.metrics.observe_pass(res, mgr.config)
        self.metrics.snapshot = (self._state_or_none(mgr), res.plan)
        if res.ok:
            self.last_ok = time.monotonic()
            self.last_error = None
        else:
            self.last_error = res.failures[0]
            for f in res.failures:
                log.error("reconcile.failed", error=f)
        nxt = res.plan.next_at if res.plan is not None else None
        if nxt is not None:
            self.scheduler.add_job(
                self.tick,
                "date",
                run_date=nxt + timedelta(seconds=0.2),
                id="next-due",
                replace_existing=True,
            )
            log.debug("next.scheduled", at=format_time(nxt))

    def run_checks(self, mgr: KeyManager) -> dict[str, str]:
        """Reachability of the store and of every backend a ring uses ("ok" or the error)."""
        out: dict[str, str] = {}
        try:
            mgr.store.load()
            out["store"] = "ok"
        except KeymgrError as e:
            out["store"] = str(e)
        for name in sorted({p.backend for p in mgr.config.policies.values()}):
            try:
                mgr.config.backends[name].check()
                out[f"backend:{name}"] = "ok"
            except KeymgrError as e:
                out[f"backend:{name}"] = str(e)
        return out

    @staticmethod
    def _state_or_none(mgr: KeyManager) -> Any:
        try:
            return mgr.state()
        except KeymgrError:
            return None

    # -- probes --------------------------------------------------------------

    def alive(self) -> tuple[bool, dict[str, Any]]:
        ok = self.scheduler.running and not self.stop.is_set()
        return ok, {"scheduler": "running" if ok else "stopped"}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        failing = {k: v for k, v in self.checks.items() if v != "ok"}
        info: dict[str, Any] = {"checks": self.checks, "lease_held": self.lease.held(utcnow())}
        if not self.checks:
            return False, {**info, "reason": "starting"}
        if failing:
            return False, {**info, "reason": "unreachable: " + ", ".join(sorted(failing))}
        if info["lease_held"]:
            horizon = 3 * self.config.daemon.reconcile_interval.total_seconds() + 30
            if self.last_ok is None or time.monotonic() - self.last_ok > horizon:
                return False, {**info, "reason": self.last_error or "no successful reconcile yet"}
        return True, info

    # -- lifecycle -------------------------------------------------------------

    def reload(self) -> None:
        try:
            config = load_config(self.config.path)
            manager = KeyManager(config, actor="daemon")
        except KeymgrError as e:
            log.error("config.rejected", error=str(e), keeping="previous config")
            self.manager.audit.record(
                [{"event": "config.rejected", "ts": utcnow(), "reason": str(e)}], "daemon"
            )
            return
        with self.tick_lock:
            manager.metrics = self.metrics
            self.config, self.manager = config, manager
            self.lease.store = manager.store
        manager.audit.record(
            [{"event": "config.loaded", "ts": utcnow(), "reason": "SIGHUP"}], "daemon"
        )
        log.info("config.loaded", path=str(config.path), rings=len(config.policies))
        self.scheduler.add_job(
            self.tick,
            "date",
            run_date=datetime.now().astimezone(),
            id="reload",
            replace_existing=True,
        )

    def run(self) -> int:
        from keymgr.health import HealthServer

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()
            self.wake.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reload_requested = True
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        cfg = self.config.daemon
        try:
            self.health = HealthServer(
                cfg.listen[0], cfg.listen[1], self.metrics, self.alive, self.ready
            )
        except OSError as e:
            raise KeymgrError(
                f"daemon.listen {cfg.listen[0]}:{cfg.listen[1]}: cannot listen: {e.strerror}"
            ) from None
        self.manager.audit.record(
            [{"event": "daemon.started", "ts": utcnow(), "reason": f"replica {self.lease.holder}"}],
            "daemon",
        )
        interval = cfg.reconcile_interval.total_seconds()
        # Standbys poll often enough to take over within one lease period.
        tick_every = min(interval, cfg.lease_ttl.total_seconds() / 3)
        log.info(
            "daemon.started",
            config=str(self.config.path),
            interval=interval,
            listen=f"{cfg.listen[0]}:{self.health.port}",
            replica=self.lease.holder,
        )
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=tick_every,
            id="interval",
            next_run_time=datetime.now().astimezone(),
        )
        wd = sdnotify.watchdog_interval()
        if wd is not None:
            self.scheduler.add_job(self.watchdog, "interval", seconds=wd, id="watchdog")
        self.scheduler.start()
        sdnotify.notify("READY=1\nSTATUS=reconciling")
        while not self.stop.is_set():
            self.wake.wait()
            self.wake.clear()
            if self.reload_requested and not self.stop.is_set():
                self.reload_requested = False
                sdnotify.notify("RELOADING=1")
                self.reload()
                sdnotify.notify("READY=1")
        sdnotify.notify("STOPPING=1")
        log.info("daemon.stopping")
        self.scheduler.shutdown(wait=True)  # lets a running pass finish
        try:
            self.lease.release()
        except KeymgrError as e:
            log.warning("lease.release_failed", error=str(e))
        self.health.close()
        self.manager.audit.record([{"event": "daemon.stopped", "ts": utcnow()}], "daemon")
        log.info("daemon.stopped")
        return 0

    def watchdog(self) -> None:
        """Ping only while the scheduler's workers are not stuck in one pass."""
        sdnotify.notify("WATCHDOG=1")


def run(config_path: Path) -> int:
    from keymgr.logs import configure

    cfg = load_config(config_path)
    configure(cfg.daemon.log_level)
    return Daemon(cfg).run()
