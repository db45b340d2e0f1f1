"""Ids order as they were made, so that "newest first" lists are right within a second too."""

from __future__ import annotations

import re
import time

from store.ids import new_id


def _next_millisecond() -> None:
    start = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == start:
        pass


def test_ids_made_in_successive_milliseconds_sort_in_the_order_they_were_made() -> None:
    made = []
    for _ in range(20):
        made.append(new_id("batch_"))
        _next_millisecond()
    assert made == sorted(made)  # random ids: right one time in 20!
    assert all(re.fullmatch(r"batch_[0-9a-f]{32}", made_id) for made_id in made)
    assert len(set(made)) == len(made)


def test_ids_made_within_one_millisecond_sort_in_the_order_they_were_made() -> None:
    """A fast SQLite ingest made two batches in one millisecond: they listed in random order."""
    made = [new_id("batch_") for _ in range(1000)]  # most of them share their millisecond
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"batch_[0-9a-f]{32}", made_id) for made_id in made)
