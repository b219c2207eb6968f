"""Prometheus metrics of the daemon, on prometheus-client's own registry.

Counters move as things happen; key states, active-key age and the next
transition are computed at scrape time from the last state the daemon saw, so
a scrape never touches the store or a backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from keymgr.model import STATES, EdgeRecord, State
from keymgr.planner import Plan
from keymgr.probes import ProbeResult

#: Lines per chunk of the streamed per-ring families (keymgr.health writes each
#: chunk as it is made: with 100,000 rings the 700,000 ``keymgr_keys`` samples
#: are never held as objects, nor as one string).
CHUNK_LINES = 5000

_HELP = {
    "keymgr_keys": ("Keys per ring and state", ("ring", "state")),
    "keymgr_active_key_age_seconds": ("Seconds since the ring's signer was promoted", ("ring",)),
    "keymgr_next_transition_timestamp_seconds": (
        "When the ring's next transition is due (Unix time)",
        ("ring", "action"),
    ),
}


def _label(value: str) -> str:
    """A label value escaped as the text exposition format wants it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """A sample value as prometheus-client writes it (``1.0``, ``+Inf``, ``NaN``)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _head(name: str) -> str:
    return f"# HELP {name} {_HELP[name][0]}\n# TYPE {name} gauge\n"


class _StateFamilies:
    """The per-ring gauges, computed at scrape time from the last state the
    daemon saw: as prometheus-client metric families (:meth:`collect`, for
    the registry API) or as exposition text in chunks (:meth:`chunks`, what
    ``/metrics`` serves). One computation feeds both, so they cannot differ."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def _rows(self) -> dict[str, Iterator[tuple[tuple[str, ...], float]]]:
        state, plan = self.m.snapshot
        now = time.time()
        rings = sorted(state.rings.items()) if state is not None else []

        def keys() -> Iterator[tuple[tuple[str, ...], float]]:
            for name, ring in rings:
                counts = dict.fromkeys(STATES, 0)
                for k in ring.keys:
                    counts[k.state] += 1
                for st, n in counts.items():
                    yield (name, st), n

        def age() -> Iterator[tuple[tuple[str, ...], float]]:
            for name, ring in rings:
                active = ring.active
                if active is not None and active.activated_at is not None:
                    yield (name,), now - active.activated_at.timestamp()

        def nxt() -> Iterator[tuple[tuple[str, ...], float]]:
            if plan is None:
                return
            # A transition already due is not in plan.upcoming: it keeps the
            # time it was first seen due, so "next transition in the past"
            # alerts on work that stays undone (deploy/monitoring).
            due_now: dict[tuple[str, str], float] = {}
            for a in plan.due:
                due_ring: str | None = getattr(a, "ring", None)
                if due_ring is not None:
                    key = (due_ring, a.name)
                    due_now[key] = self.m.due_since.get(key, now)
            self.m.due_since = due_now
            due_rings = {r for r, _ in due_now}
            for (name, action), since in sorted(due_now.items()):
                yield (name, action), since
            for name, u in sorted(plan.upcoming.items()):
                if u is not None and name not in due_rings:
                    yield (name, u.action), u.at.timestamp()

        return {
            "keymgr_keys": keys(),
            "keymgr_active_key_age_seconds": age(),
            "keymgr_next_transition_timestamp_seconds": nxt(),
        }

    def collect(self) -> Iterator[Metric]:
        for name, rows in self._rows().items():
            family = GaugeMetricFamily(name, _HELP[name][0], labels=list(_HELP[name][1]))
            for labels, value in rows:
                family.add_metric(list(labels), value)
            yield family

    def chunks(self) -> Iterator[bytes]:
        """The same families as exposition text, a few thousand lines at a time."""
        for name, rows in self._rows().items():
            names = _HELP[name][1]
            lines = [_head(name)]
            for labels, value in rows:
                pairs = ",".join(
                    f'{n}="{_label(v)}"' for n, v in sorted(zip(names, labels, strict=True))
                )
                lines.append(f"{name}{{{pairs}}} {_number(value)}\n")
                if len(lines) >= CHUNK_LINES:
                    yield "".join(lines).encode()
                    lines = []
            if lines:
                yield "".join(lines).encode()


class _Union(Collector):
    """The registry the API sees: the counters' registry plus the state families."""

    def __init__(self, base: CollectorRegistry, state: _StateFamilies) -> None:
        self.base, self.state = base, state

    def collect(self) -> Iterator[Metric]:
        yield from self.base.collect()
        yield from self.state.collect()


