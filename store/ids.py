"""OpenAI-like string ids and the clock."""

from __future__ import annotations

import secrets
import time

__all__ = ["new_id", "now_seconds"]


def new_id(prefix: str) -> str:
    """``prefix`` + 32 hex digits, e.g. ``new_id("batch_")`` -> ``batch_019a...``: 12 of the
    milliseconds since the epoch, then 80 random bits. Time first, so that lists ordered
    (created_at, id) newest first are right within a second too (two batches created in the same
    second used to list in random order)."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def now_seconds() -> int:
    return int(time.time())
