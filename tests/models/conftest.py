"""Fixtures of the model-layer tests."""

from tests.models.event_capture import events as events
