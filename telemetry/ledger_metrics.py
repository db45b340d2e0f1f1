"""Figures read from the ledger at scrape time, for the API's ``/metrics``: requests queued and
running, per model and tenant.

One grouped query over the unfinished requests (found through the ``status`` index), the model
bucketed in SQL (``telemetry.labels``: a name the operator did not configure is ``other``, so the
query returns a bounded number of rows whatever tenants send), its answer kept ``cache_seconds``
so that scrapes, however frequent, cost one query per period. A gauge, not a counter kept by the
workers: the ledger is what holds the queue, so no process's death or restart makes it wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from store import Request, RequestStatus
from telemetry.labels import OTHER_MODEL, tenant_label

__all__ = ["LedgerCollector"]

_STATES = (RequestStatus.QUEUED, RequestStatus.RUNNING)


def unfinished_requests(engine: Engine, known_models: Iterable[str]) -> list[tuple[str, str, str, int]]:
    """(status, model label, tenant id, count) of the queued and running requests."""
    named = Request.body["model"].as_string()
    known = sorted(known_models)
    bucketed: sa.ColumnElement[str] = (
        sa.case((named.in_(known), named), else_=sa.literal(OTHER_MODEL))
        if known
        else sa.literal(OTHER_MODEL)
    )
    model = bucketed.label("model")
    query = (
        sa.select(Request.status, model, Request.tenant_id, sa.func.count())
        .where(Request.status.in_(_STATES))
        .group_by(Request.status, model, Request.tenant_id)
    )
    with engine.connect() as conn:
        return [(RequestStatus(row[0]).value, row[1], row[2], int(row[3])) for row in conn.execute(query)]


class LedgerCollector(Collector):
    """``tokenmill_requests{state, gen_ai_request_model, tenant}`` from the ledger."""

    def __init__(
        self, engine: Engine, known_models: Callable[[], Iterable[str]], cache_seconds: float
    ) -> None:
        self._engine = engine
        self._known_models = known_models
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._rows: list[tuple[str, str, str, int]] = []
        self._read_at: float | None = None

    def _current(self) -> list[tuple[str, str, str, int]]:
        with self._lock:  # concurrent scrapes wait for one query
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= self._cache_seconds:
                self._rows = unfinished_requests(self._engine, self._known_models())
                self._read_at = time.monotonic()
            return self._rows

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tokenmill_requests",
            "Requests in the ledger not yet finished, by state (queued: waiting for a worker or "
            "handed back for later; running: leased to a worker).",
            labels=["state", "gen_ai_request_model", "tenant"],
        )
        for state, model, tenant, count in self._current():
            family.add_metric([state, model, tenant_label(tenant)], count)
        yield family