class Metrics:
    def __init__(self) -> None:
        #: Counters, histograms and plain gauges (streamed as one small block).
        r = self.base = CollectorRegistry()
        self.reconciles = Counter(
            "keymgr_reconciles", "Reconcile passes by result", ["result"], registry=r
        )
        self.transitions = Counter(
            "keymgr_transitions", "Audit events of applied transitions", ["event"], registry=r
        )
        self.publish_failures = Counter(
            "keymgr_publish_failures", "Failed publishes", ["publisher"], registry=r
        )
        self.backend_failures = Counter(
            "keymgr_backend_failures", "Failed backend calls", ["backend"], registry=r
        )
        self.jwks_publishes = Counter(
            "keymgr_jwks_publishes",
            "Confirmed publishes: written, or skipped because the target already matched",
            ["publisher", "result"],
            registry=r,
        )
        self.sign_calls = Counter(
            "keymgr_sign_calls", "Tokens signed in this process", ["ring"], registry=r
        )
        self.sign_latency = Histogram(
            "keymgr_sign_duration_seconds",
            "Time to sign one token",
            ["ring"],
            registry=r,
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.last_success = Gauge(
            "keymgr_last_reconcile_success_timestamp_seconds",
            "Unix time of the last successful reconcile",
            registry=r,
        )
        self.lease_held = Gauge(
            "keymgr_lease_held", "1 while this replica holds the lease", registry=r
        )
        self.ready = Gauge("keymgr_ready", "1 while /readyz would answer 200", registry=r)
        # [notify] (keymgr.notify): webhook deliveries.
        self.notify_sent = Counter(
            "keymgr_notify_sent",
            "Webhook deliveries by final result (ok, failed: given up)",
            ["webhook", "result"],
            registry=r,
        )
        self.notify_retries = Counter(
            "keymgr_notify_retries", "Webhook attempts that failed and were retried",
            ["webhook"], registry=r,
        )
        self.notify_dropped = Counter(
            "keymgr_notify_dropped",
            "Notifications dropped unsent (queue_full, closing, closed)",
            ["webhook", "reason"],
            registry=r,
        )
        self.notify_queue = Gauge(
            "keymgr_notify_queue_depth", "Notifications waiting per webhook", ["webhook"],
            registry=r,
        )
        self.audit_verify_failures = Counter(
            "keymgr_audit_verify_failures",
            "Audit checks that failed: the log's tail does not match the head anchored "
            "in state, the outbox does not chain, or a signed checkpoint does not verify "
            "(not a log that cannot be read or written: those fail the pass)",
            registry=r,
        )
        self.edge_up = Gauge(
            "keymgr_edge_up",
            "1 when the last probe of the edge got a JWKS, 0 when it did not",
            ["publisher", "edge"],
            registry=r,
        )
        self.edge_age = Gauge(
            "keymgr_edge_document_age_seconds",
            "The Age header of the edge's last answer: how long it has held its copy",
            ["publisher", "edge"],
            registry=r,
        )
        self.edge_propagation = Histogram(
            "keymgr_edge_propagation_seconds",
            "From the origin confirming a key to the first probe showing it at the edge",
            ["publisher", "edge"],
            registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
        )
        # [service] (keymgr.service): the local signing service.
        self.service_tokens = Counter(
            "keymgr_service_tokens",
            "Tokens the signing service issued, per ring and caller (uid:N or cert:NAME)",
            ["ring", "caller"],
            registry=r,
        )
        self.service_latency = Histogram(
            "keymgr_service_sign_duration_seconds",
            "Signing service: from the request's arrival to the token's answer",
            ["ring"],
            registry=r,
            buckets=(2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.service_refusals = Counter(
            "keymgr_service_refusals",
            "Requests the signing service refused, by error code (ring empty when unknown)",
            ["ring", "code"],
            registry=r,
        )
        self.snapshot: tuple[State | None, Plan | None] = (None, None)
        #: (ring, action) -> Unix time a due transition was first seen due.
        self.due_since: dict[tuple[str, str], float] = {}
        self.state_families = _StateFamilies(self)
        #: Everything, as one prometheus-client registry (tests, embedding).
        self.registry = CollectorRegistry()
        self.registry.register(_Union(r, self.state_families))

    def exposition(self) -> Iterator[bytes]:
        """``/metrics``: the text exposition format, in chunks, built as it is sent.

        The same text ``generate_latest(self.registry)`` makes (a test checks
        it), without ever holding the per-ring families whole.
        """
        yield generate_latest(self.base)
        yield from self.state_families.chunks()

    def forget_edges(self) -> None:
        """Drop the edge gauges (this replica no longer probes: not the lease holder)."""
        self.edge_up.clear()
        self.edge_age.clear()

    def observe_probe(
        self, publisher: str, result: ProbeResult, before: EdgeRecord | None, after: State
    ) -> None:
        """One edge probe (Reconciler.on_probe): up/down, the edge's copy's age,
        and for each key the edge shows for the first time, how long it took
        to get there from the origin's confirmation."""
        labels = (publisher, result.url)
        self.edge_up.labels(*labels).set(1 if result.kids is not None else 0)
        if result.age is not None:
            self.edge_age.labels(*labels).set(result.age)
        edge = after.edge(publisher, result.url)
        origin = after.publishers.get(publisher)
        if edge is None or edge.error is not None or origin is None:
            return
        for kid, seen in edge.since.items():
            if before is not None and kid in before.kids:
                continue
            confirmed = origin.since.get(kid)
            if confirmed is not None and seen == edge.at:
                self.edge_propagation.labels(*labels).observe(
                    max(0.0, (seen - confirmed).total_seconds())
                )

    def observe_pass(self, result: Any, config: Any) -> None:
        """Count one reconcile pass (a keymgr.reconciler.PassResult)."""
        self.reconciles.labels("ok" if result.ok else "failed").inc()
        if result.ok:
            self.last_success.set(datetime.now(UTC).timestamp())
        for ev in result.events:
            self.transitions.labels(ev["event"]).inc()
            if ev["event"] == "jwks.published":
                self.jwks_publishes.labels(
                    ev.get("publisher", ""), "written" if ev.get("written") else "unchanged"
                ).inc()
        for action, _err in result.failed:
            if action.name == "publish":
                self.publish_failures.labels(action.publisher).inc()
            else:
                pol = config.policies.get(getattr(action, "ring", ""))
                self.backend_failures.labels(pol.backend if pol else "").inc()
