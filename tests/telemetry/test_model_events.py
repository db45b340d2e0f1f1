"""Model events feed the metrics whatever the log level, and reach the logs only at INFO."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from models.events import EVENT_LOGGER_NAME, CacheHit, LLMCall, emit
from telemetry.context import RequestScope, enter_request
from telemetry.labels import model_labels
from telemetry.model_events import ModelEventMetrics, install_model_event_metrics

LABELS = {"gen_ai_request_model": "sim-model", "tenant": "tenant_events"}


@pytest.fixture
def counted() -> Iterator[None]:
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    level, propagate = logger.level, logger.propagate
    known = model_labels.known
    model_labels.update({*known, "sim-model"})
    install_model_event_metrics()
    try:
        yield
    finally:
        for handler in [h for h in logger.handlers if isinstance(h, ModelEventMetrics)]:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        model_labels.update(known)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {**LABELS, **labels}) or 0.0


@pytest.mark.usefixtures("counted")
def test_events_are_counted_for_their_request_and_logged_only_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    enter_request(RequestScope("batch_e", "req_e", "tenant_events", "sim-model"))
    limited = LLMCall(
        model="sim-model-2024", provider="openai", latency_ms=30, status_code=429, error="RateLimited: x"
    )
    before = sample("tokenmill_upstream_rate_limited_total")
    joins = sample("tokenmill_cache_lookups_total", result="join")
    caplog.set_level(logging.WARNING)
    emit(limited)
    emit(CacheHit(model="sim-model", key_digest="0" * 16, store="redis", joined=True))
    assert sample("tokenmill_upstream_rate_limited_total") == before + 1
    assert sample("tokenmill_cache_lookups_total", result="join") == joins + 1
    assert (
        sample(
            "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat", error_type="429"
        )
        >= 1
    )
    assert not [r for r in caplog.records if r.name == EVENT_LOGGER_NAME]  # quiet logs stay quiet
    caplog.set_level(logging.INFO)
    emit(limited)
    assert limited in [r.msg for r in caplog.records if r.name == EVENT_LOGGER_NAME]
    assert sample("tokenmill_upstream_rate_limited_total") == before + 2


@pytest.mark.usefixtures("counted")
def test_events_nobody_logs_are_counted_without_a_log_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """With only the metrics listening (a worker at WARNING), an event is counted without a log
    record built for it (two or three per call); a handler of the log's own still gets records."""
    enter_request(RequestScope("batch_e", "req_e", "tenant_events", "sim-model"))
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting_factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", counting_factory)
    logging.getLogger().setLevel(logging.WARNING)
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    # pytest's capture handlers (on this logger, which does not propagate) off: the metrics alone.
    monkeypatch.setattr(logger, "handlers", [h for h in logger.handlers if isinstance(h, ModelEventMetrics)])
    misses = sample("tokenmill_cache_lookups_total", result="join")
    emit(CacheHit(model="sim-model", key_digest="0" * 16, store="redis", joined=True))
    assert sample("tokenmill_cache_lookups_total", result="join") == misses + 1
    assert [r for r in made if r.name == EVENT_LOGGER_NAME] == []
    seen: list[object] = []

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.msg)

    listener = Listener()
    logger.addHandler(listener)
    try:
        event = CacheHit(model="sim-model", key_digest="1" * 16, store="redis", joined=True)
        emit(event)
    finally:
        logger.removeHandler(listener)
    assert seen == [event]
    assert sample("tokenmill_cache_lookups_total", result="join") == misses + 2
