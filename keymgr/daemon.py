"""``keymgr run``: reconcile on an interval and exactly when the next transition is due.

APScheduler 3.x drives the passes. Its defaults would drop a date job missed
while the process was down (1 s misfire grace), so every job is added with
``coalesce=True``, ``max_instances=1`` and a misfire grace of a day, and the
schedule is rebuilt from stored state at start and after every pass.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from keymgr.errors import KeymgrError

log = structlog.get_logger("keymgr.daemon")

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 86400}


class Daemon:
    def __init__(self, config_path: Path) -> None:
        from keymgr.manager import KeyManager

        self.config_path = config_path
        self.manager = KeyManager.from_config(config_path, actor="daemon")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults=JOB_DEFAULTS)

    def reconcile(self) -> None:
        if not self.lock.acquire(blocking=False):
            return
        try:
            res = self.manager.reconcile()
            for f in res.failures:
                log.error("reconcile.failed", error=f)
            nxt = res.plan.next_at if res.plan is not None else None
            self.schedule_next(nxt)
        except KeymgrError as e:
            log.error("reconcile.failed", error=str(e))
        finally:
            self.lock.release()

    def schedule_next(self, at: datetime | None) -> None:
        if at is None:
            return
        self.scheduler.add_job(
            self.reconcile, "date", run_date=at, id="next-due", replace_existing=True
        )

    def run(self) -> int:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        cfg = self.manager.config
        self.manager.audit.record([{"event": "daemon.started", "ts": _now()}], "daemon")
        log.info(
            "daemon.started",
            config=str(self.config_path),
            interval=cfg.daemon.reconcile_interval.total_seconds(),
        )
        self.scheduler.add_job(
            self.reconcile,
            "interval",
            seconds=cfg.daemon.reconcile_interval.total_seconds(),
            id="interval",
            next_run_time=_now(),
        )
        self.scheduler.start()
        self.stop.wait()
        self.scheduler.shutdown(wait=True)
        self.manager.audit.record([{"event": "daemon.stopped", "ts": _now()}], "daemon")
        log.info("daemon.stopped")
        return 0


def _now() -> Any:
    from keymgr.timefmt import utcnow

    return utcnow()


def run(config_path: Path) -> int:
    from keymgr.config import load_config
    from keymgr.logs import configure

    cfg = load_config(config_path)
    configure(cfg.daemon.log_level)
    return Daemon(config_path).run()
