"""The Prometheus alert rules and the Grafana dashboard under deploy/ stay true to the code.

Every rule and every panel query is loaded, and each metric name it references must be one
the coordinator, the site agent or fedward-serve exports (their ``METRIC_NAMES``, which
tests/test_metrics.py and tests/test_inference_service.py check against real scrapes).
Where ``promtool`` is installed (Debian's ``prometheus`` package, or ``FEDWARD_PROMTOOL``),
the rules are also checked and unit-tested with it, and every panel query is parsed by it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.metrics import METRIC_NAMES as COORDINATOR
from export.serve_metrics import METRIC_NAMES as SERVE
from site_agent.metrics import METRIC_NAMES as SITE

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = sorted((DEPLOY / "prometheus").glob("*.rules.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus").glob("*.rules.test.yml"))
DASHBOARD = DEPLOY / "grafana" / "fedward-dashboard.json"

EXPORTED = COORDINATOR | SITE | SERVE
HISTOGRAMS = frozenset({"fedward_api_request_duration_seconds",
                        "fedward_round_duration_seconds",
                        "fedward_serve_predict_duration_seconds"})
# Metrics of work not built yet, referenced by a rule documented as pending (none now).
PENDING: frozenset[str] = frozenset()
_NAME = re.compile(r"\bfedward_[A-Za-z0-9_:]*")
# Grafana's own variables, replaced by what Grafana would put there for promtool to parse.
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def referenced(expr: str) -> set[str]:
    """The Fedward metric names an expression uses, histogram series mapped to the family."""
    names = set()
    for name in _NAME.findall(expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name[:-len(suffix)] in HISTOGRAMS:
                name = name[:-len(suffix)]
        names.add(name)
    return names


def rules() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in RULES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            found += [(path, rule) for rule in group["rules"]]
    return found


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def promtool() -> str:
    tool = os.environ.get("FEDWARD_PROMTOOL") or shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`); the structural "
                    "checks still ran")
    return tool


def test_every_alert_rule_is_complete_and_uses_exported_metrics() -> None:
    found = rules()
    names = {rule["alert"] for _, rule in found}
    assert {"FedwardSiteOffline", "FedwardSiteCertificateExpiringSoon",
            "FedwardPrivacyBudgetOver80Percent", "FedwardRunFailed",
            "FedwardDriftAlarm"} <= names
    assert len(names) == len(found), "alert names must be unique"
    for path, rule in found:
        where = f"{path.name}: {rule['alert']}"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, where
        assert rule["annotations"]["summary"], where
        used = referenced(rule["expr"])
        # Prometheus's own `up` of a Fedward scrape job is the one other series allowed.
        assert used or 'up{job="fedward-' in rule["expr"], f"{where}: no Fedward metric"
        unknown = used - EXPORTED - PENDING
        assert not unknown, f"{where} uses metrics nothing exports: {sorted(unknown)}"
        if used & PENDING:
            assert "PENDING" in path.read_text(), f"{where} uses a pending metric undocumented"


def test_pending_metrics_are_really_pending() -> None:
    # Once a pending metric is exported, drop it from PENDING and the file's note.
    assert not PENDING & EXPORTED
    assert {"fedward_drift_alarm", "fedward_drift_psi"} <= EXPORTED


def test_every_dashboard_panel_queries_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used: set[str] = set()
    for panel in dash["panels"]:
        assert panel["title"] and panel["targets"], panel
        for target in panel["targets"]:
            names = referenced(target["expr"])
            assert names, f"panel {panel['title']!r}: no Fedward metric in {target['expr']!r}"
            unknown = names - EXPORTED
            assert not unknown, f"panel {panel['title']!r} uses unknown {sorted(unknown)}"
            used |= names
    assert not EXPORTED - used, f"metrics no panel shows: {sorted(EXPORTED - used)}"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", *map(str, RULES)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool, "test", "rules", *map(str, RULE_TESTS)],
                            capture_output=True, text=True, timeout=60, cwd=DEPLOY / "prometheus")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    tool = promtool()
    records = []
    for i, (_, expr) in enumerate(panel_queries()):
        for var, value in _GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        records.append({"record": f"fedward_dashboard_check_{i}", "expr": expr})
    path = tmp_path / "panels.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    checked = subprocess.run([tool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_broken_query_is_caught(tmp_path: Path) -> None:
    # The checks above can fail: an unknown metric, and (with promtool) bad PromQL.
    assert referenced("rate(fedward_not_a_metric_total[5m])") - EXPORTED == \
        {"fedward_not_a_metric_total"}
    tool = promtool()
    path = tmp_path / "bad.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [
        {"record": "x", "expr": "sum(rate(fedward_runs[5m])"}]}]}))
    checked = subprocess.run([tool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 1
