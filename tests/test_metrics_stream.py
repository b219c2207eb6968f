"""``/metrics`` is streamed: the per-ring families are written in chunks as they
are made (keymgr.metrics.Metrics.exposition), never held whole. The text must be
exactly what prometheus-client renders for the same registry. (A client that
does not read still loses its thread at the request timeout:
tests/test_health_limits.py.)"""

from __future__ import annotations

import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keymgr import metrics as metrics_mod
from keymgr.health import HealthServer
from keymgr.metrics import Metrics
from keymgr.model import ACTIVE, RETIRED, Key, Ring, State

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class _Due:
    ring: str
    name: str


@dataclass
class _Upcoming:
    action: str
    kid: str | None
    at: datetime


@dataclass
class _Plan:
    due: list[_Due]
    upcoming: dict[str, _Upcoming | None]


def _key(kid: str, state: str) -> Key:
    return Key(
        kid=kid, alg="ES256", backend="local", state=state, public_jwk={},
        created_at=T0, activated_at=T0 if state == ACTIVE else None,
    )


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch):
    """Ages are computed at scrape time: two renderings compare only at one instant."""
    monkeypatch.setattr(metrics_mod, "time", types.SimpleNamespace(time=lambda: 1.8e9))


def _metrics(n: int) -> Metrics:
    names = [f"tenant-{i:06d}" for i in range(n)] + ['odd"name\\with\nbreaks']
    rings = {
        name: Ring(name, keys=(_key(f"a{i}", ACTIVE), _key(f"r{i}", RETIRED)) if i % 3 else ())
        for i, name in enumerate(names)
    }
    m = Metrics()
    m.reconciles.labels("ok").inc()
    plan = _Plan(
        due=[_Due(names[1], "promote")],
        upcoming={name: _Upcoming("generate", None, T0 + timedelta(days=i)) for i, name in
                  enumerate(names) if i % 2},
    )
    m.snapshot = (State(rings=rings), plan)  # type: ignore[assignment]
    return m


def test_streamed_text_is_what_prometheus_client_renders(monkeypatch):
    monkeypatch.setattr(metrics_mod, "CHUNK_LINES", 7)
    m = _metrics(50)
    chunks = list(m.exposition())
    assert len(chunks) > 10
    text = b"".join(chunks)
    assert text == generate_latest(m.registry)
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    keys = families["keymgr_keys"].samples
    assert len(keys) == 51 * 7
    assert {s.labels["ring"] for s in keys} >= {'odd"name\\with\nbreaks'}


def test_metrics_over_http_in_chunks(monkeypatch):
    monkeypatch.setattr(metrics_mod, "CHUNK_LINES", 100)
    m = _metrics(3000)  # ~1.3 MB of text: many socket writes
    server = HealthServer("127.0.0.1", 0, m, lambda: (True, {}), lambda: (True, {}))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            body = r.read()
            assert r.headers["Content-Type"].startswith("text/plain")
        assert body == generate_latest(m.registry)
        assert len(body) > 1_000_000
    finally:
        server.close()
