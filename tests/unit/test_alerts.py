"""deploy/prometheus: every alert names only metrics our services export, says what to do, and
Prometheus's config scrapes every service and loads the rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sessionmgr.gateway.metrics import GatewayMetrics
from sessionmgr.supervisor.metrics import SupervisorMetrics
from sessionmgr.worker.actions import registry as actions
from sessionmgr.worker.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
# Recorded by Prometheus itself for every scrape target, not by a service.
PROMETHEUS_SERIES = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "summary": ("", "_count", "_sum")}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def exported_series(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def all_exported() -> set[str]:
    registries = [GatewayMetrics().registry, WorkerMetrics(actions.names()).registry, SupervisorMetrics(1.5).registry]
    return set().union(*(exported_series(r) for r in registries))


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, keywords and labels removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", "", text)  # numbers and durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function call or a keyword
        names.add(match.group())
    return names


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    found = [rule for group in data["groups"] for rule in group["rules"]]
    assert found
    return found


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def test_the_expression_parser_sees_only_series() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{route=~"/s.*"}[5m]))) > 0.5 and on (instance) b_total offset 5m'
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_every_alert_references_only_exported_metrics(rules: list[dict[str, Any]]) -> None:
    exported = all_exported() | PROMETHEUS_SERIES
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in {rule['expr']!r}"
        unknown = names - exported
        assert not unknown, f"{rule['alert']} uses metrics no service exports: {sorted(unknown)}"


def test_the_required_alerts_exist(rules: list[dict[str, Any]]) -> None:
    by_metric = {rule["alert"]: metric_names(rule["expr"]) for rule in rules}
    uses = lambda metric: any(metric in names for names in by_metric.values())  # noqa: E731
    assert uses("sm_http_request_duration_seconds_count"), "error rate"
    assert uses("sm_http_request_duration_seconds_bucket"), "p99 latency"
    assert uses("up"), "worker down"
    assert uses("sm_shards_unowned"), "shard without owner"
    assert uses("sm_degraded_queue_depth"), "degraded mode and its queue growing"


def test_every_alert_says_what_it_means_and_what_to_do(rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert "for" in rule, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["description"].split()) >= 10, f"{rule['alert']}: say what to do"


def test_prometheus_scrapes_every_service_and_loads_the_rules(prometheus: dict[str, Any], rules: list[dict[str, Any]]) -> None:
    assert "alerts.yml" in prometheus["rule_files"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert {"sm-gateway", "sm-worker", "sm-supervisor"} <= set(jobs)
    assert jobs["sm-gateway"]["static_configs"][0]["targets"] == ["gateway:3000"]
    assert jobs["sm-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["sm-supervisor"]["dns_sd_configs"][0]["names"] == ["supervisor"]
    for rule in rules:
        for job in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert set(job.split("|")) <= set(jobs), f"{rule['alert']} selects unknown job {job}"
