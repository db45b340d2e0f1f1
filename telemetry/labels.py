"""Bounded label values: a metric's label sets grow with the operator's configuration, never with
what a tenant sends.

A model name is whatever a request's body says, so a label taken from it as is would let one tenant
create a series per name it invents (and grow every scrape, and Prometheus, without end). Only the
models the operator named are labels: those with a limit (``TOKENMILL_LIMITS``), the default model
and those in the price table (a versioned name such as ``gpt-4o-mini-2024-07-18`` takes its priced
prefix, as ``store.prices.price_for`` does); any other name is ``other``. Tenants are ids the
operator created (``tokenmill keys create``): a tenant cannot invent one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["NO_TENANT", "OTHER_MODEL", "ModelLabels", "model_labels", "tenant_label"]

OTHER_MODEL = "other"
NO_TENANT = "none"  # work of no tenant: the embedded ``tokenmill run``
_MEMO_LIMIT = 4096


class ModelLabels:
    """Maps a model name to its label: itself if the operator configured it, else ``other``."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._known: frozenset[str] = frozenset(known)
        self._memo: dict[str, str] = {}

    @property
    def known(self) -> frozenset[str]:
        return self._known

    def update(self, known: Iterable[str]) -> None:
        names = frozenset(name for name in known if name)
        with self._lock:
            if names != self._known:
                self._known = names
                self._memo = {}

    def __call__(self, model: object) -> str:
        if not isinstance(model, str) or not model:
            return OTHER_MODEL
        label = self._memo.get(model)
        if label is None:
            label = self._label(model)
            if len(self._memo) < _MEMO_LIMIT:  # the memo is bounded too
                self._memo[model] = label
        return label

    def _label(self, model: str) -> str:
        known = self._known
        if model in known:
            return model
        best = None
        for name in known:
            if model.startswith(name + "-") and (best is None or len(name) > len(best)):
                best = name
        return best or OTHER_MODEL


model_labels = ModelLabels()
"""This process's model labels: configured from the settings (and the price table) where the
process starts (``telemetry.metrics.configure``)."""


def tenant_label(tenant_id: str | None) -> str:
    return tenant_id or NO_TENANT


def configured_models(default_model: str, limited: Iterable[str], priced: Iterable[str]) -> set[str]:
    """The models the operator named: the default one, those with limits and those with a price
    (what ``GET /v1/models`` lists)."""
    return {default_model, *limited, *priced}
