"""deploy/monitoring/: the alerting rules, their Prometheus Operator twin, the
Grafana dashboard and the runbook, each checked against what keymgr exports.

- ``promtool check rules`` and ``promtool test rules`` (every alert fires in
  its own scenario at a set evaluation time, and nothing fires in a healthy
  one); a broken threshold of each alert must make the unit tests fail.
- Every metric name, label name and ``state`` value the rules, their unit
  tests and the dashboard use is one keymgr exports: names read from the
  ``/metrics`` of a real daemon, and from :class:`keymgr.metrics.Metrics`
  after one sample of each labelled metric.
- ``prometheusrule.yaml`` is ``prometheus-rules.yml`` (regenerated and
  compared), and matches the PrometheusRule CRD schema.
- The dashboard: a Grafana JSON model whose queries all parse (promtool).
- ``docs/runbook.md`` has a section for each alert, where its runbook_url points.

promtool comes from Debian's ``prometheus`` package. It is skipped only when
absent outside CI (``CI`` unset); in CI a missing promtool fails.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from markdown.extensions.toc import slugify
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from keymgr.metrics import Metrics
from keymgr.model import STATES
from tests.conftest import REPO

MON = REPO / "deploy" / "monitoring"
RULES = MON / "prometheus-rules.yml"
UNIT_TESTS = MON / "alerts-test.yml"
OPERATOR_RULE = MON / "prometheusrule.yaml"
GENERATOR = MON / "generate_prometheusrule.py"
SERVICE_MONITOR = MON / "servicemonitor.yaml"
DASHBOARD = MON / "grafana-dashboard.json"
RUNBOOK = REPO / "docs" / "runbook.md"
SERVICE = REPO / "deploy" / "kubernetes" / "service.yaml"

#: Metrics the rules use that keymgr does not export yet: name -> label names.
#: Once keymgr exports one, delete it here (the test says so).
PROPOSED: dict[str, set[str]] = {}
#: Series the operator records: per-ring rotation thresholds (docs/runbook.md).
OPERATOR_SERIES = {"keymgr:rotation_overdue_threshold_seconds": {"ring"}}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
#: The job the rules expect (servicemonitor.yaml's jobLabel gives it).
JOB = "keymgr"

#: For each alert, one change to its threshold (in ``expr`` or ``for``) that
#: its promtool unit tests must catch: (field, old, new).
BREAKS: dict[str, tuple[str, str, str]] = {
    "KeymgrRotationOverdue": ("expr", "31 * 86400", "30 * 86400"),
    "KeymgrTransitionOverdue": ("expr", "> 900", "> 960"),
    "KeymgrTransitionStuck": ("for", "30m", "31m"),
    "KeymgrNoActiveKey": ("for", "5m", "4m"),
    "KeymgrPublishFailing": ("for", "15m", "14m"),
    "KeymgrBackendFailing": ("for", "15m", "16m"),
    "KeymgrNotReady": ("for", "10m", "11m"),
    "KeymgrNoSuccessfulReconcile": ("expr", "> 1800", "> 1860"),
    "KeymgrAbsent": ("for", "5m", "6m"),
    "KeymgrLeaseHoldersNotOne": ("expr", "!= 1", "> 1"),
    "KeymgrLeaseFlapping": ("expr", "> 4", "> 5"),
    "KeymgrAuditVerifyFailing": ("expr", "> 0", "> 1"),
    "KeymgrEdgeDown": ("for", "15m", "14m"),
    "KeymgrEdgePropagationSlow": ("expr", "> 1800", "> 3600"),
}

#: The PrometheusRule CRD's openAPIV3Schema (prometheus-operator v0.82,
#: example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml),
#: descriptions dropped and unknown fields refused, as kubernetes-validate's
#: strict mode does for built-in kinds (it has no schema for CRDs).
_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "labels": _STR_MAP,
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {
                                "type": "string", "pattern": "(?i)^(abort|warn)?$"},  # Go: ^(?i)...
                            "query_offset": {"type": "string", "pattern": _DURATION},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "annotations": _STR_MAP,
                                        "expr": {"anyOf": [{"type": "integer"},
                                                           {"type": "string"}]},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "keep_firing_for": {"type": "string", "minLength": 1,
                                                            "pattern": _DURATION},
                                        "labels": _STR_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found: install Debian's 'prometheus' package")
        pytest.skip("promtool not found (Debian package 'prometheus')")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path = MON) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def rules_doc() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def alerts() -> list[dict[str, Any]]:
    return [r for g in rules_doc()["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, Grafana variables replaced by
    values Prometheus accepts."""
    out = []
    for p in panels(dash):
        for t in p.get("targets", []):
            expr = t["expr"]
            expr = expr.replace("$__rate_interval", "5m")
            expr = re.sub(r"\$\{?(\w+)\}?", ".*", expr)  # only inside =~ "..." matchers
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", expr))
    return out


