"""``keymgr run``: the long-running daemon.

APScheduler 3.x drives the work. Its defaults would drop a date job missed while
the process was down (1 s misfire grace), so every job runs with
``coalesce=True``, ``max_instances=1`` and a misfire grace of a day. Three jobs:

- ``heartbeat`` every ``min(reconcile_interval, lease_ttl / 3)``: checks the store
  and backends (for ``/readyz``), takes or renews the lease, refreshes the
  metrics snapshot. It never waits for a pass, so a long pass cannot lose the
  lease, and a standby notices an expired lease within a third of its TTL.
- ``reconcile`` every ``reconcile_interval``: one pass, by the lease holder only.
- ``next-due``: a date job exactly at the next transition the last pass planned,
  rebuilt after every pass, so transitions happen on time whatever the interval.

All passes go through :meth:`Daemon.request_pass`, which runs them one at a
time: a request that arrives while a pass runs is queued (coalesced) and run
right after it, never dropped and never run concurrently.

Several replicas may share one state store: only the holder of the lease
(:mod:`keymgr.lease`) reconciles; the others keep checking and take over within
``lease_ttl + lease_ttl / 3`` (plus one second of timestamp granularity) after
the holder stopped renewing, or at their next heartbeat after a graceful stop.
A store without the lease API falls back on its own pass lock (see
:meth:`Daemon._lease_mode`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from keymgr import malloc, sdnotify
from keymgr.config import Config, load_config
from keymgr.errors import AuditError, AuditIOError, KeymgrError
from keymgr.lease import Lease, supports_lease
from keymgr.logs import get_logger
from keymgr.manager import KeyManager
from keymgr.metrics import Metrics
from keymgr.model import State
from keymgr.planner import Plan
from keymgr.reconciler import pass_time
from keymgr.timefmt import format_time, utcnow
from keymgr.ui import VERIFY_TICK, OperatorView, Redactor

log = get_logger("keymgr.daemon")

JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 86400}
#: A pass or heartbeat running longer than this counts as hung: the watchdog
#: stops pinging and /healthz fails, so systemd or the kubelet restarts us.
MIN_STUCK_AFTER = 600.0


class Daemon:
    def __init__(self, config: Config) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.config = config
        self.manager = KeyManager(config, actor="daemon")
        self.metrics = Metrics()
        self.manager.metrics = self.metrics
        self.manager.reconciler.on_probe = self.metrics.observe_probe
        self.lease = Lease(self.manager.store, config.daemon.lease_ttl)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        #: Held for a whole pass, and while the config is swapped on reload.
        self.tick_lock = threading.Lock()
        #: Serialises lease reads/writes between the heartbeat and a pass.
        self.lease_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued = False
        self._running = False
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults=JOB_DEFAULTS)
        #: Jobs add jobs only while the scheduler is not shutting down (see _add_job).
        self._jobs_lock = threading.Lock()
        self._shutting_down = False
        self.started = time.monotonic()
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.last_heartbeat: float | None = None
        self.pass_started: float | None = None
        self.checks: dict[str, str] = {}
        self._first_beat = True
        self.health: Any = None
        #: ``[service]``: the local signing service (keymgr.service), None when off.
        self.service: Any = None
        self.metrics.ready.set_function(lambda: 1.0 if self.ready()[0] else 0.0)
        #: ``[daemon] ui`` (keymgr.ui): the page's events and chain check, and
        #: when the snapshot was last refreshed.
        self.ui = OperatorView()
        self.snapshot_at: datetime | None = None
        self._redactor: tuple[Config, Redactor] | None = None

    # -- lease -----------------------------------------------------------------

    def _lease_mode(self) -> str:
        """``lease`` (the store has the lease API, ``supports_lease``) or ``single``.

        A store without a lease cannot elect a holder: only one replica may
        run against it (logged at start). Every built-in store has one.
        """
        return "lease" if supports_lease(self.manager.store) else "single"

    def renew_lease(self) -> tuple[bool, str | None]:
        """Take or renew the lease: (may reconcile now, error reaching the lease)."""
        error = None
        with self.lease_lock:
            if self._lease_mode() != "lease":
                held = True
            else:
                try:
                    held = self.lease.acquire(utcnow())
                except KeymgrError as e:
                    held, error = False, str(e)
        self.metrics.lease_held.set(1 if held else 0)
        if not held:
            # Only the holder probes edges: a standby's gauges would go stale.
            self.metrics.forget_edges()
        return held, error

    # -- heartbeat: checks, lease, metrics snapshot -----------------------------

    def heartbeat(self) -> None:
        if self.stop.is_set():
            return
        mgr = self.manager
        was_held = self.lease.held(utcnow())
        checks, state = self.run_checks(mgr)
        held, error = self.renew_lease()
        if error is not None:
            checks["lease"] = error
        # Published together, after the lease decision: /readyz must never see
        # fresh checks with a stale "not the holder" and answer ready too early.
        self.checks = checks
        self.last_heartbeat = time.monotonic()
        if state is not None:
            self._publish_snapshot(state, self._plan(mgr, state))
            malloc.release()  # as after a pass: the read may have been a whole one
        lease_mode = self._lease_mode() == "lease"
        if held and (self._first_beat or (lease_mode and not was_held)):
            if lease_mode:
                log.info("lease.acquired", replica=self.lease.holder)
            # In a worker of its own: this job must keep renewing the lease
            # while the pass runs.
            self._add_job(
                self.request_pass,
                "date",
                run_date=datetime.now().astimezone(),
                id="takeover",
                replace_existing=True,
            )
        elif was_held and not held:
            log.warning("lease.lost", replica=self.lease.holder)
        self._first_beat = False

    def _add_job(self, *args: Any, **kwargs: Any) -> None:
        """``scheduler.add_job`` from a running job, unless the daemon is stopping.

        ``BackgroundScheduler.shutdown(wait=True)`` holds the job stores' lock
        while it waits for running jobs, and ``add_job`` needs that lock: a job
        that adds one after shutdown began (a heartbeat taking the lease a
        stopping replica's neighbour released, a pass scheduling its next
        transition) would wait for it forever, and shutdown for the job. The
        flag is set under ``_jobs_lock`` before shutdown is called.
        """
        with self._jobs_lock:
            if not self._shutting_down:
                self.scheduler.add_job(*args, **kwargs)

    def run_checks(self, mgr: KeyManager) -> tuple[dict[str, str], State | None]:
        """Reachability of the store and of every backend a ring uses ("ok" or the error)."""
        out: dict[str, str] = {}
        state: State | None = None
        try:
            # Read, validated and checked against the audit log's end: a
            # malformed state, or one older than the log (put back from an
            # older copy), is not ready and is not shown on /metrics. A
            # damaged log alone is left to the pass (which then fails).
            state = mgr.current_state()
            out["store"] = "ok"
        except KeymgrError as e:
            out["store"] = str(e)
        for name in sorted({p.backend for p in mgr.config.policies.values()}):
            try:
                mgr.config.backends[name].check()
                out[f"backend:{name}"] = "ok"
            except KeymgrError as e:
                out[f"backend:{name}"] = str(e)
        return out, state

    @staticmethod
    def _plan(mgr: KeyManager, state: State) -> Plan | None:
        now = pass_time(utcnow, state)
        try:
            return mgr.reconciler.plan(state, now)
        except (KeyError, ValueError, KeymgrError):  # a state this config cannot plan
            return None

    # -- passes ------------------------------------------------------------------

    def request_pass(self) -> None:
        """Run a pass now, or right after the one in progress: never two at once.

        Called from scheduler worker threads (interval job, next-due job,
        reload, lease takeover). Requests that arrive during a pass collapse
        into one more pass after it, so a transition that falls due while a
        pass runs is not lost until the next interval.
        """
        with self._queue_lock:
            self._queued = True
            if self._running:
                return
            self._running = True
        try:
            while not self.stop.is_set():
                with self._queue_lock:
                    if not self._queued:
                        break
                    self._queued = False
                self._pass()
        finally:
            with self._queue_lock:
                self._running = False

    def _pass(self) -> None:
        with self.tick_lock:
            if self.stop.is_set():
                return
            mgr = self.manager
            held, error = self.renew_lease()
            if not held:
                if error is not None:
                    self.checks = {**self.checks, "lease": error}
                return
            self.pass_started = time.monotonic()
            try:
                res = mgr.reconcile()
            except KeymgrError as e:
                self.last_error = str(e)
                self.metrics.reconciles.labels("failed").inc()
                if _failed_audit_check(e):
                    self.metrics.audit_verify_failures.inc()
                log.error("reconcile.failed", error=str(e))
                return
            finally:
                self.pass_started = None
            self.metrics.observe_pass(res, mgr.config)
            state = self._state_or_none(mgr)
            if state is not None:
                self._publish_snapshot(state, res.plan)
            if res.ok:
                self.last_ok = time.monotonic()
                self.last_error = None
            else:
                # Each failed action was logged with its ring and kid by the
                # reconciler; this line sums the pass up.
                self.last_error = res.failures[0]
                log.error("reconcile.failed", failures=len(res.failures), error=res.failures[0])
            nxt = res.plan.next_at if res.plan is not None else None
            if nxt is not None and not self.stop.is_set():
                self._add_job(
                    self.request_pass,
                    "date",
                    run_date=nxt + timedelta(seconds=0.2),
                    id="next-due",
                    replace_existing=True,
                )
                log.debug("next.scheduled", at=format_time(nxt))
            # What the pass freed among the records it keeps goes back to the
            # system rather than staying resident until reused (keymgr.malloc).
            malloc.release()
            status = "last pass ok" if res.ok else f"last pass failed: {self.last_error}"
            when = f"; next transition {format_time(nxt)}" if nxt is not None else ""
            sdnotify.notify(f"STATUS={status}{when}"[:500])

    @staticmethod
    def _state_or_none(mgr: KeyManager) -> State | None:
        try:
            return mgr.state()
        except KeymgrError:
            return None

    # -- the operator page ([daemon] ui, keymgr.ui) -------------------------------

    def _publish_snapshot(self, state: State, plan: Plan | None) -> None:
        """What /metrics and the operator page show, refreshed together."""
        self.metrics.snapshot = (state, plan)
        self.snapshot_at = utcnow()
        if self.config.daemon.ui is not None:
            try:
                self.ui.refresh_events(self.manager.audit, self.redact())
            except Exception as e:  # the page shows older events; the daemon goes on
                log.warning("ui.refresh_failed", error=f"{type(e).__name__}: {e}")

    def redact(self) -> Redactor:
        """The current config's paths, to keep out of the page."""
        cached = self._redactor
        if cached is None or cached[0] is not self.config:
            cached = self._redactor = (self.config, Redactor(self.config))
        return cached[1]

    def verify_audit(self) -> None:
        """The ``audit-verify`` job: re-verify the audit chain for the page when due
        (keymgr.ui.OperatorView.verify: at most 1/VERIFY_DUTY of the time)."""
        if self.config.daemon.ui is None or self.stop.is_set() or not self.ui.verify_due():
            return
        res = self.ui.verify(self.manager, self.redact(), self.stop.is_set)
        if res is not None and not res.ok:
            log.error("audit.verify_failed", error=res.error)

    def ui_page(self, path: str) -> tuple[bytes, Mapping[str, str]] | None:
        """The operator page at ``[daemon] ui``; None for any other path, or when off.
        From memory only: the snapshot, the cached events and chain check."""
        cfg = self.config
        if cfg.daemon.ui is None or path != cfg.daemon.ui:
            return None
        try:
            return self.ui.page(
                cfg, self.metrics.snapshot, self.ready(), self.redact(), self.snapshot_at
            )
        except Exception as e:  # the listener answers 500; the reason goes to the log
            log.error("ui.failed", error=f"{type(e).__name__}: {e}")
            raise

    # -- probes ------------------------------------------------------------------

    def stuck_after(self) -> float:
        return max(MIN_STUCK_AFTER, 5 * self.config.daemon.reconcile_interval.total_seconds())

    def alive(self) -> tuple[bool, dict[str, Any]]:
        """Scheduler running, heartbeats coming, no pass hung (``/healthz``, watchdog)."""
        now = time.monotonic()
        limit = self.stuck_after()
        info: dict[str, Any] = {}
        ok = self.scheduler.running and not self.stop.is_set()
        info["scheduler"] = "running" if ok else "stopped"
        beat = self.last_heartbeat if self.last_heartbeat is not None else self.started
        if now - beat > limit:
            ok = False
            info["heartbeat"] = f"none for {now - beat:.0f}s"
        started = self.pass_started
        if started is not None and now - started > limit:
            ok = False
            info["pass"] = f"running for {now - started:.0f}s"
        return ok, info

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks = self.checks
        failing = {k: v for k, v in checks.items() if v != "ok"}
        held = self.lease.held(utcnow()) if self._lease_mode() == "lease" else True
        info: dict[str, Any] = {"checks": checks, "lease_held": held}
        if not checks or self.last_heartbeat is None:
            return False, {**info, "reason": "starting"}
        if failing:
            return False, {**info, "reason": "unreachable: " + ", ".join(sorted(failing))}
        # An edge that cannot be probed shows here but does not make this
        # replica unready: another replica would not reach it either, and an
        # unready pod would only stall rollouts. It holds promotion (planner)
        # and keymgr_edge_up alerts on it.
        state = self.metrics.snapshot[0]
        down = {
            f"{pub} {url}": edge.error
            for pub, urls in (state.edges if state is not None else {}).items()
            for url, edge in urls.items()
            if edge.error is not None
        }
        if down:
            info["edges_down"] = down
        if held:
            horizon = 3 * self.config.daemon.reconcile_interval.total_seconds() + 30
            if self.last_ok is None or time.monotonic() - self.last_ok > horizon:
                if self.last_ok is None and self.last_error is None:
                    return False, {**info, "reason": "no reconcile yet"}
                return False, {**info, "reason": self.last_error or "no successful reconcile"}
        return True, info

    # -- audit events of the daemon itself ----------------------------------------

    def record(self, event: dict[str, Any]) -> None:
        """Record a daemon event through the state, never forking the hash chain.

        Replicas share one audit chain (one file on one host, or the shared
        store's objects): the store's exclusive lock (the file store's flock, a
        shared store's lock object) serialises this commit with every pass and
        with the other replicas; committing it
        (rather than appending it) anchors it, so its removal from the log is
        detectable. Every store's exclusive() is re-entrant per thread and
        queues the other threads of the process, so this waits for a pass
        running in another thread without any lock of the daemon's own.
        """
        mgr = self.manager
        try:
            with mgr.store.exclusive():
                mgr.reconciler.record([{"ts": utcnow(), **event}])
        except KeymgrError as e:
            if _failed_audit_check(e):
                self.metrics.audit_verify_failures.inc()
            log.error("audit.failed", audit_event=event.get("event"), error=str(e))

    # -- lifecycle ---------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: load and check the config; apply it whole, or keep the old one."""
        from keymgr.health import HealthServer
        from keymgr.logs import configure

        old = self.config
        health: Any = None
        try:
            config = load_config(old.path)
            manager = KeyManager(config, actor="daemon")
            # A ring dropped while state holds its live keys would fail every
            # pass: refuse it now, while the old config still works.
            with contextlib.suppress(KeymgrError):
                state = manager.store.load()[0]
                manager.reconciler.check_rings(state)
            if config.daemon.listen != old.daemon.listen:
                host, port = config.daemon.listen
                try:
                    health = HealthServer(
                        host, port, self.metrics, self.alive, self.ready, ui=self.ui_page
                    )
                except OSError as e:
                    raise KeymgrError(
                        f"{config.path}: daemon.listen {host}:{port}: cannot listen: {e.strerror}"
                    ) from None
            # [service]: its new listeners bound now (a socket that cannot be
            # bound rejects the config), started once the config is swapped.
            from keymgr.service import prepare_reload

            try:
                service = prepare_reload(self.service, config)
            except KeymgrError as e:
                if health is not None:
                    health.close()
                raise KeymgrError(f"{config.path}: {e}") from None
        except KeymgrError as e:
            # Audit first: whoever reacts to the log line finds the event recorded.
            self.record({"event": "config.rejected", "reason": str(e)})
            log.error("config.rejected", error=str(e), keeping="previous config")
            return
        with self.tick_lock, self.lease_lock:
            manager.metrics = self.metrics
            manager.reconciler.on_probe = self.metrics.observe_probe
            if manager.store.url != self.manager.store.url:
                with contextlib.suppress(KeymgrError):
                    self.lease.release()
                self.lease = Lease(manager.store, config.daemon.lease_ttl, self.lease.holder)
            else:
                self.lease.store = manager.store
                self.lease.ttl = config.daemon.lease_ttl
            old_manager, self.config, self.manager = self.manager, config, manager
        # Its queued notifications go on in the background, within flush_timeout.
        old_manager.close(wait=0)
        if health is not None:
            self.health.close()
            self.health = health
        try:
            self.service = service.apply(self)
        except KeymgrError as e:
            self.service = None
            log.error("service.failed", error=str(e))
        configure(config.daemon.log_level)
        self._schedule_periodic(reschedule=True)
        self.record({"event": "config.loaded", "reason": "SIGHUP"})
        log.info(
            "config.loaded",
            path=str(config.path),
            rings=len(config.policies),
            listen=_addr(config.daemon.listen[0], self.health.port),
        )
        self.scheduler.add_job(
            self.request_pass,
            "date",
            run_date=datetime.now().astimezone(),
            id="reload",
            replace_existing=True,
        )

    def _schedule_periodic(self, reschedule: bool = False) -> None:
        cfg = self.config.daemon
        interval = cfg.reconcile_interval.total_seconds()
        # Standbys check often enough to take over within a third of the TTL.
        beat = min(interval, cfg.lease_ttl.total_seconds() / 3)
        now = datetime.now().astimezone()
        if reschedule:
            self.scheduler.reschedule_job("heartbeat", trigger="interval", seconds=beat)
            self.scheduler.reschedule_job("reconcile", trigger="interval", seconds=interval)
            return
        self.scheduler.add_job(
            self.heartbeat, "interval", seconds=beat, id="heartbeat", next_run_time=now
        )
        # The first pass is started by the first heartbeat, once it holds the lease.
        self.scheduler.add_job(self.request_pass, "interval", seconds=interval, id="reconcile")

    def run(self) -> int:
        from keymgr.health import HealthServer

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()
            self.wake.set()
            # A pass (or this thread, recording an event) waiting for the lock
            # of a replica killed mid-pass would hold the stop for up to
            # lock_ttl: it fails at once instead (an Event: safe in a handler).
            self.manager.store.interrupt()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reload_requested = True
            self.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        cfg = self.config.daemon
        try:
            self.health = HealthServer(
                cfg.listen[0], cfg.listen[1], self.metrics, self.alive, self.ready,
                ui=self.ui_page,
            )
        except OSError as e:
            raise KeymgrError(
                f"daemon.listen {cfg.listen[0]}:{cfg.listen[1]}: cannot listen: {e.strerror}"
            ) from None
        from keymgr.service import start_service

        try:
            self.service = start_service(self)  # [service]: None when the table is absent
        except KeymgrError:
            self.health.close()
            raise
        mode = self._lease_mode()
        self.record({"event": "daemon.started", "reason": f"replica {self.lease.holder}"})
        log.info(
            "daemon.started",
            config=str(self.config.path),
            interval=cfg.reconcile_interval.total_seconds(),
            listen=_addr(cfg.listen[0], self.health.port),
            replica=self.lease.holder,
            lease=mode,
            # Where the audit chain is kept: a file, or the shared store's
            # objects (keymgr.auditstore; then no local file is the record).
            audit=self.manager.audit.where,
        )
        if mode == "single":
            log.warning(
                "lease.unsupported",
                state=self.manager.store.url,
                reason="this state store has no lease: run a single replica against it",
            )
        self._schedule_periodic()
        # Does nothing unless [daemon] ui is on (checked at each run: SIGHUP may turn it on).
        self.scheduler.add_job(
            self.verify_audit, "interval", seconds=VERIFY_TICK, id="audit-verify",
            next_run_time=datetime.now().astimezone(),
        )
        wd = sdnotify.watchdog_interval()
        if wd is not None:
            self.scheduler.add_job(self.watchdog, "interval", seconds=wd, id="watchdog")
        self.scheduler.start()
        sdnotify.notify("READY=1\nSTATUS=started")
        while not self.stop.is_set():
            self.wake.wait()
            self.wake.clear()
            if self.reload_requested and not self.stop.is_set():
                self.reload_requested = False
                sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
                self.reload()
                sdnotify.notify("READY=1")
        sdnotify.notify("STOPPING=1")
        log.info("daemon.stopping")
        if self.service is not None:
            self.service.close()  # answers in flight, then records pending refusals
        with self._jobs_lock:
            self._shutting_down = True  # no job adds one now (see _add_job)
        self.scheduler.shutdown(wait=True)  # lets a running pass finish
        with self.lease_lock:
            try:
                self.lease.release()
            except KeymgrError as e:
                log.warning("lease.release_failed", error=str(e))
        self.health.close()
        self.record({"event": "daemon.stopped"})
        self.manager.close()  # waits at most [notify] flush_timeout
        log.info("daemon.stopped")
        return 0

    def watchdog(self) -> None:
        """Ping systemd only while :meth:`alive` holds, so a hung pass gets us restarted."""
        ok, info = self.alive()
        if ok:
            sdnotify.notify("WATCHDOG=1")
        else:
            log.error("watchdog.withheld", **info)


def _addr(host: str, port: int) -> str:
    """``HOST:PORT`` as written in the config (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(cfg: Config) -> int:
    from prometheus_client import disable_created_metrics

    from keymgr.logs import configure

    malloc.limit_arenas()  # before the scheduler and server threads (keymgr.malloc)
    configure(cfg.daemon.log_level)
    # One ``*_created`` series per counter child doubles the scrape for no use here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return Daemon(cfg).run()


def _failed_audit_check(e: KeymgrError) -> bool:
    """An audit error that counts as a failed check (the log does not match
    the state, a checkpoint does not verify): possible tampering, alerted as
    KeymgrAuditVerifyFailing. A log that cannot be read or written (a full
    disk) fails the pass too, and is alerted as such, not as tampering."""
    return isinstance(e, AuditError) and not isinstance(e, AuditIOError)
