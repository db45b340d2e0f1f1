"""Label values stay within what the operator configured, whatever model names tenants send."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from telemetry.labels import OTHER_MODEL, ModelLabels, configured_models


def test_only_configured_models_become_labels() -> None:
    labels = ModelLabels(configured_models("gpt-4o-mini", {"sim-model": None}, ["gpt-4o"]))
    assert labels("sim-model") == "sim-model"
    assert labels("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"  # the longest priced prefix
    assert labels("gpt-4o-2024-08-06") == "gpt-4o"
    assert labels("gpt-4omni") == OTHER_MODEL  # a prefix counts only followed by a dash
    assert labels("made-up") == OTHER_MODEL
    assert labels(None) == OTHER_MODEL
    assert labels(12) == OTHER_MODEL
    labels.update(["made-up"])  # the operator priced it since
    assert labels("made-up") == "made-up"
    assert labels("sim-model") == OTHER_MODEL


def test_a_tenant_inventing_names_adds_no_series() -> None:
    labels = ModelLabels({"sim-model"})
    registry = CollectorRegistry()
    counter = Counter("requests", "test", ["model"], registry=registry)
    for number in range(10_000):
        counter.labels(labels(f"invented-{number}")).inc()
    counter.labels(labels("sim-model")).inc()
    series = {sample.labels["model"] for family in registry.collect() for sample in family.samples}
    assert series == {"other", "sim-model"}
    assert registry.get_sample_value("requests_total", {"model": "other"}) == 10_000
