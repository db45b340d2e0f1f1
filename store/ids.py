"""OpenAI-like string ids and the clock."""

from __future__ import annotations

import time
import uuid

__all__ = ["new_id", "now_seconds"]


def new_id(prefix: str) -> str:
    """``prefix`` + 32 hex digits, e.g. ``new_id("batch_")`` -> ``batch_3f2a...``."""
    return prefix + uuid.uuid4().hex


def now_seconds() -> int:
    return int(time.time())