def _exposition(text: str, into: dict[str, set[str]], buckets: dict[str, set[str]]) -> None:
    """Sample names (and their label names) of one /metrics text. A family
    without samples still contributes the names its type implies."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""], "summary": ["", "_sum", "_count"]}
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, [""]):
            into.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            into.setdefault(s.name, set()).update(s.labels)
            if s.name.endswith("_bucket"):
                buckets.setdefault(s.name, set()).add(s.labels["le"])


def _observe_every_labelled_metric(m: Metrics) -> None:
    for value in vars(m).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            child = value.labels(*["x"] * len(value._labelnames))
            for method, arg in (("observe", 0.5), ("inc", 1), ("set", 1)):
                if hasattr(child, method):
                    getattr(child, method)(arg)
                    break


@pytest.fixture(scope="module")
def daemon_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The /metrics text of a real ``keymgr run`` after its first pass."""
    d = tmp_path_factory.mktemp("daemon")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KEYMGR_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONUNBUFFERED"] = "1"
    cli = [sys.executable, "-m", "keymgr.cli"]
    subprocess.run([*cli, "init", "--dir", str(d)], check=True, capture_output=True, env=env)
    cfg = d / "keymgr.toml"
    cfg.write_text(re.sub(r"(?m)^listen = .*$", 'listen = "127.0.0.1:0"', cfg.read_text()))
    out = d / "daemon.out"
    with open(out, "wb") as fo:
        proc = subprocess.Popen([*cli, "--config", str(cfg), "run"], stdout=fo,
                                stderr=subprocess.STDOUT, cwd=d, env=env)
    try:
        deadline = time.monotonic() + 30
        port = None
        while True:
            assert proc.poll() is None, f"daemon exited:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"no first pass in 30 s:\n{out.read_text()}"
            if port is None:
                for line in out.read_text().splitlines():
                    if '"daemon.started"' in line:
                        port = int(json.loads(line)["listen"].rsplit(":", 1)[1])
            if port is not None:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                # After the first pass: keys exist and the next transition is planned.
                if "keymgr_next_transition_timestamp_seconds{" in text and "keymgr_keys{" in text:
                    return text
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def exported(daemon_metrics: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({sample name: label names}, {bucket sample name: le values}) keymgr exports."""
    names: dict[str, set[str]] = {}
    buckets: dict[str, set[str]] = {}
    _exposition(daemon_metrics, names, buckets)
    m = Metrics()
    _observe_every_labelled_metric(m)
    _exposition(generate_latest(m.registry).decode(), names, buckets)
    return names, buckets


_NAME = re.compile(r"(?<![\w:\"])(keymgr[_:][A-Za-z0-9_:]*)")
_SELECTOR = re.compile(r"(keymgr[_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def check_expr(where: str, expr: str, names: dict[str, set[str]]) -> list[str]:
    """What in ``expr`` keymgr does not export: metric names, label names of
    selectors and groupings, and ``state`` values."""
    known = {**names, **PROPOSED, **OPERATOR_SERIES}
    every_label = set().union(*known.values()) | TARGET_LABELS | {"le"}
    problems = []
    for name in _NAME.findall(expr):
        if name not in known:
            problems.append(f"{where}: metric {name} is not exported")
    for name, body in _SELECTOR.findall(expr):
        for label, _op, value in _MATCHER.findall(body):
            if name in known and label not in known[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label!r}")
            if label == "state" and value not in STATES and "|" not in value:
                problems.append(f"{where}: no key state {value!r}")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in every_label:
                problems.append(f"{where}: no metric has a label {label!r}")
    return problems


# --------------------------------------------------------------------------- promtool


def test_rules_pass_promtool_check(promtool: str) -> None:
    r = run_promtool(promtool, "check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    r = run_promtool(promtool, "test", "rules", UNIT_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_and_a_healthy_unit_test() -> None:
    """Each alert: asserted silent in the healthy scenario; in a scenario of its
    own, asserted silent at one evaluation and firing (labels, severity and
    annotations) at a later one."""
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    by_alert = {a["alert"]: a for a in alerts()}
    healthy = doc["tests"][0]
    assert "healthy" in healthy["name"]
    silent_in_healthy = {t["alertname"] for t in healthy["alert_rule_test"]}
    assert all(not t["exp_alerts"] for t in healthy["alert_rule_test"])
    assert silent_in_healthy == set(by_alert)
    for name, rule in by_alert.items():
        firing = [(g, t) for g in doc["tests"][1:] for t in g["alert_rule_test"]
                  if t["alertname"] == name and t["exp_alerts"]]
        assert firing, f"{name}: no unit test makes it fire"
        for group, t in firing:
            before = [u for u in group["alert_rule_test"] if u["alertname"] == name
                      and not u["exp_alerts"] and _minutes(u["eval_time"]) < _minutes(
                          t["eval_time"])]
            assert before, f"{name}: no evaluation before {t['eval_time']} where it is silent"
            for exp in t["exp_alerts"]:
                assert exp["exp_labels"]["severity"] == rule["labels"]["severity"]
                assert exp["exp_annotations"]["runbook_url"] == rule["annotations"][
                    "runbook_url"]
                assert set(exp["exp_annotations"]) == set(rule["annotations"])


def _minutes(text: str) -> float:
    n, unit = re.fullmatch(r"(\d+)([smhd])", text).groups()  # type: ignore[union-attr]
    return int(n) * {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}[unit]


def test_every_alert_has_a_threshold_break() -> None:
    assert set(BREAKS) == {a["alert"] for a in alerts()}


@pytest.mark.parametrize("alert", sorted(BREAKS))
def test_breaking_a_threshold_fails_the_unit_tests(
    promtool: str, alert: str, tmp_path: Path
) -> None:
    """The unit tests pin each threshold: move it and promtool test fails,
    naming the alert. Only the healthy scenario and the alert's own run."""
    field, old, new = BREAKS[alert]
    doc = rules_doc()
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert rule[field].count(old) == 1, f"{alert}: {old!r} not once in its {field}"
    rule[field] = rule[field].replace(old, new)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["tests"] = [g for g in tests["tests"]
                      if any(t["alertname"] == alert for t in g["alert_rule_test"])]
    (tmp_path / UNIT_TESTS.name).write_text(yaml.safe_dump(tests, sort_keys=False))
    assert tests["tests"]
    r = run_promtool(promtool, "test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0, f"{alert}: {old!r} -> {new!r} went unnoticed\n{r.stdout}"
    # Failed on this alert's expectations (the unbroken files pass:
    # test_rules_unit_tests_pass), not on a file promtool could not read.
    assert f"alertname: {alert}" in r.stdout + r.stderr, r.stdout + r.stderr


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query through Prometheus's own parser (as recording rules)."""
    exprs = dashboard_exprs(dashboard())
    rules = [{"record": f"keymgr_dashboard:query_{i}", "expr": e}
             for i, (_, e) in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run_promtool(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_runbook_per_ring_threshold_example_works(promtool: str, tmp_path: Path) -> None:
    """The recording rules docs/runbook.md gives for per-ring thresholds, with
    the shipped rules: a ring with its own threshold alerts on it (above the
    default: audit, 91 days; below: short-lived, 8 days), a ring without one
    on the 31-day default. All three fire 15m after passing theirs, none before."""
    blocks = re.findall(r"```yaml\n(.*?)```", RUNBOOK.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "record: keymgr:rotation_overdue_threshold_seconds" in b]
    (tmp_path / "thresholds.yml").write_text(example)
    doc = rules_doc()
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # this test is about the thresholds
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    day, series = 86400, 'keymgr_active_key_age_seconds{job="keymgr", instance="a:9464", ring="%s"}'
    tests = {
        "rule_files": [RULES.name, "thresholds.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # 10 minutes below each threshold at 0, one more second each second.
                {"series": series % "audit", "values": f"{91 * day - 600}+60x40"},
                {"series": series % "short-lived", "values": f"{8 * day - 600}+60x40"},
                {"series": series % "api", "values": f"{31 * day - 600}+60x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": "KeymgrRotationOverdue", "exp_alerts": []},
                {"eval_time": "26m", "alertname": "KeymgrRotationOverdue", "exp_alerts": [
                    {"exp_labels": {"job": "keymgr", "ring": ring, "severity": "warning"}}
                    for ring in ("api", "audit", "short-lived")]},
            ],
        }],
    }
    (tmp_path / "t.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = run_promtool(promtool, "test", "rules", "t.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- names


def test_rules_use_only_exported_metrics_and_labels(
    exported: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    names, _ = exported
    problems = []
    for a in alerts():
        problems += check_expr(a["alert"], a["expr"], names)
    assert not problems, "\n".join(problems)


def test_proposed_metrics_are_not_exported_yet(
    exported: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    names, _ = exported
    done = sorted(set(PROPOSED) & set(names))
    assert not done, f"keymgr exports {done} now: delete them from PROPOSED in {__name__}"


def test_unit_test_series_are_what_keymgr_exports(
    exported: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    """The input series of alerts-test.yml: exported names and labels, and the
    histogram bucket bounds as prometheus-client writes them (le="1800.0")."""
    names, buckets = exported
    problems = []
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for s in group["input_series"]:
            name, _, body = s["series"].partition("{")
            if name == "up":
                continue
            problems += check_expr(group["name"], s["series"], names)
            labels = dict((k, v) for k, _op, v in _MATCHER.findall(body))
            if name in names and name not in PROPOSED:
                missing = names[name] - set(labels)
                if missing:
                    problems.append(f"{group['name']}: {name} lacks labels {sorted(missing)}")
            if "le" in labels and labels["le"] not in buckets.get(name, set()):
                problems.append(f"{group['name']}: {name} has no bucket le={labels['le']!r}")
            if "job" in labels and not labels["job"].startswith(JOB):
                problems.append(f"{group['name']}: job {labels['job']!r}")
    assert not problems, "\n".join(problems)


def test_dashboard_uses_only_exported_metrics_and_labels(
    exported: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    names, _ = exported
    dash = dashboard()
    problems = []
    for where, expr in dashboard_exprs(dash):
        problems += check_expr(where, expr, names)
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            problems += check_expr(f"variable {var['name']}", var["query"]["query"], names)
    assert not problems, "\n".join(problems)
    used = " ".join(e for _, e in dashboard_exprs(dash))
    for metric in PROPOSED:
        assert metric not in used, f"{metric} is not exported yet: no panel for it"


# --------------------------------------------------------------------------- Kubernetes


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", GENERATOR)
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert OPERATOR_RULE.read_text() == gen.render(RULES.read_text()), (
        "prometheusrule.yaml is stale: run python3 deploy/monitoring/generate_prometheusrule.py"
    )
    doc = yaml.safe_load(OPERATOR_RULE.read_text())
    assert doc["spec"]["groups"] == rules_doc()["groups"]


def test_prometheusrule_matches_the_crd_schema() -> None:
    import jsonschema
    import kubernetes_validate

    doc = yaml.safe_load(OPERATOR_RULE.read_text())
    # kubernetes-validate knows no CRD (SchemaNotFoundError): the CRD's own schema below.
    with contextlib.suppress(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    jsonschema.validate(doc, PROMETHEUS_RULE_SCHEMA)
    meta = doc["metadata"]
    assert meta["namespace"] == "keymgr"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"])
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            assert set(rule) >= {"alert", "expr", "labels", "annotations"}
            assert rule["labels"]["severity"] in {"critical", "warning"}
    # The schema refuses what the API server would drop.
    bad = copy.deepcopy(doc)
    bad["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, PROMETHEUS_RULE_SCHEMA)


def test_servicemonitor_scrapes_the_service_as_job_keymgr() -> None:
    sm = yaml.safe_load(SERVICE_MONITOR.read_text())
    svc = yaml.safe_load(SERVICE.read_text())
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert ports >= {"metrics"}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # The job label the rules rely on.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == JOB
    absent = next(a for a in alerts() if a["alert"] == "KeymgrAbsent")
    assert f'job="{JOB}"' in absent["expr"]


# --------------------------------------------------------------------------- Grafana

#: What the dashboard must show: a metric, and a fragment its query must hold.
REQUIRED_PANELS = [
    ("keymgr_keys", "by (ring, state)"),
    ("keymgr_active_key_age_seconds", "by (ring)"),
    ("keymgr_next_transition_timestamp_seconds", "time()"),
    ("keymgr_reconciles_total", "result"),
    ("keymgr_publish_failures_total", "publisher"),
    ("keymgr_backend_failures_total", "backend"),
    ("keymgr_sign_calls_total", "rate("),
    ("keymgr_sign_duration_seconds_bucket", "histogram_quantile(0.5,"),
    ("keymgr_sign_duration_seconds_bucket", "histogram_quantile(0.99,"),
    ("keymgr_lease_held", "{{instance}}"),
    ("keymgr_ready", "{{instance}}"),
    ("keymgr_edge_up", "edge"),
    ("keymgr_edge_propagation_seconds_bucket", "histogram_quantile(0.9,"),
    ("keymgr_edge_document_age_seconds", "edge"),
]


def test_dashboard_structure() -> None:
    dash = dashboard()
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert dash["schemaVersion"] == 39
    assert dash["uid"] and dash["title"] and dash["id"] is None
    (inp,) = dash["__inputs"]
    assert (inp["name"], inp["type"], inp["pluginId"]) == ("DS_PROMETHEUS", "datasource",
                                                           "prometheus")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ds, v["name"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "state-timeline"}, p["type"]
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
            for var in re.findall(r"\$\{?(\w+)\}?", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: ${var}"
    exprs = [(t["expr"], t.get("legendFormat", "")) for p in panels(dash)
             for t in p.get("targets", [])]
    for metric, fragment in REQUIRED_PANELS:
        assert any(re.search(rf"\b{metric}\b", e) and fragment in e + lf for e, lf in exprs), (
            f"no panel shows {metric} with {fragment!r}")


# --------------------------------------------------------------------------- runbook


def test_every_alert_has_its_runbook_section() -> None:
    text = RUNBOOK.read_text()
    headings = {slugify(m, "-") for m in re.findall(r"(?m)^#{2,4} (.+?)\s*$", text)}
    for a in alerts():
        url = a["annotations"]["runbook_url"]
        assert url == f"docs/runbook.md#{slugify(a['alert'], '-')}", url
        assert url.split("#", 1)[1] in headings, f"{a['alert']}: no section in {RUNBOOK.name}"
        assert a["alert"] in text
    assert "`deploy/monitoring/prometheus-rules.yml`" in text
    for series in OPERATOR_SERIES:
        assert series in text, f"{series}: the runbook must say how to record it"
    for metric in PROPOSED:
        assert metric in text, f"{metric}: the runbook must say it is not exported yet"
    mkdocs = (REPO / "mkdocs.yml").read_text()
    assert re.search(r"(?m)^  - Runbook: runbook.md$", mkdocs)
