"""The chart's observability and ClusterProfile options, as `helm template` renders them: off by default,
scraping each component where it really serves /metrics, the PrometheusRule and the Grafana dashboard
carrying the plain files (whose alerts tests/test_alerts.py fires for real), and every metric they name
one that Keyless exports."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from keyless.cli import build_parser

from .chart_fixtures import CHART, container, find, render
from .conftest import ROOT, require_binary

pytestmark = require_binary("helm")

RULES = CHART / "files" / "prometheus" / "keyless-rules.yaml"
DASHBOARD = CHART / "files" / "grafana" / "keyless-dashboard.json"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
ALL_ON = ["--set", "monitoring.serviceMonitors.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
          "--set", "monitoring.grafanaDashboard.enabled=true"]


def test_monitoring_and_cluster_profiles_are_off_by_default():
    docs = render()
    assert not [d for d in docs if d["kind"] in MONITORING_KINDS]
    assert not [d for d in docs if d["metadata"]["name"] == "keyless-grafana-dashboard"]
    assert not any("--cluster-profiles" in a for a in container(docs, "keyless-operator")["args"])
    role = find(docs, "ClusterRole", "keyless-operator")
    assert not [r for r in role["rules"] if "multicluster.x-k8s.io" in r["apiGroups"]]


def test_prometheus_rule_is_the_rules_file_verbatim():
    rule = find(render(*ALL_ON), "PrometheusRule", "keyless")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_monitors_scrape_each_component_where_it_serves_metrics():
    docs = render(*ALL_ON, "--set", "webhooks.enabled=true", "--set", "webhooks.tls.caBundle=Y2E=",
                  "--set-json", 'argocd.namespaces=["argocd","team-argocd"]')
    for component in ("operator", "broker", "webhooks"):
        deployment = f"keyless-{component}"
        spec = container(docs, deployment)
        port = next(p for p in spec["ports"] if p["name"] == "metrics")
        args = build_parser().parse_args(spec["args"])
        assert args.metrics_listen.endswith(f":{port['containerPort']}"), (component, args.metrics_listen)
        if component == "broker":  # never the public issuer's port
            assert args.metrics_listen.rsplit(":", 1)[1] != args.listen.rsplit(":", 1)[1]
        service = find(docs, "Service", f"keyless-{component}-metrics")
        pod_labels = find(docs, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        monitor = find(docs, "ServiceMonitor", f"keyless-{component}")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    public = find(docs, "Service", "keyless-broker")  # the issuer's Service carries no metrics port
    assert [p["name"] for p in public["spec"]["ports"]] == ["https"]
    agent = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]["extraContainers"][0]
    for namespace in ("argocd", "team-argocd"):
        monitor = find(docs, "PodMonitor", "keyless-agents", namespace)
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in agent["ports"]}


def test_grafana_dashboard_configmap_holds_the_dashboard_file():
    config_map = find(render(*ALL_ON), "ConfigMap", "keyless-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["keyless.json"]) == json.loads(DASHBOARD.read_text())


def _exported_metric_names() -> set[str]:
    """Every metric name Keyless's code registers (the first string argument of a metric constructor)."""
    names = set()
    pattern = re.compile(r'(?:Counter|Gauge|Histogram|FastHistogram)\(\s*"(keyless_[a-z_]+)"')
    for path in (ROOT / "operator" / "keyless").rglob("*.py"):
        names.update(pattern.findall(path.read_text()))
    return names


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_the_rules_and_dashboard_query_is_exported(source):
    text = RULES.read_text() if source == "rules" else DASHBOARD.read_text()
    queried = set(re.findall(r"\bkeyless_[a-z_]+", text))
    exported = _exported_metric_names()
    assert "keyless_operator_cluster_condition" in exported
    unknown = {name for name in queried
               if re.sub(r"_(total|bucket|sum|count)$", "", name) not in exported and name not in exported}
    assert not unknown, f"{source} queries metrics no component exports: {sorted(unknown)}"
    panels = json.loads(DASHBOARD.read_text())["panels"]
    titles = {p["title"] for p in panels}
    assert {"Fleet readiness", "Tokens minted and answers by code", "Token request latency", "Refusals by reason",
            "Agent credential freshness"} <= titles


def test_cluster_profiles_value_passes_the_flags_and_grants_exactly_clusterprofiles():
    docs = render("--set", "clusterProfiles.enabled=true", "--set", "clusterProfiles.namespace=fleet")
    args = build_parser().parse_args(container(docs, "keyless-operator")["args"])
    assert args.cluster_profiles is True and args.cluster_profile_namespace == "fleet"
    rules = [r for r in find(docs, "ClusterRole", "keyless-operator")["rules"]
             if "multicluster.x-k8s.io" in r["apiGroups"]]
    assert {tuple(r["resources"]): tuple(r["verbs"]) for r in rules} == {
        ("clusterprofiles",): ("get", "list", "create", "patch", "delete"),
        ("clusterprofiles/status",): ("get", "patch")}
