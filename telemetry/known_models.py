"""Keeping ``telemetry.labels.model_labels`` in step with the operator's configuration: the settings'
default model and limits, and the price table, read again at most every ``PRICES_READ_SECONDS``."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.engine import Engine

from config import Settings
from store import get_prices
from telemetry.labels import ModelLabels, configured_models, model_labels

__all__ = ["PRICES_READ_SECONDS", "KnownModels", "keep_fresh"]

_logger = logging.getLogger(__name__)

PRICES_READ_SECONDS = 60.0


class KnownModels:
    """The configured model names; ``current()`` reads the price table when its copy is stale."""

    def __init__(self, settings: Settings, engine: Engine, labels: ModelLabels = model_labels) -> None:
        self._settings = settings
        self._engine = engine
        self._labels = labels
        self._lock = threading.Lock()
        self._read_at: float | None = None
        labels.update(configured_models(settings.default_model, settings.limits, ()))

    def current(self) -> frozenset[str]:
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= PRICES_READ_SECONDS:
                self._read_at = now
                priced = get_prices(self._engine)
                self._labels.update(
                    configured_models(self._settings.default_model, self._settings.limits, priced)
                )
        return self._labels.known


def keep_fresh(known: KnownModels) -> threading.Thread:
    """Read ``known`` now and every ``PRICES_READ_SECONDS`` on a daemon thread of its own (a worker
    process's model labels follow ``tokenmill prices set`` within that time)."""

    def run() -> None:
        while True:
            try:
                known.current()
            except Exception:  # the database restarting: keep the names known so far
                _logger.warning("the model names for metric labels could not be read", exc_info=True)
            time.sleep(PRICES_READ_SECONDS)

    thread = threading.Thread(target=run, name="metric labels", daemon=True)
    thread.start()
    return thread
