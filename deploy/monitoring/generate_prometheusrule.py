"""Write prometheusrule.yaml from prometheus-rules.yml (run after editing the rules).

    python3 deploy/monitoring/generate_prometheusrule.py

The PrometheusRule's ``spec`` is the rules file from its ``groups:`` line on,
indented, comments included, so the two cannot drift apart:
tests/test_monitoring.py regenerates it and fails when the file differs.
Standard library only.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "prometheus-rules.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from prometheus-rules.yml by generate_prometheusrule.py: do not edit.
#
# The keymgr alerting rules for the Prometheus Operator. Its Prometheus picks
# up PrometheusRule objects through ruleSelector / ruleNamespaceSelector: add
# the labels yours selects on (kube-prometheus-stack: `release: <release name>`).
# Thresholds, conventions and the runbook: see prometheus-rules.yml and
# docs/runbook.md.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: keymgr
  namespace: keymgr
  labels:
    app.kubernetes.io/name: keymgr
    app.kubernetes.io/component: alerting-rules
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule manifest holding ``rules_text``'s groups."""
    lines = rules_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("groups:")]
    if len(starts) != 1:
        raise ValueError(f"{RULES.name}: expected one top-level 'groups:' line")
    body = lines[starts[0]:]
    return HEADER + "".join(f"  {line}\n" if line else "\n" for line in body)


def main() -> int:
    TARGET.write_text(render(RULES.read_text()))
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
