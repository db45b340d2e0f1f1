"""deploy/ matches the code: the dashboard's queries name only metrics that exist, with their labels;
Prometheus scrapes both kinds of endpoint with the operator's token; the compose services are
optional and their images come from variables."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client.metrics import MetricWrapperBase

from telemetry import metrics
from tests.cluster import ROOT

DEPLOY = ROOT / "deploy"
_SAMPLE_SUFFIXES = ("_total", "_sum", "_count", "_bucket", "")


def exported_samples() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric the workers and the API export."""
    samples: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in _SAMPLE_SUFFIXES:
                samples[metric._name + suffix] = {*metric._labelnames, "le"}
    # The API's ledger gauge (telemetry.ledger_metrics).
    samples["tokenmill_requests"] = {"state", "gen_ai_request_model", "tenant"}
    return samples


def test_the_dashboard_queries_only_metrics_and_labels_that_exist() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tokenmill.json").read_text())
    exported = exported_samples()
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 14
    for expr in expressions:
        names = set(re.findall(r"\b((?:tokenmill|gen_ai)_[a-z_]+)\b(?=\s*[{\[])", expr))
        assert names, expr
        for name in names:
            assert name in exported, (name, expr)
            for selector in re.findall(rf"{name}\{{([^}}]*)\}}", expr):
                labels = set(re.findall(r"(\w+)\s*(?:=~|!=|=)", selector))
                assert labels <= exported[name], (name, labels - exported[name])
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"model", "tenant"}


def test_prometheus_scrapes_the_api_and_every_worker_with_the_token() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tokenmill-api", "tokenmill-workers"}
    for job in jobs.values():
        assert job["authorization"]["credentials_file"] == "/prometheus/metrics-token"
    assert jobs["tokenmill-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["tokenmill-workers"]["dns_sd_configs"][0]["names"] == ["worker"]


def test_the_observability_services_are_optional_and_their_images_variables() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]
    assert services["prometheus"]["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus}"
    assert services["grafana"]["image"] == "${GRAFANA_IMAGE:-grafana/grafana}"
    # The workers' metrics port Prometheus asks for is the one the worker service serves, on the
    # compose network, and the scrape token reaches both ends.
    port = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][1]
    worker = services["worker"]["environment"]
    assert worker["TOKENMILL_WORKER_METRICS_PORT"] == str(port["dns_sd_configs"][0]["port"])
    assert worker["TOKENMILL_WORKER_METRICS_HOST"] == "0.0.0.0"
    for name in ("api", "worker", "prometheus"):
        assert "TOKENMILL_METRICS_TOKEN" in services[name]["environment"]
